//! What the server promises under faults, provoked on purpose (cargo feature
//! `fault-injection`, see src/fault.rs): an ONNX Runtime run error, a panic
//! inside token choice, a client that stops reading its stream, and slow
//! steps that hold requests in flight for the API-key limits. After each,
//! every other request is exact and nothing stays held.
mod common;

use std::time::{Duration, Instant};

use batchgen::pb;
use common::{expected, ids, request, serve_args, start_with, wait_until};
use tonic::Code;

fn with_fault<T>(msg: T, fault: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert("x-batchgen-fault", fault.parse().unwrap());
    req
}

/// The greedy case `name` of the transformers references, EOS ignored, and its expected ids.
fn case(name: &str) -> (pb::GenerateRequest, Vec<u32>) {
    let c = &expected()["greedy"][name];
    let want = ids(&c["output_ids"]);
    let mut r = request(ids(&c["prompt_ids"]), want.len() as u32);
    r.stopping.as_mut().unwrap().ignore_eos = true;
    (r, want)
}

/// Reads a stream to its end: the token ids received and how it ended.
async fn drain(mut stream: tonic::Streaming<pb::GenerateStreamResponse>) -> (Vec<u32>, Result<(), tonic::Status>) {
    let mut got = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(m)) => got.extend(m.tokens.iter().map(|t| t.id)),
            Ok(None) => return (got, Ok(())),
            Err(s) => return (got, Err(s)),
        }
    }
}

