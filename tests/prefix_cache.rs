//! The prefix cache against a server without it: every output (greedy and
//! beam tokens, seeded samples, logprobs within 1e-4) equals the cache-off
//! server's for prompts that share nothing, less than a block, whole blocks,
//! the whole prompt, or are a prefix of a cached one; under concurrency; for
//! a conversation's next turn; after evictions. The cached token counts are
//! checked exactly, so a cache that silently stopped hitting fails too.
mod common;

use batchgen::config::{GraphChoice, KvLayoutChoice, ServeArgs, Switch};
use batchgen::pb::{self, GenerateRequest, GenerateResponse};
use common::{TestServer, assert_same, request, serve_args, start_with};

/// Tokens per block in these tests.
const BLOCK: usize = 4;

fn args(cache: Switch, mib: usize) -> ServeArgs {
    let mut a = serve_args();
    a.model.graph = GraphChoice::Auto;
    a.cache.prefix_cache = cache;
    a.cache.prefix_cache_mib = mib;
    a.cache.prefix_block_tokens = BLOCK as u16;
    a
}

/// `n` token ids from a seed (ordinary BPE ids, no special token).
fn tokens(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (seed.wrapping_mul(7919).wrapping_add(i.wrapping_mul(104_729)) % 50_000) + 100).collect()
}

fn greedy(prompt: Vec<u32>, n: u32) -> GenerateRequest {
    let mut r = request(prompt, n);
    r.stopping.as_mut().unwrap().ignore_eos = true;
    r.top_logprobs = 2;
    r
}

fn sampled(prompt: Vec<u32>, n: u32, seed: u64) -> GenerateRequest {
    let mut r = greedy(prompt, n);
    r.decoding = Some(pb::Decoding {
        method: Some(pb::decoding::Method::Sampling(pb::Sampling {
            temperature: 0.9,
            top_k: 40,
            top_p: 0.95,
            seed: Some(seed),
            num_samples: 2,
            ..Default::default()
        })),
        repetition_penalty: 1.2,
        ..Default::default()
    });
    r
}

fn beams(prompt: Vec<u32>, n: u32) -> GenerateRequest {
    let mut r = greedy(prompt, n);
    r.decoding = Some(pb::Decoding {
        method: Some(pb::decoding::Method::BeamSearch(pb::BeamSearch {
            num_beams: 3,
            num_return_sequences: 2,
            ..Default::default()
        })),
        no_repeat_ngram_size: 3,
        ..Default::default()
    });
    r
}

/// A server without the cache and one with it (`mib` of budget), to compare.
async fn off_and_on(mib: usize) -> (TestServer, TestServer) {
    (start_with(args(Switch::Off, 64)).await, start_with(args(Switch::On, mib)).await)
}

async fn generate(server: &TestServer, r: &GenerateRequest) -> GenerateResponse {
    server.client.clone().generate(r.clone()).await.unwrap().into_inner()
}

fn cached(r: &GenerateResponse) -> usize {
    r.usage.as_ref().unwrap().cached_prompt_tokens as usize
}

/// Every decoding method for one prompt.
fn methods(prompt: &[u32], seed: u64) -> Vec<(&'static str, GenerateRequest)> {
    vec![
        ("greedy", greedy(prompt.to_vec(), 12)),
        ("sampled", sampled(prompt.to_vec(), 10, seed)),
        ("beams", beams(prompt.to_vec(), 8)),
    ]
}

