//! The worker's prefill: prompts of admitted requests go into their slots'
//! cache, oldest first, within the iteration's budget of prompt tokens (a
//! long prompt in chunks between decode steps); a request whose prompt is
//! complete becomes its decoding rows, each choosing its first token.
use std::sync::Arc;
use std::sync::atomic::Ordering;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{Worker, now, record_copy};
use crate::constraint::RowConstraint;
use crate::decoding::beam::BeamSearch;
use crate::decoding::logits::History;
use crate::engine::admission;
use crate::engine::backend::Chunk;
use crate::engine::model::Logits;
use crate::engine::rows::{Row, choose};
use crate::engine::spec::RowSpec;
use crate::engine::{EngineError, Event, Job};
use crate::telemetry;

/// An admitted request whose prompt is being prefilled into `slots[0]`;
/// its other slots (samples, beams) receive a copy when it is complete.
#[derive(Clone)]
pub(super) struct Prefilling {
    pub(super) job: Arc<Job>,
    pub(super) slots: Vec<usize>,
    /// Prompt tokens already in the cache.
    pub(super) done: usize,
    /// Of those, the tokens copied from the prefix cache.
    pub(super) cached: usize,
}

impl Worker {
    /// Prefills the next prompt tokens, oldest request first: at most
    /// `admission::prefill_budget` per iteration, a long prompt in chunks
    /// (whole prompts where the backend cannot chunk; admission bounded them).
    /// Requests whose prompt is complete become decoding rows.
    pub(super) fn prefill(&mut self) {
        self.order_prefills();
        let deferred = self.reuse_prefixes();
        let chunked = self.backend.chunks();
        let mut budget = if chunked {
            let mut waiting = admission::Waiting::default();
            for p in &self.prefilling {
                let left = p.job.request.prompt_ids.len() - p.done;
                waiting.rows += p.slots.len();
                waiting.tokens += left;
                waiting.longest = waiting.longest.max(left);
            }
            admission::prefill_budget(&self.limits, waiting, self.rows.len())
        } else {
            self.limits.max_prefill_tokens.max(1)
        };
        let mut work: Vec<(usize, usize)> = Vec::new();
        for (i, p) in self.prefilling.iter().enumerate() {
            if deferred.get(i).copied().unwrap_or(false) {
                continue;
            }
            let left = p.job.request.prompt_ids.len() - p.done;
            let take = if chunked { left.min(budget) } else { left };
            if take == 0 || (!chunked && !work.is_empty() && take > budget) {
                break;
            }
            work.push((i, take));
            budget = budget.saturating_sub(take);
        }
        if work.is_empty() {
            return;
        }
        // One backend call per run: prompts starting an empty cache together
        // (the backend runs them side by side), a chunk on a cached past (a
        // prefix cache hit, a long prompt's next chunk) alone, unless the
        // backend mixes them (the paged cache: everything in one call, whose
        // runs are larger and so faster per token). Each call's requests get
        // their first token as soon as it is over, not after the iteration's
        // last run.
        let mixes = self.backend.mixes_chunks();
        let mut calls: Vec<Vec<(usize, usize)>> = Vec::new();
        for &(i, take) in &work {
            let fresh = self.prefilling[i].done == 0;
            match calls.last_mut() {
                Some(call) if mixes || (fresh && self.prefilling[call[0].0].done == 0) => call.push((i, take)),
                _ => calls.push(vec![(i, take)]),
            }
        }
        let mut gone = Vec::new();
        for call in calls {
            self.prefill_call(&call, &mut gone);
        }
        // Prompts that are complete or failed leave the prefilling list
        // (from the back: the indices are ascending).
        gone.sort_unstable();
        for &i in gone.iter().rev() {
            self.prefilling.remove(i);
        }
    }

