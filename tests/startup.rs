//! Start-up as an operator sees it, through the real binary with stderr
//! going to a file: a log line (text) or event (JSON) per load phase with
//! its duration, and no terminal control sequences (colours, bars) in either.
mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `batchgen serve` on the fixture on a free loopback port, stderr to a file,
/// at the default log level, once it has logged that it is ready (at most
/// 120 s).
struct Served {
    child: std::process::Child,
    port: u16,
    log_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Served {
    fn start(extra: &[&str]) -> Served {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("stderr.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_batchgen"))
            .args(["serve", "--model"])
            .arg(common::fixture_dir())
            .args(["--listen", &format!("127.0.0.1:{port}"), "--metrics-listen", "127.0.0.1:0"])
            .args(["--http-listen", "127.0.0.1:0"])
            .args(["--intra-op-threads", "1"])
            .args(extra)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            if log.contains("ready in ") || log.contains(r#""message":"ready""#) {
                break;
            }
            assert!(Instant::now() < deadline, "not ready within 120 s:\n{log}");
            assert!(child.try_wait().unwrap().is_none(), "the server exited:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Served { child, port, log_path, _dir: dir }
    }

    fn log(&self) -> String {
        let mut log = String::new();
        std::fs::File::open(&self.log_path).unwrap().read_to_string(&mut log).unwrap();
        log
    }

    /// Sends SIGTERM and waits for the process to exit.
    #[allow(unsafe_code)]
    fn terminate(mut self) -> (std::process::ExitStatus, String) {
        // SAFETY: signalling the child this test started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        (status, self.log())
    }
}

/// The start-up log of `batchgen serve` with `extra` flags (the server is
/// killed once ready).
fn startup_log(extra: &[&str]) -> String {
    let mut served = Served::start(extra);
    served.child.kill().unwrap();
    served.child.wait().unwrap();
    served.log()
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
    // Each fact once: sentences, no `field=value` repeating them.
    for line in log.lines().filter(|l| l.contains(" INFO batchgen")) {
        let fields = line.split_whitespace().filter(|w| w.split_once('=').is_some_and(|(k, _)| !k.is_empty()));
        assert_eq!(fields.count(), 0, "a start-up line repeats its facts as fields: {line}");
    }
    // One readiness line with what an operator checks first.
    let ready = log.lines().find(|l| l.contains("ready in ")).unwrap();
    for fact in [
        format!("serving {}", common::fixture_dir().display()),
        "127.0.0.1:".into(),
        "fp32 weights".into(),
        "1 worker(s)".into(),
        format!("ONNX Runtime {}", batchgen::runtime::ORT_VERSION),
    ] {
        assert!(ready.contains(&fact), "no {fact:?} in the readiness line: {ready}");
    }
    assert_eq!(log.matches("ready in ").count(), 1, "{log}");
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
    let events: Vec<serde_json::Value> = log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    // The facts are fields; the message is the event's fixed name.
    for e in events.iter().filter(|e| e["fields"]["phase"].is_string()) {
        assert_eq!(e["fields"]["message"], "start-up phase", "{e}");
    }
    let ready: Vec<&serde_json::Value> = events.iter().filter(|e| e["fields"]["message"] == "ready").collect();
    assert_eq!(ready.len(), 1, "{log}");
    let f = &ready[0]["fields"];
    assert!(f["seconds"].as_f64().is_some_and(|s| s > 0.0) && f["workers"] == 1, "{f}");
    assert_eq!(f["onnxruntime"], batchgen::runtime::ORT_VERSION, "{f}");
    assert!(f["grpc"].as_str().is_some_and(|a| a.starts_with("127.0.0.1:")) && f["weights"] == "fp32", "{f}");
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
    assert!(log.contains("built graph: one session shared by 1 worker(s): int8 weights"), "{log}");
    let quality = log.find("quality: int8").unwrap();
    assert!(quality < log.find("ready in ").unwrap(), "{log}");
}

#[test]
fn int8_weights_and_a_float16_cache_are_refused_for_an_export_served_as_it_is() {
    for (flag, value) in [("--weights", "int8"), ("--kv-dtype", "fp16")] {
        let out = Command::new(env!("CARGO_BIN_EXE_batchgen"))
            .args(["serve", "--model"])
            .arg(common::fixture_dir())
            .args(["--graph", "exported", flag, value, "--listen", "127.0.0.1:0", "--http-listen", "off"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(&format!("{flag} {value} needs batchgen's own graph")), "{err}");
    }
}

/// SIGTERM: the listener closes and connections get GOAWAY at once (a
/// balancer sends new calls elsewhere: a new connection is refused), while
/// every call already accepted — running or queued behind it — finishes in
/// full; then the process exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_at_once_and_lets_accepted_calls_finish() {
    use batchgen::pb;
    let served = Served::start(&["--max-batch-size", "1", "--shutdown-grace", "60"]);
    let port = served.port;
    let client = pb::generation_client::GenerationClient::connect(format!("http://127.0.0.1:{port}")).await.unwrap();
    let request = || pb::GenerateRequest {
        prompt: "Hello".into(),
        stopping: Some(pb::Stopping { max_new_tokens: 200, ignore_eos: true, ..Default::default() }),
        ..Default::default()
    };
    // One batch row: the first call runs, the others queue behind it.
    let mut first = client.clone().generate_stream(request()).await.unwrap().into_inner();
    let first_message = first.message().await.unwrap().expect("a first token");
    let queued: Vec<_> = (0..4)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move { c.generate(request()).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let exited = tokio::task::spawn_blocking(move || served.terminate());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err();
    let still_running = queued.iter().any(|q| !q.is_finished());
    assert!(refused, "a new connection was accepted after SIGTERM");
    assert!(still_running, "the queued calls ended too soon to show anything");
    let mut tokens = first_message.tokens.len();
    while let Some(m) = first.message().await.unwrap() {
        tokens += m.tokens.len();
    }
    assert_eq!(tokens, 200);
    for q in queued {
        let r = q.await.unwrap().expect("an accepted call finishes after SIGTERM").into_inner();
        assert_eq!(r.sequences[0].tokens.len(), 200);
    }
    let (exit, log) = exited.await.unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(log.contains("SIGTERM: shutting down") && log.contains("stopped"), "{log}");
}

/// The server's log after a served call and a refused one (bad temperature)
/// with `extra` flags and `key` as API key; with the call's prompt, stop
/// sequence and (the start of) its generated text.
async fn logged_calls(extra: &[&str], key: Option<&str>) -> (String, &'static str, &'static str, String) {
    use batchgen::pb;
    let server = Served::start(extra);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", server.port))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer: Option<tonic::metadata::MetadataValue<_>> = key.map(|k| format!("Bearer {k}").parse().unwrap());
    let mut client =
        pb::generation_client::GenerationClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
            if let Some(b) = &bearer {
                r.metadata_mut().insert("authorization", b.clone());
            }
            Ok(r)
        });
    let prompt = "Zebra quartz canary of privacy";
    let stop = "xylophone-stop-canary";
    let served = client
        .generate(pb::GenerateRequest {
            prompt: prompt.into(),
            stopping: Some(pb::Stopping {
                max_new_tokens: 24,
                ignore_eos: true,
                stop_sequences: vec![stop.into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let text = served.sequences[0].text.clone();
    let refused = client
        .generate(pb::GenerateRequest {
            prompt: format!("{prompt} refused"),
            decoding: Some(pb::Decoding {
                method: Some(pb::decoding::Method::Sampling(pb::Sampling { temperature: -1.0, ..Default::default() })),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let (_, log) = tokio::task::spawn_blocking(move || server.terminate()).await.unwrap();
    assert!(log.contains("request finished"), "the calls were not logged at all:\n{log}");
    // The generated text (24 greedy tokens: long enough not to occur by chance).
    let generated: String = text.trim().chars().take(40).collect();
    assert!(generated.chars().count() >= 12, "{generated:?}");
    (log, prompt, stop, generated)
}

/// Privacy of logs: at the default level (INFO) neither a prompt, nor the
/// text generated for it, nor its stop sequences appear in the server's log,
/// for a served call and for a refused one; with API keys the key's name
/// labels the request's log lines and the key never appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_and_generated_text_stay_out_of_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let (key, line) = batchgen::server::auth::keygen("team-a", Default::default()).unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("{line}\n")).unwrap();
    let (log, prompt, stop, generated) = logged_calls(&["--api-keys", keys.to_str().unwrap()], Some(&key)).await;
    assert!(!log.contains(&prompt[..12]) && !log.contains(stop), "the prompt is in the log:\n{log}");
    assert!(!log.contains(&generated), "the generated text {generated:?} is in the log:\n{log}");
    let finished = log.lines().find(|l| l.contains("request finished")).unwrap();
    assert!(finished.contains("key=team-a"), "{finished}");
    assert!(!log.contains(&key) && !log.contains(&key[3..]), "the key is in the log:\n{log}");
}

/// `--log-prompts`: the prompt, its stop sequences and the generated text
/// are logged at INFO, on the request's lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_prompts_logs_prompts_and_generated_text() {
    let (log, prompt, stop, generated) = logged_calls(&["--log-prompts"], None).await;
    let line = |what: &str| log.lines().find(|l| l.contains(what)).unwrap_or_else(|| panic!("no {what}:\n{log}"));
    let asked = line("request prompt");
    assert!(asked.contains(prompt) && asked.contains(stop) && asked.contains("INFO"), "{asked}");
    let answered = line("request text");
    // The log shows the text Debug-escaped: compare the escaped form.
    let escaped = format!("{generated:?}");
    assert!(answered.contains(escaped.trim_matches('"')), "{generated:?} not in {answered}");
}

/// SIGHUP re-reads the API keys file (and the TLS files): a key added to the
/// file is accepted afterwards without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(unsafe_code)]
async fn sighup_reloads_the_api_keys() {
    use batchgen::pb;
    let dir = tempfile::tempdir().unwrap();
    let (old, old_line) = batchgen::server::auth::keygen("old", Default::default()).unwrap();
    let (new, new_line) = batchgen::server::auth::keygen("new", Default::default()).unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("{old_line}\n")).unwrap();
    let server = Served::start(&["--api-keys", keys.to_str().unwrap()]);
    let mut client =
        pb::generation_client::GenerationClient::connect(format!("http://127.0.0.1:{}", server.port)).await.unwrap();
    let info = |key: &str| {
        let mut r = tonic::Request::new(pb::ModelInfoRequest {});
        r.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
        r
    };
    client.model_info(info(&old)).await.unwrap();
    assert_eq!(client.model_info(info(&new)).await.unwrap_err().code(), tonic::Code::Unauthenticated);
    std::fs::write(&keys, format!("{new_line}\n")).unwrap();
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
    let start = Instant::now();
    while !server.log().contains("API keys reloaded (SIGHUP): 1 keys") {
        assert!(start.elapsed() < Duration::from_secs(10), "no reload logged:\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.model_info(info(&new)).await.unwrap();
    assert_eq!(client.model_info(info(&old)).await.unwrap_err().code(), tonic::Code::Unauthenticated);
    let (status, _) = tokio::task::spawn_blocking(move || server.terminate()).await.unwrap();
    assert!(status.success());
}
