//! The gRPC server: the state every handler shares, the service with its
//! API keys, serving (health, reflection, gRPC-Web, CORS) and the drain.
//! The Generation methods themselves are in `handlers`.
pub mod auth;
mod handlers;
pub mod stream;
pub mod tls;

pub use handlers::parse_grpc_timeout;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Status};

use crate::engine::EngineHandle;
use crate::error::Error;
use crate::pb;
use crate::tokenizer::Tokenizer;
use crate::validation::Limits;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use tonic::codec::CompressionEncoding;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// What every handler shares. Read-only after start-up.
pub struct AppState {
    /// The model's id: the first `--served-model-name`, else `--model`.
    pub model_name: String,
    /// The names `/v1/models` lists: `--served-model-name`, else `--model`.
    pub model_names: Vec<String>,
    /// `--model` as given, which the OpenAI API's `model` may also name.
    pub model_path: String,
    /// The chat template, or why chat requests are refused.
    pub chat: crate::chat::Chat,
    pub kv_dtype: String,
    /// `ModelInfo.weights`.
    pub weights: String,
    pub tokenizer: Tokenizer,
    pub limits: Limits,
    /// The model's config.json, as read (its shape for ModelInfo).
    pub config: crate::model::ModelConfig,
    /// Compiles (and caches) structured-output constraints.
    pub grammars: crate::constraint::Grammars,
    pub engine: EngineHandle,
    /// Set on SIGTERM: new calls get UNAVAILABLE while running ones finish.
    pub draining: AtomicBool,
}

/// Stops admitting, lets requests in flight finish for up to `grace`, then
/// cancels the rest (they end with FINISH_REASON_CANCELLED) and waits for
/// them to leave. Returns when nothing is in flight.
pub async fn drain(server: &Server, grace: Duration) {
    for name in ["", GENERATION_SERVICE] {
        server.health.set_service_status(name, ServingStatus::NotServing).await;
    }
    let Some(state) = server.state() else { return };
    state.draining.store(true, Ordering::SeqCst);
    let in_flight = || state.engine.in_flight.len();
    tracing::info!("draining: {} requests in flight, grace {:.1?}", in_flight(), grace);
    let deadline = Instant::now() + grace;
    while in_flight() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if in_flight() > 0 {
        tracing::warn!("grace period over: cancelling {} requests", in_flight());
        state.engine.cancel_all();
        let hard = Instant::now() + Duration::from_secs(10);
        while in_flight() > 0 && Instant::now() < hard {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The server's front: the app once it has loaded, and the health status
/// standard gRPC health checks read (NOT_SERVING while loading and draining).
pub struct Server {
    state: OnceLock<Arc<AppState>>,
    pub health: HealthReporter,
}

impl Server {
    /// A server whose model is not loaded yet: health NOT_SERVING.
    pub async fn loading() -> Arc<Self> {
        let health = HealthReporter::new();
        for name in ["", GENERATION_SERVICE] {
            health.set_service_status(name, ServingStatus::NotServing).await;
        }
        // Alive from the first moment to the last: loading and draining are
        // not reasons to restart the process.
        health.set_service_status(LIVENESS_SERVICE, ServingStatus::Serving).await;
        Arc::new(Server { state: OnceLock::new(), health })
    }

    /// The model is loaded: calls are served and health says SERVING.
    pub async fn ready(&self, state: Arc<AppState>) {
        let _ = self.state.set(state);
        for name in ["", GENERATION_SERVICE] {
            self.health.set_service_status(name, ServingStatus::Serving).await;
        }
    }

    pub fn state(&self) -> Option<&Arc<AppState>> {
        self.state.get()
    }
}

/// The service name health checks use for the Generation service (SERVING
/// once the model is loaded, NOT_SERVING again from SIGTERM: readiness).
pub const GENERATION_SERVICE: &str = "batchgen.v1.Generation";
/// A health service name that is SERVING for as long as the gRPC server
/// answers, loading and draining included (liveness).
pub const LIVENESS_SERVICE: &str = "liveness";

/// Transport settings (from the command line).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Largest request or response message, in bytes.
    pub max_message_bytes: usize,
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Option<Duration>,
    /// TLS (and mutual TLS) on the port; plaintext without.
    pub tls: Option<Arc<tls::Tls>>,
    /// API keys the Generation service requires; open to all without.
    pub keys: Option<Arc<auth::ApiKeys>>,
    /// Log each request's prompt, stop sequences and generated text at INFO
    /// (`--log-prompts`; off: no request content reaches the logs).
    pub log_prompts: bool,
    /// A stream whose client reads nothing for this long while its messages
    /// wait is ended (RESOURCE_EXHAUSTED), freeing what it holds.
    pub stall_timeout: Duration,
    /// Origins allowed to call with gRPC-Web ("*": any).
    pub cors_origins: Vec<String>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_message_bytes: 16 << 20,
            keepalive_interval: None,
            keepalive_timeout: None,
            tls: None,
            keys: None,
            log_prompts: false,
            stall_timeout: Duration::from_secs(30),
            cors_origins: Vec::new(),
        }
    }
}

