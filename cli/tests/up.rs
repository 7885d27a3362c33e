//! `rackscale up --bench` end to end on a small rack: real etcd, one real
//! agent per tray, the standalone operator and a frontend; the deployment
//! turns Ready, the bench runs through it, the summary compares the
//! prediction with the measurement, the plot is written, and everything
//! stops (no engine rank outlives the run). Every gRPC link of the run is
//! mutual TLS (the default), so this is also the end-to-end test of it:
//! agents, operator, engines and frontend, a request served prefill -> KV
//! pull -> decode. A bad topology or spec file is refused before anything
//! starts.
//!
//! Needs the operator, agent and engine binaries beside `rackscale`
//! (`cargo build --workspace --bins`; make test does).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

const RACKSCALE: &str = env!("CARGO_BIN_EXE_rackscale");

const SPEC: &str = r#"
apiVersion: rackscale.io/v1alpha1
kind: ModelDeployment
metadata: {name: tiny, namespace: default}
spec:
  model: {name: deepseek-ai/DeepSeek-V4-Pro, profile: deepseek-v4-pro}
  hardware: {sku: gb300, gpuBudget: 12}
  workload: {isl: 1024, osl: 128}
  slo: {maxTpotMs: 80}
  recipe: {mode: explicit, prefill: {workers: 1, tp: 4}, decode: {workers: 1, ep: 8}}
"#;

fn up(dir: &Path, specs: &Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new(RACKSCALE)
        .arg("up")
        .arg("--specs")
        .arg(specs)
        .arg("--log-dir")
        .arg(dir.join("logs"))
        .arg("--plot")
        .arg(dir.join("measured.svg"))
        .args(extra)
        .env_remove("KEEP")
        .output()
        .unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn a_small_rack_comes_up_is_benched_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("specs")).unwrap();
    std::fs::write(dir.path().join("specs/tiny.yaml"), SPEC).unwrap();
    let (ok, text) = up(
        dir.path(),
        &dir.path().join("specs"),
        &[
            "--topology",
            "t=gb300:3x4",
            "--bench",
            "--isl",
            "256",
            "--osl",
            "32",
            "--concurrency",
            "4",
            "--rounds",
            "4",
            "--warmup-rounds",
            "1",
        ],
    );
    assert!(ok, "{text}");
    assert!(text.contains("workers starting: 2/2 Ready"), "{text}");
    assert!(text.contains("/v1  (OpenAI API)"), "{text}");
    // Every gRPC link ran over mutual TLS: operator -> agents, frontend ->
    // engines, the decode worker's KV pull from the prefill worker.
    assert!(text.contains("gRPC links        mutual TLS"), "{text}");
    assert!(text.contains("Predicted (perfmodel) vs measured"), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("default/tiny") && l.contains('|'))
        .unwrap_or_else(|| panic!("no summary row: {text}"));
    assert!(row.contains("1xTP4 + 1xDEP8"), "{row}");
    assert!(!text.contains("requests failed"), "{text}");
    let svg = std::fs::read_to_string(dir.path().join("measured.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "{svg}");
    assert!(text.contains("stopped the agents"), "{text}");
    assert!(!text.contains("had to be killed"), "{text}");
    // No process of this rack outlived the run: every agent and engine
    // rank was started with the rack's etcd endpoint on its command line.
    let etcd = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("etcd registry"))
        .unwrap_or_else(|| panic!("no etcd endpoint printed: {text}"))
        .trim()
        .to_string();
    let survivors: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&etcd) && !c.contains("cargo"))
        .collect();
    assert!(survivors.is_empty(), "left running: {survivors:?}");
}

#[test]
fn with_kube_the_same_rack_runs_through_the_api_server() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("specs")).unwrap();
    std::fs::write(dir.path().join("specs/tiny.yaml"), SPEC).unwrap();
    let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds");
    let (ok, text) = up(
        dir.path(),
        &dir.path().join("specs"),
        &[
            "--kube",
            "--crds",
            crds,
            "--topology",
            "t=gb300:3x4",
            "--bench",
            "--isl",
            "256",
            "--osl",
            "32",
            "--concurrency",
            "4",
            "--rounds",
            "4",
            "--warmup-rounds",
            "1",
        ],
    );
    assert!(ok, "{text}");
    // `kubectl get md,racks` as printed: the deployment and its rack.
    let md = text
        .lines()
        .find(|l| l.contains("modeldeployment.rackscale.io/tiny"))
        .unwrap_or_else(|| panic!("no kubectl row: {text}"));
    assert!(md.contains("2/2"), "{md}");
    assert!(text.contains("rack.rackscale.io/"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("default/tiny") && l.contains('|')),
        "{text}"
    );
    assert!(text.contains("deleted 1 ModelDeployment(s)"), "{text}");
    assert!(text.contains("stopped kube-apiserver and etcd"), "{text}");
}

#[test]
fn bad_input_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("specs")).unwrap();
    std::fs::write(dir.path().join("specs/tiny.yaml"), SPEC).unwrap();
    let specs = dir.path().join("specs");
    let (ok, text) = up(dir.path(), &specs, &["--topology", "h100:2x4"]);
    assert!(!ok);
    assert!(text.contains("unknown rack SKU \"h100\""), "{text}");
    let (ok, text) = up(dir.path(), Path::new("/nonexistent/specs"), &[]);
    assert!(!ok);
    assert!(text.contains("/nonexistent/specs"), "{text}");
}
