//! `docs/config.md` against the code: every default the page documents is the default
//! `Config::default()` has, and every field the parser accepts is on the page.
//!
//! The page is read as it is written for people: a `## `section`` heading per part of the
//! schema (`providers[]` for a provider's fields), then tables whose header row names a `field`
//! and a `default` column (in any order, among other columns). A table after a line such as
//! "`global` and `per_tenant` are each a rate:" documents the fields of each of those objects.
//! A default cell is read as:
//! - `required`: the field has no default (the parser refuses a configuration without it);
//! - JSON in backticks (`` `"full"` ``, `` `[0.3, 0.6, 0.9]` ``, `` `{}` ``) or a bare JSON
//!   number or boolean: that value;
//! - another field of the same table in backticks (`` `requests_per_minute` ``): unset, and it
//!   then behaves as if it were set to that field's value;
//! - `none`, `unlimited` or `—` (with or without an explanation after it): unset (`null`).
//!
//! Each documented default is checked by parsing a configuration that sets the field to it:
//! the parser must accept it and produce exactly `Config::default()` for that part. The fields
//! the parser accepts are read from `Config::default()`'s `Debug` form (every member of every
//! `...Config` struct), so a new field that is not documented fails here.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use serde_json::{json, Value};
use std::collections::BTreeSet;
use unbusy_core::config::{Config, ProviderConfig};

/// How the page says a field defaults.
#[derive(Debug, Clone, PartialEq)]
enum Default {
    /// No default: the field must be given.
    Required,
    /// This JSON value (`null`: unset).
    Value(Value),
    /// Unset, and then as if set to this other field of the same object.
    SameAs(String),
}

/// One documented field: its path in the configuration (`retry.base_ms`,
/// `providers[].weight`, `limits.global.burst_requests`), its default cell and how it reads.
#[derive(Debug, Clone)]
struct Documented {
    path: String,
    cell: String,
    default: Default,
}

fn docs() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/config.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The text inside the first pair of backticks in `s`, if `s` starts with one.
fn backticked(s: &str) -> Option<&str> {
    let rest = s.strip_prefix('`')?;
    rest.split_once('`').map(|(inside, _)| inside)
}

fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(|c| c.trim().to_string()).collect()
}

fn is_rule(line: &str) -> bool {
    let t = line.trim();
    t.starts_with('|') && t.chars().all(|c| matches!(c, '|' | '-' | ':' | ' '))
}

fn read_default(cell: &str, siblings: &BTreeSet<String>) -> Default {
    let cell = cell.trim();
    if cell == "required" {
        return Default::Required;
    }
    if let Some(inside) = backticked(cell) {
        if siblings.contains(inside) {
            return Default::SameAs(inside.to_string());
        }
        if let Ok(v) = serde_json::from_str::<Value>(inside) {
            return Default::Value(v);
        }
        panic!("docs/config.md: cannot read the default {cell:?} (not JSON, not a field)");
    }
    let first = cell
        .split(|c: char| c.is_whitespace() || c == ':' || c == '(' || c == ',' || c == ';')
        .next()
        .unwrap_or("");
    if matches!(first, "none" | "unlimited" | "—" | "-" | "") {
        return Default::Value(Value::Null);
    }
    match serde_json::from_str::<Value>(first) {
        Ok(v @ (Value::Number(_) | Value::Bool(_))) => Default::Value(v),
        _ => panic!("docs/config.md: cannot read the default {cell:?}"),
    }
}

/// Every field the page documents, in the order it documents them.
fn documented() -> Vec<Documented> {
    let text = docs();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut section: Option<String> = None;
    // The objects the next table documents, relative to the section (`global`, `per_tenant`).
    let mut each: Vec<String> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if let Some(h) = line.strip_prefix("## ") {
            section = backticked(h.trim()).map(str::to_string);
            each.clear();
            i += 1;
            continue;
        }
        let is_header = line.trim().starts_with('|')
            && lines.get(i + 1).is_some_and(|l| is_rule(l))
            && !is_rule(line);
        if !is_header {
            if let Some(rest) = line.trim().strip_suffix(':') {
                // "`a` and `b` are each a rate:" documents the next table under a and b.
                if rest.contains(" are each ") {
                    each = rest
                        .split('`')
                        .skip(1)
                        .step_by(2)
                        .map(str::to_string)
                        .collect();
                }
            }
            i += 1;
            continue;
        }
        let header = cells(line);
        let col = |name: &str| header.iter().position(|h| h.eq_ignore_ascii_case(name));
        let (Some(field_col), Some(default_col)) = (col("field"), col("default")) else {
            i += 1;
            continue;
        };
        let section_name = section.clone().unwrap_or_else(|| {
            panic!(
                "docs/config.md line {}: a table outside a `## ` section",
                i + 1
            )
        });
        let mut rows = Vec::new();
        i += 2;
        while i < lines.len() && lines[i].trim().starts_with('|') {
            let row = cells(lines[i]);
            let field = row.get(field_col).map(String::as_str).unwrap_or("");
            let field = backticked(field)
                .unwrap_or_else(|| {
                    panic!(
                        "docs/config.md line {}: field {field:?} not in backticks",
                        i + 1
                    )
                })
                .to_string();
            let cell = row.get(default_col).cloned().unwrap_or_default();
            rows.push((field, cell));
            i += 1;
        }
        let siblings: BTreeSet<String> = rows.iter().map(|(f, _)| f.clone()).collect();
        let prefixes: Vec<String> = if each.is_empty() {
            vec![section_name.clone()]
        } else {
            each.iter().map(|o| format!("{section_name}.{o}")).collect()
        };
        for prefix in &prefixes {
            for (field, cell) in &rows {
                out.push(Documented {
                    path: format!("{prefix}.{field}"),
                    cell: cell.clone(),
                    default: read_default(cell, &siblings),
                });
            }
        }
        each.clear();
    }
    out
}

