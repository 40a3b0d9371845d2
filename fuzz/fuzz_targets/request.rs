//! Request bytes as the filter and the npm package read them: the body's JSON (cache key,
//! canonical form, the engine's JSON reader), the plugin configuration, a tenant identity.
//! Nothing may panic, the cache key must be deterministic and tenant-scoped, and the JSON
//! reader must agree with serde_json.
#![no_main]

use libfuzzer_sys::fuzz_target;
use unbusy_core::cache_key::{cache_key, tenant_id, Canonicalizer, KeyRequest, OptIn};
use unbusy_core::config::Config;

fuzz_target!(|data: &[u8]| {
    let (tenant, body) = data.split_at(data.len().min(4));
    for opt_in in [OptIn::Default, OptIn::Always] {
        let req = KeyRequest {
            tenant,
            endpoint: "/v1/chat/completions",
            body,
            opt_in,
        };
        let a = cache_key(&req);
        let mut c = Canonicalizer::new();
        assert_eq!(a, c.key(&req), "same bytes, same key");
        if let Ok(k) = a {
            let other = KeyRequest {
                tenant: b"another tenant",
                ..req
            };
            assert_ne!(Ok(k), cache_key(&other), "keys are tenant-scoped");
            // The canonical form is itself canonical.
            if let Ok(canon) = c.canonical_json(body) {
                assert_eq!(c.canonical_json(canon.as_bytes()).ok(), Some(canon));
            }
        }
    }
    let _ = Config::from_json(data);
    let _ = tenant_id(data);
    // The engine's own JSON reader (configuration, request rewrites) against serde_json: what
    // it accepts is JSON (serde_json agrees, bar numbers past f64's range) and writes back to
    // the same tree; what it refuses that serde_json takes is only a duplicate key or nesting
    // past its limit.
    let ours = unbusy_core::json::parse(body);
    let theirs = serde_json::from_slice::<serde_json::Value>(body);
    match (&ours, &theirs) {
        (Ok(v), _) => {
            // (serde_json refuses numbers beyond f64's range, which JSON allows; they are kept
            // as written here, and the configuration refuses them as non-finite.)
            if let Err(e) = &theirs {
                assert!(
                    e.to_string().contains("number out of range"),
                    "accepted what serde_json refuses ({e}): {body:?}"
                );
            }
            assert_eq!(
                unbusy_core::json::parse(v.to_text().as_bytes()).as_ref(),
                Ok(v)
            );
        }
        (Err(e), Ok(_)) => assert!(
            e.what == "duplicate key" || e.what == "nested too deeply",
            "refused valid JSON ({e}): {body:?}"
        ),
        (Err(_), Err(_)) => {}
    }
});
