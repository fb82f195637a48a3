//! Drawing a token from the warped distribution without building it: what
//! `sample(&distribution(scores, w), rng)` draws, in a few passes over the
//! vocabulary that vectorise instead of a candidate list of it.
//!
//! Each token's weight `e = exp((s - max) / temperature)` (0 for a masked
//! token) is computed once, with the sums of blocks of 1024. top_k, top_p and
//! min_p then only zero weights: top_k and top_p find their boundary by a
//! radix select on the weights' bits (positive floats order as their bit
//! patterns do), one histogram pass over the vocabulary and a few over the
//! bucket the boundary falls in; the draw walks the block sums, then one
//! block. typical_p, and scores that are NaN or +∞, take the candidate list.
use rand::Rng;

use super::logits::{Warpers, distribution, sample};
use super::math::{fast_exp, max_of};

const BLOCK: usize = 1024;

/// Reused buffers of one row's draw.
#[derive(Default)]
pub struct Scratch {
    weights: Vec<f32>,
    blocks: Vec<f64>,
    candidates: Vec<u32>,
}

/// Draws a token from what the warpers keep of `scores`. Inlined, so that
/// `sampling::choose`'s AVX2 copy vectorises its passes 8 wide.
#[inline(always)]
pub fn draw(scores: &[f32], w: &Warpers, rng: &mut impl Rng, scratch: &mut Scratch) -> u32 {
    // NaN or +∞ anywhere: the candidate list drops them.
    let plain = scores.iter().fold(true, |ok, &s| ok & (s < f32::INFINITY));
    if !plain || (w.typical_p > 0.0 && w.typical_p < 1.0) {
        return sample(&distribution(scores, w), rng);
    }
    let max = max_of(scores);
    if max == f32::NEG_INFINITY {
        return sample(&[], rng);
    }
    let inv_t = if w.temperature > 0.0 { 1.0 / w.temperature } else { 1.0 };
    let Scratch { weights, blocks, candidates } = scratch;
    weights.clear();
    weights.resize(scores.len(), 0.0);
    for (e, &s) in weights.iter_mut().zip(scores) {
        let v = fast_exp((s - max) * inv_t);
        *e = if s == f32::NEG_INFINITY { 0.0 } else { v };
    }
    if w.top_k > 0 && w.top_k < weights.iter().filter(|&&e| e > 0.0).count() {
        // Every token tied with the k-th stays, as transformers keeps them.
        let (kth, _) = boundary(weights, w.top_k as f64, candidates, |e| f64::from(u8::from(e > 0.0)));
        for e in weights.iter_mut() {
            *e = if *e >= kth { *e } else { 0.0 };
        }
    }
    if w.top_p > 0.0 && w.top_p < 1.0 {
        let target = f64::from(w.top_p) * block_sums(weights, blocks);
        let (last, id) = boundary(weights, target, candidates, f64::from);
        for (i, e) in weights.iter_mut().enumerate() {
            let kept = *e > last || (*e == last && i as u32 <= id);
            *e = if kept { *e } else { 0.0 };
        }
    }
    if w.min_p > 0.0 {
        // The most likely token's weight is 1: p < min_p · p_max ⇔ e < min_p.
        for e in weights.iter_mut() {
            *e = if *e >= w.min_p { *e } else { 0.0 };
        }
    }
    let total = block_sums(weights, blocks);
    let mut u = rng.random::<f64>() * total;
    let mut fallback = 0;
    for (b, &sum) in blocks.iter().enumerate() {
        if u >= sum {
            u -= sum;
            continue;
        }
        for (j, &e) in weights[b * BLOCK..].iter().take(BLOCK).enumerate() {
            if e > 0.0 {
                fallback = b * BLOCK + j;
                u -= f64::from(e);
                if u < 0.0 {
                    return fallback as u32;
                }
            }
        }
        // Rounding between the block's sum and its walk: its last token.
        return fallback as u32;
    }
    // Rounding past the end: the last token with any weight.
    weights.iter().rposition(|&e| e > 0.0).unwrap_or(0) as u32
}

/// Sums of each block of `weights` into `blocks`; returns their total.
#[inline(always)]
fn block_sums(weights: &[f32], blocks: &mut Vec<f64>) -> f64 {
    blocks.clear();
    for block in weights.chunks(BLOCK) {
        let mut lanes = [0f32; 8];
        let chunks = block.chunks_exact(8);
        let rest: f32 = chunks.remainder().iter().sum();
        for c in chunks {
            for l in 0..8 {
                lanes[l] += c[l];
            }
        }
        blocks.push(f64::from(lanes.iter().sum::<f32>() + rest));
    }
    blocks.iter().sum()
}

