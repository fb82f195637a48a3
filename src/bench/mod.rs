//! `batchgen bench`: a load generator that drives a running server over gRPC
//! (like TGI's benchmark tool) and reports throughput and latency per level.
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::BenchArgs;
use crate::pb;

pub mod plot;
pub mod roofline;

/// What one request saw.
#[derive(Debug, Clone)]
struct Sample {
    /// Times it was sent again after UNAVAILABLE.
    retried: usize,
    tokens: usize,
    ttft: f64,
    e2e: f64,
    /// Gaps between consecutive tokens' arrivals.
    itl: Vec<f64>,
    /// The tokens generated (a conversation's next turn sends them back).
    ids: Vec<u32>,
    /// Which turn of its conversation (0 for single requests).
    turn: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

fn percentiles(mut v: Vec<f64>) -> Percentiles {
    if v.is_empty() {
        return Percentiles { p50: 0.0, p90: 0.0, p99: 0.0 };
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[(((v.len() - 1) as f64) * q).round() as usize];
    Percentiles { p50: at(0.5), p90: at(0.9), p99: at(0.99) }
}

/// Results of one level (a concurrency or a rate); what `--json` prints and
/// `--compare` / `batchgen plot` read back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Level {
    /// "concurrency" or "rate".
    pub mode: String,
    pub value: f64,
    pub requests: usize,
    pub failed: usize,
    /// Failed calls by gRPC code (after retries).
    #[serde(default)]
    pub failed_by_code: std::collections::BTreeMap<String, usize>,
    /// Attempts lost with their replica (UNAVAILABLE, or a stream reset by a
    /// proxy) and sent again (`--retries`).
    #[serde(default)]
    pub retried: usize,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub tokens_per_second: f64,
    /// tokens_per_second divided by the sequential baseline's.
    pub speedup_vs_sequential: f64,
    pub ttft_seconds: Percentiles,
    pub itl_seconds: Percentiles,
    pub e2e_seconds: Percentiles,
    /// With --turns: TTFT of each turn (first turn first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ttft_by_turn: Vec<Percentiles>,
    /// With --roofline, closed loop: the machine's bound on tokens/s at
    /// this many rows (`roofline.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_tokens_per_second: Option<f64>,
}

/// What `--speculation` asks of every request.
fn speculation(args: &BenchArgs) -> Option<pb::Speculation> {
    use crate::config::SpecChoice;
    let mode = match args.speculation {
        SpecChoice::Server => return None,
        SpecChoice::On => pb::SpeculationMode::On,
        SpecChoice::Off => pb::SpeculationMode::Off,
    };
    Some(pb::Speculation { mode: mode as i32, tokens: 0 })
}

/// Prompt `i`: distinct per request, reproducible from the seed.
fn prompt(seed: u64, i: usize, len: u32) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 50_000) as u32
        })
        .collect()
}

/// The shared beginning of every prompt under --shared-prefix (its own
/// stream of the prompt generator, so it is no request's own prompt).
fn shared_prefix(args: &BenchArgs) -> Vec<u32> {
    prompt(args.seed ^ 0x5EED_5EED, usize::MAX - 1, args.shared_prefix)
}

/// Request `i`'s prompt: the shared prefix, if any, then its own part.
fn request_prompt(args: &BenchArgs, i: usize) -> Vec<u32> {
    let mut p = shared_prefix(args);
    let own = prompt(args.seed, i, args.prompt_tokens);
    if args.repeat_prompt {
        p.extend_from_slice(&own);
    }
    p.extend(own);
    p
}

/// Whether a failed call was lost with the replica serving it rather than
/// refused by it: UNAVAILABLE (no replica, a refused or dropped connection)
/// or a stream a proxy reset mid-answer (nginx cannot send a status after
/// its upstream died, so the client sees an HTTP/2 error, INTERNAL), or
/// a proxy's 502/503/504 before any answer (its error page read as gRPC).
fn lost_in_transit(e: &tonic::Status) -> bool {
    let proxy_lost_upstream = ["status: 502", "status: 503", "status: 504"].iter().any(|s| e.message().contains(s));
    e.code() == tonic::Code::Unavailable
        || (e.code() == tonic::Code::Internal && (e.message().starts_with("h2 protocol error") || proxy_lost_upstream))
}

/// Request `i`, sent again (up to `--retries` times, 50 ms apart) while it is
/// lost in transit: a replica that was stopped or killed under it.
async fn one(client: crate::client::Client, args: &BenchArgs, i: usize) -> Result<Sample, tonic::Status> {
    send(client, args, i, i, request_prompt(args, i)).await
}

