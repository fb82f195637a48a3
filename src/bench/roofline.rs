//! The roofline `batchgen bench --roofline` measures on the machine it runs
//! on, and the bound on decode tokens/s it gives for a model shape, a
//! precision and a batch of rows. The model of the bound (docs/performance.md,
//! "Roofline"), per decode step of `rows` rows at mean context `t`:
//!
//! - work: `rows × (2 × P + 4 × L × t × E)` operations, P the parameters the
//!   step multiplies (every layer's QKV, projection and MLP weights and the
//!   LM head), the second term attention (QKᵀ and AV); at the measured peak
//!   of the precision's GEMM (float32 MatMul, or int8 DynamicQuantizeMatMul,
//!   the ops batchgen's graph runs, timed by ONNX Runtime at a large shape);
//! - traffic: the weights once (4 bytes a float32 parameter, 1 an int8 one)
//!   plus each row's keys and values (`2 × L × t × E` elements), at the
//!   measured read bandwidth of a weights-sized buffer;
//! - bound: `rows / max(work time, traffic time)` tokens/s.
//!
//! It also times the step's GEMMs alone at the model's own shapes with
//! `rows` rows (what ONNX Runtime's kernels reach there, below the peak for
//! small batches), so a report can tell the machine's bound from the
//! kernels'.
use std::time::Instant;

use ort::session::Session;
use ort::value::Tensor;
use serde::{Deserialize, Serialize};

use crate::graph::builder::matmul_probe;

/// What a bound is computed from: the model's GEMM shapes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ModelShape {
    pub layers: usize,
    pub width: usize,
    pub inner: usize,
    pub vocab: usize,
}

/// How the weights are stored: which GEMMs are int8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Precision {
    Fp32,
    /// Every layer's MatMuls and the LM head.
    Int8,
    /// The layers' MatMuls int8, the LM head float32.
    Int8Fp32Head,
}

impl Precision {
    /// `ModelInfo.weights`' name of it (an export's "fp16" counts as fp32 here).
    pub fn from_name(name: &str) -> Precision {
        match name {
            "int8" => Precision::Int8,
            "int8-fp32-head" => Precision::Int8Fp32Head,
            _ => Precision::Fp32,
        }
    }
}

impl ModelShape {
    /// Each GEMM of a step: (k, n, how many per step, is it a layer's).
    fn gemms(&self) -> [(usize, usize, usize, bool); 5] {
        let (e, l) = (self.width, self.layers);
        [
            (e, 3 * e, l, true),
            (e, e, l, true),
            (e, self.inner, l, true),
            (self.inner, e, l, true),
            (e, self.vocab, 1, false),
        ]
    }

    /// (int8 parameters, float32 parameters) a step multiplies.
    fn params(&self, p: Precision) -> (f64, f64) {
        let (mut int8, mut fp32) = (0.0, 0.0);
        for (k, n, count, layer) in self.gemms() {
            let params = (k * n * count) as f64;
            match (p, layer) {
                (Precision::Int8, _) | (Precision::Int8Fp32Head, true) => int8 += params,
                _ => fp32 += params,
            }
        }
        (int8, fp32)
    }
}

/// What was measured here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub threads: usize,
    /// float32 MatMul at 512 × 768 × 3072, operations per second.
    pub fp32_ops: f64,
    /// int8 DynamicQuantizeMatMul at the same shape.
    pub int8_ops: f64,
    /// Read bandwidth over a buffer of `stream_bytes`, bytes per second.
    pub bandwidth: f64,
    pub stream_bytes: usize,
}

/// The bound for one batch size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bound {
    pub rows: usize,
    pub context: usize,
    pub compute_tokens_per_second: f64,
    pub bandwidth_tokens_per_second: f64,
    /// The lower of the two.
    pub tokens_per_second: f64,
    /// The step's GEMMs alone at the model's shapes, as ONNX Runtime runs them.
    pub gemms_tokens_per_second: f64,
}

