//! Prometheus metrics: names, descriptions and histogram buckets in one
//! place, and the `/metrics` HTTP endpoint.
//!
//! Names follow Prometheus conventions (`batchgen_` prefix, base units in the
//! name, `_total` for counters); labels are low-cardinality only (worker,
//! finish_reason, error_type, kind), never request ids or prompts.
use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

pub const REQUESTS_RECEIVED: &str = "batchgen_requests_received_total";
pub const REQUESTS_FAILED: &str = "batchgen_requests_failed_total";
pub const SEQUENCES_FINISHED: &str = "batchgen_sequences_finished_total";
pub const REQUESTS_IN_FLIGHT: &str = "batchgen_requests_in_flight";
pub const QUEUE_WAITING: &str = "batchgen_queue_waiting_requests";
pub const PROMPT_TOKENS: &str = "batchgen_prompt_tokens_total";
pub const GENERATED_TOKENS: &str = "batchgen_generated_tokens_total";
pub const REQUEST_PROMPT_TOKENS: &str = "batchgen_request_prompt_tokens";
pub const REQUEST_GENERATED_TOKENS: &str = "batchgen_request_generated_tokens";
pub const QUEUE_DURATION: &str = "batchgen_queue_duration_seconds";
pub const TIME_TO_FIRST_TOKEN: &str = "batchgen_time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY: &str = "batchgen_inter_token_latency_seconds";
pub const REQUEST_DURATION: &str = "batchgen_request_duration_seconds";
pub const PREFILL_DURATION: &str = "batchgen_prefill_duration_seconds";
pub const DECODE_STEP_DURATION: &str = "batchgen_decode_step_duration_seconds";
pub const STEP_OVERHEAD: &str = "batchgen_step_overhead_seconds";
pub const BATCH_ROWS: &str = "batchgen_batch_rows";
pub const STEP_BATCH_ROWS: &str = "batchgen_step_batch_rows";
pub const PREFILL_TOKENS: &str = "batchgen_prefill_tokens";
pub const KV_BUDGET_TOKENS: &str = "batchgen_kv_budget_tokens";
pub const KV_USED_TOKENS: &str = "batchgen_kv_used_tokens";
pub const KV_USED_RATIO: &str = "batchgen_kv_used_ratio";
pub const BATCH_JOINS: &str = "batchgen_batch_joins_total";
pub const BATCH_EVICTIONS: &str = "batchgen_batch_evictions_total";
pub const KV_COPY_DURATION: &str = "batchgen_kv_copy_duration_seconds";
pub const KV_COPY_BYTES: &str = "batchgen_kv_copy_bytes_total";
pub const WORKER_BUSY: &str = "batchgen_worker_busy";
pub const WORKER_RESTARTS: &str = "batchgen_worker_restarts_total";
pub const BUILD_INFO: &str = "batchgen_build_info";
pub const KEY_IN_FLIGHT: &str = "batchgen_api_key_requests_in_flight";
pub const KEY_QUEUE_WAITING: &str = "batchgen_api_key_queue_waiting_requests";
pub const KEY_QUEUE_DURATION: &str = "batchgen_api_key_queue_duration_seconds";
pub const KEY_GENERATED_TOKENS: &str = "batchgen_api_key_generated_tokens_total";
pub const KEY_PREEMPTIONS: &str = "batchgen_api_key_preemptions_total";
pub const PREEMPTIONS: &str = "batchgen_preemptions_total";
pub const PREEMPTED_REQUESTS: &str = "batchgen_preempted_requests";
pub const PREEMPTED_BYTES: &str = "batchgen_preempted_kv_bytes";
pub const TLS_RELOADS: &str = "batchgen_tls_reloads_total";
pub const TLS_HANDSHAKE_FAILURES: &str = "batchgen_tls_handshake_failures_total";
pub const CONSTRAINT_MASK_SECONDS: &str = "batchgen_constraint_mask_seconds";
pub const CONSTRAINT_COMPILE_SECONDS: &str = "batchgen_constraint_compile_seconds";
pub const CONSTRAINT_CACHE: &str = "batchgen_constraint_cache_lookups_total";
pub const CONSTRAINED_REQUESTS: &str = "batchgen_constrained_requests_total";
pub const SPEC_STEPS: &str = "batchgen_spec_steps_total";
pub const SPEC_PROPOSED: &str = "batchgen_spec_proposed_tokens_total";
pub const SPEC_ACCEPTED: &str = "batchgen_spec_accepted_tokens_total";
pub const SPEC_ROW_TOKENS: &str = "batchgen_spec_row_step_tokens";
pub const PREFIX_CACHE_HIT_TOKENS: &str = "batchgen_prefix_cache_hit_tokens_total";
pub const PREFIX_CACHE_MISS_TOKENS: &str = "batchgen_prefix_cache_miss_tokens_total";
pub const PREFIX_CACHE_BLOCKS: &str = "batchgen_prefix_cache_blocks";
pub const PREFIX_CACHE_BYTES: &str = "batchgen_prefix_cache_bytes";
pub const PREFIX_CACHE_CAPACITY_BYTES: &str = "batchgen_prefix_cache_capacity_bytes";
pub const PREFIX_CACHE_EVICTIONS: &str = "batchgen_prefix_cache_evictions_total";

