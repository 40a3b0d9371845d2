//! The operations examples read as data, so tests can hold them to the rules they depend on:
//! the Grafana dashboard (`examples/grafana/unbusy.json`) queries series that
//! `examples/prometheus` records, and the HPA in `examples/istio` scales on a metric that
//! prometheus-adapter (`examples/istio/prometheus-adapter.yaml`) derives from one of those
//! series. Nothing here is a mock of Prometheus: the end-to-end test runs what these functions
//! extract against a live one, and a plain test checks the names line up.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The repository's `examples/` directory.
pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Every document of a (multi-document) YAML text, as JSON values.
pub fn yaml_documents(text: &str) -> Result<Vec<Value>, String> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).map_err(|e| e.to_string()))
        .filter(|d| !matches!(d, Ok(Value::Null)))
        .collect()
}

/// Reads and parses a file under `examples/`.
pub fn read_yaml(relative: &str) -> Result<Vec<Value>, String> {
    let path = examples().join(relative);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    yaml_documents(&text).map_err(|e| format!("{relative}: {e}"))
}

/// The names of the recording rules (`record:`) in a Prometheus rule file.
pub fn recorded_series(rules: &Value) -> Vec<String> {
    rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter_map(|r| r["record"].as_str().map(str::to_string))
        .collect()
}

/// One query of the dashboard: where it is and its text as Grafana stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DashboardQuery {
    /// The panel's title, or `variable NAME` for a template variable's query.
    pub place: String,
    /// The expression, template variables unexpanded.
    pub expr: String,
}

/// The dashboard's panels, rows' nested panels included (rows themselves are not panels).
pub fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        if p["type"] != "row" {
            out.push(p);
        }
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// Every query the dashboard runs: each panel target's `expr` and each query variable's
/// query (`label_values(METRIC, LABEL)` becomes the PromQL `count by (LABEL) (METRIC)`, which
/// returns data exactly when Grafana would find values).
pub fn dashboard_queries(dashboard: &Value) -> Result<Vec<DashboardQuery>, String> {
    let mut out = Vec::new();
    for p in panels(dashboard) {
        let title = p["title"].as_str().unwrap_or("(untitled)");
        let targets = p["targets"].as_array().filter(|t| !t.is_empty());
        let targets = targets.ok_or_else(|| format!("panel {title}: no targets"))?;
        for t in targets {
            let expr = t["expr"].as_str().filter(|e| !e.trim().is_empty());
            let expr = expr.ok_or_else(|| format!("panel {title}: a target without expr"))?;
            out.push(DashboardQuery {
                place: title.to_string(),
                expr: expr.to_string(),
            });
        }
    }
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] != "query" {
            continue;
        }
        let name = v["name"].as_str().unwrap_or("");
        let query = v["query"]["query"].as_str().or(v["query"].as_str());
        let query = query.ok_or_else(|| format!("variable {name}: no query"))?;
        let expr = match label_values(query) {
            Some((metric, label)) => format!("count by ({label}) ({metric})"),
            None => query.to_string(),
        };
        out.push(DashboardQuery {
            place: format!("variable {name}"),
            expr,
        });
    }
    Ok(out)
}

/// `label_values(METRIC, LABEL)` as (METRIC, LABEL).
fn label_values(query: &str) -> Option<(&str, &str)> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let (metric, label) = inner.rsplit_once(',')?;
    Some((metric.trim(), label.trim()))
}

/// The values the dashboard's own variables take when "All" is selected (their `allValue`).
pub fn all_values(dashboard: &Value) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = v["name"].as_str().ok_or("a variable without a name")?;
        let all = v["allValue"].as_str();
        let all = all.ok_or_else(|| format!("variable {name}: no allValue"))?;
        out.insert(name.to_string(), all.to_string());
    }
    Ok(out)
}

/// Expands Grafana's template variables (`$name`, `${name}`, `${name:format}`) from `values`;
/// an unknown variable is an error (Grafana would send it to Prometheus as is).
pub fn expand(expr: &str, values: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in {expr}"))?;
            let name = braced[..end].split(':').next().unwrap_or("");
            (name, end + 2)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        let value = values
            .get(name)
            .ok_or_else(|| format!("unknown variable ${name} in {expr}"))?;
        out.push_str(value);
        rest = &after[len..];
    }
    out.push_str(rest);
    Ok(out)
}

/// One prometheus-adapter rule (`rules.custom[]` of the chart's values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterRule {
    /// The series the rule discovers: `seriesQuery`'s metric name.
    pub series: String,
    /// `seriesQuery` as written.
    pub series_query: String,
    /// `name.matches`, as written.
    pub matches: String,
    /// `name.as`: the metric name the custom metrics API serves.
    pub served_as: String,
    /// `metricsQuery`, a Go template (`<<.Series>>`, `<<.LabelMatchers>>`, `<<.GroupBy>>`).
    pub metrics_query: String,
    /// `resources.overrides`: label to resource.
    pub resources: BTreeMap<String, String>,
}

impl AdapterRule {
    /// The PromQL the adapter sends for `matchers` (e.g. `namespace="a",pod=~"b|c"`) grouped
    /// by `group_by`.
    pub fn render(&self, matchers: &str, group_by: &str) -> String {
        self.metrics_query
            .replace("<<.Series>>", &self.series)
            .replace("<<.LabelMatchers>>", matchers)
            .replace("<<.GroupBy>>", group_by)
    }
}

