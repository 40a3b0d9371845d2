//! The connection to Redis: one server through redis-rs's `ConnectionManager` (reconnects by
//! itself), or a Redis Cluster through its cluster connection (follows the slot map and
//! reconnects by itself). Both are created lazily, so the store starts and answers 503 while
//! Redis is still down, and recovers without a restart.

use crate::config::{RedisTarget, Settings};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A connection to Redis, cheap to clone (clones share the underlying connections).
#[derive(Clone)]
pub enum Backend {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Backend {
    /// The connection for these settings. Nothing is dialled yet.
    pub fn new(settings: &Settings) -> Result<Self, String> {
        match &settings.redis {
            RedisTarget::Single(url) => {
                let client = redis::Client::open(url.as_str())
                    .map_err(|e| format!("--redis: {}", e.category()))?;
                // Reconnection: one quick retry per attempt, started again by the next command, so a
                // command during an outage fails within tens of ms (503) and never waits for Redis.
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(settings.connect_timeout))
                    .set_response_timeout(Some(settings.timeout))
                    .set_min_delay(std::time::Duration::from_millis(10))
                    .set_max_delay(std::time::Duration::from_millis(1000))
                    .set_number_of_retries(1);
                let manager = ConnectionManager::new_lazy_with_config(client, config)
                    .map_err(|e| format!("--redis: {}", e.category()))?;
                Ok(Backend::Single(manager))
            }
            RedisTarget::Cluster(nodes) => {
                let client =
                    redis::cluster::ClusterClientBuilder::new(nodes.iter().map(String::as_str))
                        .connection_timeout(settings.connect_timeout)
                        .response_timeout(settings.timeout)
                        .retries(2)
                        .min_retry_wait(10)
                        .max_retry_wait(100)
                        .build()
                        .map_err(|e| format!("--redis-cluster: {}", e.category()))?;
                let conn = client.get_pending_async_connection_with_config(
                    redis::cluster::ClusterConfig::new()
                        .set_connection_timeout(settings.connect_timeout)
                        .set_response_timeout(settings.timeout),
                );
                Ok(Backend::Cluster(conn))
            }
        }
    }
}

impl ConnectionLike for Backend {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Backend::Single(c) => c.req_packed_command(cmd),
            Backend::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Backend::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Backend::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Backend::Single(c) => c.get_db(),
            Backend::Cluster(c) => c.get_db(),
        }
    }
}

/// Whether Redis is answering, as last seen: one log line when an outage starts and one when
/// it ends, never one per request.
#[derive(Clone, Default)]
pub struct Health(Arc<AtomicBool>);

impl Health {
    pub fn failed(&self, why: &str) {
        if !self.0.swap(true, Ordering::Relaxed) {
            eprintln!("unbusy-store: redis unavailable ({why}); answering 503 until it is back");
        }
    }

    pub fn succeeded(&self) {
        if self.0.swap(false, Ordering::Relaxed) {
            eprintln!("unbusy-store: redis available again");
        }
    }
}
