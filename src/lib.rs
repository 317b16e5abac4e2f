//! wpf-gateway: a reverse proxy that forwards ordinary traffic to the site and owns the site's
//! CRM webhooks.
//!
//! [`run`] wires the stages together, in the order a request meets them:
//!
//! ```text
//! server (accept, limits, timeouts) -> route (Host -> site) -> webhook? -> webhook front door
//!                                                             \-> no   -> proxy (upstream)
//! ```
#![forbid(unsafe_code)]

pub mod config;
pub mod proxy;
pub mod queue;
pub mod route;
pub mod server;
pub mod tls;
pub mod webhook;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Boxed error used in streaming bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Response (and forwarded request) body: streamed, boxed.
pub type Body = BoxBody<Bytes, BoxError>;

/// Sockets bound by the caller (so tests can bind `127.0.0.1:0`).
pub struct Listeners {
    /// Plain HTTP listeners, one per `server.listen` address.
    pub http: Vec<TcpListener>,
}

impl Listeners {
    /// Bind every listener the configuration names.
    pub async fn bind(config: &Config) -> std::io::Result<Self> {
        let mut http = Vec::new();
        for addr in &config.server.listen {
            http.push(TcpListener::bind(addr).await?);
        }
        Ok(Listeners { http })
    }
}

/// Errors that stop the gateway.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("proxy: {0}")]
    Proxy(#[from] proxy::ProxyError),
}

/// Everything a request needs, shared by all connections.
pub struct Gateway {
    pub router: route::Router,
    pub proxy: proxy::Proxy,
    pub front_door: webhook::FrontDoor,
}

impl Gateway {
    pub fn new(config: &Config) -> Result<Self, RunError> {
        Ok(Gateway {
            router: route::Router::new(&config.sites),
            proxy: proxy::Proxy::new(config)?,
            front_door: webhook::FrontDoor::new(config),
        })
    }
}

/// Serve until `shutdown` is cancelled, then drain in-flight requests for up to
/// `server.shutdown_grace` and return.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let gateway = Arc::new(Gateway::new(&config)?);
    for listener in &listeners.http {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "listening");
        }
    }
    server::serve(&config, gateway.clone(), listeners.http, shutdown).await;
    gateway.proxy.close_tunnels();
    tracing::info!("stopped");
    Ok(())
}

/// An empty body.
pub fn empty_body() -> Body {
    use http_body_util::BodyExt;
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

/// A complete body from bytes.
pub fn full_body(data: impl Into<Bytes>) -> Body {
    use http_body_util::BodyExt;
    http_body_util::Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

impl Gateway {
    /// Route one request: unknown host -> 421; webhook -> front door; else -> upstream.
    /// `log` is the request's access-log entry (site and upstream time are filled in here).
    pub async fn handle(
        &self,
        req: http::Request<hyper::body::Incoming>,
        conn: server::ConnInfo,
        log: &mut proxy::RequestLog,
    ) -> http::Response<Body> {
        let Some(site) = self.router.route(&req).cloned() else {
            return proxy::error_page(http::StatusCode::MISDIRECTED_REQUEST);
        };
        log.site = Some(site.clone());
        if route::is_webhook(req.uri().query()) {
            self.front_door.handle(&site, req, conn).await
        } else {
            self.proxy.forward(&site, req, conn, log).await
        }
    }
}
