//! Discovers how a GPT-2 ONNX export must be fed, from the session's own
//! inputs and outputs, and refuses anything it cannot drive.
//!
//! Supported (all from optimum's `text-generation-with-past` task):
//! - `model.onnx` (optimum-onnx 0.1): `input_ids`, `attention_mask`,
//!   `position_ids`, `past_key_values.{i}.key|value` → `logits`,
//!   `present.{i}.key|value`;
//! - older exports without `position_ids` (the graph derives positions);
//! - merged decoders (`decoder_model_merged.onnx`) with a boolean
//!   `use_cache_branch` input;
//! - float16 exports (float16 KV cache and logits).

use std::fmt;

/// Element types the engine can feed or read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    I64,
    Bool,
    Other,
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            Dtype::I64 => "int64",
            Dtype::Bool => "bool",
            Dtype::Other => "other",
        })
    }
}

/// One input or output as the session reports it; `None` is a dynamic axis.
#[derive(Debug, Clone, PartialEq)]
pub struct Port {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<Option<i64>>,
}

impl Port {
    pub fn new(name: &str, dtype: Dtype, shape: &[i64]) -> Self {
        let shape = shape.iter().map(|&d| (d >= 0).then_some(d)).collect();
        Port { name: name.into(), dtype, shape }
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims: Vec<String> =
            self.shape.iter().map(|d| d.map_or_else(|| "?".to_string(), |d| d.to_string())).collect();
        write!(f, "{} {}[{}]", self.name, self.dtype, dims.join(", "))
    }
}

/// How to drive one export.
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    pub layers: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Element type of past/present tensors.
    pub kv_dtype: Dtype,
    pub logits_dtype: Dtype,
    /// Whether the graph takes `position_ids`. Without it the graph numbers
    /// positions from the past length, which is only right for rows without
    /// left padding.
    pub has_position_ids: bool,
    /// Merged decoders choose their with-past branch with this flag.
    pub has_use_cache_branch: bool,
    /// `(key, value)` input names per layer.
    pub past: Vec<(String, String)>,
    /// `(key, value)` output names per layer, in the same order.
    pub present: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "unsupported ONNX model signature: {problem}.\n  expected inputs: input_ids int64[batch, seq], \
     attention_mask int64[batch, past+seq], optional position_ids int64[batch, seq], optional \
     use_cache_branch bool, past_key_values.{{0..{layers_hint}}}.key|value float32|float16[batch, heads, past, head_dim]; \
     outputs: logits[batch, seq, vocab], present.{{i}}.key|value (an optimum `text-generation-with-past` export)\n  \
     found inputs: {inputs}\n  found outputs: {outputs}"
)]
pub struct SignatureError {
    pub problem: String,
    pub layers_hint: String,
    pub inputs: String,
    pub outputs: String,
}

