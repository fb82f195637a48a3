//! The HTTP front (axum) beside gRPC: OpenAI's `POST /v1/completions`,
//! `POST /v1/chat/completions` and `GET /v1/models`, vLLM's `POST /tokenize`,
//! `POST /detokenize` and `GET /version`, `GET /health` for plain HTTP
//! balancers, `GET /metrics`, and the playground page at `/`. A completion runs through the gRPC service's own handlers
//! in process, so it is validated, limited, keyed, counted and cancelled as
//! a gRPC call is: the `Authorization` header is passed on, the
//! `x-request-timeout` header (seconds) becomes the call's deadline, and a
//! client that disconnects drops the call (its rows are evicted).
pub mod chat;
pub mod openai;
mod sse;
pub mod structured;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tonic::metadata::MetadataMap;

use crate::pb::{self, generation_server::Generation};
use crate::server::{GenerationService, Server};
use chat::{ChatChoice, ChatCompletion, ChatLogprobs, ChatRequest};
use openai::{ApiError, Choice, Completion, CompletionRequest, Logprobs, Plan, Prompt, Usage};

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct Http {
    service: GenerationService,
    server: Arc<Server>,
    metrics: &'static PrometheusHandle,
    /// When the server started (`created` of the model).
    started: u64,
    /// Origins whose pages may call the API (`--cors-allow-origin`).
    cors_origins: Vec<String>,
}

/// The header whose value (seconds) is a completion's deadline.
pub const TIMEOUT_HEADER: &str = "x-request-timeout";

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Http {
    pub fn new(
        service: GenerationService,
        server: Arc<Server>,
        metrics: &'static PrometheusHandle,
        options: &crate::server::ServeOptions,
    ) -> Self {
        Http { service, server, metrics, started: unix_now(), cors_origins: options.cors_origins.clone() }
    }

    fn state(&self) -> Result<Arc<crate::server::AppState>, ApiError> {
        self.server.state().cloned().ok_or_else(|| ApiError::from_status(&crate::error::Error::Loading.into()))
    }
}

/// The names a request's `model` may give: the served names (the first is
/// the id answers carry) and `--model`.
fn model_names(state: &crate::server::AppState) -> Vec<String> {
    let mut names = state.model_names.clone();
    if !names.contains(&state.model_path) {
        names.push(state.model_path.clone());
    }
    names
}

/// The routes of the HTTP port.
pub fn router(http: Http) -> Router {
    let cors = crate::server::cors(&http.cors_origins);
    Router::new()
        .route("/", get(playground))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/version", get(version))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(http)
        .layer(cors)
}

/// Serves `router` on `listener` until `shutdown` completes (then lets
/// requests in progress finish); over TLS when the gRPC port has it (the
/// same certificates, client certificates and reloads).
pub async fn serve(
    listener: tokio::net::TcpListener,
    http: Http,
    tls: Option<Arc<crate::server::tls::Tls>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match tls {
        None => axum::serve(listener, router(http)).with_graceful_shutdown(shutdown).await,
        Some(tls) => {
            let listener = crate::server::tls::TlsListener::new(listener, tls)?;
            axum::serve(listener, router(http)).with_graceful_shutdown(shutdown).await
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(self.body())).into_response();
        if let Some(after) = self.retry_after {
            let secs = after.as_secs_f64().ceil().max(1.0) as u64;
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// The gRPC metadata an HTTP request carries over: its key and its deadline.
fn metadata(headers: &HeaderMap) -> Result<MetadataMap, ApiError> {
    let mut m = MetadataMap::new();
    if let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
        && let Ok(v) = v.parse()
    {
        m.insert("authorization", v);
    }
    if let Some(v) = headers.get(TIMEOUT_HEADER) {
        let secs = v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0 && *s <= 86_400.0)
            .ok_or_else(|| {
                ApiError::invalid(TIMEOUT_HEADER, format!("{v:?} is not a number of seconds in (0, 86400]"))
            })?;
        let ms = (secs * 1000.0).ceil() as u64;
        m.insert("grpc-timeout", format!("{ms}m").parse().expect("digits and a unit"));
    }
    Ok(m)
}

fn request<T>(metadata: &MetadataMap, msg: T) -> tonic::Request<T> {
    tonic::Request::from_parts(metadata.clone(), Default::default(), msg)
}

/// The playground: one static page (no build step, nothing from elsewhere)
/// that streams a completion and colours each token by its log-probability.
async fn playground() -> Response {
    let page = include_str!("playground.html");
    let csp = "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'";
    ([(header::CONTENT_SECURITY_POLICY, csp)], axum::response::Html(page)).into_response()
}

async fn health(State(http): State<Http>) -> Response {
    let ready = http.server.state().is_some_and(|s| !s.draining.load(std::sync::atomic::Ordering::SeqCst));
    if ready {
        (StatusCode::OK, Json(serde_json::json!({"status": "ready"}))).into_response()
    } else {
        let status = if http.server.state().is_none() { "loading" } else { "draining" };
        (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"status": status}))).into_response()
    }
}