/// The members of every `...Config` struct in `debug` (`{:#?}` output), as paths; `prefix`
/// is prepended to each. Members whose value is a `...Config` struct are walked into, any
/// other value (numbers, `None`, `Some(..)`, arrays, maps) is a leaf.
fn debug_fields(debug: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut path: Vec<String> = Vec::new();
    // The indentation of the member lines of the struct at each level of `path`.
    let mut depth_of_members: Vec<usize> = vec![4];
    // While skipping a leaf's multi-line value: the indentation of its closing line.
    let mut skip_until: Option<usize> = None;
    for line in debug.lines().skip(1) {
        let indent = line.len() - line.trim_start().len();
        let t = line.trim();
        if let Some(close) = skip_until {
            if indent == close && (t.starts_with(']') || t.starts_with('}') || t.starts_with(')')) {
                skip_until = None;
            }
            continue;
        }
        if t.starts_with('}') {
            // The end of a struct: back up a level.
            if path.pop().is_some() {
                depth_of_members.pop();
            }
            continue;
        }
        let Some((name, value)) = t.split_once(": ") else {
            continue;
        };
        if indent != *depth_of_members.last().unwrap() {
            continue;
        }
        let full = if path.is_empty() {
            format!("{prefix}{name}")
        } else {
            format!("{prefix}{}.{name}", path.join("."))
        };
        let type_name = value.trim_end_matches('{').trim();
        if value.ends_with('{') && type_name.ends_with("Config") {
            path.push(name.to_string());
            depth_of_members.push(indent + 4);
            continue;
        }
        out.insert(full);
        if value.ends_with('{') || value.ends_with('[') || value.ends_with('(') {
            skip_until = Some(indent);
        }
    }
    out
}

/// The configuration every check starts from: one provider, nothing else.
fn base() -> Value {
    json!({"providers": [{"name": "p", "base_url": "http://p.example"}]})
}

/// `base()` with the field at `path` set to `value` (`providers[].x` sets it on the provider,
/// which then reaches its provider by `cluster` when the field is `base_url`).
fn with(path: &str, value: Value) -> Value {
    let mut c = base();
    if let Some(field) = path.strip_prefix("providers[].") {
        let p = &mut c["providers"][0];
        if field == "base_url" {
            p.as_object_mut().unwrap().remove("base_url");
            p["cluster"] = json!("c");
        }
        if field == "name" {
            return c;
        }
        p[field] = value;
        return c;
    }
    let mut at = &mut c;
    let parts: Vec<&str> = path.split('.').collect();
    for part in &parts[..parts.len() - 1] {
        if at.get(*part).is_none() {
            at[*part] = json!({});
        }
        at = &mut at[*part];
    }
    at[*parts.last().unwrap()] = value;
    c
}

fn parse(v: &Value) -> Result<Config, String> {
    Config::from_json(v.to_string().as_bytes()).map_err(|e| e.to_string())
}

/// What `Config::default()` (with `base()`'s provider) holds, for comparison.
fn expected(path: &str) -> Config {
    let mut c = Config::default();
    let mut p = ProviderConfig {
        name: "p".into(),
        base_url: Some("http://p.example".into()),
        ..ProviderConfig::default()
    };
    if path == "providers[].base_url" {
        p.base_url = None;
        p.cluster = Some("c".into());
    }
    c.providers = vec![p];
    c
}

#[test]
fn the_page_documents_fields() {
    // The reader must find the page's tables, or every check below would pass vacuously.
    let docs = documented();
    assert!(
        docs.len() > 40,
        "only {} fields read from docs/config.md",
        docs.len()
    );
    for path in [
        "providers[].weight",
        "retry.max_attempts",
        "limits.per_tenant.burst_tokens",
        "tenancy.default_tenant",
    ] {
        assert!(
            docs.iter().any(|d| d.path == path),
            "{path} not read from docs/config.md"
        );
    }
}

