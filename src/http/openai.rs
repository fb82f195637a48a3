//! OpenAI's completions API (`POST /v1/completions`) in terms of our
//! `GenerateRequest`: each prompt becomes one call of the gRPC service's own
//! handler (same validation, limits, keys, metrics, deadlines), and its
//! answer or messages become OpenAI's JSON or server-sent events.
use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::pb;

/// `prompt`: a string, strings, token ids, or lists of token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// `stop`: a string or strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The body of `POST /v1/completions`: OpenAI's fields, then ours.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub echo: bool,
    pub stop: Option<Stop>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub seed: Option<u64>,
    /// Accepted and not used (OpenAI uses it for abuse monitoring).
    pub user: Option<String>,
    /// Refused unless equal to `n`: batchgen returns every sequence it makes.
    pub best_of: Option<u32>,
    /// Refused: GPT-2 continues text, it does not fill in.
    pub suffix: Option<String>,
    // batchgen's own fields.
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub typical_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub no_repeat_ngram_size: Option<u32>,
    pub num_beams: Option<u32>,
    pub min_tokens: Option<u32>,
    #[serde(default)]
    pub ignore_eos: bool,
    /// vLLM's: lower runs first among the caller's waiting requests.
    pub priority: Option<i32>,
    // Structured output (`super::structured`): OpenAI's, then vLLM's.
    pub response_format: Option<serde_json::Value>,
    pub structured_outputs: Option<serde_json::Value>,
    pub guided_json: Option<serde_json::Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
}

/// An error in OpenAI's shape, with the HTTP status it goes with.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: String,
    pub retry_after: Option<std::time::Duration>,
}

impl ApiError {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: "invalid_argument".into(),
            retry_after: None,
        }
    }

    /// The error a gRPC status becomes: the HTTP status of its code, OpenAI's
    /// error type, the field it names (as OpenAI calls it) and its retry delay.
    pub fn from_status(status: &tonic::Status) -> Self {
        use tonic::Code;
        use tonic_types::StatusExt;
        let (http, kind) = match status.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => (400, "invalid_request_error"),
            Code::Unauthenticated => (401, "authentication_error"),
            Code::PermissionDenied => (403, "permission_error"),
            Code::NotFound => (404, "not_found_error"),
            Code::AlreadyExists => (409, "invalid_request_error"),
            Code::ResourceExhausted => (429, "rate_limit_error"),
            Code::Cancelled => (499, "cancelled"),
            Code::Unavailable => (503, "server_error"),
            Code::DeadlineExceeded => (504, "timeout"),
            _ => (500, "server_error"),
        };
        let param = status
            .get_details_bad_request()
            .and_then(|b| b.field_violations.first().map(|v| openai_param(&v.field).to_string()));
        let retry_after = status.get_details_retry_info().and_then(|r| r.retry_delay);
        let code = format!("{:?}", status.code());
        ApiError { status: http, message: status.message().to_string(), kind, param, code: snake(&code), retry_after }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code }
        })
    }
}

