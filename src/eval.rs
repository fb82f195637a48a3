//! Quality of a weight precision: perplexity of a text and top-1 agreement
//! with float32 (`batchgen eval`, and the start-up line of `--eval-text`).
//!
//! Perplexity is teacher-forced with a sliding window, as transformers
//! documents it ("Perplexity of fixed-length models"): windows of `window`
//! tokens starting every `stride` tokens; each window scores only the tokens
//! after the previous window's end, predicted with up to `window - 1`
//! tokens of context. Unlike the documented loop, which weights each
//! window's mean loss by its target count minus one, the total here is the
//! exact sum of every scored token's negative log-likelihood over their
//! count. Each window runs in chunks of at most `CHUNK` tokens over the slot
//! cache, so logits are held for one chunk at a time.
use std::time::Instant;

use crate::decoding::sampling::{argmax_unmasked, log_sum_exp_from};
use crate::engine::model::{ForwardError, Logits};
use crate::graph::{BuiltModel, PagedModel, RowInput};

/// Most tokens one run scores (bounds the logits held: CHUNK × vocab floats).
pub const CHUNK: usize = 256;

/// How a text is scored.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub window: usize,
    pub stride: usize,
}

/// The result of scoring a text with one model.
#[derive(Debug, Clone)]
pub struct Scored {
    /// Sum of the negative log-likelihoods (natural log) of the scored tokens.
    pub nll: f64,
    /// The model's top-1 prediction for each scored token, in text order.
    pub top1: Vec<u32>,
    pub seconds: f64,
    /// Tokens run through the model (windows overlap, so more than scored).
    pub tokens_run: usize,
}

impl Scored {
    pub fn scored(&self) -> usize {
        self.top1.len()
    }

    pub fn perplexity(&self) -> f64 {
        (self.nll / self.scored().max(1) as f64).exp()
    }

    pub fn tokens_per_second(&self) -> f64 {
        self.tokens_run as f64 / self.seconds.max(1e-9)
    }

    /// Share of scored tokens where both models' top-1 predictions agree.
    pub fn agreement(&self, other: &Scored) -> f64 {
        let same = self.top1.iter().zip(&other.top1).filter(|(a, b)| a == b).count();
        same as f64 / self.scored().max(1) as f64
    }
}

/// A model that runs one row at a time over a cache of its own: the slot
/// model (slot 0) or the paged one (one table over its whole pool).
pub trait OneRow {
    /// Positions the row may hold.
    fn max_len(&self) -> usize;
    fn run_one(&mut self, row: RowInput<'_>) -> Result<Logits, ForwardError>;
}

impl OneRow for BuiltModel {
    fn max_len(&self) -> usize {
        self.cache.shape.max_len
    }

    fn run_one(&mut self, row: RowInput<'_>) -> Result<Logits, ForwardError> {
        self.run(0..1, &[row])
    }
}

impl OneRow for PagedModel {
    fn max_len(&self) -> usize {
        self.max_len.min(self.pool.shape.blocks * self.pool.shape.block)
    }

