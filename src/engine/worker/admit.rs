//! The worker's queue side: requests arriving from the router, the fair
//! queue they wait in, and admission into the batch (with preemption,
//! `super::preempt`) in the fair order.
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::prefill::Prefilling;
use super::{Worker, now};
use crate::engine::admission::{self, Candidate};
use crate::engine::{Event, Job};
use crate::telemetry;

impl Worker {
    /// At an idle worker: waits for more requests while they keep coming,
    /// each within `idle_gather_gap` of the last, so that a burst is
    /// prefilled in one run; a request arriving during a run would wait for
    /// all of it (on two cores a 16-prompt burst otherwise reached the worker
    /// in two or three parts).
    pub(super) fn gather(&mut self) {
        let start = now();
        loop {
            let mut queued = admission::Waiting::default();
            for c in self.queue.iter().map(|j| j.candidate()) {
                queued.rows += c.rows;
                queued.tokens += c.prompt_len;
            }
            if admission::gathered_enough(&self.limits, queued, start.elapsed()) {
                return;
            }
            let left = self.limits.idle_gather_max.saturating_sub(start.elapsed());
            std::thread::sleep(self.limits.idle_gather_gap.min(left));
            if self.receive() == 0 {
                return;
            }
        }
    }

    /// Moves the requests already sent to this worker into its queue;
    /// returns how many came.
    pub(super) fn receive(&mut self) -> usize {
        let before = self.queue.len();
        while let Ok(job) = self.rx.try_recv() {
            self.enqueue(Arc::new(job), false);
        }
        self.queue.len() - before
    }

    pub(super) fn enqueue(&mut self, job: Arc<Job>, resumed: bool) {
        if let Some(key) = &job.tenant.name {
            metrics::gauge!(telemetry::KEY_QUEUE_WAITING, "key" => key.to_string()).increment(1.0);
        }
        if resumed { self.queue.push_resumed(job) } else { self.queue.push(job) }
    }

    /// A request leaves the queue (admitted, or ended while waiting).
    /// `parked`: a preempted one, which the `--max-queue` count left out.
    pub(super) fn dequeued(&self, job: &Job, parked: bool) {
        if !parked {
            self.shared.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(key) = &job.tenant.name {
            metrics::gauge!(telemetry::KEY_QUEUE_WAITING, "key" => key.to_string()).decrement(1.0);
        }
    }

    /// Waiting requests whose client left, that were cancelled, or whose
    /// deadline passed never reach a prefill.
    pub(super) fn drop_abandoned(&mut self) {
        let t = now();
        for job in self.queue.take_ended(|job| job.ended_reason(t).is_some()) {
            let reason = job.ended_reason(t).flatten();
            let parked = self.parked_index(&job);
            match parked {
                Some(k) => self.end_parked(k, reason),
                None => job.tell_ended(reason),
            }
            self.dequeued(&job, parked.is_some());
        }
    }

    /// What the running and prefilling requests hold and may still add.
    pub(super) fn running(&self) -> Vec<Candidate> {
        let rows = self.rows.iter().map(|r| {
            let stop = &r.job.request.stop;
            Candidate {
                prompt_len: r.job.request.prompt_ids.len() + r.generated as usize,
                max_new_tokens: (stop.max_new_tokens - r.generated) as usize,
                rows: 1,
            }
        });
        rows.chain(self.prefilling.iter().map(|p| p.job.candidate())).collect()
    }

    /// Admits what fits from the head of the fair order; then, while the
    /// head does not fit, lets it preempt running requests (`preempt`).
    pub(super) fn admit(&mut self) {
        // Each preemption starts the head, so this ends; the bound is a guard.
        for _ in 0..=self.limits.max_batch_size {
            self.admit_fitting();
            let Some(head) = self.preempt() else { break };
            // The room made is the head's: it starts now. (The requests put
            // back may come before it in the fair order, and taking them
            // first would resume them into that room, over and over.)
            let Some(lane) = self.queue.lane_of(&head) else { break };
            let started = self.start(lane, &head);
            self.queue.prune();
            if !started {
                break;
            }
        }
    }

    pub(super) fn admit_fitting(&mut self) {
        let running = self.running();
        let order = self.queue.order();
        let n = self.backend.admit(&self.limits, &running, &mut order.iter().map(|(_, j)| j.candidate()));
        for (lane, next) in order.into_iter().take(n) {
            if !self.start(lane, &next) {
                break;
            }
        }
        self.queue.prune();
    }

    /// Takes `next`, the head of queue lane `lane`, into the batch: into the
    /// prefilling list, or its rows back into the batch when it was
    /// preempted. False when there are not slots enough.
    pub(super) fn start(&mut self, lane: usize, next: &Arc<Job>) -> bool {
        let parked = self.parked_index(next);
        let rows = match parked {
            Some(k) => self.parked[k].rows(),
            None => next.request.decoding.rows() as usize,
        };
        let Some(slots) = self.backend.alloc(rows) else { return false };
        let job = self.queue.take(lane);
        debug_assert!(Arc::ptr_eq(&job, next), "taken in the order given");
        if let Some(k) = parked {
            self.dequeued(&job, true);
            self.resume(k, slots);
            return true;
        }
        if let Some(key) = &job.tenant.name {
            let waited = now().duration_since(job.request.arrival).as_secs_f64();
            metrics::histogram!(telemetry::KEY_QUEUE_DURATION, "key" => key.to_string()).record(waited);
        }
        if !self.rows.is_empty() || !self.prefilling.is_empty() {
            // Joining a running batch (what it costs in copies, if
            // anything, the backend reports).
            self.shared.stats.joins.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(telemetry::BATCH_JOINS, "worker" => self.shared.id.to_string()).increment(1);
        }
        tracing::debug!(parent: &job.span, worker = self.shared.id, "admitted");
        self.dequeued(&job, false);
        let _ = job.send(Event::Started { at: now() });
        self.prefilling.push_back(Prefilling { job, slots, done: 0, cached: 0 });
        true
    }
}
