//! The Helm chart (`charts/rackscale`), checked with the real tools:
//!
//! 1. `helm lint` and `helm template` pass; the Prometheus Operator's
//!    monitors render only where `monitoring.coreos.com/v1` is served, with
//!    the configured `release` label; the dashboards ship as labelled
//!    ConfigMaps identical to `deploy/grafana/`; bad values fail with a
//!    message naming the value; the gRPC certificates are wired the three
//!    ways (Helm-generated CA, cert-manager where `cert-manager.io/v1` is
//!    served, an existing Secret) and plaintext only with TLS disabled.
//! 2. Every rendered manifest (CRDs, RBAC, workloads, monitors, TLS Secrets
//!    or cert-manager objects, the test hook) passes a server-side dry-run
//!    against a real kube-apiserver, with TLS on (both sources) and off.
//! 3. `helm install` into that apiserver succeeds, and the operator, run as
//!    a process whose kubeconfig impersonates the chart's ServiceAccount,
//!    reconciles a deployment to Ready with real agents and engines, every
//!    gRPC link over mutual TLS with the certificates the chart generated
//!    (read back from its Secrets, checked against the server name the
//!    chart sets), while what the chart does not grant (Secrets, Pods,
//!    deleting Nodes) stays forbidden; `helm upgrade` keeps the
//!    certificates.
//!
//! Needs helm, kube-apiserver, kubectl and etcd from `scripts/setup.sh`, and
//! the `rackscale-agent` / `rackscale-engine` / `rackscale-operator`
//! binaries beside `local-rack` (`cargo build --workspace --bins`).

// Test helpers fail loudly: a panic is the test failing.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use harness::helm::{Helm, chart_dir, documents, kinds_and_names, service_account_kubeconfig};
use harness::process::{ManagedProcess, free_port};
use harness::workdir::Workdir;
use harness::{Cluster, Sku, Topology, wait_crd_established, wait_for};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams,
};
use serde_json::{Value, json};

const NS: &str = "rackscale-system";
const RELEASE: &str = "rs";
const MONITORING_CRDS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/monitoring.coreos.com-crds.yaml"
);
const CERT_MANAGER_CRDS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/cert-manager.io-crds.yaml"
);
/// The server name the chart's certificates carry and its clients check.
const SERVER_NAME: &str = "rs-rackscale-agent.rackscale-system.svc";
const DASHBOARDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana");
const TIMEOUT: Duration = Duration::from_secs(90);

fn sibling(name: &str) -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_local-rack")).with_file_name(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --bins` (make test does)",
        bin.display()
    );
    bin
}

fn chart() -> String {
    chart_dir().display().to_string()
}

