//! Speculative decoding (prompt lookup) changes nothing but the speed:
//! greedy output equals transformers' on every parity fixture with it on,
//! sampled output is token for token the same for the same seed, concurrent
//! mixed requests are unchanged, streaming sends accepted runs in order, and
//! a chi-square test holds the sampled distribution at positions a
//! verification step chose (penalties on) to a full recompute's.
mod common;

use std::collections::HashMap;

use batchgen::decoding::logits::{self, History, Processors, Warpers};
use batchgen::graph::KvDtype;
use batchgen::pb::{self, SpeculationMode};
use common::{case_request, expected, ids, request, start_with};
use tonic::Code;

fn with_spec(mut req: pb::GenerateRequest, mode: SpeculationMode, tokens: u32) -> pb::GenerateRequest {
    req.decoding.get_or_insert_with(Default::default).speculation = Some(pb::Speculation { mode: mode as i32, tokens });
    req
}

fn on(req: pb::GenerateRequest) -> pb::GenerateRequest {
    with_spec(req, SpeculationMode::On, 8)
}

fn off(req: pb::GenerateRequest) -> pb::GenerateRequest {
    with_spec(req, SpeculationMode::Off, 0)
}

/// (steps that checked proposals, tokens proposed, tokens accepted) so far.
fn counts(server: &common::TestServer) -> (u64, u64, u64) {
    let l = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    server.state.engine.workers().iter().fold((0, 0, 0), |(s, p, a), w| {
        (s + l(&w.stats.spec_steps), p + l(&w.stats.spec_proposed), a + l(&w.stats.spec_accepted))
    })
}

fn args(kv: KvDtype) -> batchgen::config::ServeArgs {
    let mut args = common::serve_args();
    args.model.kv_dtype = kv;
    // Speculate wherever a proposal exists: the point is that it changes nothing.
    args.spec.spec_adaptive = false;
    args.spec.spec_tokens = 8;
    args.limits.max_queue = 256;
    args
}

/// The KV layouts to test: float32 (GroupQueryAttention, which checks
/// proposals of a row running alone) and float16 (our kernel, which checks
/// them beside other rows); the exported graph serves float32 without
/// speculation.
fn layouts() -> Vec<KvDtype> {
    if common::built() { vec![KvDtype::Fp32, KvDtype::Fp16] } else { vec![KvDtype::Fp32] }
}

fn tokens(seq: &pb::Sequence) -> Vec<u32> {
    seq.tokens.iter().map(|t| t.id).collect()
}

fn same_sequence(a: &pb::Sequence, b: &pb::Sequence, what: &str) {
    assert_eq!(tokens(a), tokens(b), "{what}: token ids");
    assert_eq!(a.text, b.text, "{what}: text");
    assert_eq!(a.finish_reason, b.finish_reason, "{what}: finish reason");
    for (x, y) in a.tokens.iter().zip(&b.tokens) {
        assert!((x.logprob - y.logprob).abs() < 1e-4, "{what}: logprob {} vs {}", x.logprob, y.logprob);
    }
}

#[tokio::test]
async fn greedy_with_speculation_equals_transformers_on_every_parity_fixture() {
    for kv in layouts() {
        let mut server = start_with(args(kv)).await;
        let exp = expected();
        let before = counts(&server);
        for (name, case) in exp["greedy"].as_object().unwrap() {
            let want = ids(&case["output_ids"]);
            let plain = server.sequence(off(case_request(case))).await;
            let fast = server.sequence(on(case_request(case))).await;
            if kv == KvDtype::Fp32 {
                assert_eq!(tokens(&plain), want, "{name}: transformers' tokens without speculation");
            }
            same_sequence(&fast, &plain, &format!("{kv:?} {name}"));
        }
        let (steps, proposed, accepted) = counts(&server);
        eprintln!(
            "{kv:?}: {} steps checked {} proposed tokens, {} accepted",
            steps - before.0,
            proposed - before.1,
            accepted - before.2
        );
        if common::built() {
            // The fixtures' repetitive outputs are what prompt lookup predicts.
            assert!(accepted - before.2 >= 10, "{kv:?}: only {} proposals accepted", accepted - before.2);
            assert!(proposed > accepted, "{kv:?}: no proposal was ever rejected, so rejection went untested");
        } else {
            assert_eq!(steps, before.0, "the exported graph cannot check proposals");
        }
    }
}

