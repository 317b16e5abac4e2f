//! Server stage: accept connections, complete TLS handshakes on HTTPS listeners, serve HTTP/1.1
//! and HTTP/2 (h2c prior knowledge on plain listeners, ALPN on TLS), enforce the connection cap
//! and the handshake, header-read and idle timeouts, and drain on shutdown.
//!
//! Timeouts, and who enforces them:
//! - **header read** (slowloris): hyper's HTTP/1 `header_read_timeout`. Hyper starts that timer
//!   whenever it waits for a request head, which includes the wait for the *next* request on
//!   a keep-alive connection, so an idle HTTP/1 connection is closed after
//!   `min(header_read_timeout, idle_timeout)`.
//! - **idle**: our own per-connection watchdog ([`Activity`]): a connection with no request in
//!   flight for `idle_timeout` is shut down gracefully. This is what closes idle HTTP/2
//!   connections (hyper has no idle timeout for them) and bounds a connection that never
//!   completes its first request (an HTTP/2 preface sent slowly): until the first request it
//!   gets `header_read_timeout`.
//!
//! - **TLS handshake**: `header_read_timeout` again, counted from the accept. The handshake
//!   runs in the connection's own task (the accept loop never waits on a client) and holds
//!   its slot under the connection cap like any other connection.
//!
//! The accept path is generic over the IO type ([`Server::serve_connection`]): TLS streams and
//! plain TCP are served by the same code.
//!
//! Threads: one accept loop (on the caller's runtime: the cap and the listeners stay in one
//! place) hands each connection to the least busy of [`serving_threads`] serving threads, each
//! a single-threaded runtime with its own epoll and timers, like nginx's workers. Everything a
//! connection's requests do on the pass-through path (TLS, both HTTP codecs, the upstream
//! connection from that thread's pool shard) then happens on one core; with tokio's
//! multi-threaded scheduler the client side and the upstream side of a request were woken on
//! whichever worker polled the event, and `bench/proxy.sh` measured ~20% more CPU per request.
//!
//! Nothing a request does on the pass-through path writes memory that another serving thread
//! writes too: each thread has its own shutdown tokens (polled on every wake-up of every
//! connection task, and each poll takes the token's lock), its own handle on the routing
//! (`Gateway::handle`), its own pool shard and its own request counters (`metrics`). A
//! cache line written by both cores moves between them on every write.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use ipnet::IpNet;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::proxy::RequestLog;
use crate::{Body, BoxError, Config, Gateway};

/// How a listener's connections are opened.
#[derive(Clone)]
pub enum Transport {
    /// Plain TCP: HTTP/1.1, or HTTP/2 with prior knowledge.
    Plain,
    /// TLS first (certificates by SNI, ALPN h2 / http/1.1).
    Tls(tokio_rustls::TlsAcceptor),
}

impl Transport {
    /// `"http"` or `"https"`.
    pub fn scheme(&self) -> &'static str {
        match self {
            Transport::Plain => "http",
            Transport::Tls(_) => "https",
        }
    }
}

/// What the gateway knows about the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub tls: bool,
}

/// Is `ip` inside one of the trusted proxy networks?
pub fn is_trusted(ip: IpAddr, trusted_proxies: &[IpNet]) -> bool {
    trusted_proxies.iter().any(|net| net.contains(&ip))
}

/// The client's address as the rest of the gateway sees it (rate limits, logs): the peer,
/// unless the peer is a trusted proxy; then the right-most address in `X-Forwarded-For` that
/// is not a trusted proxy (walking right to left over all `X-Forwarded-For` headers). If the
/// chain is all trusted, its left-most address; if an entry is unparseable, the last good one
/// to its right.
pub fn client_ip(headers: &HeaderMap, conn: ConnInfo, trusted_proxies: &[IpNet]) -> IpAddr {
    let peer = conn.peer.ip().to_canonical();
    if !is_trusted(peer, trusted_proxies) {
        return peer;
    }
    let mut client = peer;
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(value) = value.to_str() else {
            return client;
        };
        for item in value.rsplit(',') {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            let Some(ip) = parse_forwarded_ip(item) else {
                return client;
            };
            client = ip;
            if !is_trusted(ip, trusted_proxies) {
                return ip;
            }
        }
    }
    client
}

