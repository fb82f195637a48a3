//! The client subcommands' arguments: `bench`, `plot`, `health`,
//! `generate` (and how they reach a server), `keygen`.
use std::path::PathBuf;

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct KeygenArgs {
    /// The key's name: metrics label and log field (A-Z a-z 0-9 - _ .).
    pub name: String,
    /// Most requests the key may have in flight at once.
    #[arg(long)]
    pub concurrency: Option<u32>,
    /// Most tokens per minute (prompt + max_new_tokens × sequences, charged
    /// when accepted; what a finished request did not use is given back).
    #[arg(long)]
    pub tokens_per_minute: Option<u64>,
    /// Share of the engine against other keys while they all wait (1 to
    /// 1000, default 1): a key of weight 2 gets twice the tokens of a key of
    /// weight 1.
    #[arg(long)]
    pub weight: Option<u32>,
    /// The lowest (most urgent) `priority` the key may ask for, -100 to 100
    /// (default 0: the key may only send its own requests back).
    #[arg(long, allow_negative_numbers = true)]
    pub min_priority: Option<i32>,
}

/// `bench --speculation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SpecChoice {
    Server,
    On,
    Off,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Closed-loop concurrency levels (clients each sending one request after
    /// another). 1 (the sequential baseline) is run first unless --no-sequential;
    /// 0 runs none (with --no-sequential and --rate: the open loop alone).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub concurrency: Vec<usize>,
    /// Open-loop Poisson arrival rates, in requests per second (none by default).
    #[arg(long, value_delimiter = ',')]
    pub rate: Vec<f64>,
    /// Requests per level (0: 4 × concurrency, at least 8; for rates, 8 s worth, at least 8).
    #[arg(long, default_value_t = 0)]
    pub requests: usize,
    /// Prompt length in tokens (prompts are distinct per request; with
    /// --shared-prefix, what follows the shared part; with --turns, each
    /// turn's new user part).
    #[arg(long, default_value_t = 32)]
    pub prompt_tokens: u32,
    /// Each prompt's own part twice in a row (a passage and its copy): prompt
    /// lookup then proposes the passage again (speculative decoding's load).
    #[arg(long)]
    pub repeat_prompt: bool,
    /// Every prompt begins with the same this many tokens (a system prompt,
    /// few-shot examples), then its own --prompt-tokens: the prefix cache's load.
    #[arg(long, default_value_t = 0)]
    pub shared_prefix: u32,
    /// Multi-turn conversations of this many turns: each turn's prompt is
    /// the whole conversation so far (prompts and generated tokens) and a new
    /// --prompt-tokens part; each client runs one conversation after another,
    /// and --requests counts conversations (default: one per client). TTFT is
    /// reported per turn. 1: single requests.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub turns: u32,
    /// Send `x-session-id: PREFIX-N` with every call, N the conversation
    /// (--turns) or the request: what a balancer routes on so that a
    /// conversation keeps reaching the replica whose prefix cache holds it
    /// (deploy/nginx/batchgen.conf).
    #[arg(long)]
    pub session_id: Option<String>,
    /// Tokens generated per request (EOS ignored).
    #[arg(long, default_value_t = 128)]
    pub new_tokens: u32,
    /// Seed of the prompts and of the Poisson arrivals.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Sample with this temperature instead of greedy search (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus mass when sampling (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub top_p: f32,
    /// Speculative decoding of every request (Decoding.speculation): as the
    /// server's --spec-tokens says, on (with the server's number of tokens,
    /// or 12), or off; for measuring one against the other on one server.
    #[arg(long, value_enum, default_value_t = SpecChoice::Server)]
    pub speculation: SpecChoice,
    /// Structured output: request i is held to the (i mod N)-th JSON Schema
    /// of this file (a JSON object of named schemas, or a list of them).
    #[arg(long)]
    pub json_schemas: Option<PathBuf>,
    /// The schemas of --json-schemas, as JSON text (read by `bench::run`).
    #[arg(skip)]
    pub schema_texts: std::sync::Arc<Vec<String>>,
    /// Send a request again, up to this many times, when it is lost with the
    /// replica serving it (UNAVAILABLE, or a stream a proxy reset mid-answer);
    /// `retried` in the results counts them.
    #[arg(long, default_value_t = 0)]
    pub retries: usize,
    /// Skip the sequential baseline (concurrency 1 first); speedups are then 0.
    #[arg(long)]
    pub no_sequential: bool,
    /// Measure this machine's roofline first (GEMM peaks with ONNX Runtime,
    /// read bandwidth, the step's GEMMs at the server's model shape) and
    /// give every closed-loop level its bound and "% of bound"; with
    /// `--no-sequential --concurrency 0` and no --rate, only the roofline.
    /// The client must run on the server's machine for the bound to be its.
    #[arg(long)]
    pub roofline: bool,
    /// Threads the roofline's GEMMs and reads use (0: every CPU; give the
    /// server's --intra-op-threads to bound what it can use).
    #[arg(long, default_value_t = 0)]
    pub roofline_threads: usize,
    /// The ONNX Runtime library for --roofline (default: found as `serve` finds it).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub onnxruntime: Option<PathBuf>,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write SVG charts of the run into this directory (see `batchgen plot`).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// An earlier run's `--json` output, drawn on the same axes as this run
    /// with the ratio at every load (with `--plot`).
    #[arg(long, requires = "plot")]
    pub compare: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct PlotArgs {
    /// A run saved with `batchgen bench --json`.
    pub run: PathBuf,
    /// An earlier saved run, drawn on the same axes with the ratio.
    #[arg(long)]
    pub compare: Option<PathBuf>,
    /// Directory the SVG charts are written to.
    #[arg(long)]
    pub out: PathBuf,
}

/// How a client subcommand reaches the server.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// The server's address: http://host:port, or https://host:port for TLS.
    #[arg(long, env = "BATCHGEN_TARGET", default_value = "http://127.0.0.1:50051")]
    pub target: String,
    /// PEM file of the CA that signed the server's certificate (https
    /// targets; default: none, so a TLS target needs it).
    #[arg(long, env = "BATCHGEN_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for servers that require one (mutual TLS).
    #[arg(long, env = "BATCHGEN_TLS_CLIENT_CERT", requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,
    /// The private key of --tls-client-cert (PEM).
    #[arg(long, env = "BATCHGEN_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
    /// The name the server's certificate must be valid for (default: the
    /// target's host).
    #[arg(long, env = "BATCHGEN_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
    /// API key, sent as `authorization: Bearer <key>` (servers run with --api-keys).
    #[arg(long, env = "BATCHGEN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct HealthArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The service asked about ("" is the whole server; the model's service
    /// is batchgen.v1.Generation).
    #[arg(long, default_value = "")]
    pub service: String,
    /// Seconds to wait for the answer, connecting included.
    #[arg(long, default_value_t = 3.0)]
    pub timeout: f64,
}

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The prompt.
    pub prompt: String,
    /// Tokens to generate (0: the server's default).
    #[arg(long, default_value_t = 0)]
    pub max_new_tokens: u32,
    /// Keep generating after the end-of-text token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print each token's id and log-probability after the text.
    #[arg(long)]
    pub show_tokens: bool,
    /// Sample with this temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass (with --temperature).
    #[arg(long, default_value_t = 0.0)]
    pub top_p: f32,
    /// Keep the k most likely tokens (with --temperature).
    #[arg(long, default_value_t = 0)]
    pub top_k: u32,
    /// Sampling seed (with --temperature).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Beam search with this many beams (prints the best sequence at the end).
    #[arg(long, default_value_t = 0)]
    pub num_beams: u32,
    /// Stop sequences (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}