/// Latency buckets: 1 ms to 60 s.
const SECONDS: [f64; 18] =
    [0.001, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.35, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0];
/// The `kind` label values of CONSTRAINED_REQUESTS.
pub const CONSTRAINT_KINDS: [&str; 5] = ["json_schema", "json_object", "regex", "choice", "grammar"];
/// Short-work buckets: 10 µs to 100 ms (a constraint's mask or compile).
const FINE_SECONDS: [f64; 14] =
    [0.00001, 0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 1.0];
/// Size buckets: powers of two.
/// Tokens a speculating row keeps from a step: 1 to 17.
const SPEC_TOKENS: [f64; 12] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 11.0, 13.0, 17.0];
const SIZES: [f64; 16] =
    [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0];

fn describe_all() {
    describe_counter!(REQUESTS_RECEIVED, "Generate and GenerateStream calls received (by key, with --api-keys).");
    describe_counter!(
        REQUESTS_FAILED,
        "Calls that ended with an error status, by error_type (validation, overloaded, deadline, cancelled, internal, unavailable, unauthenticated, rate_limited, stalled) and, with --api-keys, key."
    );
    describe_counter!(
        SEQUENCES_FINISHED,
        "Sequences finished, by finish_reason (length, eos, stop_sequence, cancelled, deadline, context_full)."
    );
    describe_gauge!(REQUESTS_IN_FLIGHT, "Requests accepted and not yet finished.");
    describe_gauge!(QUEUE_WAITING, "Requests waiting for a worker.");
    describe_counter!(PROMPT_TOKENS, Unit::Count, "Prompt tokens of accepted requests.");
    describe_counter!(GENERATED_TOKENS, Unit::Count, "Tokens generated and sent to clients.");
    describe_histogram!(REQUEST_PROMPT_TOKENS, Unit::Count, "Prompt tokens per request.");
    describe_histogram!(REQUEST_GENERATED_TOKENS, Unit::Count, "Generated tokens per finished request.");
    describe_histogram!(QUEUE_DURATION, Unit::Seconds, "Time from arrival to the start of the request's prefill.");
    describe_histogram!(TIME_TO_FIRST_TOKEN, Unit::Seconds, "Time from arrival to the first generated token.");
    describe_histogram!(INTER_TOKEN_LATENCY, Unit::Seconds, "Time between consecutive tokens of a sequence.");
    describe_histogram!(REQUEST_DURATION, Unit::Seconds, "Time from arrival to the end of the request.");
    describe_histogram!(
        PREFILL_DURATION,
        Unit::Seconds,
        "Duration of one prefill run (all requests admitted together)."
    );
    describe_histogram!(
        DECODE_STEP_DURATION,
        Unit::Seconds,
        "Duration of one decode Session::run for the whole batch."
    );
    describe_histogram!(
        STEP_OVERHEAD,
        Unit::Seconds,
        "Time per iteration outside ONNX Runtime runs (scheduling, sampling, KV copies, streaming)."
    );
    describe_gauge!(BATCH_ROWS, "Rows in a worker's running batch.");
    describe_histogram!(STEP_BATCH_ROWS, Unit::Count, "Rows per decode step.");
    describe_histogram!(PREFILL_TOKENS, Unit::Count, "Token slots per prefill (rows × longest prompt).");
    describe_gauge!(KV_BUDGET_TOKENS, "A worker's KV budget in token slots (--max-batch-tokens).");
    describe_gauge!(KV_USED_TOKENS, "Token slots the worker's KV cache holds now (rows × cache length).");
    describe_gauge!(KV_USED_RATIO, "kv_used_tokens / kv_budget_tokens.");
    describe_counter!(BATCH_JOINS, "Joins of newly prefilled rows into a running batch.");
    describe_counter!(BATCH_EVICTIONS, "Rows removed from a running batch.");
    describe_histogram!(
        KV_COPY_DURATION,
        Unit::Seconds,
        "Duration of KV copies, by kind: join and evict (the padded layout of --graph exported only; 0 on the built graph), fork (a prompt copied to its other samples or beams), beam_reorder."
    );
    describe_counter!(KV_COPY_BYTES, Unit::Bytes, "Bytes written by KV copies, by kind.");
    describe_gauge!(WORKER_BUSY, "1 while a worker has running or waiting requests, else 0.");
    describe_counter!(WORKER_RESTARTS, "Worker restarts after a caught panic.");
    describe_gauge!(BUILD_INFO, "Build and model information (always 1).");
    describe_counter!(
        TLS_RELOADS,
        "Times the TLS certificates were read again (SIGHUP or a changed file) and taken into use."
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "TLS connections refused during the handshake, by reason (timeout, no_client_certificate, bad_certificate, not_tls, incompatible, connection_closed, other)."
    );
    describe_counter!(
        PREFIX_CACHE_HIT_TOKENS,
        Unit::Count,
        "Prompt tokens whose keys and values were copied from the prefix cache instead of prefilled."
    );
    describe_counter!(
        PREFIX_CACHE_MISS_TOKENS,
        Unit::Count,
        "Prompt tokens prefilled while the prefix cache was on (not found in it)."
    );
    describe_gauge!(PREFIX_CACHE_BLOCKS, "Blocks the prefix cache holds.");
    describe_gauge!(PREFIX_CACHE_BYTES, Unit::Bytes, "Bytes of keys and values the prefix cache holds.");
    describe_gauge!(
        PREFIX_CACHE_CAPACITY_BYTES,
        Unit::Bytes,
        "The prefix cache's budget (whole blocks of --prefix-cache-mib)."
    );
    describe_gauge!(KEY_QUEUE_WAITING, "Requests of a key waiting for admission (by key, with --api-keys).");
    describe_histogram!(
        KEY_QUEUE_DURATION,
        Unit::Seconds,
        "Time from arrival to admission into a batch, by key (with --api-keys); keys share the queue by weight."
    );
    describe_counter!(KEY_GENERATED_TOKENS, Unit::Count, "Tokens generated for a key's finished requests (by key).");
    describe_counter!(
        KEY_PREEMPTIONS,
        "Times a key's running request was moved out of the batch for another (by key)."
    );
    describe_counter!(
        PREEMPTIONS,
        "Running requests moved out of the batch for a waiting one, by reason (share: another key's fair share; \
         priority: the same key's more urgent request)."
    );
    describe_gauge!(PREEMPTED_REQUESTS, "Preempted requests waiting to resume, their caches swapped out (by worker).");
    describe_gauge!(
        PREEMPTED_BYTES,
        Unit::Bytes,
        "Bytes of KV cache swapped out for preempted requests (by worker; bounded by --preemption-swap-mib)."
    );
    describe_histogram!(
        CONSTRAINT_MASK_SECONDS,
        Unit::Seconds,
        "Time to compute one constrained row's token mask for a step (on the engine thread, inside the step)."
    );
    describe_histogram!(
        CONSTRAINT_COMPILE_SECONDS,
        Unit::Seconds,
        "Time to find (result=hit) or compile (result=miss) a request's constraint, on its validation thread."
    );
    describe_counter!(CONSTRAINT_CACHE, "Lookups of compiled constraints, by result (hit, miss).");
    describe_counter!(
        CONSTRAINED_REQUESTS,
        "Accepted requests with a constraint, by kind (json_schema, json_object, regex, choice, grammar)."
    );
    describe_counter!(PREFIX_CACHE_EVICTIONS, "Prefix cache blocks evicted to make room (least recently used first).");
    describe_counter!(SPEC_STEPS, "Decode steps that checked proposed tokens (speculative decoding).");
    describe_counter!(SPEC_PROPOSED, Unit::Count, "Tokens proposed by prompt lookup and checked in a decode step.");
    describe_counter!(
        SPEC_ACCEPTED,
        Unit::Count,
        "Proposed tokens the model's own choice agreed with (accepted / proposed is the acceptance rate)."
    );
    describe_histogram!(
        SPEC_ROW_TOKENS,
        Unit::Count,
        "Tokens one speculating row kept from one decode step (1 + its accepted proposals)."
    );
}

