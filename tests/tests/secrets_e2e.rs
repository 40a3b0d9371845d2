//! Where provider keys go, end to end on real Envoy with the filter built by `make filter`, in
//! front of busy-provider emulators on loopback:
//! - a key variable that is missing or empty refuses the configuration (a key given as a
//!   variable that reaches the provider and no file: `cli/tests/up_e2e.rs`, through `unbusy up`);
//! - only endpoints unbusy knows get a provider's key: anything else is refused, or carries the
//!   caller's own key.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use serde_json::{json, Value};
use std::time::Duration;
use unbusy_tests::emulator::Behaviour;
use unbusy_tests::envoy::{filter_config, filter_wasm, render, Render, Upstream};
use unbusy_tests::harness::{chat, chat_body, request, Envoy};
use unbusy_tests::world::{self, World};

fn healthy(name: &str) -> Behaviour {
    world::healthy(name, [20.0, 40.0], [60.0, 100.0])
}

// ---- 11: keys from the environment ----

/// Starts Envoy with provider `primary` whose key is the variable `variable`, with `env` in
/// Envoy's environment: the log of a refused configuration (panics if Envoy accepted it).
fn refused_log(variable: &str, env: &[(&str, &str)]) -> String {
    let upstreams = [Upstream::parse("primary=http://127.0.0.1:9").unwrap()];
    let config = json!({"providers": [{"name": "primary", "api_key_env": variable}]});
    let filter = filter_config(&config, &upstreams, &|_| false).unwrap();
    let yaml = render(&Render {
        listen: ("127.0.0.1", 0),
        admin: ("127.0.0.1", 0),
        upstreams: &upstreams,
        filter: Some(&filter),
        wasm: &filter_wasm(),
        native: None,
        store: None,
    });
    assert!(
        yaml.contains(&format!("host_env_keys: [\"{variable}\"]")),
        "{yaml}"
    );
    match Envoy::start_yaml_env(&yaml, 1, env) {
        Ok(mut envoy) => {
            // Envoy may come up before refusing the filter: it must still refuse it.
            let exited = envoy.wait_exit(Duration::from_secs(10));
            assert!(exited.is_some(), "Envoy accepted the configuration");
            envoy.log_text()
        }
        Err(e) => e,
    }
}

