//! API keys (`--api-keys FILE`): who may call the Generation service, and
//! how much each caller may use.
//!
//! The file holds one key per line: a name, the SHA-256 of the key, and
//! optional limits —
//!
//! ```text
//! # name   hash                                                             limits
//! alice    sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824 concurrency=4 tokens_per_minute=20000
//! batch-jobs sha256:486ea46224d1bb4fb680f34f7c9ad96a8f24ec88be73ea8e5a6c65260e9cb8a7
//! ```
//!
//! `batchgen keygen NAME` makes a key and prints its line. The server never
//! holds a key, only its hash; a presented key is hashed and compared with
//! every entry in constant time. Limits are per name and survive reloads
//! (SIGHUP) of the file.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::telemetry;

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("--api-keys {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("--api-keys {path} line {line}: {reason}")]
    Line { path: PathBuf, line: usize, reason: String },
}

/// Why a call was refused by the key check (defined with the status table,
/// which maps it).
pub use crate::error::AuthError;

/// A key's limits; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub concurrency: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    /// Share of the engine against other keys when they all wait (default 1).
    pub weight: Option<u32>,
    /// The lowest (most urgent) `priority` the key may ask for (default 0).
    pub min_priority: Option<i32>,
}

#[derive(Debug, Clone)]
struct Entry {
    name: Arc<str>,
    hash: [u8; 32],
    limits: Limits,
}

/// What a name has in use now (kept across reloads).
#[derive(Debug, Default)]
struct Usage {
    in_flight: AtomicU32,
    /// Tokens available and when that was computed (a bucket refilled at
    /// tokens_per_minute / 60 per second up to tokens_per_minute).
    bucket: Mutex<Option<(f64, Instant)>>,
}

/// The keys file, as last read, and every name's usage.
#[derive(Debug)]
pub struct ApiKeys {
    path: PathBuf,
    entries: RwLock<Arc<Vec<Entry>>>,
    usage: DashMap<Arc<str>, Arc<Usage>>,
    /// Which key started each request in flight (Cancel is allowed to its owner only).
    owners: DashMap<String, Arc<str>>,
}

/// The caller a request was authenticated as.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: Arc<str>,
    limits: Limits,
}

impl Caller {
    /// The key's share against other keys (`weight=`, default 1).
    pub fn weight(&self) -> u32 {
        self.limits.weight.unwrap_or(1)
    }

    /// The lowest `priority` the key may ask for (`min_priority=`, default 0).
    pub fn min_priority(&self) -> i32 {
        self.limits.min_priority.unwrap_or(0)
    }
}

/// A request admitted under a key's limits: holds its concurrency slot and
/// its charge until dropped, and refunds what the request did not use.
#[derive(Debug)]
pub struct Permit {
    keys: Arc<ApiKeys>,
    name: Arc<str>,
    request_id: String,
    charged: u64,
    used: Option<u64>,
    limits: Limits,
}

impl Permit {
    /// The request used `tokens` (prompt + generated): the rest of its charge
    /// goes back to the key's budget when the permit is dropped.
    pub fn used(&mut self, tokens: u64) {
        self.used = Some(tokens);
    }

    pub fn key(&self) -> &str {
        &self.name
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.keys.owners.remove(&self.request_id);
        let Some(usage) = self.keys.usage.get(&self.name).map(|u| u.clone()) else { return };
        usage.in_flight.fetch_sub(1, Ordering::SeqCst);
        metrics::gauge!(telemetry::KEY_IN_FLIGHT, "key" => self.name.to_string()).decrement(1.0);
        if let (Some(used), Some(limit)) = (self.used, self.limits.tokens_per_minute) {
            let refund = self.charged.saturating_sub(used) as f64;
            if let Some((tokens, _)) = usage.bucket.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                *tokens = (*tokens + refund).min(limit as f64);
            }
        }
    }
}

