//! `batchgen eval`: perplexity by sliding window equal to transformers'
//! (`scripts/eval_reference.py`, saved in tests/fixtures/eval-reference.json),
//! and int8 weights measured against float32 on the same text.
mod common;

use std::path::PathBuf;

use batchgen::config::EvalArgs;
use batchgen::graph::{Int8Range, KvDtype, Precision};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The 3-layer checkpoint (exact GELU, attention scaled by the inverse
/// layer index) with the fixture's tokenizer beside it.
fn checkpoint_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("gpt2-3l-checkpoint").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::copy(common::fixture_dir().join("tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    dir
}

fn args(model: &std::path::Path, window: usize, stride: usize, weights: Vec<Precision>) -> EvalArgs {
    EvalArgs {
        model: model.to_string_lossy().into_owned(),
        revision: None,
        text: fixtures().join("eval-text.txt"),
        weights,
        kv_dtypes: vec![],
        int8_range: Int8Range::Auto,
        window,
        stride,
        max_tokens: 0,
        prompts: 4,
        prompt_tokens: 16,
        new_tokens: 16,
        json: false,
        onnxruntime: std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from),
        intra_op_threads: 1,
    }
}

#[test]
fn perplexity_equals_transformers_for_every_window_and_stride() {
    let dir = checkpoint_dir();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("eval-reference.json")).unwrap()).unwrap();
    for case in reference["cases"].as_array().unwrap() {
        let (window, stride) = (case["window"].as_u64().unwrap() as usize, case["stride"].as_u64().unwrap() as usize);
        let report = batchgen::eval::run(&args(dir.path(), window, stride, vec![])).unwrap();
        assert_eq!(report.tokens as u64, reference["tokens"].as_u64().unwrap());
        assert_eq!(report.scored as u64, case["scored"].as_u64().unwrap(), "window {window} stride {stride}");
        let (ours, theirs) = (report.rows[0].perplexity, case["perplexity"].as_f64().unwrap());
        assert_eq!(report.rows[0].precision, "fp32");
        assert!((ours / theirs - 1.0).abs() < 1e-3, "window {window} stride {stride}: {ours} vs transformers {theirs}");
        // float32 against itself: its own greedy continuations, predicted
        // again teacher-forced in one run, agree token for token.
        assert_eq!(report.rows[0].greedy_agreement, 1.0);
        assert_eq!(report.rows[0].identical_continuations, report.prompts);
    }
}

#[test]
fn int8_weights_score_close_to_float32_but_not_equal() {
    let dir = checkpoint_dir();
    // Auto: the range this CPU's int8 kernels add without saturating (full
    // with VNNI); reduced (7 bits) runs on every CPU, so a VNNI machine
    // measures what a machine without VNNI serves.
    let mut int8_deltas = Vec::new();
    for range in [Int8Range::Auto, Int8Range::Reduced] {
        let mut a = args(dir.path(), 128, 64, vec![Precision::Int8, Precision::Int8Fp32Head]);
        a.int8_range = range;
        let report = batchgen::eval::run(&a).unwrap();
        assert_eq!(report.int8_limit, range.limit());
        let names: Vec<&str> = report.rows.iter().map(|r| r.precision.as_str()).collect();
        assert_eq!(names, ["fp32", "int8", "int8-fp32-head"]);
        let fp32 = &report.rows[0];
        for row in &report.rows[1..] {
            // Quantized: not the float32 numbers (the graph really changed) ...
            assert!(row.delta != 0.0 && row.perplexity.is_finite(), "{range}: {row:?}");
            // ... but near them, even on random weights.
            assert!(row.delta.abs() < 0.05, "{range} on {}: {row:?}", report.cpu);
            assert!(row.top1_agreement > 0.9 && row.greedy_agreement > 0.9, "{range} on {}: {row:?}", report.cpu);
        }
        // The layers' MatMuls are a quarter of their float32 size; the int8 LM
        // head is a copy beside the float32 embedding the input lookup reads
        // (less the scales and 64-byte alignment).
        let matmul_bytes: usize = 3 * 4 * (48 * 3 * 48 + 48 * 48 + 2 * 48 * 4 * 48);
        let head_fp32 = &report.rows[2];
        assert!(fp32.weight_bytes - head_fp32.weight_bytes >= matmul_bytes * 3 / 4 - 8192, "{report:?}");
        assert!(report.rows[1].weight_bytes > head_fp32.weight_bytes + 50257 * 48);
        int8_deltas.push(report.rows[1].delta);
    }
    // With VNNI the two ranges are different graphs.
    if Int8Range::Auto.limit() == 127 {
        assert_ne!(int8_deltas[0], int8_deltas[1]);
    }
}

