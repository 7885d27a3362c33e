//! A real Prometheus server on loopback (Debian's `prometheus`, installed
//! by `scripts/setup.sh prometheus`), scraping the targets a test names
//! every second, and its HTTP API: targets' health and instant queries.
//!
//! The configuration is static: each [`ScrapeTarget`] carries the labels a
//! Prometheus Operator PodMonitor of the chart would attach in a cluster
//! (`job`, `namespace`, `pod`, ...), so dashboards select the same series
//! here as there. Storage lives in the instance's [`Workdir`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::process::{ManagedProcess, StartFailure, free_port, start_with_retries};
use crate::wait::{POLL_INTERVAL, wait_for};
use crate::workdir::Workdir;

/// Overrides where the prometheus binary is taken from.
pub const ENV_PROMETHEUS: &str = "RACKSCALE_PROMETHEUS";
/// How often every target is scraped.
pub const SCRAPE_INTERVAL: &str = "1s";
/// How long Prometheus may take to answer `/-/ready`.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One endpoint to scrape and the labels its series get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrapeTarget {
    /// The `job` label.
    pub job: String,
    /// `host:port` serving `/metrics`.
    pub address: String,
    /// More target labels (`namespace`, `pod`, `deployment`, ...).
    pub labels: BTreeMap<String, String>,
}

impl ScrapeTarget {
    /// A target of `job` at `address`, without extra labels.
    pub fn new(job: &str, address: &str) -> Self {
        Self {
            job: job.to_owned(),
            address: address.to_owned(),
            labels: BTreeMap::new(),
        }
    }

    /// Adds the target label `name="value"`.
    pub fn label(mut self, name: &str, value: &str) -> Self {
        self.labels.insert(name.to_owned(), value.to_owned());
        self
    }
}

/// The prometheus binary: `$RACKSCALE_PROMETHEUS`, the bin dir, or `PATH`
/// (Debian's package puts it in /usr/bin).
pub fn binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(ENV_PROMETHEUS).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let in_bin_dir = crate::bins::bin_dir().join("prometheus");
    if in_bin_dir.is_file() {
        return Ok(in_bin_dir);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("prometheus"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!(
                "prometheus not found on PATH: run `make setup` (or `scripts/setup.sh prometheus`, \
                 which installs Debian's package), or point {ENV_PROMETHEUS} at the binary"
            )
        })
}

/// The configuration file scraping `targets` every [`SCRAPE_INTERVAL`]:
/// one `static_configs` entry per target, grouped into scrape jobs by
/// `job`.
pub fn config_yaml(targets: &[ScrapeTarget]) -> Result<String> {
    let mut jobs: BTreeMap<&str, Vec<serde_json::Value>> = BTreeMap::new();
    for t in targets {
        if t.labels.contains_key("job") || t.labels.contains_key("instance") {
            bail!(
                "target {}: `job` and `instance` are set by the scrape config, not as labels",
                t.address
            );
        }
        jobs.entry(&t.job).or_default().push(serde_json::json!({
            "targets": [t.address],
            "labels": t.labels,
        }));
    }
    let scrape_configs: Vec<serde_json::Value> = jobs
        .into_iter()
        .map(|(job, static_configs)| {
            serde_json::json!({
                "job_name": job,
                "scrape_interval": SCRAPE_INTERVAL,
                "scrape_timeout": SCRAPE_INTERVAL,
                "static_configs": static_configs,
            })
        })
        .collect();
    let config = serde_json::json!({
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": scrape_configs,
    });
    serde_yaml::to_string(&config).context("serialising the Prometheus config")
}

/// A running Prometheus; killed on drop, its directory kept when the test
/// failed.
#[derive(Debug)]
pub struct Prometheus {
    // Field order is drop order: kill the process before removing its dir.
    process: ManagedProcess,
    address: String,
    workdir: Workdir,
}

/// One series of an instant query: its labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    /// The value as Prometheus printed it (`NaN` and `+Inf` included).
    pub value: f64,
}

