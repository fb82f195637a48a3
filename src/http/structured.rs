//! The OpenAI API's ways to ask for structured output, as one
//! `Decoding.constraint`: OpenAI's `response_format` (`text`, `json_object`,
//! `json_schema`), vLLM's `structured_outputs` object and its older
//! `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`
//! fields, so that vLLM clients work unchanged. At most one may constrain a
//! request.
use serde::Deserialize;

use crate::pb::{self, decoding::Constraint};

/// A field that cannot be taken: the OpenAI `param` it names and why (the
/// caller answers 400 with both).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub param: String,
    pub message: String,
}

fn refuse(param: &str, message: impl Into<String>) -> Refusal {
    Refusal { param: param.into(), message: message.into() }
}

/// The request fields that may ask for a constraint.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Requested {
    pub response_format: Option<serde_json::Value>,
    pub structured_outputs: Option<serde_json::Value>,
    pub guided_json: Option<serde_json::Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
}

/// vLLM's `structured_outputs` keys batchgen takes (whitespace is compact
/// by default, so `disable_any_whitespace` is accepted and changes nothing).
const STRUCTURED_KEYS: [&str; 6] = ["json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace"];

impl Requested {
    /// The one constraint asked for, if any.
    pub fn constraint(self) -> Result<Option<Constraint>, Refusal> {
        let mut found: Vec<(&'static str, Constraint)> = Vec::new();
        if let Some(f) = self.response_format
            && let Some(c) = response_format(&f)?
        {
            found.push(("response_format", c));
        }
        if let Some(s) = self.structured_outputs {
            found.extend(structured_outputs(&s)?.map(|c| ("structured_outputs", c)));
        }
        if let Some(j) = self.guided_json {
            found.push(("guided_json", Constraint::JsonSchema(schema_text("guided_json", &j)?)));
        }
        if let Some(r) = self.guided_regex {
            found.push(("guided_regex", Constraint::Regex(r)));
        }
        if let Some(choices) = self.guided_choice {
            found.push(("guided_choice", Constraint::Choice(pb::Choices { choices })));
        }
        if let Some(g) = self.guided_grammar {
            found.push(("guided_grammar", Constraint::Grammar(g)));
        }
        if found.len() > 1 {
            let names: Vec<&str> = found.iter().map(|f| f.0).collect();
            return Err(refuse(names[1], format!("{} each ask for structured output: give one", names.join(" and "))));
        }
        Ok(found.pop().map(|f| f.1))
    }
}

/// OpenAI's `response_format`.
fn response_format(f: &serde_json::Value) -> Result<Option<Constraint>, Refusal> {
    let param = "response_format";
    match f.get("type").and_then(|t| t.as_str()) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::JsonObject(true))),
        Some("json_schema") => {
            let Some(js) = f.get("json_schema").filter(|j| j.is_object()) else {
                return Err(refuse(
                    "response_format.json_schema",
                    "response_format of type json_schema needs a json_schema object ({\"name\": ..., \"schema\": {...}})",
                ));
            };
            // OpenAI's `strict` is accepted either way: batchgen always holds
            // the output to the schema. No `schema`: any JSON value.
            let schema = js.get("schema").cloned().unwrap_or_else(|| serde_json::json!({}));
            Ok(Some(Constraint::JsonSchema(schema_text("response_format.json_schema.schema", &schema)?)))
        }
        _ => Err(refuse(
            param,
            format!("response_format {f} is not supported: its type must be text, json_object or json_schema"),
        )),
    }
}

