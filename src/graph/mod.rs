//! batchgen's own GPT-2 graph: built at load from the weights (a
//! transformers checkpoint or an optimum export's initializers), run by ONNX
//! Runtime over a slot KV cache that is never copied between steps.
pub mod builder;
pub mod cache;
pub mod weights;

use std::ops::Range;

use ort::memory::MemoryInfo;
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, PrepackedWeights};
use ort::value::{Shape, Tensor, TensorRefMut};

pub use cache::{CacheShape, SlotCache};
pub use weights::{Gpt2Shape, Weights, WeightsError};

use crate::engine::model::{ForwardError, Logits, SessionOptions};

/// The ONNX protobuf messages (`proto/onnx/onnx.proto`).
#[allow(clippy::all, missing_docs)]
pub mod onnx {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

fn run_err(e: impl std::fmt::Debug) -> ForwardError {
    ForwardError::Run(format!("{e:?}"))
}

/// The weights and serialized graph every worker's session is built from,
/// and a pre-packed-weights container given to all their sessions. (ONNX
/// Runtime still makes a copy per session: measured, not yet solved.)
pub struct SharedModel {
    pub shape: Gpt2Shape,
    pub weights: Weights,
    graph: Vec<u8>,
    prepacked: PrepackedWeights,
}

impl SharedModel {
    pub fn new(shape: Gpt2Shape, weights: Weights) -> Self {
        let graph = builder::build(&shape, &weights);
        SharedModel { shape, weights, graph, prepacked: PrepackedWeights::new() }
    }

    /// A session over the shared weights.
    pub fn session(
        &self,
        env: &ort::environment::Environment,
        options: &SessionOptions,
    ) -> Result<Session, ort::Error> {
        let e = |e: ort::Error<ort::session::builder::SessionBuilder>| -> ort::Error { e.into() };
        Session::builder(env)?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(e)?
            .with_intra_threads(options.intra_op_threads)
            .map_err(e)?
            .with_external_initializer_file_in_memory(builder::WEIGHTS_FILE, self.weights.data.clone())
            .map_err(e)?
            .with_prepacked_weights(&self.prepacked)
            .map_err(e)?
            .commit_from_memory(&self.graph)
    }
}

/// One row of a run: `tokens` new tokens on top of `past` cached ones.
#[derive(Debug, Clone, Copy)]
pub struct RowInput<'a> {
    pub tokens: &'a [u32],
    pub past: usize,
    /// Whether the logits of its last token are wanted.
    pub logits: bool,
}

/// A session of the built graph and the slot cache it runs over.
pub struct BuiltModel {
    session: Session,
    pub cache: SlotCache,
    pub vocab: usize,
}

impl BuiltModel {
    pub fn new(session: Session, shape: &Gpt2Shape, slots: usize) -> std::io::Result<Self> {
        let cache = SlotCache::new(CacheShape {
            layers: shape.layers,
            slots,
            heads: shape.heads,
            max_len: shape.positions,
            head_dim: shape.head_dim(),
        })?;
        Ok(BuiltModel { session, cache, vocab: shape.vocab })
    }

