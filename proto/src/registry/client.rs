//! [`Registry`]: typed reads and lease-bound writes of registry records.
//!
//! Every call takes its own deadline and fails with [`Error::Timeout`] past
//! it, so no caller can hang on an unreachable etcd. Writes always go under a
//! lease: a record outlives its writer by at most the lease TTL.

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions};

use super::lease::{KeepAlive, Lease};
use super::security::EtcdSecurity;
use super::watch::Watcher;
use crate::error::{Error, Result};
use crate::records::{AgentRecord, LoadReport, RegistryRecord, WorkerRecord};
use crate::registry;
use crate::types::WorkerId;

/// Runs one etcd call under a deadline, naming it in errors.
pub(crate) async fn call<T>(
    op: &'static str,
    timeout: Duration,
    fut: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(result) => result.map_err(|source| Error::Etcd { op, source }),
        Err(_) => Err(Error::Timeout { op, after: timeout }),
    }
}

/// The records under one prefix at one revision.
#[derive(Debug)]
pub struct Listing<T> {
    /// Every value that decoded and validated, in key order.
    pub records: Vec<T>,
    /// One error per value that did not; a bad value never hides the good ones.
    pub invalid: Vec<Error>,
    /// The store revision the listing reflects; a watch continues from `revision + 1`.
    pub revision: i64,
}

/// A typed client of the rackscale registry. Cheap to clone (shares one connection).
#[derive(Clone)]
pub struct Registry {
    client: Client,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    /// Wraps a connected etcd client.
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// Connects to a local etcd at `endpoints` without TLS or a user (tests,
    /// loopback); see [`Self::connect_with`].
    pub async fn connect(endpoints: &[String], timeout: Duration) -> Result<Self> {
        Self::connect_with(endpoints, &EtcdSecurity::default(), timeout).await
    }

    /// Connects to etcd at `endpoints` with `security` (TLS, a user), with
    /// HTTP/2 keep-alive so that a dead connection is noticed (and watches
    /// resume) within a few seconds. With a user, the client authenticates
    /// here (a wrong password fails now) and refreshes its token later.
    pub async fn connect_with(
        endpoints: &[String],
        security: &EtcdSecurity,
        timeout: Duration,
    ) -> Result<Self> {
        security.check_endpoints(endpoints)?;
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        let options = security.apply(options)?;
        let client = call(
            "connect",
            timeout,
            Client::connect(endpoints, Some(options)),
        )
        .await?;
        Ok(Self::new(client))
    }

    /// Grants a lease of `ttl` (whole seconds, at least 1; etcd may round up).
    pub async fn grant_lease(&self, ttl: Duration, timeout: Duration) -> Result<Lease> {
        let secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        if secs < 1 {
            return Err(Error::InvalidLease(format!(
                "TTL {ttl:?} is under one second"
            )));
        }
        let mut lease = self.client.lease_client();
        let granted = call("lease_grant", timeout, lease.grant(secs, None)).await?;
        let ttl = Duration::from_secs(u64::try_from(granted.ttl()).unwrap_or(0));
        Ok(Lease::new(granted.id(), ttl))
    }

    /// Starts a task renewing `lease` every TTL/3 until the returned handle is
    /// dropped; the handle reports when the lease is lost.
    pub fn keep_alive(&self, lease: Lease) -> KeepAlive {
        KeepAlive::start(self.client.clone(), lease)
    }

    /// Revokes `lease`, deleting every key written under it at once.
    pub async fn revoke(&self, lease: Lease, timeout: Duration) -> Result<()> {
        let mut client = self.client.lease_client();
        call("lease_revoke", timeout, client.revoke(lease.id())).await?;
        Ok(())
    }

    /// Writes `record` at its key under `lease`; returns the store revision.
    pub async fn put<R: RegistryRecord>(
        &self,
        lease: Lease,
        record: &R,
        timeout: Duration,
    ) -> Result<i64> {
        let mut kv = self.client.kv_client();
        let options = PutOptions::new().with_lease(lease.id());
        let response = call(
            "put",
            timeout,
            kv.put(record.key(), record.encode(), Some(options)),
        )
        .await?;
        Ok(response.header().map_or(0, |h| h.revision()))
    }

    /// Publishes an agent's liveness record.
    pub async fn put_agent(
        &self,
        lease: Lease,
        record: &AgentRecord,
        timeout: Duration,
    ) -> Result<i64> {
        self.put(lease, record, timeout).await
    }

    /// Publishes a worker's record (role, shape, endpoints, state).
    pub async fn put_worker(
        &self,
        lease: Lease,
        record: &WorkerRecord,
        timeout: Duration,
    ) -> Result<i64> {
        self.put(lease, record, timeout).await
    }