/// The metrics recorder is process-wide: the tests here run one at a time,
/// so that each can read the gauges as its own server left them.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Nothing in flight, queued or running on any worker, and the metrics say
/// so too: requests in flight, waiting, rows, KV tokens held, key slots.
async fn all_released(server: &common::TestServer) {
    let state = server.state.clone();
    wait_until("every request is released", move || {
        state.engine.in_flight.is_empty()
            && state.engine.workers().iter().all(|w| {
                w.running_rows.load(std::sync::atomic::Ordering::Relaxed) == 0
                    && w.waiting.load(std::sync::atomic::Ordering::Relaxed) == 0
            })
    })
    .await;
    let addr = server.metrics_addr;
    let start = Instant::now();
    loop {
        let text = tokio::task::spawn_blocking(move || common::http_get(addr, "/metrics")).await.unwrap();
        let held: Vec<(&str, f64)> = [
            ("batchgen_requests_in_flight", &[][..]),
            ("batchgen_queue_waiting_requests", &[][..]),
            ("batchgen_batch_rows", &[("worker", "0")][..]),
            ("batchgen_kv_used_tokens", &[("worker", "0")][..]),
        ]
        .into_iter()
        .map(|(name, labels)| (name, common::metric(&text, name, labels)))
        .chain(
            text.lines()
                .filter(|l| l.starts_with("batchgen_api_key_requests_in_flight{"))
                .map(|l| ("batchgen_api_key_requests_in_flight", l.rsplit(' ').next().unwrap().parse().unwrap())),
        )
        .filter(|(_, v)| *v != 0.0)
        .collect();
        if held.is_empty() {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "still held after 10 s: {held:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_run_error_fails_the_rows_of_that_run_and_the_worker_goes_on() {
    let _serial = SERIAL.lock().await;
    let mut args = serve_args();
    // One row at a time: the second request waits in the queue, outside the failing run.
    args.limits.max_batch_size = 1;
    let server = start_with(args).await;
    let mut client = server.client.clone();
    let (long, long_want) = case("long");
    let (short, short_want) = case("short");
    let failing = client.generate_stream(with_fault(long.clone(), "run-error@3")).await.unwrap().into_inner();
    let queued = tokio::spawn({
        let mut c = client.clone();
        let r = short.clone();
        async move { c.generate(r).await }
    });
    let (got, end) = drain(failing).await;
    let status = end.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    // ONNX Runtime's own words: the embedding Gather refused the id.
    assert!(status.message().contains("Gather") || status.message().contains("indices"), "{status:?}");
    assert_eq!(got, long_want[..3], "the tokens before the failed run were sent");
    let served = queued.await.unwrap().unwrap().into_inner();
    assert_eq!(served.sequences[0].tokens.iter().map(|t| t.id).collect::<Vec<_>>(), short_want);
    // The worker goes on: the same request again, without the fault, is exact.
    let again = client.generate(long).await.unwrap().into_inner();
    assert_eq!(again.sequences[0].tokens.iter().map(|t| t.id).collect::<Vec<_>>(), long_want);
    all_released(&server).await;
}

#[tokio::test]
async fn a_panic_in_token_choice_fails_that_request_only() {
    let _serial = SERIAL.lock().await;
    let server = start_with(serve_args()).await;
    let client = server.client.clone();
    let restarts = || server.state.engine.workers()[0].stats.restarts.load(std::sync::atomic::Ordering::Relaxed);
    let before = restarts();
    let mut calls = Vec::new();
    for (i, name) in ["long", "short", "cjk", "non_ascii", "emoji"].into_iter().enumerate() {
        let (r, want) = case(name);
        let mut c = client.clone();
        // The middle request panics while choosing its third token.
        let r = if i == 2 { with_fault(r, "panic@3") } else { tonic::Request::new(r) };
        calls.push(tokio::spawn(
            async move { (i, want, drain(c.generate_stream(r).await.unwrap().into_inner()).await) },
        ));
    }
    for call in calls {
        let (i, want, (got, end)) = call.await.unwrap();
        if i == 2 {
            let status = end.unwrap_err();
            assert_eq!(status.code(), Code::Internal);
            assert!(status.message().contains("panicked") && status.message().contains("panic@3"), "{status:?}");
            assert_eq!(got, want[..2]);
        } else {
            end.unwrap();
            assert_eq!(got, want, "request {i} was disturbed by another's panic");
        }
    }
    assert_eq!(restarts(), before + 1);
    let (r, want) = case("short");
    let again = server.client.clone().generate(r).await.unwrap().into_inner();
    assert_eq!(again.sequences[0].tokens.iter().map(|t| t.id).collect::<Vec<_>>(), want);
    all_released(&server).await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_paused_then_ended_and_holds_nothing() {
    let _serial = SERIAL.lock().await;
    let mut args = serve_args();
    args.server.stream_stall_timeout = 2.0;
    let server = start_with(args).await;
    // A client whose HTTP/2 windows are small and that never reads: the
    // server can hand its stream a few kilobytes, then must hold the rest.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .initial_stream_window_size(Some(4096))
        .initial_connection_window_size(Some(65535))
        .connect()
        .await
        .unwrap();
    let mut stalled_client = pb::generation_client::GenerationClient::new(channel);
    let mut r = request(vec![464, 2068, 7586, 21831], 200);
    r.stopping.as_mut().unwrap().ignore_eos = true;
    r.top_logprobs = 5;
    let t0 = Instant::now();
    let stream = stalled_client.generate_stream(r).await.unwrap().into_inner();
    let worker = server.state.engine.workers()[0].clone();
    let steps = || worker.stats.steps.load(std::sync::atomic::Ordering::Relaxed);
    if common::built() {
        // The row pauses: no more decode steps, but it keeps its slot.
        let mut last = steps();
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = steps();
            if now == last {
                break;
            }
            last = now;
            assert!(t0.elapsed() < Duration::from_secs(2), "the row never paused");
        }
        assert!(last < 200, "{last} steps: the whole request was generated for a client that reads nothing");
        assert_eq!(worker.running_rows.load(std::sync::atomic::Ordering::Relaxed), 1);
        // Meanwhile the worker serves others exactly.
        let (r, want) = case("short");
        let served = server.client.clone().generate(r).await.unwrap().into_inner();
        assert_eq!(served.sequences[0].tokens.iter().map(|t| t.id).collect::<Vec<_>>(), want);
    }
    // After the stall timeout the call is ended and nothing stays held.
    all_released(&server).await;
    assert!(t0.elapsed() >= Duration::from_secs(2), "released before the stall timeout");
    // When the client reads at last it finds the messages that waited and the status.
    let (got, end) = drain(stream).await;
    let status = end.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("read nothing") || status.message().contains("did not read"), "{status:?}");
    assert!(!got.is_empty() && got.len() < 200, "{} tokens", got.len());
}

#[tokio::test]
async fn a_keys_concurrency_limit_and_cancel_belong_to_the_key() {
    let _serial = SERIAL.lock().await;
    use batchgen::server::auth::{Limits, keygen};
    use tonic_types::StatusExt;
    let dir = tempfile::tempdir().unwrap();
    let (alice, alice_line) = keygen("alice", Limits { concurrency: Some(1), ..Default::default() }).unwrap();
    let (bob, bob_line) = keygen("bob", Limits::default()).unwrap();
    let path = dir.path().join("keys");
    std::fs::write(&path, format!("{alice_line}\n{bob_line}\n")).unwrap();
    let mut args = serve_args();
    args.server.api_keys = Some(path);
    let server = start_with(args).await;
    let mut client = server.client.clone();
    let keyed = |mut r: tonic::Request<pb::GenerateRequest>, key: &str| {
        r.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
        r
    };
    // Alice's request held in flight by slow steps (50 ms each, 40 tokens).
    let mut slow = request(vec![464, 2068, 7586, 21831], 40);
    slow.stopping.as_mut().unwrap().ignore_eos = true;
    slow.request_id = "alice-1".into();
    let held = client.generate_stream(keyed(with_fault(slow.clone(), "slow@50"), &alice)).await.unwrap().into_inner();
    let (short, want) = case("short");
    let status = client.generate(keyed(tonic::Request::new(short.clone()), &alice)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("concurrency limit"), "{status:?}");
    assert!(status.get_details_retry_info().is_some());
    // Bob is not held back by Alice's limit, and cannot cancel her request.
    let served = client.generate(keyed(tonic::Request::new(short.clone()), &bob)).await.unwrap().into_inner();
    assert_eq!(served.sequences[0].tokens.iter().map(|t| t.id).collect::<Vec<_>>(), want);
    let cancel = |key: &str| keyed_cancel("alice-1", key);
    assert!(!client.cancel(cancel(&bob)).await.unwrap().into_inner().found);
    assert!(client.cancel(cancel(&alice)).await.unwrap().into_inner().found);
    let (got, end) = drain(held).await;
    end.unwrap();
    assert!(got.len() < 40, "the cancel did not end the request");
    all_released(&server).await;
    // Her slot is free again.
    client.generate(keyed(tonic::Request::new(short), &alice)).await.unwrap();
}

fn keyed_cancel(id: &str, key: &str) -> tonic::Request<pb::CancelRequest> {
    let mut r = tonic::Request::new(pb::CancelRequest { request_id: id.into() });
    r.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

#[tokio::test]
async fn a_malformed_fault_is_invalid_argument() {
    let _serial = SERIAL.lock().await;
    let server = start_with(serve_args()).await;
    let status = server.client.clone().generate(with_fault(request(vec![1], 1), "explode@1")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("x-batchgen-fault"), "{status:?}");
}
