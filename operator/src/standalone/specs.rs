//! ModelDeployment specs read from YAML files, for standalone mode.
//!
//! Owns reading (a file, or every `*.yaml`/`*.yml` in a directory, several
//! documents per file), the checks the API server would make before the
//! operator sees an object (kind, apiVersion, name, the schema's ranges and
//! every CEL rule of the CRD, with the CRD's own messages), and the
//! generation counter a file edit bumps. Pure apart from reading files.
//! Invariant: every message in [`RULES`] is the message of a CEL rule of the
//! generated CRD and vice versa (a unit test keeps them in step).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::crd::{ModelDeployment, ModelDeploymentSpec, ModelProfileName, RecipeMode};
use crate::error::{Error, Result};

/// One deployment read from a file.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecEntry {
    pub namespace: String,
    pub name: String,
    pub file: PathBuf,
    pub spec: ModelDeploymentSpec,
}

impl SpecEntry {
    /// `namespace/name`, the key the ledger and agents use.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The CEL rules of the ModelDeployment CRD, by message, each checked by
/// [`violations`].
pub const RULES: &[&str] = &[
    "the explicit recipe uses more GPUs than hardware.gpuBudget: prefill.workers x prefill.tp + decode.workers x (decode.ep or decode.tp) must not exceed it",
    "recipe.decode.ep must divide the model's routed experts (384 for deepseek-v4-pro: 2, 4, 8, 12, 16, 24, 32, 48, 64; 256 for deepseek-v4-flash and deepseek-v3: 2, 4, 8, 16, 32, 64)",
    "set slo.minTokensPerSecondPerUser (tok/s/user) or slo.maxTpotMs",
    "set only one of slo.minTokensPerSecondPerUser and slo.maxTpotMs: one is 1000 divided by the other",
    "slo.minTokensPerSecondPerUser must be positive",
    "slo.maxTpotMs must be positive",
    "slo.maxTtftMs must be positive",
    "recipe.mode explicit needs recipe.prefill and recipe.decode",
    "recipe.mode auto picks the pools itself: remove recipe.prefill and recipe.decode, or set mode: explicit",
    "recipe.maxConcurrency must be at least 1",
    "recipe.prefill.workers must be at least 1",
    "recipe.prefill.tp must be 1, 2, 4 or 8 (a TP group stays within 8 GPUs)",
    "set exactly one of recipe.decode.ep (expert-parallel width) and recipe.decode.tp (tensor-parallel width)",
    "recipe.decode.workers must be at least 1",
    "recipe.decode.ep must be one of 2, 4, 8, 12, 16, 24, 32, 48, 64, 72: an EP group stays inside one 72-GPU NVLink domain",
    "recipe.decode.tp must be 1, 2, 4 or 8",
    "rebalance.stabilizationWindowSeconds must be at least rebalance.intervalSeconds",
    crate::crd::ENGINE_ARGS_RULE,
];

fn rule(i: usize) -> String {
    RULES.get(i).copied().unwrap_or("invalid spec").to_string()
}

fn range(out: &mut Vec<String>, field: &str, value: u64, lo: u64, hi: u64) {
    if value < lo || value > hi {
        out.push(format!(
            "{field} must be between {lo} and {hi}, got {value}"
        ));
    }
}

/// Everything the API server would reject in `spec`: the schema's ranges
/// and every CEL rule, each as the message a user sees. Empty when valid.
pub fn violations(spec: &ModelDeploymentSpec) -> Vec<String> {
    let mut out = Vec::new();
    let name_len = spec.model.name.chars().count() as u64;
    range(&mut out, "model.name length", name_len, 1, 253);
    range(
        &mut out,
        "hardware.gpuBudget",
        spec.hardware.gpu_budget.into(),
        2,
        100_000,
    );
    range(
        &mut out,
        "workload.isl",
        spec.workload.isl.into(),
        1,
        1_048_576,
    );
    range(
        &mut out,
        "workload.osl",
        spec.workload.osl.into(),
        1,
        1_048_576,
    );
    let rb = &spec.rebalance;
    range(
        &mut out,
        "rebalance.intervalSeconds",
        rb.interval_seconds.into(),
        5,
        3600,
    );
    range(
        &mut out,
        "rebalance.stabilizationWindowSeconds",
        rb.stabilization_window_seconds.into(),
        5,
        86_400,
    );
    range(
        &mut out,
        "rebalance.minWorkersPerPool",
        rb.min_workers_per_pool.into(),
        1,
        1000,
    );
    range(
        &mut out,
        "rebalance.maxMovesPerInterval",
        rb.max_moves_per_interval.into(),
        1,
        1000,
    );
    range(
        &mut out,
        "rebalance.minGainPercent",
        rb.min_gain_percent.into(),
        0,
        1000,
    );
    range(
        &mut out,
        "rebalance.paybackSeconds",
        rb.payback_seconds.into(),
        1,
        86_400,
    );
    if rb.stabilization_window_seconds < rb.interval_seconds {
        out.push(rule(16));
    }
    let args = &spec.engine.args;
    range(&mut out, "engine.args items", args.len() as u64, 0, 32);
    for a in args {
        range(
            &mut out,
            "engine.args entry length",
            a.chars().count() as u64,
            0,
            256,
        );
    }
    if args.iter().any(|a| crate::crd::engine_arg(a).is_none()) {
        out.push(rule(17));
    }

    let slo = &spec.slo;
    let (per_user, tpot) = (slo.min_tokens_per_second_per_user, slo.max_tpot_ms);
    if per_user.is_none() && tpot.is_none() {
        out.push(rule(2));
    }
    if per_user.is_some() && tpot.is_some() {
        out.push(rule(3));
    }
    for (value, i) in [(per_user, 4), (tpot, 5), (slo.max_ttft_ms, 6)] {
        if value.is_some_and(|v| v.is_nan() || v <= 0.0) {
            out.push(rule(i));
        }
    }

    let recipe = &spec.recipe;
    let (prefill, decode) = (recipe.prefill.as_ref(), recipe.decode.as_ref());
    match recipe.mode {
        RecipeMode::Explicit if prefill.is_none() || decode.is_none() => out.push(rule(7)),
        RecipeMode::Auto if prefill.is_some() || decode.is_some() => out.push(rule(8)),
        _ => {}
    }
    if recipe.max_concurrency == Some(0) {
        out.push(rule(9));
    }
    if let Some(p) = prefill {
        if p.workers < 1 {
            out.push(rule(10));
        }
        if ![1, 2, 4, 8].contains(&p.tp) {
            out.push(rule(11));
        }
    }
    if let Some(d) = decode {
        if d.ep.is_some() == d.tp.is_some() {
            out.push(rule(12));
        }
        if d.workers < 1 {
            out.push(rule(13));
        }
        if d.ep
            .is_some_and(|ep| ![2, 4, 8, 12, 16, 24, 32, 48, 64, 72].contains(&ep))
        {
            out.push(rule(14));
        }
        if d.tp.is_some_and(|tp| ![1, 2, 4, 8].contains(&tp)) {
            out.push(rule(15));
        }
    }
    if recipe.mode == RecipeMode::Explicit
        && let (Some(p), Some(d)) = (prefill, decode)
    {
        let experts = match spec.model.profile {
            ModelProfileName::DeepseekV4Pro => 384,
            ModelProfileName::DeepseekV4Flash | ModelProfileName::DeepseekV3 => 256,
        };
        if let Some(ep) = d.ep
            && ep > 0
            && experts % ep != 0
        {
            out.push(rule(1));
        }
        if let Some(width) = d.ep.or(d.tp) {
            let gpus =
                u64::from(p.workers) * u64::from(p.tp) + u64::from(d.workers) * u64::from(width);
            if gpus > u64::from(spec.hardware.gpu_budget) {
                out.push(rule(0));
            }
        }
    }
    out
}

/// The YAML files of `path`: the file itself, or a directory's `*.yaml`
/// and `*.yml` files in name order.
fn files(path: &Path) -> Result<Vec<PathBuf>> {
    let meta =
        std::fs::metadata(path).map_err(|e| Error::SpecFile(format!("{}: {e}", path.display())))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::SpecFile(format!("{}: {e}", path.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    out.sort();
    if out.is_empty() {
        return Err(Error::SpecFile(format!(
            "{}: no *.yaml or *.yml file with a ModelDeployment",
            path.display()
        )));
    }
    Ok(out)
}

/// A DNS-1123 subdomain (what Kubernetes accepts as a name).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Parses and checks the documents of one file's `text`.
pub fn parse(file: &Path, text: &str) -> Result<Vec<SpecEntry>> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let at = format!("{} (document {})", file.display(), i + 1);
        let value = serde_yaml::Value::deserialize(doc)
            .map_err(|e| Error::SpecFile(format!("{at}: not YAML: {e}")))?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        let api = value
            .get("apiVersion")
            .and_then(|k| k.as_str())
            .unwrap_or("");
        if kind != "ModelDeployment" || api != "rackscale.io/v1alpha1" {
            return Err(Error::SpecFile(format!(
                "{at}: expected apiVersion rackscale.io/v1alpha1, kind ModelDeployment; found apiVersion {api:?}, kind {kind:?}"
            )));
        }
        let md: ModelDeployment =
            serde_yaml::from_value(value).map_err(|e| Error::SpecFile(format!("{at}: {e}")))?;
        let name = md.metadata.name.clone().unwrap_or_default();
        if !valid_name(&name) {
            return Err(Error::SpecFile(format!(
                "{at}: metadata.name {name:?} must be a lowercase DNS subdomain (a-z, 0-9, '-', '.')"
            )));
        }
        let problems = violations(&md.spec);
        if !problems.is_empty() {
            return Err(Error::SpecFile(format!(
                "{at}: ModelDeployment {name} is invalid: {}",
                problems.join("; ")
            )));
        }
        out.push(SpecEntry {
            namespace: md
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name,
            file: file.to_path_buf(),
            spec: md.spec,
        });
    }
    Ok(out)
}

/// Every deployment under `path`, by key; two with the same key are an
/// error naming both files.
pub fn load(path: &Path) -> Result<BTreeMap<String, SpecEntry>> {
    let mut out: BTreeMap<String, SpecEntry> = BTreeMap::new();
    for file in files(path)? {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| Error::SpecFile(format!("{}: {e}", file.display())))?;
        for entry in parse(&file, &text)? {
            if let Some(other) = out.get(&entry.key()) {
                return Err(Error::SpecFile(format!(
                    "ModelDeployment {} is defined twice: in {} and in {}",
                    entry.key(),
                    other.file.display(),
                    entry.file.display()
                )));
            }
            out.insert(entry.key(), entry);
        }
    }
    Ok(out)
}

