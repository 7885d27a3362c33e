//! The registry client against a real etcd 3.6 from the harness: round trips,
//! lease expiry and keep-alive, ordered watches, resumption after a broken
//! connection and after compaction, and garbage values.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use harness::{Etcd, wait_until};
use proto::Error;
use proto::records::{RegistryRecord, WorkerRecord, fixtures};
use proto::registry::{self, LeaseLoss, LeaseState, Registry, WatchEvent, Watcher};
use proto::types::WorkerId;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

/// Deadline of every registry call in these tests.
const T: Duration = Duration::from_secs(5);
/// Time allowed for a lease to expire or a watch event to arrive.
const WAIT: Duration = Duration::from_secs(20);

async fn registry(endpoint: &str) -> Result<Registry> {
    Ok(Registry::connect(&[endpoint.to_owned()], T).await?)
}

async fn next<R: RegistryRecord>(watcher: &mut Watcher<R>) -> Result<WatchEvent<R>> {
    Ok(tokio::time::timeout(WAIT, watcher.next())
        .await
        .context("no watch event in time")??)
}

fn expect_put(event: WatchEvent<WorkerRecord>, worker: &str) -> Result<i64> {
    match event {
        WatchEvent::Put {
            record, revision, ..
        } if record.id.worker == worker => Ok(revision),
        other => bail!("expected Put of {worker}, got {other:?}"),
    }
}

fn expect_delete(event: WatchEvent<WorkerRecord>, worker: &str) -> Result<i64> {
    match event {
        WatchEvent::Delete { key, revision }
            if registry::parse_worker_key(&key).is_some_and(|id| id.worker == worker) =>
        {
            Ok(revision)
        }
        other => bail!("expected Delete of {worker}, got {other:?}"),
    }
}

#[tokio::test]
async fn records_round_trip_through_etcd() -> Result<()> {
    let etcd = Etcd::start().await?;
    let reg = registry(etcd.endpoint()).await?;
    let lease = reg.grant_lease(Duration::from_secs(30), T).await?;

    let agent = fixtures::agent("tray-0");
    let worker = fixtures::worker("llm", "dsv4", "decode-0");
    let sibling = fixtures::worker("llm", "dsv4-b", "decode-0");
    let load = fixtures::load(&worker.id);
    reg.put_agent(lease, &agent, T).await?;
    reg.put_worker(lease, &worker, T).await?;
    reg.put_worker(lease, &sibling, T).await?;
    reg.put_load(lease, &load, T).await?;

    assert_eq!(reg.get_agent("tray-0", T).await?, Some(agent.clone()));
    assert_eq!(reg.get_worker(&worker.id, T).await?, Some(worker.clone()));
    assert_eq!(reg.get_load(&worker.id, T).await?, Some(load.clone()));
    assert_eq!(reg.get_agent("tray-9", T).await?, None);

    let workers = reg.list_workers("llm", "dsv4", T).await?;
    assert_eq!(workers.records, vec![worker]);
    assert!(workers.invalid.is_empty());
    assert!(workers.revision > 0);
    assert_eq!(reg.list_agents(T).await?.records, vec![agent]);
    assert_eq!(reg.list_loads("llm", "dsv4", T).await?.records, vec![load]);

    reg.revoke(lease, T).await?;
    assert!(reg.list_workers("llm", "dsv4", T).await?.records.is_empty());
    Ok(())
}

#[tokio::test]
async fn lease_expiry_deletes_an_unrenewed_worker_but_not_a_kept_alive_one() -> Result<()> {
    let etcd = Etcd::start().await?;
    let reg = registry(etcd.endpoint()).await?;
    let ttl = Duration::from_secs(2);
    let dying = reg.grant_lease(ttl, T).await?;
    let kept = reg.grant_lease(ttl, T).await?;
    let mut keep_alive = reg.keep_alive(kept);
    let granted_at = tokio::time::Instant::now();

    let gone = fixtures::worker("llm", "dsv4", "gone");
    let alive = fixtures::worker("llm", "dsv4", "alive");
    reg.put_worker(dying, &gone, T).await?;
    reg.put_worker(kept, &alive, T).await?;

    wait_until("the unrenewed worker's key to expire", WAIT, || {
        let reg = reg.clone();
        let id = gone.id.clone();
        async move { Ok(reg.get_worker(&id, T).await?.is_none()) }
    })
    .await?;
    assert!(
        granted_at.elapsed() >= dying.ttl(),
        "expired before its TTL"
    );
    // The kept-alive lease was granted at the same moment with the same TTL.
    assert_eq!(reg.get_worker(&alive.id, T).await?, Some(alive.clone()));
    assert!(matches!(keep_alive.state(), LeaseState::Alive { .. }));

    // Revoking the lease behind the keeper's back is reported as a loss.
    reg.revoke(kept, T).await?;
    let loss = tokio::time::timeout(WAIT, keep_alive.lost()).await?;
    assert_eq!(loss, LeaseLoss::Expired);
    assert_eq!(reg.get_worker(&alive.id, T).await?, None);
    Ok(())
}

