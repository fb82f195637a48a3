//! The slot KV cache: per layer one key and one value buffer of shape
//! `[slots, heads, max_len, head_dim]`, float32 or float16 (`KvDtype`), in
//! which each running row
//! owns a slot. Rows never move: a step binds a view of a range of slots as
//! both past and present, and GroupQueryAttention writes each new key/value
//! at the row's own position.
//!
//! The buffers are anonymous memory mappings, so the whole `slots × max_len`
//! area is only reserved: a page becomes resident when a token is written to
//! it, and a freed slot gives its pages back (`MADV_DONTNEED`). Memory in
//! use therefore follows the tokens held, which is what admission budgets.
// unsafe: the cache is an anonymous memory mapping (mmap, madvise, munmap)
// that ORT reads and writes through raw tensor views.
#![allow(unsafe_code)]
use std::ops::Range;
use std::ptr::NonNull;

/// One mapped `[slots, heads, max_len, head_dim]` buffer.
pub(super) struct Region {
    ptr: NonNull<u8>,
    bytes: usize,
}

// SAFETY: the region is plain memory owned by one cache; the cache lives on
// one worker thread at a time.
unsafe impl Send for Region {}

impl Region {
    pub(super) fn new(bytes: usize) -> std::io::Result<Self> {
        let bytes = bytes.max(1);
        // SAFETY: an anonymous private mapping; checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Region { ptr: NonNull::new(ptr.cast()).expect("mmap returned null"), bytes })
    }

    pub(super) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping holds `bytes` bytes (zero-filled on first touch).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.bytes) }
    }

    /// Gives the whole pages inside `range` (bytes) back to the kernel;
    /// they read as zeros afterwards.
    pub(super) fn release(&mut self, range: Range<usize>) {
        let page = 4096;
        let base = self.ptr.as_ptr() as usize;
        let start = (base + range.start).div_ceil(page) * page;
        let end = (base + range.end) / page * page;
        if end > start {
            // SAFETY: [start, end) lies inside the mapping; its contents are no longer needed.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `Region::new` with this size.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

/// Geometry of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    pub layers: usize,
    pub slots: usize,
    pub heads: usize,
    /// Columns per slot: the model's context length.
    pub max_len: usize,
    pub head_dim: usize,
    pub dtype: KvDtype,
}

/// Element type of the KV cache (`--kv-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KvDtype {
    /// float32, attended by ONNX Runtime's GroupQueryAttention.
    #[default]
    Fp32,
    /// float16 (half the memory per token), attended by batchgen's own
    /// kernel (`super::attention`), which computes in float32.
    Fp16,
}

impl KvDtype {
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::Fp32 => 4,
            KvDtype::Fp16 => 2,
        }
    }

    /// The name ModelInfo reports (`float32`, `float16`).
    pub fn onnx_name(self) -> &'static str {
        match self {
            KvDtype::Fp32 => "float32",
            KvDtype::Fp16 => "float16",
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvDtype::Fp32 => "fp32",
            KvDtype::Fp16 => "fp16",
        })
    }
}

impl CacheShape {
    /// Elements one slot takes in one buffer.
    pub fn slot_elements(&self) -> usize {
        self.heads * self.max_len * self.head_dim
    }

    /// Bytes one slot takes in one buffer.
    fn slot_bytes(&self) -> usize {
        self.slot_elements() * self.dtype.bytes()
    }

    /// The byte ranges, head by head, of the first `len` positions of
    /// `slot` in one buffer.
    fn prefix(&self, slot: usize, len: usize) -> impl Iterator<Item = Range<usize>> {
        let e = self.dtype.bytes();
        let (start, column, n) = (slot * self.slot_bytes(), self.max_len * self.head_dim * e, len * self.head_dim * e);
        (0..self.heads).map(move |h| start + h * column..start + h * column + n)
    }

    /// Bytes one token takes over all layers, keys and values.
    pub fn token_bytes(&self) -> usize {
        2 * self.layers * self.heads * self.head_dim * self.dtype.bytes()
    }
}

pub struct SlotCache {
    pub shape: CacheShape,
    /// Key and value buffer of each layer.
    layers: Vec<(Region, Region)>,
}

impl SlotCache {
    pub fn new(shape: CacheShape) -> std::io::Result<Self> {
        let n = shape.slots * shape.slot_bytes();
        let layers =
            (0..shape.layers).map(|_| Ok((Region::new(n)?, Region::new(n)?))).collect::<std::io::Result<_>>()?;
        Ok(SlotCache { shape, layers })
    }

    /// Raw pointers to the key and value buffers of `layer`, at the first
    /// slot of `slots` (for binding a view of those slots).
    pub fn views(&mut self, layer: usize, slots: &Range<usize>) -> (*mut u8, *mut u8) {
        assert!(slots.end <= self.shape.slots && layer < self.shape.layers);
        let offset = slots.start * self.shape.slot_bytes();
        let (k, v) = &mut self.layers[layer];
        // SAFETY: offset is inside both mappings (checked above).
        unsafe { (k.ptr.as_ptr().add(offset), v.ptr.as_ptr().add(offset)) }
    }

