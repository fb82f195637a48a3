//! End-to-end: the real server, in-process, against independent references.
mod common;

use batchgen::pb::{self, FinishReason};
use common::{expected, ids, request, start};
use tonic::Code;

/// Greedy output equals transformers' generate() on the same weights, token
/// for token, with the same log-probabilities.
#[tokio::test]
async fn greedy_matches_transformers_generate() {
    let mut server = start().await;
    let exp = expected();
    let cases = exp["greedy"].as_object().unwrap();
    assert!(cases.len() >= 9);
    for (name, case) in cases {
        let prompt_ids = ids(&case["prompt_ids"]);
        let want = ids(&case["output_ids"]);
        let max_new = case["max_new_tokens"].as_u64().unwrap() as u32;
        let min_new = case["min_new_tokens"].as_u64().unwrap_or(0) as u32;
        // Text prompts go through our tokenizer: it must give transformers' ids.
        let decoding = pb::Decoding {
            repetition_penalty: case["repetition_penalty"].as_f64().unwrap_or(0.0) as f32,
            no_repeat_ngram_size: case["no_repeat_ngram_size"].as_u64().unwrap_or(0) as u32,
            ..Default::default()
        };
        let mut req = pb::GenerateRequest {
            decoding: Some(decoding),
            prompt: case["prompt"].as_str().unwrap().into(),
            stopping: Some(pb::Stopping { max_new_tokens: max_new, min_new_tokens: min_new, ..Default::default() }),
            ..Default::default()
        };
        let by_text = server.client.generate(req.clone()).await.unwrap().into_inner();
        req.prompt.clear();
        req.prompt_token_ids = prompt_ids.clone();
        let by_ids = server.client.generate(req).await.unwrap().into_inner();
        assert_eq!(by_text.usage.as_ref().unwrap().prompt_tokens as usize, prompt_ids.len(), "{name}");
        for resp in [by_text, by_ids] {
            let seq = &resp.sequences[0];
            let got: Vec<u32> = seq.tokens.iter().map(|t| t.id).collect();
            assert_eq!(got, want, "{name}: token ids differ from transformers");
            let want_reason = if want.last() == Some(&50256) { FinishReason::Eos } else { FinishReason::Length };
            assert_eq!(seq.finish_reason, want_reason as i32, "{name}");
            let lps = case["logprobs"].as_array().unwrap();
            for (t, lp) in seq.tokens.iter().zip(lps) {
                assert!((f64::from(t.logprob) - lp.as_f64().unwrap()).abs() < 1e-4, "{name}: {} vs {lp}", t.logprob);
            }
            let sum: f64 = lps.iter().map(|x| x.as_f64().unwrap()).sum();
            assert!((seq.logprob_sum - sum).abs() < 1e-4, "{name}: logprob_sum {} vs {sum}", seq.logprob_sum);
            assert_eq!(seq.score, seq.logprob_sum);
            // transformers decodes with the EOS text; ours leaves special tokens out.
            assert_eq!(seq.text, case["text"].as_str().unwrap().replace("<|endoftext|>", ""), "{name}");
            let u = resp.usage.unwrap();
            assert_eq!(u.generated_tokens as usize, want.len());
            assert!(
                u.total_seconds >= u.time_to_first_token_seconds && u.time_to_first_token_seconds >= u.queue_seconds
            );
        }
    }
}