/// Creates every unlabelled metric and each value of the closed label sets,
/// so that a scrape shows them (at 0) before the first request.
fn register_all() {
    for name in [
        REQUESTS_RECEIVED,
        PROMPT_TOKENS,
        GENERATED_TOKENS,
        TLS_RELOADS,
        PREFIX_CACHE_HIT_TOKENS,
        PREFIX_CACHE_MISS_TOKENS,
        PREFIX_CACHE_EVICTIONS,
        SPEC_STEPS,
        SPEC_PROPOSED,
        SPEC_ACCEPTED,
    ] {
        metrics::counter!(name).increment(0);
    }
    for kind in [
        "validation",
        "overloaded",
        "deadline",
        "cancelled",
        "internal",
        "unavailable",
        "unauthenticated",
        "rate_limited",
        "stalled",
    ] {
        metrics::counter!(REQUESTS_FAILED, "error_type" => kind).increment(0);
    }
    for reason in
        ["timeout", "no_client_certificate", "bad_certificate", "not_tls", "incompatible", "connection_closed", "other"]
    {
        metrics::counter!(TLS_HANDSHAKE_FAILURES, "reason" => reason).increment(0);
    }
    // constraint::KINDS (a test there holds them equal; telemetry imports nothing of ours).
    for kind in CONSTRAINT_KINDS {
        metrics::counter!(CONSTRAINED_REQUESTS, "kind" => kind).increment(0);
    }
    for result in ["hit", "miss"] {
        metrics::counter!(CONSTRAINT_CACHE, "result" => result).increment(0);
        let _registered = metrics::histogram!(CONSTRAINT_COMPILE_SECONDS, "result" => result);
    }
    for reason in ["length", "eos", "stop_sequence", "cancelled", "deadline", "context_full"] {
        metrics::counter!(SEQUENCES_FINISHED, "finish_reason" => reason).increment(0);
    }
    for reason in ["share", "priority"] {
        metrics::counter!(PREEMPTIONS, "reason" => reason).increment(0);
    }
    for kind in ["join", "evict", "fork", "beam_reorder", "prefix_hit", "prefix_store", "swap_out", "swap_in"] {
        metrics::counter!(KV_COPY_BYTES, "kind" => kind).increment(0);
        let _registered = metrics::histogram!(KV_COPY_DURATION, "kind" => kind);
    }
    metrics::gauge!(REQUESTS_IN_FLIGHT).set(0.0);
    metrics::gauge!(QUEUE_WAITING).set(0.0);
    for name in [
        REQUEST_PROMPT_TOKENS,
        REQUEST_GENERATED_TOKENS,
        QUEUE_DURATION,
        TIME_TO_FIRST_TOKEN,
        INTER_TOKEN_LATENCY,
        REQUEST_DURATION,
        PREFILL_DURATION,
        DECODE_STEP_DURATION,
        STEP_OVERHEAD,
        STEP_BATCH_ROWS,
        PREFILL_TOKENS,
        CONSTRAINT_MASK_SECONDS,
    ] {
        let _registered = metrics::histogram!(name);
    }
}

