//! Many tenants on one server: the queue is shared fairly between API keys
//! (by weight, counted in tokens), `priority` orders a key's own requests,
//! and scheduling changes timing only, never tokens. Against the real server
//! in process, with a batch of one row held by a slowed request (the
//! `fault-injection` feature) while the others queue.
#![cfg(feature = "fault-injection")]
mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use batchgen::pb;
use batchgen::server::auth::Limits;
use common::{expected, ids, keyed, keys_file, request, serve_args, start_with};
use tonic::Code;

fn long(max_new_tokens: u32, priority: i32) -> pb::GenerateRequest {
    let mut r = request(ids(&expected()["greedy"]["short"]["prompt_ids"]), max_new_tokens);
    r.stopping.as_mut().unwrap().ignore_eos = true;
    r.priority = priority;
    r
}

async fn server(batch: usize, keys: &[(&str, Limits)], dir: &Path) -> (common::TestServer, Vec<String>) {
    let (path, secrets) = keys_file(dir, keys);
    let mut args = serve_args();
    args.server.api_keys = Some(path);
    args.limits.max_batch_size = batch;
    (start_with(args).await, secrets)
}

/// Waits until `n` requests are in flight.
async fn until_in_flight(server: &common::TestServer, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while server.state.engine.in_flight.len() < n {
        assert!(std::time::Instant::now() < deadline, "only {} in flight", server.state.engine.in_flight.len());
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Holds the one row of a one-row batch until dropped: 200 tokens at a
/// decode step slowed to 400 ms (the `slow@MS` fault): at least 10 s even
/// when speculation accepts 8 tokens a step (the fixture's greedy text
/// repeats itself; at 50 ms a loaded CI machine once saw the blocker finish
/// before the floods were queued), ended early by dropping the stream
/// (which cancels it).
async fn blocker(server: &common::TestServer, key: &str) -> tonic::Streaming<pb::GenerateStreamResponse> {
    let mut c = server.client.clone();
    let mut req = keyed(long(200, 0), key);
    req.metadata_mut().insert(batchgen::fault::HEADER, "slow@400".parse().unwrap());
    let stream = c.generate_stream(req).await.unwrap().into_inner();
    until_in_flight(server, 1).await;
    stream
}

/// Key A queues twelve long requests; key B's one request, sent after all
/// of them, is admitted next instead of behind A's queue (first come, first
/// served would finish all twelve of A's first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_key_does_not_hold_back_another_keys_request() {
    let dir = tempfile::tempdir().unwrap();
    // (The metrics recorder is process-wide: every test here uses its own key names.)
    let keys = [("flood-a", Limits::default()), ("flood-b", Limits::default()), ("flood-c", Limits::default())];
    let (server, keys) = server(1, &keys, dir.path()).await;
    // A third key holds the one row while A's flood and B's request queue up.
    let blocker = blocker(&server, &keys[2]).await;
    let done: Arc<Mutex<Vec<String>>> = Default::default();
    let mut handles = Vec::new();
    for i in 0..12 {
        let (mut c, key, done) = (server.client.clone(), keys[0].clone(), done.clone());
        handles.push(tokio::spawn(async move {
            let mut r = long(30, 0);
            r.request_id = format!("a{i}");
            c.generate(keyed(r, &key)).await.unwrap();
            done.lock().unwrap().push(format!("a{i}"));
        }));
        until_in_flight(&server, i + 2).await;
    }
    let (mut c, key, b_done) = (server.client.clone(), keys[1].clone(), done.clone());
    let b = tokio::spawn(async move {
        let answer = c.generate(keyed(long(4, 0), &key)).await.unwrap().into_inner();
        let a_done = b_done.lock().unwrap().len();
        (answer, a_done)
    });
    until_in_flight(&server, 14).await;
    drop(blocker);
    let (answer, a_done) = b.await.unwrap();
    assert!(a_done <= 1, "{a_done} of a's requests finished before b's: b waited behind a's queue");
    for h in handles {
        h.await.unwrap();
    }
    // Scheduling changes timing, never tokens: b's answer equals b alone.
    let mut c = server.client.clone();
    let alone = c.generate(keyed(long(4, 0), &keys[1])).await.unwrap().into_inner();
    assert_eq!(answer.sequences[0].tokens, alone.sequences[0].tokens);
    let addr = server.metrics_addr;
    let text = tokio::task::spawn_blocking(move || common::http_get(addr, "/metrics")).await.unwrap();
    for (key, served, admitted) in [("flood-a", 12.0 * 30.0, 12.0), ("flood-b", 8.0, 2.0)] {
        assert_eq!(common::metric(&text, "batchgen_api_key_queue_waiting_requests", &[("key", key)]), 0.0);
        assert_eq!(common::metric(&text, "batchgen_api_key_generated_tokens_total", &[("key", key)]), served, "{key}");
        let waited = common::metric(&text, "batchgen_api_key_queue_duration_seconds_count", &[("key", key)]);
        assert_eq!(waited, admitted, "{key}");
    }
}

/// Two keys of equal weight flooding with equal requests take turns; a key
/// of weight 3 gets three turns for the other's one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_share_the_batch_by_weight() {
    for (weight, want) in [(1u32, 6usize), (3, 9)] {
        let dir = tempfile::tempdir().unwrap();
        let heavy = Limits { weight: Some(weight), ..Default::default() };
        let keys = [("a", heavy), ("b", Limits::default()), ("other", Limits::default())];
        let (server, keys) = server(1, &keys, dir.path()).await;
        let done: Arc<Mutex<Vec<char>>> = Default::default();
        let mut handles = Vec::new();
        // A third key's blocker holds the one row while both floods queue up
        // (a blocker of a or b would count against its share).
        let blocker = blocker(&server, &keys[2]).await;
        for i in 0..24 {
            let who = if i % 2 == 0 { 'a' } else { 'b' };
            let key = keys[usize::from(who == 'b')].clone();
            let (mut c, done) = (server.client.clone(), done.clone());
            handles.push(tokio::spawn(async move {
                c.generate(keyed(long(8, 0), &key)).await.unwrap();
                done.lock().unwrap().push(who);
            }));
            until_in_flight(&server, i + 2).await;
        }
        drop(blocker);
        for h in handles {
            h.await.unwrap();
        }
        let order: String = done.lock().unwrap().iter().collect();
        let a_first = order.chars().take(12).filter(|&c| c == 'a').count();
        assert!((want - 1..=want + 1).contains(&a_first), "weight {weight}: {order} ({a_first} of a in the first 12)");
    }
}

