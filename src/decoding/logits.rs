//! Logits processors and sampling warpers, applied in the order transformers'
//! `generate()` uses: logit_bias → repetition_penalty → presence/frequency
//! penalty → no_repeat_ngram_size → min_new_tokens (the processors, which
//! greedy search and sampling both use), then temperature → top_k → top_p →
//! min_p → typical_p (the warpers, sampling only). Greedy is the argmax of the
//! processed scores; sampling draws from the renormalised warped distribution
//! with the row's own seeded RNG.
//!
//! `distribution` works on a candidate list, not the whole vocabulary: top_k
//! and top_p select with a partial sort, so a step costs O(vocab) per row
//! plus a sort of the few candidates that survive. The engine draws through
//! `draw` instead, which keeps the same tokens (tested against this) in
//! fewer passes; `distribution` stays the reference, and typical_p's path.
use std::collections::HashMap;

use rand::Rng;

use crate::decoding::math::{fast_exp, max_of, sum_exp};

/// Request settings that change the scores (validated ranges; "off" values
/// are 0 / empty / 1.0 for repetition_penalty).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Processors {
    pub logit_bias: Vec<(u32, f32)>,
    /// 1.0 (or 0.0) is off.
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub no_repeat_ngram_size: usize,
}

/// Sampling warpers; 0 means off for each.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Warpers {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub typical_p: f32,
}

/// What a row has seen: its prompt and generated tokens.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Occurrences of each generated token (presence/frequency penalties).
    pub generated_counts: HashMap<u32, u32>,
}

impl History {
    pub fn new(prompt: &[u32]) -> Self {
        History { tokens: prompt.to_vec(), prompt_len: prompt.len(), generated_counts: HashMap::new() }
    }

    pub fn push(&mut self, token: u32) {
        self.tokens.push(token);
        *self.generated_counts.entry(token).or_default() += 1;
    }
}

impl Processors {
    pub fn is_off(&self) -> bool {
        self.logit_bias.is_empty()
            && (self.repetition_penalty == 0.0 || self.repetition_penalty == 1.0)
            && self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
            && self.no_repeat_ngram_size == 0
    }

    /// Applies the processors in place; `masked` (min_new_tokens) goes last.
    pub fn apply(&self, scores: &mut [f32], history: &History, masked: &[u32]) {
        for &(id, bias) in &self.logit_bias {
            scores[id as usize] += bias;
        }
        let p = self.repetition_penalty;
        if p != 0.0 && p != 1.0 {
            let mut seen: Vec<u32> = history.tokens.clone();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                let s = &mut scores[id as usize];
                *s = if *s < 0.0 { *s * p } else { *s / p };
            }
        }
        if self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 {
            for (&id, &n) in &history.generated_counts {
                scores[id as usize] -= self.presence_penalty + self.frequency_penalty * n as f32;
            }
        }
        for id in banned_ngram_tokens(&history.tokens, self.no_repeat_ngram_size) {
            scores[id as usize] = f32::NEG_INFINITY;
        }
        for &id in masked {
            scores[id as usize] = f32::NEG_INFINITY;
        }
    }
}

/// Tokens that would repeat an n-gram already in `tokens` (transformers'
/// NoRepeatNGramLogitsProcessor: the last n-1 tokens as a prefix).
pub fn banned_ngram_tokens(tokens: &[u32], n: usize) -> Vec<u32> {
    if n == 0 || tokens.len() + 1 < n {
        return Vec::new();
    }
    let prefix = &tokens[tokens.len() + 1 - n..];
    tokens.windows(n).filter(|w| &w[..n - 1] == prefix).map(|w| w[n - 1]).collect()
}

