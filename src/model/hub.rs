//! `--model owner/name`: downloading a model from the Hugging Face hub into
//! its usual local cache (`HF_HOME`), with the `hf-hub` crate.
use std::path::PathBuf;

use super::{ModelError, ModelFiles};

/// `owner/name` with nothing that looks like a filesystem path.
pub fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty() && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Downloads config, tokenizer and the weights: `model.safetensors` unless
/// `want_onnx` (or the repository has none), else the ONNX decoder (plus its
/// external weights, when the repository has them).
pub fn download(id: &str, revision: Option<&str>, want_onnx: bool) -> Result<ModelFiles, ModelError> {
    let err = |reason: String| ModelError::Hub { id: id.into(), reason };
    // Download bars (bytes, rate, ETA) only on a terminal; logs stay plain.
    let bars = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let api = hf_hub::api::sync::ApiBuilder::from_env().with_progress(bars).build().map_err(|e| err(e.to_string()))?;
    let repo = match revision {
        Some(rev) => api.repo(hf_hub::Repo::with_revision(id.into(), hf_hub::RepoType::Model, rev.into())),
        None => api.model(id.into()),
    };
    let config = repo.get("config.json").map_err(|e| err(format!("config.json: {e}")))?;
    let tokenizer = repo.get("tokenizer.json").map_err(|e| err(format!("tokenizer.json: {e}")))?;
    let generation_config = repo.get("generation_config.json").ok();
    // Chat templates, where the repository has them (they land beside tokenizer.json).
    let _ = repo.get("tokenizer_config.json");
    let _ = repo.get("chat_template.jinja");
    let mut tried = Vec::new();
    if !want_onnx {
        match repo.get("model.safetensors") {
            Ok(path) => {
                let files = ModelFiles {
                    name: id.into(),
                    onnx: None,
                    safetensors: Some(path),
                    config,
                    generation_config,
                    tokenizer,
                };
                return Ok(files);
            }
            Err(e) => tried.push(format!("model.safetensors ({e})")),
        }
    }
    let mut onnx: Option<PathBuf> = None;
    for candidate in super::ONNX_CANDIDATES {
        match repo.get(candidate) {
            Ok(path) => {
                // External weights live beside the graph; not every export has them.
                let _ = repo.get(&format!("{candidate}_data"));
                onnx = Some(path);
                break;
            }
            Err(e) => tried.push(format!("{candidate} ({e})")),
        }
    }
    let onnx = onnx.ok_or_else(|| err(format!("no weights in the repository; tried {}", tried.join(", "))))?;
    Ok(ModelFiles { name: id.into(), onnx: Some(onnx), safetensors: None, config, generation_config, tokenizer })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_and_paths_are_told_apart() {
        assert!(looks_like_hub_id("openai-community/gpt2"));
        assert!(!looks_like_hub_id("gpt2"));
        assert!(!looks_like_hub_id("./models/gpt2"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("../x"));
    }
}
