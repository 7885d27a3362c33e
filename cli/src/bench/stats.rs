//! The benchmark's figures, from finished requests, in InferenceX terms.
//!
//! Pure arithmetic over [`Record`]s; no clocks, no I/O. Definitions:
//!
//! - percentiles: linear interpolation between closest ranks (NumPy's
//!   default, which vLLM's and SGLang's benchmark scripts use): for sorted
//!   `x[0..n]` and `p` in [0, 100], rank `h = (n - 1) p / 100`, value
//!   `x[⌊h⌋] + (h - ⌊h⌋)(x[⌊h⌋+1] - x[⌊h⌋])`;
//! - the measured window runs from the first measured request's send to the
//!   last one's end (success or failure);
//! - TPOT of a request = (e2e − TTFT) / (output tokens − 1), defined only for
//!   more than one output token;
//! - total tok/s/GPU = (input + output tokens of successful requests) /
//!   window / GPUs; output tok/s/GPU likewise with output tokens only;
//! - tok/s/user = 1000 / median TPOT in ms;
//! - ITL percentiles pool every gap between content chunks of successful
//!   requests; TTFT, TPOT and e2e take one value per successful request;
//! - achieved concurrency = Σ request durations (all outcomes) / window, the
//!   mean number of requests in flight (Little's law).

use std::collections::BTreeMap;

use serde::Serialize;

/// One finished request, timed from its send.
#[derive(Debug, Clone)]
pub struct Record {
    /// Send time, seconds since the benchmark started.
    pub start_s: f64,
    /// Send to end of the response (or to the failure), seconds.
    pub duration_s: f64,
    pub outcome: Result<Success, Failure>,
}

impl Record {
    /// End of the response (or the failure), seconds since the benchmark started.
    pub fn end_s(&self) -> f64 {
        self.start_s + self.duration_s
    }
}

/// What a successful (streamed to `[DONE]`, with content) request measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Success {
    /// Send to first content chunk, seconds.
    pub ttft_s: f64,
    /// Send to `[DONE]`, seconds.
    pub e2e_s: f64,
    /// Gaps between consecutive content chunks, seconds.
    pub itl_s: Vec<f64>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Token counts came from the server's usage chunk, not from counting.
    pub usage_reported: bool,
}

impl Success {
    /// (e2e − TTFT) / (output tokens − 1), seconds; `None` for one token.
    pub fn tpot_s(&self) -> Option<f64> {
        (self.output_tokens > 1)
            .then(|| (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) as f64)
    }
}

/// Why a request failed: a bounded kind and the server's or client's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FailureKind {
    /// The server answered with a non-2xx status.
    Http(u16),
    /// An error object arrived in the stream.
    ErrorEvent,
    /// The stream ended before `[DONE]`.
    Incomplete,
    /// `[DONE]` without any content.
    EmptyOutput,
    /// A `data:` payload that is not JSON.
    InvalidChunk,
    /// No answer within the per-request timeout.
    Timeout,
    /// Could not connect.
    Connect,
    /// Any other transport error (reset, protocol).
    Transport,
}

impl FailureKind {
    /// A stable label: `http_<status>`, `error_event`, `incomplete_stream`,
    /// `empty_output`, `invalid_chunk`, `timeout`, `connect`, `transport`.
    pub fn reason(self) -> String {
        match self {
            FailureKind::Http(status) => format!("http_{status}"),
            FailureKind::ErrorEvent => "error_event".into(),
            FailureKind::Incomplete => "incomplete_stream".into(),
            FailureKind::EmptyOutput => "empty_output".into(),
            FailureKind::InvalidChunk => "invalid_chunk".into(),
            FailureKind::Timeout => "timeout".into(),
            FailureKind::Connect => "connect".into(),
            FailureKind::Transport => "transport".into(),
        }
    }
}

/// Percentile `p` (0–100) of ascending `sorted` by linear interpolation.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let (&first, &last) = (sorted.first()?, sorted.last()?);
    let h = (sorted.len() - 1) as f64 * p.clamp(0.0, 100.0) / 100.0;
    let lo = h.floor() as usize;
    if lo + 1 >= sorted.len() {
        return Some(if lo == 0 { first } else { last });
    }
    Some(sorted[lo] + (h - lo as f64) * (sorted[lo + 1] - sorted[lo]))
}

/// Distribution of one latency, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    /// Summary of values given in seconds; `None` when there are none.
    pub fn of_seconds(values: impl IntoIterator<Item = f64>) -> Option<Self> {
        let mut ms: Vec<f64> = values.into_iter().map(|s| s * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        let pct = |p| percentile(&ms, p);
        Some(Self {
            count: ms.len(),
            mean: ms.iter().sum::<f64>() / ms.len() as f64,
            p50: pct(50.0)?,
            p90: pct(90.0)?,
            p99: pct(99.0)?,
            max: *ms.last()?,
        })
    }
}

/// Failures of one reason, with the first message seen as an example.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailureCount {
    pub reason: String,
    pub count: usize,
    pub example: String,
}

