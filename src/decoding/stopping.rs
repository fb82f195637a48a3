//! When a sequence ends, decided on the engine's side as each token is chosen:
//! token-level limits (EOS, stop token ids, `max_new_tokens`, the context) in
//! `StopCriteria`, and stop sequences on the generated text in `SequenceText`,
//! which detokenizes incrementally and holds back text that could still be
//! the start of a stop sequence, so no part of one is ever streamed and then
//! retracted; a match may span any number of tokens.
use crate::pb::FinishReason;
use crate::tokenizer::{Detokenizer, Tokenizer};

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

/// What happened to a piece of new text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Text that can be sent now (possibly empty: held back).
    Text(String),
    /// A stop sequence matched: send this text, then end the sequence.
    Stopped(String),
}

/// Matches stop sequences in one sequence's text.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    include: bool,
    /// Text received but not sent yet.
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>, include: bool) -> Self {
        StopMatcher { stops, include, pending: String::new() }
    }

    /// Takes new text (whole characters) and returns what may be sent.
    pub fn push(&mut self, text: &str) -> Outcome {
        if self.stops.is_empty() {
            return Outcome::Text(text.to_string());
        }
        self.pending.push_str(text);
        // The earliest match wins; at the same start, the longest.
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|at| (at, s.len())))
            .min_by_key(|&(at, len)| (at, std::cmp::Reverse(len)));
        if let Some((at, len)) = found {
            let end = if self.include { at + len } else { at };
            let out = self.pending[..end].to_string();
            self.pending.clear();
            return Outcome::Stopped(out);
        }
        // Hold back the longest tail that is a proper prefix of a stop sequence.
        let hold = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stops.iter().any(|s| s.len() > tail.len() && s.starts_with(tail))
            })
            .unwrap_or(self.pending.len());
        let out = self.pending[..hold].to_string();
        self.pending.drain(..hold);
        Outcome::Text(out)
    }

    /// The sequence ended otherwise: what was held back is plain text.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// One sequence's text as its tokens are chosen: incremental detokenization
/// (whole UTF-8 characters only), then stop sequences. What it returns is
/// what may be sent now; the concatenation of everything it returns is the
/// sequence's text.
#[derive(Debug, Clone)]
pub struct SequenceText {
    detok: Detokenizer,
    matcher: StopMatcher,
}

impl SequenceText {
    pub fn new(stops: Vec<String>, include: bool) -> Self {
        SequenceText { detok: Detokenizer::new(), matcher: StopMatcher::new(stops, include) }
    }

