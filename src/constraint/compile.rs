//! Compiling constraints: the token trie built once from the tokenizer the
//! server loaded, llguidance's parser factory over it, and a bounded cache of
//! compiled grammars keyed by the constraint's text.
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use llguidance::api::ParserLimits;
#[cfg(test)]
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{self, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{ParserFactory, TokenParser};

use super::Spec;
use crate::telemetry;
use crate::tokenizer::Tokenizer;

/// llguidance's view of our tokenizer: the trie of every id's raw bytes
/// (special tokens behind llguidance's 0xFF marker, so no text can spell
/// them) and our own BPE for the byte strings a grammar forces, so that
/// forced text is tokenized the way a prompt would be.
struct TokEnv {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for TokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        match std::str::from_utf8(s).ok().map(|text| self.tokenizer.encode(text)) {
            Some(Ok(ids)) => ids,
            _ => self.trie.greedy_tokenize(s),
        }
    }
}

/// A compiled constraint, shared by every request that asks for the same
/// text; each row starts from its own copy of `parser`.
pub struct Grammar {
    pub(super) parser: TokenParser,
    /// Which `Spec` kind it came from (for metrics and logs).
    pub kind: &'static str,
    /// Its cache key: two grammars are the same when their keys are.
    key: Arc<str>,
    /// The token that ends a sentence of the language.
    pub(super) eos: u32,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Grammar({})", self.kind)
    }
}

impl PartialEq for Grammar {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct CompileError(pub String);

/// The parser factory and the cache of compiled grammars. Compiling runs on
/// the request's blocking validation thread, never on an engine thread, so
/// a request whose grammar is slow to build waits before the queue, not in
/// the batch.
pub struct Grammars {
    factory: ParserFactory,
    eos: u32,
    cache: Mutex<Lru>,
}

/// Least recently used first; `capacity` entries at most.
struct Lru {
    map: HashMap<Arc<str>, Arc<Grammar>>,
    order: VecDeque<Arc<str>>,
    capacity: usize,
}

impl Lru {
    fn get(&mut self, key: &str) -> Option<Arc<Grammar>> {
        let grammar = self.map.get(key)?.clone();
        if let Some(i) = self.order.iter().position(|k| &**k == key) {
            let k = self.order.remove(i).expect("position is in range");
            self.order.push_back(k);
        }
        Some(grammar)
    }

    fn insert(&mut self, key: Arc<str>, grammar: Arc<Grammar>) {
        if self.capacity == 0 || self.map.contains_key(&key) {
            return;
        }
        while self.map.len() >= self.capacity {
            let Some(old) = self.order.pop_front() else { break };
            self.map.remove(&old);
        }
        self.order.push_back(key.clone());
        self.map.insert(key, grammar);
    }
}

impl Grammars {
    /// `vocab_size` is the model's (the width of its logits, which may
    /// exceed the tokenizer's: such ids have no bytes and are never allowed);
    /// `eos` the token that ends a sentence of the language.
    pub fn new(tokenizer: &Tokenizer, vocab_size: u32, eos: u32, cache_entries: usize) -> Result<Self, CompileError> {
        let words: Vec<Vec<u8>> = (0..vocab_size)
            .map(|id| {
                let bytes = tokenizer.token_bytes(id);
                if tokenizer.is_special(id) { [&[TokTrie::SPECIAL_TOKEN_MARKER][..], &bytes].concat() } else { bytes }
            })
            .collect();
        let trie = TokTrie::from(&TokRxInfo::new(vocab_size, eos), &words);
        let env: toktrie::TokEnv = Arc::new(TokEnv { trie, tokenizer: tokenizer.clone() });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| CompileError(e.to_string()))?;
        factory.quiet();
        *factory.limits_mut() = limits();
        let cache = Mutex::new(Lru { map: HashMap::new(), order: VecDeque::new(), capacity: cache_entries });
        Ok(Grammars { factory, eos, cache })
    }

    /// The token that ends a sentence of every grammar.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// The compiled grammar for `spec`, from the cache or compiled now (and
    /// its first mask computed, so that an expensive start is paid here).
    pub fn compile(&self, spec: &Spec) -> Result<Arc<Grammar>, CompileError> {
        let key: Arc<str> = spec.cache_key().into();
        let t = Instant::now();
        let cached = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key);
        if let Some(grammar) = cached {
            metrics::counter!(telemetry::CONSTRAINT_CACHE, "result" => "hit").increment(1);
            metrics::histogram!(telemetry::CONSTRAINT_COMPILE_SECONDS, "result" => "hit")
                .record(t.elapsed().as_secs_f64());
            return Ok(grammar);
        }
        let top = spec.grammar().map_err(CompileError)?;
        let parser = self.factory.create_parser(top).map_err(|e| CompileError(short(&e.to_string())))?;
        // Computing the first mask builds the lexer states a start needs; a
        // grammar whose first step exceeds the step limits fails here, not
        // in the batch.
        let mut probe = llguidance::Matcher::new(Ok(parser.deep_clone()));
        probe.compute_mask().map_err(|e| CompileError(short(&e.to_string())))?;
        let grammar = Arc::new(Grammar { parser, kind: spec.kind(), key: key.clone(), eos: self.eos });
        metrics::counter!(telemetry::CONSTRAINT_CACHE, "result" => "miss").increment(1);
        metrics::histogram!(telemetry::CONSTRAINT_COMPILE_SECONDS, "result" => "miss")
            .record(t.elapsed().as_secs_f64());
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(key, grammar.clone());
        Ok(grammar)
    }
}

/// llguidance's defaults, with the per-step work bounded tighter (a step
/// runs inside the batch: its lexer fuel ≈ 14k/ms and Earley items ≈ 20k/ms
/// by llguidance's own figures, so ≈ 3.5 ms and ≈ 1 ms at most per row) and
/// no grammar or parser state in error messages (they go to the client).
fn limits() -> ParserLimits {
    ParserLimits { step_lexer_fuel: 50_000, step_max_items: 20_000, verbose_errors: false, ..ParserLimits::default() }
}

/// The first lines of llguidance's message (its longer ones quote the
/// grammar back).
fn short(message: &str) -> String {
    let lines: Vec<&str> = message.lines().take(6).collect();
    let mut text = lines.join("\n");
    if text.len() > 600 {
        let cut = (0..=600).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        text.truncate(cut);
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grammar(kind: &'static str) -> Arc<Grammar> {
        let g = super::super::test_grammars();
        let parser = g.factory.create_parser(TopLevelGrammar::from_regex("a")).unwrap();
        Arc::new(Grammar { parser, kind, key: "a".into(), eos: 50256 })
    }

    #[test]
    fn the_cache_keeps_the_most_recently_used() {
        let mut lru = Lru { map: HashMap::new(), order: VecDeque::new(), capacity: 2 };
        let g = grammar("regex");
        lru.insert("a".into(), g.clone());
        lru.insert("b".into(), g.clone());
        assert!(lru.get("a").is_some());
        lru.insert("c".into(), g);
        assert!(lru.get("b").is_none(), "b was least recently used");
        assert!(lru.get("a").is_some() && lru.get("c").is_some());
        assert_eq!(lru.map.len(), 2);
    }
}