/// The machine's figures and the bound per batch size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Roofline {
    pub cpu: String,
    pub shape: ModelShape,
    pub precision: Precision,
    /// Bytes of one cached key or value element.
    pub kv_bytes: usize,
    pub machine: Machine,
    pub bounds: Vec<Bound>,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

fn session(
    env: &ort::environment::Environment,
    threads: usize,
    k: usize,
    n: usize,
    int8: bool,
) -> Result<Session, Error> {
    let e = |e: ort::Error<ort::session::builder::SessionBuilder>| -> ort::Error { e.into() };
    Ok(Session::builder(env)?.with_intra_threads(threads).map_err(e)?.commit_from_memory(&matmul_probe(k, n, int8))?)
}

/// Seconds of one run with `m` rows: the median of runs filling `budget` s
/// (3 at least) after one warm-up.
fn time_gemm(s: &mut Session, m: usize, k: usize, budget: f64) -> Result<f64, Error> {
    let x: Vec<f32> = (0..m * k).map(|i| ((i % 97) as f32 - 48.0) * 0.01).collect();
    let mut run = || -> Result<f64, Error> {
        let input = Tensor::from_array(([m, k], x.clone()))?;
        let t = Instant::now();
        s.run(ort::inputs!["x" => input])?;
        Ok(t.elapsed().as_secs_f64())
    };
    run()?;
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < 3 || start.elapsed().as_secs_f64() < budget {
        times.push(run()?);
        if times.len() >= 200 {
            break;
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Read bandwidth: `threads` threads summing their share of a buffer of
/// `bytes`, the best of three passes.
fn bandwidth(bytes: usize, threads: usize) -> f64 {
    let n = (bytes / 4).max(1 << 18);
    let data: Vec<f32> = (0..n).map(|i| (i & 0xff) as f32).collect();
    let chunk = n.div_ceil(threads.max(1));
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let total: f32 = std::thread::scope(|s| {
            let parts: Vec<_> = data.chunks(chunk).map(|part| s.spawn(move || sum(part))).collect();
            parts.into_iter().map(|p| p.join().unwrap_or(0.0)).sum()
        });
        std::hint::black_box(total);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (n * 4) as f64 / best
}

/// A sum the compiler vectorises: 16 independent lanes.
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + rest
}

fn cpu_name() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let name = info
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()));
    let flags: Vec<&str> = info
        .lines()
        .find_map(|l| l.strip_prefix("flags"))
        .map(|f| {
            f.split_whitespace()
                .filter(|f| ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile"].contains(f))
                .collect()
        })
        .unwrap_or_default();
    format!("{} ({})", name.unwrap_or_else(|| "unknown CPU".into()), flags.join(" "))
}

/// Measures the machine and the GEMMs of `shape` at each of `rows`, and
/// computes the bound at mean context `context`.
pub fn measure(
    env: &ort::environment::Environment,
    threads: usize,
    shape: ModelShape,
    precision: Precision,
    kv_bytes: usize,
    rows: &[usize],
    context: usize,
) -> Result<Roofline, Error> {
    let (pk, pn, pm) = (768, 3072, 512);
    let peak = |int8: bool| -> Result<f64, Error> {
        let mut s = session(env, threads, pk, pn, int8)?;
        Ok(2.0 * (pm * pk * pn) as f64 / time_gemm(&mut s, pm, pk, 0.3)?)
    };
    let (fp32_ops, int8_ops) = (peak(false)?, peak(true)?);
    let (int8_params, fp32_params) = shape.params(precision);
    let weight_bytes = (int8_params + 4.0 * fp32_params) as usize;
    let stream_bytes = weight_bytes.max(1 << 20);
    let machine = Machine { threads, fp32_ops, int8_ops, bandwidth: bandwidth(stream_bytes, threads), stream_bytes };
    // The GEMMs of a step at each batch size, as ONNX Runtime runs them.
    let mut gemm_step = vec![0.0; rows.len()];
    for (k, n, count, layer) in shape.gemms() {
        let int8 = matches!((precision, layer), (Precision::Int8, _) | (Precision::Int8Fp32Head, true));
        let mut s = session(env, threads, k, n, int8)?;
        for (i, &m) in rows.iter().enumerate() {
            gemm_step[i] += count as f64 * time_gemm(&mut s, m.max(1), k, 0.1)?;
        }
    }
    let (l, e) = (shape.layers as f64, shape.width as f64);
    let t = context as f64;
    let bounds = rows
        .iter()
        .zip(&gemm_step)
        .map(|(&r, &gemms)| {
            let rf = r as f64;
            // Attention runs in float32 whatever the weights.
            let compute = rf * (2.0 * int8_params / int8_ops + (2.0 * fp32_params + 4.0 * l * t * e) / fp32_ops);
            let traffic = (weight_bytes as f64 + rf * 2.0 * l * t * e * kv_bytes as f64) / machine.bandwidth;
            Bound {
                rows: r,
                context,
                compute_tokens_per_second: rf / compute,
                bandwidth_tokens_per_second: rf / traffic,
                tokens_per_second: rf / compute.max(traffic),
                gemms_tokens_per_second: rf / gemms,
            }
        })
        .collect();
    Ok(Roofline { cpu: cpu_name(), shape, precision, kv_bytes, machine, bounds })
}