/// `helm template` of the chart with `args`, parsed.
async fn template(helm: &Helm, args: &[&str]) -> Vec<Value> {
    let chart = chart();
    let mut all = vec!["template", RELEASE, chart.as_str(), "--namespace", NS];
    all.extend_from_slice(args);
    documents(&helm.run(&all).await.unwrap()).unwrap()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The error `helm template` gives for `args` (it must fail).
async fn template_error(helm: &Helm, args: &[&str]) -> String {
    let chart = chart();
    let mut all = vec!["template", RELEASE, chart.as_str(), "--namespace", NS];
    all.extend_from_slice(args);
    let out = helm.output(&all).await.unwrap();
    assert!(
        !out.status.success(),
        "helm template {args:?} should have failed"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const FRONTEND: [&str; 4] = [
    "--set",
    "frontend.enabled=true",
    "--set",
    "frontend.deployment=dsv4",
];

#[tokio::test]
async fn chart_lints_renders_and_gates_monitors_on_the_prometheus_operator_api() {
    let helm = Helm::new().unwrap();
    let chart = chart();
    let lint = helm.run(&["lint", &chart, "--strict"]).await.unwrap();
    assert!(lint.contains("0 chart(s) failed"), "{lint}");
    let mut lint_frontend = vec!["lint", chart.as_str(), "--strict"];
    lint_frontend.extend_from_slice(&FRONTEND);
    helm.run(&lint_frontend).await.unwrap();

    // Without the Prometheus Operator: everything but the monitors.
    let plain = template(&helm, &FRONTEND).await;
    let names = kinds_and_names(&plain);
    for kind in ["PodMonitor", "ServiceMonitor"] {
        assert!(
            of_kind(&plain, kind).is_empty(),
            "{kind} rendered: {names:?}"
        );
    }
    let deployments = of_kind(&plain, "Deployment");
    let operator = deployments
        .iter()
        .find(|d| d["metadata"]["name"] == "rs-rackscale-operator")
        .unwrap_or_else(|| panic!("no operator Deployment in {names:?}"));
    assert_eq!(operator["spec"]["replicas"], 2);
    let pod = &operator["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "rs-rackscale-operator");
    assert!(
        deployments
            .iter()
            .any(|d| d["metadata"]["name"] == "rs-rackscale-frontend")
    );
    let agent = of_kind(&plain, "DaemonSet")[0];
    let agent_pod = &agent["spec"]["template"]["spec"];
    assert_eq!(agent_pod["nodeSelector"]["nvidia.com/gpu.present"], "true");
    assert_eq!(
        agent_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
        4
    );
    assert_eq!(agent_pod["automountServiceAccountToken"], false);
    assert_eq!(of_kind(&plain, "StatefulSet").len(), 1, "{names:?}");
    assert_eq!(of_kind(&plain, "Service").len(), 4, "{names:?}");
    let roles = of_kind(&plain, "ClusterRole");
    assert_eq!(roles.len(), 1, "one ClusterRole, the operator's: {names:?}");
    let rules = roles[0]["rules"].as_array().unwrap();
    assert!(
        rules.iter().all(|r| !r["resources"]
            .as_array()
            .unwrap()
            .contains(&json!("secrets"))),
        "the operator's ClusterRole grants Secrets: {rules:?}"
    );
    let hooks: Vec<&Value> = of_kind(&plain, "Pod")
        .into_iter()
        .filter(|p| p["metadata"]["annotations"]["helm.sh/hook"] == "test")
        .collect();
    assert_eq!(hooks.len(), 1, "one `helm test` hook: {names:?}");

    // Dashboards: one labelled ConfigMap per file, identical to the files.
    let maps = of_kind(&plain, "ConfigMap");
    let mut files: Vec<PathBuf> = std::fs::read_dir(DASHBOARDS)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "fleet, deployment, operator: {files:?}");
    assert_eq!(maps.len(), files.len(), "{names:?}");
    for file in &files {
        let name = file.file_name().unwrap().to_str().unwrap();
        let source = std::fs::read_to_string(file).unwrap();
        let copy = std::fs::read_to_string(chart_dir().join("dashboards").join(name)).unwrap();
        assert_eq!(
            source, copy,
            "charts/rackscale/dashboards/{name} differs from deploy/grafana/{name}: copy it"
        );
        let key = format!("rackscale-{name}");
        let map = maps
            .iter()
            .find(|m| m["data"].get(&key).is_some())
            .unwrap_or_else(|| panic!("no ConfigMap carries {key}"));
        assert_eq!(map["metadata"]["labels"]["grafana_dashboard"], "1");
        assert_eq!(map["data"][&key].as_str().unwrap(), source.trim_end());
        serde_json::from_str::<Value>(&source).unwrap();
    }

    // With the Prometheus Operator's API: monitors with the release label.
    let mut args = FRONTEND.to_vec();
    args.extend_from_slice(&[
        "--api-versions",
        "monitoring.coreos.com/v1",
        "--set",
        "monitoring.release=kps",
    ]);
    let monitored = template(&helm, &args).await;
    let pod_monitors = of_kind(&monitored, "PodMonitor");
    let service_monitors = of_kind(&monitored, "ServiceMonitor");
    assert_eq!(pod_monitors.len(), 2, "operator and agents");
    assert_eq!(service_monitors.len(), 1, "the frontend");
    for m in pod_monitors.iter().chain(&service_monitors) {
        assert_eq!(m["metadata"]["labels"]["release"], "kps", "{m}");
    }
    // ...and none when monitoring is switched off.
    args.extend_from_slice(&["--set", "monitoring.enabled=false"]);
    let off = template(&helm, &args).await;
    assert!(of_kind(&off, "PodMonitor").is_empty());

    // Bad values fail with a message naming what is wrong.
    let err = template_error(&helm, &["--set", "operator.replicas=0"]).await;
    assert!(err.contains("replicas"), "{err}");
    let err = template_error(&helm, &["--set", "agent.sku=H100"]).await;
    assert!(err.contains("sku"), "{err}");
    let err = template_error(&helm, &["--set", "operator.typo=1"]).await;
    assert!(err.contains("typo"), "{err}");
    let err = template_error(&helm, &["--set", "frontend.enabled=true"]).await;
    assert!(err.contains("frontend.deployment"), "{err}");
    let err = template_error(&helm, &["--set", "etcd.enabled=false"]).await;
    assert!(err.contains("etcd.externalEndpoints"), "{err}");
    let err = template_error(&helm, &["--set", "etcd.client.auth.username=rackscale"]).await;
    assert!(err.contains("passwordSecret"), "{err}");
    let err = template_error(&helm, &["--set", "grpc.tls.certManager.enabled=true"]).await;
    assert!(err.contains("cert-manager.io/v1"), "{err}");

    tls_is_wired_every_way(&helm, &plain).await;
}

/// The container of the only pod template of `workload`.
fn container(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]["containers"][0]
}

fn args(workload: &Value) -> Vec<String> {
    container(workload)["args"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// The operator, agent and frontend workloads of a rendering.
fn workloads(docs: &[Value]) -> Vec<&Value> {
    let mut w: Vec<&Value> = of_kind(docs, "Deployment");
    w.extend(of_kind(docs, "DaemonSet"));
    assert_eq!(w.len(), 3, "operator, frontend, agent");
    w
}

fn secret_volume(workload: &Value) -> Option<String> {
    workload["spec"]["template"]["spec"]["volumes"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == "tls")
        .map(|v| v["secret"]["secretName"].as_str().unwrap().to_string())
}

/// TLS on by default with a Helm-generated CA (`plain` is the default
/// rendering with the frontend), cert-manager where it is served, an
/// existing Secret, plaintext only when disabled, and etcd client security.
async fn tls_is_wired_every_way(helm: &Helm, plain: &[Value]) {
    // Default: a CA and one certificate per component, each mounted by its
    // component with the flags pointing at it and the server name.
    let secrets = of_kind(plain, "Secret");
    let names: Vec<&str> = secrets
        .iter()
        .map(|s| s["metadata"]["name"].as_str().unwrap())
        .collect();
    for want in [
        "rs-rackscale-tls-ca",
        "rs-rackscale-agent-tls",
        "rs-rackscale-operator-tls",
        "rs-rackscale-frontend-tls",
        "rs-rackscale-etcd-tls",
    ] {
        assert!(names.contains(&want), "no Secret {want}: {names:?}");
    }
    // The chart's etcd serves TLS and wants the components' certificates.
    let etcd_args = args(of_kind(plain, "StatefulSet")[0]);
    assert!(
        etcd_args.contains(&"--client-cert-auth=true".to_string()),
        "{etcd_args:?}"
    );
    assert!(etcd_args.contains(&"--listen-client-urls=https://0.0.0.0:2379".to_string()));
    for s in &secrets {
        assert_eq!(s["type"], "kubernetes.io/tls");
        if s["metadata"]["name"] != "rs-rackscale-tls-ca" {
            for key in ["ca.crt", "tls.crt", "tls.key"] {
                assert!(s["data"][key].is_string(), "{key} missing in {s}");
            }
        }
    }
    for w in workloads(plain) {
        let name = w["metadata"]["name"].as_str().unwrap();
        let a = args(w);
        assert!(
            a.contains(&"--tls-ca=/etc/rackscale/tls/ca.crt".to_string()),
            "{name}: {a:?}"
        );
        assert!(
            a.contains(&format!("--tls-server-name={SERVER_NAME}")),
            "{name}: {a:?}"
        );
        assert!(
            a.contains(&"--etcd-cert=/etc/rackscale/tls/tls.crt".to_string()),
            "{name}: {a:?}"
        );
        assert!(
            !a.contains(&"--insecure-plaintext".to_string()),
            "{name}: {a:?}"
        );
        assert_eq!(secret_volume(w), Some(format!("{name}-tls")), "{name}");
    }
    let agent = of_kind(plain, "DaemonSet")[0];
    let probe = &container(agent)["livenessProbe"];
    assert!(
        probe["tcpSocket"].is_object(),
        "the kubelet's gRPC probe speaks no TLS: {probe}"
    );
    assert!(of_kind(plain, "Certificate").is_empty());

    // cert-manager: the chart's CA (self-signed Issuer, CA Certificate, CA
    // Issuer) and a Certificate per component, Secrets left to it.
    let mut cm = FRONTEND.to_vec();
    cm.extend_from_slice(&["--api-versions", "cert-manager.io/v1"]);
    let docs = template(helm, &cm).await;
    assert!(of_kind(&docs, "Secret").is_empty());
    assert_eq!(of_kind(&docs, "Issuer").len(), 2);
    let certs = of_kind(&docs, "Certificate");
    assert_eq!(certs.len(), 5, "the CA, three components and etcd");
    let agent_cert = certs
        .iter()
        .find(|c| c["metadata"]["name"] == "rs-rackscale-agent")
        .unwrap();
    assert_eq!(agent_cert["spec"]["secretName"], "rs-rackscale-agent-tls");
    assert!(
        agent_cert["spec"]["dnsNames"]
            .as_array()
            .unwrap()
            .contains(&json!(SERVER_NAME))
    );
    let usages = agent_cert["spec"]["usages"].as_array().unwrap();
    assert!(usages.contains(&json!("server auth")) && usages.contains(&json!("client auth")));
    for w in workloads(&docs) {
        let name = w["metadata"]["name"].as_str().unwrap();
        assert_eq!(secret_volume(w), Some(format!("{name}-tls")));
    }
    // ... or an issuer of the user's PKI: no chart CA.
    cm.extend_from_slice(&[
        "--set",
        "grpc.tls.certManager.issuerRef.name=corp-ca",
        "--set",
        "grpc.tls.certManager.issuerRef.kind=ClusterIssuer",
    ]);
    let docs = template(helm, &cm).await;
    assert!(of_kind(&docs, "Issuer").is_empty());
    for c in of_kind(&docs, "Certificate") {
        assert_eq!(c["spec"]["issuerRef"]["name"], "corp-ca");
        assert_eq!(c["spec"]["issuerRef"]["kind"], "ClusterIssuer");
    }
    // cert-manager switched off although served: Helm's CA.
    let mut helm_ca = FRONTEND.to_vec();
    helm_ca.extend_from_slice(&[
        "--api-versions",
        "cert-manager.io/v1",
        "--set",
        "grpc.tls.certManager.enabled=false",
    ]);
    let docs = template(helm, &helm_ca).await;
    assert!(of_kind(&docs, "Certificate").is_empty());
    assert_eq!(of_kind(&docs, "Secret").len(), 5);

    // An existing Secret: mounted by everyone, nothing generated.
    let mut existing = FRONTEND.to_vec();
    existing.extend_from_slice(&["--set", "grpc.tls.secretName=my-tls"]);
    let docs = template(helm, &existing).await;
    assert!(of_kind(&docs, "Secret").is_empty());
    // An existing Secret carries no etcd names: the chart's etcd stays plain.
    let etcd_args = args(of_kind(&docs, "StatefulSet")[0]);
    assert!(!etcd_args.contains(&"--client-cert-auth=true".to_string()));
    for w in workloads(&docs) {
        assert_eq!(secret_volume(w).as_deref(), Some("my-tls"));
    }

    // Disabled: no certificates, and plaintext said explicitly.
    let mut off = FRONTEND.to_vec();
    off.extend_from_slice(&["--set", "grpc.tls.enabled=false"]);
    let docs = template(helm, &off).await;
    assert!(of_kind(&docs, "Secret").is_empty());
    for w in workloads(&docs) {
        let a = args(w);
        assert!(a.contains(&"--insecure-plaintext".to_string()), "{a:?}");
        assert!(!a.iter().any(|x| x.starts_with("--tls-")), "{a:?}");
        assert_eq!(secret_volume(w), None);
    }
    let agent = of_kind(&docs, "DaemonSet")[0];
    assert!(container(agent)["livenessProbe"]["grpc"].is_object());

    // etcd client TLS and user: flags and the mounted files.
    let mut etcd = FRONTEND.to_vec();
    etcd.extend_from_slice(&[
        "--set",
        "etcd.enabled=false",
        "--set",
        "etcd.externalEndpoints={https://etcd.infra:2379}",
        "--set",
        "etcd.client.tls.secretName=etcd-client",
        "--set",
        "etcd.client.auth.username=rackscale",
        "--set",
        "etcd.client.auth.passwordSecret.name=etcd-password",
    ]);
    let docs = template(helm, &etcd).await;
    for w in workloads(&docs) {
        let a = args(w);
        for flag in [
            "--etcd-ca=/etc/rackscale/etcd-tls/ca.crt",
            "--etcd-cert=/etc/rackscale/etcd-tls/tls.crt",
            "--etcd-username=rackscale",
            "--etcd-password-file=/etc/rackscale/etcd-auth/password",
        ] {
            assert!(a.contains(&flag.to_string()), "{flag} not in {a:?}");
        }
        let volumes = w["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
        assert!(
            volumes
                .iter()
                .any(|v| v["secret"]["secretName"] == "etcd-client")
        );
        assert!(
            volumes
                .iter()
                .any(|v| v["secret"]["secretName"] == "etcd-password")
        );
    }
}

/// The rendered Secret `name`'s files, decoded, written into `dir/name/`.
fn write_secret(docs: &[Value], name: &str, dir: &Path) -> proto::tls::TlsFiles {
    let doc = of_kind(docs, "Secret")
        .into_iter()
        .find(|s| s["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no Secret {name}"));
    let secret: Secret = serde_json::from_value(doc.clone()).unwrap();
    let data = secret.data.unwrap();
    let mount = dir.join(name);
    std::fs::create_dir_all(&mount).unwrap();
    for key in ["ca.crt", "tls.crt", "tls.key"] {
        std::fs::write(mount.join(key), &data[key].0).unwrap();
    }
    proto::tls::TlsFiles {
        ca: mount.join("ca.crt"),
        cert: mount.join("tls.crt"),
        key: mount.join("tls.key"),
    }
}

/// The chart's etcd certificate in a real etcd with `--client-cert-auth`:
/// the registry client connects with a component's certificate, as the
/// chart's flags have it (by the Service name), and is refused without one.
#[tokio::test]
async fn the_charts_etcd_certificate_serves_the_components_certificates() {
    let helm = Helm::new().unwrap();
    let docs = template(&helm, &[]).await;
    let dir = Workdir::new("helm-etcd-tls").unwrap();
    let server = write_secret(&docs, "rs-rackscale-etcd-tls", dir.path());
    let agent = write_secret(&docs, "rs-rackscale-agent-tls", dir.path());
    let operator = write_secret(&docs, "rs-rackscale-operator-tls", dir.path());
    let name = format!("rs-rackscale-etcd.{NS}.svc");
    let etcd = harness::Etcd::start_with(Some(harness::etcd::EtcdTls {
        server,
        client: agent.clone(),
        client_cert_auth: true,
        server_name: Some(name.clone()),
    }))
    .await
    .unwrap();
    let security = |files: &proto::tls::TlsFiles, identity: bool| proto::registry::EtcdSecurity {
        tls: Some(proto::registry::security::EtcdTls {
            ca: files.ca.clone(),
            identity: identity.then(|| (files.cert.clone(), files.key.clone())),
            server_name: Some(name.clone()),
        }),
        user: None,
    };
    let t = Duration::from_secs(5);
    let endpoints = [etcd.endpoint().to_owned()];
    for files in [&agent, &operator] {
        let registry =
            proto::registry::Registry::connect_with(&endpoints, &security(files, true), t)
                .await
                .unwrap();
        registry.list_agents(t).await.unwrap();
    }
    let anonymous =
        proto::registry::Registry::connect_with(&endpoints, &security(&agent, false), t).await;
    let refused = match anonymous {
        Err(_) => true,
        Ok(r) => r.list_agents(t).await.is_err(),
    };
    assert!(refused, "etcd served a client without a certificate");
}

/// `kubectl` of `cluster` with `args`, its output; a failure panics with it.
async fn kubectl(cluster: &Cluster, args: &[&str]) -> String {
    let out = cluster
        .apiserver()
        .kubectl()
        .unwrap()
        .args(args)
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kubectl {args:?} failed:\n{text}");
    text
}

async fn create_namespace(client: &kube::Client, name: &str) {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
}

#[tokio::test]
async fn every_rendered_manifest_passes_a_server_side_dry_run() {
    let cluster = Cluster::start().await.unwrap();
    let client = cluster.client();
    let dir = Workdir::new("helm-dry-run").unwrap();
    for fixture in [MONITORING_CRDS, CERT_MANAGER_CRDS] {
        let names = harness::apply_crds_yaml(&client, &std::fs::read_to_string(fixture).unwrap())
            .await
            .unwrap();
        for name in &names {
            wait_crd_established(&client, name).await.unwrap();
        }
    }
    create_namespace(&client, NS).await;
    // TLS from Helm's CA (the default), from cert-manager, and off.
    for (tls, kinds) in [
        (&[][..], &["Secret"][..]),
        (
            &["--api-versions", "cert-manager.io/v1"][..],
            &["Issuer", "Certificate"][..],
        ),
        (&["--set", "grpc.tls.enabled=false"][..], &[][..]),
    ] {
        dry_run(&cluster, &dir, tls, kinds).await;
    }
}

/// `helm template` with `extra` values, applied with a server-side dry run;
/// every object must be accepted, and objects of `kinds` rendered.
async fn dry_run(cluster: &Cluster, dir: &Workdir, extra: &[&str], kinds: &[&str]) {
    let helm = Helm::new().unwrap();
    let chart = chart();
    let mut args = vec![
        "template",
        RELEASE,
        chart.as_str(),
        "--namespace",
        NS,
        "--include-crds",
        "--api-versions",
        "monitoring.coreos.com/v1",
    ];
    args.extend_from_slice(&FRONTEND);
    args.extend_from_slice(extra);
    let rendered = helm.run(&args).await.unwrap();
    let docs = documents(&rendered).unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, &rendered).unwrap();
    let out = kubectl(
        cluster,
        &[
            "apply",
            "--server-side",
            "--dry-run=server",
            "--validate=strict",
            "--field-manager=helm-test",
            "-f",
            file.to_str().unwrap(),
        ],
    )
    .await;
    // One "(server dry run)" line per object: none was skipped.
    let accepted = out
        .lines()
        .filter(|l| l.contains("(server dry run)"))
        .count();
    assert_eq!(
        accepted,
        docs.len(),
        "objects {:?}\nkubectl said:\n{out}",
        kinds_and_names(&docs)
    );
    for kind in [
        "CustomResourceDefinition",
        "ClusterRole",
        "DaemonSet",
        "StatefulSet",
        "PodMonitor",
        "ServiceMonitor",
        "ConfigMap",
        "Pod",
    ]
    .iter()
    .chain(kinds)
    {
        assert!(!of_kind(&docs, kind).is_empty(), "no {kind} was rendered");
    }
}

/// A SelfSubjectAccessReview as whoever `client` authenticates as.
async fn allowed(
    client: &kube::Client,
    verb: &str,
    group: &str,
    resource: &str,
    ns: Option<&str>,
) -> bool {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                namespace: ns.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let answer = api.create(&PostParams::default(), &review).await.unwrap();
    answer.status.unwrap().allowed
}

/// ModelDeployments in `default`, untyped (this crate does not depend on
/// the operator's).
fn model_deployments(client: &kube::Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("rackscale.io", "v1alpha1", "ModelDeployment");
    Api::namespaced_with(client.clone(), "default", &ApiResource::from_gvk(&gvk))
}

fn is_forbidden<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> bool {
    matches!(result, Err(kube::Error::Api(ref s)) if s.code == 403)
}

#[tokio::test]
async fn installed_chart_rbac_lets_the_operator_reconcile_and_nothing_more() {
    let cluster = Cluster::start().await.unwrap();
    let client = cluster.client();
    let etcd = cluster.etcd().endpoint().to_string();
    let dir = Workdir::new("helm-install").unwrap();

    // Install: CRDs from crds/, RBAC, ServiceAccounts, workloads (which no
    // kubelet runs here), dashboards.
    let helm = Helm::new()
        .unwrap()
        .with_kubeconfig(cluster.kubeconfig_path());
    let chart = chart();
    let external = format!("etcd.externalEndpoints={{{etcd}}}");
    helm.run(&[
        "install",
        RELEASE,
        chart.as_str(),
        "--namespace",
        NS,
        "--create-namespace",
        "--set",
        "etcd.enabled=false",
        "--set",
        &external,
        "--set",
        "frontend.enabled=true",
        "--set",
        "frontend.deployment=dsv4",
        "--set",
        "frontend.namespace=default",
    ])
    .await
    .unwrap();
    let status = helm
        .run(&["status", RELEASE, "--namespace", NS, "-o", "json"])
        .await
        .unwrap();
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["info"]["status"], "deployed", "{status}");
    let hooks = helm
        .run(&["get", "hooks", RELEASE, "--namespace", NS])
        .await
        .unwrap();
    assert!(hooks.contains("helm.sh/hook: test"), "{hooks}");
    for crd in ["modeldeployments.rackscale.io", "racks.rackscale.io"] {
        wait_crd_established(&client, crd).await.unwrap();
    }

    // The certificates Helm generated, as the pods would mount them; an
    // upgrade keeps them (the chart reads them back).
    let agent_tls = chart_certificate(&client, "rs-rackscale-agent-tls", dir.path()).await;
    let operator_tls = chart_certificate(&client, "rs-rackscale-operator-tls", dir.path()).await;
    let before = secret_data(&client, "rs-rackscale-agent-tls").await;
    helm.run(&[
        "upgrade",
        RELEASE,
        chart.as_str(),
        "--namespace",
        NS,
        "--reuse-values",
    ])
    .await
    .unwrap();
    assert_eq!(
        secret_data(&client, "rs-rackscale-agent-tls").await,
        before,
        "helm upgrade rotated the agent's certificate"
    );

    // The operator's identity: the chart's ServiceAccount, impersonated.
    let sa = "rs-rackscale-operator";
    let kubeconfig = dir.path().join("operator.kubeconfig");
    service_account_kubeconfig(cluster.kubeconfig_path(), &kubeconfig, NS, sa).unwrap();
    let as_operator = harness::kubeconfig::client_from_kubeconfig(&kubeconfig)
        .await
        .unwrap();

    // Not wider than needed: what the operator never does stays forbidden.
    assert!(is_forbidden(
        Api::<Secret>::namespaced(as_operator.clone(), NS)
            .list(&ListParams::default())
            .await
    ));
    assert!(is_forbidden(
        Api::<Pod>::all(as_operator.clone())
            .list(&ListParams::default())
            .await
    ));
    let topo = Topology::new().rack("b", Sku::Gb300, 4, 4);
    topo.create(&client).await.unwrap();
    let node = topo.racks()[0].node_name(0);
    assert!(is_forbidden(
        Api::<Node>::all(as_operator.clone())
            .delete(&node, &DeleteParams::default())
            .await
    ));
    assert!(is_forbidden(
        Api::<Lease>::namespaced(as_operator.clone(), "default")
            .list(&ListParams::default())
            .await
    ));
    for (verb, group, resource, ns) in [
        ("get", "", "secrets", Some(NS)),
        ("delete", "", "nodes", None),
        ("patch", "", "nodes", None),
        ("create", "", "pods", Some("default")),
        ("create", "apps", "deployments", Some(NS)),
        (
            "create",
            "rbac.authorization.k8s.io",
            "clusterrolebindings",
            None,
        ),
        (
            "delete",
            "rackscale.io",
            "modeldeployments",
            Some("default"),
        ),
        ("create", "coordination.k8s.io", "leases", Some("default")),
        (
            "get",
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            None,
        ),
    ] {
        assert!(
            !allowed(&as_operator, verb, group, resource, ns).await,
            "the operator may {verb} {group}/{resource} in {ns:?}"
        );
    }
    // ...while what it does is granted.
    for (verb, group, resource, ns) in [
        ("watch", "", "nodes", None),
        (
            "patch",
            "rackscale.io",
            "modeldeployments/status",
            Some("default"),
        ),
        ("create", "rackscale.io", "racks", None),
        ("create", "events.k8s.io", "events", Some("default")),
        ("create", "coordination.k8s.io", "leases", Some(NS)),
    ] {
        assert!(
            allowed(&as_operator, verb, group, resource, ns).await,
            "the operator may not {verb} {group}/{resource} in {ns:?}"
        );
    }

    // Enough: with only those permissions the operator leads and brings a
    // deployment to Ready through real agents and engines.
    let engine = sibling("rackscale-engine").display().to_string();
    let opts = harness::fleet::AgentOptions {
        etcd: &etcd,
        engine_bin: &engine,
        time_scale: 100,
        lease_ttl_seconds: 3,
        flags: &agent_tls,
    };
    let agent_bin = sibling("rackscale-agent");
    let mut fleet = harness::fleet::spawn_agents(&topo, &agent_bin, &opts, dir.path()).unwrap();
    let registry = proto::registry::Registry::new(cluster.etcd().client().await.unwrap());
    harness::fleet::wait_registered(
        &registry,
        &mut fleet,
        &agent_bin,
        &opts,
        dir.path(),
        TIMEOUT,
    )
    .await
    .unwrap();
    let metrics_port = free_port().unwrap().to_string();
    let mut operator_args: Vec<String> = [
        "run",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--lease-namespace",
        NS,
        "--lease-name",
        "rackscale-operator",
        "--identity",
        "rs-rackscale-operator-0",
        "--metrics-addr",
        &format!("127.0.0.1:{metrics_port}"),
        "--etcd-endpoints",
        &etcd,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    operator_args.extend(operator_tls);
    let operator = ManagedProcess::spawn(
        "operator",
        &sibling("rackscale-operator"),
        &operator_args,
        dir.path(),
    )
    .unwrap();

    let mds = model_deployments(&client);
    let md: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "rackscale.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "dsv4", "namespace": "default"},
        "spec": {
            "model": {"name": "deepseek-ai/DeepSeek-V4-Pro", "profile": "deepseek-v4-pro"},
            "hardware": {"sku": "gb300", "gpuBudget": 16},
            "workload": {"isl": 8192, "osl": 1024},
            "slo": {"maxTpotMs": 80.0},
            "recipe": {"mode": "explicit", "prefill": {"workers": 2, "tp": 4}, "decode": {"workers": 1, "ep": 8}}
        }
    }))
    .unwrap();
    mds.create(&PostParams::default(), &md).await.unwrap();
    let ready = wait_for("deployment Ready under the chart's RBAC", TIMEOUT, || {
        let mds = mds.clone();
        async move {
            let md = mds.get("dsv4").await?;
            let status = md.data["status"].clone();
            Ok((status["phase"] == "Ready").then_some(status))
        }
    })
    .await;
    let status = ready.unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_tail(40)));
    assert_eq!(status["ready"], "3/3", "{status}");
    let log = std::fs::read_to_string(operator.log_path()).unwrap_or_default();
    // It led through the Lease the chart's Role covers...
    let lease = Api::<Lease>::namespaced(client.clone(), NS)
        .get("rackscale-operator")
        .await
        .unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some("rs-rackscale-operator-0")
    );
    // ...and no call of its was refused on the way (events included).
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "the operator was refused something:\n{log}"
    );
    // ...and every agent served it over mutual TLS with the chart's certificate.
    for a in &fleet {
        let text = plain_text(&std::fs::read_to_string(a.process.log_path()).unwrap_or_default());
        assert!(
            text.contains("serving AgentService") && text.contains("tls=true"),
            "{text}"
        );
        assert!(!text.contains("handshake refused"), "{text}");
    }
}