/// The distribution sampling draws from: `(token, probability)` for every
/// token the warpers keep, probabilities summing to 1, in no particular order.
pub fn distribution(scores: &[f32], w: &Warpers) -> Vec<(u32, f32)> {
    let inv_t = if w.temperature > 0.0 { 1.0 / w.temperature } else { 1.0 };
    let mut ids: Vec<u32> = Vec::with_capacity(scores.len());
    let mut vals: Vec<f32> = Vec::with_capacity(scores.len());
    if scores.iter().all(|s| s.is_finite()) {
        ids.extend(0..scores.len() as u32);
        vals.extend(scores.iter().map(|&s| s * inv_t));
    } else {
        for (i, &s) in scores.iter().enumerate().filter(|(_, s)| s.is_finite()) {
            ids.push(i as u32);
            vals.push(s * inv_t);
        }
    }
    if ids.is_empty() {
        return Vec::new();
    }
    if w.top_k > 0 && w.top_k < ids.len() {
        // Keep everything tied with the k-th score, as transformers does.
        let mut sorted = vals.clone();
        let (_, kth, _) = sorted.select_nth_unstable_by(w.top_k - 1, |a, b| b.total_cmp(a));
        let kth = *kth;
        keep(&mut ids, &mut vals, |v| v >= kth);
    }
    if w.top_p > 0.0 && w.top_p < 1.0 {
        top_p(&mut ids, &mut vals, w.top_p);
    }
    if w.min_p > 0.0 {
        // p < min_p * p_max  ⇔  s - s_max < ln(min_p)
        let floor = max_of(&vals) + w.min_p.ln();
        keep(&mut ids, &mut vals, |v| v >= floor);
    }
    if w.typical_p > 0.0 && w.typical_p < 1.0 {
        typical_p(&mut ids, &mut vals, w.typical_p);
    }
    let max = max_of(&vals);
    let lse = max + sum_exp(&vals, max).ln() as f32;
    ids.into_iter().zip(vals).map(|(id, v)| (id, fast_exp(v - lse))).collect()
}

fn keep(ids: &mut Vec<u32>, vals: &mut Vec<f32>, pred: impl Fn(f32) -> bool) {
    keep_by_index(ids, vals, |_, v| pred(v));
}

/// Nucleus: keep tokens while the mass of the tokens more likely than them is
/// below `top_p` (transformers' rule). Instead of sorting the vocabulary, a
/// pass buckets the candidates by score (256 buckets over their range): the
/// buckets above the one where the mass crosses `top_p` are kept, the ones
/// below dropped, and only the crossing bucket is looked at again, until it
/// is small enough to sort. Flat distributions (huge nuclei) stay linear.
fn top_p(ids: &mut Vec<u32>, vals: &mut Vec<f32>, top_p: f32) {
    const BUCKETS: usize = 256;
    const SORT_AT: usize = 64;
    let max = max_of(vals);
    let target = f64::from(top_p) * sum_exp(vals, max);
    let mut kept = vec![false; ids.iter().max().map_or(0, |&m| m as usize + 1)];
    let mut any_kept = false;
    let mut above = 0.0f64;
    let mut edge: Vec<(f32, u32)> = vals.iter().copied().zip(ids.iter().copied()).collect();
    while edge.len() > SORT_AT {
        let hi = edge.iter().map(|e| e.0).fold(f32::NEG_INFINITY, f32::max);
        let lo = edge.iter().map(|e| e.0).fold(f32::INFINITY, f32::min);
        if hi - lo <= hi.abs() * 1e-6 {
            break;
        }
        let scale = BUCKETS as f32 / (hi - lo);
        let bucket = |v: f32| (((hi - v) * scale) as usize).min(BUCKETS - 1);
        let mut mass = [0.0f64; BUCKETS];
        for &(v, _) in &edge {
            mass[bucket(v)] += f64::from(fast_exp(v - max));
        }
        let mut boundary = BUCKETS - 1;
        for (b, &m) in mass.iter().enumerate() {
            if above + m >= target {
                boundary = b;
                break;
            }
            above += m;
        }
        let mut next = Vec::new();
        for &(v, id) in &edge {
            match bucket(v).cmp(&boundary) {
                std::cmp::Ordering::Less => {
                    kept[id as usize] = true;
                    any_kept = true;
                }
                std::cmp::Ordering::Equal => next.push((v, id)),
                std::cmp::Ordering::Greater => {}
            }
        }
        edge = next;
    }
    edge.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(v, id) in &edge {
        // The most likely token is always kept.
        if above >= target && any_kept {
            break;
        }
        kept[id as usize] = true;
        any_kept = true;
        above += f64::from(fast_exp(v - max));
    }
    keep_by_index(ids, vals, |id, _| kept[id as usize]);
}

