//! The model's tokenizer and UTF-8-safe incremental detokenization.
//!
//! GPT-2's byte-level BPE splits most emoji and CJK characters across tokens,
//! so decoding one token at a time yields U+FFFD halves. `Detokenizer` keeps a
//! window of recent tokens and only emits text once it no longer ends in an
//! incomplete character (the approach of TGI and `tokenizers::DecodeStream`).
use std::path::Path;

#[derive(Debug, thiserror::Error)]
#[error("tokenizer: {0}")]
pub struct TokenizerError(pub String);

fn tok_err(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError(e.to_string())
}

/// One token of a tokenized text, with its byte offsets in that text.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub id: u32,
    pub start: usize,
    pub end: usize,
}

/// Cheap to clone: every clone shares one vocabulary (the engine's workers
/// and each request's responder hold one).
#[derive(Clone)]
pub struct Tokenizer {
    inner: std::sync::Arc<tokenizers::Tokenizer>,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(tok_err)?;
        Ok(Tokenizer { inner: inner.into() })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        Ok(self.inner.encode(text, false).map_err(tok_err)?.get_ids().to_vec())
    }

    /// Ids with byte offsets into `text`.
    pub fn encode_pieces(&self, text: &str) -> Result<Vec<Piece>, TokenizerError> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        Ok(enc.get_ids().iter().zip(enc.get_offsets()).map(|(&id, &(start, end))| Piece { id, start, end }).collect())
    }

    /// Text of `ids`, special tokens dropped. Invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    /// Text of `ids`, special tokens included unless `skip_special`.
    pub fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.inner.decode(ids, skip_special).map_err(tok_err)
    }

    /// The token's own text, special tokens included (e.g. `<|endoftext|>`).
    pub fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    /// The token's raw bytes: a byte-level BPE token's string mapped back
    /// through GPT-2's byte-to-character table (so a token that holds part
    /// of a character gives its bytes, not U+FFFD), an added token's text.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(token) = self.inner.id_to_token(id) else { return Vec::new() };
        if self.inner.get_added_vocabulary().is_special_token(&token) {
            return token.into_bytes();
        }
        token.chars().map(byte_of_char).collect::<Option<Vec<u8>>>().unwrap_or_else(|| token.into_bytes())
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.inner.get_added_vocabulary().is_special_token(&self.inner.id_to_token(id).unwrap_or_default())
    }
}

/// The byte GPT-2's `bytes_to_unicode` maps to `c`: printable Latin-1
/// bytes stand for themselves, the other 68 for U+0100 onwards in order.
fn byte_of_char(c: char) -> Option<u8> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let c = c as u32;
    if c < 0x100 {
        return printable(c).then_some(c as u8);
    }
    (0u32..256).filter(|b| !printable(*b)).nth((c - 0x100) as usize).map(|b| b as u8)
}

/// Incremental decoding of one sequence. `push` returns the new text that is
/// complete; `finish` returns what was held back, so that the concatenation
/// of everything returned equals `Tokenizer::decode` of all the ids.
#[derive(Debug, Clone)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix_offset: usize,
    /// End of the part whose text has been emitted.
    read_offset: usize,
}

impl Default for Detokenizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Detokenizer {
    pub fn new() -> Self {
        Detokenizer { ids: Vec::new(), prefix_offset: 0, read_offset: 0 }
    }

    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let new = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            return Ok(new);
        }
        Ok(String::new())
    }

    /// Whether tokens wait for the rest of their character.
    pub fn holds(&self) -> bool {
        self.read_offset < self.ids.len()
    }

    /// The text still held back (an unfinished character stays U+FFFD).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String, TokenizerError> {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}

/// The tiny fixture's tokenizer (the real GPT-2 vocabulary), for unit tests.
#[cfg(test)]
pub(crate) fn test_tokenizer() -> Tokenizer {
    // Loaded once per test binary (clones share it): a debug build takes
    // a good part of a second to read the 50,257-token vocabulary.
    static LOADED: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gpt2/tokenizer.json");
            Tokenizer::from_file(&p).unwrap()
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
        let mut d = Detokenizer::new();
        let mut parts: Vec<String> = ids.iter().map(|&id| d.push(tok, id).unwrap()).collect();
        parts.push(d.finish(tok).unwrap());
        parts
    }

    #[test]
    fn emoji_and_cjk_split_across_tokens_are_never_emitted_in_halves() {
        let tok = test_tokenizer();
        let text = "日本語 🎉🚀 and 你好，世界！ done ✅";
        let ids = tok.encode(text).unwrap();
        let halves = ids.iter().filter(|&&i| tok.decode(&[i]).unwrap().contains('\u{FFFD}')).count();
        assert!(halves > 4, "the test needs characters split across tokens");
        let parts = stream(&tok, &ids);
        for p in &parts {
            assert!(!p.contains('\u{FFFD}'), "{p:?} has a replacement character");
        }
        assert_eq!(parts.concat(), text);
    }

    #[test]
    fn an_unfinished_character_at_the_end_comes_out_of_finish() {
        let tok = test_tokenizer();
        let ids = tok.encode("ab🎉").unwrap();
        let cut = &ids[..ids.len() - 1];
        let parts = stream(&tok, cut);
        assert_eq!(parts.concat(), tok.decode(cut).unwrap());
        assert!(parts.last().unwrap().contains('\u{FFFD}'));
    }

    #[test]
    fn special_tokens_are_skipped_in_text_and_flagged() {
        let tok = test_tokenizer();
        let mut ids = tok.encode("hello").unwrap();
        ids.push(50256);
        assert_eq!(stream(&tok, &ids).concat(), "hello");
        assert!(tok.is_special(50256));
        assert!(!tok.is_special(ids[0]));
        assert_eq!(tok.token_text(50256), "<|endoftext|>");
    }

    #[test]
    fn token_bytes_are_the_raw_bytes_even_of_part_of_a_character() {
        let tok = test_tokenizer();
        let ids = tok.encode("a 👋 b").unwrap();
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| tok.token_bytes(id)).collect();
        assert_eq!(bytes, "a 👋 b".as_bytes());
        assert!(ids.iter().any(|&id| std::str::from_utf8(&tok.token_bytes(id)).is_err()), "no split character");
        assert_eq!(tok.token_bytes(50256), b"<|endoftext|>");
    }

    #[test]
    fn pieces_carry_byte_offsets() {
        let tok = test_tokenizer();
        let text = "Hello world";
        let pieces = tok.encode_pieces(text).unwrap();
        assert_eq!(pieces.len(), 2);
        assert_eq!(&text[pieces[1].start..pieces[1].end], " world");
    }
}
