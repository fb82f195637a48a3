//! The backend for an optimum export as it is (`--graph exported`): one
//! left-padded batch whose rows are the running slots in `order`. The export
//! concatenates past and new keys inside every step; a join stacks the new
//! rows under the batch and an eviction selects the rows that stay, each a
//! copy of the whole cache (reported to the KV copy metrics).
use std::time::Instant;

use super::admission::{self, Candidate, Limits, Running};
use super::backend::{Backend, Chunk, Copies, SlotTable};
use super::model::{ForwardError, ForwardInput, KvCache, Logits, Model};

/// A row of the batch whose slot was freed (it leaves at the next step).
const GONE: usize = usize::MAX;

pub struct PaddedBackend {
    model: Model,
    pad_id: u32,
    cache: Option<KvCache>,
    /// The slot of each row of `cache`, in row order.
    order: Vec<usize>,
    /// Taken slots and their real tokens (right-aligned in the batch).
    slots: SlotTable,
    copies: Copies,
}

impl PaddedBackend {
    pub fn new(model: Model, pad_id: u32, slots: usize) -> Self {
        PaddedBackend {
            model,
            pad_id,
            cache: None,
            order: Vec::new(),
            slots: SlotTable::new(slots),
            copies: Copies::default(),
        }
    }

    /// Rows of the batch, as positions in `order`, that hold `slots`.
    fn positions(&self, slots: &[usize]) -> Result<Vec<usize>, ForwardError> {
        slots
            .iter()
            .map(|s| {
                self.order
                    .iter()
                    .position(|o| o == s)
                    .ok_or_else(|| ForwardError::Input(format!("slot {s} is not in the batch")))
            })
            .collect()
    }

    /// Makes the batch hold exactly `slots`, in that order (an eviction copy
    /// when rows left, trimming columns that became padding for all).
    fn arrange(&mut self, slots: &[usize]) -> Result<(), ForwardError> {
        if self.order == slots {
            return Ok(());
        }
        let t = Instant::now();
        let rows = self.positions(slots)?;
        let cache = self.cache.take().ok_or_else(|| ForwardError::Input("no batch to arrange".into()))?;
        let len = slots.iter().map(|&s| self.slots.lens[s]).max().unwrap_or(0);
        let selected = cache.select(&rows, len)?;
        self.copies.evict_bytes += selected.bytes();
        self.copies.evict_ns += t.elapsed().as_nanos() as u64;
        self.cache = Some(selected);
        self.order = slots.to_vec();
        Ok(())
    }
}

impl Backend for PaddedBackend {
    fn alloc(&mut self, n: usize) -> Option<Vec<usize>> {
        self.slots.alloc(n)
    }

    fn free(&mut self, slots: &[usize]) {
        for &s in slots {
            self.slots.free(s);
            // The row stays in the batch until the next step arranges it,
            // under no slot: the slot may be taken again before that step
            // (a request admitted in the iteration that freed it), and its
            // new row must not be mistaken for the old one.
            for o in self.order.iter_mut().filter(|o| **o == s) {
                *o = GONE;
            }
        }
        if !self.slots.any_used() {
            self.cache = None;
            self.order.clear();
        }
    }

    fn chunks(&self) -> bool {
        false
    }

    fn prefill(&mut self, chunks: &[Chunk<'_>]) -> Result<Logits, ForwardError> {
        if chunks.iter().any(|c| self.slots.lens[c.slot] > 0) {
            return Err(ForwardError::Input("the padded layout prefills whole prompts only".into()));
        }
        let prompts: Vec<&[u32]> = chunks.iter().map(|c| c.tokens).collect();
        let input = ForwardInput::prefill(&prompts, self.pad_id);
        let (logits, new) = self.model.forward(&input, self.model.empty_cache(chunks.len())?)?;
        // Rows freed since the last step leave before the join.
        let live: Vec<usize> = self.order.iter().copied().filter(|&s| s != GONE && self.slots.is_used(s)).collect();
        if self.cache.is_some() && !live.is_empty() {
            self.arrange(&live)?;
        }
        self.cache = Some(match self.cache.take().filter(|_| !live.is_empty()) {
            None => new,
            Some(old) => {
                let t = Instant::now();
                let joined = old.concat(&new, old.len.max(new.len))?;
                self.copies.join_bytes += joined.bytes();
                self.copies.join_ns += t.elapsed().as_nanos() as u64;
                joined
            }
        });
        if live.is_empty() {
            self.order.clear();
        }
        for c in chunks {
            self.order.push(c.slot);
            self.slots.lens[c.slot] = c.tokens.len();
        }
        Ok(logits)
    }

    fn fork(&mut self, from: usize, to: &[usize]) -> Result<usize, ForwardError> {
        // The copies go right after their source, so a beam group's rows are
        // adjacent (its reorders then touch only the group).
        let at = self.positions(&[from])?[0];
        let mut slots = self.order.clone();
        for (k, &t) in to.iter().enumerate() {
            slots.insert(at + 1 + k, t);
            self.slots.lens[t] = self.slots.lens[from];
        }
        let rows: Vec<usize> = slots
            .iter()
            .map(|s| if to.contains(s) { at } else { self.order.iter().position(|o| o == s).expect("in order") })
            .collect();
        let cache = self.cache.take().ok_or_else(|| ForwardError::Input("no batch to fork in".into()))?;
        let len = cache.len;
        let forked = cache.select(&rows, len)?;
        let bytes = forked.bytes();
        self.cache = Some(forked);
        self.order = slots;
        Ok(bytes)
    }

    fn decode(&mut self, rows: &[(usize, u32)]) -> Result<Logits, ForwardError> {
        let slots: Vec<usize> = rows.iter().map(|r| r.0).collect();
        self.arrange(&slots)?;
        let cache = self.cache.take().ok_or_else(|| ForwardError::Input("no batch to decode".into()))?;
        let tokens: Vec<u32> = rows.iter().map(|r| r.1).collect();
        let lens: Vec<usize> = slots.iter().map(|&s| self.slots.lens[s]).collect();
        let input = ForwardInput::decode(&tokens, &lens, cache.len);
        let (logits, cache) = self.model.forward(&input, cache)?;
        self.cache = Some(cache);
        for &s in &slots {
            self.slots.lens[s] += 1;
        }
        Ok(logits)
    }

    fn reorder(&mut self, slots: &[usize], parents: &[usize]) -> Result<usize, ForwardError> {
        let at = self.positions(slots)?;
        let cache = self.cache.as_mut().ok_or_else(|| ForwardError::Input("no batch to reorder".into()))?;
        if at.windows(2).all(|w| w[1] == w[0] + 1) {
            return cache.reorder_rows(at[0], parents);
        }
        Err(ForwardError::Input(format!("beam rows {at:?} are not adjacent in the batch")))
    }

    fn held_tokens(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.batch * c.len)
    }

    fn admit(&self, limits: &Limits, running: &[Candidate], queue: &mut dyn Iterator<Item = Candidate>) -> usize {
        let running = Running {
            len: self.cache.as_ref().map_or(0, |c| c.len),
            remaining: running.iter().flat_map(|c| std::iter::repeat_n(c.max_new_tokens, c.rows)).collect(),
        };
        admission::admit(limits, &running, queue)
    }

    fn take_copies(&mut self) -> Copies {
        std::mem::take(&mut self.copies)
    }
}
