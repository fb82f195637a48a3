//! Turns a `GenerateRequest` into a `ValidRequest` or an error naming the
//! field, the limit and the value. Nothing downstream re-checks these limits.
mod decoding;

use std::sync::Arc;
use std::time::Instant;

use decoding::check_decoding;
pub use decoding::{
    DecodingPlan, MAX_LOGIT_BIAS, MAX_NO_REPEAT_NGRAM, MAX_SAMPLES, MAX_SPEC_TOKENS, SamplingPlan, Speculation,
};

use crate::constraint::{Grammar, Grammars};
use crate::decoding::stopping::StopCriteria;
use crate::pb;
use crate::tokenizer::{Tokenizer, TokenizerError};

/// Most alternatives per token a request may ask for.
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Most stop token ids per request.
pub const MAX_STOP_TOKEN_IDS: usize = 64;
/// The range of `priority` (lower runs first).
pub const MIN_PRIORITY: i32 = -100;
pub const MAX_PRIORITY: i32 = 100;

/// Longest accepted `request_id`, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 256;

/// The limits requests are checked against (model facts and server flags).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub vocab_size: u32,
    /// The model's context length (n_positions).
    pub context_length: u32,
    pub eos_token_id: u32,
    /// Largest `max_new_tokens` a request may ask for.
    pub max_new_tokens: u32,
    /// `max_new_tokens` when a request leaves it 0.
    pub default_max_new_tokens: u32,
    /// Longest prompt accepted (`--max-prompt-tokens`, at most context - 1).
    pub max_prompt_tokens: u32,
    /// A worker's KV budget (`--max-batch-tokens`): prompt + max_new_tokens
    /// beyond it can never run.
    pub max_batch_tokens: u32,
    /// Largest num_beams (`--max-beams`).
    pub max_beams: u32,
    /// Rows one worker's batch holds (`--max-batch-size`): a request needing
    /// more (samples, beams) could never be admitted.
    pub max_batch_size: u32,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ValidationError {
    #[error("{field}: {message}")]
    Invalid { field: &'static str, message: String },
    #[error("prompt could not be tokenized: {0}")]
    Tokenizer(String),
}

impl From<TokenizerError> for ValidationError {
    fn from(e: TokenizerError) -> Self {
        ValidationError::Tokenizer(e.0)
    }
}

fn invalid(field: &'static str, message: String) -> ValidationError {
    ValidationError::Invalid { field, message }
}

/// A request the engine can run as it is.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    pub request_id: String,
    pub prompt_ids: Vec<u32>,
    pub stop: StopCriteria,
    pub decoding: DecodingPlan,
    /// Stop on these strings (matched by the engine as tokens are chosen, see
    /// `decoding::stopping::SequenceText`).
    pub stop_sequences: Vec<String>,
    pub include_stop_sequence: bool,
    pub top_logprobs: u32,
    /// Lower runs first among the caller's own waiting requests.
    pub priority: i32,
    /// When the request arrived (for queue time and time to first token).
    pub arrival: Instant,
    /// The client's `grpc-timeout`, as an instant.
    pub deadline: Option<Instant>,
    /// What the request asks to go wrong (tests with `fault-injection` only).
    pub fault: crate::fault::Fault,
    /// Its structured-output constraint, compiled.
    pub constraint: Option<Arc<Grammar>>,
}

impl ValidRequest {
    /// The text of one of its sequences, matched against its stop sequences.
    pub fn sequence_text(&self) -> crate::decoding::stopping::SequenceText {
        crate::decoding::stopping::SequenceText::new(self.stop_sequences.clone(), self.include_stop_sequence)
    }
}

/// Most stop sequences per request.
pub const MAX_STOP_SEQUENCES: usize = 8;
/// Longest stop sequence, in bytes.
pub const MAX_STOP_SEQUENCE_BYTES: usize = 256;

