//! Preemption policy, as pure code: which running requests a waiting one
//! may take the place of when the batch has no room for it.
//!
//! Fair queueing (`super::fair`) decides who goes next, but without
//! preemption "next" still waits for a running row to end: behind a key that
//! filled the batch with long requests that is seconds (measured: 1.3 s at
//! p50, 2.9 s at p99 for a 32-token request beside 26 rows of 628 tokens).
//! So a waiting request — the head of the fair order, or the first of its
//! tenant in that order when the head can neither fit nor preempt (a
//! preempted request waiting to resume, say) — may move running requests
//! out of the batch, in two cases:
//! - **share**: another tenant holds more of the batch than the head's
//!   tenant would after the move, counted as the admission budget counts it
//!   (rows × (prompt + max_new_tokens)) divided by the tenant's weight. The
//!   head's tenant may take a victim only while afterwards it still holds no
//!   more than the victim's tenant (`use_T + head ≤ use_U − victim`), so two
//!   tenants never take rows back and forth: each move brings the shares
//!   closer, and a batch of one request is never preempted for another.
//! - **priority**: a request of the head's own tenant with a larger
//!   `priority` number (vLLM's convention: lower first).
//!
//! Victims are taken one at a time, share first (from the tenant using the
//! most, its largest priority number, the latest started), until the head
//! fits; if it cannot fit even then, nobody moves.
//!
//! A victim resumes exactly: its rows' caches are copied out byte for byte
//! (`Backend::swap_out`, bounded by `--preemption-swap-mib`) and back into
//! free slots when it is taken again, and every row keeps its state (RNG,
//! penalties' history, stop text, beam search, constraint, speculation), so
//! its tokens are those it would have made without the pause. Swapping
//! instead of recomputing: a 628-token row of the 124M model is 46 MB, a
//! copy of a few ms each way, against ≈ 1 s to prefill it again (and int8
//! weights, whose activation scales depend on the chunking, would not
//! recompute it exactly).
use super::admission::{Candidate, alone};

/// A running request as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Its tenant (equal for requests of one tenant).
    pub tenant: usize,
    /// Its tenant's weight, at least 1.
    pub weight: u32,
    pub priority: i32,
    /// What it holds and may add (its live rows).
    pub candidate: Candidate,
    /// Whether it may be moved out now (every row decoding), and the bytes
    /// its caches would take out of the batch.
    pub movable: bool,
    pub bytes: usize,
}

/// Why a request was moved out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Share,
    Priority,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Share => "share",
            Reason::Priority => "priority",
        }
    }
}

fn usage(held: &Held) -> f64 {
    alone(held.candidate) as f64 / f64::from(held.weight.max(1))
}