/// A mix of what clients send: greedy fixtures with their processors,
/// sampling with penalties and num_samples, stop sequences, short and odd
/// lengths.
fn mixed_requests() -> Vec<pb::GenerateRequest> {
    let exp = expected();
    let greedy: Vec<&serde_json::Value> = exp["greedy"].as_object().unwrap().values().collect();
    (0..16u32)
        .map(|i| {
            let case = greedy[i as usize % greedy.len()];
            let mut req = case_request(case);
            let stop = req.stopping.as_mut().unwrap();
            stop.max_new_tokens = [24, 7, 13, 31][i as usize % 4];
            stop.min_new_tokens = 0;
            stop.ignore_eos = i % 3 == 0;
            if i % 5 == 0 {
                // The text of a repeated stretch of "short"'s greedy output.
                stop.stop_sequences = vec![" the".into()];
            }
            if i % 2 == 1 {
                let d = req.decoding.as_mut().unwrap();
                d.method = Some(pb::decoding::Method::Sampling(pb::Sampling {
                    temperature: [1.0, 0.7, 1.3][i as usize % 3],
                    top_k: [0, 20, 3][i as usize % 3],
                    top_p: if i % 4 == 1 { 0.9 } else { 0.0 },
                    seed: Some(7000 + u64::from(i)),
                    num_samples: 1 + i % 3,
                    ..Default::default()
                }));
                d.presence_penalty = 0.4;
                d.frequency_penalty = 0.2;
                req.top_logprobs = 2;
            }
            req
        })
        .collect()
}

