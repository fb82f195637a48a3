//! int8 weights, made by batchgen at load from the float32 ones.
//!
//! Every large MatMul weight `W [K, N]` (attention QKV and output
//! projections, the MLP's two, and optionally the LM head) becomes int8 with
//! one scale per output column, symmetric (no zero point):
//! `scale[n] = max_k |W[k, n]| / L`, `q[k, n] = round(W[k, n] / scale[n])`.
//! The graph runs them with `com.microsoft.DynamicQuantizeMatMul`, which
//! quantizes the activations per tensor (uint8, asymmetric) at run time and
//! multiplies in integers (VNNI where the CPU has it).
//!
//! `L` is 127 on a CPU with VNNI (AVX-512 VNNI or AVX-VNNI), where
//! `vpdpbusd` adds each uint8 × int8 product into 32 bits. Without VNNI,
//! ONNX Runtime's x86 kernels multiply with `vpmaddubsw`, which adds each
//! pair of products into a *saturating* int16: 255 × 127 × 2 = 64770 clips
//! at 32767 (a CI run, CPU not recorded, measured top-1 agreement with
//! float32 of 0.73 on random GPT-2 weights; 0.95 with VNNI). There `L` is 63 (ONNX Runtime's
//! `reduce_range`): 255 × 63 × 2 = 32130 fits, at one bit less precision. Measured on this
//! machine against `MatMulNBits` (8 bits, blocks of 32 or 128, accuracy
//! level 4): DynamicQuantizeMatMul is faster at every batch (see
//! `docs/performance.md`), so it is the one used.
//!
//! The LM head is tied to the token embedding `wte [V, E]`; its int8 form is
//! a transposed copy `[E, V]` with one scale per vocabulary entry, beside the
//! float32 embedding that the input lookup still reads.
use super::precision::Precision;
pub use super::precision::weight_limit;
use super::weights::{Elem, Gpt2Shape, Slice, Weights};

/// The int8 copy of the LM head (`wte` transposed).
pub const LM_HEAD: &str = "lm_head.weight";

pub fn scale_name(weight: &str) -> String {
    format!("{weight}.scale")
}