/// Streaming an output full of emoji split across byte-level tokens: no
/// message holds U+FFFD, and the pieces concatenate to the unary text.
#[tokio::test]
async fn streamed_text_is_whole_utf8_and_equals_the_unary_text() {
    let mut server = start().await;
    let exp = expected();
    let case = &exp["greedy"][exp["utf8_case"].as_str().unwrap()];
    let req = request(ids(&case["prompt_ids"]), 24);
    let unary = server.client.generate(req.clone()).await.unwrap().into_inner();
    let mut stream = server.client.generate_stream(req).await.unwrap().into_inner();
    let mut texts = Vec::new();
    let mut tokens = Vec::new();
    let mut finals = 0;
    let mut usage = None;
    while let Some(m) = stream.message().await.unwrap() {
        assert!(!m.text.contains('\u{FFFD}'), "streamed {:?}", m.text);
        assert!(!m.request_id.is_empty());
        texts.push(m.text);
        tokens.extend(m.tokens.iter().map(|t| t.id));
        if m.finish_reason != 0 {
            finals += 1;
            assert_eq!(m.logprob_sum, unary.sequences[0].logprob_sum);
        }
        if m.usage.is_some() {
            usage = m.usage;
        }
    }
    let split = unary.sequences[0].tokens.iter().filter(|t| t.text.contains('\u{FFFD}')).count();
    assert!(split > 4, "the case must split characters across tokens");
    assert!(texts.iter().filter(|t| t.is_empty()).count() > 0, "some bytes must have been held back");
    assert_eq!(texts.concat(), unary.sequences[0].text);
    assert_eq!(tokens, unary.sequences[0].tokens.iter().map(|t| t.id).collect::<Vec<_>>());
    assert_eq!(finals, 1);
    assert_eq!(usage.unwrap().generated_tokens as usize, tokens.len());
}

/// The cache path must give what a full recompute gives: here ONNX Runtime
/// is driven directly, re-running the whole sequence with no past each step.
#[tokio::test]
async fn kv_cache_generation_equals_full_recompute() {
    let mut server = start().await;
    let mut session = common::fixture_session();
    let exp = expected();
    for name in ["long", "one_token", "cjk"] {
        let prompt = ids(&exp["greedy"][name]["prompt_ids"]);
        let mut req = request(prompt.clone(), 20);
        req.stopping.as_mut().unwrap().ignore_eos = true;
        let served: Vec<u32> =
            server.client.generate(req).await.unwrap().into_inner().sequences[0].tokens.iter().map(|t| t.id).collect();
        let mut seq: Vec<i64> = prompt.iter().map(|&t| i64::from(t)).collect();
        for _ in 0..20 {
            let last = common::full_recompute_logits(&mut session, &seq);
            let best = (0..last.len()).fold(0, |b, i| if last[i] > last[b] { i } else { b });
            seq.push(best as i64);
        }
        let recomputed: Vec<u32> = seq[prompt.len()..].iter().map(|&t| t as u32).collect();
        assert_eq!(served, recomputed, "{name}");
    }
}

#[tokio::test]
async fn top_logprobs_are_sorted_and_consistent_with_the_chosen_token() {
    let mut server = start().await;
    let mut req = request(vec![464, 2068, 7586, 21831], 8);
    req.top_logprobs = 5;
    let seq = server.sequence(req).await;
    for t in &seq.tokens {
        assert_eq!(t.top_logprobs.len(), 5);
        assert!(t.top_logprobs.windows(2).all(|w| w[0].logprob >= w[1].logprob));
        // Greedy picks the most likely token, so it heads its alternatives.
        assert_eq!(t.top_logprobs[0].id, t.id);
        assert_eq!(t.top_logprobs[0].logprob, t.logprob);
        let mass: f32 = t.top_logprobs.iter().map(|a| a.logprob.exp()).sum();
        assert!(mass <= 1.0 + 1e-5);
    }
}

#[tokio::test]
async fn eos_handling_stop_token_ids_and_ignore_eos() {
    let mut server = start().await;
    let exp = expected();
    let case = &exp["greedy"]["emoji"];
    let prompt = ids(&case["prompt_ids"]);
    let want = ids(&case["output_ids"]);
    assert_eq!(want.last(), Some(&50256), "the emoji case ends with EOS");

    // ignore_eos: the same tokens up to EOS, then it goes on to max_new_tokens.
    let mut req = request(prompt.clone(), 40);
    req.stopping.as_mut().unwrap().ignore_eos = true;
    let seq = server.sequence(req).await;
    let got: Vec<u32> = seq.tokens.iter().map(|t| t.id).collect();
    assert_eq!(got.len(), 40);
    assert_eq!(&got[..want.len()], &want[..]);
    assert_eq!(seq.finish_reason, FinishReason::Length as i32);
    assert!(seq.tokens[want.len() - 1].special);

    // A stop token id ends the sequence on that token, which is returned.
    let stop_at = want[3];
    let mut req = request(prompt.clone(), 40);
    req.stopping.as_mut().unwrap().stop_token_ids = vec![stop_at];
    let seq = server.sequence(req).await;
    let got: Vec<u32> = seq.tokens.iter().map(|t| t.id).collect();
    let first = want.iter().position(|&t| t == stop_at).unwrap();
    assert_eq!(got, want[..=first].to_vec());
    assert_eq!(seq.finish_reason, FinishReason::StopSequence as i32);
}

