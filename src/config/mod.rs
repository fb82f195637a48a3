//! Command-line and environment configuration: one clap struct, grouped.
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

mod client;
mod reference;
pub use client::{BenchArgs, ConnectArgs, GenerateArgs, HealthArgs, KeygenArgs, PlotArgs, SpecChoice};
pub use reference::flag_reference;

#[derive(Debug, Parser)]
#[command(name = "batchgen", version, about = "GPT-2 text generation over gRPC, on ONNX Runtime")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a model over gRPC.
    Serve(Box<ServeArgs>),
    /// Stream a generation from a running server to the terminal.
    Generate(GenerateArgs),
    /// Ask a server's grpc.health.v1 service whether it is SERVING: exit
    /// status 0 if so, 1 otherwise (for container health checks and scripts).
    Health(HealthArgs),
    /// Load-test a running server: closed loop at fixed concurrencies and
    /// open loop at Poisson rates, with a sequential baseline in the same run.
    Bench(BenchArgs),
    /// Draw SVG charts (throughput and latency percentiles against load) of
    /// a saved `bench --json` run, optionally beside an earlier one.
    Plot(PlotArgs),
    /// Measure what a weight precision costs in quality: perplexity of a text
    /// (sliding window) and top-1 agreement with float32, with throughput.
    Eval(EvalArgs),
    /// Make an API key: prints the key (give it to the caller; it is shown
    /// only now) and then its line for the `--api-keys` file, which holds
    /// only the key's SHA-256.
    Keygen(KeygenArgs),
}

#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// A GPT-2 model directory or hub id, as for `serve`.
    #[arg(long, env = "BATCHGEN_MODEL")]
    pub model: String,
    /// Hub revision when --model is a hub id.
    #[arg(long, env = "BATCHGEN_REVISION")]
    pub revision: Option<String>,
    /// The text to score (UTF-8).
    #[arg(long)]
    pub text: PathBuf,
    /// Precisions measured against float32 (which is always measured first).
    #[arg(long, value_delimiter = ',', default_value = "int8,int8-fp32-head", value_enum)]
    pub weights: Vec<crate::graph::Precision>,
    /// KV cache element types measured with each precision (a float32
    /// cache always is).
    #[arg(long, value_delimiter = ',', default_value = "fp16", value_enum)]
    pub kv_dtypes: Vec<crate::graph::KvDtype>,
    /// Range of the int8 weights, as for `serve --int8-range`.
    #[arg(long, env = "BATCHGEN_INT8_RANGE", default_value = "auto", value_enum)]
    pub int8_range: crate::graph::Int8Range,
    /// Tokens per perplexity window (0: the model's context).
    #[arg(long, default_value_t = 0)]
    pub window: usize,
    /// Tokens between window starts (0: half the window).
    #[arg(long, default_value_t = 0)]
    pub stride: usize,
    /// Score only the text's first this many tokens (0: all of it).
    #[arg(long, default_value_t = 0)]
    pub max_tokens: usize,
    /// Greedy continuations compared with float32's: how many prompts
    /// (slices of the text spread over it), ...
    #[arg(long, default_value_t = 32)]
    pub prompts: usize,
    /// ... how long each prompt is, ...
    #[arg(long, default_value_t = 32)]
    pub prompt_tokens: usize,
    /// ... and how many tokens float32 continues each with.
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Path to libonnxruntime.so (1.32), found as `serve` finds it when not given.
    #[arg(long = "onnxruntime", env = "ORT_DYLIB_PATH")]
    pub onnxruntime: Option<PathBuf>,
    /// ONNX Runtime intra-op threads (0: every core).
    #[arg(long, env = "BATCHGEN_INTRA_OP_THREADS", default_value_t = 0)]
    pub intra_op_threads: usize,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub spec: SpecArgs,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Speculative decoding")]
