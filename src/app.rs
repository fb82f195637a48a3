//! Start-up: ONNX Runtime, model, tokenizer, engine thread.
use std::sync::Arc;
use std::time::Instant;

use crate::config::ServeArgs;
use crate::engine::{self, EngineConfig, Model, SessionOptions, admission};
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
    pub worker_threads: Vec<std::thread::JoinHandle<()>>,
}

/// Loads everything `serve` needs. Blocking (file and network I/O, session
/// creation): call it off the async runtime.
pub fn load(args: &ServeArgs) -> Result<Loaded, StartupError> {
    let t0 = Instant::now();
    let l = &args.limits;
    if l.default_max_new_tokens == 0 || l.default_max_new_tokens > l.max_new_tokens {
        return Err(StartupError::Limits { default: l.default_max_new_tokens, max: l.max_new_tokens });
    }
    let rt = runtime::init(args.runtime.onnxruntime.as_deref())?;
    tracing::info!(path = %rt.path.display(), source = ?rt.source, "ONNX Runtime loaded");
    let files = ModelFiles::resolve(&args.model.model, args.model.revision.as_deref())?;
    let config = ModelConfig::load(&files)?;
    let tokenizer = Tokenizer::from_file(&files.tokenizer)
        .map_err(|e| ModelError::Tokenizer { path: files.tokenizer.clone(), reason: e.0 })?;
    let options = SessionOptions { intra_op_threads: args.runtime.intra_op_threads };
    let models = (0..args.runtime.workers.max(1))
        .map(|_| Model::load(&rt.env, &files.onnx, config.n_layer, &options))
        .collect::<Result<Vec<_>, _>>()?;
    let sig = &models[0].signature;
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
    let engine_config = EngineConfig {
        limits: admission::Limits {
            max_batch_size: l.max_batch_size.max(1),
            max_batch_tokens: l.max_batch_tokens,
            max_prefill_tokens: l.max_prefill_tokens,
        },
        max_queue: l.max_queue,
        pad_id: config.eos_token_id,
    };
    crate::telemetry::install();
    for w in 0..models.len() {
        metrics::gauge!(crate::telemetry::KV_BUDGET_TOKENS, "worker" => w.to_string()).set(l.max_batch_tokens as f64);
    }
    metrics::gauge!(
        crate::telemetry::BUILD_INFO,
        "version" => env!("CARGO_PKG_VERSION"),
        "model" => files.name.clone(),
        "onnxruntime" => runtime::ORT_VERSION
    )
    .set(1.0);
    let (engine, worker_threads) = engine::spawn(models, &engine_config);
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
            max_prompt_tokens: l.max_prompt_tokens.min(config.n_positions - 1).min(l.max_prefill_tokens as u32),
            max_batch_tokens: l.max_batch_tokens.min(u32::MAX as usize) as u32,
            max_beams: l.max_beams.min(l.max_batch_size as u32),
            max_batch_size: l.max_batch_size.max(1) as u32,
        },
        draining: Default::default(),
        engine,
    };
    Ok(Loaded { state: Arc::new(state), worker_threads })
}
