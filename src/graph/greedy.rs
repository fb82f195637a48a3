//! `batchgen.Greedy`: each logits row's greedy token and its log-sum-exp,
//! computed inside the run by ONNX Runtime's threads right after the LM head
//! wrote the row, so that a plain greedy row costs the engine thread nothing
//! (`decoding::sampling::greedy` over 50,257 logits is ≈ 57 µs a row on one
//! core: 1.8 ms of a 32-row step, with the second core idle).
//!
//! The values are those of `sampling::greedy(row, &[], 0)` bit for bit: the
//! same functions compute them (`argmax_unmasked`, `log_sum_exp_from`).
// unsafe: tasks write their own elements of the outputs through raw pointers.
#![allow(unsafe_code)]
use ort::operator::{BoxedKernel, ComputeContext, KernelContext, Operator, OperatorInput, OperatorOutput};
use ort::value::TensorElementType;

use crate::decoding::sampling::{argmax_unmasked, log_sum_exp_from};

pub const OP: &str = "Greedy";
/// The graph's outputs of the op: `[picked]` int32 ids and float64 log-sum-exps.
pub const IDS: &str = "greedy_ids";
pub const LSE: &str = "greedy_lse";

#[derive(Default)]
pub struct GreedyOp;

impl Operator for GreedyOp {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        OP
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [OperatorInput::required(TensorElementType::Float32)]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Int32), OperatorOutput::required(TensorElementType::Float64)]
    }

    fn create_kernel<'attr>(&self, _: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        Ok(Box::new(compute))
    }
}

#[derive(Clone, Copy)]
struct Out {
    ids: *mut i32,
    lse: *mut f64,
}

// SAFETY: the pointers stay valid for the run, and each task writes its own row.
unsafe impl Send for Out {}
// SAFETY: as for Send.
unsafe impl Sync for Out {}

fn compute(ctx: &ComputeContext) -> ort::Result<()> {
    let logits = ctx.input(0)?.ok_or_else(|| ort::Error::new("Greedy: no logits"))?;
    let (shape, data) = logits.try_extract_tensor::<f32>()?;
    let [rows, vocab] = shape[..] else {
        return Err(ort::Error::new(format!("Greedy: logits are {shape:?}, not [rows, vocab]")));
    };
    let (rows, vocab) = (rows as usize, vocab as usize);
    if vocab == 0 {
        return Err(ort::Error::new("Greedy: an empty vocabulary"));
    }
    let mut ids = ctx.output(0, vec![rows as i64])?.ok_or_else(|| ort::Error::new("Greedy: no ids output"))?;
    let mut lse = ctx.output(1, vec![rows as i64])?.ok_or_else(|| ort::Error::new("Greedy: no lse output"))?;
    let out = Out {
        ids: ids.try_extract_tensor_mut::<i32>()?.1.as_mut_ptr(),
        lse: lse.try_extract_tensor_mut::<f64>()?.1.as_mut_ptr(),
    };
    ctx.par_for(rows, rows, |r| {
        let (id, value) = choose(&data[r * vocab..(r + 1) * vocab]);
        // SAFETY: both outputs hold `rows` elements and task r writes element r only.
        unsafe { out.write(r, id, value) };
    })
}

/// A row's argmax and log-sum-exp; on a CPU with AVX2 and FMA through a copy
/// compiled for them (the same operations in the same order: the same bits).
fn choose(row: &[f32]) -> (u32, f64) {
    #[cfg(target_arch = "x86_64")]
    if crate::decoding::math::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { choose_avx2(row) };
    }
    choose_with(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn choose_avx2(row: &[f32]) -> (u32, f64) {
    choose_with(row)
}

#[inline(always)]
fn choose_with(row: &[f32]) -> (u32, f64) {
    let id = argmax_unmasked(row, &[]);
    (id, log_sum_exp_from(row, row[id as usize]))
}

impl Out {
    /// # Safety
    /// `r` is below the outputs' length, and no other task writes element `r`.
    unsafe fn write(&self, r: usize, id: u32, lse: f64) {
        // SAFETY: as the caller promises.
        unsafe {
            *self.ids.add(r) = id as i32;
            *self.lse.add(r) = lse;
        }
    }
}