    fn run_one(&mut self, row: RowInput<'_>) -> Result<Logits, ForwardError> {
        // The one row owns the whole pool, block j holding positions j × block..
        let table: Vec<u32> = (0..self.pool.shape.blocks as u32).collect();
        self.run(&[row], &[&table])
    }
}

/// Scores `ids` (at least two tokens) with `model`.
pub fn score(model: &mut impl OneRow, ids: &[u32], w: Window) -> Result<Scored, ForwardError> {
    let window = w.window.min(model.max_len()).max(2);
    let stride = w.stride.clamp(1, window);
    let started = Instant::now();
    let (mut nll, mut top1, mut tokens_run) = (0.0, Vec::new(), 0);
    let mut prev_end = 0;
    let mut begin = 0;
    while begin < ids.len() {
        let end = (begin + window).min(ids.len());
        // Targets first..end, each predicted by the logits of the position
        // before it: positions first - 1..end - 1 (the window's last token
        // predicts nothing inside it, so it is not run at all).
        let first = prev_end.max(begin + 1);
        let mut at = begin;
        while at < end - 1 {
            let upto = (at + CHUNK).min(end - 1);
            let from = (first - 1).max(at);
            let k = upto.saturating_sub(from);
            let run = model.run_one(RowInput { tokens: &ids[at..upto], past: at - begin, logits: k })?;
            tokens_run += upto - at;
            for (j, p) in (upto - k..upto).enumerate() {
                let row = run.row(j);
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                nll += log_sum_exp_from(row, max) - f64::from(row[ids[p + 1] as usize]);
                top1.push(argmax_unmasked(row, &[]));
            }
            at = upto;
        }
        prev_end = end;
        if end == ids.len() {
            break;
        }
        begin += stride;
    }
    Ok(Scored { nll, top1, seconds: started.elapsed().as_secs_f64(), tokens_run })
}

/// `n` tokens after `prompt` by greedy search (slot 0).
pub fn greedy(model: &mut BuiltModel, prompt: &[u32], n: usize) -> Result<Vec<u32>, ForwardError> {
    let mut out = Vec::with_capacity(n);
    let mut logits = model.run(0..1, &[RowInput { tokens: prompt, past: 0, logits: 1 }])?;
    while out.len() < n {
        let next = argmax_unmasked(logits.row(0), &[]);
        out.push(next);
        if out.len() < n {
            let past = prompt.len() + out.len() - 1;
            logits = model.run(0..1, &[RowInput { tokens: &[next], past, logits: 1 }])?;
        }
    }
    Ok(out)
}

/// How many tokens of `continuation` the model predicts top-1 when fed
/// `prompt` and the continuation before each (teacher forcing: a first
/// disagreement does not change what is compared after it).
pub fn follows(model: &mut BuiltModel, prompt: &[u32], continuation: &[u32]) -> Result<usize, ForwardError> {
    let Some((_, fed)) = continuation.split_last() else { return Ok(0) };
    let tokens: Vec<u32> = prompt.iter().chain(fed).copied().collect();
    let logits = model.run(0..1, &[RowInput { tokens: &tokens, past: 0, logits: continuation.len() }])?;
    Ok(continuation.iter().enumerate().filter(|&(j, &t)| argmax_unmasked(logits.row(j), &[]) == t).count())
}

/// Greedy prompts taken from a text: `count` slices of `len` tokens spread
/// evenly over it.
pub fn prompts(ids: &[u32], count: usize, len: usize, room: usize) -> Vec<&[u32]> {
    if count == 0 || ids.len() < len + room {
        return Vec::new();
    }
    let span = ids.len() - len - room;
    (0..count).map(|i| span * i / (count - 1).max(1)).map(|s| &ids[s..s + len]).collect()
}

/// One precision's figures in a `batchgen eval` report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub precision: String,
    /// Element type of the KV cache (`fp32`, `fp16`).
    pub kv_dtype: String,
    pub perplexity: f64,
    /// Relative change of perplexity against float32 (0.01 = 1 % higher).
    pub delta: f64,
    /// Share of scored text tokens where the top-1 prediction equals float32's.
    pub top1_agreement: f64,
    /// Share of float32's greedy continuation tokens this precision predicts
    /// top-1 (teacher-forced on float32's continuation).
    pub greedy_agreement: f64,
    /// Continuations this precision's own greedy search reproduces whole.
    pub identical_continuations: usize,
    /// Tokens per second of the scoring pass (prefill, one row).
    pub tokens_per_second: f64,
    /// Bytes of the weights buffer.
    pub weight_bytes: usize,
}

/// What `batchgen eval` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub model: String,
    pub text: String,
    pub tokens: usize,
    pub scored: usize,
    pub window: usize,
    pub stride: usize,
    pub prompts: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub cpu: String,
    /// The largest int8 weight magnitude (`--int8-range`).
    pub int8_limit: i8,
    pub rows: Vec<Row>,
}

/// The CPU's model name and the SIMD flags that decide int8 speed.
pub fn cpu() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let name = info.lines().find_map(|l| l.strip_prefix("model name")).map(|l| l.trim_start_matches([' ', '\t', ':']));
    let flags: Vec<&str> = info
        .lines()
        .find_map(|l| l.strip_prefix("flags"))
        .map(|l| {
            l.split_whitespace().filter(|f| ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni"].contains(f)).collect()
        })
        .unwrap_or_default();
    format!("{} ({})", name.unwrap_or("unknown CPU"), flags.join(" "))
}