/// A key given min_priority orders its own waiting requests by priority
/// (lower first); a key without one cannot ask below 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_orders_a_keys_own_requests_within_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let urgent = Limits { min_priority: Some(-10), ..Default::default() };
    let (server, keys) = server(1, &[("ops", urgent), ("plain", Limits::default())], dir.path()).await;
    let blocker = blocker(&server, &keys[0]).await;
    let done: Arc<Mutex<Vec<i32>>> = Default::default();
    let mut handles = Vec::new();
    for (n, priority) in [5, 0, -5, 10, -10].into_iter().enumerate() {
        let (mut c, key, done) = (server.client.clone(), keys[0].clone(), done.clone());
        handles.push(tokio::spawn(async move {
            c.generate(keyed(long(6, priority), &key)).await.unwrap();
            done.lock().unwrap().push(priority);
        }));
        until_in_flight(&server, n + 2).await;
    }
    drop(blocker);
    for h in handles {
        h.await.unwrap();
    }
    assert_eq!(*done.lock().unwrap(), [-10, -5, 0, 5, 10]);
    let mut c = server.client.clone();
    let e = c.generate(keyed(long(2, -1), &keys[1])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("priority") && e.message().contains("min_priority"), "{e:?}");
    let e = c.generate(keyed(long(2, 101), &keys[0])).await.unwrap_err();
    assert!(e.message().contains("priority") && e.message().contains("-100 to 100"), "{e:?}");
}

