//! What a worker counts (monotonic, shared with the router, the metrics and
//! the benchmarks) and the summary it logs after each busy period.
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters a worker keeps for benchmarks and metrics (monotonic).
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub steps: AtomicU64,
    /// Sum over decode steps of the rows in the step.
    pub step_rows: AtomicU64,
    /// Time inside `Session::run` for decode steps.
    pub run_ns: AtomicU64,
    /// Time of whole iterations (admit + evict + decode + sampling + sending).
    pub iteration_ns: AtomicU64,
    pub prefill_ns: AtomicU64,
    pub prefill_tokens: AtomicU64,
    pub joins: AtomicU64,
    pub join_bytes: AtomicU64,
    pub join_ns: AtomicU64,
    /// Rows evicted, and the copies that removing them cost.
    pub evictions: AtomicU64,
    pub evict_copies: AtomicU64,
    pub evict_bytes: AtomicU64,
    pub evict_ns: AtomicU64,
    pub restarts: AtomicU64,
    /// Prompt tokens copied from the prefix cache, and prefilled while it was on.
    pub prefix_hit_tokens: AtomicU64,
    pub prefix_miss_tokens: AtomicU64,
    /// Decode steps that checked proposals, and the tokens proposed and
    /// accepted in them (`super::spec`).
    pub spec_steps: AtomicU64,
    pub spec_proposed: AtomicU64,
    pub spec_accepted: AtomicU64,
    /// Requests moved out of the batch for another (`super::preempt`), and
    /// the time their caches' copies out and back in took.
    pub preemptions: AtomicU64,
    pub swap_ns: AtomicU64,
}

/// Worker statistics at one moment, for the summary logged after each busy
/// period (what the step time goes to, and what joins and evictions cost).
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub steps: u64,
    step_rows: u64,
    run_ns: u64,
    iteration_ns: u64,
    prefill_ns: u64,
    prefill_tokens: u64,
    joins: u64,
    join_bytes: u64,
    join_ns: u64,
    evictions: u64,
    evict_copies: u64,
    evict_bytes: u64,
    evict_ns: u64,
    prefix_hit_tokens: u64,
    prefix_miss_tokens: u64,
    spec_steps: u64,
    spec_proposed: u64,
    spec_accepted: u64,
    preemptions: u64,
    swap_ns: u64,
}

impl Snapshot {
    pub fn of(s: &WorkerStats) -> Self {
        let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            steps: l(&s.steps),
            step_rows: l(&s.step_rows),
            run_ns: l(&s.run_ns),
            iteration_ns: l(&s.iteration_ns),
            prefill_ns: l(&s.prefill_ns),
            prefill_tokens: l(&s.prefill_tokens),
            joins: l(&s.joins),
            join_bytes: l(&s.join_bytes),
            join_ns: l(&s.join_ns),
            evictions: l(&s.evictions),
            evict_copies: l(&s.evict_copies),
            evict_bytes: l(&s.evict_bytes),
            evict_ns: l(&s.evict_ns),
            prefix_hit_tokens: l(&s.prefix_hit_tokens),
            prefix_miss_tokens: l(&s.prefix_miss_tokens),
            spec_steps: l(&s.spec_steps),
            spec_proposed: l(&s.spec_proposed),
            spec_accepted: l(&s.spec_accepted),
            preemptions: l(&s.preemptions),
            swap_ns: l(&s.swap_ns),
        }
    }

    pub fn minus(&self, o: &Snapshot) -> String {
        let steps = (self.steps - o.steps).max(1);
        let iteration = (self.iteration_ns - o.iteration_ns).max(1) as f64;
        let run = (self.run_ns - o.run_ns) as f64;
        let prefill = (self.prefill_ns - o.prefill_ns) as f64;
        let (join, evict) = ((self.join_ns - o.join_ns) as f64, (self.evict_ns - o.evict_ns) as f64);
        let per = |ns: f64, n: u64| if n == 0 { 0.0 } else { ns / n as f64 / 1e6 };
        let mib = |b: u64, n: u64| if n == 0 { 0.0 } else { b as f64 / n as f64 / 1048576.0 };
        let (joins, copies) = (self.joins - o.joins, self.evict_copies - o.evict_copies);
        format!(
            "{steps} decode steps, {:.2} rows/step, {:.2} ms/iteration; decode Session::run {:.1}%, prefill {:.1}% \
             ({} tokens), joins {:.1}%, evictions {:.1}%, other (sampling, streaming, scheduling) {:.1}%; \
             {joins} joins at {:.2} ms and {:.2} MiB each; {} rows evicted in {copies} copies at {:.2} ms and {:.2} MiB each; \
             prompt tokens from the prefix cache {} of {}; {} steps speculated, {} of {} proposed tokens accepted; \
             {} requests preempted, {:.1} ms swapping",
            (self.step_rows - o.step_rows) as f64 / steps as f64,
            iteration / steps as f64 / 1e6,
            100.0 * run / iteration,
            100.0 * prefill / iteration,
            self.prefill_tokens - o.prefill_tokens,
            100.0 * join / iteration,
            100.0 * evict / iteration,
            100.0 * (iteration - run - prefill - join - evict) / iteration,
            per(join, joins),
            mib(self.join_bytes - o.join_bytes, joins),
            self.evictions - o.evictions,
            per(evict, copies),
            mib(self.evict_bytes - o.evict_bytes, copies),
            self.prefix_hit_tokens - o.prefix_hit_tokens,
            self.prefix_hit_tokens - o.prefix_hit_tokens + self.prefix_miss_tokens - o.prefix_miss_tokens,
            self.spec_steps - o.spec_steps,
            self.spec_accepted - o.spec_accepted,
            self.spec_proposed - o.spec_proposed,
            self.preemptions - o.preemptions,
            (self.swap_ns - o.swap_ns) as f64 / 1e6,
        )
    }
}
