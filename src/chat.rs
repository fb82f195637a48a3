//! Chat templates: a conversation of OpenAI-style messages becomes the
//! prompt text the model was trained on, rendered the way transformers'
//! `apply_chat_template` renders it: Jinja with `trim_blocks` and
//! `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`,
//! `tojson` as Python's `json.dumps` writes it (minijinja's own escapes
//! `<`, `>`, `&` and `'` for HTML, which would change the tokens), Python's
//! string and dict methods (`strip`, `startswith`, `items`, ...), the
//! tokenizer's special tokens (`bos_token`, `eos_token`, ...) and
//! `add_generation_prompt`. Checked token for token against transformers on
//! the templates in `tests/fixtures/chat/` (`tests/chat.rs`).
//!
//! Where the template comes from, first found: `--chat-template` (a file, or
//! the template itself), the model folder's `chat_template.jinja` (what
//! transformers saves since 4.43), its `tokenizer_config.json`'s
//! `chat_template` (a string, or a list of named templates: `default` is
//! used, as transformers does). With none, chat requests are refused with a
//! message that says how to give one; a template that does not compile is
//! refused at start-up when given by flag and per request when it came with
//! the model (the server goes on serving completions).
//!
//! Not supported: transformers' `{% generation %}` tag (assistant masks for
//! training) and tool definitions (`tools`, `documents`).
use std::path::{Path, PathBuf};

use minijinja::value::Value;
use minijinja::{Environment, Error, ErrorKind};

mod python;

/// One message of a conversation, its content already flattened to text.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Why a conversation cannot be rendered (a request error: HTTP 400).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ChatError {
    #[error(
        "this model has no chat template (none in {dir}'s chat_template.jinja or tokenizer_config.json): \
         start the server with --chat-template FILE_OR_STRING (deploy/chat-templates/ has some), \
         or use /v1/completions with a prompt"
    )]
    NoTemplate { dir: String },
    #[error("the chat template from {origin} does not compile: {error}")]
    Broken { origin: String, error: String },
    #[error("the chat template from {origin} failed on this conversation: {error}")]
    Render { origin: String, error: String },
}

/// Why a template given at start-up cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("--chat-template {origin}: {error}")]
    Flag { origin: String, error: String },
    #[error("{path}: {error}")]
    Read { path: PathBuf, error: String },
}

/// A compiled chat template with the special tokens it is rendered with.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where it came from, for messages and logs.
    pub origin: String,
    /// `bos_token`, `eos_token`, ... as the tokenizer config names them.
    special: Vec<(String, String)>,
}

/// What a server has for chat: a template, or the reason a request gets
/// instead.
#[derive(Debug)]
pub enum Chat {
    Ready(Box<ChatTemplate>),
    Unavailable(ChatError),
}

impl Chat {
    /// The template of `flag` (a path to a file, else the template itself),
    /// else the one in the model folder `dir`. Special tokens come from
    /// `dir`'s `tokenizer_config.json`, else `fallback` (the tokenizer's own
    /// EOS text, for bos, eos and unk as GPT-2 has them).
    pub fn load(flag: Option<&str>, dir: &Path, fallback: &str) -> Result<Chat, ChatTemplateError> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Option<serde_json::Value> = match std::fs::read_to_string(&config_path) {
            Ok(text) => Some(
                serde_json::from_str(&text)
                    .map_err(|e| ChatTemplateError::Read { path: config_path.clone(), error: e.to_string() })?,
            ),
            Err(_) => None,
        };
        let special = special_tokens(config.as_ref(), fallback);
        if let Some(flag) = flag {
            let (source, origin) = match std::fs::read_to_string(flag) {
                Ok(text) => (text, flag.to_string()),
                Err(_) if flag.contains("{{") || flag.contains("{%") => (flag.to_string(), "the flag's value".into()),
                Err(e) => {
                    return Err(ChatTemplateError::Flag {
                        origin: flag.into(),
                        error: format!("neither a readable file ({e}) nor a template (no {{{{ or {{% in it)"),
                    });
                }
            };
            return ChatTemplate::new(source, origin.clone(), special)
                .map(|t| Chat::Ready(Box::new(t)))
                .map_err(|error| ChatTemplateError::Flag { origin, error });
        }
        let file = dir.join("chat_template.jinja");
        let found = match std::fs::read_to_string(&file) {
            Ok(text) => Some((text, file.display().to_string())),
            Err(_) => config
                .as_ref()
                .and_then(|c| template_in_config(c.get("chat_template")?))
                .map(|t| (t, format!("{}'s chat_template", config_path.display()))),
        };
        Ok(match found {
            None => Chat::Unavailable(ChatError::NoTemplate { dir: dir.display().to_string() }),
            Some((source, origin)) => match ChatTemplate::new(source, origin.clone(), special) {
                Ok(t) => Chat::Ready(Box::new(t)),
                Err(error) => Chat::Unavailable(ChatError::Broken { origin, error }),
            },
        })
    }

    /// The prompt text of `messages`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, ChatError> {
        match self {
            Chat::Ready(t) => t.render(messages, add_generation_prompt, kwargs),
            Chat::Unavailable(e) => Err(e.clone()),
        }
    }
}