    /// Publishes a worker's load report.
    pub async fn put_load(
        &self,
        lease: Lease,
        report: &LoadReport,
        timeout: Duration,
    ) -> Result<i64> {
        self.put(lease, report, timeout).await
    }

    /// Deletes the value at `key` (e.g. a worker record on clean shutdown).
    pub async fn delete(&self, key: &str, timeout: Duration) -> Result<()> {
        let mut kv = self.client.kv_client();
        call("delete", timeout, kv.delete(key, None)).await?;
        Ok(())
    }

    /// Reads and validates the record at `key`; `None` when absent.
    pub async fn get<R: RegistryRecord>(&self, key: &str, timeout: Duration) -> Result<Option<R>> {
        let mut kv = self.client.kv_client();
        let response = call("get", timeout, kv.get(key, None)).await?;
        response
            .kvs()
            .first()
            .map(|kv| R::decode(key, kv.value()))
            .transpose()
    }

    /// The agent record of `node`.
    pub async fn get_agent(&self, node: &str, timeout: Duration) -> Result<Option<AgentRecord>> {
        self.get(&registry::agent_key(node), timeout).await
    }

    /// The record of worker `id`.
    pub async fn get_worker(
        &self,
        id: &WorkerId,
        timeout: Duration,
    ) -> Result<Option<WorkerRecord>> {
        self.get(
            &registry::worker_key(&id.namespace, &id.deployment, &id.worker),
            timeout,
        )
        .await
    }

    /// The latest load report of worker `id`.
    pub async fn get_load(&self, id: &WorkerId, timeout: Duration) -> Result<Option<LoadReport>> {
        self.get(
            &registry::load_key(&id.namespace, &id.deployment, &id.worker),
            timeout,
        )
        .await
    }

    /// Every record under `prefix`, with the revision it was read at.
    pub async fn list<R: RegistryRecord>(
        &self,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Listing<R>> {
        let mut kv = self.client.kv_client();
        let response = call(
            "list",
            timeout,
            kv.get(prefix, Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let revision = response.header().map_or(0, |h| h.revision());
        let mut listing = Listing {
            records: Vec::with_capacity(response.kvs().len()),
            invalid: Vec::new(),
            revision,
        };
        for kv in response.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            match R::decode(&key, kv.value()) {
                Ok(record) => listing.records.push(record),
                Err(err) => listing.invalid.push(err),
            }
        }
        Ok(listing)
    }

    /// Every live agent.
    pub async fn list_agents(&self, timeout: Duration) -> Result<Listing<AgentRecord>> {
        self.list(&registry::agents_prefix(), timeout).await
    }

    /// Every registered worker of one deployment.
    pub async fn list_workers(
        &self,
        namespace: &str,
        deployment: &str,
        timeout: Duration,
    ) -> Result<Listing<WorkerRecord>> {
        self.list(&registry::workers_prefix(namespace, deployment), timeout)
            .await
    }

    /// Every load report of one deployment's workers.
    pub async fn list_loads(
        &self,
        namespace: &str,
        deployment: &str,
        timeout: Duration,
    ) -> Result<Listing<LoadReport>> {
        self.list(&registry::load_prefix(namespace, deployment), timeout)
            .await
    }

    /// Watches every record under `prefix`: first a full [`super::WatchEvent::Resync`],
    /// then each change, resuming after broken streams. `timeout` bounds each
    /// etcd call the watcher makes (listing, opening the stream), not the wait
    /// for the next event.
    pub async fn watch<R: RegistryRecord>(
        &self,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Watcher<R>> {
        Watcher::start(self.clone(), prefix.to_owned(), timeout).await
    }

    /// Watches one deployment's workers.
    pub async fn watch_workers(
        &self,
        namespace: &str,
        deployment: &str,
        timeout: Duration,
    ) -> Result<Watcher<WorkerRecord>> {
        self.watch(&registry::workers_prefix(namespace, deployment), timeout)
            .await
    }

    /// Watches every agent.
    pub async fn watch_agents(&self, timeout: Duration) -> Result<Watcher<AgentRecord>> {
        self.watch(&registry::agents_prefix(), timeout).await
    }

    /// Watches one deployment's load reports.
    pub async fn watch_loads(
        &self,
        namespace: &str,
        deployment: &str,
        timeout: Duration,
    ) -> Result<Watcher<LoadReport>> {
        self.watch(&registry::load_prefix(namespace, deployment), timeout)
            .await
    }

    /// The underlying etcd client, for the watcher.
    pub(crate) fn etcd(&self) -> &Client {
        &self.client
    }
}
