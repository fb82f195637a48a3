//! The prefix cache: keys and values of prompt (and generated) tokens kept
//! after their row has gone, in blocks of `block` tokens, so that a request
//! whose prompt begins like an earlier one prefills only the rest.
//!
//! **Keys.** A block is found by its parent block and its own token ids
//! (`Key`): a chain from the first block, so a block stands for every token
//! before and in it, as vLLM's hash chain does. The tokens themselves are the
//! key (not a hash of them), so two prompts can never be taken for each other
//! however a client crafts them, and the lookup is exact.
//!
//! **Rows copy (`--kv-layout slots`) or share (`paged`).** With the paged
//! cache (`super::pages`) a block is a pool block id: storing takes a
//! reference to the block the row wrote and a hit puts it in the new row's
//! block table, so nothing is copied and a prefix 16 rows share is held once
//! (the figures are in docs/performance.md, "Paged KV cache"); a block a row
//! holds is in use (`insert`'s `in_use`): never evicted, and not counted
//! against the budget, which bounds the memory the cache adds to the rows'.
//! The rest of this section is the slot layout's. A hit copies the cached blocks into the
//! row's slot of the worker's slot cache (`SlotCache::write_block`), and a
//! prefilled or finished row's whole blocks are copied out of its slot into
//! the cache (`read_block`). The alternative, a paged cache with a block
//! table per row, would hold a prefix shared by 16 rows once instead of 16
//! times, but ONNX Runtime's GroupQueryAttention (the float32 kernel, which
//! we measured faster than ours there) reads one contiguous `[heads, max_len,
//! head_dim]` range per row and cannot follow a block table. A copy costs
//! `token_bytes` per token (72 KiB for the 124M shape at fp32: 37.7 MB for a
//! 512-token prefix, measured at 16.5 ms per hit on the Intel Xeon of
//! docs/performance.md, 2.3 GB/s: the slot's pages were given back when its last
//! row left, so the copy also takes their page faults; storing runs at
//! 1.7 GB/s) against ≈ 0.25 GFLOP per token to prefill it (≈ 130 GFLOP, 481 ms
//! to first token there); the rest of the figures are in docs/performance.md
//! ("Prefix cache"). The samples and beams of one request keep
//! sharing their prompt the same way: one slot is prefilled (or filled from
//! here) and `fork` copies it to the others.
//!
//! **Bounded.** The cache holds at most `capacity` blocks (`--prefix-cache-mib`).
//! A block is evicted least recently used first, and only when no cached
//! block continues it (a leaf), so every cached block stays reachable from
//! the first. A block in use is never evicted: a slot whose prompt is being
//! prefilled pins the deepest cached block of what it holds (`Pin`), which
//! keeps that block's whole chain (its ancestors are not leaves), so the
//! prompt's next chunk continues the chain instead of copying it in again
//! after an eviction; when nothing but pinned blocks is left, new blocks are
//! not stored. (Without pins, 16 distinct 544-token prompts, chunked, churned
//! a 128 MiB cache and cost 4–7 % of the throughput of cache off; pinned
//! while prefilling, 4 %; docs/performance.md, "Prefix cache".) A decoding row
//! uses no block (it copied or computed them all), so it pins none. Copies hold the block's data (`Arc`), so nothing is
//! freed under a reader. The rows' own KV is counted by admission as before;
//! this budget is separate.
//!
//! **One cache for all workers.** The index sits behind a mutex that is held
//! only to find or link blocks (microseconds); the copies run outside it. A
//! prefix prefilled by one worker serves requests routed to any other.
use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use crate::telemetry;

/// One block's keys and values, laid out as `SlotCache::block_bytes` says
/// (what the copying cache holds; the paged cache holds block ids of its
/// pool instead, `super::pages`).
pub type BlockData = Arc<Vec<u8>>;

/// The id of the virtual block before every prompt's first.
const ROOT: u64 = 0;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    parent: u64,
    tokens: Box<[u32]>,
}

struct Entry<D> {
    key: Key,
    data: D,
    /// Cached blocks whose parent this is.
    children: u32,
    /// Slots whose cache ends in this block's chain (`PrefixCache::pin`).
    pins: u32,
    /// When it was last found or stored (`Inner::clock`).
    stamp: u64,
}

