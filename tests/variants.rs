//! The other export layouts optimum has produced (external weights, merged
//! decoder with `use_cache_branch`, no `position_ids`, float16) are derived
//! from the fixture by `tests/fixtures/make_variants.py` and must generate
//! what the fixture generates.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use batchgen::pb;
use common::{expected, ids};

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed: {status}");
}

/// Makes the variants once per build directory, with `onnx` and
/// `onnxruntime` installed into a private virtual environment.
fn variants() -> PathBuf {
    static MADE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    MADE.get_or_init(make_variants).clone()
}

/// Reuses an earlier build's variants when they were made by this very
/// script; writes into a temporary directory first so that an interrupted run
/// never leaves half a model behind.
fn make_variants() -> PathBuf {
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let out = target.join("variants");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/make_variants.py");
    let source = std::fs::read_to_string(&script).unwrap();
    let marker = out.join("made-by.py");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == source) {
        return out;
    }
    let venv = target.join("variants-venv");
    let python = venv.join("bin/python");
    if !python.is_file() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
    }
    run(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "onnx==1.23.*",
        "onnxruntime==1.32.0",
    ]));
    let tmp = target.join(format!("variants.tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    run(Command::new(&python).arg(&script).arg(common::fixture_dir()).arg(&tmp));
    std::fs::write(tmp.join("made-by.py"), source).unwrap();
    let _ = std::fs::remove_dir_all(&out);
    std::fs::rename(&tmp, &out).unwrap();
    out
}

#[tokio::test]
async fn every_supported_layout_generates_like_the_fixture() {
    let dir = tokio::task::spawn_blocking(variants).await.unwrap();
    let exp = expected();
    for (variant, kv) in
        [("external", "float32"), ("merged", "float32"), ("no-position-ids", "float32"), ("float16", "float16")]
    {
        let mut args = common::serve_args();
        args.model.model = dir.join(variant).to_string_lossy().into_owned();
        let mut server = common::start_with(args).await;
        let info = server.client.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
        // The built graph reads float16 weights into float32.
        let kv_served = if common::built() { "float32" } else { kv };
        assert_eq!(info.kv_dtype, kv_served, "{variant}");
        for name in ["short", "long", "cjk", "emoji"] {
            let case = &exp["greedy"][name];
            let req = pb::GenerateRequest {
                prompt_token_ids: ids(&case["prompt_ids"]),
                stopping: Some(pb::Stopping { max_new_tokens: 24, ..Default::default() }),
                ..Default::default()
            };
            let seq = server.sequence(req).await;
            let got: Vec<u32> = seq.tokens.iter().map(|t| t.id).collect();
            assert_eq!(got, ids(&case["output_ids"]), "{variant}/{name}");
            let tol = if kv == "float16" { 2e-2 } else { 1e-4 };
            for (t, lp) in seq.tokens.iter().zip(case["logprobs"].as_array().unwrap()) {
                assert!(
                    (f64::from(t.logprob) - lp.as_f64().unwrap()).abs() < tol,
                    "{variant}/{name}: {} vs {lp}",
                    t.logprob
                );
            }
        }
    }
}

#[tokio::test]
async fn a_graph_that_is_not_a_decoder_is_refused_at_start_up() {
    let dir = tokio::task::spawn_blocking(variants).await.unwrap();
    let mut args = common::serve_args();
    args.model.model = dir.join("not-a-decoder").to_string_lossy().into_owned();
    let err = match batchgen::app::load(&args) {
        Ok(_) => panic!("a graph without past_key_values was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("unsupported ONNX model signature"), "{err}");
    assert!(err.contains("expected inputs: input_ids int64[batch, seq]"), "{err}");
    assert!(err.contains("found inputs: input_ids int64[?, ?]"), "{err}");
    assert!(err.contains("found outputs: logits int64[?, ?]"), "{err}");
}