/// `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]:80`.
fn parse_forwarded_ip(item: &str) -> Option<IpAddr> {
    item.parse::<IpAddr>()
        .ok()
        .or_else(|| item.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            item.strip_prefix('[')
                .and_then(|s| s.strip_suffix(']'))
                .and_then(|s| s.parse().ok())
        })
        .map(|ip: IpAddr| ip.to_canonical())
}

/// Shared by all connections: the protocol builder, the cap, the timeouts.
pub struct Server {
    gateway: Arc<Gateway>,
    builder: auto::Builder<TokioExecutor>,
    connections: Arc<Semaphore>,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    access_log: bool,
    trusted_proxies: Arc<[IpNet]>,
}

impl Server {
    /// Build the protocol settings from `config.server`.
    pub fn new(config: &Config, gateway: Arc<Gateway>) -> Self {
        let s = &config.server;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(s.header_read_timeout)
            // hyper refuses buffers under 8 KiB; the request head must fit in this buffer,
            // larger heads get 431.
            .max_buf_size(s.max_header_size.max(8192));
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(s.max_header_size).unwrap_or(u32::MAX))
            // Pings find dead peers under long-running streams; idleness is the watchdog's.
            .keep_alive_interval(Some(s.idle_timeout))
            .keep_alive_timeout(Duration::from_secs(20));
        Server {
            gateway,
            builder,
            connections: Arc::new(Semaphore::new(s.max_connections.max(1))),
            header_read_timeout: s.header_read_timeout,
            idle_timeout: s.idle_timeout,
            access_log: config.log.access_log,
            trusted_proxies: config.server.trusted_proxies.clone().into(),
        }
    }

    /// Serve one accepted connection (plain TCP now, TLS later) until it closes, `shutdown`
    /// asks it to drain, or `abort` cuts it off. `permit` is its slot under the cap.
    pub async fn serve_connection<I>(
        self: Arc<Self>,
        io: I,
        conn: ConnInfo,
        permit: OwnedSemaphorePermit,
        shutdown: CancellationToken,
        abort: CancellationToken,
    ) where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        let access_log = self.access_log;
        // Cloned per request instead of `Gateway` itself: the count of a per-connection
        // `Arc` stays in the cache of the core serving the connection, while the gateway's is
        // shared by all and would bounce between cores on every request.
        let shared = Arc::new(PerConnection {
            server: self.clone(),
            activity: activity.clone(),
        });
        let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let shared = shared.clone();
            let in_flight = InFlight::begin(&shared.activity);
            let mut log = RequestLog::start(&req, conn, &shared.server.trusted_proxies, access_log);
            async move {
                let resp = shared.server.gateway.handle(req, conn, &mut log).await;
                log.status = resp.status().as_u16();
                Ok::<_, Infallible>(resp.map(|body| ServedBody {
                    inner: body,
                    log,
                    _in_flight: in_flight,
                }))
            }
        });
        let connection = self.builder.serve_connection_with_upgrades(io, service);
        tokio::pin!(connection);
        let mut draining = false;
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(peer = %conn.peer, error = %e, "connection ended");
                    }
                    break;
                }
                () = shutdown.cancelled(), if !draining => {
                    draining = true;
                    connection.as_mut().graceful_shutdown();
                }
                () = activity.idle(self.header_read_timeout, self.idle_timeout), if !draining => {
                    draining = true;
                    connection.as_mut().graceful_shutdown();
                }
                () = abort.cancelled() => break,
            }
        }
        drop(permit);
    }

    /// Complete the TLS handshake within `header_read_timeout`, then serve the connection as
    /// [`Server::serve_connection`] does, with `conn.tls` set.
    pub async fn serve_tls(
        self: Arc<Self>,
        acceptor: tokio_rustls::TlsAcceptor,
        stream: TcpStream,
        mut conn: ConnInfo,
        permit: OwnedSemaphorePermit,
        shutdown: CancellationToken,
        abort: CancellationToken,
    ) {
        let stats = self.gateway.tls_stats.clone();
        // A failed handshake is counted before its socket is closed (the fallible accept
        // hands it back; the timed-out one is dropped after counting), so a client that sees
        // the close also sees the count, whichever thread serves the connection.
        let mut handshake = Box::pin(tokio::time::timeout(
            self.header_read_timeout,
            acceptor.accept(stream).into_fallible(),
        ));
        let outcome = tokio::select! {
            outcome = &mut handshake => outcome,
            () = abort.cancelled() => return,
        };
        match outcome {
            Ok(Ok(stream)) => {
                // Its timer would otherwise stay armed for the life of the connection.
                drop(handshake);
                stats.handshakes.fetch_add(1, Ordering::Relaxed);
                conn.tls = true;
                self.serve_connection(TokioIo::new(stream), conn, permit, shutdown, abort)
                    .await;
            }
            Ok(Err((e, socket))) => {
                stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
                drop(socket);
                tracing::debug!(peer = %conn.peer, error = %e, "tls handshake failed");
            }
            Err(_) => {
                stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
                drop(handshake);
                tracing::debug!(peer = %conn.peer, "tls handshake timed out");
            }
        }
    }
}

