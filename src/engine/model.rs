//! The ONNX Runtime session of one GPT-2 export and its batched forward call.
//!
//! `forward` takes a batch of rows (input ids, attention mask, position ids)
//! and the batch's KV cache, and returns each row's last-position logits and
//! the new cache. The `present` tensors ORT returns become the next step's
//! `past` as they are: no copy between steps.
use std::path::Path;

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};

use crate::model::{Dtype, ModelError, Port, Signature};

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("ONNX Runtime run failed: {0}")]
    Run(String),
    #[error("malformed forward input: {0}")]
    Input(String),
}

fn run_err(e: impl std::fmt::Debug) -> ForwardError {
    ForwardError::Run(format!("{e:?}"))
}

/// Options for building a session.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub intra_op_threads: usize,
}

/// One batch of rows for a forward step. All rows have `seq` new tokens
/// (shorter rows are left-padded by the caller) and share the cache length.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardInput {
    pub batch: usize,
    pub seq: usize,
    /// `batch * seq` token ids.
    pub input_ids: Vec<i64>,
    /// `batch * (past + seq)`: 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<i64>,
    /// `batch * seq` positions of the new tokens.
    pub position_ids: Vec<i64>,
}

impl ForwardInput {
    /// One row with no padding, continuing after `past` cached tokens.
    pub fn single(tokens: &[u32], past: usize) -> Self {
        let seq = tokens.len();
        ForwardInput {
            batch: 1,
            seq,
            input_ids: tokens.iter().map(|&t| i64::from(t)).collect(),
            attention_mask: vec![1; past + seq],
            position_ids: (past..past + seq).map(|p| p as i64).collect(),
        }
    }
}

/// The KV cache of one batch: `[batch, heads, len, head_dim]` per layer,
/// ordered key, value, key, value, … as in `Signature::past`.
pub struct KvCache {
    tensors: Vec<DynValue>,
    pub batch: usize,
    pub len: usize,
}

/// Each row's logits at its last position, `batch * vocab` floats.
#[derive(Debug, Clone)]
pub struct Logits {
    pub vocab: usize,
    pub data: Vec<f32>,
}

impl Logits {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }
}

pub struct Model {
    session: Session,
    pub signature: Signature,
}

fn port(o: &ort::value::Outlet) -> Port {
    let dtype = match o.dtype().tensor_type() {
        Some(TensorElementType::Float32) => Dtype::F32,
        Some(TensorElementType::Float16) => Dtype::F16,
        Some(TensorElementType::Int64) => Dtype::I64,
        Some(TensorElementType::Bool) => Dtype::Bool,
        _ => Dtype::Other,
    };
    let shape: Vec<i64> = match o.dtype() {
        ValueType::Tensor { shape, .. } => shape.iter().copied().collect(),
        _ => Vec::new(),
    };
    Port::new(o.name(), dtype, &shape)
}

