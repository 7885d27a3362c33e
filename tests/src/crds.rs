//! Installing CustomResourceDefinitions from YAML into a test apiserver.
//!
//! CRDs are applied with server-side apply (field manager
//! [`FIELD_MANAGER`]) and each call returns only once every applied CRD is
//! `Established`, so tests can create custom objects right away.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};
use serde::Deserialize;

/// Field manager name for everything the harness applies.
pub const FIELD_MANAGER: &str = "rackscale-harness";
/// How long a CRD may take to become `Established`.
pub const CRD_ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(30);

/// Applies every CRD in the `*.yaml` / `*.yml` files of `dir` (files may hold
/// several documents) and waits until all are established. A missing
/// directory is not an error: it installs nothing and returns 0.
pub async fn install_crds(client: &kube::Client, dir: impl AsRef<Path>) -> Result<usize> {
    let dir = dir.as_ref();
    if !dir.exists() {
        return Ok(0);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let is_yaml = path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml");
        if is_yaml && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    let mut crds = Vec::new();
    for path in &files {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        crds.extend(parse_crds(&text).with_context(|| format!("parsing {}", path.display()))?);
    }
    apply_all(client, &crds).await?;
    Ok(crds.len())
}

/// Applies exactly one CRD given as YAML and waits until it is established;
/// returns its name.
pub async fn apply_crd_yaml(client: &kube::Client, yaml: &str) -> Result<String> {
    let mut crds = parse_crds(yaml)?;
    let (Some(crd), None) = (crds.pop(), crds.pop()) else {
        bail!("expected exactly one CustomResourceDefinition in the YAML")
    };
    apply_crd(client, &crd).await
}

/// Applies every CRD in a (multi-document) YAML string; returns their names.
pub async fn apply_crds_yaml(client: &kube::Client, yaml: &str) -> Result<Vec<String>> {
    let crds = parse_crds(yaml)?;
    apply_all(client, &crds).await
}

/// Applies one CRD and waits until it is established; returns its name.
pub async fn apply_crd(client: &kube::Client, crd: &CustomResourceDefinition) -> Result<String> {
    let mut names = apply_all(client, std::slice::from_ref(crd)).await?;
    names.pop().context("no CRD name came back")
}

/// Waits until CRD `name` has condition `Established=True` and the
/// apiserver's discovery lists its resource in every served version.
///
/// The two are separate controllers in kube-apiserver: a CRD can be
/// Established a moment before discovery knows its plural and short names,
/// and in that window `kubectl get <shortname>` says "the server doesn't
/// have a resource type".
pub async fn wait_crd_established(client: &kube::Client, name: &str) -> Result<()> {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let established = await_condition(api, name, conditions::is_crd_established());
    let crd = match tokio::time::timeout(CRD_ESTABLISHED_TIMEOUT, established).await {
        Ok(result) => result.with_context(|| format!("watching CRD {name}"))?,
        Err(_) => bail!(
            "timed out after {CRD_ESTABLISHED_TIMEOUT:?} waiting for CRD {name} to be Established"
        ),
    };
    let Some(crd) = crd else {
        bail!("CRD {name} was deleted while waiting for it to be Established")
    };
    let plural = crd.spec.names.plural.clone();
    for version in crd.spec.versions.iter().filter(|v| v.served) {
        let group_version = format!("{}/{}", crd.spec.group, version.name);
        crate::wait_until(
            format_args!("discovery of {group_version} to list {plural}"),
            CRD_ESTABLISHED_TIMEOUT,
            || async {
                let resources = client.list_api_group_resources(&group_version).await?;
                Ok(resources.resources.iter().any(|r| r.name == plural))
            },
        )
        .await?;
    }
    Ok(())
}

async fn apply_all(
    client: &kube::Client,
    crds: &[CustomResourceDefinition],
) -> Result<Vec<String>> {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut names = Vec::with_capacity(crds.len());
    for crd in crds {
        let name = crd
            .metadata
            .name
            .clone()
            .context("a CRD without metadata.name")?;
        api.patch(&name, &params, &Patch::Apply(crd))
            .await
            .with_context(|| format!("applying CRD {name}"))?;
        names.push(name);
    }
    for name in &names {
        wait_crd_established(client, name).await?;
    }
    Ok(names)
}

/// The CRDs in a multi-document YAML string; empty documents are skipped,
/// any other kind is an error.
pub fn parse_crds(yaml: &str) -> Result<Vec<CustomResourceDefinition>> {
    let mut crds = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let value = serde_yaml::Value::deserialize(document)
            .with_context(|| format!("YAML document {index}"))?;
        if value.is_null() {
            continue;
        }
        let kind = value
            .get("kind")
            .and_then(serde_yaml::Value::as_str)
            .unwrap_or("<none>");
        if kind != "CustomResourceDefinition" {
            bail!("YAML document {index} is a {kind}, not a CustomResourceDefinition");
        }
        let crd = serde_yaml::from_value(value)
            .with_context(|| format!("YAML document {index} as a CustomResourceDefinition"))?;
        crds.push(crd);
    }
    Ok(crds)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../fixtures/crds/widgets.yaml");

    #[test]
    fn parses_the_fixture() {
        let crds = parse_crds(FIXTURE).unwrap();
        assert_eq!(crds.len(), 1);
        assert_eq!(
            crds[0].metadata.name.as_deref(),
            Some("widgets.harness.rackscale.dev")
        );
        let version = &crds[0].spec.versions[0];
        assert!(version.subresources.as_ref().unwrap().status.is_some());
    }

    #[test]
    fn skips_empty_documents_and_rejects_other_kinds() {
        let two = format!("---\n{FIXTURE}\n---\n---\n{FIXTURE}");
        assert_eq!(parse_crds(&two).unwrap().len(), 2);
        let err = parse_crds("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("ConfigMap"), "{err}");
    }
}
