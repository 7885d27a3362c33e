//! The supervisor of engine rank processes on this node.
//!
//! State (every rank ever launched and not yet replaced) sits in one
//! lock-protected map; each active rank also has one monitor task that owns
//! its `Child`, restarts it after a crash with exponential backoff (bounded
//! attempts, [`RestartPolicy`]) and stops it when asked. The invariant:
//! launch decisions ([`policy::check_launch`]) are made and the new entry
//! inserted under the same lock, so no GPU is ever given to two active ranks.
//! A rank keeps its GPUs while it waits to restart; they are released once it
//! has exited for good.

pub mod policy;
pub mod process;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

pub use policy::{Held, LaunchDecision, RestartPolicy};
pub use process::{EngineCommand, env};

use crate::events::{EventBus, EventKind};
use crate::gpu::GpuTable;
use crate::metrics::Metrics;
use crate::rank::{Phase, RankKey, RankSpec, RankStatus};
use crate::{Error, Result};

/// How long a stop may take beyond its grace period (the hard kill and reap).
const STOP_SLACK: Duration = Duration::from_secs(10);

/// What the supervisor needs besides its neighbours.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// The engine command line.
    pub engine: EngineCommand,
    /// Restart policy for crashed ranks.
    pub restart: RestartPolicy,
}

#[derive(Debug)]
struct Entry {
    spec: RankSpec,
    status: RankStatus,
    /// False once the rank has exited for good and released its GPUs.
    active: bool,
    stop: mpsc::Sender<Duration>,
    done: watch::Receiver<bool>,
}

#[derive(Debug, Default)]
struct State {
    ranks: BTreeMap<RankKey, Entry>,
    shutting_down: bool,
}

#[derive(Debug)]
struct Inner {
    config: SupervisorConfig,
    gpus: GpuTable,
    events: EventBus,
    metrics: Metrics,
    state: Mutex<State>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies `change` to the rank's status and returns the new status.
    fn update(&self, key: &RankKey, change: impl FnOnce(&mut Entry)) -> Option<RankStatus> {
        let mut state = self.lock();
        let entry = state.ranks.get_mut(key)?;
        change(entry);
        Some(entry.status.clone())
    }
}

/// Starts, watches, restarts and stops rank processes. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

