//! The seam between the scheduler (the worker loop) and a model with its KV
//! cache. The worker thinks in slots: each running sequence owns one, and it
//! never learns how a backend lays its cache out.
//!
//! Two backends:
//! - `SlotBackend`: batchgen's own graph over a slot cache (`crate::graph`):
//!   rows never move, prompts are prefilled in chunks, a join or an eviction
//!   copies nothing, a fork (samples, beams) copies only that prompt;
//! - `PaddedBackend` (`super::padded`): an optimum export with a left-padded
//!   batch, which copies the cache on every join and eviction.
use std::sync::Arc;
use std::time::Instant;

use super::admission::{self, Candidate, Limits};
use super::model::{ForwardError, Logits};
use super::prefix::{Pin, PrefixCache};
use crate::graph::{BuiltModel, RowInput};

pub use super::slots::SlotTable;

/// A piece of a prompt to prefill: `tokens` continue what `slot` holds.
#[derive(Debug, Clone, Copy)]
pub struct Chunk<'a> {
    pub slot: usize,
    pub tokens: &'a [u32],
}

/// What a backend does for the worker.
pub trait Backend: Send {
    /// Takes `n` free slots, or none if fewer are free.
    fn alloc(&mut self, n: usize) -> Option<Vec<usize>>;
    /// Gives slots back; their cache is forgotten.
    fn free(&mut self, slots: &[usize]);
    /// Whether a prompt may be prefilled in several chunks. Without it the
    /// worker prefills whole prompts, several in one call.
    fn chunks(&self) -> bool;
    /// Whether chunks on cached pasts (a prefix cache hit's rest, a long
    /// prompt's next chunk) may go to one `prefill` call together, beside
    /// fresh prompts. Without it each such chunk gets a call of its own.
    fn mixes_chunks(&self) -> bool {
        false
    }
    /// Appends each chunk to its slot's cache and returns the logits of each
    /// chunk's last token, in order.
    fn prefill(&mut self, chunks: &[Chunk<'_>]) -> Result<Logits, ForwardError>;
    /// Gives slots `to` the cache of slot `from` (its prompt). Returns the
    /// bytes copied.
    fn fork(&mut self, from: usize, to: &[usize]) -> Result<usize, ForwardError>;
    /// One new token for each `(slot, token)`; the logits of each, in order.
    fn decode(&mut self, rows: &[(usize, u32)]) -> Result<Logits, ForwardError>;
    /// Whether rows may speculate at all (`verify`).
    fn speculates(&self) -> bool {
        false
    }
    /// Tokens per row a verification step (`verify`) over `slots` may run:
    /// the row's next token and its proposals. 1 (none proposed) where this
    /// backend cannot run several tokens on a cached past beside other rows.
    fn verify_room(&self, slots: &[usize]) -> usize {
        let _ = slots;
        1
    }
    /// Runs each row's `tokens` on top of its slot's cache in one step and
    /// returns the logits of every one of its positions, row after row, in
    /// order (`tokens.len()` logits rows per row). Only within `verify_room`.
    fn verify(&mut self, rows: &[(usize, &[u32])]) -> Result<Logits, ForwardError> {
        let _ = rows;
        Err(ForwardError::Input("this backend runs one token per decoding row".into()))
    }
    /// Forgets the last `n` tokens of `slot`'s cache (proposals a
    /// verification rejected): they stay where they are, beyond the slot's
    /// length, never attended to and overwritten by the next step.
    fn rollback(&mut self, slot: usize, n: usize) {
        let _ = (slot, n);
    }
    /// Whether a decoding slot may sit out a step (its client is not
    /// reading) and go on later. Without it such a request is ended.
    fn pauses(&self) -> bool {
        false
    }
    /// A beam step: slot `slots[j]` takes the cache of `slots[parents[j]]`.
    /// Returns the bytes copied.
    fn reorder(&mut self, slots: &[usize], parents: &[usize]) -> Result<usize, ForwardError>;
    /// Token positions the cache holds now (what the KV gauges show).
    fn held_tokens(&self) -> usize;
    /// How many requests from the head of `queue` may start now, beside
    /// `running` (each running or prefilling request as a candidate whose
    /// `prompt_len` is what it holds now, `max_new_tokens` what it may add).
    fn admit(&self, limits: &Limits, running: &[Candidate], queue: &mut dyn Iterator<Item = Candidate>) -> usize;
    /// Bytes join and evict copies cost (reported to the copy metrics);
    /// taken and reset by the worker after each call.
    fn take_copies(&mut self) -> Copies {
        Copies::default()
    }
    /// Tokens per block of the prefix cache, when this backend has one.
    fn prefix_block(&self) -> Option<usize> {
        None
    }
    /// `slot` holds the first `held` tokens of `prompt`: extends it from the
    /// prefix cache with the cached blocks that continue it, never to the
    /// prompt's last token (its logits must be computed). Returns the tokens
    /// added.
    fn reuse(&mut self, slot: usize, prompt: &[u32], held: usize) -> usize {
        let _ = (slot, prompt, held);
        0
    }
    /// `slot` holds `tokens` (its whole cache): stores its whole blocks in
    /// the prefix cache, where missing. `prefilling`: only part of its
    /// prompt is in, and what is stored stays pinned (not evicted) until the
    /// prompt is, so each chunk continues the chain the last one stored
    /// instead of copying it again after an eviction. Otherwise (the whole
    /// prompt is in, or the row ended: its prompt and answer are stored for a
    /// conversation's next turn) nothing stays pinned: a decoding row needs
    /// no block, it copied or computed them all.
    fn remember(&mut self, slot: usize, tokens: &[u32], prefilling: bool) {
        let _ = (slot, tokens, prefilling);
    }
    /// Whether a decoding slot's cache can be copied out and back in
    /// (`swap_out`, `swap_in`): what preemption needs.
    fn swaps(&self) -> bool {
        false
    }
    /// Bytes `swap_out` would copy out of `slot` now.
    fn swap_bytes(&self, slot: usize) -> usize {
        let _ = slot;
        0
    }
    /// Copies `slot`'s whole cache out, byte for byte (the slot is then
    /// freed by the caller).
    fn swap_out(&mut self, slot: usize) -> Result<Swapped, ForwardError> {
        let _ = slot;
        Err(ForwardError::Input("this backend cannot copy a row's cache out".into()))
    }
    /// Gives a freshly allocated `slot` the cache `swap_out` copied out,
    /// exactly as it was.
    fn swap_in(&mut self, slot: usize, swapped: &Swapped) -> Result<(), ForwardError> {
        let _ = (slot, swapped);
        Err(ForwardError::Input("this backend cannot copy a row's cache in".into()))
    }
}

/// A row's cache copied out of its slot (`Backend::swap_out`).
pub struct Swapped {
    /// Tokens it holds.
    pub len: usize,
    pub(super) data: Vec<u8>,
}

impl Swapped {
    pub fn bytes(&self) -> usize {
        self.data.len()
    }
}

/// KV copies a call made, for the metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct Copies {
    pub join_bytes: usize,
    pub join_ns: u64,
    pub evict_bytes: usize,
    pub evict_ns: u64,
    /// Copied from the prefix cache into slots.
    pub hit_bytes: usize,
    pub hit_ns: u64,
    /// Copied out of slots into the prefix cache.
    pub store_bytes: usize,
    pub store_ns: u64,
    /// Copied out of slots of preempted rows, and back in.
    pub swap_out_bytes: usize,
    pub swap_out_ns: u64,
    pub swap_in_bytes: usize,
    pub swap_in_ns: u64,
}

/// Tokens a group of prompts takes when padded to its longest.
pub(super) fn padded(chunks: &[Chunk<'_>]) -> usize {
    chunks.len() * chunks.iter().map(|c| c.tokens.len()).max().unwrap_or(0)
}

pub(super) fn real(chunks: &[Chunk<'_>]) -> usize {
    chunks.iter().map(|c| c.tokens.len()).sum()
}

/// The built graph over its slot cache.
pub struct SlotBackend {
    model: BuiltModel,
    slots: SlotTable,
    /// Shared by every worker's backend (`super::prefix`).
    prefix: Option<Arc<PrefixCache>>,
    /// Each slot's pin on the prefix cache block its cache ends in.
    pins: Vec<Option<Pin>>,
    copies: Copies,
}

impl SlotBackend {
    pub fn new(model: BuiltModel, prefix: Option<Arc<PrefixCache>>) -> Self {
        let n = model.cache.shape.slots;
        SlotBackend { model, slots: SlotTable::new(n), prefix, pins: vec![None; n], copies: Copies::default() }
    }

    fn repin(&mut self, slot: usize, pin: Option<Pin>) {
        if let Some(prefix) = &self.prefix {
            self.pins[slot] = prefix.repin(self.pins[slot], pin);
        }
    }
}

impl Backend for SlotBackend {
    fn alloc(&mut self, n: usize) -> Option<Vec<usize>> {
        // Packed at the front: a decode run covers few holes.
        self.slots.alloc(n)
    }

    fn free(&mut self, slots: &[usize]) {
        for &s in slots {
            self.repin(s, None);
            if self.slots.free(s) > 0 {
                self.model.cache.release(s);
            }
        }
    }

    fn chunks(&self) -> bool {
        true
    }

    fn pauses(&self) -> bool {
        // A slot left out of a step keeps its cache (see `decode`).
        true
    }

    fn prefill(&mut self, chunks: &[Chunk<'_>]) -> Result<Logits, ForwardError> {
        // Whole prompts starting an empty cache in adjacent slots run
        // together (right-padded); a chunk on a cached past runs alone, as
        // GroupQueryAttention requires.
        let mut all = Logits::new(self.model.vocab, Vec::with_capacity(chunks.len() * self.model.vocab));
        let mut i = 0;
        while i < chunks.len() {
            let mut j = i + 1;
            if self.slots.lens[chunks[i].slot] == 0 {
                while j < chunks.len()
                    && chunks[j].slot == chunks[j - 1].slot + 1
                    && self.slots.lens[chunks[j].slot] == 0
                    && padded(&chunks[i..=j]) <= 2 * real(&chunks[i..=j]).max(64)
                {
                    j += 1;
                }
            }
            let group = &chunks[i..j];
            let rows: Vec<RowInput<'_>> =
                group.iter().map(|c| RowInput { tokens: c.tokens, past: self.slots.lens[c.slot], logits: 1 }).collect();
            let logits = self.model.run(group[0].slot..group[0].slot + group.len(), &rows)?;
            for c in group {
                self.slots.lens[c.slot] += c.tokens.len();
            }
            all.append(logits);
            i = j;
        }
        Ok(all)
    }

    fn fork(&mut self, from: usize, to: &[usize]) -> Result<usize, ForwardError> {
        let len = self.slots.lens[from];
        let mut bytes = 0;
        for &t in to {
            bytes += self.model.cache.copy_slot(from, t, len);
            self.slots.lens[t] = len;
        }
        Ok(bytes)
    }

    fn decode(&mut self, rows: &[(usize, u32)]) -> Result<Logits, ForwardError> {
        let (Some(lo), Some(hi)) = (rows.iter().map(|r| r.0).min(), rows.iter().map(|r| r.0).max()) else {
            return Err(ForwardError::Input("a decode step without rows".into()));
        };
        // Slots in lo..=hi that are not decoding (free, or holding a prompt
        // being prefilled) ride along with a dummy token written at their
        // own next position, which their next chunk overwrites.
        let mut tokens = vec![[0u32]; hi + 1 - lo];
        let mut wanted = vec![usize::MAX; hi + 1 - lo];
        for (i, &(slot, token)) in rows.iter().enumerate() {
            tokens[slot - lo] = [token];
            wanted[slot - lo] = i;
        }
        let inputs: Vec<RowInput<'_>> = (lo..=hi)
            .map(|s| RowInput {
                tokens: &tokens[s - lo],
                past: self.slots.lens[s],
                logits: usize::from(wanted[s - lo] != usize::MAX),
            })
            .collect();
        let logits = self.model.run(lo..hi + 1, &inputs)?;
        for &(slot, _) in rows {
            self.slots.lens[slot] += 1;
        }
        // Logits come in slot order; hand them back in the caller's order.
        let order: Vec<usize> = wanted.into_iter().filter(|&i| i != usize::MAX).collect();
        if order.windows(2).all(|w| w[0] < w[1]) {
            return Ok(logits);
        }
        let v = logits.vocab;
        let mut data = vec![0.0; logits.data.len()];
        for (k, &i) in order.iter().enumerate() {
            data[i * v..(i + 1) * v].copy_from_slice(logits.row(k));
        }
        Ok(Logits::new(v, data))
    }

    fn speculates(&self) -> bool {
        true
    }

    fn verify_room(&self, slots: &[usize]) -> usize {
        let (Some(&lo), Some(&hi)) = (slots.iter().min(), slots.iter().max()) else { return 1 };
        // GroupQueryAttention runs several tokens on a past for one row only
        // (and a decode run covers every slot from the lowest to the highest).
        if lo != hi && !self.model.mixes_chunks() {
            return 1;
        }
        let longest = (lo..=hi).map(|s| self.slots.lens[s]).max().unwrap_or(0);
        self.model.cache.shape.max_len.saturating_sub(longest).max(1)
    }

    fn verify(&mut self, rows: &[(usize, &[u32])]) -> Result<Logits, ForwardError> {
        let (Some(lo), Some(hi)) = (rows.iter().map(|r| r.0).min(), rows.iter().map(|r| r.0).max()) else {
            return Err(ForwardError::Input("a verification step without rows".into()));
        };
        // As `decode`: slots between that are not in the step ride along
        // with a dummy token at their own next position.
        const DUMMY: [u32; 1] = [0];
        let mut tokens: Vec<&[u32]> = vec![&DUMMY; hi + 1 - lo];
        let mut wanted = vec![usize::MAX; hi + 1 - lo];
        for (i, &(slot, t)) in rows.iter().enumerate() {
            tokens[slot - lo] = t;
            wanted[slot - lo] = i;
        }
        let inputs: Vec<RowInput<'_>> = (lo..=hi)
            .map(|s| RowInput {
                tokens: tokens[s - lo],
                past: self.slots.lens[s],
                logits: if wanted[s - lo] == usize::MAX { 0 } else { tokens[s - lo].len() },
            })
            .collect();
        let logits = self.model.run(lo..hi + 1, &inputs)?;
        for &(slot, t) in rows {
            self.slots.lens[slot] += t.len();
        }
        // Logits come in slot order; hand each row's block back in the
        // caller's order.
        let order: Vec<usize> = wanted.into_iter().filter(|&i| i != usize::MAX).collect();
        if order.windows(2).all(|w| w[0] < w[1]) {
            return Ok(logits);
        }
        let v = logits.vocab;
        let mut start = vec![0; rows.len()];
        for i in 1..rows.len() {
            start[i] = start[i - 1] + rows[i - 1].1.len();
        }
        let mut data = vec![0.0; logits.data.len()];
        let mut k = 0;
        for &i in &order {
            let n = rows[i].1.len();
            data[start[i] * v..(start[i] + n) * v].copy_from_slice(&logits.data[k * v..(k + n) * v]);
            k += n;
        }
        Ok(Logits::new(v, data))
    }

    fn rollback(&mut self, slot: usize, n: usize) {
        self.slots.lens[slot] -= n.min(self.slots.lens[slot]);
    }

    fn reorder(&mut self, slots: &[usize], parents: &[usize]) -> Result<usize, ForwardError> {
        let len = slots.iter().map(|&s| self.slots.lens[s]).max().unwrap_or(0);
        let from: Vec<usize> = parents.iter().map(|&p| slots[p]).collect();
        Ok(self.model.cache.permute(slots, &from, len))
    }

    fn held_tokens(&self) -> usize {
        self.slots.lens.iter().sum()
    }

    fn admit(&self, limits: &Limits, running: &[Candidate], queue: &mut dyn Iterator<Item = Candidate>) -> usize {
        admission::admit_slots(limits, running, queue)
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
        let block = prefix.block();
        let t = Instant::now();
        let Some((chain, pin, cached)) = prefix.extend(prompt, held) else { return 0 };
        let mut bytes = 0;
        for (j, data) in chain.iter().enumerate().skip(held / block) {
            let start = j * block;
            if start >= cached {
                break;
            }
            let from = held.max(start) - start;
            let to = cached.min(start + block) - start;
            bytes += self.model.cache.write_block(slot, start, data, block, from, to - from);
        }
        self.slots.lens[slot] = cached;
        self.copies.hit_bytes += bytes;
        self.copies.hit_ns += t.elapsed().as_nanos() as u64;
        // The slot's cache now ends in that chain (all of it, or all but the
        // last token of its last block): pinned until the next store or the
        // slot's release.
        self.repin(slot, pin);
        cached - held
    }

    fn remember(&mut self, slot: usize, tokens: &[u32], prefilling: bool) {
        let Some(prefix) = &self.prefix else { return };
        let held = self.slots.lens[slot].min(tokens.len());
        let block = prefix.block();
        let mut pin = None;
        if held >= block {
            let t = Instant::now();
            let cache = &mut self.model.cache;
            let bytes = cache.block_bytes(block);
            let read = |j: usize| {
                let mut out = vec![0u8; bytes];
                cache.read_block(slot, j * block, block, &mut out);
                Arc::new(out)
            };
            let done = prefix.insert(&tokens[..held], read, |_| false);
            if done.stored > 0 {
                self.copies.store_bytes += done.stored * bytes;
                self.copies.store_ns += t.elapsed().as_nanos() as u64;
            }
            pin = done.last;
        }
        self.repin(slot, pin.filter(|_| prefilling));
    }

    fn swaps(&self) -> bool {
        true
    }

    fn swap_bytes(&self, slot: usize) -> usize {
        self.model.cache.block_bytes(self.slots.lens[slot])
    }

    fn swap_out(&mut self, slot: usize) -> Result<Swapped, ForwardError> {
        let t = Instant::now();
        let len = self.slots.lens[slot];
        let cache = &mut self.model.cache;
        let mut data = vec![0u8; cache.block_bytes(len)];
        if len > 0 {
            cache.read_block(slot, 0, len, &mut data);
        }
        self.copies.swap_out_bytes += data.len();
        self.copies.swap_out_ns += t.elapsed().as_nanos() as u64;
        Ok(Swapped { len, data })
    }

    fn swap_in(&mut self, slot: usize, swapped: &Swapped) -> Result<(), ForwardError> {
        if !self.slots.is_used(slot) || self.slots.lens[slot] != 0 {
            return Err(ForwardError::Input(format!("swap into slot {slot}, which is not freshly allocated")));
        }
        let t = Instant::now();
        let len = swapped.len;
        if len > 0 {
            self.model.cache.write_block(slot, 0, &swapped.data, len, 0, len);
        }
        self.slots.lens[slot] = len;
        self.copies.swap_in_bytes += swapped.data.len();
        self.copies.swap_in_ns += t.elapsed().as_nanos() as u64;
        Ok(())
    }
}
