//! The engine's forward call alone, in a loop, without gRPC: separates the
//! cost of ONNX Runtime from the cost of serving.
//!
//! cargo run --release --example engine_loop -- MODEL_DIR [THREADS] [NEW_TOKENS] [RUNS]
use std::time::Instant;

use batchgen::engine::{ForwardInput, Model, SessionOptions};
use batchgen::model::{ModelConfig, ModelFiles};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .ok_or("usage: engine_loop MODEL_DIR [THREADS] [NEW_TOKENS]")?;
    let threads: usize = args.get(2).map_or(Ok(2), |s| s.parse())?;
    let new_tokens: usize = args.get(3).map_or(Ok(128), |s| s.parse())?;
    let runs: usize = args.get(4).map_or(Ok(3), |s| s.parse())?;
    let rt = batchgen::runtime::init(None)?;
    let files = ModelFiles::in_dir(dir, std::path::Path::new(dir))?;
    let config = ModelConfig::load(&files)?;
    let mut model = Model::load(
        &rt.env,
        &files.onnx,
        config.n_layer,
        &SessionOptions {
            intra_op_threads: threads,
        },
    )?;
    let prompt: Vec<u32> = (0..32).map(|i| i * 7 + 100).collect();
    for run in 0..runs {
        let start = Instant::now();
        let (mut logits, mut cache) = model.forward(&ForwardInput::single(&prompt, 0), model.empty_cache(1)?)?;
        let mut steps = Vec::new();
        for _ in 1..new_tokens {
            let next = batchgen::sampling::greedy(logits.row(0), &[], 0).id;
            let t = Instant::now();
            let input = ForwardInput::single(&[next], cache.len);
            (logits, cache) = model.forward(&input, cache)?;
            steps.push(t.elapsed().as_secs_f64());
        }
        steps.sort_by(f64::total_cmp);
        let total = start.elapsed().as_secs_f64();
        println!(
            "run {run}: {new_tokens} tokens in {total:.3} s = {:.1} tokens/s, decode step median {:.2} ms",
            new_tokens as f64 / total,
            steps[steps.len() / 2] * 1e3
        );
    }
    Ok(())
}
