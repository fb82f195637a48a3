//! `batchgen generate`: the reference client, streaming text to a terminal;
//! `batchgen health`: a grpc.health.v1 check.
use std::io::Write;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::{ConnectArgs, GenerateArgs};
use crate::pb::{self, generation_client::GenerationClient};

/// Adds `authorization: Bearer <key>` to every call when there is a key.
#[derive(Clone)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A Generation client as the subcommands use it (TLS and key as asked).
pub type Client = GenerationClient<InterceptedService<Channel, Auth>>;

/// The endpoint `args` describe: TLS with the given CA (and client
/// certificate) for an https target. Errors name the flag.
pub fn endpoint(args: &ConnectArgs) -> Result<Endpoint, String> {
    let mut endpoint =
        Endpoint::from_shared(args.target.clone()).map_err(|e| format!("bad --target {}: {e}", args.target))?;
    if args.target.starts_with("https://") {
        let read =
            |flag: &str, p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{flag} {}: {e}", p.display()));
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &args.tls_ca {
            tls = tls.ca_certificate(Certificate::from_pem(read("--tls-ca", ca)?));
        }
        if let (Some(cert), Some(key)) = (&args.tls_client_cert, &args.tls_client_key) {
            tls = tls.identity(Identity::from_pem(read("--tls-client-cert", cert)?, read("--tls-client-key", key)?));
        }
        if let Some(domain) = &args.tls_domain {
            tls = tls.domain_name(domain.clone());
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| format!("TLS settings for {}: {e}", args.target))?;
    } else if args.tls_ca.is_some() || args.tls_client_cert.is_some() {
        return Err(format!("--tls-ca and --tls-client-cert need an https:// --target (got {})", args.target));
    }
    Ok(endpoint)
}

/// The interceptor that sends `args.api_key`.
pub fn auth(args: &ConnectArgs) -> Result<Auth, String> {
    match &args.api_key {
        None => Ok(Auth(None)),
        Some(key) => format!("Bearer {key}")
            .parse()
            .map(|v| Auth(Some(v)))
            .map_err(|_| "--api-key: not a valid header value (printable ASCII only)".to_string()),
    }
}

/// Connects to the server `args` describe.
pub async fn connect(args: &ConnectArgs) -> Result<Client, String> {
    let channel = endpoint(args)?.connect().await.map_err(|e| format!("cannot connect to {}: {e:?}", args.target))?;
    Ok(GenerationClient::with_interceptor(channel, auth(args)?))
}

pub async fn generate(args: &GenerateArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut client = connect(&args.connect).await?;
    let method = if args.num_beams > 1 {
        Some(pb::decoding::Method::BeamSearch(pb::BeamSearch { num_beams: args.num_beams, ..Default::default() }))
    } else if args.temperature > 0.0 {
        Some(pb::decoding::Method::Sampling(pb::Sampling {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
            ..Default::default()
        }))
    } else {
        None
    };
    let request = pb::GenerateRequest {
        prompt: args.prompt.clone(),
        decoding: Some(pb::Decoding { method, ..Default::default() }),
        stopping: Some(pb::Stopping {
            max_new_tokens: args.max_new_tokens,
            ignore_eos: args.ignore_eos,
            stop_sequences: args.stop.clone(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stream = client.generate_stream(request).await?.into_inner();
    let mut out = std::io::stdout().lock();
    write!(out, "{}", args.prompt)?;
    let mut tokens = Vec::new();
    while let Some(msg) = stream.message().await? {
        write!(out, "{}", msg.text)?;
        out.flush()?;
        tokens.extend(msg.tokens);
        if let Some(u) = msg.usage {
            let reason = pb::FinishReason::try_from(msg.finish_reason).unwrap_or(pb::FinishReason::Unspecified);
            writeln!(out)?;
            let seed = msg.seed.map(|s| format!(", seed {s}")).unwrap_or_default();
            eprintln!(
                "[{} tokens, {}{seed}, first token after {:.3} s, {:.3} s in all, {:.1} tokens/s]",
                u.generated_tokens,
                reason.as_str_name(),
                u.time_to_first_token_seconds,
                u.total_seconds,
                f64::from(u.generated_tokens) / u.total_seconds.max(1e-9)
            );
        }
    }
    if args.show_tokens {
        for t in tokens {
            eprintln!("{:>6} {:>10.4} {:?}", t.id, t.logprob, t.text);
        }
    }
    Ok(())
}

/// The serving status `batchgen health` reports: `Ok` with the status name
/// when SERVING, `Err` with what was answered (or why nothing was) otherwise.
pub async fn health(args: &crate::config::HealthArgs) -> Result<String, String> {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let timeout = std::time::Duration::from_secs_f64(args.timeout.max(0.001));
    let ask = async {
        let target = &args.connect.target;
        let channel = endpoint(&args.connect)?
            .connect_timeout(timeout)
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {target}: {e:?}"))?;
        let answer = HealthClient::new(channel)
            .check(HealthCheckRequest { service: args.service.clone() })
            .await
            .map_err(|s| format!("{target}: {:?} {}", s.code(), s.message()))?;
        let status = ServingStatus::try_from(answer.into_inner().status).unwrap_or(ServingStatus::Unknown);
        match status {
            ServingStatus::Serving => Ok(status.as_str_name().to_string()),
            other => Err(format!("{target}: {}", other.as_str_name())),
        }
    };
    tokio::time::timeout(timeout, ask)
        .await
        .unwrap_or_else(|_| Err(format!("{}: no answer within {timeout:?}", args.connect.target)))
}