async fn run_all(server: &common::TestServer, requests: Vec<pb::GenerateRequest>) -> Vec<pb::GenerateResponse> {
    let handles: Vec<_> = requests
        .into_iter()
        .map(|r| {
            let mut c = server.client.clone();
            tokio::spawn(async move { c.generate(r).await.unwrap().into_inner() })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn sixteen_concurrent_mixed_requests_are_unchanged_and_seeds_reproduce() {
    for kv in layouts() {
        let server = start_with(args(kv)).await;
        let plain = run_all(&server, mixed_requests().into_iter().map(off).collect()).await;
        let before = counts(&server);
        let fast = run_all(&server, mixed_requests().into_iter().map(on).collect()).await;
        let again = run_all(&server, mixed_requests().into_iter().map(on).collect()).await;
        let (_, _, accepted) = counts(&server);
        for (i, ((p, f), a)) in plain.iter().zip(&fast).zip(&again).enumerate() {
            assert_eq!(p.sequences.len(), f.sequences.len());
            for (j, ((ps, fs), aseq)) in p.sequences.iter().zip(&f.sequences).zip(&a.sequences).enumerate() {
                same_sequence(fs, ps, &format!("{kv:?} request {i} sequence {j}"));
                same_sequence(aseq, fs, &format!("{kv:?} request {i} sequence {j}, run again"));
                for (x, y) in fs.tokens.iter().zip(&ps.tokens) {
                    let (tx, ty): (Vec<u32>, Vec<u32>) =
                        (x.top_logprobs.iter().map(|t| t.id).collect(), y.top_logprobs.iter().map(|t| t.id).collect());
                    assert_eq!(tx, ty, "{kv:?} request {i}: top logprobs");
                }
            }
        }
        // GroupQueryAttention checks a row's proposals only while it runs
        // alone; our kernel beside the others.
        if kv == KvDtype::Fp16 {
            assert!(accepted > before.2, "{kv:?}: no proposal was accepted under load");
        }
    }
}

#[tokio::test]
async fn streaming_sends_each_accepted_run_as_tokens_in_order() {
    for kv in layouts() {
        let mut server = start_with(args(kv)).await;
        let exp = expected();
        for name in ["short", "emoji", "short_no_repeat_ngram"] {
            let case = &exp["greedy"][name];
            let unary = server.sequence(off(case_request(case))).await;
            let mut stream = server.client.generate_stream(on(case_request(case))).await.unwrap().into_inner();
            let (mut ids, mut text, mut finish) = (Vec::new(), String::new(), 0);
            while let Some(m) = stream.message().await.unwrap() {
                assert_eq!(m.index, 0);
                ids.extend(m.tokens.iter().map(|t| t.id));
                text.push_str(&m.text);
                if m.finish_reason != 0 {
                    finish = m.finish_reason;
                }
            }
            assert_eq!(ids, tokens(&unary), "{kv:?} {name}: streamed tokens");
            assert_eq!(text, unary.text, "{kv:?} {name}: streamed text");
            assert_eq!(finish, unary.finish_reason, "{kv:?} {name}");
        }
    }
}

#[tokio::test]
async fn lengths_and_stop_sequences_cut_inside_an_accepted_run() {
    let kv = *layouts().last().unwrap();
    let mut server = start_with(args(kv)).await;
    let exp = expected();
    let case = &exp["greedy"]["short"];
    let full = server.sequence(off(case_request(case))).await;
    for max in 1..=20 {
        let mut req = case_request(case);
        req.stopping.as_mut().unwrap().max_new_tokens = max;
        let plain = server.sequence(off(req.clone())).await;
        let fast = server.sequence(on(req)).await;
        same_sequence(&fast, &plain, &format!("max_new_tokens {max}"));
        assert_eq!(fast.tokens.len(), (max as usize).min(full.tokens.len()));
    }
    // Stop sequences taken from the output's own text, so they match inside
    // a stretch prompt lookup predicts.
    let pieces: Vec<String> = full.tokens.iter().map(|t| t.text.clone()).collect();
    for at in [7, 11, 13, 15] {
        let stop = pieces[at - 1..=at].concat();
        if stop.trim().is_empty() {
            continue;
        }
        for include in [false, true] {
            let mut req = case_request(case);
            let s = req.stopping.as_mut().unwrap();
            s.stop_sequences = vec![stop.clone()];
            s.include_stop_sequence = include;
            let plain = server.sequence(off(req.clone())).await;
            let fast = server.sequence(on(req)).await;
            same_sequence(&fast, &plain, &format!("stop {stop:?}"));
            assert_eq!(plain.finish_reason, pb::FinishReason::StopSequence as i32, "{stop:?}");
        }
    }
}

/// The distribution a step-by-step decode draws from after `prefix`: the
/// fixture model by a full recompute, then the request's processors and
/// warpers (the ones `warped_distributions_equal_transformers` checks).
fn distribution(prompt: &[u32], prefix: &[u32], processors: &Processors, warpers: &Warpers) -> HashMap<u32, f64> {
    let all: Vec<u32> = prompt.iter().chain(prefix).copied().collect();
    let tokens: Vec<i64> = all.iter().map(|&t| i64::from(t)).collect();
    let mut scores = common::full_recompute_logits(&mut common::fixture_session(), &tokens);
    let mut history = History::new(prompt);
    for &t in prefix {
        history.push(t);
    }
    processors.apply(&mut scores, &history, &[]);
    logits::distribution(&scores, warpers).into_iter().map(|(id, p)| (id, f64::from(p))).collect()
}

/// Samples of 3 tokens after a prompt that repeats itself (so prompt lookup
/// proposes), with logit bias steering the model toward the repeated tokens
/// (so proposals are often accepted, and often not) and repetition and
/// presence penalties on: at each position, the tokens of the samples that
/// share a prefix pass a chi-square test against that prefix's distribution.
#[tokio::test]
async fn samples_checked_by_verification_follow_the_step_by_step_distribution() {
    let kv = *layouts().last().unwrap();
    let server = start_with(args(kv)).await;
    let (x, y, z) = (464u32, 2068u32, 7586u32);
    let prompt = vec![x, y, z, x, y, z, x, y];
    let bias: HashMap<u32, f32> = [(x, 67.0), (y, 60.0), (z, 60.0)].into();
    let warpers = Warpers { temperature: 2.0, top_k: 4, top_p: 0.0, min_p: 0.0, typical_p: 0.0 };
    let processors = Processors {
        logit_bias: { bias.iter().map(|(&k, &v)| (k, v)).collect::<Vec<_>>() },
        repetition_penalty: 1.3,
        presence_penalty: 0.5,
        frequency_penalty: 0.0,
        no_repeat_ngram_size: 0,
    };
    let mut processors = processors;
    processors.logit_bias.sort_by_key(|b| b.0);
    let (requests, per) = (200u64, 16u32);
    let before = counts(&server);
    let reqs: Vec<pb::GenerateRequest> = (0..requests)
        .map(|r| {
            let mut req = request(prompt.clone(), 3);
            req.stopping.as_mut().unwrap().ignore_eos = true;
            req.decoding = Some(pb::Decoding {
                method: Some(pb::decoding::Method::Sampling(pb::Sampling {
                    temperature: warpers.temperature,
                    top_k: warpers.top_k as u32,
                    seed: Some(50_000 + r * u64::from(per)),
                    num_samples: per,
                    ..Default::default()
                })),
                repetition_penalty: processors.repetition_penalty,
                presence_penalty: processors.presence_penalty,
                logit_bias: bias.clone(),
                ..Default::default()
            });
            on(req)
        })
        .collect();
    let samples: Vec<Vec<u32>> =
        run_all(&server, reqs).await.iter().flat_map(|r| r.sequences.iter().map(tokens)).collect();
    let (_, proposed, accepted) = counts(&server);
    eprintln!("{} samples; proposals {} accepted of {}", samples.len(), accepted - before.2, proposed - before.1);
    if common::built() {
        assert!(accepted - before.2 > 300, "too few accepted proposals to test verification");
        assert!(proposed - before.1 - (accepted - before.2) > 300, "too few rejected proposals to test verification");
    }
    // Position 0 comes from the prefill. After z, prompt lookup proposes x:
    // position 1 is chosen by a verification (x kept or replaced), and after
    // [z, x] position 2 is the token the same step chose from the logits of
    // the accepted x.
    let prefixes: [&[u32]; 3] = [&[], &[z], &[z, x]];
    for (position, prefix) in prefixes.into_iter().enumerate() {
        let chosen: Vec<u32> = samples.iter().filter(|s| s[..position] == *prefix).map(|s| s[position]).collect();
        let dist = distribution(&prompt, prefix, &processors, &warpers);
        let n = chosen.len() as f64;
        assert!(n >= 400.0, "position {position}: only {n} samples share the prefix {prefix:?}");
        let mut observed: HashMap<u32, f64> = HashMap::new();
        for t in &chosen {
            assert!(dist.contains_key(t), "position {position}: sampled {t}, outside the support");
            *observed.entry(*t).or_default() += 1.0;
        }
        let (chi2, buckets) = common::chi_square(&observed, dist.iter().map(|(&id, &p)| (id, p)), n);
        assert!(buckets >= 3, "position {position}: {buckets} buckets");
        let limit = common::chi2_critical_001((buckets - 1) as f64);
        eprintln!("position {position}: prefix {prefix:?}, {n} samples, chi2 {chi2:.2} < {limit:.2}");
        assert!(chi2 < limit, "position {position}: chi2 {chi2:.2} >= {limit:.2}; {observed:?} vs {dist:?}");
    }
}

#[tokio::test]
async fn bad_speculation_settings_are_refused_naming_the_field() {
    let server = start_with(args(KvDtype::Fp32)).await;
    let beams = |mut r: pb::GenerateRequest| {
        r.decoding.get_or_insert_with(Default::default).method =
            Some(pb::decoding::Method::BeamSearch(pb::BeamSearch { num_beams: 2, ..Default::default() }));
        r
    };
    let cases = [
        (with_spec(request(vec![1, 2], 4), SpeculationMode::On, 17), "decoding.speculation.tokens", "at most 16"),
        (with_spec(request(vec![1, 2], 4), SpeculationMode::Off, 4), "decoding.speculation.tokens", "only with"),
        (with_spec(request(vec![1, 2], 4), SpeculationMode::Unspecified, 4), "decoding.speculation.tokens", "only"),
        (beams(on(request(vec![1, 2], 4))), "decoding.speculation.mode", "beam search"),
    ];
    for (req, field, says) in cases {
        let e = server.client.clone().generate(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().contains(field) && e.message().contains(says), "{}", e.message());
    }
    let mut bad = request(vec![1, 2], 4);
    bad.decoding =
        Some(pb::Decoding { speculation: Some(pb::Speculation { mode: 9, tokens: 0 }), ..Default::default() });
    let e = server.client.clone().generate(bad).await.unwrap_err();
    assert!(e.message().contains("decoding.speculation.mode") && e.message().contains('9'), "{}", e.message());
    // Beam search with the server's default (on) or off: it runs, without speculating.
    let before = counts(&server);
    let ok = server.client.clone().generate(beams(request(vec![1, 2, 1, 2, 1, 2], 6))).await.unwrap();
    assert!(!ok.into_inner().sequences.is_empty());
    assert_eq!(counts(&server).0, before.0, "beam search speculated");
    let info = server.client.clone().model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.spec_tokens, if common::built() { 8 } else { 0 });
}
