//! The worker's side of preemption (`crate::engine::preempt` decides who):
//! a running request's rows leave the batch with their caches copied out
//! (`Backend::swap_out`), the request goes back into the fair queue ahead of
//! its tenant's new ones, and when the queue takes it again its rows get
//! free slots, their caches copied back in, and go on where they stopped.
//! Also the order in which admitted prompts are prefilled: the tenants
//! holding least of the batch first.
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Worker;
use crate::engine::admission::Candidate;
use crate::engine::backend::Swapped;
use crate::engine::fair::Tenant;
use crate::engine::preempt::{self, Held, Reason};
use crate::engine::rows::Row;
use crate::engine::{EngineError, Event, Job};
use crate::telemetry;

/// A preempted request: its live rows, out of the batch, and their caches.
pub(super) struct Parked {
    pub(super) job: Arc<Job>,
    rows: Vec<Row>,
    swapped: Vec<Swapped>,
}

impl Parked {
    fn bytes(&self) -> usize {
        self.swapped.iter().map(Swapped::bytes).sum()
    }

    /// Rows it needs slots for to resume.
    pub(super) fn rows(&self) -> usize {
        self.rows.len()
    }
}

/// `job` as the policy sees it, holding `candidate`; not movable until
/// said. Tenant ids come from `seen`: equal for equal key names.
fn as_held(seen: &mut Vec<Option<Arc<str>>>, job: &Job, candidate: Candidate) -> Held {
    let name = &job.tenant.name;
    let tenant = seen.iter().position(|n| n == name).unwrap_or_else(|| {
        seen.push(name.clone());
        seen.len() - 1
    });
    Held { tenant, weight: job.tenant.weight, priority: job.request.priority, candidate, movable: false, bytes: 0 }
}

impl Worker {
    /// The parked request `job` is, if it is one.
    pub(super) fn parked_index(&self, job: &Arc<Job>) -> Option<usize> {
        self.parked.iter().position(|p| Arc::ptr_eq(&p.job, job))
    }

    /// When the waiting requests do not fit beside the running ones, moves
    /// out those the policy lets a waiting request take the place of: for
    /// the first request of each tenant in the fair order, the head first.
    /// (A tenant's first request may be stuck behind another tenant's head
    /// that fits nowhere yet and may preempt nobody, such as a preempted
    /// request waiting to resume; the head keeps every room that frees, so
    /// it still never starves.) Returns the request room was made for: it
    /// fits now.
    pub(super) fn preempt(&mut self) -> Option<Arc<Job>> {
        if self.swap_budget == 0 || self.rows.is_empty() {
            return None;
        }
        // The running requests, each with the indices of its rows.
        let mut groups: Vec<(Arc<Job>, Vec<usize>)> = Vec::new();
        for (i, r) in self.rows.iter().enumerate() {
            match groups.iter_mut().find(|(j, _)| Arc::ptr_eq(j, &r.job)) {
                Some(g) => g.1.push(i),
                None => groups.push((r.job.clone(), vec![i])),
            }
        }
        let mut seen = Vec::new();
        let held: Vec<Held> = groups
            .iter()
            .map(|(job, rows)| {
                // What its live rows hold and may add (rows that ended are gone).
                let mut h = as_held(&mut seen, job, Candidate { rows: rows.len(), ..job.candidate() });
                h.movable = rows.iter().all(|&i| !self.rows[i].done);
                h.bytes = rows.iter().map(|&i| self.backend.swap_bytes(self.rows[i].slot)).sum();
                h
            })
            .collect();
        let prefilling: Vec<Candidate> = self.prefilling.iter().map(|p| p.job.candidate()).collect();
        let room = self.swap_budget.saturating_sub(self.swap_used);
        let mut tried = Vec::new();
        for (_, head) in self.queue.order() {
            if tried.contains(&head.tenant.name) {
                continue;
            }
            tried.push(head.tenant.name.clone());
            let head_held = as_held(&mut seen, &head, head.candidate());
            let (backend, limits) = (&self.backend, &self.limits);
            let fits = |kept: &[bool]| {
                let mut running: Vec<Candidate> =
                    held.iter().zip(kept).filter(|(_, k)| **k).map(|(h, _)| h.candidate).collect();
                running.extend_from_slice(&prefilling);
                backend.admit(limits, &running, &mut std::iter::once(head.candidate())) == 1
            };
            if let Some(victims) = preempt::victims(&held, &head_held, room, fits) {
                for (i, reason) in victims {
                    self.park(&groups[i].0, reason);
                }
                return Some(head);
            }
        }
        None
    }

