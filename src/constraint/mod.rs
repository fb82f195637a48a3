//! Structured outputs: a request's constraint (JSON Schema, any JSON object,
//! regex, a choice of strings, a Lark grammar) keeps every token its rows
//! generate inside the constraint's language.
//!
//! # Why llguidance
//! The constraint engine is a maintained library, not ours. Measured on this
//! tokenizer (GPT-2, 50,257 ids) with the 24 schemas of
//! `tests/fixtures/structured/schemas.json` (2-vCPU Xeon, release build,
//! 2026-12-07): llguidance 1.9 compiles a schema in 0.4–0.9 ms (p99 0.85
//! ms) and computes a step's mask in ≤ 0.1 ms at p99 (its lexer is built
//! lazily, its token trie walked once per step); building the trie costs
//! 0.12 s once at start-up. outlines-core 0.2.14 builds each schema's full
//! token index ahead of time: 13–185 ms per schema (p99 149 ms), over the
//! 50 ms compile target, and it depends on `tokenizers` 0.22 with no way to
//! turn that off, which would put a second `tokenizers` in the tree. Neither
//! is pulled in through `toktrie_hf_tokenizers` (it needs `tokenizers` 0.21):
//! the trie is built here from the ids' raw bytes (`Tokenizer::token_bytes`).
//!
//! # Where it sits in a step
//! A constrained row's mask is applied after the request's processors
//! (logit_bias → repetition → presence/frequency → no_repeat_ngram →
//! min_new_tokens → **mask**) and before the warpers (temperature → top_k →
//! top_p → min_p → typical_p), which is where a `LogitsProcessor` passed to
//! transformers' `generate()` runs; the mask only sets disallowed tokens to
//! −∞, so its place among the processors changes nothing, and sampling draws
//! from the allowed tokens renormalised. The mask is computed inline on the
//! engine thread as each row chooses: a step of this machine's 124M model
//! takes 15–60 ms while a mask takes well under 0.1 ms at p99, so moving it
//! off the thread (llguidance suggests overlapping it with the forward pass)
//! would save under 1 % of a 16-row step on two cores that ONNX Runtime
//! already keeps busy. Its cost per step is the `batchgen_constraint_mask_seconds`
//! histogram. Per-step work is bounded by llguidance's fuel limits
//! (`compile::limits`), so a hostile grammar fails its request, never stalls
//! the batch.
//!
//! When the processors forbid every token the constraint allows (a
//! no_repeat_ngram ban on the only allowed token, or min_new_tokens masking
//! EOS where the language has ended) the constraint wins: the row takes the
//! most likely allowed token of the raw logits. When the language has ended
//! (only EOS allowed) the row ends with EOS whatever `ignore_eos` says.
mod compile;

pub use compile::{CompileError, Grammar, Grammars};

use llguidance::Matcher;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::SimpleVob;

/// Longest constraint text accepted (a schema, regex, grammar, or all
/// choices together), in bytes.
pub const MAX_CONSTRAINT_BYTES: usize = 65536;
/// Most strings in a `choice`.
pub const MAX_CHOICES: usize = 1024;
/// Longest single choice, in bytes.
pub const MAX_CHOICE_BYTES: usize = 1024;

/// The constraint kinds, as ModelInfo lists them.
pub const KINDS: [&str; 5] = ["json_schema", "json_object", "regex", "choice", "grammar"];

/// A validated constraint, before compiling.
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    /// A JSON Schema, as JSON text that parsed to an object or a boolean.
    JsonSchema(String),
    /// Any JSON object.
    JsonObject,
    Regex(String),
    Choice(Vec<String>),
    /// Lark syntax.
    Grammar(String),
}

