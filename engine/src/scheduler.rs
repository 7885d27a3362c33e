//! The continuous-batching scheduler: one task owns the queues, the running
//! batch and the KV-block pool; callers send commands over a bounded channel.
//!
//! Each loop turn admits waiting decodes while blocks and batch slots are
//! free, runs one prefill step (prompt chunks up to the token budget) if any
//! prompt waits, then one decode step that advances every running request by
//! one token. Steps run on a [`Backend`] (the sim's modelled times, or the
//! CPU model's measured ones, on a blocking thread); the scheduler's clock
//! is the sum of its steps. It owns each request's KV cache between steps.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::backend::{Backend, DecodeSeq, KvCache, PrefillChunk, Prompt};
use crate::blocks::BlockPool;
use crate::config::Budgets;
use crate::error::{Error, Result};
use crate::metrics::EngineMetrics;
use crate::sim::Pacer;

/// Commands buffered towards the scheduler before senders wait.
const COMMAND_CAPACITY: usize = 1024;
/// Completed requests / steps averaged into the reported TTFT, TPOT and rate.
const WINDOW: usize = 64;

/// Why a request's generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Reached `max_tokens`.
    Length,
    /// Cancelled (drain timeout).
    Cancelled,
}

/// One generated token (or the end of a cancelled request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenEvent {
    /// Output position (0 is the prefill's first token).
    pub index: u32,
    /// Token id; absent on a cancellation notice.
    pub token: Option<u32>,
    /// Set on the request's last event.
    pub finish: Option<Finish>,
}

/// A finished prefill.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefillDone {
    /// First generated token.
    pub first_token: u32,
    /// Modelled time from arrival to the end of its last prefill step.
    pub ttft_seconds: f64,
    /// The prompt's KV cache.
    pub kv: KvCache,
}

/// A worker's load, in modelled time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    /// Prompts waiting for prefill plus decodes waiting for KV blocks.
    pub queue_depth: u32,
    /// Requests in the running decode batch.
    pub running: u32,
    /// KV blocks in use.
    pub kv_blocks_used: u64,
    /// KV blocks in total.
    pub kv_blocks_total: u64,
    /// Mean TTFT of recent prefills (seconds).
    pub ttft_seconds: f64,
    /// Mean TPOT of recent decodes (seconds).
    pub tpot_seconds: f64,
    /// Prompt tokens per second over recent prefill steps.
    pub prefill_tokens_per_second: f64,
    /// What this worker accepted since it started (counters).
    pub totals: Totals,
}

/// Counters of accepted work since the scheduler started: a reader that
/// differences two reports gets arrival rates and mean lengths.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub prefills: u64,
    pub prompt_tokens: u64,
    pub decodes: u64,
    pub requested_output_tokens: u64,
}

/// A decode to schedule once its KV has arrived.
#[derive(Debug)]
pub struct DecodeJob {
    /// Request id (seeds the synthetic tokens).
    pub request_id: String,
    /// Prompt tokens the pulled KV covers.
    pub prompt_len: u32,
    /// Output tokens in total, counting the prefill's first token (at least 2).
    pub max_tokens: u32,
    /// The prefill's first token (the first decode step's input).
    pub first_token: u32,
    /// The prompt's KV cache (pulled, or kept from a local prefill).
    pub kv: KvCache,
}

enum Command {
    Prefill {
        request_id: String,
        prompt: Prompt,
        reply: oneshot::Sender<Result<PrefillDone>>,
    },
    Decode {
        job: DecodeJob,
        events: mpsc::Sender<TokenEvent>,
        admitted: oneshot::Sender<Result<()>>,
    },
    Load(oneshot::Sender<Load>),
    CancelAll,
}

/// A cheap, cloneable handle to the scheduler task; the task ends when every
/// handle is dropped and its work is done.
#[derive(Debug, Clone)]
pub struct Scheduler {
    tx: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Prefill { .. } => "Prefill",
            Command::Decode { .. } => "Decode",
            Command::Load(_) => "Load",
            Command::CancelAll => "CancelAll",
        })
    }
}

impl Scheduler {
    /// Spawns the scheduler task on the current runtime.
    pub fn spawn(backend: Arc<dyn Backend>, budgets: Budgets, metrics: EngineMetrics) -> Self {
        let (tx, rx) = mpsc::channel(COMMAND_CAPACITY);
        let state = State {
            backend,
            pool: BlockPool::new(budgets.kv_blocks, budgets.block_tokens),
            budgets,
            metrics,
            clock: 0.0,
            pacer: Pacer::default(),
            prefills: VecDeque::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            ttft: VecDeque::new(),
            tpot: VecDeque::new(),
            prefill_steps: VecDeque::new(),
            totals: Totals::default(),
        };
        tokio::spawn(state.run(rx));
        Self { tx }
    }

