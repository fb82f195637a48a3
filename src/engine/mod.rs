//! The engine: worker threads that each own an ONNX Runtime session and a
//! continuously batched KV cache, fed through channels. Handlers never touch
//! a session; they submit a `Job` and read its `Event`s.
pub mod admission;
pub mod backend;
pub mod fair;
pub mod layout;
pub mod model;
pub mod padded;
pub mod pages;
pub mod preempt;
pub mod prefix;
mod rows;
pub mod slots;
pub mod spec;
pub mod stats;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use dashmap::DashMap;
use tokio::sync::mpsc;

pub use backend::{Backend, SlotBackend};
pub use model::{ForwardError, ForwardInput, KvCache, Logits, Model, SessionOptions};
pub use padded::PaddedBackend;
pub use stats::WorkerStats;

use crate::decoding::sampling::Choice;
use crate::pb::FinishReason;
use crate::tokenizer::Tokenizer;
use crate::validation::ValidRequest;

#[derive(Debug, thiserror::Error, Clone)]
pub enum EngineError {
    #[error("{0}")]
    Forward(String),
    #[error("the engine panicked while serving this request: {0}")]
    Panic(String),
    /// The request's constraint could not go on (a step beyond the
    /// per-step limits of its grammar): the request's fault, not the server's.
    #[error("the structured-output constraint failed: {0}")]
    Constraint(String),
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
    #[error("request_id {0:?} is already in flight; use a unique id or leave it empty")]
    DuplicateId(String),
}

/// What the engine tells a request's task, in order.
#[derive(Debug)]
pub enum Event {
    /// Prefill started (the request left the queue).
    Started { at: Instant },
    /// The prompt is in the cache; `cached_tokens` of it were copied from
    /// the prefix cache instead of computed.
    Prefilled { cached_tokens: u32 },
    /// A token was chosen for sequence `index`: `text` is what may be sent
    /// now (whole characters, nothing that could start a stop sequence;
    /// with the held-back rest on its last token); `finish` is set on its
    /// last token, a stop sequence found in the text included.
    /// `held`: the text still held back after this token and the reason it
    /// would end with at a deadline (see `SequenceText::held`), if any.
    Token {
        index: u32,
        choice: Choice,
        text: String,
        finish: Option<FinishReason>,
        held: Option<(String, FinishReason)>,
        at: Instant,
    },
    /// Beam search ended: the hypotheses to return, best first, each with its
    /// text (cut at a stop sequence, its tokens too).
    Beams { hypotheses: Vec<(crate::decoding::beam::Hypothesis, String)>, at: Instant },
    /// Sequence `index` ended without a new token (cancelled, deadline), with
    /// the text it had held back.
    Ended { index: u32, reason: FinishReason, text: String },
    /// The request failed; nothing follows.
    Failed(EngineError),
}

/// A validated request and the channel its events go to. The request's task
/// drops the receiver when the client goes away; the engine notices before
/// its next step and evicts the row.
///
/// The channel is bounded (`Job::channel`): a client that reads slower than
/// its tokens are made fills it, and then its rows pause (they skip decode
/// steps, holding their cache) until there is room again; where the backend
/// cannot pause a row (`--graph exported`) the request ends, `stalled` is
/// set and the handler answers RESOURCE_EXHAUSTED. The worker never blocks
/// on a channel.
pub struct Job {
    pub request: ValidRequest,
    events: mpsc::Sender<Event>,
    pub span: tracing::Span,
    /// Set by `Cancel` or by shutdown: the row ends with CANCELLED.
    pub cancel: Arc<AtomicBool>,
    /// Set by the engine when it ended the request because its events were
    /// not read.
    pub stalled: Arc<AtomicBool>,
    /// Budget reserved on the worker (token slots), released when the job
    /// is dropped: after its last row leaves, or if it never reaches one.
    reservation: Option<Reservation>,
    /// Whose request it is, for the fair share of the queue.
    pub tenant: fair::Tenant,
}

/// Token slots a job holds on a worker's routing load; gives them back on drop.
#[derive(Debug)]
struct Reservation {
    tokens: usize,
    worker: Arc<WorkerShared>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.worker.load.fetch_sub(self.tokens, Ordering::Relaxed);
    }
}

