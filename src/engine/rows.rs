//! The running rows of a worker's batch and how each chooses its next token:
//! greedy, sampled or by beam search, with its request's processors.
use std::sync::Arc;
use std::time::Instant;

use rand_chacha::ChaCha8Rng;

use super::model::Logits;
use super::{Event, Job};
use crate::decoding::beam::BeamSearch;
use crate::decoding::logits::{self, History};
use crate::decoding::sampling;

/// One running sequence: a sample or beam of a request, in its own slot.
pub(super) struct Row {
    /// Shared by the rows of one request (its samples).
    pub job: Arc<Job>,
    /// Which of the request's sequences this row is.
    pub index: u32,
    /// The backend slot holding this row's cache.
    pub slot: usize,
    pub generated: u32,
    /// The token to feed at the next decode step.
    pub next: u32,
    /// Finished, or its client is gone: evicted before the next step.
    pub done: bool,
    /// Prompt and generated tokens, for the penalties.
    pub history: History,
    /// This row's own generator when sampling (seeded `seed + index`).
    pub rng: Option<ChaCha8Rng>,
    /// On the first row of a beam search request: the search.
    pub beam: Option<Box<BeamSearch>>,
}

/// Picks each live row's next token and tells its client. Row `i` reads
/// logits row `from[i]` (prefill: its request's prompt row). Returns the
/// reorderings beam groups need: rows `start..start + perm.len()` of the
/// cache must become `perm` of themselves.
pub(super) fn choose(rows: &mut [Row], logits: &Logits, from: &[usize]) -> Vec<(usize, Vec<usize>)> {
    let at = Instant::now();
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