/// Conversation `c` (--turns): its turns in order; a failed turn ends it.
async fn conversation(client: crate::client::Client, args: &BenchArgs, c: usize) -> Vec<Result<Sample, tonic::Status>> {
    let turns = args.turns as usize;
    let mut history = request_prompt(args, c * turns);
    let mut out = Vec::with_capacity(turns);
    for turn in 0..turns {
        let result = send(client.clone(), args, c * turns + turn, c, history.clone()).await;
        match result {
            Ok(sample) => {
                history.extend(&sample.ids);
                history.extend(prompt(args.seed, c * turns + turn + 1, args.prompt_tokens));
                out.push(Ok(Sample { turn, ..sample }));
            }
            Err(e) => {
                out.push(Err(e));
                break;
            }
        }
    }
    out
}

/// Request `i` of session `session` (its conversation, or itself).
async fn send(
    client: crate::client::Client,
    args: &BenchArgs,
    i: usize,
    session: usize,
    prompt: Vec<u32>,
) -> Result<Sample, tonic::Status> {
    let mut retried = 0;
    loop {
        match attempt(client.clone(), args, i, session, prompt.clone()).await {
            Err(e) if lost_in_transit(&e) && retried < args.retries => {
                retried += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(sample) => return Ok(Sample { retried, ..sample }),
            Err(e) => return Err(e),
        }
    }
}

async fn attempt(
    mut client: crate::client::Client,
    args: &BenchArgs,
    i: usize,
    session: usize,
    prompt: Vec<u32>,
) -> Result<Sample, tonic::Status> {
    let method = (args.temperature > 0.0).then(|| {
        pb::decoding::Method::Sampling(pb::Sampling {
            temperature: args.temperature,
            top_p: args.top_p,
            seed: Some(args.seed.wrapping_add(i as u64)),
            ..Default::default()
        })
    });
    let schemas = &args.schema_texts;
    let constraint =
        (!schemas.is_empty()).then(|| pb::decoding::Constraint::JsonSchema(schemas[i % schemas.len()].clone()));
    let request = pb::GenerateRequest {
        decoding: Some(pb::Decoding { method, constraint, speculation: speculation(args), ..Default::default() }),
        prompt_token_ids: prompt,
        stopping: Some(pb::Stopping { max_new_tokens: args.new_tokens, ignore_eos: true, ..Default::default() }),
        ..Default::default()
    };
    let mut request = tonic::Request::new(request);
    if let Some(prefix) = &args.session_id {
        let id = format!("{prefix}-{session}")
            .parse()
            .map_err(|_| tonic::Status::invalid_argument(format!("--session-id {prefix:?} is not a header value")))?;
        request.metadata_mut().insert("x-session-id", id);
    }
    let start = Instant::now();
    let mut stream = client.generate_stream(request).await?.into_inner();
    let mut arrivals = Vec::with_capacity(args.new_tokens as usize);
    let mut ids = Vec::with_capacity(args.new_tokens as usize);
    while let Some(msg) = stream.message().await? {
        let t = start.elapsed().as_secs_f64();
        arrivals.extend(std::iter::repeat_n(t, msg.tokens.len()));
        ids.extend(msg.tokens.iter().map(|t| t.id));
    }
    Ok(Sample {
        retried: 0,
        ids,
        turn: 0,
        tokens: arrivals.len(),
        ttft: arrivals.first().copied().unwrap_or(0.0),
        e2e: start.elapsed().as_secs_f64(),
        itl: arrivals.windows(2).map(|w| w[1] - w[0]).collect(),
    })
}

fn summarize(mode: &'static str, value: f64, seconds: f64, results: Vec<Result<Sample, tonic::Status>>) -> Level {
    let failed = results.iter().filter(|r| r.is_err()).count();
    if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
        eprintln!("{mode} {value}: {failed} requests failed, e.g. {:?}: {}", e.code(), e.message());
    }
    let mut failed_by_code = std::collections::BTreeMap::new();
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        *failed_by_code.entry(format!("{:?}", e.code())).or_insert(0) += 1;
    }
    let ok: Vec<Sample> = results.into_iter().filter_map(Result::ok).collect();
    let turns = ok.iter().map(|s| s.turn + 1).max().unwrap_or(0);
    let ttft_by_turn = if turns > 1 {
        (0..turns).map(|t| percentiles(ok.iter().filter(|s| s.turn == t).map(|s| s.ttft).collect())).collect()
    } else {
        Vec::new()
    };
    let retried = ok.iter().map(|s| s.retried).sum();
    let tokens: usize = ok.iter().map(|s| s.tokens).sum();
    Level {
        mode: mode.into(),
        value,
        requests: ok.len(),
        failed,
        failed_by_code,
        retried,
        seconds,
        requests_per_second: ok.len() as f64 / seconds,
        tokens_per_second: tokens as f64 / seconds,
        speedup_vs_sequential: 0.0,
        ttft_seconds: percentiles(ok.iter().map(|s| s.ttft).collect()),
        itl_seconds: percentiles(ok.iter().flat_map(|s| s.itl.iter().copied()).collect()),
        e2e_seconds: percentiles(ok.iter().map(|s| s.e2e).collect()),
        ttft_by_turn,
        bound_tokens_per_second: None,
    }
}

