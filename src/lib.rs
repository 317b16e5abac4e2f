//! wpf-gateway: a reverse proxy that forwards ordinary traffic to the site and owns the site's
//! CRM webhooks.
//!
//! [`run`] wires the stages together, in the order a request meets them:
//!
//! ```text
//! server (accept, TLS, limits, timeouts) -> route (Host -> site) -> webhook? -> front door
//!                                                                  \-> no   -> proxy (upstream)
//! webhook front door -> queue (SQLite, group commit) -> workers -> relay (to the upstream)
//! ```
//!
//! Around it: `tls` (certificates by SNI, hot reload), `systemd` (readiness, watchdog),
//! `metrics` (counted by the stages) and `admin` (its own listener: health, `/metrics`, status
//! page, JSON API).
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod crm;
pub mod demo;
pub mod direct;
pub mod mail;
pub mod metrics;
pub mod notify;
pub mod pace;
pub mod proxy;
pub mod queue;
pub mod relay;
mod reload;
pub mod route;
pub mod server;
pub mod store;
pub mod systemd;
pub mod tls;
pub mod webhook;
pub mod worker;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
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
    /// HTTPS listeners, one per `tls.listen` address.
    pub tls: Vec<TcpListener>,
    /// The admin listener (`admin.listen`), if any.
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Bind every listener the configuration names.
    pub async fn bind(config: &Config) -> std::io::Result<Self> {
        let mut http = Vec::new();
        for addr in &config.server.listen {
            http.push(TcpListener::bind(addr).await?);
        }
        let mut tls = Vec::new();
        for addr in &config.tls.listen {
            tls.push(TcpListener::bind(addr).await?);
        }
        let admin = match config.admin.listen {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        Ok(Listeners { http, tls, admin })
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
    #[error("tls: {0}")]
    Tls(#[from] tls::LoadError),
    #[error("admin: {0}")]
    Admin(#[from] admin::AdminError),
    #[error("CRM of site {site}: {error}")]
    Crm {
        site: String,
        error: crm::CrmSetupError,
    },
    #[error("{0}")]
    Store(#[from] store::StoreError),
    #[error("mail of site {site}: {error}")]
    Mail {
        site: String,
        error: mail::MailError,
    },
    #[error("notify client of site {site}: {error}")]
    Notify { site: String, error: rustls::Error },
}

/// Everything a request needs, shared by all connections.
pub struct Gateway {
    /// The sites and the stages that depend on them; a reload swaps it.
    routing: arc_swap::ArcSwap<Routing>,
    /// Proxies of earlier routings: their upgrade tunnels are closed at shutdown too.
    retired: std::sync::Mutex<Vec<Arc<proxy::Proxy>>>,
    /// TLS handshakes and failures, counted by the server stage.
    pub tls_stats: Arc<tls::TlsStats>,
    /// Requests, counted when each one ends (`proxy::RequestLog`).
    pub metrics: Arc<metrics::Metrics>,
}

thread_local! {
    /// This serving thread's handle on the routing it last served with. A thread keeps it
    /// until it serves a request after a reload (or stops).
    static LOCAL_ROUTING: std::cell::RefCell<Option<RoutingRef>> =
        const { std::cell::RefCell::new(None) };
}

/// A request's hold on the routing it was routed with.
///
/// The routing's own reference count is shared by every thread; cloning it per request wrote
/// a cache line that both cores were writing. Each serving thread instead makes one handle
/// per routing and the requests it serves clone that: a count only its own thread touches.
#[derive(Clone)]
pub struct RoutingRef(Arc<ThreadRouting>);

/// One thread's hold on a routing (see [`RoutingRef`]).
struct ThreadRouting {
    routing: Arc<Routing>,
}

impl RoutingRef {
    fn new(routing: Arc<Routing>) -> Self {
        RoutingRef(Arc::new(ThreadRouting { routing }))
    }
}

impl std::ops::Deref for RoutingRef {
    type Target = Routing;

    fn deref(&self) -> &Routing {
        &self.0.routing
    }
}

/// The site a request was routed to (`None`: no site took it), with the routing it holds.
pub struct SiteRef {
    routing: RoutingRef,
    site: Option<usize>,
}

impl SiteRef {
    /// The site's request series.
    pub fn counters(&self) -> &metrics::RequestCounters {
        self.site
            .and_then(|i| self.routing.counters.get(i))
            .unwrap_or(&self.routing.unrouted)
    }
}

/// The request path of one configuration: Host -> site, the front door, the proxy.
pub struct Routing {
    pub router: route::Router,
    pub proxy: Arc<proxy::Proxy>,
    pub front_door: Arc<webhook::FrontDoor>,
    /// The request series of each site, in the order of `router.sites()`.
    counters: Vec<Arc<metrics::RequestCounters>>,
    /// The request series of requests no site took (421).
    unrouted: Arc<metrics::RequestCounters>,
}

impl Routing {
    pub fn new(
        config: &Config,
        queue: &Arc<queue::SqliteQueue>,
        metrics: &Arc<metrics::Metrics>,
    ) -> Result<Self, RunError> {
        let router = route::Router::new(&config.sites);
        let counters = router
            .sites()
            .iter()
            .map(|site| metrics.request_counters(Some(&site.name)))
            .collect();
        Ok(Routing {
            router,
            counters,
            unrouted: metrics.request_counters(None),
            proxy: Arc::new(proxy::Proxy::new(config)?),
            front_door: Arc::new(webhook::FrontDoor::new(
                config,
                queue.clone(),
                metrics.clone(),
            )),
        })
    }
}

impl Gateway {
    /// The stages of the request path; TLS handshakes are counted into `metrics`' TLS stats.
    pub fn new(
        config: &Config,
        queue: Arc<queue::SqliteQueue>,
        metrics: Arc<metrics::Metrics>,
        tls_stats: Arc<tls::TlsStats>,
    ) -> Result<Self, RunError> {
        let routing = Routing::new(config, &queue, &metrics)?;
        Ok(Gateway {
            routing: arc_swap::ArcSwap::from_pointee(routing),
            retired: std::sync::Mutex::new(Vec::new()),
            tls_stats,
            metrics,
        })
    }

    /// The current routing (a reload may replace it at any time).
    pub fn routing(&self) -> Arc<Routing> {
        self.routing.load_full()
    }

    /// The current routing, for one request: on a serving thread a clone of that thread's own
    /// handle on it (see [`RoutingRef`]), elsewhere a handle of its own.
    fn routing_here(&self) -> RoutingRef {
        let current = self.routing.load();
        if server::serving_thread().is_none() {
            return RoutingRef::new(arc_swap::Guard::into_inner(current));
        }
        LOCAL_ROUTING.with(|local| {
            let mut local = local.borrow_mut();
            match &*local {
                // The handle holds the routing, so a routing at the same address is the same.
                Some(mine) if Arc::ptr_eq(&mine.0.routing, &*current) => mine.clone(),
                _ => {
                    let mine = RoutingRef::new(arc_swap::Guard::into_inner(current));
                    *local = Some(mine.clone());
                    mine
                }
            }
        })
    }

    /// Make `routing` the one new requests use; requests in flight finish on the old one.
    fn swap_routing(&self, routing: Routing) {
        let old = self.routing.swap(Arc::new(routing));
        self.retired
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(old.proxy.clone());
    }

    /// Close every spliced upgrade tunnel, of this routing and earlier ones (after the drain).
    pub fn close_tunnels(&self) {
        self.routing.load().proxy.close_tunnels();
        for proxy in self
            .retired
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
        {
            proxy.close_tunnels();
        }
    }

    /// Forget idle per-IP limiter states now and then, so the tables stay small.
    async fn housekeeping(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(webhook::LIMITER_HOUSEKEEPING);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.routing.load().front_door.forget_idle(),
            }
        }
    }
}

/// The workers of the running configuration; a reload replaces them (see `reload.rs`).
pub(crate) struct Workers {
    tracker: tokio_util::task::TaskTracker,
    /// Cancelled at shutdown: stops every generation.
    root: CancellationToken,
    /// Cancelled when a reload starts new workers.
    generation: CancellationToken,
}

/// A site's name and the processor its workers run.
pub(crate) type SiteProcessor = (Arc<str>, Arc<dyn worker::Processor>);

/// Why a reload did not (entirely) happen. What did reload stays reloaded.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new configuration is invalid: nothing changed.
    #[error("{0}")]
    Config(config::ConfigError),
    /// The new configuration could not be put to work: nothing changed.
    #[error("{0}")]
    Build(Box<RunError>),
    /// These certificates kept their previous version.
    #[error("certificates: {0}")]
    Certificates(#[from] tls::ReloadError),
    #[error("the gateway is not running")]
    NotRunning,
}

type ReloadReply = oneshot::Sender<Result<(), ReloadError>>;

/// Asks a running gateway to reload, as SIGHUP does: certificates are read again; new
/// handshakes use them, open connections are untouched. Cheap to clone.
#[derive(Clone)]
pub struct ReloadHandle(mpsc::Sender<ReloadReply>);

/// The gateway's end of a [`ReloadHandle`]: give it to [`run_with`] in [`RunOptions`].
pub struct ReloadRequests(mpsc::Receiver<ReloadReply>);

/// A connected [`ReloadHandle`] and [`ReloadRequests`].
pub fn reload_channel() -> (ReloadHandle, ReloadRequests) {
    let (tx, rx) = mpsc::channel(8);
    (ReloadHandle(tx), ReloadRequests(rx))
}

impl ReloadHandle {
    /// Reload and wait for the outcome. Failures are also logged by the gateway, each naming
    /// its file.
    pub async fn reload(&self) -> Result<(), ReloadError> {
        let (reply, outcome) = oneshot::channel();
        self.0
            .send(reply)
            .await
            .map_err(|_| ReloadError::NotRunning)?;
        outcome.await.map_err(|_| ReloadError::NotRunning)?
    }
}

/// What [`run_with`] takes besides the config, the sockets and the stop signal.
#[derive(Default)]
pub struct RunOptions {
    /// Reload requests (SIGHUP in `main`). `None`: reload only when certificate files change.
    pub reload: Option<ReloadRequests>,
    /// TLS handshake counters; keep a clone to read them while the gateway runs.
    pub tls_stats: Arc<tls::TlsStats>,
}

/// Serve until `shutdown` is cancelled, then drain in-flight requests for up to
/// `server.shutdown_grace` and return. [`run_with`] with default options.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    run_with(config, listeners, shutdown, RunOptions::default()).await
}

/// Serve like [`run`], answering reload requests and counting TLS handshakes into
/// `options.tls_stats`.
///
/// Start-up order: metrics, queue, gateway stages, workers, certificates, the admin listener
/// (it reads the token file), then systemd `READY=1` and `/readyz` 200 just before serving.
/// When `shutdown` fires: `STOPPING=1`, `/readyz` 503 while connections drain; the admin
/// listener stops last, before the queue closes.
pub async fn run_with(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
    options: RunOptions,
) -> Result<(), RunError> {
    let metrics = Arc::new(metrics::Metrics::new(&config, options.tls_stats.clone()));
    let queue = queue::SqliteQueue::open(&config.server.data_dir, &config.queue).await?;
    let gateway = Arc::new(Gateway::new(
        &config,
        queue.clone(),
        metrics.clone(),
        options.tls_stats,
    )?);
    // Before any task starts, so a bad token file stops the start cleanly.
    let health = Arc::new(admin::Health::default());
    let admin = match &listeners.admin {
        Some(_) => Some(admin::Admin::new(
            &config,
            gateway.clone(),
            queue.clone(),
            metrics.clone(),
            health.clone(),
        )?),
        None => None,
    };
    let background = tokio_util::task::TaskTracker::new();
    let stop_workers = CancellationToken::new();
    let workers = Workers::new(background.clone(), stop_workers.clone());
    let processing = Arc::new(Processing::new(&config, queue.clone(), metrics.clone()));
    workers.start(
        &config,
        &queue,
        &metrics,
        processing.processors(&config).await?,
    );
    background.spawn(gateway.clone().housekeeping(stop_workers.clone()));
    background.close();
    let certs = if listeners.tls.is_empty() && config.tls.certs.is_empty() {
        None
    } else {
        Some(tls::CertStore::load(&config.tls)?)
    };
    let mut served = Vec::new();
    for listener in listeners.http {
        served.push((listener, server::Transport::Plain));
    }
    if let Some(certs) = &certs {
        let acceptor =
            tokio_rustls::TlsAcceptor::from(certs.server_config().map_err(tls::LoadError::from)?);
        for listener in listeners.tls {
            served.push((listener, server::Transport::Tls(acceptor.clone())));
        }
    }
    for (listener, transport) in &served {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, proto = transport.scheme(), "listening");
        }
    }

    // Helpers live exactly as long as this call.
    let helpers = CancellationToken::new();
    let _stop_helpers = helpers.clone().drop_guard();
    let stop_admin = CancellationToken::new();
    // Also stops the admin listener when this call returns early (an error below).
    let _stop_admin = stop_admin.clone().drop_guard();
    let admin_task = match (listeners.admin, admin) {
        (Some(listener), Some(admin)) => {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, proto = "http", "admin listening");
            }
            Some(tokio::spawn(admin.serve(listener, stop_admin.clone())))
        }
        _ => None,
    };
    if let Some(certs) = &certs {
        tokio::spawn(certs.clone().watch_files(helpers.clone()));
    }
    if let Some(requests) = options.reload {
        let reloader = reload::Reloader {
            config: config.clone(),
            gateway: gateway.clone(),
            queue: queue.clone(),
            metrics: metrics.clone(),
            certs: certs.clone(),
            workers,
            processing,
        };
        tokio::spawn(answer_reloads(requests, reloader, helpers.clone()));
    }

    systemd::ready();
    health.set_ready(true);
    tokio::spawn(systemd::feed_watchdog(helpers.clone()));
    let serving = server::serve(&config, gateway.clone(), served, shutdown.clone());
    tokio::pin!(serving);
    tokio::select! {
        // The server returns once `shutdown` fires too; checking the signal first makes sure
        // the drain below (STOPPING=1, /readyz 503) always runs when it did.
        biased;
        () = shutdown.cancelled() => {
            systemd::stopping();
            health.set_draining();
            // Workers stop taking jobs while connections drain.
            stop_workers.cancel();
            serving.await;
        }
        () = &mut serving => {}
    }
    gateway.close_tunnels();
    // Workers finish the job they hold; one still running after the grace stays `running`
    // in the queue and runs again on the next start.
    stop_workers.cancel();
    if tokio::time::timeout(config.server.shutdown_grace, background.wait())
        .await
        .is_err()
    {
        tracing::warn!("workers still busy after the shutdown grace; their jobs will run again");
    }
    health.set_draining();
    stop_admin.cancel();
    if let Some(task) = admin_task {
        // The admin server cuts its connections after a short grace of its own.
        let _ = task.await;
    }
    queue.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// What the processors of every configuration share: the queue (loopback locks after the