    /// Runs one backend prefill call over `call` (indices into the
    /// prefilling list, tokens to take), starts the rows of the prompts it
    /// completes and pushes the indices of those, and of failed ones, to `gone`.
    fn prefill_call(&mut self, call: &[(usize, usize)], gone: &mut Vec<usize>) {
        let chunks: Vec<Chunk<'_>> = call
            .iter()
            .map(|&(i, take)| {
                let p = &self.prefilling[i];
                Chunk { slot: p.slots[0], tokens: &p.job.request.prompt_ids[p.done..p.done + take] }
            })
            .collect();
        let tokens: usize = call.iter().map(|w| w.1).sum();
        let t = now();
        let result = self.backend.prefill(&chunks);
        let stats = &self.shared.stats;
        stats.prefill_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        stats.prefill_tokens.fetch_add(tokens as u64, Ordering::Relaxed);
        metrics::histogram!(telemetry::PREFILL_DURATION).record(t.elapsed().as_secs_f64());
        metrics::histogram!(telemetry::PREFILL_TOKENS).record(tokens as f64);
        tracing::debug!(
            worker = self.shared.id,
            prompts = call.len(),
            tokens,
            decoding = self.rows.len(),
            waiting = self.queue.len(),
            ms = t.elapsed().as_secs_f64() * 1e3,
            "prefill run"
        );
        self.record_copies();
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(worker = self.shared.id, "prefill failed: {e}");
                let e = EngineError::from(e);
                for &(i, _) in call {
                    let p = &self.prefilling[i];
                    let _ = p.job.send(Event::Failed(e.clone()));
                    self.backend.free(&p.slots);
                    gone.push(i);
                }
                return;
            }
        };
        for (k, &(i, take)) in call.iter().enumerate() {
            let p = &mut self.prefilling[i];
            p.done += take;
            let complete = p.done == p.job.request.prompt_ids.len();
            self.backend.remember(p.slots[0], &p.job.request.prompt_ids[..p.done], !complete);
            if complete {
                let p = p.clone();
                self.start_rows(p, &logits, k);
                gone.push(i);
            }
        }
    }

    /// Turns a prefilled request into decoding rows: its other slots get a
    /// copy of the prompt's cache and each row chooses its first token.
    fn start_rows(&mut self, p: Prefilling, logits: &Logits, k: usize) {
        let job = p.job;
        if self.backend.prefix_block().is_some() {
            let prompt = job.request.prompt_ids.len();
            metrics::counter!(telemetry::PREFIX_CACHE_HIT_TOKENS).increment(p.cached as u64);
            metrics::counter!(telemetry::PREFIX_CACHE_MISS_TOKENS).increment((prompt - p.cached) as u64);
            let stats = &self.shared.stats;
            stats.prefix_hit_tokens.fetch_add(p.cached as u64, Ordering::Relaxed);
            stats.prefix_miss_tokens.fetch_add((prompt - p.cached) as u64, Ordering::Relaxed);
        }
        let _ = job.send(Event::Prefilled { cached_tokens: p.cached as u32 });
        if p.slots.len() > 1 {
            let t = now();
            match self.backend.fork(p.slots[0], &p.slots[1..]) {
                Ok(bytes) => record_copy("fork", t.elapsed().as_nanos() as u64, bytes),
                Err(e) => {
                    tracing::error!(worker = self.shared.id, "fork failed: {e}");
                    let _ = job.send(Event::Failed(e.into()));
                    self.backend.free(&p.slots);
                    return;
                }
            }
        }
        let sampling = job.request.decoding.sampling.as_ref();
        let spec = Some(self.spec_tokens(&job.request)).filter(|&k| k > 0).map(RowSpec::new);
        let mut new_rows: Vec<Row> = p
            .slots
            .iter()
            .enumerate()
            .map(|(index, &slot)| {
                let index = index as u32;
                let constraint = job.request.constraint.as_deref().map(RowConstraint::new);
                Row {
                    index,
                    slot,
                    generated: 0,
                    next: 0,
                    done: false,
                    history: History::new(&job.request.prompt_ids),
                    rng: sampling.map(|s| ChaCha8Rng::seed_from_u64(s.seed.wrapping_add(u64::from(index)))),
                    beam: job.request.decoding.beam.clone().filter(|_| index == 0).map(|plan| {
                        let stop = &job.request.stop;
                        let mut ids: Vec<u32> =
                            stop.eos_token_id.into_iter().chain(stop.stop_token_ids.iter().copied()).collect();
                        // A constrained hypothesis ends at the language's EOS, even with ignore_eos.
                        ids.extend(constraint.as_ref().map(|c| c.eos()).filter(|e| !ids.contains(e)));
                        Box::new(BeamSearch::new(plan, stop.max_new_tokens, ids))
                    }),
                    text: job.request.sequence_text(),
                    failed: false,
                    constraint,
                    spec: spec.clone(),
                    rejected: 0,
                    job: job.clone(),
                }
            })
            .collect();
        let from = vec![k; new_rows.len()];
        let (reorders, panics) = choose(&mut new_rows, logits, &from, &self.tokenizer);
        self.count_panics(panics);
        for (start, perm) in reorders {
            self.reorder(&new_rows, start, &perm);
        }
        self.rows.extend(new_rows);
    }

    /// Fills each prefilling request's slot from the prefix cache as far as
    /// it holds the prompt, and returns which requests wait this iteration:
    /// those whose next block an earlier prefilling request (on this worker)
    /// is still to compute, so that it is computed once and then copied
    /// (16 requests sharing a system prompt arriving together otherwise
    /// prefill it 16 times).
    fn reuse_prefixes(&mut self) -> Vec<bool> {
        let Some(block) = self.backend.prefix_block() else { return Vec::new() };
        let mut deferred = Vec::with_capacity(self.prefilling.len());
        for i in 0..self.prefilling.len() {
            let p = &mut self.prefilling[i];
            let added = self.backend.reuse(p.slots[0], &p.job.request.prompt_ids, p.done);
            p.done += added;
            p.cached += added;
            let p = &self.prefilling[i];
            let prompt = &p.job.request.prompt_ids;
            // The end of the block this request computes next.
            let end = (p.done / block + 1) * block;
            // Not when its next block holds its last token, which it
            // computes anyway. The first request is never deferred, so every
            // wait ends.
            deferred.push(
                end < prompt.len()
                    && self.prefilling.iter().take(i).any(|q| {
                        let other = &q.job.request.prompt_ids;
                        q.done < end && other.len() >= end && other[..end] == prompt[..end]
                    }),
            );
        }
        self.record_copies();
        deferred
    }
}