/// `concurrency` clients, each sending requests back to back, `total` in all.
async fn closed_loop(client: &crate::client::Client, args: &BenchArgs, concurrency: usize, first: usize) -> Level {
    let conversations = args.turns > 1;
    let total = match (args.requests, conversations) {
        (0, true) => concurrency,
        (0, false) => (4 * concurrency).max(8),
        (n, _) => n,
    };
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, args, next) = (client.clone(), args.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return out;
                }
                if conversations {
                    out.extend(conversation(client.clone(), &args, first + i).await);
                } else {
                    out.push(one(client.clone(), &args, first + i).await);
                }
            }
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.extend(t.await.expect("bench task"));
    }
    summarize("concurrency", concurrency as f64, start.elapsed().as_secs_f64(), results)
}

/// Requests arriving as a Poisson process at `rate` per second.
async fn open_loop(client: &crate::client::Client, args: &BenchArgs, rate: f64, first: usize) -> Level {
    let total = if args.requests > 0 { args.requests } else { ((8.0 * rate) as usize).max(8) };
    let mut x = args.seed.wrapping_add(0x2545_F491_4F6C_DD1D) | 1;
    let mut uniform = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let start = Instant::now();
    let mut at = 0.0;
    let mut tasks = Vec::new();
    for i in 0..total {
        at += -uniform().ln() / rate;
        tokio::time::sleep_until((start + Duration::from_secs_f64(at)).into()).await;
        let (client, args) = (client.clone(), args.clone());
        tasks.push(tokio::spawn(async move { one(client, &args, first + i).await }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.expect("bench task"));
    }
    summarize("rate", rate, start.elapsed().as_secs_f64(), results)
}

pub async fn run(args: &BenchArgs) -> Result<Vec<Level>, Box<dyn std::error::Error>> {
    let mut args = args.clone();
    if let Some(path) = &args.json_schemas {
        let file: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
        let schemas: Vec<String> = match file {
            serde_json::Value::Object(named) => named.values().map(|s| s.to_string()).collect(),
            serde_json::Value::Array(list) => list.iter().map(|s| s.to_string()).collect(),
            _ => return Err(format!("--json-schemas {}: not a JSON object or list of schemas", path.display()).into()),
        };
        if schemas.is_empty() {
            return Err(format!("--json-schemas {}: no schema in it", path.display()).into());
        }
        args.schema_texts = schemas.into();
    }
    let args = &args;
    let client = crate::client::connect(&args.connect).await?;
    let roofline = if args.roofline { Some(measure_roofline(&client, args).await?) } else { None };
    if let Some(r) = &roofline {
        // At the top of the report (stderr with --json, whose stdout is the levels).
        if args.json {
            eprint!("{}", r.table())
        } else {
            print!("{}", r.table())
        }
        if args.concurrency.iter().all(|&c| c == 0) && args.rate.is_empty() && args.no_sequential {
            return Ok(Vec::new());
        }
    }
    let mut levels: Vec<usize> = if args.no_sequential { vec![] } else { vec![1] };
    // 0: no closed-loop level (with --no-sequential, only the rates run).
    levels.extend(args.concurrency.iter().copied().filter(|&c| c > 1 || (args.no_sequential && c > 0)));
    // Warm-up: the first request pays for lazy initialisation in ORT. Its
    // prompt is new on every run and shares nothing with the run's (no
    // shared prefix), so it leaves a prefix cache nothing the run could hit.
    let warm = usize::MAX / 2;
    let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    send(client.clone(), args, warm, warm, prompt(args.seed ^ clock, warm, args.prompt_tokens)).await?;
    let mut out = Vec::new();
    let mut first = 0;
    for c in levels {
        let level = closed_loop(&client, args, c, first).await;
        first += level.requests + level.failed;
        if !args.json {
            eprintln!("concurrency {c}: {:.1} tokens/s", level.tokens_per_second);
        }
        out.push(level);
    }
    for &r in &args.rate {
        let level = open_loop(&client, args, r, first).await;
        first += level.requests + level.failed;
        out.push(level);
    }
    let base = if args.no_sequential { 0.0 } else { out.first().map_or(0.0, |l| l.tokens_per_second) };
    for l in &mut out {
        l.speedup_vs_sequential = if base > 0.0 { l.tokens_per_second / base } else { 0.0 };
        if l.mode == "concurrency" {
            l.bound_tokens_per_second =
                roofline.as_ref().and_then(|r| r.at(l.value as usize)).map(|b| b.tokens_per_second);
        }
    }
    Ok(out)
}

/// The server's model shape (ModelInfo), and the roofline measured here for
/// the run's closed-loop levels at its mean context.
async fn measure_roofline(
    client: &crate::client::Client,
    args: &BenchArgs,
) -> Result<roofline::Roofline, Box<dyn std::error::Error>> {
    let info = client.clone().model_info(pb::ModelInfoRequest {}).await?.into_inner();
    if info.n_layer == 0 || info.n_embd == 0 {
        return Err("--roofline: the server's ModelInfo gives no n_layer / n_embd (an older server?)".into());
    }
    let shape = roofline::ModelShape {
        layers: info.n_layer as usize,
        width: info.n_embd as usize,
        inner: if info.n_inner > 0 { info.n_inner as usize } else { 4 * info.n_embd as usize },
        vocab: info.vocab_size as usize,
    };
    let precision = roofline::Precision::from_name(&info.weights);
    let kv_bytes = if info.kv_dtype == "float16" { 2 } else { 4 };
    let mut rows: Vec<usize> = if args.no_sequential { vec![] } else { vec![1] };
    for &c in &args.concurrency {
        if c > 0 && !rows.contains(&c) {
            rows.push(c);
        }
    }
    let own = args.prompt_tokens * if args.repeat_prompt { 2 } else { 1 };
    let context = (args.shared_prefix + own + args.new_tokens / 2) as usize;
    let threads = match args.roofline_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let runtime = crate::runtime::init(args.onnxruntime.as_deref())?;
    let measured = tokio::task::spawn_blocking(move || {
        roofline::measure(&runtime.env, threads, shape, precision, kv_bytes, &rows, context)
    })
    .await?;
    measured.map_err(|e| format!("--roofline: {e}").into())
}

pub fn table(levels: &[Level]) -> String {
    let ms = |p: &Percentiles| format!("{:>7.1} {:>7.1} {:>7.1}", p.p50 * 1e3, p.p90 * 1e3, p.p99 * 1e3);
    let mut s = format!(
        "{:<16} {:>5} {:>7} {:>9} {:>8} | {:^23} | {:^23} | {:^23}\n{:<16} {:>5} {:>7} {:>9} {:>8} | {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7}\n",
        "level",
        "reqs",
        "req/s",
        "tokens/s",
        "speedup",
        "TTFT ms",
        "inter-token ms",
        "end-to-end ms",
        "",
        "",
        "",
        "",
        "",
        "p50",
        "p90",
        "p99",
        "p50",
        "p90",
        "p99",
        "p50",
        "p90",
        "p99"
    );
    for l in levels {
        let name = format!("{} {}", l.mode, l.value);
        let bound = l.bound_tokens_per_second.map_or(String::new(), |b| {
            format!(" | {:.0} % of the bound {b:.0} tok/s", 100.0 * l.tokens_per_second / b)
        });
        s += &format!(
            "{:<16} {:>5} {:>7.2} {:>9.1} {:>7.2}x | {} | {} | {}{bound}\n",
            name,
            l.requests,
            l.requests_per_second,
            l.tokens_per_second,
            l.speedup_vs_sequential,
            ms(&l.ttft_seconds),
            ms(&l.itl_seconds),
            ms(&l.e2e_seconds)
        );
        for (t, p) in l.ttft_by_turn.iter().enumerate() {
            s += &format!("{:<16} turn {:<2} TTFT p50/p90/p99 ms {}\n", "", t + 1, ms(p));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_distinct_and_reproducible() {
        assert_eq!(prompt(1, 3, 32), prompt(1, 3, 32));
        assert_ne!(prompt(1, 3, 32), prompt(1, 4, 32));
        assert!(prompt(1, 3, 32).iter().all(|&t| t < 50_000));
    }

    #[test]
    fn only_calls_lost_in_transit_are_retried() {
        use tonic::{Code, Status};
        assert!(lost_in_transit(&Status::unavailable("connection refused")));
        assert!(lost_in_transit(&Status::internal("h2 protocol error: error reading a body from connection")));
        // nginx answering for a replica killed before it answered (its HTML page as the body).
        assert!(lost_in_transit(&Status::internal(
            "protocol error: received message with invalid compression flag: 60 (valid flags are 0 and 1) \
             while receiving response with status: 502 Bad Gateway"
        )));
        assert!(!lost_in_transit(&Status::internal("ONNX Runtime run failed")));
        assert!(!lost_in_transit(&Status::new(Code::ResourceExhausted, "queue full")));
        assert!(!lost_in_transit(&Status::invalid_argument("max_new_tokens")));
    }

    #[test]
    fn percentiles_of_a_known_sample() {
        let p = percentiles((1..=101).map(f64::from).collect());
        assert_eq!((p.p50, p.p90, p.p99), (51.0, 91.0, 100.0));
    }
}
