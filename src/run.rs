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
}

impl Logits {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }
}
