//! GPT-2 weights as one float32 buffer, read from a transformers checkpoint
//! (`model.safetensors`) or from the initializers of an optimum ONNX export.
//!
//! The one session every worker shares is built over this buffer (ONNX
//! Runtime's in-memory external data, read in place).
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use serde::Deserialize;

use super::onnx;

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path} has no tensor {name} (a GPT-2 checkpoint names it `{name}` or `transformer.{name}`)")]
    Missing { path: PathBuf, name: String },
    #[error("{path}: tensor {name} has shape {found:?}, expected {expected:?} from config.json")]
    Shape { path: PathBuf, name: String, found: Vec<usize>, expected: Vec<usize> },
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
}

/// The shape of a GPT-2 model, from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Shape {
    pub vocab: usize,
    pub positions: usize,
    pub width: usize,
    pub heads: usize,
    pub layers: usize,
    /// Width of the MLP (`n_inner`, default 4 × width).
    pub inner: usize,
    pub epsilon: f32,
    pub activation: Activation,
    /// Attention scale per layer (1/sqrt(head_dim), divided by layer + 1 when
    /// `scale_attn_by_inverse_layer_idx`; 1 when `scale_attn_weights` is off).
    pub scales: Vec<f32>,
}

/// The MLP's activation (`activation_function`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation.
    GeluTanh,
    /// `gelu`: the exact (erf) form.
    GeluErf,
}

impl Gpt2Shape {
    pub fn head_dim(&self) -> usize {
        self.width / self.heads
    }

    pub fn load(path: &Path) -> Result<Self, WeightsError> {
        #[derive(Deserialize)]
        struct Raw {
            vocab_size: Option<usize>,
            n_positions: Option<usize>,
            n_ctx: Option<usize>,
            n_embd: Option<usize>,
            n_head: Option<usize>,
            n_layer: Option<usize>,
            n_inner: Option<usize>,
            layer_norm_epsilon: Option<f32>,
            activation_function: Option<String>,
            scale_attn_weights: Option<bool>,
            scale_attn_by_inverse_layer_idx: Option<bool>,
            model_type: Option<String>,
        }
        let bad = |reason: String| WeightsError::Config { path: path.into(), reason };
        let text = std::fs::read_to_string(path).map_err(|error| WeightsError::Read { path: path.into(), error })?;
        let raw: Raw = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if let Some(t) = raw.model_type.as_deref().filter(|t| *t != "gpt2") {
            return Err(bad(format!("model_type is {t:?}; the graph builder knows \"gpt2\" only")));
        }
        let need =
            |v: Option<usize>, name: &str| v.filter(|&n| n > 0).ok_or_else(|| bad(format!("no positive {name}")));
        let width = need(raw.n_embd, "n_embd")?;
        let heads = need(raw.n_head, "n_head")?;
        let layers = need(raw.n_layer, "n_layer")?;
        if width % heads != 0 {
            return Err(bad(format!("n_embd {width} is not a multiple of n_head {heads}")));
        }
        let activation = match raw.activation_function.as_deref().unwrap_or("gelu_new") {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::GeluErf,
            other => return Err(bad(format!("activation_function {other:?} is not supported by the graph builder"))),
        };
        let base = if raw.scale_attn_weights.unwrap_or(true) { 1.0 / ((width / heads) as f32).sqrt() } else { 1.0 };
        let by_layer = raw.scale_attn_by_inverse_layer_idx.unwrap_or(false);
        Ok(Gpt2Shape {
            vocab: need(raw.vocab_size, "vocab_size")?,
            positions: need(raw.n_positions.or(raw.n_ctx), "n_positions")?,
            width,
            heads,
            layers,
            inner: raw.n_inner.unwrap_or(4 * width),
            epsilon: raw.layer_norm_epsilon.unwrap_or(1e-5),
            activation,
            scales: (0..layers).map(|i| if by_layer { base / (i + 1) as f32 } else { base }).collect(),
        })
    }

