//! The SIMD kernels of `SlotAttention` and `PagedAttention` (x86_64). Each function's
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
    // Sixteen keys at a time: sixteen running sums, reduced together
    // (`sum16`) instead of one horizontal reduction per key.
    let whole = scores.len() / 16 * 16;
    let mut maxes = _mm512_set1_ps(f32::NEG_INFINITY);
    for j0 in (0..whole).step_by(16) {
        let mut acc = [_mm512_setzero_ps(); 16];
        for (u, a) in acc.iter_mut().enumerate() {
            let key = k.add((j0 + u) * 64 * e);
            let (k0, k1, k2, k3) =
                (load512::<F16>(key, 0), load512::<F16>(key, 16), load512::<F16>(key, 32), load512::<F16>(key, 48));
            let x = _mm512_fmadd_ps(qs[1], k1, _mm512_mul_ps(qs[0], k0));
            let y = _mm512_fmadd_ps(qs[3], k3, _mm512_mul_ps(qs[2], k2));
            *a = _mm512_add_ps(x, y);
        }
        let block = _mm512_mul_ps(sum16(&acc), _mm512_set1_ps(scale));
        _mm512_storeu_ps(scores.as_mut_ptr().add(j0), block);
        maxes = _mm512_max_ps(maxes, block);
    }
    if whole > 0 {
        max = _mm512_reduce_max_ps(maxes);
    }
    for (j, score) in scores.iter_mut().enumerate().skip(whole) {
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

/// The sums of the sixteen lanes of each of `a[0..16]`, as one vector
/// (lane `j`: the sum of `a[j]`): three levels of shuffles and adds, about 45
/// instructions for what sixteen horizontal reductions do in about 150.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn sum16(a: &[__m512; 16]) -> __m512 {
    // 16 -> 8: c[i] holds a[2i]'s two 256-bit halves added in 128-bit
    // chunks 0, 1 and a[2i + 1]'s in chunks 2, 3.
    let c: [__m512; 8] = std::array::from_fn(|i| {
        let (x, y) = (a[2 * i], a[2 * i + 1]);
        _mm512_add_ps(_mm512_shuffle_f32x4::<0b01_00_01_00>(x, y), _mm512_shuffle_f32x4::<0b11_10_11_10>(x, y))
    });
    // 8 -> 4: chunk m of e[i] holds four partial sums of a[4i + m].
    let e: [__m512; 4] = std::array::from_fn(|i| {
        let (x, y) = (c[2 * i], c[2 * i + 1]);
        _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(x, y), _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y))
    });
    // 4 -> 1, within each 128-bit chunk m: lane 4m + i is the sum of a[4i + m].
    let s01 = _mm512_add_ps(_mm512_unpacklo_ps(e[0], e[1]), _mm512_unpackhi_ps(e[0], e[1]));
    let s23 = _mm512_add_ps(_mm512_unpacklo_ps(e[2], e[3]), _mm512_unpackhi_ps(e[2], e[3]));
    let r = _mm512_add_ps(_mm512_shuffle_ps::<0b01_00_01_00>(s01, s23), _mm512_shuffle_ps::<0b11_10_11_10>(s01, s23));
    // Lane j = 4i + m takes lane 4m + i.
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(order, r)
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

/// Two queries over the same keys (a prompt's consecutive positions):
/// `sa[j] = scale × qa · k_j` and `sb[j] = scale × qb · k_j` for the
/// `sa.len()` keys at `k` (64 elements each), each key read once for both;
/// returns both maxima. Scores equal `scores64`'s bit for bit (the same
/// products and the same `sum16` reduction), except past the last whole
/// group of eight keys.
#[target_feature(enable = "avx512f")]
pub unsafe fn scores64x2<const F16: bool>(
    qa: &[f32],
    qb: &[f32],
    k: *const u8,
    scale: f32,
    sa: &mut [f32],
    sb: &mut [f32],
) -> (f32, f32) {
    let e = if F16 { 2 } else { 4 };
    let qa4 = [0, 16, 32, 48].map(|i| _mm512_loadu_ps(qa.as_ptr().add(i)));
    let qb4 = [0, 16, 32, 48].map(|i| _mm512_loadu_ps(qb.as_ptr().add(i)));
    let n = sa.len().min(sb.len());
    let whole = n / 8 * 8;
    let mut maxes = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut both = [0.0f32; 16];
    for j0 in (0..whole).step_by(8) {
        let mut acc = [_mm512_setzero_ps(); 16];
        for u in 0..8 {
            let key = k.add((j0 + u) * 64 * e);
            let (k0, k1, k2, k3) =
                (load512::<F16>(key, 0), load512::<F16>(key, 16), load512::<F16>(key, 32), load512::<F16>(key, 48));
            let x = _mm512_fmadd_ps(qa4[1], k1, _mm512_mul_ps(qa4[0], k0));
            let y = _mm512_fmadd_ps(qa4[3], k3, _mm512_mul_ps(qa4[2], k2));
            acc[u] = _mm512_add_ps(x, y);
            let x = _mm512_fmadd_ps(qb4[1], k1, _mm512_mul_ps(qb4[0], k0));
            let y = _mm512_fmadd_ps(qb4[3], k3, _mm512_mul_ps(qb4[2], k2));
            acc[8 + u] = _mm512_add_ps(x, y);
        }
        let block = _mm512_mul_ps(sum16(&acc), _mm512_set1_ps(scale));
        maxes = _mm512_max_ps(maxes, block);
        _mm512_storeu_ps(both.as_mut_ptr(), block);
        sa[j0..j0 + 8].copy_from_slice(&both[..8]);
        sb[j0..j0 + 8].copy_from_slice(&both[8..]);
    }
    _mm512_storeu_ps(both.as_mut_ptr(), maxes);
    let (mut ma, mut mb) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for i in 0..8 {
        ma = ma.max(both[i]);
        mb = mb.max(both[8 + i]);
    }
    if whole < n {
        let key = k.add(whole * 64 * e);
        ma = ma.max(scores64::<F16>(qa, key, scale, &mut sa[whole..n]));
        mb = mb.max(scores64::<F16>(qb, key, scale, &mut sb[whole..n]));
    }
    (ma, mb)
}

