// A decode step's 49 GEMMs (12 GPT-2 small layers + the LM head) with weights streamed from
// memory, through a packed AVX-512 fp32 kernel of our own (8 x 48 register tile, 48-column
// panels, the next panel prefetched; V2=1: 12 x 32), on a spinning two-thread pool; the same
// step through ONNX Runtime's MLAS is scripts/probes/gemm_step.py. Results: docs/performance.md,
// "Sampling without a candidate list; where a 32-row fp32 step goes".
// Run: rustc -O --edition 2021 scripts/probes/gemm_step.rs -o /tmp/gemm_step && /tmp/gemm_step 2 step
#![allow(clippy::all, unsafe_op_in_unsafe_fn, dead_code)]
use std::arch::x86_64::*;

pub const NR: usize = 48; // three zmm panels of 16 columns

/// W [k, n] row-major -> groups of NR columns: [n/NR][k][NR]
pub fn pack(w: &[f32], k: usize, n: usize) -> Vec<f32> {
    assert!(n % NR == 0);
    let mut p = vec![0f32; k * n];
    for g in 0..n / NR {
        for r in 0..k {
            for c in 0..NR {
                p[(g * k + r) * NR + c] = w[r * n + g * NR + c];
            }
        }
    }
    p
}

#[target_feature(enable = "avx512f")]
unsafe fn tile<const MR: usize>(k: usize, a: *const f32, lda: usize, b: *const f32, c: *mut f32, ldc: usize, prefetch: *const f32) {
    let mut acc = [[_mm512_setzero_ps(); 3]; MR];
    let mut bp = b;
    for kk in 0..k {
        if kk % 4 == 0 {
            // next group's panel, one line a step
            _mm_prefetch::<_MM_HINT_T1>(prefetch.add(kk * NR / 4 * 3) as *const i8);
        }
        let b0 = _mm512_loadu_ps(bp);
        let b1 = _mm512_loadu_ps(bp.add(16));
        let b2 = _mm512_loadu_ps(bp.add(32));
        for m in 0..MR {
            let x = _mm512_set1_ps(*a.add(m * lda + kk));
            acc[m][0] = _mm512_fmadd_ps(x, b0, acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(x, b1, acc[m][1]);
            acc[m][2] = _mm512_fmadd_ps(x, b2, acc[m][2]);
        }
        bp = bp.add(NR);
    }
    for m in 0..MR {
        for j in 0..3 {
            _mm512_storeu_ps(c.add(m * ldc + j * 16), acc[m][j]);
        }
    }
}

/// y[m, n] = x[m, k] * W over groups g0..g1
pub unsafe fn gemm_groups(m: usize, k: usize, n: usize, x: &[f32], packed: &[f32], y: *mut f32, g0: usize, g1: usize) {
    for g in g0..g1 {
        let b = packed.as_ptr().add(g * k * NR);
        let next = packed.as_ptr().add(((g + 1).min(g1 - 1)) * k * NR);
        let mut r = 0;
        while r < m {
            let rows = (m - r).min(8);
            let a = x.as_ptr().add(r * k);
            let c = y.add(r * n + g * NR);
            match rows {
                8 => tile::<8>(k, a, k, b, c, n, next),
                7 => tile::<7>(k, a, k, b, c, n, next),
                6 => tile::<6>(k, a, k, b, c, n, next),
                5 => tile::<5>(k, a, k, b, c, n, next),
                4 => tile::<4>(k, a, k, b, c, n, next),
                3 => tile::<3>(k, a, k, b, c, n, next),
                2 => tile::<2>(k, a, k, b, c, n, next),
                _ => tile::<1>(k, a, k, b, c, n, next),
            }
            r += rows;
        }
    }
}

struct P(*mut f32);
unsafe impl Send for P {}
unsafe impl Sync for P {}

fn gemm(m: usize, k: usize, n: usize, x: &[f32], packed: &[f32], y: &mut [f32], threads: usize) {
    let groups = n / NR;
    if threads == 1 {
        unsafe { gemm_groups(m, k, n, x, packed, y.as_mut_ptr(), 0, groups) };
        return;
    }
    let p = P(y.as_mut_ptr());
    let p = &p;
    std::thread::scope(|s| {
        for t in 0..threads {
            let (g0, g1) = (groups * t / threads, groups * (t + 1) / threads);
            s.spawn(move || unsafe { gemm_groups(m, k, n, x, packed, p.0, g0, g1) });
        }
    });
}

fn main() {
    if std::env::args().nth(2).as_deref() == Some("step") { step_run(std::env::args().nth(1).unwrap().parse().unwrap()); return; }
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(1).map_or(2, |s| s.parse().unwrap());
    for &(k, n) in &[(768usize, 2304usize), (768, 768), (768, 3072), (3072, 768), (768, 50256)] {
        let w: Vec<f32> = (0..k * n).map(|i| ((i * 2654435761usize) % 255) as f32 * 1e-4 - 0.0127).collect();
        let packed = pack(&w, k, n);
        for &m in &[1usize, 16, 32] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i % 97) as f32 - 48.0) * 0.01).collect();
            let mut y = vec![0f32; m * n];
            gemm(m, k, n, &x, &packed, &mut y, threads);
            // check a few
            for &(r, c) in &[(0usize, 0usize), (m - 1, n - 1), (m / 2, n / 3)] {
                let want: f64 = (0..k).map(|kk| x[r * k + kk] as f64 * w[kk * n + c] as f64).sum();
                assert!((y[r * n + c] as f64 - want).abs() < 1e-3, "{} vs {}", y[r * n + c], want);
            }
            let iters = 50;
            let t = Instant::now();
            for _ in 0..iters {
                gemm(m, k, n, &x, &packed, &mut y, threads);
            }
            let s = t.elapsed().as_secs_f64() / iters as f64;
            println!("k {k} n {n} m {m}: {:.3} ms, {:.1} GFLOP/s, {:.1} GB/s weights", s * 1e3, 2.0 * (m * k * n) as f64 / s / 1e9, (k * n * 4) as f64 / s / 1e9);
        }
    }
}

