//! Reconcile on a real API server: the kube-runtime wiring around the pure
//! pipeline fetch -> validate -> plan -> place -> apply -> status.
//!
//! One [`Context`] is shared by every reconcile. Its ledger lock serialises
//! placement so concurrent reconciles of different deployments can never
//! take the same GPU. Node changes, and agent or worker changes in the
//! registry, re-trigger every deployment (health, inventory and liveness
//! changes re-place affected workers) and refresh `Rack` objects.

mod compute_domain;
mod racks;
mod reconcile;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::{Mutex, watch};

use crate::agent::AgentControl;
use crate::crd::ModelDeployment;
use crate::error::{Error, backoff};
use crate::inventory::GpuHealth;
use crate::ledger::Ledger;
use crate::rebalancing::Rebalancing;
use crate::telemetry::Metrics;

pub use racks::sync_racks;
pub use reconcile::{FIELD_MANAGER, FINALIZER, node_facts};

/// Everything a reconcile needs.
pub struct Context {
    pub client: Client,
    pub nodes: Store<Node>,
    pub ledger: Mutex<Ledger>,
    pub metrics: Metrics,
    pub recorder: Recorder,
    pub agents: Arc<dyn AgentControl>,
    pub health: Arc<dyn GpuHealth>,
    /// Whether the NVIDIA DRA driver's ComputeDomain CRD is installed.
    pub compute_domains: bool,
    /// The live rebalancer (with the registry); `None` without engines to
    /// reach.
    pub rebalancing: Option<Arc<Rebalancing>>,
    /// Consecutive transient failures per object, for backoff.
    failures: std::sync::Mutex<HashMap<String, u32>>,
    /// Label warnings last reported per rack, so each change is one event.
    rack_warnings: std::sync::Mutex<HashMap<String, Vec<String>>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("compute_domains", &self.compute_domains)
            .finish()
    }
}

/// What the controller is built from.
#[allow(missing_debug_implementations)]
pub struct ControllerParts {
    pub client: Client,
    pub metrics: Metrics,
    pub agents: Arc<dyn AgentControl>,
    pub health: Arc<dyn GpuHealth>,
    /// Name written as the source of Kubernetes events.
    pub instance: String,
    /// The live rebalancer, when engines can be reached.
    pub rebalancing: Option<Arc<Rebalancing>>,
}

impl Context {
    fn note_failure(&self, key: &str) -> u32 {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = f.entry(key.to_string()).or_default();
        *n += 1;
        *n
    }

    /// Whether `warnings` differ from what was last reported for `rack`.
    fn warnings_changed(&self, rack: &str, warnings: &[String]) -> bool {
        let mut seen = self.rack_warnings.lock().unwrap_or_else(|e| e.into_inner());
        if seen.get(rack).map(Vec::as_slice) == Some(warnings) {
            return false;
        }
        seen.insert(rack.to_string(), warnings.to_vec());
        true
    }

    /// The reconcile core's view of this context.
    fn core(&self) -> crate::pipeline::Core<'_> {
        crate::pipeline::Core {
            ledger: &self.ledger,
            agents: self.agents.as_ref(),
            health: self.health.as_ref(),
            metrics: &self.metrics,
            rebalancing: self.rebalancing.as_deref(),
        }
    }

    fn note_success(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

/// Whether a CRD is served (used to detect optional integrations).
async fn crd_installed(client: &Client, name: &str) -> bool {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    Api::<CustomResourceDefinition>::all(client.clone())
        .get_opt(name)
        .await
        .ok()
        .flatten()
        .is_some()
}

/// A stream that yields whenever the node inventory changes.
fn changes(rx: watch::Receiver<u64>) -> impl Stream<Item = ()> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    })
}

/// Runs the controller until `shutdown` resolves. Call only while leading.
pub async fn run(
    parts: ControllerParts,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    ready: impl FnOnce() + Send,
) -> Result<(), Error> {
    let client = parts.client.clone();
    let (reader, writer) = reflector::store::<Node>();
    let (tx, rx) = watch::channel(0u64);
    // Agents coming and going, and workers forming or being withdrawn in the
    // registry, re-trigger every deployment just as node changes do.
    if let Some(mut registry_changes) = parts.agents.changes() {
        let tx = tx.clone();
        tokio::spawn(async move {
            while registry_changes.next().await.is_some() {
                tx.send_modify(|n| *n += 1);
            }
        });
    }
    let node_stream = reflector::reflector(
        writer,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff()
    .touched_objects();
    tokio::spawn(async move {
        futures::pin_mut!(node_stream);
        while let Some(event) = node_stream.next().await {
            if event.is_ok() {
                tx.send_modify(|n| *n += 1);
            }
        }
    });
    reader
        .wait_until_ready()
        .await
        .map_err(|e| Error::Finalizer(format!("node cache: {e}")))?;

    // Rebuild the ledger from every deployment's recorded placement.
    let mds: Api<ModelDeployment> = Api::all(client.clone());
    let existing = mds.list(&ListParams::default()).await?;
    let ledger = Ledger::from_statuses(existing.items.iter().filter_map(|md| {
        let key = format!("{}/{}", md.namespace().unwrap_or_default(), md.name_any());
        md.status.as_ref().map(|s| (key, s))
    }));
    let compute_domains = crd_installed(&client, compute_domain::CRD_NAME).await;
    let ctx = Arc::new(Context {
        client: client.clone(),
        nodes: reader,
        ledger: Mutex::new(ledger),
        metrics: parts.metrics,
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(parts.instance),
            },
        ),
        agents: parts.agents,
        health: parts.health,
        compute_domains,
        rebalancing: parts.rebalancing,
        failures: std::sync::Mutex::new(HashMap::new()),
        rack_warnings: std::sync::Mutex::new(HashMap::new()),
    });
    racks::sync_all(&ctx).await?;
    ready();

    let rack_ctx = ctx.clone();
    let rack_trigger = changes(rx.clone());
    tokio::spawn(async move {
        futures::pin_mut!(rack_trigger);
        while rack_trigger.next().await.is_some() {
            if let Err(e) = racks::sync_all(&rack_ctx).await {
                tracing::warn!(error = %e, "rack sync failed");
            }
        }
    });

    Controller::new(mds, watcher::Config::default())
        .with_config(ControllerConfig::default().debounce(Duration::from_millis(200)))
        .reconcile_all_on(changes(rx))
        .graceful_shutdown_on(shutdown)
        .run(reconcile::reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile loop event");
            }
        })
        .await;
    Ok(())
}

fn error_policy(md: Arc<ModelDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = format!("{}/{}", md.namespace().unwrap_or_default(), md.name_any());
    if error.is_transient() {
        let n = ctx.note_failure(&key);
        let wait = backoff(n.saturating_sub(1));
        tracing::warn!(deployment = %key, error = %error, retry_in = ?wait, "transient reconcile error");
        Action::requeue(wait)
    } else {
        tracing::warn!(deployment = %key, error = %error, "permanent reconcile error; waiting for a change");
        Action::await_change()
    }
}
