//! The built graph over a paged KV cache (`--kv-layout paged`): each row
//! has a block table into its worker's pool (`crate::graph::pool`) instead
//! of a slot of its own, and batchgen's `PagedAttention` reads and writes
//! through the tables.
//!
//! What the tables buy:
//! - **The prefix cache shares, it does not copy.** Its blocks are pool
//!   blocks: storing a row's prompt takes a reference to the blocks the row
//!   wrote, and a hit puts the cached blocks into the new row's table. 16
//!   rows whose prompts share 512 tokens hold those 512 once, and a hit
//!   costs no copy; a block several rows hold is also read once per step
//!   for all of them (the kernel runs a head's rows together).
//! - **Samples and beams share their prompt** the same way: a fork takes
//!   references to the whole blocks and copies only the last, partly
//!   filled one; a beam step re-points tables instead of copying caches.
//! - **Any rows run together**: prompts on a cached past beside each other,
//!   decode rows at any lengths, in the caller's order, with no rider rows.
//!
//! Measured (docs/performance.md, "Paged KV cache", 124M fp32, Intel Xeon):
//! 16 streams sharing a 512-token prefix step in 47 ms instead of 77 with
//! the slot layout's copies (each row read its own 37.7 MB copy a step), make
//! 3.69× the tokens/s of the cache off (slots: 2.2×), and peak at 1.29 GB
//! instead of 1.59; a hit costs no copy where slots paid 16.5 ms for 512
//! tokens. Short prompts run as fast or faster (32 streams +7–11 %); long
//! distinct prompts as fast as GroupQueryAttention over slots (0.99–1.02).
//!
//! A row writes only into blocks it holds alone: before a step, a shared
//! block where the row's new positions land is copied into a block of its
//! own (a prompt served whole from the cache but its last token, whose
//! logits must be computed). The prefix cache is this worker's own (its
//! blocks live in this worker's pool); its budget counts the blocks no row
//! holds, since those are the memory it adds. Admission counts each
//! running row's tokens as if it held them alone and then gives back what
//! the rows share (a block three rows hold costs one block's positions, not
//! three); a waiting request counts its whole prompt until it runs. The pool is sized so that it cannot run
//! out: every slot's longest table, one spare block per slot for a copy, and
//! the prefix cache's budget.
use std::time::Instant;

use super::admission::{self, Candidate, Limits};
use super::backend::{Backend, Chunk, Copies, SlotTable, Swapped, padded, real};
use super::model::{ForwardError, Logits};
use super::prefix::PrefixCache;
use crate::graph::{PagedModel, RowInput};

pub struct PagedBackend {
    model: PagedModel,
    slots: SlotTable,
    /// Each slot's block table: block `j` holds positions `j × block..`.
    tables: Vec<Vec<u32>>,
    /// This worker's prefix cache of pool blocks.
    prefix: Option<PrefixCache<u32>>,
    copies: Copies,
}

/// Pool blocks a worker of `slots` slots needs so that it never runs out:
/// every slot's longest table plus a spare for a copy, and `cached` blocks
/// of the prefix cache no row holds.
pub fn pool_blocks(slots: usize, max_len: usize, block: usize, cached: usize) -> usize {
    slots * (max_len.div_ceil(block) + 1) + cached
}

fn exhausted() -> ForwardError {
    ForwardError::Run("the KV block pool is exhausted".into())
}

impl PagedBackend {
    /// `prefix`: this worker's prefix cache, whose blocks are `model`'s pool blocks.
    pub fn new(model: PagedModel, slots: usize, prefix: Option<PrefixCache<u32>>) -> Self {
        PagedBackend {
            model,
            slots: SlotTable::new(slots),
            tables: vec![Vec::new(); slots],
            prefix,
            copies: Copies::default(),
        }
    }

    fn block(&self) -> usize {
        self.model.pool.shape.block
    }

