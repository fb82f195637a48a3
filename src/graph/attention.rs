//! `batchgen.SlotAttention`: batchgen's own attention kernel over the slot
//! cache, registered with ONNX Runtime as a custom operator. It exists for
//! the float16 KV cache (`--kv-dtype fp16`): ONNX Runtime's CPU
//! GroupQueryAttention reads a float16 cache more slowly than a float32 one
//! (docs/serving.md, "KV cache precision: float16"), while a decode step is bound by reading
//! the cache, so halving its bytes should halve that part of the step. Its
//! paged variant, `batchgen.PagedAttention` (`paged`), reads the default
//! cache layout (`--kv-layout paged`) at either element type.
//!
//! Inputs: `qkv [B, S, 3E]` float32 (GPT-2's packed projection: queries,
//! keys, values, each `heads × head_dim`), `past_key`/`past_value
//! [B, heads, MAX, head_dim]` (float16 or float32: one operator per element
//! type), `seqlens_k [B]` int32 (each row's total length minus one, as for
//! GroupQueryAttention) and `past_lens [B]` int32 (what each row's cache held
//! before this run). Row `b` has `n = seqlens_k + 1 - past_lens` real new
//! tokens (at most S; the rest is right padding). Output: `[B, S, E]`
//! float32, zero on padding.
//!
//! The kernel writes each new key and value into the cache at its position
//! (the cache is bound by the engine from its own memory, so the write lands
//! in place, as GroupQueryAttention's shared past/present buffer does) and
//! then attends causally: new token `t` sees positions `0..=past + t`.
//! Scores, softmax and the weighted sum are float32; only the stored keys and
//! values are rounded to the cache's type. One task per (row, head), run on
//! ONNX Runtime's intra-op threads.
// unsafe: SIMD intrinsics, and writes into the cache through the pointer
// ONNX Runtime hands out for the bound input.
#![allow(unsafe_code)]
use std::cell::RefCell;
use std::marker::PhantomData;

use half::f16;
use ort::operator::{
    BoxedKernel, ComputeContext, KernelContext, Operator, OperatorDomain, OperatorInput, OperatorOutput,
};
use ort::value::TensorElementType;

pub const DOMAIN: &str = "batchgen";
pub const OP: &str = "SlotAttention";
/// The paged variant (`PagedAttention`): the cache is a pool of blocks and
/// each row reads and writes its positions through a block table.
pub const PAGED_OP: &str = "PagedAttention";

/// Returns the 64-wide SIMD kernel's result, float16 or float32 keys by
/// `$half`, when `$d` is 64 and the CPU has one of the listed ISAs.
macro_rules! wide64 {
    ($half:expr, $d:expr, $($isa:ident => $f:ident),+; $args:tt) => {
        #[cfg(target_arch = "x86_64")]
        if $d == 64 {
            $(if *ISA == Isa::$isa {
                // SAFETY: the CPU has the ISA's features (checked at run
                // time) and the caller's pointers address its keys or values
                // of 64 elements, as the method's contract says.
                return unsafe { if $half { simd::$f::<true> $args } else { simd::$f::<false> $args } };
            })+
        }
    };
}