/// The running requests (indices into `running`, each with why) to move out
/// so that `head` fits, or `None` when it fits already, when nobody may be
/// moved for it, or when moving everyone allowed would still not make room.
/// `fits(kept)` says whether the head fits beside the running requests
/// `kept[i]` is true for; `swap_room` bounds the bytes moved out.
pub fn victims(
    running: &[Held],
    head: &Held,
    swap_room: usize,
    fits: impl Fn(&[bool]) -> bool,
) -> Option<Vec<(usize, Reason)>> {
    let mut kept = vec![true; running.len()];
    let mut chosen = Vec::new();
    let mut room = swap_room;
    loop {
        if fits(&kept) {
            return (!chosen.is_empty()).then_some(chosen);
        }
        // Each tenant's use of the batch now.
        let use_of = |tenant: usize, kept: &[bool]| -> f64 {
            running.iter().zip(kept).filter(|(h, k)| **k && h.tenant == tenant).map(|(h, _)| usage(h)).sum()
        };
        let mine = use_of(head.tenant, &kept) + usage(head);
        let mut best: Option<(usize, Reason, (f64, i32, usize))> = None;
        for (i, h) in running.iter().enumerate() {
            if !kept[i] || !h.movable || h.bytes > room {
                continue;
            }
            let reason = if h.tenant == head.tenant {
                if h.priority <= head.priority {
                    continue;
                }
                Reason::Priority
            } else {
                let theirs = use_of(h.tenant, &kept);
                if mine > theirs - usage(h) {
                    continue;
                }
                Reason::Share
            };
            // Share before priority; then the tenant using the most, the
            // largest priority number, the latest started.
            let rank = match reason {
                Reason::Share => (use_of(h.tenant, &kept), h.priority, i),
                Reason::Priority => (f64::NEG_INFINITY, h.priority, i),
            };
            let better = match &best {
                None => true,
                Some((_, _, r)) => rank.0.total_cmp(&r.0).then(rank.1.cmp(&r.1)).then(rank.2.cmp(&r.2)).is_gt(),
            };
            if better {
                best = Some((i, reason, rank));
            }
        }
        let (i, reason, _) = best?;
        kept[i] = false;
        room -= running[i].bytes;
        chosen.push((i, reason));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(tenant: usize, priority: i32, tokens: usize) -> Held {
        Held {
            tenant,
            weight: 1,
            priority,
            candidate: Candidate { prompt_len: tokens / 2, max_new_tokens: tokens - tokens / 2, rows: 1 },
            movable: true,
            bytes: tokens,
        }
    }

    /// Fits when the kept requests leave `budget` tokens for the head.
    fn budget(running: &[Held], head: &Held, total: usize) -> impl Fn(&[bool]) -> bool {
        let used: Vec<usize> = running.iter().map(|h| alone(h.candidate)).collect();
        let need = alone(head.candidate);
        move |kept: &[bool]| used.iter().zip(kept).filter(|(_, k)| **k).map(|(u, _)| u).sum::<usize>() + need <= total
    }

    /// The victims for `head` with unbounded swap room, in a batch of `total` tokens.
    fn pick(running: &[Held], head: &Held, total: usize) -> Option<Vec<(usize, Reason)>> {
        victims(running, head, usize::MAX, budget(running, head, total))
    }

    #[test]
    fn a_tenant_over_its_share_gives_way_to_one_under_it() {
        // Tenant 0 fills the batch with four 600-token requests; tenant 1's
        // 64-token request needs one of them out: the latest started.
        let running = vec![held(0, 0, 600); 4];
        let head = held(1, 0, 64);
        let got = pick(&running, &head, 2400);
        assert_eq!(got, Some(vec![(3, Reason::Share)]));
        // Nothing moves when it fits already.
        assert_eq!(pick(&running, &head, 2464), None);
    }

    #[test]
    fn shares_converge_and_never_swap_back_and_forth() {
        // Equal requests: tenant 1 may take rows until it holds as many as 0.
        let mut running = vec![held(0, 0, 100); 3];
        running.push(held(1, 0, 100));
        let head = held(1, 0, 100);
        // 4 rows of room, full: 0 holds 3, 1 holds 1 -> after the move 2 and 2.
        assert_eq!(pick(&running, &head, 400), Some(vec![(2, Reason::Share)]));
        // At 2 and 2 neither may take from the other.
        let even = vec![held(0, 0, 100), held(0, 0, 100), held(1, 0, 100), held(1, 0, 100)];
        assert_eq!(pick(&even, &head, 400), None);
        let head0 = held(0, 0, 100);
        assert_eq!(pick(&even, &head0, 400), None);
        // One request alone in the batch is never preempted for another tenant's.
        let one = vec![held(0, 0, 100)];
        assert_eq!(pick(&one, &head, 100), None);
    }

    #[test]
    fn weights_scale_the_share() {
        // Tenant 0 of weight 3 holding 3 of 4 rows is at its share beside
        // tenant 1 (weight 1, one row).
        let mut running: Vec<Held> = (0..3).map(|_| Held { weight: 3, ..held(0, 0, 100) }).collect();
        running.push(held(1, 0, 100));
        let head = held(1, 0, 100);
        assert_eq!(pick(&running, &head, 400), None);
        // Of weight 1 it would give one up.
        let equal: Vec<Held> = running.iter().map(|h| Held { weight: 1, ..*h }).collect();
        assert!(pick(&equal, &head, 400).is_some());
    }

    #[test]
    fn priority_moves_a_tenants_own_later_requests_only() {
        let running = vec![held(0, 5, 100), held(0, 0, 100), held(0, 10, 100)];
        let urgent = held(0, -1, 100);
        assert_eq!(pick(&running, &urgent, 300), Some(vec![(2, Reason::Priority)]));
        // Equal priority never preempts.
        let same = held(0, 10, 100);
        assert_eq!(pick(&running, &same, 300), None);
        // Priority does not cross tenants (only shares do).
        let other = vec![held(1, 10, 100)];
        assert_eq!(pick(&other, &urgent, 100), None);
    }

    #[test]
    fn several_victims_or_none() {
        // The head needs two of tenant 0's requests out.
        let running = vec![held(0, 0, 100); 6];
        let head = held(1, 0, 200);
        let got = pick(&running, &head, 600).unwrap();
        assert_eq!(got.len(), 2);
        // Not movable (prefilling) or over the swap room: nobody moves.
        let stuck: Vec<Held> = running.iter().map(|h| Held { movable: false, ..*h }).collect();
        assert_eq!(pick(&stuck, &head, 600), None);
        assert_eq!(victims(&running, &head, 150, budget(&running, &head, 600)), None);
        // A head too large for the whole batch moves nobody.
        let huge = held(1, 0, 5000);
        assert_eq!(pick(&running, &huge, 600), None);
    }
}
