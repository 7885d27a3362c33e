//! Aggregated mode: [`LocalGenerator`] runs requests on this worker's own
//! scheduler, prefill then decode in place (no KV transfer), for a worker
//! of role `both` serving the OpenAI API on its own port.
//!
//! A request is admitted by the worker ([`Admission`]: draining or the
//! wrong role is 503; the guard it returns keeps the request in flight for
//! Drain), refused with 400 when prompt plus output can never fit the KV
//! pool, refused with 429 when `max_queue` requests already wait (queued
//! from admission until their first decode token), then prefilled (the
//! first token) and decoded. Dropping the stream drops the decode's token
//! channel, and the scheduler frees the slot and its KV blocks on its next
//! step; a prefill already queued runs to its end and its result is
//! dropped.
//!
//! The simulated tokens are a function of the scheduler request id: the
//! request's `seed` when it gives one (so equal seeds give equal outputs),
//! else its id.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use futures::StreamExt;
use tokio::sync::mpsc;

use super::Limits;
use crate::backend::{KvCache, Prompt};
use crate::config::Budgets;
use crate::error::Error;
use crate::generate::{
    FinishReason, GenerateError, GenerateEvent, GenerateFuture, GenerateRequest, Generator,
    ModelCard,
};
use crate::scheduler::{DecodeJob, Finish, Scheduler, TokenEvent};

/// Who serves the models of a local worker.
pub const OWNED_BY: &str = "rackscale";

/// Held by a generation until its stream is dropped.
pub type AdmissionGuard = Box<dyn Any + Send>;

/// The worker's say on new requests.
pub trait Admission: Send + Sync + 'static {
    /// A guard to hold while the request runs, or why it cannot (503:
    /// `Unavailable`).
    fn admit(&self) -> Result<AdmissionGuard, GenerateError>;
    /// Whether requests would be admitted now.
    fn ready(&self) -> bool;
}

/// Admits everything (a worker with nothing to drain; tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct AlwaysAdmit;

impl Admission for AlwaysAdmit {
    fn admit(&self) -> Result<AdmissionGuard, GenerateError> {
        Ok(Box::new(()))
    }
    fn ready(&self) -> bool {
        true
    }
}

/// A [`Generator`] over one worker's scheduler.
pub struct LocalGenerator {
    scheduler: Scheduler,
    budgets: Budgets,
    model: ModelCard,
    admission: Arc<dyn Admission>,
    max_queue: u32,
    retry_after_s: u32,
    queued: Arc<AtomicU32>,
}

