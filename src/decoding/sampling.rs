//! Choosing the next token from one row's logits, and the log-probabilities
//! reported with it.
//!
//! Reported log-probabilities are always of the model's own distribution
//! (log-softmax of the raw logits); the choice is made on the processed
//! scores (today: tokens masked by `min_new_tokens`).

use super::draw;
use super::logits::{History, Processors, Warpers};
use super::math::{max_of, sum_exp};
use crate::run::Greedy;

/// Buffers `choose` reuses from row to row.
#[derive(Default)]
pub struct Scratch {
    scores: Vec<f32>,
    draw: draw::Scratch,
}

/// What one row's choice reads: its raw logits, the run's greedy choice
/// when it made one (`graph::greedy`), the request's processors, what the
/// row has seen, the tokens `min_new_tokens` masks and how many
/// alternatives to report.
pub struct Row<'a> {
    pub raw: &'a [f32],
    pub given: Option<Greedy>,
    pub processors: &'a Processors,
    pub history: &'a History,
    pub masked: &'a [u32],
    pub top: usize,
}

/// One row's next token: the request's processors on its raw logits, then
/// greedy choice or, when `sampling` is given, its warpers and a draw from
/// the row's own generator (`draw`); reported under the model's own
/// distribution. Greedy is the configuration without sampling (and with no
/// processor on, the argmax of the raw logits, with no copy). The run's
/// greedy choice is taken as it is when nothing would change it (no
/// processors, no sampling, nothing masked). On a CPU with AVX2 and FMA it
/// runs as a copy compiled for them, where its passes over the vocabulary
/// vectorise 8 wide.
pub fn choose(row: Row<'_>, sampling: Option<(&Warpers, &mut impl rand::Rng)>, scratch: &mut Scratch) -> Choice {
    #[cfg(target_arch = "x86_64")]
    if super::math::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked at run time).
        #[allow(unsafe_code)]
        return unsafe { choose_avx2(row, sampling, scratch) };
    }
    choose_with(row, sampling, scratch)
}

/// `choose_with` compiled for AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn choose_avx2(row: Row<'_>, sampling: Option<(&Warpers, &mut impl rand::Rng)>, scratch: &mut Scratch) -> Choice {
    choose_with(row, sampling, scratch)
}

#[inline(always)]
fn choose_with(row: Row<'_>, sampling: Option<(&Warpers, &mut impl rand::Rng)>, scratch: &mut Scratch) -> Choice {
    let Row { raw, given, processors, history, masked, top } = row;
    if sampling.is_none() && processors.is_off() {
        return match given {
            Some(g) if masked.is_empty() => reported(raw, g.id, g.lse, top),
            _ => greedy(raw, masked, top),
        };
    }
    let scores = &mut scratch.scores;
    scores.clear();
    scores.extend_from_slice(raw);
    processors.apply(scores, history, masked);
    let id = match sampling {
        Some((warpers, rng)) => draw::draw(scores, warpers, rng, &mut scratch.draw),
        None => argmax_unmasked(scores, &[]),
    };
    report(raw, id, top)
}

/// The index of the largest value that is not masked; the lowest index wins ties
/// (as `torch.argmax`).
#[inline(always)]
pub fn argmax_unmasked(logits: &[f32], masked: &[u32]) -> u32 {
    if masked.is_empty() {
        // Two branch-free passes (a max that vectorises, then a scan) beat
        // one branchy pass over a whole vocabulary.
        let max = max_of(logits);
        return logits.iter().position(|&x| x == max).unwrap_or(0) as u32;
    }
    let mut best = (f32::NEG_INFINITY, None::<usize>);
    for (i, &x) in logits.iter().enumerate() {
        if (best.1.is_none() || x > best.0) && !masked.contains(&(i as u32)) {
            best = (x, Some(i));
        }
    }
    best.1.unwrap_or(0) as u32
}

/// The `k` most likely tokens with their log-probabilities, most likely first
/// (lower id first on ties).
pub fn top_logprobs(logits: &[f32], lse: f64, k: usize) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &x) in logits.iter().enumerate() {
        if top.len() == k && x <= top[k - 1].1 {
            continue;
        }
        let at = top.partition_point(|&(_, y)| y >= x);
        top.insert(at, (i as u32, x));
        top.truncate(k);
    }
    top.into_iter().map(|(i, x)| (i, (x as f64 - lse) as f32)).collect()
}

