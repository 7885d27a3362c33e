//! The API server itself rejects invalid ModelDeployments with messages that
//! say what to fix: the CRDs from `deploy/crds/` are installed into a real
//! kube-apiserver and each bad spec is sent through it.

// Test helpers fail loudly: a panic is the test failing.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use harness::{Cluster, install_crds, wait_for};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::{Value, json};

const CRDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds");

fn valid_auto() -> Value {
    json!({
        "model": {"name": "deepseek-ai/DeepSeek-V4-Pro", "profile": "deepseek-v4-pro"},
        "hardware": {"sku": "gb300", "gpuBudget": 72},
        "workload": {"isl": 8192, "osl": 1024},
        "slo": {"minTokensPerSecondPerUser": 27.0},
        "recipe": {"mode": "auto"}
    })
}

fn valid_explicit() -> Value {
    let mut spec = valid_auto();
    spec["recipe"] = json!({
        "mode": "explicit",
        "prefill": {"workers": 2, "tp": 8},
        "decode": {"workers": 1, "ep": 8},
        "maxConcurrency": 4096
    });
    spec
}

/// Applies `edit` to a valid spec.
fn with(base: Value, edit: impl FnOnce(&mut Value)) -> Value {
    let mut v = base;
    edit(&mut v);
    v
}

