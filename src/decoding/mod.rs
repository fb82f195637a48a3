//! Choosing tokens, as chapter 5 of *NLP with Transformers* lays it out:
//! logits processors and warpers (`logits`), the one per-row chooser
//! (`sampling::choose`: greedy is its configuration without sampling),
//! log-softmax and the reported alternatives (`sampling`), the draw from the
//! warped distribution (`draw`), the vectorised
//! arithmetic under both (`math`), beam search
//! (`beam`), and when a
//! sequence ends (`stopping`: token-level limits and stop sequences on the
//! text, both decided as the token is chosen).
pub mod beam;
pub mod draw;
pub mod logits;
pub mod math;
pub mod sampling;
pub mod stopping;