/// An element type the cache may hold.
pub trait CacheElem: ort::value::PrimitiveTensorElementType + std::fmt::Debug + Copy + Send + Sync + 'static {
    const TYPE: TensorElementType;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    /// `q · k` over `q.len()` elements.
    ///
    /// # Safety
    /// `k` addresses `q.len()` elements (and so for every pointer below:
    /// the elements the operation reads).
    unsafe fn dot(q: &[f32], k: *const Self) -> f32;
    /// `acc += p × v` over `acc.len()` elements.
    ///
    /// # Safety
    /// `v` addresses `acc.len()` elements.
    unsafe fn axpy(acc: &mut [f32], p: f32, v: *const Self);
    /// Whether the cache holds float16.
    const HALF: bool;

    /// `scores[j] = scale × q · k_j` for consecutive keys of `q.len()`
    /// elements at `k`; returns the largest score.
    ///
    /// # Safety
    /// `k` addresses `scores.len() × q.len()` elements.
    unsafe fn scores(q: &[f32], k: *const Self, scale: f32, scores: &mut [f32]) -> f32 {
        wide64!(Self::HALF, q.len(), Avx512 => scores64, Avx2 => scores64_256; (q, k.cast(), scale, scores));
        let mut max = f32::NEG_INFINITY;
        for (j, score) in scores.iter_mut().enumerate() {
            // SAFETY: key j lies inside the keys `k` addresses.
            *score = unsafe { Self::dot(q, k.add(j * q.len())) } * scale;
            max = max.max(*score);
        }
        max
    }

    /// `scores` for two queries over the same keys (`sa`, `sb` of one
    /// length); returns both maxima.
    ///
    /// # Safety
    /// As `scores`.
    unsafe fn scores2(
        qa: &[f32],
        qb: &[f32],
        k: *const Self,
        scale: f32,
        sa: &mut [f32],
        sb: &mut [f32],
    ) -> (f32, f32) {
        wide64!(Self::HALF, qa.len(), Avx512 => scores64x2; (qa, qb, k.cast(), scale, sa, sb));
        // SAFETY: as the caller's.
        unsafe { (Self::scores(qa, k, scale, sa), Self::scores(qb, k, scale, sb)) }
    }

    /// `weighted` for two sets of weights over the same values.
    ///
    /// # Safety
    /// As `weighted`.
    unsafe fn weighted2(pa: &[f32], pb: &[f32], v: *const Self, oa: &mut [f32], ob: &mut [f32]) {
        wide64!(Self::HALF, oa.len(), Avx512 => weighted64x2; (pa, pb, v.cast(), oa, ob));
        // SAFETY: as the caller's.
        unsafe {
            Self::weighted(pa, v, oa);
            Self::weighted(pb, v, ob);
        }
    }

    /// `out = Σ_j p[j] × v_j` for consecutive values of `out.len()`
    /// elements at `v`.
    ///
    /// # Safety
    /// `v` addresses `p.len() × out.len()` elements.
    unsafe fn weighted(p: &[f32], v: *const Self, out: &mut [f32]) {
        wide64!(Self::HALF, out.len(), Avx512 => weighted64, Avx2 => weighted64_256; (p, v.cast(), out));
        out.fill(0.0);
        for (j, &w) in p.iter().enumerate() {
            // SAFETY: value j lies inside the values `v` addresses.
            unsafe { Self::axpy(out, w, v.add(j * out.len())) };
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Isa {
    Avx512,
    Avx2,
    Scalar,
}

fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return Isa::Avx2;
        }
    }
    Isa::Scalar
}

static ISA: std::sync::LazyLock<Isa> = std::sync::LazyLock::new(isa);

#[cfg(target_arch = "x86_64")]
mod simd;

mod paged;
pub use paged::PagedAttention;

/// The SIMD path when the CPU has one and `d` fits it, else `scalar`.
macro_rules! dispatch {
    ($f16:expr, $d:expr, $simd512:ident, $simd256:ident, ($($arg:expr),*), $scalar:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            match *ISA {
                // SAFETY: the CPU has the features (checked at run time) and
                // the pointers address `d` elements.
                Isa::Avx512 if $d % 32 == 0 => return unsafe { simd::$simd512::<{ $f16 }>($($arg),*) },
                // SAFETY: as above.
                Isa::Avx2 | Isa::Avx512 if $d % 16 == 0 => return unsafe { simd::$simd256::<{ $f16 }>($($arg),*) },
                _ => {}
            }
        }
        $scalar
    }};
}

impl CacheElem for f32 {
    const TYPE: TensorElementType = TensorElementType::Float32;
    const HALF: bool = false;
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
    unsafe fn dot(q: &[f32], k: *const Self) -> f32 {
        dispatch!(false, q.len(), dot512, dot256, (q, k.cast()), {
            // SAFETY: `k` addresses `q.len()` floats.
            let k = unsafe { std::slice::from_raw_parts(k, q.len()) };
            q.iter().zip(k).map(|(a, b)| a * b).sum()
        })
    }
    unsafe fn axpy(acc: &mut [f32], p: f32, v: *const Self) {
        dispatch!(false, acc.len(), axpy512, axpy256, (acc, p, v.cast()), {
            // SAFETY: `v` addresses `acc.len()` floats.
            let v = unsafe { std::slice::from_raw_parts(v, acc.len()) };
            acc.iter_mut().zip(v).for_each(|(a, b)| *a += p * b)
        })
    }
}