/// gateway's own CRM writes), the metrics and the embedded user store, opened when a
/// direct-mode site first needs it and kept across reloads.
pub(crate) struct Processing {
    pub queue: Arc<queue::SqliteQueue>,
    pub metrics: Arc<metrics::Metrics>,
    data_dir: std::path::PathBuf,
    embedded: tokio::sync::OnceCell<Arc<store::embedded::EmbeddedStore>>,
    /// One WordPress store (one connection pool) per site, made when the site is first
    /// processed and kept across reloads while its database settings stay the same.
    wordpress: std::sync::Mutex<std::collections::HashMap<String, WordPressEntry>>,
}

/// A site's WordPress store and the settings it was made with.
struct WordPressEntry {
    settings: (String, String, String, Vec<String>),
    store: Arc<store::WordPressStore>,
}

impl Processing {
    pub fn new(
        config: &Config,
        queue: Arc<queue::SqliteQueue>,
        metrics: Arc<metrics::Metrics>,
    ) -> Self {
        Processing {
            queue,
            metrics,
            data_dir: config.server.data_dir.clone(),
            embedded: tokio::sync::OnceCell::new(),
            wordpress: Default::default(),
        }
    }

    /// The WordPress store of `site` (its pool connects lazily, on the first job).
    fn wordpress(&self, site: &config::SiteConfig) -> Result<Arc<store::WordPressStore>, RunError> {
        let config::StoreConfig::WordPress {
            url,
            table_prefix,
            crm_slug,
            ..
        } = &site.store
        else {
            return Err(RunError::Store(store::StoreError::Conflict(format!(
                "site {:?} has no WordPress store",
                site.name
            ))));
        };
        let options = store::wordpress::options_for(site, table_prefix, crm_slug);
        let settings = (
            url.expose().to_owned(),
            table_prefix.clone(),
            crm_slug.clone(),
            options.meta_keys.clone(),
        );
        // Never held across an await: the map only hands out `Arc`s.
        let mut stores = self
            .wordpress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(entry) = stores.get(&site.name).filter(|e| e.settings == settings) {
            return Ok(entry.store.clone());
        }
        let store = Arc::new(store::WordPressStore::connect(url, options)?);
        stores.insert(
            site.name.clone(),
            WordPressEntry {
                settings,
                store: store.clone(),
            },
        );
        Ok(store)
    }

