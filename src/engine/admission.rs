//! Admission policy, as pure code: which waiting requests join the running
//! batch now.
//!
//! - Strict FIFO: requests are admitted from the head of the queue only, so a
//!   large request at the head is never overtaken; it waits until the batch
//!   has room for it, and since nothing else is admitted meanwhile, the batch
//!   drains until it does (no starvation).
//! - The KV budget counts what the left-padded layout really holds: every row
//!   is as long as the longest, so a batch of `B` rows peaks at
//!   `B * max_r(L + remaining_r)` token slots, where `L` is the current cache
//!   length and `remaining_r` the tokens row `r` may still add.
//! - One prefill takes at most `max_prefill_tokens` (rows × longest prompt,
//!   padding included), which bounds how long it stalls the running rows.

use std::time::Duration;

/// Limits the policy enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_batch_size: usize,
    /// KV budget in token slots (rows × columns).
    pub max_batch_tokens: usize,
    pub max_prefill_tokens: usize,
    /// Prompt tokens one iteration may prefill when at least as many rows
    /// wait for their first token as are decoding (see `prefill_budget`).
    pub max_burst_prefill_tokens: usize,
    /// How long an idle worker waits for one more request before it
    /// prefills what came (zero: not at all); see `gathered_enough`.
    pub idle_gather_gap: Duration,
    /// The most an idle worker waits in all.
    pub idle_gather_max: Duration,
}

/// Whether an idle worker that has received the requests `queued` (their
/// rows and prompt tokens) and has waited `waited` should stop waiting for
/// more and prefill them now: when the wait is over, or when the first run
/// could not take more anyway (a full batch, or the burst prefill budget).
pub fn gathered_enough(limits: &Limits, queued: Waiting, waited: Duration) -> bool {
    waited >= limits.idle_gather_max
        || limits.idle_gather_gap.is_zero()
        || queued.rows >= limits.max_batch_size
        || queued.tokens >= limits.max_burst_prefill_tokens.max(limits.max_prefill_tokens)
}

/// Prompt tokens the next iteration may prefill (chunked backends), given
/// the rows waiting for their first token, the prompt tokens they still need
/// (in all, and the most any one of them needs), and the rows decoding.
///
/// A prefill delays every decoding row by its cost; a waiting row waits for
/// every iteration before its prompt's last chunk. So the bound is
/// `max_prefill_tokens` (inter-token latency stays within one chunk), except
/// - when nothing decodes (nobody waits on the prefill): up to
///   `max_burst_prefill_tokens`;
/// - during a burst of short prompts (as many rows waiting as decoding, each
///   prompt within one chunk, all of them within `max_burst_prefill_tokens`):
///   all at once, so the burst starts together after one longer step instead
///   of over several, e.g. 16 clients arriving with 32-token prompts.
///
/// Long prompts gain nothing from larger chunks (the last of them still
/// waits for all of them) and would only stall the decoding rows, so they go
/// one chunk at a time. (Measured: with any prompt length and as many waiting
/// as decoding, two 500-token prompts beside two decoding rows made a 1.2 s
/// step, the inter-token p99 at 4 clients; with four waiting per decoding
/// row required instead, a burst of 16 short prompts that reached the worker
/// in two parts was no longer prefilled at once.)
pub fn prefill_budget(limits: &Limits, waiting: Waiting, decoding_rows: usize) -> usize {
    let base = limits.max_prefill_tokens.max(1);
    let burst = limits.max_burst_prefill_tokens.max(base);
    let short_burst = waiting.rows >= decoding_rows && waiting.longest <= base && waiting.tokens <= burst;
    if decoding_rows == 0 || short_burst { burst } else { base }
}

/// The requests waiting for their first token, as `prefill_budget` sees them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Waiting {
    /// Their rows (samples and beams count).
    pub rows: usize,
    /// Prompt tokens they still need prefilled.
    pub tokens: usize,
    /// The most any one of them still needs.
    pub longest: usize,
}

/// What the policy needs to know of a waiting request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub prompt_len: usize,
    pub max_new_tokens: usize,
    /// Rows the request occupies (its samples); its prompt is prefilled once.
    pub rows: usize,
}

/// What the policy needs to know of the running batch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Running {
    /// Current cache length `L`.
    pub len: usize,
    /// Per row, tokens it may still add.
    pub remaining: Vec<usize>,
}

impl Running {
    /// Peak token slots of this batch if nothing leaves early.
    pub fn peak(&self) -> usize {
        self.remaining.len() * self.remaining.iter().map(|r| self.len + r).max().unwrap_or(0)
    }
}

/// Peak token slots a request needs alone; more than `max_batch_tokens` and
/// it can never run.
pub fn alone(c: Candidate) -> usize {
    c.rows * (c.prompt_len + c.max_new_tokens)
}

