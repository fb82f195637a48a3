//! The vectorised arithmetic both the logits processors and the sampler
//! run over a vocabulary of logits: e^x, max and sum of exponentials. It sits
//! below both (`logits` and `sampling` import it, it imports neither).

/// e^x for x <= 0, branch-free so that loops over a vocabulary vectorise:
/// 2^(x·log2 e) split into an integer power of two (built in the exponent
/// bits) and 2^f, f in [-0.5, 0.5], by a degree-6 polynomial. Relative error
/// below 2e-7 near 0, growing with |x| to 1e-5 at -87 (rounding of x·log2 e),
/// where the terms no longer matter to a sum (tested against `f32::exp`);
/// x below -87 gives e^-87 (1.6e-38), as negligible as 0.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    let x = if x < -87.0 { -87.0 } else { x };
    let t = x * std::f32::consts::LOG2_E;
    // Adding 1.5 · 2^23 rounds t to an integer held in the low mantissa bits
    // (no float-to-int conversion, which would not vectorise).
    let shifted = t + 12_582_912.0;
    let n = shifted - 12_582_912.0;
    let n_bits = shifted.to_bits().wrapping_sub(0x4B40_0000);
    let y = (t - n) * std::f32::consts::LN_2;
    let p = 1.0 + y * (1.0 + y * (0.5 + y * (1.0 / 6.0 + y * (1.0 / 24.0 + y * (1.0 / 120.0 + y * (1.0 / 720.0))))));
    p * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

const LANES: usize = 8;

/// Whether the CPU has AVX2 and FMA, for the callers that run a copy of
/// their loops compiled for them (`sampling::choose`, `graph::greedy`);
/// checked once.
#[cfg(target_arch = "x86_64")]
pub fn has_avx2_fma() -> bool {
    static AVX2_FMA: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    });
    *AVX2_FMA
}

/// max(x), with 8 independent lanes so that it vectorises (NaN-free input).
/// Inlined (as `sum_exp`), so that an AVX2 caller's copy vectorises 8 wide.
#[inline(always)]
pub fn max_of(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            m[l] = if c[l] > m[l] { c[l] } else { m[l] };
        }
    }
    rest.iter().chain(m.iter()).copied().fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a })
}

/// sum(exp(x - max)) in 8 f32 lanes per block of 1024, blocks summed in f64.
#[inline(always)]
pub fn sum_exp(x: &[f32], max: f32) -> f64 {
    let mut total = 0.0f64;
    for block in x.chunks(1024) {
        let mut s = [0.0f32; LANES];
        let chunks = block.chunks_exact(LANES);
        let rest: f32 = chunks.remainder().iter().map(|&v| fast_exp(v - max)).sum();
        for c in chunks {
            for l in 0..LANES {
                s[l] += fast_exp(c[l] - max);
            }
        }
        total += f64::from(s.iter().sum::<f32>() + rest);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate_where_it_is_used() {
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (a, b) = (fast_exp(x), x.exp());
            let tolerance = if x > -1.0 { 2e-7 } else { 1e-5 };
            assert!((a - b).abs() <= tolerance * b + 1e-38, "{x}: {a} vs {b}");
            x += 0.0137;
        }
        assert_eq!(fast_exp(0.0), 1.0);
        assert!(fast_exp(-200.0) < 1e-37);
        assert!(fast_exp(f32::NEG_INFINITY) < 1e-37);
    }
}
