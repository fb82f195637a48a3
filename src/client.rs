//! `batchgen generate`: the reference client, streaming text to a terminal;
//! `batchgen health`: a grpc.health.v1 check.
use std::io::Write;

use crate::config::GenerateArgs;
use crate::pb::{self, generation_client::GenerationClient};

pub async fn generate(args: &GenerateArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut client = GenerationClient::connect(args.target.clone()).await?;
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
        let channel = tonic::transport::Endpoint::from_shared(args.target.clone())
            .map_err(|e| format!("bad --target {}: {e}", args.target))?
            .connect_timeout(timeout)
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", args.target))?;
        let answer = HealthClient::new(channel)
            .check(HealthCheckRequest { service: args.service.clone() })
            .await
            .map_err(|s| format!("{}: {:?} {}", args.target, s.code(), s.message()))?;
        let status = ServingStatus::try_from(answer.into_inner().status).unwrap_or(ServingStatus::Unknown);
        match status {
            ServingStatus::Serving => Ok(status.as_str_name().to_string()),
            other => Err(format!("{}: {}", args.target, other.as_str_name())),
        }
    };
    tokio::time::timeout(timeout, ask)
        .await
        .unwrap_or_else(|_| Err(format!("{}: no answer within {timeout:?}", args.target)))
}