/// `chat_template` of a tokenizer config: a string, or a list of
/// `{name, template}` of which `default` is the one transformers uses.
fn template_in_config(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

/// The special tokens transformers puts in a template's context (its
/// `special_tokens_map`): each `*_token` of the config that is set (a string
/// or an added-token object with `content`), and `additional_special_tokens`.
fn special_tokens(config: Option<&serde_json::Value>, fallback: &str) -> Vec<(String, String)> {
    let names = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    };
    match config {
        Some(c) => names.iter().filter_map(|n| Some((n.to_string(), text(c.get(*n)?)?))).collect(),
        None => ["bos_token", "eos_token", "unk_token"].iter().map(|n| (n.to_string(), fallback.to_string())).collect(),
    }
}

impl ChatTemplate {
    /// Compiles `source` as transformers' sandboxed Jinja environment would.
    pub fn new(source: String, origin: String, special: Vec<(String, String)>) -> Result<ChatTemplate, String> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("the default delimiters"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_function("strftime_now", |format: String| -> Result<String, Error> {
            Ok(python::strftime_now(&format))
        });
        env.add_filter("tojson", python::tojson);
        env.add_template_owned("chat", source).map_err(|e| describe(&e))?;
        Ok(ChatTemplate { env, origin, special })
    }

    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, ChatError> {
        let template = self.env.get_template("chat").expect("added at compile time");
        // The caller's kwargs first: the fixed names win over them.
        let mut ctx = std::collections::BTreeMap::new();
        for (k, v) in kwargs {
            ctx.insert(k.clone(), Value::from(minijinja::value::Serde(v)));
        }
        for (k, v) in &self.special {
            ctx.insert(k.clone(), Value::from(v.clone()));
        }
        ctx.insert("messages".into(), Value::from(minijinja::value::Serde(messages)));
        ctx.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        let ctx = Value::from(ctx);
        template.render(ctx).map_err(|e| ChatError::Render { origin: self.origin.clone(), error: describe(&e) })
    }
}