impl CacheElem for f16 {
    const TYPE: TensorElementType = TensorElementType::Float16;
    const HALF: bool = true;
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    unsafe fn dot(q: &[f32], k: *const Self) -> f32 {
        dispatch!(true, q.len(), dot512, dot256, (q, k.cast()), {
            // SAFETY: `k` addresses `q.len()` halves.
            let k = unsafe { std::slice::from_raw_parts(k, q.len()) };
            q.iter().zip(k).map(|(a, b)| a * b.to_f32()).sum()
        })
    }
    unsafe fn axpy(acc: &mut [f32], p: f32, v: *const Self) {
        dispatch!(true, acc.len(), axpy512, axpy256, (acc, p, v.cast()), {
            // SAFETY: `v` addresses `acc.len()` halves.
            let v = unsafe { std::slice::from_raw_parts(v, acc.len()) };
            acc.iter_mut().zip(v).for_each(|(a, b)| *a += p * b.to_f32())
        })
    }
}

/// The operator for caches of element type `E`.
pub struct SlotAttention<E>(PhantomData<E>);

impl<E> Default for SlotAttention<E> {
    fn default() -> Self {
        SlotAttention(PhantomData)
    }
}

/// The domain with both element types, for a session builder.
pub fn domain() -> ort::Result<OperatorDomain> {
    OperatorDomain::new(DOMAIN)?
        .add(SlotAttention::<f32>::default())?
        .add(SlotAttention::<f16>::default())?
        .add(PagedAttention::<f32>::default())?
        .add(PagedAttention::<f16>::default())?
        .add(super::greedy::GreedyOp)
}

impl<E: CacheElem> Operator for SlotAttention<E> {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        OP
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::required(E::TYPE),
            OperatorInput::required(E::TYPE),
            OperatorInput::required(TensorElementType::Int32),
            OperatorInput::required(TensorElementType::Int32),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, kctx: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        let heads = kctx.get::<i64>("num_heads").ok_or_else(|| ort::Error::new("SlotAttention needs num_heads"))?;
        let scale = kctx.get::<f32>("scale").ok_or_else(|| ort::Error::new("SlotAttention needs scale"))?;
        let heads = usize::try_from(heads).map_err(|_| ort::Error::new("num_heads must be positive"))?;
        Ok(Box::new(move |ctx: &ComputeContext| compute::<E>(ctx, heads, scale)))
    }
}

/// Raw pointers shared by the tasks of one run; each task touches only its
/// own (row, head).
#[derive(Clone, Copy)]
struct Run<E> {
    qkv: *const f32,
    key: *mut E,
    value: *mut E,
    out: *mut f32,
    seq: usize,
    heads: usize,
    max_len: usize,
    head_dim: usize,
    scale: f32,
}

// SAFETY: the pointers stay valid for the run, and tasks write disjoint parts.
unsafe impl<E> Send for Run<E> {}
// SAFETY: as for Send.
unsafe impl<E> Sync for Run<E> {}

fn bad(why: String) -> ort::Error {
    ort::Error::new(format!("SlotAttention: {why}"))
}

fn mutable_data(value: &ort::value::ValueRef<'_>) -> ort::Result<*mut std::ffi::c_void> {
    use ort::AsPointer;
    let mut data = std::ptr::null_mut();
    // SAFETY: a live tensor value; ORT returns its buffer (the engine's cache).
    let status = unsafe { (ort::api().GetTensorMutableData)(value.ptr().cast_mut(), &mut data) };
    if !status.0.is_null() {
        // SAFETY: a non-null status is ours to release.
        unsafe { (ort::api().ReleaseStatus)(status.0) };
        return Err(bad("the cache has no data".into()));
    }
    Ok(data)
}

