//! What one forward run of a model takes and gives, for both ways of running
//! one: the engine's exported-graph model (`engine::model`) and batchgen's
//! own graph (`graph`). It sits below both, so neither imports the other for
//! these.

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("ONNX Runtime run failed: {0}")]
    Run(String),
    #[error("malformed forward input: {0}")]
    Input(String),
}

/// Options for building a session.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub intra_op_threads: usize,
}

/// Each row's logits at its last position, `batch * vocab` floats.
#[derive(Debug, Clone)]
pub struct Logits {
    pub vocab: usize,
    pub data: Vec<f32>,
    /// Each row's greedy choice when the run computed it (batchgen's graph
    /// with its own operators: `graph::greedy`), else empty.
    pub greedy: Vec<Greedy>,
}

/// A logits row's greedy choice as `decoding::sampling::greedy` makes it with
/// nothing masked: the lowest index of the largest logit, and log Σ exp over
/// the row (the token's log-probability is `logit − lse`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Greedy {
    pub id: u32,
    pub lse: f64,
}

impl Logits {
    /// Logits without greedy choices.
    pub fn new(vocab: usize, data: Vec<f32>) -> Self {
        Logits { vocab, data, greedy: Vec::new() }
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }

    /// `other`'s rows after these; greedy choices stay only where both have
    /// them for every row.
    pub fn append(&mut self, other: Logits) {
        let rows = self.data.len() / self.vocab.max(1);
        if self.greedy.len() == rows && other.greedy.len() * other.vocab == other.data.len() {
            self.greedy.extend(other.greedy);
        } else {
            self.greedy.clear();
        }
        self.data.extend(other.data);
    }

    /// Row `i`'s greedy choice, if the run computed it.
    pub fn greedy(&self, i: usize) -> Option<Greedy> {
        self.greedy.get(i).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_logits_keep_greedy_choices_only_when_every_row_has_one() {
        let g = |id| Greedy { id, lse: f64::from(id) };
        let with =
            |rows: u32| Logits { vocab: 2, data: vec![0.5; 2 * rows as usize], greedy: (0..rows).map(g).collect() };
        let mut all = Logits::new(2, Vec::new());
        all.append(with(2));
        all.append(with(1));
        assert_eq!((all.data.len(), all.greedy.len()), (6, 3));
        assert_eq!(all.greedy(2), Some(g(0)));
        all.append(Logits::new(2, vec![1.0; 2]));
        assert_eq!((all.data.len(), all.greedy.len(), all.greedy(0)), (8, 0, None));
        all.append(with(1));
        assert!(all.greedy.is_empty(), "rows without a choice keep the rest from having one");
    }
}
