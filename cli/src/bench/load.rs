//! Load shapes: a closed loop (C clients, each sending its next request when
//! the last one ends) or an open loop (Poisson arrivals at a rate, optionally
//! capped in flight), until a request count or a duration is reached.
//!
//! Invariants: request indices are handed out once each, so a phase sends
//! exactly `n` requests for `Stop::Requests(n)`; with `Stop::Duration` no
//! request is sent after the deadline and those in flight are awaited
//! (each is bounded by the per-request timeout).
//!
//! [`Phase::steady`] is the closed loop measured in steady state: the
//! clients never pause between warmup and measurement and never run dry at
//! the end, so the measured window holds exactly `concurrency` requests in
//! flight throughout.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::client::Target;
use super::stats::Record;
use super::workload::Workload;

/// How requests are offered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// `concurrency` clients sending back to back.
    Closed { concurrency: u32 },
    /// Poisson arrivals at `rate` per second; arrivals beyond
    /// `max_concurrency` in flight wait for a slot (their clock starts when
    /// they are sent).
    Open {
        rate: f64,
        max_concurrency: Option<u32>,
    },
}

/// When a phase stops sending.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stop {
    Requests(u64),
    Duration(Duration),
}

/// One phase (warmup or measured): request indices start at `first_index`.
#[derive(Debug, Clone)]
pub struct Phase {
    pub target: Arc<Target>,
    pub workload: Workload,
    pub load: Load,
    pub stop: Stop,
    pub first_index: u64,
    /// Start of the benchmark; records are timed from it.
    pub epoch: Instant,
}

impl Phase {
    /// Runs the phase to its end and returns every request's record.
    pub async fn run(self) -> Result<Vec<Record>> {
        let deadline = match self.stop {
            Stop::Duration(d) => Some(Instant::now() + d),
            Stop::Requests(_) => None,
        };
        let limit = match self.stop {
            Stop::Requests(n) => Some(n),
            Stop::Duration(_) => None,
        };
        match self.load {
            Load::Closed { concurrency } => self.closed(concurrency, limit, deadline).await,
            Load::Open {
                rate,
                max_concurrency,
            } => self.open(rate, max_concurrency, limit, deadline).await,
        }
    }

    async fn closed(
        self,
        concurrency: u32,
        limit: Option<u64>,
        deadline: Option<Instant>,
    ) -> Result<Vec<Record>> {
        let next = Arc::new(AtomicU64::new(0));
        let mut clients = JoinSet::new();
        for _ in 0..concurrency {
            let (next, phase) = (Arc::clone(&next), self.clone());
            clients.spawn(async move {
                let mut records = Vec::new();
                loop {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if limit.is_some_and(|n| i >= n) {
                        break;
                    }
                    let spec = phase.workload.request(phase.first_index + i);
                    records.push(phase.target.send(&spec, phase.epoch).await);
                }
                records
            });
        }
        let mut records = Vec::new();
        while let Some(done) = clients.join_next().await {
            records.extend(done.context("a benchmark client panicked")?);
        }
        Ok(records)
    }

    /// A closed loop of `concurrency` clients that sends until `warmup`
    /// and then `measure` requests have completed, then cancels the requests
    /// still in flight (their connections are dropped, so the server frees
    /// them) and leaves them out.
    ///
    /// Returns the `measure` records that completed after the warmup ones,
    /// and the window's start: the end of the last warmup request (the
    /// first send when there is no warmup). Counting completions between two
    /// completion instants measures the steady-state rate without the ramp
    /// of `concurrency` simultaneous first sends or the drain of the last
    /// requests, which bias a first-send-to-last-end window by about
    /// `concurrency / measure`.
    pub async fn steady(
        self,
        concurrency: u32,
        warmup: u64,
        measure: u64,
    ) -> Result<(Vec<Record>, f64)> {
        let wanted = usize::try_from(warmup + measure).context("too many requests")?;
        let next = Arc::new(AtomicU64::new(0));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut clients = JoinSet::new();
        for _ in 0..concurrency {
            let (next, phase, tx) = (Arc::clone(&next), self.clone(), tx.clone());
            clients.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let spec = phase.workload.request(phase.first_index + i);
                    let record = phase.target.send(&spec, phase.epoch).await;
                    if tx.send(record).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let mut done = Vec::with_capacity(wanted);
        while done.len() < wanted {
            match rx.recv().await {
                Some(record) => done.push(record),
                None => bail!("every benchmark client stopped"),
            }
        }
        clients.abort_all();
        while clients.join_next().await.is_some() {}
        done.sort_by(|a, b| a.end_s().total_cmp(&b.end_s()));
        let measured = done.split_off(done.len() - measure as usize);
        let start = match done.last() {
            Some(last_warmup) => last_warmup.end_s(),
            None => measured
                .iter()
                .map(|r| r.start_s)
                .fold(f64::INFINITY, f64::min),
        };
        Ok((measured, start))
    }

    async fn open(
        self,
        rate: f64,
        max_concurrency: Option<u32>,
        limit: Option<u64>,
        deadline: Option<Instant>,
    ) -> Result<Vec<Record>> {
        let slots = max_concurrency.map(|m| Arc::new(Semaphore::new(m as usize)));
        let mut gaps = self.workload.arrivals();
        let mut requests = JoinSet::new();
        let mut arrival = Instant::now();
        let mut i = 0;
        while limit.is_none_or(|n| i < n) && deadline.is_none_or(|d| arrival < d) {
            tokio::time::sleep_until(arrival).await;
            let permit = match &slots {
                Some(slots) => Some(Arc::clone(slots).acquire_owned().await?),
                None => None,
            };
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            let phase = self.clone();
            requests.spawn(async move {
                let spec = phase.workload.request(phase.first_index + i);
                let record = phase.target.send(&spec, phase.epoch).await;
                drop(permit);
                record
            });
            i += 1;
            arrival += Duration::from_secs_f64(gaps.exponential(rate));
        }
        let mut records = Vec::with_capacity(requests.len());
        while let Some(done) = requests.join_next().await {
            records.push(done.context("a benchmark request panicked")?);
        }
        Ok(records)
    }
}