pub struct SpecArgs {
    /// Most tokens a row proposes per decode step by prompt lookup (its own
    /// prompt and output), all checked in that step; the output is the same
    /// as without. 0 turns speculation off (a request may still turn it on:
    /// Decoding.speculation). Beam search never speculates. 12 measured best
    /// of 4, 8, 12, 16 on one stream (docs/performance.md, "Speculative
    /// decoding"); the adaptive rule still runs shorter steps when they pay.
    #[arg(long, env = "BATCHGEN_SPEC_TOKENS", default_value_t = 12,
          value_parser = clap::value_parser!(u32).range(0..=16))]
    pub spec_tokens: u32,
    /// Longest n-gram looked up (the last n tokens, found earlier in the
    /// prompt or output, propose what followed them); the longest match wins.
    #[arg(long, env = "BATCHGEN_SPEC_NGRAM_MAX", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=32))]
    pub spec_ngram_max: u32,
    /// Shortest n-gram looked up (at most --spec-ngram-max).
    #[arg(long, env = "BATCHGEN_SPEC_NGRAM_MIN", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=32))]
    pub spec_ngram_min: u32,
    /// Decide each step whether proposals are worth their positions, from
    /// each row's measured acceptance rate and the worker's measured step
    /// cost (so a compute-bound batch does not speculate). false: every row
    /// with a proposal speculates whenever the backend can (for tests and
    /// measurements).
    #[arg(long, env = "BATCHGEN_SPEC_ADAPTIVE", default_value_t = true, action = clap::ArgAction::Set)]
    pub spec_adaptive: bool,
}

/// `--kv-layout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KvLayoutChoice {
    Auto,
    Paged,
    Slots,
}