    /// Copies the first `len` positions of slot `from` into slot `to` (the
    /// samples and beams of one request). Returns the bytes copied.
    pub fn copy_slot(&mut self, from: usize, to: usize, len: usize) -> usize {
        let s = self.shape;
        assert!(from < s.slots && to < s.slots && len <= s.max_len);
        if from == to {
            return 0;
        }
        for (k, v) in &mut self.layers {
            for region in [k, v] {
                let data = region.as_mut_slice();
                for (src, dst) in s.prefix(from, len).zip(s.prefix(to, len)) {
                    data.copy_within(src, dst.start);
                }
            }
        }
        len * s.token_bytes()
    }

    /// Makes slots `to[j]` hold what slots `from[j]` hold (a beam step:
    /// `to` are the request's slots, `from` their parents among them), for
    /// the first `len` positions. Returns the bytes copied.
    pub fn permute(&mut self, to: &[usize], from: &[usize], len: usize) -> usize {
        let moves: Vec<(usize, usize)> = to.iter().zip(from).filter(|(t, f)| t != f).map(|(&t, &f)| (t, f)).collect();
        // Sources that are overwritten by another move are read first.
        let mut saved: std::collections::HashMap<usize, Vec<u8>> = std::collections::HashMap::new();
        for &(_, f) in &moves {
            if moves.iter().any(|&(t, _)| t == f) && !saved.contains_key(&f) {
                let mut buf = Vec::new();
                self.each_prefix(f, len, |part| buf.extend_from_slice(part));
                saved.insert(f, buf);
            }
        }
        for &(t, f) in &moves {
            match saved.get(&f) {
                None => {
                    self.copy_slot(f, t, len);
                }
                Some(buf) => {
                    let mut at = 0;
                    self.each_prefix(t, len, |part| {
                        part.copy_from_slice(&buf[at..at + part.len()]);
                        at += part.len();
                    });
                }
            }
        }
        moves.len() * len * self.shape.token_bytes()
    }

    /// Calls `f` on the first `len` positions of `slot`, for every layer,
    /// key then value, head by head.
    fn each_prefix(&mut self, slot: usize, len: usize, mut f: impl FnMut(&mut [u8])) {
        let s = self.shape;
        for (k, v) in &mut self.layers {
            for region in [k, v] {
                let data = region.as_mut_slice();
                for range in s.prefix(slot, len) {
                    f(&mut data[range]);
                }
            }
        }
    }

    /// Bytes a block of `block` positions takes outside the cache: every
    /// layer's keys and values, laid out `[layer][key, value][head][block][head_dim]`.
    pub fn block_bytes(&self, block: usize) -> usize {
        block * self.shape.token_bytes()
    }

    /// Pairs of byte ranges (in one layer buffer of the cache, in a block laid
    /// out as `block_bytes` says) for positions `from..from + n` of a block of
    /// `block` positions placed at position `at` of `slot`; with the layer and
    /// whether it is the value buffer.
    fn block_spans(
        &self,
        slot: usize,
        at: usize,
        block: usize,
        from: usize,
        n: usize,
    ) -> impl Iterator<Item = (usize, bool, Range<usize>, Range<usize>)> + use<> {
        let s = self.shape;
        assert!(slot < s.slots && from + n <= block && at + from + n <= s.max_len);
        let e = s.dtype.bytes();
        let (row, span) = (s.head_dim * e, n * s.head_dim * e);
        let (column, head_block) = (s.max_len * row, block * row);
        (0..s.layers).flat_map(move |layer| {
            [false, true].into_iter().flat_map(move |value| {
                (0..s.heads).map(move |h| {
                    let in_cache = slot * s.slot_bytes() + h * column + (at + from) * row;
                    let in_block = ((layer * 2 + usize::from(value)) * s.heads + h) * head_block + from * row;
                    (layer, value, in_cache..in_cache + span, in_block..in_block + span)
                })
            })
        })
    }

    /// Copies positions `at..at + block` of `slot` into `out`
    /// (`block_bytes(block)` bytes, laid out as that says).
    pub fn read_block(&mut self, slot: usize, at: usize, block: usize, out: &mut [u8]) {
        assert_eq!(out.len(), self.block_bytes(block));
        for (layer, value, cache, b) in self.block_spans(slot, at, block, 0, block) {
            let (k, v) = &mut self.layers[layer];
            let region = if value { v } else { k };
            out[b].copy_from_slice(&region.as_mut_slice()[cache]);
        }
    }

    /// Writes positions `from..from + n` of a block of `block` positions
    /// (read by `read_block`) into `slot`, the block starting at position
    /// `at`. Returns the bytes written.
    pub fn write_block(&mut self, slot: usize, at: usize, data: &[u8], block: usize, from: usize, n: usize) -> usize {
        assert_eq!(data.len(), self.block_bytes(block));
        for (layer, value, cache, b) in self.block_spans(slot, at, block, from, n) {
            let (k, v) = &mut self.layers[layer];
            let region = if value { v } else { k };
            region.as_mut_slice()[cache].copy_from_slice(&data[b]);
        }
        n * self.shape.token_bytes()
    }

