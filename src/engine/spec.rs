//! Speculative decoding without a draft model: a row's own prompt and output
//! propose its next tokens (prompt lookup, n-gram matching), and one forward
//! pass checks them all.
//!
//! How it stays exact. A row with proposal `x1..xm` runs `next, x1..xm` in
//! one step and gets logits for each of the m + 1 positions. Position j's
//! token is then chosen exactly as a step without speculation would choose
//! it (the same processors, warpers, constraint mask and stop checks, with
//! the history of the tokens before it, and one draw of the row's own
//! generator when sampling); while that token equals the proposal the next
//! position is read, and the first one that differs (or the one after the
//! last proposal) ends the run. For sampling this is the rejection rule for
//! a point-mass proposal — x is accepted with probability p(x), and on
//! rejection the token is drawn from p with x removed, renormalised — drawn
//! the way that leaves the generator exactly where a step-by-step decode
//! leaves it, so a seed gives the same tokens with speculation on or off,
//! whatever the scheduler decided step by step. Rejected positions are left
//! in the cache beyond the row's length (`Backend::rollback`): never copied,
//! never attended to, overwritten by the next step.
//!
//! When to speculate is decided per step (`plan`): a step of more positions
//! costs more, and a batch that is already compute-bound gains nothing from
//! guesses. Each row's acceptance rate is measured, the step's cost as a
//! function of the positions it runs is fitted from the worker's own steps
//! (`CostModel`), and the step length with the most expected tokens per
//! second is run — often one position, that is, no speculation.
//!
//! Learned from vLLM's `ngram` proposer, TGI's n-gram speculation, llama.cpp's
//! prompt lookup and transformers' `prompt_lookup_num_tokens`; the exact
//! sampling rule and the per-step cost model are ours.

/// The server's speculation settings (`--spec-*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecConfig {
    /// Most tokens a row proposes per step (0: speculation off unless a
    /// request turns it on).
    pub tokens: usize,
    /// The n-gram lengths looked up, longest first.
    pub ngram_min: usize,
    pub ngram_max: usize,
    /// Decide per step from measured costs and acceptance (`plan`); without
    /// it every row with a proposal speculates whenever the backend can.
    pub adaptive: bool,
}

impl Default for SpecConfig {
    fn default() -> Self {
        SpecConfig { tokens: 0, ngram_min: 2, ngram_max: 4, adaptive: true }
    }
}

/// What a request that turns speculation on without a number proposes,
/// when the server's own default is off.
pub const DEFAULT_SPEC_TOKENS: usize = 12;

/// Where proposals come from: a draft model could be another.
pub trait Proposer: Send {
    /// Appends to `out` at most `max` tokens that may follow `history`.
    fn propose(&self, history: &[u32], max: usize, out: &mut Vec<u32>);
}

/// Prompt lookup: the longest suffix of the history (`max` down to `min`
/// tokens) that occurred earlier proposes what followed its latest earlier
/// occurrence. The continuation may run into the suffix itself, as a copy
/// that overlaps its source does, so a loop of period p is extended by
/// whole periods.
#[derive(Debug, Clone, Copy)]
pub struct NgramProposer {
    pub min: usize,
    pub max: usize,
}

impl Proposer for NgramProposer {
    fn propose(&self, history: &[u32], max: usize, out: &mut Vec<u32>) {
        let len = history.len();
        if max == 0 || self.min == 0 {
            return;
        }
        for n in (self.min..=self.max.min(len.saturating_sub(1))).rev() {
            let suffix = &history[len - n..];
            // The latest earlier occurrence: it ends at `end` < len.
            let found = (n..len).rev().find(|&end| &history[end - n..end] == suffix);
            if let Some(end) = found {
                let start = out.len();
                for j in 0..max {
                    let at = end + j;
                    let token = if at < len { history[at] } else { out[start + at - len] };
                    out.push(token);
                }
                return;
            }
        }
    }
}

/// A row's speculation: how far it may propose and how often its
/// proposals were right.
#[derive(Debug, Clone, PartialEq)]
pub struct RowSpec {
    /// Most tokens it proposes per step.
    pub tokens: usize,
    /// The proposal of the step being run (empty when it runs one position).
    pub proposal: Vec<u32>,
    /// The last verification: tokens proposed and accepted (for the
    /// metrics; taken by the worker).
    pub last: (usize, usize),
    /// Accepted proposals and checked positions, decayed (per verify).
    accepted: f64,
    trials: f64,
}

/// Prior of the acceptance rate (as `PRIOR_WEIGHT` positions' worth).
const PRIOR_ACCEPT: f64 = 0.5;
const PRIOR_WEIGHT: f64 = 2.0;
/// Weight of a row's past verifications against its latest one.
const ROW_DECAY: f64 = 0.6;

