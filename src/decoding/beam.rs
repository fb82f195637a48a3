//! Beam search, scored exactly as transformers' `generate()` (4.57) does it:
//! each step keeps the top 2 × num_beams continuations over all beams, the
//! best num_beams of those that did not stop run on, and those among the top
//! num_beams that stopped (EOS, or the length limit) become finished
//! hypotheses scored `sum(logprob) / generated_len ** length_penalty`. The
//! search ends when no running beam can beat the worst finished one (or, with
//! early_stopping, when num_beams hypotheses are finished).
use crate::decoding::sampling::Choice;
use crate::pb::FinishReason;

/// A validated beam search request.
#[derive(Debug, Clone, PartialEq)]
pub struct BeamPlan {
    pub num_beams: usize,
    pub length_penalty: f32,
    pub early_stopping: bool,
    pub num_return_sequences: usize,
}

/// A finished hypothesis.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    /// Tokens with the model's own log-probabilities (for logprob_sum).
    pub tokens: Vec<Choice>,
    /// Length-penalised score.
    pub score: f32,
    pub finish: FinishReason,
}

/// What one step decided for the beams' rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Row `j` continues beam `parents[j]` (reorder the KV rows so).
    pub parents: Vec<usize>,
    /// The token each row feeds next.
    pub tokens: Vec<u32>,
    pub done: bool,
}

const NEG: f32 = -1.0e9;

pub struct BeamSearch {
    plan: BeamPlan,
    max_new_tokens: u32,
    /// Tokens that end a hypothesis (EOS, stop token ids).
    stop_ids: Vec<u32>,
    running_scores: Vec<f32>,
    running_tokens: Vec<Vec<Choice>>,
    finished: Vec<Hypothesis>,
    heuristic_unsatisfied: bool,
    generated: u32,
}

impl BeamSearch {
    pub fn new(plan: BeamPlan, max_new_tokens: u32, stop_ids: Vec<u32>) -> Self {
        let n = plan.num_beams;
        let mut running_scores = vec![NEG; n];
        running_scores[0] = 0.0;
        BeamSearch {
            plan,
            max_new_tokens,
            stop_ids,
            running_scores,
            running_tokens: vec![Vec::new(); n],
            finished: Vec::new(),
            heuristic_unsatisfied: true,
            generated: 0,
        }
    }

