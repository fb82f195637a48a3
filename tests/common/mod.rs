//! Starts the real server in-process on 127.0.0.1:0 with the fixture model.
#![allow(dead_code)]
use std::path::PathBuf;

use batchgen::config::{
    CacheArgs, GraphChoice, LimitArgs, ModelArgs, RuntimeArgs, ServeArgs, ServerArgs, SpecArgs, Switch,
};
use batchgen::pb::generation_client::GenerationClient;
use tonic::transport::Channel;

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gpt2")
}

pub fn expected() -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gpt2-expected.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The graph the end-to-end tests serve: `BATCHGEN_TEST_GRAPH` (built,
/// exported; default auto, which builds batchgen's own). The README's test
/// command runs them on both.
pub fn graph() -> GraphChoice {
    match std::env::var("BATCHGEN_TEST_GRAPH").as_deref() {
        Ok("exported") => GraphChoice::Exported,
        Ok("built") => GraphChoice::Built,
        _ => GraphChoice::Auto,
    }
}

/// The KV cache layout the end-to-end tests run with: `BATCHGEN_TEST_KV_LAYOUT`
/// (paged, slots; default auto, the server's: paged with batchgen's own
/// graph). The README's test command runs the engine's tests on both.
pub fn kv_layout() -> batchgen::config::KvLayoutChoice {
    match std::env::var("BATCHGEN_TEST_KV_LAYOUT").as_deref() {
        Ok("slots") => batchgen::config::KvLayoutChoice::Slots,
        Ok("paged") => batchgen::config::KvLayoutChoice::Paged,
        _ => batchgen::config::KvLayoutChoice::Auto,
    }
}

/// Whether the tests run batchgen's own graph.
pub fn built() -> bool {
    graph() != GraphChoice::Exported
}

pub fn serve_args() -> ServeArgs {
    ServeArgs {
        model: ModelArgs {
            model: fixture_dir().to_string_lossy().into_owned(),
            revision: None,
            graph: graph(),
            weights: batchgen::graph::Precision::Fp32,
            int8_range: batchgen::graph::Int8Range::Auto,
            kv_dtype: batchgen::graph::KvDtype::Fp32,
            kv_layout: kv_layout(),
            eval_text: None,
            eval_tokens: 2048,
            served_model_name: vec![],
            chat_template: None,
        },
        runtime: RuntimeArgs {
            onnxruntime: std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from),
            intra_op_threads: 1,
            workers: 1,
        },
        server: ServerArgs {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            max_message_bytes: 1 << 20,
            http2_keepalive_interval: 0.0,
            http2_keepalive_timeout: 20.0,
            log_format: "text".into(),
            shutdown_grace: 1.0,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_client_crl: None,
            api_keys: None,
            log_prompts: false,
            stream_stall_timeout: 30.0,
            http_listen: batchgen::config::Listen(None),
            cors_allow_origin: Vec::new(),
        },
        limits: LimitArgs {
            max_queue: 64,
            max_batch_size: 16,
            max_batch_tokens: 4096,
            max_prefill_tokens: 1024,
            max_burst_prefill_tokens: 1024,
            // On (the server's default is off), so every integration test
            // goes through the idle worker's gather.
            idle_gather_gap_us: 1000,
            idle_gather_max_us: 5000,
            max_prompt_tokens: 1024,
            max_beams: 8,
            max_new_tokens: 200,
            default_max_new_tokens: 16,
            constraint_cache_entries: 64,
            preemption: switch("BATCHGEN_TEST_PREEMPTION"),
            preemption_swap_mib: 64,
        },
        cache: CacheArgs {
            prefix_cache: switch("BATCHGEN_TEST_PREFIX_CACHE"),
            prefix_cache_mib: 64,
            prefix_block_tokens: 4,
        },
        spec: SpecArgs { spec_tokens: spec_tokens(), spec_ngram_max: 4, spec_ngram_min: 2, spec_adaptive: false },
    }
}

/// Tokens proposed per step in the end-to-end tests: `BATCHGEN_TEST_SPEC_TOKENS`
/// (default 8, with speculation forced wherever a proposal exists, so every
/// test's output also checks that speculation changes nothing; 0: off).
pub fn spec_tokens() -> u32 {
    std::env::var("BATCHGEN_TEST_SPEC_TOKENS").ok().and_then(|v| v.parse().ok()).unwrap_or(8)
}

/// The prefix cache (`BATCHGEN_TEST_PREFIX_CACHE`) and preemption
/// (`BATCHGEN_TEST_PREEMPTION`) the end-to-end tests run with: on, off;
/// default auto, which is on with batchgen's own graph.
pub fn switch(variable: &str) -> Switch {
    match std::env::var(variable).as_deref() {
        Ok("on") => Switch::On,
        Ok("off") => Switch::Off,
        _ => Switch::Auto,
    }
}

