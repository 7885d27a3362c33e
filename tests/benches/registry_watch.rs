//! Registry watch latency: how long after a `WorkerRecord` put does a typed
//! `proto::registry::Watcher` on the deployment's prefix deliver it?
//!
//! A real etcd from the harness (`harness::Etcd`, fsync off as in every
//! harness test), one `Registry` connection writing and another watching
//! (`Registry::watch_workers`), as an engine and the operator do. The
//! watcher runs in its own task and stamps each event the moment
//! `Watcher::next` returns it.
//!
//! - **steady**: `--count N` puts (default 2000), one at a time at `--rate R`
//!   per second (default 200), each awaited before the next;
//! - **burst**: N more puts as fast as the client goes, 64 in flight.
//!
//! Per event it reports put-acknowledged -> delivered (negative when the
//! event arrives before the put's reply) and put-issued -> delivered, as
//! p50/p90/p99/max, with the steady p99 (ack -> delivered) against the target
//! of 100 ms (PASS/MISS). Each record carries its sequence number as its
//! generation; the bench exits non-zero when an event is lost, repeated, out
//! of revision order, or delivered with a revision other than its put's, or
//! when the watch errors or resyncs. A missed target is never an error.
//!
//! Run with `CARGO_TARGET_DIR=/tmp/h2-target cargo bench -p rackscale-tests
//! --bench registry_watch [-- --count N --rate R]`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use harness::Etcd;
use proto::records::{RegistryRecord, WorkerRecord, fixtures};
use proto::registry::{Lease, Registry, WatchEvent, Watcher};

const NAMESPACE: &str = "bench";
const DEPLOYMENT: &str = "watch";
/// Distinct worker keys the puts cycle through.
const KEYS: u64 = 50;
/// Puts in flight during the burst.
const BURST_IN_FLIGHT: usize = 64;
/// Deadline of each registry call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the watcher may lag behind the last put before the bench fails.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Steady-state p99 put-acknowledged -> delivered target.
const TARGET_P99: Duration = Duration::from_millis(100);

/// Bench parameters from the command line.
#[derive(Debug, Clone, Copy)]
struct Params {
    count: u64,
    rate: f64,
}

/// One put as the writer saw it.
#[derive(Debug, Clone, Copy)]
struct Put {
    seq: u64,
    issued: Instant,
    acked: Instant,
    revision: i64,
}

/// One event as the watcher delivered it.
#[derive(Debug, Clone, Copy)]
struct Delivery {
    seq: u64,
    revision: i64,
    at: Instant,
}

fn parse_params() -> Result<Params> {
    let mut params = Params {
        count: 2000,
        rate: 200.0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--count" => {
                params.count = args
                    .next()
                    .context("--count needs a value")?
                    .parse()
                    .context("--count must be a positive integer")?;
                ensure!(params.count > 0, "--count must be positive");
            }
            "--rate" => {
                params.rate = args
                    .next()
                    .context("--rate needs a value")?
                    .parse()
                    .context("--rate must be a number")?;
                ensure!(
                    params.rate.is_finite() && params.rate > 0.0,
                    "--rate must be positive"
                );
            }
            // `cargo bench` passes `--bench`; ignore it and any filter.
            _ => {}
        }
    }
    Ok(params)
}

/// The record of put number `seq` (1-based): its generation is `seq`.
fn record(seq: u64) -> WorkerRecord {
    let mut r = fixtures::worker(NAMESPACE, DEPLOYMENT, &format!("w-{:02}", seq % KEYS));
    r.generation = seq;
    r
}

async fn put(reg: &Registry, lease: Lease, seq: u64) -> Result<Put> {
    let r = record(seq);
    let issued = Instant::now();
    let revision = reg
        .put_worker(lease, &r, CALL_TIMEOUT)
        .await
        .with_context(|| format!("put {seq}"))?;
    Ok(Put {
        seq,
        issued,
        acked: Instant::now(),
        revision,
    })
}