impl Spec {
    pub fn kind(&self) -> &'static str {
        match self {
            Spec::JsonSchema(_) => "json_schema",
            Spec::JsonObject => "json_object",
            Spec::Regex(_) => "regex",
            Spec::Choice(_) => "choice",
            Spec::Grammar(_) => "grammar",
        }
    }

    /// The request field it came from, for error messages.
    pub fn field(&self) -> &'static str {
        match self {
            Spec::JsonSchema(_) => "decoding.json_schema",
            Spec::JsonObject => "decoding.json_object",
            Spec::Regex(_) => "decoding.regex",
            Spec::Choice(_) => "decoding.choice",
            Spec::Grammar(_) => "decoding.grammar",
        }
    }

    /// What identifies the compiled grammar: the kind and the exact text.
    fn cache_key(&self) -> String {
        let text = match self {
            Spec::JsonSchema(s) | Spec::Regex(s) | Spec::Grammar(s) => s.clone(),
            Spec::JsonObject => String::new(),
            Spec::Choice(c) => serde_json::to_string(c).unwrap_or_default(),
        };
        format!("{}\0{text}", self.kind())
    }

    /// llguidance's form of it.
    fn grammar(&self) -> Result<TopLevelGrammar, String> {
        Ok(match self {
            Spec::JsonSchema(text) => {
                let mut schema: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
                compact_json(&mut schema);
                TopLevelGrammar::from_json_schema(schema)
            }
            Spec::JsonObject => {
                let mut schema = serde_json::json!({"type": "object"});
                compact_json(&mut schema);
                TopLevelGrammar::from_json_schema(schema)
            }
            Spec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Spec::Choice(choices) => {
                let alternatives: Vec<String> = choices.iter().map(|c| regex_syntax::escape(c)).collect();
                TopLevelGrammar::from_regex(&format!("(?:{})", alternatives.join("|")))
            }
            Spec::Grammar(lark) => TopLevelGrammar::from_lark(lark.clone()),
        })
    }
}

/// JSON as Python's `json.dumps` writes it (", " and ": ", no other
/// whitespace) unless the schema sets its own `x-guidance` options: a model
/// may otherwise pad with whitespace without end, which a small model does.
fn compact_json(schema: &mut serde_json::Value) {
    if let Some(object) = schema.as_object_mut()
        && !object.contains_key("x-guidance")
    {
        let options = llguidance::JsonCompileOptions {
            item_separator: ", ".into(),
            key_separator: ": ".into(),
            whitespace_flexible: false,
            ..Default::default()
        };
        if let Ok(value) = serde_json::to_value(options) {
            object.insert("x-guidance".into(), value);
        }
    }
}

/// One row's parser state: what its tokens so far allow next.
pub struct RowConstraint {
    matcher: Matcher,
    eos: u32,
    /// A beam that continues a −∞ candidate (fewer allowed continuations
    /// than beams): it allows nothing and is never chosen again.
    dead: bool,
}

/// Tokens one row may take at a step.
pub struct Mask {
    allowed: Option<SimpleVob>,
}

impl Mask {
    pub fn allows(&self, token: u32) -> bool {
        self.allowed.as_ref().is_some_and(|m| m.is_allowed(token))
    }

    /// Sets every disallowed token's score to −∞.
    pub fn apply(&self, scores: &mut [f32]) {
        let Some(allowed) = &self.allowed else {
            scores.fill(f32::NEG_INFINITY);
            return;
        };
        for (w, &word) in allowed.as_slice().iter().enumerate() {
            if word == u32::MAX {
                continue;
            }
            let base = w * 32;
            for bit in 0..32 {
                if word & (1 << bit) == 0
                    && let Some(s) = scores.get_mut(base + bit)
                {
                    *s = f32::NEG_INFINITY;
                }
            }
        }
    }

    /// A dead beam's: nothing is allowed.
    pub fn allows_nothing(&self) -> bool {
        self.allowed.is_none()
    }

    /// Only `eos` is allowed: the language has ended.
    pub fn only(&self, eos: u32) -> bool {
        self.allowed.as_ref().is_some_and(|m| m.is_allowed(eos) && m.num_set() == 1)
    }
}

impl RowConstraint {
    pub fn new(grammar: &Grammar) -> Self {
        RowConstraint { matcher: Matcher::new(Ok(grammar.parser.deep_clone())), eos: grammar.eos, dead: false }
    }

    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// What may follow the tokens consumed so far; an error (a step past
    /// the per-step limits) fails the request.
    pub fn mask(&mut self) -> Result<Mask, String> {
        if self.dead {
            return Ok(Mask { allowed: None });
        }
        let t = std::time::Instant::now();
        let allowed = self.matcher.compute_mask_or_eos().map_err(|e| e.to_string())?;
        metrics::histogram!(crate::telemetry::CONSTRAINT_MASK_SECONDS).record(t.elapsed().as_secs_f64());
        Ok(Mask { allowed: Some(allowed) })
    }

