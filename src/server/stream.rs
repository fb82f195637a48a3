//! Turns engine events into response messages: per-token text (the engine
//! detokenized it and matched the stop sequences) and log-probabilities,
//! finish reasons and usage.
//!
//! `Generate` folds the very messages `GenerateStream` sends, so a unary
//! answer's text is by construction the concatenation of the streamed texts.
use std::time::Instant;

use crate::decoding::sampling::Choice;
use crate::engine::Event;
use crate::error::Error;
use crate::pb::{self, FinishReason};
use crate::telemetry;
use crate::tokenizer::Tokenizer;
use crate::validation::ValidRequest;

/// Per-sequence state on the response side.
struct SequenceState {
    logprob_sum: f64,
    finished: bool,
    seed: Option<u64>,
    /// When its previous token arrived (inter-token latency).
    last_token_at: Option<Instant>,
    /// Text the engine holds back and how the sequence ends with it at a
    /// deadline (sent by `expire`).
    held: Option<(String, FinishReason)>,
}

/// Per-request state on the response side.
pub struct Responder {
    tokenizer: Tokenizer,
    request_id: String,
    prompt_tokens: u32,
    cached_prompt_tokens: u32,
    arrival: Instant,
    started: Option<Instant>,
    first_token: Option<Instant>,
    generated: u32,
    sequences: Vec<SequenceState>,
    /// The request's span (id, prompt tokens, method): the log line of its end goes there.
    span: tracing::Span,
    /// Each sequence's text so far, kept only to be logged (`--log-prompts`).
    texts: Option<Vec<String>>,
    /// The API key's name (its tokens are counted under it).
    key: Option<std::sync::Arc<str>>,
}

/// What one event turns into.
pub enum Step {
    /// Send this message; more follow.
    Message(pb::GenerateStreamResponse),
    /// Send this message; it is the last one. `Some` error: then end the call
    /// with that status.
    Last(pb::GenerateStreamResponse, Option<Error>),
    /// Send these messages, then this last one, then end the call with the
    /// status if any (beam search results; a deadline for several sequences).
    Many(Vec<pb::GenerateStreamResponse>, pb::GenerateStreamResponse, Option<Error>),
    /// End the call with this status, no message.
    Fail(Error),
    Nothing,
}

impl Responder {
    pub fn new(tokenizer: Tokenizer, req: &ValidRequest, span: tracing::Span) -> Self {
        let seed = req.decoding.sampling.as_ref().map(|s| s.seed);
        Responder {
            tokenizer,
            request_id: req.request_id.clone(),
            prompt_tokens: req.prompt_ids.len() as u32,
            cached_prompt_tokens: 0,
            arrival: req.arrival,
            started: None,
            first_token: None,
            generated: 0,
            sequences: (0..req.decoding.sequences())
                .map(|i| SequenceState {
                    logprob_sum: 0.0,
                    finished: false,
                    seed: seed.map(|s| s.wrapping_add(u64::from(i))),
                    last_token_at: None,
                    held: None,
                })
                .collect(),
            span,
            texts: None,
            key: None,
        }
    }

    /// Counts the request's tokens under its API key's name.
    pub fn set_key(&mut self, key: Option<std::sync::Arc<str>>) {
        self.key = key;
    }

    /// Keeps the generated text to log it, with the request's end (`--log-prompts`).
    pub fn log_text(&mut self) {
        self.texts = Some(vec![String::new(); self.sequences.len()]);
    }

    fn keep_text(&mut self, index: usize, text: &str) {
        if let Some(t) = self.texts.as_mut().and_then(|t| t.get_mut(index)) {
            t.push_str(text);
        }
    }

    fn token(&self, c: &Choice) -> pb::Token {
        let top_logprobs = c
            .top
            .iter()
            .map(|&(id, logprob)| pb::TopLogprob { id, text: self.tokenizer.token_text(id), logprob })
            .collect();
        pb::Token {
            id: c.id,
            text: self.tokenizer.token_text(c.id),
            logprob: c.logprob,
            top_logprobs,
            special: self.tokenizer.is_special(c.id),
        }
    }

