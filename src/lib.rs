//! wpf-gateway: a reverse proxy that forwards ordinary traffic to the site and owns the site's
//! CRM webhooks.
//!
//! [`run`] wires the stages together, in the order a request meets them:
//!
//! ```text
//! server (accept, limits, timeouts) -> route (Host -> site) -> webhook? -> webhook front door
//!                                                             \-> no   -> proxy (upstream)
//! webhook front door -> queue (SQLite, group commit) -> workers -> relay (to the upstream)
//! ```
#![forbid(unsafe_code)]

pub mod config;
pub mod pace;
pub mod proxy;
pub mod queue;
pub mod relay;
pub mod route;
pub mod server;
pub mod webhook;
pub mod worker;

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
    #[error("{0}")]
    Queue(#[from] queue::QueueError),
    #[error("relay for site {site}: {error}")]
    Relay { site: String, error: rustls::Error },
}

/// Everything a request needs, shared by all connections.
pub struct Gateway {
    pub router: route::Router,
    pub proxy: proxy::Proxy,
    pub front_door: Arc<webhook::FrontDoor>,
}

impl Gateway {
    pub fn new(config: &Config, queue: Arc<queue::SqliteQueue>) -> Result<Self, RunError> {
        Ok(Gateway {
            router: route::Router::new(&config.sites),
            proxy: proxy::Proxy::new(config)?,
            front_door: Arc::new(webhook::FrontDoor::new(config, queue)),
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
    let queue = queue::SqliteQueue::open(&config.server.data_dir, &config.queue).await?;
    let gateway = Arc::new(Gateway::new(&config, queue.clone())?);
    let background = tokio_util::task::TaskTracker::new();
    let stop_workers = CancellationToken::new();
    start_workers(&config, &queue, &background, &stop_workers)?;
    background.spawn(
        gateway
            .front_door
            .clone()
            .housekeeping(stop_workers.clone()),
    );
    background.close();
    for listener in &listeners.http {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "listening");
        }
    }
    let stopping = shutdown.clone();
    let workers_stop = stop_workers.clone();
    tokio::spawn(async move {
        stopping.cancelled().await;
        workers_stop.cancel();
    });
    server::serve(&config, gateway.clone(), listeners.http, shutdown).await;
    gateway.proxy.close_tunnels();
    // Workers finish the job they hold; one still running after the grace stays `running`
    // in the queue and runs again on the next start.
    stop_workers.cancel();
    if tokio::time::timeout(config.server.shutdown_grace, background.wait())
        .await
        .is_err()
    {
        tracing::warn!("workers still busy after the shutdown grace; their jobs will run again");
    }
    queue.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Workers for every site whose jobs can be processed now: relay mode. Direct-mode jobs stay
/// pending (durably) until the direct-mode processor exists; `check` says so.
fn start_workers(
    config: &Config,
    queue: &Arc<queue::SqliteQueue>,
    tracker: &tokio_util::task::TaskTracker,
    shutdown: &CancellationToken,
) -> Result<(), RunError> {
    let accounts = pace::Accounts::default();
    for site in &config.sites {
        let processor: Arc<dyn worker::Processor> = match site.mode {
            config::Mode::Relay => {
                let crm = site.crm.as_ref().map(|c| accounts.pacer(c));
                let relay = relay::Relay::new(Arc::new(site.clone()), crm).map_err(|error| {
                    RunError::Relay {
                        site: site.name.clone(),
                        error,
                    }
                })?;
                Arc::new(relay)
            }
            config::Mode::Direct => {
                tracing::warn!(
                    site = %site.name,
                    "direct mode has no processor yet: its webhooks are queued and kept pending"
                );
                continue;
            }
        };
        worker::Worker::spawn(
            site.workers,
            Arc::from(site.name.as_str()),
            queue.clone(),
            processor,
            tracker,
            shutdown.clone(),
        );
    }
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
            match self.front_door.handle(&site, req, conn).await {
                webhook::Outcome::Answered(resp) => resp,
                webhook::Outcome::PassThrough(req) => {
                    self.proxy.forward(&site, req, conn, log).await
                }
            }
        } else {
            self.proxy.forward(&site, req, conn, log).await
        }
    }
}
