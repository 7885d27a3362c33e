//! Prometheus metrics of one engine worker, including the Gateway API
//! Inference Extension gauges under their vLLM names so an inference gateway
//! can pick endpoints without knowing rackscale.
//!
//! The scheduler keeps the gauges current (it publishes after every loop
//! turn); [`crate::server`] serves [`EngineMetrics::render`] as `GET /metrics`.

use prometheus::{Gauge, IntCounter, IntGauge, Registry, TextEncoder};

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

/// Handles on the registered metrics, and the registry they were registered
/// into (what `/metrics` exposes); cheap to clone.
#[derive(Debug, Clone)]
pub struct EngineMetrics {
    registry: Registry,
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
    /// Metrics not registered anywhere (tests, or when none are served);
    /// [`Self::render`] then renders nothing.
    pub fn unregistered() -> Result<Self> {
        Ok(Self {
            registry: Registry::new(),
            waiting: IntGauge::new(names::WAITING, "Requests waiting to be scheduled")?,
            running: IntGauge::new(names::RUNNING, "Requests in the running batch")?,
            kv_usage: Gauge::new(names::KV_USAGE, "Fraction of KV cache blocks in use")?,
            kv_received_bytes: IntCounter::new(names::KV_RECEIVED, "KV bytes pulled in")?,
            kv_sent_bytes: IntCounter::new(names::KV_SENT, "KV bytes streamed out")?,
        })
    }

    /// Creates the metrics and registers them into `registry`, which
    /// [`Self::render`] then exposes whole (with anything else the caller
    /// registered there).
    pub fn register(registry: &Registry) -> Result<Self> {
        let m = Self {
            registry: registry.clone(),
            ..Self::unregistered()?
        };
        registry.register(Box::new(m.waiting.clone()))?;
        registry.register(Box::new(m.running.clone()))?;
        registry.register(Box::new(m.kv_usage.clone()))?;
        registry.register(Box::new(m.kv_received_bytes.clone()))?;
        registry.register(Box::new(m.kv_sent_bytes.clone()))?;
        Ok(m)
    }

    /// The registry [`Self::render`] exposes, for other components of the
    /// worker to register their metrics into (the OpenAI surface's).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The registry in the Prometheus text exposition format.
    pub fn render(&self) -> Result<String> {
        Ok(TextEncoder::new().encode_to_string(&self.registry.gather())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_vllm_gauge_names() {
        let registry = Registry::new();
        let m = EngineMetrics::register(&registry).expect("register");
        m.waiting.set(3);
        m.kv_usage.set(0.25);
        let text = m.render().expect("render");
        assert!(text.contains("vllm:num_requests_waiting 3"), "{text}");
        assert!(text.contains("vllm:num_requests_running 0"), "{text}");
        assert!(text.contains("vllm:kv_cache_usage_perc 0.25"), "{text}");
    }
}