/// Validates `req`; `tokenizer` turns a text prompt into ids and `grammars`
/// compiles its constraint (this runs on a blocking thread, never on the
/// engine).
pub fn validate(
    mut req: pb::GenerateRequest,
    tokenizer: &Tokenizer,
    limits: &Limits,
    grammars: &Grammars,
    arrival: Instant,
    deadline: Option<Instant>,
) -> Result<ValidRequest, ValidationError> {
    if req.request_id.len() > MAX_REQUEST_ID_BYTES {
        return Err(invalid(
            "request_id",
            format!("must be at most {MAX_REQUEST_ID_BYTES} bytes, got {}", req.request_id.len()),
        ));
    }
    if !(MIN_PRIORITY..=MAX_PRIORITY).contains(&req.priority) {
        return Err(invalid(
            "priority",
            format!("must be from {MIN_PRIORITY} to {MAX_PRIORITY} (lower runs first), got {}", req.priority),
        ));
    }
    let constraint = decoding::check_constraint(req.decoding.as_mut().and_then(|d| d.constraint.take()))?;
    let decoding = check_decoding(req.decoding.unwrap_or_default(), limits.vocab_size, limits.max_beams)?;
    let mut stopping = req.stopping.unwrap_or_default();
    if stopping.stop_sequences.len() > MAX_STOP_SEQUENCES {
        return Err(invalid(
            "stopping.stop_sequences",
            format!("at most {MAX_STOP_SEQUENCES} sequences, got {}", stopping.stop_sequences.len()),
        ));
    }
    if let Some((i, s)) =
        stopping.stop_sequences.iter().enumerate().find(|(_, s)| s.is_empty() || s.len() > MAX_STOP_SEQUENCE_BYTES)
    {
        return Err(invalid(
            "stopping.stop_sequences",
            format!("[{i}] must be 1 to {MAX_STOP_SEQUENCE_BYTES} bytes long, got {} bytes", s.len()),
        ));
    }
    let stop_sequences = std::mem::take(&mut stopping.stop_sequences);
    let include_stop_sequence = stopping.include_stop_sequence;
    if req.top_logprobs > MAX_TOP_LOGPROBS {
        return Err(invalid("top_logprobs", format!("must be at most {MAX_TOP_LOGPROBS}, got {}", req.top_logprobs)));
    }

    let prompt_ids = match (req.prompt.is_empty(), req.prompt_token_ids.is_empty()) {
        (true, true) => {
            return Err(invalid("prompt", "is empty: set prompt or prompt_token_ids".into()));
        }
        (false, false) => {
            return Err(invalid("prompt", "and prompt_token_ids are both set: set exactly one".into()));
        }
        (false, true) => {
            let ids = tokenizer.encode(&req.prompt)?;
            if ids.is_empty() {
                return Err(invalid("prompt", "tokenizes to no tokens".into()));
            }
            ids
        }
        (true, false) => {
            if let Some((i, &id)) = req.prompt_token_ids.iter().enumerate().find(|(_, id)| **id >= limits.vocab_size) {
                return Err(invalid(
                    "prompt_token_ids",
                    format!("[{i}] = {id} is not a token id: must be below the vocabulary size {}", limits.vocab_size),
                ));
            }
            req.prompt_token_ids
        }
    };
    let ctx = limits.context_length;
    let prompt_len = prompt_ids.len() as u64;
    if prompt_len > u64::from(limits.max_prompt_tokens) && limits.max_prompt_tokens < ctx - 1 {
        return Err(invalid(
            "prompt",
            format!("has {prompt_len} tokens; at most {} are allowed (--max-prompt-tokens)", limits.max_prompt_tokens),
        ));
    }
    if prompt_len >= u64::from(ctx) {
        return Err(invalid(
            "prompt",
            format!("has {prompt_len} tokens; the model's context length is {ctx}, so at most {} are allowed", ctx - 1),
        ));
    }
    let room = ctx - prompt_len as u32;
    let (max_new_tokens, length_is_context) = match stopping.max_new_tokens {
        0 => {
            let default = limits.default_max_new_tokens;
            if default > room { (room, true) } else { (default, false) }
        }
        n if n > limits.max_new_tokens => {
            return Err(invalid(
                "stopping.max_new_tokens",
                format!("must be at most {}, got {n}", limits.max_new_tokens),
            ));
        }
        n if n > room => {
            return Err(invalid(
                "stopping.max_new_tokens",
                format!(
                    "prompt tokens ({prompt_len}) + max_new_tokens ({n}) = {} exceeds the model's context length {ctx}",
                    prompt_len + u64::from(n)
                ),
            ));
        }
        n => (n, false),
    };
    let rows = u64::from(decoding.rows());
    if rows > u64::from(limits.max_batch_size) {
        return Err(invalid(
            "decoding.sampling.num_samples",
            format!(
                "needs {rows} rows but a batch holds at most {} (--max-batch-size), so the request could never run",
                limits.max_batch_size
            ),
        ));
    }
    if rows * (prompt_len + u64::from(max_new_tokens)) > u64::from(limits.max_batch_tokens) {
        let times = if rows > 1 { format!("{rows} rows × ") } else { String::new() };
        return Err(invalid(
            "stopping.max_new_tokens",
            format!(
                "{times}prompt tokens ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {} exceeds the server's \
                 KV budget per worker of {} tokens (--max-batch-tokens), so the request could never run",
                rows * (prompt_len + u64::from(max_new_tokens)),
                limits.max_batch_tokens
            ),
        ));
    }
    if stopping.min_new_tokens > max_new_tokens {
        return Err(invalid(
            "stopping.min_new_tokens",
            format!("must be at most max_new_tokens ({max_new_tokens}), got {}", stopping.min_new_tokens),
        ));
    }
    if stopping.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
        return Err(invalid(
            "stopping.stop_token_ids",
            format!("at most {MAX_STOP_TOKEN_IDS} ids, got {}", stopping.stop_token_ids.len()),
        ));
    }
    if let Some((i, &id)) = stopping.stop_token_ids.iter().enumerate().find(|(_, id)| **id >= limits.vocab_size) {
        return Err(invalid(
            "stopping.stop_token_ids",
            format!("[{i}] = {id} is not a token id: must be below the vocabulary size {}", limits.vocab_size),
        ));
    }
    // Last: every cheaper check has passed before a grammar is compiled.
    let constraint = match constraint {
        Some(spec) => {
            let grammar = grammars.compile(&spec).map_err(|e| invalid(spec.field(), e.0))?;
            metrics::counter!(crate::telemetry::CONSTRAINED_REQUESTS, "kind" => spec.kind()).increment(1);
            Some(grammar)
        }
        None => None,
    };
    let request_id = if req.request_id.is_empty() { uuid::Uuid::new_v4().to_string() } else { req.request_id };
    Ok(ValidRequest {
        request_id,
        prompt_ids,
        stop: StopCriteria {
            max_new_tokens,
            min_new_tokens: stopping.min_new_tokens,
            eos_token_id: (!stopping.ignore_eos).then_some(limits.eos_token_id),
            stop_token_ids: stopping.stop_token_ids,
            length_is_context,
        },
        decoding,
        stop_sequences,
        include_stop_sequence,
        top_logprobs: req.top_logprobs,
        priority: req.priority,
        arrival,
        deadline,
        fault: Default::default(),
        constraint,
    })
}

