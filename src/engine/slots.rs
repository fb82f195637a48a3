//! The slot bookkeeping both backends share (`super::backend`, `super::padded`).

/// Which slots are taken and how many tokens each holds.
#[derive(Debug)]
pub struct SlotTable {
    used: Vec<bool>,
    /// Tokens each slot's cache holds.
    pub lens: Vec<usize>,
}

impl SlotTable {
    pub fn new(slots: usize) -> Self {
        SlotTable { used: vec![false; slots], lens: vec![0; slots] }
    }

    /// Takes the `n` lowest free slots (so running rows stay packed at the
    /// front), or none if fewer are free.
    pub fn alloc(&mut self, n: usize) -> Option<Vec<usize>> {
        let free: Vec<usize> = (0..self.used.len()).filter(|&s| !self.used[s]).take(n).collect();
        if free.len() < n {
            return None;
        }
        for &s in &free {
            self.used[s] = true;
            self.lens[s] = 0;
        }
        Some(free)
    }

    /// Gives `slot` back; returns the tokens it held.
    pub fn free(&mut self, slot: usize) -> usize {
        self.used[slot] = false;
        std::mem::take(&mut self.lens[slot])
    }

    pub fn is_used(&self, slot: usize) -> bool {
        self.used[slot]
    }

    pub fn any_used(&self) -> bool {
        self.used.iter().any(|&u| u)
    }
}