/// Installs the process-wide recorder (once; later calls reuse it).
pub fn install() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(CONSTRAINT_MASK_SECONDS.into()), &FINE_SECONDS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(CONSTRAINT_COMPILE_SECONDS.into()), &FINE_SECONDS))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_tokens".into()), &SIZES))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_rows".into()), &SIZES))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(SPEC_ROW_TOKENS.into()), &SPEC_TOKENS))
            .expect("bucket lists are not empty");
        let handle = builder.install_recorder().expect("installing the metrics recorder");
        describe_all();
        register_all();
        handle
    })
}

/// The Prometheus text exposition of every metric, as an HTTP response.
pub fn exposition(handle: &'static PrometheusHandle) -> impl axum::response::IntoResponse {
    handle.run_upkeep();
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], handle.render())
}

/// Serves `GET /metrics` (the Prometheus text format, axum over hyper) on
/// `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    handle: &'static PrometheusHandle,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let router = axum::Router::new()
        .route("/metrics", axum::routing::get(move || async move { exposition(handle) }))
        .fallback(|| async { (axum::http::StatusCode::NOT_FOUND, "batchgen serves metrics at /metrics\n") });
    if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(shutdown).await {
        tracing::warn!("metrics endpoint stopped: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_request_split_across_packets_is_read_whole() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, install(), std::future::pending()));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /met").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        s.write_all(b"rics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(out.contains("# TYPE batchgen_requests_received_total counter"));
    }
}