/// The tiny fixture's tokenizer and limits like a server of it has, for
/// unit tests that need valid requests.
#[cfg(test)]
pub(crate) fn test_setup() -> (Tokenizer, Limits) {
    let limits = Limits {
        vocab_size: 50257,
        context_length: 256,
        eos_token_id: 50256,
        max_new_tokens: 200,
        default_max_new_tokens: 64,
        max_prompt_tokens: 255,
        max_batch_tokens: 4096,
        max_beams: 8,
        max_batch_size: 32,
    };
    (crate::tokenizer::test_tokenizer(), limits)
}

#[cfg(test)]
impl ValidRequest {
    /// A greedy request of `prompt` token ids that may generate `max_new` tokens.
    pub(crate) fn for_tests(prompt: usize, max_new: u32) -> ValidRequest {
        let (tok, limits) = test_setup();
        let req = pb::GenerateRequest {
            prompt_token_ids: vec![1; prompt.min(limits.max_prompt_tokens as usize)],
            stopping: Some(pb::Stopping { max_new_tokens: max_new, ..Default::default() }),
            ..Default::default()
        };
        validate(req, &tok, &limits, crate::constraint::test_grammars(), Instant::now(), None).expect("a valid request")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(req: pb::GenerateRequest) -> Result<ValidRequest, ValidationError> {
        let (tok, limits) = test_setup();
        validate(req, &tok, &limits, crate::constraint::test_grammars(), Instant::now(), None)
    }

    fn ids(n: usize) -> pb::GenerateRequest {
        pb::GenerateRequest { prompt_token_ids: vec![1; n], ..Default::default() }
    }

    fn stopping(s: pb::Stopping) -> Option<pb::Stopping> {
        Some(s)
    }

    #[test]
    fn defaults_and_text_prompts() {
        let v = check(pb::GenerateRequest { prompt: "Hello world".into(), ..Default::default() }).unwrap();
        assert_eq!(v.prompt_ids.len(), 2);
        assert_eq!(v.stop.max_new_tokens, 64);
        assert_eq!(v.stop.eos_token_id, Some(50256));
        assert!(!v.request_id.is_empty());
    }

    #[test]
    fn the_default_is_capped_by_the_context_and_reported_as_context_full() {
        let v = check(ids(250)).unwrap();
        assert_eq!(v.stop.max_new_tokens, 6);
        assert!(v.stop.length_is_context);
    }

    #[test]
    fn errors_name_the_field_the_limit_and_the_value() {
        let e = check(pb::GenerateRequest::default()).unwrap_err().to_string();
        assert!(e.starts_with("prompt: is empty"), "{e}");
        let e = check(pb::GenerateRequest { prompt_token_ids: vec![5, 50257], ..Default::default() }).unwrap_err();
        assert_eq!(
            e.to_string(),
            "prompt_token_ids: [1] = 50257 is not a token id: must be below the vocabulary size 50257"
        );
        let e = check(pb::GenerateRequest {
            stopping: stopping(pb::Stopping { max_new_tokens: 100, ..Default::default() }),
            ..ids(200)
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "stopping.max_new_tokens: prompt tokens (200) + max_new_tokens (100) = 300 exceeds the model's context length 256"
        );
        let e = check(pb::GenerateRequest {
            stopping: stopping(pb::Stopping { max_new_tokens: 201, ..Default::default() }),
            ..ids(1)
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "stopping.max_new_tokens: must be at most 200, got 201");
        let e = check(ids(256)).unwrap_err().to_string();
        assert!(e.contains("256 tokens") && e.contains("255 are allowed"), "{e}");
        let e = check(pb::GenerateRequest { top_logprobs: 21, ..ids(1) }).unwrap_err().to_string();
        assert_eq!(e, "top_logprobs: must be at most 20, got 21");
        let e = check(pb::GenerateRequest {
            stopping: stopping(pb::Stopping { max_new_tokens: 3, min_new_tokens: 4, ..Default::default() }),
            ..ids(1)
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "stopping.min_new_tokens: must be at most max_new_tokens (3), got 4");
        let both = pb::GenerateRequest { prompt: "a".into(), ..ids(1) };
        assert!(check(both).unwrap_err().to_string().contains("both set"));
    }

    #[test]
    fn prompt_and_budget_limits_of_the_server() {
        let (tok, limits) = test_setup();
        let small = Limits { max_prompt_tokens: 10, max_batch_tokens: 50, ..limits };
        let e = validate(ids(11), &tok, &small, crate::constraint::test_grammars(), Instant::now(), None)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "prompt: has 11 tokens; at most 10 are allowed (--max-prompt-tokens)");
        let req = pb::GenerateRequest {
            stopping: stopping(pb::Stopping { max_new_tokens: 45, ..Default::default() }),
            ..ids(10)
        };
        let e = validate(req, &tok, &small, crate::constraint::test_grammars(), Instant::now(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("= 55 exceeds the server's KV budget per worker of 50 tokens (--max-batch-tokens)"), "{e}");
    }

    #[test]
    fn requests_needing_more_rows_than_a_batch_are_refused() {
        let (tok, limits) = test_setup();
        let small = Limits { max_batch_size: 4, ..limits };
        let decoding = pb::Decoding {
            method: Some(pb::decoding::Method::Sampling(pb::Sampling {
                temperature: 1.0,
                num_samples: 5,
                ..Default::default()
            })),
            ..Default::default()
        };
        let req = pb::GenerateRequest { decoding: Some(decoding), ..ids(3) };
        let e = validate(req, &tok, &small, crate::constraint::test_grammars(), Instant::now(), None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "decoding.sampling.num_samples: needs 5 rows but a batch holds at most 4 (--max-batch-size), so the \
             request could never run"
        );
    }

    #[test]
    fn decoding_fields_are_checked_and_kept() {
        let with = |d: pb::Decoding| check(pb::GenerateRequest { decoding: Some(d), ..ids(1) });
        let sampling =
            |s: pb::Sampling| pb::Decoding { method: Some(pb::decoding::Method::Sampling(s)), ..Default::default() };
        let s = pb::Sampling { temperature: 0.7, top_k: 5, seed: Some(3), num_samples: 2, ..Default::default() };
        let plan = with(sampling(s)).unwrap().decoding.sampling.unwrap();
        assert_eq!((plan.seed, plan.num_samples, plan.warpers.top_k), (3, 2, 5));
        // Without a seed one is drawn, so the output can be reproduced.
        let a = with(sampling(pb::Sampling { temperature: 1.0, ..Default::default() })).unwrap();
        assert!(a.decoding.sampling.is_some());
        // Temperature 0 is greedy.
        assert!(with(sampling(pb::Sampling::default())).unwrap().decoding.sampling.is_none());
        let err = |d| with(d).unwrap_err().to_string();
        assert_eq!(
            err(sampling(pb::Sampling { temperature: -1.0, ..Default::default() })),
            "decoding.sampling.temperature: must be in [0, 100] (0 means greedy), got -1"
        );
        assert_eq!(
            err(sampling(pb::Sampling { temperature: 1.0, top_p: 1.5, ..Default::default() })),
            "decoding.sampling.top_p: must be in (0, 1] (0 means off), got 1.5"
        );
        assert_eq!(
            err(sampling(pb::Sampling { temperature: 1.0, top_k: 60000, ..Default::default() })),
            "decoding.sampling.top_k: must be at most the vocabulary size 50257 (0 means off), got 60000"
        );
        assert_eq!(
            err(sampling(pb::Sampling { temperature: 1.0, num_samples: 17, ..Default::default() })),
            "decoding.sampling.num_samples: must be at most 16 (0 means 1), got 17"
        );
        assert_eq!(
            err(pb::Decoding { presence_penalty: f32::NAN, ..Default::default() }),
            "decoding.presence_penalty: must be in [-2, 2] (0 means off), got NaN"
        );
        assert_eq!(
            err(pb::Decoding { logit_bias: [(60000, 1.0)].into(), ..Default::default() }),
            "decoding.logit_bias: key 60000 is not a token id: must be below the vocabulary size 50257"
        );
        assert_eq!(
            err(pb::Decoding { logit_bias: [(5, 101.0)].into(), ..Default::default() }),
            "decoding.logit_bias: [5] must be in [-100, 100], got 101"
        );
        let beam = pb::Decoding {
            method: Some(pb::decoding::Method::BeamSearch(pb::BeamSearch { num_beams: 2, ..Default::default() })),
            ..Default::default()
        };
        let plan = with(beam).unwrap().decoding.beam.unwrap();
        assert_eq!((plan.num_beams, plan.num_return_sequences, plan.length_penalty), (2, 1, 1.0));
        let beams = |b: pb::BeamSearch| pb::Decoding {
            method: Some(pb::decoding::Method::BeamSearch(b)),
            ..Default::default()
        };
        assert_eq!(
            err(beams(pb::BeamSearch { num_beams: 9, ..Default::default() })),
            "decoding.beam_search.num_beams: must be at most 8 (--max-beams; 0 means 1), got 9"
        );
        assert_eq!(
            err(beams(pb::BeamSearch { num_beams: 3, num_return_sequences: 4, ..Default::default() })),
            "decoding.beam_search.num_return_sequences: must be at most num_beams (3), got 4"
        );
        let stop = pb::Stopping { stop_sequences: vec!["".into()], ..Default::default() };
        let e = check(pb::GenerateRequest { stopping: Some(stop), ..ids(1) }).unwrap_err().to_string();
        assert_eq!(e, "stopping.stop_sequences: [0] must be 1 to 256 bytes long, got 0 bytes");
        let stop = pb::Stopping { stop_sequences: vec!["x".into(); 9], ..Default::default() };
        let e = check(pb::GenerateRequest { stopping: Some(stop), ..ids(1) }).unwrap_err().to_string();
        assert_eq!(e, "stopping.stop_sequences: at most 8 sequences, got 9");
        let v = with(pb::Decoding { repetition_penalty: 1.3, no_repeat_ngram_size: 3, ..Default::default() }).unwrap();
        assert_eq!(v.decoding.processors.repetition_penalty, 1.3);
    }
}