pub struct TestServer {
    pub client: GenerationClient<Channel>,
    pub state: std::sync::Arc<batchgen::server::AppState>,
    /// The front: health status, drain.
    pub server: std::sync::Arc<batchgen::server::Server>,
    /// Where `GET /metrics` is served.
    pub metrics_addr: std::net::SocketAddr,
    pub addr: std::net::SocketAddr,
    /// Where the HTTP front listens, when `http_listen` was set.
    pub http_addr: Option<std::net::SocketAddr>,
    /// The transport settings it serves with (TLS, API keys: `reload`).
    pub options: batchgen::server::ServeOptions,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub async fn start() -> TestServer {
    start_with(serve_args()).await
}

pub async fn start_with(args: ServeArgs) -> TestServer {
    let args_options = args.server.serve_options().unwrap();
    let http_listen = args.server.http_listen.0;
    let tls = args_options.tls.is_some();
    let loaded = tokio::task::spawn_blocking(move || batchgen::app::load(&args)).await.unwrap().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let state = loaded.state.clone();
    let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_addr = metrics_listener.local_addr().unwrap();
    let handle = batchgen::telemetry::install();
    tokio::spawn(batchgen::telemetry::serve(metrics_listener, handle, std::future::pending()));
    let server = batchgen::server::Server::loading().await;
    server.ready(loaded.state).await;
    let http_addr = match http_listen {
        Some(at) => {
            let listener = tokio::net::TcpListener::bind(at).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let service = batchgen::server::GenerationService::new(server.clone(), &args_options);
            let http =
                batchgen::http::Http::new(service, server.clone(), batchgen::telemetry::install(), &args_options);
            tokio::spawn(batchgen::http::serve(listener, http, args_options.tls.clone(), std::future::pending()));
            Some(addr)
        }
        None => None,
    };
    let options = args_options.clone();
    let front = server.clone();
    tokio::spawn(async move {
        batchgen::server::serve(listener, front, &options, async {
            let _ = rx.await;
        })
        .await
    });
    // A TLS server's tests make their own clients.
    let client = if tls {
        GenerationClient::new(Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy())
    } else {
        GenerationClient::connect(format!("http://{addr}")).await.unwrap()
    };
    TestServer { client, state, server, metrics_addr, addr, http_addr, options: args_options, shutdown: Some(tx) }
}

/// Ids of a JSON array.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Waits (polling the server's own state, at most 30 s) until `cond` holds.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed().as_secs() < 30, "timed out waiting until {what}");
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

/// A greedy request for `prompt_ids` and `max_new_tokens`.
pub fn request(prompt_ids: Vec<u32>, max_new_tokens: u32) -> batchgen::pb::GenerateRequest {
    batchgen::pb::GenerateRequest {
        prompt_token_ids: prompt_ids,
        stopping: Some(batchgen::pb::Stopping { max_new_tokens, ..Default::default() }),
        ..Default::default()
    }
}

impl TestServer {
    /// Runs a unary request and returns its one sequence.
    pub async fn sequence(&mut self, req: batchgen::pb::GenerateRequest) -> batchgen::pb::Sequence {
        self.client.generate(req).await.unwrap().into_inner().sequences.remove(0)
    }
}

/// The same sequences: token for token, the same text, logprobs (and top
/// logprobs) within 1e-4, scores within 1e-3.
pub fn assert_same(on: &batchgen::pb::GenerateResponse, off: &batchgen::pb::GenerateResponse, what: &str) {
    assert_eq!(on.sequences.len(), off.sequences.len(), "{what}: sequence count");
    for (k, (a, b)) in on.sequences.iter().zip(&off.sequences).enumerate() {
        let ids = |s: &batchgen::pb::Sequence| s.tokens.iter().map(|t| t.id).collect::<Vec<_>>();
        assert_eq!(ids(a), ids(b), "{what}: sequence {k} differs");
        for (x, y) in a.tokens.iter().zip(&b.tokens) {
            assert!((x.logprob - y.logprob).abs() < 1e-4, "{what}: logprob {} vs {}", x.logprob, y.logprob);
            for (p, q) in x.top_logprobs.iter().zip(&y.top_logprobs) {
                assert_eq!(p.id, q.id, "{what}: top logprob ids");
                assert!((p.logprob - q.logprob).abs() < 1e-4, "{what}: top logprob {} vs {}", p.logprob, q.logprob);
            }
        }
        assert_eq!(a.text, b.text, "{what}: sequence {k}'s text");
        assert!((a.score - b.score).abs() < 1e-3, "{what}: score {} vs {}", a.score, b.score);
    }
}

/// Pearson's chi-square of token counts `observed` over `n` draws against
/// the distribution `expected` (token id, probability): a bucket per token
/// expected at least 5 times, the rest pooled into one (when it expects 5 or
/// more). Returns the statistic and the number of buckets.
pub fn chi_square(
    observed: &std::collections::HashMap<u32, f64>,
    expected: impl IntoIterator<Item = (u32, f64)>,
    n: f64,
) -> (f64, usize) {
    let (mut chi2, mut buckets, mut rest_o, mut rest_e) = (0.0, 0, 0.0, 0.0);
    for (id, p) in expected {
        let (o, e) = (observed.get(&id).copied().unwrap_or(0.0), n * p);
        if e >= 5.0 {
            chi2 += (o - e) * (o - e) / e;
            buckets += 1;
        } else {
            rest_o += o;
            rest_e += e;
        }
    }
    if rest_e >= 5.0 {
        chi2 += (rest_o - rest_e) * (rest_o - rest_e) / rest_e;
        buckets += 1;
    }
    (chi2, buckets)
}

/// Upper 0.1 % point of chi-square with `df` degrees of freedom
/// (Wilson–Hilferty; accurate to a few percent for df >= 3).
pub fn chi2_critical_001(df: f64) -> f64 {
    let z = 3.0902;
    let a = 2.0 / (9.0 * df);
    df * (1.0 - a + z * a.sqrt()).powi(3)
}

/// Reads a stream to its end and returns its last message.
pub async fn last_message(
    stream: &mut tonic::Streaming<batchgen::pb::GenerateStreamResponse>,
) -> batchgen::pb::GenerateStreamResponse {
    let mut last = None;
    while let Some(m) = stream.message().await.unwrap() {
        last = Some(m);
    }
    last.expect("the stream sent no message")
}

/// The request a saved transformers case describes (ids prompt, lengths, processors).
pub fn case_request(case: &serde_json::Value) -> batchgen::pb::GenerateRequest {
    let num = |k: &str| case[k].as_f64().unwrap_or(0.0);
    let mut r = request(ids(&case["prompt_ids"]), num("max_new_tokens") as u32);
    r.stopping.as_mut().unwrap().min_new_tokens = num("min_new_tokens") as u32;
    r.decoding = Some(batchgen::pb::Decoding {
        repetition_penalty: num("repetition_penalty") as f32,
        no_repeat_ngram_size: num("no_repeat_ngram_size") as u32,
        ..Default::default()
    });
    r
}

/// An ONNX Runtime session of the fixture model, driven directly (no batchgen code).
pub fn fixture_session() -> ort::session::Session {
    let rt = batchgen::runtime::init(None).unwrap();
    ort::session::Session::builder(&rt.env).unwrap().commit_from_file(fixture_dir().join("model.onnx")).unwrap()
}

/// The fixture model's logits after `tokens`, by a full recompute with no past.
pub fn full_recompute_logits(session: &mut ort::session::Session, tokens: &[i64]) -> Vec<f32> {
    use ort::value::{DynValue, Tensor};
    let n = tokens.len();
    let mut feeds: Vec<(String, DynValue)> = vec![
        ("input_ids".into(), Tensor::from_array(([1usize, n], tokens.to_vec())).unwrap().into_dyn()),
        ("attention_mask".into(), Tensor::from_array(([1usize, n], vec![1i64; n])).unwrap().into_dyn()),
        (
            "position_ids".into(),
            Tensor::from_array(([1usize, n], (0..n as i64).collect::<Vec<_>>())).unwrap().into_dyn(),
        ),
    ];
    for layer in 0..2 {
        for kv in ["key", "value"] {
            let empty = Tensor::<f32>::from_array(([1usize, 2, 0, 16], Vec::new())).unwrap();
            feeds.push((format!("past_key_values.{layer}.{kv}"), empty.into_dyn()));
        }
    }
    let out = session.run(feeds).unwrap();
    let (shape, logits) = out["logits"].try_extract_tensor::<f32>().unwrap();
    let vocab = shape[2] as usize;
    logits[(n - 1) * vocab..n * vocab].to_vec()
}

/// GET `path` over HTTP/1.1 (blocking); the body of a 200 answer.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    assert!(head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"), "{path}: {head}");
    body.to_string()
}

/// The value in exposition `text` of `name` whose labels include all of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(series, _)| {
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            n == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or_else(|| panic!("no series {name} {labels:?} in:\n{text}"))
}

/// Writes a keys file with a key per `(name, limits)` and returns it with the keys.
pub fn keys_file(dir: &std::path::Path, keys: &[(&str, batchgen::server::auth::Limits)]) -> (PathBuf, Vec<String>) {
    let mut text = String::from("# name hash limits\n");
    let mut secrets = Vec::new();
    for (name, limits) in keys {
        let (key, line) = batchgen::server::auth::keygen(name, *limits).unwrap();
        text.push_str(&line);
        text.push('\n');
        secrets.push(key);
    }
    let path = dir.join("keys.txt");
    std::fs::write(&path, text).unwrap();
    (path, secrets)
}

/// `msg` with `authorization: Bearer <key>`.
pub fn keyed<T>(msg: T, key: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
    req
}
