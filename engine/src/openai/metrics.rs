//! Prometheus metrics of the OpenAI surface, and [`RequestTimer`], which
//! records one request's latencies and outcome, on drop if nothing else
//! ended it (a client that went away counts as `cancelled`).
//!
//! Every latency is wall-clock time as the client sees it (with the
//! simulated backend that is modelled time divided by the time scale).
//! Labels are bounded: `endpoint` is `completions` or `chat_completions`,
//! `outcome` one of [`Outcome::as_str`].

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::time::Instant;

use super::error::Outcome;
use crate::error::Result;

/// Metric names (one place, per STYLE.md).
pub mod names {
    /// Requests answered, by `endpoint` and `outcome`.
    pub const REQUESTS: &str = "rackscale_frontend_requests_total";
    /// Requests being answered now, by `endpoint`.
    pub const IN_FLIGHT: &str = "rackscale_frontend_requests_in_flight";
    /// Seconds from the request's arrival to its first output token.
    pub const TTFT: &str = "rackscale_frontend_time_to_first_token_seconds";
    /// Seconds between consecutive output tokens of one request.
    pub const ITL: &str = "rackscale_frontend_inter_token_latency_seconds";
    /// Seconds from arrival to the last byte of a successful request.
    pub const E2E: &str = "rackscale_frontend_request_duration_seconds";
    /// Prompt tokens of successful requests.
    pub const PROMPT_TOKENS: &str = "rackscale_frontend_prompt_tokens_total";
    /// Output tokens of successful requests.
    pub const COMPLETION_TOKENS: &str = "rackscale_frontend_completion_tokens_total";
}

/// TTFT buckets: 1 ms to ~2 min (queueing under load reaches minutes).
const TTFT_BUCKETS: [f64; 18] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 120.0,
];
/// Inter-token buckets: 0.5 ms to 2.5 s (decode steps are tens of ms).
const ITL_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25,
    0.5, 2.5,
];
/// End-to-end buckets: 10 ms to 30 min.
const E2E_BUCKETS: [f64; 18] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0,
    1200.0, 1800.0,
];

/// Which endpoint a request came to (the `endpoint` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    ChatCompletions,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completions => "completions",
            Self::ChatCompletions => "chat_completions",
        }
    }
}

/// Handles on the registered metrics; cheap to clone.
#[derive(Debug, Clone)]
pub struct OpenAiMetrics {
    /// [`names::REQUESTS`].
    pub requests: IntCounterVec,
    /// [`names::IN_FLIGHT`].
    pub in_flight: IntGaugeVec,
    /// [`names::TTFT`].
    pub ttft: HistogramVec,
    /// [`names::ITL`].
    pub itl: HistogramVec,
    /// [`names::E2E`].
    pub e2e: HistogramVec,
    /// [`names::PROMPT_TOKENS`].
    pub prompt_tokens: IntCounterVec,
    /// [`names::COMPLETION_TOKENS`].
    pub completion_tokens: IntCounterVec,
}

impl OpenAiMetrics {
    /// Metrics registered nowhere (tests, or when none are exposed).
    pub fn unregistered() -> Result<Self> {
        let endpoint = &["endpoint"];
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                endpoint,
            )
        };
        let m = Self {
            requests: IntCounterVec::new(
                Opts::new(names::REQUESTS, "OpenAI requests answered, by outcome"),
                &["endpoint", "outcome"],
            )?,
            in_flight: IntGaugeVec::new(
                Opts::new(names::IN_FLIGHT, "OpenAI requests being answered"),
                endpoint,
            )?,
            ttft: histogram(
                names::TTFT,
                "Seconds to the first output token",
                &TTFT_BUCKETS,
            )?,
            itl: histogram(names::ITL, "Seconds between output tokens", &ITL_BUCKETS)?,
            e2e: histogram(
                names::E2E,
                "Seconds from arrival to the end of successful requests",
                &E2E_BUCKETS,
            )?,
            prompt_tokens: IntCounterVec::new(
                Opts::new(names::PROMPT_TOKENS, "Prompt tokens of successful requests"),
                endpoint,
            )?,
            completion_tokens: IntCounterVec::new(
                Opts::new(
                    names::COMPLETION_TOKENS,
                    "Output tokens of successful requests",
                ),
                endpoint,
            )?,
        };
        // Every series exists from the start, so rates and dashboards see 0.
        for e in [Endpoint::Completions, Endpoint::ChatCompletions] {
            for o in Outcome::ALL {
                m.requests.with_label_values(&[e.as_str(), o.as_str()]);
            }
            m.in_flight.with_label_values(&[e.as_str()]);
            m.prompt_tokens.with_label_values(&[e.as_str()]);
            m.completion_tokens.with_label_values(&[e.as_str()]);
        }
        Ok(m)
    }

    /// Creates the metrics and registers them into `registry`.
    pub fn register(registry: &Registry) -> Result<Self> {
        let m = Self::unregistered()?;
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.in_flight.clone()))?;
        registry.register(Box::new(m.ttft.clone()))?;
        registry.register(Box::new(m.itl.clone()))?;
        registry.register(Box::new(m.e2e.clone()))?;
        registry.register(Box::new(m.prompt_tokens.clone()))?;
        registry.register(Box::new(m.completion_tokens.clone()))?;
        Ok(m)
    }

    /// Starts timing a request that just arrived at `endpoint`.
    pub fn start(&self, endpoint: Endpoint) -> RequestTimer {
        self.in_flight.with_label_values(&[endpoint.as_str()]).inc();
        RequestTimer {
            metrics: self.clone(),
            endpoint,
            arrived: Instant::now(),
            last_token: None,
            ended: false,
        }
    }
}