#[tokio::test]
async fn outputs_equal_the_cache_off_server_for_every_kind_of_overlap() {
    if !common::built() {
        return;
    }
    let (off, on) = off_and_on(64).await;
    let base = tokens(1, 40);
    let cat = |a: &[u32], b: &[u32]| [a, b].concat();
    // (case, prompt, prompt tokens the cache must serve when sent after `base`).
    let cases: Vec<(&str, Vec<u32>, usize)> = vec![
        ("the first prompt", base.clone(), 0),
        ("nothing shared", tokens(2, 33), 0),
        ("less than one block shared", cat(&base[..3], &tokens(3, 20)), 0),
        ("several whole blocks shared", cat(&base[..22], &tokens(4, 9)), 20),
        ("the whole prompt again", base.clone(), 39),
        ("a block-aligned prefix of a cached prompt", base[..24].to_vec(), 23),
        ("an unaligned prefix of a cached prompt", base[..26].to_vec(), 24),
        ("a cached prompt continued", cat(&base, &tokens(5, 10)), 40),
        ("a one-token prompt", base[..1].to_vec(), 0),
    ];
    for (case, prompt, want_cached) in &cases {
        for (method, r) in methods(prompt, 7) {
            let (a, b) = (generate(&on, &r).await, generate(&off, &r).await);
            let what = format!("{case} / {method}");
            assert_same(&a, &b, &what);
            assert_eq!(cached(&b), 0, "{what}: the cache-off server cached tokens");
            // The first method of each case may miss; the others hit at
            // least what the first stored.
            if method == "greedy" {
                assert_eq!(cached(&a), *want_cached, "{what}: cached prompt tokens");
            } else {
                let whole = (prompt.len() - 1).min(prompt.len() / BLOCK * BLOCK);
                assert_eq!(cached(&a), whole, "{what}: its own prompt is cached by now");
            }
        }
    }
    // All of them again at once: rows join while others copy the same blocks.
    let mut all = Vec::new();
    for (case, prompt, _) in &cases {
        for (method, r) in methods(prompt, 11) {
            all.push((format!("{case} / {method} (concurrent)"), r));
        }
    }
    let answers = futures_util::future::join_all(all.iter().map(|(_, r)| {
        let (mut a, mut b) = (on.client.clone(), off.client.clone());
        let r = r.clone();
        async move { (a.generate(r.clone()).await.unwrap().into_inner(), b.generate(r).await.unwrap().into_inner()) }
    }))
    .await;
    for ((what, _), (a, b)) in all.iter().zip(&answers) {
        assert_same(a, b, what);
    }
}

/// Requests sharing a 32-token beginning arrive together at an idle server:
/// the first computes it once and the others copy it (they wait for its
/// blocks instead of computing them beside it).
#[tokio::test]
async fn concurrent_requests_with_one_prefix_compute_it_once() {
    if !common::built() {
        return;
    }
    let (off, on) = off_and_on(64).await;
    let shared = tokens(20, 32);
    let reqs: Vec<GenerateRequest> =
        (0..12).map(|i| greedy([shared.as_slice(), &tokens(100 + i, 5)].concat(), 10)).collect();
    let run = |server: &TestServer| {
        futures_util::future::join_all(reqs.iter().map(|r| {
            let mut c = server.client.clone();
            let r = r.clone();
            async move { c.generate(r).await.unwrap().into_inner() }
        }))
    };
    let (a, b) = (run(&on).await, run(&off).await);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_same(x, y, &format!("request {i}"));
    }
    let mut hits: Vec<usize> = a.iter().map(cached).collect();
    hits.sort();
    assert_eq!(hits, [vec![0], vec![32; 11]].concat(), "one request computes the shared blocks, the others copy them");
}

/// A conversation: each turn's prompt is the last prompt, its answer and a
/// new part; the answer's keys and values (computed while decoding) serve
/// the next turn.
#[tokio::test]
async fn a_conversation_reuses_its_previous_turns_and_answers() {
    if !common::built() {
        return;
    }
    let (off, on) = off_and_on(64).await;
    let mut prompt = tokens(30, 13);
    for turn in 0..4 {
        let r = greedy(prompt.clone(), 9);
        let (a, b) = (generate(&on, &r).await, generate(&off, &r).await);
        assert_same(&a, &b, &format!("turn {turn}"));
        if turn == 0 {
            assert_eq!(cached(&a), 0);
        } else {
            assert!(cached(&a) > 0, "turn {turn} found nothing of the conversation so far");
        }
        let answer: Vec<u32> = a.sequences[0].tokens.iter().map(|t| t.id).collect();
        // What the last turn left in the cache: its prompt and all but the
        // last answer token (never fed back), in whole blocks.
        let held = (prompt.len() + answer.len() - 1) / BLOCK * BLOCK;
        prompt.extend(answer);
        prompt.extend(tokens(40 + turn, 6));
        let next = generate(&on, &greedy(prompt.clone(), 1)).await;
        assert_eq!(cached(&next), held, "turn {turn}: the next prompt reuses prompt and answer");
    }
}