fn compute<E: CacheElem>(ctx: &ComputeContext, heads: usize, scale: f32) -> ort::Result<()> {
    let input = |i: usize| ctx.input(i)?.ok_or_else(|| bad(format!("input {i} is missing")));
    let (qkv, key, value, seqlens, past) = (input(0)?, input(1)?, input(2)?, input(3)?, input(4)?);
    let (qshape, q) = qkv.try_extract_tensor::<f32>()?;
    let (kshape, _) = key.try_extract_tensor::<E>()?;
    let (vshape, _) = value.try_extract_tensor::<E>()?;
    let (_, seqlens) = seqlens.try_extract_tensor::<i32>()?;
    let (_, past) = past.try_extract_tensor::<i32>()?;
    let dims = |s: &ort::value::Shape| s.iter().map(|&d| d as usize).collect::<Vec<_>>();
    let (qd, kd) = (dims(qshape), dims(kshape));
    let [b, s, e3] = qd[..] else { return Err(bad(format!("qkv is {qd:?}, not [B, S, 3E]"))) };
    let [kb, kh, max_len, head_dim] = kd[..] else { return Err(bad(format!("past_key is {kd:?}"))) };
    if kb != b || kh != heads || e3 != 3 * heads * head_dim || dims(vshape) != kd {
        return Err(bad(format!("qkv {qd:?} does not match past_key {kd:?} with {heads} heads")));
    }
    if seqlens.len() != b || past.len() != b {
        return Err(bad(format!("{} seqlens and {} past lengths for {b} rows", seqlens.len(), past.len())));
    }
    for r in 0..b {
        let (total, p) = (seqlens[r] as i64 + 1, past[r] as i64);
        if p < 0 || total <= p || total - p > s as i64 || total > max_len as i64 {
            return Err(bad(format!(
                "row {r}: length {total} over a past of {p}, {s} new positions, {max_len} at most"
            )));
        }
    }
    let e = heads * head_dim;
    let mut out = ctx.output(0, vec![b as i64, s as i64, e as i64])?.ok_or_else(|| bad("no output".into()))?;
    let (_, out) = out.try_extract_tensor_mut::<f32>()?;
    let run = Run::<E> {
        qkv: q.as_ptr(),
        key: mutable_data(&key)?.cast(),
        value: mutable_data(&value)?.cast(),
        out: out.as_mut_ptr(),
        seq: s,
        heads,
        max_len,
        head_dim,
        scale,
    };
    let rows: Vec<(usize, usize)> = (0..b).map(|r| (past[r] as usize, (seqlens[r] + 1 - past[r]) as usize)).collect();
    let tasks = b * heads;
    ctx.par_for(tasks, tasks, |task| {
        let (r, h) = (task / heads, task % heads);
        let (past, n) = rows[r];
        // SAFETY: shapes were checked above; the task owns row r, head h.
        unsafe { attend(run, r, h, past, n) };
    })
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// One (row, head): stores the row's new keys and values, then attends.
///
/// # Safety
/// `run`'s pointers address tensors of the checked shapes, `past + n <=
/// max_len`, `n <= seq`, and no other thread touches this (row, head).
unsafe fn attend<E: CacheElem>(run: Run<E>, r: usize, h: usize, past: usize, n: usize) {
    let (s, d, e) = (run.seq, run.head_dim, run.heads * run.head_dim);
    let cache = ((r * run.heads + h) * run.max_len) * d;
    let token = |t: usize| (r * s + t) * 3 * e + h * d;
    // SAFETY: every offset below is inside the shapes the caller checked.
    unsafe {
        for t in 0..n {
            let at = cache + (past + t) * d;
            let (k, v) = (run.qkv.add(token(t) + e), run.qkv.add(token(t) + 2 * e));
            for i in 0..d {
                *run.key.add(at + i) = E::from_f32(*k.add(i));
                *run.value.add(at + i) = E::from_f32(*v.add(i));
            }
        }
        SCORES.with_borrow_mut(|scores| {
            scores.resize(past + n, 0.0);
            for t in 0..n {
                let q = std::slice::from_raw_parts(run.qkv.add(token(t)), d);
                let len = past + t + 1;
                let max = E::scores(q, run.key.add(cache), run.scale, &mut scores[..len]);
                normalize(&mut scores[..len], max);
                let out = std::slice::from_raw_parts_mut(run.out.add((r * s + t) * e + h * d), d);
                E::weighted(&scores[..len], run.value.add(cache), out);
            }
        });
        for t in n..s {
            std::slice::from_raw_parts_mut(run.out.add((r * s + t) * e + h * d), d).fill(0.0);
        }
    }
}

/// Softmax of scores whose largest is `max`, in place.
fn normalize(x: &mut [f32], max: f32) {
    let inv = 1.0 / exp_shifted(x, max);
    x.iter_mut().for_each(|p| *p *= inv);
}

/// `x[i] = exp(x[i] - max)`; returns their sum. Written so that the
/// compiler vectorizes it (a branch-free exp, eight running sums).
fn exp_shifted(x: &mut [f32], max: f32) -> f32 {
    let mut sums = [0.0f32; 8];
    let mut chunks = x.chunks_exact_mut(8);
    for chunk in &mut chunks {
        for (v, sum) in chunk.iter_mut().zip(&mut sums) {
            *v = exp_neg(*v - max);
            *sum += *v;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp_neg(*v - max);
        sum += *v;
    }
    sum
}

/// `exp(x)` for `x <= 0` (Cephes' expf: `x = n ln 2 + r`, a degree-6
/// polynomial in `r`, `2^n` from the exponent bits); relative error about
/// 1e-7, and 0 below -87.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 × 2^23: adding and subtracting it rounds to an integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_neg_matches_exp() {
        let mut worst = 0.0f64;
        for i in 0..=86_900 {
            let x = -(i as f32) * 1e-3;
            let (got, want) = (exp_neg(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_neg(-1000.0), exp_neg(-87.0));
    }

    #[test]
    fn scores_and_weighted_sums_agree_with_plain_loops() {
        let n = 37;
        let q: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let kv: Vec<f32> = (0..64 * n).map(|i| (i as f32 * 0.011).cos()).collect();
        let kh: Vec<f16> = kv.iter().map(|&x| f16::from_f32(x)).collect();
        let p: Vec<f32> = (0..n).map(|j| 1.0 / (j + 1) as f32).collect();
        let plain_scores = |k: &[f32]| -> Vec<f32> {
            (0..n).map(|j| 0.125 * q.iter().zip(&k[j * 64..]).map(|(a, b)| a * b).sum::<f32>()).collect()
        };
        let plain_sum =
            |v: &[f32]| -> Vec<f32> { (0..64).map(|i| (0..n).map(|j| p[j] * v[j * 64 + i]).sum()).collect() };
        let kh32: Vec<f32> = kh.iter().map(|x| x.to_f32()).collect();
        for (got_s, got_w, k) in [
            {
                let mut s = vec![0.0; n];
                let mut w = vec![0.0; 64];
                // SAFETY: kv holds n keys (values) of 64.
                let m = unsafe { f32::scores(&q, kv.as_ptr(), 0.125, &mut s) };
                // SAFETY: as above.
                unsafe { f32::weighted(&p, kv.as_ptr(), &mut w) };
                assert_eq!(m, s.iter().cloned().fold(f32::MIN, f32::max));
                (s, w, &kv)
            },
            {
                let mut s = vec![0.0; n];
                let mut w = vec![0.0; 64];
                // SAFETY: kh holds n keys (values) of 64.
                unsafe { f16::scores(&q, kh.as_ptr(), 0.125, &mut s) };
                // SAFETY: as above.
                unsafe { f16::weighted(&p, kh.as_ptr(), &mut w) };
                (s, w, &kh32)
            },
        ] {
            for (a, b) in got_s.iter().zip(plain_scores(k)) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
            for (a, b) in got_w.iter().zip(plain_sum(k)) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
    }

    /// The AVX2 kernels on any CPU that has AVX2 (an AVX-512 CPU takes the
    /// wider ones through `scores`/`weighted`): 37 keys, four groups of
    /// eight and a tail, float32 and float16, against plain loops.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_scores_and_weighted_sums_agree_with_plain_loops() {
        if !(std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c"))
        {
            return;
        }
        let n = 37;
        let q: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let kv: Vec<f32> = (0..64 * n).map(|i| (i as f32 * 0.011).cos() + (i % 7) as f32 * 0.1).collect();
        let kh: Vec<f16> = kv.iter().map(|&x| f16::from_f32(x)).collect();
        let kh32: Vec<f32> = kh.iter().map(|x| x.to_f32()).collect();
        let p: Vec<f32> = (0..n).map(|j| 1.0 / (j + 1) as f32).collect();
        let check = |k: &[f32], s: &[f32], m: f32, w: &[f32]| {
            for j in 0..n {
                let want = 0.125 * q.iter().zip(&k[j * 64..]).map(|(a, b)| a * b).sum::<f32>();
                assert!((s[j] - want).abs() < 1e-5, "key {j}: {} vs {want}", s[j]);
            }
            assert_eq!(m, s.iter().cloned().fold(f32::MIN, f32::max));
            for i in 0..64 {
                let want: f32 = (0..n).map(|j| p[j] * k[j * 64 + i]).sum();
                assert!((w[i] - want).abs() < 1e-5, "element {i}: {} vs {want}", w[i]);
            }
        };
        let (mut s, mut w) = (vec![0.0; n], vec![1.0; 64]);
        // SAFETY: the CPU has the features (checked above); kv and kh hold n
        // keys (values) of 64.
        unsafe {
            let m = simd::scores64_256::<false>(&q, kv.as_ptr().cast(), 0.125, &mut s);
            simd::weighted64_256::<false>(&p, kv.as_ptr().cast(), &mut w);
            check(&kv, &s, m, &w);
            let m = simd::scores64_256::<true>(&q, kh.as_ptr().cast(), 0.125, &mut s);
            simd::weighted64_256::<true>(&p, kh.as_ptr().cast(), &mut w);
            check(&kh32, &s, m, &w);
        }
    }

    #[test]
    fn pairs_of_queries_score_and_sum_as_single_ones() {
        let n = 37;
        let qa: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let qb: Vec<f32> = (0..64).map(|i| (i as f32 * 0.21).cos()).collect();
        let kv: Vec<f32> = (0..64 * n).map(|i| (i as f32 * 0.011).cos()).collect();
        let (mut sa, mut sb, mut one) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        // SAFETY: kv holds n keys (and values) of 64.
        let (ma, mb) = unsafe { f32::scores2(&qa, &qb, kv.as_ptr(), 0.125, &mut sa, &mut sb) };
        for (q, s, m) in [(&qa, &sa, ma), (&qb, &sb, mb)] {
            // SAFETY: as above.
            let m1 = unsafe { f32::scores(q, kv.as_ptr(), 0.125, &mut one) };
            for (a, b) in s.iter().zip(&one) {
                assert!((a - b).abs() < 1e-6, "{a} vs {b}");
            }
            assert!((m - m1).abs() < 1e-6);
        }
        let (pa, pb): (Vec<f32>, Vec<f32>) = (0..n).map(|j| (1.0 / (j + 1) as f32, (j as f32 * 0.1).sin())).unzip();
        let (mut oa, mut ob, mut o1) = (vec![0.0; 64], vec![0.0; 64], vec![0.0; 64]);
        // SAFETY: as above.
        unsafe { f32::weighted2(&pa, &pb, kv.as_ptr(), &mut oa, &mut ob) };
        for (p, o) in [(&pa, &oa), (&pb, &ob)] {
            // SAFETY: as above.
            unsafe { f32::weighted(p, kv.as_ptr(), &mut o1) };
            for (a, b) in o.iter().zip(&o1) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn dot_and_axpy_agree_with_plain_loops() {
        let q: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let k: Vec<f32> = (0..64).map(|i| (i as f32 * 0.11).cos()).collect();
        let kh: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
        let want: f32 = q.iter().zip(&k).map(|(a, b)| a * b).sum();
        let want_h: f32 = q.iter().zip(&kh).map(|(a, b)| a * b.to_f32()).sum();
        // SAFETY: k and kh hold 64 elements, as q does (and a, ah below).
        let (got, got_h) = unsafe { (f32::dot(&q, k.as_ptr()), f16::dot(&q, kh.as_ptr())) };
        assert!((got - want).abs() < 1e-5);
        assert!((got_h - want_h).abs() < 1e-5);
        let (mut a, mut ah) = (q.clone(), q.clone());
        // SAFETY: as above.
        unsafe {
            f32::axpy(&mut a, 0.5, k.as_ptr());
            f16::axpy(&mut ah, 0.5, kh.as_ptr());
        }
        for i in 0..64 {
            assert!((a[i] - (q[i] + 0.5 * k[i])).abs() < 1e-6);
            assert!((ah[i] - (q[i] + 0.5 * kh[i].to_f32())).abs() < 1e-6);
        }
    }
}