#[derive(Debug, Deserialize)]
struct ApiResponse {
    status: String,
    #[serde(default)]
    data: serde_json::Value,
    #[serde(default)]
    error: Option<String>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` and waits until it is ready.
    pub async fn start(targets: &[ScrapeTarget]) -> Result<Self> {
        let binary = binary()?;
        let config = config_yaml(targets)?;
        start_with_retries("prometheus", || Self::try_start(&binary, &config)).await
    }

    async fn try_start(binary: &std::path::Path, config: &str) -> Result<Self, StartFailure> {
        let mut workdir = Workdir::new("prometheus")?;
        let dir = workdir.path().to_path_buf();
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).context("writing prometheus.yml")?;
        let address = format!("127.0.0.1:{}", free_port()?);
        let args = vec![
            format!("--config.file={}", config_path.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address={address}"),
            "--storage.tsdb.retention.time=1h".to_owned(),
            "--log.level=info".to_owned(),
        ];
        let mut process = ManagedProcess::spawn("prometheus", binary, &args, &dir)?;
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            process.ensure_running()?;
            if let Ok((200, _)) = http_request(&address, "GET", "/-/ready", None).await {
                return Ok(Self {
                    process,
                    address,
                    workdir,
                });
            }
            if tokio::time::Instant::now() >= deadline {
                workdir.keep();
                return Err(StartFailure::Failed(anyhow!(
                    "prometheus at {address} not ready within {START_TIMEOUT:?}; log:\n{}",
                    process.log_tail(30)
                )));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// `host:port` of the HTTP API.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The instance's directory (config, data, `prometheus.log`).
    pub fn workdir(&self) -> &std::path::Path {
        self.workdir.path()
    }

    /// The last lines of Prometheus' log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// Every active target's scrape URL and health (`up`, `down`,
    /// `unknown`) with its last error.
    pub async fn targets(&self) -> Result<Vec<(String, String, String)>> {
        let data = self
            .api("GET", "/api/v1/targets?state=active", None)
            .await?;
        let active = data["activeTargets"]
            .as_array()
            .ok_or_else(|| anyhow!("no activeTargets in {data}"))?;
        Ok(active
            .iter()
            .map(|t| {
                let s = |k: &str| t[k].as_str().unwrap_or_default().to_owned();
                (s("scrapeUrl"), s("health"), s("lastError"))
            })
            .collect())
    }

    /// Waits until every target has been scraped successfully.
    pub async fn wait_targets_up(&self, timeout: Duration) -> Result<()> {
        wait_for("every Prometheus target up", timeout, || async {
            let targets = self.targets().await?;
            let down: Vec<String> = targets
                .iter()
                .filter(|(_, health, _)| health != "up")
                .map(|(url, health, err)| format!("{url}: {health} {err}"))
                .collect();
            if down.is_empty() && !targets.is_empty() {
                Ok(Some(()))
            } else {
                Err(anyhow!("targets not up: {}", down.join("; ")))
            }
        })
        .await
    }

    /// Evaluates `expr` now through `/api/v1/query`; a PromQL error (bad
    /// syntax, unknown function, wrong types) is an `Err` with Prometheus'
    /// message. Scalars and strings come back as one unlabelled sample.
    pub async fn query(&self, expr: &str) -> Result<Vec<Sample>> {
        let body = format!("query={}", url_encode(expr));
        let data = self.api("POST", "/api/v1/query", Some(&body)).await?;
        parse_result(&data)
    }

    async fn api(&self, method: &str, path: &str, form: Option<&str>) -> Result<serde_json::Value> {
        let (status, body) = http_request(&self.address, method, path, form).await?;
        let response: ApiResponse = serde_json::from_str(&body)
            .with_context(|| format!("HTTP {status} from {path}: {body}"))?;
        if response.status != "success" {
            bail!(
                "{} ({})",
                response.error.unwrap_or_default(),
                response.error_type.unwrap_or_default()
            );
        }
        Ok(response.data)
    }
}

/// The samples of an instant query's `data`.
pub fn parse_result(data: &serde_json::Value) -> Result<Vec<Sample>> {
    let value_of = |v: &serde_json::Value| -> Result<f64> {
        let text = v[1]
            .as_str()
            .ok_or_else(|| anyhow!("sample without a value: {v}"))?;
        text.parse::<f64>()
            .with_context(|| format!("sample value {text:?}"))
    };
    match data["resultType"].as_str() {
        Some("vector") => data["result"]
            .as_array()
            .ok_or_else(|| anyhow!("vector without result: {data}"))?
            .iter()
            .map(|s| {
                let labels = serde_json::from_value(s["metric"].clone())
                    .context("series labels are not strings")?;
                Ok(Sample {
                    labels,
                    value: value_of(&s["value"])?,
                })
            })
            .collect(),
        Some("scalar") | Some("string") => Ok(vec![Sample {
            labels: BTreeMap::new(),
            value: value_of(&data["result"]).unwrap_or(f64::NAN),
        }]),
        other => bail!("unexpected resultType {other:?} (an instant query gives vector or scalar)"),
    }
}

/// Percent-encodes `s` for an `application/x-www-form-urlencoded` body.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b))
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// One HTTP/1.0 request to `address` (so the answer is neither chunked nor
/// kept alive); returns the status and body.
async fn http_request(
    address: &str,
    method: &str,
    path: &str,
    form: Option<&str>,
) -> Result<(u16, String)> {
    let mut stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(address),
    )
    .await
    .with_context(|| format!("connecting to {address}"))??;
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: {address}\r\n");
    if let Some(body) = form {
        request.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
        request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    } else {
        request.push_str("\r\n");
    }
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut response))
        .await
        .with_context(|| format!("reading the answer to {method} {path}"))??;
    let text = String::from_utf8(response).context("non-UTF-8 HTTP answer")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no header end in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("no status line in {head:?}"))?
        .parse()
        .context("status code")?;
    Ok((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_groups_targets_by_job_with_their_labels() {
        let targets = [
            ScrapeTarget::new("rackscale-agent", "127.0.0.1:1").label("node", "a"),
            ScrapeTarget::new("rackscale-operator", "127.0.0.1:2"),
            ScrapeTarget::new("rackscale-agent", "127.0.0.1:3").label("node", "b"),
        ];
        let yaml = config_yaml(&targets).unwrap();
        let doc: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
        let jobs = doc["scrape_configs"].as_array().unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0]["job_name"], "rackscale-agent");
        assert_eq!(jobs[0]["static_configs"][1]["targets"][0], "127.0.0.1:3");
        assert_eq!(jobs[0]["static_configs"][1]["labels"]["node"], "b");
        assert_eq!(doc["global"]["scrape_interval"], SCRAPE_INTERVAL);
    }

    #[test]
    fn job_is_not_a_free_label() {
        let t = ScrapeTarget::new("a", "127.0.0.1:1").label("job", "b");
        assert!(config_yaml(&[t]).is_err());
    }

    #[test]
    fn url_encoding_escapes_promql() {
        assert_eq!(
            url_encode(r#"sum(up{job="a"}) / 2"#),
            "sum%28up%7Bjob%3D%22a%22%7D%29%20%2F%202"
        );
    }

    #[test]
    fn parses_vectors_and_scalars() {
        let vector = serde_json::json!({"resultType": "vector", "result": [
            {"metric": {"job": "a"}, "value": [1.0, "2.5"]},
            {"metric": {}, "value": [1.0, "NaN"]},
        ]});
        let samples = parse_result(&vector).unwrap();
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].labels["job"], "a");
        assert_eq!(samples[0].value, 2.5);
        assert!(samples[1].value.is_nan());
        let scalar = serde_json::json!({"resultType": "scalar", "result": [1.0, "3"]});
        assert_eq!(parse_result(&scalar).unwrap()[0].value, 3.0);
        let matrix = serde_json::json!({"resultType": "matrix", "result": []});
        assert!(parse_result(&matrix).is_err());
    }
}