impl Supervisor {
    /// A supervisor with no ranks.
    pub fn new(
        config: SupervisorConfig,
        gpus: GpuTable,
        events: EventBus,
        metrics: Metrics,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                gpus,
                events,
                metrics,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Launches `spec`, or returns the active rank of the same generation.
    pub fn launch(&self, spec: RankSpec) -> Result<RankStatus> {
        let gpus = self.inner.gpus.snapshot();
        let mut state = self.inner.lock();
        if state.shutting_down {
            return Err(Error::ShuttingDown);
        }
        let active: Vec<Held> = state
            .ranks
            .values()
            .filter(|e| e.active)
            .map(|e| Held {
                key: e.spec.key.clone(),
                generation: e.spec.generation,
                gpus: e.spec.gpus.clone(),
            })
            .collect();
        if policy::check_launch(&spec, &gpus, &active)? == LaunchDecision::AlreadyActive {
            // Same generation and GPUs, but another world: the worker was
            // re-placed around this rank, which must restart to rejoin.
            if let Some(e) = state.ranks.get(&spec.key)
                && e.spec.world_size != spec.world_size
            {
                return Err(Error::RankMoved {
                    rank: spec.key.to_string(),
                    gpus: e.spec.gpus.clone(),
                });
            }
            return state
                .ranks
                .get(&spec.key)
                .map(|e| e.status.clone())
                .ok_or_else(|| Error::RankNotFound(spec.key.to_string()));
        }
        let status = RankStatus {
            key: spec.key.clone(),
            generation: spec.generation,
            role: spec.role,
            phase: Phase::Starting,
            pid: 0,
            gpus: spec.gpus.clone(),
            world_size: spec.world_size,
            started_at: None,
            exit_code: None,
            restarts: 0,
            message: String::new(),
        };
        let (stop, stop_rx) = mpsc::channel(1);
        let (done_tx, done) = watch::channel(false);
        state.ranks.insert(
            spec.key.clone(),
            Entry {
                spec: spec.clone(),
                status: status.clone(),
                active: true,
                stop,
                done,
            },
        );
        drop(state);
        info!(rank = %spec.key, generation = spec.generation, gpus = ?spec.gpus, "launching rank");
        tokio::spawn(monitor(self.inner.clone(), spec, stop_rx, done_tx));
        Ok(status)
    }

    /// Stops the rank `key`, giving it `grace` after SIGTERM, and returns its
    /// final status once it has exited. A stop naming an older `generation`
    /// than the one running leaves the rank alone.
    pub async fn stop(
        &self,
        key: &RankKey,
        generation: u64,
        grace: Duration,
    ) -> Result<RankStatus> {
        let (stop, mut done, status) = {
            let state = self.inner.lock();
            let entry = state
                .ranks
                .get(key)
                .ok_or_else(|| Error::RankNotFound(key.to_string()))?;
            if !entry.active || entry.spec.generation > generation {
                return Ok(entry.status.clone());
            }
            (entry.stop.clone(), entry.done.clone(), entry.status.clone())
        };
        // A full channel means a stop is already under way: just wait for it.
        let _ = stop.try_send(grace);
        let deadline = grace + STOP_SLACK;
        match tokio::time::timeout(deadline, done.wait_for(|d| *d)).await {
            Ok(_) => Ok(self.get(key).unwrap_or(status)),
            Err(_) => Err(Error::StopTimeout(deadline)),
        }
    }

    /// The status of rank `key`, if known.
    pub fn get(&self, key: &RankKey) -> Option<RankStatus> {
        self.inner.lock().ranks.get(key).map(|e| e.status.clone())
    }

    /// Every known rank (active or remembered after exit), in key order.
    pub fn list(&self) -> Vec<RankStatus> {
        self.inner
            .lock()
            .ranks
            .values()
            .map(|e| e.status.clone())
            .collect()
    }

    /// Stops every rank with `grace` and refuses new launches.
    pub async fn shutdown(&self, grace: Duration) {
        let keys: Vec<(RankKey, u64)> = {
            let mut state = self.inner.lock();
            state.shutting_down = true;
            state
                .ranks
                .values()
                .filter(|e| e.active)
                .map(|e| (e.spec.key.clone(), e.spec.generation))
                .collect()
        };
        let stops = keys
            .iter()
            .map(|(key, generation)| self.stop(key, *generation, grace));
        for result in futures::future::join_all(stops).await {
            if let Err(err) = result {
                warn!(error = %err, "rank did not stop cleanly at shutdown");
            }
        }
    }
}

/// Why a monitor's wait ended.
enum Outcome {
    Exited(std::io::Result<std::process::ExitStatus>),
    Stop(Duration),
}

/// Owns one rank's process for its whole life, across restarts.
async fn monitor(
    inner: Arc<Inner>,
    spec: RankSpec,
    mut stop_rx: mpsc::Receiver<Duration>,
    done: watch::Sender<bool>,
) {
    let key = spec.key.clone();
    let generation = spec.generation;
    let mut restarts = 0u32;
    loop {
        let spawned = process::command(&inner.config.engine, &spec).spawn();
        let outcome = match spawned {
            Err(err) => {
                let reason = format!("spawn failed: {err}");
                warn!(rank = %key, error = %err, "could not spawn rank");
                inner.events.publish(EventKind::RankFailed {
                    key: key.clone(),
                    generation,
                    exit_code: None,
                    reason: reason.clone(),
                });
                inner.metrics.rank_exit("spawn_failed");
                inner.update(&key, |e| {
                    e.status.phase = Phase::Failed;
                    e.status.pid = 0;
                    e.status.message = reason;
                });
                None
            }
            Ok(mut child) => {
                let pid = child.id().unwrap_or(0);
                let started = inner.update(&key, |e| {
                    e.status.phase = Phase::Running;
                    e.status.pid = pid;
                    e.status.started_at = Some(SystemTime::now());
                    e.status.exit_code = None;
                    e.status.restarts = restarts;
                    e.status.message = String::new();
                });
                if let Some(status) = started {
                    inner.events.publish(EventKind::RankStarted(status));
                }
                inner.metrics.ranks_running.inc();
                info!(rank = %key, pid, "rank started");
                let outcome = tokio::select! {
                    status = child.wait() => Outcome::Exited(status),
                    grace = stop_rx.recv() => Outcome::Stop(grace.unwrap_or_default()),
                };
                let finished = match outcome {
                    Outcome::Stop(grace) => {
                        inner.update(&key, |e| e.status.phase = Phase::Stopping);
                        Finished::Stopped(process::stop(&mut child, pid, grace).await)
                    }
                    Outcome::Exited(status) => Finished::Exited(status),
                };
                inner.metrics.ranks_running.dec();
                Some(finished)
            }
        };
        match outcome {
            Some(Finished::Stopped(status)) => {
                let code = status.as_ref().map_or(-1, |s| process::code_or_signal(*s));
                finish(
                    &inner,
                    &key,
                    Phase::Exited,
                    status.ok().and_then(|s| s.code()),
                    "stopped".into(),
                );
                inner.events.publish(EventKind::RankExited {
                    key: key.clone(),
                    generation,
                    exit_code: code,
                    requested: true,
                });
                inner.metrics.rank_exit("stopped");
                break;
            }
            Some(Finished::Exited(Ok(status))) if status.success() => {
                finish(&inner, &key, Phase::Exited, Some(0), "exited".into());
                inner.events.publish(EventKind::RankExited {
                    key: key.clone(),
                    generation,
                    exit_code: 0,
                    requested: false,
                });
                inner.metrics.rank_exit("completed");
                break;
            }
            Some(Finished::Exited(status)) => {
                let reason = match &status {
                    Ok(s) => process::describe(*s),
                    Err(err) => format!("wait failed: {err}"),
                };
                let code = status.as_ref().ok().and_then(|s| s.code());
                warn!(rank = %key, %reason, "rank failed");
                inner.events.publish(EventKind::RankFailed {
                    key: key.clone(),
                    generation,
                    exit_code: code,
                    reason: reason.clone(),
                });
                inner.metrics.rank_exit(if code.is_some() {
                    "crashed"
                } else {
                    "signaled"
                });
                inner.update(&key, |e| {
                    e.status.phase = Phase::Failed;
                    e.status.pid = 0;
                    e.status.exit_code = code;
                    e.status.message = reason;
                });
            }
            None => {}
        }
        // Crashed or failed to spawn: restart after a backoff, unless told to stop.
        let Some(delay) = inner.config.restart.delay(restarts) else {
            let message = format!("gave up after {restarts} restarts");
            finish(&inner, &key, Phase::Failed, None, message);
            break;
        };
        inner.update(&key, |e| {
            e.status.message = format!("{}; restarting in {delay:?}", e.status.message);
        });
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop_rx.recv() => {
                finish(&inner, &key, Phase::Exited, None, "stopped while waiting to restart".into());
                inner.events.publish(EventKind::RankExited {
                    key: key.clone(),
                    generation,
                    exit_code: -1,
                    requested: true,
                });
                inner.metrics.rank_exit("stopped");
                break;
            }
        }
        restarts += 1;
        inner.metrics.rank_restarts.inc();
    }
    let _ = done.send(true);
}

/// How a process ended, from the supervisor's point of view.
enum Finished {
    /// On its own.
    Exited(std::io::Result<std::process::ExitStatus>),
    /// After a stop request.
    Stopped(std::io::Result<std::process::ExitStatus>),
}

/// Marks the rank as exited for good, releasing its GPUs.
fn finish(inner: &Inner, key: &RankKey, phase: Phase, exit_code: Option<i32>, message: String) {
    inner.update(key, |e| {
        e.active = false;
        e.status.phase = phase;
        e.status.pid = 0;
        e.status.exit_code = exit_code;
        e.status.message = message;
    });
}