/// Whether a checkpoint tensor is a layer's MatMul weight (`[in, out]`).
fn is_matmul(name: &str) -> bool {
    ["attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]
        .iter()
        .any(|s| name.strip_suffix(s).is_some_and(|p| p.starts_with("h.")))
}

/// int8 values in `-limit..=limit` and one scale per column of a row-major
/// `[k, n]` matrix.
pub fn quantize_columns(w: &[f32], k: usize, n: usize, limit: i8) -> (Vec<i8>, Vec<f32>) {
    let l = f32::from(limit);
    assert_eq!(w.len(), k * n);
    let mut max = vec![0f32; n];
    for row in w.chunks_exact(n) {
        for (m, &x) in max.iter_mut().zip(row) {
            *m = m.max(x.abs());
        }
    }
    let scale: Vec<f32> = max.iter().map(|&m| if m > 0.0 { m / l } else { 1.0 }).collect();
    let inv: Vec<f32> = scale.iter().map(|s| 1.0 / s).collect();
    let mut q = Vec::with_capacity(w.len());
    for row in w.chunks_exact(n) {
        q.extend(row.iter().zip(&inv).map(|(&x, &i)| (x * i).round().clamp(-l, l) as i8));
    }
    (q, scale)
}

/// The int8 form of `wᵀ` for a row-major `[rows, cols]` matrix `w` (the
/// LM head from the embedding): `[cols, rows]`, one scale per row of `w`.
/// Works on blocks of rows so that reads stay in cache.
pub fn quantize_transposed(w: &[f32], rows: usize, cols: usize, limit: i8) -> (Vec<i8>, Vec<f32>) {
    assert_eq!(w.len(), rows * cols);
    let l = f32::from(limit);
    let scale: Vec<f32> = w
        .chunks_exact(cols)
        .map(|row| row.iter().fold(0f32, |m, x| m.max(x.abs())))
        .map(|m| if m > 0.0 { m / l } else { 1.0 })
        .collect();
    let inv: Vec<f32> = scale.iter().map(|s| 1.0 / s).collect();
    let mut q = vec![0i8; rows * cols];
    const BLOCK: usize = 64;
    for r0 in (0..rows).step_by(BLOCK) {
        let r1 = (r0 + BLOCK).min(rows);
        for c in 0..cols {
            let out = &mut q[c * rows + r0..c * rows + r1];
            for (j, o) in out.iter_mut().enumerate() {
                let r = r0 + j;
                *o = (w[r * cols + c] * inv[r]).round().clamp(-l, l) as i8;
            }
        }
    }
    (q, scale)
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

impl Weights {
    /// The same weights with the layers' MatMuls (and, for
    /// `Precision::Int8`, the LM head) in int8; at the precision they
    /// already have, the same buffer. `limit`: [`weight_limit`] for this CPU.
    pub fn quantized(&self, shape: &Gpt2Shape, precision: Precision, limit: i8) -> Weights {
        if precision == self.precision {
            return self.clone();
        }
        assert_eq!(self.precision, Precision::Fp32, "weights are quantized from float32 only");
        // What the new buffer holds, in order, and how each is made.
        enum Make {
            Copy(String),
            Int8(String),
            Head,
            /// Written with the int8 entry before it.
            Scale,
        }
        let mut plan: Vec<(String, Vec<usize>, Elem, Make)> = Vec::new();
        for (name, dims) in shape.tensors() {
            if is_matmul(&name) {
                let n = dims[1];
                plan.push((name.clone(), dims, Elem::I8, Make::Int8(name.clone())));
                plan.push((scale_name(&name), vec![n], Elem::F32, Make::Scale));
            } else {
                plan.push((name.clone(), dims, Elem::F32, Make::Copy(name)));
            }
        }
        if precision == Precision::Int8 {
            let (v, e) = (shape.vocab, shape.width);
            plan.push((LM_HEAD.into(), vec![e, v], Elem::I8, Make::Head));
            plan.push((scale_name(LM_HEAD), vec![v], Elem::F32, Make::Scale));
        }
        let mut index = std::collections::HashMap::new();
        let mut offset = 0;
        for (name, dims, elem, _) in &plan {
            let slice = Slice { offset, dims: dims.clone(), elem: *elem };
            offset += slice.bytes().div_ceil(64) * 64;
            index.insert(name.clone(), slice);
        }
        // Each entry gets its own part of the buffer; the int8 ones (with
        // their scales, which follow them) are made on every core.
        let mut data = vec![0u8; offset];
        let src = |name: &str| {
            let s = &self.index[name];
            &self.data[s.offset..s.offset + s.bytes()]
        };
        let mut parts: Vec<&mut [u8]> = Vec::with_capacity(plan.len());
        let mut rest = data.as_mut_slice();
        for (name, ..) in &plan {
            let s = &index[name];
            let (part, tail) = std::mem::take(&mut rest).split_at_mut(s.bytes().div_ceil(64) * 64);
            parts.push(&mut part[..s.bytes()]);
            rest = tail;
        }
        let mut jobs = Vec::new();
        // An int8 entry's scale is the entry after it: taken with it.
        let mut entries = plan.iter().zip(parts);
        while let Some(((_, dims, _, make), part)) = entries.next() {
            let (from, dims) = match make {
                Make::Copy(from) => {
                    part.copy_from_slice(src(from));
                    continue;
                }
                Make::Int8(from) => (from.as_str(), dims.clone()),
                Make::Head => ("wte.weight", vec![]),
                Make::Scale => unreachable!("a scale is taken with its int8 entry"),
            };
            let (_, scale) = entries.next().expect("a scale after each int8 entry");
            jobs.push((src(from), dims, part, scale));
        }
        let jobs = std::sync::Mutex::new(jobs);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    while let Some((w, dims, q, scale)) = jobs.lock().expect("no panics while held").pop() {
                        let (q8, s) = match dims.as_slice() {
                            [k, n] => quantize_columns(&floats(w), *k, *n, limit),
                            _ => quantize_transposed(&floats(w), shape.vocab, shape.width, limit),
                        };
                        for (d, x) in q.iter_mut().zip(q8) {
                            *d = x as u8;
                        }
                        for (d, x) in scale.chunks_exact_mut(4).zip(s) {
                            d.copy_from_slice(&x.to_le_bytes());
                        }
                    }
                });
            }
        });
        Weights { data: data.into(), index, source: self.source.clone(), precision }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_scale_by_their_largest_magnitude() {
        // [k=3, n=2]: column 0 max 2.54, column 1 all zero.
        let w = [1.0, 0.0, -2.54, 0.0, 0.011, 0.0];
        let (q, s) = quantize_columns(&w, 3, 2, 127);
        assert!((s[0] - 0.02).abs() < 1e-7);
        assert_eq!(s[1], 1.0);
        assert_eq!(q, vec![50, 0, -127, 0, 1, 0]);
        // Dequantized values are within half a step of the originals.
        for (i, &x) in w.iter().enumerate() {
            assert!((f32::from(q[i]) * s[i % 2] - x).abs() <= s[i % 2] / 2.0 + 1e-7);
        }
        // Without VNNI: the same column over 63 steps.
        let (q, s) = quantize_columns(&w, 3, 2, 63);
        assert!((s[0] - 2.54 / 63.0).abs() < 1e-7);
        assert_eq!(q, vec![25, 0, -63, 0, 0, 0]);
    }

    #[test]
    fn without_vnni_no_pair_of_products_saturates_int16() {
        // vpmaddubsw adds a pair of uint8 × int8 products into an int16.
        assert!(2 * 255 * 63 <= i32::from(i16::MAX) && 2 * 255 * 127 > i32::from(i16::MAX));
        // The range follows the CPU's VNNI flags as the kernel reports them.
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            let info = std::fs::read_to_string("/proc/cpuinfo").unwrap();
            let flags = info.lines().find_map(|l| l.strip_prefix("flags")).unwrap_or_default();
            let vnni = flags.split_whitespace().any(|f| f == "avx512_vnni" || f == "avx_vnni");
            assert_eq!(weight_limit(), if vnni { 127 } else { 63 }, "flags: {flags}");
        }
    }

    #[test]
    fn the_transposed_form_equals_quantizing_the_transpose() {
        let (rows, cols) = (130, 7);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 200) as f32 / 50.0 - 2.0).collect();
        let mut t = vec![0f32; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = w[r * cols + c];
            }
        }
        for limit in [127, 63] {
            assert_eq!(quantize_transposed(&w, rows, cols, limit), quantize_columns(&t, cols, rows, limit));
        }
    }

    #[test]
    fn only_layer_matmuls_are_quantized() {
        assert!(is_matmul("h.0.attn.c_attn.weight"));
        assert!(is_matmul("h.11.mlp.c_proj.weight"));
        assert!(!is_matmul("h.0.mlp.c_proj.bias"));
        assert!(!is_matmul("wte.weight"));
    }
}
