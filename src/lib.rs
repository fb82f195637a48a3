//! batchgen: a gRPC server for GPT-2 text generation on ONNX Runtime.
//!
//! Data flows one way: `server` (gRPC) → `validation` → `engine` (one thread
//! owning a backend: the model and its KV cache) → `decoding` (token choice,
//! stopping) → `tokenizer::Detokenizer` → the request's stream.
pub mod app;
pub mod bench;
pub mod chat;
pub mod client;
pub mod config;
pub mod constraint;
pub mod decoding;
pub mod engine;
pub mod error;
pub mod eval;
pub mod fault;
pub mod graph;
pub mod http;
pub mod logs;
pub mod model;
pub mod run;
pub mod runtime;
pub mod server;
pub mod telemetry;
pub mod tokenizer;
pub mod validation;

/// Code generated from `proto/batchgen/v1/generation.proto`.
pub mod pb {
    tonic::include_proto!("batchgen.v1");

    /// Encoded file descriptor set of the API (for server reflection).
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("batchgen_descriptor");
}