/// Delivers events until `total` puts were seen; any error, delete or
/// resync ends the watch with an error.
async fn watch(mut watcher: Watcher<WorkerRecord>, total: u64) -> Result<Vec<Delivery>> {
    let mut out = Vec::with_capacity(total as usize);
    while (out.len() as u64) < total {
        let event = tokio::time::timeout(DRAIN_TIMEOUT, watcher.next())
            .await
            .with_context(|| {
                format!(
                    "watcher delivered nothing for {DRAIN_TIMEOUT:?} after {} of {total} events",
                    out.len()
                )
            })?
            .context("watch failed")?;
        let at = Instant::now();
        match event {
            WatchEvent::Put {
                record, revision, ..
            } => out.push(Delivery {
                seq: record.generation,
                revision,
                at,
            }),
            other => bail!("unexpected watch event after {} puts: {other:?}", out.len()),
        }
    }
    Ok(out)
}

/// Fails unless `deliveries` are exactly `puts`, once each, in revision
/// order, each with the revision its put was acknowledged with.
fn check(puts: &[Put], deliveries: &[Delivery]) -> Result<()> {
    ensure!(
        deliveries.len() == puts.len(),
        "{} events delivered for {} puts",
        deliveries.len(),
        puts.len()
    );
    let by_seq: HashMap<u64, &Put> = puts.iter().map(|p| (p.seq, p)).collect();
    let mut seen = HashMap::with_capacity(deliveries.len());
    let mut last_revision = 0;
    for (i, d) in deliveries.iter().enumerate() {
        let put = by_seq
            .get(&d.seq)
            .with_context(|| format!("event {i} carries sequence {} that was never put", d.seq))?;
        ensure!(
            seen.insert(d.seq, i).is_none(),
            "sequence {} delivered twice",
            d.seq
        );
        ensure!(
            d.revision == put.revision,
            "sequence {} delivered at revision {}, put acknowledged at {}",
            d.seq,
            d.revision,
            put.revision
        );
        ensure!(
            d.revision > last_revision,
            "event {i} (revision {}) after revision {last_revision}: out of order",
            d.revision
        );
        last_revision = d.revision;
    }
    Ok(())
}

/// Signed milliseconds from `from` to `to`.
fn signed_ms(from: Instant, to: Instant) -> f64 {
    if to >= from {
        (to - from).as_secs_f64() * 1e3
    } else {
        -((from - to).as_secs_f64() * 1e3)
    }
}

/// Nearest-rank percentile `p` (0..=100) of `sorted`.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.clamp(1, sorted.len().max(1)) - 1)
        .copied()
        .unwrap_or(f64::NAN)
}

/// Latency rows of one case; returns the p99 of ack -> delivered.
fn report(case: &str, puts: &[Put], deliveries: &[Delivery]) -> f64 {
    let at: HashMap<u64, Instant> = deliveries.iter().map(|d| (d.seq, d.at)).collect();
    let mut from_ack = Vec::with_capacity(puts.len());
    let mut from_issue = Vec::with_capacity(puts.len());
    for p in puts {
        if let Some(&t) = at.get(&p.seq) {
            from_ack.push(signed_ms(p.acked, t));
            from_issue.push(signed_ms(p.issued, t));
        }
    }
    let mut p99 = f64::NAN;
    for (what, mut v) in [
        ("put acknowledged -> delivered", from_ack),
        ("put issued -> delivered", from_issue),
    ] {
        v.sort_by(f64::total_cmp);
        let before_ack = v.iter().filter(|&&x| x < 0.0).count();
        println!(
            "| {case} | {what} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            v.len(),
            percentile(&v, 50.0),
            percentile(&v, 90.0),
            percentile(&v, 99.0),
            v.last().copied().unwrap_or(f64::NAN),
            v.first().copied().unwrap_or(f64::NAN),
            if what.starts_with("put ack") {
                before_ack.to_string()
            } else {
                "-".to_string()
            },
        );
        if what.starts_with("put ack") {
            p99 = percentile(&v, 99.0);
        }
    }
    p99
}

