//! One worker: an OS thread that owns an ONNX Runtime session and a running
//! batch. Each iteration it admits waiting requests (one padded prefill, then
//! a join), evicts rows that finished, were cancelled or ran past their
//! deadline, and runs one decode step for every remaining row in a single
//! `Session::run`.
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::mpsc;

use super::admission::{self, Running};
use super::model::{ForwardInput, KvCache, Logits, Model};
use super::{EngineError, Event, Job, WorkerShared};
use crate::beam::BeamSearch;
use crate::logits::{self, History};
use crate::pb::FinishReason;
use crate::sampling;
use crate::telemetry;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

struct Row {
    /// Shared by the rows of one request (its samples).
    job: Arc<Job>,
    /// Which of the request's sequences this row is.
    index: u32,
    /// Real tokens of this row in the cache (right-aligned).
    len: usize,
    generated: u32,
    /// The token to feed at the next decode step.
    next: u32,
    /// Finished, or its client is gone: evicted before the next step.
    done: bool,
    /// Prompt and generated tokens, for the penalties.
    history: History,
    /// This row's own generator when sampling (seeded `seed + index`).
    rng: Option<ChaCha8Rng>,
    /// On the first row of a beam search request: the search.
    beam: Option<Box<BeamSearch>>,
}

pub(super) struct Worker {
    pub model: Model,
    pub limits: admission::Limits,
    pub pad_id: u32,
    pub shared: Arc<WorkerShared>,
    pub rx: mpsc::UnboundedReceiver<Job>,
    queue: VecDeque<Arc<Job>>,
    rows: Vec<Row>,
    cache: Option<KvCache>,
}

fn now() -> Instant {
    Instant::now()
}

impl Worker {
    pub fn new(
        model: Model,
        limits: admission::Limits,
        pad_id: u32,
        shared: Arc<WorkerShared>,
        rx: mpsc::UnboundedReceiver<Job>,
    ) -> Self {
        Worker { model, limits, pad_id, shared, rx, queue: VecDeque::new(), rows: Vec::new(), cache: None }
    }

