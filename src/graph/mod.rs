//! batchgen's own GPT-2 graph: built at load from the weights (a
//! transformers checkpoint or an optimum export's initializers), run by ONNX
//! Runtime over a slot KV cache that is never copied between steps.
pub mod attention;
pub mod builder;
pub mod cache;
pub mod greedy;
pub mod pool;
pub mod precision;
pub mod quant;
pub mod weights;

use std::ops::Range;
use std::sync::Arc;

use ort::memory::MemoryInfo;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{Shape, Tensor, TensorRefMut};

pub use cache::{CacheShape, KvDtype, SlotCache};
pub use pool::{BlockPool, PoolShape};
pub use precision::{Int8Range, Precision};
pub use weights::{Gpt2Shape, Weights, WeightsError};

use crate::run::{ForwardError, Logits, SessionOptions};

/// The ONNX protobuf messages (`proto/onnx/onnx.proto`).
#[allow(clippy::all, missing_docs)]
pub mod onnx {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

fn run_err(e: impl std::fmt::Debug) -> ForwardError {
    ForwardError::Run(format!("{e:?}"))
}

/// Which kernel attends over the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// ONNX Runtime's `com.microsoft.GroupQueryAttention` (float32 only).
    GroupQuery,
    /// batchgen's own `batchgen.SlotAttention` (`attention`).
    Slot,
    /// batchgen's own `batchgen.PagedAttention` over a block pool (`pool`).
    Paged,
}

/// The cache's element type and the kernel that reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub dtype: KvDtype,
    pub kernel: Kernel,
}

impl KvLayout {
    /// GroupQueryAttention for float32 (measured faster than ours there),
    /// our kernel for float16 (which GroupQueryAttention reads slowly).
    pub fn new(dtype: KvDtype) -> Self {
        let kernel = match dtype {
            KvDtype::Fp32 => Kernel::GroupQuery,
            KvDtype::Fp16 => Kernel::Slot,
        };
        KvLayout { dtype, kernel }
    }

    /// The paged cache (`--kv-layout paged`), read by our kernel at either
    /// element type.
    pub fn paged(dtype: KvDtype) -> Self {
        KvLayout { dtype, kernel: Kernel::Paged }
    }

    pub fn is_paged(&self) -> bool {
        self.kernel == Kernel::Paged
    }

    /// `BATCHGEN_KV_DTYPE` (fp32 when unset) and, for measuring the kernels
    /// against each other, `BATCHGEN_ATTENTION=slot` (our kernel over a
    /// float32 cache): for the benchmark programs, which take no flags.
    pub fn from_env() -> Result<Self, String> {
        let dtype = match std::env::var("BATCHGEN_KV_DTYPE") {
            Ok(d) => <KvDtype as clap::ValueEnum>::from_str(&d, true)?,
            Err(_) => KvDtype::Fp32,
        };
        let mut kv = KvLayout::new(dtype);
        match std::env::var("BATCHGEN_ATTENTION").as_deref() {
            Ok("slot") => kv.kernel = Kernel::Slot,
            Ok("paged") => kv.kernel = Kernel::Paged,
            Ok("gqa") if dtype == KvDtype::Fp32 => kv.kernel = Kernel::GroupQuery,
            Ok(other) => {
                return Err(format!("BATCHGEN_ATTENTION={other}: slot, paged, or gqa with a float32 cache"));
            }
            Err(_) => {}
        }
        Ok(kv)
    }
}

/// Held while a session with our custom operators is built (`SharedModel::session`).
static CUSTOM_OPS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The weights and the serialized graph the session is built from. Workers
/// share one session (ONNX Runtime runs one session from several threads
/// at once, each run with its own binding), so a worker costs its KV cache
/// and its activations, not another copy of the weights and of their
/// pre-packed forms.
pub struct SharedModel {
    pub shape: Gpt2Shape,
    pub weights: Weights,
    pub kv: KvLayout,
    graph: Vec<u8>,
}

impl SharedModel {
    pub fn new(shape: Gpt2Shape, weights: Weights, kv: KvLayout) -> Self {
        let graph = builder::build(&shape, &weights, kv);
        SharedModel { shape, weights, kv, graph }
    }

    /// A worker's model: the shared session over a cache of its own.
    pub fn worker(&self, session: &Arc<Session>, slots: usize) -> std::io::Result<BuiltModel> {
        assert!(!self.kv.is_paged(), "the paged graph runs over a block pool: use paged_worker");
        BuiltModel::new(session.clone(), &self.shape, self.kv, slots)
    }