/// SHA-256 of a key, as the file stores it.
pub fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A new random key (32 bytes from the OS, as hex with a prefix) and its
/// line for the keys file.
pub fn keygen(name: &str, limits: Limits) -> Result<(String, String), String> {
    check_name(name)?;
    let mut bytes = [0u8; 32];
    rand::TryRngCore::try_fill_bytes(&mut rand::rngs::OsRng, &mut bytes)
        .map_err(|e| format!("the operating system's random source failed: {e}"))?;
    let key = format!("bg-{}", hex(&bytes));
    let mut line = format!("{name} sha256:{}", hex(&hash(&key)));
    if let Some(c) = limits.concurrency {
        line.push_str(&format!(" concurrency={c}"));
    }
    if let Some(t) = limits.tokens_per_minute {
        line.push_str(&format!(" tokens_per_minute={t}"));
    }
    if let Some(w) = limits.weight {
        line.push_str(&format!(" weight={w}"));
    }
    if let Some(p) = limits.min_priority {
        line.push_str(&format!(" min_priority={p}"));
    }
    Ok((key, line))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok { Ok(()) } else { Err(format!("name {name:?} must be 1 to 64 characters of A-Z, a-z, 0-9, '-', '_', '.'")) }
}

fn parse(path: &Path, text: &str) -> Result<Vec<Entry>, KeysError> {
    let mut entries: Vec<Entry> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let err = |reason: String| KeysError::Line { path: path.to_path_buf(), line: i + 1, reason };
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split_whitespace();
        let name = fields.next().unwrap_or_default();
        check_name(name).map_err(err)?;
        let hash_field = fields.next().ok_or_else(|| err("missing the key's hash (sha256:<64 hex digits>)".into()))?;
        let digits = hash_field
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| {
                err(format!("{hash_field:?} is not sha256:<64 hex digits> (make lines with `batchgen keygen`)"))
            })?;
        let mut hash = [0u8; 32];
        for (j, byte) in hash.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&digits[2 * j..2 * j + 2], 16).expect("checked hex");
        }
        let mut limits = Limits::default();
        for field in fields {
            let (k, v) = field.split_once('=').ok_or_else(|| err(format!("{field:?} is not limit=value")))?;
            let number = |max: u64| {
                v.parse::<u64>()
                    .ok()
                    .filter(|n| (1..=max).contains(n))
                    .ok_or_else(|| err(format!("{k}={v:?} must be a whole number from 1 to {max}")))
            };
            match k {
                "concurrency" => limits.concurrency = Some(number(u64::from(u32::MAX))? as u32),
                "tokens_per_minute" => limits.tokens_per_minute = Some(number(1 << 40)?),
                "weight" => limits.weight = Some(number(1000)? as u32),
                "min_priority" => {
                    let (lo, hi) = (crate::validation::MIN_PRIORITY, crate::validation::MAX_PRIORITY);
                    let p = v.parse::<i32>().ok().filter(|p| (lo..=hi).contains(p));
                    limits.min_priority =
                        Some(p.ok_or_else(|| {
                            err(format!("min_priority={v:?} must be a whole number from {lo} to {hi}"))
                        })?);
                }
                _ => {
                    return Err(err(format!(
                        "unknown limit {k:?} (concurrency, tokens_per_minute, weight, min_priority)"
                    )));
                }
            }
        }
        if entries.iter().any(|e| *e.name == *name) {
            return Err(err(format!("the name {name:?} is used twice")));
        }
        if entries.iter().any(|e| e.hash == hash) {
            return Err(err("the same key is listed twice".into()));
        }
        entries.push(Entry { name: name.into(), hash, limits });
    }
    if entries.is_empty() {
        return Err(KeysError::Read {
            path: path.to_path_buf(),
            reason: "no keys in it (every call would be refused)".into(),
        });
    }
    Ok(entries)
}