impl RowSpec {
    pub fn new(tokens: usize) -> Self {
        RowSpec { tokens, proposal: Vec::new(), last: (0, 0), accepted: 0.0, trials: 0.0 }
    }

    /// Estimated chance that the next proposed token is accepted, given the
    /// ones before it were.
    pub fn rate(&self) -> f64 {
        (self.accepted + PRIOR_ACCEPT * PRIOR_WEIGHT) / (self.trials + PRIOR_WEIGHT)
    }

    /// Records a verification: of `proposed` tokens the first `accepted`
    /// were right (a run of successes ended by a failure, unless all were).
    pub fn record(&mut self, proposed: usize, accepted: usize) {
        if proposed == 0 {
            return;
        }
        self.last = (proposed, accepted);
        let failed = usize::from(accepted < proposed);
        self.accepted = ROW_DECAY * self.accepted + accepted as f64;
        self.trials = ROW_DECAY * self.trials + (accepted + failed) as f64;
    }
}

/// Expected tokens accepted out of `k` proposed at acceptance rate `q`:
/// q + q² + … + q^k (each is accepted only after all before it).
pub fn expected_accepted(q: f64, k: usize) -> f64 {
    let mut sum = 0.0;
    let mut p = 1.0;
    for _ in 0..k {
        p *= q;
        sum += p;
    }
    sum
}

/// A worker's step time as `a + c × positions`, fitted by least squares over
/// its recent steps (exponentially forgotten). While the steps seen do not
/// vary enough in size to fit a slope, the slope is the prior `a / 8`
/// (measured on 2 cores with GPT-2 small: a step of 9 positions costs about
/// twice one of 1; the fit takes over once steps of other sizes ran).
#[derive(Debug, Clone, Default)]
pub struct CostModel {
    n: f64,
    p: f64,
    pp: f64,
    t: f64,
    pt: f64,
}

const COST_DECAY: f64 = 0.995;
const PRIOR_FIXED_POSITIONS: f64 = 8.0;

impl CostModel {
    /// A step of `positions` took `seconds`.
    pub fn observe(&mut self, positions: usize, seconds: f64) {
        let p = positions as f64;
        self.n = COST_DECAY * self.n + 1.0;
        self.p = COST_DECAY * self.p + p;
        self.pp = COST_DECAY * self.pp + p * p;
        self.t = COST_DECAY * self.t + seconds;
        self.pt = COST_DECAY * self.pt + p * seconds;
    }

    /// `(a, c)`: fixed seconds per step and seconds per position; `None`
    /// before any step was seen.
    pub fn fit(&self) -> Option<(f64, f64)> {
        if self.n < 1.0 {
            return None;
        }
        let (mp, mt) = (self.p / self.n, self.t / self.n);
        let var = self.pp / self.n - mp * mp;
        let prior = |mt: f64, mp: f64| {
            let a = mt * PRIOR_FIXED_POSITIONS / (PRIOR_FIXED_POSITIONS + mp);
            (a, a / PRIOR_FIXED_POSITIONS)
        };
        // Positions must spread by more than a couple to give a slope.
        if var < 2.0 {
            return Some(prior(mt, mp));
        }
        let c = (self.pt / self.n - mp * mt) / var;
        let a = mt - c * mp;
        if c <= 0.0 || a < 0.0 {
            // Noise, or a slope the intercept cannot carry: keep the prior
            // shape around the mean.
            return Some(prior(mt, mp));
        }
        Some((a, c))
    }
}

/// One row's part in a step's decision: tokens it has proposed and its
/// acceptance rate.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub proposed: usize,
    pub rate: f64,
}