/// How many threads serve connections: `TOKIO_WORKER_THREADS` when set (tokio reads it for
/// the main runtime too), else one per core.
pub fn serving_threads() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

thread_local! {
    /// The index of this serving thread, `None` on every other thread (tests, the main
    /// runtime).
    static SERVING_THREAD: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The index of the serving thread this runs on (`0..serving_threads()`), `None` elsewhere.
/// What a thread keeps for itself (pool shard, request counters) is indexed by it.
pub fn serving_thread() -> Option<usize> {
    SERVING_THREAD.with(std::cell::Cell::get)
}

/// A connection, ready to be served on a serving thread (already counted by the tracker).
type ConnectionJob = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// One serving thread: a single-threaded tokio runtime of its own (its own epoll and timers,
/// nginx's worker model), serving the connections handed to it. A connection, its upstream
/// connections (the pool has a shard per thread, `proxy::set_pool_shard`) and its HTTP/2
/// streams all stay on that thread: no task of a request is ever woken on another core, and
/// its buffers stay in that core's cache. A multi-threaded runtime moves tasks between its
/// workers all the time (whichever worker polled the I/O event runs the woken task).
struct ServingThread {
    inbox: tokio::sync::mpsc::UnboundedSender<ConnectionJob>,
    /// Connections this thread serves now: a new one goes to the least busy thread.
    open: Arc<AtomicUsize>,
    /// Resolves (with an error: the sender is dropped) once the thread has stopped.
    stopped: tokio::sync::oneshot::Receiver<()>,
}

impl ServingThread {
    /// Start serving thread `index`; it runs until its inbox is closed and every connection
    /// in `connections` has ended.
    fn start(index: usize, connections: TaskTracker) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (inbox, mut jobs) = tokio::sync::mpsc::unbounded_channel::<ConnectionJob>();
        let (stopped_tx, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("wpf-serve-{index}"))
            .spawn(move || {
                SERVING_THREAD.with(|thread| thread.set(Some(index)));
                runtime.block_on(async move {
                    while let Some(job) = jobs.recv().await {
                        tokio::spawn(job);
                    }
                    // The accept loop has stopped; this thread's connections drain (the
                    // tracker is closed by then). Its tasks only run while we wait here.
                    connections.wait().await;
                });
                // Spliced tunnels and upstream connections end with the runtime.
                runtime.shutdown_timeout(Duration::from_secs(1));
                drop(stopped_tx);
            })?;
        Ok(ServingThread {
            inbox,
            open: Arc::new(AtomicUsize::new(0)),
            stopped,
        })
    }
}

