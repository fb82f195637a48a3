//! The HTTP front against the real server in process, through a plain
//! HTTP/1.1 client (hyper): OpenAI completions unary and streamed (equal to
//! the gRPC answers and the transformers references), usage, logprobs with
//! text offsets, errors in OpenAI's shape, keys, health, models, metrics, and
//! a client that disconnects mid-stream; and gRPC-Web with CORS on the gRPC
//! port, spoken by hand over HTTP/1.1 as a browser's fetch would.
mod common;

use std::net::SocketAddr;

use batchgen::pb;
use common::{expected, ids, serve_args, start_with};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};

struct Answer {
    status: u16,
    headers: hyper::HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// The `data:` payloads of a server-sent event stream.
    fn events(&self) -> Vec<String> {
        self.body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
    }
}

async fn send(addr: SocketAddr, method: &str, path: &str, body: Option<Value>, headers: &[(&str, &str)]) -> Answer {
    let (status, headers, bytes) = send_raw(addr, method, path, body.map(json_body), headers).await;
    Answer { status, headers, body: String::from_utf8(bytes.to_vec()).unwrap() }
}

fn json_body(v: Value) -> (&'static str, Bytes) {
    ("application/json", Bytes::from(v.to_string()))
}

/// One request with a body of the given content type; status, headers and body.
async fn send_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<(&str, Bytes)>,
    headers: &[(&str, &str)],
) -> (u16, hyper::HeaderMap, Bytes) {
    let (sender, response) = open(addr, method, path, body, headers).await;
    let r = response.await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let bytes = r.into_body().collect().await.unwrap().to_bytes();
    drop(sender);
    (status, headers, bytes)
}

type Pending =
    std::pin::Pin<Box<dyn std::future::Future<Output = hyper::Result<hyper::Response<hyper::body::Incoming>>> + Send>>;

async fn open(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<(&str, Bytes)>,
    headers: &[(&str, &str)],
) -> (hyper::client::conn::http1::SendRequest<Full<Bytes>>, Pending) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder().method(method).uri(path).header("host", "localhost");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = match body {
        Some((kind, bytes)) => {
            req = req.header("content-type", kind);
            Full::new(bytes)
        }
        None => Full::new(Bytes::new()),
    };
    let response = Box::pin(sender.send_request(req.body(body).unwrap()));
    (sender, response)
}

async fn http_server() -> common::TestServer {
    let mut args = serve_args();
    args.server.http_listen = batchgen::config::Listen(Some("127.0.0.1:0".parse().unwrap()));
    start_with(args).await
}

fn greedy(name: &str) -> (Value, Vec<u32>) {
    let c = &expected()["greedy"][name];
    (c.clone(), ids(&c["output_ids"]))
}