pub const NR2: usize = 32;
pub fn pack2(w: &[f32], k: usize, n: usize) -> Vec<f32> {
    assert!(n % NR2 == 0);
    let mut p = vec![0f32; k * n];
    for g in 0..n / NR2 { for r in 0..k { for c in 0..NR2 { p[(g * k + r) * NR2 + c] = w[r * n + g * NR2 + c]; } } }
    p
}
#[target_feature(enable = "avx512f")]
unsafe fn tile2<const MR: usize>(k: usize, a: *const f32, lda: usize, b: *const f32, c: *mut f32, ldc: usize, prefetch: *const f32) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let mut bp = b;
    for kk in 0..k {
        if kk % 2 == 0 { _mm_prefetch::<_MM_HINT_T1>(prefetch.add(kk * NR2) as *const i8); }
        let b0 = _mm512_loadu_ps(bp);
        let b1 = _mm512_loadu_ps(bp.add(16));
        for m in 0..MR {
            let x = _mm512_set1_ps(*a.add(m * lda + kk));
            acc[m][0] = _mm512_fmadd_ps(x, b0, acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(x, b1, acc[m][1]);
        }
        bp = bp.add(NR2);
    }
    for m in 0..MR { for j in 0..2 { _mm512_storeu_ps(c.add(m * ldc + j * 16), acc[m][j]); } }
}
pub unsafe fn gemm_groups2(m: usize, k: usize, n: usize, x: &[f32], packed: &[f32], y: *mut f32, g0: usize, g1: usize) {
    for g in g0..g1 {
        let b = packed.as_ptr().add(g * k * NR2);
        let next = packed.as_ptr().add(((g + 1).min(g1 - 1)) * k * NR2);
        let mut r = 0;
        while r < m {
            let left = m - r;
            // 32 rows: 11 + 11 + 10
            let rows = if left > 12 { left.div_ceil(left.div_ceil(12)) } else { left };
            let a = x.as_ptr().add(r * k);
            let c = y.add(r * n + g * NR2);
            match rows {
                12 => tile2::<12>(k, a, k, b, c, n, next), 11 => tile2::<11>(k, a, k, b, c, n, next),
                10 => tile2::<10>(k, a, k, b, c, n, next), 9 => tile2::<9>(k, a, k, b, c, n, next),
                8 => tile2::<8>(k, a, k, b, c, n, next), 7 => tile2::<7>(k, a, k, b, c, n, next),
                6 => tile2::<6>(k, a, k, b, c, n, next), 5 => tile2::<5>(k, a, k, b, c, n, next),
                4 => tile2::<4>(k, a, k, b, c, n, next), 3 => tile2::<3>(k, a, k, b, c, n, next),
                2 => tile2::<2>(k, a, k, b, c, n, next), _ => tile2::<1>(k, a, k, b, c, n, next),
            }
            r += rows;
        }
    }
}

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;


struct Job { m: usize, k: usize, n: usize, x: *const f32, w: *const f32, wlen: usize, y: *mut f32, groups: usize }
unsafe impl Send for Job {}
unsafe impl Sync for Job {}

struct Pool { gen: AtomicUsize, done: AtomicUsize, job: std::sync::Mutex<Option<Arc<Job>>>, slot: std::cell::UnsafeCell<*const Job> }
unsafe impl Sync for Pool {}
unsafe impl Send for Pool {}

