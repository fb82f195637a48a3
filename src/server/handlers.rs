//! The Generation methods: each authenticates, validates at the edge
//! (tokenizing on a blocking thread), submits to the engine, and turns the
//! engine's events into responses (`stream::Responder`), ending at the
//! call's deadline, a stalled client or the engine's last event. An
//! `InFlightGuard` per call keeps the in-flight table, the metrics and the
//! API-key permit right however the call ends.
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::stream::{Collector, Responder, Step};
use super::{GenerationService, auth};
use crate::engine::{EngineHandle, Job};
use crate::error::Error;
use crate::pb::{self, generation_server::Generation};
use crate::telemetry;
use crate::validation::{self, ValidRequest, ValidationError};

/// Removes a request from the in-flight table when its handler ends, however
/// it ends, and counts how it ended: finished, failed (by error type), or
/// dropped because the client went away ("cancelled"). Holds the request's
/// API-key permit, released (with what the request used) at the same time.
struct InFlightGuard {
    engine: EngineHandle,
    id: String,
    outcome: Option<&'static str>,
    permit: Option<auth::Permit>,
}

impl InFlightGuard {
    fn new(engine: EngineHandle, id: String, permit: Option<auth::Permit>) -> Self {
        metrics::gauge!(telemetry::REQUESTS_IN_FLIGHT).increment(1.0);
        InFlightGuard { engine, id, outcome: None, permit }
    }

    /// Finished; `usage` is what it used (the final message's).
    fn ok(&mut self, usage: Option<&pb::Usage>) {
        self.outcome = Some("ok");
        if let (Some(p), Some(u)) = (self.permit.as_mut(), usage) {
            p.used(u64::from(u.prompt_tokens) + u64::from(u.generated_tokens));
        }
    }

    fn fail(&mut self, e: &Error) {
        self.outcome = Some(e.error_type());
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.engine.finished(&self.id);
        metrics::gauge!(telemetry::REQUESTS_IN_FLIGHT).decrement(1.0);
        match self.outcome.unwrap_or("cancelled") {
            "ok" => {}
            kind => failed(kind, self.permit.as_ref().map(|p| p.key())),
        }
    }
}

/// Counts a failed call, by error type and (with API keys) key name.
fn failed(kind: &'static str, key: Option<&str>) {
    let mut labels = vec![metrics::Label::new("error_type", kind)];
    labels.extend(key.map(|k| metrics::Label::new("key", k.to_string())));
    metrics::counter!(telemetry::REQUESTS_FAILED, labels).increment(1);
}

/// Completes at `deadline`, or never.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Parses a `grpc-timeout` header value (at most 8 digits and a unit).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The client's deadline. Tonic cancels a unary call at exactly the header's
/// timeout (as CANCELLED), and clients enforce it on their side too; ending a
/// little earlier (a tenth, at most 50 ms) lets the client see
/// DEADLINE_EXCEEDED from us instead of a race.
fn deadline_of<T>(req: &Request<T>, arrival: Instant) -> Option<Instant> {
    let timeout = req.metadata().get("grpc-timeout")?.to_str().ok().and_then(parse_grpc_timeout)?;
    let margin = (timeout / 10).min(Duration::from_millis(50));
    Some(arrival + timeout - margin)
}

type EventStream = mpsc::Receiver<crate::engine::Event>;

/// Messages a stream holds for its client (beside HTTP/2's own buffers)
/// before its handler waits for the client to read.
const STREAM_BUFFER: usize = 32;

/// Why a request's events ended without a final one: the engine ended it
/// because its client did not read (`--graph exported`, which cannot pause
/// a row), or the engine stopped.
fn ended_without_word(stalled: &AtomicBool) -> Error {
    if stalled.load(Ordering::Relaxed) {
        Error::Stalled(format!(
            "the client did not read its stream: {} steps of tokens waited unread, and this graph cannot pause a row; the request was ended",
            crate::engine::STEPS_BUFFERED
        ))
    } else {
        Error::ShuttingDown
    }
}