/// `text` without its ANSI colour sequences (`ESC [ ... m`).
fn plain_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The data of Secret `name` in the release namespace.
async fn secret_data(client: &kube::Client, name: &str) -> Value {
    let secret = Api::<Secret>::namespaced(client.clone(), NS)
        .get(name)
        .await
        .unwrap();
    serde_json::to_value(secret.data).unwrap()
}

/// The chart's certificate Secret `name` written under `dir` as a pod
/// mounts it, and the flags a process would get from the chart.
async fn chart_certificate(client: &kube::Client, name: &str, dir: &Path) -> Vec<String> {
    let secret = Api::<Secret>::namespaced(client.clone(), NS)
        .get(name)
        .await
        .unwrap();
    let data = secret.data.unwrap();
    let mount = dir.join(name);
    std::fs::create_dir_all(&mount).unwrap();
    for key in ["ca.crt", "tls.crt", "tls.key"] {
        std::fs::write(mount.join(key), &data[key].0).unwrap();
    }
    let mut flags = harness::pki::flags(&proto::tls::TlsFiles {
        ca: mount.join("ca.crt"),
        cert: mount.join("tls.crt"),
        key: mount.join("tls.key"),
    });
    flags.push(format!("--tls-server-name={SERVER_NAME}"));
    flags
}