/// Counts a connection as open on its serving thread until dropped.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(open.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accept on every listener until `shutdown`, then let open connections finish their
/// in-flight requests for up to `server.shutdown_grace`, cut the rest, and return.
///
/// The accept loop runs on the caller's runtime; each connection is served on one of
/// [`serving_threads`] serving threads ([`ServingThread`]), or on the caller's runtime when
/// none could be started.
pub async fn serve(
    config: &Config,
    gateway: Arc<Gateway>,
    listeners: Vec<(TcpListener, Transport)>,
    shutdown: CancellationToken,
) {
    let server = Arc::new(Server::new(config, gateway));
    let connections = TaskTracker::new();
    let abort = CancellationToken::new();
    // Should this future be dropped before the drain (the caller's runtime going away), the
    // serving threads cut their connections and stop instead of waiting for them forever.
    let _stop_threads = StopServingThreads {
        connections: connections.clone(),
        abort: abort.clone(),
    };
    let mut threads = Vec::new();
    for index in 0..serving_threads() {
        match ServingThread::start(index, connections.clone()) {
            Ok(thread) => threads.push(thread),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a serving thread");
                break;
            }
        }
    }
    let dispatch = Dispatch {
        threads: threads
            .iter()
            .map(|t| DispatchTo {
                inbox: t.inbox.clone(),
                open: t.open.clone(),
                stop: Stop {
                    shutdown: shutdown.child_token(),
                    abort: abort.child_token(),
                },
            })
            .collect(),
        own: Stop {
            shutdown: shutdown.clone(),
            abort: abort.clone(),
        },
    };
    let stopped: Vec<_> = threads.into_iter().map(|t| t.stopped).collect();
    let accepting = TaskTracker::new();
    accepting.spawn(accept_loop(
        listeners,
        server.clone(),
        dispatch,
        connections.clone(),
        shutdown.clone(),
    ));
    accepting.close();
    shutdown.cancelled().await;
    // The accept loop owned the inboxes: the serving threads stop taking connections.
    accepting.wait().await;
    connections.close();
    let open = connections.len();
    tracing::info!(open, "shutting down: draining connections");
    if tokio::time::timeout(config.server.shutdown_grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            "shutdown grace expired; closing remaining connections"
        );
        abort.cancel();
        connections.wait().await;
    }
    for thread in stopped {
        // Err is the normal end: the thread dropped its sender when it stopped.
        let _ = thread.await;
    }
}

/// Closes the tracker and cuts every connection when dropped (a no-op after the drain).
struct StopServingThreads {
    connections: TaskTracker,
    abort: CancellationToken,
}

impl Drop for StopServingThreads {
    fn drop(&mut self) {
        self.connections.close();
        self.abort.cancel();
    }
}

/// What tells a connection to drain (`shutdown`) or to stop at once (`abort`).
#[derive(Clone)]
struct Stop {
    shutdown: CancellationToken,
    abort: CancellationToken,
}

/// Where accepted connections go: the least busy serving thread (or the caller's runtime).
struct Dispatch {
    threads: Vec<DispatchTo>,
    /// The tokens of connections served on the caller's runtime.
    own: Stop,
}

/// One serving thread, as the accept loop sees it.
struct DispatchTo {
    inbox: tokio::sync::mpsc::UnboundedSender<ConnectionJob>,
    open: Arc<AtomicUsize>,
    /// Child tokens of the server's, one pair per thread: a token's waiters sit behind a
    /// lock that every poll of a waiting `cancelled()` takes, and each connection polls two
    /// on every wake-up. Shared by all connections, that lock moved between the cores on
    /// nearly every request.
    stop: Stop,
}

