//! TLS and mutual TLS on the gRPC port (rustls): certificates read from PEM
//! files, re-read on SIGHUP or when a file changes, without touching the
//! connections already open (each keeps the configuration it was accepted
//! with; new connections get the new one).
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};

use crate::telemetry;

/// Where the server's certificate chain, its key and (for mutual TLS) the
/// CA that client certificates must be signed by are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    /// Certificate revocation lists (PEM) of the client CA: revoked client
    /// certificates are refused.
    pub client_crl: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {reason}")]
    Read { what: &'static str, path: PathBuf, reason: String },
    #[error("{0}")]
    Config(String),
}

/// A TLS handshake may take this long; then the connection is closed (a
/// client that connects and sends nothing holds no task for longer).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the files' modification times are compared.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// One configuration per port kind.
#[derive(Clone)]
struct Configs {
    grpc: Arc<ServerConfig>,
    http: Arc<ServerConfig>,
}

/// The current TLS configuration and the files it was read from.
pub struct Tls {
    files: TlsFiles,
    /// The gRPC port's configuration and the HTTP port's (the same but for
    /// ALPN), built together at each (re)load.
    current: RwLock<Configs>,
    /// The files' modification times when last read.
    stamp: Mutex<Vec<Option<SystemTime>>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the files; an error names the file and what is wrong with it.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let stamp = stamps(&files);
        let config = read_config(&files)?;
        Ok(Arc::new(Tls { files, current: RwLock::new(config), stamp: Mutex::new(stamp) }))
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Reads the files again and, if they make a valid configuration, uses it
    /// for the connections accepted from now on; if not, keeps the old one
    /// and returns why.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamp = stamps(&self.files);
        let config = read_config(&self.files);
        // Remember these times even when the files are broken, so that a
        // half-written file is read again only when it changes again.
        *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) = stamp;
        let config = config?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        metrics::counter!(telemetry::TLS_RELOADS).increment(1);
        Ok(())
    }

    /// Reloads if any of the files changed since they were last read.
    pub fn reload_if_changed(&self) -> Option<Result<(), TlsError>> {
        let now = stamps(&self.files);
        let changed = *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) != now;
        changed.then(|| self.reload())
    }

    /// Logs the outcome of a reload.
    pub fn log_reload(&self, why: &str, result: Result<(), TlsError>) {
        match result {
            Ok(()) => tracing::info!("TLS certificates reloaded ({why}): {}", self.files.cert.display()),
            Err(e) => tracing::error!("TLS certificates not reloaded ({why}), keeping the previous ones: {e}"),
        }
    }

    /// Polls the files every second for the lifetime of the process and
    /// reloads when one changes (a renewed certificate from cert-manager or
    /// certbot, a rotated key).
    pub fn watch(self: &Arc<Self>) {
        let tls = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(WATCH_INTERVAL).await;
                let Some(tls) = tls.upgrade() else { return };
                if let Some(result) = tls.reload_if_changed() {
                    tls.log_reload("a file changed", result);
                }
            }
        });
    }

    /// An acceptor with the current configuration, offering `alpn`.
    fn acceptor(&self, alpn: Alpn) -> TlsAcceptor {
        let configs = self.current.read().unwrap_or_else(|e| e.into_inner());
        TlsAcceptor::from(match alpn {
            Alpn::Grpc => configs.grpc.clone(),
            Alpn::Http => configs.http.clone(),
        })
    }
}

fn stamps(files: &TlsFiles) -> Vec<Option<SystemTime>> {
    [Some(&files.cert), Some(&files.key), files.client_ca.as_ref(), files.client_crl.as_ref()]
        .into_iter()
        .flatten()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |reason: String| TlsError::Read { what, path: path.to_path_buf(), reason };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read(e.to_string()))?;
    if certs.is_empty() {
        return Err(read("no PEM certificate in it".into()));
    }
    Ok(certs)
}

