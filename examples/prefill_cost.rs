//! Prefill run time against its shape (prompts × tokens each), on the built
//! graph over the slot cache, through the same `Backend::prefill` call the
//! worker makes: median over `REPEATS` runs, with the rate in tokens per
//! second and in GFLOP/s (2 × weights multiplied per token, plus attention).
//! What decides the time to first token of a burst.
//!
//! `PREFILL_SHAPES=16x32,8x32,...` other shapes; BATCHGEN_WEIGHTS,
//! BATCHGEN_KV_DTYPE, BATCHGEN_ATTENTION and BATCHGEN_ORT_PROFILE as in
//! `decode_context`.
//!
//! cargo run --release --example prefill_cost -- MODEL_DIR [THREADS] [REPEATS]
use std::time::Instant;

use batchgen::engine::backend::Chunk;
use batchgen::engine::{Backend, SessionOptions, SlotBackend};
use batchgen::graph::{Gpt2Shape, SharedModel, Weights};

const SHAPES: &str = "1x32,4x32,8x32,16x32,1x128,1x512,2x256,4x128";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).ok_or("usage: prefill_cost MODEL_DIR [THREADS] [REPEATS]")?);
    let threads: usize = args.get(2).map_or(Ok(2), |s| s.parse())?;
    let repeats: usize = args.get(3).map_or(Ok(5), |s| s.parse())?;
    let shapes: Vec<(usize, usize)> = std::env::var("PREFILL_SHAPES")
        .unwrap_or_else(|_| SHAPES.into())
        .split(',')
        .map(|s| {
            let (p, t) = s.split_once('x').ok_or("PREFILL_SHAPES: PROMPTSxTOKENS,...")?;
            Ok((p.parse()?, t.parse()?))
        })
        .collect::<Result<_, Box<dyn std::error::Error>>>()?;
    let rt = batchgen::runtime::init(None)?;
    let shape = Gpt2Shape::load(&dir.join("config.json"))?;
    let weights = Weights::from_files(&batchgen::model::ModelFiles::in_dir("prefill_cost", &dir)?, &shape)?;
    let precision = batchgen::graph::Precision::from_env()?;
    let kv = batchgen::graph::KvLayout::from_env()?;
    let shared = SharedModel::new(
        shape.clone(),
        weights.quantized(&shape, precision, batchgen::graph::Int8Range::from_env()?.limit()),
        kv,
    );
    let session = std::sync::Arc::new(shared.session(&rt.env, &SessionOptions { intra_op_threads: threads })?);
    let most = shapes.iter().map(|s| s.0).max().unwrap_or(1);
    let mut backend = SlotBackend::new(shared.worker(&session, most)?, None);
    // Multiplied weights per token (embedding lookups excluded; the last
    // layer past its QKV projection and the LM head once per prompt, as the
    // graph computes them) and causal attention (QK and AV, half the square).
    let (e, l, inner) = (shape.width as f64, shape.layers as f64, shape.inner as f64);
    let per_token = 2.0 * (l - 1.0) * (4.0 * e * e + 2.0 * e * inner) + 2.0 * 3.0 * e * e;
    let per_prompt = 2.0 * (e * e + 2.0 * e * inner) + 2.0 * e * shape.vocab as f64;
    println!(
        "built graph weights: {precision}, KV cache {} ({:?}), {threads} threads; median of {repeats} prefill runs",
        kv.dtype, kv.kernel
    );
    for &(prompts, tokens) in &shapes {
        let mut times = Vec::with_capacity(repeats);
        for r in 0..repeats + 1 {
            let slots = backend.alloc(prompts).ok_or("no free slots")?;
            let ids: Vec<Vec<u32>> = (0..prompts)
                .map(|p| (0..tokens).map(|i| ((r * 131 + p * 7919 + i * 31) % 50000) as u32 + 10).collect())
                .collect();
            let chunks: Vec<Chunk<'_>> = slots.iter().zip(&ids).map(|(&slot, t)| Chunk { slot, tokens: t }).collect();
            let t = Instant::now();
            backend.prefill(&chunks)?;
            if r > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
            backend.free(&slots);
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let n = (prompts * tokens) as f64;
        let flops = n * per_token + prompts as f64 * (per_prompt + 2.0 * l * e * (tokens * tokens) as f64);
        println!(
            "{prompts:>3} x {tokens:<4} ({:>5} tokens): {:>7.1} ms  {:>6.0} tokens/s  {:>5.0} GFLOP/s",
            prompts * tokens,
            median * 1e3,
            n / median,
            flops / median / 1e9
        );
    }
    Ok(())
}