struct Inner<D> {
    index: HashMap<Key, u64>,
    entries: HashMap<u64, Entry<D>>,
    /// The blocks no cached block continues, oldest first: what may be evicted.
    leaves: BTreeSet<(u64, Reverse<u64>)>,
    clock: u64,
    next_id: u64,
    evictions: u64,
}

/// A block a slot's cache ends in (the deepest cached block of what the slot
/// holds): while pinned, neither it nor its chain is evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin(u64);

/// What the cache holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Held {
    pub blocks: usize,
    pub bytes: usize,
    pub evictions: u64,
}

/// What `PrefixCache::insert` did.
#[derive(Debug)]
pub struct Inserted<D> {
    /// Blocks stored.
    pub stored: usize,
    /// The last block of the cached chain of the tokens afterwards (to pin).
    pub last: Option<Pin>,
    /// Blocks the cache let go of: the evicted ones, and any read that was
    /// not stored (for the paged cache, references to drop).
    pub dropped: Vec<D>,
}

pub struct PrefixCache<D = BlockData> {
    block: usize,
    block_bytes: usize,
    capacity: usize,
    inner: Mutex<Inner<D>>,
}

impl<D: Clone> PrefixCache<D> {
    /// A cache of blocks of `block` tokens, each `block_bytes` bytes, within
    /// `budget` bytes.
    pub fn new(block: usize, block_bytes: usize, budget: usize) -> Self {
        assert!(block > 0 && block_bytes > 0);
        let inner = Inner {
            index: HashMap::new(),
            entries: HashMap::new(),
            leaves: BTreeSet::new(),
            clock: 0,
            next_id: ROOT + 1,
            evictions: 0,
        };
        let cache = PrefixCache { block, block_bytes, capacity: budget / block_bytes, inner: Mutex::new(inner) };
        cache.publish(&cache.lock());
        cache
    }

    /// Tokens per block.
    pub fn block(&self) -> usize {
        self.block
    }

