//! The paged KV cache (`--kv-layout paged`): per layer one key and one
//! value pool of `[blocks, heads, block, head_dim]`, float32 or float16,
//! from which rows take blocks of `block` positions as they grow. A row's
//! block table says which pool block holds each run of its positions
//! (`super::attention::PagedAttention` reads and writes through it), so a
//! block can serve several rows at once: the prefix cache's blocks are the
//! very blocks the rows that computed them wrote, and a row that finds them
//! takes references, not copies.
//!
//! Each block has a reference count: every row whose table names it, and
//! the prefix cache while it indexes it. A block is written only by a row
//! that holds its sole reference (the engine copies a shared block before a
//! row writes into it), so readers never see it change. A block whose last
//! reference goes is free again. Its pages go back to the kernel
//! (`MADV_DONTNEED`), so memory in use follows the blocks held, except for a
//! bounded few freed blocks kept resident (`KEEP_BYTES`, at most an eighth
//! of the pool) that `alloc` hands out first: rows finish and start every
//! step under load, and giving a block's pages back only to fault them in
//! again a step later costs a madvise per layer buffer, TLB shootdowns on
//! every core and a page fault per page.
use std::cell::Cell;
use std::collections::BTreeSet;
use std::ops::Range;

use super::cache::{KvDtype, Region};

/// Memory that freed blocks may keep resident, at most (see the module).
pub const KEEP_BYTES: usize = 64 << 20;

/// Geometry of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolShape {
    pub layers: usize,
    /// Blocks in each layer's pool.
    pub blocks: usize,
    pub heads: usize,
    /// Positions per block.
    pub block: usize,
    pub head_dim: usize,
    pub dtype: KvDtype,
}

impl PoolShape {
    /// Bytes one block takes in one layer's key (or value) pool.
    fn block_bytes_per_buffer(&self) -> usize {
        self.heads * self.block * self.head_dim * self.dtype.bytes()
    }

    /// Bytes one block takes over all layers, keys and values (what the
    /// prefix cache budgets and what `read`/`write` move).
    pub fn block_bytes(&self) -> usize {
        2 * self.layers * self.block_bytes_per_buffer()
    }

    /// Bytes one token takes over all layers, keys and values.
    pub fn token_bytes(&self) -> usize {
        2 * self.layers * self.heads * self.head_dim * self.dtype.bytes()
    }
}

pub struct BlockPool {
    pub shape: PoolShape,
    layers: Vec<(Region, Region)>,
    refs: Vec<Cell<u32>>,
    /// Free blocks whose pages were given back; the lowest is taken first,
    /// so the blocks in use stay packed at the front of the mapping.
    free: BTreeSet<u32>,
    /// Free blocks whose pages are still resident, taken before `free`.
    warm: BTreeSet<u32>,
    /// Most blocks `warm` holds.
    keep: usize,
}

impl BlockPool {
    pub fn new(shape: PoolShape) -> std::io::Result<Self> {
        assert!(shape.blocks <= u32::MAX as usize && shape.block > 0);
        let n = shape.blocks * shape.block_bytes_per_buffer();
        let layers =
            (0..shape.layers).map(|_| Ok((Region::new(n)?, Region::new(n)?))).collect::<std::io::Result<_>>()?;
        Ok(BlockPool {
            shape,
            layers,
            refs: vec![Cell::new(0); shape.blocks],
            free: (0..shape.blocks as u32).collect(),
            warm: BTreeSet::new(),
            keep: (KEEP_BYTES / shape.block_bytes().max(1)).min(shape.blocks / 8),
        })
    }

    /// A free block, with one reference (the caller's); none when every
    /// block is taken. A block still resident goes first.
    pub fn alloc(&mut self) -> Option<u32> {
        let id = self.warm.pop_first().or_else(|| self.free.pop_first())?;
        self.refs[id as usize].set(1);
        Some(id)
    }

