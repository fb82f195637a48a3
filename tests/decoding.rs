//! Decoding against independent references: the warped distributions
//! transformers samples from, a chi-square test of the server's samples,
//! seeds, num_samples and stop sequences.
mod common;

use std::collections::HashMap;

use batchgen::decoding::logits::{self, Warpers};
use batchgen::pb::{self, FinishReason};
use common::{expected, ids, last_message, request, start};

fn warpers(cfg: &serde_json::Value) -> Warpers {
    let f = |k: &str| cfg[k].as_f64().unwrap_or(0.0) as f32;
    Warpers {
        temperature: f("temperature"),
        top_k: f("top_k") as usize,
        top_p: f("top_p"),
        min_p: f("min_p"),
        typical_p: f("typical_p"),
    }
}

fn sampling(cfg: &serde_json::Value, seed: u64, num_samples: u32) -> pb::Decoding {
    let w = warpers(cfg);
    pb::Decoding {
        method: Some(pb::decoding::Method::Sampling(pb::Sampling {
            temperature: w.temperature,
            top_k: w.top_k as u32,
            top_p: w.top_p,
            min_p: w.min_p,
            typical_p: w.typical_p,
            seed: Some(seed),
            num_samples,
        })),
        ..Default::default()
    }
}

/// The model's logits after `prompt`, computed with ONNX Runtime directly.
fn raw_logits(prompt: &[u32]) -> Vec<f32> {
    let tokens: Vec<i64> = prompt.iter().map(|&t| i64::from(t)).collect();
    common::full_recompute_logits(&mut common::fixture_session(), &tokens)
}

fn pairs(v: &serde_json::Value) -> Vec<(u32, f64)> {
    v.as_array().unwrap().iter().map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap())).collect()
}

/// Our warpers give the distribution transformers' warpers give.
#[test]
fn warped_distributions_equal_transformers() {
    let exp = expected();
    let cases = exp["sampling"].as_array().unwrap();
    assert!(cases.len() >= 12);
    for case in cases {
        let cfg = &case["warpers"];
        let ours = logits::distribution(&raw_logits(&ids(&case["prompt_ids"])), &warpers(cfg));
        let support = case["support"].as_u64().unwrap() as usize;
        let want = match case["distribution"].as_array() {
            Some(_) => pairs(&case["distribution"]),
            None => pairs(&case["top"]),
        };
        if case["distribution"].is_array() {
            assert_eq!(ours.len(), support, "{cfg}: support");
        } else {
            // Large supports: tokens of ~1e-9 probability sit at the cut-off,
            // where float32 sums in a different order may decide differently.
            let diff = ours.len().abs_diff(support);
            assert!(diff <= support / 1000 + 2, "{cfg}: support {} vs {support}", ours.len());
        }
        let ours_by_id: HashMap<u32, f32> = ours.iter().copied().collect();
        for (id, p) in want {
            let q = ours_by_id.get(&id).copied().unwrap_or(0.0);
            assert!((f64::from(q) - p).abs() < 1e-4, "{cfg}: token {id}: {q} vs {p}");
        }
    }
}

/// Several thousand one-token samples through the real server, with a fixed
/// set of seeds, accepted by a chi-square test against transformers'
/// distribution.
#[tokio::test]
async fn server_samples_follow_the_transformers_distribution() {
    let mut args = common::serve_args();
    args.limits.max_batch_size = 64;
    args.limits.max_queue = 256;
    let server = common::start_with(args).await;
    let exp = expected();
    let cases = exp["sampling"].as_array().unwrap();
    let pick = |cfg: serde_json::Value| {
        cases.iter().find(|c| c["warpers"] == cfg && c["support"].as_u64() < Some(100)).unwrap()
    };
    for case in [
        pick(serde_json::json!({"temperature": 2.0, "top_k": 20})),
        pick(serde_json::json!({"temperature": 1.7, "top_k": 50, "top_p": 0.9, "min_p": 0.02})),
    ] {
        let dist = pairs(&case["distribution"]);
        let (requests, per) = (200u64, 16u32);
        let mut handles = Vec::new();
        for r in 0..requests {
            let mut c = server.client.clone();
            let mut req = request(ids(&case["prompt_ids"]), 1);
            req.stopping.as_mut().unwrap().ignore_eos = true;
            req.decoding = Some(sampling(&case["warpers"], 1000 + r * u64::from(per), per));
            handles.push(tokio::spawn(async move { c.generate(req).await.unwrap().into_inner() }));
        }
        let mut counts: HashMap<u32, f64> = HashMap::new();
        for h in handles {
            for s in h.await.unwrap().sequences {
                assert_eq!(s.tokens.len(), 1);
                *counts.entry(s.tokens[0].id).or_default() += 1.0;
            }
        }
        let n = (requests * u64::from(per)) as f64;
        assert!(counts.keys().all(|id| dist.iter().any(|d| d.0 == *id)), "sampled a token outside the support");
        let (chi2, buckets) = common::chi_square(&counts, dist.iter().copied(), n);
        let critical = common::chi2_critical_001((buckets - 1) as f64);
        assert!(buckets >= 5, "{}: too few buckets", case["warpers"]);
        assert!(chi2 < critical, "{}: chi2 {chi2:.1} >= {critical:.1} with {buckets} buckets", case["warpers"]);
    }
}