async fn run(params: Params) -> Result<()> {
    let etcd = Etcd::start().await?;
    let endpoints = [etcd.endpoint().to_owned()];
    let writer = Registry::connect(&endpoints, CALL_TIMEOUT).await?;
    let reader = Registry::connect(&endpoints, CALL_TIMEOUT).await?;
    let lease = writer
        .grant_lease(Duration::from_secs(600), CALL_TIMEOUT)
        .await?;
    let _keep = writer.keep_alive(lease);

    let mut watcher = reader
        .watch_workers(NAMESPACE, DEPLOYMENT, CALL_TIMEOUT)
        .await?;
    match watcher.next().await? {
        WatchEvent::Resync { records, .. } if records.is_empty() => {}
        other => bail!("expected an empty resync first, got {other:?}"),
    }
    let total = 2 * params.count;
    let watching = tokio::spawn(watch(watcher, total));

    // Steady: one put at a time, paced.
    let mut steady = Vec::with_capacity(params.count as usize);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / params.rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let steady_start = Instant::now();
    for seq in 1..=params.count {
        tick.tick().await;
        steady.push(put(&writer, lease, seq).await?);
    }
    let steady_wall = steady_start.elapsed();

    // Burst: everything at once, BURST_IN_FLIGHT puts outstanding.
    let burst_start = Instant::now();
    let burst: Vec<Put> = futures::stream::iter(params.count + 1..=total)
        .map(|seq| put(&writer, lease, seq))
        .buffer_unordered(BURST_IN_FLIGHT)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    let burst_acked = burst_start.elapsed();

    let deliveries = tokio::time::timeout(DRAIN_TIMEOUT, watching)
        .await
        .context("the watcher did not deliver every event in time")???;
    let all: Vec<Put> = steady.iter().chain(&burst).copied().collect();
    check(&all, &deliveries)?;
    let steady_order: Vec<u64> = deliveries
        .iter()
        .take(params.count as usize)
        .map(|d| d.seq)
        .collect();
    ensure!(
        steady_order.iter().copied().eq(1..=params.count),
        "steady puts delivered out of put order"
    );
    let burst_last = deliveries
        .iter()
        .skip(params.count as usize)
        .map(|d| d.at)
        .max()
        .context("no burst deliveries")?;
    let burst_delivered = burst_last - burst_start;

    println!(
        "\n{} from the harness (--unsafe-no-fsync); {} WorkerRecord puts per case over \
         {KEYS} keys ({} bytes each); writer and watcher on separate connections; every \
         event checked (none lost, repeated or out of order)\n",
        etcd_version(),
        params.count,
        record(1).encode().len(),
    );
    println!(
        "| case | latency | events | p50 ms | p90 ms | p99 ms | max ms | min ms | delivered before ack |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let steady_p99 = report("steady", &steady, &deliveries);
    report("burst", &burst, &deliveries);
    println!(
        "\nsteady: {} puts in {:.2} s ({:.0}/s offered, {:.0}/s achieved)",
        params.count,
        steady_wall.as_secs_f64(),
        params.rate,
        params.count as f64 / steady_wall.as_secs_f64()
    );
    println!(
        "burst: {} puts acknowledged in {:.0} ms ({:.0} puts/s), all delivered {:.0} ms after \
         the first was issued ({:.0} events/s)",
        params.count,
        ms(burst_acked),
        params.count as f64 / burst_acked.as_secs_f64(),
        ms(burst_delivered),
        params.count as f64 / burst_delivered.as_secs_f64()
    );
    let target = TARGET_P99.as_secs_f64() * 1e3;
    println!(
        "steady p99 put acknowledged -> delivered: {steady_p99:.2} ms (target < {target:.0} ms): {}",
        if steady_p99 < target { "PASS" } else { "MISS" }
    );
    writer.revoke(lease, CALL_TIMEOUT).await?;
    Ok(())
}

/// `etcd --version`'s first line, or what kept us from reading it.
fn etcd_version() -> String {
    let version = harness::bins::binary(harness::bins::ETCD).and_then(|bin| {
        let out = std::process::Command::new(bin).arg("--version").output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let first = text.lines().next().unwrap_or_default();
        // "etcd Version: 3.6.16"
        Ok(format!(
            "etcd {}",
            first.trim_start_matches("etcd Version:").trim()
        ))
    });
    version.unwrap_or_else(|e| format!("etcd (version unknown: {e})"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> Result<()> {
    let params = parse_params()?;
    tokio::runtime::Runtime::new()?.block_on(run(params))
}