async fn metrics(State(http): State<Http>, headers: HeaderMap) -> Response {
    // On the public port the metrics need a key when keys are required.
    let metadata = match metadata(&headers) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    if let Err(s) = http.service.authorize(&metadata) {
        return ApiError::from_status(&s).into_response();
    }
    crate::telemetry::exposition(http.metrics).into_response()
}

async fn models(State(http): State<Http>, headers: HeaderMap) -> Response {
    let metadata = match metadata(&headers) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    match http.service.model_info(request(&metadata, pb::ModelInfoRequest {})).await {
        Ok(info) => {
            let info = info.into_inner();
            let Some(state) = http.server.state() else {
                return ApiError::from_status(&crate::error::Error::Loading.into()).into_response();
            };
            let data: Vec<serde_json::Value> = state
                .model_names
                .iter()
                .map(|name| {
                    serde_json::json!({
                        "id": name,
                        "object": "model",
                        "created": http.started,
                        "owned_by": "batchgen",
                        "root": state.model_path,
                        "max_model_len": info.context_length,
                    })
                })
                .collect();
            Json(serde_json::json!({"object": "list", "data": data})).into_response()
        }
        Err(s) => ApiError::from_status(&s).into_response(),
    }
}

/// `GET /version` (vLLM's): the server's version; no key needed.
async fn version() -> Response {
    Json(serde_json::json!({"version": env!("CARGO_PKG_VERSION")})).into_response()
}

/// `POST /tokenize` (vLLM's): a prompt, or a conversation rendered with the
/// chat template, to token ids; through the Tokenize RPC (keys apply).
async fn tokenize(
    State(http): State<Http>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        model: Option<String>,
        prompt: Option<String>,
        messages: Option<Vec<chat::ChatMessage>>,
        add_generation_prompt: Option<bool>,
        chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
        /// Accepted for vLLM's clients; GPT-2 adds no special tokens either way.
        #[allow(dead_code)]
        add_special_tokens: Option<bool>,
    }
    let metadata = metadata(&headers)?;
    let b: Body = parse(&body)?;
    let state = http.state()?;
    check_model(b.model.as_deref(), &state)?;
    let text = match (b.prompt, b.messages) {
        (Some(p), None) => p,
        (None, Some(messages)) => {
            let messages = chat::conversation(messages)?;
            http.service.authorize(&metadata).map_err(|s| ApiError::from_status(&s))?;
            let add = b.add_generation_prompt.unwrap_or(true);
            render(&state, &messages, add, &b.chat_template_kwargs.unwrap_or_default())?
        }
        _ => return Err(ApiError::invalid("prompt", "give exactly one of prompt and messages")),
    };
    let answer = http
        .service
        .tokenize(request(&metadata, pb::TokenizeRequest { text }))
        .await
        .map_err(|s| ApiError::from_status(&s))?
        .into_inner();
    Ok(Json(serde_json::json!({
        "count": answer.token_ids.len(),
        "max_model_len": state.limits.context_length,
        "tokens": answer.token_ids,
    })))
}

/// `POST /detokenize` (vLLM's): token ids to text, special tokens written out.
async fn detokenize(
    State(http): State<Http>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        model: Option<String>,
        tokens: Vec<u32>,
    }
    let metadata = metadata(&headers)?;
    let b: Body = parse(&body)?;
    let state = http.state()?;
    check_model(b.model.as_deref(), &state)?;
    let answer = http
        .service
        .detokenize(request(&metadata, pb::DetokenizeRequest { token_ids: b.tokens, skip_special_tokens: false }))
        .await
        .map_err(|s| ApiError::from_status(&s))?
        .into_inner();
    Ok(Json(serde_json::json!({"prompt": answer.text})))
}

/// A JSON request body (an error names `body` and what serde found).
fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid("body", e.to_string()))
}

/// Refuses a `model` this server does not serve (404, as OpenAI).
fn check_model(model: Option<&str>, state: &crate::server::AppState) -> Result<(), ApiError> {
    openai::check_model(model, &model_names(state))
}