/// Waits until the worker's batch holds `n` rows.
async fn until_rows(server: &common::TestServer, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let worker = server.state.engine.workers()[0].clone();
    while worker.running_rows.load(std::sync::atomic::Ordering::Relaxed) < n {
        assert!(std::time::Instant::now() < deadline, "the batch never held {n} rows");
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

/// Requests spawned at once, and the order in which they finished.
#[derive(Default)]
struct Finishes(Arc<Mutex<Vec<&'static str>>>);

impl Finishes {
    fn run(
        &self,
        server: &common::TestServer,
        req: tonic::Request<pb::GenerateRequest>,
        who: &'static str,
    ) -> tokio::task::JoinHandle<pb::GenerateResponse> {
        let (mut c, done) = (server.client.clone(), self.0.clone());
        tokio::spawn(async move {
            let answer = c.generate(req).await.unwrap().into_inner();
            done.lock().unwrap().push(who);
            answer
        })
    }

    fn order(&self) -> Vec<&'static str> {
        self.0.lock().unwrap().clone()
    }
}

/// `req` slowed to `ms` per decode step (the `slow@MS` fault) for `key`.
fn slowed(req: pb::GenerateRequest, key: &str, ms: u32) -> tonic::Request<pb::GenerateRequest> {
    let mut req = keyed(req, key);
    req.metadata_mut().insert(batchgen::fault::HEADER, format!("slow@{ms}").parse().unwrap());
    req
}

fn sampled(mut r: pb::GenerateRequest) -> pb::GenerateRequest {
    let d = r.decoding.get_or_insert_with(Default::default);
    d.method = Some(pb::decoding::Method::Sampling(pb::Sampling {
        temperature: 0.9,
        top_k: 40,
        top_p: 0.95,
        seed: Some(4242),
        num_samples: 2,
        ..Default::default()
    }));
    d.presence_penalty = 0.3;
    d.repetition_penalty = 1.2;
    r.top_logprobs = 2;
    r
}

fn beams(mut r: pb::GenerateRequest) -> pb::GenerateRequest {
    let d = r.decoding.get_or_insert_with(Default::default);
    d.method = Some(pb::decoding::Method::BeamSearch(pb::BeamSearch {
        num_beams: 2,
        num_return_sequences: 2,
        ..Default::default()
    }));
    d.no_repeat_ngram_size = 3;
    r
}

/// A batch of three rows full of key A's requests (one greedy, then a
/// second of two rows: seeded samples with penalties, or two beams); key
/// B's request arrives and takes the place of A's later request (A holds
/// more of the batch than B would after the move), finishes first, and A's
/// preempted request resumes with exactly the tokens it makes alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_share_is_preempted_for_another_and_resumes_with_the_same_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let keys = [("share-a", Limits::default()), ("share-b", Limits::default())];
    let (server, keys) = server(3, &keys, dir.path()).await;
    let mut c = server.client.clone();
    type Make = fn(pb::GenerateRequest) -> pb::GenerateRequest;
    let cases: [(&str, Make); 2] = [("sampled", sampled), ("beams", beams)];
    for (name, second) in cases {
        let (first, second) = (long(40, 0), second(long(40, 0)));
        let alone_first = c.generate(keyed(first.clone(), &keys[0])).await.unwrap().into_inner();
        let alone_second = c.generate(keyed(second.clone(), &keys[0])).await.unwrap().into_inner();
        let done = Finishes::default();
        let run = |req, who| done.run(&server, req, who);
        let a1 = run(slowed(first, &keys[0], 40), "a1");
        until_rows(&server, 1).await;
        let a2 = run(slowed(second, &keys[0], 40), "a2");
        until_rows(&server, 3).await;
        let b = run(keyed(long(4, 0), &keys[1]), "b");
        let (a1, a2, b) = (a1.await.unwrap(), a2.await.unwrap(), b.await.unwrap());
        let order = done.order();
        if common::built() {
            assert_eq!(order[0], "b", "{name}: b waited for a row instead of preempting a's: {order:?}");
        }
        common::assert_same(&a1, &alone_first, &format!("{name}: a's first request"));
        common::assert_same(&a2, &alone_second, &format!("{name}: a's preempted request"));
        assert_eq!(b.sequences[0].tokens.len(), 4);
    }
    let addr = server.metrics_addr;
    let text = tokio::task::spawn_blocking(move || common::http_get(addr, "/metrics")).await.unwrap();
    if common::built() {
        assert_eq!(common::metric(&text, "batchgen_api_key_preemptions_total", &[("key", "share-a")]), 2.0);
        assert!(!text.contains("batchgen_api_key_preemptions_total{key=\"share-b\"}"), "b was never preempted");
        assert!(common::metric(&text, "batchgen_kv_copy_bytes_total", &[("kind", "swap_in")]) > 0.0);
        assert_eq!(common::metric(&text, "batchgen_preempted_requests", &[]), 0.0);
        assert_eq!(common::metric(&text, "batchgen_api_key_queue_waiting_requests", &[("key", "share-a")]), 0.0);
    }
}

/// A key's urgent request (lower priority number) takes the place of its
/// own running request of a higher number, which resumes afterwards with
/// the same tokens; a request of equal priority waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_more_urgent_request_preempts_its_own_keys_running_one() {
    let dir = tempfile::tempdir().unwrap();
    let urgent = Limits { min_priority: Some(-10), ..Default::default() };
    let (server, keys) = server(2, &[("prio-ops", urgent)], dir.path()).await;
    let mut c = server.client.clone();
    let background = sampled(long(40, 5));
    let alone = c.generate(keyed(background.clone(), &keys[0])).await.unwrap().into_inner();
    let done = Finishes::default();
    let run = |req, who| done.run(&server, req, who);
    let bg = run(slowed(background, &keys[0], 40), "background");
    until_rows(&server, 2).await;
    let same = run(keyed(long(3, 5), &keys[0]), "same priority");
    until_in_flight(&server, 2).await;
    let urgent = run(keyed(long(3, -10), &keys[0]), "urgent");
    let (bg, _, _) = (bg.await.unwrap(), same.await.unwrap(), urgent.await.unwrap());
    let order = done.order();
    if common::built() {
        assert_eq!(order, ["urgent", "background", "same priority"]);
    }
    common::assert_same(&bg, &alone, "the preempted request");
}

/// `--preemption on` where a row's cache cannot be copied out is refused
/// at start with a message that says what to do.
#[tokio::test]
async fn start_up_refuses_preemption_the_export_cannot_do() {
    let mut a = serve_args();
    (a.model.graph, a.model.kv_layout) =
        (batchgen::config::GraphChoice::Exported, batchgen::config::KvLayoutChoice::Slots);
    a.limits.preemption = batchgen::config::Switch::On;
    let e = tokio::task::spawn_blocking(move || batchgen::app::load(&a).err().unwrap().to_string()).await.unwrap();
    assert!(e.contains("--preemption on needs batchgen's own graph"), "{e}");
    assert!(e.contains("--preemption auto or off"), "{e}");
}
