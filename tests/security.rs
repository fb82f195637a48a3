//! Who may call: TLS and mutual TLS on the gRPC port, with certificates made
//! here by rcgen (the right CA, a wrong CA, no client certificate, expired
//! certificates, a reload that changes the certificate under an open
//! stream, revocation lists), and API keys with their per-key limits.
mod common;

use std::path::{Path, PathBuf};

use batchgen::pb::generation_client::GenerationClient;
use common::{expected, ids, keyed, keys_file, request, serve_args, start_with};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A CA and what it signs, written as PEM files into a temporary directory.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
    name: String,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("batchgen test CA {name}"));
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join(format!("{name}-ca.pem")), issuer.pem()).unwrap();
        Ca { issuer, dir: dir.to_path_buf(), name: name.to_string() }
    }

    fn ca_pem(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    /// Signs a leaf certificate for `names` (DNS names or IP addresses);
    /// `expired` puts its validity wholly in the past. Returns (cert, key) paths.
    fn leaf(&self, file: &str, names: &[&str], expired: bool) -> (PathBuf, PathBuf) {
        self.leaf_with_serial(file, names, expired, None)
    }

    fn leaf_with_serial(&self, file: &str, names: &[&str], expired: bool, serial: Option<u64>) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.serial_number = serial.map(rcgen::SerialNumber::from);
        params.distinguished_name.push(DnType::CommonName, file);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (self.dir.join(format!("{file}.pem")), self.dir.join(format!("{file}.key")));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

impl Ca {
    /// Writes this CA's revocation list revoking `serials`; returns its path.
    fn crl(&self, serials: &[u64], number: u64) -> PathBuf {
        let now = rcgen::date_time_ymd(2026, 1, 1);
        let params = rcgen::CertificateRevocationListParams {
            this_update: now,
            next_update: rcgen::date_time_ymd(2036, 1, 1),
            crl_number: rcgen::SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|&n| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(n),
                    revocation_time: now,
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let path = self.dir.join(format!("{}-crl.pem", self.name));
        std::fs::write(&path, params.signed_by(&self.issuer).unwrap().pem().unwrap()).unwrap();
        path
    }
}

/// A client endpoint for `addr` trusting `ca`, with an optional client identity.
fn endpoint(addr: std::net::SocketAddr, ca: &Path, identity: Option<&(PathBuf, PathBuf)>) -> Endpoint {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(std::fs::read(cert).unwrap(), std::fs::read(key).unwrap()));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(std::time::Duration::from_secs(5))
}

/// The greedy "short" case through `endpoint`: the generated ids, or why not.
async fn short_case(endpoint: Endpoint) -> Result<Vec<u32>, String> {
    let channel: Channel = endpoint.connect().await.map_err(|e| format!("connect: {e:?}"))?;
    let case = &expected()["greedy"]["short"];
    let reply = GenerationClient::new(channel)
        .generate(request(ids(&case["prompt_ids"]), 24))
        .await
        .map_err(|s| format!("call: {:?} {}", s.code(), s.message()))?;
    Ok(reply.into_inner().sequences[0].tokens.iter().map(|t| t.id).collect())
}

fn short_reference() -> Vec<u32> {
    ids(&expected()["greedy"]["short"]["output_ids"])
}

async fn tls_server(cert: &(PathBuf, PathBuf), client_ca: Option<PathBuf>) -> common::TestServer {
    let mut args = serve_args();
    args.server.tls_cert = Some(cert.0.clone());
    args.server.tls_key = Some(cert.1.clone());
    args.server.tls_client_ca = client_ca;
    start_with(args).await
}

#[tokio::test]
async fn tls_serves_clients_that_trust_its_ca_and_no_others() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "good");
    let other = Ca::new(dir.path(), "other");
    let server = tls_server(&ca.leaf("server", &["localhost", "127.0.0.1"], false), None).await;

    assert_eq!(short_case(endpoint(server.addr, &ca.ca_pem(), None)).await.unwrap(), short_reference());
    // A client trusting another CA refuses the server's certificate.
    let err = short_case(endpoint(server.addr, &other.ca_pem(), None)).await.unwrap_err();
    assert!(err.starts_with("connect:"), "{err}");
    // Plaintext HTTP/2 to the TLS port gets no answer.
    let plain = Endpoint::from_shared(format!("http://{}", server.addr)).unwrap();
    assert!(short_case(plain).await.is_err());
    // And the server still serves after the failed handshakes.
    assert_eq!(short_case(endpoint(server.addr, &ca.ca_pem(), None)).await.unwrap(), short_reference());
}

#[tokio::test]
async fn an_expired_server_certificate_is_refused_by_clients() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "good");
    let server = tls_server(&ca.leaf("server", &["localhost"], true), None).await;
    let err = short_case(endpoint(server.addr, &ca.ca_pem(), None)).await.unwrap_err();
    assert!(err.starts_with("connect:") && err.contains("xpired"), "{err}");
}