/// Runs `batchgen eval`.
pub fn run(args: &crate::config::EvalArgs) -> anyhow::Result<Report> {
    use anyhow::Context;

    use crate::graph::{Gpt2Shape, KvDtype, KvLayout, Precision, SharedModel, Weights};
    let rt = crate::runtime::init(args.onnxruntime.as_deref())?;
    let files = crate::model::ModelFiles::resolve(&args.model, args.revision.as_deref(), false)?;
    let tokenizer = crate::tokenizer::Tokenizer::from_file(&files.tokenizer).map_err(|e| anyhow::anyhow!("{}", e.0))?;
    let text = std::fs::read_to_string(&args.text).with_context(|| format!("reading {}", args.text.display()))?;
    let mut ids = tokenizer.encode(&text).map_err(|e| anyhow::anyhow!("{}", e.0))?;
    if args.max_tokens > 0 {
        ids.truncate(args.max_tokens);
    }
    anyhow::ensure!(ids.len() >= 2, "{} has {} tokens; eval needs at least 2", args.text.display(), ids.len());
    let shape = Gpt2Shape::load(&files.config)?;
    let fp32 = Weights::from_files(&files, &shape)?;
    let window = if args.window == 0 { shape.positions } else { args.window.min(shape.positions) };
    let w = Window { window, stride: if args.stride == 0 { (window / 2).max(1) } else { args.stride } };
    let room = args.new_tokens.min(shape.positions.saturating_sub(args.prompt_tokens));
    let prompts = prompts(&ids, args.prompts, args.prompt_tokens.min(shape.positions - 1).max(1), room);
    let options = crate::engine::SessionOptions { intra_op_threads: args.intra_op_threads };
    let mut precisions = vec![Precision::Fp32];
    precisions.extend(args.weights.iter().filter(|&&p| p != Precision::Fp32));
    let mut caches = vec![KvDtype::Fp32];
    caches.extend(args.kv_dtypes.iter().filter(|&&d| d != KvDtype::Fp32));
    let int8_limit = args.int8_range.limit();
    let (mut rows, mut base, mut continuations) = (Vec::new(), None::<Scored>, Vec::new());
    for (precision, kv) in precisions.into_iter().flat_map(|p| caches.iter().map(move |&d| (p, d))) {
        let weights = fp32.quantized(&shape, precision, int8_limit);
        let weight_bytes = weights.data.len();
        let shared = SharedModel::new(shape.clone(), weights, KvLayout::new(kv));
        let session = std::sync::Arc::new(shared.session(&rt.env, &options).map_err(|e| anyhow::anyhow!("{e:?}"))?);
        let mut model = shared.worker(&session, 1)?;
        let scored = score(&mut model, &ids, w)?;
        if continuations.is_empty() {
            for p in &prompts {
                continuations.push(greedy(&mut model, p, room)?);
            }
        }
        let (mut followed, mut identical) = (0, 0);
        for (p, c) in prompts.iter().zip(&continuations) {
            followed += follows(&mut model, p, c)?;
            identical += usize::from(greedy(&mut model, p, room)? == *c);
        }
        let total = continuations.iter().map(Vec::len).sum::<usize>().max(1);
        let b = base.get_or_insert_with(|| scored.clone());
        rows.push(Row {
            precision: precision.to_string(),
            kv_dtype: kv.to_string(),
            perplexity: scored.perplexity(),
            delta: scored.perplexity() / b.perplexity() - 1.0,
            top1_agreement: scored.agreement(b),
            greedy_agreement: followed as f64 / total as f64,
            identical_continuations: identical,
            tokens_per_second: scored.tokens_per_second(),
            weight_bytes,
        });
    }
    Ok(Report {
        model: files.name,
        text: args.text.display().to_string(),
        tokens: ids.len(),
        scored: base.map_or(0, |b| b.scored()),
        window: w.window,
        stride: w.stride,
        prompts: prompts.len(),
        prompt_tokens: prompts.first().map_or(0, |p| p.len()),
        new_tokens: room,
        cpu: cpu(),
        int8_limit,
        rows,
    })
}

/// The report as a table.
pub fn table(r: &Report) -> String {
    let mut out = format!(
        "model {}; text {}: {} tokens, {} scored (window {}, stride {}); greedy: {} prompts of {} tokens, {} new\nCPU: {}; int8 weights in -{l}..={l}\n",
        r.model,
        r.text,
        r.tokens,
        r.scored,
        r.window,
        r.stride,
        r.prompts,
        r.prompt_tokens,
        r.new_tokens,
        r.cpu,
        l = r.int8_limit
    );
    out += &format!(
        "{:<16} {:>5} {:>11} {:>10} {:>13} {:>13} {:>10} {:>12} {:>10}\n",
        "precision",
        "kv",
        "perplexity",
        "Δ vs fp32",
        "top-1 (text)",
        "greedy top-1",
        "identical",
        "tokens/s",
        "weights MB"
    );
    for row in &r.rows {
        let base = row.precision == "fp32" && row.kv_dtype == "fp32";
        let delta = if base { "—".to_string() } else { format!("{:+.2} %", 100.0 * row.delta) };
        out += &format!(
            "{:<16} {:>5} {:>11.3} {:>10} {:>11.2} % {:>11.2} % {:>10} {:>12.0} {:>10.1}\n",
            row.precision,
            row.kv_dtype,
            row.perplexity,
            delta,
            100.0 * row.top1_agreement,
            100.0 * row.greedy_agreement,
            format!("{}/{}", row.identical_continuations, r.prompts),
            row.tokens_per_second,
            row.weight_bytes as f64 / 1e6
        );
    }
    out
}