    /// Makes `slot`'s table cover positions `..end`, with every block that
    /// positions `len..end` fall in its own (a shared one is copied first).
    fn make_room(&mut self, slot: usize, end: usize) -> Result<(), ForwardError> {
        let (bs, len) = (self.block(), self.slots.lens[slot]);
        let pool = &mut self.model.pool;
        let table = &mut self.tables[slot];
        for j in len / bs..end.div_ceil(bs).min(table.len()) {
            let id = table[j];
            if pool.refs(id) > 1 {
                let own = pool.alloc().ok_or_else(exhausted)?;
                // Only a prefix cache hit shares a block a row writes into
                // (a prompt served whole but its last token).
                let kept = len.saturating_sub(j * bs).min(bs);
                self.copies.hit_bytes += pool.copy(id, own, 0..kept);
                pool.release(id);
                table[j] = own;
            }
        }
        while table.len() * bs < end {
            table.push(pool.alloc().ok_or_else(exhausted)?);
        }
        Ok(())
    }

    /// A table holding what `from`'s holds for its first `len` positions:
    /// the whole blocks shared, the last partial one copied; with the bytes
    /// copied.
    fn share(&mut self, from: usize, len: usize) -> Result<(Vec<u32>, usize), ForwardError> {
        let bs = self.block();
        let pool = &mut self.model.pool;
        let source = &self.tables[from];
        let mut table: Vec<u32> = source[..len / bs].iter().map(|&id| pool.retain(id)).collect();
        let mut bytes = 0;
        if !len.is_multiple_of(bs) {
            let own = pool.alloc().ok_or_else(exhausted)?;
            bytes = pool.copy(source[len / bs], own, 0..len % bs);
            table.push(own);
        }
        Ok((table, bytes))
    }

    /// Blocks the rows' tables name, each once.
    fn distinct_blocks(&self) -> usize {
        let mut seen = vec![false; self.model.pool.shape.blocks];
        let mut blocks = 0;
        for &id in self.tables.iter().flatten() {
            blocks += usize::from(!std::mem::replace(&mut seen[id as usize], true));
        }
        blocks
    }

    fn drop_table(&mut self, slot: usize) {
        for id in std::mem::take(&mut self.tables[slot]) {
            self.model.pool.release(id);
        }
    }

    /// Drops the references the prefix cache let go of.
    fn release_all(&mut self, ids: Vec<u32>) {
        for id in ids {
            self.model.pool.release(id);
        }
    }

    /// Runs `rows` (slot, tokens, logits wanted) and advances their lengths.
    fn run(&mut self, rows: &[(usize, &[u32], usize)]) -> Result<Logits, ForwardError> {
        for &(slot, tokens, _) in rows {
            self.make_room(slot, self.slots.lens[slot] + tokens.len())?;
        }
        let inputs: Vec<RowInput<'_>> = rows
            .iter()
            .map(|&(slot, tokens, logits)| RowInput { tokens, past: self.slots.lens[slot], logits })
            .collect();
        let tables: Vec<&[u32]> = rows.iter().map(|&(slot, _, _)| self.tables[slot].as_slice()).collect();
        let logits = self.model.run(&inputs, &tables)?;
        for &(slot, tokens, _) in rows {
            self.slots.lens[slot] += tokens.len();
        }
        Ok(logits)
    }
}

impl Backend for PagedBackend {
    fn alloc(&mut self, n: usize) -> Option<Vec<usize>> {
        self.slots.alloc(n)
    }

    fn free(&mut self, slots: &[usize]) {
        for &s in slots {
            self.slots.free(s);
            self.drop_table(s);
        }
        if let Some(prefix) = &self.prefix {
            let pool = &self.model.pool;
            let gone = prefix.trim(|&id| pool.refs(id) > 1);
            self.release_all(gone);
        }
    }

    fn chunks(&self) -> bool {
        true
    }

    fn pauses(&self) -> bool {
        // A row left out of a step keeps its blocks.
        true
    }

