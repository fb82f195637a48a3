//! The running rows of a worker's batch and how each chooses its next token:
//! greedy, sampled or by beam search, with its request's processors.
use std::sync::Arc;
use std::time::Instant;

use rand_chacha::ChaCha8Rng;

use super::model::Logits;
use super::spec::RowSpec;
use super::{Event, Job};
use crate::constraint::{Mask, RowConstraint};
use crate::decoding::beam::{BeamSearch, Hypothesis};
use crate::decoding::logits::History;
use crate::decoding::sampling;
use crate::decoding::stopping::SequenceText;
use crate::pb::FinishReason;
use crate::run::Greedy;
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
    /// Its parser state when the request has a structured-output constraint.
    pub constraint: Option<RowConstraint>,
    /// Its speculation, when it may speculate (`super::spec`).
    pub spec: Option<RowSpec>,
    /// Positions of the last step beyond what it kept (rejected proposals):
    /// the worker takes them off the slot's length.
    pub rejected: usize,
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
/// logits row `from[i]` (prefill: its request's prompt row; `SKIP`: none);
/// a row that proposed tokens (`Row::spec`) reads the rows after it too,
/// one per proposed token, and may choose several tokens (`choose_run`).
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
    let mut scratch = sampling::Scratch::default();
    let mut constrained = Vec::new();
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
            Some(n) => beam_step(&mut rows[i..i + n], logits, &from[i..i + n], tok, at).map(|perm| {
                if let Some(perm) = perm {
                    reorders.push((i, perm));
                }
            }),
            None => choose_run(&mut rows[i], logits, from[i], tok, at, &mut scratch, &mut constrained),
        }));
        let failed = match chosen {
            Ok(Ok(())) => None,
            Ok(Err(reason)) => {
                let job = &rows[i].job;
                tracing::info!(parent: &job.span, "the request's constraint failed; ending it: {reason}");
                Some(super::EngineError::Constraint(reason))
            }
            Err(panic) => {
                panics += 1;
                scratch = sampling::Scratch::default();
                let text = super::panic_text(&panic);
                tracing::error!(parent: &rows[i].job.span, "choosing a token panicked; failing this request only: {text}");
                Some(super::EngineError::Panic(text))
            }
        };
        if let Some(e) = failed {
            let job = rows[i].job.clone();
            let _ = job.send(Event::Failed(e));
            for row in rows.iter_mut().filter(|r| Arc::ptr_eq(&r.job, &job)) {
                row.done = true;
                row.failed = true;
            }
        }
        i += width;
    }
    (reorders, panics)
}

/// A row's tokens of one step: one from logits row `first`, and when it
/// proposed tokens, one more from each following row while the token chosen
/// equals the one proposed (`super::spec`: each chosen exactly as a step of
/// its own would choose it). Sets `row.rejected` to the positions run that
/// were not kept.
fn choose_run(
    row: &mut Row,
    logits: &Logits,
    first: usize,
    tok: &Tokenizer,
    at: Instant,
    scratch: &mut sampling::Scratch,
    constrained: &mut Vec<f32>,
) -> Result<(), String> {
    let proposal = row.spec.as_mut().map(|s| std::mem::take(&mut s.proposal)).unwrap_or_default();
    let mut kept = 0;
    let result = loop {
        let given = logits.greedy(first + kept);
        if let Err(e) = choose_one(row, logits.row(first + kept), given, tok, at, scratch, constrained) {
            break Err(e);
        }
        kept += 1;
        if row.done || kept > proposal.len() || row.next != proposal[kept - 1] {
            break Ok(());
        }
    };
    if !proposal.is_empty() && result.is_ok() {
        // Positions run: the fed token and each proposal. Kept: the fed
        // token and the proposals that were chosen and run on (the last
        // token chosen is fed at the next step).
        row.rejected = proposal.len() + 1 - kept;
        let tokens = &row.history.tokens;
        let chosen = &tokens[tokens.len() - kept..];
        let accepted = chosen.iter().zip(&proposal).take_while(|(c, p)| c == p).count();
        if let Some(spec) = row.spec.as_mut() {
            spec.record(proposal.len(), accepted);
        }
    }
    result
}

/// Greedy search or sampling: one row's next token from its logits `raw`
/// (restricted to what its constraint allows, in `constrained`). Errs when
/// the constraint cannot go on.
fn choose_one(
    row: &mut Row,
    raw: &[f32],
    given: Option<Greedy>,
    tok: &Tokenizer,
    at: Instant,
    scratch: &mut sampling::Scratch,
    constrained: &mut Vec<f32>,
) -> Result<(), String> {
    let req = &row.job.request;
    req.fault.before_choosing(row.generated + 1);
    let top = req.top_logprobs as usize;
    let plan = &req.decoding;
    let mask = row.constraint.as_mut().map(RowConstraint::mask).transpose()?;
    let (choice, forced) = match &mask {
        None => {
            let sampling = plan.sampling.as_ref().zip(row.rng.as_mut()).map(|(s, rng)| (&s.warpers, rng));
            let masked = req.stop.masked(row.generated);
            let choosing =
                sampling::Row { raw, given, processors: &plan.processors, history: &row.history, masked: &masked, top };
            (sampling::choose(choosing, sampling, scratch), None)
        }
        Some(mask) => {
            constrained.clear();
            constrained.extend_from_slice(raw);
            mask.apply(constrained);
            let eos = row.constraint.as_ref().map_or(u32::MAX, RowConstraint::eos);
            choose_constrained(row, mask, constrained, eos, top, scratch)?
        }
    };
    row.generated += 1;
    row.next = choice.id;
    row.history.push(choice.id);
    if let Some(c) = row.constraint.as_mut() {
        c.consume(choice.id)?;
    }
    let req = &row.job.request;
    let finish = forced.or_else(|| req.stop.check(choice.id, row.generated));
    let (text, finish) = row.text.push_and_end(tok, choice.id, finish);
    let held = if finish.is_none() { row.text.held(tok, FinishReason::Deadline) } else { None };
    let sent = row.job.send(Event::Token { index: row.index, choice, text, finish, held, at });
    row.done = finish.is_some() || !sent;
    Ok(())
}