/// One request's clock: in flight from [`OpenAiMetrics::start`] until
/// [`RequestTimer::end`] or drop (then `cancelled`).
#[derive(Debug)]
pub struct RequestTimer {
    metrics: OpenAiMetrics,
    endpoint: Endpoint,
    arrived: Instant,
    last_token: Option<Instant>,
    ended: bool,
}

impl RequestTimer {
    /// `n` output tokens arrived together: the first ever sets TTFT; later
    /// ones split the time since the previous arrival between them.
    pub fn tokens(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let now = Instant::now();
        let label = &[self.endpoint.as_str()];
        match self.last_token {
            None => {
                let ttft = now.duration_since(self.arrived).as_secs_f64();
                self.metrics.ttft.with_label_values(label).observe(ttft);
                let itl = self.metrics.itl.with_label_values(label);
                for _ in 1..n {
                    itl.observe(0.0);
                }
            }
            Some(last) => {
                let each = now.duration_since(last).as_secs_f64() / n as f64;
                let itl = self.metrics.itl.with_label_values(label);
                for _ in 0..n {
                    itl.observe(each);
                }
            }
        }
        self.last_token = Some(now);
    }

    /// Ends the request with `outcome`; `usage` (prompt, completion tokens)
    /// of a successful one is counted.
    pub fn end(mut self, outcome: Outcome, usage: Option<(u32, u32)>) {
        self.record(outcome, usage);
    }

    fn record(&mut self, outcome: Outcome, usage: Option<(u32, u32)>) {
        if self.ended {
            return;
        }
        self.ended = true;
        let m = &self.metrics;
        let e = self.endpoint.as_str();
        m.in_flight.with_label_values(&[e]).dec();
        m.requests.with_label_values(&[e, outcome.as_str()]).inc();
        if outcome == Outcome::Ok {
            m.e2e
                .with_label_values(&[e])
                .observe(self.arrived.elapsed().as_secs_f64());
        }
        if let Some((prompt, completion)) = usage {
            m.prompt_tokens
                .with_label_values(&[e])
                .inc_by(u64::from(prompt));
            m.completion_tokens
                .with_label_values(&[e])
                .inc_by(u64::from(completion));
        }
    }
}

impl Drop for RequestTimer {
    fn drop(&mut self) {
        self.record(Outcome::Cancelled, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_timer_records_ttft_itl_and_its_outcome_once() {
        let m = OpenAiMetrics::unregistered().expect("metrics");
        let label = &["completions"];
        let mut t = m.start(Endpoint::Completions);
        assert_eq!(m.in_flight.with_label_values(label).get(), 1);
        tokio::time::advance(std::time::Duration::from_millis(100)).await;
        t.tokens(1);
        tokio::time::advance(std::time::Duration::from_millis(20)).await;
        t.tokens(2);
        t.end(Outcome::Ok, Some((7, 3)));
        assert_eq!(m.in_flight.with_label_values(label).get(), 0);
        assert_eq!(
            m.requests.with_label_values(&["completions", "ok"]).get(),
            1
        );
        let ttft = m.ttft.with_label_values(label);
        assert_eq!(ttft.get_sample_count(), 1);
        assert!((ttft.get_sample_sum() - 0.1).abs() < 1e-9);
        let itl = m.itl.with_label_values(label);
        assert_eq!(itl.get_sample_count(), 2);
        assert!((itl.get_sample_sum() - 0.02).abs() < 1e-9);
        assert_eq!(m.completion_tokens.with_label_values(label).get(), 3);
        assert_eq!(m.e2e.with_label_values(label).get_sample_count(), 1);
    }

    #[test]
    fn a_dropped_timer_counts_as_cancelled() {
        let m = OpenAiMetrics::unregistered().expect("metrics");
        drop(m.start(Endpoint::ChatCompletions));
        let c = m
            .requests
            .with_label_values(&["chat_completions", "cancelled"]);
        assert_eq!(c.get(), 1);
        assert_eq!(
            m.in_flight.with_label_values(&["chat_completions"]).get(),
            0
        );
        let registry = Registry::new();
        OpenAiMetrics::register(&registry).expect("register");
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        assert!(names.contains(&names::REQUESTS.to_owned()), "{names:?}");
    }
}
