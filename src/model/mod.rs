//! A GPT-2 model on disk: its files, its configuration and its ONNX signature.
pub mod hub;
pub mod signature;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use signature::{Dtype, Port, Signature, SignatureError};

/// ONNX file names tried in a model directory, newest optimum layout first.
pub const ONNX_CANDIDATES: [&str; 4] =
    ["model.onnx", "decoder_model_merged.onnx", "onnx/model.onnx", "onnx/decoder_model_merged.onnx"];

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(
        "model directory {dir} has neither model.safetensors nor an ONNX decoder (looked for {candidates}); save a transformers checkpoint there or export one with `optimum-cli export onnx --task text-generation-with-past`"
    )]
    NoWeights { dir: PathBuf, candidates: String },
    #[error("--graph exported needs an ONNX export, and {dir} has none (looked for {candidates})")]
    NoOnnx { dir: PathBuf, candidates: String },
    #[error("cannot read {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{path} is not a valid GPT-2 config: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("cannot load the tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error("ONNX Runtime could not load {path}: {detail}")]
    Session { path: PathBuf, detail: String },
    #[error(
        "downloading {id} from the Hugging Face hub failed: {reason}. Without network access, pass a local directory to --model"
    )]
    Hub { id: String, reason: String },
}

/// The files of one model.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// What the user passed to `--model` (shown in ModelInfo and metrics).
    pub name: String,
    /// The ONNX export, where there is one.
    pub onnx: Option<PathBuf>,
    /// The transformers checkpoint, where there is one.
    pub safetensors: Option<PathBuf>,
    pub config: PathBuf,
    pub generation_config: Option<PathBuf>,
    pub tokenizer: PathBuf,
}

impl ModelFiles {
    /// Resolves `--model`: an existing directory, or else a hub id downloaded
    /// into the hub cache.
    pub fn resolve(model: &str, revision: Option<&str>, want_onnx: bool) -> Result<Self, ModelError> {
        let dir = Path::new(model);
        if dir.is_dir() {
            return Self::in_dir(model, dir);
        }
        if hub::looks_like_hub_id(model) {
            return hub::download(model, revision, want_onnx);
        }
        Err(ModelError::Read {
            path: dir.into(),
            error: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such directory (and not a hub id like owner/name)",
            ),
        })
    }

    pub fn in_dir(name: &str, dir: &Path) -> Result<Self, ModelError> {
        let onnx = ONNX_CANDIDATES.iter().map(|c| dir.join(c)).find(|p| p.is_file());
        let safetensors = Some(dir.join("model.safetensors")).filter(|p| p.is_file());
        if onnx.is_none() && safetensors.is_none() {
            return Err(ModelError::NoWeights { dir: dir.into(), candidates: ONNX_CANDIDATES.join(", ") });
        }
        let generation_config = Some(dir.join("generation_config.json")).filter(|p| p.is_file());
        Ok(ModelFiles {
            name: name.to_string(),
            onnx,
            safetensors,
            config: dir.join("config.json"),
            generation_config,
            tokenizer: dir.join("tokenizer.json"),
        })
    }
}

/// The parts of config.json and generation_config.json batchgen uses.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: u32,
    /// Context length: prompt + generated tokens may not exceed it.
    pub n_positions: u32,
    pub n_layer: usize,
    /// Hidden width, and the MLP's (`n_inner`, default 4 × `n_embd`); 0 when
    /// config.json does not say (an export whose config omits them).
    pub n_embd: usize,
    pub n_inner: usize,
    pub eos_token_id: u32,
}

#[derive(Deserialize)]
struct RawConfig {
    vocab_size: Option<u32>,
    n_positions: Option<u32>,
    n_ctx: Option<u32>,
    n_layer: Option<usize>,
    n_embd: Option<usize>,
    n_inner: Option<usize>,
    eos_token_id: Option<serde_json::Value>,
}

fn first_id(v: &serde_json::Value) -> Option<u32> {
    match v {
        serde_json::Value::Array(a) => a.first().and_then(first_id),
        v => v.as_u64().and_then(|n| u32::try_from(n).ok()),
    }
}

impl ModelConfig {
    pub fn load(files: &ModelFiles) -> Result<Self, ModelError> {
        let read = |path: &Path| -> Result<RawConfig, ModelError> {
            let text = std::fs::read_to_string(path).map_err(|error| ModelError::Read { path: path.into(), error })?;
            serde_json::from_str(&text).map_err(|e| ModelError::Config { path: path.into(), reason: e.to_string() })
        };
        let bad = |reason: &str| ModelError::Config { path: files.config.clone(), reason: reason.into() };
        let raw = read(&files.config)?;
        let generation = files.generation_config.as_deref().map(read).transpose()?;
        // generation_config.json wins for eos, as in transformers' generate().
        let eos = generation
            .and_then(|g| g.eos_token_id)
            .or(raw.eos_token_id)
            .as_ref()
            .and_then(first_id)
            .ok_or_else(|| bad("no eos_token_id"))?;
        let config = ModelConfig {
            vocab_size: raw.vocab_size.ok_or_else(|| bad("no vocab_size"))?,
            n_positions: raw.n_positions.or(raw.n_ctx).ok_or_else(|| bad("no n_positions"))?,
            n_layer: raw.n_layer.ok_or_else(|| bad("no n_layer"))?,
            n_embd: raw.n_embd.unwrap_or(0),
            n_inner: raw.n_inner.or(raw.n_embd.map(|e| 4 * e)).unwrap_or(0),
            eos_token_id: eos,
        };
        if config.eos_token_id >= config.vocab_size || config.n_positions == 0 || config.n_layer == 0 {
            return Err(bad("eos_token_id must be below vocab_size and n_positions, n_layer positive"));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_config_is_read() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gpt2");
        let files = ModelFiles::in_dir("tiny", &dir).unwrap();
        assert!(files.onnx.as_ref().unwrap().ends_with("model.onnx"));
        let c = ModelConfig::load(&files).unwrap();
        assert_eq!(
            c,
            ModelConfig {
                vocab_size: 50257,
                n_positions: 256,
                n_layer: 2,
                n_embd: 32,
                n_inner: 128,
                eos_token_id: 50256
            }
        );
    }

    #[test]
    fn a_directory_without_weights_names_what_it_looked_for() {
        let dir = tempfile::tempdir().unwrap();
        let e = ModelFiles::in_dir("x", dir.path()).unwrap_err().to_string();
        assert!(e.contains("model.onnx, decoder_model_merged.onnx"), "{e}");
    }

    #[test]
    fn eos_lists_take_the_first_id() {
        assert_eq!(first_id(&serde_json::json!([50256, 1])), Some(50256));
        assert_eq!(first_id(&serde_json::json!(7)), Some(7));
    }
}
