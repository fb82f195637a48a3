//! The worker's side of speculative decoding (`crate::engine::spec` has
//! the proposer, the acceptance estimate and the plan): how many tokens a
//! request's rows may propose, the proposals of a step, and what a step
//! that checked them leaves in the cache and the metrics.
use std::sync::atomic::Ordering;

use super::Worker;
use crate::engine::rows::{self, Row};
use crate::engine::spec;
use crate::telemetry;
use crate::validation::{Speculation, ValidRequest};

impl Worker {
    /// Most tokens a row of `req` proposes per step (0: it does not speculate).
    pub(super) fn spec_tokens(&self, req: &ValidRequest) -> usize {
        if req.decoding.beam.is_some() || !self.backend.speculates() {
            return 0;
        }
        match req.decoding.speculation {
            Speculation::Server => self.spec.tokens,
            Speculation::Off => 0,
            Speculation::On { tokens: 0 } if self.spec.tokens > 0 => self.spec.tokens,
            Speculation::On { tokens: 0 } => spec::DEFAULT_SPEC_TOKENS,
            Speculation::On { tokens } => tokens as usize,
        }
    }

    /// Fills the proposals of the step's rows that speculate and returns the
    /// positions per row the step runs (1: a plain decode step, and no row
    /// keeps a proposal). `input` and `from` are the step's rows as
    /// `decode` built them.
    pub(super) fn propose(&mut self, input: &[(usize, u32)], from: &[usize]) -> usize {
        if !self.rows.iter().any(|r| r.spec.is_some()) {
            return 1;
        }
        let slots: Vec<usize> = input.iter().map(|i| i.0).collect();
        let room = self.backend.verify_room(&slots);
        let cost = if self.spec.adaptive {
            match self.cost.fit() {
                Some(fit) => Some(fit),
                // Nothing measured yet: this step measures a plain one.
                None => return 1,
            }
        } else {
            None
        };
        let mut candidates = Vec::new();
        for (r, &f) in self.rows.iter_mut().zip(from) {
            let Some(spec) = r.spec.as_mut() else { continue };
            spec.proposal.clear();
            if f == rows::SKIP || room <= 1 {
                continue;
            }
            // Never past the request's last token, nor more tokens than its
            // client's channel has room for (each of its rows may send a run).
            let left = r.job.request.stop.max_new_tokens.saturating_sub(r.generated + 1) as usize;
            let channel = r.job.spare() / r.job.request.decoding.rows().max(1) as usize;
            let max = spec.tokens.min(room - 1).min(left).min(channel.saturating_sub(1));
            self.proposer.propose(&r.history.tokens, max, &mut spec.proposal);
            if !spec.proposal.is_empty() {
                candidates.push(spec::Candidate { proposed: spec.proposal.len(), rate: spec.rate() });
            }
        }
        let length = spec::plan(input.len(), &candidates, room, cost);
        for spec in self.rows.iter_mut().filter_map(|r| r.spec.as_mut()) {
            spec.proposal.truncate(length - 1);
        }
        length
    }

    /// After a step that checked proposals: each row's cache forgets the
    /// positions it did not keep, and the counts go to the metrics.
    pub(super) fn verified(&mut self, rows: &mut [Row]) {
        let (mut proposed, mut accepted) = (0, 0);
        for r in rows.iter_mut() {
            if r.rejected > 0 {
                self.backend.rollback(r.slot, r.rejected);
                r.rejected = 0;
            }
            if let Some(spec) = r.spec.as_mut() {
                let (p, a) = std::mem::take(&mut spec.last);
                if p > 0 {
                    metrics::histogram!(telemetry::SPEC_ROW_TOKENS).record((a + 1) as f64);
                }
                proposed += p;
                accepted += a;
            }
        }
        let stats = &self.shared.stats;
        stats.spec_steps.fetch_add(1, Ordering::Relaxed);
        stats.spec_proposed.fetch_add(proposed as u64, Ordering::Relaxed);
        stats.spec_accepted.fetch_add(accepted as u64, Ordering::Relaxed);
        metrics::counter!(telemetry::SPEC_STEPS).increment(1);
        metrics::counter!(telemetry::SPEC_PROPOSED).increment(proposed as u64);
        metrics::counter!(telemetry::SPEC_ACCEPTED).increment(accepted as u64);
    }
}