impl ServeOptions {
    /// Reads again what the server reads from files (TLS certificates), as
    /// on SIGHUP; what fails to read is logged and the old one kept.
    pub fn reload(&self, why: &str) {
        if let Some(tls) = &self.tls {
            tls.log_reload(why, tls.reload());
        }
        if let Some(keys) = &self.keys {
            match keys.reload() {
                Ok(n) => tracing::info!("API keys reloaded ({why}): {n} keys"),
                Err(e) => tracing::error!("API keys not reloaded ({why}), keeping the previous ones: {e}"),
            }
        }
    }
}

#[derive(Clone)]
pub struct GenerationService {
    server: Arc<Server>,
    keys: Option<Arc<auth::ApiKeys>>,
    log_prompts: bool,
    stall_timeout: Duration,
}

impl GenerationService {
    /// The service over `server` with the settings of `options` (the gRPC
    /// port's, and the HTTP front's, which calls it in process).
    pub fn new(server: Arc<Server>, options: &ServeOptions) -> Self {
        GenerationService {
            server,
            keys: options.keys.clone(),
            log_prompts: options.log_prompts,
            stall_timeout: options.stall_timeout,
        }
    }

    fn state(&self) -> Result<&Arc<AppState>, Error> {
        self.server.state().ok_or(Error::Loading)
    }

    /// The caller's key, when the server requires keys (`None` when not).
    fn caller<T>(&self, req: &Request<T>) -> Result<Option<auth::Caller>, Error> {
        self.caller_of(req.metadata())
    }

    fn caller_of(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Option<auth::Caller>, Error> {
        match &self.keys {
            None => Ok(None),
            Some(keys) => Ok(Some(keys.authenticate(metadata)?)),
        }
    }

    /// Checks the key in `metadata` as every Generation method does (nothing
    /// to check when keys are not required), for what is served beside the
    /// service: the HTTP port's `/metrics`.
    pub fn authorize(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        self.caller_of(metadata).map(|_| ()).map_err(Status::from)
    }
}

/// Runs the gRPC server (Generation, health, reflection) on an already-bound
/// listener until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    server: Arc<Server>,
    options: &ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let generation = pb::generation_server::GenerationServer::new(GenerationService::new(server.clone(), options))
        .max_decoding_message_size(options.max_message_bytes)
        .max_encoding_message_size(options.max_message_bytes)
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip);
    let health = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(server.health.clone()),
    );
    // google.rpc error details too, so that reflection clients (grpcurl)
    // can decode BadRequest and RetryInfo.
    let descriptors =
        [pb::FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET, tonic_types::pb::FILE_DESCRIPTOR_SET];
    let mut v1 = tonic_reflection::server::Builder::configure();
    let mut v1alpha = tonic_reflection::server::Builder::configure();
    for d in descriptors {
        v1 = v1.register_encoded_file_descriptor_set(d);
        v1alpha = v1alpha.register_encoded_file_descriptor_set(d);
    }
    let reflection_v1 = v1.build_v1().expect("the descriptor sets are valid");
    let reflection_v1alpha = v1alpha.build_v1alpha().expect("the descriptor sets are valid");
    // gRPC-Web (browsers; HTTP/1.1 or HTTP/2) beside native gRPC, with CORS
    // for the allowed origins.
    let router = tonic::transport::Server::builder()
        .accept_http1(true)
        .layer(cors(&options.cors_origins))
        .layer(tonic_web::GrpcWebLayer::new())
        .http2_keepalive_interval(options.keepalive_interval)
        .http2_keepalive_timeout(options.keepalive_timeout)
        .add_service(generation)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    match &options.tls {
        // TCP_NODELAY (here and in the TLS accept loop): without it a token's
        // small HTTP/2 frame waits behind the previous unacknowledged one
        // until the client's delayed ACK (about 40 ms on Linux): measured as
        // a 44 ms time to first token on the tiny fixture, whose whole
        // generation takes 2 ms.
        None => {
            router.serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown).await
        }
        Some(tls) => {
            tls.watch();
            router.serve_with_incoming_shutdown(tls::incoming(listener, tls.clone(), tls::Alpn::Grpc), shutdown).await
        }
    }
}

/// The CORS policy of the gRPC port and the HTTP API: `origins` may send gRPC-Web calls and API requests
/// (with the headers gRPC-Web and our keys use) and read the gRPC status.
pub(crate) fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
    };
    let header = |h: &'static str| axum::http::HeaderName::from_static(h);
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([axum::http::Method::GET, axum::http::Method::POST, axum::http::Method::OPTIONS])
        .allow_headers(
            ["content-type", "x-grpc-web", "x-user-agent", "grpc-timeout", "authorization", "x-batchgen-fault"]
                .map(header),
        )
        .expose_headers(["grpc-status", "grpc-message", "grpc-status-details-bin"].map(header))
        .max_age(Duration::from_secs(24 * 3600))
}