#[test]
fn float16_cache_scores_close_to_float32_but_not_equal() {
    let dir = checkpoint_dir();
    let mut a = args(dir.path(), 128, 64, vec![Precision::Int8]);
    a.kv_dtypes = vec![KvDtype::Fp16];
    let report = batchgen::eval::run(&a).unwrap();
    let names: Vec<(&str, &str)> = report.rows.iter().map(|r| (r.precision.as_str(), r.kv_dtype.as_str())).collect();
    assert_eq!(names, [("fp32", "fp32"), ("fp32", "fp16"), ("int8", "fp32"), ("int8", "fp16")]);
    let fp16 = &report.rows[1];
    // Rounded keys and values: not float32's numbers, but much nearer to
    // them than int8 weights are.
    assert!(fp16.delta != 0.0 && fp16.delta.abs() < 0.005, "{fp16:?}");
    assert!(fp16.top1_agreement > 0.97 && fp16.greedy_agreement > 0.97, "{fp16:?}");
    assert!(fp16.delta.abs() < report.rows[2].delta.abs(), "{:?}", report.rows);
    assert_eq!(fp16.weight_bytes, report.rows[0].weight_bytes);
}

/// y = x × W through ONNX Runtime's DynamicQuantizeMatMul, int8 weights at
/// `limit`, for x all ones (eight rows, quantized to 255) and W all one value per column
/// (quantized to ±limit): every pair of products is 255 × limit × 2, which
/// a kernel adding pairs into a saturating int16 (`vpmaddubsw`, x86 without
/// VNNI) clips when limit is 127.
fn ones_times_extreme_weights(limit: i8) -> (Vec<f32>, Vec<f64>) {
    let (k, n) = (256, 16);
    let w: Vec<f32> = (0..k * n).map(|i| if (i % n) % 2 == 0 { 0.5 } else { -0.25 }).collect();
    let (q, scale) = batchgen::graph::quant::quantize_columns(&w, k, n, limit);
    assert!(q.iter().all(|&v| v.unsigned_abs() == limit as u8));
    let rt = batchgen::runtime::init(None).unwrap();
    let model = batchgen::graph::builder::int8_matmul(k, n, &q, &scale);
    let mut session = ort::session::Session::builder(&rt.env).unwrap().commit_from_memory(&model).unwrap();
    // Eight rows, as a decode step's batch has (one row may take a GEMV path).
    let m = 8;
    let x = ort::value::Tensor::from_array(([m, k], vec![1.0f32; m * k])).unwrap();
    let out = session.run(ort::inputs!["x" => x]).unwrap();
    let y = out["y"].try_extract_tensor::<f32>().unwrap().1.to_vec();
    assert!(y.chunks(n).all(|row| row == &y[..n]), "the rows are the same");
    // The exact product of x and the dequantized weights.
    let want = (0..n).map(|j| (0..k).map(|r| f64::from(q[r * n + j]) * f64::from(scale[j])).sum()).collect();
    (y, want)
}

#[test]
fn int8_weights_in_this_cpus_range_never_saturate_onnx_runtimes_kernel() {
    let limit = Int8Range::Auto.limit();
    for l in [limit, 63] {
        let (y, want) = ones_times_extreme_weights(l);
        for (j, (&got, &want)) in y[..want.len()].iter().zip(&want).enumerate() {
            assert!(
                (f64::from(got) - want).abs() <= 1e-4 * want.abs(),
                "limit {l}, column {j}: {got} vs {want} on {}",
                batchgen::eval::cpu()
            );
        }
    }
    // What full-range weights give here (a CPU without VNNI clips them).
    let (y, want) = ones_times_extreme_weights(127);
    println!("full range on {}: {} vs {}", batchgen::eval::cpu(), y[0], want[0]);
}
