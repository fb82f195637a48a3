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

    /// Row `i`'s greedy choice, if the run computed it.
    pub fn greedy(&self, i: usize) -> Option<Greedy> {
        self.greedy.get(i).copied()
    }
}