#[test]
fn every_documented_default_is_the_default() {
    let mut wrong = Vec::new();
    for d in documented() {
        match &d.default {
            Default::Required => {
                // Only a provider's name is required; without it the parser refuses.
                assert_eq!(
                    d.path, "providers[].name",
                    "{d:?}: only providers[].name is required"
                );
                let c = json!({"providers": [{"base_url": "http://p.example"}]});
                let err = parse(&c).expect_err("a provider without a name was accepted");
                assert!(err.contains("providers[0].name"), "{err}");
            }
            Default::Value(v) => match parse(&with(&d.path, v.clone())) {
                Ok(c) if c == expected(&d.path) => {}
                Ok(c) => wrong.push(format!(
                    "{}: documented {:?}, but Config::default() differs: {:?}",
                    d.path,
                    d.cell,
                    differing(&c, &expected(&d.path)),
                )),
                Err(e) => wrong.push(format!("{}: documented {:?}, refused: {e}", d.path, d.cell)),
            },
            Default::SameAs(other) => {
                // Unset by default, and unset behaves as the other field's value.
                let other_path = format!("{}.{other}", d.path.rsplit_once('.').unwrap().0);
                match parse(&with(&d.path, Value::Null)) {
                    Ok(c) if c == expected(&d.path) => {}
                    Ok(_) => wrong.push(format!(
                        "{}: documented {:?}, but it is set by default",
                        d.path, d.cell
                    )),
                    Err(e) => wrong.push(format!("{}: refused null: {e}", d.path)),
                }
                let unset = with(&other_path, json!(60));
                let mut set = unset.clone();
                merge(&mut set, &with(&d.path, json!(60)));
                let (unset, set) = (parse(&unset).unwrap(), parse(&set).unwrap());
                assert!(
                    d.path.starts_with("limits."),
                    "{}: a default naming another field is only understood for limits",
                    d.path
                );
                let rates = |c: &Config| {
                    let l = &c.limits;
                    (
                        l.global.request_rate(),
                        l.global.token_rate(),
                        l.per_tenant.request_rate(),
                        l.per_tenant.token_rate(),
                    )
                };
                if rates(&unset) != rates(&set) {
                    wrong.push(format!(
                        "{}: documented as {other_path} when unset, but it behaves differently",
                        d.path
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "docs/config.md disagrees with the code:\n{}",
        wrong.join("\n")
    );
}

/// Adds `extra`'s members to `into`, recursively.
fn merge(into: &mut Value, extra: &Value) {
    match (into, extra) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(k) {
                    Some(existing) if existing.is_object() => merge(existing, v),
                    _ => {
                        a.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (x, y) in a.iter_mut().zip(b) {
                merge(x, y);
            }
        }
        (a, b) => *a = b.clone(),
    }
}

/// The `Debug` lines where two configurations differ, to say what the default really is.
fn differing(parsed: &Config, default: &Config) -> String {
    let lines = |c: &Config| -> Vec<String> {
        format!("{c:#?}")
            .lines()
            .map(|l| l.trim().to_string())
            .collect()
    };
    let (a, b) = (lines(parsed), lines(default));
    let only = |x: &[String], y: &[String]| -> Vec<String> {
        let mut rest = y.to_vec();
        x.iter()
            .filter(|l| match rest.iter().position(|r| r == *l) {
                Some(i) => {
                    rest.remove(i);
                    false
                }
                None => true,
            })
            .cloned()
            .collect()
    };
    format!(
        "parsed {:?}, default {:?}",
        only(&a, &b).join(" "),
        only(&b, &a).join(" ")
    )
}

#[test]
fn every_field_the_parser_accepts_is_documented() {
    let mut fields = debug_fields(&format!("{:#?}", Config::default()), "");
    assert!(fields.remove("providers"), "Config has no providers field?");
    fields.extend(debug_fields(
        &format!("{:#?}", ProviderConfig::default()),
        "providers[].",
    ));
    assert!(
        fields.len() > 40,
        "only {} fields read from Config's Debug form",
        fields.len()
    );
    let documented: BTreeSet<String> = documented().into_iter().map(|d| d.path).collect();
    let undocumented: Vec<&String> = fields.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "not in docs/config.md: {undocumented:?}"
    );
    // And the page documents nothing else (a field it names must exist; the defaults test
    // also has the parser accept each one).
    let unknown: Vec<&String> = documented.difference(&fields).collect();
    assert!(
        unknown.is_empty(),
        "in docs/config.md but not in Config: {unknown:?}"
    );
    // Each is accepted by the parser: a value of the wrong type is refused by name, which
    // only happens for a field it reads.
    for f in &fields {
        if f == "providers[].name" {
            continue;
        }
        let err =
            parse(&with(f, json!([[]]))).expect_err(&format!("{f}: a nested array was accepted"));
        let shown = f.replace("providers[].", "providers[0].");
        assert!(
            err.contains(&shown) && !err.contains("unknown field"),
            "{f}: the parser does not read it: {err}"
        );
    }
}
