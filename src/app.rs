//! Start-up: ONNX Runtime, model, tokenizer, engine thread.
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::chat::Chat;
use crate::config::{GraphChoice, KvLayoutChoice, ServeArgs, Switch};
use crate::engine::pages::{self, PagedBackend};
use crate::engine::prefix::PrefixCache;
use crate::engine::{self, Backend, EngineConfig, Model, PaddedBackend, SessionOptions, SlotBackend, admission};
use crate::eval::QualityCheck;
use crate::graph::{Gpt2Shape, KvDtype, KvLayout, Precision, SharedModel, Weights, WeightsError};
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
    #[error("--graph built: {0}")]
    Weights(#[from] WeightsError),
    #[error("--weights {0} needs batchgen's own graph (--graph built or auto); the export runs as it is")]
    Precision(Precision),
    #[error("--kv-dtype {0} needs batchgen's own graph (--graph built or auto); the export runs as it is")]
    KvDtype(KvDtype),
    #[error(
        "--prefix-cache on needs batchgen's own graph (--graph built or auto): the export's left-padded batch \
         cannot take cached keys and values; use --prefix-cache auto or off with --graph exported"
    )]
    PrefixCacheExported,
    #[error(
        "--preemption on needs batchgen's own graph (--graph built or auto): the export's left-padded batch \
         cannot copy one row's cache out and back; use --preemption auto or off with --graph exported"
    )]
    PreemptionExported,
    #[error(
        "--kv-layout paged needs batchgen's own graph (--graph built or auto): the export keeps its own \
         left-padded cache; use --kv-layout slots with --graph exported"
    )]
    PagedExported,
    #[error("--spec-ngram-min {min} is longer than --spec-ngram-max {max}")]
    SpecNgram { min: u32, max: u32 },
    #[error(
        "--prefix-cache-mib {mib} holds no block of --prefix-block-tokens {block} ({block_bytes} bytes for this \
         model); give at least {min_mib} MiB, or --prefix-cache off"
    )]
    PrefixCacheBudget { mib: usize, block: usize, block_bytes: usize, min_mib: usize },
    #[error("--default-max-new-tokens ({default}) must be between 1 and --max-new-tokens ({max})")]
    Limits { default: u32, max: u32 },
    #[error(transparent)]
    Chat(#[from] crate::chat::ChatTemplateError),
}

/// A loaded server, ready to serve.
pub struct Loaded {
    pub state: Arc<AppState>,
    pub worker_threads: Vec<std::thread::JoinHandle<()>>,
    pub summary: Summary,
}

/// What the readiness line says about the server that was loaded.
#[derive(Debug, Clone)]
pub struct Summary {
    /// "built" or "exported".
    pub graph: &'static str,
    pub workers: usize,
    /// The prefix cache's budget, when it is on.
    pub prefix_cache_mib: Option<usize>,
}