/// A constrained row's choice from `constrained` (its logits with what the
/// constraint forbids at −∞), and the finish its constraint forces: EOS once
/// the language has ended, whatever ignore_eos and min_new_tokens say. When
/// the processors forbid every allowed token, the most likely allowed one.
fn choose_constrained(
    row: &mut Row,
    mask: &Mask,
    constrained: &[f32],
    eos: u32,
    top: usize,
    scratch: &mut sampling::Scratch,
) -> Result<(sampling::Choice, Option<FinishReason>), String> {
    let req = &row.job.request;
    if mask.only(eos) {
        return Ok((sampling::report(constrained, eos, top), Some(FinishReason::Eos)));
    }
    let plan = &req.decoding;
    let sampling = plan.sampling.as_ref().zip(row.rng.as_mut()).map(|(s, rng)| (&s.warpers, rng));
    let masked = req.stop.masked(row.generated);
    let choosing = sampling::Row {
        raw: constrained,
        given: None,
        processors: &plan.processors,
        history: &row.history,
        masked: &masked,
        top,
    };
    let mut choice = sampling::choose(choosing, sampling, scratch);
    if !mask.allows(choice.id) {
        choice = sampling::greedy(constrained, &[], top);
        if !mask.allows(choice.id) {
            return Err(format!("it allows no token after {} generated tokens", row.generated));
        }
    }
    let forced = (choice.id == eos).then_some(FinishReason::Eos);
    Ok((choice, forced))
}

/// One beam search step for a request's rows (its beams, in order). Returns
/// the KV reordering, or `None` when the search ended; errs when a beam's
/// constraint cannot go on. With a constraint each beam scores its own
/// allowed tokens, and a beam that takes over another's place takes a copy
/// of that beam's parser state.
fn beam_step(
    group: &mut [Row],
    logits: &Logits,
    from: &[usize],
    tok: &Tokenizer,
    at: Instant,
) -> Result<Option<Vec<usize>>, String> {
    let job = group[0].job.clone();
    let req = &job.request;
    let top = req.top_logprobs as usize;
    let masks: Vec<Option<Mask>> = group
        .iter_mut()
        .map(|row| row.constraint.as_mut().map(RowConstraint::mask).transpose())
        .collect::<Result<_, _>>()?;
    let constrained: Vec<Option<Vec<f32>>> = masks
        .iter()
        .zip(from)
        .map(|(mask, &f)| {
            mask.as_ref().map(|m| {
                let mut row = logits.row(f).to_vec();
                m.apply(&mut row);
                row
            })
        })
        .collect();
    let base = |b: usize| constrained[b].as_deref().unwrap_or(logits.row(from[b]));
    let eos = group[0].constraint.as_ref().map(RowConstraint::eos);
    let log_probs: Vec<Vec<f32>> = group
        .iter()
        .enumerate()
        .map(|(b, row)| {
            let mask = masks[b].as_ref();
            if mask.is_some_and(Mask::allows_nothing) {
                return vec![f32::NEG_INFINITY; base(b).len()];
            }
            let mut lp = sampling::log_softmax(base(b));
            // The language has ended: EOS, whatever min_new_tokens says.
            if !mask.zip(eos).is_some_and(|(m, eos)| m.only(eos)) {
                req.decoding.processors.apply(&mut lp, &row.history, &req.stop.masked(row.generated));
            }
            lp
        })
        .collect();
    let report = |beam: usize, token: u32| sampling::report(base(beam), token, top);
    let search = group[0].beam.as_mut().expect("the first row of a beam group holds its search");
    let step = search.step(&log_probs, &report);
    if step.done {
        let mut results = search.results();
        if eos.is_some() {
            // A hypothesis through a token the constraint forbids (fewer
            // allowed continuations than beams) is not a result.
            results.retain(|h| h.score.is_finite());
        }
        let hypotheses = results.into_iter().map(|h| hypothesis_text(h, req, tok)).collect();
        let _ = job.send(Event::Beams { hypotheses, at });
        for row in group.iter_mut() {
            row.done = true;
        }
        return Ok(None);
    }
    let histories: Vec<History> = step.parents.iter().map(|&p| group[p].history.clone()).collect();
    let constraints: Vec<Option<RowConstraint>> = step
        .parents
        .iter()
        .zip(&step.tokens)
        .map(|(&p, &token)| {
            let allowed = masks[p].as_ref().is_none_or(|m| m.allows(token));
            group[p].constraint.as_ref().map(|c| c.fork(!allowed))
        })
        .collect();
    for (((row, mut history), mut constraint), &token) in
        group.iter_mut().zip(histories).zip(constraints).zip(&step.tokens)
    {
        if let Some(c) = constraint.as_mut() {
            c.consume(token)?;
        }
        history.push(token);
        row.history = history;
        row.constraint = constraint;
        row.next = token;
        row.generated += 1;
    }
    Ok(Some(step.parents))
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
