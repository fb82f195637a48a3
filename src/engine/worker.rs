//! One worker: an OS thread that owns a backend (a model and its KV cache)
//! and the running batch. Each iteration it admits waiting requests (each
//! takes slots), ends rows that finished, were cancelled or ran past their
//! deadline, prefills prompts (in chunks of at most `--max-prefill-tokens`
//! per iteration where the backend can), and runs one decode step for every
//! decoding row. It never learns how the backend lays out its cache.
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::mpsc;

mod admit;
mod preempt;
mod prefill;
mod spec;
use preempt::Parked;
use prefill::Prefilling;

use super::admission;
use super::backend::{Backend, Copies};
use super::fair::FairQueue;
use super::rows::{self, Row, choose};
use super::spec::{CostModel, NgramProposer, Proposer, SpecConfig};
use super::stats::Snapshot;
use super::{EngineError, Event, Job, WorkerShared};
use crate::pb::FinishReason;
use crate::telemetry;
use crate::tokenizer::Tokenizer;

pub(super) struct Worker {
    backend: Box<dyn Backend>,
    limits: admission::Limits,
    shared: Arc<WorkerShared>,
    rx: mpsc::UnboundedReceiver<Job>,
    /// Waiting requests, shared fairly between keys (`fair`).
    queue: FairQueue,
    prefilling: VecDeque<Prefilling>,
    rows: Vec<Row>,
    /// Turns chosen tokens into text (stop sequences are matched here).
    tokenizer: Tokenizer,
    spec: SpecConfig,
    proposer: Box<dyn Proposer>,
    /// This worker's decode step time by positions run (`spec::plan`).
    cost: CostModel,
    /// Preempted requests (also in `queue`, to be taken again).
    parked: Vec<Parked>,
    /// Bytes their swapped-out caches may take (0: no preemption), and take.
    swap_budget: usize,
    swap_used: usize,
}

fn now() -> Instant {
    Instant::now()
}

impl Worker {
    pub fn new(
        backend: Box<dyn Backend>,
        config: &super::EngineConfig,
        shared: Arc<WorkerShared>,
        rx: mpsc::UnboundedReceiver<Job>,
        tokenizer: Tokenizer,
    ) -> Self {
        let (queue, prefilling, rows) = (FairQueue::default(), VecDeque::new(), Vec::new());
        let spec = config.spec;
        let proposer = Box::new(NgramProposer { min: spec.ngram_min, max: spec.ngram_max });
        let limits = config.limits;
        let cost = CostModel::default();
        let swap_budget = if backend.swaps() { config.preemption_swap_bytes } else { 0 };
        Worker {
            backend,
            limits,
            shared,
            rx,
            queue,
            prefilling,
            rows,
            tokenizer,
            spec,
            proposer,
            cost,
            parked: Vec::new(),
            swap_budget,
            swap_used: 0,
        }
    }

