//! Prometheus metrics of one engine worker, including the Gateway API
//! Inference Extension gauges under their vLLM names so an inference gateway
//! can pick endpoints without knowing rackscale.

use prometheus::{Gauge, IntCounter, IntGauge, Registry};

use crate::error::Result;

/// Metric names (one place, per STYLE.md).
pub mod names {
    /// Requests waiting to be scheduled (vLLM name, read by the GIE).
    pub const WAITING: &str = "vllm:num_requests_waiting";
    /// Requests in the running batch (vLLM name).
    pub const RUNNING: &str = "vllm:num_requests_running";
    /// Fraction of KV blocks in use, 0..1 (vLLM name).
    pub const KV_USAGE: &str = "vllm:kv_cache_usage_perc";
    /// KV bytes received through `PullKv`.
    pub const KV_RECEIVED: &str = "rackscale_engine_kv_received_bytes_total";
    /// KV bytes sent through `PullKv`.
    pub const KV_SENT: &str = "rackscale_engine_kv_sent_bytes_total";
}

/// Handles on the registered metrics; cheap to clone.
#[derive(Debug, Clone)]
pub struct EngineMetrics {
    /// [`names::WAITING`].
    pub waiting: IntGauge,
    /// [`names::RUNNING`].
    pub running: IntGauge,
    /// [`names::KV_USAGE`].
    pub kv_usage: Gauge,
    /// [`names::KV_RECEIVED`].
    pub kv_received_bytes: IntCounter,
    /// [`names::KV_SENT`].
    pub kv_sent_bytes: IntCounter,
}

impl EngineMetrics {
    /// Metrics not registered anywhere (tests, or when none are served).
    pub fn unregistered() -> Result<Self> {
        Ok(Self {
            waiting: IntGauge::new(names::WAITING, "Requests waiting to be scheduled")?,
            running: IntGauge::new(names::RUNNING, "Requests in the running batch")?,
            kv_usage: Gauge::new(names::KV_USAGE, "Fraction of KV cache blocks in use")?,
            kv_received_bytes: IntCounter::new(names::KV_RECEIVED, "KV bytes pulled in")?,
            kv_sent_bytes: IntCounter::new(names::KV_SENT, "KV bytes streamed out")?,
        })
    }

    /// Creates the metrics and registers them into `registry`.
    pub fn register(registry: &Registry) -> Result<Self> {
        let m = Self::unregistered()?;
        registry.register(Box::new(m.waiting.clone()))?;
        registry.register(Box::new(m.running.clone()))?;
        registry.register(Box::new(m.kv_usage.clone()))?;
        registry.register(Box::new(m.kv_received_bytes.clone()))?;
        registry.register(Box::new(m.kv_sent_bytes.clone()))?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Encoder;

    #[test]
    fn exposes_vllm_gauge_names() {
        let registry = Registry::new();
        let m = EngineMetrics::register(&registry).expect("register");
        m.waiting.set(3);
        m.kv_usage.set(0.25);
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .expect("encode");
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.contains("vllm:num_requests_waiting 3"), "{text}");
        assert!(text.contains("vllm:num_requests_running 0"), "{text}");
        assert!(text.contains("vllm:kv_cache_usage_perc 0.25"), "{text}");
    }
}