    async fn send(&self, cmd: Command) -> Result<()> {
        self.tx.send(cmd).await.map_err(|_| Error::SchedulerStopped)
    }

    /// Queues a prompt and waits for its prefill to finish.
    pub async fn prefill(&self, request_id: String, prompt: Prompt) -> Result<PrefillDone> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Prefill {
            request_id,
            prompt,
            reply,
        })
        .await?;
        rx.await.map_err(|_| Error::SchedulerStopped)?
    }

    /// Queues a decode; tokens 1.. arrive on the returned channel. Refused at
    /// once when it can never fit the KV pool or the wait queue is full.
    pub async fn decode(&self, job: DecodeJob) -> Result<mpsc::Receiver<TokenEvent>> {
        // One slot per token the scheduler sends, so it never waits on a reader.
        let (events, rx) = mpsc::channel(job.max_tokens.max(1) as usize);
        let (admitted, ok) = oneshot::channel();
        self.send(Command::Decode {
            job,
            events,
            admitted,
        })
        .await?;
        ok.await.map_err(|_| Error::SchedulerStopped)??;
        Ok(rx)
    }

    /// The current load.
    pub async fn load(&self) -> Result<Load> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Load(reply)).await?;
        rx.await.map_err(|_| Error::SchedulerStopped)
    }

    /// Cancels every queued and running request (drain timeout).
    pub async fn cancel_all(&self) -> Result<()> {
        self.send(Command::CancelAll).await
    }
}

#[derive(Debug)]
struct PendingPrefill {
    request_id: String,
    prompt: Prompt,
    prompt_len: u32,
    kv: KvCache,
    done: u32,
    arrival: f64,
    reply: oneshot::Sender<Result<PrefillDone>>,
}

#[derive(Debug)]
struct Running {
    job: DecodeJob,
    events: mpsc::Sender<TokenEvent>,
    blocks: u64,
    /// Output tokens so far, counting the prefill's first token.
    generated: u32,
    /// The latest output token (the next step's input).
    last_token: u32,
    started: f64,
}

#[derive(Debug)]
struct State {
    backend: Arc<dyn Backend>,
    pool: BlockPool,
    budgets: Budgets,
    metrics: EngineMetrics,
    /// Modelled seconds: the sum of every step this worker ran.
    clock: f64,
    /// Keeps busy runs of steps on their modelled wall schedule.
    pacer: Pacer,
    prefills: VecDeque<PendingPrefill>,
    waiting: VecDeque<(DecodeJob, mpsc::Sender<TokenEvent>)>,
    running: Vec<Running>,
    ttft: VecDeque<f64>,
    tpot: VecDeque<f64>,
    prefill_steps: VecDeque<(u32, f64)>,
    totals: Totals,
}

fn push_window<T>(w: &mut VecDeque<T>, v: T) {
    if w.len() == WINDOW {
        w.pop_front();
    }
    w.push_back(v);
}

fn mean(w: &VecDeque<f64>) -> f64 {
    if w.is_empty() {
        0.0
    } else {
        w.iter().sum::<f64>() / w.len() as f64
    }
}