fn keep_by_index(ids: &mut Vec<u32>, vals: &mut Vec<f32>, pred: impl Fn(u32, f32) -> bool) {
    let mut n = 0;
    for i in 0..ids.len() {
        if pred(ids[i], vals[i]) {
            ids[n] = ids[i];
            vals[n] = vals[i];
            n += 1;
        }
    }
    ids.truncate(n);
    vals.truncate(n);
}

/// Locally typical sampling (transformers' TypicalLogitsWarper): keep the
/// tokens whose surprise is closest to the entropy, up to `mass`.
fn typical_p(ids: &mut Vec<u32>, vals: &mut Vec<f32>, mass: f32) {
    let max = max_of(vals);
    let lse = f64::from(max) + sum_exp(vals, max).ln();
    let ent: f64 = vals
        .iter()
        .map(|&v| {
            let lp = f64::from(v) - lse;
            -lp * lp.exp()
        })
        .sum();
    let shift = |v: f32| ((f64::from(v) - lse) + ent).abs();
    let mut order: Vec<usize> = (0..vals.len()).collect();
    order.sort_unstable_by(|&a, &b| shift(vals[a]).total_cmp(&shift(vals[b])).then(ids[a].cmp(&ids[b])));
    let mut acc = 0.0f64;
    let mut last = order.len() - 1;
    for (k, &i) in order.iter().enumerate() {
        acc += (f64::from(vals[i]) - lse).exp();
        if acc >= f64::from(mass) {
            last = k;
            break;
        }
    }
    let cut = shift(vals[order[last]]);
    keep(ids, vals, |v| shift(v) <= cut);
}

