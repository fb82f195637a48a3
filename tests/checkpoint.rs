//! A plain transformers checkpoint folder (config.json + model.safetensors,
//! no ONNX) of another shape than the main fixture — 3 layers, 3 heads, 48
//! wide, context 128, exact GELU, attention scaled by the inverse layer
//! index, float16 weights — served with no export step, and its greedy
//! output equal to transformers' (`scripts/make_fixture.py --shape checkpoint`).
mod common;

use std::path::PathBuf;

use batchgen::pb;
use common::ids;

/// The checkpoint with the fixture's tokenizer beside it.
fn checkpoint_dir() -> tempfile::TempDir {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(root.join("gpt2-3l-checkpoint").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::copy(common::fixture_dir().join("tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    dir
}

#[tokio::test]
async fn a_checkpoint_folder_serves_like_transformers() {
    let dir = checkpoint_dir();
    let mut args = common::serve_args();
    args.model.model = dir.path().to_string_lossy().into_owned();
    args.model.graph = batchgen::config::GraphChoice::Auto;
    let mut server = common::start_with(args).await;
    let info = server.client.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.context_length, 128);
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2-3l-checkpoint-expected.json");
    let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for name in ["short", "long", "cjk", "emoji"] {
        let case = &exp["greedy"][name];
        let seq = server.sequence(common::request(ids(&case["prompt_ids"]), 24)).await;
        let got: Vec<u32> = seq.tokens.iter().map(|t| t.id).collect();
        assert_eq!(got, ids(&case["output_ids"]), "{name}");
        for (t, lp) in seq.tokens.iter().zip(case["logprobs"].as_array().unwrap()) {
            assert!((f64::from(t.logprob) - lp.as_f64().unwrap()).abs() < 1e-4, "{name}: {} vs {lp}", t.logprob);
        }
    }
}

#[test]
fn exported_graph_on_a_checkpoint_folder_says_what_is_missing() {
    let dir = checkpoint_dir();
    let mut args = common::serve_args();
    args.model.model = dir.path().to_string_lossy().into_owned();
    args.model.graph = batchgen::config::GraphChoice::Exported;
    let err = match batchgen::app::load(&args) {
        Ok(_) => panic!("--graph exported served a folder without ONNX"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("--graph exported needs an ONNX export"), "{err}");
}

/// A cut-off or corrupt `model.safetensors` is refused at start-up with the
/// file and what is wrong with it, never a panic or a half-read model.
#[test]
fn a_truncated_or_corrupt_checkpoint_is_refused_with_the_reason() {
    let refused = |bytes: &[u8]| {
        let dir = checkpoint_dir();
        std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
        let mut args = common::serve_args();
        args.model.model = dir.path().to_string_lossy().into_owned();
        args.model.graph = batchgen::config::GraphChoice::Built;
        match batchgen::app::load(&args) {
            Ok(_) => panic!("a broken model.safetensors was served"),
            Err(e) => e.to_string(),
        }
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2-3l-checkpoint");
    let whole = std::fs::read(root.join("model.safetensors")).unwrap();
    let err = refused(&whole[..whole.len() - 1000]);
    assert!(err.contains("model.safetensors") && err.contains("of the data"), "{err}");
    let err = refused(&whole[..4]);
    assert!(err.contains("model.safetensors"), "{err}");
    let mut garbage = 16u64.to_le_bytes().to_vec();
    garbage.extend_from_slice(b"not a json head!rest");
    let err = refused(&garbage);
    assert!(err.contains("not a safetensors header"), "{err}");
    // A tensor of a type batchgen does not read (float64, as numpy 2 makes
    // of float32 × a numpy float64 scalar) is named with its type, not
    // reported missing.
    let n = u64::from_le_bytes(whole[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&whole[8..8 + n]).unwrap();
    let (key, t) = header.as_object_mut().unwrap().iter_mut().find(|(k, _)| k.ends_with("h.0.ln_1.bias")).unwrap();
    let key = key.clone();
    assert_eq!(t["dtype"], "F16", "the fixture is float16");
    let elements = t["shape"][0].as_u64().unwrap();
    t["dtype"] = "F64".into();
    t["shape"] = serde_json::json!([elements / 4]);
    let mut text = serde_json::to_vec(&header).unwrap();
    assert!(text.len() <= n);
    text.resize(n, b' ');
    let f64_file = [&whole[..8], &text, &whole[8 + n..]].concat();
    let err = refused(&f64_file);
    assert!(err.contains(&format!("tensor {key} is F64")), "{err}");
}
