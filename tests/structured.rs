//! Structured outputs end to end over gRPC, against the random-weight fixture
//! (nothing but the constraint makes its output parse): every completed
//! output of every schema of the corpus validates under an independent
//! validator (the `jsonschema` crate, formats asserted), regexes match under
//! the `regex` crate, choices are one of the choices, a grammar's outputs
//! are checked by hand, a constraint that admits everything changes nothing,
//! the reported log-probabilities are the constrained distribution of a full
//! recompute, and bad constraints are refused by field.
mod common;

use batchgen::pb::{self, decoding::Constraint};
use futures_util::future::join_all;
use tonic_types::StatusExt;

const EOS: u32 = 50256;

fn constrained(
    prompt: &str,
    constraint: Constraint,
    method: Option<pb::decoding::Method>,
    max_new: u32,
) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: prompt.into(),
        decoding: Some(pb::Decoding { method, constraint: Some(constraint), ..Default::default() }),
        stopping: Some(pb::Stopping { max_new_tokens: max_new, ..Default::default() }),
        ..Default::default()
    }
}

fn methods() -> Vec<(&'static str, Option<pb::decoding::Method>)> {
    vec![
        ("greedy", None),
        (
            "sampling",
            Some(pb::decoding::Method::Sampling(pb::Sampling {
                temperature: 1.0,
                top_k: 50,
                top_p: 0.95,
                seed: Some(7),
                num_samples: 3,
                ..Default::default()
            })),
        ),
        (
            "beams",
            Some(pb::decoding::Method::BeamSearch(pb::BeamSearch {
                num_beams: 3,
                num_return_sequences: 2,
                ..Default::default()
            })),
        ),
    ]
}

fn finish(s: &pb::Sequence) -> pb::FinishReason {
    pb::FinishReason::try_from(s.finish_reason).unwrap()
}

