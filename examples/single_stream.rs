//! Single-stream speed as a client sees it: one request at a time, prompt of
//! `--prompt-tokens` ids (i * 7 + 100, as `scripts/ort_loop.py` uses), greedy,
//! `--new-tokens` tokens with EOS ignored, timed from send to last message.
//!
//! cargo run --release --example single_stream -- http://127.0.0.1:50051 32 128 3
use std::time::Instant;

use batchgen::pb::{self, generation_client::GenerationClient};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let target = args.get(1).cloned().unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let prompt_tokens: u32 = args.get(2).map_or(Ok(32), |s| s.parse())?;
    let new_tokens: u32 = args.get(3).map_or(Ok(128), |s| s.parse())?;
    let runs: usize = args.get(4).map_or(Ok(3), |s| s.parse())?;
    let mut client = GenerationClient::connect(target).await?;
    for run in 0..runs {
        let request = pb::GenerateRequest {
            prompt_token_ids: (0..prompt_tokens).map(|i| i * 7 + 100).collect(),
            stopping: Some(pb::Stopping { max_new_tokens: new_tokens, ignore_eos: true, ..Default::default() }),
            ..Default::default()
        };
        let start = Instant::now();
        let mut stream = client.generate_stream(request).await?.into_inner();
        let mut stamps = Vec::new();
        while let Some(msg) = stream.message().await? {
            for _ in &msg.tokens {
                stamps.push(start.elapsed().as_secs_f64());
            }
        }
        let total = start.elapsed().as_secs_f64();
        let mut gaps: Vec<f64> = stamps.windows(2).map(|w| w[1] - w[0]).collect();
        gaps.sort_by(f64::total_cmp);
        let median = gaps.get(gaps.len() / 2).copied().unwrap_or(0.0);
        println!(
            "run {run}: {} tokens in {total:.3} s = {:.1} tokens/s, first token {:.1} ms, inter-token median {:.2} ms",
            stamps.len(),
            stamps.len() as f64 / total,
            stamps.first().copied().unwrap_or(0.0) * 1e3,
            median * 1e3
        );
    }
    Ok(())
}