/// The prompt of a chat plan, rendered with the server's template.
fn render(
    state: &crate::server::AppState,
    messages: &[crate::chat::Message],
    add_generation_prompt: bool,
    kwargs: &serde_json::Map<String, serde_json::Value>,
) -> Result<String, ApiError> {
    state.chat.render(messages, add_generation_prompt, kwargs).map_err(|e| {
        let param = match e {
            crate::chat::ChatError::Render { .. } => Some("messages".to_string()),
            _ => None,
        };
        ApiError { param, code: "chat_template".into(), ..ApiError::invalid("messages", e.to_string()) }
    })
}

async fn completions(State(http): State<Http>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let metadata = metadata(&headers)?;
    let req: CompletionRequest = parse(&body)?;
    let state = http.state()?;
    let model = state.model_name.clone();
    let plan = Plan::new(req, &model_names(&state))?;
    // The text an echo puts first: the prompt as given, or its ids decoded.
    let echoes: Vec<String> = if plan.echo {
        plan.calls
            .iter()
            .map(|c| {
                if c.prompt.is_empty() {
                    state.tokenizer.decode(&c.prompt_token_ids).unwrap_or_default()
                } else {
                    c.prompt.clone()
                }
            })
            .collect()
    } else {
        vec![String::new(); plan.calls.len()]
    };
    if plan.stream {
        let shape = sse::CompletionShape::new(echoes, plan.logprobs, model);
        return sse::stream(http, metadata, &plan, shape).await;
    }
    let calls = plan.calls.iter().map(|c| http.service.generate(request(&metadata, c.clone())));
    let answers = futures_util::future::try_join_all(calls).await.map_err(|s| ApiError::from_status(&s))?;
    let mut usage = Usage::default();
    let mut choices = Vec::new();
    let mut id = String::new();
    for (p, answer) in answers.into_iter().enumerate() {
        let answer = answer.into_inner();
        if id.is_empty() {
            id = format!("cmpl-{}", answer.request_id);
        }
        if let Some(u) = &answer.usage {
            usage.add(u);
        }
        for seq in answer.sequences {
            let echo = &echoes[p];
            let logprobs = plan.logprobs.map(|_| {
                let mut l = Logprobs::default();
                l.extend(&seq.tokens, echo.chars().count());
                l
            });
            choices.push(Choice {
                text: format!("{echo}{}", seq.text),
                index: p as u32 * plan.n + seq.index,
                logprobs,
                finish_reason: openai::finish_reason(seq.finish_reason),
            });
        }
    }
    choices.sort_by_key(|c| c.index);
    let completion =
        Completion { id, object: "text_completion", created: unix_now(), model, choices, usage: Some(usage) };
    Ok(Json(completion).into_response())
}

async fn chat_completions(State(http): State<Http>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let metadata = metadata(&headers)?;
    let req: ChatRequest = parse(&body)?;
    let state = http.state()?;
    let mut chat = req.plan()?;
    check_model(chat.completion.model.as_deref(), &state)?;
    // The key first: rendering is work a caller without one must not get.
    http.service.authorize(&metadata).map_err(|s| ApiError::from_status(&s))?;
    chat.completion.prompt = Prompt::Text(render(&state, &chat.messages, chat.add_generation_prompt, &chat.kwargs)?);
    let plan = Plan::new(chat.completion, &model_names(&state))?;
    let model = state.model_name.clone();
    if plan.stream {
        let shape = sse::ChatShape::new(chat.logprobs, model, state.tokenizer.clone());
        return sse::stream(http, metadata, &plan, shape).await.map_err(of_messages);
    }
    let calls = plan.calls.iter().map(|c| http.service.generate(request(&metadata, c.clone())));
    let answers =
        futures_util::future::try_join_all(calls).await.map_err(|s| of_messages(ApiError::from_status(&s)))?;
    let mut usage = Usage::default();
    let mut choices = Vec::new();
    let mut id = String::new();
    for answer in answers {
        let answer = answer.into_inner();
        if id.is_empty() {
            id = format!("chatcmpl-{}", answer.request_id);
        }
        if let Some(u) = &answer.usage {
            usage.add(u);
        }
        for seq in answer.sequences {
            choices.push(ChatChoice {
                index: seq.index,
                message: chat::AssistantMessage { role: "assistant", content: seq.text },
                logprobs: chat.logprobs.map(|_| ChatLogprobs::of(&seq.tokens, &state.tokenizer)),
                finish_reason: openai::finish_reason(seq.finish_reason),
            });
        }
    }
    choices.sort_by_key(|c| c.index);
    let completion = ChatCompletion { id, object: "chat.completion", created: unix_now(), model, choices, usage };
    Ok(Json(completion).into_response())
}

/// A prompt error of a chat request is a fault of its `messages` (a
/// conversation too long for the context, say).
fn of_messages(mut e: ApiError) -> ApiError {
    if e.param.as_deref() == Some("prompt") {
        e.param = Some("messages".into());
    }
    e
}