fn snake(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// The OpenAI name of a field our validation names.
fn openai_param(field: &str) -> &str {
    match field {
        "prompt" | "prompt_token_ids" => "prompt",
        "stopping.max_new_tokens" => "max_tokens",
        "stopping.min_new_tokens" => "min_tokens",
        "stopping.stop_sequences" => "stop",
        "top_logprobs" => "logprobs",
        "decoding.sampling.num_samples" | "decoding.beam_search.num_return_sequences" => "n",
        "decoding.beam_search.num_beams" => "num_beams",
        "decoding.json_schema" | "decoding.json_object" => "response_format",
        "decoding.regex" => "guided_regex",
        "decoding.choice" => "guided_choice",
        "decoding.grammar" => "guided_grammar",
        other => other.rsplit('.').next().unwrap_or(other),
    }
}

/// A validated completion request: one `GenerateRequest` per prompt.
#[derive(Debug, Clone)]
pub struct Plan {
    pub calls: Vec<pb::GenerateRequest>,
    /// Sequences per prompt (`n`).
    pub n: u32,
    pub stream: bool,
    pub include_usage: bool,
    /// Top alternatives per token when `logprobs` was asked (Some(0): the
    /// chosen tokens' log-probabilities only).
    pub logprobs: Option<u32>,
    pub echo: bool,
}

/// Most sequences one completion may ask for over all its prompts.
pub const MAX_CHOICES: u32 = 64;

impl Plan {
    /// Checks what only the OpenAI shape can get wrong and builds the calls;
    /// the rest is validated by the gRPC service, as for any call.
    /// `models`: the names `model` may give (the first is the served id).
    pub fn new(r: CompletionRequest, models: &[String]) -> Result<Plan, ApiError> {
        check_model(r.model.as_deref(), models)?;
        if r.suffix.is_some() {
            return Err(ApiError::invalid(
                "suffix",
                "suffix is not supported: GPT-2 continues a text, it does not fill one in",
            ));
        }
        let n = r.n.unwrap_or(1);
        if n == 0 {
            return Err(ApiError::invalid("n", "n must be at least 1, got 0"));
        }
        if let Some(b) = r.best_of.filter(|&b| b != n) {
            return Err(ApiError::invalid(
                "best_of",
                format!("best_of ({b}) different from n ({n}) is not supported: every sequence made is returned"),
            ));
        }
        let logprobs = r.logprobs;
        if r.echo && logprobs.is_some() {
            return Err(ApiError::invalid(
                "echo",
                "echo with logprobs is not supported: it needs the prompt's log-probabilities, which batchgen does not compute",
            ));
        }
        let prompts: Vec<(String, Vec<u32>)> = match r.prompt {
            Prompt::Text(t) => vec![(t, vec![])],
            Prompt::Texts(ts) => ts.into_iter().map(|t| (t, vec![])).collect(),
            Prompt::Ids(ids) => vec![(String::new(), ids)],
            Prompt::IdLists(lists) => lists.into_iter().map(|ids| (String::new(), ids)).collect(),
        };
        if prompts.is_empty() {
            return Err(ApiError::invalid("prompt", "prompt must hold at least one prompt, got an empty list"));
        }
        let choices = prompts.len() as u64 * u64::from(n);
        if choices > u64::from(MAX_CHOICES) {
            return Err(ApiError::invalid(
                "n",
                format!(
                    "{} prompts × n = {n} is {choices} sequences; at most {MAX_CHOICES} per request",
                    prompts.len()
                ),
            ));
        }
        let temperature = r.temperature.unwrap_or(1.0);
        let beams = r.num_beams.filter(|&b| b > 1);
        let method = match beams {
            Some(num_beams) => Some(pb::decoding::Method::BeamSearch(pb::BeamSearch {
                num_beams,
                num_return_sequences: n,
                ..Default::default()
            })),
            None if temperature == 0.0 => {
                if n > 1 {
                    return Err(ApiError::invalid(
                        "n",
                        format!(
                            "n = {n} with temperature 0 would return {n} copies of one greedy answer: sample (temperature > 0) or use num_beams"
                        ),
                    ));
                }
                None
            }
            None => Some(pb::decoding::Method::Sampling(pb::Sampling {
                temperature,
                top_k: r.top_k.unwrap_or(0),
                top_p: r.top_p.unwrap_or(0.0),
                typical_p: r.typical_p.unwrap_or(0.0),
                min_p: r.min_p.unwrap_or(0.0),
                seed: r.seed,
                num_samples: n,
            })),
        };
        let mut logit_bias = HashMap::new();
        for (k, v) in r.logit_bias.unwrap_or_default() {
            let id = k
                .parse::<u32>()
                .map_err(|_| ApiError::invalid("logit_bias", format!("key {k:?} is not a token id")))?;
            logit_bias.insert(id, v);
        }
        let constraint = super::structured::Requested {
            response_format: r.response_format,
            structured_outputs: r.structured_outputs,
            guided_json: r.guided_json,
            guided_regex: r.guided_regex,
            guided_choice: r.guided_choice,
            guided_grammar: r.guided_grammar,
        }
        .constraint()
        .map_err(|r| ApiError::invalid(&r.param, r.message))?;
        let decoding = pb::Decoding {
            method,
            constraint,
            repetition_penalty: r.repetition_penalty.unwrap_or(0.0),
            presence_penalty: r.presence_penalty.unwrap_or(0.0),
            frequency_penalty: r.frequency_penalty.unwrap_or(0.0),
            no_repeat_ngram_size: r.no_repeat_ngram_size.unwrap_or(0),
            logit_bias,
            speculation: None,
        };
        let stopping = pb::Stopping {
            // OpenAI's default.
            max_new_tokens: r.max_tokens.unwrap_or(16),
            min_new_tokens: r.min_tokens.unwrap_or(0),
            stop_sequences: match r.stop {
                None => vec![],
                Some(Stop::One(s)) => vec![s],
                Some(Stop::Many(v)) => v,
            },
            ignore_eos: r.ignore_eos,
            ..Default::default()
        };
        let calls = prompts
            .into_iter()
            .map(|(prompt, prompt_token_ids)| pb::GenerateRequest {
                prompt,
                prompt_token_ids,
                decoding: Some(decoding.clone()),
                stopping: Some(stopping.clone()),
                top_logprobs: logprobs.unwrap_or(0),
                request_id: String::new(),
                priority: r.priority.unwrap_or(0),
            })
            .collect();
        Ok(Plan {
            calls,
            n,
            stream: r.stream,
            include_usage: r.stream_options.is_some_and(|o| o.include_usage),
            logprobs,
            echo: r.echo,
        })
    }
}

/// Refuses a `model` that is none of `models` (404, as OpenAI answers).
pub fn check_model(model: Option<&str>, models: &[String]) -> Result<(), ApiError> {
    match model {
        Some(m) if !models.iter().any(|n| n == m) => Err(ApiError {
            status: 404,
            message: format!(
                "the model {m:?} does not exist; this server serves {:?}{} (GET /v1/models)",
                models[0],
                if models.len() > 1 { format!(", also called {:?}", &models[1..]) } else { String::new() }
            ),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: "model_not_found".into(),
            retry_after: None,
        }),
        _ => Ok(()),
    }
}

/// OpenAI's `finish_reason` for ours.
pub fn finish_reason(r: i32) -> Option<&'static str> {
    match pb::FinishReason::try_from(r).unwrap_or(pb::FinishReason::Unspecified) {
        pb::FinishReason::Unspecified => None,
        pb::FinishReason::Length | pb::FinishReason::ContextFull => Some("length"),
        pb::FinishReason::Eos | pb::FinishReason::StopSequence => Some("stop"),
        pb::FinishReason::Cancelled => Some("cancelled"),
        pb::FinishReason::Deadline => Some("deadline"),
        pb::FinishReason::Error => Some("error"),
    }
}

