//! What structured outputs cost outside the model, on this machine: building
//! the token trie, compiling each schema of a corpus (a cache miss), finding
//! it again (a hit), and a row's token mask at each step of a random walk
//! through its language. docs/performance.md ("Structured outputs") quotes it.
//!   cargo run --release --example constraint_costs -- TOKENIZER_JSON SCHEMAS_JSON [STEPS]
use std::time::Instant;

use batchgen::constraint::{Grammars, RowConstraint, Spec};
use batchgen::tokenizer::Tokenizer;

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(tokenizer), Some(schemas)) = (args.get(1), args.get(2)) else {
        return Err("usage: constraint_costs TOKENIZER_JSON SCHEMAS_JSON [STEPS]".into());
    };
    let steps: usize = args.get(3).map_or(Ok(64), |s| s.parse())?;
    let tok = Tokenizer::from_file(std::path::Path::new(tokenizer))?;
    let corpus: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(schemas)?)?;
    let t = Instant::now();
    let grammars = Grammars::new(&tok, 50257, 50256, 1024)?;
    println!("token trie and parser factory: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    let (mut miss, mut hit, mut mask) = (Vec::new(), Vec::new(), Vec::new());
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for schema in corpus.values() {
        let spec = Spec::JsonSchema(schema.to_string());
        let t = Instant::now();
        let grammar = grammars.compile(&spec)?;
        miss.push(t.elapsed().as_secs_f64() * 1e3);
        for _ in 0..20 {
            let t = Instant::now();
            grammars.compile(&spec)?;
            hit.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let mut row = RowConstraint::new(&grammar);
        for _ in 0..steps {
            let t = Instant::now();
            let m = row.mask()?;
            mask.push(t.elapsed().as_secs_f64() * 1e3);
            let allowed: Vec<u32> = (0..50257).filter(|&id| m.allows(id)).collect();
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let Some(&next) = allowed.get(rng as usize % allowed.len().max(1)) else { break };
            if next == row.eos() {
                break;
            }
            row.consume(next)?;
        }
    }
    let line = |name: &str, v: &mut Vec<f64>| {
        let n = v.len();
        println!(
            "{name}: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({n})",
            percentile(v, 0.5),
            percentile(v, 0.99),
            percentile(v, 1.0)
        );
    };
    line("compile (cache miss), per schema", &mut miss);
    line("lookup (cache hit), per request", &mut hit);
    line("mask, per row and step", &mut mask);
    Ok(())
}