impl Dispatch {
    /// Serve `stream` with `serve` on the least busy serving thread, with that thread's
    /// tokens; on the current runtime when there is none (or none takes it).
    fn serve<F, Fut>(&self, stream: TcpStream, connections: &TaskTracker, serve: F)
    where
        F: FnOnce(TcpStream, Stop) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let least_busy = self
            .threads
            .iter()
            .filter(|to| !to.inbox.is_closed())
            .min_by_key(|to| to.open.load(Ordering::Relaxed));
        let Some(DispatchTo { inbox, open, stop }) = least_busy else {
            connections.spawn(serve(stream, self.own.clone()));
            return;
        };
        let stop = stop.clone();
        // The socket leaves this runtime's reactor and joins the serving thread's.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "accepted connection unusable");
                return;
            }
        };
        let open = OpenConnection::new(open);
        // Tracked from here, so the drain cannot miss a connection still in an inbox.
        let job = connections.track_future(async move {
            let _open = open;
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(stream, stop).await,
                Err(e) => tracing::warn!(error = %e, "cannot serve connection"),
            }
        });
        if let Err(unsent) = inbox.send(Box::pin(job)) {
            // The thread stopped (it only does at shutdown): drop the connection, as at
            // shutdown, rather than serve it on a runtime it was not meant for.
            drop(unsent);
        }
    }
}

/// One loop accepts for every listener: a slot under the cap is taken before accepting (over
/// the cap, new connections wait in the kernel's backlog), and one loop means one slot held
/// while waiting, however many listeners there are.
async fn accept_loop(
    listeners: Vec<(TcpListener, Transport)>,
    server: Arc<Server>,
    dispatch: Dispatch,
    connections: TaskTracker,
    shutdown: CancellationToken,
) {
    let listeners: Vec<(TcpListener, Transport, SocketAddr)> = listeners
        .into_iter()
        .filter_map(|(listener, transport)| {
            let local = listener.local_addr().ok()?;
            Some((listener, transport, local))
        })
        .collect();
    if listeners.is_empty() {
        return;
    }
    let mut first = 0;
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => return,
            permit = server.connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let (index, accepted) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = accept_any(&listeners, first) => accepted,
        };
        // Start the next round after this listener: a busy one cannot starve the others.
        first = (index + 1) % listeners.len();
        let (_, transport, local) = &listeners[index];
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(local = %local, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = ConnInfo {
            peer,
            local: *local,
            tls: false,
        };
        let server = server.clone();
        match transport {
            Transport::Plain => dispatch.serve(stream, &connections, move |stream, stop| {
                let io = TokioIo::new(stream);
                server.serve_connection(io, conn, permit, stop.shutdown, stop.abort)
            }),
            Transport::Tls(acceptor) => {
                let acceptor = acceptor.clone();
                dispatch.serve(stream, &connections, move |stream, stop| {
                    server.serve_tls(acceptor, stream, conn, permit, stop.shutdown, stop.abort)
                })
            }
        }
    }
}

/// The next connection on any listener, polling them from `first` on.
async fn accept_any(
    listeners: &[(TcpListener, Transport, SocketAddr)],
    first: usize,
) -> (usize, std::io::Result<(TcpStream, SocketAddr)>) {
    std::future::poll_fn(|cx| {
        for k in 0..listeners.len() {
            let index = (first + k) % listeners.len();
            if let Poll::Ready(accepted) = listeners[index].0.poll_accept(cx) {
                return Poll::Ready((index, accepted));
            }
        }
        Poll::Pending
    })
    .await
}

/// What a connection's requests share (see `Server::serve_connection`).
struct PerConnection {
    server: Arc<Server>,
    activity: Arc<Activity>,
}