    /// A worker's model over a paged cache of `blocks` blocks of `block`
    /// positions (the layout must be `KvLayout::paged`).
    pub fn paged_worker(&self, session: &Arc<Session>, blocks: usize, block: usize) -> std::io::Result<PagedModel> {
        assert!(self.kv.is_paged(), "a paged worker needs the paged graph");
        let s = &self.shape;
        let pool = BlockPool::new(PoolShape {
            layers: s.layers,
            blocks,
            heads: s.heads,
            block,
            head_dim: s.head_dim(),
            dtype: self.kv.dtype,
        })?;
        Ok(PagedModel { session: session.clone(), pool, vocab: s.vocab, max_len: s.positions })
    }

    /// A session over the weights. Build it once and give every worker's
    /// `BuiltModel` the same one.
    pub fn session(
        &self,
        env: &ort::environment::Environment,
        options: &SessionOptions,
    ) -> Result<Session, ort::Error> {
        let e = |e: ort::Error<ort::session::builder::SessionBuilder>| -> ort::Error { e.into() };
        let mut builder = Session::builder(env)?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(e)?
            .with_intra_threads(options.intra_op_threads)
            .map_err(e)?
            .with_external_initializer_file_in_memory(builder::WEIGHTS_FILE, self.weights.data.clone())
            .map_err(e)?;
        // ONNX Runtime adds a custom operator domain to a process-wide
        // registry while it builds a session, and two sessions built at once
        // with the same domain can collide ("the domain is already exist"):
        // sessions with our kernels are built one at a time.
        let _one_at_a_time = if self.kv.kernel != Kernel::GroupQuery {
            let guard = CUSTOM_OPS.lock().unwrap_or_else(|p| p.into_inner());
            builder = builder.with_operators(attention::domain()?).map_err(e)?;
            Some(guard)
        } else {
            None
        };
        // ONNX Runtime's per-operator profile (a Chrome trace JSON named
        // from this prefix), for finding where a step's time goes.
        if let Some(prefix) = std::env::var_os("BATCHGEN_ORT_PROFILE") {
            builder = builder.with_profiling(prefix).map_err(e)?;
        }
        builder.commit_from_memory(&self.graph)
    }
}

/// One row of a run: `tokens` new tokens on top of `past` cached ones.
#[derive(Debug, Clone, Copy)]
pub struct RowInput<'a> {
    pub tokens: &'a [u32],
    pub past: usize,
    /// How many of its last tokens' logits are wanted (1 to sample the next
    /// token, 0 for none, all of them to score a text).
    pub logits: usize,
}

/// A session of the built graph (shared with the other workers) and the
/// slot cache it runs over (this worker's own).
pub struct BuiltModel {
    session: Arc<Session>,
    pub cache: SlotCache,
    pub vocab: usize,
    kernel: Kernel,
}

impl BuiltModel {
    /// `kv` must be the layout the session's graph was built with.
    pub fn new(
        session: impl Into<Arc<Session>>,
        shape: &Gpt2Shape,
        kv: KvLayout,
        slots: usize,
    ) -> std::io::Result<Self> {
        let cache = SlotCache::new(CacheShape {
            layers: shape.layers,
            slots,
            heads: shape.heads,
            max_len: shape.positions,
            head_dim: shape.head_dim(),
            dtype: kv.dtype,
        })?;
        Ok(BuiltModel { session: session.into(), cache, vocab: shape.vocab, kernel: kv.kernel })
    }

    /// Whether a run may hold rows of several tokens on a cached past beside
    /// other rows (our kernel; GroupQueryAttention runs such a row alone).
    pub fn mixes_chunks(&self) -> bool {
        self.kernel == Kernel::Slot
    }