    fn mixes_chunks(&self) -> bool {
        true
    }

    fn prefill(&mut self, chunks: &[Chunk<'_>]) -> Result<Logits, ForwardError> {
        // Chunks run together, right-padded to the longest of a group, as
        // long as padding stays below half of the work.
        let mut logits = Logits::new(self.model.vocab, Vec::with_capacity(chunks.len() * self.model.vocab));
        let mut i = 0;
        while i < chunks.len() {
            let mut j = i + 1;
            while j < chunks.len() && padded(&chunks[i..=j]) <= 2 * real(&chunks[i..=j]).max(64) {
                j += 1;
            }
            let rows: Vec<(usize, &[u32], usize)> = chunks[i..j].iter().map(|c| (c.slot, c.tokens, 1)).collect();
            logits.append(self.run(&rows)?);
            i = j;
        }
        Ok(logits)
    }

    fn fork(&mut self, from: usize, to: &[usize]) -> Result<usize, ForwardError> {
        let len = self.slots.lens[from];
        let mut bytes = 0;
        for &t in to {
            let (table, copied) = self.share(from, len)?;
            bytes += copied;
            self.drop_table(t);
            self.tables[t] = table;
            self.slots.lens[t] = len;
        }
        Ok(bytes)
    }

    fn decode(&mut self, rows: &[(usize, u32)]) -> Result<Logits, ForwardError> {
        if rows.is_empty() {
            return Err(ForwardError::Input("a decode step without rows".into()));
        }
        let tokens: Vec<[u32; 1]> = rows.iter().map(|&(_, t)| [t]).collect();
        let rows: Vec<(usize, &[u32], usize)> =
            rows.iter().zip(&tokens).map(|(&(slot, _), t)| (slot, t.as_slice(), 1)).collect();
        self.run(&rows)
    }

    fn speculates(&self) -> bool {
        true
    }

    fn verify_room(&self, slots: &[usize]) -> usize {
        let longest = slots.iter().map(|&s| self.slots.lens[s]).max().unwrap_or(0);
        self.model.max_len.saturating_sub(longest).max(1)
    }

    fn verify(&mut self, rows: &[(usize, &[u32])]) -> Result<Logits, ForwardError> {
        if rows.is_empty() {
            return Err(ForwardError::Input("a verification step without rows".into()));
        }
        let rows: Vec<(usize, &[u32], usize)> = rows.iter().map(|&(slot, t)| (slot, t, t.len())).collect();
        self.run(&rows)
    }

    fn rollback(&mut self, slot: usize, n: usize) {
        self.slots.lens[slot] -= n.min(self.slots.lens[slot]);
    }

    fn reorder(&mut self, slots: &[usize], parents: &[usize]) -> Result<usize, ForwardError> {
        // Every new table is made from the old ones before any is dropped;
        // the first child of a parent that is that parent keeps its table.
        let mut bytes = 0;
        let mut new = Vec::with_capacity(slots.len());
        for (j, &p) in parents.iter().enumerate() {
            let (slot, parent) = (slots[j], slots[p]);
            if slot == parent {
                new.push(None);
            } else {
                let len = self.slots.lens[parent];
                let (table, copied) = self.share(parent, len)?;
                bytes += copied;
                new.push(Some((table, len)));
            }
        }
        for (j, table) in new.into_iter().enumerate() {
            if let Some((table, len)) = table {
                self.drop_table(slots[j]);
                self.tables[slots[j]] = table;
                self.slots.lens[slots[j]] = len;
            }
        }
        Ok(bytes)
    }

    fn held_tokens(&self) -> usize {
        // Positions of the blocks rows hold, a block several rows share
        // once (the prefix cache's own blocks are its gauges').
        self.distinct_blocks() * self.block()
    }

    fn admit(&self, limits: &Limits, running: &[Candidate], queue: &mut dyn Iterator<Item = Candidate>) -> usize {
        // The running rows count what they hold as if alone; a block several
        // of them share is held once, so the budget grows by the positions
        // of every reference to a block beyond its first.
        let shared = (self.tables.iter().map(Vec::len).sum::<usize>() - self.distinct_blocks()) * self.block();
        let limits = Limits { max_batch_tokens: limits.max_batch_tokens + shared, ..*limits };
        admission::admit_slots(&limits, running, queue)
    }

    fn take_copies(&mut self) -> Copies {
        std::mem::take(&mut self.copies)
    }

    fn prefix_block(&self) -> Option<usize> {
        self.prefix.as_ref().map(|p| p.block())
    }

    fn reuse(&mut self, slot: usize, prompt: &[u32], held: usize) -> usize {
        let Some(prefix) = &self.prefix else { return 0 };
        debug_assert_eq!(self.slots.lens[slot], held, "the worker and the backend agree on what a slot holds");
        let bs = prefix.block();
        let t = Instant::now();
        let Some((chain, _, cached)) = prefix.extend(prompt, held) else { return 0 };
        let pool = &mut self.model.pool;
        let table = &mut self.tables[slot];
        for (j, &id) in chain.iter().enumerate().skip(held / bs) {
            if j * bs >= cached {
                break;
            }
            match table.get(j) {
                // The row's own block, partly filled: the rest comes over.
                Some(&own) => {
                    let end = (cached - j * bs).min(bs);
                    self.copies.hit_bytes += pool.copy(id, own, held.max(j * bs) - j * bs..end);
                }
                None => table.push(pool.retain(id)),
            }
        }
        self.slots.lens[slot] = cached;
        self.copies.hit_ns += t.elapsed().as_nanos() as u64;
        cached - held
    }

    fn remember(&mut self, slot: usize, tokens: &[u32], _prefilling: bool) {
        let Some(prefix) = &self.prefix else { return };
        let held = self.slots.lens[slot].min(tokens.len());
        if held < prefix.block() {
            return;
        }
        // The cache takes references to the row's own blocks: no copy. A
        // row holds what it stored, so it is in use (never evicted) until
        // the row lets go of it.
        let pool = &self.model.pool;
        let table = &self.tables[slot];
        let done = prefix.insert(&tokens[..held], |j| pool.retain(table[j]), |&id| pool.refs(id) > 1);
        self.release_all(done.dropped);
    }

    fn swaps(&self) -> bool {
        true
    }

    fn swap_bytes(&self, slot: usize) -> usize {
        self.slots.lens[slot].div_ceil(self.block()) * self.model.pool.shape.block_bytes()
    }

    fn swap_out(&mut self, slot: usize) -> Result<Swapped, ForwardError> {
        let t = Instant::now();
        let len = self.slots.lens[slot];
        let mut data = Vec::with_capacity(self.swap_bytes(slot));
        for &id in &self.tables[slot][..len.div_ceil(self.block())] {
            self.model.pool.read(id, &mut data);
        }
        self.copies.swap_out_bytes += data.len();
        self.copies.swap_out_ns += t.elapsed().as_nanos() as u64;
        Ok(Swapped { len, data })
    }

    fn swap_in(&mut self, slot: usize, swapped: &Swapped) -> Result<(), ForwardError> {
        if !self.slots.is_used(slot) || self.slots.lens[slot] != 0 || !self.tables[slot].is_empty() {
            return Err(ForwardError::Input(format!("swap into slot {slot}, which is not freshly allocated")));
        }
        let t = Instant::now();
        let bytes = self.model.pool.shape.block_bytes();
        for block in swapped.data.chunks(bytes) {
            let id = self.model.pool.alloc().ok_or_else(exhausted)?;
            self.model.pool.write(id, block);
            self.tables[slot].push(id);
        }
        self.slots.lens[slot] = swapped.len;
        self.copies.swap_in_bytes += swapped.data.len();
        self.copies.swap_in_ns += t.elapsed().as_nanos() as u64;
        Ok(())
    }
}