#[tokio::test]
async fn mutual_tls_serves_only_clients_with_a_valid_certificate_from_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "good");
    let other = Ca::new(dir.path(), "other");
    let server = tls_server(&ca.leaf("server", &["localhost"], false), Some(ca.ca_pem())).await;
    let good = ca.leaf("client", &["client.example"], false);
    let expired = ca.leaf("client-expired", &["client.example"], true);
    let foreign = other.leaf("client-foreign", &["client.example"], false);

    assert_eq!(short_case(endpoint(server.addr, &ca.ca_pem(), Some(&good))).await.unwrap(), short_reference());
    // Under TLS 1.3 the client may finish its side of the handshake before
    // the server has judged its certificate: the refusal then shows on the
    // first call. Either way no answer comes back.
    for (what, identity) in [("no client certificate", None), ("expired", Some(&expired)), ("other CA", Some(&foreign))]
    {
        let result = short_case(endpoint(server.addr, &ca.ca_pem(), identity)).await;
        assert!(result.is_err(), "{what}: served {result:?}");
    }
    assert_eq!(short_case(endpoint(server.addr, &ca.ca_pem(), Some(&good))).await.unwrap(), short_reference());
}

#[tokio::test]
async fn a_changed_certificate_is_used_for_new_connections_while_open_streams_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let first = Ca::new(dir.path(), "first");
    let second = Ca::new(dir.path(), "second");
    let (cert, key) = first.leaf("server", &["localhost"], false);
    let server = tls_server(&(cert.clone(), key.clone()), None).await;

    // A stream open on a connection made with the first certificate.
    let channel = endpoint(server.addr, &first.ca_pem(), None).connect().await.unwrap();
    let mut client = GenerationClient::new(channel);
    let case = &expected()["greedy"]["long"];
    let mut req = request(ids(&case["prompt_ids"]), 24);
    req.stopping.as_mut().unwrap().ignore_eos = true;
    let mut stream = client.generate_stream(req).await.unwrap().into_inner();
    let mut got: Vec<u32> = stream.message().await.unwrap().unwrap().tokens.iter().map(|t| t.id).collect();

    // Renew: the second CA's certificate replaces the first in the same files.
    let (new_cert, new_key) = second.leaf("server-renewed", &["localhost"], false);
    std::fs::copy(&new_key, &key).unwrap();
    std::fs::copy(&new_cert, &cert).unwrap();
    let start = std::time::Instant::now();
    while short_case(endpoint(server.addr, &second.ca_pem(), None)).await.is_err() {
        assert!(start.elapsed().as_secs() < 20, "the renewed certificate was not taken into use");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // New connections that trust only the first CA are refused now ...
    assert!(short_case(endpoint(server.addr, &first.ca_pem(), None)).await.is_err());
    // ... while the stream opened before goes on to its end, and its
    // connection takes new calls.
    while let Some(m) = stream.message().await.unwrap() {
        got.extend(m.tokens.iter().map(|t| t.id));
    }
    assert_eq!(got, ids(&case["output_ids"]));
    let again = client.generate(request(ids(&expected()["greedy"]["short"]["prompt_ids"]), 24)).await.unwrap();
    assert_eq!(again.into_inner().sequences[0].tokens.iter().map(|t| t.id).collect::<Vec<_>>(), short_reference());
}

#[tokio::test]
async fn broken_tls_files_are_refused_at_start_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "good");
    let (cert, key) = ca.leaf("server", &["localhost"], false);
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    for (c, k, ca_file, flag) in [
        (garbage.clone(), key.clone(), None, "--tls-cert"),
        (cert.clone(), garbage.clone(), None, "--tls-key"),
        (cert.clone(), key.clone(), Some(garbage.clone()), "--tls-client-ca"),
        (dir.path().join("missing.pem"), key.clone(), None, "--tls-cert"),
    ] {
        let mut args = serve_args();
        args.server.tls_cert = Some(c);
        args.server.tls_key = Some(k);
        args.server.tls_client_ca = ca_file;
        let err = args.server.serve_options().unwrap_err().to_string();
        assert!(err.contains(flag), "{flag}: {err}");
    }
    // A key that is not the certificate's.
    let (_, other_key) = ca.leaf("other", &["localhost"], false);
    let mut args = serve_args();
    args.server.tls_cert = Some(cert);
    args.server.tls_key = Some(other_key);
    let err = args.server.serve_options().unwrap_err().to_string();
    assert!(err.contains("--tls-key"), "{err}");
}

fn short_request(max_new_tokens: u32) -> batchgen::pb::GenerateRequest {
    let mut r = request(ids(&expected()["greedy"]["short"]["prompt_ids"]), max_new_tokens);
    r.stopping.as_mut().unwrap().ignore_eos = true;
    r
}