    /// Runs `rows` (one per slot of `slots`) and returns the logits of the
    /// rows that want them, in order.
    ///
    /// Rows with one new token each (decode) may be at any lengths. Rows
    /// with several new tokens must either all start from an empty cache
    /// (their prompts, right-padded to the longest inside the run) or be a
    /// single row: GroupQueryAttention runs a chunk on top of a cached past
    /// for one row only.
    pub fn run(&mut self, slots: Range<usize>, rows: &[RowInput<'_>]) -> Result<Logits, ForwardError> {
        let b = rows.len();
        let s = rows.iter().map(|r| r.tokens.len()).max().unwrap_or(0);
        let c = self.cache.shape;
        let bad = |why: String| Err(ForwardError::Input(why));
        if b == 0 || s == 0 || slots.len() != b || slots.end > c.slots {
            return bad(format!("{b} rows of up to {s} tokens for slots {slots:?} of {}", c.slots));
        }
        if rows.iter().any(|r| r.tokens.is_empty() || r.past + s > c.max_len) {
            return bad(format!("every row needs new tokens, within {} positions", c.max_len));
        }
        if b > 1 && s > 1 && rows.iter().any(|r| r.past > 0) {
            return bad("a chunk on a cached past runs one row at a time".into());
        }
        let mut ids = Vec::with_capacity(b * s);
        let mut positions = Vec::with_capacity(b * s);
        let mut seqlens = Vec::with_capacity(b);
        let mut picked = Vec::new();
        for (r, row) in rows.iter().enumerate() {
            let n = row.tokens.len();
            // Padding after a shorter prompt is written past the row's end
            // and never attended to (its length is `seqlens_k + 1`).
            ids.extend(row.tokens.iter().map(|&t| i64::from(t)).chain(std::iter::repeat_n(0, s - n)));
            positions.extend((row.past..row.past + s).map(|p| p as i64));
            seqlens.push((row.past + n - 1) as i32);
            if row.logits {
                picked.push((r * s + n - 1) as i64);
            }
        }
        if picked.is_empty() {
            // The LM head needs one row; its result is dropped.
            picked.push(0);
        }
        let total = rows.iter().map(|r| r.past + s).max().unwrap_or(0) as i32;
        let mut binding = self.session.create_binding().map_err(run_err)?;
        let i64s = |shape: Vec<usize>, data: Vec<i64>| Tensor::from_array((shape, data)).map_err(run_err);
        binding.bind_input("input_ids", &i64s(vec![b, s], ids)?).map_err(run_err)?;
        binding.bind_input("position_ids", &i64s(vec![b, s], positions)?).map_err(run_err)?;
        let n_picked = picked.len();
        binding.bind_input("logits_index", &i64s(vec![n_picked], picked)?).map_err(run_err)?;
        let seqlens = Tensor::from_array(([b], seqlens)).map_err(run_err)?;
        binding.bind_input("seqlens_k", &seqlens).map_err(run_err)?;
        binding
            .bind_input("total_sequence_length", &Tensor::from_array(([1usize], vec![total])).map_err(run_err)?)
            .map_err(run_err)?;
        let shape = Shape::new([b as i64, c.heads as i64, c.max_len as i64, c.head_dim as i64]);
        let info = MemoryInfo::default();
        // Views of the slots, bound as both past and present: the run writes
        // the new keys and values into the cache itself.
        let mut views: Vec<TensorRefMut<'_, f32>> = Vec::with_capacity(4 * c.layers);
        for layer in 0..c.layers {
            let (k, v) = self.cache.views(layer, &slots);
            for ptr in [k, v, k, v] {
                // SAFETY: the pointer addresses `b` whole slots of a live
                // mapping owned by `self.cache`, which outlives the run.
                views
                    .push(unsafe { TensorRefMut::from_raw(info.clone(), ptr.cast(), shape.clone()) }.map_err(run_err)?);
            }
        }
        let mut views = views.into_iter();
        for layer in 0..c.layers {
            let ((pk, pv), (ok, ov)) = (builder::past_names(layer), builder::present_names(layer));
            let (ik, iv) = (views.next().expect("4 views per layer"), views.next().expect("4 views per layer"));
            bind_view(&mut binding, &pk, &ik)?;
            bind_view(&mut binding, &pv, &iv)?;
            binding.bind_output(ok, views.next().expect("4 views per layer")).map_err(run_err)?;
            binding.bind_output(ov, views.next().expect("4 views per layer")).map_err(run_err)?;
        }
        binding.bind_output_to_device("logits", &info).map_err(run_err)?;
        let outputs = self.session.run_binding(&binding).map_err(run_err)?;
        let (shape, data) = outputs["logits"].try_extract_tensor::<f32>().map_err(run_err)?;
        if shape.len() != 2 || shape[0] as usize != n_picked || shape[1] as usize != self.vocab {
            return Err(run_err(format!("logits of shape {shape:?}, expected [{n_picked}, {}]", self.vocab)));
        }
        let wanted = rows.iter().filter(|r| r.logits).count();
        Ok(Logits { vocab: self.vocab, data: data[..wanted * self.vocab].to_vec() })
    }
}

/// Binds a view of the cache as an input without copying it. (`ort`'s
/// `IoBinding::bind_input` deep-copies any tensor it does not own, which
/// would copy the whole cache on every step.) The caller keeps `view` alive
/// until the run is over.
fn bind_view(
    binding: &mut ort::session::IoBinding,
    name: &str,
    view: &TensorRefMut<'_, f32>,
) -> Result<(), ForwardError> {
    use ort::AsPointer;
    let name = std::ffi::CString::new(name).map_err(run_err)?;
    // SAFETY: both pointers are live ORT objects; ORT does not keep `name`.
    let status = unsafe { (ort::api().BindInput)(binding.ptr_mut(), name.as_ptr(), view.ptr()) };
    if status.0.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null status carries a message and is ours to release.
    let message = unsafe {
        let text = std::ffi::CStr::from_ptr((ort::api().GetErrorMessage)(status.0)).to_string_lossy().into_owned();
        (ort::api().ReleaseStatus)(status.0);
        text
    };
    Err(ForwardError::Run(format!("binding {name:?}: {message}")))
}
