//! Start-up as an operator sees it, through the real binary with stderr
//! going to a file: a log line (text) or event (JSON) per load phase with
//! its duration, and no terminal control sequences (colours, bars) in either.
mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `batchgen serve` on the fixture with stderr to a file, waits (at
/// most 120 s) for the ready line, stops it, returns what it logged.
fn startup_log(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stderr.log");
    let file = std::fs::File::create(&path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_batchgen"))
        .args(["serve", "--model"])
        .arg(common::fixture_dir())
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--intra-op-threads", "1"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut log = String::new();
    while !log.contains("serving (ready") {
        assert!(Instant::now() < deadline, "not ready within 120 s:\n{log}");
        assert!(child.try_wait().unwrap().is_none(), "the server exited:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
        log.clear();
        std::fs::File::open(&path).unwrap().read_to_string(&mut log).unwrap();
    }
    child.kill().unwrap();
    child.wait().unwrap();
    log
}

#[test]
fn text_logs_name_each_phase_with_its_duration_and_hold_no_control_sequences() {
    let log = startup_log(&[]);
    assert!(!log.contains('\u{1b}'), "control sequences in a log file:\n{log}");
    for phase in ["onnxruntime", "model files", "session"] {
        assert!(log.contains(&format!("start-up phase {phase}: ")), "no {phase} line:\n{log}");
    }
    if common::built() {
        assert!(log.contains("start-up phase weights: ") && log.contains("start-up phase graph: "), "{log}");
    }
}

#[test]
fn json_logs_carry_each_phase_as_an_event() {
    let log = startup_log(&["--log-format", "json"]);
    assert!(!log.contains('\u{1b}'), "control sequences in JSON logs:\n{log}");
    let phases: Vec<(String, f64)> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let f = &v["fields"];
            Some((f["phase"].as_str()?.to_string(), f["seconds"].as_f64()?))
        })
        .collect();
    let names: Vec<&str> = phases.iter().map(|p| p.0.as_str()).collect();
    for phase in ["onnxruntime", "model files", "session"] {
        assert!(names.contains(&phase), "no {phase} event in {names:?}:\n{log}");
    }
    assert!(phases.iter().all(|p| p.1 >= 0.0 && p.1 < 120.0), "{phases:?}");
}

/// `--weights int8 --eval-text`: quantized at load (its own phase), then the
/// quality line with float32's figure beside it, before serving.
#[test]
fn int8_weights_log_their_measured_quality_before_serving() {
    let text = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eval-text.txt");
    let text = text.to_string_lossy();
    let log = startup_log(&["--graph", "built", "--weights", "int8", "--eval-text", &text, "--eval-tokens", "300"]);
    assert!(log.contains("start-up phase quantize: "), "{log}");
    let line = log.lines().find(|l| l.contains("quality: int8 perplexity")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains(" vs fp32 ") && line.contains("top-1 agreement with fp32 ") && line.contains("(299 tokens)"));
    assert!(log.contains("precision=int8"), "{log}");
    let quality = log.find("quality: int8").unwrap();
    assert!(quality < log.find("serving (ready").unwrap(), "{log}");
}

#[test]
fn int8_weights_are_refused_for_an_export_served_as_it_is() {
    let out = Command::new(env!("CARGO_BIN_EXE_batchgen"))
        .args(["serve", "--model"])
        .arg(common::fixture_dir())
        .args(["--graph", "exported", "--weights", "int8", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--weights int8 needs batchgen's own graph"), "{err}");
}
