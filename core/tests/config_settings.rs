//! What a configuration's fields become: the settings each policy module is built from, and
//! which errors a configuration reports. (`config_docs.rs` checks the documented defaults;
//! this checks that values other than the defaults arrive where they are used, and the rules
//! that decide which validation errors are noise.)

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use unbusy_core::bucket::Rate;
use unbusy_core::config::{Config, ConfigError, Problem};
use unbusy_core::degrade::{LadderSettings, Thresholds};
use unbusy_core::throttle::ThrottleSettings;
use unbusy_core::time::SECOND;

const PROVIDER: &str = r#""providers":[{"name":"p","cluster":"p"}]"#;

fn config(rest: &str) -> Config {
    let sep = if rest.is_empty() { "" } else { "," };
    Config::from_json(format!("{{{PROVIDER}{sep}{rest}}}").as_bytes())
        .unwrap_or_else(|e| panic!("{rest}: {e}"))
}

fn errors(json: &str) -> Vec<ConfigError> {
    match Config::from_json(json.as_bytes()) {
        Ok(_) => Vec::new(),
        Err(e) => e.0,
    }
}

#[test]
fn a_configured_throttle_is_the_throttle_the_engine_gets() {
    let c = config(r#""throttle":{"k":1.25,"window_ms":7000,"max_reject":0.5}"#);
    assert_eq!(
        c.throttle.settings(),
        ThrottleSettings {
            window: 7 * SECOND,
            k: 1.25,
            max_reject: 0.5,
        }
    );
    assert_ne!(c.throttle.settings(), ThrottleSettings::default());
    assert_eq!(config("").throttle.settings(), ThrottleSettings::default());
}

#[test]
fn configured_degradation_thresholds_are_the_ladder_the_engine_gets() {
    let c =
        config(r#""degradation":{"enter":[0.2,0.5,0.8],"exit":[0.1,0.3,0.6],"min_dwell_ms":2500}"#);
    let t = |enter, exit| Thresholds { enter, exit };
    assert_eq!(
        c.degradation.settings(),
        LadderSettings {
            tiers: [t(0.2, 0.1), t(0.5, 0.3), t(0.8, 0.6)],
            min_dwell: 2500 * SECOND / 1000,
        }
    );
    assert_eq!(config("").degradation.settings(), LadderSettings::default());
}

#[test]
fn request_and_token_rates_come_with_their_bursts_or_the_rate_as_burst() {
    let c = config(
        r#""limits":{"global":{"requests_per_minute":60,"burst_requests":5,"tokens_per_minute":9000},
                    "per_tenant":{"tokens_per_minute":600,"burst_tokens":50}}"#,
    );
    assert_eq!(
        c.limits.global.request_rate(),
        Some(Rate::per_minute(60).with_burst(5))
    );
    assert_eq!(c.limits.global.token_rate(), Some(Rate::per_minute(9000)));
    assert_eq!(c.limits.per_tenant.request_rate(), None);
    assert_eq!(
        c.limits.per_tenant.token_rate(),
        Some(Rate::per_minute(600).with_burst(50))
    );
}

#[test]
fn a_zero_rate_or_burst_is_refused_naming_its_field() {
    for name in [
        "requests_per_minute",
        "tokens_per_minute",
        "burst_requests",
        "burst_tokens",
    ] {
        for scope in ["global", "per_tenant"] {
            let json = format!(r#"{{{PROVIDER},"limits":{{"{scope}":{{"{name}":0}}}}}}"#);
            assert_eq!(
                errors(&json),
                vec![ConfigError {
                    field: format!("limits.{scope}.{name}"),
                    problem: Problem::MustBePositive,
                }],
                "{json}"
            );
        }
    }
}

#[test]
fn only_http_urls_with_a_host_are_base_urls() {
    for good in [
        "https://api.deepseek.com",
        "http://127.0.0.1:8080/v1",
        "https://h?x=1",
        "http://h#f",
    ] {
        let json = format!(r#"{{"providers":[{{"name":"p","base_url":"{good}"}}]}}"#);
        assert!(errors(&json).is_empty(), "{good}: {:?}", errors(&json));
    }
    for bad in [
        "api.deepseek.com",
        "ftp://h",
        "https://",
        "http:///path",
        "https://:443",
        "http://a b",
        "https://?q",
    ] {
        let json = format!(r#"{{"providers":[{{"name":"p","base_url":"{bad}"}}]}}"#);
        assert_eq!(
            errors(&json),
            vec![ConfigError {
                field: "providers[0].base_url".into(),
                problem: Problem::NotAUrl,
            }],
            "{bad}"
        );
    }
}

/// A field of the wrong type holds its default while the rest is validated, so what
/// validation says about it (or a rule relating another field to it) is noise and left out;
/// what it says about other fields is not.
#[test]
fn a_wrongly_typed_field_hides_only_the_errors_it_causes() {
    // `cap_ms` below the (defaulted) `base_ms`: caused by the bad `base_ms`, hidden.
    let e = errors(&format!(
        r#"{{{PROVIDER},"retry":{{"base_ms":"soon","cap_ms":10}}}}"#
    ));
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].field, "retry.base_ms");
    assert!(matches!(e[0].problem, Problem::WrongType(_)), "{e:?}");
    // The same rule broken by good values next to an unrelated bad one: reported.
    let e = errors(&format!(
        r#"{{{PROVIDER},"retry":{{"base_ms":100,"cap_ms":10}},"budget":{{"ratio":"x"}}}}"#
    ));
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e.iter().any(|e| e.field == "retry.cap_ms"), "{e:?}");
    // A provider with neither `base_url` nor `cluster` because its `base_url` was unreadable:
    // hidden; because it has none at all, next to an unreadable `weight`: reported.
    let e = errors(r#"{"providers":[{"name":"p","base_url":5}]}"#);
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].field, "providers[0].base_url");
    let e = errors(r#"{"providers":[{"name":"p","weight":"x"}]}"#);
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(
        e.iter().any(|e| e.field == "providers[0]"
            && e.problem == Problem::AtLeastOneOf("base_url", "cluster")),
        "{e:?}"
    );
}

/// Every bound `validate` enforces, on both sides: the value at the bound is taken, the first
/// one past it refused, naming the field.
#[test]
fn validation_bounds_are_exact() {
    let ok = |rest: &str| errors(&format!("{{{PROVIDER},{rest}}}"));
    let refused = |rest: &str, field: &str| {
        let e = ok(rest);
        assert!(e.iter().any(|e| e.field == field), "{rest}: {e:?}");
    };
    // Providers: 64 at most.
    let providers = |n: usize| {
        let list: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"name":"p{i}","cluster":"c{i}"}}"#))
            .collect();
        errors(&format!(r#"{{"providers":[{}]}}"#, list.join(",")))
    };
    assert!(providers(63).is_empty());
    assert!(providers(64).is_empty());
    assert!(providers(65).iter().any(|e| e.field == "providers"));
    // A model mapping with either side empty.
    let models = |m: &str| {
        errors(&format!(
            r#"{{"providers":[{{"name":"p","cluster":"p","models":{m}}}]}}"#
        ))
    };
    assert!(models(r#"{"a":"b"}"#).is_empty());
    assert_eq!(models(r#"{"":"b"}"#).len(), 1);
    assert_eq!(models(r#"{"a":""}"#).len(), 1);
    // Concurrency: max may equal min; the backoff ratio lies strictly inside (0, 1).
    assert!(ok(r#""concurrency":{"min":3,"max":3}"#).is_empty());
    refused(r#""concurrency":{"min":3,"max":2}"#, "concurrency.max");
    for good in ["0.001", "0.5", "0.999"] {
        assert!(ok(&format!(r#""concurrency":{{"backoff_ratio":{good}}}"#)).is_empty());
    }
    for bad in ["0", "1", "-0.5", "1.5"] {
        refused(
            &format!(r#""concurrency":{{"backoff_ratio":{bad}}}"#),
            "concurrency.backoff_ratio",
        );
    }
    // The cache may be exactly one entry big.
    assert!(ok(r#""cache":{"max_bytes":1000,"max_entry_bytes":1000}"#).is_empty());
    refused(
        r#""cache":{"max_bytes":999,"max_entry_bytes":1000}"#,
        "cache.max_bytes",
    );
    // Degradation: enter in (0, 1], exit in [0, enter).
    assert!(ok(r#""degradation":{"enter":[0.3,0.6,1.0],"exit":[0.0,0.4,0.7]}"#).is_empty());
    refused(
        r#""degradation":{"enter":[0.0,0.6,0.9],"exit":[0.0,0.4,0.7]}"#,
        "degradation.enter[0]",
    );
    refused(
        r#""degradation":{"enter":[0.3,0.6,1.01],"exit":[0.15,0.4,0.7]}"#,
        "degradation.enter[2]",
    );
    refused(
        r#""degradation":{"enter":[0.3,0.6,0.9],"exit":[0.3,0.4,0.7]}"#,
        "degradation.exit[0]",
    );
    refused(
        r#""degradation":{"enter":[0.3,0.6,0.9],"exit":[-0.1,0.4,0.7]}"#,
        "degradation.exit[0]",
    );
}

#[test]
fn every_jitter_is_read_by_its_name() {
    use unbusy_core::backoff::Jitter;
    for (name, jitter) in [
        ("full", Jitter::Full),
        ("equal", Jitter::Equal),
        ("decorrelated", Jitter::Decorrelated),
        ("none", Jitter::None),
    ] {
        assert_eq!(
            config(&format!(r#""retry":{{"jitter":"{name}"}}"#))
                .retry
                .jitter,
            jitter
        );
    }
    assert_eq!(
        errors(&format!(r#"{{{PROVIDER},"retry":{{"jitter":"random"}}}}"#)).len(),
        1
    );
}