    /// Runs `rows` (one per slot of `slots`) and returns the logits they
    /// want, row after row, in order.
    ///
    /// Rows with one new token each (decode) may be at any lengths. Rows
    /// with several new tokens must either all start from an empty cache
    /// (their prompts, right-padded to the longest inside the run) or be a
    /// single row: GroupQueryAttention runs a chunk on top of a cached past
    /// for one row only.
    // unsafe: taking the run's logits (`Outputs::into_logits`).
    #[allow(unsafe_code)]
    pub fn run(&mut self, slots: Range<usize>, rows: &[RowInput<'_>]) -> Result<Logits, ForwardError> {
        let b = rows.len();
        let s = rows.iter().map(|r| r.tokens.len()).max().unwrap_or(0);
        let c = self.cache.shape;
        let bad = |why: String| Err(ForwardError::Input(why));
        if b == 0 || s == 0 || slots.len() != b || slots.end > c.slots {
            return bad(format!("{b} rows of up to {s} tokens for slots {slots:?} of {}", c.slots));
        }
        if rows.iter().any(|r| r.tokens.is_empty() || r.past + s > c.max_len || r.logits > r.tokens.len()) {
            return bad(format!(
                "every row needs new tokens, within {} positions, and logits of those only",
                c.max_len
            ));
        }
        if self.kernel == Kernel::GroupQuery && b > 1 && s > 1 && rows.iter().any(|r| r.past > 0) {
            return bad("a chunk on a cached past runs one row at a time".into());
        }
        let (mut binding, outputs) = bind_rows(&self.session, rows, self.kernel, self.vocab)?;
        match self.cache.shape.dtype {
            KvDtype::Fp32 => self.run_over_cache::<f32>(&mut binding, &slots)?,
            KvDtype::Fp16 => self.run_over_cache::<half::f16>(&mut binding, &slots)?,
        }
        drop(binding);
        let wanted: usize = rows.iter().map(|r| r.logits).sum();
        // SAFETY: the run succeeded (its error returned above).
        Ok(unsafe { outputs.into_logits(wanted) })
    }
}

/// A session of the paged graph (shared with the other workers) and the
/// block pool it runs over (this worker's own).
pub struct PagedModel {
    session: Arc<Session>,
    pub pool: BlockPool,
    pub vocab: usize,
    /// The model's context length.
    pub max_len: usize,
}

impl PagedModel {
    /// Runs `rows`, row `r` over the pool blocks `tables[r]` (block `j`
    /// holding its positions `j × block..`; they must cover `past` plus its
    /// new tokens, and the blocks it writes must be its own), and returns
    /// the logits they want, row after row, in order. Rows may mix lengths
    /// and pasts freely (shorter ones are right-padded to the longest).
    // unsafe: tensor views over the pool's mapping.
    #[allow(unsafe_code)]
    pub fn run(&mut self, rows: &[RowInput<'_>], tables: &[&[u32]]) -> Result<Logits, ForwardError> {
        let b = rows.len();
        let s = rows.iter().map(|r| r.tokens.len()).max().unwrap_or(0);
        let p = self.pool.shape;
        let bad = |why: String| Err(ForwardError::Input(why));
        if b == 0 || s == 0 || tables.len() != b {
            return bad(format!("{b} rows of up to {s} tokens with {} block tables", tables.len()));
        }
        for (row, table) in rows.iter().zip(tables) {
            let end = row.past + row.tokens.len();
            if row.tokens.is_empty() || end > self.max_len || row.logits > row.tokens.len() {
                return bad(format!(
                    "every row needs new tokens, within {} positions, and logits of those only",
                    self.max_len
                ));
            }
            if table.len() * p.block < end || table.iter().any(|&id| id as usize >= p.blocks) {
                return bad(format!("a block table of {} blocks for {end} positions", table.len()));
            }
        }
        let (mut binding, outputs) = bind_rows(&self.session, rows, Kernel::Paged, self.vocab)?;
        let width = tables.iter().map(|t| t.len()).max().unwrap_or(0).max(1);
        let mut flat = vec![0i32; b * width];
        for (r, table) in tables.iter().enumerate() {
            for (j, &id) in table.iter().enumerate() {
                flat[r * width + j] = id as i32;
            }
        }
        let table = Tensor::from_array(([b, width], flat)).map_err(run_err)?;
        binding.bind_input("block_table", &table).map_err(run_err)?;
        match p.dtype {
            KvDtype::Fp32 => self.run_over_pool::<f32>(&mut binding)?,
            KvDtype::Fp16 => self.run_over_pool::<half::f16>(&mut binding)?,
        }
        drop(binding);
        let wanted: usize = rows.iter().map(|r| r.logits).sum();
        // SAFETY: the run succeeded (its error returned above).
        Ok(unsafe { outputs.into_logits(wanted) })
    }

    #[allow(unsafe_code)]
    fn run_over_pool<T: ort::value::PrimitiveTensorElementType + std::fmt::Debug + 'static>(
        &mut self,
        binding: &mut ort::session::IoBinding,
    ) -> Result<(), ForwardError> {
        let p = self.pool.shape;
        let shape = Shape::new([p.blocks as i64, p.heads as i64, p.block as i64, p.head_dim as i64]);
        let info = MemoryInfo::default();
        let view = |ptr: *mut u8| {
            // SAFETY: the pointer addresses a whole layer pool of a live
            // mapping owned by `self.pool`, which outlives the run.
            unsafe { TensorRefMut::<T>::from_raw(info.clone(), ptr.cast(), shape.clone()) }.map_err(run_err)
        };
        let mut views = Vec::with_capacity(2 * p.layers);
        for layer in 0..p.layers {
            let (k, v) = self.pool.views(layer);
            let (pk, pv) = builder::past_names(layer);
            let (ik, iv) = (view(k)?, view(v)?);
            bind_view(binding, &pk, &ik)?;
            bind_view(binding, &pv, &iv)?;
            views.extend([ik, iv]);
        }
        run_shared(&self.session, binding)?;
        drop(views);
        Ok(())
    }
}

/// Binds what every run of the built graph takes, from its rows: ids,
/// positions, the positions whose logits are wanted, each row's length (and
/// for our kernels what it held before), and the logits output, which lands
/// in the returned buffer of ours (no copy out of ONNX Runtime's).
// unsafe: a tensor view over the logits buffer.
#[allow(unsafe_code)]
fn bind_rows(
    session: &Session,
    rows: &[RowInput<'_>],
    kernel: Kernel,
    vocab: usize,
) -> Result<(ort::session::IoBinding, Outputs), ForwardError> {
    let b = rows.len();
    let s = rows.iter().map(|r| r.tokens.len()).max().unwrap_or(0);
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
        picked.extend((n - row.logits..n).map(|j| (r * s + j) as i64));
    }
    if picked.is_empty() {
        // The LM head needs one row; its result is dropped.
        picked.push(0);
    }
    let total = rows.iter().map(|r| r.past + s).max().unwrap_or(0) as i32;
    let mut binding = session.create_binding().map_err(run_err)?;
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
    if kernel != Kernel::GroupQuery {
        let pasts: Vec<i32> = rows.iter().map(|r| r.past as i32).collect();
        binding.bind_input("past_lens", &Tensor::from_array(([b], pasts)).map_err(run_err)?).map_err(run_err)?;
    }
    // The logits land in a buffer of ours: no copy out of ONNX Runtime's.
    // Not zeroed (6.4 MB at 32 rows, a memset every step): the run writes
    // every element before anyone reads one (`Outputs::into_logits`).
    let mut logits = Vec::<f32>::with_capacity(n_picked * vocab);
    // SAFETY: each buffer bound here has room for its output's elements,
    // outlives the run (it goes back in `Outputs`) and is not resized before
    // it (moving a Vec does not move its buffer).
    unsafe {
        bind_buffer::<f32>(&mut binding, "logits", logits.spare_capacity_mut().as_mut_ptr().cast(), &[n_picked, vocab])
    }?;
    // Our kernels' graphs choose each row's greedy token too (`greedy`).
    let greedy = if kernel != Kernel::GroupQuery {
        let (mut ids, mut lse) = (vec![0i32; n_picked], vec![0f64; n_picked]);
        // SAFETY: as above.
        unsafe { bind_buffer(&mut binding, greedy::IDS, ids.as_mut_ptr(), &[n_picked]) }?;
        // SAFETY: as above.
        unsafe { bind_buffer(&mut binding, greedy::LSE, lse.as_mut_ptr(), &[n_picked]) }?;
        Some((ids, lse))
    } else {
        None
    };
    Ok((binding, Outputs { logits, rows: n_picked, vocab, greedy }))
}

/// Binds output `name` to the buffer at `data` (`dims` elements).
///
/// # Safety
/// `data` addresses that many elements, kept alive and in place until the
/// run the binding serves is over.
#[allow(unsafe_code)]
unsafe fn bind_buffer<T: ort::value::PrimitiveTensorElementType + std::fmt::Debug + 'static>(
    binding: &mut ort::session::IoBinding,
    name: &str,
    data: *mut T,
    dims: &[usize],
) -> Result<(), ForwardError> {
    let shape = Shape::new(dims.iter().map(|&d| d as i64));
    // SAFETY: as the caller promises.
    let view = unsafe { TensorRefMut::<T>::from_raw(MemoryInfo::default(), data.cast(), shape) }.map_err(run_err)?;
    binding.bind_output(name, view).map_err(run_err)
}

