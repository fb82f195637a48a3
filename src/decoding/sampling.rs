//! Choosing the next token from one row's logits, and the log-probabilities
//! reported with it.
//!
//! Reported log-probabilities are always of the model's own distribution
//! (log-softmax of the raw logits); the choice is made on the processed
//! scores (today: tokens masked by `min_new_tokens`).

use super::logits::{self, History, Processors, Warpers};

/// One row's next token: the request's processors on its raw logits, then
/// greedy choice or, when `sampling` is given, its warpers and a draw from
/// the row's own generator; reported under the model's own distribution.
/// Greedy is the configuration without sampling (and with no processor on,
/// the argmax of the raw logits, with no copy). `scratch` is reused.
pub fn choose(
    raw: &[f32],
    processors: &Processors,
    sampling: Option<(&Warpers, &mut impl rand::Rng)>,
    history: &History,
    masked: &[u32],
    top: usize,
    scratch: &mut Vec<f32>,
) -> Choice {
    if sampling.is_none() && processors.is_off() {
        return greedy(raw, masked, top);
    }
    scratch.clear();
    scratch.extend_from_slice(raw);
    processors.apply(scratch, history, masked);
    let id = match sampling {
        Some((warpers, rng)) => logits::sample(&logits::distribution(scratch, warpers), rng),
        None => argmax_unmasked(scratch, &[]),
    };
    report(raw, id, top)
}

/// The index of the largest value that is not masked; the lowest index wins ties
/// (as `torch.argmax`).
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

/// e^x for x <= 0, branch-free so that loops over a vocabulary vectorise:
/// 2^(x·log2 e) split into an integer power of two (built in the exponent
/// bits) and 2^f, f in [-0.5, 0.5], by a degree-6 polynomial. Relative error
/// below 2e-7 near 0, growing with |x| to 1e-5 at -87 (rounding of x·log2 e),
/// where the terms no longer matter to a sum (tested against `f32::exp`);
/// x below -87 gives e^-87 (1.6e-38), as negligible as 0.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    let x = if x < -87.0 { -87.0 } else { x };
    let t = x * std::f32::consts::LOG2_E;
    // Adding 1.5 · 2^23 rounds t to an integer held in the low mantissa bits
    // (no float-to-int conversion, which would not vectorise).
    let shifted = t + 12_582_912.0;
    let n = shifted - 12_582_912.0;
    let n_bits = shifted.to_bits().wrapping_sub(0x4B40_0000);
    let y = (t - n) * std::f32::consts::LN_2;
    let p = 1.0 + y * (1.0 + y * (0.5 + y * (1.0 / 6.0 + y * (1.0 / 24.0 + y * (1.0 / 120.0 + y * (1.0 / 720.0))))));
    p * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

const LANES: usize = 8;

/// max(x), with 8 independent lanes so that it vectorises (NaN-free input).
pub fn max_of(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            m[l] = if c[l] > m[l] { c[l] } else { m[l] };
        }
    }
    rest.iter().chain(m.iter()).copied().fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a })
}

/// sum(exp(x - max)) in 8 f32 lanes per block of 1024, blocks summed in f64.
pub fn sum_exp(x: &[f32], max: f32) -> f64 {
    let mut total = 0.0f64;
    for block in x.chunks(1024) {
        let mut s = [0.0f32; LANES];
        let chunks = block.chunks_exact(LANES);
        let rest: f32 = chunks.remainder().iter().map(|&v| fast_exp(v - max)).sum();
        for c in chunks {
            for l in 0..LANES {
                s[l] += fast_exp(c[l] - max);
            }
        }
        total += f64::from(s.iter().sum::<f32>() + rest);
    }
    total
}

/// log(sum(exp(x))) given `max = max(x)`.
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
pub fn report(logits: &[f32], id: u32, top_k: usize) -> Choice {
    let max = max_of(logits);
    let lse = log_sum_exp_from(logits, max);
    Choice { id, logprob: (logits[id as usize] as f64 - lse) as f32, top: top_logprobs(logits, lse, top_k) }
}

/// Greedy choice with `masked` tokens forbidden, plus reporting.
pub fn greedy(logits: &[f32], masked: &[u32], top_k: usize) -> Choice {
    let id = argmax_unmasked(logits, masked);
    let max =
        if masked.is_empty() { logits[id as usize] } else { logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) };
    let lse = log_sum_exp_from(logits, max);
    Choice { id, logprob: (logits[id as usize] as f64 - lse) as f32, top: top_logprobs(logits, lse, top_k) }
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
    fn fast_exp_is_accurate_where_it_is_used() {
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (a, b) = (fast_exp(x), x.exp());
            let tolerance = if x > -1.0 { 2e-7 } else { 1e-5 };
            assert!((a - b).abs() <= tolerance * b + 1e-38, "{x}: {a} vs {b}");
            x += 0.0137;
        }
        assert_eq!(fast_exp(0.0), 1.0);
        assert!(fast_exp(-200.0) < 1e-37);
        assert!(fast_exp(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn the_fast_path_agrees_with_f64_over_a_vocabulary() {
        let logits: Vec<f32> = (0..50257).map(|i| ((i * 7919 % 1000) as f32) / 37.0 - 9.0).collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert!((log_sum_exp_from(&logits, max) - log_sum_exp(&logits)).abs() < 1e-5);
    }
}