/// Draws a token from `dist` (as returned by `distribution`).
pub fn sample(dist: &[(u32, f32)], rng: &mut impl Rng) -> u32 {
    let total: f64 = dist.iter().map(|d| f64::from(d.1)).sum();
    let mut u = rng.random::<f64>() * total;
    for &(id, p) in dist {
        u -= f64::from(p);
        if u < 0.0 {
            return id;
        }
    }
    dist.last().map_or(0, |d| d.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn ln(ps: &[f32]) -> Vec<f32> {
        ps.iter().map(|p| p.ln()).collect()
    }

    fn close(dist: &[(u32, f32)], want: &[(u32, f32)]) {
        let mut dist = dist.to_vec();
        dist.sort_by(|a, b| b.1.total_cmp(&a.1));
        assert_eq!(dist.len(), want.len(), "{dist:?} vs {want:?}");
        for (d, w) in dist.iter().zip(want) {
            assert_eq!(d.0, w.0, "{dist:?} vs {want:?}");
            assert!((d.1 - w.1).abs() < 1e-6, "{dist:?} vs {want:?}");
        }
    }

    const P: [f32; 5] = [0.05, 0.1, 0.15, 0.3, 0.4];

    #[test]
    fn temperature_sharpens_and_flattens() {
        let d = distribution(&ln(&P), &Warpers { temperature: 0.5, ..Default::default() });
        // p^2 renormalised: 0.16 / (0.0025 + 0.01 + 0.0225 + 0.09 + 0.16)
        let z = 0.0025 + 0.01 + 0.0225 + 0.09 + 0.16;
        close(&d, &[(4, 0.16 / z), (3, 0.09 / z), (2, 0.0225 / z), (1, 0.01 / z), (0, 0.0025 / z)]);
    }

    #[test]
    fn top_k_keeps_k_and_ties() {
        let d = distribution(&ln(&P), &Warpers { top_k: 2, ..Default::default() });
        close(&d, &[(4, 0.4 / 0.7), (3, 0.3 / 0.7)]);
        let tied = distribution(&[1.0, 2.0, 2.0, 0.0], &Warpers { top_k: 1, ..Default::default() });
        assert_eq!(tied.len(), 2);
    }

    #[test]
    fn top_p_keeps_the_smallest_head_reaching_the_mass() {
        // 0.4 < 0.6, 0.4 + 0.3 >= 0.6: two tokens.
        let d = distribution(&ln(&P), &Warpers { top_p: 0.6, ..Default::default() });
        close(&d, &[(4, 0.4 / 0.7), (3, 0.3 / 0.7)]);
        // The top token alone when it already holds top_p.
        let d = distribution(&ln(&P), &Warpers { top_p: 0.3, ..Default::default() });
        close(&d, &[(4, 1.0)]);
        // (A top_p exactly at a partial sum, like 0.7 here, is decided by
        // float rounding, in transformers as here.)
        let d = distribution(&ln(&P), &Warpers { top_p: 0.71, ..Default::default() });
        assert_eq!(d.len(), 3);
    }

    #[test]
    fn top_p_over_a_large_vocabulary_grows_its_head() {
        let scores: Vec<f32> = (0..1000).map(|i| -(i as f32) * 0.001).collect();
        let d = distribution(&scores, &Warpers { top_p: 0.5, ..Default::default() });
        assert!(d.len() > 64, "needs more than the first head of 64");
        let mass: f32 = d.iter().map(|x| x.1).sum();
        assert!((mass - 1.0).abs() < 1e-4);
        assert_eq!(d.iter().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap().0, 0);
    }

    #[test]
    fn min_p_drops_tokens_below_a_fraction_of_the_top() {
        // 0.4 * 0.5 = 0.2: keeps 0.4 and 0.3.
        let d = distribution(&ln(&P), &Warpers { min_p: 0.5, ..Default::default() });
        close(&d, &[(4, 0.4 / 0.7), (3, 0.3 / 0.7)]);
    }

    #[test]
    fn typical_p_keeps_tokens_closest_to_the_entropy() {
        let h: f32 = P.iter().map(|p| -p * p.ln()).sum();
        // Order by |−ln p − H|, keep until the mass reaches typical_p.
        let mut order: Vec<usize> = (0..5).collect();
        order.sort_by(|&a, &b| (-P[a].ln() - h).abs().total_cmp(&(-P[b].ln() - h).abs()));
        let mut mass = 0.0;
        let mut kept = Vec::new();
        for &i in &order {
            kept.push(i as u32);
            mass += P[i];
            if mass >= 0.5 {
                break;
            }
        }
        let d = distribution(&ln(&P), &Warpers { typical_p: 0.5, ..Default::default() });
        let mut got: Vec<u32> = d.iter().map(|x| x.0).collect();
        got.sort();
        kept.sort();
        assert_eq!(got, kept);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() {
        let mut s = vec![2.0, -2.0, 2.0, -2.0];
        let h = History::new(&[0, 1, 1]);
        Processors { repetition_penalty: 2.0, ..Default::default() }.apply(&mut s, &h, &[]);
        assert_eq!(s, vec![1.0, -4.0, 2.0, -2.0]);
    }

    #[test]
    fn presence_and_frequency_count_generated_tokens_only() {
        let mut s = vec![0.0; 4];
        let mut h = History::new(&[3, 3]);
        h.push(1);
        h.push(1);
        h.push(2);
        Processors { presence_penalty: 0.5, frequency_penalty: 0.25, ..Default::default() }.apply(&mut s, &h, &[]);
        assert_eq!(s, vec![0.0, -1.0, -0.75, 0.0]);
    }

    #[test]
    fn no_repeat_ngram_bans_completions_of_seen_ngrams() {
        // Seen bigrams (1,2), (2,1), (1,3): after a 1, 2 and 3 are banned.
        let mut b = banned_ngram_tokens(&[1, 2, 1, 3, 1], 2);
        b.sort();
        assert_eq!(b, vec![2, 3]);
        assert_eq!(banned_ngram_tokens(&[5, 6, 7, 5, 6], 3), vec![7]);
        assert!(banned_ngram_tokens(&[1], 3).is_empty());
    }

    #[test]
    fn logit_bias_and_masks_apply() {
        let mut s = vec![0.0; 3];
        let p = Processors { logit_bias: vec![(1, 5.0)], ..Default::default() };
        p.apply(&mut s, &History::new(&[]), &[2]);
        assert_eq!(s, vec![0.0, 5.0, f32::NEG_INFINITY]);
    }

    #[test]
    fn sampling_is_reproducible_per_seed_and_follows_the_distribution() {
        let d = distribution(&ln(&P), &Warpers::default());
        let draw = |seed| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            (0..10).map(|_| sample(&d, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut counts = [0usize; 5];
        for _ in 0..20000 {
            counts[sample(&d, &mut rng) as usize] += 1;
        }
        for (i, c) in counts.iter().enumerate() {
            assert!((*c as f32 / 20000.0 - P[i]).abs() < 0.015, "{counts:?}");
        }
    }
}