fn token_ids(seq: &pb::Sequence) -> Vec<u32> {
    seq.tokens.iter().map(|t| t.id).collect()
}

#[tokio::test]
async fn seeds_reproduce_samples_alone_and_in_a_busy_batch() {
    let mut server = start().await;
    let exp = expected();
    let prompt = ids(&exp["greedy"]["long"]["prompt_ids"]);
    let cfg = serde_json::json!({"temperature": 1.5, "top_p": 0.95});
    let mut req = request(prompt.clone(), 30);
    req.stopping.as_mut().unwrap().ignore_eos = true;
    req.decoding = Some(sampling(&cfg, 42, 1));
    let alone = server.sequence(req.clone()).await;
    assert_eq!(alone.seed, Some(42));
    assert_eq!(alone.tokens.len(), 30);
    // The same request among others (greedy, other seeds, other lengths).
    let mut handles = Vec::new();
    for k in 0..8u64 {
        let mut c = server.client.clone();
        let mut other = request(prompt[k as usize..].to_vec(), 10 + 5 * k as u32);
        if k % 2 == 0 {
            other.decoding = Some(sampling(&cfg, k, 2));
        }
        handles.push(tokio::spawn(async move { c.generate(other).await.unwrap() }));
    }
    let busy = server.sequence(req.clone()).await;
    for h in handles {
        h.await.unwrap();
    }
    assert_eq!(token_ids(&busy), token_ids(&alone), "a seeded sample changed with the batch around it");
    // Samples of one request differ, and each equals its own seed alone.
    req.decoding = Some(sampling(&cfg, 100, 4));
    let resp = server.client.generate(req.clone()).await.unwrap().into_inner();
    assert_eq!(resp.sequences.len(), 4);
    let all: Vec<Vec<u32>> = resp.sequences.iter().map(token_ids).collect();
    for i in 0..4 {
        for j in 0..i {
            assert_ne!(all[i], all[j], "samples {i} and {j} are identical");
        }
    }
    for (i, seq) in resp.sequences.iter().enumerate() {
        assert_eq!(seq.index as usize, i);
        assert_eq!(seq.seed, Some(100 + i as u64));
        let mut single = req.clone();
        single.decoding = Some(sampling(&cfg, 100 + i as u64, 1));
        assert_eq!(token_ids(&server.sequence(single).await), all[i], "sample {i} differs from its seed alone");
    }
    assert_eq!(resp.usage.unwrap().generated_tokens, 4 * 30);
    // Without a seed the server draws one and returns it.
    let mut unseeded = req.clone();
    unseeded.decoding = Some(pb::Decoding {
        method: Some(pb::decoding::Method::Sampling(pb::Sampling {
            temperature: 1.5,
            top_p: 0.95,
            ..Default::default()
        })),
        ..Default::default()
    });
    let drawn = server.sequence(unseeded).await;
    let seed = drawn.seed.expect("a drawn seed is returned");
    let mut again = req.clone();
    again.decoding = Some(sampling(&cfg, seed, 1));
    assert_eq!(token_ids(&server.sequence(again).await), token_ids(&drawn));
}