    async fn embedded(&self) -> Result<Arc<store::embedded::EmbeddedStore>, RunError> {
        let store = self
            .embedded
            .get_or_try_init(|| async {
                store::embedded::EmbeddedStore::open(&self.data_dir)
                    .await
                    .map(Arc::new)
            })
            .await?;
        Ok(store.clone())
    }

    /// The processor of every site that is not paused: relay mode, and direct mode with the
    /// embedded store or the site's WordPress database.
    pub async fn processors(&self, config: &Config) -> Result<Vec<SiteProcessor>, RunError> {
        let accounts = pace::Accounts::default();
        let mut out = Vec::new();
        for site in &config.sites {
            if site.paused {
                tracing::info!(site = %site.name, "processing paused: webhooks are queued, no job runs");
                continue;
            }
            let shared = Arc::new(site.clone());
            let processor: Arc<dyn worker::Processor> = match (site.mode, &site.crm) {
                (config::Mode::Relay, crm) => {
                    let crm = crm.as_ref().map(|c| accounts.pacer(c));
                    let relay =
                        relay::Relay::new(shared, crm, self.metrics.clone()).map_err(|error| {
                            RunError::Relay {
                                site: site.name.clone(),
                                error,
                            }
                        })?;
                    Arc::new(relay)
                }
                // Config validation refuses direct mode without [site.crm].
                (config::Mode::Direct, None) => continue,
                (config::Mode::Direct, Some(crm_config)) => {
                    let user_store: Arc<dyn store::UserStore> = match &site.store {
                        config::StoreConfig::Embedded => self.embedded().await?,
                        config::StoreConfig::WordPress { .. } => self.wordpress(site)?,
                    };
                    let crm = crm::connect(crm_config, {
                        let metrics = self.metrics.clone();
                        let site_name = site.name.clone();
                        crm::Link {
                            pacer: accounts.pacer(crm_config),
                            timeout: crm_config.timeout,
                            on_answer: Some(Arc::new(move |status: &str| {
                                metrics.crm_request(&site_name, status)
                            })),
                        }
                    })
                    .map_err(|error| RunError::Crm {
                        site: site.name.clone(),
                        error,
                    })?;
                    let mailer = site
                        .mail
                        .as_ref()
                        .map(|m| mail::Mailer::new(m, &site.name))
                        .transpose()
                        .map_err(|error| RunError::Mail {
                            site: site.name.clone(),
                            error,
                        })?;
                    let notifier = match &site.store {
                        config::StoreConfig::WordPress { notify: true, .. } => Some(
                            notify::Notifier::new(site).map_err(|error| RunError::Notify {
                                site: site.name.clone(),
                                error,
                            })?,
                        ),
                        _ => None,
                    };
                    Arc::new(
                        direct::Direct::new(shared, crm, user_store, self.queue.clone(), mailer)
                            .with_notifier(notifier),
                    )
                }
            };
            out.push((Arc::from(site.name.as_str()), processor));
        }
        Ok(out)
    }
}