/// `serve --eval-text`: the quality of the served weights, measured before
/// serving and logged in one line.
pub struct QualityCheck {
    path: std::path::PathBuf,
    ids: Vec<u32>,
    /// float32's scores, when the served weights are not float32.
    base: Option<Scored>,
}

impl QualityCheck {
    pub fn read(path: &std::path::Path, max_tokens: usize, tok: &crate::tokenizer::Tokenizer) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut ids = tok.encode(&text).map_err(|e| e.0)?;
        ids.truncate(max_tokens.max(2));
        if ids.len() < 2 {
            return Err(format!("{} has {} tokens; at least 2 are needed", path.display(), ids.len()));
        }
        Ok(QualityCheck { path: path.into(), ids, base: None })
    }

    fn window(&self, shape: &crate::graph::Gpt2Shape) -> Window {
        let window = shape.positions.min(self.ids.len());
        Window { window, stride: (window / 2).max(1) }
    }

    /// Scores the text with float32 weights (a session of their own, dropped after).
    pub fn baseline(
        &mut self,
        shape: &crate::graph::Gpt2Shape,
        fp32: &crate::graph::Weights,
        env: &ort::environment::Environment,
        options: &crate::engine::SessionOptions,
    ) -> Result<(), String> {
        let kv = crate::graph::KvLayout::new(crate::graph::KvDtype::Fp32);
        let shared = crate::graph::SharedModel::new(shape.clone(), fp32.clone(), kv);
        let session = std::sync::Arc::new(shared.session(env, options).map_err(|e| format!("{e:?}"))?);
        let mut model = shared.worker(&session, 1).map_err(|e| e.to_string())?;
        self.base = Some(score(&mut model, &self.ids, self.window(shape)).map_err(|e| e.to_string())?);
        Ok(())
    }

    /// Scores the text with the serving session and logs the figures.
    pub fn log(
        self,
        session: &std::sync::Arc<ort::session::Session>,
        served: &crate::graph::SharedModel,
        precision: crate::graph::Precision,
    ) -> Result<(), String> {
        let shape = &served.shape;
        let window = self.window(shape);
        // Through the serving session, over a cache of the layout it serves.
        let s = if served.kv.is_paged() {
            let block = 16;
            let mut model =
                served.paged_worker(session, shape.positions.div_ceil(block), block).map_err(|e| e.to_string())?;
            score(&mut model, &self.ids, window)
        } else {
            let mut model = served.worker(session, 1).map_err(|e| e.to_string())?;
            score(&mut model, &self.ids, window)
        }
        .map_err(|e| e.to_string())?;
        let kv = served.kv.dtype;
        // "int8", or "int8 kv-fp16" with a float16 cache.
        let precision =
            if kv == crate::graph::KvDtype::Fp32 { precision.to_string() } else { format!("{precision} kv-{kv}") };
        let (ppl, file, n) = (s.perplexity(), self.path.display(), s.scored());
        match &self.base {
            Some(b) => {
                let (delta, agreement) = (100.0 * (ppl / b.perplexity() - 1.0), 100.0 * s.agreement(b));
                crate::log_fact!(
                    "quality",
                    text = format!(
                        "quality: {precision} perplexity {ppl:.3} vs fp32 {:.3} ({delta:+.2} %), \
                         top-1 agreement with fp32 {agreement:.2} % on {file} ({n} tokens)",
                        b.perplexity()
                    ),
                    precision = %precision,
                    perplexity = ppl,
                    fp32_perplexity = b.perplexity(),
                    delta_percent = delta,
                    top1_agreement_percent = agreement,
                    text_file = %file,
                    tokens = n
                );
            }
            None => crate::log_fact!(
                "quality",
                text = format!("quality: {precision} perplexity {ppl:.3} on {file} ({n} tokens)"),
                precision = %precision,
                perplexity = ppl,
                text_file = %file,
                tokens = n
            ),
        }
        Ok(())
    }
}