#[tokio::test]
async fn a_lease_ttl_under_one_second_is_rejected() -> Result<()> {
    let etcd = Etcd::start().await?;
    let reg = registry(etcd.endpoint()).await?;
    let err = reg.grant_lease(Duration::from_millis(500), T).await.err();
    assert!(matches!(err, Some(Error::InvalidLease(_))), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn watch_sees_puts_and_deletes_in_order() -> Result<()> {
    let etcd = Etcd::start().await?;
    let reg = registry(etcd.endpoint()).await?;
    let lease = reg.grant_lease(Duration::from_secs(30), T).await?;
    let before = fixtures::worker("llm", "dsv4", "before");
    reg.put_worker(lease, &before, T).await?;

    let mut watcher = reg.watch_workers("llm", "dsv4", T).await?;
    match next(&mut watcher).await? {
        WatchEvent::Resync { records, .. } => assert_eq!(records, vec![before]),
        other => bail!("expected the initial resync, got {other:?}"),
    }

    let (a, b) = (
        fixtures::worker("llm", "dsv4", "a"),
        fixtures::worker("llm", "dsv4", "b"),
    );
    reg.put_worker(lease, &a, T).await?;
    reg.put_worker(lease, &fixtures::worker("llm", "other", "x"), T)
        .await?; // not watched
    reg.put_worker(lease, &b, T).await?;
    reg.delete(&a.key(), T).await?;

    let r1 = expect_put(next(&mut watcher).await?, "a")?;
    let r2 = expect_put(next(&mut watcher).await?, "b")?;
    let r3 = expect_delete(next(&mut watcher).await?, "a")?;
    assert!(r1 < r2 && r2 < r3, "revisions out of order: {r1} {r2} {r3}");
    assert_eq!(watcher.revision(), r3);

    // Revoking the lease deletes both remaining workers.
    reg.revoke(lease, T).await?;
    let mut deleted = vec![];
    for _ in 0..2 {
        match next(&mut watcher).await? {
            WatchEvent::Delete { key, .. } => deleted.push(key),
            other => bail!("expected a delete, got {other:?}"),
        }
    }
    deleted.sort();
    assert_eq!(
        deleted,
        vec![
            registry::worker_key("llm", "dsv4", "b"),
            registry::worker_key("llm", "dsv4", "before"),
        ]
    );
    Ok(())
}

#[tokio::test]
async fn watch_resumes_from_its_revision_after_the_stream_is_dropped() -> Result<()> {
    let etcd = Etcd::start().await?;
    let reg = registry(etcd.endpoint()).await?;
    let lease = reg.grant_lease(Duration::from_secs(30), T).await?;
    let mut watcher = reg.watch_workers("llm", "dsv4", T).await?;
    assert!(matches!(
        next(&mut watcher).await?,
        WatchEvent::Resync { .. }
    ));

    let a = fixtures::worker("llm", "dsv4", "a");
    reg.put_worker(lease, &a, T).await?;
    expect_put(next(&mut watcher).await?, "a")?;
    assert_eq!(watcher.reopened(), 1);

    // While no stream is open, changes pile up in etcd only.
    watcher.reconnect();
    reg.put_worker(lease, &fixtures::worker("llm", "dsv4", "b"), T)
        .await?;
    reg.delete(&a.key(), T).await?;
    reg.put_worker(lease, &fixtures::worker("llm", "dsv4", "c"), T)
        .await?;

    expect_put(next(&mut watcher).await?, "b")?;
    expect_delete(next(&mut watcher).await?, "a")?;
    expect_put(next(&mut watcher).await?, "c")?;
    assert_eq!(watcher.reopened(), 2);
    Ok(())
}

/// A loopback TCP proxy whose live connections can be cut, to break a
/// client's streams the way a network failure does.
struct CuttableProxy {
    address: String,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl CuttableProxy {
    async fn start(upstream: &str) -> Result<Self> {
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = format!("http://{}", listener.local_addr()?);
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let tracked = connections.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tracked.lock().await.push(task);
            }
        });
        Ok(Self {
            address,
            connections,
            accept,
        })
    }

    /// Closes every open connection; new ones are still accepted.
    async fn cut(&self) {
        for task in self.connections.lock().await.drain(..) {
            task.abort();
        }
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

#[tokio::test]
async fn watch_resumes_without_losing_events_when_the_connection_breaks() -> Result<()> {
    let etcd = Etcd::start().await?;
    let writer = registry(etcd.endpoint()).await?;
    let proxy = CuttableProxy::start(etcd.endpoint()).await?;
    let reader = registry(&proxy.address).await?;
    let lease = writer.grant_lease(Duration::from_secs(30), T).await?;

    let mut watcher = reader.watch_workers("llm", "dsv4", T).await?;
    assert!(matches!(
        next(&mut watcher).await?,
        WatchEvent::Resync { .. }
    ));
    writer
        .put_worker(lease, &fixtures::worker("llm", "dsv4", "a"), T)
        .await?;
    expect_put(next(&mut watcher).await?, "a")?;

    proxy.cut().await;
    for name in ["b", "c", "d"] {
        writer
            .put_worker(lease, &fixtures::worker("llm", "dsv4", name), T)
            .await?;
    }
    // `next` may report the break once (if reconnecting fails at first); it
    // must then carry on from where it was.
    let mut seen = vec![];
    while seen.len() < 3 {
        match tokio::time::timeout(WAIT, watcher.next()).await? {
            Ok(WatchEvent::Put { record, .. }) => seen.push(record.id.worker),
            Ok(other) => bail!("unexpected event {other:?}"),
            Err(err) if err.is_transient() => continue,
            Err(err) => return Err(err.into()),
        }
    }
    assert_eq!(seen, ["b", "c", "d"]);
    assert!(watcher.reopened() >= 2, "the watch was not reopened");
    Ok(())
}

#[tokio::test]
async fn watch_behind_compaction_resyncs_from_a_fresh_listing() -> Result<()> {
    let etcd = Etcd::start().await?;
    let reg = registry(etcd.endpoint()).await?;
    let lease = reg.grant_lease(Duration::from_secs(30), T).await?;
    let a = fixtures::worker("llm", "dsv4", "a");
    reg.put_worker(lease, &a, T).await?;
    let mut watcher = reg.watch_workers("llm", "dsv4", T).await?;
    assert!(matches!(
        next(&mut watcher).await?,
        WatchEvent::Resync { .. }
    ));

    watcher.reconnect();
    let b = fixtures::worker("llm", "dsv4", "b");
    reg.put_worker(lease, &b, T).await?;
    reg.delete(&a.key(), T).await?;
    let latest = reg
        .put_worker(lease, &fixtures::worker("llm", "other", "x"), T)
        .await?;
    let mut client = etcd.client().await?;
    client.compact(latest, None).await?;

    match next(&mut watcher).await? {
        WatchEvent::Resync { records, revision } => {
            assert_eq!(records, vec![b]);
            assert!(revision >= latest);
        }
        other => bail!("expected a resync after compaction, got {other:?}"),
    }
    // And it keeps watching after the resync.
    reg.put_worker(lease, &fixtures::worker("llm", "dsv4", "c"), T)
        .await?;
    expect_put(next(&mut watcher).await?, "c")?;
    Ok(())
}

#[tokio::test]
async fn garbage_values_give_clear_errors_and_never_stop_a_watch() -> Result<()> {
    let etcd = Etcd::start().await?;
    let reg = registry(etcd.endpoint()).await?;
    let lease = reg.grant_lease(Duration::from_secs(30), T).await?;
    let mut raw = etcd.client().await?;
    let good = fixtures::worker("llm", "dsv4", "good");
    reg.put_worker(lease, &good, T).await?;
    let bad_key = registry::worker_key("llm", "dsv4", "bad");
    raw.put(bad_key.as_str(), b"\xff\xfe not a protobuf".to_vec(), None)
        .await?;

    let err = reg
        .get_worker(&WorkerId::new("llm", "dsv4", "bad"), T)
        .await
        .err();
    match &err {
        Some(Error::Decode { key, message, .. }) => {
            assert_eq!(key, &bad_key);
            assert_eq!(*message, "WorkerRecord");
        }
        other => bail!("expected a decode error, got {other:?}"),
    }
    let text = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(
        text.contains(&bad_key) && text.contains("WorkerRecord"),
        "{text}"
    );

    let listing = reg.list_workers("llm", "dsv4", T).await?;
    assert_eq!(listing.records, vec![good]);
    assert_eq!(listing.invalid.len(), 1);

    let mut watcher = reg.watch_workers("llm", "dsv4", T).await?;
    assert!(
        matches!(next(&mut watcher).await?, WatchEvent::Resync { records, .. } if records.len() == 1)
    );
    assert!(matches!(watcher.next().await, Err(Error::Decode { .. })));
    // A well-formed message that breaks the contract: empty value = no fields.
    raw.put(bad_key.as_str(), Vec::new(), None).await?;
    reg.put_worker(lease, &fixtures::worker("llm", "dsv4", "later"), T)
        .await?;
    let err = tokio::time::timeout(WAIT, watcher.next()).await?.err();
    assert!(matches!(err, Some(Error::InvalidValue { .. })), "{err:?}");
    expect_put(next(&mut watcher).await?, "later")?;
    Ok(())
}
