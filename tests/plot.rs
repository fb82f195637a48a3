//! `batchgen bench --plot` / `batchgen plot`: the charts of two saved
//! `bench --json` runs (the tiny fixture on the built and on the exported
//! graph, `tests/fixtures/bench/`) are SVG documents with one line per
//! series and level, legends naming run and percentile, axes with units,
//! and captions giving the ratio the runs' own numbers give.
use std::path::{Path, PathBuf};

use batchgen::bench::Level;
use batchgen::bench::plot::{read_run, write_with};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bench").join(name)
}

/// Every text of the document, and the points of each coloured line.
fn read_svg(path: &Path) -> (Vec<String>, Vec<usize>) {
    let text = std::fs::read_to_string(path).unwrap();
    let doc = roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{}: not XML: {e}", path.display()));
    assert_eq!(doc.root_element().tag_name().name(), "svg", "{}", path.display());
    let texts =
        doc.descendants().filter(|n| n.has_tag_name("text")).filter_map(|n| n.text()).map(|t| t.trim().to_string());
    let lines = doc
        .descendants()
        .filter(|n| n.has_tag_name("polyline") && n.attribute("stroke") != Some("#000000"))
        .map(|n| n.attribute("points").unwrap_or("").split_whitespace().count());
    (texts.collect(), lines.collect())
}

#[test]
fn charts_of_two_saved_runs_share_axes_and_give_the_ratio() {
    let dir = tempfile::tempdir().unwrap();
    let built = read_run(&fixture("tiny-built.json")).unwrap();
    let files = write_with(dir.path(), "tiny-built", &built, Some(&fixture("tiny-exported.json"))).unwrap();
    let exported: Vec<Level> = read_run(&fixture("tiny-exported.json")).unwrap();
    let names: Vec<String> = files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for prefix in ["closed-loop", "open-loop"] {
        for m in ["tokens-per-second", "requests-per-second", "time-to-first-token", "inter-token-latency"] {
            assert!(names.contains(&format!("{prefix}-{m}.svg")), "{prefix}-{m}.svg missing from {names:?}");
        }
    }
    let closed = built.iter().filter(|l| l.mode == "concurrency").count();
    assert_eq!(closed, 3);

    let (texts, lines) = read_svg(&dir.path().join("closed-loop-inter-token-latency.svg"));
    for run in ["tiny-exported", "tiny-built"] {
        for p in ["p50", "p90", "p99"] {
            assert!(texts.contains(&format!("{run}: {p}")), "legend {run}: {p} missing: {texts:?}");
        }
    }
    assert!(texts.iter().any(|t| t.starts_with("inter-token latency, ms")), "y axis: {texts:?}");
    assert!(texts.iter().any(|t| t.starts_with("concurrent clients")), "x axis: {texts:?}");
    // Two runs × three percentiles, one point per concurrency level each.
    assert_eq!(lines.iter().filter(|&&n| n == closed).count(), 6, "{lines:?}");

    let (texts, _) = read_svg(&dir.path().join("closed-loop-tokens-per-second.svg"));
    let caption = texts.iter().find(|t| t.contains("tiny-built / tiny-exported")).expect("a ratio caption");
    for (b, e) in built.iter().zip(&exported).filter(|(b, _)| b.mode == "concurrency") {
        let want = format!("{:.2}× at {}", b.tokens_per_second / e.tokens_per_second, b.value);
        assert!(caption.contains(&want), "{want} not in {caption}");
    }
    let (texts, _) = read_svg(&dir.path().join("open-loop-time-to-first-token.svg"));
    assert!(texts.iter().any(|t| t.starts_with("offered load, requests per second")), "{texts:?}");
}

#[test]
fn one_run_alone_and_a_file_that_is_not_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let built = read_run(&fixture("tiny-built.json")).unwrap();
    let files = write_with(dir.path(), "only", &built, None).unwrap();
    assert_eq!(files.len(), 8);
    let (texts, _) = read_svg(&dir.path().join("closed-loop-time-to-first-token.svg"));
    assert!(texts.contains(&"p99".to_string()) && !texts.iter().any(|t| t.contains(" / ")), "{texts:?}");
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"not\": \"a run\"}").unwrap();
    let e = read_run(&bad).unwrap_err().to_string();
    assert!(e.contains("not a `batchgen bench --json` run"), "{e}");
}

/// A `--turns` run gets a chart of TTFT against the turn: one point per
/// turn on each percentile's line, the turn on the x axis.
#[test]
fn a_multi_turn_run_is_charted_by_turn() {
    use batchgen::bench::Percentiles;
    use batchgen::bench::plot::{Run, write_all};
    let dir = tempfile::tempdir().unwrap();
    let mut level = read_run(&fixture("tiny-built.json")).unwrap().remove(0);
    let p = |ms: f64| Percentiles { p50: ms / 1e3, p90: 1.5 * ms / 1e3, p99: 2.0 * ms / 1e3 };
    level.ttft_by_turn = vec![p(100.0), p(120.0), p(150.0), p(130.0)];
    let files = write_all(dir.path(), &[Run { name: "turns", levels: std::slice::from_ref(&level) }]).unwrap();
    let chart = dir.path().join("closed-loop-time-to-first-token-by-turn.svg");
    assert!(files.contains(&chart), "{files:?}");
    let (texts, lines) = read_svg(&chart);
    assert!(texts.iter().any(|t| t.starts_with("turn (each prompt")), "x axis: {texts:?}");
    assert!(texts.iter().any(|t| t == "p99"), "legend: {texts:?}");
    assert_eq!(lines.iter().filter(|&&n| n == 4).count(), 3, "three percentiles of four turns: {lines:?}");
    // A run without turns has no such chart.
    let other = tempfile::tempdir().unwrap();
    level.ttft_by_turn.clear();
    let files = write_all(other.path(), &[Run { name: "plain", levels: std::slice::from_ref(&level) }]).unwrap();
    assert!(files.iter().all(|f| !f.ends_with("closed-loop-time-to-first-token-by-turn.svg")));
}