#[tokio::test]
async fn completions_equal_the_grpc_answers_unary_and_streamed() {
    let server = http_server().await;
    let http = server.http_addr.unwrap();
    let models = send(http, "GET", "/v1/models", None, &[]).await;
    assert_eq!(models.status, 200);
    let model = models.json()["data"][0]["id"].as_str().unwrap().to_string();
    let (case, want) = greedy("emoji");
    let body = json!({
        "model": model, "prompt": case["prompt"], "max_tokens": case["max_new_tokens"], "temperature": 0,
        "logprobs": 2,
    });
    let a = send(http, "POST", "/v1/completions", Some(body.clone()), &[]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let c = a.json();
    assert_eq!(c["object"], "text_completion");
    let choice = &c["choices"][0];
    let grpc = server
        .client
        .clone()
        .generate(pb::GenerateRequest {
            prompt: case["prompt"].as_str().unwrap().into(),
            stopping: Some(pb::Stopping {
                max_new_tokens: case["max_new_tokens"].as_u64().unwrap() as u32,
                ..Default::default()
            }),
            top_logprobs: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let seq = &grpc.sequences[0];
    assert_eq!(seq.tokens.iter().map(|t| t.id).collect::<Vec<_>>(), want);
    assert_eq!(choice["text"], seq.text.as_str());
    assert_eq!(choice["finish_reason"], "stop");
    let lp = &choice["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), want.len());
    for (i, t) in seq.tokens.iter().enumerate() {
        assert!((lp["token_logprobs"][i].as_f64().unwrap() - f64::from(t.logprob)).abs() < 1e-6);
        // Two alternatives, keyed by text (two of them may share one).
        let alternatives = lp["top_logprobs"][i].as_object().unwrap().len();
        assert!((1..=2).contains(&alternatives) && t.top_logprobs.len() == 2, "{alternatives}");
    }
    let offsets: Vec<u64> = lp["text_offset"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
    let usage = &c["usage"];
    assert_eq!(usage["prompt_tokens"], grpc.usage.unwrap().prompt_tokens);
    assert_eq!(usage["completion_tokens"], want.len());
    assert_eq!(usage["total_tokens"], grpc.usage.unwrap().prompt_tokens as usize + want.len());
    // The same prompt again (the gRPC call, the stream below) is served from
    // the prefix cache, which this fresh server's first call filled.
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0, "the first call of a fresh server");
    let cached = grpc.usage.unwrap().cached_prompt_tokens;
    assert_eq!(cached > 0, common::built(), "the prefix cache is on with batchgen's own graph only");

    // Streamed, with usage: the texts concatenate to the unary text.
    let mut body = body;
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let s = send(http, "POST", "/v1/completions", Some(body), &[]).await;
    assert_eq!(s.status, 200, "{}", s.body);
    assert!(s.headers["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let events = s.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let text: String =
        chunks.iter().filter_map(|c| c["choices"].get(0)).map(|ch| ch["text"].as_str().unwrap()).collect();
    assert_eq!(text, seq.text);
    let usage_chunk = chunks.last().unwrap();
    assert!(usage_chunk["choices"].as_array().unwrap().is_empty());
    assert_eq!(usage_chunk["usage"]["completion_tokens"], want.len());
    assert_eq!(usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"], cached);
    let last_choice = &chunks[chunks.len() - 2]["choices"][0];
    assert_eq!(last_choice["finish_reason"], "stop");

    // Echo puts the prompt first; token-id prompts and several prompts get one choice each, in order.
    let (short, short_want) = greedy("short");
    let e = send(
        http,
        "POST",
        "/v1/completions",
        Some(json!({"prompt": [short["prompt_ids"], case["prompt_ids"]], "max_tokens": 24, "temperature": 0, "echo": true})),
        &[],
    )
    .await;
    let e = e.json();
    assert_eq!(e["choices"].as_array().unwrap().len(), 2);
    assert_eq!(e["choices"][0]["index"], 0);
    let t0 = e["choices"][0]["text"].as_str().unwrap();
    assert!(t0.starts_with(short["prompt"].as_str().unwrap()), "{t0}");
    assert_eq!(e["usage"]["completion_tokens"], short_want.len() + want.len());
}

#[tokio::test]
async fn seeded_samples_and_their_n_equal_the_grpc_samples() {
    let server = http_server().await;
    let http = server.http_addr.unwrap();
    let body = json!({"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0.8, "top_k": 40,
        "n": 3, "seed": 7, "ignore_eos": true});
    let c = send(http, "POST", "/v1/completions", Some(body), &[]).await.json();
    let grpc = server
        .client
        .clone()
        .generate(pb::GenerateRequest {
            prompt: "The quick brown fox".into(),
            decoding: Some(pb::Decoding {
                method: Some(pb::decoding::Method::Sampling(pb::Sampling {
                    temperature: 0.8,
                    top_k: 40,
                    seed: Some(7),
                    num_samples: 3,
                    ..Default::default()
                })),
                ..Default::default()
            }),
            stopping: Some(pb::Stopping { max_new_tokens: 12, ignore_eos: true, ..Default::default() }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let texts: Vec<&str> = c["choices"].as_array().unwrap().iter().map(|ch| ch["text"].as_str().unwrap()).collect();
    let want: Vec<&str> = grpc.sequences.iter().map(|s| s.text.as_str()).collect();
    assert_eq!(texts, want);
    assert_eq!(c["choices"][2]["index"], 2);
    assert_eq!(c["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn errors_come_in_openais_shape_with_the_matching_status() {
    let dir = tempfile::tempdir().unwrap();
    let (key, line) = batchgen::server::auth::keygen("http", Default::default()).unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("{line}\n")).unwrap();
    let mut args = serve_args();
    args.server.http_listen = batchgen::config::Listen(Some("127.0.0.1:0".parse().unwrap()));
    args.server.api_keys = Some(keys);
    let server = start_with(args).await;
    let http = server.http_addr.unwrap();
    let bearer = format!("Bearer {key}");
    let auth = [("authorization", bearer.as_str())];
    let a = send(http, "POST", "/v1/completions", Some(json!({"prompt": "Hi"})), &[]).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.json()["error"]["type"], "authentication_error");
    for (body, status, param) in [
        (json!({"prompt": "Hi", "temperature": -1}), 400, "temperature"),
        (json!({"prompt": "Hi", "max_tokens": 100000}), 400, "max_tokens"),
        (json!({"prompt": "Hi", "model": "gpt-4"}), 404, "model"),
        (json!({"prompt": "Hi", "suffix": "!"}), 400, "suffix"),
        (json!({"prompt": [60000]}), 400, "prompt"),
    ] {
        let a = send(http, "POST", "/v1/completions", Some(body.clone()), &auth).await;
        assert_eq!(a.status, status, "{body}: {}", a.body);
        let e = a.json();
        assert_eq!(e["error"]["param"], param, "{body}: {e}");
        assert!(!e["error"]["message"].as_str().unwrap().is_empty());
    }
    let a = send(http, "POST", "/v1/completions", Some(json!({"prompt": "Hi", "bogus": 1})), &auth).await;
    assert_eq!(a.status, 400);
    assert!(a.json()["error"]["message"].as_str().unwrap().contains("bogus"));
    // A deadline from the timeout header: 504 in OpenAI's shape.
    let long = json!({"prompt": "Hi", "max_tokens": 200, "ignore_eos": true, "temperature": 0});
    let a = send(http, "POST", "/v1/completions", Some(long), &[auth[0], ("x-request-timeout", "0.02")]).await;
    assert_eq!(a.status, 504, "{}", a.body);
    assert_eq!(a.json()["error"]["code"], "deadline_exceeded");
    assert_eq!(send(http, "GET", "/v1/models", None, &[]).await.status, 401);
    assert_eq!(send(http, "GET", "/v1/models", None, &auth).await.status, 200);
    // Every route that reaches the model needs the key, as on gRPC (this
    // server has no chat template: without a key the answer is still 401).
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}]});
    for (path, body) in [
        ("/v1/chat/completions", chat.clone()),
        ("/tokenize", json!({"prompt": "Hi"})),
        ("/tokenize", json!({"messages": [{"role": "user", "content": "Hi"}]})),
        ("/detokenize", json!({"tokens": [1]})),
    ] {
        assert_eq!(send(http, "POST", path, Some(body.clone()), &[]).await.status, 401, "{path} {body}");
    }
    assert_eq!(send(http, "POST", "/tokenize", Some(json!({"prompt": "Hi"})), &auth).await.status, 200);
    assert_eq!(send(http, "POST", "/detokenize", Some(json!({"tokens": [1]})), &auth).await.status, 200);
    assert_eq!(send(http, "POST", "/v1/chat/completions", Some(chat), &auth).await.status, 400);
    assert_eq!(send(http, "GET", "/version", None, &[]).await.status, 200);
    // Health stays open; metrics on this port need the key.
    let h = send(http, "GET", "/health", None, &[]).await;
    assert_eq!((h.status, h.json()["status"].clone()), (200, json!("ready")));
    assert_eq!(send(http, "GET", "/metrics", None, &[]).await.status, 401);
    let m = send(http, "GET", "/metrics", None, &auth).await;
    assert_eq!(m.status, 200);
    assert!(m.body.contains("batchgen_requests_received_total"));
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_cancels_its_request() {
    let server = http_server().await;
    let http = server.http_addr.unwrap();
    let body = json!({"prompt": "Hi", "max_tokens": 200, "ignore_eos": true, "temperature": 0, "stream": true});
    let (sender, response) = open(http, "POST", "/v1/completions", Some(json_body(body)), &[]).await;
    let r = response.await.unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.into_body();
    // The first event arrives, then the client goes away.
    let first = body.frame().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(first.data_ref().unwrap()).starts_with("data: "));
    drop(body);
    drop(sender);
    let state = server.state.clone();
    common::wait_until("the request is dropped", move || state.engine.in_flight.is_empty()).await;
    let generated = server.state.engine.workers()[0].stats.steps.load(std::sync::atomic::Ordering::Relaxed);
    assert!(generated < 200, "{generated} steps: the request ran to its end after the client left");
}

/// A gRPC-Web body: each message framed (flag 0, big-endian length).
fn grpc_web_frame(msg: &impl prost::Message) -> Bytes {
    let bytes = msg.encode_to_vec();
    let mut out = vec![0u8];
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(&bytes);
    Bytes::from(out)
}

/// A gRPC-Web call of `path` with `msg` from the page origin the test allows:
/// status, headers and body.
async fn grpc_web(addr: SocketAddr, path: &str, msg: &impl prost::Message) -> (u16, hyper::HeaderMap, Bytes) {
    let web = [("x-grpc-web", "1"), ("origin", "http://app.example")];
    send_raw(addr, "POST", path, Some(("application/grpc-web+proto", grpc_web_frame(msg))), &web).await
}

/// The messages and the trailers of a gRPC-Web response body.
fn grpc_web_unframe(mut body: &[u8]) -> (Vec<Vec<u8>>, String) {
    let (mut messages, mut trailers) = (Vec::new(), String::new());
    while body.len() >= 5 {
        let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
        let payload = body[5..5 + len].to_vec();
        if body[0] & 0x80 != 0 {
            trailers.push_str(&String::from_utf8(payload).unwrap());
        } else {
            messages.push(payload);
        }
        body = &body[5 + len..];
    }
    (messages, trailers)
}

#[tokio::test]
async fn grpc_web_calls_equal_grpc_and_cors_admits_only_the_allowed_origins() {
    use prost::Message;
    let mut args = serve_args();
    args.server.cors_allow_origin = vec!["http://app.example".into()];
    let server = start_with(args).await;
    let (case, want) = greedy("cjk");
    let req = pb::GenerateRequest {
        prompt: case["prompt"].as_str().unwrap().into(),
        stopping: Some(pb::Stopping { max_new_tokens: 24, ..Default::default() }),
        ..Default::default()
    };
    let (status, headers, body) = grpc_web(server.addr, "/batchgen.v1.Generation/Generate", &req).await;
    assert_eq!(status, 200);
    assert_eq!(headers["access-control-allow-origin"], "http://app.example");
    let (messages, trailers) = grpc_web_unframe(&body);
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    let answer = pb::GenerateResponse::decode(&messages[0][..]).unwrap();
    assert_eq!(answer.sequences[0].tokens.iter().map(|t| t.id).collect::<Vec<_>>(), want);
    let native = server.client.clone().generate(req.clone()).await.unwrap().into_inner();
    assert_eq!(answer.sequences[0].text, native.sequences[0].text);

    // Server streaming over gRPC-Web: one frame per message, texts concatenating to the same.
    let (_, _, body) = grpc_web(server.addr, "/batchgen.v1.Generation/GenerateStream", &req).await;
    let (messages, trailers) = grpc_web_unframe(&body);
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    let text: String = messages.iter().map(|m| pb::GenerateStreamResponse::decode(&m[..]).unwrap().text).collect();
    assert!(messages.len() > 1);
    assert_eq!(text, native.sequences[0].text);

    // Errors come back as gRPC-Web trailers.
    let bad = pb::GenerateRequest { prompt_token_ids: vec![60000], ..Default::default() };
    let (_, headers, body) = grpc_web(server.addr, "/batchgen.v1.Generation/Generate", &bad).await;
    // A status without messages comes in the headers (trailers-only), else in the trailer frame.
    let (_, trailers) = grpc_web_unframe(&body);
    let in_headers = headers.get("grpc-status").is_some_and(|v| v == "3");
    assert!(in_headers || trailers.contains("grpc-status:3"), "{headers:?} {trailers}");

    // CORS preflight: the allowed origin gets its headers, another origin none.
    let preflight = |origin: &'static str| async move {
        let headers = [
            ("origin", origin),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "content-type,x-grpc-web,authorization"),
        ];
        send_raw(server.addr, "OPTIONS", "/batchgen.v1.Generation/GenerateStream", None, &headers).await
    };
    let (status, headers, _) = preflight("http://app.example").await;
    assert!(status < 300, "{status}");
    assert_eq!(headers["access-control-allow-origin"], "http://app.example");
    let allowed = headers["access-control-allow-headers"].to_str().unwrap().to_ascii_lowercase();
    assert!(allowed.contains("x-grpc-web") && allowed.contains("authorization"), "{allowed}");
    let (_, headers, _) = preflight("http://evil.example").await;
    assert!(headers.get("access-control-allow-origin").is_none());
}

#[test]
fn a_malformed_cors_origin_is_refused_at_start() {
    for bad in ["app.example", "http://app.example/", "ftp://x", "http://"] {
        let mut args = serve_args();
        args.server.cors_allow_origin = vec![bad.into()];
        let err = args.server.serve_options().unwrap_err().to_string();
        assert!(err.contains("--cors-allow-origin"), "{bad}: {err}");
    }
    let mut args = serve_args();
    args.server.cors_allow_origin = vec!["*".into(), "https://a.example:8443".into()];
    assert!(args.server.serve_options().is_ok());
}

/// A server with the HTTP front and a chat template (DialoGPT's: each turn's
/// text then `<|endoftext|>`), under a served name.
async fn chat_server(template: Option<&str>) -> common::TestServer {
    let mut args = serve_args();
    args.server.http_listen = batchgen::config::Listen(Some("127.0.0.1:0".parse().unwrap()));
    args.model.chat_template = template.map(|t| format!("{}/deploy/chat-templates/{t}", env!("CARGO_MANIFEST_DIR")));
    args.model.served_model_name = vec!["tiny".into(), "tiny-chat".into()];
    start_with(args).await
}

/// A case of transformers' rendering of a stock template
/// (`tests/fixtures/chat-expected.json`): messages, text and ids.
fn chat_case(template: &str, conversation: &str, add_generation_prompt: bool) -> Value {
    let path = format!("{}/tests/fixtures/chat-expected.json", env!("CARGO_MANIFEST_DIR"));
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let template = format!("deploy/chat-templates/{template}.jinja");
    expected["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["template"] == template.as_str()
                && c["conversation"] == conversation
                && c["add_generation_prompt"] == add_generation_prompt
        })
        .unwrap_or_else(|| panic!("no case {template} {conversation} {add_generation_prompt}"))
        .clone()
}

/// Chat completions are the completion of the rendered conversation: the
/// same tokens, text, logprobs (with each token's raw bytes) and usage as
/// the gRPC call on the prompt transformers' template gives, unary and
/// streamed (role first, then deltas, then the finish reason).
#[tokio::test]
async fn chat_completions_equal_the_grpc_answer_on_the_rendered_conversation() {
    let server = chat_server(Some("dialogpt.jinja")).await;
    let http = server.http_addr.unwrap();
    let case = chat_case("dialogpt", "unicode", false);
    let body = json!({
        "model": "tiny-chat", "messages": case["messages"], "max_completion_tokens": 12, "temperature": 0,
        "logprobs": true, "top_logprobs": 2,
    });
    let a = send(http, "POST", "/v1/chat/completions", Some(body.clone()), &[]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let c = a.json();
    assert_eq!((c["object"].as_str(), c["model"].as_str()), (Some("chat.completion"), Some("tiny")));
    let grpc = server
        .client
        .clone()
        .generate(pb::GenerateRequest {
            prompt_token_ids: ids(&case["ids"]),
            stopping: Some(pb::Stopping { max_new_tokens: 12, ..Default::default() }),
            top_logprobs: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let seq = &grpc.sequences[0];
    let choice = &c["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], seq.text.as_str());
    assert_eq!(c["usage"]["prompt_tokens"], case["ids"].as_array().unwrap().len());
    assert_eq!(c["usage"]["completion_tokens"], seq.tokens.len());
    let content = choice["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), seq.tokens.len());
    let mut bytes = Vec::new();
    for (l, t) in content.iter().zip(&seq.tokens) {
        assert!((l["logprob"].as_f64().unwrap() - f64::from(t.logprob)).abs() < 1e-6);
        assert_eq!(l["top_logprobs"].as_array().unwrap().len(), 2);
        bytes.extend(l["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8));
    }
    // The tokens' raw bytes are the text, also where a token holds part of
    // a character (the random model makes invalid sequences: U+FFFD in both).
    assert!(seq.tokens.iter().all(|t| !t.special), "no EOS within 12 tokens here");
    assert_eq!(String::from_utf8_lossy(&bytes), seq.text);

    let mut body = body;
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let s = send(http, "POST", "/v1/chat/completions", Some(body), &[]).await;
    assert_eq!(s.status, 200, "{}", s.body);
    let events = s.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    let text: String =
        chunks.iter().filter_map(|c| c["choices"].get(0)).filter_map(|ch| ch["delta"]["content"].as_str()).collect();
    assert_eq!(text, seq.text);
    let finish = &chunks[chunks.len() - 2]["choices"][0];
    assert_eq!((finish["delta"].clone(), finish["finish_reason"].as_str()), (json!({}), Some("length")));
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], seq.tokens.len());
    let streamed: usize =
        chunks.iter().filter_map(|c| c["choices"].get(0)?["logprobs"]["content"].as_array().map(Vec::len)).sum();
    assert_eq!(streamed, seq.tokens.len());

    // n samples, seeded: each equals the gRPC sample of the same seed.
    let n = send(
        http,
        "POST",
        "/v1/chat/completions",
        Some(json!({"messages": case["messages"], "max_tokens": 8, "n": 2, "seed": 7, "temperature": 1.0})),
        &[],
    )
    .await
    .json();
    let grpc = server
        .client
        .clone()
        .generate(pb::GenerateRequest {
            prompt_token_ids: ids(&case["ids"]),
            decoding: Some(pb::Decoding {
                method: Some(pb::decoding::Method::Sampling(pb::Sampling {
                    temperature: 1.0,
                    seed: Some(7),
                    num_samples: 2,
                    ..Default::default()
                })),
                ..Default::default()
            }),
            stopping: Some(pb::Stopping { max_new_tokens: 8, ..Default::default() }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for (i, seq) in grpc.sequences.iter().enumerate() {
        assert_eq!(n["choices"][i]["index"], i);
        assert_eq!(n["choices"][i]["message"]["content"], seq.text.as_str());
    }
}

/// A missing template, a template that refuses the conversation, an unknown
/// role, a non-text part and a conversation too long for the context each
/// get a 400 that names the problem, and the server goes on serving.
#[tokio::test]
async fn chat_errors_name_the_problem_and_the_server_goes_on() {
    let none = chat_server(None).await;
    let http = none.http_addr.unwrap();
    let hello = json!({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4});
    let a = send(http, "POST", "/v1/chat/completions", Some(hello.clone()), &[]).await;
    assert_eq!(a.status, 400, "{}", a.body);
    let m = a.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(m.contains("no chat template") && m.contains("--chat-template"), "{m}");
    // Completions still work on this server.
    let ok = send(http, "POST", "/v1/completions", Some(json!({"prompt": "Hello", "max_tokens": 2})), &[]).await;
    assert_eq!(ok.status, 200, "{}", ok.body);

    let server = chat_server(Some("llama-2.jinja")).await;
    let http = server.http_addr.unwrap();
    let long = "word ".repeat(400);
    for (body, param, says) in [
        (
            json!({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
            "messages",
            "Conversation roles must alternate",
        ),
        (json!({"messages": [{"role": "tool", "content": "x"}]}), "messages[0].role", "\"tool\" is not supported"),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            "messages[0].content[0]",
            "only text parts",
        ),
        (json!({"messages": [{"role": "user", "content": long}]}), "messages", "context"),
        (json!({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}), "model", "does not exist"),
    ] {
        let a = send(http, "POST", "/v1/chat/completions", Some(body.clone()), &[]).await;
        let e = a.json();
        assert!(matches!(a.status, 400 | 404), "{body}: {}", a.body);
        assert_eq!(e["error"]["param"], param, "{body}: {}", a.body);
        assert!(e["error"]["message"].as_str().unwrap().contains(says), "{body}: {}", a.body);
    }
    let a = send(http, "POST", "/v1/chat/completions", Some(hello), &[]).await;
    assert_eq!(a.status, 200, "{}", a.body);
}

/// vLLM's routes: tokenize a prompt or a rendered conversation (what the
/// template gives, token for token), detokenize, the version; the model
/// list names the served names with the context length.
#[tokio::test]
async fn tokenize_detokenize_version_and_the_served_names() {
    let server = chat_server(Some("chatml.jinja")).await;
    let http = server.http_addr.unwrap();
    let models = send(http, "GET", "/v1/models", None, &[]).await.json();
    let names: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(names, ["tiny", "tiny-chat"]);
    assert_eq!(models["data"][0]["max_model_len"], 256);
    let t = send(http, "POST", "/tokenize", Some(json!({"model": "tiny", "prompt": "Hello world"})), &[]).await.json();
    assert_eq!(t["tokens"], json!([15496, 995]));
    assert_eq!((t["count"].as_u64(), t["max_model_len"].as_u64()), (Some(2), Some(256)));
    let case = chat_case("chatml", "with_system", true);
    let t = send(http, "POST", "/tokenize", Some(json!({"messages": case["messages"]})), &[]).await.json();
    assert_eq!(t["tokens"], case["ids"]);
    let d = send(http, "POST", "/detokenize", Some(json!({"tokens": [15496, 995, 50256]})), &[]).await.json();
    assert_eq!(d["prompt"], "Hello world<|endoftext|>");
    let v = send(http, "GET", "/version", None, &[]).await.json();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    // The path given to --model is accepted too.
    let by_path = json!({"model": common::fixture_dir().to_string_lossy(), "prompt": "Hi", "max_tokens": 1});
    assert_eq!(send(http, "POST", "/v1/completions", Some(by_path), &[]).await.status, 200);
}

/// `--cors-allow-origin` admits browser pages of those origins on the HTTP
/// API too (preflight and the answer's header), and no others.
#[tokio::test]
async fn the_http_api_answers_cors_for_the_allowed_origins_only() {
    let mut args = serve_args();
    args.server.http_listen = batchgen::config::Listen(Some("127.0.0.1:0".parse().unwrap()));
    args.server.cors_allow_origin = vec!["http://app.example".into()];
    let server = start_with(args).await;
    let http = server.http_addr.unwrap();
    let preflight = |origin: &'static str| {
        let headers = [
            ("origin", origin),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "content-type,authorization"),
        ];
        async move { send(http, "OPTIONS", "/v1/chat/completions", None, &headers).await }
    };
    let ok = preflight("http://app.example").await;
    assert_eq!(ok.headers["access-control-allow-origin"], "http://app.example", "{}", ok.body);
    assert!(preflight("http://evil.example").await.headers.get("access-control-allow-origin").is_none());
    let a = send(http, "GET", "/v1/models", None, &[("origin", "http://app.example")]).await;
    assert_eq!((a.status, a.headers["access-control-allow-origin"].to_str().unwrap()), (200, "http://app.example"));
}