impl Job {
    /// What the admission policy needs to know of this job.
    pub fn candidate(&self) -> admission::Candidate {
        admission::Candidate {
            prompt_len: self.request.prompt_ids.len(),
            max_new_tokens: self.request.stop.max_new_tokens as usize,
            rows: self.request.decoding.rows() as usize,
        }
    }

    /// The bounded channel for a request of `rows` rows: room for
    /// `STEPS_BUFFERED` steps of tokens plus the events that end it.
    pub fn channel(rows: u32) -> (mpsc::Sender<Event>, mpsc::Receiver<Event>) {
        let rows = rows.max(1) as usize;
        mpsc::channel(rows * (STEPS_BUFFERED + 2) + 1)
    }

    pub fn new(request: ValidRequest, events: mpsc::Sender<Event>, span: tracing::Span) -> Self {
        Job {
            request,
            events,
            span,
            cancel: Arc::new(AtomicBool::new(false)),
            stalled: Arc::new(AtomicBool::new(false)),
            reservation: None,
            tenant: fair::Tenant::default(),
        }
    }

    /// Sends an event without waiting; false when the client is gone (or,
    /// which `has_room` prevents for tokens, the channel is full).
    pub(crate) fn send(&self, event: Event) -> bool {
        self.events.try_send(event).is_ok()
    }

    /// Whether one more step's tokens fit and still leave room for the
    /// events that end every sequence (or the request's failure).
    pub(crate) fn has_room(&self) -> bool {
        self.spare() > 0
    }

    /// Token events that fit beyond the room kept for the events that end
    /// every sequence.
    pub(crate) fn spare(&self) -> usize {
        let rows = self.request.decoding.rows() as usize;
        self.events.capacity().saturating_sub(2 * rows)
    }
}

/// Decode steps of tokens a request's channel holds when its client does
/// not read (the bound on what an unread stream costs the server; then its
/// rows pause).
pub const STEPS_BUFFERED: usize = 64;

/// What a worker shares with the router.
#[derive(Debug, Default)]
pub struct WorkerShared {
    pub id: usize,
    /// Token slots reserved by its queued and running requests (routing).
    pub load: AtomicUsize,
    /// Requests waiting on any worker (the `--max-queue` bound).
    pub waiting: Arc<AtomicUsize>,
    pub running_rows: AtomicUsize,
    pub stats: WorkerStats,
}

impl WorkerShared {
    fn publish(&self, rows: usize) {
        self.running_rows.store(rows, Ordering::Relaxed);
    }
}

/// Engine settings (from the command line).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub limits: admission::Limits,
    pub max_queue: usize,
    pub spec: spec::SpecConfig,
    /// Bytes of preempted requests' caches a worker may hold swapped out
    /// (0: no preemption; `preempt`).
    pub preemption_swap_bytes: usize,
}

/// A request in flight, for `Cancel` and for observing the server.
#[derive(Debug, Clone)]
pub struct InFlight {
    pub cancel: Arc<AtomicBool>,
    pub worker: usize,
}

struct WorkerSlot {
    tx: mpsc::UnboundedSender<Job>,
    shared: Arc<WorkerShared>,
}

/// The cloneable handle request handlers submit jobs through.
#[derive(Clone)]
pub struct EngineHandle {
    workers: Arc<Vec<WorkerSlot>>,
    waiting: Arc<AtomicUsize>,
    max_queue: usize,
    max_batch_size: usize,
    /// The server's default of tokens proposed per step (0 where it is off
    /// or the backend cannot speculate).
    spec_tokens: usize,
    /// Requests submitted and not yet finished, by request id.
    pub in_flight: Arc<DashMap<String, InFlight>>,
}

