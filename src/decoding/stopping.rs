//! Token-level stopping: EOS, stop token ids, `max_new_tokens` and the
//! model's context. (Stop sequences act on text and belong to the
//! detokenizer's side; they are not implemented yet.)
use crate::pb::FinishReason;

#[derive(Debug, Clone, PartialEq)]
pub struct StopCriteria {
    pub max_new_tokens: u32,
    pub min_new_tokens: u32,
    /// `None` when the request set `ignore_eos`.
    pub eos_token_id: Option<u32>,
    pub stop_token_ids: Vec<u32>,
    /// True when `max_new_tokens` was capped by the context left after the
    /// prompt (the request left it 0): reaching it is then CONTEXT_FULL.
    pub length_is_context: bool,
}

impl StopCriteria {
    /// Tokens the chooser must not pick yet (EOS and stop ids before
    /// `min_new_tokens`). `generated` counts tokens before this step.
    pub fn masked(&self, generated: u32) -> Vec<u32> {
        if generated >= self.min_new_tokens {
            return Vec::new();
        }
        self.eos_token_id.into_iter().chain(self.stop_token_ids.iter().copied()).collect()
    }

    /// Whether the sequence ends with `token`, `generated` counting it.
    pub fn check(&self, token: u32, generated: u32) -> Option<FinishReason> {
        if generated >= self.min_new_tokens {
            if Some(token) == self.eos_token_id {
                return Some(FinishReason::Eos);
            }
            if self.stop_token_ids.contains(&token) {
                return Some(FinishReason::StopSequence);
            }
        }
        if generated >= self.max_new_tokens {
            return Some(if self.length_is_context { FinishReason::ContextFull } else { FinishReason::Length });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn criteria() -> StopCriteria {
        StopCriteria {
            max_new_tokens: 5,
            min_new_tokens: 2,
            eos_token_id: Some(9),
            stop_token_ids: vec![7],
            length_is_context: false,
        }
    }

    #[test]
    fn eos_and_stop_ids_end_only_after_min_new_tokens() {
        let c = criteria();
        assert_eq!(c.masked(0), vec![9, 7]);
        assert_eq!(c.masked(2), Vec::<u32>::new());
        assert_eq!(c.check(9, 3), Some(FinishReason::Eos));
        assert_eq!(c.check(7, 2), Some(FinishReason::StopSequence));
        assert_eq!(c.check(1, 4), None);
        assert_eq!(c.check(1, 5), Some(FinishReason::Length));
    }

    #[test]
    fn ignore_eos_and_context_cap() {
        let c = StopCriteria { eos_token_id: None, length_is_context: true, ..criteria() };
        assert_eq!(c.check(9, 3), None);
        assert_eq!(c.check(9, 5), Some(FinishReason::ContextFull));
    }
}