    /// One more reference to `id`.
    pub fn retain(&self, id: u32) -> u32 {
        let r = &self.refs[id as usize];
        assert!(r.get() > 0, "block {id} is free");
        r.set(r.get() + 1);
        id
    }

    /// Drops one reference to `id`; the last one frees it.
    pub fn release(&mut self, id: u32) {
        let r = &self.refs[id as usize];
        assert!(r.get() > 0, "block {id} released twice");
        r.set(r.get() - 1);
        if r.get() == 0 {
            self.warm.insert(id);
            // Beyond the bound, the highest resident block gives its pages
            // back (the lowest are the likeliest to be taken again).
            if self.warm.len() > self.keep {
                let id = self.warm.pop_last().expect("warm is not empty");
                let n = self.shape.block_bytes_per_buffer();
                let range = id as usize * n..(id as usize + 1) * n;
                for (k, v) in &mut self.layers {
                    k.release(range.clone());
                    v.release(range.clone());
                }
                self.free.insert(id);
            }
        }
    }

    /// References `id` has (0: free).
    pub fn refs(&self, id: u32) -> u32 {
        self.refs[id as usize].get()
    }

    /// Blocks taken.
    pub fn used(&self) -> usize {
        self.shape.blocks - self.free.len() - self.warm.len()
    }

    /// Free blocks whose pages are still resident.
    pub fn warm(&self) -> usize {
        self.warm.len()
    }

    /// Raw pointers to the key and value pools of `layer` (for binding).
    pub fn views(&mut self, layer: usize) -> (*mut u8, *mut u8) {
        let (k, v) = &mut self.layers[layer];
        (k.as_mut_slice().as_mut_ptr(), v.as_mut_slice().as_mut_ptr())
    }

    /// The byte ranges, head by head, of the first `n` positions of block
    /// `id` in one layer buffer.
    fn spans(&self, id: u32, n: usize) -> impl Iterator<Item = std::ops::Range<usize>> + use<> {
        let s = self.shape;
        assert!((id as usize) < s.blocks && n <= s.block);
        // (`copy` shifts these by a start position within the block.)
        let row = s.head_dim * s.dtype.bytes();
        let start = id as usize * s.block_bytes_per_buffer();
        (0..s.heads).map(move |h| {
            let at = start + h * s.block * row;
            at..at + n * row
        })
    }

    /// Copies positions `at` of block `from` into the same positions of
    /// block `to` (a block a row shares, before the row writes into it).
    /// Returns the bytes copied.
    pub fn copy(&mut self, from: u32, to: u32, at: Range<usize>) -> usize {
        let n = at.len();
        let skip = at.start * self.shape.head_dim * self.shape.dtype.bytes();
        let shift = |r: Range<usize>| r.start + skip..r.end + skip;
        let pairs: Vec<_> = self.spans(from, n).map(shift).zip(self.spans(to, n).map(shift)).collect();
        for (k, v) in &mut self.layers {
            for region in [k, v] {
                let data = region.as_mut_slice();
                for (src, dst) in &pairs {
                    data.copy_within(src.clone(), dst.start);
                }
            }
        }
        n * self.shape.token_bytes()
    }

    /// Block `id` laid out `[layer][key, value][head][block][head_dim]`
    /// (the layout `SlotCache::read_block` writes), appended to `out`.
    pub fn read(&mut self, id: u32, out: &mut Vec<u8>) {
        let spans: Vec<_> = self.spans(id, self.shape.block).collect();
        for (k, v) in &mut self.layers {
            for region in [k, v] {
                let data = region.as_mut_slice();
                for span in &spans {
                    out.extend_from_slice(&data[span.clone()]);
                }
            }
        }
    }