/// An accepted request, as its handler continues with it.
struct Started {
    valid: ValidRequest,
    events: EventStream,
    guard: InFlightGuard,
    span: tracing::Span,
    /// Whether the generated text is logged (`--log-prompts`).
    log_text: bool,
    /// Set when the engine ended the request because its client did not read.
    stalled: Arc<AtomicBool>,
    /// The API key's name, when keys are required.
    key: Option<Arc<str>>,
}

impl GenerationService {
    /// Authenticates, validates (tokenizing on a blocking thread) and queues the request.
    async fn start(&self, req: Request<pb::GenerateRequest>) -> Result<Started, Error> {
        let arrival = Instant::now();
        let caller = self.caller(&req);
        let key = caller.as_ref().ok().and_then(|c| c.as_ref()).map(|c| c.name.to_string());
        let mut labels = Vec::new();
        labels.extend(key.clone().map(|k| metrics::Label::new("key", k)));
        metrics::counter!(telemetry::REQUESTS_RECEIVED, labels).increment(1);
        let result = match caller {
            Ok(caller) => self.admit(req, arrival, caller).await,
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            failed(e.error_type(), key.as_deref());
        }
        result
    }

    async fn admit(
        &self,
        req: Request<pb::GenerateRequest>,
        arrival: Instant,
        caller: Option<auth::Caller>,
    ) -> Result<Started, Error> {
        let state = self.state()?.clone();
        if state.draining.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        let deadline = deadline_of(&req, arrival);
        let fault = crate::fault::Fault::from_metadata(req.metadata())
            .map_err(|message| crate::validation::ValidationError::Invalid { field: crate::fault::HEADER, message })?;
        let body = req.into_inner();
        let prompt = self
            .log_prompts
            .then(|| if body.prompt.is_empty() { format!("{:?}", body.prompt_token_ids) } else { body.prompt.clone() });
        let engine = state.engine.clone();
        let valid = tokio::task::spawn_blocking(move || {
            validation::validate(body, &state.tokenizer, &state.limits, &state.grammars, arrival, deadline)
        })
        .await
        .map_err(|e| Error::Engine(crate::engine::EngineError::Panic(e.to_string())))??;
        let valid = ValidRequest { fault, ..valid };
        // Only keys given a min_priority may put requests ahead of their own queue.
        if let Some(c) = &caller
            && valid.priority < c.min_priority()
        {
            return Err(crate::validation::ValidationError::Invalid {
                field: "priority",
                message: format!(
                    "{} is below the lowest priority key {:?} may ask for, {} (its min_priority; lower runs first)",
                    valid.priority,
                    c.name,
                    c.min_priority()
                ),
            }
            .into());
        }
        let (tx, rx) = Job::channel(valid.decoding.rows());
        let method = match (&valid.decoding.sampling, &valid.decoding.beam) {
            (Some(_), _) => "sampling",
            (_, Some(_)) => "beam_search",
            _ => "greedy",
        };
        // A key's charge: what the request may use.
        let cost = valid.prompt_ids.len() as u64
            + u64::from(valid.stop.max_new_tokens) * u64::from(valid.decoding.sequences());
        let permit = match (&self.keys, &caller) {
            (Some(keys), Some(caller)) => Some(keys.admit(caller, &valid.request_id, cost)?),
            _ => None,
        };
        let span = tracing::info_span!(
            "request",
            id = %valid.request_id,
            key = tracing::field::Empty,
            prompt_tokens = valid.prompt_ids.len(),
            method,
            max_new_tokens = valid.stop.max_new_tokens
        );
        if let Some(c) = &caller {
            span.record("key", tracing::field::display(&c.name));
        }
        if let Some(prompt) = &prompt {
            tracing::info!(parent: &span, prompt, stop_sequences = ?valid.stop_sequences, "request prompt (--log-prompts)");
        }
        let mut job = Job::new(valid.clone(), tx, span.clone());
        if let Some(c) = &caller {
            job.tenant = crate::engine::fair::Tenant { name: Some(c.name.clone()), weight: c.weight() };
        }
        let key = caller.as_ref().map(|c| c.name.clone());
        let stalled = job.stalled.clone();
        engine.submit(job)?;
        let guard = InFlightGuard::new(engine, valid.request_id.clone(), permit);
        metrics::counter!(telemetry::PROMPT_TOKENS).increment(valid.prompt_ids.len() as u64);
        metrics::histogram!(telemetry::REQUEST_PROMPT_TOKENS).record(valid.prompt_ids.len() as f64);
        Ok(Started { valid, events: rx, guard, span, log_text: prompt.is_some(), stalled, key })
    }
}