/// `oa = Σ_j pa[j] × v_j` and `ob = Σ_j pb[j] × v_j` over the `pa.len()`
/// values at `v` (64 each), each value read once for both.
#[target_feature(enable = "avx512f")]
pub unsafe fn weighted64x2<const F16: bool>(pa: &[f32], pb: &[f32], v: *const u8, oa: &mut [f32], ob: &mut [f32]) {
    let e = if F16 { 2 } else { 4 };
    let (mut a, mut b) = ([_mm512_setzero_ps(); 4], [_mm512_setzero_ps(); 4]);
    for j in 0..pa.len().min(pb.len()) {
        let value = v.add(j * 64 * e);
        let (wa, wb) = (_mm512_set1_ps(pa[j]), _mm512_set1_ps(pb[j]));
        for i in 0..4 {
            let x = load512::<F16>(value, 16 * i);
            a[i] = _mm512_fmadd_ps(wa, x, a[i]);
            b[i] = _mm512_fmadd_ps(wb, x, b[i]);
        }
    }
    for i in 0..4 {
        _mm512_storeu_ps(oa.as_mut_ptr().add(16 * i), a[i]);
        _mm512_storeu_ps(ob.as_mut_ptr().add(16 * i), b[i]);
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

/// `scores64` with AVX2: eight keys at a time, reduced together (`sum8`).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn scores64_256<const F16: bool>(q: &[f32], k: *const u8, scale: f32, scores: &mut [f32]) -> f32 {
    let e = if F16 { 2 } else { 4 };
    let q = q.as_ptr();
    let partial = |key: *const u8| partial64::<F16>(q, key);
    let whole = scores.len() / 8 * 8;
    let mut maxes = _mm256_set1_ps(f32::NEG_INFINITY);
    for j0 in (0..whole).step_by(8) {
        let acc: [__m256; 8] = std::array::from_fn(|u| partial(k.add((j0 + u) * 64 * e)));
        let block = _mm256_mul_ps(sum8(&acc), _mm256_set1_ps(scale));
        _mm256_storeu_ps(scores.as_mut_ptr().add(j0), block);
        maxes = _mm256_max_ps(maxes, block);
    }
    let mut lanes = [0.0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), maxes);
    let mut max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for (j, score) in scores.iter_mut().enumerate().skip(whole) {
        *score = hsum256(partial(k.add(j * 64 * e))) * scale;
        max = max.max(*score);
    }
    max
}

/// One key's 64 products with `q` in eight lanes (two running sums).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn partial64<const F16: bool>(q: *const f32, key: *const u8) -> __m256 {
    let mut x = _mm256_mul_ps(_mm256_loadu_ps(q), load256::<F16>(key, 0));
    let mut y = _mm256_mul_ps(_mm256_loadu_ps(q.add(8)), load256::<F16>(key, 8));
    for i in [16, 32, 48] {
        x = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(i)), load256::<F16>(key, i), x);
        y = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(i + 8)), load256::<F16>(key, i + 8), y);
    }
    _mm256_add_ps(x, y)
}

/// The sum of the eight lanes of `s`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn hsum256(s: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

/// The sums of the eight lanes of each of `a[0..8]`, as one vector (lane
/// `j`: the sum of `a[j]`).
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn sum8(a: &[__m256; 8]) -> __m256 {
    // Pairwise within 128-bit halves: lane i of u0 holds the sum of a[i]'s
    // low four lanes, lane 4 + i that of its high four (a[4 + i] in u1).
    let t = [
        _mm256_hadd_ps(a[0], a[1]),
        _mm256_hadd_ps(a[2], a[3]),
        _mm256_hadd_ps(a[4], a[5]),
        _mm256_hadd_ps(a[6], a[7]),
    ];
    let (u0, u1) = (_mm256_hadd_ps(t[0], t[1]), _mm256_hadd_ps(t[2], t[3]));
    _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(u0, u1), _mm256_permute2f128_ps::<0x31>(u0, u1))
}

/// `weighted64` with AVX2: the 64 sums stay in eight registers.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn weighted64_256<const F16: bool>(p: &[f32], v: *const u8, out: &mut [f32]) {
    let e = if F16 { 2 } else { 4 };
    let mut acc = [_mm256_setzero_ps(); 8];
    for (j, &w) in p.iter().enumerate() {
        let value = v.add(j * 64 * e);
        let w = _mm256_set1_ps(w);
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(w, load256::<F16>(value, 8 * i), *a);
        }
    }
    for (i, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.as_mut_ptr().add(8 * i), *a);
    }
}
