//! Continuous batching against the real server: batch invariance, joins and
//! evictions, cancellation, deadlines, admission limits and shutdown.
mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use batchgen::pb::{self, FinishReason};
use common::{expected, ids, last_message, request, start, start_with, wait_until};
use tonic::Code;

fn token_ids(resp: &pb::GenerateResponse) -> Vec<u32> {
    resp.sequences[0].tokens.iter().map(|t| t.id).collect()
}

/// Requests of different prompt lengths, lengths to go and settings, started
/// at staggered times so rows join and leave while others run: every greedy
/// output equals the same request's output alone.
#[tokio::test]
async fn greedy_output_is_the_same_alone_and_in_a_mixed_batch() {
    let mut server = start().await;
    let exp = expected();
    let mut reqs = Vec::new();
    for (i, (name, case)) in exp["greedy"].as_object().unwrap().iter().enumerate() {
        let prompt = ids(&case["prompt_ids"]);
        // The transformers case itself, checked against its saved output.
        let r = common::case_request(case);
        reqs.push((name.to_string(), r, Some(ids(&case["output_ids"]))));
        // Other lengths to go and settings for the same prompt.
        let mut r = request(prompt.clone(), 5 + 7 * i as u32);
        r.stopping.as_mut().unwrap().ignore_eos = true;
        r.top_logprobs = (i % 3) as u32;
        reqs.push((format!("{name}/ignore_eos"), r, None));
        let mut r = request(prompt[prompt.len() / 2..].to_vec(), 40);
        r.stopping.as_mut().unwrap().stop_token_ids = vec![13];
        reqs.push((format!("{name}/suffix"), r, None));
    }
    // Alone, one at a time.
    let mut alone = Vec::new();
    for (name, r, want) in &reqs {
        let got = token_ids(&server.client.generate(r.clone()).await.unwrap().into_inner());
        if let Some(want) = want {
            assert_eq!(&got, want, "{name} alone differs from transformers");
        }
        alone.push(got);
    }
    let stats = &server.state.engine.workers()[0].stats;
    let (joins0, evictions0, copies0) = (
        stats.joins.load(Ordering::Relaxed),
        stats.evictions.load(Ordering::Relaxed),
        stats.evict_copies.load(Ordering::Relaxed),
    );
    // Together, staggered, twice in different orders.
    for round in 0..2 {
        let mut handles = Vec::new();
        for (k, (name, r, _)) in reqs.iter().enumerate() {
            let mut client = server.client.clone();
            let (name, r) = (name.clone(), r.clone());
            let delay = Duration::from_millis(((k * 7 + round * 13) % 11) as u64 * 3);
            handles.push(tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                (name, client.generate(r).await.unwrap().into_inner())
            }));
        }
        for (h, want) in handles.into_iter().zip(&alone) {
            let (name, resp) = h.await.unwrap();
            assert_eq!(&token_ids(&resp), want, "{name} in a batch (round {round}) differs from alone");
        }
    }
    let steps = stats.steps.load(Ordering::Relaxed);
    let rows = stats.step_rows.load(Ordering::Relaxed);
    assert!(stats.joins.load(Ordering::Relaxed) > joins0, "no request joined a running batch");
    assert!(stats.evictions.load(Ordering::Relaxed) > evictions0, "no row left a running batch");
    if common::built() {
        // The slot cache: nobody's cache moved when others joined or left.
        assert_eq!(stats.join_bytes.load(Ordering::Relaxed), 0, "a join copied KV");
        assert_eq!(stats.evict_bytes.load(Ordering::Relaxed), 0, "an eviction copied KV");
    } else {
        assert!(stats.evict_copies.load(Ordering::Relaxed) > copies0, "the padded batch never shrank");
    }
    assert!(rows > steps, "steps never held more than one row");
}