/// Whether a feature is on: `auto` lets the server decide (see the flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Prefix cache")]
pub struct CacheArgs {
    /// Prefix cache: a prompt that begins like an earlier one (a system
    /// prompt, few-shot examples, a conversation's history) copies that
    /// beginning's keys and values instead of prefilling it again; outputs
    /// are the same as without it. `auto`: on with batchgen's own graph, off
    /// with `--graph exported` (which cannot have it; `on` is refused there).
    #[arg(long = "prefix-cache", env = "BATCHGEN_PREFIX_CACHE", default_value = "auto", value_enum)]
    pub prefix_cache: Switch,
    /// Memory the prefix cache may hold, in MiB, shared by all workers
    /// (least recently used blocks are evicted beyond it), on top of the
    /// rows' own KV. 124M model at fp32: 72 KiB per token, so 128 MiB hold
    /// about 1,800 tokens (a long system prompt and a few conversations);
    /// sized so that 16 rows of 600 tokens and a full cache stay within
    /// 1.5 GiB of resident memory.
    #[arg(long, env = "BATCHGEN_PREFIX_CACHE_MIB", default_value_t = 128)]
    pub prefix_cache_mib: usize,
    /// Tokens per prefix cache block: a prompt reuses whole blocks only, so
    /// smaller blocks find more of a shared beginning, larger ones cost less
    /// bookkeeping.
    #[arg(long, env = "BATCHGEN_PREFIX_BLOCK_TOKENS", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub prefix_block_tokens: u16,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Model and precision")]
pub struct ModelArgs {
    /// A GPT-2 model directory: a transformers checkpoint (`config.json` +
    /// `model.safetensors`) or an export by `optimum-cli export onnx --task
    /// text-generation-with-past`; or a Hugging Face hub id (owner/name) to download.
    #[arg(long, env = "BATCHGEN_MODEL")]
    pub model: String,
    /// Which graph runs: "built" (batchgen's own graph over an in-place
    /// KV cache, from the checkpoint's or the export's weights), "exported"
    /// (the ONNX export as it is, with a left-padded cache copied on every
    /// join and eviction), or "auto" (built when the weights can be read).
    #[arg(long, env = "BATCHGEN_GRAPH", default_value = "auto", value_enum)]
    pub graph: GraphChoice,
    /// Precision of the weights (built graph only): "fp32" as read; "int8"
    /// per output channel for every layer's MatMuls and the LM head, made at
    /// load; "int8-fp32-head" the same with the LM head left in float32.
    /// Measure what it costs with `batchgen eval` or `--eval-text`.
    #[arg(long, env = "BATCHGEN_WEIGHTS", default_value = "fp32", value_enum)]
    pub weights: crate::graph::Precision,
    /// Range of the int8 weights: "full" (-127..=127), "reduced" (-63..=63,
    /// one bit less) or "auto": full on a CPU with VNNI (AVX-512 VNNI or
    /// AVX-VNNI), reduced without it, where ONNX Runtime's int8 kernels
    /// add pairs of products into a saturating int16 that full-range
    /// weights overflow.
    #[arg(long, env = "BATCHGEN_INT8_RANGE", default_value = "auto", value_enum)]
    pub int8_range: crate::graph::Int8Range,
    /// Element type of the KV cache (built graph only): "fp32", attended by
    /// ONNX Runtime's GroupQueryAttention, or "fp16" (half the memory per
    /// cached token: `--max-batch-tokens` then holds half the bytes),
    /// attended by batchgen's own kernel, which computes in float32.
    /// Measure what it costs with `batchgen eval` or `--eval-text`.
    #[arg(long, env = "BATCHGEN_KV_DTYPE", default_value = "fp32", value_enum)]
    pub kv_dtype: crate::graph::KvDtype,
    /// How the KV cache is laid out (built graph only): "paged" (rows hold
    /// block tables into a pool, attended by batchgen's PagedAttention
    /// kernel: cached prompt blocks, samples and beams are shared instead of
    /// copied, so a prefix 16 rows share is held and read once; blocks are
    /// `--prefix-block-tokens` long) or "slots" (each row owns a contiguous
    /// slot; float32 is attended by ONNX Runtime's GroupQueryAttention, and
    /// the prefix cache copies cached blocks into a row's slot). "auto":
    /// paged with batchgen's own graph; `--graph exported` keeps the export's
    /// own cache (`paged` is refused there).
    #[arg(long, env = "BATCHGEN_KV_LAYOUT", default_value = "auto", value_enum)]
    pub kv_layout: KvLayoutChoice,
    /// A text file to measure the quality of `--weights` on at start-up: the
    /// perplexity of its first `--eval-tokens` tokens and the top-1 agreement
    /// with float32, logged in one line before serving (costs a float32
    /// session for the duration of the measurement).
    #[arg(long, env = "BATCHGEN_EVAL_TEXT")]
    pub eval_text: Option<PathBuf>,
    /// Tokens of `--eval-text` measured at start-up.
    #[arg(long, env = "BATCHGEN_EVAL_TOKENS", default_value_t = 2048)]
    pub eval_tokens: usize,
    /// Hub revision (branch, tag or commit) when --model is a hub id.
    #[arg(long, env = "BATCHGEN_REVISION")]
    pub revision: Option<String>,
    /// Names clients may call the model by in the OpenAI API's `model`
    /// field, comma-separated; the first is the id `/v1/models` and ModelInfo
    /// report. The `--model` value is always accepted too. Default: the
    /// `--model` value alone.
    #[arg(long, env = "BATCHGEN_SERVED_MODEL_NAME", value_delimiter = ',')]
    pub served_model_name: Vec<String>,
    /// The chat template `/v1/chat/completions` renders conversations with
    /// (Jinja, as transformers' `apply_chat_template`): a file, or the
    /// template itself. Default: the model folder's `chat_template.jinja` or
    /// its `tokenizer_config.json`'s `chat_template`; with neither, chat
    /// requests are refused with a message saying so. Stock templates:
    /// `deploy/chat-templates/`.
    #[arg(long, env = "BATCHGEN_CHAT_TEMPLATE")]
    pub chat_template: Option<String>,
}

/// `--graph`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GraphChoice {
    Auto,
    Built,
    Exported,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Runtime and workers")]
pub struct RuntimeArgs {
    /// Path to libonnxruntime.so (1.32). Default: next to the executable, the
    /// user cache, the Python onnxruntime package, else downloaded with pip.
    #[arg(long = "onnxruntime", env = "ORT_DYLIB_PATH")]
    pub onnxruntime: Option<PathBuf>,
    /// ONNX Runtime intra-op threads. With the built graph every worker runs
    /// on one shared session, whose pool this sizes (each worker's own thread
    /// also works on its runs); with `--graph exported` each worker's session
    /// has its own pool of this size. 0 lets ONNX Runtime use every core.
    #[arg(long, env = "BATCHGEN_INTRA_OP_THREADS", default_value_t = 0)]
    pub intra_op_threads: usize,
    /// Engine workers, each with its own batch and KV cache (with the built
    /// graph they share one session and one copy of the weights).
    #[arg(long, env = "BATCHGEN_WORKERS", default_value_t = 1)]
    pub workers: usize,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Network")]
pub struct ServerArgs {
    /// Address the gRPC server listens on.
    #[arg(long, env = "BATCHGEN_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// Largest gRPC message accepted or sent, in bytes (a prompt of the whole
    /// context as text or ids fits easily in the default).
    #[arg(long, env = "BATCHGEN_MAX_MESSAGE_BYTES", default_value_t = 16 << 20)]
    pub max_message_bytes: usize,
    /// HTTP/2 keepalive ping interval in seconds (0: no pings).
    #[arg(long, env = "BATCHGEN_HTTP2_KEEPALIVE_INTERVAL", default_value_t = 0.0)]
    pub http2_keepalive_interval: f64,
    /// Seconds to wait for a keepalive ping's answer before closing the connection.
    #[arg(long, env = "BATCHGEN_HTTP2_KEEPALIVE_TIMEOUT", default_value_t = 20.0)]
    pub http2_keepalive_timeout: f64,
    /// Address of the HTTP front: OpenAI-compatible `POST /v1/completions`,
    /// `GET /v1/models`, `GET /health`, `GET /metrics`; "off" for none.
    #[arg(long, env = "BATCHGEN_HTTP_LISTEN", default_value = "0.0.0.0:8000", value_parser = listen_or_off)]
    pub http_listen: Listen,
    /// Origins whose web pages may call the gRPC port with gRPC-Web (CORS):
    /// e.g. https://app.example.com, several separated by commas, or "*" for
    /// any. Default: none (gRPC-Web from other origins is refused by browsers).
    #[arg(long, env = "BATCHGEN_CORS_ALLOW_ORIGIN", value_delimiter = ',')]
    pub cors_allow_origin: Vec<String>,
    /// Address of the Prometheus metrics endpoint (`GET /metrics`).
    #[arg(long, help_heading = "Logs and metrics", env = "BATCHGEN_METRICS_LISTEN", default_value = "0.0.0.0:9464")]
    pub metrics_listen: SocketAddr,
    /// Log format: "text" for people, "json" for machines.
    #[arg(long, help_heading = "Logs and metrics", env = "BATCHGEN_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// TLS on the gRPC port: the server's certificate chain (PEM). Re-read,
    /// with the key, on SIGHUP and when the file changes; open connections
    /// keep the certificate they were accepted with.
    #[arg(long, help_heading = "Security", env = "BATCHGEN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, help_heading = "Security", env = "BATCHGEN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: clients must present a certificate signed by one of the
    /// CAs in this PEM file (and valid today). Needs --tls-cert.
    #[arg(long, help_heading = "Security", env = "BATCHGEN_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Certificate revocation lists (PEM) for --tls-client-ca: client
    /// certificates they revoke are refused. Re-read with the certificates.
    #[arg(long, help_heading = "Security", env = "BATCHGEN_TLS_CLIENT_CRL", requires = "tls_client_ca")]
    pub tls_client_crl: Option<PathBuf>,
    /// API keys the Generation service requires (one per line: name,
    /// sha256:<hash of the key>, optional concurrency=N and
    /// tokens_per_minute=N; make lines with `batchgen keygen`). Calls send
    /// `authorization: Bearer <key>`. Health and reflection stay open.
    /// Re-read on SIGHUP.
    #[arg(long, help_heading = "Security", env = "BATCHGEN_API_KEYS")]
    pub api_keys: Option<PathBuf>,
    /// Log every accepted request's prompt, stop sequences and generated text
    /// at INFO (for debugging; off by default: then no request content
    /// reaches the logs at INFO or below).
    #[arg(long, help_heading = "Logs and metrics", env = "BATCHGEN_LOG_PROMPTS")]
    pub log_prompts: bool,
    /// Seconds a GenerateStream client may go without reading while its
    /// messages wait; then the call ends with RESOURCE_EXHAUSTED and its
    /// request is evicted. (Meanwhile the request's rows pause after
    /// 64 steps of unread tokens, holding their KV slots.)
    #[arg(long, env = "BATCHGEN_STREAM_STALL_TIMEOUT", default_value_t = 30.0)]
    pub stream_stall_timeout: f64,
    /// On SIGTERM, seconds running requests may take to finish before they
    /// are ended with FINISH_REASON_CANCELLED.
    #[arg(long, env = "BATCHGEN_SHUTDOWN_GRACE", default_value_t = 30.0)]
    pub shutdown_grace: f64,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Limits and scheduling")]
pub struct LimitArgs {
    /// Requests allowed to wait for a worker; beyond it, RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "BATCHGEN_MAX_QUEUE", default_value_t = 128)]
    pub max_queue: usize,
    /// Rows (sequences) one worker's batch may hold.
    #[arg(long, env = "BATCHGEN_MAX_BATCH_SIZE", default_value_t = 32)]
    pub max_batch_size: usize,
    /// KV budget per worker, in tokens. With the built graph each row holds
    /// its own tokens: a request costs rows × (prompt + max_new_tokens), and
    /// the cache's resident memory follows the tokens held (paged: plus up
    /// to 64 MiB of freed blocks kept for reuse). With
    /// `--graph exported` the left-padded batch costs rows × the longest
    /// row's final length (padding is counted).
    #[arg(long, env = "BATCHGEN_MAX_BATCH_TOKENS", default_value_t = 16384)]
    pub max_batch_tokens: usize,
    /// Prompt tokens prefilled per iteration, between two decode steps of the
    /// running rows; a longer prompt is prefilled in chunks this large, so it
    /// stalls the running rows for one chunk at a time. (`--graph exported`
    /// prefills whole prompts: there it bounds rows × longest prompt, and the
    /// longest prompt accepted.)
    #[arg(long, env = "BATCHGEN_MAX_PREFILL_TOKENS", default_value_t = 128)]
    pub max_prefill_tokens: usize,
    /// Prompt tokens one iteration may prefill when nothing decodes, or when
    /// a burst of short prompts arrives (as many rows waiting for their first
    /// token as decoding, each prompt within `--max-prefill-tokens`, all of
    /// them within this):
    /// then they are prefilled at once instead of `--max-prefill-tokens` per
    /// iteration. Set it to `--max-prefill-tokens` to never grow.
    #[arg(long, env = "BATCHGEN_MAX_BURST_PREFILL_TOKENS", default_value_t = 1024)]
    pub max_burst_prefill_tokens: usize,
    /// An idle worker that receives a request waits this long (microseconds)
    /// for another before it starts the prefill, and again after each one
    /// that comes, so requests sent together (clients starting at once, a
    /// closed loop whose rows all ended in one step) are prefilled in one run
    /// instead of the later ones waiting for the earlier ones' run. A lone
    /// request pays one wait; a busy worker never waits. 0 (the default):
    /// never wait.
    #[arg(long, env = "BATCHGEN_IDLE_GATHER_GAP_US", default_value_t = 0)]
    pub idle_gather_gap_us: u64,
    /// The most an idle worker waits in all while requests keep coming
    /// (microseconds).
    #[arg(long, env = "BATCHGEN_IDLE_GATHER_MAX_US", default_value_t = 5000)]
    pub idle_gather_max_us: u64,
    /// Preemption: when the request that fair queueing puts next does not
    /// fit, it may move running requests out of the batch — another key's
    /// where that key holds more of the batch than the waiting key would
    /// after the move (by weight), or its own key's with a larger
    /// `priority` number. A moved request's cache is copied out and back in
    /// when it resumes, so its tokens do not change. `auto`: on with
    /// batchgen's own graph, off with `--graph exported` (which cannot copy
    /// a row's cache; `on` is refused there).
    #[arg(long, env = "BATCHGEN_PREEMPTION", default_value = "auto", value_enum)]
    pub preemption: Switch,
    /// Memory the caches of preempted requests may take while they wait, per
    /// worker, in MiB (124M model at fp32: 72 KiB per token, 46 MB for a
    /// 628-token row); a request whose cache would not fit is not preempted.
    #[arg(long, env = "BATCHGEN_PREEMPTION_SWAP_MIB", default_value_t = 512)]
    pub preemption_swap_mib: usize,
    /// Largest num_beams a request may ask for (each beam is a row).
    #[arg(long, env = "BATCHGEN_MAX_BEAMS", default_value_t = 8)]
    pub max_beams: u32,
    /// Longest prompt accepted, in tokens (also capped by the model's context).
    #[arg(long, env = "BATCHGEN_MAX_PROMPT_TOKENS", default_value_t = 1024)]
    pub max_prompt_tokens: u32,
    /// Largest max_new_tokens a request may ask for.
    #[arg(long, env = "BATCHGEN_MAX_NEW_TOKENS", default_value_t = 1024)]
    pub max_new_tokens: u32,
    /// max_new_tokens for requests that leave it 0.
    #[arg(long, env = "BATCHGEN_DEFAULT_MAX_NEW_TOKENS", default_value_t = 64)]
    pub default_max_new_tokens: u32,
    /// Compiled structured-output constraints (JSON Schemas, regexes,
    /// choices, grammars) kept for reuse, least recently used dropped first;
    /// each request with the same text then skips compiling. 0: compile
    /// every time.
    #[arg(long, env = "BATCHGEN_CONSTRAINT_CACHE_ENTRIES", default_value_t = 256)]
    pub constraint_cache_entries: usize,
}

/// A file `serve` reads at start-up that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error(transparent)]
    Tls(#[from] crate::server::tls::TlsError),
    #[error(transparent)]
    Keys(#[from] crate::server::auth::KeysError),
    #[error("--cors-allow-origin {0:?}: an origin is scheme://host[:port], without a path, or \"*\"")]
    Cors(String),
}

/// An address to listen on, or none ("off").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

fn listen_or_off(s: &str) -> Result<Listen, String> {
    if s == "off" {
        return Ok(Listen(None));
    }
    s.parse().map(|a| Listen(Some(a))).map_err(|e| format!("{s:?} is neither an address (host:port) nor \"off\": {e}"))
}

impl ServerArgs {
    /// The transport settings, with the TLS files read (an error names the
    /// file that cannot be used).
    pub fn serve_options(&self) -> Result<crate::server::ServeOptions, OptionsError> {
        let secs = |s: f64| (s > 0.0).then(|| std::time::Duration::from_secs_f64(s));
        for o in &self.cors_allow_origin {
            let scheme = o.strip_prefix("https://").or_else(|| o.strip_prefix("http://"));
            let host_ok = scheme.is_some_and(|h| !h.is_empty() && !h.contains('/'));
            if o != "*" && (!host_ok || axum::http::HeaderValue::from_str(o).is_err()) {
                return Err(OptionsError::Cors(o.clone()));
            }
        }
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(crate::server::tls::Tls::load(crate::server::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
                client_crl: self.tls_client_crl.clone(),
            })?),
            _ => None,
        };
        Ok(crate::server::ServeOptions {
            max_message_bytes: self.max_message_bytes,
            keepalive_interval: secs(self.http2_keepalive_interval),
            keepalive_timeout: secs(self.http2_keepalive_timeout),
            tls,
            keys: self.api_keys.as_deref().map(crate::server::auth::ApiKeys::load).transpose()?,
            log_prompts: self.log_prompts,
            cors_origins: self.cors_allow_origin.clone(),
            stall_timeout: std::time::Duration::from_secs_f64(self.stream_stall_timeout.max(0.001)),
        })
    }
}