    /// Moves `job`'s rows out of the batch, their caches swapped out, and
    /// puts it back into the queue.
    fn park(&mut self, job: &Arc<Job>, reason: Reason) {
        let (rows, others): (Vec<Row>, Vec<Row>) =
            std::mem::take(&mut self.rows).into_iter().partition(|r| Arc::ptr_eq(&r.job, job));
        self.rows = others;
        let slots: Vec<usize> = rows.iter().map(|r| r.slot).collect();
        let swapped: Result<Vec<Swapped>, _> = slots.iter().map(|&s| self.backend.swap_out(s)).collect();
        self.backend.free(&slots);
        self.record_copies();
        let swapped = match swapped {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(parent: &job.span, worker = self.shared.id, "preemption failed: {e}");
                let _ = job.send(Event::Failed(EngineError::from(e)));
                return;
            }
        };
        let parked = Parked { job: job.clone(), rows, swapped };
        tracing::debug!(
            parent: &job.span,
            worker = self.shared.id,
            reason = reason.label(),
            rows = parked.rows.len(),
            bytes = parked.bytes(),
            "preempted"
        );
        self.swap_used += parked.bytes();
        self.parked.push(parked);
        self.shared.stats.preemptions.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(telemetry::PREEMPTIONS, "reason" => reason.label()).increment(1);
        if let Some(key) = &job.tenant.name {
            metrics::counter!(telemetry::KEY_PREEMPTIONS, "key" => key.to_string()).increment(1);
        }
        self.enqueue(job.clone(), true);
    }

    /// Puts parked request `k` back into the batch in `slots` (one per row).
    pub(super) fn resume(&mut self, k: usize, slots: Vec<usize>) {
        let mut p = self.parked.swap_remove(k);
        self.swap_used -= p.bytes();
        let mut result = Ok(());
        for ((row, swapped), &slot) in p.rows.iter_mut().zip(&p.swapped).zip(&slots) {
            row.slot = slot;
            result = result.and_then(|()| self.backend.swap_in(slot, swapped));
        }
        self.record_copies();
        if let Err(e) = result {
            tracing::error!(parent: &p.job.span, worker = self.shared.id, "resuming a preempted request failed: {e}");
            let _ = p.job.send(Event::Failed(EngineError::from(e)));
            self.backend.free(&slots);
            return;
        }
        tracing::debug!(parent: &p.job.span, worker = self.shared.id, "resumed");
        self.rows.extend(p.rows);
    }

    /// A parked request that ended while it waited (cancelled, deadline,
    /// client gone): its rows end as running rows would, with the text they
    /// held back.
    pub(super) fn end_parked(&mut self, k: usize, reason: Option<crate::pb::FinishReason>) {
        let mut p = self.parked.swap_remove(k);
        self.swap_used -= p.bytes();
        for row in &mut p.rows {
            row.end(&self.tokenizer, reason);
        }
    }

    /// Puts the admitted prompts of the tenants that hold least of the batch
    /// (tokens of their running rows / weight) first, each tenant's in
    /// admission order: a key's short prompt is not prefilled after another
    /// key's long one, chunk by chunk.
    pub(super) fn order_prefills(&mut self) {
        if self.prefilling.len() < 2 {
            return;
        }
        let held = |tenant: &Tenant| -> f64 {
            let tokens: usize = self
                .rows
                .iter()
                .filter(|r| r.job.tenant.name == tenant.name)
                .map(|r| r.job.request.prompt_ids.len() + r.job.request.stop.max_new_tokens as usize)
                .sum();
            tokens as f64 / f64::from(tenant.weight.max(1))
        };
        let keys: Vec<f64> = self.prefilling.iter().map(|p| held(&p.job.tenant)).collect();
        if keys.windows(2).all(|w| w[0] <= w[1]) {
            return;
        }
        let mut order: Vec<usize> = (0..keys.len()).collect();
        order.sort_by(|&a, &b| keys[a].total_cmp(&keys[b]));
        let mut old: Vec<Option<_>> = std::mem::take(&mut self.prefilling).into_iter().map(Some).collect();
        self.prefilling = order.into_iter().map(|i| old[i].take().expect("each once")).collect();
    }
}