impl Roofline {
    /// The bound at `rows` rows, if measured.
    pub fn at(&self, rows: usize) -> Option<&Bound> {
        self.bounds.iter().find(|b| b.rows == rows)
    }

    pub fn table(&self) -> String {
        let m = &self.machine;
        let debug = if cfg!(debug_assertions) {
            "  (a debug build: its read-bandwidth loop is not optimised, so the bandwidth and the bound are not this machine's)\n"
        } else {
            ""
        };
        let mut s = format!(
            "{debug}roofline, measured here: {}; {} threads\n  float32 GEMM peak {:.1} GFLOP/s, int8 {:.1} GOP/s (512 × 768 × 3072, ONNX Runtime); \
             read bandwidth {:.1} GB/s over {} MiB\n  model {} layers × {} wide (MLP {}), vocabulary {}, weights {:?}, KV {} bytes/element\n",
            self.cpu,
            m.threads,
            m.fp32_ops / 1e9,
            m.int8_ops / 1e9,
            m.bandwidth / 1e9,
            m.stream_bytes >> 20,
            self.shape.layers,
            self.shape.width,
            self.shape.inner,
            self.shape.vocab,
            self.precision,
            self.kv_bytes
        );
        s += &format!(
            "  {:>5} {:>8} {:>12} {:>14} {:>11} {:>13}\n",
            "rows", "context", "compute tok/s", "bandwidth tok/s", "bound tok/s", "GEMMs tok/s"
        );
        for b in &self.bounds {
            s += &format!(
                "  {:>5} {:>8} {:>12.1} {:>14.1} {:>11.1} {:>13.1}\n",
                b.rows,
                b.context,
                b.compute_tokens_per_second,
                b.bandwidth_tokens_per_second,
                b.tokens_per_second,
                b.gemms_tokens_per_second
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_124m_shape_multiplies_its_known_parameters() {
        let shape = ModelShape { layers: 12, width: 768, inner: 3072, vocab: 50257 };
        let (int8, fp32) = shape.params(Precision::Fp32);
        assert_eq!(int8, 0.0);
        // 12 × (768·2304 + 768·768 + 2 · 768·3072) + 768·50257
        assert_eq!(fp32 as u64, 12 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072) + 768 * 50257);
        assert!((fp32 * 2.0 / 1e9 - 0.247).abs() < 0.001, "≈ 0.25 GFLOP per token");
        let (int8, fp32) = shape.params(Precision::Int8Fp32Head);
        assert_eq!(fp32 as u64, 768 * 50257);
        assert_eq!(int8 as u64, 12 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072));
    }

    #[test]
    fn a_vectorised_sum_is_a_sum() {
        let x: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        assert_eq!(sum(&x), 499_500.0);
    }
}
