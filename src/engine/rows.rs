//! The running rows of a worker's batch and how each chooses its next token:
//! greedy, sampled or by beam search, with its request's processors.
use std::sync::Arc;
use std::time::Instant;

use rand_chacha::ChaCha8Rng;

use super::model::Logits;
use super::{Event, Job};
use crate::decoding::beam::{BeamSearch, Hypothesis};
use crate::decoding::logits::History;
use crate::decoding::sampling;
use crate::decoding::stopping::SequenceText;
use crate::pb::FinishReason;
use crate::tokenizer::Tokenizer;
use crate::validation::ValidRequest;

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
    /// The text so far and the stop sequences it is matched against.
    pub text: SequenceText,
    /// Its request failed: its cache is not kept (`Backend::remember`).
    pub failed: bool,
}

impl Row {
    /// Ends the row (cancelled, deadline): tells its client why, with the
    /// text it held back, when it is one of the sequences the client sees.
    pub fn end(&mut self, tok: &Tokenizer, reason: Option<FinishReason>) {
        if let Some(reason) = reason
            && self.index < self.job.request.decoding.sequences()
        {
            let (text, reason) = self.text.end(tok, reason);
            let _ = self.job.send(Event::Ended { index: self.index, reason, text });
        }
        self.done = true;
    }
}

/// `from` of a row that sat out the step (paused): it chooses nothing.
pub(super) const SKIP: usize = usize::MAX;

/// Picks each live row's next token and tells its client. Row `i` reads
/// logits row `from[i]` (prefill: its request's prompt row; `SKIP`: none).
/// Returns the reorderings beam groups need (rows `start..start +
/// perm.len()` of the cache must become `perm` of themselves), and how many
/// requests failed because choosing their token panicked: such a request
/// gets `Failed` and its rows end; the other rows are not disturbed.
pub(super) fn choose(
    rows: &mut [Row],
    logits: &Logits,
    from: &[usize],
    tok: &Tokenizer,
) -> (Vec<(usize, Vec<usize>)>, usize) {
    let at = Instant::now();
    let mut scratch = Vec::new();
    let mut reorders = Vec::new();
    let mut panics = 0;
    let mut i = 0;
    while i < rows.len() {
        if rows[i].done || from[i] == SKIP {
            i += 1;
            continue;
        }
        let beams = rows[i].job.request.decoding.beam.as_ref().map(|b| b.num_beams);
        let width = beams.unwrap_or(1);
        let chosen = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match beams {
            Some(n) => {
                if let Some(perm) = beam_step(&mut rows[i..i + n], logits, &from[i..i + n], tok, at) {
                    reorders.push((i, perm));
                }
            }
            None => choose_one(&mut rows[i], logits.row(from[i]), tok, at, &mut scratch),
        }));
        if let Err(panic) = chosen {
            panics += 1;
            scratch = Vec::new();
            let job = rows[i].job.clone();
            let text = super::panic_text(&panic);
            tracing::error!(parent: &job.span, "choosing a token panicked; failing this request only: {text}");
            let _ = job.send(Event::Failed(super::EngineError::Panic(text)));
            for row in rows.iter_mut().filter(|r| Arc::ptr_eq(&r.job, &job)) {
                row.done = true;
                row.failed = true;
            }
        }
        i += width;
    }
    (reorders, panics)
}

/// Greedy search or sampling: one row's next token from its logits `raw`.
fn choose_one(row: &mut Row, raw: &[f32], tok: &Tokenizer, at: Instant, scratch: &mut Vec<f32>) {
    let req = &row.job.request;
    req.fault.before_choosing(row.generated + 1);
    let masked = req.stop.masked(row.generated);
    let top = req.top_logprobs as usize;
    let plan = &req.decoding;
    let sampling = plan.sampling.as_ref().zip(row.rng.as_mut()).map(|(s, rng)| (&s.warpers, rng));
    let choice = sampling::choose(raw, &plan.processors, sampling, &row.history, &masked, top, scratch);
    row.generated += 1;
    row.next = choice.id;
    row.history.push(choice.id);
    let (text, finish) = row.text.push_and_end(tok, choice.id, req.stop.check(choice.id, row.generated));
    let held = if finish.is_none() { row.text.held(tok, FinishReason::Deadline) } else { None };
    let sent = row.job.send(Event::Token { index: row.index, choice, text, finish, held, at });
    row.done = finish.is_some() || !sent;
}

/// One beam search step for a request's rows (its beams, in order). Returns
/// the KV reordering, or `None` when the search ended.
fn beam_step(group: &mut [Row], logits: &Logits, from: &[usize], tok: &Tokenizer, at: Instant) -> Option<Vec<usize>> {
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
        let hypotheses = search.results().into_iter().map(|h| hypothesis_text(h, req, tok)).collect();
        let _ = job.send(Event::Beams { hypotheses, at });
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

/// A finished hypothesis's text, cut (with its tokens) where a stop sequence
/// matches.
fn hypothesis_text(mut h: Hypothesis, req: &ValidRequest, tok: &Tokenizer) -> (Hypothesis, String) {
    let mut text = req.sequence_text();
    let mut out = String::new();
    for (n, c) in h.tokens.iter().enumerate() {
        let last = n + 1 == h.tokens.len();
        let (piece, finish) = text.push_and_end(tok, c.id, last.then_some(h.finish));
        out.push_str(&piece);
        if finish == Some(FinishReason::StopSequence) {
            h.tokens.truncate(n + 1);
            h.finish = FinishReason::StopSequence;
            break;
        }
    }
    (h, out)
}