impl State {
    fn idle(&self) -> bool {
        self.prefills.is_empty() && self.waiting.is_empty() && self.running.is_empty()
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            if self.idle() {
                self.pacer.idle();
                match rx.recv().await {
                    Some(cmd) => self.handle(cmd),
                    None => return,
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                self.handle(cmd);
            }
            self.admit();
            self.publish();
            if !self.prefills.is_empty() {
                self.prefill_step().await;
            }
            if !self.running.is_empty() {
                self.decode_step().await;
            }
            self.publish();
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Prefill {
                request_id,
                prompt,
                reply,
            } => {
                if prompt.is_empty() {
                    let _ = reply.send(Err(Error::InvalidRequest("empty prompt".into())));
                    return;
                }
                if self.backend.needs_tokens() && matches!(prompt, Prompt::Length(_)) {
                    let _ = reply.send(Err(Error::InvalidRequest(
                        "this backend computes real tokens: give the prompt's token ids".into(),
                    )));
                    return;
                }
                // Bounded like the decode queue: a worker that cannot keep
                // up says so (retryable elsewhere) instead of queueing
                // without limit.
                if self.prefills.len() >= self.budgets.max_waiting {
                    let _ = reply.send(Err(Error::Capacity(format!(
                        "prefill queue is full ({} prompts waiting)",
                        self.prefills.len()
                    ))));
                    return;
                }
                self.totals.prefills += 1;
                self.totals.prompt_tokens += u64::from(prompt.len());
                self.prefills.push_back(PendingPrefill {
                    request_id,
                    prompt_len: prompt.len(),
                    prompt,
                    kv: KvCache::default(),
                    done: 0,
                    arrival: self.clock,
                    reply,
                })
            }
            Command::Decode {
                job,
                events,
                admitted,
            } => {
                let need = self
                    .pool
                    .blocks_for(u64::from(job.prompt_len) + u64::from(job.max_tokens));
                let verdict = if need > self.pool.total() {
                    Err(Error::Capacity(format!(
                        "needs {need} KV blocks; the worker has {}",
                        self.pool.total()
                    )))
                } else if self.waiting.len() >= self.budgets.max_waiting {
                    Err(Error::Capacity("decode wait queue is full".into()))
                } else {
                    self.totals.decodes += 1;
                    self.totals.requested_output_tokens += u64::from(job.max_tokens);
                    self.waiting.push_back((job, events));
                    Ok(())
                };
                // A caller that went away simply never learns the verdict.
                let _ = admitted.send(verdict);
            }
            Command::Load(reply) => {
                // Admit first so the answer never shows a startable request
                // as waiting merely because the loop has not turned yet.
                self.admit();
                let _ = reply.send(self.load());
            }
            Command::CancelAll => self.cancel_all(),
        }
    }

    /// Moves waiting decodes into the batch, in order, while blocks and
    /// batch slots are free (no overtaking, so large requests do not starve).
    fn admit(&mut self) {
        while self.running.len() < self.budgets.max_batch as usize {
            let Some((job, _)) = self.waiting.front() else {
                break;
            };
            let need = self
                .pool
                .blocks_for(u64::from(job.prompt_len) + u64::from(job.max_tokens));
            if !self.pool.try_allocate(need) {
                break;
            }
            let Some((job, events)) = self.waiting.pop_front() else {
                break;
            };
            self.running.push(Running {
                last_token: job.first_token,
                job,
                events,
                blocks: need,
                generated: 1,
                started: self.clock,
            });
        }
    }