    /// The text `id` completes.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Outcome {
        self.matcher.push(&self.detok.push(tok, id).unwrap_or_default())
    }

    /// The sequence ended otherwise: what was held back (an unfinished
    /// character, a partial stop sequence), unless that completes a stop
    /// sequence, which then cuts it as `push` would.
    pub fn finish(&mut self, tok: &Tokenizer) -> Outcome {
        match self.matcher.push(&self.detok.finish(tok).unwrap_or_default()) {
            Outcome::Text(mut t) => {
                t.push_str(&self.matcher.finish());
                Outcome::Text(t)
            }
            stopped => stopped,
        }
    }

    /// `push`, then `finish` when `finish` says the sequence ends with this
    /// token: its text and how it ended (a stop sequence found in the text
    /// overrides the token's own reason).
    pub fn push_and_end(
        &mut self,
        tok: &Tokenizer,
        id: u32,
        finish: Option<FinishReason>,
    ) -> (String, Option<FinishReason>) {
        let text = match self.push(tok, id) {
            Outcome::Stopped(t) => return (t, Some(FinishReason::StopSequence)),
            Outcome::Text(t) => t,
        };
        let Some(reason) = finish else {
            return (text, None);
        };
        let (rest, reason) = self.end(tok, reason);
        (text + &rest, Some(reason))
    }

    /// What `end` would send now for `reason`, when anything is held back
    /// (an unfinished character, a partial stop sequence): the text and the
    /// reason. The response side keeps it to end the sequence itself when
    /// the deadline passes before the engine does.
    pub fn held(&self, tok: &Tokenizer, reason: FinishReason) -> Option<(String, FinishReason)> {
        if !self.detok.holds() && self.matcher.pending.is_empty() {
            return None;
        }
        Some(self.clone().end(tok, reason))
    }

    /// The sequence ends for `reason`: the held-back text, and the reason,
    /// which becomes STOP_SEQUENCE when that text completes a stop sequence.
    pub fn end(&mut self, tok: &Tokenizer, reason: FinishReason) -> (String, FinishReason) {
        match self.finish(tok) {
            Outcome::Text(rest) => (rest, reason),
            Outcome::Stopped(rest) => (rest, FinishReason::StopSequence),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::test_tokenizer;

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

    fn run(stops: &[&str], include: bool, pieces: &[&str]) -> (Vec<String>, Option<String>, String) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect(), include);
        let mut sent = Vec::new();
        for p in pieces {
            match m.push(p) {
                Outcome::Text(t) => sent.push(t),
                Outcome::Stopped(t) => return (sent, Some(t), String::new()),
            }
        }
        let rest = m.finish();
        (sent, None, rest)
    }

    #[test]
    fn a_stop_sequence_spanning_tokens_is_never_partly_sent() {
        let (sent, stopped, _) = run(&["END"], false, &["Hello E", "N", "D and more"]);
        assert_eq!(sent, vec!["Hello ", "",]);
        assert_eq!(stopped.as_deref(), Some(""));
        let (sent, stopped, _) = run(&["END"], true, &["Hello E", "N", "D and more"]);
        assert_eq!(sent.concat() + stopped.as_deref().unwrap(), "Hello END");
    }

    #[test]
    fn a_match_at_the_very_first_token() {
        let (sent, stopped, _) = run(&["\n"], false, &["\nrest"]);
        assert!(sent.is_empty());
        assert_eq!(stopped.as_deref(), Some(""));
    }

    #[test]
    fn overlapping_partial_matches_are_released_when_they_fail() {
        // "abab" then "c": "ababc" contains "abc" at 2.
        let (sent, stopped, _) = run(&["abc"], false, &["ab", "ab", "c"]);
        assert_eq!(sent.concat(), "ab");
        assert_eq!(stopped.as_deref(), Some(""));
        // A held prefix that never completes comes out in the end.
        let (sent, stopped, rest) = run(&["abc"], false, &["xa", "b"]);
        assert_eq!((sent.concat(), stopped, rest), ("x".to_string(), None, "ab".to_string()));
    }

    #[test]
    fn the_earliest_of_several_stop_sequences_wins() {
        let (sent, stopped, _) = run(&["world", "lo w"], true, &["hello world"]);
        assert_eq!(sent.concat() + stopped.as_deref().unwrap(), "hello w");
    }

    #[test]
    fn multibyte_text_is_cut_on_character_boundaries() {
        let (sent, stopped, _) = run(&["🎉!"], false, &["日本🎉", "🎉", "!x"]);
        assert_eq!(sent.concat() + stopped.as_deref().unwrap(), "日本🎉");
    }

    #[test]
    fn without_stop_sequences_text_passes_through() {
        let (sent, stopped, rest) = run(&[], false, &["a", "b"]);
        assert_eq!((sent.concat(), stopped, rest), ("ab".to_string(), None, String::new()));
    }

    /// Feeds `text`'s tokens one by one, the last with `finish`; returns
    /// the pieces and how it ended.
    fn feed(tok: &Tokenizer, stops: &[&str], text: &str, finish: FinishReason) -> (Vec<String>, Option<FinishReason>) {
        let ids = tok.encode(text).unwrap();
        let mut seq = SequenceText::new(stops.iter().map(|s| s.to_string()).collect(), false);
        let mut pieces = Vec::new();
        for (n, &id) in ids.iter().enumerate() {
            let (piece, end) = seq.push_and_end(tok, id, (n + 1 == ids.len()).then_some(finish));
            pieces.push(piece);
            if end.is_some() {
                return (pieces, end);
            }
        }
        (pieces, None)
    }

    #[test]
    fn sequence_text_holds_split_characters_and_stops_on_text() {
        let tok = test_tokenizer();
        // No stop sequence: whole characters only, everything out by the end.
        let text = "日本🎉 ok";
        let (pieces, end) = feed(&tok, &[], text, FinishReason::Length);
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        assert_eq!((pieces.concat().as_str(), end), (text, Some(FinishReason::Length)));
        // A stop sequence inside the text ends it there, whatever the token said.
        let (pieces, end) = feed(&tok, &["🎉"], text, FinishReason::Length);
        assert_eq!((pieces.concat().as_str(), end), ("日本", Some(FinishReason::StopSequence)));
        // A partial stop sequence held at the end comes out with the last token.
        let (pieces, end) = feed(&tok, &[" oka"], text, FinishReason::Eos);
        assert_eq!(pieces.last().map(String::as_str), Some(" ok"));
        assert_eq!((pieces.concat().as_str(), end), (text, Some(FinishReason::Eos)));
    }

    #[test]
    fn held_is_what_end_would_send_at_a_deadline() {
        let tok = test_tokenizer();
        let ids = tok.encode("日本🎉 ok").unwrap();
        let mut seq = SequenceText::new(vec![" oka".into()], false);
        let mut sent = String::new();
        let mut held_chars = 0;
        for n in 0..ids.len() {
            sent += &seq.push_and_end(&tok, ids[n], None).0;
            // Sent text + held text = the text so far (an unfinished
            // character as U+FFFD, as `end` gives it); asking twice is the same.
            let held = seq.held(&tok, FinishReason::Deadline);
            assert_eq!(held, seq.held(&tok, FinishReason::Deadline));
            let (text, reason) = held.clone().unwrap_or_default();
            assert_eq!(sent.clone() + &text, tok.decode(&ids[..=n]).unwrap(), "after {n} tokens");
            if held.is_some() {
                assert_eq!(reason, FinishReason::Deadline);
                held_chars += 1;
            }
        }
        assert!(held_chars >= 2, "split characters and the partial stop sequence were held");
        // " ok" is held (a prefix of " oka").
        assert_eq!(sent, "日本🎉");
        assert_eq!(seq.held(&tok, FinishReason::Deadline), Some((" ok".into(), FinishReason::Deadline)));
        assert_eq!(seq.end(&tok, FinishReason::Deadline), (" ok".into(), FinishReason::Deadline));
        // Nothing is held once a sequence has plainly moved on.
        let mut plain = SequenceText::new(vec![], false);
        plain.push_and_end(&tok, tok.encode("a").unwrap()[0], None);
        assert_eq!(plain.held(&tok, FinishReason::Deadline), None);
    }
}
