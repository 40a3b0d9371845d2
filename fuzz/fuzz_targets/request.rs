//! Request bytes as the filter and the npm package read them: the body's JSON (cache key,
//! canonical form), the plugin configuration, a tenant identity. Nothing may panic, and the
//! cache key must be deterministic and tenant-scoped.
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
    let _ = serde_json::from_slice::<serde_json::Value>(body);
});
