//! OpenAI's chat completions API (`POST /v1/chat/completions`): the
//! conversation is rendered with the model's chat template (`crate::chat`)
//! into one prompt, which then runs exactly as a `/v1/completions` prompt
//! does (same plan, validation, limits, keys, metrics); the answers take
//! the chat shape (`message` / `delta`, logprobs under `content`).
use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::openai::{ApiError, CompletionRequest, Prompt, Stop, StreamOptions, Usage};
use crate::chat::Message;
use crate::pb;
use crate::tokenizer::Tokenizer;

/// `content`: a string, or parts of which only text parts are accepted.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<serde_json::Value>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
    pub name: Option<String>,
}

/// The body of `POST /v1/chat/completions`: OpenAI's fields, then vLLM's
/// extra ones (sampling fields and the template's options).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<u32>,
    pub stop: Option<Stop>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub seed: Option<u64>,
    /// Accepted and not used.
    pub user: Option<String>,
    // Structured output, as for completions (`super::structured`).
    pub response_format: Option<serde_json::Value>,
    pub structured_outputs: Option<serde_json::Value>,
    pub guided_json: Option<serde_json::Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
    // vLLM's extra fields.
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
    /// Whether the rendered prompt ends with the assistant's turn opening
    /// (default true, as vLLM).
    pub add_generation_prompt: Option<bool>,
    /// Extra variables for the template.
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
}

/// What a chat request becomes: its conversation and the completion request
/// whose prompt is the rendered conversation (filled in by the caller).
pub struct ChatPlan {
    pub messages: Vec<Message>,
    pub add_generation_prompt: bool,
    pub kwargs: serde_json::Map<String, serde_json::Value>,
    pub completion: CompletionRequest,
    /// Top alternatives per token when `logprobs` is true.
    pub logprobs: Option<u32>,
}

const ROLES: [&str; 3] = ["system", "user", "assistant"];

impl ChatRequest {
    /// Checks what only the chat shape can get wrong; the rest is checked as
    /// for a completion.
    pub fn plan(self) -> Result<ChatPlan, ApiError> {
        let messages = conversation(self.messages)?;
        let max_tokens = match (self.max_tokens, self.max_completion_tokens) {
            (Some(a), Some(b)) if a != b => {
                return Err(ApiError::invalid(
                    "max_completion_tokens",
                    format!("max_tokens ({a}) and max_completion_tokens ({b}) differ: give one"),
                ));
            }
            (a, b) => a.or(b),
        };
        let logprobs = match (self.logprobs, self.top_logprobs) {
            (false, Some(k)) if k > 0 => {
                return Err(ApiError::invalid("top_logprobs", format!("top_logprobs ({k}) needs logprobs: true")));
            }
            (false, _) => None,
            (true, k) => Some(k.unwrap_or(0)),
        };
        let completion = CompletionRequest {
            model: self.model,
            prompt: Prompt::Text(String::new()),
            // 0: the server's default, capped by the context (OpenAI's chat
            // default is "as long as fits").
            max_tokens: Some(max_tokens.unwrap_or(0)),
            temperature: self.temperature,
            top_p: self.top_p,
            n: self.n,
            stream: self.stream,
            stream_options: self.stream_options,
            logprobs,
            echo: false,
            stop: self.stop,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias,
            seed: self.seed,
            user: self.user,
            best_of: None,
            suffix: None,
            top_k: self.top_k,
            min_p: self.min_p,
            typical_p: self.typical_p,
            repetition_penalty: self.repetition_penalty,
            no_repeat_ngram_size: self.no_repeat_ngram_size,
            num_beams: self.num_beams,
            min_tokens: self.min_tokens,
            ignore_eos: self.ignore_eos,
            priority: self.priority,
            response_format: self.response_format,
            structured_outputs: self.structured_outputs,
            guided_json: self.guided_json,
            guided_regex: self.guided_regex,
            guided_choice: self.guided_choice,
            guided_grammar: self.guided_grammar,
        };
        Ok(ChatPlan {
            messages,
            add_generation_prompt: self.add_generation_prompt.unwrap_or(true),
            kwargs: self.chat_template_kwargs.unwrap_or_default(),
            completion,
            logprobs,
        })
    }
}

