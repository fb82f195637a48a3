//! Fault injection for tests, behind the cargo feature `fault-injection`
//! (release builds and `cargo build` leave it out; then the header below is
//! ignored and every check here is a constant `false`).
//!
//! A request asks for its own fault with the metadata `x-batchgen-fault`:
//! - `run-error@N`: the decode run that feeds its N-th generated token fails
//!   inside ONNX Runtime (the token is replaced by an id outside the
//!   vocabulary, which the embedding Gather refuses); every request in that
//!   run ends with INTERNAL;
//! - `panic@N`: choosing its N-th token panics; that request ends with
//!   INTERNAL, the others in the batch go on;
//! - `slow@MS`: every decode step while it is in the batch takes MS
//!   milliseconds longer (a slow model, to hold requests in flight).
use std::time::Duration;

/// The metadata key a request names its fault in.
pub const HEADER: &str = "x-batchgen-fault";

/// Whether this build honours `x-batchgen-fault`.
pub const ENABLED: bool = cfg!(feature = "fault-injection");

/// What a request asks to go wrong (nothing, without the feature).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fault {
    #[cfg(feature = "fault-injection")]
    kind: Option<Kind>,
}

#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    RunError { at: u32 },
    Panic { at: u32 },
    Slow { ms: u32 },
}

impl Fault {
    /// The fault `metadata` asks for; a malformed value is refused with a
    /// message for the `HEADER` field (the caller answers INVALID_ARGUMENT).
    pub fn from_metadata(metadata: &tonic::metadata::MetadataMap) -> Result<Fault, String> {
        #[cfg(feature = "fault-injection")]
        if let Some(v) = metadata.get(HEADER) {
            let bad = || format!("{v:?} is not run-error@N, panic@N or slow@MS (N, MS: 1 to 100000)");
            let text = v.to_str().map_err(|_| bad())?;
            let (what, n) = text.split_once('@').ok_or_else(bad)?;
            let n: u32 = n.parse().ok().filter(|n| (1..=100_000).contains(n)).ok_or_else(bad)?;
            let kind = match what {
                "run-error" => Kind::RunError { at: n },
                "panic" => Kind::Panic { at: n },
                "slow" => Kind::Slow { ms: n },
                _ => return Err(bad()),
            };
            return Ok(Fault { kind: Some(kind) });
        }
        let _ = metadata;
        Ok(Fault::default())
    }

    /// The token to feed a row that has generated `generated` tokens, the
    /// last being `next`: an id no vocabulary has when its run must fail.
    pub fn feed(&self, generated: u32, next: u32) -> u32 {
        #[cfg(feature = "fault-injection")]
        if self.kind == Some(Kind::RunError { at: generated }) {
            return u32::MAX >> 1;
        }
        let _ = generated;
        next
    }

    /// Panics if choosing token number `n` (from 1) must.
    pub fn before_choosing(&self, n: u32) {
        #[cfg(feature = "fault-injection")]
        if self.kind == Some(Kind::Panic { at: n }) {
            panic!("injected fault: panic@{n} while choosing token {n}");
        }
        let _ = n;
    }

    /// How much longer each decode step takes while this request runs.
    pub fn delay(&self) -> Option<Duration> {
        #[cfg(feature = "fault-injection")]
        if let Some(Kind::Slow { ms }) = self.kind {
            return Some(Duration::from_millis(u64::from(ms)));
        }
        None
    }
}

#[cfg(all(test, feature = "fault-injection"))]
mod tests {
    use super::*;

    fn fault(v: &str) -> Result<Fault, String> {
        let mut m = tonic::metadata::MetadataMap::new();
        m.insert(HEADER, v.parse().unwrap());
        Fault::from_metadata(&m)
    }

    #[test]
    fn faults_parse_and_act_where_asked() {
        let f = fault("run-error@3").unwrap();
        assert_eq!((f.feed(2, 7), f.feed(3, 7), f.feed(4, 7)), (7, u32::MAX >> 1, 7));
        assert!(std::panic::catch_unwind(|| fault("panic@2").unwrap().before_choosing(2)).is_err());
        fault("panic@2").unwrap().before_choosing(1);
        assert_eq!(fault("slow@25").unwrap().delay(), Some(Duration::from_millis(25)));
        for bad in ["run-error", "panic@0", "slow@x", "explode@1"] {
            assert!(fault(bad).is_err(), "{bad}");
        }
        assert_eq!(Fault::from_metadata(&Default::default()).unwrap(), Fault::default());
    }
}