    pub fn run(mut self) {
        let mut since = Snapshot::of(&self.shared.stats);
        loop {
            if self.rows.is_empty() && self.queue.is_empty() && self.prefilling.is_empty() {
                self.publish();
                let now = Snapshot::of(&self.shared.stats);
                if now.steps > since.steps {
                    tracing::info!(worker = self.shared.id, "busy period: {}", now.minus(&since));
                    since = now;
                }
                match self.rx.blocking_recv() {
                    Some(job) => self.enqueue(Arc::new(job), false),
                    None => return,
                }
                self.gather();
            }
            self.receive();
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| self.iteration()));
            if let Err(panic) = result {
                let e = EngineError::Panic(super::panic_text(&panic));
                tracing::error!(
                    worker = self.shared.id,
                    "worker panicked; failing its running requests and restarting: {e}"
                );
                self.shared.stats.restarts.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(telemetry::WORKER_RESTARTS, "worker" => self.shared.id.to_string()).increment(1);
                self.fail_running(e);
            }
            self.publish();
        }
    }

    fn iteration(&mut self) {
        let t0 = now();
        let stats = &self.shared.stats;
        let runs_before = stats.run_ns.load(Ordering::Relaxed) + stats.prefill_ns.load(Ordering::Relaxed);
        self.drop_abandoned();
        // Rows that ended give their room to the waiting before admission.
        self.evict();
        self.admit();
        self.prefill();
        if !self.rows.is_empty() {
            self.decode();
        }
        let elapsed = t0.elapsed().as_nanos() as u64;
        let stats = &self.shared.stats;
        stats.iteration_ns.fetch_add(elapsed, Ordering::Relaxed);
        let runs = stats.run_ns.load(Ordering::Relaxed) + stats.prefill_ns.load(Ordering::Relaxed) - runs_before;
        metrics::histogram!(telemetry::STEP_OVERHEAD).record(elapsed.saturating_sub(runs) as f64 / 1e9);
    }

    /// Publishes the batch's state (rows, queue, KV use) to the router and
    /// to the metrics.
    fn publish(&self) {
        let (rows, queued) = (self.rows.len(), self.queue.len() + self.prefilling.len());
        self.shared.publish(rows);
        let worker = self.shared.id.to_string();
        let used = self.backend.held_tokens();
        metrics::gauge!(telemetry::BATCH_ROWS, "worker" => worker.clone()).set(rows as f64);
        metrics::gauge!(telemetry::KV_USED_TOKENS, "worker" => worker.clone()).set(used as f64);
        metrics::gauge!(telemetry::KV_USED_RATIO, "worker" => worker.clone())
            .set(used as f64 / self.limits.max_batch_tokens.max(1) as f64);
        metrics::gauge!(telemetry::WORKER_BUSY, "worker" => worker.clone()).set(if rows + queued > 0 {
            1.0
        } else {
            0.0
        });
        metrics::gauge!(telemetry::PREEMPTED_REQUESTS, "worker" => worker.clone()).set(self.parked.len() as f64);
        metrics::gauge!(telemetry::PREEMPTED_BYTES, "worker" => worker).set(self.swap_used as f64);
        metrics::gauge!(telemetry::QUEUE_WAITING).set(self.shared.waiting.load(Ordering::Relaxed) as f64);
    }

    /// Records the KV copies the backend's last calls made.
    fn record_copies(&mut self) {
        let c: Copies = self.backend.take_copies();
        let stats = &self.shared.stats;
        if c.join_bytes > 0 {
            stats.join_bytes.fetch_add(c.join_bytes as u64, Ordering::Relaxed);
            stats.join_ns.fetch_add(c.join_ns, Ordering::Relaxed);
            record_copy("join", c.join_ns, c.join_bytes);
        }
        if c.hit_bytes > 0 {
            record_copy("prefix_hit", c.hit_ns, c.hit_bytes);
        }
        if c.store_bytes > 0 {
            record_copy("prefix_store", c.store_ns, c.store_bytes);
        }
        if c.swap_out_bytes + c.swap_in_bytes > 0 {
            stats.swap_ns.fetch_add(c.swap_out_ns + c.swap_in_ns, Ordering::Relaxed);
        }
        if c.swap_out_bytes > 0 {
            record_copy("swap_out", c.swap_out_ns, c.swap_out_bytes);
        }
        if c.swap_in_bytes > 0 {
            record_copy("swap_in", c.swap_in_ns, c.swap_in_bytes);
        }
        if c.evict_bytes > 0 {
            stats.evict_copies.fetch_add(1, Ordering::Relaxed);
            stats.evict_bytes.fetch_add(c.evict_bytes as u64, Ordering::Relaxed);
            stats.evict_ns.fetch_add(c.evict_ns, Ordering::Relaxed);
            record_copy("evict", c.evict_ns, c.evict_bytes);
        }
    }

    /// Applies a beam group's reordering to the cache.
    fn reorder(&mut self, rows: &[Row], start: usize, perm: &[usize]) -> bool {
        let slots: Vec<usize> = rows[start..start + perm.len()].iter().map(|r| r.slot).collect();
        let t = now();
        match self.backend.reorder(&slots, perm) {
            Ok(bytes) => {
                record_copy("beam_reorder", t.elapsed().as_nanos() as u64, bytes);
                true
            }
            Err(e) => {
                tracing::error!(worker = self.shared.id, "beam reorder failed: {e}");
                false
            }
        }
    }

    /// Ends finished, cancelled, abandoned and expired rows and prefills,
    /// and gives their slots back.
    fn evict(&mut self) {
        let t = now();
        let mut freed = Vec::new();
        let prefilling = std::mem::take(&mut self.prefilling);
        for p in prefilling {
            match p.job.ended_reason(t) {
                None => self.prefilling.push_back(p),
                Some(reason) => {
                    p.job.tell_ended(reason);
                    freed.extend(p.slots);
                }
            }
        }
        for row in &mut self.rows {
            if !row.done
                && let Some(reason) = row.job.ended_reason(t)
            {
                row.end(&self.tokenizer, reason);
            }
        }
        // What finished rows computed stays in the prefix cache (a
        // conversation's next turn begins with this one's prompt and
        // answer). Beam rows keep only their prompt there.
        for r in self.rows.iter().filter(|r| r.done && !r.failed && r.job.request.decoding.beam.is_none()) {
            self.backend.remember(r.slot, &r.history.tokens, false);
        }
        let before = self.rows.len();
        self.rows.retain(|r| {
            if r.done {
                freed.push(r.slot);
            }
            !r.done
        });
        let removed = before - self.rows.len();
        if removed > 0 {
            self.shared.stats.evictions.fetch_add(removed as u64, Ordering::Relaxed);
            metrics::counter!(telemetry::BATCH_EVICTIONS, "worker" => self.shared.id.to_string())
                .increment(removed as u64);
        }
        if !freed.is_empty() {
            self.backend.free(&freed);
        }
    }

    /// One decode step for every row whose client has room for its tokens.
    /// The others pause (keeping their cache) where the backend can leave a
    /// row out of a step, or end as stalled where it cannot.
    fn decode(&mut self) {
        let mut from = vec![rows::SKIP; self.rows.len()];
        let mut input: Vec<(usize, u32)> = Vec::with_capacity(self.rows.len());
        let pauses = self.backend.pauses();
        for (i, r) in self.rows.iter_mut().enumerate() {
            if r.done {
                continue;
            }
            if !r.job.has_room() {
                if pauses {
                    continue;
                }
                r.job.stalled.store(true, Ordering::Relaxed);
                r.done = true;
                continue;
            }
            from[i] = input.len();
            input.push((r.slot, r.job.request.fault.feed(r.generated, r.next)));
        }
        if input.is_empty() {
            // Every row waits for its client: wait a little instead of spinning.
            std::thread::sleep(std::time::Duration::from_millis(1));
            return;
        }
        if let Some(delay) = self.rows.iter().filter_map(|r| r.job.request.fault.delay()).max() {
            std::thread::sleep(delay);
        }
        let length = self.propose(&input, &from);
        let t = now();
        let result = if length > 1 {
            let fed: Vec<Vec<u32>> = self
                .rows
                .iter()
                .zip(&from)
                .filter(|(_, f)| **f != rows::SKIP)
                .zip(&input)
                .map(|((r, _), &(_, token))| {
                    let proposal = r.spec.as_ref().map_or(&[][..], |s| &s.proposal[..]);
                    std::iter::once(token).chain(proposal.iter().copied()).collect()
                })
                .collect();
            let verify: Vec<(usize, &[u32])> = input.iter().zip(&fed).map(|(i, f)| (i.0, &f[..])).collect();
            // Each row's logits start after those of the rows before it.
            let mut at = 0;
            for f in from.iter_mut().filter(|f| **f != rows::SKIP) {
                let n = fed[*f].len();
                *f = at;
                at += n;
            }
            self.backend.verify(&verify)
        } else {
            self.backend.decode(&input)
        };
        self.cost.observe(input.len() * length, t.elapsed().as_secs_f64());
        let stats = &self.shared.stats;
        stats.run_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        stats.steps.fetch_add(1, Ordering::Relaxed);
        stats.step_rows.fetch_add(self.rows.len() as u64, Ordering::Relaxed);
        metrics::histogram!(telemetry::DECODE_STEP_DURATION).record(t.elapsed().as_secs_f64());
        metrics::histogram!(telemetry::STEP_BATCH_ROWS).record(self.rows.len() as f64);
        self.record_copies();
        match result {
            Ok(logits) => {
                let mut rows = std::mem::take(&mut self.rows);
                let (reorders, panics) = choose(&mut rows, &logits, &from, &self.tokenizer);
                self.count_panics(panics);
                let ok = reorders.iter().all(|(start, perm)| self.reorder(&rows, *start, perm));
                if length > 1 {
                    self.verified(&mut rows);
                }
                self.rows = rows;
                if !ok {
                    self.fail_running(EngineError::Forward("beam reorder failed".into()));
                }
            }
            Err(e) => {
                tracing::error!(worker = self.shared.id, "decode step failed: {e}");
                self.fail_rows(&from, e.into());
            }
        }
    }

    /// Counts panics caught in one request's token choice (that request
    /// failed; the worker goes on) with the worker restarts.
    fn count_panics(&self, panics: usize) {
        if panics > 0 {
            self.shared.stats.restarts.fetch_add(panics as u64, Ordering::Relaxed);
            metrics::counter!(telemetry::WORKER_RESTARTS, "worker" => self.shared.id.to_string())
                .increment(panics as u64);
        }
    }

    /// Fails the requests of the rows that took part in a failed step
    /// (`from[i] != SKIP`): they end with INTERNAL, and their slots are freed
    /// by the next eviction. Paused rows and prefilling requests go on.
    fn fail_rows(&mut self, from: &[usize], e: EngineError) {
        let mut failed: Vec<Arc<Job>> = Vec::new();
        for (row, &f) in self.rows.iter().zip(from) {
            if f != rows::SKIP && !failed.iter().any(|j| Arc::ptr_eq(j, &row.job)) {
                failed.push(row.job.clone());
            }
        }
        for job in &failed {
            let _ = job.send(Event::Failed(e.clone()));
        }
        for row in &mut self.rows {
            if failed.iter().any(|j| Arc::ptr_eq(j, &row.job)) {
                row.done = true;
                row.failed = true;
            }
        }
    }

    /// Fails every running and prefilling request (the queue is kept) and
    /// gives their slots back.
    fn fail_running(&mut self, e: EngineError) {
        let mut freed = Vec::new();
        for row in std::mem::take(&mut self.rows) {
            if !row.done {
                let _ = row.job.send(Event::Failed(e.clone()));
            }
            freed.push(row.slot);
        }
        for p in std::mem::take(&mut self.prefilling) {
            let _ = p.job.send(Event::Failed(e.clone()));
            freed.extend(p.slots);
        }
        self.backend.free(&freed);
    }
}

fn record_copy(kind: &'static str, ns: u64, bytes: usize) {
    metrics::histogram!(telemetry::KV_COPY_DURATION, "kind" => kind).record(ns as f64 / 1e9);
    metrics::counter!(telemetry::KV_COPY_BYTES, "kind" => kind).increment(bytes as u64);
}

impl Job {
    /// Tells the client its sequences ended (when it is still there).
    fn tell_ended(&self, reason: Option<FinishReason>) {
        if let Some(reason) = reason {
            for index in 0..self.request.decoding.sequences() {
                let _ = self.send(Event::Ended { index, reason, text: String::new() });
            }
        }
    }

    /// Why this job must stop now: `Some(Some(reason))` to tell the client,
    /// `Some(None)` when the client is gone, `None` to go on.
    fn ended_reason(&self, now: Instant) -> Option<Option<FinishReason>> {
        if self.events.is_closed() || self.stalled.load(Ordering::Relaxed) {
            return Some(None);
        }
        if self.cancel.load(Ordering::Relaxed) {
            return Some(Some(FinishReason::Cancelled));
        }
        if self.request.deadline.is_some_and(|d| now >= d) {
            return Some(Some(FinishReason::Deadline));
        }
        None
    }
}
