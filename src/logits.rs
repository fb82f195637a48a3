//! Logits processors and sampling warpers, applied in the order transformers'
//! `generate()` uses: logit_bias → repetition_penalty → presence/frequency
//! penalty → no_repeat_ngram_size → min_new_tokens (the processors, which
//! greedy search and sampling both use), then temperature → top_k → top_p →
//! min_p → typical_p (the warpers, sampling only). Greedy is the argmax of the
//! processed scores; sampling draws from the renormalised warped distribution
//! with the row's own seeded RNG.
//!
//! The warpers work on a candidate list, not the whole vocabulary: top_k and
//! top_p select with a partial sort, so a step costs O(vocab) per row plus a
//! sort of the few candidates that survive.
use std::collections::HashMap;

use rand::Rng;

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
/// token the warpers keep, probabilities summing to 1, most likely first.
pub fn distribution(scores: &[f32], w: &Warpers) -> Vec<(u32, f32)> {
    let t = if w.temperature > 0.0 { w.temperature } else { 1.0 };
    let mut cand: Vec<(u32, f32)> =
        scores.iter().enumerate().filter(|(_, s)| s.is_finite()).map(|(i, &s)| (i as u32, s / t)).collect();
    if cand.is_empty() {
        return Vec::new();
    }
    let by_score_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if w.top_k > 0 && w.top_k < cand.len() {
        // Keep everything tied with the k-th score, as transformers does.
        cand.select_nth_unstable_by(w.top_k - 1, by_score_desc);
        let kth = cand[w.top_k - 1].1;
        cand.retain(|c| c.1 >= kth);
    }
    if w.top_p > 0.0 && w.top_p < 1.0 {
        // Grow a sorted head until it holds top_p of the mass.
        let lse = log_sum_exp(&cand);
        let mut head = 64.min(cand.len());
        loop {
            if head < cand.len() {
                cand.select_nth_unstable_by(head - 1, by_score_desc);
            }
            cand[..head].sort_unstable_by(by_score_desc);
            let mut above = 0.0f64;
            let mut keep = None;
            for (i, c) in cand[..head].iter().enumerate() {
                if above >= f64::from(w.top_p) {
                    keep = Some(i.max(1));
                    break;
                }
                above += (f64::from(c.1) - lse).exp();
            }
            match keep {
                Some(k) => {
                    cand.truncate(k);
                    break;
                }
                None if head == cand.len() => break,
                None => head = (head * 4).min(cand.len()),
            }
        }
    }
    if w.min_p > 0.0 {
        let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        // p < min_p * p_max  ⇔  s - s_max < ln(min_p)
        let floor = f64::from(max) + f64::from(w.min_p).ln();
        cand.retain(|c| f64::from(c.1) >= floor);
    }
    if w.typical_p > 0.0 && w.typical_p < 1.0 {
        let lse = log_sum_exp(&cand);
        let ent: f64 = cand
            .iter()
            .map(|c| {
                let lp = f64::from(c.1) - lse;
                -lp * lp.exp()
            })
            .sum();
        let mut by_typical: Vec<(f64, u32, f32)> =
            cand.iter().map(|c| (((f64::from(c.1) - lse) + ent).abs(), c.0, c.1)).collect();
        by_typical.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut mass = 0.0f64;
        let mut last = by_typical.len() - 1;
        for (i, x) in by_typical.iter().enumerate() {
            mass += (f64::from(x.2) - lse).exp();
            if mass >= f64::from(w.typical_p) {
                last = i;
                break;
            }
        }
        let cut = by_typical[last].0;
        let kept: std::collections::HashSet<u32> = by_typical.iter().filter(|x| x.0 <= cut).map(|x| x.1).collect();
        cand.retain(|c| kept.contains(&c.0));
    }
    let lse = log_sum_exp(&cand);
    let mut dist: Vec<(u32, f32)> = cand.iter().map(|c| (c.0, (f64::from(c.1) - lse).exp() as f32)).collect();
    dist.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    dist
}

fn log_sum_exp(c: &[(u32, f32)]) -> f64 {
    let max = c.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
    f64::from(max) + c.iter().map(|c| (f64::from(c.1) - f64::from(max)).exp()).sum::<f64>().ln()
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
        // Mass exactly reached by the head (0.4 + 0.3 = 0.7): transformers
        // removes tokens whose ascending cumulative mass is <= 1 - top_p, the
        // same two tokens.
        let d = distribution(&ln(&P), &Warpers { top_p: 0.7, ..Default::default() });
        assert_eq!(d.len(), 2);
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
        assert_eq!(d[0].0, 0);
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