    /// Every tensor the graph needs, with its shape (names without the
    /// `transformer.` prefix; Conv1D weights are `[in, out]`).
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (e, n) = (self.width, self.inner);
        let mut t =
            vec![("wte.weight".to_string(), vec![self.vocab, e]), ("wpe.weight".into(), vec![self.positions, e])];
        for i in 0..self.layers {
            let p = |s: &str| format!("h.{i}.{s}");
            t.extend([
                (p("ln_1.weight"), vec![e]),
                (p("ln_1.bias"), vec![e]),
                (p("attn.c_attn.weight"), vec![e, 3 * e]),
                (p("attn.c_attn.bias"), vec![3 * e]),
                (p("attn.c_proj.weight"), vec![e, e]),
                (p("attn.c_proj.bias"), vec![e]),
                (p("ln_2.weight"), vec![e]),
                (p("ln_2.bias"), vec![e]),
                (p("mlp.c_fc.weight"), vec![e, n]),
                (p("mlp.c_fc.bias"), vec![n]),
                (p("mlp.c_proj.weight"), vec![n, e]),
                (p("mlp.c_proj.bias"), vec![e]),
            ]);
        }
        t.extend([("ln_f.weight".into(), vec![e]), ("ln_f.bias".into(), vec![e])]);
        t
    }
}

/// Element type of a tensor in the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    F32,
    /// int8 weights of a quantized MatMul (see `quant`).
    I8,
}

impl Elem {
    pub fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::I8 => 1,
        }
    }
}

/// Where one tensor lies in the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    /// Byte offset (a multiple of 64).
    pub offset: usize,
    pub dims: Vec<usize>,
    pub elem: Elem,
}

impl Slice {
    pub fn bytes(&self) -> usize {
        self.elem.size() * self.dims.iter().product::<usize>()
    }
}

/// All weights in one shared buffer: float32 as read, or with the large
/// MatMul weights in int8 (`Weights::quantized`).
#[derive(Clone)]
pub struct Weights {
    pub data: Arc<[u8]>,
    /// By name without the `transformer.` prefix.
    pub index: HashMap<String, Slice>,
    /// Where they were read from (for messages).
    pub source: PathBuf,
    pub precision: super::precision::Precision,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Weights({} tensors, {} bytes, {}, from {})",
            self.index.len(),
            self.data.len(),
            self.precision,
            self.source.display()
        )
    }
}

/// Element types a source tensor may have.
#[derive(Debug, Clone, Copy)]
enum Source {
    F32,
    F16,
    Bf16,
}