/// Positions per row for this step (1: no speculation), at most `room`:
/// the length whose expected tokens per second is highest under `cost`,
/// for a run of `rows` rows (the candidates among them, the others run one
/// position's worth of tokens but are padded to the step's length).
/// Without `cost` (`adaptive` off) the longest proposal runs.
pub fn plan(rows: usize, candidates: &[Candidate], room: usize, cost: Option<(f64, f64)>) -> usize {
    let longest = candidates.iter().map(|c| c.proposed).max().unwrap_or(0);
    let top = (longest + 1).min(room).max(1);
    let Some((a, c)) = cost else { return top };
    let rate = |s: usize| {
        let tokens: f64 =
            rows as f64 + candidates.iter().map(|k| expected_accepted(k.rate, k.proposed.min(s - 1))).sum::<f64>();
        tokens / (a + c * (rows * s) as f64)
    };
    let base = rate(1);
    let (mut best, mut best_rate) = (1, base);
    for s in 2..=top {
        let r = rate(s);
        if r > best_rate {
            (best, best_rate) = (s, r);
        }
    }
    // A gain within the noise of the fit is not worth a longer step.
    if best_rate < base * 1.03 { 1 } else { best }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn propose(history: &[u32], max: usize) -> Vec<u32> {
        let mut out = Vec::new();
        NgramProposer { min: 2, max: 4 }.propose(history, max, &mut out);
        out
    }

    #[test]
    fn the_latest_longest_match_proposes_what_followed_it() {
        // "1 2 3" occurs at 0 and at 5 (the latter followed by 9): latest wins.
        assert_eq!(propose(&[1, 2, 3, 7, 8, 1, 2, 3, 9, 4, 1, 2, 3], 2), vec![9, 4]);
        // The 3-gram "5 1 2" is nowhere earlier; the 2-gram "1 2" is.
        assert_eq!(propose(&[1, 2, 6, 0, 5, 1, 2], 3), vec![6, 0, 5]);
        // Nothing repeats: no proposal.
        assert_eq!(propose(&[1, 2, 3, 4, 5], 4), Vec::<u32>::new());
        // A single token never matches (min 2).
        assert_eq!(propose(&[7, 1, 7], 4), Vec::<u32>::new());
        assert_eq!(propose(&[1, 2], 4), Vec::<u32>::new());
    }

    #[test]
    fn a_loop_is_extended_by_whole_periods() {
        // Period 3: the continuation runs into the suffix and on.
        assert_eq!(propose(&[9, 1, 2, 3, 1, 2, 3], 7), vec![1, 2, 3, 1, 2, 3, 1]);
        // Period 1.
        assert_eq!(propose(&[5, 5, 5], 4), vec![5, 5, 5, 5]);
    }

    #[test]
    fn expected_acceptance_is_the_sum_of_powers() {
        assert_eq!(expected_accepted(0.5, 0), 0.0);
        assert!((expected_accepted(0.5, 3) - 0.875).abs() < 1e-12);
        assert!((expected_accepted(1.0, 5) - 5.0).abs() < 1e-12);
    }

    #[test]
    fn the_rate_follows_what_was_accepted() {
        let mut r = RowSpec::new(8);
        assert!((r.rate() - 0.5).abs() < 1e-12);
        for _ in 0..10 {
            r.record(8, 8);
        }
        assert!(r.rate() > 0.9, "{}", r.rate());
        for _ in 0..10 {
            r.record(8, 0);
        }
        assert!(r.rate() < 0.3, "{}", r.rate());
    }

    #[test]
    fn the_cost_model_fits_a_line_and_falls_back_to_its_prior() {
        let mut m = CostModel::default();
        assert!(m.fit().is_none());
        for _ in 0..5 {
            m.observe(4, 0.012);
        }
        // One size seen: the prior (a = 8c) through the mean.
        let (a, c) = m.fit().unwrap();
        assert!((a + 4.0 * c - 0.012).abs() < 1e-9 && (a - 8.0 * c).abs() < 1e-9);
        for p in [1, 8, 16, 32] {
            m.observe(p, 0.010 + 0.001 * p as f64);
        }
        for _ in 0..50 {
            for p in [1, 8, 16, 32] {
                m.observe(p, 0.010 + 0.001 * p as f64);
            }
        }
        let (a, c) = m.fit().unwrap();
        assert!((c - 0.001).abs() < 1e-4 && (a - 0.010).abs() < 2e-3, "{a} {c}");
    }

    #[test]
    fn the_plan_speculates_where_it_pays_and_not_where_it_does_not() {
        let sure = Candidate { proposed: 8, rate: 0.95 };
        let poor = Candidate { proposed: 8, rate: 0.03 };
        // One row, memory-bound (a = 20 ms, 1 ms a position): a long step.
        assert!(plan(1, &[sure], 9, Some((0.020, 0.001))) >= 6);
        // A poor guesser does not pay for the extra positions.
        assert_eq!(plan(1, &[poor], 9, Some((0.020, 0.001))), 1);
        // Sixteen rows, compute-bound (the positions dominate): no speculation
        // even for one sure row among them.
        assert_eq!(plan(16, &[sure], 9, Some((0.005, 0.003))), 1);
        // No proposal, or no room: one position.
        assert_eq!(plan(1, &[], 9, Some((0.020, 0.001))), 1);
        assert_eq!(plan(1, &[sure], 1, Some((0.020, 0.001))), 1);
        // Not adaptive: the longest proposal, within the room.
        assert_eq!(plan(16, &[poor], 9, None), 9);
        assert_eq!(plan(16, &[poor], 4, None), 4);
    }
}
