//! Start-up: ONNX Runtime, model, tokenizer, engine thread.
use std::sync::Arc;
use std::time::Instant;

use crate::config::ServeArgs;
use crate::engine::{self, Model, SessionOptions};
use crate::model::{ModelConfig, ModelError, ModelFiles};
use crate::runtime::{self, RuntimeError};
use crate::server::AppState;
use crate::tokenizer::Tokenizer;
use crate::validation::Limits;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("--default-max-new-tokens ({default}) must be between 1 and --max-new-tokens ({max})")]
    Limits { default: u32, max: u32 },
}

/// A loaded server, ready to serve.
pub struct Loaded {
    pub state: Arc<AppState>,
    pub engine_thread: std::thread::JoinHandle<()>,
}

/// Loads everything `serve` needs. Blocking (file and network I/O, session
/// creation): call it off the async runtime.
pub fn load(args: &ServeArgs) -> Result<Loaded, StartupError> {
    let t0 = Instant::now();
    let l = &args.limits;
    if l.default_max_new_tokens == 0 || l.default_max_new_tokens > l.max_new_tokens {
        return Err(StartupError::Limits {
            default: l.default_max_new_tokens,
            max: l.max_new_tokens,
        });
    }
    let rt = runtime::init(args.runtime.onnxruntime.as_deref())?;
    tracing::info!(path = %rt.path.display(), source = ?rt.source, "ONNX Runtime loaded");
    let files = ModelFiles::resolve(&args.model.model, args.model.revision.as_deref())?;
    let config = ModelConfig::load(&files)?;
    let tokenizer = Tokenizer::from_file(&files.tokenizer).map_err(|e| ModelError::Tokenizer {
        path: files.tokenizer.clone(),
        reason: e.0,
    })?;
    let options = SessionOptions {
        intra_op_threads: args.runtime.intra_op_threads,
    };
    let model = Model::load(&rt.env, &files.onnx, config.n_layer, &options)?;
    let sig = &model.signature;
    tracing::info!(
        onnx = %files.onnx.display(),
        layers = sig.layers,
        heads = sig.heads,
        kv = %sig.kv_dtype,
        position_ids = sig.has_position_ids,
        merged = sig.has_use_cache_branch,
        "model loaded in {:.2?}",
        t0.elapsed()
    );
    let kv_dtype = sig.kv_dtype.to_string();
    let (engine, engine_thread) = engine::spawn(model, l.max_queue);
    let state = AppState {
        model_name: files.name,
        kv_dtype,
        tokenizer,
        limits: Limits {
            vocab_size: config.vocab_size,
            context_length: config.n_positions,
            eos_token_id: config.eos_token_id,
            max_new_tokens: l.max_new_tokens,
            default_max_new_tokens: l.default_max_new_tokens,
        },
        engine,
    };
    Ok(Loaded {
        state: Arc::new(state),
        engine_thread,
    })
}