/// Loads everything `serve` needs. Blocking (file and network I/O, session
/// creation): call it off the async runtime.
pub fn load(args: &ServeArgs) -> Result<Loaded, StartupError> {
    let l = &args.limits;
    if l.default_max_new_tokens == 0 || l.default_max_new_tokens > l.max_new_tokens {
        return Err(StartupError::Limits { default: l.default_max_new_tokens, max: l.max_new_tokens });
    }
    let t = Instant::now();
    let rt = runtime::init(args.runtime.onnxruntime.as_deref())?;
    crate::log_fact!(
        "ONNX Runtime loaded",
        text = format!("ONNX Runtime {} from {} ({})", runtime::ORT_VERSION, rt.path.display(), rt.source),
        version = runtime::ORT_VERSION,
        path = %rt.path.display(),
        source = %rt.source
    );
    phase("onnxruntime", t);
    let choice = args.model.graph;
    if args.model.weights != Precision::Fp32 && choice == GraphChoice::Exported {
        return Err(StartupError::Precision(args.model.weights));
    }
    if args.model.kv_dtype != KvDtype::Fp32 && choice == GraphChoice::Exported {
        return Err(StartupError::KvDtype(args.model.kv_dtype));
    }
    if args.cache.prefix_cache == Switch::On && choice == GraphChoice::Exported {
        return Err(StartupError::PrefixCacheExported);
    }
    if args.limits.preemption == Switch::On && choice == GraphChoice::Exported {
        return Err(StartupError::PreemptionExported);
    }
    if args.model.kv_layout == KvLayoutChoice::Paged && choice == GraphChoice::Exported {
        return Err(StartupError::PagedExported);
    }
    // The built graph's layout (auto: paged).
    let paged = args.model.kv_layout != KvLayoutChoice::Slots;
    if args.spec.spec_ngram_min > args.spec.spec_ngram_max {
        return Err(StartupError::SpecNgram { min: args.spec.spec_ngram_min, max: args.spec.spec_ngram_max });
    }
    let t = Instant::now();
    let files =
        ModelFiles::resolve(&args.model.model, args.model.revision.as_deref(), choice == GraphChoice::Exported)?;
    let config = ModelConfig::load(&files)?;
    let tokenizer = Tokenizer::from_file(&files.tokenizer)
        .map_err(|e| ModelError::Tokenizer { path: files.tokenizer.clone(), reason: e.0 })?;
    let model_dir = files.tokenizer.parent().map(Path::to_path_buf).unwrap_or_default();
    let chat = Chat::load(args.model.chat_template.as_deref(), &model_dir, &tokenizer.token_text(config.eos_token_id))?;
    match &chat {
        Chat::Ready(t) => crate::log_fact!(
            "chat template",
            text = format!("chat template from {}", t.origin),
            chat_template = %t.origin
        ),
        Chat::Unavailable(why) => crate::log_fact!(
            "chat template",
            text = format!("no chat template: /v1/chat/completions answers 400 ({why})"),
            chat_template = "none",
            reason = %why
        ),
    }
    phase("model files", t);
    let options = SessionOptions { intra_op_threads: args.runtime.intra_op_threads };
    let workers = args.runtime.workers.max(1);
    let slots = l.max_batch_size.max(1);
    let precision = args.model.weights;
    // float32 weights and cache: what the export could serve instead.
    let exact = precision == Precision::Fp32
        && args.model.kv_dtype == KvDtype::Fp32
        && args.model.kv_layout != KvLayoutChoice::Paged;
    let mut prefix_cache_mib = None;
    let (backends, kv_dtype, weights): (Vec<Box<dyn Backend>>, String, String) = match read_weights(
        &files, choice, exact,
    )? {
        Some((shape, fp32)) => {
            let source = fp32.source.clone();
            let session_err = |detail: String| ModelError::Session { path: source.clone(), detail };
            let eval_err = |e: String| session_err(format!("--eval-text: {e}"));
            let mut quality = match &args.model.eval_text {
                Some(path) => Some(QualityCheck::read(path, args.model.eval_tokens, &tokenizer).map_err(eval_err)?),
                None => None,
            };
            if let Some(q) = quality.as_mut().filter(|_| !exact) {
                q.baseline(&shape, &fp32, &rt.env, &options).map_err(eval_err)?;
            }
            let t = Instant::now();
            let limit = args.model.int8_range.limit();
            let weights = fp32.quantized(&shape, precision, limit);
            drop(fp32);
            if precision != Precision::Fp32 {
                phase("quantize", t);
                crate::log_fact!(
                    "int8 range",
                    text = format!("int8 weights in -{limit}..={limit} (--int8-range {})", args.model.int8_range),
                    limit
                );
            }
            let t = Instant::now();
            let kv = if paged { KvLayout::paged(args.model.kv_dtype) } else { KvLayout::new(args.model.kv_dtype) };
            let shared = SharedModel::new(shape, weights, kv);
            phase("graph", t);
            let t = Instant::now();
            let session = Arc::new(shared.session(&rt.env, &options).map_err(|e| session_err(format!("{e:?}")))?);
            phase("session", t);
            if let Some(q) = quality {
                q.log(&session, &shared, precision).map_err(eval_err)?;
            }
            let reserve_err = |e: std::io::Error| session_err(format!("reserving the KV cache: {e}"));
            let s = &shared.shape;
            let token_bytes = 2 * s.layers * s.width * kv.dtype.bytes();
            let budget = prefix_budget(args, token_bytes, workers, paged)?;
            prefix_cache_mib = budget.map(|_| args.cache.prefix_cache_mib);
            let backends: Vec<Box<dyn Backend>> = if paged {
                // Each worker's prefix cache indexes blocks of its own pool.
                let block = usize::from(args.cache.prefix_block_tokens);
                let cached = budget.map_or(0, |(_, bytes)| bytes / (block * token_bytes));
                let blocks = pages::pool_blocks(slots, s.positions, block, cached);
                (0..workers)
                    .map(|_| {
                        let model = shared.paged_worker(&session, blocks, block).map_err(reserve_err)?;
                        let prefix = budget.map(|(block, bytes)| PrefixCache::new(block, block * token_bytes, bytes));
                        Ok(Box::new(PagedBackend::new(model, slots, prefix)) as Box<dyn Backend>)
                    })
                    .collect::<Result<_, StartupError>>()?
            } else {
                let models = (0..workers)
                    .map(|_| shared.worker(&session, slots))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(reserve_err)?;
                let prefix = budget.map(|(block, bytes)| Arc::new(PrefixCache::new(block, block * token_bytes, bytes)));
                models
                    .into_iter()
                    .map(|model| Box::new(SlotBackend::new(model, prefix.clone())) as Box<dyn Backend>)
                    .collect()
            };
            let s = &shared.shape;
            crate::log_fact!(
                "built graph",
                text = format!(
                    "built graph: one session shared by {workers} worker(s): {precision} weights ({:.1} MB from {}), \
                     {} KV cache, {} layers, {} heads, width {}, context {}",
                    shared.weights.data.len() as f64 / 1e6,
                    shared.weights.source.display(),
                    kv.dtype,
                    s.layers,
                    s.heads,
                    s.width,
                    s.positions
                ),
                weights = %shared.weights.source.display(),
                precision = %precision,
                kv_dtype = %kv.dtype,
                weight_bytes = shared.weights.data.len(),
                layers = s.layers,
                heads = s.heads,
                width = s.width,
                context = s.positions,
                workers
            );
            (backends, kv.dtype.onnx_name().to_string(), precision.to_string())
        }
        None => {
            let onnx = files.onnx.clone().ok_or_else(|| ModelError::NoOnnx {
                dir: files.config.parent().map(Into::into).unwrap_or_default(),
                candidates: crate::model::ONNX_CANDIDATES.join(", "),
            })?;
            let t = Instant::now();
            let models = (0..workers)
                .map(|_| Model::load(&rt.env, &onnx, config.n_layer, &options))
                .collect::<Result<Vec<_>, _>>()?;
            phase("session", t);
            let sig = &models[0].signature;
            crate::log_fact!(
                "exported graph",
                text = format!(
                    "exported graph: {} as it is, one session per worker ({workers}): {} layers, {} heads, {} KV cache{}{}",
                    onnx.display(),
                    sig.layers,
                    sig.heads,
                    sig.kv_dtype,
                    if sig.has_position_ids { "" } else { ", no position_ids" },
                    if sig.has_use_cache_branch { ", merged decoder" } else { "" }
                ),
                onnx = %onnx.display(),
                layers = sig.layers,
                heads = sig.heads,
                kv = %sig.kv_dtype,
                position_ids = sig.has_position_ids,
                merged = sig.has_use_cache_branch,
                workers
            );
            let (pad_id, kv_dtype) = (config.eos_token_id, sig.kv_dtype.to_string());
            let weights = if kv_dtype == "float16" { "fp16" } else { "fp32" }.to_string();
            (
                models
                    .into_iter()
                    .map(|m| Box::new(PaddedBackend::new(m, pad_id, slots)) as Box<dyn Backend>)
                    .collect(),
                kv_dtype,
                weights,
            )
        }
    };
    // The session builds left their temporaries freed but resident.
    crate::engine::trim_heap();
    // A backend that cannot chunk prompts prefills them whole, so there the
    // prefill bound is also the longest prompt.
    let backends_chunk = backends[0].chunks();
    let prefill_cap = if backends_chunk { u32::MAX } else { l.max_prefill_tokens as u32 };
    let engine_config = EngineConfig {
        limits: admission::Limits {
            max_batch_size: l.max_batch_size.max(1),
            max_batch_tokens: l.max_batch_tokens,
            max_prefill_tokens: l.max_prefill_tokens,
            max_burst_prefill_tokens: l.max_burst_prefill_tokens,
            idle_gather_gap: Duration::from_micros(l.idle_gather_gap_us),
            idle_gather_max: Duration::from_micros(l.idle_gather_max_us),
        },
        max_queue: l.max_queue,
        preemption_swap_bytes: if l.preemption == Switch::Off {
            0
        } else {
            l.preemption_swap_mib.saturating_mul(1 << 20)
        },
        spec: engine::spec::SpecConfig {
            tokens: args.spec.spec_tokens as usize,
            ngram_min: args.spec.spec_ngram_min as usize,
            ngram_max: args.spec.spec_ngram_max as usize,
            adaptive: args.spec.spec_adaptive,
        },
    };
    crate::telemetry::install();
    for w in 0..backends.len() {
        metrics::gauge!(crate::telemetry::KV_BUDGET_TOKENS, "worker" => w.to_string()).set(l.max_batch_tokens as f64);
    }
    metrics::gauge!(
        crate::telemetry::BUILD_INFO,
        "version" => env!("CARGO_PKG_VERSION"),
        "model" => files.name.clone(),
        "onnxruntime" => runtime::ORT_VERSION
    )
    .set(1.0);
    let started = Instant::now();
    let grammars = crate::constraint::Grammars::new(
        &tokenizer,
        config.vocab_size,
        config.eos_token_id,
        l.constraint_cache_entries,
    )
    .map_err(|e| ModelError::Tokenizer { path: files.tokenizer.clone(), reason: e.0 })?;
    phase("constraint token trie", started);
    let (engine, worker_threads) = engine::spawn(backends, &engine_config, &tokenizer);
    let mut model_names = args.model.served_model_name.clone();
    model_names.retain(|n| !n.trim().is_empty());
    if model_names.is_empty() {
        model_names.push(files.name.clone());
    }
    let state = AppState {
        model_name: model_names[0].clone(),
        model_names,
        model_path: files.name.clone(),
        chat,
        kv_dtype,
        weights,
        tokenizer,
        limits: Limits {
            vocab_size: config.vocab_size,
            context_length: config.n_positions,
            eos_token_id: config.eos_token_id,
            max_new_tokens: l.max_new_tokens,
            default_max_new_tokens: l.default_max_new_tokens,
            max_prompt_tokens: l.max_prompt_tokens.min(config.n_positions - 1).min(prefill_cap),
            max_batch_tokens: l.max_batch_tokens.min(u32::MAX as usize) as u32,
            max_beams: l.max_beams.min(l.max_batch_size as u32),
            max_batch_size: l.max_batch_size.max(1) as u32,
        },
        draining: Default::default(),
        config: config.clone(),
        grammars,
        engine,
    };
    let graph = if backends_chunk { "built" } else { "exported" };
    let summary = Summary { graph, workers, prefix_cache_mib };
    Ok(Loaded { state: Arc::new(state), worker_threads, summary })
}

