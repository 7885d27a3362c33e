//! Kubeconfig files for a harness apiserver, and `kube::Client`s built from
//! them.
//!
//! The file names the CA by path (a `ca.crt` beside it) and authenticates
//! with a bearer token, so both kube-rs and `kubectl --kubeconfig` use it.

use std::path::Path;

use anyhow::{Context, Result, bail};
use kube::config::{KubeConfigOptions, Kubeconfig};

/// Context, cluster and user name inside harness kubeconfigs.
pub const CONTEXT: &str = "rackscale-harness";

/// Writes a kubeconfig for `server` trusting `ca_file` and sending `token`.
pub fn write_kubeconfig(path: &Path, server: &str, ca_file: &Path, token: &str) -> Result<()> {
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": CONTEXT,
            "cluster": { "server": server, "certificate-authority": ca_file },
        }],
        "users": [{ "name": CONTEXT, "user": { "token": token } }],
        "contexts": [{
            "name": CONTEXT,
            "context": { "cluster": CONTEXT, "user": CONTEXT, "namespace": "default" },
        }],
        "current-context": CONTEXT,
    });
    let yaml = serde_yaml::to_string(&doc).context("serialising the kubeconfig")?;
    std::fs::write(path, yaml).with_context(|| format!("writing kubeconfig {}", path.display()))
}

/// A client configured from the kubeconfig at `path`.
pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client> {
    let kubeconfig = Kubeconfig::read_from(path)
        .with_context(|| format!("reading kubeconfig {}", path.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("turning the kubeconfig into a client config")?;
    kube::Client::try_from(config).context("building a kube client")
}

/// The CA certificate of a serving-cert bundle written by kube-apiserver's
/// `--cert-dir` self-signing: the leaf comes first, its CA last.
pub fn ca_from_bundle(bundle_pem: &str) -> Result<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let Some(start) = bundle_pem.rfind(BEGIN) else {
        bail!("no certificate in the serving-cert bundle")
    };
    let Some(len) = bundle_pem[start..].find(END) else {
        bail!("the last certificate in the serving-cert bundle is truncated")
    };
    Ok(format!("{}\n", &bundle_pem[start..start + len + END.len()]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_is_the_last_certificate() {
        let bundle = "-----BEGIN CERTIFICATE-----\nLEAF\n-----END CERTIFICATE-----\n\
                      -----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n";
        assert_eq!(
            ca_from_bundle(bundle).unwrap(),
            "-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n"
        );
        assert!(ca_from_bundle("").is_err());
        assert!(ca_from_bundle("-----BEGIN CERTIFICATE-----\nHALF").is_err());
    }

    #[test]
    fn kubeconfig_round_trips_through_kube_rs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        let ca = dir.path().join("ca.crt");
        write_kubeconfig(&path, "https://127.0.0.1:6443", &ca, "s3cret").unwrap();
        let parsed = Kubeconfig::read_from(&path).unwrap();
        assert_eq!(parsed.current_context.as_deref(), Some(CONTEXT));
        let cluster = parsed.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:6443"));
        assert_eq!(cluster.certificate_authority.as_deref(), ca.to_str());
        let user = parsed.auth_infos[0].auth_info.as_ref().unwrap();
        assert!(user.token.is_some());
    }
}