/// A cache of one MiB (512 blocks of the fixture) under prompts of 6,000
/// tokens in all: blocks are evicted, and every output still equals the
/// cache-off server's, for prompts evicted and prompts still held.
#[tokio::test]
async fn outputs_stay_exact_after_evictions() {
    if !common::built() {
        return;
    }
    let (off, on) = off_and_on(1).await;
    let prompts: Vec<Vec<u32>> = (0..30).map(|i| tokens(200 + i, 200)).collect();
    for p in &prompts {
        generate(&on, &greedy(p.clone(), 2)).await;
    }
    let addr = on.metrics_addr;
    let text = tokio::task::spawn_blocking(move || common::http_get(addr, "/metrics")).await.unwrap();
    assert!(common::metric(&text, "batchgen_prefix_cache_evictions_total", &[]) > 0.0, "nothing was evicted");
    // The last prompt's blocks are the most recent: all there. The first
    // prompt's went first.
    let last = greedy(prompts[29].clone(), 12);
    let a = generate(&on, &last).await;
    assert_eq!(cached(&a), 199);
    assert_same(&a, &generate(&off, &last).await, "a prompt still held");
    let first = greedy(prompts[0].clone(), 12);
    let a = generate(&on, &first).await;
    assert_eq!(cached(&a), 0, "the least recently used prompt was evicted");
    assert_same(&a, &generate(&off, &first).await, "an evicted prompt");
}

/// The cache copies bytes, whatever the cache's element type: a float16
/// cache (batchgen's own attention kernel) is as exact against the same
/// server without the cache as float32. (int8 weights are served with the
/// cache too, but not compared here: their activations are quantized with one
/// scale per run, so any output depends on how its prompt was split into
/// runs, chunked prefill without the cache included.)
#[tokio::test]
async fn a_float16_cache_is_exact_too() {
    if !common::built() {
        return;
    }
    let low = |cache| {
        let mut a = args(cache, 64);
        a.model.kv_dtype = batchgen::graph::KvDtype::Fp16;
        a
    };
    let off = start_with(low(Switch::Off)).await;
    let on = start_with(low(Switch::On)).await;
    let base = tokens(50, 30);
    for (case, prompt, want) in [
        ("first", base.clone(), 0),
        ("again", base.clone(), 28),
        ("prefix", base[..18].to_vec(), 16),
        ("continued", [base.as_slice(), &tokens(51, 7)].concat(), 28),
    ] {
        for (method, r) in methods(&prompt, 3) {
            let (a, b) = (generate(&on, &r).await, generate(&off, &r).await);
            assert_same(&a, &b, &format!("{case} / {method}"));
            if method == "greedy" {
                assert_eq!(cached(&a), want, "{case}");
            }
        }
    }
}

/// What start-up refuses, with a message that says what to do.
#[tokio::test]
async fn start_up_refuses_a_cache_it_cannot_have() {
    let mut a = args(Switch::On, 64);
    (a.model.graph, a.model.kv_layout) = (GraphChoice::Exported, KvLayoutChoice::Slots);
    let e = tokio::task::spawn_blocking(move || batchgen::app::load(&a).err().unwrap().to_string()).await.unwrap();
    assert!(e.contains("--prefix-cache on needs batchgen's own graph"), "{e}");
    let mut a = args(Switch::On, 0);
    a.cache.prefix_block_tokens = 4;
    let e = tokio::task::spawn_blocking(move || batchgen::app::load(&a).err().unwrap().to_string()).await.unwrap();
    assert!(e.contains("--prefix-cache-mib 0 holds no block of --prefix-block-tokens 4"), "{e}");
    let mut a = args(Switch::Auto, 64);
    (a.model.graph, a.model.kv_layout) = (GraphChoice::Exported, KvLayoutChoice::Paged);
    let e = tokio::task::spawn_blocking(move || batchgen::app::load(&a).err().unwrap().to_string()).await.unwrap();
    assert!(e.contains("--kv-layout paged needs batchgen's own graph"), "{e}");
    // auto with the export: served, without a cache.
    let mut a = args(Switch::Auto, 64);
    (a.model.graph, a.model.kv_layout) = (GraphChoice::Exported, KvLayoutChoice::Slots);
    let mut server = start_with(a).await;
    let r = server.client.generate(greedy(tokens(1, 10), 2)).await.unwrap().into_inner();
    let r2 = server.client.generate(greedy(tokens(1, 10), 2)).await.unwrap().into_inner();
    assert_eq!((cached(&r), cached(&r2)), (0, 0));
}