impl std::fmt::Debug for LocalGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalGenerator")
            .field("model", &self.model.id)
            .field("max_queue", &self.max_queue)
            .field("queued", &self.queued.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl LocalGenerator {
    /// Serves `model` on `scheduler` (whose KV pool `budgets` describes),
    /// queueing at most `limits.max_queue` requests; admits everything until
    /// [`Self::with_admission`] says otherwise.
    pub fn new(
        scheduler: Scheduler,
        budgets: Budgets,
        model: impl Into<String>,
        limits: &Limits,
    ) -> Self {
        Self {
            scheduler,
            budgets,
            model: ModelCard {
                id: model.into(),
                owned_by: OWNED_BY.into(),
            },
            admission: Arc::new(AlwaysAdmit),
            max_queue: limits.max_queue,
            retry_after_s: limits.retry_after_s,
            queued: Arc::new(AtomicU32::new(0)),
        }
    }

    /// Lets `admission` admit requests (the engine: role and draining).
    pub fn with_admission(mut self, admission: Arc<dyn Admission>) -> Self {
        self.admission = admission;
        self
    }

    /// Requests admitted and not yet decoding.
    pub fn queued(&self) -> u32 {
        self.queued.load(Ordering::Relaxed)
    }

    fn check(&self, request: &GenerateRequest) -> Result<(), GenerateError> {
        if request.model != self.model.id {
            return Err(GenerateError::UnknownModel(request.model.clone()));
        }
        if request.prompt.is_empty() || request.max_tokens == 0 {
            return Err(GenerateError::Invalid(
                "the prompt and max_tokens must be at least one token".into(),
            ));
        }
        let tokens = request.prompt.len() as u64 + u64::from(request.max_tokens);
        let need = tokens.div_ceil(u64::from(self.budgets.block_tokens.max(1)));
        if need > self.budgets.kv_blocks {
            return Err(GenerateError::Invalid(format!(
                "prompt plus max_tokens is {tokens} tokens; this worker's KV cache holds {}",
                self.budgets.kv_blocks * u64::from(self.budgets.block_tokens)
            )));
        }
        Ok(())
    }
}

/// One of the `max_queue` places; given back on drop.
#[derive(Debug)]
struct QueueSlot(Arc<AtomicU32>);

impl QueueSlot {
    fn take(queued: &Arc<AtomicU32>, max: u32) -> Option<Self> {
        queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(Arc::clone(queued)))
    }
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a scheduler error means to a client.
fn to_generate_error(e: Error, retry_after_s: u32) -> GenerateError {
    match e {
        Error::Draining | Error::SchedulerStopped => GenerateError::Unavailable(e.to_string()),
        Error::Capacity(reason) => GenerateError::Overloaded {
            reason,
            retry_after_s,
        },
        Error::InvalidRequest(m) => GenerateError::Invalid(m),
        other => GenerateError::Failed(other.to_string()),
    }
}

enum Phase {
    Prefill,
    StartDecode,
    Decode(mpsc::Receiver<TokenEvent>),
    Finish,
    Done,
}

/// One generation's state between events.
struct Run {
    scheduler: Scheduler,
    /// The scheduler's request id (seeds the synthetic tokens).
    sched_id: String,
    /// The prompt, until its prefill is queued.
    prompt: Option<Vec<u32>>,
    prompt_len: u32,
    /// The prefill's first token and cache, until the decode is queued.
    prefilled: Option<(u32, KvCache)>,
    max_tokens: u32,
    emitted: u32,
    retry_after_s: u32,
    phase: Phase,
    queued: Option<QueueSlot>,
    _admitted: AdmissionGuard,
}

type Item = Result<GenerateEvent, GenerateError>;

impl Run {
    fn fail(&mut self, e: GenerateError) -> Option<Item> {
        self.phase = Phase::Done;
        Some(Err(e))
    }

    async fn next(&mut self) -> Option<Item> {
        loop {
            match std::mem::replace(&mut self.phase, Phase::Done) {
                Phase::Done => return None,
                Phase::Prefill => {
                    let prompt = Prompt::Tokens(self.prompt.take().unwrap_or_default());
                    let done = self.scheduler.prefill(self.sched_id.clone(), prompt).await;
                    match done {
                        Ok(done) => {
                            self.emitted = 1;
                            self.prefilled = Some((done.first_token, done.kv));
                            self.phase = if self.max_tokens == 1 {
                                Phase::Finish
                            } else {
                                Phase::StartDecode
                            };
                            return Some(Ok(GenerateEvent::Tokens(vec![done.first_token])));
                        }
                        Err(e) => return self.fail(to_generate_error(e, self.retry_after_s)),
                    }
                }
                Phase::StartDecode => {
                    let (first_token, kv) = self.prefilled.take().unwrap_or_default();
                    let job = DecodeJob {
                        request_id: self.sched_id.clone(),
                        prompt_len: self.prompt_len,
                        max_tokens: self.max_tokens,
                        first_token,
                        kv,
                    };
                    match self.scheduler.decode(job).await {
                        Ok(rx) => self.phase = Phase::Decode(rx),
                        Err(e) => return self.fail(to_generate_error(e, self.retry_after_s)),
                    }
                }
                Phase::Decode(mut rx) => {
                    let Some(event) = rx.recv().await else {
                        return self.fail(GenerateError::Failed(
                            "the scheduler stopped mid-generation".into(),
                        ));
                    };
                    self.queued = None;
                    match (event.token, event.finish) {
                        (_, Some(Finish::Cancelled)) => {
                            return self.fail(GenerateError::Unavailable(
                                "cancelled: the worker is draining".into(),
                            ));
                        }
                        (Some(token), finish) => {
                            self.emitted += 1;
                            self.phase = if finish.is_some() {
                                Phase::Finish
                            } else {
                                Phase::Decode(rx)
                            };
                            return Some(Ok(GenerateEvent::Tokens(vec![token])));
                        }
                        (None, _) => self.phase = Phase::Decode(rx),
                    }
                }
                Phase::Finish => {
                    self.queued = None;
                    return Some(Ok(GenerateEvent::Finished {
                        reason: FinishReason::Length,
                        prompt_tokens: self.prompt_len,
                        completion_tokens: self.emitted,
                    }));
                }
            }
        }
    }
}

impl Generator for LocalGenerator {
    fn generate(&self, request: GenerateRequest) -> GenerateFuture<'_> {
        Box::pin(async move {
            self.check(&request)?;
            let admitted = self.admission.admit()?;
            let queued = QueueSlot::take(&self.queued, self.max_queue).ok_or_else(|| {
                GenerateError::Overloaded {
                    reason: format!("{} requests are queued on this worker", self.max_queue),
                    retry_after_s: self.retry_after_s,
                }
            })?;
            let sched_id = match request.sampling.seed {
                Some(seed) => format!("seed-{seed}"),
                None => request.request_id,
            };
            let run = Run {
                scheduler: self.scheduler.clone(),
                sched_id,
                prompt_len: u32::try_from(request.prompt.len()).unwrap_or(u32::MAX),
                prompt: Some(request.prompt),
                prefilled: None,
                max_tokens: request.max_tokens,
                emitted: 0,
                retry_after_s: self.retry_after_s,
                phase: Phase::Prefill,
                queued: Some(queued),
                _admitted: admitted,
            };
            let stream = futures::stream::unfold(run, |mut run| async move {
                let item = run.next().await?;
                Some((item, run))
            });
            Ok(stream.boxed())
        })
    }

    fn models(&self) -> Vec<ModelCard> {
        vec![self.model.clone()]
    }

    fn ready(&self) -> bool {
        self.admission.ready()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use perfmodel::{Calibration, ModelProfile, Parallelism, Sku};

    use super::*;
    use crate::generate::Sampling;
    use crate::metrics::EngineMetrics;
    use crate::sim::SimBackend;

    fn generator(max_queue: u32) -> (LocalGenerator, Scheduler, Arc<SimBackend>) {
        let model = ModelProfile::builtin("deepseek-v4-pro").expect("model");
        let sim = Arc::new(SimBackend::new(
            model,
            Sku::Gb200,
            Parallelism::Ep(8),
            Calibration::fitted(),
            10_000.0,
        ));
        let budgets = Budgets {
            max_batch: 8,
            kv_blocks: 100,
            block_tokens: 64,
            prefill_token_budget: 4096,
            max_waiting: 16,
        };
        let metrics = EngineMetrics::unregistered().expect("metrics");
        let scheduler = Scheduler::spawn(
            Arc::clone(&sim) as Arc<dyn crate::backend::Backend>,
            budgets,
            metrics,
        );
        let limits = Limits {
            max_queue,
            retry_after_s: 3,
            ..Limits::default()
        };
        let g = LocalGenerator::new(scheduler.clone(), budgets, "m", &limits);
        (g, scheduler, sim)
    }

    fn request(id: &str, prompt: usize, max_tokens: u32) -> GenerateRequest {
        GenerateRequest {
            request_id: id.into(),
            model: "m".into(),
            prompt: vec![7; prompt],
            max_tokens,
            sampling: Sampling::default(),
        }
    }

    async fn run(g: &LocalGenerator, r: GenerateRequest) -> Vec<Item> {
        g.generate(r).await.expect("started").collect().await
    }

    #[tokio::test]
    async fn generates_max_tokens_of_the_sim_then_finishes() {
        let (g, _, sim) = generator(8);
        let events = run(&g, request("r", 100, 5)).await;
        let tokens: Vec<u32> = events
            .iter()
            .filter_map(|e| match e {
                Ok(GenerateEvent::Tokens(t)) => Some(t[0]),
                _ => None,
            })
            .collect();
        assert_eq!(
            tokens,
            (0..5).map(|i| sim.token("r", i)).collect::<Vec<_>>()
        );
        assert_eq!(
            events.last(),
            Some(&Ok(GenerateEvent::Finished {
                reason: FinishReason::Length,
                prompt_tokens: 100,
                completion_tokens: 5,
            }))
        );
        let one = run(&g, request("one", 10, 1)).await;
        assert_eq!(one.len(), 2, "{one:?}");
        assert_eq!(g.queued(), 0);
    }

    #[tokio::test]
    async fn equal_seeds_give_equal_tokens() {
        let (g, _, _) = generator(8);
        let seeded = |id: &str| GenerateRequest {
            sampling: Sampling {
                seed: Some(42),
                ..Sampling::default()
            },
            ..request(id, 10, 4)
        };
        assert_eq!(run(&g, seeded("a")).await, run(&g, seeded("b")).await);
        assert_ne!(
            run(&g, request("a", 10, 4)).await,
            run(&g, request("b", 10, 4)).await
        );
    }

    #[tokio::test]
    async fn refuses_unknown_models_overflowing_kv_and_a_full_queue() {
        let (g, _, _) = generator(1);
        let err = |r: Result<_, GenerateError>| r.err().expect("refused");
        let unknown = GenerateRequest {
            model: "x".into(),
            ..request("u", 1, 1)
        };
        assert!(matches!(
            err(g.generate(unknown).await),
            GenerateError::UnknownModel(_)
        ));
        // 100 blocks of 64 tokens.
        assert!(matches!(
            err(g.generate(request("big", 6000, 401)).await),
            GenerateError::Invalid(_)
        ));
        let first = g.generate(request("q1", 10, 3)).await.expect("queued");
        assert_eq!(
            err(g.generate(request("q2", 10, 3)).await),
            GenerateError::Overloaded {
                reason: "1 requests are queued on this worker".into(),
                retry_after_s: 3,
            }
        );
        drop(first);
        assert_eq!(g.queued(), 0);
        assert_eq!(run(&g, request("q3", 10, 3)).await.len(), 4);
    }

    #[derive(Debug, Default)]
    struct Gate {
        closed: AtomicBool,
    }

    impl Admission for Gate {
        fn admit(&self) -> Result<AdmissionGuard, GenerateError> {
            if self.closed.load(Ordering::Relaxed) {
                Err(GenerateError::Unavailable("draining".into()))
            } else {
                Ok(Box::new(()))
            }
        }
        fn ready(&self) -> bool {
            !self.closed.load(Ordering::Relaxed)
        }
    }

    #[tokio::test]
    async fn admission_decides_ready_and_unavailable() {
        let (g, _, _) = generator(8);
        let gate = Arc::new(Gate::default());
        let g = g.with_admission(Arc::clone(&gate) as Arc<dyn Admission>);
        assert!(g.ready());
        gate.closed.store(true, Ordering::Relaxed);
        assert!(!g.ready());
        let e = g
            .generate(request("d", 10, 2))
            .await
            .err()
            .expect("refused");
        assert_eq!(e, GenerateError::Unavailable("draining".into()));
    }

    #[tokio::test]
    async fn dropping_the_stream_frees_the_running_slot() {
        let (g, scheduler, _) = generator(8);
        let mut stream = g
            .generate(request("long", 10, 100_000 / 64))
            .await
            .expect("started");
        for _ in 0..3 {
            assert!(matches!(
                stream.next().await,
                Some(Ok(GenerateEvent::Tokens(_)))
            ));
        }
        assert_eq!(scheduler.load().await.expect("load").running, 1);
        drop(stream);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let load = scheduler.load().await.expect("load");
            if load.running == 0 && load.kv_blocks_used == 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "slot never freed: {load:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}