/// The buffers a run's outputs land in.
struct Outputs {
    /// Room for `rows × vocab` logits, written by the run.
    logits: Vec<f32>,
    rows: usize,
    vocab: usize,
    /// Room for each row's greedy id and log-sum-exp, where the graph has them.
    greedy: Option<(Vec<i32>, Vec<f64>)>,
}

impl Outputs {
    /// The first `wanted` rows' logits and greedy choices.
    ///
    /// # Safety
    /// Only after the run these buffers were bound to succeeded: it wrote
    /// every element of the logits output.
    #[allow(unsafe_code)]
    unsafe fn into_logits(mut self, wanted: usize) -> Logits {
        // SAFETY: the run wrote all `rows × vocab` floats (the caller's promise).
        unsafe { self.logits.set_len(self.rows * self.vocab) };
        self.logits.truncate(wanted * self.vocab);
        let greedy = self.greedy.map_or_else(Vec::new, |(ids, lse)| {
            ids.iter().zip(&lse).take(wanted).map(|(&id, &lse)| crate::run::Greedy { id: id as u32, lse }).collect()
        });
        Logits { vocab: self.vocab, data: self.logits, greedy }
    }
}

impl BuiltModel {
    /// Binds views of `slots` of the cache (elements `T`) and runs. With
    /// GroupQueryAttention each view is bound as both past and present; our
    /// kernel writes into the past it is given.
    #[allow(unsafe_code)]
    fn run_over_cache<T: ort::value::PrimitiveTensorElementType + std::fmt::Debug + 'static>(
        &mut self,
        binding: &mut ort::session::IoBinding,
        slots: &Range<usize>,
    ) -> Result<(), ForwardError> {
        let c = self.cache.shape;
        let shape = Shape::new([slots.len() as i64, c.heads as i64, c.max_len as i64, c.head_dim as i64]);
        let info = MemoryInfo::default();
        let present = self.kernel == Kernel::GroupQuery;
        let view = |ptr: *mut u8| {
            // SAFETY: the pointer addresses `slots.len()` whole slots of a
            // live mapping owned by `self.cache`, which outlives the run.
            unsafe { TensorRefMut::<T>::from_raw(info.clone(), ptr.cast(), shape.clone()) }.map_err(run_err)
        };
        let mut views = Vec::with_capacity(4 * c.layers);
        for layer in 0..c.layers {
            let (k, v) = self.cache.views(layer, slots);
            let ((pk, pv), (ok, ov)) = (builder::past_names(layer), builder::present_names(layer));
            let (ik, iv) = (view(k)?, view(v)?);
            bind_view(binding, &pk, &ik)?;
            bind_view(binding, &pv, &iv)?;
            views.extend([ik, iv]);
            if present {
                binding.bind_output(ok, view(k)?).map_err(run_err)?;
                binding.bind_output(ov, view(v)?).map_err(run_err)?;
            }
        }
        run_shared(&self.session, binding)?;
        drop(views);
        Ok(())
    }
}

