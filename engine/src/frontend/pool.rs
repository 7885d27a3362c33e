//! The frontend's view of one deployment's workers, kept in step with the
//! registry: workers that register, move (new endpoint or generation) or
//! vanish are picked up by watches, without a restart. Load reports update
//! the members in place. Each member carries this frontend's own accounting
//! (outstanding prompt tokens, open decode streams) and a short back-off
//! after a failed call.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use proto::pb::engine_service_client::EngineServiceClient;
use proto::records::{LoadReport, WorkerRecord, WorkerState};
use proto::registry::{Registry, WatchEvent};
use proto::tls::ClientTls;
use proto::types::EngineLoad;
use tonic::transport::Channel;

use super::select::Candidate;

/// How long a worker is avoided after a failed call.
const COOL_DOWN: Duration = Duration::from_secs(2);

/// One worker as the frontend uses it.
#[derive(Debug)]
pub struct Member {
    pub record: WorkerRecord,
    channel: Channel,
    load: Mutex<Option<EngineLoad>>,
    outstanding_prefill_tokens: AtomicU64,
    active_decodes: AtomicU32,
    failed_at: Mutex<Option<Instant>>,
}

impl Member {
    fn new(record: WorkerRecord, call_timeout: Duration, tls: &ClientTls) -> Option<Self> {
        let endpoint = record.grpc_endpoint()?.to_string();
        // The connector sets TCP_NODELAY (decode streams small messages).
        let endpoint = tls.endpoint(&endpoint).ok()?.connect_timeout(call_timeout);
        let channel = tls.channel_lazy(&endpoint);
        Some(Self {
            record,
            channel,
            load: Mutex::new(None),
            outstanding_prefill_tokens: AtomicU64::new(0),
            active_decodes: AtomicU32::new(0),
            failed_at: Mutex::new(None),
        })
    }

    /// The worker's name.
    pub fn name(&self) -> &str {
        &self.record.id.worker
    }

    /// A client on the shared channel.
    pub fn client(&self) -> EngineServiceClient<Channel> {
        EngineServiceClient::new(self.channel.clone()).max_decoding_message_size(64 << 20)
    }

    /// Notes a failed call: the worker is avoided for a while.
    pub fn failed(&self) {
        *self
            .failed_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    }

    /// Counts `tokens` outstanding until the guard drops.
    pub fn prefilling(self: &Arc<Self>, tokens: u64) -> Outstanding {
        self.outstanding_prefill_tokens
            .fetch_add(tokens, Ordering::Relaxed);
        Outstanding::Prefill(self.clone(), tokens)
    }

    /// Counts one open decode stream until the guard drops.
    pub fn decoding(self: &Arc<Self>) -> Outstanding {
        self.active_decodes.fetch_add(1, Ordering::Relaxed);
        Outstanding::Decode(self.clone())
    }

    fn candidate(&self) -> Candidate {
        let cooling = self
            .failed_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|t| t.elapsed() < COOL_DOWN);
        Candidate {
            name: self.name().to_string(),
            role: self.record.role,
            outstanding_prefill_tokens: self.outstanding_prefill_tokens.load(Ordering::Relaxed),
            active_decodes: self.active_decodes.load(Ordering::Relaxed),
            load: *self.load.lock().unwrap_or_else(PoisonError::into_inner),
            cooling,
            draining: self.record.state == WorkerState::Draining,
        }
    }
}

