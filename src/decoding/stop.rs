//! Stop sequences on the generated text. Text that could still be the start
//! of a stop sequence is held back, so no part of a stop sequence is ever
//! streamed and then retracted; a match may span any number of tokens.

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
