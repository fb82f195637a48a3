//! Streamed answers as server-sent events: every prompt's GenerateStream
//! merged, each message shaped as a `/v1/completions` chunk or a
//! `/v1/chat/completions` chunk, a usage event when asked, then `[DONE]`.
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tonic::metadata::MetadataMap;

use super::chat::{ChatChunk, ChatLogprobs, ChunkChoice, Delta};
use super::openai::{self, ApiError, Choice, Completion, Logprobs, Plan, Usage};
use super::{Http, request};
use crate::pb::{self, generation_server::Generation};

/// How a stream's messages become server-sent events: the completions
/// shape or the chat shape.
pub(super) trait Shape: Send + 'static {
    /// `cmpl-` or `chatcmpl-`: the id is this and the first request's id.
    const ID_PREFIX: &'static str;
    /// The events of one message of prompt `p`'s stream, for choice `index`.
    fn message(&mut self, id: &str, p: usize, index: u32, m: &pb::GenerateStreamResponse) -> Vec<String>;
    /// The usage event (`stream_options.include_usage`).
    fn usage(&self, id: &str, usage: Usage) -> String;
}

/// `/v1/completions` chunks: `text_completion` objects, the echo first.
pub(super) struct CompletionShape {
    echoes: Vec<String>,
    logprobs: Option<u32>,
    /// Characters sent so far per choice (text offsets).
    offsets: std::collections::HashMap<u32, usize>,
    model: String,
    created: u64,
}

impl CompletionShape {
    pub(super) fn new(echoes: Vec<String>, logprobs: Option<u32>, model: String) -> Self {
        CompletionShape { echoes, logprobs, offsets: Default::default(), model, created: super::unix_now() }
    }

    fn chunk(&self, id: &str, choices: Vec<Choice>, usage: Option<Usage>) -> String {
        let c = Completion {
            id: id.to_string(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        };
        serde_json::to_string(&c).expect("serializable")
    }
}

impl Shape for CompletionShape {
    const ID_PREFIX: &'static str = "cmpl-";

    fn message(&mut self, id: &str, p: usize, index: u32, m: &pb::GenerateStreamResponse) -> Vec<String> {
        let mut text = String::new();
        let echo = &self.echoes[p];
        let offset = self.offsets.entry(index).or_insert_with(|| {
            text.push_str(echo);
            echo.chars().count()
        });
        text.push_str(&m.text);
        let lp = self.logprobs.map(|_| {
            let mut l = Logprobs::default();
            *offset = l.extend(&m.tokens, *offset);
            l
        });
        let choice = Choice { text, index, logprobs: lp, finish_reason: openai::finish_reason(m.finish_reason) };
        vec![self.chunk(id, vec![choice], None)]
    }

    fn usage(&self, id: &str, usage: Usage) -> String {
        self.chunk(id, vec![], Some(usage))
    }
}

/// `/v1/chat/completions` chunks: the role first, then text deltas, then
/// an empty delta with the finish reason.
pub(super) struct ChatShape {
    logprobs: Option<u32>,
    /// Choices whose role chunk went out.
    started: std::collections::HashSet<u32>,
    model: String,
    created: u64,
    tokenizer: crate::tokenizer::Tokenizer,
}

impl ChatShape {
    pub(super) fn new(logprobs: Option<u32>, model: String, tokenizer: crate::tokenizer::Tokenizer) -> Self {
        ChatShape { logprobs, started: Default::default(), model, created: super::unix_now(), tokenizer }
    }

    fn chunk(&self, id: &str, choices: Vec<ChunkChoice>, usage: Option<Usage>) -> String {
        let c = ChatChunk {
            id: id.to_string(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        };
        serde_json::to_string(&c).expect("serializable")
    }
}

impl Shape for ChatShape {
    const ID_PREFIX: &'static str = "chatcmpl-";

    fn message(&mut self, id: &str, _p: usize, index: u32, m: &pb::GenerateStreamResponse) -> Vec<String> {
        let mut out = Vec::new();
        let choice = |delta: Delta, logprobs: Option<ChatLogprobs>, finish_reason: Option<&'static str>| ChunkChoice {
            index,
            delta,
            logprobs,
            finish_reason,
        };
        if self.started.insert(index) {
            let role = Delta { role: Some("assistant"), content: Some(String::new()) };
            out.push(self.chunk(id, vec![choice(role, None, None)], None));
        }
        if !m.text.is_empty() || (self.logprobs.is_some() && !m.tokens.is_empty()) {
            let lp = self.logprobs.map(|_| ChatLogprobs::of(&m.tokens, &self.tokenizer));
            let delta = Delta { role: None, content: Some(m.text.clone()) };
            out.push(self.chunk(id, vec![choice(delta, lp, None)], None));
        }
        if let Some(reason) = openai::finish_reason(m.finish_reason) {
            out.push(self.chunk(id, vec![choice(Delta::default(), None, Some(reason))], None));
        }
        out
    }

    fn usage(&self, id: &str, usage: Usage) -> String {
        self.chunk(id, vec![], Some(usage))
    }
}

/// A streamed answer: the events of every prompt's stream (merged as they
/// come), the usage event if asked, then `[DONE]`. An error after the first
/// event is sent as an event with OpenAI's error body.
pub(super) async fn stream<S: Shape>(
    http: Http,
    metadata: MetadataMap,
    plan: &Plan,
    mut shape: S,
) -> Result<Response, ApiError> {
    let mut streams = Vec::new();
    for (p, call) in plan.calls.iter().enumerate() {
        let s = http
            .service
            .generate_stream(request(&metadata, call.clone()))
            .await
            .map_err(|e| ApiError::from_status(&e))?;
        streams.push(s.into_inner().map(move |m| (p, m)));
    }
    let (n, include_usage) = (plan.n, plan.include_usage);
    let mut merged = futures_util::stream::select_all(streams);
    let events = async_stream(move |tx| async move {
        let mut id = String::new();
        let mut usage = Usage::default();
        loop {
            let next = tokio::select! {
                next = merged.next() => next,
                // The client went away: dropping the calls cancels them.
                _ = tx.closed() => return,
            };
            let Some((p, message)) = next else { break };
            let m = match message {
                Ok(m) => m,
                Err(status) => {
                    let e = ApiError::from_status(&status);
                    let _ = tx.send(Event::default().data(e.body().to_string())).await;
                    return;
                }
            };
            if id.is_empty() {
                id = format!("{}{}", S::ID_PREFIX, m.request_id);
            }
            if let Some(u) = &m.usage {
                usage.add(u);
            }
            for data in shape.message(&id, p, p as u32 * n + m.index, &m) {
                if tx.send(Event::default().data(data)).await.is_err() {
                    return;
                }
            }
        }
        if include_usage {
            let _ = tx.send(Event::default().data(shape.usage(&id, usage))).await;
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    });
    Ok(Sse::new(events.map(Ok::<_, std::convert::Infallible>)).into_response())
}

/// A stream of what `body` sends on its channel; dropping the stream (the
/// client went away) drops the body at its next send.
fn async_stream<F, Fut>(body: F) -> tokio_stream::wrappers::ReceiverStream<Event>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