impl EngineHandle {
    /// Queues `job` on the worker with the most free budget, or refuses at
    /// once when the waiting queue is full. The caller must call `finished`
    /// with the request id when the request ends.
    pub fn submit(&self, mut job: Job) -> Result<(), QueueError> {
        let id = job.request.request_id.clone();
        let entry = match self.in_flight.entry(id.clone()) {
            dashmap::Entry::Occupied(_) => return Err(QueueError::DuplicateId(id)),
            dashmap::Entry::Vacant(v) => v,
        };
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_queue {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(QueueError::Full { capacity: self.max_queue });
        }
        let (worker, slot) = self
            .workers
            .iter()
            .enumerate()
            .min_by_key(|(_, w)| w.shared.load.load(Ordering::Relaxed))
            .ok_or(QueueError::Stopped)?;
        let tokens = admission::alone(job.candidate());
        slot.shared.load.fetch_add(tokens, Ordering::Relaxed);
        job.reservation = Some(Reservation { tokens, worker: slot.shared.clone() });
        entry.insert(InFlight { cancel: job.cancel.clone(), worker });
        if slot.tx.send(job).is_err() {
            // The job (and with it its reservation) was dropped.
            self.in_flight.remove(&id);
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(QueueError::Stopped);
        }
        Ok(())
    }

    /// Forgets a finished request.
    pub fn finished(&self, request_id: &str) {
        self.in_flight.remove(request_id);
    }

    /// Asks the engine to end a request with CANCELLED; false if unknown.
    pub fn cancel(&self, request_id: &str) -> bool {
        self.in_flight.get(request_id).map(|f| f.cancel.store(true, Ordering::Relaxed)).is_some()
    }

    /// Cancels everything in flight (shutdown after the grace period).
    pub fn cancel_all(&self) {
        for f in self.in_flight.iter() {
            f.cancel.store(true, Ordering::Relaxed);
        }
    }

    /// Rows one worker's batch may hold.
    pub fn max_batch_size(&self) -> usize {
        self.max_batch_size
    }

    /// Tokens a row proposes per step by default (0: off).
    pub fn spec_tokens(&self) -> usize {
        self.spec_tokens
    }

    /// Each worker's shared state (rows, queue, statistics).
    pub fn workers(&self) -> Vec<Arc<WorkerShared>> {
        self.workers.iter().map(|w| w.shared.clone()).collect()
    }
}

/// Joins and evictions build new multi-megabyte KV tensors. glibc serves
/// blocks that large with fresh mmaps, and touching their pages for the first
/// time (page faults) made those copies 5 to 10 times slower than memcpy.
/// Serving them from the heap, and not trimming it, lets freed caches be
/// reused. (ONNX Runtime's own arena already works this way.)
#[allow(unsafe_code)]
fn keep_large_allocations_on_the_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Returns the heap's free memory to the kernel. Building an ONNX Runtime
/// session leaves hundreds of megabytes freed inside glibc's arenas (the
/// originals of the weights it pre-packed, graph-optimisation copies),
/// which stay resident until trimmed: about 140 MB of GPT-2 small's idle
/// 840 MB, and the same off the peak under load. Call it once a session is
/// built, before serving.
#[allow(unsafe_code)]
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only gives free pages of the allocator's arenas back.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Starts one worker thread per backend; they end when every handle is
/// dropped. The workers turn tokens into text with `tokenizer` (stop
/// sequences are decided where the tokens are chosen).
pub fn spawn(
    backends: Vec<Box<dyn Backend>>,
    config: &EngineConfig,
    tokenizer: &Tokenizer,
) -> (EngineHandle, Vec<std::thread::JoinHandle<()>>) {
    keep_large_allocations_on_the_heap();
    let waiting = Arc::new(AtomicUsize::new(0));
    let spec_tokens = if backends.first().is_some_and(|b| b.speculates()) { config.spec.tokens } else { 0 };
    let mut slots = Vec::new();
    let mut threads = Vec::new();
    for (id, backend) in backends.into_iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(WorkerShared { id, waiting: waiting.clone(), ..Default::default() });
        let w = worker::Worker::new(backend, config, shared.clone(), rx, tokenizer.clone());
        let thread = std::thread::Builder::new()
            .name(format!("batchgen-worker-{id}"))
            .spawn(move || w.run())
            .expect("spawning a worker thread");
        slots.push(WorkerSlot { tx, shared });
        threads.push(thread);
    }
    let handle = EngineHandle {
        workers: Arc::new(slots),
        waiting,
        max_queue: config.max_queue.max(1),
        max_batch_size: config.limits.max_batch_size,
        spec_tokens,
        in_flight: Arc::new(DashMap::new()),
    };
    (handle, threads)
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
