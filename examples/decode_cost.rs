//! Time per row per step of choosing a token, outside `Session::run`:
//! greedy, sampling (top-p, top-k), penalties, and a beam search step, on
//! vocabulary-sized logits (normal with standard deviation 2, like GPT-2's).
//!
//! cargo run --release --example decode_cost
use std::time::Instant;

use batchgen::decoding::beam::{BeamPlan, BeamSearch};
use batchgen::decoding::logits::{self, History, Processors, Warpers};
use batchgen::decoding::sampling;
use rand::{Rng, SeedableRng};

const VOCAB: usize = 50257;

fn logits(rng: &mut impl Rng) -> Vec<f32> {
    (0..VOCAB)
        .map(|_| {
            let (u, v): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
            (2.0 * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect()
}

fn time(name: &str, rows: &[Vec<f32>], mut f: impl FnMut(&[f32])) {
    let start = Instant::now();
    for r in rows {
        f(r);
    }
    println!("{name:<48} {:>8.1} µs per row", start.elapsed().as_secs_f64() * 1e6 / rows.len() as f64);
}

fn main() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let rows: Vec<Vec<f32>> = (0..200).map(|_| logits(&mut rng)).collect();
    let history = History::new(&(0..500).map(|i| (i * 97 % VOCAB) as u32).collect::<Vec<_>>());
    time("greedy (argmax + logprob)", &rows, |r| {
        std::hint::black_box(sampling::greedy(r, &[], 0));
    });
    time("greedy + top_logprobs 5", &rows, |r| {
        std::hint::black_box(sampling::greedy(r, &[], 5));
    });
    // What the engine runs for a sampled row: the draw, then its report.
    let none = Processors::default();
    let sample = |w: Warpers| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let mut scratch = sampling::Scratch::default();
        let (none, history) = (&none, &history);
        move |r: &[f32]| {
            let rng = Some((&w, &mut rng));
            let row = sampling::Row { raw: r, given: None, processors: none, history, masked: &[], top: 0 };
            std::hint::black_box(sampling::choose(row, rng, &mut scratch));
        }
    };
    // The candidate list it replaced (still taken for typical_p).
    let listed = |w: Warpers| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        move |r: &[f32]| {
            let id = logits::sample(&logits::distribution(r, &w), &mut rng);
            std::hint::black_box(sampling::report(r, id, 0));
        }
    };
    let top_p = Warpers { temperature: 0.8, top_p: 0.95, ..Default::default() };
    time("candidate list, temperature 0.8, top_p 0.95", &rows, listed(top_p));
    time("sampling, temperature 0.8 only", &rows, sample(Warpers { temperature: 0.8, ..Default::default() }));
    time(
        "sampling, temperature 0.8, top_p 0.95",
        &rows,
        sample(Warpers { temperature: 0.8, top_p: 0.95, ..Default::default() }),
    );
    time("sampling, top_k 50", &rows, sample(Warpers { temperature: 1.0, top_k: 50, ..Default::default() }));
    let p = Processors { repetition_penalty: 1.3, no_repeat_ngram_size: 3, ..Default::default() };
    let mut scratch = Vec::new();
    time("processors: repetition 1.3 + no_repeat 3 (500 seen)", &rows, |r| {
        scratch.clear();
        scratch.extend_from_slice(r);
        p.apply(&mut scratch, &history, &[]);
        std::hint::black_box(sampling::argmax_unmasked(&scratch, &[]));
    });
    let plan = BeamPlan { num_beams: 5, length_penalty: 1.0, early_stopping: false, num_return_sequences: 1 };
    let mut search = BeamSearch::new(plan, 1000, vec![50256]);
    let groups: Vec<&[Vec<f32>]> = rows.chunks(5).collect();
    let start = Instant::now();
    for g in &groups {
        let lps: Vec<Vec<f32>> = g.iter().map(|r| sampling::log_softmax(r)).collect();
        let report = |b: usize, t: u32| sampling::report(&g[b], t, 0);
        std::hint::black_box(search.step(&lps, &report));
    }
    println!(
        "{:<48} {:>8.1} µs per row",
        "beam search step, 5 beams",
        start.elapsed().as_secs_f64() * 1e6 / (groups.len() * 5) as f64
    );
}
