//! Metrics against the real server: a known mix of requests, then the
//! exposition text is parsed and the counters checked exactly; then a real
//! Prometheus server scrapes batchgen and is queried through its HTTP API,
//! and the alerting rules in deploy/ are checked with promtool.
//!
//! The metrics recorder is process-wide, so this file holds one test.
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use batchgen::pb::{self, FinishReason};
use common::{expected, http_get, ids, metric as value, request, wait_until};

// Multi-threaded: the test reads /metrics with blocking sockets while the
// server runs on the runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_what_happened_and_prometheus_scrapes_them() {
    let mut server = common::start().await;
    let before = http_get(server.metrics_addr, "/metrics");
    for help in ["batchgen_requests_received_total", "batchgen_sequences_finished_total", "batchgen_requests_in_flight"]
    {
        assert!(before.contains(&format!("# HELP {help} ")), "no HELP for {help} before the first request");
        assert!(before.contains(&format!("# TYPE {help} ")), "no TYPE for {help}");
    }
    assert_eq!(value(&before, "batchgen_requests_received_total", &[]), 0.0);
    let exp = expected();
    let mut received_tokens = 0usize;
    let mut prompt_tokens = 0usize;
    // 1. Ends by EOS.
    let short = &exp["greedy"]["short"];
    let seq = server.sequence(request(ids(&short["prompt_ids"]), 24)).await;
    assert_eq!(seq.finish_reason, FinishReason::Eos as i32);
    received_tokens += seq.tokens.len();
    prompt_tokens += ids(&short["prompt_ids"]).len();
    // 2. Ends by length.
    let long = ids(&exp["greedy"]["long"]["prompt_ids"]);
    let seq = server.sequence(request(long.clone(), 10)).await;
    assert_eq!(seq.finish_reason, FinishReason::Length as i32);
    received_tokens += seq.tokens.len();
    prompt_tokens += long.len();
    // 3. Two samples, by length.
    let mut r = request(long.clone(), 5);
    r.stopping.as_mut().unwrap().ignore_eos = true;
    r.decoding = Some(pb::Decoding {
        method: Some(pb::decoding::Method::Sampling(pb::Sampling {
            temperature: 1.0,
            seed: Some(1),
            num_samples: 2,
            ..Default::default()
        })),
        ..Default::default()
    });
    let resp = server.client.generate(r).await.unwrap().into_inner();
    received_tokens += resp.sequences.iter().map(|s| s.tokens.len()).sum::<usize>();
    prompt_tokens += long.len();
    // 4. Cancelled by request id while streaming.
    let mut r = request(vec![464; 10], 200);
    r.stopping.as_mut().unwrap().ignore_eos = true;
    r.request_id = "to-cancel".into();
    let mut stream = server.client.generate_stream(r).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    received_tokens += first.tokens.len();
    server.client.cancel(pb::CancelRequest { request_id: "to-cancel".into() }).await.unwrap();
    let mut last = first;
    while let Some(m) = stream.message().await.unwrap() {
        received_tokens += m.tokens.len();
        last = m;
    }
    assert_eq!(last.finish_reason, FinishReason::Cancelled as i32);
    prompt_tokens += 10;
    // 5. Rejected.
    let status = server.client.generate(pb::GenerateRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    wait_until("nothing in flight", || server.state.engine.in_flight.is_empty()).await;
    let text = http_get(server.metrics_addr, "/metrics");
    let v = |name: &str, labels: &[(&str, &str)]| value(&text, name, labels);
    assert_eq!(v("batchgen_requests_received_total", &[]), 5.0);
    assert_eq!(v("batchgen_requests_failed_total", &[("error_type", "validation")]), 1.0);
    assert_eq!(v("batchgen_requests_failed_total", &[("error_type", "cancelled")]), 0.0);
    assert_eq!(v("batchgen_sequences_finished_total", &[("finish_reason", "eos")]), 1.0);
    assert_eq!(v("batchgen_sequences_finished_total", &[("finish_reason", "length")]), 3.0);
    assert_eq!(v("batchgen_sequences_finished_total", &[("finish_reason", "cancelled")]), 1.0);
    assert_eq!(v("batchgen_generated_tokens_total", &[]), received_tokens as f64);
    assert_eq!(v("batchgen_prompt_tokens_total", &[]), prompt_tokens as f64);
    assert_eq!(v("batchgen_requests_in_flight", &[]), 0.0);
    for hist in [
        "batchgen_time_to_first_token_seconds",
        "batchgen_request_duration_seconds",
        "batchgen_queue_duration_seconds",
        "batchgen_request_generated_tokens",
        "batchgen_request_prompt_tokens",
    ] {
        assert_eq!(v(&format!("{hist}_count"), &[]), 4.0, "{hist}");
    }
    // Inter-token gaps: one fewer than the tokens of each sequence.
    let sequences = 1 + 1 + 2 + 1;
    assert_eq!(v("batchgen_inter_token_latency_seconds_count", &[]), (received_tokens - sequences) as f64);
    assert!(v("batchgen_decode_step_duration_seconds_count", &[]) > 0.0);
    assert_eq!(
        v("batchgen_step_batch_rows_count", &[]),
        v("batchgen_decode_step_duration_seconds_count", &[]),
        "one batch-size observation per decode step"
    );
    assert_eq!(v("batchgen_kv_budget_tokens", &[("worker", "0")]), 4096.0);
    assert_eq!(v("batchgen_batch_rows", &[("worker", "0")]), 0.0);
    assert_eq!(v("batchgen_build_info", &[("onnxruntime", "1.32.0"), ("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    assert!(
        text.contains("batchgen_decode_step_duration_seconds_bucket{le=\"0.001\"}"),
        "latency buckets start at 1 ms"
    );

    // A client that goes away is counted as cancelled.
    let mut r = request(vec![464; 10], 200);
    r.stopping.as_mut().unwrap().ignore_eos = true;
    let mut stream = server.client.generate_stream(r).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    drop(stream);
    wait_until("the dropped stream is gone", || server.state.engine.in_flight.is_empty()).await;
    let text = http_get(server.metrics_addr, "/metrics");
    assert_eq!(value(&text, "batchgen_requests_failed_total", &[("error_type", "cancelled")]), 1.0);
    assert_eq!(value(&text, "batchgen_requests_received_total", &[]), 6.0);

    real_prometheus_scrapes(server.metrics_addr, 6.0);
    promtool_accepts_the_alerting_rules();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Debian's `prometheus` scrapes batchgen; its query API must return our counter.
fn real_prometheus_scrapes(target: SocketAddr, received: f64) {
    let Ok(path) = which("prometheus") else {
        eprintln!(
            "SKIPPED: the real-Prometheus check needs the `prometheus` binary (Debian package `prometheus`; .ci/run installs it)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: batchgen\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let mut child = std::process::Command::new(path)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let api: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let start = Instant::now();
    let mut last = String::new();
    let result = loop {
        if start.elapsed() > Duration::from_secs(60) {
            break Err(last);
        }
        std::thread::sleep(Duration::from_millis(500));
        if std::net::TcpStream::connect(api).is_err() {
            continue;
        }
        last = http_get(api, "/api/v1/query?query=batchgen_requests_received_total");
        let json: serde_json::Value = serde_json::from_str(&last).unwrap_or_default();
        if let Some(v) = json["data"]["result"][0]["value"][1].as_str() {
            break Ok(v.parse::<f64>().unwrap());
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    match result {
        Ok(v) => assert_eq!(v, received, "Prometheus saw a different value"),
        Err(last) => panic!("Prometheus never returned batchgen_requests_received_total; last answer: {last}"),
    }
}

fn promtool_accepts_the_alerting_rules() {
    let Ok(path) = which("promtool") else {
        eprintln!("SKIPPED: promtool (Debian package `prometheus`) is not installed");
        return;
    };
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yml");
    let out = std::process::Command::new(path).arg("check").arg("rules").arg(&rules).output().unwrap();
    assert!(
        out.status.success(),
        "promtool check rules failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dashboard = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/batchgen.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dashboard).unwrap()).unwrap();
    assert!(json["panels"].as_array().is_some_and(|p| p.len() >= 6), "the dashboard has its panels");
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join(name)).find(|p| p.is_file()))
        .ok_or(())
}