fn read(path: &Path) -> Result<Vec<Entry>, KeysError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| KeysError::Read { path: path.to_path_buf(), reason: e.to_string() })?;
    parse(path, &text)
}

impl ApiKeys {
    pub fn load(path: &Path) -> Result<Arc<Self>, KeysError> {
        let keys = ApiKeys {
            path: path.to_path_buf(),
            entries: RwLock::new(Arc::new(read(path)?)),
            usage: DashMap::new(),
            owners: DashMap::new(),
        };
        keys.register_metrics();
        Ok(Arc::new(keys))
    }

    /// How many keys the file holds.
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries().is_empty()
    }

    fn entries(&self) -> Arc<Vec<Entry>> {
        self.entries.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the file again; on an error the keys in use stay as they were.
    pub fn reload(&self) -> Result<usize, KeysError> {
        let entries = read(&self.path)?;
        let n = entries.len();
        *self.entries.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(entries);
        self.register_metrics();
        Ok(n)
    }

    fn register_metrics(&self) {
        for e in self.entries().iter() {
            metrics::gauge!(telemetry::KEY_IN_FLIGHT, "key" => e.name.to_string()).increment(0.0);
        }
    }

    /// The caller a call's metadata authenticates, by its
    /// `authorization: Bearer <key>`.
    pub fn authenticate(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Caller, AuthError> {
        let header = metadata.get("authorization").and_then(|v| v.to_str().ok()).ok_or(AuthError::Unauthenticated)?;
        let (scheme, key) = header.trim().split_once(' ').ok_or(AuthError::Unauthenticated)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Unauthenticated);
        }
        let presented = hash(key.trim());
        // Every entry is compared, each in constant time, whatever matches.
        let mut found = None;
        for e in self.entries().iter() {
            if bool::from(e.hash.ct_eq(&presented)) {
                found = Some(e.clone());
            }
        }
        let e = found.ok_or(AuthError::Unauthenticated)?;
        Ok(Caller { name: e.name, limits: e.limits })
    }

    /// Admits request `request_id` for `caller` if its limits allow `cost`
    /// more tokens and one more request in flight.
    pub fn admit(self: &Arc<Self>, caller: &Caller, request_id: &str, cost: u64) -> Result<Permit, AuthError> {
        let name = caller.name.to_string();
        let usage = self.usage.entry(caller.name.clone()).or_default().clone();
        let in_flight = usage.in_flight.fetch_add(1, Ordering::SeqCst);
        if let Some(limit) = caller.limits.concurrency.filter(|&l| in_flight >= l) {
            usage.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(AuthError::Concurrency { name, limit });
        }
        if let Some(limit) = caller.limits.tokens_per_minute {
            let refused = |e| {
                usage.in_flight.fetch_sub(1, Ordering::SeqCst);
                Err(e)
            };
            if cost > limit {
                return refused(AuthError::TooLarge { name, limit, cost });
            }
            let mut bucket = usage.bucket.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let per_second = limit as f64 / 60.0;
            let (tokens, at) = bucket.get_or_insert((limit as f64, now));
            *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * per_second).min(limit as f64);
            *at = now;
            if *tokens < cost as f64 {
                let retry_after = Duration::from_secs_f64((cost as f64 - *tokens) / per_second);
                let available = *tokens as u64;
                drop(bucket);
                return refused(AuthError::Rate { name, limit, cost, available, retry_after });
            }
            *tokens -= cost as f64;
        }
        self.owners.insert(request_id.to_string(), caller.name.clone());
        metrics::gauge!(telemetry::KEY_IN_FLIGHT, "key" => name).increment(1.0);
        Ok(Permit {
            keys: self.clone(),
            name: caller.name.clone(),
            request_id: request_id.to_string(),
            charged: cost,
            used: None,
            limits: caller.limits,
        })
    }

    /// Whether `caller` started request `request_id` (which is in flight).
    pub fn owns(&self, caller: &Caller, request_id: &str) -> bool {
        self.owners.get(request_id).is_some_and(|o| *o == caller.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(text: &str) -> Result<Arc<ApiKeys>, KeysError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, text).unwrap();
        ApiKeys::load(&path)
    }

    fn bearer(key: &str) -> tonic::metadata::MetadataMap {
        let mut m = tonic::metadata::MetadataMap::new();
        m.insert("authorization", format!("Bearer {key}").parse().unwrap());
        m
    }

    #[test]
    fn keys_authenticate_by_hash_and_nothing_else_does() {
        let (key, line) = keygen("alice", Limits::default()).unwrap();
        let (other, other_line) = keygen("bob", Limits { concurrency: Some(2), ..Default::default() }).unwrap();
        assert!(!line.contains(&key), "the line holds the hash, not the key");
        let keys = keys(&format!("# comment\n{line}\n\n{other_line}  # trailing\n")).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(&*keys.authenticate(&bearer(&key)).unwrap().name, "alice");
        assert_eq!(&*keys.authenticate(&bearer(&other)).unwrap().name, "bob");
        let mut lower = tonic::metadata::MetadataMap::new();
        lower.insert("authorization", format!("bearer {key}").parse().unwrap());
        assert!(keys.authenticate(&lower).is_ok());
        for bad in [bearer("bg-wrong"), bearer(""), tonic::metadata::MetadataMap::new()] {
            assert_eq!(keys.authenticate(&bad).unwrap_err(), AuthError::Unauthenticated);
        }
        let mut basic = tonic::metadata::MetadataMap::new();
        basic.insert("authorization", format!("Basic {key}").parse().unwrap());
        assert_eq!(keys.authenticate(&basic).unwrap_err(), AuthError::Unauthenticated);
    }

    #[test]
    fn bad_lines_are_refused_with_their_number() {
        let h = format!("sha256:{}", "ab".repeat(32));
        for (text, want) in [
            (format!("ok {h}\nbad name {h}\n"), "line 2"),
            ("alice sha256:zz\n".to_string(), "sha256:<64 hex digits>"),
            ("alice\n".to_string(), "missing the key's hash"),
            (format!("a {h} concurrency=0\n"), "from 1 to"),
            (format!("a {h} burst=3\n"), "unknown limit"),
            (format!("a {h}\na {}\n", h.replace("ab", "cd")), "used twice"),
            (format!("a {h}\nb {h}\n"), "listed twice"),
            ("# nothing\n".to_string(), "no keys"),
        ] {
            let err = keys(&text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn limits_refuse_and_refund() {
        let (key, line) =
            keygen("alice", Limits { concurrency: Some(2), tokens_per_minute: Some(600), ..Default::default() })
                .unwrap();
        let keys = keys(&line).unwrap();
        let caller = keys.authenticate(&bearer(&key)).unwrap();
        let mut a = keys.admit(&caller, "a", 300).unwrap();
        let b = keys.admit(&caller, "b", 200).unwrap();
        assert!(keys.owns(&caller, "a") && !keys.owns(&caller, "c"));
        assert!(matches!(keys.admit(&caller, "c", 1), Err(AuthError::Concurrency { limit: 2, .. })));
        drop(b); // no use reported: the charge is kept
        match keys.admit(&caller, "c", 200) {
            Err(e @ AuthError::Rate { available: 100, .. }) => {
                // 100 more tokens at 10 per second.
                let wait = e.retry_after().unwrap().as_secs_f64();
                assert!((9.0..=10.0).contains(&wait), "{wait}");
            }
            other => panic!("{other:?}"),
        }
        a.used(50);
        drop(a); // 250 of its 300 come back
        assert!(!keys.owns(&caller, "a"));
        let c = keys.admit(&caller, "c", 340).unwrap();
        assert!(matches!(keys.admit(&caller, "d", 601), Err(AuthError::TooLarge { .. })));
        drop(c);
    }
}