/// How many requests from the head of `queue` to admit now.
pub fn admit(limits: &Limits, running: &Running, queue: impl IntoIterator<Item = Candidate>) -> usize {
    let mut rows = running.remaining.len();
    let mut len = running.len;
    let mut farthest = running.remaining.iter().map(|r| running.len + r).max().unwrap_or(0);
    let mut longest_prompt = 0;
    let mut admitted = 0;
    for c in queue {
        if rows + c.rows > limits.max_batch_size {
            break;
        }
        let prompt = longest_prompt.max(c.prompt_len);
        if admitted > 0 && (admitted + 1) * prompt > limits.max_prefill_tokens {
            break;
        }
        // After the join the cache is max(L, longest new prompt) long, and
        // every row already there moves right by the difference.
        let joined_len = len.max(prompt);
        let reach = (farthest + joined_len - len).max(joined_len + c.max_new_tokens);
        if (rows + c.rows) * reach > limits.max_batch_tokens {
            break;
        }
        rows += c.rows;
        len = joined_len;
        farthest = reach;
        longest_prompt = prompt;
        admitted += 1;
    }
    admitted
}

/// Admission for the slot layout (batchgen's own graph): each row owns a
/// slot and holds only its own tokens, so a request costs
/// `rows × (prompt + max_new_tokens)` token slots and the budget is the sum
/// over running and admitted requests. Prompts are prefilled in chunks, so
/// `max_prefill_tokens` bounds each iteration's prefill, not admission.
pub fn admit_slots(limits: &Limits, running: &[Candidate], queue: impl IntoIterator<Item = Candidate>) -> usize {
    let mut rows: usize = running.iter().map(|c| c.rows).sum();
    let mut tokens: usize = running.iter().map(|&c| alone(c)).sum();
    let mut admitted = 0;
    for c in queue {
        if rows + c.rows > limits.max_batch_size || tokens + alone(c) > limits.max_batch_tokens {
            break;
        }
        rows += c.rows;
        tokens += alone(c);
        admitted += 1;
    }
    admitted
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_batch_size: 4,
        max_batch_tokens: 1000,
        max_prefill_tokens: 300,
        max_burst_prefill_tokens: 1200,
        idle_gather_gap: Duration::from_millis(1),
        idle_gather_max: Duration::from_millis(5),
    };

    fn w(rows: usize, tokens: usize, longest: usize) -> Waiting {
        Waiting { rows, tokens, longest }
    }

    fn c(prompt_len: usize, max_new_tokens: usize) -> Candidate {
        Candidate { prompt_len, max_new_tokens, rows: 1 }
    }

    #[test]
    fn an_empty_batch_admits_up_to_the_batch_size() {
        assert_eq!(admit(&LIMITS, &Running::default(), vec![c(10, 10); 6]), 4);
    }

    #[test]
    fn the_budget_counts_padding_to_the_longest_row() {
        // Two rows reaching 100 + 100 = 200 columns: 400 slots; a third
        // makes it 600, a fourth 800; all fit in 1000.
        let wide_prefill = Limits { max_prefill_tokens: 1000, ..LIMITS };
        assert_eq!(admit(&wide_prefill, &Running::default(), vec![c(100, 100); 4]), 4);
        let tight = Limits { max_batch_tokens: 799, ..wide_prefill };
        assert_eq!(admit(&tight, &Running::default(), vec![c(100, 100); 4]), 3);
        // A row whose prompt is 300 long pads everyone to 300 + 100.
        assert_eq!(admit(&LIMITS, &Running::default(), [c(100, 100), c(300, 100), c(10, 10)]), 1);
        let running = Running { len: 150, remaining: vec![50, 200] };
        assert_eq!(running.peak(), 2 * 350);
        // Joining makes 3 rows reaching 350: 1050 > 1000.
        assert_eq!(admit(&LIMITS, &running, [c(10, 10)]), 0);
        let running = Running { len: 150, remaining: vec![50, 100] };
        assert_eq!(admit(&LIMITS, &running, [c(10, 10), c(10, 10)]), 2);
        assert_eq!(admit(&LIMITS, &running, [c(10, 10), c(10, 300)]), 1);
    }

    #[test]
    fn fifo_a_large_head_is_not_overtaken() {
        let running = Running { len: 10, remaining: vec![100] };
        // The head needs 2 * (10 + 600) > 1000: nothing behind it may pass.
        assert_eq!(admit(&LIMITS, &running, [c(10, 600), c(1, 1), c(1, 1)]), 0);
        // Once the batch is empty it runs.
        assert_eq!(admit(&LIMITS, &Running::default(), [c(10, 600), c(1, 1)]), 1);
    }

    #[test]
    fn one_prefill_is_bounded_but_a_long_prompt_alone_still_runs() {
        // 3 rows of 100 = 300 prefill tokens; a fourth would be 400.
        assert_eq!(admit(&LIMITS, &Running::default(), vec![c(100, 1); 4]), 3);
        // A single prompt over the prefill bound is admitted alone.
        let wide = Limits { max_batch_tokens: 10_000, ..LIMITS };
        assert_eq!(admit(&wide, &Running::default(), [c(500, 1), c(1, 1)]), 1);
    }

    #[test]
    fn samples_take_one_row_each() {
        let c4 = Candidate { prompt_len: 10, max_new_tokens: 10, rows: 3 };
        // 3 + 3 rows > 4.
        assert_eq!(admit(&LIMITS, &Running::default(), [c4, c4]), 1);
        assert_eq!(alone(c4), 60);
    }

    #[test]
    fn slots_cost_their_own_tokens_only() {
        // No padding: 4 rows of 100 + 100 are 800 slots whatever their lengths.
        let wide_prefill = Limits { max_prefill_tokens: 1, ..LIMITS };
        assert_eq!(admit_slots(&wide_prefill, &[], vec![c(100, 100); 4]), 4);
        assert_eq!(admit_slots(&LIMITS, &[], [c(300, 100), c(10, 10), c(100, 100)]), 3);
        // A running request counts what it holds plus what it may add.
        let running = [Candidate { prompt_len: 500, max_new_tokens: 100, rows: 1 }];
        assert_eq!(admit_slots(&LIMITS, &running, [c(200, 100), c(100, 1)]), 1);
        // FIFO: a head that does not fit blocks the rest.
        assert_eq!(admit_slots(&LIMITS, &running, [c(300, 200), c(1, 1)]), 0);
        // Rows are bounded by the batch size.
        let samples = Candidate { prompt_len: 1, max_new_tokens: 1, rows: 3 };
        assert_eq!(admit_slots(&LIMITS, &running, [samples, samples]), 1);
    }

    #[test]
    fn the_prefill_budget_grows_for_idle_batches_and_bursts_of_short_prompts() {
        // Nothing decodes: nobody's inter-token time suffers.
        assert_eq!(prefill_budget(&LIMITS, w(16, 8000, 500), 0), 1200);
        assert_eq!(prefill_budget(&LIMITS, w(0, 0, 0), 0), 1200);
        // A steady load: one newcomer beside many decoding rows.
        assert_eq!(prefill_budget(&LIMITS, w(1, 500, 500), 15), 300);
        assert_eq!(prefill_budget(&LIMITS, w(3, 90, 30), 4), 300);
        // A burst of short prompts is prefilled at once.
        assert_eq!(prefill_budget(&LIMITS, w(15, 480, 32), 1), 1200);
        assert_eq!(prefill_budget(&LIMITS, w(12, 384, 32), 4), 1200);
        assert_eq!(prefill_budget(&LIMITS, w(4, 1200, 300), 4), 1200);
        // Long prompts go one chunk at a time, however many wait.
        assert_eq!(prefill_budget(&LIMITS, w(2, 1000, 500), 2), 300);
        assert_eq!(prefill_budget(&LIMITS, w(14, 7000, 500), 2), 300);
        // So does a burst larger than the cap.
        assert_eq!(prefill_budget(&LIMITS, w(5, 1201, 300), 4), 300);
        // A cap below the base never shrinks the base.
        let small = Limits { max_burst_prefill_tokens: 10, ..LIMITS };
        assert_eq!(prefill_budget(&small, w(16, 100, 10), 0), 300);
    }

    #[test]
    fn an_idle_worker_gathers_until_the_wait_or_the_first_run_is_full() {
        let ms = Duration::from_millis;
        // Keeps waiting while the batch and the burst budget have room.
        assert!(!gathered_enough(&LIMITS, w(1, 32, 32), ms(1)));
        assert!(!gathered_enough(&LIMITS, w(3, 1199, 500), ms(4)));
        // Stops at the longest wait...
        assert!(gathered_enough(&LIMITS, w(1, 32, 32), ms(5)));
        // ...at a full batch (rows, samples and beams included)...
        assert!(gathered_enough(&LIMITS, w(4, 128, 32), ms(1)));
        // ...when the first run's prompt tokens are taken...
        assert!(gathered_enough(&LIMITS, w(2, 1200, 600), ms(1)));
        // ...and at once when gathering is off.
        let off = Limits { idle_gather_gap: Duration::ZERO, ..LIMITS };
        assert!(gathered_enough(&off, w(1, 32, 32), Duration::ZERO));
    }

    #[test]
    fn never_fits_is_detectable_up_front() {
        assert!(alone(c(600, 500)) > LIMITS.max_batch_tokens);
        assert_eq!(admit(&LIMITS, &Running::default(), [c(600, 500)]), 0);
    }
}
