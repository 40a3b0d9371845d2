//! The store's HTTP/1.1 server: an accept loop over a bound listener, each connection served
//! by [`crate::api::handle`]. A library function (not only the binary's) so that `unbusy up
//! --redis` can run a store in its own process beside Envoy.

use crate::api::{handle, Store};
use crate::backend::{Backend, Health};
use crate::config::Settings;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// A store bound to its listen address, not yet serving.
pub struct Bound {
    listener: tokio::net::TcpListener,
    store: Arc<Store>,
}

impl Bound {
    /// Connects lazily to Redis (a store started before Redis answers 503 until Redis is up)
    /// and binds `settings.listen`.
    pub async fn bind(settings: Settings) -> Result<Self, String> {
        let backend = Backend::new(&settings)?;
        let listener = tokio::net::TcpListener::bind(&settings.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", settings.listen))?;
        Ok(Self {
            listener,
            store: Arc::new(Store {
                backend,
                health: Health::default(),
                settings,
            }),
        })
    }

    /// The address it bound (with port 0 asked, the port it got).
    pub fn local_addr(&self) -> Result<SocketAddr, String> {
        self.listener.local_addr().map_err(|e| e.to_string())
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &Settings {
        &self.store.settings
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let (stream, _) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a little rather than spin.
                        eprintln!("unbusy-store: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => return,
            };
            let _ = stream.set_nodelay(true);
            let store = self.store.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| handle(store.clone(), req));
                let _ = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }
}
