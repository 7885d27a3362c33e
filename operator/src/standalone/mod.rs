//! Standalone mode: the operator without Kubernetes. ModelDeployment specs
//! come from YAML files, the inventory from the agents' registry records
//! (racks = NVLink cliques), and every deployment goes through the same
//! reconcile core as in Kubernetes mode ([`crate::pipeline`]). Statuses are
//! printed as they change and served on `GET /status`.
//!
//! One task owns the loop and all its state (ledger, statuses, generations);
//! it re-reconciles every deployment on a timer (sooner while workers
//! settle) and whenever agents or workers change in the registry, so a
//! crashed rank or a lost agent is recovered as in Kubernetes mode. Spec
//! files are re-read on every pass: an edit is a new generation, a removed
//! deployment is released. On shutdown every deployment is released, so
//! agents stop every rank this operator started.

pub mod adopt;
pub mod board;
pub mod facts;
pub mod report;
pub mod specs;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Mutex;

use crate::agent::AgentControl;
use crate::crd::ModelDeploymentStatus;
use crate::error::{Error, Result};
use crate::inventory::{AnnotationsOnly, NodeFacts};
use crate::ledger::Ledger;
use crate::pipeline::{self, Core, Decision, Input, Note, SETTLING};
use crate::rebalancing::Rebalancing;
use crate::telemetry::{Health, Metrics};
use board::{Board, DeploymentView};
use report::Printer;
use specs::{Generations, SpecEntry};

/// What the standalone loop is built from.
#[allow(missing_debug_implementations)]
pub struct Parts {
    /// A spec file or a directory of them.
    pub specs: PathBuf,
    /// The registry the agents register in.
    pub registry: proto::registry::Registry,
    pub agents: Arc<dyn AgentControl>,
    pub metrics: Metrics,
    pub health: Health,
    pub board: Board,
    /// Deadline of each registry call.
    pub timeout: Duration,
    /// Longest wait between passes.
    pub resync: Duration,
    /// The live rebalancer.
    pub rebalancing: Option<Arc<Rebalancing>>,
}

/// The loop's own state.
struct Loop {
    parts: Parts,
    ledger: Mutex<Ledger>,
    specs: BTreeMap<String, SpecEntry>,
    spec_error: Option<String>,
    generations: Generations,
    statuses: BTreeMap<String, ModelDeploymentStatus>,
    views: BTreeMap<String, DeploymentView>,
    printer: Printer,
}

fn say(line: &str) {
    println!("[operator] {line}");
}