fn list(ports: &[Port]) -> String {
    ports.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

impl Signature {
    /// `expected_layers` comes from config.json (`n_layer`), checked against the graph.
    pub fn discover(inputs: &[Port], outputs: &[Port], expected_layers: usize) -> Result<Self, SignatureError> {
        let fail = |problem: String| SignatureError {
            problem,
            layers_hint: expected_layers.saturating_sub(1).to_string(),
            inputs: list(inputs),
            outputs: list(outputs),
        };
        let find = |ports: &[Port], name: &str| ports.iter().find(|p| p.name == name).cloned();
        let require_i64 = |name: &str, rank: usize| -> Result<Option<Port>, SignatureError> {
            match find(inputs, name) {
                Some(p) if p.dtype != Dtype::I64 || p.shape.len() != rank => {
                    Err(fail(format!("input {p} must be int64 of rank {rank}")))
                }
                other => Ok(other),
            }
        };
        require_i64("input_ids", 2)?.ok_or_else(|| fail("no input_ids input".into()))?;
        require_i64("attention_mask", 2)?.ok_or_else(|| fail("no attention_mask input".into()))?;
        let has_position_ids = require_i64("position_ids", 2)?.is_some();
        let has_use_cache_branch = match find(inputs, "use_cache_branch") {
            Some(p) if p.dtype != Dtype::Bool || p.shape.len() > 1 => {
                return Err(fail(format!("input {p} must be a bool scalar or [1]")));
            }
            other => other.is_some(),
        };

        let mut past = Vec::new();
        let mut present = Vec::new();
        let mut kv: Option<(Dtype, Option<i64>, Option<i64>)> = None;
        for layer in 0.. {
            let (pk, pv) = (format!("past_key_values.{layer}.key"), format!("past_key_values.{layer}.value"));
            let (ok, ov) = (format!("present.{layer}.key"), format!("present.{layer}.value"));
            let Some(k) = find(inputs, &pk) else { break };
            for (name, port) in [(&pv, find(inputs, &pv)), (&ok, find(outputs, &ok)), (&ov, find(outputs, &ov))] {
                let Some(port) = port else {
                    return Err(fail(format!("{pk} has no matching {name}")));
                };
                if port.dtype != k.dtype || port.shape.len() != 4 {
                    return Err(fail(format!("{port} does not match {k}")));
                }
            }
            if !matches!(k.dtype, Dtype::F32 | Dtype::F16) || k.shape.len() != 4 {
                return Err(fail(format!("{k} must be float32 or float16 of rank 4")));
            }
            let this = (k.dtype, k.shape[1], k.shape[3]);
            if kv.is_some_and(|first| first != this) {
                return Err(fail(format!("{k} differs from layer 0 in type or shape")));
            }
            kv = Some(this);
            past.push((pk, pv));
            present.push((ok, ov));
        }
        let Some((kv_dtype, heads, head_dim)) = kv else {
            return Err(fail("no past_key_values.0.key input: export with --task text-generation-with-past".into()));
        };
        if past.len() != expected_layers {
            return Err(fail(format!(
                "the graph has {} layers of past_key_values but config.json says n_layer = {expected_layers}",
                past.len()
            )));
        }
        let known: Vec<&str> = ["input_ids", "attention_mask", "position_ids", "use_cache_branch"]
            .into_iter()
            .chain(past.iter().flat_map(|(k, v)| [k.as_str(), v.as_str()]))
            .collect();
        if let Some(extra) = inputs.iter().find(|p| !known.contains(&p.name.as_str())) {
            return Err(fail(format!("unknown input {extra}")));
        }
        let logits = find(outputs, "logits").ok_or_else(|| fail("no logits output".into()))?;
        if !matches!(logits.dtype, Dtype::F32 | Dtype::F16) || logits.shape.len() != 3 {
            return Err(fail(format!("output {logits} must be float32 or float16 of rank 3")));
        }
        let (Some(heads), Some(head_dim)) = (heads, head_dim) else {
            return Err(fail("past_key_values must have static heads and head_dim axes".into()));
        };
        Ok(Signature {
            layers: past.len(),
            heads: heads as usize,
            head_dim: head_dim as usize,
            kv_dtype,
            logits_dtype: logits.dtype,
            has_position_ids,
            has_use_cache_branch,
            past,
            present,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn optimum(layers: usize, kv: Dtype, position_ids: bool, branch: bool) -> (Vec<Port>, Vec<Port>) {
        let mut inputs = vec![Port::new("input_ids", Dtype::I64, &[-1, -1])];
        for i in 0..layers {
            inputs.push(Port::new(&format!("past_key_values.{i}.key"), kv, &[-1, 2, -1, 16]));
            inputs.push(Port::new(&format!("past_key_values.{i}.value"), kv, &[-1, 2, -1, 16]));
        }
        inputs.push(Port::new("attention_mask", Dtype::I64, &[-1, -1]));
        if position_ids {
            inputs.push(Port::new("position_ids", Dtype::I64, &[-1, -1]));
        }
        if branch {
            inputs.push(Port::new("use_cache_branch", Dtype::Bool, &[1]));
        }
        let mut outputs = vec![Port::new("logits", kv, &[-1, -1, 50257])];
        for i in 0..layers {
            outputs.push(Port::new(&format!("present.{i}.key"), kv, &[-1, 2, -1, 16]));
            outputs.push(Port::new(&format!("present.{i}.value"), kv, &[-1, 2, -1, 16]));
        }
        (inputs, outputs)
    }

    #[test]
    fn todays_optimum_export() {
        let (i, o) = optimum(2, Dtype::F32, true, false);
        let s = Signature::discover(&i, &o, 2).unwrap();
        assert_eq!((s.layers, s.heads, s.head_dim), (2, 2, 16));
        assert!(s.has_position_ids && !s.has_use_cache_branch);
        assert_eq!(s.kv_dtype, Dtype::F32);
        assert_eq!(s.past[1], ("past_key_values.1.key".into(), "past_key_values.1.value".into()));
        assert_eq!(s.present[0], ("present.0.key".into(), "present.0.value".into()));
    }

    #[test]
    fn merged_decoder_without_position_ids() {
        let (i, o) = optimum(3, Dtype::F32, false, true);
        let s = Signature::discover(&i, &o, 3).unwrap();
        assert!(!s.has_position_ids && s.has_use_cache_branch);
    }

    #[test]
    fn float16_export() {
        let (i, o) = optimum(2, Dtype::F16, true, false);
        let s = Signature::discover(&i, &o, 2).unwrap();
        assert_eq!((s.kv_dtype, s.logits_dtype), (Dtype::F16, Dtype::F16));
    }

    #[test]
    fn export_without_past_is_refused_with_what_was_found() {
        let i = vec![Port::new("input_ids", Dtype::I64, &[-1, -1]), Port::new("attention_mask", Dtype::I64, &[-1, -1])];
        let o = vec![Port::new("logits", Dtype::F32, &[-1, -1, 50257])];
        let e = Signature::discover(&i, &o, 2).unwrap_err().to_string();
        assert!(e.contains("text-generation-with-past"), "{e}");
        assert!(e.contains("found inputs: input_ids int64[?, ?], attention_mask int64[?, ?]"), "{e}");
        assert!(e.contains("expected inputs"), "{e}");
    }

    #[test]
    fn layer_count_must_match_config() {
        let (i, o) = optimum(2, Dtype::F32, true, false);
        let e = Signature::discover(&i, &o, 12).unwrap_err().to_string();
        assert!(e.contains("2 layers") && e.contains("n_layer = 12"), "{e}");
    }

    #[test]
    fn unknown_inputs_missing_presents_and_wrong_types_are_refused() {
        let (mut i, o) = optimum(2, Dtype::F32, true, false);
        i.push(Port::new("token_type_ids", Dtype::I64, &[-1, -1]));
        assert!(Signature::discover(&i, &o, 2).unwrap_err().problem.contains("unknown input token_type_ids"));

        let (i, mut o) = optimum(2, Dtype::F32, true, false);
        o.retain(|p| p.name != "present.1.value");
        assert!(Signature::discover(&i, &o, 2).unwrap_err().problem.contains("present.1.value"));

        let (mut i, o) = optimum(2, Dtype::F32, true, false);
        i[0] = Port::new("input_ids", Dtype::F32, &[-1, -1]);
        assert!(Signature::discover(&i, &o, 2).unwrap_err().problem.contains("int64"));

        let (mut i, o) = optimum(2, Dtype::F32, true, false);
        i[2] = Port::new("past_key_values.0.value", Dtype::F16, &[-1, 2, -1, 16]);
        assert!(Signature::discover(&i, &o, 2).unwrap_err().problem.contains("does not match"));
    }
}