    pub fn run(mut self) {
        let mut since = Snapshot::of(&self.shared.stats);
        loop {
            if self.rows.is_empty() && self.queue.is_empty() {
                self.publish();
                let now = Snapshot::of(&self.shared.stats);
                if now.steps > since.steps {
                    tracing::info!(worker = self.shared.id, "busy period: {}", now.minus(&since));
                    since = now;
                }
                match self.rx.blocking_recv() {
                    Some(job) => self.queue.push_back(Arc::new(job)),
                    None => return,
                }
            }
            while let Ok(job) = self.rx.try_recv() {
                self.queue.push_back(Arc::new(job));
            }
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
        self.admit();
        self.evict();
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
        let (rows, queued) = (self.rows.len(), self.queue.len());
        self.shared.publish(rows);
        let worker = self.shared.id.to_string();
        let used = rows * self.cache.as_ref().map_or(0, |c| c.len);
        metrics::gauge!(telemetry::BATCH_ROWS, "worker" => worker.clone()).set(rows as f64);
        metrics::gauge!(telemetry::KV_USED_TOKENS, "worker" => worker.clone()).set(used as f64);
        metrics::gauge!(telemetry::KV_USED_RATIO, "worker" => worker.clone())
            .set(used as f64 / self.limits.max_batch_tokens.max(1) as f64);
        metrics::gauge!(telemetry::WORKER_BUSY, "worker" => worker).set(if rows + queued > 0 { 1.0 } else { 0.0 });
        metrics::gauge!(telemetry::QUEUE_WAITING).set(self.shared.waiting.load(Ordering::Relaxed) as f64);
    }

    /// Releases a job's budget reservation once its last row leaves.
    fn release(&self, job: &Arc<Job>) {
        if Arc::strong_count(job) == 1 {
            self.shared.load.fetch_sub(job.reserved, Ordering::Relaxed);
        }
    }

    /// Waiting requests whose client left, that were cancelled, or whose
    /// deadline passed never reach a prefill.
    fn drop_abandoned(&mut self) {
        let t = now();
        let queue = std::mem::take(&mut self.queue);
        let mut kept = VecDeque::with_capacity(queue.len());
        for job in queue {
            let reason = job.ended_reason(t);
            if reason.is_none() {
                kept.push_back(job);
                continue;
            }
            if let Some(reason) = reason.flatten() {
                for index in 0..job.request.decoding.rows() {
                    let _ = job.events.send(Event::Ended { index, reason });
                }
            }
            self.shared.waiting.fetch_sub(1, Ordering::Relaxed);
            self.release(&job);
        }
        self.queue = kept;
    }

    fn running(&self) -> Running {
        Running {
            len: self.cache.as_ref().map_or(0, |c| c.len),
            remaining: self.rows.iter().map(|r| (r.job.request.stop.max_new_tokens - r.generated) as usize).collect(),
        }
    }

    fn admit(&mut self) {
        let candidates = self.queue.iter().map(|j| j.candidate());
        let n = admission::admit(&self.limits, &self.running(), candidates);
        if n == 0 {
            return;
        }
        let jobs: Vec<Arc<Job>> = self.queue.drain(..n).collect();
        for job in &jobs {
            tracing::debug!(parent: &job.span, worker = self.shared.id, "admitted");
            self.shared.waiting.fetch_sub(1, Ordering::Relaxed);
            let _ = job.events.send(Event::Started { at: now() });
        }
        let t = now();
        let prompts: Vec<&[u32]> = jobs.iter().map(|j| j.request.prompt_ids.as_slice()).collect();
        let input = ForwardInput::prefill(&prompts, self.pad_id);
        let result = self.model.empty_cache(jobs.len()).and_then(|c| self.model.forward(&input, c));
        let stats = &self.shared.stats;
        stats.prefill_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        stats.prefill_tokens.fetch_add((input.batch * input.seq) as u64, Ordering::Relaxed);
        metrics::histogram!(telemetry::PREFILL_DURATION).record(t.elapsed().as_secs_f64());
        metrics::histogram!(telemetry::PREFILL_TOKENS).record((input.batch * input.seq) as f64);
        let (logits, new_cache) = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(worker = self.shared.id, "prefill failed: {e}");
                let e = EngineError::from(e);
                for job in jobs {
                    let _ = job.events.send(Event::Failed(e.clone()));
                    self.release(&job);
                }
                return;
            }
        };
        // One prefilled row per request; its samples are copies of it.
        let mut from = Vec::new();
        let mut new_rows: Vec<Row> = Vec::new();
        for (j, job) in jobs.into_iter().enumerate() {
            let sampling = job.request.decoding.sampling.as_ref();
            for index in 0..job.request.decoding.rows() {
                from.push(j);
                new_rows.push(Row {
                    len: job.request.prompt_ids.len(),
                    index,
                    generated: 0,
                    next: 0,
                    done: false,
                    history: History::new(&job.request.prompt_ids),
                    rng: sampling.map(|s| ChaCha8Rng::seed_from_u64(s.seed.wrapping_add(u64::from(index)))),
                    beam: job.request.decoding.beam.clone().filter(|_| index == 0).map(|plan| {
                        let stop = &job.request.stop;
                        let ids = stop.eos_token_id.into_iter().chain(stop.stop_token_ids.iter().copied()).collect();
                        Box::new(BeamSearch::new(plan, stop.max_new_tokens, ids))
                    }),
                    job: job.clone(),
                });
            }
        }
        let new_cache = if from.len() > new_cache.batch {
            match new_cache.select(&from, new_cache.len) {
                Ok(c) => c,
                Err(e) => {
                    let e = EngineError::from(e);
                    for row in new_rows {
                        let _ = row.job.events.send(Event::Failed(e.clone()));
                        self.release(&row.job);
                    }
                    return;
                }
            }
        } else {
            new_cache
        };
        let mut new_cache = new_cache;
        for (start, perm) in choose(&mut new_rows, &logits, &from) {
            if let Err(e) = new_cache.reorder_rows(start, &perm) {
                tracing::error!(worker = self.shared.id, "beam reorder failed: {e}");
            }
        }
        self.cache = Some(match self.cache.take() {
            None => new_cache,
            Some(old) => {
                let t = now();
                let len = old.len.max(new_cache.len);
                match old.concat(&new_cache, len) {
                    Ok(joined) => {
                        let stats = &self.shared.stats;
                        stats.joins.fetch_add(1, Ordering::Relaxed);
                        stats.join_bytes.fetch_add(joined.bytes() as u64, Ordering::Relaxed);
                        stats.join_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                        record_copy("join", t, joined.bytes());
                        metrics::counter!(telemetry::BATCH_JOINS, "worker" => self.shared.id.to_string()).increment(1);
                        joined
                    }
                    Err(e) => {
                        // Keep the running batch; only the new rows fail.
                        tracing::error!(worker = self.shared.id, "join failed: {e}");
                        let e = EngineError::from(e);
                        for row in new_rows {
                            let _ = row.job.events.send(Event::Failed(e.clone()));
                            drop(row.history);
                            self.release(&row.job);
                        }
                        self.cache = Some(old);
                        return;
                    }
                }
            }
        });
        self.rows.extend(new_rows);
    }

    /// Removes finished, cancelled, abandoned and expired rows with one copy
    /// of the rows that stay (trimming columns that became padding for all).
    fn evict(&mut self) {
        let t = now();
        let mut keep = Vec::with_capacity(self.rows.len());
        for (i, row) in self.rows.iter_mut().enumerate() {
            if !row.done && row.job.stopped[row.index as usize].load(Ordering::Relaxed) {
                row.done = true;
            }
            if !row.done {
                match row.job.ended_reason(t) {
                    None => {}
                    Some(reason) => {
                        if let Some(reason) = reason
                            && row.index < row.job.request.decoding.sequences()
                        {
                            let _ = row.job.events.send(Event::Ended { index: row.index, reason });
                        }
                        row.done = true;
                    }
                }
            }
            if !row.done {
                keep.push(i);
            }
        }
        if keep.len() == self.rows.len() {
            return;
        }
        let removed = self.rows.len() - keep.len();
        let old = std::mem::take(&mut self.rows);
        let mut kept_rows = Vec::with_capacity(keep.len());
        for (i, row) in old.into_iter().enumerate() {
            if keep.binary_search(&i).is_ok() {
                kept_rows.push(row);
            } else {
                self.release(&row.job);
            }
        }
        self.rows = kept_rows;
        let stats = &self.shared.stats;
        stats.evictions.fetch_add(removed as u64, Ordering::Relaxed);
        metrics::counter!(telemetry::BATCH_EVICTIONS, "worker" => self.shared.id.to_string()).increment(removed as u64);
        let Some(cache) = self.cache.take() else { return };
        if self.rows.is_empty() {
            return;
        }
        let len = self.rows.iter().map(|r| r.len).max().unwrap_or(0);
        match cache.select(&keep, len) {
            Ok(c) => {
                stats.evict_copies.fetch_add(1, Ordering::Relaxed);
                stats.evict_bytes.fetch_add(c.bytes() as u64, Ordering::Relaxed);
                stats.evict_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                record_copy("evict", t, c.bytes());
                self.cache = Some(c);
            }
            Err(e) => {
                tracing::error!(worker = self.shared.id, "evict failed: {e}");
                self.fail_running(e.into());
            }
        }
    }

    fn decode(&mut self) {
        let Some(cache) = self.cache.take() else { return };
        let tokens: Vec<u32> = self.rows.iter().map(|r| r.next).collect();
        let lens: Vec<usize> = self.rows.iter().map(|r| r.len).collect();
        let input = ForwardInput::decode(&tokens, &lens, cache.len);
        let t = now();
        let result = self.model.forward(&input, cache);
        let stats = &self.shared.stats;
        stats.run_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        stats.steps.fetch_add(1, Ordering::Relaxed);
        stats.step_rows.fetch_add(self.rows.len() as u64, Ordering::Relaxed);
        metrics::histogram!(telemetry::DECODE_STEP_DURATION).record(t.elapsed().as_secs_f64());
        metrics::histogram!(telemetry::STEP_BATCH_ROWS).record(self.rows.len() as f64);
        match result {
            Ok((logits, cache)) => {
                self.cache = Some(cache);
                for row in &mut self.rows {
                    row.len += 1;
                }
                let from: Vec<usize> = (0..self.rows.len()).collect();
                let reorders = choose(&mut self.rows, &logits, &from);
                if let Some(cache) = self.cache.as_mut() {
                    for (start, perm) in reorders {
                        let t = now();
                        let result = cache.reorder_rows(start, &perm);
                        if let Ok(bytes) = result {
                            record_copy("beam_reorder", t, bytes);
                        }
                        if let Err(e) = result {
                            tracing::error!(worker = self.shared.id, "beam reorder failed: {e}");
                            self.fail_running(e.into());
                            return;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(worker = self.shared.id, "decode step failed: {e}");
                self.fail_running(e.into());
            }
        }
    }

    /// Fails every running row (the queue is kept) and resets the batch.
    fn fail_running(&mut self, e: EngineError) {
        for row in std::mem::take(&mut self.rows) {
            if !row.done {
                let _ = row.job.events.send(Event::Failed(e.clone()));
            }
            self.release(&row.job);
        }
        self.cache = None;
    }
}

fn record_copy(kind: &'static str, started: Instant, bytes: usize) {
    metrics::histogram!(telemetry::KV_COPY_DURATION, "kind" => kind).record(started.elapsed().as_secs_f64());
    metrics::counter!(telemetry::KV_COPY_BYTES, "kind" => kind).increment(bytes as u64);
}

/// Picks each live row's next token and tells its client. Row `i` reads
/// logits row `from[i]` (prefill: its request's prompt row). Returns the
/// reorderings beam groups need: rows `start..start + perm.len()` of the
/// cache must become `perm` of themselves.
fn choose(rows: &mut [Row], logits: &Logits, from: &[usize]) -> Vec<(usize, Vec<usize>)> {
    let at = now();
    let mut scratch = Vec::new();
    let mut reorders = Vec::new();
    let mut i = 0;
    while i < rows.len() {
        if rows[i].done {
            i += 1;
            continue;
        }
        if let Some(plan) = rows[i].job.request.decoding.beam.clone() {
            let group = &mut rows[i..i + plan.num_beams];
            if let Some(perm) = beam_step(group, logits, &from[i..i + plan.num_beams], at) {
                reorders.push((i, perm));
            }
            i += plan.num_beams;
            continue;
        }
        let row = &mut rows[i];
        let req = &row.job.request;
        let masked = req.stop.masked(row.generated);
        let raw = logits.row(from[i]);
        let top = req.top_logprobs as usize;
        let plan = &req.decoding;
        let choice = if plan.sampling.is_none() && plan.processors.is_off() {
            sampling::greedy(raw, &masked, top)
        } else {
            scratch.clear();
            scratch.extend_from_slice(raw);
            plan.processors.apply(&mut scratch, &row.history, &masked);
            let id = match (&plan.sampling, row.rng.as_mut()) {
                (Some(s), Some(rng)) => logits::sample(&logits::distribution(&scratch, &s.warpers), rng),
                _ => sampling::argmax_unmasked(&scratch, &[]),
            };
            sampling::report(raw, id, top)
        };
        row.generated += 1;
        row.next = choice.id;
        row.history.push(choice.id);
        let finish = req.stop.check(choice.id, row.generated);
        let sent = row.job.events.send(Event::Token { index: row.index, choice, finish, at }).is_ok();
        row.done = finish.is_some() || !sent;
        i += 1;
    }
    reorders
}

/// One beam search step for a request's rows (its beams, in order). Returns
/// the KV reordering, or `None` when the search ended.
fn beam_step(group: &mut [Row], logits: &Logits, from: &[usize], at: Instant) -> Option<Vec<usize>> {
    let job = group[0].job.clone();
    let req = &job.request;
    let top = req.top_logprobs as usize;
    let log_probs: Vec<Vec<f32>> = group
        .iter()
        .zip(from)
        .map(|(row, &f)| {
            let mut lp = sampling::log_softmax(logits.row(f));
            req.decoding.processors.apply(&mut lp, &row.history, &req.stop.masked(row.generated));
            lp
        })
        .collect();
    let report = |beam: usize, token: u32| sampling::report(logits.row(from[beam]), token, top);
    let search = group[0].beam.as_mut().expect("the first row of a beam group holds its search");
    let step = search.step(&log_probs, &report);
    if step.done {
        let hypotheses = search.results();
        let _ = job.events.send(Event::Beams { hypotheses, at });
        for row in group.iter_mut() {
            row.done = true;
        }
        return None;
    }
    let histories: Vec<History> = step.parents.iter().map(|&p| group[p].history.clone()).collect();
    for ((row, mut history), &token) in group.iter_mut().zip(histories).zip(&step.tokens) {
        history.push(token);
        row.history = history;
        row.next = token;
        row.generated += 1;
    }
    Some(step.parents)
}

impl Job {
    /// Why this job must stop now: `Some(Some(reason))` to tell the client,
    /// `Some(None)` when the client is gone, `None` to go on.
    fn ended_reason(&self, now: Instant) -> Option<Option<FinishReason>> {
        if self.events.is_closed() {
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

/// Worker statistics at one moment, for the summary logged after each busy
/// period (what the step time goes to, and what joins and evictions cost).
#[derive(Debug, Clone, Copy)]
struct Snapshot {
    steps: u64,
    step_rows: u64,
    run_ns: u64,
    iteration_ns: u64,
    prefill_ns: u64,
    prefill_tokens: u64,
    joins: u64,
    join_bytes: u64,
    join_ns: u64,
    evictions: u64,
    evict_copies: u64,
    evict_bytes: u64,
    evict_ns: u64,
}

impl Snapshot {
    fn of(s: &super::WorkerStats) -> Self {
        let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            steps: l(&s.steps),
            step_rows: l(&s.step_rows),
            run_ns: l(&s.run_ns),
            iteration_ns: l(&s.iteration_ns),
            prefill_ns: l(&s.prefill_ns),
            prefill_tokens: l(&s.prefill_tokens),
            joins: l(&s.joins),
            join_bytes: l(&s.join_bytes),
            join_ns: l(&s.join_ns),
            evictions: l(&s.evictions),
            evict_copies: l(&s.evict_copies),
            evict_bytes: l(&s.evict_bytes),
            evict_ns: l(&s.evict_ns),
        }
    }

    fn minus(&self, o: &Snapshot) -> String {
        let steps = (self.steps - o.steps).max(1);
        let iteration = (self.iteration_ns - o.iteration_ns).max(1) as f64;
        let run = (self.run_ns - o.run_ns) as f64;
        let prefill = (self.prefill_ns - o.prefill_ns) as f64;
        let (join, evict) = ((self.join_ns - o.join_ns) as f64, (self.evict_ns - o.evict_ns) as f64);
        let per = |ns: f64, n: u64| if n == 0 { 0.0 } else { ns / n as f64 / 1e6 };
        let mib = |b: u64, n: u64| if n == 0 { 0.0 } else { b as f64 / n as f64 / 1048576.0 };
        let (joins, copies) = (self.joins - o.joins, self.evict_copies - o.evict_copies);
        format!(
            "{steps} decode steps, {:.2} rows/step, {:.2} ms/iteration; decode Session::run {:.1}%, prefill {:.1}% \
             ({} tokens), joins {:.1}%, evictions {:.1}%, other (sampling, streaming, scheduling) {:.1}%; \
             {joins} joins at {:.2} ms and {:.2} MiB each; {} rows evicted in {copies} copies at {:.2} ms and {:.2} MiB each",
            (self.step_rows - o.step_rows) as f64 / steps as f64,
            iteration / steps as f64 / 1e6,
            100.0 * run / iteration,
            100.0 * prefill / iteration,
            self.prefill_tokens - o.prefill_tokens,
            100.0 * join / iteration,
            100.0 * evict / iteration,
            100.0 * (iteration - run - prefill - join - evict) / iteration,
            per(join, joins),
            mib(self.join_bytes - o.join_bytes, joins),
            self.evictions - o.evictions,
            per(evict, copies),
            mib(self.evict_bytes - o.evict_bytes, copies),
        )
    }
}