    fn usage(&self, now: Instant) -> pb::Usage {
        let secs = |t: Option<Instant>| t.map_or(0.0, |t| t.duration_since(self.arrival).as_secs_f64());
        pb::Usage {
            prompt_tokens: self.prompt_tokens,
            generated_tokens: self.generated,
            queue_seconds: secs(self.started),
            time_to_first_token_seconds: secs(self.first_token),
            total_seconds: now.duration_since(self.arrival).as_secs_f64(),
            cached_prompt_tokens: self.cached_prompt_tokens,
        }
    }

    /// Ends sequence `index` in `msg` (its text is complete); true when it
    /// was the request's last.
    fn finish(&mut self, msg: &mut pb::GenerateStreamResponse, reason: FinishReason) -> bool {
        let seq = &mut self.sequences[msg.index as usize];
        msg.finish_reason = reason as i32;
        msg.logprob_sum = seq.logprob_sum;
        msg.score = seq.logprob_sum;
        msg.seed = seq.seed;
        seq.finished = true;
        metrics::counter!(telemetry::SEQUENCES_FINISHED, "finish_reason" => reason_label(reason)).increment(1);
        let last = self.sequences.iter().all(|s| s.finished);
        if last {
            let usage = self.usage(Instant::now());
            metrics::histogram!(telemetry::REQUEST_DURATION).record(usage.total_seconds);
            metrics::histogram!(telemetry::REQUEST_GENERATED_TOKENS).record(f64::from(usage.generated_tokens));
            if let Some(key) = &self.key {
                metrics::counter!(telemetry::KEY_GENERATED_TOKENS, "key" => key.to_string())
                    .increment(u64::from(usage.generated_tokens));
            }
            tracing::info!(
                parent: &self.span,
                prompt_tokens = usage.prompt_tokens,
                generated_tokens = usage.generated_tokens,
                queue_seconds = usage.queue_seconds,
                time_to_first_token_seconds = usage.time_to_first_token_seconds,
                total_seconds = usage.total_seconds,
                finish_reason = reason_label(reason),
                "request finished"
            );
            if let Some(texts) = &self.texts {
                tracing::info!(parent: &self.span, completions = ?texts, "request text (--log-prompts)");
            }
            msg.usage = Some(usage);
        }
        last
    }

    /// Counts one token sent for sequence `index`, arrived at `at`.
    fn count_token(&mut self, index: usize, at: Instant) {
        if self.first_token.is_none() {
            self.first_token = Some(at);
            metrics::histogram!(telemetry::TIME_TO_FIRST_TOKEN).record(at.duration_since(self.arrival).as_secs_f64());
        }
        self.generated += 1;
        metrics::counter!(telemetry::GENERATED_TOKENS).increment(1);
        let seq = &mut self.sequences[index];
        if let Some(prev) = seq.last_token_at.replace(at) {
            metrics::histogram!(telemetry::INTER_TOKEN_LATENCY).record(at.duration_since(prev).as_secs_f64());
        }
    }

    /// Beam search results: each returned sequence in one message.
    fn beams(&mut self, hypotheses: Vec<(crate::decoding::beam::Hypothesis, String)>, at: Instant) -> Step {
        let mut msgs = Vec::new();
        for (i, (h, text)) in hypotheses.into_iter().enumerate() {
            let mut msg = pb::GenerateStreamResponse { request_id: self.request_id.clone(), ..Default::default() };
            msg.index = i as u32;
            self.keep_text(i, &text);
            msg.text = text;
            for c in &h.tokens {
                self.count_token(i, at);
                self.sequences[i].logprob_sum += f64::from(c.logprob);
                msg.tokens.push(self.token(c));
            }
            let reason = h.finish;
            self.finish(&mut msg, reason);
            msg.score = f64::from(h.score);
            msgs.push(msg);
        }
        match msgs.pop() {
            None => {
                Step::Fail(Error::Engine(crate::engine::EngineError::Forward("beam search returned nothing".into())))
            }
            Some(last) if msgs.is_empty() => Step::Last(last, None),
            Some(last) => Step::Many(msgs, last, None),
        }
    }