#[tokio::test]
async fn api_server_accepts_valid_and_rejects_invalid_deployments() {
    let cluster = Cluster::start().await.unwrap();
    let client = cluster.client();
    assert_eq!(install_crds(&client, CRDS).await.unwrap(), 2);
    let gvk = GroupVersionKind::gvk("rackscale.io", "v1alpha1", "ModelDeployment");
    let resource = ApiResource::from_gvk(&gvk);
    let api: Api<DynamicObject> = Api::namespaced_with(client, "default", &resource);
    let create = |name: &str, spec: Value| {
        let obj = DynamicObject::new(name, &resource).data(json!({ "spec": spec }));
        let api = api.clone();
        async move { api.create(&PostParams::default(), &obj).await }
    };

    create("auto", valid_auto())
        .await
        .expect("a valid auto deployment is accepted");
    create("explicit", valid_explicit())
        .await
        .expect("a valid explicit deployment is accepted");
    create(
        "with-args",
        with(
            valid_explicit(),
            |v| v["engine"] = json!({"args": ["--max-context=16384", "--kv-ttl-seconds=30"]}),
        ),
    )
    .await
    .expect("engine flags in --name=value form are accepted");

    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "budget-zero",
            with(valid_auto(), |v| v["hardware"]["gpuBudget"] = json!(0)),
            "gpuBudget",
        ),
        (
            "bad-sku",
            with(valid_auto(), |v| v["hardware"]["sku"] = json!("h100")),
            "supported values: \"gb200\", \"gb300\"",
        ),
        (
            "bad-profile",
            with(valid_auto(), |v| v["model"]["profile"] = json!("llama-3")),
            "deepseek-v4-pro",
        ),
        (
            "no-slo",
            with(valid_auto(), |v| v["slo"] = json!({})),
            "set slo.minTokensPerSecondPerUser (tok/s/user) or slo.maxTpotMs",
        ),
        (
            "two-slos",
            with(valid_auto(), |v| v["slo"]["maxTpotMs"] = json!(37.0)),
            "set only one of slo.minTokensPerSecondPerUser and slo.maxTpotMs",
        ),
        (
            "negative-slo",
            with(valid_auto(), |v| {
                v["slo"]["minTokensPerSecondPerUser"] = json!(-5.0)
            }),
            "slo.minTokensPerSecondPerUser must be positive",
        ),
        (
            "zero-ttft",
            with(valid_auto(), |v| v["slo"]["maxTtftMs"] = json!(0.0)),
            "slo.maxTtftMs must be positive",
        ),
        (
            "explicit-no-decode",
            with(valid_explicit(), |v| {
                v["recipe"].as_object_mut().unwrap().remove("decode");
            }),
            "recipe.mode explicit needs recipe.prefill and recipe.decode",
        ),
        (
            "auto-with-pools",
            with(valid_auto(), |v| {
                v["recipe"]["prefill"] = json!({"workers": 1, "tp": 8})
            }),
            "recipe.mode auto picks the pools itself",
        ),
        (
            "ep-not-allowed",
            with(valid_explicit(), |v| v["recipe"]["decode"]["ep"] = json!(3)),
            "recipe.decode.ep must be one of",
        ),
        (
            "ep-not-dividing",
            with(valid_explicit(), |v| {
                v["model"]["profile"] = json!("deepseek-v3");
                v["recipe"]["decode"]["ep"] = json!(24);
            }),
            "recipe.decode.ep must divide the model's routed experts",
        ),
        (
            "ep-and-tp",
            with(valid_explicit(), |v| v["recipe"]["decode"]["tp"] = json!(8)),
            "set exactly one of recipe.decode.ep",
        ),
        (
            "prefill-tp-16",
            with(valid_explicit(), |v| {
                v["recipe"]["prefill"]["tp"] = json!(16)
            }),
            "recipe.prefill.tp must be 1, 2, 4 or 8",
        ),
        (
            "over-budget",
            with(valid_explicit(), |v| {
                v["recipe"]["prefill"]["workers"] = json!(9)
            }),
            "the explicit recipe uses more GPUs than hardware.gpuBudget",
        ),
        (
            "zero-workers",
            with(valid_explicit(), |v| {
                v["recipe"]["decode"]["workers"] = json!(0)
            }),
            "recipe.decode.workers must be at least 1",
        ),
        (
            "zero-isl",
            with(valid_auto(), |v| v["workload"]["isl"] = json!(0)),
            "isl",
        ),
        (
            "window-below-interval",
            with(
                valid_auto(),
                |v| {
                    v["rebalance"] =
                        json!({"intervalSeconds": 60, "stabilizationWindowSeconds": 30})
                },
            ),
            "rebalance.stabilizationWindowSeconds must be at least rebalance.intervalSeconds",
        ),
        (
            "engine-arg-without-value",
            with(valid_auto(), |v| {
                v["engine"] = json!({"args": ["--max-context"]})
            }),
            "engine.args entries must be --name=value",
        ),
        (
            "engine-arg-overriding-tls",
            with(valid_auto(), |v| {
                v["engine"] = json!({"args": ["--tls-key=/etc/passwd"]})
            }),
            "--tls-*, --etcd-* and --insecure-plaintext are set by the agent",
        ),
    ];
    let mut failures = Vec::new();
    for (name, spec, expected) in cases {
        match create(name, spec).await {
            Ok(_) => failures.push(format!(
                "{name}: accepted, expected rejection with `{expected}`"
            )),
            Err(kube::Error::Api(status)) => {
                if status.code != 422 || !status.message.contains(expected) {
                    failures.push(format!(
                        "{name}: got {} `{}`, expected 422 with `{expected}`",
                        status.code, status.message
                    ));
                }
            }
            Err(e) => failures.push(format!("{name}: unexpected error {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // `kubectl explain` shows the field descriptions. It reads the OpenAPI
    // document, which kube-apiserver republishes a little after a CRD
    // lands, so it is asked again until the deadline.
    let apiserver = cluster.apiserver();
    let text = wait_for(
        "kubectl explain md.spec.slo",
        Duration::from_secs(30),
        || async {
            let out = apiserver
                .kubectl()?
                .args(["explain", "md.spec.slo"])
                .output()
                .await?;
            if !out.status.success() {
                anyhow::bail!("{}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
        },
    )
    .await
    .unwrap();
    assert!(
        text.contains("Minimum tokens per second each user sees"),
        "{text}"
    );
}
