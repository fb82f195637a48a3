//! The HTTP front (axum) beside gRPC: OpenAI's `POST /v1/completions` and
//! `GET /v1/models`, `GET /health` for plain HTTP balancers,
//! `GET /metrics`, and the playground page at `/`. A completion runs through the gRPC service's own handlers
//! in process, so it is validated, limited, keyed, counted and cancelled as
//! a gRPC call is: the `Authorization` header is passed on, the
//! `x-request-timeout` header (seconds) becomes the call's deadline, and a
//! client that disconnects drops the call (its rows are evicted).
pub mod openai;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use metrics_exporter_prometheus::PrometheusHandle;
use tonic::metadata::MetadataMap;

use crate::pb::{self, generation_server::Generation};
use crate::server::{GenerationService, Server};
use openai::{ApiError, Choice, Completion, CompletionRequest, Logprobs, Plan, Usage};

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct Http {
    service: GenerationService,
    server: Arc<Server>,
    metrics: &'static PrometheusHandle,
    /// When the server started (`created` of the model).
    started: u64,
}

/// The header whose value (seconds) is a completion's deadline.
pub const TIMEOUT_HEADER: &str = "x-request-timeout";

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Http {
    pub fn new(service: GenerationService, server: Arc<Server>, metrics: &'static PrometheusHandle) -> Self {
        Http { service, server, metrics, started: unix_now() }
    }

    fn model(&self) -> Result<String, ApiError> {
        match self.server.state() {
            Some(s) => Ok(s.model_name.clone()),
            None => Err(ApiError::from_status(&crate::error::Error::Loading.into())),
        }
    }
}

/// The routes of the HTTP port.
pub fn router(http: Http) -> Router {
    Router::new()
        .route("/", get(playground))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(http)
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
        Ok(info) => Json(serde_json::json!({
            "object": "list",
            "data": [{
                "id": info.into_inner().model,
                "object": "model",
                "created": http.started,
                "owned_by": "batchgen",
            }],
        }))
        .into_response(),
        Err(s) => ApiError::from_status(&s).into_response(),
    }
}

async fn completions(State(http): State<Http>, headers: HeaderMap, body: Bytes) -> Response {
    match complete(http, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn complete(http: Http, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let metadata = metadata(&headers)?;
    let req: CompletionRequest = serde_json::from_slice(&body).map_err(|e| ApiError::invalid("body", e.to_string()))?;
    let model = http.model()?;
    let plan = Plan::new(req, &model)?;
    // The text an echo puts first: the prompt as given, or its ids decoded.
    let echoes: Vec<String> = if plan.echo {
        let state = http.server.state().expect("loaded (model() answered)");
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
        return stream(http, metadata, plan, echoes, model).await;
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

/// A streamed completion: one event per message of every prompt's stream
/// (merged as they come), the usage event if asked, then `[DONE]`. An error
/// after the first event is sent as an event with OpenAI's error body.
async fn stream(
    http: Http,
    metadata: MetadataMap,
    plan: Plan,
    echoes: Vec<String>,
    model: String,
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
    let created = unix_now();
    let (n, logprobs, include_usage) = (plan.n, plan.logprobs, plan.include_usage);
    let mut merged = futures_util::stream::select_all(streams);
    let events = async_stream(move |tx| async move {
        let mut id = String::new();
        let mut usage = Usage::default();
        // Characters sent so far per choice (text offsets), and whether its echo went out.
        let mut offsets: std::collections::HashMap<u32, usize> = Default::default();
        let chunk = |id: &str, choices: Vec<Choice>, usage: Option<Usage>| {
            let c = Completion {
                id: id.to_string(),
                object: "text_completion",
                created,
                model: model.clone(),
                choices,
                usage,
            };
            Event::default().data(serde_json::to_string(&c).expect("serializable"))
        };
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
                id = format!("cmpl-{}", m.request_id);
            }
            if let Some(u) = &m.usage {
                usage.add(u);
            }
            let index = p as u32 * n + m.index;
            let mut text = String::new();
            let offset = offsets.entry(index).or_insert_with(|| {
                text.push_str(&echoes[p]);
                echoes[p].chars().count()
            });
            text.push_str(&m.text);
            let lp = logprobs.map(|_| {
                let mut l = Logprobs::default();
                *offset = l.extend(&m.tokens, *offset);
                l
            });
            let choice = Choice { text, index, logprobs: lp, finish_reason: openai::finish_reason(m.finish_reason) };
            if tx.send(chunk(&id, vec![choice], None)).await.is_err() {
                return;
            }
        }
        if include_usage {
            let _ = tx.send(chunk(&id, vec![], Some(usage))).await;
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