/// The token where, taking tokens from the heaviest down (lower id first
/// among equal weights), the sum of `measure(weight)` first reaches
/// `target`: its weight and id. `measure(0)` must be 0 (zero weights are
/// never taken). A radix select
/// over the weights' bits (a positive float orders as its bits do): buckets
/// by the exponent, then the bucket the sum crosses in by the next 8 bits of
/// the mantissa, and so on, until few enough are left to sort.
#[inline(always)]
fn boundary(weights: &[f32], target: f64, candidates: &mut Vec<u32>, measure: impl Fn(f32) -> f64) -> (f32, u32) {
    // Bucket by bits shift..shift + step of each weight whose higher bits
    // are `prefix` (the buckets chosen so far).
    let (mut shift, mut step, mut prefix) = (23u32, 8u32, 0u32);
    let mut above = 0.0f64;
    let mut first = true;
    loop {
        let bucket = |e: f32| ((e.to_bits() >> shift) & ((1 << step) - 1)) as usize;
        // Two histograms, alternate tokens, so that runs of one bucket do not
        // wait on each other's additions.
        let mut mass = [[0.0f64; 256]; 2];
        if first {
            // A zero weight lands in bucket 0 with measure 0.
            for (n, &e) in weights.iter().enumerate() {
                mass[n & 1][bucket(e)] += measure(e);
            }
        } else {
            for (n, &i) in candidates.iter().enumerate() {
                let e = weights[i as usize];
                mass[n & 1][bucket(e)] += measure(e);
            }
        }
        let total = |b: usize| mass[0][b] + mass[1][b];
        let mut cross = None;
        for b in (0..1usize << step).rev() {
            if total(b) > 0.0 && above + total(b) >= target {
                cross = Some(b);
                break;
            }
            above += total(b);
        }
        let cross = cross.unwrap_or_else(|| {
            // Rounding: the sum never reached the target; the lightest bucket.
            let b = (0..1usize << step).find(|&b| total(b) > 0.0).expect("a positive weight");
            above -= total(b);
            b
        }) as u32;
        prefix = (prefix << step) | cross;
        let key = |e: f32| e.to_bits() >> shift;
        if first {
            candidates.clear();
            candidates.extend(
                // No zero weight has a positive weight's prefix.
                weights.iter().enumerate().filter(|&(_, &e)| key(e) == prefix).map(|(i, _)| i as u32),
            );
            first = false;
        } else {
            candidates.retain(|&i| key(weights[i as usize]) == prefix);
        }
        if candidates.len() <= 64 || shift == 0 {
            break;
        }
        step = shift.min(8);
        shift -= step;
    }
    candidates.sort_unstable_by(|&a, &b| weights[b as usize].total_cmp(&weights[a as usize]).then(a.cmp(&b)));
    for &i in candidates.iter() {
        above += measure(weights[i as usize]);
        if above >= target {
            return (weights[i as usize], i);
        }
    }
    let &i = candidates.last().expect("the bucket the boundary is in holds a token");
    (weights[i as usize], i)
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Logits like GPT-2's (normal, standard deviation 2) with ties and
    /// masked tokens among them.
    fn row(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut x: Vec<f32> = (0..n)
            .map(|_| {
                let (u, v): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
                (2.0 * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect();
        for i in (0..n).step_by(97) {
            x[(i * 31) % n] = x[i];
        }
        for i in (5..n).step_by(211) {
            x[i] = f32::NEG_INFINITY;
        }
        x
    }

    fn kept(scratch: &Scratch) -> Vec<u32> {
        scratch.weights.iter().enumerate().filter(|&(_, &e)| e > 0.0).map(|(i, _)| i as u32).collect()
    }

    #[test]
    fn keeps_what_the_candidate_list_keeps() {
        let mut scratch = Scratch::default();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for seed in 0..6 {
            let x = row(3000, seed);
            for temperature in [0.7, 1.0, 1.6] {
                for top_k in [0, 1, 7, 300] {
                    for top_p in [0.0, 0.3, 0.9, 0.995] {
                        for min_p in [0.0, 0.05] {
                            let w = Warpers { temperature, top_k, top_p, min_p, typical_p: 0.0 };
                            let id = draw(&x, &w, &mut rng, &mut scratch);
                            let mut want: Vec<u32> = distribution(&x, &w).iter().map(|d| d.0).collect();
                            want.sort_unstable();
                            assert_eq!(kept(&scratch), want, "{w:?}, row {seed}");
                            assert!(want.binary_search(&id).is_ok(), "{id} drawn, not kept ({w:?})");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn draws_follow_the_warped_distribution() {
        // 2,500 tokens (three blocks), the mass spread over a few dozen of
        // them on either side of the block boundaries.
        let mut x = vec![-20.0f32; 2500];
        for (j, i) in [0usize, 1, 1020, 1023, 1024, 1500, 2047, 2048, 2499].iter().enumerate() {
            x[*i] = (j % 4) as f32 * 0.5;
        }
        x[3] = f32::NEG_INFINITY;
        let w = Warpers { temperature: 0.9, top_p: 0.97, ..Default::default() };
        let want = distribution(&x, &w);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let mut scratch = Scratch::default();
        let n = 60_000;
        let mut counts = vec![0u32; x.len()];
        for _ in 0..n {
            counts[draw(&x, &w, &mut rng, &mut scratch) as usize] += 1;
        }
        assert_eq!(counts[3], 0, "a masked token was drawn");
        let drawn: u32 = want.iter().map(|&(id, _)| counts[id as usize]).sum();
        assert_eq!(drawn as usize, n, "every draw is a kept token");
        for &(id, p) in &want {
            let (expected, got) = (f64::from(p) * n as f64, f64::from(counts[id as usize]));
            let sigma = (expected * (1.0 - f64::from(p))).sqrt().max(1.0);
            assert!((got - expected).abs() <= 5.0 * sigma, "token {id}: {got} draws, {expected:.0} expected");
        }
    }

    #[test]
    fn nothing_to_draw_from_and_non_finite_scores() {
        let mut scratch = Scratch::default();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let w = Warpers { temperature: 1.0, ..Default::default() };
        assert_eq!(draw(&[f32::NEG_INFINITY; 3], &w, &mut rng, &mut scratch), 0);
        // NaN and +∞ go to the candidate list, which drops them.
        for _ in 0..100 {
            let id = draw(&[f32::NAN, 0.0, f32::INFINITY, 0.5], &w, &mut rng, &mut scratch);
            assert!(id == 1 || id == 3, "{id}");
        }
    }
}