    /// Writes what `read` gave (`block_bytes` bytes) into block `id`.
    pub fn write(&mut self, id: u32, block: &[u8]) {
        assert_eq!(block.len(), self.shape.block_bytes());
        let spans: Vec<_> = self.spans(id, self.shape.block).collect();
        let mut at = 0;
        for (k, v) in &mut self.layers {
            for region in [k, v] {
                let data = region.as_mut_slice();
                for span in &spans {
                    data[span.clone()].copy_from_slice(&block[at..at + span.len()]);
                    at += span.len();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(blocks: usize) -> BlockPool {
        BlockPool::new(PoolShape { layers: 2, blocks, heads: 2, block: 4, head_dim: 3, dtype: KvDtype::Fp32 }).unwrap()
    }

    fn filled(p: &mut BlockPool, id: u32, tag: u8) {
        let data: Vec<u8> = (0..p.shape.block_bytes()).map(|i| tag.wrapping_add(i as u8)).collect();
        p.write(id, &data);
    }

    fn contents(p: &mut BlockPool, id: u32) -> Vec<u8> {
        let mut out = Vec::new();
        p.read(id, &mut out);
        out
    }

    #[test]
    fn blocks_are_taken_lowest_first_and_freed_by_their_last_reference() {
        let mut p = pool(3);
        assert_eq!((p.alloc(), p.alloc()), (Some(0), Some(1)));
        p.retain(0);
        p.release(0);
        assert_eq!(p.refs(0), 1, "one reference left");
        assert_eq!(p.alloc(), Some(2));
        assert_eq!(p.alloc(), None, "every block is taken");
        p.release(0);
        assert_eq!((p.refs(0), p.used()), (0, 2));
        assert_eq!(p.alloc(), Some(0));
    }

    #[test]
    fn a_bounded_few_freed_blocks_stay_resident_and_are_taken_first() {
        // 16 blocks of one 4 KiB page per layer buffer (2 heads × 4
        // positions × 128 floats), so a block given back reads as zeros; an
        // eighth of them, 2, may stay resident once freed.
        let shape = PoolShape { layers: 2, blocks: 16, heads: 2, block: 4, head_dim: 128, dtype: KvDtype::Fp32 };
        let mut p = BlockPool::new(shape).unwrap();
        let ids: Vec<u32> = (0..4).map(|_| p.alloc().unwrap()).collect();
        assert_eq!(ids, [0, 1, 2, 3]);
        for &id in &ids {
            filled(&mut p, id, id as u8 + 1);
        }
        let kept = contents(&mut p, 0);
        for &id in ids.iter().rev() {
            p.release(id);
        }
        // Freed 3, 2, 1, 0: each time the highest resident one beyond two
        // gave its pages back, so 0 and 1 stay resident.
        assert_eq!((p.used(), p.warm()), (0, 2));
        assert_eq!(p.alloc(), Some(0), "a resident block first");
        assert_eq!(contents(&mut p, 0), kept, "its pages were kept");
        assert_eq!(p.alloc(), Some(1));
        assert_eq!(p.alloc(), Some(2), "then the lowest given back");
        assert!(contents(&mut p, 2).iter().all(|&b| b == 0), "its pages went back: zeros");
        assert_eq!((p.used(), p.warm()), (3, 0));
    }

    #[test]
    fn read_write_and_copy_move_exactly_the_positions_asked_for() {
        let mut p = pool(3);
        for _ in 0..3 {
            p.alloc();
        }
        filled(&mut p, 0, 7);
        let a = contents(&mut p, 0);
        assert_eq!(a.len(), p.shape.block_bytes());
        p.write(1, &a);
        assert_eq!(contents(&mut p, 1), a);
        // Two of four positions: per (layer, key/value, head) the first
        // 2 × 3 floats come over, the rest stays zero.
        assert_eq!(p.copy(0, 2, 1..3), 2 * p.shape.token_bytes());
        let c = contents(&mut p, 2);
        // Per (layer, key/value, head): 4 positions of 3 floats, 48 bytes;
        // positions 1 and 2 come over, 0 and 3 stay zero.
        for (i, chunk) in c.chunks(48).enumerate() {
            assert!(chunk[..12].iter().all(|&b| b == 0));
            assert_eq!(&chunk[12..36], &a[i * 48 + 12..i * 48 + 36]);
            assert!(chunk[36..].iter().all(|&b| b == 0));
        }
    }
}