/// vLLM's `structured_outputs` object: one of json, regex, choice, grammar,
/// json_object.
fn structured_outputs(s: &serde_json::Value) -> Result<Option<Constraint>, Refusal> {
    let param = "structured_outputs";
    let Some(fields) = s.as_object() else {
        return Err(refuse(param, format!("structured_outputs must be an object, got {s}")));
    };
    if let Some(k) = fields.keys().find(|k| !STRUCTURED_KEYS.contains(&k.as_str())) {
        return Err(refuse(
            param,
            format!("structured_outputs.{k} is not supported: give one of json, regex, choice, grammar, json_object"),
        ));
    }
    let text = |key: &str| -> Result<String, Refusal> {
        fields[key]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| refuse(param, format!("structured_outputs.{key} must be a string")))
    };
    let mut found = Vec::new();
    for key in ["json", "regex", "choice", "grammar", "json_object"] {
        let Some(v) = fields.get(key).filter(|v| !v.is_null()) else { continue };
        found.push(match key {
            "json" => Constraint::JsonSchema(schema_text("structured_outputs.json", v)?),
            "regex" => Constraint::Regex(text(key)?),
            "grammar" => Constraint::Grammar(text(key)?),
            "choice" => {
                let choices = serde_json::from_value::<Vec<String>>(v.clone())
                    .map_err(|_| refuse(param, "structured_outputs.choice must be a list of strings"))?;
                Constraint::Choice(pb::Choices { choices })
            }
            _ => match v.as_bool() {
                Some(true) => Constraint::JsonObject(true),
                Some(false) => continue,
                None => return Err(refuse(param, "structured_outputs.json_object must be true or false")),
            },
        });
    }
    if found.len() > 1 {
        return Err(refuse(param, "structured_outputs gives more than one constraint: give one"));
    }
    Ok(found.pop())
}

/// A schema given as a JSON object (or boolean), or as a string holding one.
fn schema_text(param: &str, v: &serde_json::Value) -> Result<String, Refusal> {
    match v {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Object(_) | serde_json::Value::Bool(_) => Ok(v.to_string()),
        other => Err(refuse(param, format!("{param} must be a JSON Schema object, got {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(body: serde_json::Value) -> Result<Option<Constraint>, Refusal> {
        serde_json::from_value::<Requested>(body).unwrap().constraint()
    }

    #[test]
    fn each_way_of_asking_gives_its_constraint() {
        let schema = serde_json::json!({"type": "integer"});
        let cases = [
            (serde_json::json!({"response_format": {"type": "text"}}), None),
            (serde_json::json!({"response_format": {"type": "json_object"}}), Some(Constraint::JsonObject(true))),
            (
                serde_json::json!({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": true}}}),
                Some(Constraint::JsonSchema(schema.to_string())),
            ),
            (serde_json::json!({"guided_json": schema}), Some(Constraint::JsonSchema(schema.to_string()))),
            (
                serde_json::json!({"guided_json": "{\"type\":\"integer\"}"}),
                Some(Constraint::JsonSchema("{\"type\":\"integer\"}".into())),
            ),
            (serde_json::json!({"guided_regex": "[0-9]+"}), Some(Constraint::Regex("[0-9]+".into()))),
            (
                serde_json::json!({"guided_choice": ["a", "b"]}),
                Some(Constraint::Choice(pb::Choices { choices: vec!["a".into(), "b".into()] })),
            ),
            (serde_json::json!({"guided_grammar": "start: \"x\""}), Some(Constraint::Grammar("start: \"x\"".into()))),
            (serde_json::json!({"structured_outputs": {"regex": "a+"}}), Some(Constraint::Regex("a+".into()))),
            (
                serde_json::json!({"structured_outputs": {"json": schema}}),
                Some(Constraint::JsonSchema(schema.to_string())),
            ),
            (
                serde_json::json!({"structured_outputs": {"choice": ["x"]}}),
                Some(Constraint::Choice(pb::Choices { choices: vec!["x".into()] })),
            ),
            (serde_json::json!({"structured_outputs": {"json_object": true}}), Some(Constraint::JsonObject(true))),
        ];
        for (body, want) in cases {
            assert_eq!(from(body.clone()).unwrap(), want, "{body}");
        }
    }

    #[test]
    fn two_ways_at_once_or_unknown_ones_are_refused_by_name() {
        let e = from(serde_json::json!({"guided_regex": "a", "guided_choice": ["b"]})).unwrap_err();
        assert_eq!(e.param, "guided_choice");
        assert!(e.message.contains("give one"), "{}", e.message);
        let e = from(serde_json::json!({"structured_outputs": {"structural_tag": "x"}})).unwrap_err();
        assert!(e.message.contains("structural_tag"), "{}", e.message);
        let e = from(serde_json::json!({"response_format": {"type": "xml"}})).unwrap_err();
        assert_eq!(e.param, "response_format");
        let e = from(serde_json::json!({"response_format": {"type": "json_schema"}})).unwrap_err();
        assert_eq!(e.param, "response_format.json_schema");
        let e = from(serde_json::json!({"guided_json": 3})).unwrap_err();
        assert_eq!(e.param, "guided_json");
    }
}
