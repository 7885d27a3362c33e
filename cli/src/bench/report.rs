//! The report: what was run and what it measured, as JSON (field names are
//! documented in `docs/bench.md` and are a stable interface) or as a table.

use std::fmt::Write as _;

use serde::Serialize;

use super::Config;
use super::load::{Load, Stop};
use super::openai::Endpoint;
use super::stats::{Figures, Summary};

/// The run as configured, echoed into the report.
#[derive(Debug, Clone, Serialize)]
pub struct RunConfig {
    pub url: String,
    pub endpoint: Endpoint,
    pub model: String,
    pub isl: u32,
    pub osl: u32,
    pub seed: u64,
    /// `closed` or `open`.
    pub load: &'static str,
    pub concurrency: Option<u32>,
    pub request_rate: Option<f64>,
    pub max_concurrency: Option<u32>,
    pub requests: Option<u64>,
    pub duration_limit_s: Option<f64>,
    pub warmup: u64,
    /// `run` (first measured send to last end) or `steady` (last warmup
    /// completion to last measured completion, load never letting up).
    pub window: &'static str,
    pub timeout_s: f64,
}

impl RunConfig {
    pub(super) fn new(config: &Config, url: String, model: &str) -> Self {
        let (load, concurrency, request_rate, max_concurrency) = match config.load {
            Load::Closed { concurrency } => ("closed", Some(concurrency), None, None),
            Load::Open {
                rate,
                max_concurrency,
            } => ("open", None, Some(rate), max_concurrency),
        };
        let (requests, duration_limit_s) = match config.stop {
            Stop::Requests(n) => (Some(n), None),
            Stop::Duration(d) => (None, Some(d.as_secs_f64())),
        };
        Self {
            url,
            endpoint: config.endpoint,
            model: model.to_owned(),
            isl: config.workload.isl,
            osl: config.workload.osl,
            seed: config.workload.seed,
            load,
            concurrency,
            request_rate,
            max_concurrency,
            requests,
            duration_limit_s,
            warmup: config.warmup,
            window: if config.steady { "steady" } else { "run" },
            timeout_s: config.timeout.as_secs_f64(),
        }
    }
}

/// The whole report: `config` plus the figures at the top level.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub config: RunConfig,
    #[serde(flatten)]
    pub figures: Figures,
}

fn opt(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), |x| format!("{x:.1}"))
}

/// The report as a readable table.
pub fn render(report: &Report) -> String {
    let (c, f) = (&report.config, &report.figures);
    let mut out = String::new();
    let load = match (c.concurrency, c.request_rate) {
        (Some(n), _) => format!("closed loop, concurrency {n}"),
        (None, Some(rate)) => match c.max_concurrency {
            Some(m) => format!("open loop, {rate} req/s, at most {m} in flight"),
            None => format!("open loop, {rate} req/s"),
        },
        (None, None) => String::new(),
    };
    let gpus = if f.gpus == 1 { "GPU" } else { "GPUs" };
    let _ = writeln!(out, "endpoint     {}  model {}", c.url, c.model);
    let _ = writeln!(
        out,
        "workload     ISL {} OSL {} (each 80-100%), seed {}, {load}, {} warmup, {} window",
        c.isl, c.osl, c.seed, c.warmup, c.window
    );
    let _ = writeln!(
        out,
        "requests     {} ok, {} failed in {:.2} s: {:.2} req/s, achieved concurrency {:.2}",
        f.successful, f.failed, f.duration_s, f.request_throughput_per_s, f.achieved_concurrency
    );
    let _ = writeln!(
        out,
        "tokens       {} in, {} out",
        f.input_tokens, f.output_tokens
    );
    let _ = writeln!(
        out,
        "tok/s/GPU    {:.1} total, {:.1} output ({} {gpus})",
        f.total_tokens_per_s_per_gpu, f.output_tokens_per_s_per_gpu, f.gpus
    );
    let _ = writeln!(out, "tok/s/user   {}", opt(f.tokens_per_s_per_user));
    let _ = writeln!(
        out,
        "\n{:<12} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "latency ms", "mean", "p50", "p90", "p99", "max"
    );
    for (name, summary) in [
        ("TTFT", &f.ttft_ms),
        ("TPOT", &f.tpot_ms),
        ("ITL", &f.itl_ms),
        ("e2e", &f.e2e_ms),
    ] {
        let row = |s: &Summary| {
            format!(
                "{:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                s.mean, s.p50, s.p90, s.p99, s.max
            )
        };
        let cells = summary.as_ref().map_or_else(|| format!("{:>9}", "-"), row);
        let _ = writeln!(out, "{name:<12} {cells}");
    }
    if f.requests_without_usage > 0 {
        let _ = writeln!(
            out,
            "\n{} requests had no usage chunk: their tokens were counted one per chunk",
            f.requests_without_usage
        );
    }
    if !f.failures.is_empty() {
        let _ = writeln!(out, "\nfailures");
        for failure in &f.failures {
            let _ = writeln!(
                out,
                "  {:<18} {:>6}  e.g. {}",
                failure.reason, failure.count, failure.example
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::stats::{Failure, FailureKind, Record, Success, aggregate};
    use super::*;

    #[test]
    fn table_and_json_carry_the_figures() {
        let records = vec![
            Record {
                start_s: 0.0,
                duration_s: 1.0,
                outcome: Ok(Success {
                    ttft_s: 0.1,
                    e2e_s: 1.0,
                    itl_s: vec![0.1; 9],
                    input_tokens: 100,
                    output_tokens: 10,
                    usage_reported: false,
                }),
            },
            Record {
                start_s: 0.5,
                duration_s: 0.1,
                outcome: Err(Failure {
                    kind: FailureKind::Http(429),
                    message: "429 Too Many Requests".into(),
                }),
            },
        ];
        let report = Report {
            config: RunConfig {
                url: "http://h/v1/completions".into(),
                endpoint: Endpoint::Completions,
                model: "m".into(),
                isl: 100,
                osl: 10,
                seed: 0,
                load: "closed",
                concurrency: Some(2),
                request_rate: None,
                max_concurrency: None,
                requests: Some(2),
                duration_limit_s: None,
                warmup: 0,
                window: "run",
                timeout_s: 600.0,
            },
            figures: aggregate(&records, 1),
        };
        let table = render(&report);
        assert!(table.contains("tok/s/user   10.0"), "{table}");
        assert!(table.contains("http_429"), "{table}");
        assert!(table.contains("no usage chunk"), "{table}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["config"]["load"], "closed");
        assert_eq!(json["config"]["endpoint"], "completions");
        assert_eq!(json["successful"], 1);
        assert_eq!(json["failures"][0]["reason"], "http_429");
        let tpot = json["tpot_ms"]["p50"].as_f64().unwrap();
        assert!((tpot - 100.0).abs() < 1e-9, "{tpot}");
    }
}
