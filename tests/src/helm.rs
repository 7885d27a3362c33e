//! The pinned `helm` binary (built by `scripts/setup.sh helm` into
//! [`crate::bins::bin_dir`]), run against the chart in `charts/rackscale`
//! and, for installs, a harness apiserver's kubeconfig.
//!
//! Each [`Helm`] keeps its own cache, config, data and discovery-cache
//! directories, so parallel tests share no repository index, release
//! driver state or API discovery, and nothing is read from the user's
//! `~/.config/helm`. No command here reaches outside loopback: the chart
//! is local and has no dependencies.

use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::bins;

/// The helm binary's file name in the bin dir.
pub const HELM: &str = "helm";

/// The repository's chart directory (`charts/rackscale`).
pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/rackscale")
}

/// A helm command line factory with isolated state.
#[derive(Debug)]
pub struct Helm {
    binary: PathBuf,
    kubeconfig: Option<PathBuf>,
    home: TempDir,
}

impl Helm {
    /// The pinned helm, or an error saying how to build it.
    pub fn new() -> Result<Self> {
        let home = tempfile::Builder::new()
            .prefix("rackscale-helm-")
            .tempdir()
            .context("creating helm's state directory")?;
        Ok(Self {
            binary: bins::binary(HELM)?,
            kubeconfig: None,
            home,
        })
    }

    /// Talks to the apiserver of `kubeconfig` (install, test, uninstall).
    pub fn with_kubeconfig(mut self, kubeconfig: &Path) -> Self {
        self.kubeconfig = Some(kubeconfig.to_path_buf());
        self
    }

    /// Runs `helm args...` and returns what it printed, whatever its exit.
    pub async fn output(&self, args: &[&str]) -> Result<Output> {
        let home = self.home.path();
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.args(args)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            // Discovery (which gates the chart's monitors) is cached per
            // host:port under ~/.kube/cache by default; a port reused from
            // another test's apiserver would answer from its stale cache.
            .env("KUBECACHEDIR", home.join("kube-cache"))
            .env_remove("HELM_KUBECONTEXT")
            .env_remove("HELM_NAMESPACE")
            .kill_on_drop(true);
        match &self.kubeconfig {
            Some(path) => cmd.env("KUBECONFIG", path),
            // Nothing to talk to: an unreachable, explicit empty config.
            None => cmd.env("KUBECONFIG", home.join("no-cluster")),
        };
        cmd.output()
            .await
            .with_context(|| format!("running {} {}", self.binary.display(), args.join(" ")))
    }

    /// Runs `helm args...`, returning stdout; a non-zero exit is an error
    /// carrying stderr.
    pub async fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.output(args).await?;
        if !out.status.success() {
            bail!(
                "helm {} failed ({}):\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        String::from_utf8(out.stdout).context("helm printed non-UTF-8")
    }
}

/// Writes to `out` a copy of the kubeconfig at `admin` whose user
/// impersonates ServiceAccount `namespace/name` (`as` and `as-groups`, as
/// kubectl and kube-rs honour them): requests then carry exactly the
/// permissions RBAC grants that ServiceAccount, as they would from its pod.
pub fn service_account_kubeconfig(
    admin: &Path,
    out: &Path,
    namespace: &str,
    name: &str,
) -> Result<()> {
    let text = std::fs::read_to_string(admin)
        .with_context(|| format!("reading kubeconfig {}", admin.display()))?;
    let mut doc: serde_json::Value = serde_yaml::from_str(&text).context("parsing kubeconfig")?;
    let users = doc["users"]
        .as_array_mut()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| anyhow::anyhow!("kubeconfig {} has no users", admin.display()))?;
    for user in users {
        user["user"]["as"] = format!("system:serviceaccount:{namespace}:{name}").into();
        user["user"]["as-groups"] = serde_json::json!([
            "system:serviceaccounts",
            format!("system:serviceaccounts:{namespace}"),
            "system:authenticated",
        ]);
    }
    let yaml = serde_yaml::to_string(&doc).context("serialising kubeconfig")?;
    std::fs::write(out, yaml).with_context(|| format!("writing {}", out.display()))
}

/// One document of a multi-document YAML stream, as JSON; empty documents
/// (comments only) are skipped.
pub fn documents(yaml: &str) -> Result<Vec<serde_json::Value>> {
    use serde::Deserialize;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_json::Value::deserialize(doc).context("parsing rendered YAML")?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// `kind/name` of every document, in order.
pub fn kinds_and_names(docs: &[serde_json::Value]) -> Vec<String> {
    docs.iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap_or("?"),
                d["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_skip_empty_ones() {
        let yaml = "---\n# Source: x\n---\nkind: A\nmetadata: {name: a}\n---\nkind: B\nmetadata: {name: b}\n";
        let docs = documents(yaml).unwrap();
        assert_eq!(kinds_and_names(&docs), ["A/a", "B/b"]);
    }

    #[test]
    fn impersonation_names_the_service_account_and_its_groups() {
        let dir = tempfile::tempdir().unwrap();
        let admin = dir.path().join("admin");
        let ca = dir.path().join("ca.crt");
        crate::kubeconfig::write_kubeconfig(&admin, "https://127.0.0.1:1", &ca, "t").unwrap();
        let out = dir.path().join("sa");
        service_account_kubeconfig(&admin, &out, "ns", "op").unwrap();
        let kc = kube::config::Kubeconfig::read_from(&out).unwrap();
        let user = kc.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(
            user.impersonate.as_deref(),
            Some("system:serviceaccount:ns:op")
        );
        let groups = user.impersonate_groups.clone().unwrap();
        assert!(groups.contains(&"system:serviceaccounts:ns".to_owned()));
    }

    #[test]
    fn chart_dir_holds_the_chart() {
        assert!(chart_dir().join("Chart.yaml").is_file());
    }
}
