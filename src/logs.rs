//! Logs for people and for machines: `--log-format text` (the default) writes
//! one sentence per fact, `--log-format json` one event whose fields carry
//! the same facts under a fixed message, so each fact is said once in either
//! format (`log_fact!`). Colours only when stderr is a terminal.
use std::sync::atomic::{AtomicBool, Ordering};

static JSON: AtomicBool = AtomicBool::new(false);

/// Installs the global subscriber: `RUST_LOG` filters (default `info`, ONNX
/// Runtime's own messages from WARN), stderr, JSON lines when `json`.
pub fn init(json: bool) {
    JSON.store(json, Ordering::Relaxed);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,ort=warn".into());
    // A log file or a collector gets no control sequences.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if json {
        logs.json().init();
    } else {
        logs.init();
    }
}

/// Whether logs are JSON events (`--log-format json`).
pub fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// One fact at INFO, said once: in text logs the sentence `text`, in JSON
/// logs the fields with the fixed `message` (what a collector filters on).
///
/// `log_fact!("start-up phase", text = format!("..."), phase = name, seconds)`
#[macro_export]
macro_rules! log_fact {
    ($message:literal, text = $text:expr, $($field:tt)+) => {
        if $crate::logs::json() {
            ::tracing::info!($($field)+, $message)
        } else {
            ::tracing::info!("{}", $text)
        }
    };
}