fn half(j: &Job, t: usize, threads: usize) {
    let (g0, g1) = (j.groups * t / threads, j.groups * (t + 1) / threads);
    if g0 < g1 {
        let x = unsafe { std::slice::from_raw_parts(j.x, j.m * j.k) };
        let w = unsafe { std::slice::from_raw_parts(j.w, j.wlen) };
        if *V2 { unsafe { gemm_groups2(j.m, j.k, j.n, x, w, j.y, g0, g1) } } else { unsafe { gemm_groups(j.m, j.k, j.n, x, w, j.y, g0, g1) } };
    }
}

static V2: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| std::env::var("V2").is_ok());
fn nr() -> usize { if *V2 { NR2 } else { NR } }
fn pk(w: &[f32], k: usize, n: usize) -> Vec<f32> { if *V2 { pack2(w, k, n) } else { pack(w, k, n) } }
pub fn step_run(threads: usize) {
    let (e, i, v, l) = (768usize, 3072usize, 50257usize, 12usize);
    let vp = v.div_ceil(48 * 32) * 48 * 32;
    let mut seed = 1u64;
    let mut rnd = || { seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04 };
    let mut mats = Vec::new();
    for _ in 0..l {
        for &(k, n) in &[(e, 3 * e), (e, e), (e, i), (i, e)] {
            let w: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
            mats.push((k, n, pk(&w, k, n)));
        }
    }
    let mut head: Vec<f32> = (0..e * vp).map(|_| rnd()).collect();
    for r in 0..e { for c in v..vp { head[r * vp + c] = 0.0; } }
    mats.push((e, vp, pk(&head, e, vp)));
    drop(head);
    let pool = Arc::new(Pool { gen: AtomicUsize::new(0), done: AtomicUsize::new(0), job: std::sync::Mutex::new(None), slot: std::cell::UnsafeCell::new(std::ptr::null()) });
    let stop = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for t in 1..threads {
        let (pool, stop) = (pool.clone(), stop.clone());
        handles.push(std::thread::spawn(move || {
            let mut seen = 0;
            loop {
                let g = pool.gen.load(Ordering::Acquire);
                if g == seen { if stop.load(Ordering::Relaxed) == 1 { return; } std::hint::spin_loop(); continue; }
                seen = g;
                let j = unsafe { &**pool.slot.get() };
                half(j, t, threads);
                pool.done.fetch_add(1, Ordering::AcqRel);
            }
        }));
    }
    let _ = &pool.job;
    let mut par = |j: &Job| {
        unsafe { *pool.slot.get() = j as *const Job };
        pool.done.store(0, Ordering::Release);
        pool.gen.fetch_add(1, Ordering::AcqRel);
        half(j, 0, threads);
        while pool.done.load(Ordering::Acquire) < threads - 1 { std::hint::spin_loop(); }
    };
    for &m in &[1usize, 16, 32] {
        let mut bufs = vec![vec![0f32; m * vp], vec![0f32; m * vp]];
        let x0: Vec<f32> = (0..m * e).map(|_| rnd() * 25.0).collect();
        let mut stepf = |bufs: &mut Vec<Vec<f32>>| {
            bufs[0][..m * e].copy_from_slice(&x0);
            let mut cur = 0;
            for (idx, (k, n, w)) in mats.iter().enumerate() {
                let (a, b) = bufs.split_at_mut(1);
                let (src, dst) = if cur == 0 { (&a[0], &mut b[0]) } else { (&b[0], &mut a[0]) };
                // qkv output: take the first e columns as the next input (stride n): copy compact
                let j = Job { m, k: *k, n: *n, x: src.as_ptr(), w: w.as_ptr(), wlen: w.len(), y: dst.as_mut_ptr(), groups: n / nr() };
                par(&j);
                if idx % 4 == 0 && idx < 48 {
                    // compact [m, 3e] -> [m, e]
                    for r in 0..m { dst.copy_within(r * n..r * n + e, r * e); }
                }
                cur ^= 1;
            }
        };
        stepf(&mut bufs);
        let mut ts = Vec::new();
        for _ in 0..20 { let t = Instant::now(); stepf(&mut bufs); ts.push(t.elapsed().as_secs_f64()); }
        ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let dt = ts[10];
        let p = (l * (e * 3 * e + e * e + 2 * e * i) + e * v) as f64;
        println!("ours step m {m}: {:.2} ms median, {:.1} GFLOP/s, {:.1} GB/s weights", dt * 1e3, 2.0 * m as f64 * p / dt / 1e9, 4.0 * p / dt / 1e9);
    }
    stop.store(1, Ordering::Relaxed);
    for h in handles { h.join().unwrap(); }
}