#[tokio::test]
async fn a_cancelled_stream_frees_its_row_before_the_next_steps() {
    let mut server = start().await;
    let worker = server.state.engine.workers()[0].clone();
    let mut r = request(vec![464; 30], 200);
    r.stopping.as_mut().unwrap().ignore_eos = true;
    // A companion request keeps the batch running.
    let mut companion = server.client.clone();
    let other = tokio::spawn(async move { companion.generate(r.clone()).await.unwrap().into_inner() });
    let mut r = request(vec![10; 5], 200);
    r.stopping.as_mut().unwrap().ignore_eos = true;
    let mut stream = server.client.generate_stream(r).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    wait_until("both rows run", || worker.running_rows.load(Ordering::Relaxed) == 2).await;
    let evicted = worker.stats.evictions.load(Ordering::Relaxed);
    drop(stream);
    wait_until("the row is evicted", || worker.running_rows.load(Ordering::Relaxed) == 1).await;
    assert_eq!(worker.stats.evictions.load(Ordering::Relaxed), evicted + 1);
    assert!(server.state.engine.in_flight.len() <= 1);
    let resp = other.await.unwrap();
    assert_eq!(resp.sequences[0].tokens.len(), 200, "the other request is unaffected");
    wait_until("the batch is empty", || worker.running_rows.load(Ordering::Relaxed) == 0).await;
}

#[tokio::test]
async fn cancel_by_request_id_from_another_connection() {
    let mut server = start().await;
    let mut r = request(vec![464; 10], 200);
    r.stopping.as_mut().unwrap().ignore_eos = true;
    r.request_id = "job-42".into();
    let mut stream = server.client.generate_stream(r.clone()).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    // The same id may not be used twice while in flight.
    let dup = server.client.generate(r).await.unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists, "{dup:?}");
    let mut other =
        batchgen::pb::generation_client::GenerationClient::connect(format!("http://{}", server.addr)).await.unwrap();
    let found = cancel(&mut other, "job-42").await;
    assert!(found);
    let last = last_message(&mut stream).await;
    assert_eq!(last.finish_reason, FinishReason::Cancelled as i32);
    assert!(last.usage.unwrap().generated_tokens < 200);
    wait_until("the id is released", || server.state.engine.in_flight.is_empty()).await;
    let found = cancel(&mut other, "job-42").await;
    assert!(!found);
}

#[tokio::test]
async fn a_request_that_can_never_fit_is_refused_at_once() {
    let mut args = common::serve_args();
    args.limits.max_batch_tokens = 100;
    let mut server = start_with(args).await;
    let status = server.client.generate(request(vec![464; 60], 50)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "stopping.max_new_tokens: prompt tokens (60) + max_new_tokens (50) = 110 exceeds the server's KV budget per \
         worker of 100 tokens (--max-batch-tokens), so the request could never run"
    );
    // One that fits alone but not beside another waits its turn (FIFO).
    let mut r = request(vec![464; 40], 50);
    r.stopping.as_mut().unwrap().ignore_eos = true;
    let mut a = server.client.clone();
    let r1 = r.clone();
    let first = tokio::spawn(async move { a.generate(r1).await.unwrap().into_inner() });
    let second = server.client.generate(r).await.unwrap().into_inner();
    let first = first.await.unwrap();
    assert_eq!(first.sequences[0].tokens.len() + second.sequences[0].tokens.len(), 100);
    // 2 rows would need 2 * (40 + 50) = 180 slots: they never ran together.
    let stats = &server.state.engine.workers()[0].stats;
    assert_eq!(stats.step_rows.load(Ordering::Relaxed), stats.steps.load(Ordering::Relaxed));
}