    /// Advances past `token`, which the last mask allowed (EOS ends it).
    pub fn consume(&mut self, token: u32) -> Result<(), String> {
        if self.dead || token == self.eos {
            return Ok(());
        }
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// An independent copy (a beam taking over its parent's state); `dead`
    /// when the beam continues a candidate its parent did not allow.
    pub fn fork(&self, dead: bool) -> Self {
        RowConstraint { matcher: self.matcher.deep_clone(), eos: self.eos, dead: self.dead || dead }
    }
}

/// One `Grammars` of the tiny fixture's tokenizer for every unit test (its
/// trie takes a while to build in a debug build).
#[cfg(test)]
pub(crate) fn test_grammars() -> &'static Grammars {
    static GRAMMARS: std::sync::OnceLock<Grammars> = std::sync::OnceLock::new();
    GRAMMARS.get_or_init(|| Grammars::new(&crate::tokenizer::test_tokenizer(), 50257, 50256, 64).expect("grammars"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grammars() -> &'static Grammars {
        test_grammars()
    }

    #[test]
    fn a_choice_allows_exactly_its_strings_then_only_eos() {
        let g = grammars();
        let tok = crate::tokenizer::test_tokenizer();
        let grammar = g.compile(&Spec::Choice(vec!["yes".into(), "no way".into()])).unwrap();
        let mut row = RowConstraint::new(&grammar);
        let mask = row.mask().unwrap();
        let yes = tok.encode("yes").unwrap();
        assert_eq!(yes.len(), 1);
        assert!(mask.allows(yes[0]) && !mask.allows(50256));
        assert!(!mask.allows(tok.encode("maybe").unwrap()[0]));
        row.consume(yes[0]).unwrap();
        let mask = row.mask().unwrap();
        assert!(mask.only(50256), "after a whole choice only EOS may follow");
        let mut scores = vec![0.0f32; 50257];
        mask.apply(&mut scores);
        assert_eq!(scores.iter().filter(|s| s.is_finite()).count(), 1);
        assert!(scores[50256].is_finite());
    }

    #[test]
    fn the_metrics_label_every_kind() {
        assert_eq!(KINDS, crate::telemetry::CONSTRAINT_KINDS);
    }

    #[test]
    fn compiled_grammars_are_cached_by_their_text() {
        let g = grammars();
        let a = g.compile(&Spec::Regex("[0-9]+".into())).unwrap();
        let b = g.compile(&Spec::Regex("[0-9]+".into())).unwrap();
        assert!(std::sync::Arc::ptr_eq(&a, &b));
        let c = g.compile(&Spec::Grammar("start: /[0-9]+/".into())).unwrap();
        assert!(!std::sync::Arc::ptr_eq(&a, &c), "same text, another kind");
    }

    #[test]
    fn bad_constraints_are_refused_with_the_reason() {
        let g = grammars();
        let e = g.compile(&Spec::Regex("(a".into())).err().unwrap();
        assert!(e.0.contains("unclosed group"), "{e}");
        let e = g.compile(&Spec::JsonSchema(r#"{"type":"integer","minimum":5,"maximum":1}"#.into())).err().unwrap();
        assert!(e.0.contains("minimum"), "{e}");
        let e = g.compile(&Spec::Grammar("start: foo".into())).err().unwrap();
        assert!(e.0.contains("foo"), "{e}");
    }

    #[test]
    fn json_is_compact_unless_the_schema_says_otherwise() {
        let g = grammars();
        let tok = crate::tokenizer::test_tokenizer();
        let space = tok.encode(" ").unwrap()[0];
        let brace = tok.encode("{").unwrap()[0];
        let mut row = RowConstraint::new(&g.compile(&Spec::JsonObject).unwrap());
        row.consume(brace).unwrap();
        assert!(!row.mask().unwrap().allows(space), "no padding after {{");
        let flexible = r#"{"type":"object","x-guidance":{"whitespace_flexible":true}}"#;
        let mut row = RowConstraint::new(&g.compile(&Spec::JsonSchema(flexible.into())).unwrap());
        row.consume(brace).unwrap();
        assert!(row.mask().unwrap().allows(space));
    }
}
