//! `rackscale simulate` end to end: the real binary on a short shifting
//! trace (DeepSeek-V4-Pro, 72 GB300 GPUs, TP4 prefill, DEP16 decode).

#![allow(clippy::unwrap_used)]

use std::process::Command;

use serde_json::Value;

const RACKSCALE: &str = env!("CARGO_BIN_EXE_rackscale");

/// 8K/1K, then long prompts, then long outputs: each phase alone fits the
/// budget with the right split, no single split serves them all.
const TRACE: &str = "name: short-shift
phases:
  - {name: 8k1k, rate: RATE_A, isl: 8192, osl: 1024, durationSeconds: 300}
  - {name: 32k1k, rate: RATE_B, isl: 32768, osl: 1024, durationSeconds: 600}
  - {name: 1k4k, rate: RATE_C, isl: 1024, osl: 4096, durationSeconds: 600}
";

fn trace_file(dir: &tempfile::TempDir, body: &str) -> String {
    let path = dir.path().join("trace.yaml");
    std::fs::write(&path, body).unwrap();
    path.display().to_string()
}

fn simulate(trace: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "simulate",
        "--trace",
        trace,
        "--model",
        "deepseek-v4-pro",
        "--sku",
        "gb300",
        "--gpus",
        "72",
        "--prefill-tp",
        "4",
        "--decode-ep",
        "16",
        "--interval",
        "30",
        "--window",
        "60",
        "--max-moves",
        "4",
    ];
    args.extend_from_slice(extra);
    Command::new(RACKSCALE).args(&args).output().unwrap()
}

fn trace_body() -> String {
    TRACE
        .replace("RATE_A", "74.4")
        .replace("RATE_B", "25.2")
        .replace("RATE_C", "61.7")
}

#[test]
fn all_policies_report_deterministically_and_rebalancing_beats_static() {
    let dir = tempfile::tempdir().unwrap();
    let trace = trace_file(&dir, &trace_body());
    let a = simulate(&trace, &["--seed", "7", "--policy", "all", "--json"]);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let b = simulate(&trace, &["--seed", "7", "--policy", "all", "--json"]);
    assert_eq!(a.stdout, b.stdout, "same seed, same result");

    let reports: Vec<Value> = serde_json::from_slice(&a.stdout).unwrap();
    let policies: Vec<&str> = reports
        .iter()
        .map(|r| r["policy"].as_str().unwrap())
        .collect();
    assert_eq!(policies, ["rebalance", "static", "oracle", "dynamo"]);
    let goodput = |p: &str| {
        reports.iter().find(|r| r["policy"] == p).unwrap()["goodput_per_gpu_hour"]
            .as_f64()
            .unwrap()
    };
    for r in &reports {
        assert!(r["requests"].as_u64().unwrap() > 100, "{r}");
        assert_eq!(
            r["requests"], reports[0]["requests"],
            "same arrivals for every policy"
        );
        assert!(r["ttft_s"]["p99"].as_f64().unwrap() >= r["ttft_s"]["p50"].as_f64().unwrap());
    }
    let rebalance = reports.iter().find(|r| r["policy"] == "rebalance").unwrap();
    assert!(
        rebalance["role_switches"].as_u64().unwrap() >= 1,
        "{rebalance}"
    );
    assert!(rebalance["gpu_seconds_switching"].as_f64().unwrap() > 0.0);
    assert!(
        goodput("rebalance") > 1.2 * goodput("static"),
        "rebalance {} static {}",
        goodput("rebalance"),
        goodput("static")
    );

    let other = simulate(&trace, &["--seed", "8", "--policy", "rebalance", "--json"]);
    assert!(other.status.success());
    let other: Vec<Value> = serde_json::from_slice(&other.stdout).unwrap();
    assert_eq!(other.len(), 1);
    assert_ne!(
        other[0]["requests"], rebalance["requests"],
        "another seed, other arrivals"
    );

    let text = simulate(&trace, &["--seed", "7", "--policy", "rebalance"]);
    let out = String::from_utf8(text.stdout).unwrap();
    assert!(
        out.contains("goodput/GPUh") && out.contains("moves:"),
        "{out}"
    );
}

#[test]
fn a_bad_trace_or_policy_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let trace = trace_file(
        &dir,
        "phases:\n  - {name: x, rate: 1, isl: 0, osl: 10, durationSeconds: 5}\n",
    );
    let out = simulate(&trace, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("phase 1 (x)") && err.contains("isl"), "{err}");

    let trace = trace_file(&dir, &trace_body());
    let out = simulate(&trace, &["--policy", "magic"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown policy"));
}