    /// Returns a freed slot's memory to the kernel.
    pub fn release(&mut self, slot: usize) {
        let n = self.shape.slot_bytes();
        for (k, v) in &mut self.layers {
            k.release(slot * n..(slot + 1) * n);
            v.release(slot * n..(slot + 1) * n);
        }
    }

    /// Reads position `pos` of head `head` in slot `slot` of a layer's keys
    /// (a float32 cache).
    #[cfg(test)]
    fn key(&mut self, layer: usize, slot: usize, head: usize, pos: usize) -> Vec<f32> {
        let s = self.shape;
        let at = (slot * s.slot_elements() + (head * s.max_len + pos) * s.head_dim) * 4;
        let bytes = &self.layers[layer].0.as_mut_slice()[at..at + s.head_dim * 4];
        bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> SlotCache {
        SlotCache::new(CacheShape { layers: 2, slots: 4, heads: 2, max_len: 8, head_dim: 3, dtype: KvDtype::Fp32 })
            .unwrap()
    }

    fn fill(c: &mut SlotCache, slot: usize, tag: f32) {
        let s = c.shape;
        for (k, v) in &mut c.layers {
            for (r, region) in [k, v].into_iter().enumerate() {
                let data = region.as_mut_slice();
                let start = slot * s.slot_bytes();
                for (i, x) in data[start..start + s.slot_bytes()].chunks_exact_mut(4).enumerate() {
                    x.copy_from_slice(&(tag + r as f32 * 0.5 + i as f32 * 1e-3).to_le_bytes());
                }
            }
        }
    }

    #[test]
    fn copy_slot_copies_only_the_prefix_of_one_slot() {
        let mut c = cache();
        fill(&mut c, 0, 1.0);
        fill(&mut c, 2, 3.0);
        let bytes = c.copy_slot(0, 1, 5);
        assert_eq!(bytes, 5 * c.shape.token_bytes());
        assert_eq!(c.key(1, 1, 1, 4), c.key(1, 0, 1, 4));
        assert_eq!(c.key(0, 1, 0, 5), vec![0.0; 3], "beyond len stays empty");
        assert_ne!(c.key(0, 2, 0, 0), c.key(0, 1, 0, 0), "other slots untouched");
    }

    #[test]
    fn permute_handles_swaps_and_duplicates() {
        let mut c = cache();
        for s in 0..3 {
            fill(&mut c, s, s as f32 * 10.0);
        }
        let before: Vec<Vec<f32>> = (0..3).map(|s| c.key(1, s, 1, 2)).collect();
        // Slot 0 takes slot 1's row, slot 1 takes slot 0's, slot 2 copies slot 1.
        c.permute(&[0, 1, 2], &[1, 0, 1], 4);
        assert_eq!(c.key(1, 0, 1, 2), before[1]);
        assert_eq!(c.key(1, 1, 1, 2), before[0]);
        assert_eq!(c.key(1, 2, 1, 2), before[1]);
    }

    #[test]
    fn blocks_read_from_one_slot_write_into_another_at_their_positions() {
        let mut c = cache();
        fill(&mut c, 0, 1.0);
        let mut block = vec![0u8; c.block_bytes(3)];
        c.read_block(0, 2, 3, &mut block);
        // Positions 2..5 of slot 0 become 2..5 of slot 3, but only the last
        // two of the block are written.
        assert_eq!(c.write_block(3, 2, &block, 3, 1, 2), 2 * c.shape.token_bytes());
        for layer in 0..2 {
            for head in 0..2 {
                assert_eq!(c.key(layer, 3, head, 2), vec![0.0; 3], "position 2 was not asked for");
                for pos in 3..5 {
                    assert_eq!(c.key(layer, 3, head, pos), c.key(layer, 0, head, pos));
                }
                assert_eq!(c.key(layer, 3, head, 5), vec![0.0; 3]);
            }
        }
        // Values too: the value buffer of the last layer, last head.
        let s = c.shape;
        let at = (3 * s.slot_elements() + (s.max_len + 4) * s.head_dim) * 4;
        let from = (s.max_len + 4) * s.head_dim * 4;
        let v = c.layers[1].1.as_mut_slice();
        let (got, want) = (v[at..at + 12].to_vec(), v[from..from + 12].to_vec());
        assert_eq!(got, want);
        assert_ne!(want, vec![0u8; 12]);
    }

    #[test]
    fn released_slots_read_as_zero() {
        let shape = CacheShape { layers: 1, slots: 2, heads: 2, max_len: 1024, head_dim: 64, dtype: KvDtype::Fp32 };
        let mut c = SlotCache::new(shape).unwrap();
        fill(&mut c, 1, 2.0);
        c.release(1);
        assert_eq!(c.key(0, 1, 1, 100), vec![0.0; 64]);
    }
}
