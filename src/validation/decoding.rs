//! The decoding settings of a request: each field within its range, and
//! the plan the engine runs (processors, sampling with its warpers and seed,
//! or beam search).
use super::{ValidationError, invalid};
use crate::constraint::{MAX_CHOICE_BYTES, MAX_CHOICES, MAX_CONSTRAINT_BYTES, Spec};
use crate::decoding::beam::BeamPlan;
use crate::decoding::logits::{Processors, Warpers};
use crate::pb;

/// Most samples one request may ask for (each is a row of the batch).
pub const MAX_SAMPLES: u32 = 16;
/// Most logit_bias entries.
pub const MAX_LOGIT_BIAS: usize = 300;
/// Most tokens a request may ask its rows to propose per step.
pub const MAX_SPEC_TOKENS: u32 = 16;
/// Largest no_repeat_ngram_size.
pub const MAX_NO_REPEAT_NGRAM: u32 = 64;

/// Random sampling, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingPlan {
    pub warpers: Warpers,
    /// Seed of sample 0; sample i uses `seed + i`.
    pub seed: u64,
    pub num_samples: u32,
}

/// How the request chooses tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodingPlan {
    pub processors: Processors,
    /// `None` (and no beam): greedy search.
    pub sampling: Option<SamplingPlan>,
    pub beam: Option<BeamPlan>,
    pub speculation: Speculation,
}

/// Whether the request's rows speculate (`crate::engine::spec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Speculation {
    /// As the server's `--spec-tokens` says.
    #[default]
    Server,
    Off,
    /// On, proposing at most this many tokens per step (0: the server's
    /// number, or `DEFAULT_SPEC_TOKENS` where that is 0).
    On {
        tokens: u32,
    },
}

impl DecodingPlan {
    /// Rows of the batch the request occupies.
    pub fn rows(&self) -> u32 {
        match (&self.sampling, &self.beam) {
            (Some(s), _) => s.num_samples,
            (_, Some(b)) => b.num_beams as u32,
            _ => 1,
        }
    }

    /// Sequences the request returns.
    pub fn sequences(&self) -> u32 {
        self.beam.as_ref().map_or_else(|| self.rows(), |b| b.num_return_sequences as u32)
    }
}

fn check_speculation(s: Option<pb::Speculation>, beams: bool) -> Result<Speculation, ValidationError> {
    use pb::SpeculationMode as M;
    let Some(s) = s else { return Ok(Speculation::Server) };
    let mode = M::try_from(s.mode)
        .map_err(|_| invalid("decoding.speculation.mode", format!("{} is not a SpeculationMode (0 to 2)", s.mode)))?;
    if s.tokens > MAX_SPEC_TOKENS {
        return Err(invalid(
            "decoding.speculation.tokens",
            format!("must be at most {MAX_SPEC_TOKENS} (0 means the server's number), got {}", s.tokens),
        ));
    }
    if s.tokens > 0 && mode != M::On {
        return Err(invalid(
            "decoding.speculation.tokens",
            format!("is {} but the mode is {}: set tokens only with SPECULATION_MODE_ON", s.tokens, mode.as_str_name()),
        ));
    }
    if beams && mode == M::On {
        return Err(invalid(
            "decoding.speculation.mode",
            "is SPECULATION_MODE_ON, but beam search does not speculate: leave it unset or off with num_beams > 1"
                .into(),
        ));
    }
    Ok(match mode {
        M::Unspecified => Speculation::Server,
        M::Off => Speculation::Off,
        M::On => Speculation::On { tokens: s.tokens },
    })
}