    /// The request's deadline passed: ends every unfinished sequence with
    /// FINISH_REASON_DEADLINE, whatever the engine is doing (dropping the
    /// events then evicts the rows). Text the engine held back (an
    /// unfinished character, a partial stop sequence) is sent as the engine
    /// would at its own end (cut at a stop sequence that it completes, which
    /// then ends that sequence with STOP_SEQUENCE); the status is
    /// DEADLINE_EXCEEDED when any sequence ended by the deadline.
    pub fn expire(&mut self) -> Step {
        let unfinished: Vec<u32> =
            (0..self.sequences.len() as u32).filter(|&i| !self.sequences[i as usize].finished).collect();
        let mut msgs = Vec::new();
        let mut deadline = false;
        for index in unfinished {
            let (text, reason) =
                self.sequences[index as usize].held.take().unwrap_or((String::new(), FinishReason::Deadline));
            deadline |= reason == FinishReason::Deadline;
            match self.on_event(Event::Ended { index, reason, text }) {
                Step::Message(m) => msgs.push(m),
                Step::Last(m, status) => {
                    let status = if deadline { Some(Error::Deadline) } else { status };
                    return if msgs.is_empty() { Step::Last(m, status) } else { Step::Many(msgs, m, status) };
                }
                _ => {}
            }
        }
        Step::Fail(Error::Deadline)
    }

    pub fn on_event(&mut self, event: Event) -> Step {
        let mut msg = pb::GenerateStreamResponse { request_id: self.request_id.clone(), ..Default::default() };
        let (index, finish) = match event {
            Event::Started { at } => {
                if self.started.is_none() {
                    self.started = Some(at);
                    metrics::histogram!(telemetry::QUEUE_DURATION)
                        .record(at.duration_since(self.arrival).as_secs_f64());
                }
                return Step::Nothing;
            }
            Event::Prefilled { cached_tokens } => {
                self.cached_prompt_tokens = cached_tokens;
                return Step::Nothing;
            }
            Event::Failed(e) => return Step::Fail(e.into()),
            Event::Beams { hypotheses, at } => return self.beams(hypotheses, at),
            Event::Token { index, choice, text, finish, held, at } => {
                if self.sequences.get(index as usize).is_none_or(|s| s.finished) {
                    return Step::Nothing;
                }
                self.sequences[index as usize].held = held;
                self.count_token(index as usize, at);
                self.sequences[index as usize].logprob_sum += f64::from(choice.logprob);
                self.keep_text(index as usize, &text);
                msg.text = text;
                msg.tokens.push(self.token(&choice));
                (index, finish)
            }
            Event::Ended { index, reason, text } => {
                if self.sequences.get(index as usize).is_none_or(|s| s.finished) {
                    return Step::Nothing;
                }
                self.keep_text(index as usize, &text);
                msg.text = text;
                (index, Some(reason))
            }
        };
        msg.index = index;
        let Some(reason) = finish else {
            return Step::Message(msg);
        };
        if !self.finish(&mut msg, reason) {
            return Step::Message(msg);
        }
        let status = (reason == FinishReason::Deadline).then_some(Error::Deadline);
        Step::Last(msg, status)
    }
}

/// The `finish_reason` label: the enum name without its prefix, lower case.
pub fn reason_label(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Unspecified => "unspecified",
        FinishReason::Length => "length",
        FinishReason::Eos => "eos",
        FinishReason::StopSequence => "stop_sequence",
        FinishReason::Cancelled => "cancelled",
        FinishReason::Deadline => "deadline",
        FinishReason::Error => "error",
        FinishReason::ContextFull => "context_full",
    }
}