impl Model {
    pub fn load(
        env: &ort::environment::Environment,
        onnx: &Path,
        n_layer: usize,
        options: &SessionOptions,
    ) -> Result<Self, ModelError> {
        let session_err = |e: ort::Error| ModelError::Session {
            path: onnx.into(),
            detail: format!("{e:?}"),
        };
        let session = Session::builder(env)
            .map_err(session_err)?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| session_err(e.into()))?
            .with_intra_threads(options.intra_op_threads)
            .map_err(|e| session_err(e.into()))?
            .commit_from_file(onnx)
            .map_err(session_err)?;
        let inputs: Vec<Port> = session.inputs().iter().map(port).collect();
        let outputs: Vec<Port> = session.outputs().iter().map(port).collect();
        let signature = Signature::discover(&inputs, &outputs, n_layer)?;
        Ok(Model { session, signature })
    }

    /// A cache holding no tokens for `batch` rows.
    pub fn empty_cache(&self, batch: usize) -> Result<KvCache, ForwardError> {
        let s = &self.signature;
        let shape = [batch, s.heads, 0, s.head_dim];
        let tensors = (0..2 * s.layers)
            .map(|_| -> Result<DynValue, ForwardError> {
                Ok(match s.kv_dtype {
                    Dtype::F16 => Tensor::<half::f16>::from_array((shape, Vec::new()))
                        .map_err(run_err)?
                        .into_dyn(),
                    _ => Tensor::<f32>::from_array((shape, Vec::new()))
                        .map_err(run_err)?
                        .into_dyn(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(KvCache { tensors, batch, len: 0 })
    }

    /// Runs one step. `cache` must hold `input.batch` rows.
    pub fn forward(&mut self, input: &ForwardInput, cache: KvCache) -> Result<(Logits, KvCache), ForwardError> {
        let (b, seq, past) = (input.batch, input.seq, cache.len);
        if cache.batch != b
            || input.input_ids.len() != b * seq
            || input.position_ids.len() != b * seq
            || input.attention_mask.len() != b * (past + seq)
            || seq == 0
        {
            return Err(ForwardError::Input(format!(
                "batch {b}, seq {seq}, past {past}: {} ids, {} positions, {} mask, cache of {} rows",
                input.input_ids.len(),
                input.position_ids.len(),
                input.attention_mask.len(),
                cache.batch
            )));
        }
        let sig = &self.signature;
        let mut feeds: Vec<(String, ort::session::SessionInputValue<'_>)> = Vec::with_capacity(4 + 2 * sig.layers);
        let i64_tensor = |shape: [usize; 2], data: &Vec<i64>| -> Result<DynValue, ForwardError> {
            Ok(Tensor::<i64>::from_array((shape, data.clone()))
                .map_err(run_err)?
                .into_dyn())
        };
        feeds.push(("input_ids".into(), i64_tensor([b, seq], &input.input_ids)?.into()));
        feeds.push((
            "attention_mask".into(),
            i64_tensor([b, past + seq], &input.attention_mask)?.into(),
        ));
        if sig.has_position_ids {
            feeds.push(("position_ids".into(), i64_tensor([b, seq], &input.position_ids)?.into()));
        }
        if sig.has_use_cache_branch {
            // The merged decoder's with-past branch is the one that reads `past`.
            let flag = Tensor::<bool>::from_array(([1usize], vec![past > 0])).map_err(run_err)?;
            feeds.push(("use_cache_branch".into(), flag.into_dyn().into()));
        }
        let names = sig.past.iter().flat_map(|(k, v)| [k.clone(), v.clone()]);
        for (name, value) in names.zip(cache.tensors) {
            feeds.push((name, value.into()));
        }
        let mut outputs = self.session.run(feeds).map_err(run_err)?;
        let logits = last_position_logits(outputs.get("logits").ok_or_else(|| run_err("no logits"))?, b, seq)?;
        let mut tensors = Vec::with_capacity(2 * sig.layers);
        for (k, v) in &sig.present {
            for name in [k, v] {
                tensors.push(
                    outputs
                        .remove(name)
                        .ok_or_else(|| run_err(format!("no output {name}")))?,
                );
            }
        }
        Ok((
            logits,
            KvCache {
                tensors,
                batch: b,
                len: past + seq,
            },
        ))
    }
}

fn last_position_logits(value: &DynValue, b: usize, seq: usize) -> Result<Logits, ForwardError> {
    let pick = |shape: &[i64], len: usize| -> Result<usize, ForwardError> {
        let vocab = *shape.last().unwrap_or(&0) as usize;
        if shape.len() != 3 || shape[0] as usize != b || shape[1] as usize != seq || len != b * seq * vocab {
            return Err(run_err(format!(
                "logits of shape {shape:?}, expected [{b}, {seq}, vocab]"
            )));
        }
        Ok(vocab)
    };
    let rows = |vocab: usize, at: &dyn Fn(usize) -> f32| -> Logits {
        let mut data = Vec::with_capacity(b * vocab);
        for row in 0..b {
            let start = (row * seq + seq - 1) * vocab;
            data.extend((start..start + vocab).map(at));
        }
        Logits { vocab, data }
    };
    if let Ok((shape, data)) = value.try_extract_tensor::<f32>() {
        let vocab = pick(shape, data.len())?;
        return Ok(rows(vocab, &|i| data[i]));
    }
    let (shape, data) = value.try_extract_tensor::<half::f16>().map_err(run_err)?;
    let vocab = pick(shape, data.len())?;
    Ok(rows(vocab, &|i| data[i].to_f32()))
}