/// The request's constraint, each text within its size (compiled later, as
/// the last check of `validate`).
pub(super) fn check_constraint(c: Option<pb::decoding::Constraint>) -> Result<Option<Spec>, ValidationError> {
    use pb::decoding::Constraint as C;
    let too_long = |field: &'static str, len: usize| {
        invalid(field, format!("must be at most {MAX_CONSTRAINT_BYTES} bytes, got {len}"))
    };
    let spec = match c {
        None => return Ok(None),
        Some(C::JsonSchema(text)) => {
            if text.len() > MAX_CONSTRAINT_BYTES {
                return Err(too_long("decoding.json_schema", text.len()));
            }
            match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(v) if v.is_object() || v.is_boolean() => {}
                Ok(_) => return Err(invalid("decoding.json_schema", "must be a JSON object (or true/false)".into())),
                Err(e) => return Err(invalid("decoding.json_schema", format!("is not JSON: {e}"))),
            }
            Spec::JsonSchema(text)
        }
        Some(C::JsonObject(true)) => Spec::JsonObject,
        Some(C::JsonObject(false)) => {
            return Err(invalid(
                "decoding.json_object",
                "must be true when set (leave the constraint unset for none)".into(),
            ));
        }
        Some(C::Regex(rx)) => {
            if rx.is_empty() || rx.len() > MAX_CONSTRAINT_BYTES {
                return Err(invalid(
                    "decoding.regex",
                    format!("must be 1 to {MAX_CONSTRAINT_BYTES} bytes, got {}", rx.len()),
                ));
            }
            Spec::Regex(rx)
        }
        Some(C::Grammar(lark)) => {
            if lark.trim().is_empty() || lark.len() > MAX_CONSTRAINT_BYTES {
                return Err(invalid(
                    "decoding.grammar",
                    format!("must be 1 to {MAX_CONSTRAINT_BYTES} bytes (Lark syntax), got {}", lark.len()),
                ));
            }
            Spec::Grammar(lark)
        }
        Some(C::Choice(pb::Choices { choices })) => {
            if choices.is_empty() || choices.len() > MAX_CHOICES {
                return Err(invalid(
                    "decoding.choice",
                    format!("must hold 1 to {MAX_CHOICES} strings, got {}", choices.len()),
                ));
            }
            if let Some((i, c)) = choices.iter().enumerate().find(|(_, c)| c.is_empty() || c.len() > MAX_CHOICE_BYTES) {
                return Err(invalid(
                    "decoding.choice",
                    format!("[{i}] must be 1 to {MAX_CHOICE_BYTES} bytes, got {}", c.len()),
                ));
            }
            let total: usize = choices.iter().map(String::len).sum();
            if total > MAX_CONSTRAINT_BYTES {
                return Err(too_long("decoding.choice", total));
            }
            Spec::Choice(choices)
        }
    };
    Ok(Some(spec))
}

fn finite_in(field: &'static str, v: f32, lo: f32, hi: f32, what: &str) -> Result<(), ValidationError> {
    if !v.is_finite() || v < lo || v > hi {
        return Err(invalid(field, format!("must be {what}, got {v}")));
    }
    Ok(())
}