fn read_config(files: &TlsFiles) -> Result<Configs, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates("--tls-cert", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Read {
        what: "--tls-key",
        path: files.key.clone(),
        reason: e.to_string(),
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates("--tls-client-ca", path)? {
                roots.add(cert).map_err(|e| TlsError::Read {
                    what: "--tls-client-ca",
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            }
            let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if let Some(crl) = &files.client_crl {
                let read = |reason: String| TlsError::Read { what: "--tls-client-crl", path: crl.clone(), reason };
                let crls = CertificateRevocationListDer::pem_file_iter(crl)
                    .map_err(|e| read(e.to_string()))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| read(e.to_string()))?;
                if crls.is_empty() {
                    return Err(read("no PEM certificate revocation list in it".into()));
                }
                verifier = verifier.with_crls(crls);
            }
            let verifier =
                verifier.build().map_err(|e| TlsError::Config(format!("--tls-client-ca {}: {e}", path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(format!("--tls-cert and --tls-key do not make a server identity: {e}")))?;
    // gRPC is HTTP/2 only; clients that negotiate by ALPN (grpcio, grpc-js)
    // require it. The HTTP port offers HTTP/1.1 too (browsers, curl, the
    // OpenAI clients); both share the session cache and ticketer.
    let mut http = config.clone();
    http.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Configs { grpc: Arc::new(config), http: Arc::new(http) })
}

/// Which protocols a port offers in the TLS handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// gRPC: HTTP/2 only.
    Grpc,
    /// The HTTP front: HTTP/2 and HTTP/1.1.
    Http,
}

/// The TLS connections accepted on `listener`. Handshakes run in their own
/// tasks (a slow one delays nobody) with a timeout; a failed one is counted
/// and logged at debug level, and the listener goes on. The accept loop
/// ends, closing the listener, when the receiving side is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<Tls>,
    alpn: Alpn,
) -> tokio_stream::wrappers::ReceiverStream<Result<tokio_rustls::server::TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: wait, do not spin.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tls.acceptor(alpn);
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => handshake_failed(peer, &e.to_string()),
                    Err(_) => handshake_failed(peer, "timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn handshake_failed(peer: std::net::SocketAddr, why: &str) {
    let reason = refusal_reason(why);
    metrics::counter!(telemetry::TLS_HANDSHAKE_FAILURES, "reason" => reason).increment(1);
    match REFUSALS.lock().unwrap_or_else(|e| e.into_inner()).note(reason, peer.ip(), Instant::now()) {
        Note::Warn { suppressed } => {
            let more = if suppressed > 0 {
                format!(" ({suppressed} more refused handshakes were not logged in the last minute)")
            } else {
                String::new()
            };
            tracing::warn!(%peer, reason, "TLS handshake refused: {why}{more}");
        }
        Note::Quiet => tracing::debug!(%peer, reason, "TLS handshake refused: {why}"),
    }
}

/// The `reason` label of a refused handshake, from rustls' error text.
pub fn refusal_reason(why: &str) -> &'static str {
    let w = why.to_ascii_lowercase();
    if w.contains("timed out") {
        "timeout"
    } else if w.contains("no certificates") || w.contains("nocertificatespresented") {
        "no_client_certificate"
    } else if w.contains("certificate") {
        "bad_certificate"
    } else if w.contains("corrupt message") || w.contains("invalidcontenttype") || w.contains("invalid content type") {
        "not_tls"
    } else if w.contains("incompatible") || w.contains("protocol version") || w.contains("cipher") {
        "incompatible"
    } else if w.contains("eof") || w.contains("reset") || w.contains("closed") || w.contains("broken pipe") {
        "connection_closed"
    } else {
        "other"
    }
}

/// Refused handshakes logged at WARN: once per reason and peer address per
/// minute, and at most `REFUSALS_PER_MINUTE` lines a minute in all, so a
/// scan cannot flood the log (the metric counts every one).
static REFUSALS: std::sync::Mutex<Refusals> = std::sync::Mutex::new(Refusals::new());