#[tonic::async_trait]
impl Generation for GenerationService {
    async fn generate(&self, req: Request<pb::GenerateRequest>) -> Result<Response<pb::GenerateResponse>, Status> {
        let Started { valid, mut events, mut guard, span, log_text, stalled, key } = self.start(req).await?;
        let mut responder = Responder::new(self.state()?.tokenizer.clone(), &valid, span);
        responder.set_key(key);
        if log_text {
            responder.log_text();
        }
        let mut collector = Collector::new(&valid.request_id);
        loop {
            let step = tokio::select! {
                event = events.recv() => match event {
                    Some(event) => responder.on_event(event),
                    None => break,
                },
                // Our own timer: the answer is DEADLINE_EXCEEDED even if the
                // engine is in the middle of a long step.
                _ = until(valid.deadline) => responder.expire(),
            };
            match step {
                Step::Nothing => {}
                Step::Message(m) => collector.add(m),
                Step::Last(m, None) => {
                    collector.add(m);
                    let response = collector.finish();
                    guard.ok(response.usage.as_ref());
                    return Ok(Response::new(response));
                }
                Step::Many(ms, last, None) => {
                    ms.into_iter().chain([last]).for_each(|m| collector.add(m));
                    let response = collector.finish();
                    guard.ok(response.usage.as_ref());
                    return Ok(Response::new(response));
                }
                Step::Last(_, Some(e)) | Step::Many(_, _, Some(e)) | Step::Fail(e) => {
                    guard.fail(&e);
                    return Err(e.into());
                }
            }
        }
        let e = ended_without_word(&stalled);
        guard.fail(&e);
        Err(e.into())
    }

    type GenerateStreamStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