/// Runs `binding` on a session other workers may be running at the same
/// time. ONNX Runtime allows concurrent runs of one session; `ort` asks for
/// `&mut Session` because a binding's outputs are collected into it, and
/// every output here is bound to memory of ours, so nothing is collected.
// unsafe: ORT's C API (RunWithBinding), which `ort` does not wrap for a shared session.
#[allow(unsafe_code)]
fn run_shared(session: &Session, binding: &ort::session::IoBinding) -> Result<(), ForwardError> {
    use ort::AsPointer;
    // SAFETY: both are live ORT objects; a null run options pointer means
    // the defaults; the binding is this thread's own.
    let status = unsafe { (ort::api().RunWithBinding)(session.ptr().cast_mut(), std::ptr::null(), binding.ptr()) };
    check(status, "run")
}

/// Turns a raw ORT status into a result, releasing it.
#[allow(unsafe_code)]
fn check(status: ort::sys::OrtStatusPtr, what: &str) -> Result<(), ForwardError> {
    if status.0.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null status carries a message and is ours to release.
    let message = unsafe {
        let text = std::ffi::CStr::from_ptr((ort::api().GetErrorMessage)(status.0)).to_string_lossy().into_owned();
        (ort::api().ReleaseStatus)(status.0);
        text
    };
    Err(ForwardError::Run(format!("{what}: {message}")))
}

/// Binds a view of the cache as an input without copying it. (`ort`'s
/// `IoBinding::bind_input` deep-copies any tensor it does not own, which
/// would copy the whole cache on every step.) The caller keeps `view` alive
/// until the run is over.
#[allow(unsafe_code)]
fn bind_view<T: ort::value::PrimitiveTensorElementType + std::fmt::Debug>(
    binding: &mut ort::session::IoBinding,
    name: &str,
    view: &TensorRefMut<'_, T>,
) -> Result<(), ForwardError> {
    use ort::AsPointer;
    let name = std::ffi::CString::new(name).map_err(run_err)?;
    // SAFETY: both pointers are live ORT objects; ORT does not keep `name`.
    let status = unsafe { (ort::api().BindInput)(binding.ptr_mut(), name.as_ptr(), view.ptr()) };
    check(status, &format!("binding {name:?}"))
}
