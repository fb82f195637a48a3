//! The engine: one OS thread that owns the ONNX Runtime session and the KV
//! cache, fed through a bounded channel. Handlers never touch the session.
//!
//! Today the thread serves one request at a time, in arrival order, with a
//! KV cache kept across decode steps; the continuous-batching scheduler will
//! replace `Worker::serve` and keep the same `Job`/`Event` interface.
pub mod model;

use std::panic::AssertUnwindSafe;
use std::time::Instant;

use tokio::sync::mpsc;

pub use model::{ForwardError, ForwardInput, KvCache, Logits, Model, SessionOptions};

use crate::pb::FinishReason;
use crate::sampling::{self, Choice};
use crate::validation::ValidRequest;

#[derive(Debug, thiserror::Error, Clone)]
pub enum EngineError {
    #[error("{0}")]
    Forward(String),
    #[error("the engine panicked while serving this request: {0}")]
    Panic(String),
}

impl From<ForwardError> for EngineError {
    fn from(e: ForwardError) -> Self {
        EngineError::Forward(e.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the queue of waiting requests is full ({capacity} requests); retry later")]
    Full { capacity: usize },
    #[error("the engine has stopped")]
    Stopped,
}

/// What the engine tells a request's task, in order.
#[derive(Debug)]
pub enum Event {
    /// Prefill started (the request left the queue).
    Started { at: Instant },
    /// A token was chosen for sequence `index`; `finish` is set on its last.
    Token {
        index: u32,
        choice: Choice,
        finish: Option<FinishReason>,
        at: Instant,
    },
    /// Sequence `index` ended without a new token (cancelled, deadline).
    Ended { index: u32, reason: FinishReason },
    /// The request failed; nothing follows.
    Failed(EngineError),
}

/// A validated request and the channel its events go to. The request's task
/// drops the receiver when the client goes away; the engine notices before
/// its next step and stops.
pub struct Job {
    pub request: ValidRequest,
    pub events: mpsc::UnboundedSender<Event>,
    pub span: tracing::Span,
}

/// The cloneable handle request handlers submit jobs through.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Job>,
    capacity: usize,
}

impl EngineHandle {
    /// Queues `job`, or refuses at once when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), QueueError> {
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => QueueError::Full {
                capacity: self.capacity,
            },
            mpsc::error::TrySendError::Closed(_) => QueueError::Stopped,
        })
    }
}

/// Starts the engine thread; it ends when every handle is dropped.
pub fn spawn(model: Model, max_queue: usize) -> (EngineHandle, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(max_queue.max(1));
    let thread = std::thread::Builder::new()
        .name("batchgen-engine".into())
        .spawn(move || Worker { model }.serve(rx))
        .expect("spawning the engine thread");
    (
        EngineHandle {
            tx,
            capacity: max_queue.max(1),
        },
        thread,
    )
}

struct Worker {
    model: Model,
}

impl Worker {
    fn serve(mut self, mut rx: mpsc::Receiver<Job>) {
        while let Some(job) = rx.blocking_recv() {
            if job.events.is_closed() {
                tracing::debug!(parent: &job.span, "client left before prefill");
                continue;
            }
            let _enter = job.span.clone().entered();
            let events = job.events.clone();
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| self.generate(&job)));
            let failure = match outcome {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(panic) => Some(EngineError::Panic(panic_text(&panic))),
            };
            if let Some(e) = failure {
                tracing::error!("request failed in the engine: {e}");
                let _ = events.send(Event::Failed(e));
            }
        }
    }

    /// Prefills the prompt and decodes greedily until a stop condition, the
    /// client leaving or the deadline.
    fn generate(&mut self, job: &Job) -> Result<(), EngineError> {
        let req = &job.request;
        let send = |e: Event| job.events.send(e).is_ok();
        if req.deadline.is_some_and(|d| Instant::now() >= d) {
            send(Event::Ended {
                index: 0,
                reason: FinishReason::Deadline,
            });
            return Ok(());
        }
        send(Event::Started { at: Instant::now() });
        let cache = self.model.empty_cache(1)?;
        let (mut logits, mut cache) = self.model.forward(&ForwardInput::single(&req.prompt_ids, 0), cache)?;
        let mut generated = 0u32;
        loop {
            let masked = req.stop.masked(generated);
            let choice = sampling::greedy(logits.row(0), &masked, req.top_logprobs as usize);
            generated += 1;
            let id = choice.id;
            let finish = req.stop.check(id, generated);
            if !send(Event::Token {
                index: 0,
                choice,
                finish,
                at: Instant::now(),
            }) {
                tracing::debug!("client left; stopping");
                return Ok(());
            }
            if finish.is_some() {
                return Ok(());
            }
            // Checked before paying for the next step.
            if job.events.is_closed() {
                tracing::debug!("client left; stopping");
                return Ok(());
            }
            if req.deadline.is_some_and(|d| Instant::now() >= d) {
                send(Event::Ended {
                    index: 0,
                    reason: FinishReason::Deadline,
                });
                return Ok(());
            }
            let input = ForwardInput::single(&[id], cache.len);
            let t = Instant::now();
            (logits, cache) = self.model.forward(&input, cache)?;
            tracing::trace!(forward_us = t.elapsed().as_micros() as u64, "decode step");
        }
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