/// Per-connection request activity, for the idle watchdog. Lock-free: one counter and one
/// timestamp touched per request.
struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    served_any: AtomicBool,
    /// When the last request finished, in ms since `opened`.
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            served_any: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    /// Resolves once the connection has had no request in flight for `idle_timeout` (or, before
    /// its first request, for `first_request_timeout`).
    async fn idle(&self, first_request_timeout: Duration, idle_timeout: Duration) {
        loop {
            let now = Instant::now();
            let deadline = if self.in_flight.load(Ordering::Acquire) > 0 {
                now + idle_timeout
            } else if !self.served_any.load(Ordering::Acquire) {
                self.opened + first_request_timeout.min(idle_timeout)
            } else {
                let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
                self.opened + since + idle_timeout
            };
            if deadline <= now {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// One request in flight on a connection; dropped when its response body is done.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.served_any.store(true, Ordering::Release);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        let ms = u64::try_from(a.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        a.idle_since_ms.store(ms, Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// The response body as sent: counts bytes for the access log, writes the log line when
    /// the body ends (or is dropped, when the client went away) and keeps the connection
    /// marked busy until then.
    struct ServedBody {
        #[pin]
        inner: Body,
        log: RequestLog,
        _in_flight: InFlight,
    }
}

impl HttpBody for ServedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.log.bytes += data.len() as u64;
                }
            }
            Some(Err(_)) | None => this.log.finish(),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(peer: &str) -> ConnInfo {
        ConnInfo {
            peer: peer.parse().unwrap(),
            local: "127.0.0.1:80".parse().unwrap(),
            tls: false,
        }
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn client_ip_is_right_most_untrusted() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let h = xff(&["6.6.6.6, 1.2.3.4", "10.0.0.2"]);
        // Untrusted peer: its own address, whatever the header says.
        assert_eq!(
            client_ip(&h, conn("9.9.9.9:1"), &trusted),
            "9.9.9.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_ip(&h, conn("10.0.0.1:1"), &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        // All trusted: the left-most.
        let h = xff(&["10.1.1.1, 10.0.0.2"]);
        assert_eq!(
            client_ip(&h, conn("10.0.0.1:1"), &trusted),
            "10.1.1.1".parse::<IpAddr>().unwrap()
        );
        // Garbage stops the walk at the last good hop.
        let h = xff(&["1.1.1.1, garbage, 10.0.0.3"]);
        assert_eq!(
            client_ip(&h, conn("10.0.0.1:1"), &trusted),
            "10.0.0.3".parse::<IpAddr>().unwrap()
        );
        // Ports and brackets, IPv4-mapped IPv6 peers.
        let h = xff(&["[2001:db8::1]:443"]);
        assert_eq!(
            client_ip(&h, conn("[::ffff:10.0.0.1]:1"), &trusted),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
    }
}

/// How a small internal HTTP/1.1 server (the admin listener, the CRM simulator) serves.
#[derive(Debug, Clone, Copy)]
pub struct InternalServer {
    /// Names the server in logs (`admin`, `crm-sim`).
    pub name: &'static str,
    /// Open connections at most; further ones wait in the accept backlog.
    pub max_connections: usize,
    /// A client must send its request head within this time.
    pub header_read_timeout: Duration,
    /// After `stop`, open connections get this long to finish, then they are cut.
    pub stop_grace: Duration,
}

impl InternalServer {
    /// Serve `handle` on `listener` until `stop`, then drain (see [`InternalServer`]).
    pub async fn serve<F, Fut>(self, listener: TcpListener, handle: F, stop: CancellationToken)
    where
        F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = hyper::Response<Body>> + Send + 'static,
    {
        let slots = Arc::new(Semaphore::new(self.max_connections.max(1)));
        let connections = TaskTracker::new();
        let cut = CancellationToken::new();
        loop {
            let permit = tokio::select! {
                () = stop.cancelled() => break,
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let (stream, peer) = tokio::select! {
                () = stop.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Out of descriptors and the like: pause rather than spin.
                        tracing::warn!(server = self.name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let handle = handle.clone();
            let (stop, cut) = (stop.clone(), cut.clone());
            connections.spawn(async move {
                self.connection(stream, peer, handle, stop, cut).await;
                drop(permit);
            });
        }
        connections.close();
        if tokio::time::timeout(self.stop_grace, connections.wait())
            .await
            .is_err()
        {
            cut.cancel();
            connections.wait().await;
        }
    }

    async fn connection<F, Fut>(
        self,
        stream: TcpStream,
        peer: SocketAddr,
        handle: F,
        stop: CancellationToken,
        cut: CancellationToken,
    ) where
        F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = hyper::Response<Body>> + Send + 'static,
    {
        let service = service_fn(move |req| {
            let answer = handle(req);
            async move { Ok::<_, Infallible>(answer.await) }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout);
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        tokio::pin!(conn);
        let mut closing = false;
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(server = self.name, %peer, error = %e, "connection ended");
                    }
                    return;
                }
                () = stop.cancelled(), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                () = cut.cancelled() => return,
            }
        }
    }
}
