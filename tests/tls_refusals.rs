//! Refused TLS handshakes, as an operator sees them: each is counted by
//! reason in `batchgen_tls_handshake_failures_total`, and logged at WARN
//! with the peer and the reason once per reason and peer a minute, so a
//! client that keeps failing (or a scan) cannot flood the log. One test in
//! its own binary: the metrics recorder and the log subscriber are
//! process-wide.
mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use rcgen::{CertificateParams, KeyPair};

/// The log lines the server writes, captured.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_handshakes_are_counted_by_reason_and_warned_once_per_peer() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).init();
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()]).unwrap().self_signed(&key).unwrap();
    let (c, k) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    let mut args = common::serve_args();
    args.server.tls_cert = Some(c);
    args.server.tls_key = Some(k);
    let server = common::start_with(args).await;
    // Five clients speak plaintext HTTP/2 to the TLS port.
    for _ in 0..5 {
        let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut tcp, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut rest),
        )
        .await;
    }
    let addr = server.metrics_addr;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let count = loop {
        let text = tokio::task::spawn_blocking(move || common::http_get(addr, "/metrics")).await.unwrap();
        let n = common::metric(&text, "batchgen_tls_handshake_failures_total", &[("reason", "not_tls")]);
        if n >= 5.0 || std::time::Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(count, 5.0);
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let warned: Vec<&str> =
        text.lines().filter(|l| l.contains("WARN") && l.contains("TLS handshake refused")).collect();
    assert_eq!(warned.len(), 1, "{text}");
    assert!(warned[0].contains("peer=127.0.0.1:") && warned[0].contains("reason=\"not_tls\""), "{}", warned[0]);
}