#[test]
fn a_missing_or_empty_key_variable_makes_envoy_refuse_the_configuration() {
    let variable = format!("UNBUSY_TEST_NO_SUCH_KEY_{}", std::process::id());
    assert!(std::env::var_os(&variable).is_none());
    for (env, what) in [
        (vec![], "missing"),
        (vec![(variable.as_str(), " ")], "empty"),
    ] {
        let log = refused_log(&variable, &env);
        let line = log
            .lines()
            .find(|l| l.contains("unbusy: invalid plugin configuration"))
            .unwrap_or_else(|| panic!("{what}: no refusal in the log:\n{log}"));
        assert!(
            line.contains(&format!(
                "providers[0] (\"primary\"): api_key_env names \"{variable}\""
            )),
            "{what}: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_the_vms_environment_reaches_the_provider() {
    // The variable given to the VM as a literal (Envoy's `key_values` instead of the rendered
    // `host_env_keys`), among others: the filter reads it through WASI's `environ_get`.
    let config = json!({"providers": [{"name": "primary", "api_key_env": "UNBUSY_TEST_KEY"}]});
    let w = World::start_edited(
        vec![healthy("primary")],
        &config,
        1,
        |_| {},
        |yaml| {
            let keys = "host_env_keys: [\"UNBUSY_TEST_KEY\"]";
            assert!(yaml.contains(keys), "{yaml}");
            yaml.replace(
                keys,
                "key_values: {\"UNBUSY_TEST_KEY_2\": \"no\", \"UNBUSY_TEST_KEY\": \"sk-vm=1\", \"A\": \"b\"}",
            )
        },
    )
    .await
    .unwrap();
    let r = chat(
        w.envoy.listen,
        &chat_body("key please", false, false),
        &[CALLER],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = w.providers[0].stats().seen;
    let auth: Vec<_> = seen.iter().map(|s| s.authorization.as_deref()).collect();
    assert_eq!(auth, [Some("Bearer sk-vm=1")], "{seen:?}");
    let log = w.envoy.log_text();
    assert!(!log.contains("sk-vm"), "{log}");
}

// ---- 13: which endpoints carry which key ----

/// One healthy provider `primary` with the key `provider-key`, and `extra` in the filter's
/// configuration.
async fn world(extra: Value) -> World {
    let config = world::merged(
        json!({"providers": [{"name": "primary", "api_key": "provider-key"}]}),
        &extra,
    );
    World::start(vec![healthy("primary")], &config, 1)
        .await
        .unwrap()
}

const CALLER: (&str, &str) = ("authorization", "Bearer caller-key");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_endpoint_is_refused_and_the_provider_sees_nothing() {
    let w = world(json!({})).await;
    for (method, path, body) in [
        ("DELETE", "/v1/files/x", ""),
        ("POST", "/v1/files", "{\"purpose\":\"batch\"}"),
        ("GET", "/v1/files?limit=1", ""),
        ("GET", "/v1/chat/completions", ""),
        ("DELETE", "/v1/models/ft-x", ""),
        ("POST", "/v1/fine_tuning/jobs", "{\"model\":\"m\"}"),
    ] {
        let r = request(w.envoy.listen, method, path, &[CALLER], body.to_string())
            .await
            .unwrap();
        assert_eq!(r.status, 403, "{method} {path}: {}", r.text());
        let error = &r.json()["error"];
        assert_eq!(error["type"], "endpoint_not_allowed", "{}", r.text());
        let message = error["message"].as_str().unwrap_or("");
        assert!(
            message.contains(method) && message.contains("refuse"),
            "{message}"
        );
        assert_eq!(r.header("x-should-retry"), Some("false"));
        assert_eq!(r.header("x-unbusy"), Some("refused=endpoint_not_allowed"));
    }
    assert_eq!(
        w.providers[0].stats().seen,
        vec![],
        "something reached the provider"
    );
    let stats = w
        .envoy
        .admin_text("/stats?filter=unbusy_rejections")
        .await
        .unwrap();
    assert!(stats.contains("reason.endpoint_not_allowed: 6"), "{stats}");

    // The endpoints unbusy knows still get the provider's key.
    let models = request(w.envoy.listen, "GET", "/v1/models", &[CALLER], "")
        .await
        .unwrap();
    assert_eq!(models.status, 200, "{}", models.text());
    let managed = chat(w.envoy.listen, &chat_body("managed", false, false), &[])
        .await
        .unwrap();
    assert_eq!(managed.status, 200, "{}", managed.text());
    let seen = w.providers[0].stats().seen;
    let auth: Vec<_> = seen.iter().map(|s| s.authorization.as_deref()).collect();
    assert_eq!(auth, [Some("Bearer provider-key"); 2], "{seen:?}");
    let log = w.envoy.log_text();
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_caller_key_an_unknown_endpoint_carries_the_callers_key_never_the_providers() {
    let w = world(json!({"endpoints": {"passthrough": "caller_key"}})).await;
    let r = request(w.envoy.listen, "DELETE", "/v1/files/x", &[CALLER], "")
        .await
        .unwrap();
    // The emulator has no files endpoint: its own 404 came back.
    assert_eq!(r.status, 404, "{}", r.text());
    let anonymous = request(w.envoy.listen, "DELETE", "/v1/files/y", &[], "")
        .await
        .unwrap();
    assert_eq!(anonymous.status, 404, "{}", anonymous.text());
    let models = request(w.envoy.listen, "GET", "/v1/models", &[CALLER], "")
        .await
        .unwrap();
    assert_eq!(models.status, 200);
    let seen = w.providers[0].stats().seen;
    let got: Vec<_> = seen
        .iter()
        .map(|s| {
            (
                s.method.as_str(),
                s.path.as_str(),
                s.authorization.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("DELETE", "/files/x", Some("Bearer caller-key")),
            ("DELETE", "/files/y", None),
            ("GET", "/models", Some("Bearer provider-key")),
        ]
    );
}