/// Folds stream messages into the unary response.
pub struct Collector {
    response: pb::GenerateResponse,
}

impl Collector {
    pub fn new(request_id: &str) -> Self {
        Collector { response: pb::GenerateResponse { request_id: request_id.into(), ..Default::default() } }
    }

    pub fn add(&mut self, msg: pb::GenerateStreamResponse) {
        let seqs = &mut self.response.sequences;
        while seqs.len() <= msg.index as usize {
            seqs.push(pb::Sequence { index: seqs.len() as u32, ..Default::default() });
        }
        let seq = &mut seqs[msg.index as usize];
        seq.text.push_str(&msg.text);
        seq.tokens.extend(msg.tokens);
        if msg.finish_reason != 0 {
            seq.finish_reason = msg.finish_reason;
            seq.logprob_sum = msg.logprob_sum;
            seq.score = msg.score;
            seq.seed = msg.seed;
        }
        if msg.usage.is_some() {
            self.response.usage = msg.usage;
        }
    }

    pub fn finish(self) -> pb::GenerateResponse {
        self.response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn responder(sequences: u32) -> Responder {
        let (tok, limits) = crate::validation::test_setup();
        let req = pb::GenerateRequest {
            prompt: "Hello".into(),
            decoding: Some(pb::Decoding {
                method: Some(pb::decoding::Method::Sampling(pb::Sampling {
                    temperature: 1.0,
                    num_samples: sequences,
                    ..Default::default()
                })),
                ..Default::default()
            }),
            ..Default::default()
        };
        let valid =
            crate::validation::validate(req, &tok, &limits, crate::constraint::test_grammars(), Instant::now(), None)
                .unwrap();
        Responder::new(tok, &valid, tracing::Span::none())
    }

    fn token(index: u32, text: &str, held: Option<(&str, FinishReason)>) -> Event {
        Event::Token {
            index,
            choice: Choice { id: 11, logprob: -1.0, top: vec![] },
            text: text.into(),
            finish: None,
            held: held.map(|(t, r)| (t.to_string(), r)),
            at: Instant::now(),
        }
    }

    fn ends(step: Step) -> (Vec<pb::GenerateStreamResponse>, Option<Error>) {
        match step {
            Step::Last(m, status) => (vec![m], status),
            Step::Many(mut msgs, m, status) => {
                msgs.push(m);
                (msgs, status)
            }
            _ => panic!("expire ends the call"),
        }
    }

    #[test]
    fn a_deadline_on_the_response_side_sends_what_the_engine_held_back() {
        let mut r = responder(2);
        r.on_event(token(0, "a", Some((" ok", FinishReason::Deadline))));
        // A later token replaces what was held (here: nothing left held).
        r.on_event(token(1, "b", Some(("\u{FFFD}", FinishReason::Deadline))));
        r.on_event(token(1, "c", None));
        let (msgs, status) = ends(r.expire());
        assert!(matches!(status, Some(Error::Deadline)));
        let by_index = |i: u32| msgs.iter().find(|m| m.index == i).unwrap();
        assert_eq!(by_index(0).text, " ok");
        assert_eq!(by_index(0).finish_reason, FinishReason::Deadline as i32);
        assert_eq!(by_index(1).text, "");
        assert_eq!(by_index(1).finish_reason, FinishReason::Deadline as i32);
    }

    #[test]
    fn held_text_that_completes_a_stop_sequence_ends_with_it() {
        let mut r = responder(1);
        r.on_event(token(0, "a", Some(("b", FinishReason::StopSequence))));
        let (msgs, status) = ends(r.expire());
        assert!(status.is_none(), "every sequence ended by its stop sequence");
        assert_eq!((msgs[0].text.as_str(), msgs[0].finish_reason), ("b", FinishReason::StopSequence as i32));
    }
}