#[tokio::test]
async fn the_default_length_is_capped_by_the_context() {
    let mut server = start().await;
    // 250 prompt tokens, context 256, default max_new_tokens 16: 6 tokens.
    let mut req = request(vec![464; 250], 0);
    req.stopping.as_mut().unwrap().ignore_eos = true;
    let seq = server.sequence(req).await;
    assert_eq!(seq.tokens.len(), 6);
    assert_eq!(seq.finish_reason, FinishReason::ContextFull as i32);
}

async fn expect_error(server: &mut common::TestServer, req: pb::GenerateRequest, code: Code, message: &str) {
    for stream in [false, true] {
        let status = if stream {
            server.client.generate_stream(req.clone()).await.err()
        } else {
            server.client.generate(req.clone()).await.err()
        }
        .unwrap_or_else(|| panic!("{req:?} was accepted"));
        assert_eq!(status.code(), code, "{}", status.message());
        assert_eq!(status.message(), message);
    }
}

#[tokio::test]
async fn bad_requests_get_precise_errors() {
    let mut server = start().await;
    let s = &mut server;
    expect_error(
        s,
        pb::GenerateRequest::default(),
        Code::InvalidArgument,
        "prompt: is empty: set prompt or prompt_token_ids",
    )
    .await;
    expect_error(
        s,
        request(vec![10, 50257], 4),
        Code::InvalidArgument,
        "prompt_token_ids: [1] = 50257 is not a token id: must be below the vocabulary size 50257",
    )
    .await;
    expect_error(
        s,
        request(vec![10; 200], 100),
        Code::InvalidArgument,
        "stopping.max_new_tokens: prompt tokens (200) + max_new_tokens (100) = 300 exceeds the model's context length 256",
    )
    .await;
    expect_error(
        s,
        request(vec![10; 2], 201),
        Code::InvalidArgument,
        "stopping.max_new_tokens: must be at most 200, got 201",
    )
    .await;
    let mut req = request(vec![10], 4);
    req.top_logprobs = 21;
    expect_error(s, req, Code::InvalidArgument, "top_logprobs: must be at most 20, got 21").await;
    let mut req = request(vec![10], 4);
    req.decoding = Some(pb::Decoding {
        method: Some(pb::decoding::Method::BeamSearch(pb::BeamSearch { num_beams: 9, ..Default::default() })),
        ..Default::default()
    });
    let msg = "decoding.beam_search.num_beams: must be at most 8 (--max-beams; 0 means 1), got 9";
    expect_error(s, req, Code::InvalidArgument, msg).await;
    let mut req = request(vec![10], 4);
    req.decoding = Some(pb::Decoding {
        method: Some(pb::decoding::Method::Sampling(pb::Sampling {
            temperature: 1.0,
            top_p: 2.0,
            ..Default::default()
        })),
        ..Default::default()
    });
    let msg = "decoding.sampling.top_p: must be in (0, 1] (0 means off), got 2";
    expect_error(s, req, Code::InvalidArgument, msg).await;
}