fn convert(bytes: &[u8], from: Source, out: &mut [u8]) {
    match from {
        Source::F32 => out.copy_from_slice(bytes),
        Source::F16 | Source::Bf16 => {
            for (src, dst) in bytes.chunks_exact(2).zip(out.chunks_exact_mut(4)) {
                let bits = u16::from_le_bytes([src[0], src[1]]);
                let v = match from {
                    Source::F16 => half::f16::from_bits(bits).to_f32(),
                    _ => half::bf16::from_bits(bits).to_f32(),
                };
                dst.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// Lays out `wanted` tensors at 64-byte offsets and fills them with `fill`,
/// which returns a tensor's bytes, element type and shape by its name.
// unsafe: one zeroed buffer for all weights, written in place (no second copy).
#[allow(unsafe_code)]
fn assemble(
    path: &Path,
    wanted: &[(String, Vec<usize>)],
    mut find: impl FnMut(&str) -> Option<(Bytes, Source, Vec<usize>)>,
) -> Result<Weights, WeightsError> {
    let mut index = HashMap::new();
    let mut offset = 0;
    for (name, dims) in wanted {
        let slice = Slice { offset, dims: dims.clone(), elem: Elem::F32 };
        offset += slice.bytes().div_ceil(64) * 64;
        index.insert(name.clone(), slice);
    }
    let mut data = Arc::<[u8]>::new_zeroed_slice(offset);
    // SAFETY: zeroed bytes are valid u8 values.
    let buffer = unsafe { Arc::get_mut(&mut data).expect("a new Arc is unique").assume_init_mut() };
    for (name, dims) in wanted {
        let found = find(name).or_else(|| find(&format!("transformer.{name}")));
        let (bytes, source, shape) =
            found.ok_or_else(|| WeightsError::Missing { path: path.into(), name: name.clone() })?;
        if &shape != dims {
            return Err(WeightsError::Shape {
                path: path.into(),
                name: name.clone(),
                found: shape,
                expected: dims.clone(),
            });
        }
        let slice = &index[name];
        let per = match source {
            Source::F32 => 4,
            _ => 2,
        };
        if bytes.len() != per * dims.iter().product::<usize>() {
            return Err(WeightsError::Format {
                path: path.into(),
                reason: format!("tensor {name} holds {} bytes for shape {dims:?}", bytes.len()),
            });
        }
        convert(&bytes, source, &mut buffer[slice.offset..slice.offset + slice.bytes()]);
    }
    // SAFETY: every byte was initialised (zeroed, then written).
    let data = unsafe { data.assume_init() };
    Ok(Weights { data, index, source: path.into(), precision: super::precision::Precision::Fp32 })
}

impl Weights {
    /// Reads a model's weights: its `model.safetensors` when it has one,
    /// else its ONNX export's initializers.
    pub fn from_files(files: &crate::model::ModelFiles, shape: &Gpt2Shape) -> Result<Self, WeightsError> {
        match (&files.safetensors, &files.onnx) {
            (Some(st), _) => Self::from_safetensors(st, shape),
            (None, Some(onnx)) => Self::from_onnx(onnx, shape),
            (None, None) => unreachable!("ModelFiles always has weights"),
        }
    }

    /// Reads a transformers checkpoint (`model.safetensors`): the header,
    /// then each tensor straight from the file into its place (one tensor at
    /// a time in memory beside the buffer, never the whole file).
    pub fn from_safetensors(path: &Path, shape: &Gpt2Shape) -> Result<Self, WeightsError> {
        use std::io::Read;
        use std::os::unix::fs::FileExt;
        let read_err = |error| WeightsError::Read { path: path.into(), error };
        let bad = |reason: String| WeightsError::Format { path: path.into(), reason };
        let mut file = std::fs::File::open(path).map_err(read_err)?;
        let size = file.metadata().map_err(read_err)?.len() as usize;
        let mut n = [0u8; 8];
        file.read_exact(&mut n).map_err(read_err)?;
        let n = u64::from_le_bytes(n) as usize;
        if n.saturating_add(8) > size {
            return Err(bad(format!("a header of {n} bytes in a file of {size}")));
        }
        let mut header = vec![0u8; n];
        file.read_exact(&mut header).map_err(read_err)?;
        let meta: safetensors::tensor::Metadata =
            serde_json::from_slice(&header).map_err(|e| bad(format!("not a safetensors header: {e}")))?;
        let mut error = None;
        let weights = assemble(path, &shape.tensors(), |name| {
            let t = meta.info(name)?;
            let source = match t.dtype {
                safetensors::Dtype::F32 => Source::F32,
                safetensors::Dtype::F16 => Source::F16,
                safetensors::Dtype::BF16 => Source::Bf16,
                other => {
                    error.get_or_insert(bad(format!(
                        "tensor {name} is {other:?}; batchgen reads float32, float16 or bfloat16 weights"
                    )));
                    return None;
                }
            };
            let (start, end) = t.data_offsets;
            let mut bytes = vec![0u8; end.saturating_sub(start)];
            if let Err(e) = file.read_exact_at(&mut bytes, (8 + n + start) as u64) {
                error.get_or_insert(bad(format!("tensor {name} at bytes {start}..{end} of the data: {e}")));
                return None;
            }
            Some((Bytes::from(bytes), source, t.shape.clone()))
        });
        match (weights, error) {
            (_, Some(e)) => Err(e),
            (w, None) => w,
        }
    }

    /// Reads the initializers of an optimum export (inline or external data,
    /// float32 or float16).
    pub fn from_onnx(path: &Path, shape: &Gpt2Shape) -> Result<Self, WeightsError> {
        // Decoded from `Bytes`, every raw_data is a slice of this one read of
        // the file (held until the weights are laid out), not a copy.
        let bytes = Bytes::from(std::fs::read(path).map_err(|error| WeightsError::Read { path: path.into(), error })?);
        let model = onnx::ModelProto::decode(bytes)
            .map_err(|e| WeightsError::Format { path: path.into(), reason: format!("not an ONNX model: {e}") })?;
        let graph = model.graph.unwrap_or_default();
        let by_name: HashMap<&str, &onnx::TensorProto> =
            graph.initializer.iter().map(|t| (t.name.as_deref().unwrap_or(""), t)).collect();
        // An export whose identical initializers were deduplicated (torch's
        // exporter does it for the ones and zeros of a freshly initialised
        // model's norms and biases) keeps the names as outputs of Identity
        // nodes over the one initializer left.
        let identity: HashMap<&str, &str> = graph
            .node
            .iter()
            .filter(|n| n.op_type.as_deref() == Some("Identity") && n.input.len() == 1 && n.output.len() == 1)
            .map(|n| (n.output[0].as_str(), n.input[0].as_str()))
            .collect();
        let initializer = |name: &str| {
            let mut name = name;
            // Bounded: a cycle of Identity nodes is not a valid graph, but must not hang.
            for _ in 0..=identity.len() {
                if let Some(t) = by_name.get(name) {
                    return Some(*t);
                }
                name = identity.get(name)?;
            }
            None
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut files: HashMap<String, Bytes> = HashMap::new();
        let mut error = None;
        let weights = assemble(path, &shape.tensors(), |name| {
            let t = initializer(name)?;
            let source = match onnx::tensor_proto::DataType::try_from(t.data_type.unwrap_or(0)).ok()? {
                onnx::tensor_proto::DataType::Float => Source::F32,
                onnx::tensor_proto::DataType::Float16 => Source::F16,
                onnx::tensor_proto::DataType::Bfloat16 => Source::Bf16,
                _ => return None,
            };
            let dims: Vec<usize> = t.dims.iter().map(|&d| d.max(0) as usize).collect();
            let data = match tensor_bytes(t, dir, &mut files) {
                Ok(d) => d,
                Err(e) => {
                    error.get_or_insert(e);
                    return None;
                }
            };
            Some((data, source, dims))
        });
        match (weights, error) {
            (_, Some(e)) => Err(e),
            (w, None) => w,
        }
    }
}

/// A tensor's bytes: `raw_data`, `float_data`, the fp16 bits in `int32_data`,
/// or a range of an external data file beside the model.
fn tensor_bytes(t: &onnx::TensorProto, dir: &Path, files: &mut HashMap<String, Bytes>) -> Result<Bytes, WeightsError> {
    if t.data_location == Some(onnx::tensor_proto::DataLocation::External as i32) {
        let get =
            |key: &str| t.external_data.iter().find(|e| e.key.as_deref() == Some(key)).and_then(|e| e.value.clone());
        let location = get("location").unwrap_or_default();
        let path = dir.join(&location);
        let bad = |reason: String| WeightsError::Format { path: path.clone(), reason };
        if location.contains("..") || Path::new(&location).is_absolute() {
            return Err(bad(format!("external data location {location:?} leaves the model directory")));
        }
        if !files.contains_key(&location) {
            let data = std::fs::read(&path).map_err(|error| WeightsError::Read { path: path.clone(), error })?;
            files.insert(location.clone(), data.into());
        }
        let file = &files[&location];
        let offset: usize = get("offset").map_or(Ok(0), |s| s.parse()).map_err(|e| bad(format!("offset: {e}")))?;
        let length: usize = get("length")
            .map_or(Ok(file.len().saturating_sub(offset)), |s| s.parse())
            .map_err(|e| bad(format!("length: {e}")))?;
        return match offset.checked_add(length) {
            Some(end) if end <= file.len() => Ok(file.slice(offset..end)),
            _ => Err(bad(format!("range {offset}+{length} is outside the file"))),
        };
    }
    if let Some(raw) = t.raw_data.as_ref().filter(|r| !r.is_empty()) {
        return Ok(raw.clone());
    }
    if !t.float_data.is_empty() {
        return Ok(t.float_data.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>().into());
    }
    // float16 values without raw_data are stored one per int32.
    Ok(t.int32_data.iter().flat_map(|&v| (v as u16).to_le_bytes()).collect::<Vec<u8>>().into())
}