pub(super) fn check_decoding(
    d: pb::Decoding,
    vocab_size: u32,
    max_beams: u32,
) -> Result<DecodingPlan, ValidationError> {
    finite_in("decoding.repetition_penalty", d.repetition_penalty, 0.0, 10.0, "in (0, 10] (0 means off)")?;
    finite_in("decoding.presence_penalty", d.presence_penalty, -2.0, 2.0, "in [-2, 2] (0 means off)")?;
    finite_in("decoding.frequency_penalty", d.frequency_penalty, -2.0, 2.0, "in [-2, 2] (0 means off)")?;
    if d.no_repeat_ngram_size > MAX_NO_REPEAT_NGRAM {
        return Err(invalid(
            "decoding.no_repeat_ngram_size",
            format!("must be at most {MAX_NO_REPEAT_NGRAM} (0 means off), got {}", d.no_repeat_ngram_size),
        ));
    }
    if d.logit_bias.len() > MAX_LOGIT_BIAS {
        return Err(invalid(
            "decoding.logit_bias",
            format!("at most {MAX_LOGIT_BIAS} entries, got {}", d.logit_bias.len()),
        ));
    }
    let mut logit_bias: Vec<(u32, f32)> = d.logit_bias.into_iter().collect();
    logit_bias.sort_by_key(|b| b.0);
    for &(id, bias) in &logit_bias {
        if id >= vocab_size {
            return Err(invalid(
                "decoding.logit_bias",
                format!("key {id} is not a token id: must be below the vocabulary size {vocab_size}"),
            ));
        }
        if !bias.is_finite() || bias.abs() > 100.0 {
            return Err(invalid("decoding.logit_bias", format!("[{id}] must be in [-100, 100], got {bias}")));
        }
    }
    let processors = Processors {
        logit_bias,
        repetition_penalty: d.repetition_penalty,
        presence_penalty: d.presence_penalty,
        frequency_penalty: d.frequency_penalty,
        no_repeat_ngram_size: d.no_repeat_ngram_size as usize,
    };
    let mut beam = None;
    let sampling = match d.method {
        None | Some(pb::decoding::Method::Greedy(_)) => None,
        Some(pb::decoding::Method::BeamSearch(b)) => {
            if b.num_beams > max_beams {
                return Err(invalid(
                    "decoding.beam_search.num_beams",
                    format!("must be at most {max_beams} (--max-beams; 0 means 1), got {}", b.num_beams),
                ));
            }
            let num_beams = b.num_beams.max(1);
            if b.num_return_sequences > num_beams {
                return Err(invalid(
                    "decoding.beam_search.num_return_sequences",
                    format!("must be at most num_beams ({num_beams}), got {}", b.num_return_sequences),
                ));
            }
            finite_in(
                "decoding.beam_search.length_penalty",
                b.length_penalty,
                -10.0,
                10.0,
                "in [-10, 10] (0 means 1)",
            )?;
            // One beam is greedy search.
            if num_beams > 1 {
                beam = Some(BeamPlan {
                    num_beams: num_beams as usize,
                    length_penalty: if b.length_penalty == 0.0 { 1.0 } else { b.length_penalty },
                    early_stopping: b.early_stopping,
                    num_return_sequences: b.num_return_sequences.max(1) as usize,
                });
            }
            None
        }
        Some(pb::decoding::Method::Sampling(s)) => {
            finite_in("decoding.sampling.temperature", s.temperature, 0.0, 100.0, "in [0, 100] (0 means greedy)")?;
            finite_in("decoding.sampling.top_p", s.top_p, 0.0, 1.0, "in (0, 1] (0 means off)")?;
            finite_in("decoding.sampling.typical_p", s.typical_p, 0.0, 1.0, "in (0, 1] (0 means off)")?;
            finite_in("decoding.sampling.min_p", s.min_p, 0.0, 1.0, "in [0, 1] (0 means off)")?;
            if s.top_k > vocab_size {
                return Err(invalid(
                    "decoding.sampling.top_k",
                    format!("must be at most the vocabulary size {vocab_size} (0 means off), got {}", s.top_k),
                ));
            }
            if s.num_samples > MAX_SAMPLES {
                return Err(invalid(
                    "decoding.sampling.num_samples",
                    format!("must be at most {MAX_SAMPLES} (0 means 1), got {}", s.num_samples),
                ));
            }
            let num_samples = s.num_samples.max(1);
            let warpers = Warpers {
                temperature: s.temperature,
                top_k: s.top_k as usize,
                top_p: s.top_p,
                min_p: s.min_p,
                typical_p: s.typical_p,
            };
            // Temperature 0 is greedy: the warpers do not change an argmax.
            (s.temperature > 0.0).then(|| SamplingPlan {
                warpers,
                seed: s.seed.unwrap_or_else(rand::random),
                num_samples,
            })
        }
    };
    let speculation = check_speculation(d.speculation, beam.is_some())?;
    Ok(DecodingPlan { processors, sampling, beam, speculation })
}