#[tokio::test]
async fn shutdown_lets_running_requests_finish_within_the_grace_period() {
    let mut server = start().await;
    let mut r = request(vec![464; 10], 30);
    r.stopping.as_mut().unwrap().ignore_eos = true;
    let mut stream = server.client.generate_stream(r).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let server_front = server.server.clone();
    let drain = tokio::spawn(async move { batchgen::server::drain(&server_front, Duration::from_secs(20)).await });
    wait_until("draining", || server.state.draining.load(Ordering::SeqCst)).await;
    let refused = server.client.generate(request(vec![464], 2)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert_eq!(refused.message(), "the server is shutting down");
    let mut tokens = first.tokens.len();
    let mut last = first;
    while let Some(m) = stream.message().await.unwrap() {
        tokens += m.tokens.len();
        last = m;
    }
    assert_eq!(last.finish_reason, FinishReason::Length as i32);
    assert_eq!(tokens, 30);
    drain.await.unwrap();
    assert!(server.state.engine.in_flight.is_empty());
}

#[tokio::test]
async fn shutdown_cancels_what_outlasts_the_grace_period() {
    let mut server = start().await;
    let mut r = request(vec![464; 10], 200);
    r.stopping.as_mut().unwrap().ignore_eos = true;
    let mut stream = server.client.generate_stream(r).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    batchgen::server::drain(&server.server, Duration::ZERO).await;
    assert!(server.state.engine.in_flight.is_empty());
    let last = last_message(&mut stream).await;
    assert_eq!(last.finish_reason, FinishReason::Cancelled as i32);
    assert!(last.usage.unwrap().generated_tokens < 200);
    let refused = server.client.generate(request(vec![464], 2)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
}

#[tokio::test]
async fn two_workers_share_the_load_and_agree() {
    let mut args = common::serve_args();
    args.runtime.workers = 2;
    let server = start_with(args).await;
    let exp = expected();
    let case = &exp["greedy"]["long"];
    let mut handles = Vec::new();
    for _ in 0..6 {
        let mut c = server.client.clone();
        let r = request(ids(&case["prompt_ids"]), 24);
        handles.push(tokio::spawn(async move { c.generate(r).await.unwrap().into_inner() }));
    }
    for h in handles {
        assert_eq!(token_ids(&h.await.unwrap()), ids(&case["output_ids"]));
    }
    let workers = server.state.engine.workers();
    assert_eq!(workers.len(), 2);
    for w in workers {
        assert!(w.stats.steps.load(Ordering::Relaxed) > 0, "worker {} got no work", w.id);
    }
}

async fn cancel(
    client: &mut batchgen::pb::generation_client::GenerationClient<tonic::transport::Channel>,
    id: &str,
) -> bool {
    let req = pb::CancelRequest { request_id: id.into() };
    client.cancel(req).await.unwrap().into_inner().found
}

/// With a prefill bound of 16 tokens, the 90-token prompt is prefilled in
/// six chunks between decode steps of a running request; both outputs stay
/// exactly transformers' (built graph: the exported graph prefills whole
/// prompts, so there the bound caps the prompt instead).
#[tokio::test]
async fn a_long_prompt_is_prefilled_in_chunks_between_decode_steps() {
    if !common::built() {
        return;
    }
    let mut args = common::serve_args();
    args.limits.max_prefill_tokens = 16;
    let mut server = start_with(args).await;
    let exp = expected();
    let worker = server.state.engine.workers()[0].clone();
    let stats = &worker.stats;
    let long = &exp["greedy"]["long"];
    let short = &exp["greedy"]["short"];
    let mut companion = server.client.clone();
    let short_req = common::case_request(short);
    let running = tokio::spawn(async move { companion.generate(short_req).await.unwrap().into_inner() });
    // Let the companion start decoding first.
    wait_until("the companion decodes", || stats.steps.load(Ordering::Relaxed) > 0).await;
    let steps_before = stats.steps.load(Ordering::Relaxed);
    let prefilled_before = stats.prefill_tokens.load(Ordering::Relaxed);
    let got = token_ids(&server.client.generate(common::case_request(long)).await.unwrap().into_inner());
    assert_eq!(got, ids(&long["output_ids"]), "the chunked prompt's output differs from transformers");
    let prompt_len = ids(&long["prompt_ids"]).len() as u64;
    assert_eq!(stats.prefill_tokens.load(Ordering::Relaxed) - prefilled_before, prompt_len);
    let companion_out = running.await.unwrap();
    assert_eq!(token_ids(&companion_out), ids(&short["output_ids"]), "the running request's output changed");
    assert!(stats.steps.load(Ordering::Relaxed) - steps_before >= prompt_len.div_ceil(16));
}
