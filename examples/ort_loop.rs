//! The baseline for single-stream speed: a plain ONNX Runtime greedy loop
//! with a KV cache, batch 1, no server, same library, graph optimisation and
//! threads as batchgen. Prompt: 32 ids `i * 7 + 100`, as the bench uses.
//!
//! GRAPH `exported` (default): `ort` used directly on the optimum export,
//! each step's `present` fed back as `past`. GRAPH `built`: batchgen's own
//! graph (`batchgen::graph`, from `model.safetensors` or the export's
//! weights) over a one-slot cache, prompt then one token per run.
//!
//! cargo run --release --example ort_loop -- MODEL_DIR [THREADS] [NEW_TOKENS] [RUNS] [GRAPH]
use std::time::Instant;

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).ok_or("usage: ort_loop MODEL_DIR [THREADS] [NEW_TOKENS] [RUNS]")?);
    let threads: usize = args.get(2).map_or(Ok(2), |s| s.parse())?;
    let new_tokens: usize = args.get(3).map_or(Ok(128), |s| s.parse())?;
    let runs: usize = args.get(4).map_or(Ok(3), |s| s.parse())?;
    if args.get(5).map(String::as_str) == Some("built") {
        return built_loop(&dir, threads, new_tokens, runs);
    }
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let (layers, heads) = (config["n_layer"].as_u64().unwrap() as usize, config["n_head"].as_u64().unwrap() as usize);
    let head_dim = config["n_embd"].as_u64().unwrap() as usize / heads;
    let rt = batchgen::runtime::init(None)?;
    let mut session = Session::builder(&rt.env)?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(ort::Error::<()>::from)?
        .with_intra_threads(threads)
        .map_err(ort::Error::<()>::from)?
        .commit_from_file(dir.join("model.onnx"))?;
    let prompt: Vec<i64> = (0..32).map(|i| i * 7 + 100).collect();
    for run in 0..runs {
        let start = Instant::now();
        let mut past: Vec<DynValue> = (0..2 * layers)
            .map(|_| Tensor::<f32>::from_array(([1usize, heads, 0, head_dim], Vec::new())).map(|t| t.into_dyn()))
            .collect::<Result<_, _>>()?;
        let (mut ids, mut n_past) = (prompt.clone(), 0usize);
        let mut steps = Vec::new();
        for _ in 0..new_tokens {
            let t = Instant::now();
            let seq = ids.len();
            let mut feeds: Vec<(String, DynValue)> = vec![
                ("input_ids".into(), Tensor::from_array(([1usize, seq], ids.clone()))?.into_dyn()),
                (
                    "attention_mask".into(),
                    Tensor::from_array(([1usize, n_past + seq], vec![1i64; n_past + seq]))?.into_dyn(),
                ),
                (
                    "position_ids".into(),
                    Tensor::from_array(([1usize, seq], (n_past as i64..(n_past + seq) as i64).collect::<Vec<_>>()))?
                        .into_dyn(),
                ),
            ];
            for (i, v) in past.drain(..).enumerate() {
                feeds.push((format!("past_key_values.{}.{}", i / 2, ["key", "value"][i % 2]), v));
            }
            let mut out = session.run(feeds)?;
            let (shape, logits) = out["logits"].try_extract_tensor::<f32>()?;
            let vocab = shape[2] as usize;
            let last = &logits[(seq - 1) * vocab..seq * vocab];
            let next = (0..vocab).fold(0, |b, i| if last[i] > last[b] { i } else { b });
            for i in 0..2 * layers {
                past.push(out.remove(format!("present.{}.{}", i / 2, ["key", "value"][i % 2])).unwrap());
            }
            n_past += seq;
            ids = vec![next as i64];
            if seq == 1 {
                steps.push(t.elapsed().as_secs_f64());
            }
        }
        report(run, new_tokens, start, steps);
    }
    Ok(())
}

fn report(run: usize, new_tokens: usize, start: Instant, mut steps: Vec<f64>) {
    steps.sort_by(f64::total_cmp);
    let total = start.elapsed().as_secs_f64();
    println!(
        "run {run}: {new_tokens} tokens in {total:.3} s = {:.1} tokens/s, decode step median {:.2} ms",
        new_tokens as f64 / total,
        steps[steps.len() / 2] * 1e3
    );
}

fn built_loop(
    dir: &std::path::Path,
    threads: usize,
    new_tokens: usize,
    runs: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    use batchgen::graph::{BuiltModel, Gpt2Shape, RowInput, SharedModel, Weights};
    let rt = batchgen::runtime::init(None)?;
    let shape = Gpt2Shape::load(&dir.join("config.json"))?;
    let weights = Weights::from_files(&batchgen::model::ModelFiles::in_dir("ort_loop", dir)?, &shape)?;
    // BATCHGEN_WEIGHTS picks the precision as `serve --weights` does.
    let precision = batchgen::graph::Precision::from_env()?;
    // BATCHGEN_KV_DTYPE / BATCHGEN_ATTENTION: its cache and attention kernel.
    let kv = batchgen::graph::KvLayout::from_env()?;
    println!("built graph, weights {precision}, KV cache {} ({:?})", kv.dtype, kv.kernel);
    let shared = SharedModel::new(
        shape.clone(),
        weights.quantized(&shape, precision, batchgen::graph::Int8Range::from_env()?.limit()),
        kv,
    );
    let session =
        std::sync::Arc::new(shared.session(&rt.env, &batchgen::engine::SessionOptions { intra_op_threads: threads })?);
    let mut model: BuiltModel = shared.worker(&session, 1)?;
    let prompt: Vec<u32> = (0..32).map(|i| i * 7 + 100).collect();
    for run in 0..runs {
        let start = Instant::now();
        let mut steps = Vec::new();
        let (mut tokens, mut past) = (prompt.clone(), 0usize);
        for _ in 0..new_tokens {
            let t = Instant::now();
            let logits = model.run(0..1, &[RowInput { tokens: &tokens, past, logits: 1 }])?;
            let last = logits.row(0);
            let next = (0..last.len()).fold(0, |b, i| if last[i] > last[b] { i } else { b });
            past += tokens.len();
            if tokens.len() == 1 {
                steps.push(t.elapsed().as_secs_f64());
            }
            tokens = vec![next as u32];
        }
        report(run, new_tokens, start, steps);
    }
    Ok(())
}