#[tokio::test]
async fn api_keys_are_required_for_generation_but_not_for_health_or_reflection() {
    use batchgen::server::auth::Limits;
    use tonic::Code;
    let dir = tempfile::tempdir().unwrap();
    let (path, keys) = keys_file(dir.path(), &[("alice", Limits::default()), ("bob", Limits::default())]);
    let mut args = serve_args();
    args.server.api_keys = Some(path);
    let server = start_with(args).await;
    let mut client = server.client.clone();

    let ok = client.generate(keyed(request(ids(&expected()["greedy"]["short"]["prompt_ids"]), 24), &keys[1])).await;
    let got: Vec<u32> = ok.unwrap().into_inner().sequences[0].tokens.iter().map(|t| t.id).collect();
    assert_eq!(got, short_reference());

    // No key, a wrong key, a key without "Bearer": one answer for all, naming no key.
    let mut answers = Vec::new();
    for key in [None, Some("Bearer bg-not-a-key"), Some(keys[0].as_str()), Some("Bearer ")] {
        let mut req = tonic::Request::new(short_request(4));
        if let Some(k) = key {
            req.metadata_mut().insert("authorization", k.parse().unwrap());
        }
        let status = client.generate(req).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{key:?}");
        answers.push(status.message().to_string());
    }
    assert!(answers.iter().all(|a| *a == answers[0] && !a.contains("alice") && !a.contains("bob")), "{answers:?}");
    let status = client.generate_stream(short_request(4)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = client.model_info(batchgen::pb::ModelInfoRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = client.tokenize(batchgen::pb::TokenizeRequest { text: "hi".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = client.cancel(batchgen::pb::CancelRequest { request_id: "x".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(client.model_info(keyed(batchgen::pb::ModelInfoRequest {}, &keys[0])).await.is_ok());

    // Health and reflection need no key.
    let channel = Endpoint::from_shared(format!("http://{}", server.addr)).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let answer = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(answer.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let mut answers = reflection.server_reflection_info(tokio_stream::iter([list])).await.unwrap().into_inner();
    assert!(answers.message().await.unwrap().is_some());

    // The key's name (never the key) labels the request metrics.
    let addr = server.metrics_addr;
    let text = tokio::task::spawn_blocking(move || common::http_get(addr, "/metrics")).await.unwrap();
    assert_eq!(common::metric(&text, "batchgen_requests_received_total", &[("key", "bob")]), 1.0);
    assert_eq!(common::metric(&text, "batchgen_api_key_requests_in_flight", &[("key", "bob")]), 0.0);
    assert_eq!(common::metric(&text, "batchgen_api_key_requests_in_flight", &[("key", "alice")]), 0.0);
    assert!(common::metric(&text, "batchgen_requests_failed_total", &[("error_type", "unauthenticated")]) >= 5.0);
    assert!(!keys.iter().any(|k| text.contains(k.as_str())));
}

#[tokio::test]
async fn a_keys_tokens_per_minute_refuse_with_retry_info_and_the_file_reloads() {
    use batchgen::server::auth::Limits;
    use tonic::Code;
    use tonic_types::StatusExt;
    let dir = tempfile::tempdir().unwrap();
    let limited = Limits { tokens_per_minute: Some(100), ..Default::default() };
    let (path, keys) = keys_file(dir.path(), &[("carol", limited), ("dave", Limits::default())]);
    let mut args = serve_args();
    args.server.api_keys = Some(path.clone());
    let server = start_with(args).await;
    let mut client = server.client.clone();

    // 4 prompt tokens + 56 new (EOS ignored): a charge of 60, all of it used.
    client.generate(keyed(short_request(56), &keys[0])).await.unwrap();
    let status = client.generate(keyed(short_request(56), &keys[0])).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("\"carol\"") && status.message().contains("100 tokens per minute"), "{status:?}");
    let retry = status.get_details_retry_info().expect("RetryInfo").retry_delay.unwrap();
    // About 20 tokens short at 100/60 per second.
    assert!((10.0..=13.0).contains(&retry.as_secs_f64()), "{retry:?}");
    // More than the whole minute's budget: refused, with no point retrying.
    let status = client.generate(keyed(short_request(100), &keys[0])).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("can never fit") && status.get_details_retry_info().is_none(), "{status:?}");
    // Another key is not held back by carol's limit.
    client.generate(keyed(short_request(56), &keys[1])).await.unwrap();

    // Reload: dave removed, erin added; carol's usage stays (same name).
    let (erin, erin_line) = batchgen::server::auth::keygen("erin", Limits::default()).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let carol_line = text.lines().find(|l| l.starts_with("carol")).unwrap().to_string();
    std::fs::write(&path, format!("{carol_line}\n{erin_line}\n")).unwrap();
    server.options.reload("test");
    assert_eq!(client.generate(keyed(short_request(4), &keys[1])).await.unwrap_err().code(), Code::Unauthenticated);
    client.generate(keyed(short_request(56), &erin)).await.unwrap();
    assert_eq!(client.generate(keyed(short_request(56), &keys[0])).await.unwrap_err().code(), Code::ResourceExhausted);
    // A broken file is not taken: the keys in use stay.
    std::fs::write(&path, format!("{carol_line}\nerin sha256:short\n")).unwrap();
    server.options.reload("test");
    client.generate(keyed(short_request(4), &erin)).await.unwrap();
}

/// The client subcommands over TLS: `batchgen health` and `batchgen generate`
/// with a CA, a client certificate and an API key, against a server that
/// requires all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_subcommands_speak_tls_with_a_client_certificate_and_a_key() {
    use batchgen::server::auth::Limits;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "good");
    let (client_cert, client_key) = ca.leaf("client", &["client.example"], false);
    let (keys, secrets) = keys_file(dir.path(), &[("cli", Limits::default())]);
    let mut args = serve_args();
    let server_cert = ca.leaf("server", &["localhost"], false);
    args.server.tls_cert = Some(server_cert.0);
    args.server.tls_key = Some(server_cert.1);
    args.server.tls_client_ca = Some(ca.ca_pem());
    args.server.api_keys = Some(keys);
    let server = start_with(args).await;
    let target = format!("https://localhost:{}", server.addr.port());
    let run = |extra: Vec<String>| {
        let target = target.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_batchgen"))
                .args(extra)
                .args(["--target", &target])
                .output()
                .unwrap()
        })
    };
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let tls = vec![
        "--tls-ca".to_string(),
        path(&ca.ca_pem()),
        "--tls-client-cert".into(),
        path(&client_cert),
        "--tls-client-key".into(),
        path(&client_key),
    ];
    let health = run(["health".to_string()].into_iter().chain(tls.clone()).collect()).await.unwrap();
    assert!(health.status.success(), "{}", String::from_utf8_lossy(&health.stderr));
    assert_eq!(String::from_utf8_lossy(&health.stdout).trim(), "SERVING");
    // Without the CA the server's certificate is not trusted.
    let untrusted = run(vec!["health".into()]).await.unwrap();
    assert!(!untrusted.status.success());
    let case = &expected()["greedy"]["short"];
    let mut generate: Vec<String> = ["generate", case["prompt"].as_str().unwrap(), "--max-new-tokens", "24"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    generate.extend(tls.clone());
    let without_key = run(generate.clone()).await.unwrap();
    assert!(!without_key.status.success());
    assert!(String::from_utf8_lossy(&without_key.stderr).contains("a valid API key is required"), "{without_key:?}");
    generate.extend(["--api-key".to_string(), secrets[0].clone()]);
    let served = run(generate).await.unwrap();
    assert!(served.status.success(), "{}", String::from_utf8_lossy(&served.stderr));
    // The reference text shows the end-of-text token; the served text leaves special tokens out.
    let text = case["text"].as_str().unwrap().replace("<|endoftext|>", "");
    let want = format!("{}{text}", case["prompt"].as_str().unwrap());
    assert_eq!(String::from_utf8_lossy(&served.stdout).trim_end(), want.trim_end());
}

#[tokio::test]
async fn a_revoked_client_certificate_is_refused_and_a_new_revocation_list_is_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "good");
    let revoked = ca.leaf_with_serial("client-revoked", &["client.example"], false, Some(1001));
    let later = ca.leaf_with_serial("client-later", &["client.example"], false, Some(1002));
    let crl = ca.crl(&[1001], 1);
    let mut args = serve_args();
    let server_cert = ca.leaf("server", &["localhost"], false);
    args.server.tls_cert = Some(server_cert.0);
    args.server.tls_key = Some(server_cert.1);
    args.server.tls_client_ca = Some(ca.ca_pem());
    args.server.tls_client_crl = Some(crl.clone());
    let server = start_with(args).await;
    assert!(
        short_case(endpoint(server.addr, &ca.ca_pem(), Some(&revoked))).await.is_err(),
        "a revoked certificate was served"
    );
    assert_eq!(short_case(endpoint(server.addr, &ca.ca_pem(), Some(&later))).await.unwrap(), short_reference());
    // A new list that revokes the second certificate too is read like a renewed certificate.
    let _ = ca.crl(&[1001, 1002], 2);
    let start = std::time::Instant::now();
    while short_case(endpoint(server.addr, &ca.ca_pem(), Some(&later))).await.is_ok() {
        assert!(start.elapsed().as_secs() < 20, "the new revocation list was not taken into use");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