#[tokio::test]
async fn a_passed_deadline_ends_the_stream_with_deadline_exceeded() {
    let mut server = start().await;
    let mut req = request(vec![464; 50], 200);
    req.stopping.as_mut().unwrap().ignore_eos = true;
    let mut r = tonic::Request::new(req.clone());
    r.set_timeout(std::time::Duration::from_millis(150));
    let mut stream = server.client.generate_stream(r).await.unwrap().into_inner();
    let mut last = None;
    let status = loop {
        match stream.message().await {
            Ok(Some(m)) => last = Some(m),
            Ok(None) => panic!("the stream ended without the deadline status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let last = last.unwrap();
    assert_eq!(last.finish_reason, FinishReason::Deadline as i32);
    assert!(last.usage.unwrap().generated_tokens < 200);

    // The header alone, without tonic's client-side timer: what is checked is
    // the server's answer, not which of two timers fires first on a loaded
    // machine.
    let mut r = tonic::Request::new(req);
    r.metadata_mut().insert("grpc-timeout", "150m".parse().unwrap());
    let status = server.client.generate(r).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
}

#[tokio::test]
async fn a_full_queue_is_refused_at_once() {
    let mut args = common::serve_args();
    args.limits.max_queue = 1;
    args.limits.max_batch_size = 1;
    let server = common::start_with(args).await;
    let mut req = request(vec![464; 20], 200);
    req.stopping.as_mut().unwrap().ignore_eos = true;
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let mut c = server.client.clone();
            let r = req.clone();
            tokio::spawn(async move { c.generate(r).await })
        })
        .collect();
    let mut results = Vec::new();
    for call in calls {
        results.push(call.await.unwrap());
    }
    let refused = results.iter().filter(|r| matches!(r, Err(s) if s.code() == Code::ResourceExhausted)).count();
    let served = results.iter().filter(|r| r.is_ok()).count();
    let codes: Vec<Code> = results.iter().map(|r| r.as_ref().map_or_else(|s| s.code(), |_| Code::Ok)).collect();
    assert!(refused >= 2, "{codes:?}");
    assert!(served >= 1);
    assert_eq!(refused + served, 4);
    let msg = results.iter().find_map(|r| r.as_ref().err()).unwrap().message().to_string();
    assert_eq!(msg, "the queue of waiting requests is full (1 requests); retry later");
}

#[tokio::test]
async fn a_client_that_leaves_frees_the_engine() {
    let mut server = start().await;
    let mut req = request(vec![464; 20], 200);
    req.stopping.as_mut().unwrap().ignore_eos = true;
    {
        let mut stream = server.client.generate_stream(req.clone()).await.unwrap().into_inner();
        stream.message().await.unwrap().unwrap();
        // Dropped here, after one token of 200.
    }
    // The next request is served at once instead of waiting for 199 tokens.
    let t = std::time::Instant::now();
    let resp = server.client.generate(request(vec![464], 2)).await.unwrap().into_inner();
    let u = resp.usage.unwrap();
    assert_eq!(u.generated_tokens, 2);
    let full = server.client.generate(req).await.unwrap().into_inner().usage.unwrap().total_seconds;
    assert!(u.queue_seconds < full / 2.0, "queued {:.3}s; a whole request takes {full:.3}s", u.queue_seconds);
    assert!(t.elapsed().as_secs_f64() < 60.0);
}

#[tokio::test]
async fn model_info_and_tokenize() {
    let mut server = start().await;
    let info = server.client.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.vocab_size, info.context_length, info.eos_token_id), (50257, 256, 50256));
    assert_eq!(info.max_new_tokens_limit, 200);
    assert_eq!(info.decoding_methods, vec!["greedy", "sampling", "beam_search"]);
    assert_eq!((info.max_beams, info.max_stop_sequences, info.max_samples), (8, 8, 16));
    assert_eq!((info.max_batch_size, info.workers), (16, 1));
    assert_eq!(info.kv_dtype, "float32");
    let t = server.client.tokenize(pb::TokenizeRequest { text: "Hello world 🎉".into() }).await.unwrap().into_inner();
    let exp = expected();
    assert_eq!(t.token_ids[0], ids(&exp["greedy"]["one_token"]["prompt_ids"])[0]);
    assert_eq!(t.pieces[1].text, " world");
    let d = |token_ids: Vec<u32>, skip_special_tokens| pb::DetokenizeRequest { token_ids, skip_special_tokens };
    let mut ids_eos = t.token_ids.clone();
    ids_eos.push(50256);
    let text = server.client.detokenize(d(ids_eos.clone(), false)).await.unwrap().into_inner().text;
    assert_eq!(text, "Hello world 🎉<|endoftext|>");
    let text = server.client.detokenize(d(ids_eos, true)).await.unwrap().into_inner().text;
    assert_eq!(text, "Hello world 🎉");
    let status = server.client.detokenize(d(vec![1, 50257], false)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "token_ids: [1] = 50257 is not a token id: must be below the vocabulary size 50257");
    assert_eq!((t.pieces[1].start, t.pieces[1].end), (5, 11));
}
