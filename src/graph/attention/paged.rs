//! `batchgen.PagedAttention`: `SlotAttention` over a block pool
//! (`crate::graph::pool`), each row reading and writing its positions
//! through a block table.
// unsafe: as the parent module's (SIMD, and writes into the pool through the
// pointer ONNX Runtime hands out for the bound input).
#![allow(unsafe_code)]
use std::marker::PhantomData;

use ort::operator::{BoxedKernel, ComputeContext, KernelContext, Operator, OperatorInput, OperatorOutput};
use ort::value::TensorElementType;

use super::{CacheElem, PAGED_OP, Run, SCORES, bad, mutable_data, normalize};

/// The operator over a block pool for caches of element type `E`: inputs as
/// `SlotAttention`'s, but `past_key`/`past_value` are the whole pool
/// `[blocks, heads, block, head_dim]` and a sixth input, `block_table [B, T]`
/// int32, names the pool block holding positions `j × block..(j + 1) × block`
/// of row `b` at `[b, j]`. Rows write their new keys and values through it
/// (the engine gives every row blocks of its own for the positions it
/// writes) and read every earlier position through it, so one block may
/// serve several rows: a shared prompt prefix, the samples and beams of one
/// request.
pub struct PagedAttention<E>(PhantomData<E>);

impl<E> Default for PagedAttention<E> {
    fn default() -> Self {
        PagedAttention(PhantomData)
    }
}

impl<E: CacheElem> Operator for PagedAttention<E> {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        PAGED_OP
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::required(E::TYPE),
            OperatorInput::required(E::TYPE),
            OperatorInput::required(TensorElementType::Int32),
            OperatorInput::required(TensorElementType::Int32),
            OperatorInput::required(TensorElementType::Int32),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, kctx: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        let heads = kctx.get::<i64>("num_heads").ok_or_else(|| ort::Error::new("PagedAttention needs num_heads"))?;
        let scale = kctx.get::<f32>("scale").ok_or_else(|| ort::Error::new("PagedAttention needs scale"))?;
        let heads = usize::try_from(heads).map_err(|_| ort::Error::new("num_heads must be positive"))?;
        Ok(Box::new(move |ctx: &ComputeContext| compute_paged::<E>(ctx, heads, scale)))
    }
}

fn compute_paged<E: CacheElem>(ctx: &ComputeContext, heads: usize, scale: f32) -> ort::Result<()> {
    let input = |i: usize| ctx.input(i)?.ok_or_else(|| bad(format!("input {i} is missing")));
    let (qkv, key, value, seqlens, past, table) = (input(0)?, input(1)?, input(2)?, input(3)?, input(4)?, input(5)?);
    let (qshape, q) = qkv.try_extract_tensor::<f32>()?;
    let (kshape, _) = key.try_extract_tensor::<E>()?;
    let (vshape, _) = value.try_extract_tensor::<E>()?;
    let (_, seqlens) = seqlens.try_extract_tensor::<i32>()?;
    let (_, past) = past.try_extract_tensor::<i32>()?;
    let (tshape, table) = table.try_extract_tensor::<i32>()?;
    let dims = |s: &ort::value::Shape| s.iter().map(|&d| d as usize).collect::<Vec<_>>();
    let (qd, kd, td) = (dims(qshape), dims(kshape), dims(tshape));
    let [b, s, e3] = qd[..] else { return Err(bad(format!("qkv is {qd:?}, not [B, S, 3E]"))) };
    let [blocks, kh, block, head_dim] = kd[..] else { return Err(bad(format!("the key pool is {kd:?}"))) };
    let [tb, per_row] = td[..] else { return Err(bad(format!("block_table is {td:?}, not [B, T]"))) };
    if kh != heads || e3 != 3 * heads * head_dim || dims(vshape) != kd || tb != b || block == 0 {
        return Err(bad(format!("qkv {qd:?} and block_table {td:?} do not match the pool {kd:?} with {heads} heads")));
    }
    if seqlens.len() != b || past.len() != b {
        return Err(bad(format!("{} seqlens and {} past lengths for {b} rows", seqlens.len(), past.len())));
    }
    for r in 0..b {
        let (total, p) = (seqlens[r] as i64 + 1, past[r] as i64);
        if p < 0 || total <= p || total - p > s as i64 || total > (per_row * block) as i64 {
            return Err(bad(format!(
                "row {r}: length {total} over a past of {p}, {s} new positions, {per_row} blocks of {block}"
            )));
        }
        let used = (total as usize).div_ceil(block);
        if let Some(&id) = table[r * per_row..r * per_row + used].iter().find(|&&id| id < 0 || id as usize >= blocks) {
            return Err(bad(format!("row {r}: block {id} is not in the pool of {blocks}")));
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
        max_len: block,
        head_dim,
        scale,
    };
    let rows: Vec<(usize, usize)> = (0..b).map(|r| (past[r] as usize, (seqlens[r] + 1 - past[r]) as usize)).collect();
    // Head-major: the rows attending one head run next to each other, so a
    // block several rows share is read from memory once and from the cache
    // after.
    let tasks = b * heads;
    ctx.par_for(tasks, tasks, |task| {
        let (h, r) = (task / b, task % b);
        let (past, n) = rows[r];
        let blocks = &table[r * per_row..(r + 1) * per_row];
        // SAFETY: shapes and block ids were checked above; the task owns
        // row r's positions past.. in head h (its blocks there are its own).
        unsafe { attend_paged(run, blocks, r, h, past, n) };
    })
}

/// Asks the CPU to bring `bytes` from `p` into its caches (a hint: no
/// effect on results, none where the target has no prefetch instruction).
#[inline(always)]
fn prefetch<const L2: bool>(p: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..bytes).step_by(64) {
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe {
            use std::arch::x86_64::{_MM_HINT_T0, _MM_HINT_T1, _mm_prefetch};
            if L2 {
                _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(line).cast());
            } else {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(line).cast());
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, bytes);
}