/// The prefix cache's block size and budget in bytes, unless `--prefix-cache
/// off`. With slots one cache serves every worker; paged, each worker has its
/// own (its blocks are the worker's pool blocks), each with the whole budget.
fn prefix_budget(
    args: &ServeArgs,
    token_bytes: usize,
    workers: usize,
    paged: bool,
) -> Result<Option<(usize, usize)>, StartupError> {
    let c = &args.cache;
    if c.prefix_cache == Switch::Off {
        crate::log_fact!("prefix cache", text = "prefix cache off", blocks = 0);
        return Ok(None);
    }
    let block = usize::from(c.prefix_block_tokens);
    let block_bytes = block * token_bytes;
    let budget = c.prefix_cache_mib.saturating_mul(1 << 20);
    if budget < block_bytes {
        let min_mib = block_bytes.div_ceil(1 << 20);
        return Err(StartupError::PrefixCacheBudget { mib: c.prefix_cache_mib, block, block_bytes, min_mib });
    }
    let blocks = budget / block_bytes;
    let mib = (blocks * block_bytes) >> 20;
    let whose =
        if paged && workers > 1 { "per worker (paged: in the worker's own pool)" } else { "shared by every worker" };
    crate::log_fact!(
        "prefix cache",
        text = format!(
            "prefix cache on: {blocks} blocks of {block} tokens ({} tokens, {mib} MiB), {whose}",
            blocks * block
        ),
        blocks,
        block_tokens = block,
        mib
    );
    Ok(Some((block, budget)))
}

