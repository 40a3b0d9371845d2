//! The operations examples hold together without a cluster: the Grafana dashboard is a Grafana
//! model on a `${DS_PROMETHEUS}` input that shows every recorded series, and the HPA in
//! `examples/istio` scales on the metric prometheus-adapter serves from a series
//! `examples/prometheus` records, with the labels the adapter maps to pods. (That the
//! dashboard's queries and the adapter's query return data from a live Prometheus is
//! `prometheus_e2e`'s part.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use unbusy_tests::ops::{
    adapter_rules, all_values, dashboard_queries, examples, expand, hpa_metrics, panels, read_yaml,
    recorded_series,
};

fn dashboard() -> Value {
    let path = examples().join("grafana/unbusy.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn rules() -> Value {
    read_yaml("prometheus/rules/unbusy.rules.yml")
        .unwrap()
        .remove(0)
}

/// Whether `expr` names the series `name` (not merely a longer name that starts with it).
fn names(expr: &str, name: &str) -> bool {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    expr.match_indices(name)
        .any(|(i, _)| !expr[..i].ends_with(is_name) && !expr[i + name.len()..].starts_with(is_name))
}

#[test]
fn the_dashboard_is_a_grafana_model_on_a_prometheus_input() {
    let d = dashboard();
    assert_eq!(d["schemaVersion"], 39);
    assert!(d["id"].is_null(), "an exported dashboard has no id");
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty()));
    let inputs = d["__inputs"].as_array().unwrap();
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "{inputs:?}"
    );
    let required: BTreeSet<&str> = d["__requires"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["type"] == "panel")
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    let ds = |v: &Value| v["type"] == "prometheus" && v["uid"] == "${DS_PROMETHEUS}";
    let mut ids = BTreeSet::new();
    let mut cells: BTreeMap<(u64, u64), String> = BTreeMap::new();
    for p in d["panels"].as_array().unwrap() {
        let title = p["title"].as_str().unwrap().to_string();
        assert!(ids.insert(p["id"].as_u64().unwrap()), "id of {title} again");
        let g = &p["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| g[k].as_u64().unwrap());
        assert!(x + w <= 24 && w > 0 && h > 0, "{title}: {g}");
        for cx in x..x + w {
            for cy in y..y + h {
                let other = cells.insert((cx, cy), title.clone());
                assert!(other.is_none(), "{title} overlaps {other:?}");
            }
        }
    }
    for p in panels(&d) {
        let title = &p["title"];
        assert!(ds(&p["datasource"]), "{title}: {}", p["datasource"]);
        let kind = p["type"].as_str().unwrap();
        assert!(required.contains(kind), "{title}: {kind} not in __requires");
        let mut refs = BTreeSet::new();
        for t in p["targets"].as_array().unwrap() {
            assert!(ds(&t["datasource"]), "{title}: {t}");
            assert!(refs.insert(t["refId"].as_str().unwrap()), "{title}: {t}");
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        assert!(ds(&v["datasource"]), "{v}");
    }

    // Every query expands with Grafana's own variables and the dashboard's.
    let mut values = all_values(&d).unwrap();
    for builtin in ["__rate_interval", "__interval", "__range"] {
        values.insert(builtin.into(), "1m".into());
    }
    let queries = dashboard_queries(&d).unwrap();
    assert!(queries.len() >= 15, "{queries:?}");
    for q in &queries {
        expand(&q.expr, &values).unwrap_or_else(|e| panic!("{}: {e}", q.place));
    }
}

#[test]
fn the_dashboard_shows_every_recorded_series_and_the_raw_states() {
    let d = dashboard();
    let queries = dashboard_queries(&d).unwrap();
    let recorded = recorded_series(&rules());
    assert_eq!(recorded.len(), 13, "{recorded:?}");
    for name in &recorded {
        assert!(
            queries.iter().any(|q| names(&q.expr, name)),
            "no panel shows {name}"
        );
    }
    // The key metrics' panels (titled 1. to 5.) query recorded series only (the rules are
    // the definition; the dashboard does not recompute them differently).
    let key: Vec<_> = queries
        .iter()
        .filter(|q| q.place.starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    assert_eq!(
        key.iter().map(|q| &q.place[..1]).collect::<BTreeSet<_>>(),
        ["1", "2", "3", "4", "5"].into()
    );
    for q in key {
        assert!(
            recorded.iter().any(|r| names(&q.expr, r)) && !q.expr.contains("unbusy_"),
            "{}: {} is not a recorded series",
            q.place,
            q.expr
        );
    }
    // What has no recording rule comes from the filter's metrics directly.
    for metric in [
        "unbusy_breaker_state",
        "unbusy_degradation_tier",
        "unbusy_attempts_total",
        "unbusy_cache_total",
        "unbusy_cache_bytes",
    ] {
        assert!(
            queries.iter().any(|q| names(&q.expr, metric)),
            "no panel shows {metric}"
        );
    }
    assert!(names("sum(a:b) / c", "a:b") && !names("a:bc", "a:b") && !names("xa:b", "a:b"));
}

#[test]
fn the_hpa_scales_on_what_the_adapter_serves_from_a_recorded_series() {
    let docs = read_yaml("istio/unbusy.yaml").unwrap();
    let metrics = hpa_metrics(&docs);
    assert_eq!(metrics.len(), 1, "{metrics:?}");
    let adapter = read_yaml("istio/prometheus-adapter.yaml")
        .unwrap()
        .remove(0);
    let rules = adapter_rules(&adapter).unwrap();
    let recording = rules_by_name();
    for m in &metrics {
        assert_eq!(m.kind, "Pods", "{m:?}");
        let r = rules.iter().find(|r| r.served_as == m.name);
        let r = r.unwrap_or_else(|| panic!("no adapter rule serves {} ({rules:?})", m.name));
        let expr = recording
            .get(&r.series)
            .unwrap_or_else(|| panic!("the adapter reads {}: no such recording rule", r.series));
        assert_eq!(
            r.matches.trim_start_matches('^').trim_end_matches('$'),
            r.series
        );
        assert!(
            r.metrics_query.contains("<<.Series>>")
                && r.metrics_query.contains("<<.LabelMatchers>>")
        );
        // A pods metric needs each series tied to a pod and its namespace, and the recorded
        // series must keep the labels the adapter maps.
        assert_eq!(r.resources.get("pod").map(String::as_str), Some("pod"));
        assert_eq!(
            r.resources.get("namespace").map(String::as_str),
            Some("namespace")
        );
        let by = expr
            .split("by (")
            .nth(1)
            .and_then(|s| s.split(')').next())
            .unwrap_or("");
        for label in r.resources.keys() {
            assert!(
                by.split(',').any(|l| l.trim() == label),
                "{} is summed without {label}: {expr}",
                r.series
            );
        }
    }
}

/// Recording rules by name: their expressions.
fn rules_by_name() -> BTreeMap<String, String> {
    rules()["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter_map(|r| Some((r["record"].as_str()?.into(), r["expr"].as_str()?.into())))
        .collect()
}
