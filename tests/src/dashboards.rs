//! Reading Grafana dashboards the way Grafana's Prometheus data source
//! runs them: every panel's PromQL (rows' nested panels included), every
//! `label_values(expr, label)` template variable, and the substitution of
//! template variables (`$namespace`, `${deployment}`, `$__rate_interval`,
//! ...) with concrete values so Prometheus can evaluate the result.
//!
//! Pure functions over `serde_json::Value`; a dashboard that Grafana would
//! show as an empty panel (no targets, a target without `expr`) or a query
//! using a variable nobody substitutes is an error, not a skip.

use std::collections::BTreeMap;

use anyhow::{Result, anyhow, bail};
use serde_json::Value;

/// One query of one panel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PanelQuery {
    /// The dashboard's title.
    pub dashboard: String,
    /// The panel's title.
    pub panel: String,
    /// The target's `refId`.
    pub ref_id: String,
    /// The PromQL, with template variables as written.
    pub expr: String,
}

/// A `label_values(expr, label)` template variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelValuesVariable {
    pub name: String,
    /// The series selector whose label values the variable offers.
    pub expr: String,
    pub label: String,
}

/// Every query of every panel of `dashboard`, in panel order.
pub fn panel_queries(dashboard: &Value) -> Result<Vec<PanelQuery>> {
    let title = dashboard["title"]
        .as_str()
        .ok_or_else(|| anyhow!("dashboard without a title"))?
        .to_owned();
    let mut out = Vec::new();
    let panels = dashboard["panels"]
        .as_array()
        .ok_or_else(|| anyhow!("{title}: no panels"))?;
    collect(&title, panels, &mut out)?;
    if out.is_empty() {
        bail!("{title}: no panel has a query");
    }
    Ok(out)
}

fn collect(dashboard: &str, panels: &[Value], out: &mut Vec<PanelQuery>) -> Result<()> {
    for panel in panels {
        let name = panel["title"].as_str().unwrap_or("(untitled)").to_owned();
        if panel["type"] == "row" {
            if let Some(nested) = panel["panels"].as_array() {
                collect(dashboard, nested, out)?;
            }
            continue;
        }
        let targets = panel["targets"]
            .as_array()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| anyhow!("{dashboard} / {name}: panel without targets"))?;
        for target in targets {
            let ref_id = target["refId"].as_str().unwrap_or("?").to_owned();
            let expr = target["expr"]
                .as_str()
                .filter(|e| !e.trim().is_empty())
                .ok_or_else(|| anyhow!("{dashboard} / {name} / {ref_id}: target without expr"))?;
            out.push(PanelQuery {
                dashboard: dashboard.to_owned(),
                panel: name.clone(),
                ref_id,
                expr: expr.to_owned(),
            });
        }
    }
    Ok(())
}

/// The `label_values(expr, label)` query variables of `dashboard`. Other
/// query forms are an error (they would not be checked).
pub fn label_values_variables(dashboard: &Value) -> Result<Vec<LabelValuesVariable>> {
    let mut out = Vec::new();
    for var in dashboard["templating"]["list"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        if var["type"] != "query" {
            continue;
        }
        let name = var["name"].as_str().unwrap_or("?").to_owned();
        let query = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .ok_or_else(|| anyhow!("variable {name}: no query"))?;
        let inner = query
            .trim()
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .ok_or_else(|| {
                anyhow!("variable {name}: only label_values(expr, label) is supported, got {query}")
            })?;
        let (expr, label) = inner
            .rsplit_once(',')
            .ok_or_else(|| anyhow!("variable {name}: label_values needs (expr, label): {query}"))?;
        out.push(LabelValuesVariable {
            name,
            expr: expr.trim().to_owned(),
            label: label.trim().to_owned(),
        });
    }
    Ok(out)
}

/// `expr` with each `$name` / `${name}` replaced by `values[name]`
/// (longest names first, so `$__rate_interval` is not read as
/// `$__rate`). A `$` left over is an error naming it.
pub fn substitute(expr: &str, values: &BTreeMap<&str, &str>) -> Result<String> {
    let mut names: Vec<&&str> = values.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    let mut out = expr.to_owned();
    for name in names {
        let value = values[*name];
        out = out.replace(&format!("${{{name}}}"), value);
        out = out.replace(&format!("${name}"), value);
    }
    if let Some(at) = out.find('$') {
        let rest: String = out[at..].chars().take(24).collect();
        bail!("unsubstituted template variable at {rest:?} in {expr}");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn queries_come_from_panels_and_rows() {
        let d = json!({"title": "D", "panels": [
            {"type": "stat", "title": "a", "targets": [{"refId": "A", "expr": "up"}]},
            {"type": "row", "title": "r", "panels": [
                {"type": "timeseries", "title": "b", "targets": [
                    {"refId": "A", "expr": "x"}, {"refId": "B", "expr": "y"}]}]},
        ]});
        let q = panel_queries(&d).unwrap();
        let exprs: Vec<&str> = q.iter().map(|q| q.expr.as_str()).collect();
        assert_eq!(exprs, ["up", "x", "y"]);
        assert_eq!(q[2].panel, "b");
        assert_eq!(q[2].ref_id, "B");
    }

    #[test]
    fn a_panel_without_a_query_is_an_error() {
        let d = json!({"title": "D", "panels": [{"type": "stat", "title": "a", "targets": []}]});
        assert!(panel_queries(&d).is_err());
        let d = json!({"title": "D", "panels": [{"type": "stat", "title": "a", "targets": [{"refId": "A"}]}]});
        assert!(panel_queries(&d).is_err());
    }

    #[test]
    fn label_values_variables_are_parsed() {
        let d = json!({"templating": {"list": [
            {"type": "datasource", "name": "datasource"},
            {"type": "query", "name": "ns", "query": {"query": "label_values(up{job=~\"a,b\"}, namespace)"}},
        ]}});
        let v = label_values_variables(&d).unwrap();
        assert_eq!(v[0].expr, "up{job=~\"a,b\"}");
        assert_eq!(v[0].label, "namespace");
        let bad = json!({"templating": {"list": [{"type": "query", "name": "x", "query": "query_result(up)"}]}});
        assert!(label_values_variables(&bad).is_err());
    }

    #[test]
    fn substitution_prefers_longer_names_and_rejects_leftovers() {
        let values = BTreeMap::from([("__rate_interval", "10s"), ("__range", "1m"), ("ns", "x")]);
        assert_eq!(
            substitute(
                "rate(a{n=~\"$ns\"}[$__rate_interval]) ${ns} $__range",
                &values
            )
            .unwrap(),
            "rate(a{n=~\"x\"}[10s]) x 1m"
        );
        assert!(substitute("a{n=\"$other\"}", &values).is_err());
    }
}