const REFUSALS_PER_MINUTE: usize = 30;
const MINUTE: Duration = Duration::from_secs(60);

pub struct Refusals {
    /// When each (reason, peer) was last logged.
    last: Vec<(&'static str, std::net::IpAddr, Instant)>,
    window: Option<Instant>,
    logged: usize,
    suppressed: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Note {
    /// Log it at WARN (with how many were not logged since the last line).
    Warn {
        suppressed: usize,
    },
    Quiet,
}

impl Refusals {
    pub const fn new() -> Self {
        Refusals { last: Vec::new(), window: None, logged: 0, suppressed: 0 }
    }

    pub fn note(&mut self, reason: &'static str, peer: std::net::IpAddr, now: Instant) -> Note {
        if self.window.is_none_or(|w| now.duration_since(w) >= MINUTE) {
            self.window = Some(now);
            self.logged = 0;
        }
        self.last.retain(|&(_, _, at)| now.duration_since(at) < MINUTE);
        let seen = self.last.iter().any(|&(r, p, _)| r == reason && p == peer);
        if seen || self.logged >= REFUSALS_PER_MINUTE {
            self.suppressed += 1;
            return Note::Quiet;
        }
        self.last.push((reason, peer, now));
        self.logged += 1;
        Note::Warn { suppressed: std::mem::take(&mut self.suppressed) }
    }
}

impl Default for Refusals {
    fn default() -> Self {
        Self::new()
    }
}

/// The TLS connections of a port as an axum listener (the HTTP front).
pub struct TlsListener {
    incoming:
        tokio_stream::wrappers::ReceiverStream<Result<tokio_rustls::server::TlsStream<TcpStream>, std::io::Error>>,
    local: std::net::SocketAddr,
}

impl TlsListener {
    pub fn new(listener: TcpListener, tls: Arc<Tls>) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(TlsListener { incoming: incoming(listener, tls, Alpn::Http), local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use tokio_stream::StreamExt;
        loop {
            match self.incoming.next().await {
                Some(Ok(stream)) => {
                    let peer = stream.get_ref().0.peer_addr().unwrap_or(self.local);
                    return (stream, peer);
                }
                // `incoming` yields no errors; its end means the accept loop stopped.
                Some(Err(_)) => continue,
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::*;

    #[test]
    fn refusals_warn_once_per_reason_and_peer_a_minute_and_at_most_thirty_in_all() {
        let mut r = Refusals::new();
        let t = Instant::now();
        let a: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(r.note("not_tls", a, t), Note::Warn { suppressed: 0 });
        assert_eq!(r.note("not_tls", a, t + Duration::from_secs(5)), Note::Quiet);
        assert_eq!(r.note("bad_certificate", a, t + Duration::from_secs(6)), Note::Warn { suppressed: 1 });
        assert_eq!(r.note("not_tls", a, t + Duration::from_secs(61)), Note::Warn { suppressed: 0 });
        // A scan from many addresses: thirty lines a minute, then quiet.
        let t = t + Duration::from_secs(200);
        let warned =
            (0..100u8).filter(|i| r.note("not_tls", std::net::IpAddr::from([10, 1, 0, *i]), t) != Note::Quiet).count();
        assert_eq!(warned, REFUSALS_PER_MINUTE);
        assert_eq!(r.note("timeout", a, t + MINUTE), Note::Warn { suppressed: 70 });
    }

    #[test]
    fn reasons_come_from_rustls_messages() {
        assert_eq!(refusal_reason("peer sent no certificates"), "no_client_certificate");
        assert_eq!(refusal_reason("invalid peer certificate: UnknownIssuer"), "bad_certificate");
        assert_eq!(refusal_reason("received corrupt message of type InvalidContentType"), "not_tls");
        assert_eq!(refusal_reason("timed out"), "timeout");
    }
}