/// The conversation of `messages`: known roles only, content flattened to text.
pub fn conversation(messages: Vec<ChatMessage>) -> Result<Vec<Message>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must hold at least one message, got none"));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(ApiError::invalid(
                &format!("messages[{i}].role"),
                format!(
                    "messages[{i}].role {:?} is not supported: only {} (tools and function calls are not)",
                    m.role,
                    ROLES.join(", ")
                ),
            ));
        }
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => text_of_parts(i, &parts)?,
        };
        out.push(Message { role: m.role, content, name: m.name });
    }
    Ok(out)
}

/// The text of a content array: its text parts joined by newlines (as vLLM
/// does); any other part is refused by index and type.
fn text_of_parts(i: usize, parts: &[serde_json::Value]) -> Result<String, ApiError> {
    let mut texts = Vec::with_capacity(parts.len());
    for (j, p) in parts.iter().enumerate() {
        let kind = p.get("type").and_then(|t| t.as_str()).unwrap_or("(none)");
        match (kind, p.get("text").and_then(|t| t.as_str())) {
            ("text", Some(t)) => texts.push(t),
            _ => {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].content[{j}]"),
                    format!("messages[{i}].content[{j}] has type {kind:?}: only text parts are supported"),
                ));
            }
        }
    }
    Ok(texts.join("\n"))
}

/// One token's log-probability in the chat shape.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprob>,
}

impl ChatLogprobs {
    pub fn of(tokens: &[pb::Token], tokenizer: &Tokenizer) -> ChatLogprobs {
        let content = tokens
            .iter()
            .map(|t| TokenLogprob {
                token: t.text.clone(),
                logprob: t.logprob,
                bytes: tokenizer.token_bytes(t.id),
                top_logprobs: t
                    .top_logprobs
                    .iter()
                    .map(|a| TopLogprob {
                        token: a.text.clone(),
                        logprob: a.logprob,
                        bytes: tokenizer.token_bytes(a.id),
                    })
                    .collect(),
            })
            .collect();
        ChatLogprobs { content }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

/// A streamed choice's change: the role (first chunk), text, or nothing (the
/// last chunk, which carries the finish reason).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(json: serde_json::Value) -> Result<ChatPlan, ApiError> {
        serde_json::from_value::<ChatRequest>(json).unwrap().plan()
    }

    #[test]
    fn chat_fields_become_a_completion_and_a_conversation() {
        let p = plan(serde_json::json!({
            "model": "m", "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "u"}
            ],
            "max_completion_tokens": 7, "logprobs": true, "top_logprobs": 3, "n": 2, "temperature": 0.5,
            "stop": ["x"], "seed": 1, "top_k": 5, "add_generation_prompt": false,
            "chat_template_kwargs": {"k": 1}
        }))
        .unwrap();
        assert_eq!(p.messages[1], Message { role: "user".into(), content: "a\nb".into(), name: Some("u".into()) });
        assert_eq!((p.completion.max_tokens, p.completion.logprobs, p.logprobs), (Some(7), Some(3), Some(3)));
        assert_eq!((p.completion.n, p.completion.top_k, p.add_generation_prompt), (Some(2), Some(5), false));
        assert_eq!(p.kwargs["k"], 1);
        let p = plan(serde_json::json!({"messages": [{"role": "user", "content": "x"}]})).unwrap();
        assert_eq!((p.completion.max_tokens, p.logprobs, p.add_generation_prompt), (Some(0), None, true));
    }

    #[test]
    fn what_chat_cannot_take_is_refused_by_name() {
        for (body, param) in [
            (serde_json::json!({"messages": []}), "messages"),
            (serde_json::json!({"messages": [{"role": "tool", "content": "x"}]}), "messages[0].role"),
            (
                serde_json::json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
                "messages[0].content[0]",
            ),
            (serde_json::json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}), "top_logprobs"),
            (
                serde_json::json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "max_completion_tokens": 3}),
                "max_completion_tokens",
            ),
        ] {
            let Err(e) = plan(body.clone()) else { panic!("{body} accepted") };
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
            assert_eq!(e.status, 400);
        }
        let tools = serde_json::json!({"messages": [{"role": "user", "content": "x"}], "tools": []});
        assert!(serde_json::from_value::<ChatRequest>(tools).is_err());
    }
}
