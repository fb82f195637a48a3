//! A worker's waiting requests, shared fairly between tenants (API keys;
//! callers without a key are one tenant): start-time fair queueing over
//! tokens. Each request costs what it may hold (prompt + max_new_tokens,
//! per row) divided by its tenant's weight; a tenant's next request starts
//! at the later of the queue's virtual time and the virtual finish of the
//! tenant's last one, and the request with the earliest start goes first
//! (ties: the earlier finish, then the earlier arrival). So a tenant that
//! floods the queue does not put another tenant's next request behind its
//! flood: that one starts at the current virtual time, ahead of the
//! flood's next. A tenant that was idle gets no credit for it (its start is
//! never before the current virtual time). Within a tenant, lower
//! `priority` first, then arrival.
//!
//! Admission (`Backend::admit`) still takes a prefix of this order that
//! fits, so the request at the head is never overtaken and nothing starves.
use std::collections::VecDeque;
use std::sync::Arc;

use super::Job;
use super::admission;

/// Who a request is queued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    /// The API key's name; `None` for callers without a key.
    pub name: Option<Arc<str>>,
    /// Its share against the others, at least 1.
    pub weight: u32,
}

impl Default for Tenant {
    fn default() -> Self {
        Tenant { name: None, weight: 1 }
    }
}

struct Queued {
    job: Arc<Job>,
    seq: u64,
    /// A preempted request put back: its tokens were paid for when it was
    /// first taken, so it costs nothing now.
    paid: bool,
}

struct Lane {
    tenant: Tenant,
    /// Virtual finish of the tenant's last request taken.
    finish: f64,
    /// Lower priority first, then arrival.
    jobs: VecDeque<Queued>,
}

/// The waiting requests of one worker.
#[derive(Default)]
pub struct FairQueue {
    lanes: Vec<Lane>,
    /// The start of the request taken last.
    vtime: f64,
    seq: u64,
    len: usize,
}

fn cost(job: &Job) -> f64 {
    admission::alone(job.candidate()).max(1) as f64
}

impl FairQueue {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push(&mut self, job: Arc<Job>) {
        self.insert(job, false);
    }

    /// Puts back a request that was taken and then preempted: first among
    /// its tenant's requests of its priority (it is older than they are),
    /// and free of cost (its tokens were counted when it was first taken).
    pub fn push_resumed(&mut self, job: Arc<Job>) {
        self.insert(job, true);
    }

    fn insert(&mut self, job: Arc<Job>, paid: bool) {
        let seq = self.seq;
        self.seq += 1;
        let tenant = &job.tenant;
        let lane = match self.lanes.iter().position(|l| l.tenant.name == tenant.name) {
            Some(i) => {
                // A reload may have changed the key's weight.
                self.lanes[i].tenant.weight = tenant.weight.max(1);
                i
            }
            None => {
                let tenant = Tenant { name: tenant.name.clone(), weight: tenant.weight.max(1) };
                self.lanes.push(Lane { tenant, finish: self.vtime, jobs: VecDeque::new() });
                self.lanes.len() - 1
            }
        };
        let jobs = &mut self.lanes[lane].jobs;
        let priority = job.request.priority;
        let at = if paid {
            jobs.iter().position(|q| q.job.request.priority >= priority && !q.paid)
        } else {
            jobs.iter().position(|q| q.job.request.priority > priority)
        };
        jobs.insert(at.unwrap_or(jobs.len()), Queued { job, seq, paid });
        self.len += 1;
    }