/// What the engine reports for one chosen token.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// log(sum(exp(x))) given `max = max(x)`.
#[inline(always)]
pub fn log_sum_exp_from(logits: &[f32], max: f32) -> f64 {
    if max == f32::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    f64::from(max) + sum_exp(logits, max).ln()
}

/// log-softmax of a row of logits.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = max_of(logits);
    let lse = log_sum_exp_from(logits, max) as f32;
    logits.iter().map(|&x| x - lse).collect()
}

/// Reporting for a token chosen by other means (after processors or by
/// sampling): its log-probability and the alternatives, under the model's own
/// distribution.
#[inline(always)]
pub fn report(logits: &[f32], id: u32, top_k: usize) -> Choice {
    let max = max_of(logits);
    reported(logits, id, log_sum_exp_from(logits, max), top_k)
}

/// Token `id` with its log-probability and the `top_k` alternatives, given
/// the row's log-sum-exp.
#[inline(always)]
fn reported(logits: &[f32], id: u32, lse: f64, top_k: usize) -> Choice {
    Choice { id, logprob: (logits[id as usize] as f64 - lse) as f32, top: top_logprobs(logits, lse, top_k) }
}

/// Greedy choice with `masked` tokens forbidden, plus reporting.
#[inline(always)]
pub fn greedy(logits: &[f32], masked: &[u32], top_k: usize) -> Choice {
    let id = argmax_unmasked(logits, masked);
    let max =
        if masked.is_empty() { logits[id as usize] } else { logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) };
    reported(logits, id, log_sum_exp_from(logits, max), top_k)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: log(sum(exp(x))) in f64 with the standard exp.
    fn log_sum_exp(logits: &[f32]) -> f64 {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        if max == f64::NEG_INFINITY {
            return max;
        }
        max + logits.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln()
    }

    #[test]
    fn log_probabilities_match_a_hand_computed_softmax() {
        // softmax([ln 1, ln 2, ln 3, ln 4]) = [0.1, 0.2, 0.3, 0.4]
        let logits: Vec<f32> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|x| x.ln()).collect();
        let c = greedy(&logits, &[], 3);
        assert_eq!(c.id, 3);
        assert!((c.logprob - 0.4f32.ln()).abs() < 1e-6);
        let ids: Vec<u32> = c.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [3, 2, 1]);
        for ((_, lp), p) in c.top.iter().zip([0.4f32, 0.3, 0.2]) {
            assert!((lp - p.ln()).abs() < 1e-6, "{lp} vs {}", p.ln());
        }
    }

    #[test]
    fn masked_tokens_are_never_chosen_but_keep_their_logprob() {
        let logits = [0.0f32, 5.0, 1.0];
        let c = greedy(&logits, &[1], 1);
        assert_eq!(c.id, 2);
        assert_eq!(c.top[0].0, 1, "top_logprobs are of the model's own distribution");
    }

    #[test]
    fn ties_go_to_the_lowest_id() {
        assert_eq!(argmax_unmasked(&[1.0, 3.0, 3.0], &[]), 1);
        assert_eq!(top_logprobs(&[1.0, 3.0, 3.0], 0.0, 2), vec![(1, 3.0), (2, 3.0)]);
    }

    #[test]
    fn log_sum_exp_is_stable_for_large_logits() {
        let lse = log_sum_exp(&[1000.0, 1000.0]);
        assert!((lse - (1000.0 + 2f64.ln())).abs() < 1e-9);
        assert!((log_sum_exp_from(&[1000.0, 1000.0], 1000.0) - lse).abs() < 1e-9);
    }

    #[test]
    fn the_fast_path_agrees_with_f64_over_a_vocabulary() {
        let logits: Vec<f32> = (0..50257).map(|i| ((i * 7919 % 1000) as f32) / 37.0 - 9.0).collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert!((log_sum_exp_from(&logits, max) - log_sum_exp(&logits)).abs() < 1e-5);
    }
}