/// This frontend's share of a member's load, released on drop.
#[derive(Debug)]
pub enum Outstanding {
    Prefill(Arc<Member>, u64),
    Decode(Arc<Member>),
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        match self {
            Outstanding::Prefill(m, tokens) => {
                m.outstanding_prefill_tokens
                    .fetch_sub(*tokens, Ordering::Relaxed);
            }
            Outstanding::Decode(m) => {
                m.active_decodes.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// The deployment's workers, by name.
#[derive(Debug, Clone)]
pub struct Pool {
    members: Arc<RwLock<BTreeMap<String, Arc<Member>>>>,
    call_timeout: Duration,
    tls: ClientTls,
}

impl Pool {
    /// An empty pool whose channels connect within `call_timeout` through
    /// `tls` (mutual TLS unless the frontend runs plaintext).
    pub fn new(call_timeout: Duration, tls: ClientTls) -> Self {
        Self {
            members: Arc::default(),
            call_timeout,
            tls,
        }
    }

    /// How this pool dials its workers (the pass-through proxy dials the
    /// same way).
    pub fn tls(&self) -> &ClientTls {
        &self.tls
    }

    /// Adds or replaces a worker (a new endpoint or generation replaces the
    /// member and its channel; an identical record keeps them).
    pub fn upsert(&self, record: WorkerRecord) {
        let mut members = self.members.write().unwrap_or_else(PoisonError::into_inner);
        let name = record.id.worker.clone();
        if members.get(&name).is_some_and(|m| m.record == record) {
            return;
        }
        match Member::new(record, self.call_timeout, &self.tls) {
            Some(m) => {
                tracing::info!(worker = %name, endpoint = ?m.record.grpc_endpoint(), "worker joined");
                members.insert(name, Arc::new(m));
            }
            None => tracing::warn!(worker = %name, "worker record without a usable endpoint"),
        }
    }

    /// Forgets a worker.
    pub fn remove(&self, name: &str) {
        let removed = self
            .members
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        if removed.is_some() {
            tracing::info!(worker = %name, "worker left");
        }
    }

    /// Replaces every member (a watch resync).
    pub fn replace_all(&self, records: Vec<WorkerRecord>) {
        let names: Vec<String> = records.iter().map(|r| r.id.worker.clone()).collect();
        for r in records {
            self.upsert(r);
        }
        let stale: Vec<String> = self
            .members
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .filter(|k| !names.contains(k))
            .cloned()
            .collect();
        for name in stale {
            self.remove(&name);
        }
    }

    /// Records a worker's load report.
    pub fn set_load(&self, name: &str, load: Option<EngineLoad>) {
        if let Some(m) = self
            .members
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
        {
            *m.load.lock().unwrap_or_else(PoisonError::into_inner) = load;
        }
    }

    /// Members with their selection view, in name order.
    pub fn snapshot(&self) -> (Vec<Arc<Member>>, Vec<Candidate>) {
        let members: Vec<Arc<Member>> = self
            .members
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        let candidates = members.iter().map(|m| m.candidate()).collect();
        (members, candidates)
    }

    /// How many workers are known.
    pub fn len(&self) -> usize {
        self.members
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no worker is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Follows `namespace/deployment`'s workers and load reports in the
    /// registry until the pool's last clone is dropped... or forever: the
    /// tasks end when the process does.
    pub fn follow(&self, registry: Registry, namespace: &str, deployment: &str) {
        let pool = self.clone();
        let (ns, dep) = (namespace.to_string(), deployment.to_string());
        let timeout = self.call_timeout;
        let reg = registry.clone();
        tokio::spawn(async move {
            let mut watcher = loop {
                match reg.watch_workers(&ns, &dep, timeout).await {
                    Ok(w) => break w,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot watch workers yet");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            };
            loop {
                match watcher.next().await {
                    Ok(WatchEvent::Resync { records, .. }) => pool.replace_all(records),
                    Ok(WatchEvent::Put { record, .. }) => pool.upsert(record),
                    Ok(WatchEvent::Delete { key, .. }) => {
                        if let Some(id) = proto::registry::parse_worker_key(&key) {
                            pool.remove(&id.worker);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "worker watch interrupted; resuming");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        let pool = self.clone();
        let (ns, dep) = (namespace.to_string(), deployment.to_string());
        tokio::spawn(async move {
            let mut watcher = loop {
                match registry.watch_loads(&ns, &dep, timeout).await {
                    Ok(w) => break w,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot watch load reports yet");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            };
            loop {
                match watcher.next().await {
                    Ok(WatchEvent::Resync { records, .. }) => {
                        for r in records {
                            pool.set_load(&r.worker.worker, Some(r.load));
                        }
                    }
                    Ok(WatchEvent::Put { record, .. }) => {
                        let LoadReport { worker, load, .. } = record;
                        pool.set_load(&worker.worker, Some(load));
                    }
                    Ok(WatchEvent::Delete { key, .. }) => {
                        if let Some(id) = proto::registry::parse_worker_key(&key) {
                            pool.set_load(&id.worker, None);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "load watch interrupted; resuming");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use proto::records::fixtures;
    use proto::types::WorkerId;

    use super::*;

    #[tokio::test]
    async fn members_follow_records_and_keep_their_accounting() {
        let pool = Pool::new(Duration::from_secs(1), ClientTls::plaintext());
        let mut w = fixtures::worker("llm", "dsv4", "decode-0");
        pool.upsert(w.clone());
        let (members, _) = pool.snapshot();
        let guard = members[0].decoding();
        assert_eq!(pool.snapshot().1[0].active_decodes, 1);
        // The same record again keeps the member (and its count).
        pool.upsert(w.clone());
        assert_eq!(pool.snapshot().1[0].active_decodes, 1);
        drop(guard);
        assert_eq!(pool.snapshot().1[0].active_decodes, 0);
        // A moved worker (new endpoint) is a new member.
        w.ranks[0].grpc_endpoint = "http://tray-9:7200".into();
        pool.upsert(w);
        assert_eq!(
            pool.snapshot().0[0].record.grpc_endpoint(),
            Some("http://tray-9:7200")
        );
        let id = WorkerId::new("llm", "dsv4", "decode-0");
        pool.set_load("decode-0", Some(fixtures::load(&id).load));
        assert_eq!(pool.snapshot().1[0].load.map(|l| l.running), Some(64));
        pool.replace_all(vec![fixtures::worker("llm", "dsv4", "prefill-0")]);
        let names: Vec<String> = pool.snapshot().1.into_iter().map(|c| c.name).collect();
        assert_eq!(names, ["prefill-0"]);
    }
}