/// An error with its cause and, for syntax errors, where in the template.
fn describe(e: &Error) -> String {
    let mut out = match e.kind() {
        ErrorKind::InvalidOperation => e.detail().unwrap_or("invalid operation").to_string(),
        _ => e.to_string(),
    };
    if let Some(line) = e.line()
        && !out.contains("line")
    {
        out.push_str(&format!(" (template line {line})"));
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(&format!(": {s}"));
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(source: &str) -> ChatTemplate {
        let special = vec![("bos_token".into(), "<s>".into()), ("eos_token".into(), "</s>".into())];
        ChatTemplate::new(source.into(), "test".into(), special).unwrap()
    }

    fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
        pairs.iter().map(|(r, c)| Message { role: r.to_string(), content: c.to_string(), name: None }).collect()
    }

    #[test]
    fn trims_blocks_and_knows_python_methods_and_special_tokens() {
        let t = template(
            "{% for m in messages %}\n  {% if m.role == 'user' %}\n{{ bos_token }}[{{ m.content.strip() }}]\n  {% else %}\n{{ m['content'] | upper }}{{ eos_token }}\n  {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}>{% endif %}",
        );
        let out = t.render(&msgs(&[("user", "  hi "), ("assistant", "yo")]), true, &Default::default()).unwrap();
        assert_eq!(out, "<s>[hi]\nYO</s>\n>");
    }

    #[test]
    fn raise_exception_is_a_render_error_with_its_message() {
        let t = template("{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok");
        let e = t.render(&msgs(&[("assistant", "x")]), false, &Default::default()).unwrap_err();
        assert!(e.to_string().contains("first must be user"), "{e}");
        assert_eq!(t.render(&msgs(&[("user", "x")]), false, &Default::default()).unwrap(), "ok");
    }

    #[test]
    fn loop_controls_and_namespaces() {
        let t = template(
            "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}{% if ns.n > 2 %}{% break %}{% endif %}{{ m.content }};{% endfor %}",
        );
        let out = t
            .render(
                &msgs(&[("system", "s"), ("user", "a"), ("assistant", "b"), ("user", "c")]),
                false,
                &Default::default(),
            )
            .unwrap();
        assert_eq!(out, "a;b;");
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let t = template("{{ messages[0] | tojson }}|{{ x | tojson }}|{{ x | tojson(indent=2) }}");
        let mut kw = serde_json::Map::new();
        kw.insert("x".into(), serde_json::json!({"b": [1, 2.5, "é<&>'"], "a": null, "t": true}));
        let out = t.render(&msgs(&[("user", "q\"\n")]), false, &kw).unwrap();
        assert_eq!(
            out,
            // Objects keep their keys' order, as Python's dicts do (serde_json's
            // preserve_order, which llguidance turns on for the whole build).
            "{\"role\": \"user\", \"content\": \"q\\\"\\n\"}|{\"b\": [1, 2.5, \"é<&>'\"], \"a\": null, \"t\": true}|{\n  \"b\": [\n    1,\n    2.5,\n    \"é<&>'\"\n  ],\n  \"a\": null,\n  \"t\": true\n}"
        );
    }

    #[test]
    fn a_template_that_does_not_compile_says_where() {
        let e = ChatTemplate::new("{% for m in messages %}".into(), "t".into(), vec![]).unwrap_err();
        assert!(e.contains("line") || e.contains("unexpected end"), "{e}");
    }

    #[test]
    fn templates_come_from_the_flag_then_the_folder_and_say_how_when_missing() {
        let dir = tempfile::tempdir().unwrap();
        let none = Chat::load(None, dir.path(), "<|endoftext|>").unwrap();
        let e = none.render(&msgs(&[("user", "x")]), true, &Default::default()).unwrap_err();
        assert!(e.to_string().contains("--chat-template"), "{e}");
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"eos_token": {"content": "<E>"}, "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ eos_token }}D"}]}"#,
        )
        .unwrap();
        let folder = Chat::load(None, dir.path(), "?").unwrap();
        assert_eq!(folder.render(&msgs(&[]), false, &Default::default()).unwrap(), "<E>D");
        let flag = Chat::load(Some("{{ messages | length }}F"), dir.path(), "?").unwrap();
        assert_eq!(flag.render(&msgs(&[("user", "x")]), false, &Default::default()).unwrap(), "1F");
        std::fs::write(dir.path().join("chat_template.jinja"), "J{{ bos_token }}").unwrap();
        let file = Chat::load(None, dir.path(), "?").unwrap();
        assert_eq!(file.render(&msgs(&[]), false, &Default::default()).unwrap(), "J");
        assert!(Chat::load(Some("/no/such/file"), dir.path(), "?").is_err());
        assert!(Chat::load(Some("{% if %}"), dir.path(), "?").is_err());
        std::fs::write(dir.path().join("chat_template.jinja"), "{% for %}").unwrap();
        let broken = Chat::load(None, dir.path(), "?").unwrap();
        let e = broken.render(&msgs(&[]), false, &Default::default()).unwrap_err();
        assert!(matches!(e, ChatError::Broken { .. }), "{e}");
    }
}