/// Spec generations: 1 when first seen, +1 on every change of the spec.
#[derive(Debug, Default)]
pub struct Generations {
    seen: BTreeMap<String, (ModelDeploymentSpec, i64)>,
}

impl Generations {
    /// The generation of `spec` under `key`.
    pub fn of(&mut self, key: &str, spec: &ModelDeploymentSpec) -> i64 {
        match self.seen.get_mut(key) {
            Some((known, generation)) if known == spec => *generation,
            Some((known, generation)) => {
                *known = spec.clone();
                *generation += 1;
                *generation
            }
            None => {
                self.seen.insert(key.to_string(), (spec.clone(), 1));
                1
            }
        }
    }

    /// Forgets `key` (its file went away).
    pub fn forget(&mut self, key: &str) {
        self.seen.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: rackscale.io/v1alpha1
kind: ModelDeployment
metadata: {name: small, namespace: llm}
spec:
  model: {name: m, profile: deepseek-v4-pro}
  hardware: {sku: gb200, gpuBudget: 8}
  workload: {isl: 1024, osl: 128}
  slo: {maxTpotMs: 50}
  recipe: {mode: explicit, prefill: {workers: 1, tp: 4}, decode: {workers: 1, ep: 4}}
"#;

    fn err(text: &str) -> String {
        parse(Path::new("x.yaml"), text).unwrap_err().to_string()
    }

    #[test]
    fn a_valid_file_gives_its_deployment() {
        let got = parse(Path::new("x.yaml"), GOOD).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].key(), "llm/small");
    }

    #[test]
    fn every_cel_rule_of_the_crd_is_checked_here() {
        let crd = crate::crd::all()
            .into_iter()
            .find(|c| c.spec.names.kind == "ModelDeployment")
            .unwrap();
        let crd = serde_json::to_string(&crd).unwrap();
        let mut in_crd = 0;
        for piece in crd.split("\"message\":\"").skip(1) {
            let message = piece.split('"').next().unwrap();
            in_crd += 1;
            assert!(RULES.contains(&message), "unchecked CRD rule: {message}");
        }
        assert_eq!(in_crd, RULES.len(), "rules in the CRD and here differ");
    }

    #[test]
    fn engine_args_follow_the_crds_rule() {
        let with =
            |args: &str| GOOD.replace("  slo:", &format!("  engine: {{args: {args}}}\n  slo:"));
        assert!(parse(Path::new("x.yaml"), &with("[--max-context=16384]")).is_ok());
        for bad in [
            "[--max-context]",
            "[max-context=1]",
            "[--tls-key=/k]",
            "[--etcd-endpoints=x]",
            "[--insecure-plaintext=true]",
            "[--Max=1]",
        ] {
            assert!(
                err(&with(bad)).contains(crate::crd::ENGINE_ARGS_RULE),
                "{bad}: {}",
                err(&with(bad))
            );
        }
        assert_eq!(
            crate::crd::engine_arg("--kv-ttl-seconds=30"),
            Some(("kv-ttl-seconds", "30"))
        );
        assert_eq!(
            crate::crd::engine_arg("--model-dir=/m=x"),
            Some(("model-dir", "/m=x"))
        );
    }

    #[test]
    fn invalid_specs_say_what_to_fix() {
        let over = GOOD.replace("gpuBudget: 8", "gpuBudget: 6");
        assert!(
            err(&over).contains("more GPUs than hardware.gpuBudget"),
            "{}",
            err(&over)
        );
        let ep = GOOD.replace("ep: 4", "ep: 72");
        assert!(err(&ep).contains("must divide the model's routed experts"));
        let both = GOOD.replace(
            "maxTpotMs: 50",
            "maxTpotMs: 50, minTokensPerSecondPerUser: 20",
        );
        assert!(err(&both).contains("set only one of"));
        let auto = GOOD.replace("mode: explicit", "mode: auto");
        assert!(err(&auto).contains("recipe.mode auto picks the pools itself"));
        let tp = GOOD.replace("tp: 4", "tp: 3");
        assert!(err(&tp).contains("recipe.prefill.tp must be 1, 2, 4 or 8"));
        let sku = GOOD.replace("gb200", "h100");
        assert!(err(&sku).contains("x.yaml (document 1)") && err(&sku).contains("h100"));
        let kind = GOOD.replace("kind: ModelDeployment", "kind: Deployment");
        assert!(err(&kind).contains("expected apiVersion rackscale.io/v1alpha1"));
        assert!(err("a: [").contains("not YAML"));
        let name = GOOD.replace("name: small", "name: Small_One");
        assert!(err(&name).contains("DNS subdomain"));
        let moves = GOOD.replace(
            "recipe: {mode: explicit",
            "rebalance: {maxMovesPerInterval: 0}\n  recipe: {mode: explicit",
        );
        assert!(
            err(&moves).contains("rebalance.maxMovesPerInterval must be between 1 and 1000"),
            "{}",
            err(&moves)
        );
    }

    #[test]
    fn generation_moves_only_when_the_spec_changes() {
        let mut g = Generations::default();
        let spec = parse(Path::new("x.yaml"), GOOD).unwrap().remove(0).spec;
        assert_eq!(g.of("k", &spec), 1);
        assert_eq!(g.of("k", &spec), 1);
        let mut changed = spec.clone();
        changed.workload.osl = 256;
        assert_eq!(g.of("k", &changed), 2);
        g.forget("k");
        assert_eq!(g.of("k", &spec), 1);
    }
}