/// Runs `req` unary and streaming; the streamed texts must concatenate to the
/// unary text, so nothing was streamed and then retracted.
async fn both_ways(server: &mut common::TestServer, req: pb::GenerateRequest) -> pb::Sequence {
    let unary = server.sequence(req.clone()).await;
    let mut stream = server.client.generate_stream(req).await.unwrap().into_inner();
    let mut text = String::new();
    let mut reason = 0;
    while let Some(m) = stream.message().await.unwrap() {
        text.push_str(&m.text);
        if m.finish_reason != 0 {
            reason = m.finish_reason;
        }
    }
    assert_eq!(text, unary.text, "streamed text differs from the unary text");
    assert_eq!(reason, unary.finish_reason);
    unary
}

#[tokio::test]
async fn stop_sequences_on_text_spanning_tokens() {
    let mut server = start().await;
    let exp = expected();
    let case = &exp["greedy"]["short"];
    let full = case["text"].as_str().unwrap().replace("<|endoftext|>", "");
    assert!(full.starts_with(" jumps over the lazy dog."));
    let with_stops = |stops: &[&str], include: bool| {
        let mut r = request(ids(&case["prompt_ids"]), 24);
        let s = r.stopping.as_mut().unwrap();
        s.stop_sequences = stops.iter().map(|s| s.to_string()).collect();
        s.include_stop_sequence = include;
        r
    };
    // "the lazy d" spans " the", " lazy", " dog".
    let seq = both_ways(&mut server, with_stops(&["the lazy d"], false)).await;
    assert_eq!(seq.text, " jumps over ");
    assert_eq!(seq.finish_reason, FinishReason::StopSequence as i32);
    assert_eq!(seq.tokens.len(), 5, "tokens up to the one completing the match");
    let seq = both_ways(&mut server, with_stops(&["the lazy d"], true)).await;
    assert_eq!(seq.text, " jumps over the lazy d");
    // At the very first token.
    let seq = both_ways(&mut server, with_stops(&[" jum"], false)).await;
    assert_eq!((seq.text.as_str(), seq.tokens.len()), ("", 1));
    // Partial matches that fail are released; the later full match wins.
    let seq = both_ways(&mut server, with_stops(&["lazy dog. The"], false)).await;
    assert_eq!(seq.text, " jumps over the ");
    let seq = both_ways(&mut server, with_stops(&["lazy cat", "jumps over the lazy"], true)).await;
    assert_eq!(seq.text, " jumps over the lazy");
    // Never matching: everything comes out, ended by EOS.
    let seq = both_ways(&mut server, with_stops(&["lazy cat"], false)).await;
    assert_eq!(seq.text, full);
    assert_eq!(seq.finish_reason, FinishReason::Eos as i32);
}

#[tokio::test]
async fn a_stop_sequence_ends_one_sample_and_not_the_others() {
    let mut server = start().await;
    let exp = expected();
    let prompt = ids(&exp["greedy"]["long"]["prompt_ids"]);
    let cfg = serde_json::json!({"temperature": 1.5});
    let mut req = request(prompt, 20);
    req.stopping.as_mut().unwrap().ignore_eos = true;
    req.decoding = Some(sampling(&cfg, 7, 3));
    let free = server.client.generate(req.clone()).await.unwrap().into_inner();
    // Stop on a piece of sample 0's text that the others do not contain early.
    let t0 = &free.sequences[0].text;
    let stop: String = t0.chars().skip(2).take(3).collect();
    req.stopping.as_mut().unwrap().stop_sequences = vec![stop.clone()];
    let mut stream = server.client.generate_stream(req.clone()).await.unwrap().into_inner();
    let last = last_message(&mut stream).await;
    assert!(last.usage.is_some());
    let stopped = server.client.generate(req).await.unwrap().into_inner();
    let s0 = &stopped.sequences[0];
    assert_eq!(s0.finish_reason, FinishReason::StopSequence as i32);
    assert!(t0.starts_with(&s0.text) && !s0.text.contains(&stop));
    for (s, f) in stopped.sequences.iter().zip(&free.sequences).skip(1) {
        if !f.text.contains(&stop) {
            assert_eq!(s.text, f.text, "another sample was cut short");
            assert_eq!(s.tokens.len(), 20);
        }
    }
}

fn beam_request(case: &serde_json::Value) -> pb::GenerateRequest {
    let mut r = request(ids(&case["prompt_ids"]), case["max_new_tokens"].as_u64().unwrap() as u32);
    r.decoding = Some(pb::Decoding {
        method: Some(pb::decoding::Method::BeamSearch(pb::BeamSearch {
            num_beams: case["num_beams"].as_u64().unwrap() as u32,
            length_penalty: case["length_penalty"].as_f64().unwrap_or(1.0) as f32,
            early_stopping: case["early_stopping"].as_bool().unwrap_or(false),
            num_return_sequences: case["num_return_sequences"].as_u64().unwrap() as u32,
        })),
        no_repeat_ngram_size: case["no_repeat_ngram_size"].as_u64().unwrap_or(0) as u32,
        ..Default::default()
    });
    r
}

