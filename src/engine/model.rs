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

use super::layout::{self, KvShape};
use crate::model::{Dtype, ModelError, Port, Signature};
pub use crate::run::{ForwardError, Logits, SessionOptions};

fn run_err(e: impl std::fmt::Debug) -> ForwardError {
    ForwardError::Run(format!("{e:?}"))
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
    /// Prompts of several rows, left-padded with `pad_id` to the longest.
    pub fn prefill(prompts: &[&[u32]], pad_id: u32) -> Self {
        let seq = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        let mut input_ids = Vec::with_capacity(prompts.len() * seq);
        let mut position_ids = Vec::with_capacity(prompts.len() * seq);
        for p in prompts {
            let pad = seq - p.len();
            input_ids.extend(std::iter::repeat_n(i64::from(pad_id), pad));
            input_ids.extend(p.iter().map(|&t| i64::from(t)));
            position_ids.extend(std::iter::repeat_n(0, pad));
            position_ids.extend(0..p.len() as i64);
        }
        ForwardInput {
            batch: prompts.len(),
            seq,
            input_ids,
            attention_mask: layout::attention_mask(&lens, seq),
            position_ids,
        }
    }

    /// One new token per row; row `r` has `lens[r]` real tokens in a cache
    /// of `width` columns.
    pub fn decode(tokens: &[u32], lens: &[usize], width: usize) -> Self {
        let with_new: Vec<usize> = lens.iter().map(|n| n + 1).collect();
        ForwardInput {
            batch: tokens.len(),
            seq: 1,
            input_ids: tokens.iter().map(|&t| i64::from(t)).collect(),
            attention_mask: layout::attention_mask(&with_new, width + 1),
            position_ids: lens.iter().map(|&n| n as i64).collect(),
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

fn kv_shape(shape: &[i64]) -> Result<KvShape, ForwardError> {
    match shape {
        &[b, h, l, d] => Ok(KvShape { batch: b as usize, heads: h as usize, len: l as usize, head_dim: d as usize }),
        other => Err(run_err(format!("KV tensor of shape {other:?}"))),
    }
}

/// Applies `f` to the data of a float32 or float16 tensor and wraps the result.
fn rebuild(
    value: &DynValue,
    f: &dyn Fn(KvShape) -> KvShape,
    f32_op: &dyn Fn(&[f32], KvShape) -> Vec<f32>,
    f16_op: &dyn Fn(&[half::f16], KvShape) -> Vec<half::f16>,
) -> Result<DynValue, ForwardError> {
    if let Ok((shape, data)) = value.try_extract_tensor::<f32>() {
        let s = kv_shape(shape)?;
        let o = f(s);
        let t = Tensor::from_array(([o.batch, o.heads, o.len, o.head_dim], f32_op(data, s))).map_err(run_err)?;
        return Ok(t.into_dyn());
    }
    let (shape, data) = value.try_extract_tensor::<half::f16>().map_err(run_err)?;
    let s = kv_shape(shape)?;
    let o = f(s);
    let t = Tensor::from_array(([o.batch, o.heads, o.len, o.head_dim], f16_op(data, s))).map_err(run_err)?;
    Ok(t.into_dyn())
}

impl KvCache {
    /// Bytes held by the cache.
    pub fn bytes(&self) -> usize {
        self.tensors.iter().map(tensor_bytes).sum()
    }

    /// Keeps `rows` (in that order) and the last `len` columns of each (see
    /// `layout::select`).
    pub fn select(&self, rows: &[usize], len: usize) -> Result<KvCache, ForwardError> {
        let tensors = self
            .tensors
            .iter()
            .map(|t| {
                rebuild(
                    t,
                    &|s| KvShape { batch: rows.len(), len, ..s },
                    &|d, s| layout::select(d, s, rows, len),
                    &|d, s| layout::select(d, s, rows, len),
                )
            })
            .collect::<Result<_, _>>()?;
        Ok(KvCache { tensors, batch: rows.len(), len })
    }

    /// Reorders rows `start..start + perm.len()` in place (see `layout::reorder`).
    pub fn reorder_rows(&mut self, start: usize, perm: &[usize]) -> Result<usize, ForwardError> {
        let mut bytes = 0;
        for t in &mut self.tensors {
            if let Ok((shape, data)) = t.try_extract_tensor_mut::<f32>() {
                let s = kv_shape(shape)?;
                bytes += layout::reorder(data, s, start, perm);
                continue;
            }
            let (shape, data) = t.try_extract_tensor_mut::<half::f16>().map_err(run_err)?;
            let s = kv_shape(shape)?;
            bytes += layout::reorder(data, s, start, perm);
        }
        Ok(bytes)
    }

    /// Stacks `self` over `other`, both left-padded to `len` (see `layout::concat`).
    pub fn concat(&self, other: &KvCache, len: usize) -> Result<KvCache, ForwardError> {
        let batch = self.batch + other.batch;
        let tensors = self
            .tensors
            .iter()
            .zip(&other.tensors)
            .map(|(a, b)| -> Result<DynValue, ForwardError> {
                if let (Ok((sa, da)), Ok((sb, db))) = (a.try_extract_tensor::<f32>(), b.try_extract_tensor::<f32>()) {
                    let (sa, sb) = (kv_shape(sa)?, kv_shape(sb)?);
                    let data = layout::concat(da, sa, db, sb, len);
                    return Ok(Tensor::from_array(([batch, sa.heads, len, sa.head_dim], data))
                        .map_err(run_err)?
                        .into_dyn());
                }
                let (sa, da) = a.try_extract_tensor::<half::f16>().map_err(run_err)?;
                let (sb, db) = b.try_extract_tensor::<half::f16>().map_err(run_err)?;
                let (sa, sb) = (kv_shape(sa)?, kv_shape(sb)?);
                let data = layout::concat(da, sa, db, sb, len);
                Ok(Tensor::from_array(([batch, sa.heads, len, sa.head_dim], data)).map_err(run_err)?.into_dyn())
            })
            .collect::<Result<_, _>>()?;
        Ok(KvCache { tensors, batch, len })
    }
}

fn tensor_bytes(value: &DynValue) -> usize {
    let elements: i64 = match value.dtype() {
        ValueType::Tensor { shape, .. } => shape.iter().product(),
        _ => 0,
    };
    let width = match value.dtype().tensor_type() {
        Some(TensorElementType::Float16) => 2,
        _ => 4,
    };
    elements.max(0) as usize * width
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
        let session_err = |e: ort::Error| ModelError::Session { path: onnx.into(), detail: format!("{e:?}") };
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
                    Dtype::F16 => Tensor::<half::f16>::from_array((shape, Vec::new())).map_err(run_err)?.into_dyn(),
                    _ => Tensor::<f32>::from_array((shape, Vec::new())).map_err(run_err)?.into_dyn(),
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
            Ok(Tensor::<i64>::from_array((shape, data.clone())).map_err(run_err)?.into_dyn())
        };
        feeds.push(("input_ids".into(), i64_tensor([b, seq], &input.input_ids)?.into()));
        feeds.push(("attention_mask".into(), i64_tensor([b, past + seq], &input.attention_mask)?.into()));
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
                tensors.push(outputs.remove(name).ok_or_else(|| run_err(format!("no output {name}")))?);
            }
        }
        Ok((logits, KvCache { tensors, batch: b, len: past + seq }))
    }
}

fn last_position_logits(value: &DynValue, b: usize, seq: usize) -> Result<Logits, ForwardError> {
    let pick = |shape: &[i64], len: usize| -> Result<usize, ForwardError> {
        let vocab = *shape.last().unwrap_or(&0) as usize;
        if shape.len() != 3 || shape[0] as usize != b || shape[1] as usize != seq || len != b * seq * vocab {
            return Err(run_err(format!("logits of shape {shape:?}, expected [{b}, {seq}, vocab]")));
        }
        Ok(vocab)
    };
    let rows = |vocab: usize, at: &dyn Fn(usize) -> f32| -> Logits {
        let mut data = Vec::with_capacity(b * vocab);
        for row in 0..b {
            let start = (row * seq + seq - 1) * vocab;
            data.extend((start..start + vocab).map(at));
        }
        Logits::new(vocab, data)
    };
    if let Ok((shape, data)) = value.try_extract_tensor::<f32>() {
        let vocab = pick(shape, data.len())?;
        return Ok(rows(vocab, &|i| data[i]));
    }
    let (shape, data) = value.try_extract_tensor::<half::f16>().map_err(run_err)?;
    let vocab = pick(shape, data.len())?;
    Ok(rows(vocab, &|i| data[i].to_f32()))
}