    /// Blocks the budget holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn held(&self) -> Held {
        let inner = self.lock();
        Held { blocks: inner.entries.len(), bytes: inner.entries.len() * self.block_bytes, evictions: inner.evictions }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<D>> {
        // A panic elsewhere while holding it leaves the index consistent
        // (every change is made before the lock is released).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached blocks that begin `tokens` (whole blocks only), in order:
    /// the longest chain there is, and the id of its last block. Marks them used.
    pub fn lookup(&self, tokens: &[u32]) -> (Vec<D>, Option<Pin>) {
        let mut inner = self.lock();
        let stamp = inner.tick();
        let chain = inner.walk(tokens, self.block, stamp);
        let last = chain.last().map(|&id| Pin(id));
        (chain.into_iter().map(|id| inner.entries[&id].data.clone()).collect(), last)
    }

    /// The cached chain that extends a slot holding the first `held` tokens
    /// of `prompt`, never to its last token (its logits must be computed):
    /// the chain, its last block and the tokens it covers; none when it adds
    /// nothing.
    pub fn extend(&self, prompt: &[u32], held: usize) -> Option<(Vec<D>, Option<Pin>, usize)> {
        let last = prompt.len().saturating_sub(1);
        if last <= held {
            return None;
        }
        let (chain, pin) = self.lookup(prompt);
        let cached = (chain.len() * self.block).min(last);
        (cached > held).then_some((chain, pin, cached))
    }

    /// Moves a slot's pin from `old` to `new` (either may be none): `new`
    /// and its chain cannot be evicted until it is unpinned. Returns the pin
    /// now held: none when another worker evicted `new` since it was found.
    pub fn repin(&self, old: Option<Pin>, new: Option<Pin>) -> Option<Pin> {
        if old == new {
            return new;
        }
        let mut inner = self.lock();
        let pinned = new.filter(|Pin(id)| match inner.entries.get_mut(id) {
            Some(e) => {
                e.pins += 1;
                true
            }
            None => false,
        });
        if let Some(Pin(id)) = old {
            inner.entries.get_mut(&id).expect("a pinned block is never evicted").pins -= 1;
        }
        pinned
    }

    /// Stores the whole blocks of `tokens` the cache does not hold yet;
    /// `read(j)` gives block `j` (tokens `j * block..(j + 1) * block`).
    /// Evicts the least recently used blocks that nothing continues, no slot
    /// pins and `in_use` says no row holds, to make room; stops early when
    /// none is left but this chain's own. The budget counts the blocks no
    /// row holds (`in_use` false): a block a row holds costs its memory
    /// whether the cache indexes it or not.
    pub fn insert(&self, tokens: &[u32], mut read: impl FnMut(usize) -> D, in_use: impl Fn(&D) -> bool) -> Inserted<D> {
        let whole = tokens.len() / self.block;
        let mut done = Inserted { stored: 0, last: None, dropped: Vec::new() };
        if whole == 0 || self.capacity == 0 {
            return done;
        }
        let first_missing = {
            let mut inner = self.lock();
            let stamp = inner.tick();
            let chain = inner.walk(tokens, self.block, stamp);
            done.last = chain.last().map(|&id| Pin(id));
            if chain.len() < whole && inner.idle(&in_use) >= self.capacity && !inner.evictable(stamp, &in_use) {
                // Full of blocks in use: reading more would be wasted.
                return done;
            }
            chain.len()
        };
        if first_missing == whole {
            return done;
        }
        // The copies run without the lock.
        // At most a budget's worth of blocks no row holds (copies that
        // could not all be stored would be wasted).
        let (mut read_blocks, mut idle_read) = (Vec::with_capacity(whole - first_missing), 0);
        for j in first_missing..whole {
            if idle_read == self.capacity {
                break;
            }
            let data = read(j);
            idle_read += usize::from(!in_use(&data));
            read_blocks.push(data);
        }
        let mut inner = self.lock();
        let stamp = inner.tick();
        // Another worker may have stored (or evicted) some of them meanwhile.
        let chain = inner.walk(tokens, self.block, stamp);
        if chain.len() < first_missing {
            // A block before those read was evicted meanwhile: the chain
            // cannot be continued now.
            done.last = chain.last().map(|&id| Pin(id));
            done.dropped = read_blocks;
            return done;
        }
        let mut parent = chain.last().copied().unwrap_or(ROOT);
        let mut blocks = read_blocks.into_iter();
        // Blocks another worker stored after the first walk are dropped.
        for _ in first_missing..chain.len() {
            done.dropped.extend(blocks.next());
        }
        let mut idle = inner.idle(&in_use);
        for (j, data) in (chain.len()..whole).zip(&mut blocks) {
            while idle >= self.capacity {
                match inner.evict_one(stamp, &in_use) {
                    Some(gone) => {
                        done.dropped.push(gone);
                        idle -= 1;
                    }
                    None => break,
                }
            }
            if idle >= self.capacity {
                done.dropped.push(data);
                break;
            }
            idle += usize::from(!in_use(&data));
            let key = Key { parent, tokens: tokens[j * self.block..(j + 1) * self.block].into() };
            let id = inner.next_id;
            inner.next_id += 1;
            if parent != ROOT {
                let p = inner.entries.get_mut(&parent).expect("the chain's blocks are cached");
                p.children += 1;
                let p_stamp = p.stamp;
                inner.leaves.remove(&(p_stamp, Reverse(parent)));
            }
            inner.index.insert(key.clone(), id);
            inner.entries.insert(id, Entry { key, data, children: 0, pins: 0, stamp });
            inner.leaves.insert((stamp, Reverse(id)));
            parent = id;
            done.stored += 1;
        }
        done.dropped.extend(blocks);
        self.publish(&inner);
        done.last = (parent != ROOT).then_some(Pin(parent));
        done
    }

    /// Evicts blocks no row holds (least recently used leaves first) while
    /// more of them than the budget are cached: after rows gave their
    /// blocks back. Returns the evicted blocks.
    pub fn trim(&self, in_use: impl Fn(&D) -> bool) -> Vec<D> {
        let mut inner = self.lock();
        let mut idle = inner.idle(&in_use);
        let mut gone = Vec::new();
        while idle > self.capacity {
            let stamp = inner.tick();
            let Some(data) = inner.evict_one(stamp, &in_use) else { break };
            gone.push(data);
            idle -= 1;
        }
        if !gone.is_empty() {
            self.publish(&inner);
        }
        gone
    }

    fn publish(&self, inner: &Inner<D>) {
        metrics::gauge!(telemetry::PREFIX_CACHE_BLOCKS).set(inner.entries.len() as f64);
        metrics::gauge!(telemetry::PREFIX_CACHE_BYTES).set((inner.entries.len() * self.block_bytes) as f64);
        metrics::gauge!(telemetry::PREFIX_CACHE_CAPACITY_BYTES).set((self.capacity * self.block_bytes) as f64);
    }
}

impl<D> Inner<D> {
    /// Cached blocks no row holds.
    fn idle(&self, in_use: &impl Fn(&D) -> bool) -> usize {
        self.entries.values().filter(|e| !in_use(&e.data)).count()
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The ids of the cached chain of whole blocks that begins `tokens`,
    /// each marked used at `stamp`.
    fn walk(&mut self, tokens: &[u32], block: usize, stamp: u64) -> Vec<u64> {
        let mut chain = Vec::new();
        let mut parent = ROOT;
        for piece in tokens.chunks_exact(block) {
            let key = Key { parent, tokens: piece.into() };
            let Some(&id) = self.index.get(&key) else { break };
            let e = self.entries.get_mut(&id).expect("indexed blocks are cached");
            if e.children == 0 {
                self.leaves.remove(&(e.stamp, Reverse(id)));
                self.leaves.insert((stamp, Reverse(id)));
            }
            e.stamp = stamp;
            chain.push(id);
            parent = id;
        }
        chain
    }

    /// The least recently used leaf no slot pins and no row holds, not used
    /// at `stamp` (the chain being stored).
    fn victim(&self, stamp: u64, in_use: &impl Fn(&D) -> bool) -> Option<(u64, u64)> {
        self.leaves
            .iter()
            .take_while(|&&(s, _)| s < stamp)
            .find(|&&(_, Reverse(id))| {
                let e = &self.entries[&id];
                e.pins == 0 && !in_use(&e.data)
            })
            .map(|&(s, Reverse(id))| (s, id))
    }

    fn evictable(&self, stamp: u64, in_use: &impl Fn(&D) -> bool) -> bool {
        self.victim(stamp, in_use).is_some()
    }

    /// Evicts the least recently used leaf `victim` allows, unless it was
    /// used at `stamp`; returns its data.
    fn evict_one(&mut self, stamp: u64, in_use: &impl Fn(&D) -> bool) -> Option<D> {
        let (s, id) = self.victim(stamp, in_use)?;
        self.leaves.remove(&(s, Reverse(id)));
        let e = self.entries.remove(&id).expect("leaves are cached");
        self.index.remove(&e.key);
        if e.key.parent != ROOT {
            let p = self.entries.get_mut(&e.key.parent).expect("a cached block's parent is cached");
            p.children -= 1;
            if p.children == 0 {
                self.leaves.insert((p.stamp, Reverse(e.key.parent)));
            }
        }
        self.evictions += 1;
        metrics::counter!(telemetry::PREFIX_CACHE_EVICTIONS).increment(1);
        Some(e.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block's data records which tokens it was read for.
    fn store(c: &PrefixCache, tokens: &[u32]) -> usize {
        store_pinned(c, tokens).0
    }

    fn store_pinned(c: &PrefixCache, tokens: &[u32]) -> (usize, Option<Pin>) {
        let done = c.insert(
            tokens,
            |j| {
                let mut out = vec![0; 10];
                out[0] = tokens[j * c.block()] as u8;
                out[1] = j as u8;
                Arc::new(out)
            },
            |_| false,
        );
        (done.stored, done.last)
    }

    fn found(c: &PrefixCache, tokens: &[u32]) -> Vec<(u8, u8)> {
        c.lookup(tokens).0.iter().map(|d| (d[0], d[1])).collect()
    }

    #[test]
    fn pinned_chains_are_never_evicted() {
        // Room for 3 blocks.
        let c = PrefixCache::new(1, 10, 30);
        let (_, pin) = store_pinned(&c, &[1, 2]);
        c.repin(None, pin);
        assert_eq!(store(&c, &[5]), 1);
        // Full: [5] goes, [1, 2] is pinned and stays.
        assert_eq!(store(&c, &[6]), 1);
        assert!(found(&c, &[5]).is_empty());
        assert_eq!(found(&c, &[1, 2]).len(), 2);
        // With [6] pinned too nothing can go: nothing is read or stored.
        let (_, six) = store_pinned(&c, &[6]);
        c.repin(None, six);
        let mut reads = 0;
        let done = c.insert(
            &[7, 8],
            |_| {
                reads += 1;
                Arc::new(vec![0; 10])
            },
            |_| false,
        );
        assert_eq!(done.stored, 0);
        assert_eq!(reads, 0, "a full cache of pinned blocks reads nothing");
        // Unpinned, the least recently used chain goes, leaf first.
        c.repin(pin, None);
        assert_eq!(store(&c, &[7]), 1);
        assert_eq!(found(&c, &[1, 2]).len(), 1);
        assert_eq!(found(&c, &[6]).len(), 1);
    }

    #[test]
    fn finds_the_longest_chain_of_whole_blocks() {
        let c = PrefixCache::new(2, 4, 1 << 20);
        assert_eq!(store(&c, &[1, 2, 3, 4, 5]), 2, "the trailing half block is not stored");
        assert_eq!(found(&c, &[1, 2, 3, 4, 5, 6]), vec![(1, 0), (3, 1)]);
        assert_eq!(found(&c, &[1, 2, 3, 9]), vec![(1, 0)], "stops where the tokens differ");
        assert_eq!(found(&c, &[1, 2, 3]), vec![(1, 0)], "a half block is not a hit");
        assert!(found(&c, &[3, 4]).is_empty(), "a block is keyed by what comes before it too");
        assert_eq!(store(&c, &[1, 2, 3, 4, 7, 8]), 1, "only the missing block is read");
        assert_eq!(c.held().blocks, 3);
    }

    #[test]
    fn evicts_least_recently_used_leaves_and_never_the_chain_being_stored() {
        // Room for 3 blocks.
        let c = PrefixCache::new(1, 10, 30);
        store(&c, &[1, 2]);
        store(&c, &[5]);
        // [1, 2] is used after [5]: [5] is now the oldest leaf.
        assert_eq!(found(&c, &[1, 2]).len(), 2);
        assert_eq!(store(&c, &[1, 2, 3]), 1);
        assert!(found(&c, &[5]).is_empty(), "the least recently used leaf went");
        assert_eq!(found(&c, &[1, 2, 3]).len(), 3);
        assert_eq!(c.held(), Held { blocks: 3, bytes: 30, evictions: 1 });
        // A chain longer than the budget: the cache keeps what fits of it
        // and never evicts the chain's own blocks to continue it.
        assert_eq!(store(&c, &[1, 2, 3, 4, 5]), 0);
        assert_eq!(found(&c, &[1, 2, 3, 4]).len(), 3);
        // A parent is evicted only after its children.
        assert_eq!(store(&c, &[7, 8]), 2);
        assert_eq!(found(&c, &[1, 2, 3]).len(), 1);
        assert_eq!(c.held().evictions, 3);
    }

    /// The paged cache's use: blocks are ids, `in_use` says which a row
    /// holds; those are never evicted and do not count against the budget,
    /// and `trim` evicts down to the budget once rows let go.
    #[test]
    fn blocks_rows_hold_are_kept_outside_the_budget() {
        use std::cell::RefCell;
        // Room for 2 blocks no row holds.
        let c: PrefixCache<u32> = PrefixCache::new(1, 10, 20);
        let held = RefCell::new(std::collections::HashSet::new());
        let in_use = |id: &u32| held.borrow().contains(id);
        let insert = |tokens: &[u32], first_id: u32| {
            let done = c.insert(tokens, |j| first_id + j as u32, in_use);
            (done.stored, done.dropped)
        };
        // A row holds blocks 10, 11, 12: all stored though the budget is 2.
        held.borrow_mut().extend([10, 11, 12]);
        assert_eq!(insert(&[1, 2, 3], 10), (3, vec![]));
        // Two more no row holds fill the budget; a third evicts the oldest idle leaf.
        assert_eq!(insert(&[7], 20), (1, vec![]));
        assert_eq!(insert(&[8], 30), (1, vec![]));
        assert_eq!(insert(&[9], 40), (1, vec![20]));
        assert_eq!(c.lookup(&[1, 2, 3]).0, vec![10, 11, 12], "held blocks stay");
        // The row lets go: five idle blocks, trimmed to two.
        held.borrow_mut().clear();
        let mut gone = c.trim(in_use);
        gone.sort();
        // [8] and [9] are older than the chain the lookup just used: they go
        // first, then the chain from its end.
        assert_eq!(gone, vec![12, 30, 40], "the least recently used leaves");
        assert_eq!(c.held().blocks, 2);
    }

    #[test]
    fn a_budget_below_one_block_stores_nothing() {
        let c = PrefixCache::new(2, 100, 99);
        assert_eq!(store(&c, &[1, 2, 3, 4]), 0);
        assert!(found(&c, &[1, 2]).is_empty());
    }
}