    /// Runs `f` on the backend: inline, or on a blocking thread when its
    /// steps compute for real (the actor's task must not stall the runtime).
    async fn compute<T: Send + 'static>(
        &self,
        mut work: Vec<T>,
        f: fn(&dyn Backend, &mut [T]) -> Result<f64>,
    ) -> (Vec<T>, Result<f64>) {
        if !self.backend.blocking() {
            let r = f(self.backend.as_ref(), &mut work);
            return (work, r);
        }
        let backend = Arc::clone(&self.backend);
        let run = tokio::task::spawn_blocking(move || {
            let r = f(backend.as_ref(), &mut work);
            (work, r)
        });
        match run.await {
            Ok(done) => done,
            Err(e) => (
                Vec::new(),
                Err(Error::Config(format!("backend step failed: {e}"))),
            ),
        }
    }

    async fn prefill_step(&mut self) {
        let mut budget = self.budgets.prefill_token_budget;
        let mut chunks = Vec::new();
        for p in &mut self.prefills {
            if budget == 0 {
                break;
            }
            let take = (p.prompt_len - p.done).min(budget);
            budget -= take;
            chunks.push(PrefillChunk {
                request_id: p.request_id.clone(),
                tokens: match &p.prompt {
                    Prompt::Tokens(t) => {
                        Some(t[p.done as usize..(p.done + take) as usize].to_vec())
                    }
                    Prompt::Length(_) => None,
                },
                start: p.done,
                len: take,
                prompt_len: p.prompt_len,
                kv: std::mem::take(&mut p.kv),
                first_token: None,
            });
        }
        let (chunks, result) = self.compute(chunks, |b, c| b.prefill(c)).await;
        let seconds = match result {
            Ok(s) => s,
            Err(e) => {
                // The step's prompts cannot go on: fail them, keep the rest.
                tracing::warn!(error = %e, "prefill step failed");
                let n = chunks.len().max(1).min(self.prefills.len());
                for p in self.prefills.drain(..n) {
                    let _ = p.reply.send(Err(Error::Config(e.to_string())));
                }
                return;
            }
        };
        self.pacer.step(self.backend.wall(seconds)).await;
        self.clock += seconds;
        let tokens: u32 = chunks.iter().map(|c| c.len).sum();
        push_window(&mut self.prefill_steps, (tokens, seconds));
        let mut firsts = Vec::with_capacity(chunks.len());
        for (p, c) in self.prefills.iter_mut().zip(chunks) {
            p.done += c.len;
            p.kv = c.kv;
            firsts.push(c.first_token);
        }
        let mut i = 0;
        while self
            .prefills
            .front()
            .is_some_and(|p| p.done >= p.prompt_len)
        {
            let Some(p) = self.prefills.pop_front() else {
                break;
            };
            let first = firsts.get(i).copied().flatten();
            i += 1;
            let ttft = self.clock - p.arrival;
            push_window(&mut self.ttft, ttft);
            let _ = p.reply.send(match first {
                Some(first_token) => Ok(PrefillDone {
                    first_token,
                    ttft_seconds: ttft,
                    kv: p.kv,
                }),
                None => Err(Error::Config("the backend gave no first token".into())),
            });
        }
    }

    async fn decode_step(&mut self) {
        let seqs: Vec<DecodeSeq> = self
            .running
            .iter_mut()
            .map(|r| DecodeSeq {
                request_id: r.job.request_id.clone(),
                index: r.generated,
                context: r.job.prompt_len + r.generated,
                input: r.last_token,
                kv: std::mem::take(&mut r.job.kv),
                output: 0,
            })
            .collect();
        let (seqs, result) = self.compute(seqs, |b, s| b.decode(s)).await;
        let seconds = match result {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "decode step failed; cancelling the batch");
                for r in self.running.drain(..) {
                    self.pool.release(r.blocks);
                    let _ = r.events.try_send(TokenEvent {
                        index: r.generated,
                        token: None,
                        finish: Some(Finish::Cancelled),
                    });
                }
                return;
            }
        };
        self.pacer.step(self.backend.wall(seconds)).await;
        self.clock += seconds;
        for (r, s) in self.running.iter_mut().zip(seqs) {
            r.job.kv = s.kv;
            r.last_token = s.output;
        }
        let mut i = 0;
        while i < self.running.len() {
            let r = &mut self.running[i];
            let index = r.generated;
            r.generated += 1;
            let done = r.generated >= r.job.max_tokens;
            let event = TokenEvent {
                index,
                token: Some(r.last_token),
                finish: done.then_some(Finish::Length),
            };
            // The channel has a slot per token, so only a gone reader fails.
            let gone = r.events.try_send(event).is_err();
            if done || gone {
                let r = self.running.swap_remove(i);
                self.pool.release(r.blocks);
                if done {
                    let steps = f64::from(r.job.max_tokens - 1);
                    push_window(&mut self.tpot, (self.clock - r.started) / steps);
                }
            } else {
                i += 1;
            }
        }
    }

    fn cancel_all(&mut self) {
        for p in self.prefills.drain(..) {
            let _ = p.reply.send(Err(Error::Draining));
        }
        for (job, events) in self.waiting.drain(..) {
            let _ = events.try_send(TokenEvent {
                index: 1,
                token: None,
                finish: Some(Finish::Cancelled),
            });
            drop(job);
        }
        for r in self.running.drain(..) {
            self.pool.release(r.blocks);
            let _ = r.events.try_send(TokenEvent {
                index: r.generated,
                token: None,
                finish: Some(Finish::Cancelled),
            });
        }
    }

    fn load(&self) -> Load {
        let (tokens, secs) = self
            .prefill_steps
            .iter()
            .fold((0.0, 0.0), |(t, s), &(tk, sc)| (t + f64::from(tk), s + sc));
        Load {
            queue_depth: (self.prefills.len() + self.waiting.len()) as u32,
            running: self.running.len() as u32,
            kv_blocks_used: self.pool.used(),
            kv_blocks_total: self.pool.total(),
            ttft_seconds: mean(&self.ttft),
            tpot_seconds: mean(&self.tpot),
            prefill_tokens_per_second: if secs > 0.0 { tokens / secs } else { 0.0 },
            totals: self.totals,
        }
    }

    fn publish(&self) {
        let m = &self.metrics;
        m.waiting
            .set((self.prefills.len() + self.waiting.len()) as i64);
        m.running.set(self.running.len() as i64);
        let total = self.pool.total();
        m.kv_usage.set(if total == 0 {
            0.0
        } else {
            self.pool.used() as f64 / total as f64
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimBackend;
    use perfmodel::{Calibration, ModelProfile, Parallelism, Sku};

    fn scheduler(kv_blocks: u64) -> (Scheduler, Arc<SimBackend>) {
        scheduler_at(kv_blocks, 1000.0)
    }

    /// A scheduler whose steps take their modelled time / `time_scale`.
    fn scheduler_at(kv_blocks: u64, time_scale: f64) -> (Scheduler, Arc<SimBackend>) {
        let model = ModelProfile::builtin("deepseek-v4-pro").expect("model");
        let sim = Arc::new(SimBackend::new(
            model,
            Sku::Gb200,
            Parallelism::Ep(8),
            Calibration::fitted(),
            time_scale,
        ));
        let budgets = Budgets {
            max_batch: 8,
            kv_blocks,
            block_tokens: 64,
            prefill_token_budget: 4096,
            max_waiting: 4,
        };
        let metrics = EngineMetrics::unregistered().expect("metrics");
        (
            Scheduler::spawn(Arc::clone(&sim) as Arc<dyn Backend>, budgets, metrics),
            sim,
        )
    }

    fn job(id: &str, prompt_len: u32, max_tokens: u32) -> DecodeJob {
        DecodeJob {
            request_id: id.into(),
            prompt_len,
            max_tokens,
            first_token: 0,
            kv: KvCache::default(),
        }
    }

    async fn drain(mut rx: mpsc::Receiver<TokenEvent>) -> Vec<TokenEvent> {
        let mut out = Vec::new();
        while let Some(e) = rx.recv().await {
            out.push(e);
        }
        out
    }

    #[tokio::test]
    async fn decode_emits_tokens_and_releases_blocks() {
        let (s, sim) = scheduler(100);
        let rx = s.decode(job("a", 100, 5)).await.expect("admitted");
        let events = drain(rx).await;
        assert_eq!(events.len(), 4);
        assert_eq!(events[3].finish, Some(Finish::Length));
        assert_eq!(events[0].token, Some(sim.token("a", 1)));
        let load = s.load().await.expect("load");
        assert_eq!(load.kv_blocks_used, 0);
        assert!(load.tpot_seconds > 0.0);
    }

    #[tokio::test]
    async fn refuses_what_can_never_fit_and_queues_what_cannot_fit_now() {
        // 4 blocks of 64 tokens: a 200+50 token request takes all four.
        // In real time (a step of some 17 ms), `a`'s 49 steps outlast the
        // load query by far even on a busy machine.
        let (s, _) = scheduler_at(4, 1.0);
        let err = s.decode(job("big", 300, 10)).await.expect_err("refused");
        assert_eq!(err.category(), "capacity");
        let a = s.decode(job("a", 200, 50)).await.expect("a");
        let b = s.decode(job("b", 200, 50)).await.expect("b");
        let load = s.load().await.expect("load");
        assert_eq!((load.running, load.queue_depth), (1, 1));
        assert_eq!(load.kv_blocks_used, 4);
        assert_eq!(drain(a).await.len(), 49);
        assert_eq!(drain(b).await.len(), 49);
        assert_eq!(s.load().await.expect("load").kv_blocks_used, 0);
    }

    #[tokio::test]
    async fn a_full_prefill_queue_refuses_more_and_counts_only_what_it_took() {
        // A tenth of real time: a 4096-token prefill step takes over a
        // second, so every prompt sent at once arrives while the first is
        // still in its step (a prompt stays queued until its step ends).
        let (s, _) = scheduler_at(100, 0.1);
        let sends: Vec<_> = (0..6)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move { s.prefill(format!("p{i}"), Prompt::Length(4096)).await })
            })
            .collect();
        let mut refused = 0;
        for send in sends {
            match send.await.expect("task") {
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.category(), "capacity", "{e}");
                    refused += 1;
                }
            }
        }
        // Four fit (max_waiting), two are refused.
        assert_eq!(refused, 2);
        let totals = s.load().await.expect("load").totals;
        assert_eq!((totals.prefills, totals.prompt_tokens), (4, 4 * 4096));
    }

    #[tokio::test]
    async fn prefill_reports_ttft_of_its_step() {
        let (s, sim) = scheduler(10);
        let done = s
            .prefill("p".into(), Prompt::Length(1000))
            .await
            .expect("prefill");
        let expected = sim.prefill_step_seconds(&[(1000, 1000)]);
        assert!((done.ttft_seconds - expected).abs() < 1e-9);
        assert_eq!(done.first_token, sim.token("p", 0));
        assert!(s.load().await.expect("load").prefill_tokens_per_second > 0.0);
    }
}