    async fn generate_stream(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let Started { valid, mut events, mut guard, span, log_text, stalled, key } = self.start(req).await?;
        let mut responder = Responder::new(self.state()?.tokenizer.clone(), &valid, span);
        responder.set_key(key);
        if log_text {
            responder.log_text();
        }
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let stall_timeout = self.stall_timeout;
        tokio::spawn(async move {
            // One place is kept for the call's last word (its status), so
            // that it can be said even to a client that stopped reading.
            let Ok(last_word) = tx.clone().reserve_owned().await else { return };
            let mut last_word = Some(last_word);
            let mut end = |e: Error, guard: &mut InFlightGuard| {
                guard.fail(&e);
                if let Some(slot) = last_word.take() {
                    slot.send(Err(e.into()));
                }
            };
            loop {
                let step = tokio::select! {
                    event = events.recv() => match event {
                        Some(event) => responder.on_event(event),
                        None => {
                            end(ended_without_word(&stalled), &mut guard);
                            return;
                        }
                    },
                    // The client went away: dropping `events` tells the engine.
                    _ = tx.closed() => return,
                    _ = until(valid.deadline) => responder.expire(),
                };
                let (msgs, status, last) = match step {
                    Step::Nothing => continue,
                    Step::Message(m) => (vec![m], None, false),
                    Step::Last(m, status) => (vec![m], status, true),
                    Step::Many(mut ms, m, status) => {
                        ms.push(m);
                        (ms, status, true)
                    }
                    Step::Fail(e) => (Vec::new(), Some(e), true),
                };
                let usage = msgs.last().and_then(|m| m.usage);
                for m in msgs {
                    match tokio::time::timeout(stall_timeout, tx.send(Ok(m))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return,
                        // The client has read nothing for that long while
                        // its messages waited: end the call (and with it the
                        // request: its rows, paused meanwhile, are evicted).
                        Err(_) => {
                            let e = Error::Stalled(format!(
                                "the client read nothing for {:.1} s (--stream-stall-timeout) while {STREAM_BUFFER} messages waited; the stream was ended",
                                stall_timeout.as_secs_f64()
                            ));
                            end(e, &mut guard);
                            return;
                        }
                    }
                }
                match status {
                    Some(e) => end(e, &mut guard),
                    None if last => guard.ok(usage.as_ref()),
                    None => {}
                }
                if last {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn tokenize(&self, req: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        self.caller(&req)?;
        let state = self.state()?.clone();
        let text = req.into_inner().text;
        let pieces = tokio::task::spawn_blocking(move || state.tokenizer.encode_pieces(&text).map(|p| (p, text)))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::invalid_argument(format!("text: {e}")))?;
        let (pieces, text) = pieces;
        Ok(Response::new(pb::TokenizeResponse {
            token_ids: pieces.iter().map(|p| p.id).collect(),
            pieces: pieces
                .iter()
                .map(|p| pb::TokenPiece {
                    id: p.id,
                    text: text.get(p.start..p.end).unwrap_or_default().to_string(),
                    start: p.start as u32,
                    end: p.end as u32,
                })
                .collect(),
        }))
    }

    async fn detokenize(
        &self,
        req: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeResponse>, Status> {
        self.caller(&req)?;
        let state = self.state()?.clone();
        let req = req.into_inner();
        let vocab = state.limits.vocab_size;
        if let Some((i, &id)) = req.token_ids.iter().enumerate().find(|(_, id)| **id >= vocab) {
            let message = format!("[{i}] = {id} is not a token id: must be below the vocabulary size {vocab}");
            return Err(Error::Validation(ValidationError::Invalid { field: "token_ids", message }).into());
        }
        let text =
            tokio::task::spawn_blocking(move || state.tokenizer.decode_with(&req.token_ids, req.skip_special_tokens))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::DetokenizeResponse { text }))
    }

    async fn cancel(&self, req: Request<pb::CancelRequest>) -> Result<Response<pb::CancelResponse>, Status> {
        let caller = self.caller(&req)?;
        let id = req.into_inner().request_id;
        // With API keys a request can be cancelled only by its own key;
        // another key's request answers as if there were none.
        if let (Some(keys), Some(caller)) = (&self.keys, &caller)
            && !keys.owns(caller, &id)
        {
            return Ok(Response::new(pb::CancelResponse { found: false }));
        }
        let found = self.state()?.engine.cancel(&id);
        Ok(Response::new(pb::CancelResponse { found }))
    }

    async fn model_info(&self, req: Request<pb::ModelInfoRequest>) -> Result<Response<pb::ModelInfoResponse>, Status> {
        self.caller(&req)?;
        let s = self.state()?;
        Ok(Response::new(pb::ModelInfoResponse {
            model: s.model_name.clone(),
            vocab_size: s.limits.vocab_size,
            context_length: s.limits.context_length,
            eos_token_id: s.limits.eos_token_id,
            max_new_tokens_limit: s.limits.max_new_tokens,
            default_max_new_tokens: s.limits.default_max_new_tokens,
            max_top_logprobs: validation::MAX_TOP_LOGPROBS,
            decoding_methods: vec!["greedy".into(), "sampling".into(), "beam_search".into()],
            server_version: env!("CARGO_PKG_VERSION").into(),
            kv_dtype: s.kv_dtype.clone(),
            weights: s.weights.clone(),
            max_beams: s.limits.max_beams,
            max_stop_sequences: validation::MAX_STOP_SEQUENCES as u32,
            max_stop_sequence_bytes: validation::MAX_STOP_SEQUENCE_BYTES as u32,
            max_constraint_bytes: crate::constraint::MAX_CONSTRAINT_BYTES as u32,
            constraints: crate::constraint::KINDS.iter().map(|k| k.to_string()).collect(),
            n_layer: s.config.n_layer as u32,
            n_embd: s.config.n_embd as u32,
            n_inner: s.config.n_inner as u32,
            spec_tokens: s.engine.spec_tokens() as u32,
            max_samples: validation::MAX_SAMPLES,
            max_prompt_tokens: s.limits.max_prompt_tokens,
            max_batch_size: s.engine.max_batch_size() as u32,
            workers: s.engine.workers().len() as u32,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }
}
