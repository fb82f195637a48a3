//! Turns a `GenerateRequest` into a `ValidRequest` or an error naming the
//! field, the limit and the value. Nothing downstream re-checks these limits.
use std::time::Instant;

use crate::pb;
use crate::stopping::StopCriteria;
use crate::tokenizer::{Tokenizer, TokenizerError};

/// Most alternatives per token a request may ask for.
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Most stop token ids per request.
pub const MAX_STOP_TOKEN_IDS: usize = 64;
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
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ValidationError {
    #[error("{field}: {message}")]
    Invalid { field: &'static str, message: String },
    #[error("{field} is not implemented yet (value given: {value}); {hint}")]
    Unimplemented {
        field: &'static str,
        value: String,
        hint: &'static str,
    },
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
    pub top_logprobs: u32,
    /// When the request arrived (for queue time and time to first token).
    pub arrival: Instant,
    /// The client's `grpc-timeout`, as an instant.
    pub deadline: Option<Instant>,
}

const GREEDY_ONLY: &str = "this server supports greedy decoding only until the decoding issue lands";

/// Refuses every decoding field that is set to something other than "off",
/// so that no field is ever silently ignored.
fn check_decoding(d: &pb::Decoding) -> Result<(), ValidationError> {
    let unimplemented = |field, value: String| {
        Err(ValidationError::Unimplemented {
            field,
            value,
            hint: GREEDY_ONLY,
        })
    };
    for (field, v) in [
        ("decoding.repetition_penalty", d.repetition_penalty),
        ("decoding.presence_penalty", d.presence_penalty),
        ("decoding.frequency_penalty", d.frequency_penalty),
    ] {
        if !v.is_finite() {
            return Err(invalid(field, format!("must be a finite number, got {v}")));
        }
    }
    match &d.method {
        None | Some(pb::decoding::Method::Greedy(_)) => {}
        Some(pb::decoding::Method::Sampling(s)) => return unimplemented("decoding.sampling", format!("{s:?}")),
        Some(pb::decoding::Method::BeamSearch(b)) => return unimplemented("decoding.beam_search", format!("{b:?}")),
    }
    if d.repetition_penalty < 0.0 {
        return Err(invalid(
            "decoding.repetition_penalty",
            format!("must be > 0 (0 means off), got {}", d.repetition_penalty),
        ));
    }
    if d.repetition_penalty != 0.0 && d.repetition_penalty != 1.0 {
        return unimplemented("decoding.repetition_penalty", d.repetition_penalty.to_string());
    }
    if d.presence_penalty != 0.0 {
        return unimplemented("decoding.presence_penalty", d.presence_penalty.to_string());
    }
    if d.frequency_penalty != 0.0 {
        return unimplemented("decoding.frequency_penalty", d.frequency_penalty.to_string());
    }
    if d.no_repeat_ngram_size != 0 {
        return unimplemented("decoding.no_repeat_ngram_size", d.no_repeat_ngram_size.to_string());
    }
    if !d.logit_bias.is_empty() {
        return unimplemented("decoding.logit_bias", format!("{} entries", d.logit_bias.len()));
    }
    Ok(())
}

/// Validates `req`; `tokenizer` turns a text prompt into ids (this runs on a
/// blocking thread, never on the engine).
pub fn validate(
    req: pb::GenerateRequest,
    tokenizer: &Tokenizer,
    limits: &Limits,
    arrival: Instant,
    deadline: Option<Instant>,
) -> Result<ValidRequest, ValidationError> {
    if req.request_id.len() > MAX_REQUEST_ID_BYTES {
        return Err(invalid(
            "request_id",
            format!(
                "must be at most {MAX_REQUEST_ID_BYTES} bytes, got {}",
                req.request_id.len()
            ),
        ));
    }
    let decoding = req.decoding.unwrap_or_default();
    check_decoding(&decoding)?;
    let stopping = req.stopping.unwrap_or_default();
    if !stopping.stop_sequences.is_empty() {
        return Err(ValidationError::Unimplemented {
            field: "stopping.stop_sequences",
            value: format!("{:?}", stopping.stop_sequences),
            hint: "use stopping.stop_token_ids until the decoding issue lands",
        });
    }
    if stopping.include_stop_sequence {
        return Err(ValidationError::Unimplemented {
            field: "stopping.include_stop_sequence",
            value: "true".into(),
            hint: "stop sequences are not implemented yet",
        });
    }
    if req.top_logprobs > MAX_TOP_LOGPROBS {
        return Err(invalid(
            "top_logprobs",
            format!("must be at most {MAX_TOP_LOGPROBS}, got {}", req.top_logprobs),
        ));
    }

    let prompt_ids = match (req.prompt.is_empty(), req.prompt_token_ids.is_empty()) {
        (true, true) => {
            return Err(invalid("prompt", "is empty: set prompt or prompt_token_ids".into()));
        }
        (false, false) => {
            return Err(invalid(
                "prompt",
                "and prompt_token_ids are both set: set exactly one".into(),
            ));
        }
        (false, true) => {
            let ids = tokenizer.encode(&req.prompt)?;
            if ids.is_empty() {
                return Err(invalid("prompt", "tokenizes to no tokens".into()));
            }
            ids
        }
        (true, false) => {
            if let Some((i, &id)) = req
                .prompt_token_ids
                .iter()
                .enumerate()
                .find(|(_, id)| **id >= limits.vocab_size)
            {
                return Err(invalid(
                    "prompt_token_ids",
                    format!(
                        "[{i}] = {id} is not a token id: must be below the vocabulary size {}",
                        limits.vocab_size
                    ),
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
            format!(
                "has {prompt_len} tokens; at most {} are allowed (--max-prompt-tokens)",
                limits.max_prompt_tokens
            ),
        ));
    }
    if prompt_len >= u64::from(ctx) {
        return Err(invalid(
            "prompt",
            format!(
                "has {prompt_len} tokens; the model's context length is {ctx}, so at most {} are allowed",
                ctx - 1
            ),
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
    if prompt_len + u64::from(max_new_tokens) > u64::from(limits.max_batch_tokens) {
        return Err(invalid(
            "stopping.max_new_tokens",
            format!(
                "prompt tokens ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {} exceeds the server's KV budget \
                 per worker of {} tokens (--max-batch-tokens), so the request could never run",
                prompt_len + u64::from(max_new_tokens),
                limits.max_batch_tokens
            ),
        ));
    }
    if stopping.min_new_tokens > max_new_tokens {
        return Err(invalid(
            "stopping.min_new_tokens",
            format!(
                "must be at most max_new_tokens ({max_new_tokens}), got {}",
                stopping.min_new_tokens
            ),
        ));
    }
    if stopping.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
        return Err(invalid(
            "stopping.stop_token_ids",
            format!(
                "at most {MAX_STOP_TOKEN_IDS} ids, got {}",
                stopping.stop_token_ids.len()
            ),
        ));
    }
    if let Some((i, &id)) = stopping
        .stop_token_ids
        .iter()
        .enumerate()
        .find(|(_, id)| **id >= limits.vocab_size)
    {
        return Err(invalid(
            "stopping.stop_token_ids",
            format!(
                "[{i}] = {id} is not a token id: must be below the vocabulary size {}",
                limits.vocab_size
            ),
        ));
    }
    let request_id = if req.request_id.is_empty() {
        uuid::Uuid::new_v4().to_string()
    } else {
        req.request_id
    };
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
        top_logprobs: req.top_logprobs,
        arrival,
        deadline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn setup() -> (Tokenizer, Limits) {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gpt2/tokenizer.json");
        let limits = Limits {
            vocab_size: 50257,
            context_length: 256,
            eos_token_id: 50256,
            max_new_tokens: 200,
            default_max_new_tokens: 64,
            max_prompt_tokens: 255,
            max_batch_tokens: 4096,
        };
        (Tokenizer::from_file(&p).unwrap(), limits)
    }

    fn check(req: pb::GenerateRequest) -> Result<ValidRequest, ValidationError> {
        let (tok, limits) = setup();
        validate(req, &tok, &limits, Instant::now(), None)
    }

    fn ids(n: usize) -> pb::GenerateRequest {
        pb::GenerateRequest {
            prompt_token_ids: vec![1; n],
            ..Default::default()
        }
    }

    fn stopping(s: pb::Stopping) -> Option<pb::Stopping> {
        Some(s)
    }

    #[test]
    fn defaults_and_text_prompts() {
        let v = check(pb::GenerateRequest {
            prompt: "Hello world".into(),
            ..Default::default()
        })
        .unwrap();
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
        let e = check(pb::GenerateRequest {
            prompt_token_ids: vec![5, 50257],
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "prompt_token_ids: [1] = 50257 is not a token id: must be below the vocabulary size 50257"
        );
        let e = check(pb::GenerateRequest {
            stopping: stopping(pb::Stopping {
                max_new_tokens: 100,
                ..Default::default()
            }),
            ..ids(200)
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "stopping.max_new_tokens: prompt tokens (200) + max_new_tokens (100) = 300 exceeds the model's context length 256"
        );
        let e = check(pb::GenerateRequest {
            stopping: stopping(pb::Stopping {
                max_new_tokens: 201,
                ..Default::default()
            }),
            ..ids(1)
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "stopping.max_new_tokens: must be at most 200, got 201");
        let e = check(ids(256)).unwrap_err().to_string();
        assert!(e.contains("256 tokens") && e.contains("255 are allowed"), "{e}");
        let e = check(pb::GenerateRequest {
            top_logprobs: 21,
            ..ids(1)
        })
        .unwrap_err()
        .to_string();
        assert_eq!(e, "top_logprobs: must be at most 20, got 21");
        let e = check(pb::GenerateRequest {
            stopping: stopping(pb::Stopping {
                max_new_tokens: 3,
                min_new_tokens: 4,
                ..Default::default()
            }),
            ..ids(1)
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "stopping.min_new_tokens: must be at most max_new_tokens (3), got 4"
        );
        let both = pb::GenerateRequest {
            prompt: "a".into(),
            ..ids(1)
        };
        assert!(check(both).unwrap_err().to_string().contains("both set"));
    }

    #[test]
    fn prompt_and_budget_limits_of_the_server() {
        let (tok, limits) = setup();
        let small = Limits {
            max_prompt_tokens: 10,
            max_batch_tokens: 50,
            ..limits
        };
        let e = validate(ids(11), &tok, &small, Instant::now(), None)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "prompt: has 11 tokens; at most 10 are allowed (--max-prompt-tokens)");
        let req = pb::GenerateRequest {
            stopping: stopping(pb::Stopping {
                max_new_tokens: 45,
                ..Default::default()
            }),
            ..ids(10)
        };
        let e = validate(req, &tok, &small, Instant::now(), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("= 55 exceeds the server's KV budget per worker of 50 tokens (--max-batch-tokens)"),
            "{e}"
        );
    }

    #[test]
    fn fields_not_yet_implemented_are_refused_not_ignored() {
        let with = |d: pb::Decoding| {
            check(pb::GenerateRequest {
                decoding: Some(d),
                ..ids(1)
            })
            .unwrap_err()
        };
        let field = |e: ValidationError| match e {
            ValidationError::Unimplemented { field, .. } => field,
            other => panic!("{other:?}"),
        };
        let sampling = pb::decoding::Method::Sampling(pb::Sampling {
            temperature: 0.7,
            ..Default::default()
        });
        assert_eq!(
            field(with(pb::Decoding {
                method: Some(sampling),
                ..Default::default()
            })),
            "decoding.sampling"
        );
        assert_eq!(
            field(with(pb::Decoding {
                repetition_penalty: 1.3,
                ..Default::default()
            })),
            "decoding.repetition_penalty"
        );
        assert_eq!(
            field(with(pb::Decoding {
                no_repeat_ngram_size: 2,
                ..Default::default()
            })),
            "decoding.no_repeat_ngram_size"
        );
        assert_eq!(
            field(with(pb::Decoding {
                logit_bias: [(1, 2.0)].into(),
                ..Default::default()
            })),
            "decoding.logit_bias"
        );
        let stop = pb::Stopping {
            stop_sequences: vec!["\n".into()],
            ..Default::default()
        };
        let e = check(pb::GenerateRequest {
            stopping: Some(stop),
            ..ids(1)
        })
        .unwrap_err();
        assert_eq!(field(e), "stopping.stop_sequences");
        // Explicit "off" values are accepted.
        let off = pb::Decoding {
            repetition_penalty: 1.0,
            method: Some(pb::decoding::Method::Greedy(pb::Greedy {})),
            ..Default::default()
        };
        assert!(
            check(pb::GenerateRequest {
                decoding: Some(off),
                ..ids(1)
            })
            .is_ok()
        );
        let nan = pb::Decoding {
            presence_penalty: f32::NAN,
            ..Default::default()
        };
        assert!(matches!(
            with(nan),
            ValidationError::Invalid {
                field: "decoding.presence_penalty",
                ..
            }
        ));
    }
}