    /// Every waiting request, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Job>> {
        self.lanes.iter().flat_map(|l| l.jobs.iter().map(|q| &q.job))
    }

    /// Removes and returns the requests `ended` says are over.
    pub fn take_ended(&mut self, mut ended: impl FnMut(&Job) -> bool) -> Vec<Arc<Job>> {
        let mut out = Vec::new();
        for lane in &mut self.lanes {
            let jobs = std::mem::take(&mut lane.jobs);
            for q in jobs {
                if ended(&q.job) { out.push(q.job) } else { lane.jobs.push_back(q) }
            }
        }
        self.len -= out.len();
        self.prune();
        out
    }

    /// Start and finish of `lane`'s head if it were taken at virtual time `v`
    /// after finishing at `finish`.
    fn tags(v: f64, finish: f64, lane: &Lane, q: &Queued) -> (f64, f64) {
        let start = v.max(finish);
        let cost = if q.paid { 0.0 } else { cost(&q.job) };
        (start, start + cost / f64::from(lane.tenant.weight))
    }

    /// The order in which the waiting requests would be taken: lanes and
    /// requests, the first to take first.
    pub fn order(&self) -> Vec<(usize, Arc<Job>)> {
        let mut v = self.vtime;
        let mut finish: Vec<f64> = self.lanes.iter().map(|l| l.finish).collect();
        let mut next = vec![0usize; self.lanes.len()];
        let mut out = Vec::with_capacity(self.len);
        while out.len() < self.len {
            let best = (0..self.lanes.len())
                .filter(|&i| next[i] < self.lanes[i].jobs.len())
                .map(|i| {
                    let q = &self.lanes[i].jobs[next[i]];
                    let (s, f) = Self::tags(v, finish[i], &self.lanes[i], q);
                    (i, s, f, q.seq)
                })
                .min_by(|a, b| a.1.total_cmp(&b.1).then(a.2.total_cmp(&b.2)).then(a.3.cmp(&b.3)))
                .expect("a lane with a request left");
            let (i, s, f, _) = best;
            out.push((i, self.lanes[i].jobs[next[i]].job.clone()));
            next[i] += 1;
            finish[i] = f;
            v = s;
        }
        out
    }

    /// The lane `job` heads, if it heads one.
    pub fn lane_of(&self, job: &Arc<Job>) -> Option<usize> {
        self.lanes.iter().position(|l| l.jobs.front().is_some_and(|q| Arc::ptr_eq(&q.job, job)))
    }

    /// Takes the head of `lane`, which `order` put next.
    pub fn take(&mut self, lane: usize) -> Arc<Job> {
        let l = &mut self.lanes[lane];
        let q = l.jobs.pop_front().expect("order() named this lane");
        let (s, f) = Self::tags(self.vtime, l.finish, l, &q);
        l.finish = f;
        self.vtime = s;
        self.len -= 1;
        q.job
    }

    /// Drops lanes with nothing waiting whose finish has passed: they would
    /// start at the virtual time anyway. (Lane indices from `order` are
    /// valid until the next `push`, `take_ended` or `prune`.)
    pub fn prune(&mut self) {
        let v = self.vtime;
        self.lanes.retain(|l| !l.jobs.is_empty() || l.finish > v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validation::ValidRequest;

    fn job(tenant: &str, weight: u32, prompt: usize, max_new: u32, priority: i32) -> Arc<Job> {
        let mut request = ValidRequest::for_tests(prompt, max_new);
        request.priority = priority;
        request.request_id = format!("{tenant}-{prompt}-{priority}");
        let (tx, _rx) = Job::channel(1);
        let mut job = Job::new(request, tx, tracing::Span::none());
        job.tenant = Tenant { name: (!tenant.is_empty()).then(|| tenant.into()), weight };
        Arc::new(job)
    }

    fn names(order: &[(usize, Arc<Job>)]) -> Vec<String> {
        order.iter().map(|(_, j)| j.request.request_id.clone()).collect()
    }

    /// Takes everything in order, as the worker would.
    fn drain(q: &mut FairQueue) -> Vec<String> {
        let mut out = Vec::new();
        while !q.is_empty() {
            let (lane, job) = q.order().remove(0);
            let taken = q.take(lane);
            assert!(Arc::ptr_eq(&job, &taken));
            out.push(taken.request.request_id.clone());
            q.prune();
        }
        out
    }

    #[test]
    fn a_flooding_tenant_does_not_put_anothers_request_behind_its_flood() {
        let mut q = FairQueue::default();
        for i in 0..10 {
            q.push(job("a", 1, 100 + i, 128, 0));
        }
        q.push(job("b", 1, 32, 32, 0));
        let order = names(&q.order());
        // Once a has been served for a while, b's new request still goes next.
        let mut busy = FairQueue::default();
        for i in 0..10 {
            busy.push(job("a", 1, 100 + i, 128, 0));
        }
        for _ in 0..3 {
            let (lane, _) = busy.order().remove(0);
            busy.take(lane);
        }
        busy.push(job("b", 1, 32, 32, 0));
        assert_eq!(names(&busy.order())[0], "b-32-0");
        // b's request goes first or second (before the rest of the flood):
        // it starts at the same virtual time as a's head and costs less.
        assert!(order.iter().position(|n| n.starts_with("b-")).unwrap() <= 1, "{order:?}");
        assert_eq!(drain(&mut q), order, "order() is what take() does");
    }

    #[test]
    fn equal_weights_share_tokens_equally_and_weights_scale_the_share() {
        let mut q = FairQueue::default();
        for i in 0..40 {
            q.push(job("a", 1, 100 + i, 100, 0));
            q.push(job("b", 1, 100 + i, 100, 0));
        }
        let first: Vec<String> = drain(&mut q).into_iter().take(20).collect();
        let a = first.iter().filter(|n| n.starts_with("a-")).count();
        assert_eq!(a, 10, "{first:?}");
        // Weight 3 against 1: three of every four in the head of the order.
        let mut q = FairQueue::default();
        for i in 0..40 {
            q.push(job("a", 3, 100 + i, 100, 0));
            q.push(job("b", 1, 100 + i, 100, 0));
        }
        let first: Vec<String> = drain(&mut q).into_iter().take(20).collect();
        let a = first.iter().filter(|n| n.starts_with("a-")).count();
        assert!((14..=16).contains(&a), "{a} of 20: {first:?}");
        // Tokens, not requests: b's requests are about 4.5× as large, so in
        // any head of the order the two have taken about as many tokens.
        let mut q = FairQueue::default();
        for i in 0..40 {
            q.push(job("a", 1, 10 + i, 10, 0));
            q.push(job("b", 1, 100 + i, 60, 0));
        }
        let mut tokens = [0usize; 2];
        let mut taken = 0;
        while taken < 30 {
            let (lane, _) = q.order().remove(0);
            let j = q.take(lane);
            tokens[usize::from(j.request.request_id.starts_with("b-"))] += admission::alone(j.candidate());
            taken += 1;
        }
        let (a, b) = (tokens[0] as f64, tokens[1] as f64);
        assert!((a - b).abs() <= 200.0, "tokens taken: a {a}, b {b}");
    }

    #[test]
    fn priority_orders_within_a_tenant_only() {
        let mut q = FairQueue::default();
        q.push(job("a", 1, 10, 10, 0));
        q.push(job("a", 1, 11, 10, 5));
        q.push(job("a", 1, 12, 10, -5));
        q.push(job("a", 1, 13, 10, 0));
        q.push(job("b", 1, 14, 10, 50));
        let order = names(&q.order());
        let a: Vec<&String> = order.iter().filter(|n| n.starts_with("a-")).collect();
        assert_eq!(a, ["a-12--5", "a-10-0", "a-13-0", "a-11-5"]);
        // b's low priority (50) does not send it behind a's queue.
        assert!(order.iter().position(|n| n.starts_with("b-")).unwrap() <= 1, "{order:?}");
    }

    #[test]
    fn an_idle_tenant_gets_no_credit_and_ended_requests_leave() {
        let mut q = FairQueue::default();
        for i in 0..5 {
            q.push(job("a", 1, 100 + i, 100, 0));
        }
        assert_eq!(drain(&mut q).len(), 5);
        // b was idle all along: it alternates with a from now on, it does not get five in a row.
        for i in 0..5 {
            q.push(job("a", 1, 110 + i, 100, 0));
            q.push(job("b", 1, 110 + i, 100, 0));
        }
        let order = drain(&mut q);
        let firsts: String = order.iter().take(6).map(|n| n.chars().next().unwrap()).collect();
        assert!(firsts == "ababab" || firsts == "bababa", "{order:?}");
        q.push(job("a", 1, 1, 1, 0));
        q.push(job("", 1, 2, 1, 0));
        let ended = q.take_ended(|j| j.tenant.name.is_none());
        assert_eq!((ended.len(), q.len()), (1, 1));
        assert_eq!(names(&q.order()), ["a-1-0"]);
    }

    #[test]
    fn a_resumed_request_goes_first_in_its_lane_and_costs_nothing() {
        let mut q = FairQueue::default();
        q.push(job("a", 1, 10, 10, 0));
        q.push(job("a", 1, 11, 10, 5));
        q.push_resumed(job("a", 1, 12, 10, 0));
        q.push_resumed(job("a", 1, 13, 10, 5));
        let order = names(&q.order());
        // Before the new requests of its priority, after those of a lower
        // number, and resumed ones in the order they came back.
        assert_eq!(order, ["a-12-0", "a-10-0", "a-13-5", "a-11-5"]);
        // Taking a resumed request does not move the tenant's finish: b's
        // request still alternates with a's new ones from the same point.
        let mut q = FairQueue::default();
        q.push_resumed(job("a", 1, 150, 100, 0));
        q.push(job("a", 1, 100, 100, 0));
        q.push(job("b", 1, 100, 100, 0));
        let order = names(&q.order());
        assert_eq!(order[0], "a-150-0", "{order:?}");
        assert_eq!(drain(&mut q).len(), 3);
    }
}