/// Runs `requests`, 32 at a time (within the test server's queue); every
/// one must succeed.
async fn run_all(server: &common::TestServer, requests: Vec<pb::GenerateRequest>) -> Vec<pb::GenerateResponse> {
    let mut out = Vec::with_capacity(requests.len());
    for chunk in requests.chunks(32) {
        let calls = chunk.iter().cloned().map(|r| {
            let mut client = server.client.clone();
            async move { client.generate(r).await.map(|r| r.into_inner()) }
        });
        out.extend(join_all(calls).await.into_iter().map(|r| r.expect("a constrained request succeeds")));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_schema_of_the_corpus_holds_under_every_method() {
    let server = common::start().await;
    let corpus: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(include_str!("fixtures/structured/schemas.json")).unwrap();
    assert!(corpus.len() >= 20);
    let mut requests = Vec::new();
    let mut labels = Vec::new();
    for (name, schema) in &corpus {
        for (method, m) in methods() {
            requests.push(constrained(
                "Here is the record as JSON:",
                Constraint::JsonSchema(schema.to_string()),
                m,
                120,
            ));
            labels.push((name.clone(), method));
        }
    }
    let answers = run_all(&server, requests).await;
    let (mut completed, mut total) = (0, 0);
    let mut completed_schemas = std::collections::BTreeSet::new();
    for ((name, method), answer) in labels.iter().zip(&answers) {
        let validator = jsonschema::options().should_validate_formats(true).build(&corpus[name]).unwrap();
        assert!(!answer.sequences.is_empty(), "{name}/{method}: no sequence");
        for s in &answer.sequences {
            total += 1;
            // A sequence ends with EOS (the language ended) or at its length.
            match finish(s) {
                pb::FinishReason::Eos => {
                    assert_eq!(s.tokens.last().map(|t| t.id), Some(EOS), "{name}/{method}");
                    let value: serde_json::Value = serde_json::from_str(&s.text)
                        .unwrap_or_else(|e| panic!("{name}/{method}: {:?} is not JSON: {e}", s.text));
                    let errors: Vec<String> = validator.iter_errors(&value).map(|e| e.to_string()).collect();
                    assert!(errors.is_empty(), "{name}/{method}: {:?} does not validate: {errors:?}", s.text);
                    completed += 1;
                    completed_schemas.insert(name.clone());
                }
                pb::FinishReason::Length => {
                    assert_eq!(s.tokens.len(), 120, "{name}/{method}");
                    assert!(
                        serde_json::from_str::<serde_json::Value>(&s.text).is_err()
                            || s.text.ends_with(|c: char| c.is_ascii_digit()),
                        "{name}/{method}: cut at the length but already whole: {:?}",
                        s.text
                    );
                }
                other => panic!("{name}/{method}: finished {other:?}"),
            }
        }
    }
    let never: Vec<&String> = corpus.keys().filter(|k| !completed_schemas.contains(*k)).collect();
    eprintln!("{completed} of {total} sequences completed; never completed: {never:?}");
    // The random model wanders inside strings and numbers that have no
    // bound (any of ~50k tokens may continue a string, one closes it), so
    // not every sequence ends within its 120 tokens; every one that does
    // is valid, and enough do for this to test something.
    assert!(completed * 5 >= total * 2, "only {completed} of {total} completed");
    assert!(completed_schemas.len() * 2 >= corpus.len(), "completed schemas: {completed_schemas:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regexes_choices_and_grammars_hold() {
    let server = common::start().await;
    let regexes = [
        r"[0-9]{3}-[0-9]{4}",
        r"(yes|no|maybe)",
        r"[a-z]+@[a-z]+\.(com|org)",
        r"\d{4}-\d{2}-\d{2}",
        r"(ab|cd)+e?",
        r"[A-Z][a-z ]{0,20}\.",
    ];
    let mut requests = Vec::new();
    for rx in regexes {
        for (_, m) in methods() {
            requests.push(constrained("The value is", Constraint::Regex(rx.into()), m, 40));
        }
    }
    let answers = run_all(&server, requests).await;
    for (i, answer) in answers.iter().enumerate() {
        let rx = regexes[i / 3];
        let whole = regex::Regex::new(&format!("^(?:{rx})$")).unwrap();
        for s in &answer.sequences {
            match finish(s) {
                pb::FinishReason::Eos => assert!(whole.is_match(&s.text), "{rx}: {:?}", s.text),
                pb::FinishReason::Length => assert_eq!(s.tokens.len(), 40, "{rx}"),
                other => panic!("{rx}: {other:?}"),
            }
        }
    }

    let choices = vec!["positive".to_string(), "negative".into(), "neutral".into(), "ça dépend 🤷".into()];
    let mut requests = Vec::new();
    for (_, m) in methods() {
        let c = Constraint::Choice(pb::Choices { choices: choices.clone() });
        requests.push(constrained("Sentiment:", c, m, 20));
    }
    for answer in run_all(&server, requests).await {
        for s in &answer.sequences {
            assert_eq!(finish(s), pb::FinishReason::Eos);
            assert!(choices.contains(&s.text), "{:?}", s.text);
        }
    }

    // Balanced brackets around an x: not a regular language.
    let lark = "start: item\nitem: \"x\" | \"[\" item \"]\" | \"(\" item \")\"";
    let mut requests = Vec::new();
    for (_, m) in methods() {
        requests.push(constrained("Nest:", Constraint::Grammar(lark.into()), m, 30));
    }
    for answer in run_all(&server, requests).await {
        for s in &answer.sequences {
            if finish(s) == pb::FinishReason::Eos {
                assert!(balanced(&s.text), "{:?}", s.text);
            } else {
                assert_eq!(s.tokens.len(), 30);
            }
        }
    }
}

/// `x` inside matching brackets, checked without the grammar.
fn balanced(text: &str) -> bool {
    let mut open = Vec::new();
    let mut chars = text.chars();
    for c in chars.by_ref() {
        match c {
            '[' | '(' => open.push(c),
            'x' => break,
            _ => return false,
        }
    }
    for c in chars {
        match (open.pop(), c) {
            (Some('['), ']') | (Some('('), ')') => {}
            _ => return false,
        }
    }
    open.is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_constraint_that_admits_everything_changes_nothing() {
    let mut server = common::start().await;
    let everything = "%llguidance {\"allow_invalid_utf8\": true}\nstart: /(?s-u:.*)/";
    for prompt in ["Once upon a time", "The numbers are 1, 2,", "日本語"] {
        let mut plain = common::request(vec![], 40);
        plain.prompt = prompt.into();
        plain.top_logprobs = 3;
        let mut any = plain.clone();
        any.decoding =
            Some(pb::Decoding { constraint: Some(Constraint::Grammar(everything.into())), ..Default::default() });
        let (a, b) = (server.sequence(plain).await, server.sequence(any).await);
        let ids = |s: &pb::Sequence| s.tokens.iter().map(|t| t.id).collect::<Vec<_>>();
        assert_eq!(ids(&a), ids(&b), "{prompt}");
        assert_eq!(a.text, b.text);
        for (x, y) in a.tokens.iter().zip(&b.tokens) {
            assert!((x.logprob - y.logprob).abs() < 1e-4, "{prompt}: {} vs {}", x.logprob, y.logprob);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_are_of_the_constrained_distribution_of_a_full_recompute() {
    let mut server = common::start().await;
    let tok = server.state.tokenizer.clone();
    let choices = ["red", " green", "blue"];
    let mut req = constrained(
        "My favourite colour is",
        Constraint::Choice(pb::Choices { choices: choices.iter().map(|c| c.to_string()).collect() }),
        None,
        10,
    );
    req.top_logprobs = 5;
    let s = server.sequence(req).await;
    assert!(choices.contains(&s.text.as_str()), "{:?}", s.text);
    // What may come first: every token whose text begins one of the choices
    // ("r", "re", "red", " g", ...), found by decoding the whole vocabulary.
    let allowed: Vec<u32> = (0..EOS)
        .filter(|&id| {
            let text = tok.decode_with(&[id], false).unwrap();
            !text.is_empty() && choices.iter().any(|c| c.starts_with(&text))
        })
        .collect();
    assert!(allowed.len() > 3, "{allowed:?}");
    let prompt = tok.encode("My favourite colour is").unwrap();
    let mut session = common::fixture_session();
    let logits = common::full_recompute_logits(&mut session, &prompt.iter().map(|&i| i64::from(i)).collect::<Vec<_>>());
    let max = allowed.iter().map(|&id| f64::from(logits[id as usize])).fold(f64::NEG_INFINITY, f64::max);
    let lse = max + allowed.iter().map(|&id| (f64::from(logits[id as usize]) - max).exp()).sum::<f64>().ln();
    let want = |id: u32| f64::from(logits[id as usize]) - lse;
    let t0 = &s.tokens[0];
    assert!((f64::from(t0.logprob) - want(t0.id)).abs() < 1e-4, "{} vs {}", t0.logprob, want(t0.id));
    // Greedy: the most likely allowed token.
    let best = allowed.iter().copied().max_by(|&a, &b| logits[a as usize].total_cmp(&logits[b as usize])).unwrap();
    assert_eq!(t0.id, best);
    // The alternatives are allowed tokens, most likely first, each with its
    // constrained log-probability.
    assert_eq!(t0.top_logprobs.len(), 5);
    let mut ranked = allowed.clone();
    ranked.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    for (alt, &id) in t0.top_logprobs.iter().zip(&ranked) {
        assert_eq!(alt.id, id);
        assert!((f64::from(alt.logprob) - want(id)).abs() < 1e-4);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_language_ending_ends_the_sequence_whatever_else_is_asked() {
    let mut server = common::start().await;
    let mut req = constrained("Answer:", Constraint::Choice(pb::Choices { choices: vec!["ok".into()] }), None, 20);
    let stopping = req.stopping.as_mut().unwrap();
    stopping.min_new_tokens = 10;
    stopping.ignore_eos = true;
    let s = server.sequence(req).await;
    assert_eq!(s.text, "ok");
    assert_eq!(finish(&s), pb::FinishReason::Eos);
    // A stop sequence still cuts the text (then a prefix of the language).
    let mut req = constrained("Answer:", Constraint::Regex("abcabc".into()), None, 20);
    req.stopping.as_mut().unwrap().stop_sequences = vec!["ca".into()];
    let s = server.sequence(req).await;
    assert_eq!(s.text, "ab");
    assert_eq!(finish(&s), pb::FinishReason::StopSequence);
    // A length cut is a prefix.
    let s = server.sequence(constrained("Answer:", Constraint::Regex("(abc){50}".into()), None, 5)).await;
    assert_eq!(finish(&s), pb::FinishReason::Length);
    assert!("abc".repeat(50).starts_with(&s.text), "{:?}", s.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_sends_the_same_constrained_tokens() {
    let mut server = common::start().await;
    let schema = include_str!("fixtures/structured/schemas.json");
    let corpus: serde_json::Value = serde_json::from_str(schema).unwrap();
    let req = constrained("JSON:", Constraint::JsonSchema(corpus["invoice"].to_string()), None, 80);
    let whole = server.sequence(req.clone()).await;
    let mut stream = server.client.generate_stream(req).await.unwrap().into_inner();
    let mut text = String::new();
    let mut ids = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        text.push_str(&m.text);
        ids.extend(m.tokens.iter().map(|t| t.id));
    }
    assert_eq!(text, whole.text);
    assert_eq!(ids, whole.tokens.iter().map(|t| t.id).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_constraints_are_refused_naming_the_field() {
    let mut server = common::start().await;
    let cases: Vec<(Constraint, &str, &str)> = vec![
        (Constraint::JsonSchema("{not json".into()), "decoding.json_schema", "not JSON"),
        (Constraint::JsonSchema("[1]".into()), "decoding.json_schema", "JSON object"),
        (
            Constraint::JsonSchema(r#"{"type":"integer","minimum":5,"maximum":1}"#.into()),
            "decoding.json_schema",
            "minimum",
        ),
        (Constraint::JsonSchema(r#"{"type":"frobnicate"}"#.into()), "decoding.json_schema", "frobnicate"),
        (Constraint::Regex("(a".into()), "decoding.regex", "unclosed"),
        (Constraint::Regex(String::new()), "decoding.regex", "1 to 65536 bytes"),
        (Constraint::Regex("a".repeat(70000)), "decoding.regex", "got 70000"),
        (Constraint::Grammar("start: foo".into()), "decoding.grammar", "foo"),
        (Constraint::Choice(pb::Choices { choices: vec![] }), "decoding.choice", "1 to 1024 strings"),
        (Constraint::Choice(pb::Choices { choices: vec!["a".into(), String::new()] }), "decoding.choice", "[1]"),
        (Constraint::JsonObject(false), "decoding.json_object", "must be true"),
    ];
    for (c, field, words) in cases {
        let e = server.client.generate(constrained("x", c.clone(), None, 5)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{c:?}");
        assert!(e.message().contains(words), "{c:?}: {}", e.message());
        let v = e.get_details_bad_request().expect("field violations");
        assert_eq!(v.field_violations[0].field, field, "{c:?}");
    }
    // Still serving.
    let s = server.sequence(constrained("x", Constraint::Regex("[0-9]".into()), None, 5)).await;
    assert_eq!(finish(&s), pb::FinishReason::Eos);
    assert!(s.text.len() == 1 && s.text.as_bytes()[0].is_ascii_digit());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constrained_and_free_rows_share_a_batch_without_changing_each_other() {
    let mut server = common::start().await;
    let corpus: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(include_str!("fixtures/structured/schemas.json")).unwrap();
    let free = |i: usize| {
        let mut r = common::request(vec![], 24);
        r.prompt = format!("Story number {i}:");
        r
    };
    let alone: Vec<pb::Sequence> = {
        let mut out = Vec::new();
        for i in 0..4 {
            out.push(server.sequence(free(i)).await);
        }
        out
    };
    let schema_reqs: Vec<pb::GenerateRequest> = corpus
        .values()
        .take(12)
        .map(|s| constrained("JSON:", Constraint::JsonSchema(s.to_string()), None, 60))
        .collect();
    let schema_alone = run_all(&server, schema_reqs.clone()).await;
    let mut mixed: Vec<pb::GenerateRequest> = (0..4).map(free).collect();
    mixed.extend(schema_reqs);
    let together = run_all(&server, mixed).await;
    for i in 0..4 {
        assert_eq!(together[i].sequences[0].text, alone[i].text, "free request {i}");
    }
    for (a, b) in together[4..].iter().zip(&schema_alone) {
        assert_eq!(a.sequences[0].text, b.sequences[0].text);
    }
    // The cache saw these schemas before: hits now.
    let metrics = common::http_get(server.metrics_addr, "/metrics");
    assert!(common::metric(&metrics, "batchgen_constraint_cache_lookups_total", &[("result", "hit")]) >= 12.0);
    assert!(common::metric(&metrics, "batchgen_constraint_mask_seconds_count", &[]) > 0.0);
}

/// Sampling draws from the allowed tokens renormalised: the first token of
/// 400 seeded samples under a choice of four one-byte strings, against the
/// softmax (temperature 0.7) of a full recompute's logits over those four,
/// by a chi-square test (3 degrees of freedom, upper 0.1 % point 16.27).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_follow_the_renormalised_allowed_distribution() {
    let server = common::start().await;
    let tok = server.state.tokenizer.clone();
    let choices = ["a", "b", "c", "d"];
    let ids: Vec<u32> = choices.iter().map(|c| tok.encode(c).unwrap()[0]).collect();
    let prompt = "The letter is";
    let temperature = 0.7f64;
    let requests: Vec<pb::GenerateRequest> = (0..25)
        .map(|r| {
            let sampling = pb::Sampling {
                temperature: temperature as f32,
                seed: Some(1000 + 16 * r),
                num_samples: 16,
                ..Default::default()
            };
            let c = Constraint::Choice(pb::Choices { choices: choices.iter().map(|c| c.to_string()).collect() });
            constrained(prompt, c, Some(pb::decoding::Method::Sampling(sampling)), 4)
        })
        .collect();
    let mut observed = [0f64; 4];
    for answer in run_all(&server, requests).await {
        for s in &answer.sequences {
            let at = ids.iter().position(|&id| id == s.tokens[0].id).expect("an allowed first token");
            observed[at] += 1.0;
            assert_eq!(s.text, choices[at]);
        }
    }
    let mut session = common::fixture_session();
    let prompt_ids: Vec<i64> = tok.encode(prompt).unwrap().iter().map(|&i| i64::from(i)).collect();
    let logits = common::full_recompute_logits(&mut session, &prompt_ids);
    let scaled: Vec<f64> = ids.iter().map(|&id| f64::from(logits[id as usize]) / temperature).collect();
    let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = scaled.iter().map(|x| (x - max).exp()).sum();
    let total: f64 = observed.iter().sum();
    assert_eq!(total, 400.0);
    let chi2: f64 = scaled
        .iter()
        .zip(&observed)
        .map(|(x, o)| {
            let e = total * (x - max).exp() / z;
            (o - e) * (o - e) / e
        })
        .sum();
    let expected: Vec<f64> = scaled.iter().map(|x| (total * (x - max).exp() / z).round()).collect();
    eprintln!("observed {observed:?}, expected {expected:?}, chi2 {chi2:.2}");
    assert!(chi2 < 16.27, "chi2 {chi2:.1}: observed {observed:?}, expected {expected:?}");
}
