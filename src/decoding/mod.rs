//! Choosing tokens, as chapter 5 of *NLP with Transformers* lays it out:
//! logits processors and warpers (`logits`), greedy choice, log-softmax and
//! the reported alternatives (`sampling`), beam search (`beam`), and when a
//! sequence ends (`stopping` for token-level limits, `stop` for stop
//! sequences matched on the text).
pub mod beam;
pub mod logits;
pub mod sampling;
pub mod stop;
pub mod stopping;
