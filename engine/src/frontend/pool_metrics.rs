//! The frontend's view of its deployment's workers as Prometheus gauges,
//! read from the [`Pool`] at scrape time: each worker's GPUs (from its
//! registered shape) and its last load report (queue depth, running batch,
//! KV cache use). Workers are child processes of node agents on ports they
//! pick at start, which a PodMonitor cannot list; the frontend already
//! follows them in the registry, so its `/metrics` (scraped through its
//! Service) carries their pool sizes and load.
//!
//! Labels are bounded: `worker` (the deployment's workers, which the
//! operator names) and `role` (`prefill`, `decode`, `both`). A worker that
//! leaves the pool leaves the next scrape; one without a load report yet
//! has only its GPUs exported.

use std::sync::Mutex;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{GaugeVec, IntGaugeVec, Opts};

use super::pool::Pool;
use crate::error::Result;

/// Metric names (one place, per STYLE.md).
pub mod names {
    /// GPUs of each worker (TP x EP of its registered shape).
    pub const GPUS: &str = "rackscale_frontend_worker_gpus";
    /// Requests waiting at each worker, from its last load report.
    pub const QUEUE_DEPTH: &str = "rackscale_frontend_worker_queue_depth";
    /// Requests in each worker's running batch, from its last load report.
    pub const RUNNING: &str = "rackscale_frontend_worker_running";
    /// Fraction of each worker's KV blocks in use, from its last load report.
    pub const KV_USAGE: &str = "rackscale_frontend_worker_kv_usage";
}

const LABELS: [&str; 2] = ["worker", "role"];

/// A [`Collector`] over a [`Pool`]; register it in the frontend's registry.
#[derive(Debug)]
pub struct PoolCollector {
    pool: Pool,
    gauges: Mutex<Gauges>,
    descs: Vec<Desc>,
}

#[derive(Debug)]
struct Gauges {
    gpus: IntGaugeVec,
    queue_depth: IntGaugeVec,
    running: IntGaugeVec,
    kv_usage: GaugeVec,
}

impl Gauges {
    fn new() -> Result<Self> {
        Ok(Self {
            gpus: IntGaugeVec::new(Opts::new(names::GPUS, "GPUs of each worker"), &LABELS)?,
            queue_depth: IntGaugeVec::new(
                Opts::new(names::QUEUE_DEPTH, "Requests waiting at each worker"),
                &LABELS,
            )?,
            running: IntGaugeVec::new(
                Opts::new(names::RUNNING, "Requests in each worker's running batch"),
                &LABELS,
            )?,
            kv_usage: GaugeVec::new(
                Opts::new(
                    names::KV_USAGE,
                    "Fraction of each worker's KV blocks in use",
                ),
                &LABELS,
            )?,
        })
    }
}

impl PoolCollector {
    /// Exports `pool`'s workers (a clone shares the pool's members).
    pub fn new(pool: Pool) -> Result<Self> {
        let gauges = Gauges::new()?;
        let descs = [
            gauges.gpus.desc(),
            gauges.queue_depth.desc(),
            gauges.running.desc(),
            gauges.kv_usage.desc(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        Ok(Self {
            pool,
            gauges: Mutex::new(gauges),
            descs,
        })
    }
}

impl Collector for PoolCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // One scrape at a time: each starts from empty gauges, so workers
        // that left the pool are gone.
        let g = self
            .gauges
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.gpus.reset();
        g.queue_depth.reset();
        g.running.reset();
        g.kv_usage.reset();
        let (members, candidates) = self.pool.snapshot();
        for (member, candidate) in members.iter().zip(&candidates) {
            let labels = [candidate.name.as_str(), candidate.role.as_str()];
            let shape = member.record.shape;
            g.gpus
                .with_label_values(&labels)
                .set(i64::from(shape.tp) * i64::from(shape.ep));
            if let Some(load) = candidate.load {
                g.queue_depth
                    .with_label_values(&labels)
                    .set(i64::from(load.queue_depth));
                g.running
                    .with_label_values(&labels)
                    .set(i64::from(load.running));
                g.kv_usage.with_label_values(&labels).set(load.kv_usage());
            }
        }
        [
            g.gpus.collect(),
            g.queue_depth.collect(),
            g.running.collect(),
            g.kv_usage.collect(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::records::fixtures;
    use proto::types::{EngineLoad, Role, Shape};

    fn render(registry: &prometheus::Registry) -> String {
        prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .expect("encode")
    }

    // Members open lazy gRPC channels, which need a runtime.
    #[tokio::test]
    async fn exports_each_workers_gpus_and_last_load() {
        let pool = Pool::new(
            std::time::Duration::from_secs(1),
            proto::tls::ClientTls::plaintext(),
        );
        let mut decode = fixtures::worker("llm", "dsv4", "decode-0");
        decode.role = Role::Decode;
        decode.shape = Shape { tp: 1, ep: 8 };
        let mut prefill = fixtures::worker("llm", "dsv4", "prefill-0");
        prefill.role = Role::Prefill;
        prefill.shape = Shape { tp: 4, ep: 1 };
        pool.upsert(decode);
        pool.upsert(prefill);
        pool.set_load(
            "decode-0",
            Some(EngineLoad {
                queue_depth: 3,
                running: 5,
                kv_blocks_used: 1,
                kv_blocks_total: 4,
                ..EngineLoad::default()
            }),
        );
        let registry = prometheus::Registry::new();
        registry
            .register(Box::new(PoolCollector::new(pool.clone()).expect("new")))
            .expect("register");
        let text = render(&registry);
        for line in [
            r#"rackscale_frontend_worker_gpus{role="decode",worker="decode-0"} 8"#,
            r#"rackscale_frontend_worker_gpus{role="prefill",worker="prefill-0"} 4"#,
            r#"rackscale_frontend_worker_queue_depth{role="decode",worker="decode-0"} 3"#,
            r#"rackscale_frontend_worker_running{role="decode",worker="decode-0"} 5"#,
            r#"rackscale_frontend_worker_kv_usage{role="decode",worker="decode-0"} 0.25"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(!text.contains(r#"queue_depth{role="prefill""#), "{text}");

        pool.remove("decode-0");
        let text = render(&registry);
        assert!(!text.contains("decode-0"), "{text}");
        assert!(text.contains("prefill-0"), "{text}");
    }
}