/// Beam search returns transformers' hypotheses, in order, with its scores.
#[tokio::test]
async fn beam_search_equals_transformers() {
    let mut server = start().await;
    let exp = expected();
    let cases = exp["beam"].as_object().unwrap();
    assert!(cases.len() >= 5);
    for (name, case) in cases {
        let resp = server.client.generate(beam_request(case)).await.unwrap().into_inner();
        let want = case["sequences"].as_array().unwrap();
        assert_eq!(resp.sequences.len(), want.len(), "{name}");
        for (i, (got, w)) in resp.sequences.iter().zip(want).enumerate() {
            assert_eq!(token_ids(got), ids(&w["output_ids"]), "{name} #{i}");
            assert!(
                (got.score - w["score"].as_f64().unwrap()).abs() < 1e-4,
                "{name} #{i}: score {} vs {}",
                got.score,
                w["score"]
            );
            let lp = w["logprob_sum"].as_f64().unwrap();
            assert!((got.logprob_sum - lp).abs() < 1e-4, "{name} #{i}: logprob_sum {} vs {lp}", got.logprob_sum);
            assert_eq!(got.index as usize, i);
        }
        // Streaming sends each returned sequence once, at the end.
        let mut stream = server.client.generate_stream(beam_request(case)).await.unwrap().into_inner();
        let mut msgs = Vec::new();
        while let Some(m) = stream.message().await.unwrap() {
            msgs.push(m);
        }
        assert_eq!(msgs.len(), want.len(), "{name}: one message per sequence");
        for (m, seq) in msgs.iter().zip(&resp.sequences) {
            assert_eq!((m.index, &m.text, m.finish_reason), (seq.index, &seq.text, seq.finish_reason));
        }
        assert!(msgs.last().unwrap().usage.is_some());
    }
}

/// Fewer returned sequences than beams: the best ones, and the call ends.
#[tokio::test]
async fn beam_search_returns_the_best_hypotheses_only() {
    let mut server = start().await;
    let exp = expected();
    let case = &exp["beam"]["beam5"];
    let mut req = beam_request(case);
    if let Some(pb::decoding::Method::BeamSearch(b)) = req.decoding.as_mut().unwrap().method.as_mut() {
        b.num_return_sequences = 2;
    }
    let resp = server.client.generate(req.clone()).await.unwrap().into_inner();
    assert_eq!(resp.sequences.len(), 2);
    for (got, w) in resp.sequences.iter().zip(case["sequences"].as_array().unwrap()) {
        assert_eq!(token_ids(got), ids(&w["output_ids"]));
    }
    let mut stream = server.client.generate_stream(req).await.unwrap().into_inner();
    let last = last_message(&mut stream).await;
    assert_eq!(last.index, 1);
    assert!(last.usage.is_some(), "the final message carries usage");
}

/// A beam request's rows are reordered in place without disturbing others.
#[tokio::test]
async fn beam_search_in_a_busy_batch_is_unchanged() {
    let mut server = start().await;
    let exp = expected();
    let case = &exp["beam"]["beam5_no_repeat2"];
    let alone = server.client.generate(beam_request(case)).await.unwrap().into_inner();
    let mut handles = Vec::new();
    for (k, name) in ["long", "short", "cjk", "emoji"].iter().enumerate() {
        let mut c = server.client.clone();
        let g = &exp["greedy"][name];
        let r = request(ids(&g["prompt_ids"]), 24);
        let want = ids(&g["output_ids"]);
        handles.push(tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(3 * k as u64)).await;
            let got = c.generate(r).await.unwrap().into_inner();
            assert_eq!(token_ids(&got.sequences[0]), want, "a greedy request beside a beam search changed");
        }));
    }
    let busy = server.client.generate(beam_request(case)).await.unwrap().into_inner();
    for h in handles {
        h.await.unwrap();
    }
    for (a, b) in alone.sequences.iter().zip(&busy.sequences) {
        assert_eq!(token_ids(a), token_ids(b));
    }
}