/// The legacy completions `logprobs` object.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Logprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<HashMap<String, f32>>,
    /// Where each token's text starts in the choice's text, in characters.
    pub text_offset: Vec<usize>,
}

impl Logprobs {
    /// Appends `tokens`, whose text starts at character `offset`; returns
    /// the offset after them.
    pub fn extend(&mut self, tokens: &[pb::Token], mut offset: usize) -> usize {
        for t in tokens {
            self.tokens.push(t.text.clone());
            self.token_logprobs.push(t.logprob);
            self.top_logprobs.push(t.top_logprobs.iter().map(|a| (a.text.clone(), a.logprob)).collect());
            self.text_offset.push(offset);
            offset += t.text.chars().count();
        }
        offset
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Choice {
    pub text: String,
    pub index: u32,
    pub logprobs: Option<Logprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    /// OpenAI's breakdown: `cached_tokens` of the prompt came from the prefix cache.
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct PromptTokensDetails {
    pub cached_tokens: u32,
}

impl Usage {
    pub fn add(&mut self, u: &pb::Usage) {
        self.prompt_tokens += u.prompt_tokens;
        self.prompt_tokens_details.cached_tokens += u.cached_prompt_tokens;
        self.completion_tokens += u.generated_tokens;
        self.total_tokens = self.prompt_tokens + self.completion_tokens;
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(json: serde_json::Value) -> Result<Plan, ApiError> {
        Plan::new(serde_json::from_value(json).unwrap(), &["gpt2".to_string(), "/models/gpt2".to_string()])
    }

    #[test]
    fn openai_fields_map_to_generate_requests() {
        let p = plan(serde_json::json!({
            "model": "gpt2", "prompt": ["a", "b"], "max_tokens": 5, "temperature": 0.7, "top_p": 0.9,
            "n": 2, "stop": "x", "seed": 3, "logit_bias": {"50256": -100}, "presence_penalty": 0.5,
            "logprobs": 2, "top_k": 40, "min_tokens": 1
        }))
        .unwrap();
        assert_eq!(p.calls.len(), 2);
        let c = &p.calls[1];
        assert_eq!(c.prompt, "b");
        assert_eq!(c.top_logprobs, 2);
        let s = c.stopping.as_ref().unwrap();
        assert_eq!((s.max_new_tokens, s.min_new_tokens, s.stop_sequences.clone()), (5, 1, vec!["x".to_string()]));
        let d = c.decoding.as_ref().unwrap();
        assert_eq!(d.logit_bias[&50256], -100.0);
        assert_eq!(d.presence_penalty, 0.5);
        let Some(pb::decoding::Method::Sampling(sm)) = &d.method else { panic!("{d:?}") };
        assert_eq!((sm.temperature, sm.top_p, sm.top_k, sm.seed, sm.num_samples), (0.7, 0.9, 40, Some(3), 2));
        // Defaults as OpenAI's: 16 tokens, temperature 1 (sampling).
        let p = plan(serde_json::json!({"prompt": [1, 2, 3]})).unwrap();
        assert_eq!(p.calls[0].prompt_token_ids, vec![1, 2, 3]);
        assert_eq!(p.calls[0].stopping.as_ref().unwrap().max_new_tokens, 16);
        assert!(matches!(p.calls[0].decoding.as_ref().unwrap().method, Some(pb::decoding::Method::Sampling(_))));
        let p = plan(serde_json::json!({"prompt": "a", "temperature": 0})).unwrap();
        assert!(p.calls[0].decoding.as_ref().unwrap().method.is_none());
    }

    #[test]
    fn what_openai_allows_and_batchgen_cannot_do_is_refused_by_name() {
        for (body, param) in [
            (serde_json::json!({"prompt": "a", "suffix": "b"}), "suffix"),
            (serde_json::json!({"prompt": "a", "n": 2, "best_of": 3}), "best_of"),
            (serde_json::json!({"prompt": "a", "echo": true, "logprobs": 1}), "echo"),
            (serde_json::json!({"prompt": "a", "n": 2, "temperature": 0}), "n"),
            (serde_json::json!({"prompt": []}), "prompt"),
            (serde_json::json!({"prompt": "a", "logit_bias": {"x": 1}}), "logit_bias"),
            (serde_json::json!({"prompt": "a", "model": "gpt-4"}), "model"),
        ] {
            let e = plan(body.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
        }
        assert!(serde_json::from_value::<CompletionRequest>(serde_json::json!({"prompt": "a", "bogus": 1})).is_err());
    }

    #[test]
    fn statuses_become_openai_errors() {
        let e = ApiError::from_status(&tonic::Status::unauthenticated("no"));
        assert_eq!((e.status, e.kind, e.code.as_str()), (401, "authentication_error", "unauthenticated"));
        let e = ApiError::from_status(&tonic::Status::resource_exhausted("full"));
        assert_eq!((e.status, e.code.as_str()), (429, "resource_exhausted"));
        assert_eq!(ApiError::from_status(&tonic::Status::deadline_exceeded("late")).status, 504);
        assert_eq!(openai_param("decoding.sampling.temperature"), "temperature");
        assert_eq!(openai_param("stopping.max_new_tokens"), "max_tokens");
    }
}