/// Logs that a start-up phase took since `started`: one line per phase in
/// text logs, an event with `phase` and `seconds` fields in JSON logs.
fn phase(name: &'static str, started: Instant) {
    let seconds = started.elapsed().as_secs_f64();
    // The process's peak resident memory so far: which phase sets it.
    let peak_mib = peak_rss_kib().map_or(0, |k| k / 1024);
    crate::log_fact!(
        "start-up phase",
        text = format!("start-up phase {name}: {seconds:.2} s, peak RSS {peak_mib} MiB"),
        phase = name,
        seconds,
        peak_mib
    );
}

/// `VmHWM` of /proc/self/status (Linux), in KiB.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The weights for the built graph (float32), or `None` to run the export
/// as it is: `--graph exported`, or `auto` when they cannot be read (logged;
/// not with `--weights int8`, which needs them).
/// `exact`: float32 weights and cache, which the export can serve instead.
fn read_weights(
    files: &ModelFiles,
    choice: GraphChoice,
    exact: bool,
) -> Result<Option<(Gpt2Shape, Weights)>, StartupError> {
    if choice == GraphChoice::Exported {
        return Ok(None);
    }
    let read = || -> Result<(Gpt2Shape, Weights), WeightsError> {
        let t = Instant::now();
        let shape = Gpt2Shape::load(&files.config)?;
        let weights = Weights::from_files(files, &shape)?;
        phase("weights", t);
        Ok((shape, weights))
    };
    match read() {
        Ok(read) => Ok(Some(read)),
        Err(e) if choice == GraphChoice::Auto && files.onnx.is_some() && exact => {
            tracing::warn!(
                "cannot build batchgen's own graph ({e}); serving the ONNX export as it is (--graph exported)"
            );
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}