/// One (row, head) of `PagedAttention`: `run.max_len` is the block size and
/// `blocks` the row's block table.
///
/// # Safety
/// As `attend`, with every block of `blocks` up to `past + n` positions in
/// the pool, and the positions `past..past + n` of no other row's blocks.
unsafe fn attend_paged<E: CacheElem>(run: Run<E>, blocks: &[i32], r: usize, h: usize, past: usize, n: usize) {
    let (s, d, e, bs) = (run.seq, run.head_dim, run.heads * run.head_dim, run.max_len);
    // Element offset of position `p` of head `h` in the pool.
    let at = |p: usize| ((blocks[p / bs] as usize * run.heads + h) * bs + p % bs) * d;
    let token = |t: usize| (r * s + t) * 3 * e + h * d;
    // SAFETY: every offset below is inside the shapes the caller checked.
    unsafe {
        for t in 0..n {
            let to = at(past + t);
            let (k, v) = (run.qkv.add(token(t) + e), run.qkv.add(token(t) + 2 * e));
            for i in 0..d {
                *run.key.add(to + i) = E::from_f32(*k.add(i));
                *run.value.add(to + i) = E::from_f32(*v.add(i));
            }
        }
        SCORES.with_borrow_mut(|buf| {
            let most = past + n;
            buf.resize(2 * most + 2 * d, 0.0);
            let (sa, rest) = buf.split_at_mut(most);
            let (sb, rest) = rest.split_at_mut(most);
            let (pa, pb) = rest.split_at_mut(d);
            let query = |t: usize| std::slice::from_raw_parts(run.qkv.add(token(t)), d);
            let output = |t: usize| std::slice::from_raw_parts_mut(run.out.add((r * s + t) * e + h * d), d);
            let (key, value) = (|p: usize| run.key.add(at(p)), |p: usize| run.value.add(at(p)));
            let short = bs * d * size_of::<E>() < 4096;
            let mut t = 0;
            while t < n {
                // Query t sees `la` positions; with a next query (which sees
                // one more) both go together, each key and value read once.
                let la = past + t + 1;
                let (qa, oa) = (query(t), output(t));
                oa.fill(0.0);
                if t + 1 < n {
                    let (qb, ob) = (query(t + 1), output(t + 1));
                    let (mut ma, mut mb) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                    for start in (0..la).step_by(bs) {
                        let end = la.min(start + bs);
                        let (x, y) =
                            E::scores2(qa, qb, key(start), run.scale, &mut sa[start..end], &mut sb[start..end]);
                        (ma, mb) = (ma.max(x), mb.max(y));
                    }
                    mb = mb.max(E::scores(qb, key(la), run.scale, &mut sb[la..la + 1]));
                    normalize(&mut sa[..la], ma);
                    normalize(&mut sb[..la + 1], mb);
                    ob.fill(0.0);
                    for start in (0..la).step_by(bs) {
                        let end = la.min(start + bs);
                        E::weighted2(&sa[start..end], &sb[start..end], value(start), pa, pb);
                        oa.iter_mut().zip(&*pa).for_each(|(o, x)| *o += x);
                        ob.iter_mut().zip(&*pb).for_each(|(o, x)| *o += x);
                    }
                    E::axpy(ob, sb[la], value(la));
                    t += 2;
                } else {
                    let mut max = f32::NEG_INFINITY;
                    for start in (0..la).step_by(bs) {
                        let end = la.min(start + bs);
                        // The pool's blocks are scattered: ask for the next
                        // block's keys and this block's values (read after the
                        // softmax) while these keys are scored, so the loads
                        // overlap instead of each block starting cold. Where a
                        // block of one head fills a 4 KiB page or more (float32
                        // at 16 × 64) the CPU's own prefetcher does as well:
                        // measured 10 % off a 32-row float16 step, 4 % onto a
                        // float32 one.
                        if short {
                            if end < la {
                                prefetch::<false>(key(end).cast(), (la.min(end + bs) - end) * d * size_of::<E>());
                            }
                            prefetch::<true>(value(start).cast(), (end - start) * d * size_of::<E>());
                        }
                        max = max.max(E::scores(qa, key(start), run.scale, &mut sa[start..end]));
                    }
                    normalize(&mut sa[..la], max);
                    for start in (0..la).step_by(bs) {
                        let end = la.min(start + bs);
                        E::weighted(&sa[start..end], value(start), pa);
                        oa.iter_mut().zip(&*pa).for_each(|(o, x)| *o += x);
                    }
                    t += 1;
                }
            }
        });
        for t in n..s {
            std::slice::from_raw_parts_mut(run.out.add((r * s + t) * e + h * d), d).fill(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;

    /// `attend_paged` with 64-wide heads (the SIMD paths, pairs of queries
    /// and single ones) against plain attention: 5 new positions (two pairs
    /// and one alone) on a past of 37 in blocks of 16 scattered over a pool,
    /// float32 and float16.
    #[test]
    fn paged_attention_agrees_with_plain_attention() {
        fn check<E: CacheElem + Default>() {
            let (heads, d, bs, past, n) = (2usize, 64usize, 16usize, 37usize, 5usize);
            let e = heads * d;
            let table: Vec<i32> = vec![5, 1, 3, 0];
            let pool_blocks = 6;
            let value = |i: usize| ((i as f32) * 0.013).sin();
            let qkv: Vec<f32> = (0..n * 3 * e).map(|i| value(i + 7)).collect();
            let mut key = vec![E::default(); pool_blocks * heads * bs * d];
            let mut val = vec![E::default(); pool_blocks * heads * bs * d];
            let at = |p: usize, h: usize| ((table[p / bs] as usize * heads + h) * bs + p % bs) * d;
            // The past: position p of head h holds a pattern of its own.
            let past_k = |p: usize, h: usize, i: usize| value(p * 131 + h * 17 + i);
            let past_v = |p: usize, h: usize, i: usize| value(p * 71 + h * 29 + i + 5);
            for p in 0..past {
                for h in 0..heads {
                    for i in 0..d {
                        key[at(p, h) + i] = E::from_f32(past_k(p, h, i));
                        val[at(p, h) + i] = E::from_f32(past_v(p, h, i));
                    }
                }
            }
            let mut out = vec![0.0f32; n * e];
            let run = Run::<E> {
                qkv: qkv.as_ptr(),
                key: key.as_mut_ptr(),
                value: val.as_mut_ptr(),
                out: out.as_mut_ptr(),
                seq: n,
                heads,
                max_len: bs,
                head_dim: d,
                scale: 0.125,
            };
            for h in 0..heads {
                // SAFETY: the buffers hold the shapes `run` describes.
                unsafe { attend_paged(run, &table, 0, h, past, n) };
            }
            // Plain attention, keys and values rounded as the cache stores them.
            let round = |x: f32| E::from_f32(x).to_f32();
            let k_at = |p: usize, h: usize, i: usize| {
                if p < past { round(past_k(p, h, i)) } else { round(qkv[(p - past) * 3 * e + e + h * d + i]) }
            };
            let v_at = |p: usize, h: usize, i: usize| {
                if p < past { round(past_v(p, h, i)) } else { round(qkv[(p - past) * 3 * e + 2 * e + h * d + i]) }
            };
            for t in 0..n {
                for h in 0..heads {
                    let q = &qkv[t * 3 * e + h * d..t * 3 * e + h * d + d];
                    let len = past + t + 1;
                    let scores: Vec<f64> = (0..len)
                        .map(|p| 0.125 * (0..d).map(|i| q[i] as f64 * k_at(p, h, i) as f64).sum::<f64>())
                        .collect();
                    let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = w.iter().sum();
                    for i in 0..d {
                        let want: f64 = (0..len).map(|p| w[p] / total * v_at(p, h, i) as f64).sum();
                        let got = out[t * e + h * d + i] as f64;
                        assert!((got - want).abs() < 1e-5, "{:?} t {t} h {h} i {i}: {got} vs {want}", E::TYPE);
                    }
                }
            }
            // The new keys went into the blocks the table names.
            assert_eq!(key[at(past + 2, 1) + 3].to_f32(), round(qkv[2 * 3 * e + e + d + 3]));
        }
        check::<f32>();
        check::<f16>();
    }
}
