//! Decode step time against context length, for both backends in one pass:
//! `ROWS` rows are prefilled to a context, then decode steps are timed with
//! nothing prefilling, through the same `Backend` calls the worker makes.
//! `exported` is the optimum export with its left-padded batch (each step
//! concatenates past and new keys inside the graph); `built` is batchgen's
//! own graph over the slot cache. Rounds alternate, so both see the same
//! machine state.
//!
//! MODEL_DIR holds the optimum export (`model.onnx`); the built graph reads
//! `model.safetensors` from it when there is one, else the export's weights.
//! A checkpoint folder without `model.onnx` times the built graph alone.
//! `BATCHGEN_ATTENTION=paged` runs the built graph over the paged cache
//! (blocks of 16, the server's default) instead of the slot cache.
//!
//! `DECODE_BACKENDS=built` (or `exported`) times one backend only, e.g.
//! under `BATCHGEN_ORT_PROFILE`; `DECODE_WINDOWS=512:256` other windows.
//!
//! cargo run --release --example decode_context -- MODEL_DIR [THREADS] [ROWS] [ROUNDS]
use std::time::Instant;

use batchgen::engine::backend::Chunk;
use batchgen::engine::pages::{PagedBackend, pool_blocks};
use batchgen::engine::{Backend, Model, PaddedBackend, SessionOptions, SlotBackend};
use batchgen::graph::{Gpt2Shape, SharedModel, Weights};

/// Contexts at which steps are timed: from `start` for `steps` steps.
const WINDOWS: [(usize, usize); 2] = [(32, 256), (512, 256)];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).ok_or("usage: decode_context MODEL_DIR [THREADS] [ROWS] [ROUNDS]")?);
    let threads: usize = args.get(2).map_or(Ok(2), |s| s.parse())?;
    let rows: usize = args.get(3).map_or(Ok(16), |s| s.parse())?;
    let rounds: usize = args.get(4).map_or(Ok(2), |s| s.parse())?;
    let rt = batchgen::runtime::init(None)?;
    let options = SessionOptions { intra_op_threads: threads };
    let shape = Gpt2Shape::load(&dir.join("config.json"))?;
    let onnx = dir.join("model.onnx");
    let weights = Weights::from_files(&batchgen::model::ModelFiles::in_dir("decode_context", &dir)?, &shape)?;
    // BATCHGEN_WEIGHTS: the built graph's precision, as `serve --weights`.
    let precision = batchgen::graph::Precision::from_env()?;
    // BATCHGEN_KV_DTYPE / BATCHGEN_ATTENTION: its cache and attention kernel.
    let kv = batchgen::graph::KvLayout::from_env()?;
    let shared = SharedModel::new(
        shape.clone(),
        weights.quantized(&shape, precision, batchgen::graph::Int8Range::from_env()?.limit()),
        kv,
    );
    println!("built graph weights: {precision}, KV cache {} ({:?})", kv.dtype, kv.kernel);
    let session = std::sync::Arc::new(shared.session(&rt.env, &options)?);
    let mut built: Box<dyn Backend> = if kv.is_paged() {
        let block = 16;
        let blocks = pool_blocks(rows, shape.positions, block, 0);
        Box::new(PagedBackend::new(shared.paged_worker(&session, blocks, block)?, rows, None))
    } else {
        Box::new(SlotBackend::new(shared.worker(&session, rows)?, None))
    };
    let mut exported: Option<Box<dyn Backend>> = if onnx.exists() {
        Some(Box::new(PaddedBackend::new(Model::load(&rt.env, &onnx, shape.layers, &options)?, 50256, rows)))
    } else {
        None
    };
    println!("{rows} rows, {threads} threads; median decode step (ms) over each window of context");
    let only = std::env::var("DECODE_BACKENDS").unwrap_or_default();
    let windows: Vec<(usize, usize)> = match std::env::var("DECODE_WINDOWS") {
        Ok(w) => w
            .split(',')
            .map(|p| {
                let (a, b) = p.split_once(':').ok_or("DECODE_WINDOWS: START:STEPS,...")?;
                Ok((a.parse()?, b.parse()?))
            })
            .collect::<Result<_, Box<dyn std::error::Error>>>()?,
        Err(_) => WINDOWS.to_vec(),
    };
    for round in 0..rounds {
        for (name, backend) in [("exported", exported.as_mut()), ("built", Some(&mut built))] {
            let Some(backend) = backend else { continue };
            if !only.is_empty() && only != name {
                continue;
            }
            let mut line = format!("round {round} {name:>8}:");
            let mut medians = Vec::new();
            for &(start, steps) in &windows {
                let median = window(backend.as_mut(), rows, start, steps)?;
                line += &format!("  context {start}-{}: {median:.1} ms", start + steps);
                medians.push(median);
            }
            if let [first, .., last] = medians[..] {
                line += &format!("  ratio {:.2}", last / first);
            }
            println!("{line}");
        }
    }
    Ok(())
}

/// Prefills `rows` prompts of `start` tokens (distinct), decodes `steps`
/// steps, frees the rows; returns the median step time in ms.
fn window(
    backend: &mut dyn Backend,
    rows: usize,
    start: usize,
    steps: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    let slots = backend.alloc(rows).ok_or("no free slots")?;
    let prompts: Vec<Vec<u32>> =
        (0..rows).map(|r| (0..start).map(|i| ((r * 7919 + i * 31) % 50000) as u32 + 10).collect()).collect();
    // Prefill a few rows per call (the padded backend pads them together).
    for group in slots.chunks(4).zip(prompts.chunks(4)) {
        let chunks: Vec<Chunk<'_>> = group.0.iter().zip(group.1).map(|(&slot, p)| Chunk { slot, tokens: p }).collect();
        backend.prefill(&chunks)?;
    }
    let mut times = Vec::with_capacity(steps);
    let mut next: Vec<(usize, u32)> = slots.iter().map(|&s| (s, 464)).collect();
    for _ in 0..steps {
        let t = Instant::now();
        let logits = backend.decode(&next)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        for (i, n) in next.iter_mut().enumerate() {
            let row = logits.row(i);
            n.1 = (0..row.len()).fold(0, |b, k| if row[k] > row[b] { k } else { b }) as u32;
        }
    }
    backend.free(&slots);
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
