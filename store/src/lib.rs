//! `unbusy-store`: the fleet's shared state behind a small HTTP/1.1 API, so that proxy-wasm
//! filters (`dispatch_http_call`) and the npm package's Node host (`fetch`) can reach Redis.
//! It holds no state of its own: Redis holds it all. The API, the key layout and the leases'
//! accuracy are documented in `docs/store.md`.

pub mod api;
pub mod backend;
pub mod config;
pub mod scripts;
pub mod server;