/// Carry out reload requests one at a time until `stop`, telling systemd around each.
async fn answer_reloads(
    mut requests: ReloadRequests,
    mut reloader: reload::Reloader,
    stop: CancellationToken,
) {
    loop {
        let reply = tokio::select! {
            () = stop.cancelled() => return,
            reply = requests.0.recv() => match reply {
                Some(reply) => reply,
                None => return,
            },
        };
        systemd::reloading();
        let outcome = reloader.reload().await;
        match &outcome {
            Ok(()) => tracing::info!("reloaded"),
            // Each problem was logged already, naming its file (and line).
            Err(e) => tracing::warn!(error = %e, "reload incomplete"),
        }
        systemd::ready();
        // The requester may have given up waiting; the reload happened anyway.
        let _ = reply.send(outcome);
    }
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
        let routing = self.routing_here();
        let index = routing.router.route_index(&req);
        let site = index.and_then(|i| routing.router.sites().get(i));
        log.site = Some(SiteRef {
            routing: routing.clone(),
            site: site.and(index),
        });
        let Some(site) = site else {
            return proxy::error_page(http::StatusCode::MISDIRECTED_REQUEST);
        };
        if route::is_webhook(req.uri().query()) {
            // Boxed: the front door's future is large and rare next to pass-through, and
            // the request future is moved on every request (hyper stores it per request).
            match Box::pin(routing.front_door.handle(site, req, conn)).await {
                webhook::Outcome::Answered(resp) => resp,
                webhook::Outcome::PassThrough(req) => {
                    routing.proxy.forward(site, req, conn, log).await
                }
            }
        } else {
            routing.proxy.forward(site, req, conn, log).await
        }
    }
}