impl Loop {
    fn core(&self) -> Core<'_> {
        Core {
            ledger: &self.ledger,
            agents: self.parts.agents.as_ref(),
            health: &AnnotationsOnly,
            metrics: &self.parts.metrics,
            rebalancing: self.parts.rebalancing.as_deref(),
        }
    }

    /// Re-reads the spec files; a bad edit keeps the last good specs.
    async fn reload(&mut self) {
        match specs::load(&self.parts.specs) {
            Ok(fresh) => {
                if self.spec_error.take().is_some() {
                    say("spec files readable again");
                }
                let gone: Vec<String> = self
                    .specs
                    .keys()
                    .filter(|k| !fresh.contains_key(*k))
                    .cloned()
                    .collect();
                for key in gone {
                    pipeline::release(self.core(), &key).await;
                    self.statuses.remove(&key);
                    self.views.remove(&key);
                    self.generations.forget(&key);
                    self.printer.forget(&key);
                    say(&format!(
                        "{key}: spec removed; released its GPUs and stopped its workers"
                    ));
                }
                self.specs = fresh;
            }
            Err(e) => {
                let text = e.to_string();
                if self.spec_error.as_deref() != Some(text.as_str()) {
                    say(&format!(
                        "cannot read the specs, keeping the last good ones: {text}"
                    ));
                    tracing::warn!(error = %text, "spec files");
                }
                self.spec_error = Some(text);
            }
        }
    }

    /// One reconcile of every deployment; returns when to look again.
    async fn pass(&mut self, nodes: &[NodeFacts]) -> Duration {
        let mut next = self.parts.resync;
        let entries: Vec<SpecEntry> = self.specs.values().cloned().collect();
        for entry in entries {
            let key = entry.key();
            let generation = self.generations.of(&key, &entry.spec);
            let previous = self.statuses.get(&key).cloned().unwrap_or_default();
            let input = Input {
                key: &key,
                generation: Some(generation),
                spec: &entry.spec,
                status: &previous,
            };
            let timer = self.parts.metrics.reconcile_timer();
            let decided =
                pipeline::decide(self.core(), &input, nodes.to_vec(), &BTreeMap::new()).await;
            let (status, notes, wait, error) = match decided {
                Ok(Decision::Placed(placed)) => {
                    let applied = pipeline::launch(self.core(), &input, *placed).await;
                    timer.success();
                    (applied.status, applied.notes, applied.requeue, None)
                }
                Ok(Decision::Failed { status, error }) => {
                    timer.error(error.category());
                    let note = Note {
                        warning: true,
                        reason: error.reason(),
                        message: error.to_string(),
                    };
                    let notes = if previous.phase == status.phase
                        && previous.conditions.len() == status.conditions.len()
                    {
                        Vec::new()
                    } else {
                        vec![note]
                    };
                    let wait = if error.is_transient() {
                        SETTLING
                    } else {
                        self.parts.resync
                    };
                    (*status, notes, wait, Some(error.to_string()))
                }
                Err(e) => {
                    timer.error(e.category());
                    tracing::warn!(deployment = %key, error = %e, "reconcile failed");
                    (previous.clone(), Vec::new(), SETTLING, Some(e.to_string()))
                }
            };
            for line in self.printer.lines(&key, generation, &status, &notes) {
                say(&line);
            }
            self.views.insert(
                key.clone(),
                DeploymentView {
                    namespace: entry.namespace.clone(),
                    name: entry.name.clone(),
                    file: entry.file.display().to_string(),
                    generation,
                    spec: entry.spec.clone(),
                    status: status.clone(),
                    error,
                },
            );
            self.statuses.insert(key, status);
            next = next.min(wait);
        }
        next
    }

    /// Seeds the ledger with the workers that already run for the specs
    /// (a restarted operator's predecessor launched them), so the first
    /// pass keeps them where they are. Best effort: what cannot be read or
    /// does not fit is planned afresh.
    async fn adopt(&mut self) {
        let agents = match self.parts.registry.list_agents(self.parts.timeout).await {
            Ok(listing) => listing.records,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list agents; adopting no running workers");
                return;
            }
        };
        let cliques = adopt::cliques(&agents);
        let entries: Vec<SpecEntry> = self.specs.values().cloned().collect();
        for entry in entries {
            let key = entry.key();
            let generation = self.generations.of(&key, &entry.spec);
            let workers = match adopt::fetch(
                &self.parts.registry,
                &entry.namespace,
                &entry.name,
                self.parts.timeout,
            )
            .await
            {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(deployment = %key, error = %e, "cannot list its workers; planning afresh");
                    continue;
                }
            };
            let found = adopt::entries(
                &key,
                u64::try_from(generation).unwrap_or(0),
                &workers,
                &cliques,
            );
            if found.is_empty() {
                continue;
            }
            let n = found.len();
            match self.ledger.lock().await.replace_deployment(&key, found) {
                Ok(()) => say(&format!(
                    "{key}: adopted {n} running worker(s) from the registry; they stay where they run"
                )),
                Err(e) => {
                    tracing::warn!(deployment = %key, error = %e, "running workers conflict; planning afresh")
                }
            }
        }
    }

    fn publish(&self) {
        self.parts
            .board
            .publish(self.views.clone(), self.spec_error.clone());
    }
}

/// Runs standalone mode until `shutdown` completes, then releases every
/// deployment. Fails at once when the spec files cannot be read at start.
pub async fn run(parts: Parts, shutdown: impl Future<Output = ()>) -> Result<()> {
    let first = specs::load(&parts.specs)?;
    say(&format!(
        "{} ModelDeployment(s) from {}: {}",
        first.len(),
        parts.specs.display(),
        first.keys().cloned().collect::<Vec<_>>().join(", ")
    ));
    let mut changes = parts.agents.changes();
    let mut state = Loop {
        parts,
        ledger: Mutex::new(Ledger::default()),
        specs: first,
        spec_error: None,
        generations: Generations::default(),
        statuses: BTreeMap::new(),
        views: BTreeMap::new(),
        printer: Printer::default(),
    };
    state.adopt().await;
    tokio::pin!(shutdown);
    loop {
        state.parts.health.beat();
        state.reload().await;
        let wait = match state.parts.registry.list_agents(state.parts.timeout).await {
            Ok(listing) => {
                let nodes = facts::node_facts(&listing.records);
                let wait = state.pass(&nodes).await;
                state.parts.health.set_ready();
                wait
            }
            Err(e) => {
                let e = Error::Registry(e.to_string());
                tracing::warn!(error = %e, "cannot list agents; retrying");
                state.parts.health.set_not_ready(e.to_string());
                SETTLING
            }
        };
        state.publish();
        let mut ended = false;
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            alive = async {
                match changes.as_mut() {
                    Some(stream) => stream.next().await.is_some(),
                    None => std::future::pending::<bool>().await,
                }
            } => ended = !alive,
            _ = &mut shutdown => break,
        }
        if ended {
            changes = None;
        }
    }
    let keys: Vec<String> = state.statuses.keys().cloned().collect();
    for key in keys {
        pipeline::release(state.core(), &key).await;
        say(&format!(
            "{key}: released its GPUs and asked the agents to stop its workers"
        ));
    }
    Ok(())
}