/// The custom rules of prometheus-adapter's chart values.
pub fn adapter_rules(values: &Value) -> Result<Vec<AdapterRule>, String> {
    let rules = values["rules"]["custom"].as_array();
    let rules = rules.ok_or("no rules.custom")?;
    rules
        .iter()
        .map(|r| {
            let field = |pointer: &str| {
                r.pointer(pointer)
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| format!("an adapter rule without {pointer}: {r}"))
            };
            let series_query = field("/seriesQuery")?;
            let series = series_query
                .split('{')
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            let resources = r["resources"]["overrides"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(label, v)| Some((label.clone(), v["resource"].as_str()?.into())))
                .collect();
            Ok(AdapterRule {
                series,
                series_query,
                matches: field("/name/matches")?,
                served_as: field("/name/as")?,
                metrics_query: field("/metricsQuery")?,
                resources,
            })
        })
        .collect()
}

/// An HPA's metric: its type (`Pods`, `Object`, `External`, `Resource`) and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HpaMetric {
    /// The HorizontalPodAutoscaler's name.
    pub hpa: String,
    /// `type`.
    pub kind: String,
    /// `<type>.metric.name`.
    pub name: String,
}

/// The metrics of every `autoscaling/v2` HorizontalPodAutoscaler among `docs`.
pub fn hpa_metrics(docs: &[Value]) -> Vec<HpaMetric> {
    docs.iter()
        .filter(|d| d["kind"] == "HorizontalPodAutoscaler" && d["apiVersion"] == "autoscaling/v2")
        .flat_map(|d| {
            let hpa = d["metadata"]["name"].as_str().unwrap_or("").to_string();
            d["spec"]["metrics"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |m| {
                    let kind = m["type"].as_str().unwrap_or("").to_string();
                    let key =
                        kind[..kind.len().min(1)].to_lowercase() + kind.get(1..).unwrap_or("");
                    HpaMetric {
                        hpa: hpa.clone(),
                        name: m[&key]["metric"]["name"].as_str().unwrap_or("").to_string(),
                        kind,
                    }
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn expands_plain_braced_and_formatted_variables_and_refuses_unknown_ones() {
        let v: BTreeMap<String, String> = [("__rate_interval", "4s"), ("provider", ".*")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into();
        assert_eq!(
            expand("rate(x{p=~\"$provider\"}[$__rate_interval])", &v).unwrap(),
            "rate(x{p=~\".*\"}[4s])"
        );
        assert_eq!(
            expand("x{p=~\"${provider:regex}\"}[${__rate_interval}]", &v).unwrap(),
            "x{p=~\".*\"}[4s]"
        );
        assert!(expand("rate(x[$__range])", &v)
            .unwrap_err()
            .contains("$__range"));
        assert!(expand("x{p=\"${provider\"}", &v).is_err());
    }

    #[test]
    fn collects_targets_of_rows_and_panels_and_variable_queries() {
        let d = json!({
            "panels": [
                {"type": "row", "title": "r", "panels": [
                    {"type": "timeseries", "title": "nested", "targets": [{"expr": "a"}]}]},
                {"type": "timeseries", "title": "top", "targets": [{"expr": "b"}, {"expr": "c"}]}],
            "templating": {"list": [
                {"name": "provider", "type": "query",
                 "query": {"query": "label_values(unbusy_in_flight, provider)"}},
                {"name": "ds", "type": "datasource"}]}
        });
        let q: Vec<_> = dashboard_queries(&d)
            .unwrap()
            .into_iter()
            .map(|q| (q.place, q.expr))
            .collect();
        assert_eq!(
            q,
            [
                ("nested", "a"),
                ("top", "b"),
                ("top", "c"),
                (
                    "variable provider",
                    "count by (provider) (unbusy_in_flight)"
                )
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        let empty = json!({"panels": [{"type": "stat", "title": "t", "targets": [{"expr": " "}]}]});
        assert!(dashboard_queries(&empty).is_err());
    }

    #[test]
    fn reads_adapter_rules_and_hpa_metrics_from_yaml() {
        let values = &yaml_documents(
            "rules:\n  custom:\n  - seriesQuery: 'a:b:c{pod!=\"\"}'\n    resources: {overrides: {pod: {resource: pod}}}\n    name: {matches: '^a:b:c$', as: m}\n    metricsQuery: 'sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)'\n",
        )
        .unwrap()[0];
        let r = &adapter_rules(values).unwrap()[0];
        assert_eq!((r.series.as_str(), r.served_as.as_str()), ("a:b:c", "m"));
        assert_eq!(r.resources["pod"], "pod");
        assert_eq!(
            r.render("pod=\"x\"", "pod"),
            "sum(a:b:c{pod=\"x\"}) by (pod)"
        );
        let docs = yaml_documents(
            "---\nkind: Service\n---\napiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata: {name: h}\nspec:\n  metrics:\n  - type: Pods\n    pods: {metric: {name: m}}\n  - type: External\n    external: {metric: {name: e}}\n",
        )
        .unwrap();
        assert_eq!(docs.len(), 2);
        let m = hpa_metrics(&docs);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].kind.as_str(), m[0].name.as_str()), ("Pods", "m"));
        assert_eq!((m[1].kind.as_str(), m[1].name.as_str()), ("External", "e"));
    }
}