    /// One step. `log_probs[b]` are beam b's processed log-probabilities;
    /// `report(b, token)` gives the token's raw log-probability and
    /// alternatives under the model for reporting.
    pub fn step(&mut self, log_probs: &[Vec<f32>], report: &dyn Fn(usize, u32) -> Choice) -> Step {
        let n = self.plan.num_beams;
        let k = 2 * n;
        // Top k of each beam's accumulated scores, then top k of those.
        let mut cands: Vec<(f32, usize, u32)> = Vec::with_capacity(n * k);
        for (b, row) in log_probs.iter().enumerate() {
            let mut idx: Vec<u32> = (0..row.len() as u32).collect();
            let by = |a: &u32, c: &u32| row[*c as usize].total_cmp(&row[*a as usize]).then(a.cmp(c));
            if k < idx.len() {
                idx.select_nth_unstable_by(k - 1, by);
                idx.truncate(k);
            }
            cands.extend(idx.into_iter().map(|t| (row[t as usize] + self.running_scores[b], b, t)));
        }
        cands.sort_by(|a, c| c.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(c.1, c.2))));
        cands.truncate(k);
        let at_length = self.generated + 1 >= self.max_new_tokens;
        let hits: Vec<bool> = cands.iter().map(|c| at_length || self.stop_ids.contains(&c.2)).collect();

        // Finished hypotheses: only among the top n, if they can still count.
        let full = self.plan.early_stopping && self.finished.len() == n;
        if !full && self.heuristic_unsatisfied {
            let norm = ((self.generated + 1) as f32).powf(self.plan.length_penalty);
            for (c, _) in cands.iter().zip(&hits).take(n).filter(|(_, h)| **h) {
                let mut tokens = self.running_tokens[c.1].clone();
                tokens.push(report(c.1, c.2));
                let finish = if self.stop_ids.contains(&c.2) { FinishReason::Eos } else { FinishReason::Length };
                self.finished.push(Hypothesis { tokens, score: c.0 / norm, finish });
            }
            self.finished.sort_by(|a, b| b.score.total_cmp(&a.score));
            self.finished.truncate(n);
        }

        // Running beams: the best n continuations that did not stop.
        let mut order: Vec<(f32, usize)> =
            cands.iter().zip(&hits).enumerate().map(|(i, (c, h))| (if *h { c.0 + NEG } else { c.0 }, i)).collect();
        order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let (mut parents, mut tokens, mut scores, mut paths) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for &(score, i) in order.iter().take(n) {
            let (_, b, t) = cands[i];
            let mut path = self.running_tokens[b].clone();
            path.push(report(b, t));
            parents.push(b);
            tokens.push(t);
            scores.push(score);
            paths.push(path);
        }
        self.running_scores = scores;
        self.running_tokens = paths;
        self.generated += 1;

        let worst = if self.finished.len() == n { self.finished.last().map_or(NEG, |h| h.score) } else { NEG };
        let best_possible = self.running_scores[0] / (self.generated as f32).powf(self.plan.length_penalty);
        self.heuristic_unsatisfied &= best_possible > worst;
        let open = !(self.plan.early_stopping && self.finished.len() == n);
        let done = !(self.heuristic_unsatisfied && open && !hits.iter().all(|h| *h));
        Step { parents, tokens, done }
    }

    /// The hypotheses to return, best first.
    pub fn results(&self) -> Vec<Hypothesis> {
        self.finished.iter().take(self.plan.num_return_sequences).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choice(_: usize, t: u32) -> Choice {
        Choice { id: t, logprob: 0.0, top: Vec::new() }
    }

    fn lp(ps: &[f32]) -> Vec<f32> {
        ps.iter().map(|p| p.ln()).collect()
    }

    #[test]
    fn the_first_step_expands_beam_zero_only() {
        let plan = BeamPlan { num_beams: 2, length_penalty: 1.0, early_stopping: false, num_return_sequences: 2 };
        let mut s = BeamSearch::new(plan, 5, vec![3]);
        let rows = vec![lp(&[0.1, 0.5, 0.3, 0.1]), lp(&[0.1, 0.5, 0.3, 0.1])];
        let step = s.step(&rows, &choice);
        assert_eq!(step.parents, vec![0, 0]);
        assert_eq!(step.tokens, vec![1, 2]);
        assert!(!step.done);
    }

    #[test]
    fn hypotheses_end_on_eos_with_length_penalised_scores() {
        let plan = BeamPlan { num_beams: 2, length_penalty: 1.0, early_stopping: true, num_return_sequences: 2 };
        let mut s = BeamSearch::new(plan, 10, vec![3]);
        // Step 1: EOS (3) is best: it finishes, the next two run on.
        let step = s.step(&[lp(&[0.05, 0.25, 0.2, 0.5]), lp(&[0.25; 4])], &choice);
        assert_eq!(step.tokens, vec![1, 2]);
        assert_eq!(s.finished.len(), 1);
        assert!((s.finished[0].score - 0.5f32.ln()).abs() < 1e-6);
        // Step 2: both beams' EOS are in the top 2: two finished, early stop.
        let step = s.step(&[lp(&[0.01, 0.01, 0.01, 0.97]), lp(&[0.01, 0.01, 0.01, 0.97])], &choice);
        assert!(step.done);
        let r = s.results();
        assert_eq!(r.len(), 2);
        assert!((r[0].score - 0.5f32.ln()).abs() < 1e-6);
        assert!((r[1].score - (0.25f32.ln() + 0.97f32.ln()) / 2.0).abs() < 1e-6);
        assert_eq!(r[1].tokens.iter().map(|c| c.id).collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn the_length_limit_finishes_the_top_beams() {
        let plan = BeamPlan { num_beams: 2, length_penalty: 1.0, early_stopping: false, num_return_sequences: 1 };
        let mut s = BeamSearch::new(plan, 1, vec![3]);
        let step = s.step(&[lp(&[0.1, 0.6, 0.2, 0.1]), lp(&[0.25; 4])], &choice);
        assert!(step.done);
        let r = s.results();
        assert_eq!(r[0].finish, FinishReason::Length);
        assert_eq!(r[0].tokens[0].id, 1);
    }
}
