//! The SIMD kernels of `SlotAttention` (x86_64). Each function's
//! contract: the CPU has the features it enables, and the pointers address
//! the elements it reads (`q.len()` or `d` per key or value, consecutive);
//! its body is one unsafe context.
#![allow(unsafe_op_in_unsafe_fn)]
use std::arch::x86_64::*;

use half::f16;

/// `q · k` for `d` a multiple of 32, keys float32 or float16.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot512<const F16: bool>(q: &[f32], k: *const u8) -> f32 {
    let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    while i < q.len() {
        let (k0, k1) = (load512::<F16>(k, i), load512::<F16>(k, i + 16));
        let (q0, q1) = (_mm512_loadu_ps(q.as_ptr().add(i)), _mm512_loadu_ps(q.as_ptr().add(i + 16)));
        a0 = _mm512_fmadd_ps(q0, k0, a0);
        a1 = _mm512_fmadd_ps(q1, k1, a1);
        i += 32;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(a0, a1))
}

#[target_feature(enable = "avx512f")]
pub unsafe fn axpy512<const F16: bool>(acc: &mut [f32], p: f32, v: *const u8) {
    let p = _mm512_set1_ps(p);
    let mut i = 0;
    while i < acc.len() {
        let a = acc.as_mut_ptr().add(i);
        _mm512_storeu_ps(a, _mm512_fmadd_ps(p, load512::<F16>(v, i), _mm512_loadu_ps(a)));
        i += 16;
    }
}

#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load512<const F16: bool>(base: *const u8, i: usize) -> __m512 {
    if F16 {
        _mm512_cvtph_ps(_mm256_loadu_si256(base.cast::<f16>().add(i).cast()))
    } else {
        _mm512_loadu_ps(base.cast::<f32>().add(i))
    }
}

/// `scores[j] = scale × q · k_j` for the `scores.len()` keys at `k`
/// (64 elements each); returns their maximum.
#[target_feature(enable = "avx512f")]
pub unsafe fn scores64<const F16: bool>(q: &[f32], k: *const u8, scale: f32, scores: &mut [f32]) -> f32 {
    let e = if F16 { 2 } else { 4 };
    let qs = [0, 16, 32, 48].map(|i| _mm512_loadu_ps(q.as_ptr().add(i)));
    let mut max = f32::NEG_INFINITY;
    for (j, score) in scores.iter_mut().enumerate() {
        let key = k.add(j * 64 * e);
        let (k0, k1, k2, k3) =
            (load512::<F16>(key, 0), load512::<F16>(key, 16), load512::<F16>(key, 32), load512::<F16>(key, 48));
        let a = _mm512_fmadd_ps(qs[1], k1, _mm512_mul_ps(qs[0], k0));
        let b = _mm512_fmadd_ps(qs[3], k3, _mm512_mul_ps(qs[2], k2));
        *score = _mm512_reduce_add_ps(_mm512_add_ps(a, b)) * scale;
        max = max.max(*score);
    }
    max
}

/// `out = Σ_j p[j] × v_j` over the `p.len()` values at `v` (64 each).
#[target_feature(enable = "avx512f")]
pub unsafe fn weighted64<const F16: bool>(p: &[f32], v: *const u8, out: &mut [f32]) {
    let e = if F16 { 2 } else { 4 };
    let mut acc = [_mm512_setzero_ps(); 8];
    let mut j = 0;
    // Two values per iteration: eight independent sums.
    while j + 1 < p.len() {
        for (u, half) in [(0, 0), (1, 4)] {
            let value = v.add((j + u) * 64 * e);
            let w = _mm512_set1_ps(p[j + u]);
            for i in 0..4 {
                acc[half + i] = _mm512_fmadd_ps(w, load512::<F16>(value, 16 * i), acc[half + i]);
            }
        }
        j += 2;
    }
    if j < p.len() {
        let value = v.add(j * 64 * e);
        let w = _mm512_set1_ps(p[j]);
        for (i, a) in acc[..4].iter_mut().enumerate() {
            *a = _mm512_fmadd_ps(w, load512::<F16>(value, 16 * i), *a);
        }
    }
    for i in 0..4 {
        _mm512_storeu_ps(out.as_mut_ptr().add(16 * i), _mm512_add_ps(acc[i], acc[i + 4]));
    }
}

/// `q · k` for `d` a multiple of 16.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot256<const F16: bool>(q: &[f32], k: *const u8) -> f32 {
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i < q.len() {
        let (k0, k1) = (load256::<F16>(k, i), load256::<F16>(k, i + 8));
        let (q0, q1) = (_mm256_loadu_ps(q.as_ptr().add(i)), _mm256_loadu_ps(q.as_ptr().add(i + 8)));
        a0 = _mm256_fmadd_ps(q0, k0, a0);
        a1 = _mm256_fmadd_ps(q1, k1, a1);
        i += 16;
    }
    let s = _mm256_add_ps(a0, a1);
    let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn axpy256<const F16: bool>(acc: &mut [f32], p: f32, v: *const u8) {
    let p = _mm256_set1_ps(p);
    let mut i = 0;
    while i < acc.len() {
        let a = acc.as_mut_ptr().add(i);
        _mm256_storeu_ps(a, _mm256_fmadd_ps(p, load256::<F16>(v, i), _mm256_loadu_ps(a)));
        i += 8;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load256<const F16: bool>(base: *const u8, i: usize) -> __m256 {
    if F16 {
        _mm256_cvtph_ps(_mm_loadu_si128(base.cast::<f16>().add(i).cast()))
    } else {
        _mm256_loadu_ps(base.cast::<f32>().add(i))
    }
}