/// The figures of one measured window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figures {
    /// Length of the measured window, seconds.
    pub duration_s: f64,
    pub successful: usize,
    pub failed: usize,
    /// By count, most frequent first.
    pub failures: Vec<FailureCount>,
    /// Successful requests whose token counts were counted from chunks
    /// because the server sent no usage.
    pub requests_without_usage: usize,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub gpus: u32,
    pub request_throughput_per_s: f64,
    pub total_tokens_per_s: f64,
    pub output_tokens_per_s: f64,
    pub total_tokens_per_s_per_gpu: f64,
    pub output_tokens_per_s_per_gpu: f64,
    /// 1000 / median TPOT in ms; `None` without a TPOT sample.
    pub tokens_per_s_per_user: Option<f64>,
    pub achieved_concurrency: f64,
    pub ttft_ms: Option<Summary>,
    pub tpot_ms: Option<Summary>,
    pub itl_ms: Option<Summary>,
    pub e2e_ms: Option<Summary>,
}

/// Figures of `records` (the measured requests only) normalised by `gpus`,
/// over the window from the first send to the last end.
pub fn aggregate(records: &[Record], gpus: u32) -> Figures {
    aggregate_from(records, gpus, None)
}

/// Figures of `records` over the window from `window_start` (default: the
/// first send) to the last end.
pub fn aggregate_from(records: &[Record], gpus: u32, window_start: Option<f64>) -> Figures {
    let start = window_start.unwrap_or_else(|| {
        records
            .iter()
            .map(|r| r.start_s)
            .fold(f64::INFINITY, f64::min)
    });
    let end = records
        .iter()
        .map(|r| r.start_s + r.duration_s)
        .fold(f64::NEG_INFINITY, f64::max);
    let duration_s = if records.is_empty() { 0.0 } else { end - start };
    let per_s = |x: f64| {
        if duration_s > 0.0 {
            x / duration_s
        } else {
            0.0
        }
    };

    let ok: Vec<&Success> = records
        .iter()
        .filter_map(|r| r.outcome.as_ref().ok())
        .collect();
    let input_tokens: u64 = ok.iter().map(|s| s.input_tokens).sum();
    let output_tokens: u64 = ok.iter().map(|s| s.output_tokens).sum();

    let mut by_reason: BTreeMap<String, FailureCount> = BTreeMap::new();
    for failure in records.iter().filter_map(|r| r.outcome.as_ref().err()) {
        let reason = failure.kind.reason();
        by_reason
            .entry(reason.clone())
            .or_insert_with(|| FailureCount {
                reason,
                count: 0,
                example: failure.message.clone(),
            })
            .count += 1;
    }
    let mut failures: Vec<FailureCount> = by_reason.into_values().collect();
    failures.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.reason.cmp(&b.reason)));

    let tpot_ms = Summary::of_seconds(ok.iter().filter_map(|s| s.tpot_s()));
    let total_tokens_per_s = per_s((input_tokens + output_tokens) as f64);
    let output_tokens_per_s = per_s(output_tokens as f64);
    let gpus_f = f64::from(gpus.max(1));
    Figures {
        duration_s,
        successful: ok.len(),
        failed: records.len() - ok.len(),
        failures,
        requests_without_usage: ok.iter().filter(|s| !s.usage_reported).count(),
        input_tokens,
        output_tokens,
        gpus,
        request_throughput_per_s: per_s(ok.len() as f64),
        total_tokens_per_s,
        output_tokens_per_s,
        total_tokens_per_s_per_gpu: total_tokens_per_s / gpus_f,
        output_tokens_per_s_per_gpu: output_tokens_per_s / gpus_f,
        tokens_per_s_per_user: tpot_ms
            .as_ref()
            .filter(|t| t.p50 > 0.0)
            .map(|t| 1000.0 / t.p50),
        achieved_concurrency: per_s(records.iter().map(|r| r.duration_s).sum()),
        ttft_ms: Summary::of_seconds(ok.iter().map(|s| s.ttft_s)),
        tpot_ms,
        itl_ms: Summary::of_seconds(ok.iter().flat_map(|s| s.itl_s.iter().copied())),
        e2e_ms: Summary::of_seconds(ok.iter().map(|s| s.e2e_s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let x = [1.0, 2.0, 3.0, 4.0];
        // h = 3p/100: p50 -> 1.5 -> 2.5; p90 -> 2.7 -> 3.7; p99 -> 2.97 -> 3.97.
        assert_eq!(percentile(&x, 50.0), Some(2.5));
        assert!(close(percentile(&x, 90.0).unwrap(), 3.7));
        assert!(close(percentile(&x, 99.0).unwrap(), 3.97));
        assert_eq!(percentile(&x, 0.0), Some(1.0));
        assert_eq!(percentile(&x, 100.0), Some(4.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
        // 1..=101: p90 lands exactly on 91.
        let y: Vec<f64> = (1..=101).map(f64::from).collect();
        assert_eq!(percentile(&y, 90.0), Some(91.0));
    }

    #[test]
    fn summary_in_milliseconds() {
        let s = Summary::of_seconds([0.004, 0.001, 0.003, 0.002]).unwrap();
        assert_eq!(s.count, 4);
        assert!(close(s.mean, 2.5));
        assert!(close(s.p50, 2.5));
        assert!(close(s.max, 4.0));
        assert!(Summary::of_seconds([]).is_none());
    }

    fn ok(start: f64, ttft: f64, e2e: f64, input: u64, output: u64) -> Record {
        Record {
            start_s: start,
            duration_s: e2e,
            outcome: Ok(Success {
                ttft_s: ttft,
                e2e_s: e2e,
                itl_s: vec![
                    (e2e - ttft) / (output.max(2) - 1) as f64;
                    output.saturating_sub(1) as usize
                ],
                input_tokens: input,
                output_tokens: output,
                usage_reported: true,
            }),
        }
    }

    fn failed(start: f64, duration: f64, kind: FailureKind, message: &str) -> Record {
        Record {
            start_s: start,
            duration_s: duration,
            outcome: Err(Failure {
                kind,
                message: message.into(),
            }),
        }
    }

    #[test]
    fn tpot_needs_two_tokens() {
        let one = ok(0.0, 0.1, 0.1, 10, 1);
        assert_eq!(one.outcome.unwrap().tpot_s(), None);
        let s = ok(0.0, 0.1, 1.1, 10, 101).outcome.unwrap();
        assert!(close(s.tpot_s().unwrap(), 0.01));
    }

    #[test]
    fn inferencex_figures_by_hand() {
        // Three successes and one failure over a 4 s window, 2 GPUs.
        //   a: start 0, TTFT 0.2, e2e 2.2, 1000 in, 101 out -> TPOT 20 ms
        //   b: start 1, TTFT 0.4, e2e 3.0, 2000 in,  53 out -> TPOT 50 ms
        //   c: start 2, TTFT 0.3, e2e 1.3,  500 in,  11 out -> TPOT 100 ms
        //   d: start 3, failed after 1.0 s (ends at 4.0: the window's end)
        let records = vec![
            ok(0.0, 0.2, 2.2, 1000, 101),
            ok(1.0, 0.4, 3.0, 2000, 53),
            ok(2.0, 0.3, 1.3, 500, 11),
            failed(3.0, 1.0, FailureKind::Http(429), "slow down"),
        ];
        let f = aggregate(&records, 2);
        assert!(close(f.duration_s, 4.0));
        assert_eq!((f.successful, f.failed), (3, 1));
        assert_eq!((f.input_tokens, f.output_tokens), (3500, 165));
        // (3500 + 165) / 4 s / 2 GPUs
        assert!(close(f.total_tokens_per_s, 916.25));
        assert!(close(f.total_tokens_per_s_per_gpu, 458.125));
        assert!(close(f.output_tokens_per_s_per_gpu, 165.0 / 4.0 / 2.0));
        assert!(close(f.request_throughput_per_s, 0.75));
        // median TPOT = 50 ms -> 20 tok/s/user
        let tpot = f.tpot_ms.as_ref().unwrap();
        assert!(close(tpot.p50, 50.0));
        assert!(close(f.tokens_per_s_per_user.unwrap(), 20.0));
        // TTFT sorted 200, 300, 400 ms: p90 at rank 1.8 -> 380 ms
        let ttft = f.ttft_ms.as_ref().unwrap();
        assert!(close(ttft.p50, 300.0));
        assert!(close(ttft.p90, 380.0));
        assert!(close(ttft.p99, 398.0));
        // (2.2 + 3.0 + 1.3 + 1.0) / 4
        assert!(close(f.achieved_concurrency, 1.875));
        // ITL pools 100 + 52 + 10 gaps
        assert_eq!(f.itl_ms.as_ref().unwrap().count, 162);
        assert_eq!(
            f.failures,
            vec![FailureCount {
                reason: "http_429".into(),
                count: 1,
                example: "slow down".into()
            }]
        );
    }

    #[test]
    fn failures_grouped_by_reason_most_frequent_first() {
        let records = vec![
            failed(0.0, 1.0, FailureKind::Timeout, "t"),
            failed(0.0, 1.0, FailureKind::ErrorEvent, "first"),
            failed(0.0, 1.0, FailureKind::ErrorEvent, "second"),
            failed(0.0, 1.0, FailureKind::Http(503), "busy"),
        ];
        let f = aggregate(&records, 1);
        let got: Vec<(&str, usize, &str)> = f
            .failures
            .iter()
            .map(|c| (c.reason.as_str(), c.count, c.example.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("error_event", 2, "first"),
                ("http_503", 1, "busy"),
                ("timeout", 1, "t")
            ]
        );
        assert_eq!(f.successful, 0);
        assert_eq!(f.tokens_per_s_per_user, None);
        assert!(f.ttft_ms.is_none());
    }

    #[test]
    fn empty_run() {
        let f = aggregate(&[], 8);
        assert_eq!(f.duration_s, 0.0);
        assert_eq!(f.total_tokens_per_s_per_gpu, 0.0);
    }
}
