//! Pass-through stage: forward a request that is not a webhook to its site's upstream and
//! stream the answer back.
//!
//! A request meets these phases, in this order, each a small function below (pingora style):
//!
//! ```text
//!  route             lib.rs `Gateway::handle`: Host -> site (421 if none); webhook? -> front door
//!    │
//!  request_headers   hop-by-hop headers out (Upgrade kept for upgrades), X-Forwarded-For/
//!    │               -Proto/-Host, Via; Host kept; URI rewritten to the site's upstream only
//!  forward           pooled keep-alive connection (http/https, [`UpstreamPool`]), HTTP/1.1
//!    │               upstream; connect timeout, response-header timeout (504), unreachable (502)
//!  response_headers  hop-by-hop headers out (kept on 101), Via
//!    │
//!  tunnel            on 101: splice client and upstream byte streams until either side closes
//!    │
//!  log               server.rs: one `access` line and the request's metrics when the response
//!                    body ends ([`RequestLog`])
//! ```
//!
//! Bodies stream both ways: nothing is buffered beyond hyper's read buffers, so a 1 GiB upload
//! or download costs no more memory than a 1 KiB one. Header maps are edited in place.

use std::fmt;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::ConfigBuilderExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, SiteConfig};
use crate::server::{is_trusted, ConnInfo};
use crate::{Body, BoxError};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), removed in both
/// directions. `Upgrade` is put back for upgrade requests and 101 answers.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

pub type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// Why a request could not be forwarded; [`ProxyError::into_response`] is the one place these
/// become HTTP answers.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The upstream could not be reached (refused, reset, DNS, TLS), or the connection failed
    /// before the response headers.
    #[error("upstream unreachable: {0}")]
    Unreachable(#[source] BoxError),
    /// Connecting took longer than `upstream_connect_timeout`.
    #[error("upstream connect timed out")]
    ConnectTimeout,
    /// No response headers within `upstream_timeout` after the request was sent.
    #[error("upstream response timed out")]
    ResponseTimeout,
    /// The upstream answered something a proxy cannot pass on (an unsolicited 101).
    #[error("bad upstream answer: {0}")]
    BadUpstream(&'static str),
    /// The request cannot be expressed towards the upstream (CONNECT, `*` target).
    #[error("request not forwardable: {0}")]
    NotForwardable(&'static str),
    /// The TLS client configuration could not be built.
    #[error("tls client config: {0}")]
    Tls(#[from] rustls::Error),
}

impl ProxyError {
    /// The answer the client gets.
    pub fn into_response(self) -> Response<Body> {
        let status = match self {
            ProxyError::Unreachable(_) | ProxyError::BadUpstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::ConnectTimeout | ProxyError::ResponseTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::NotForwardable(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Tls(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        error_page(status)
    }
}

/// The connector every upstream client uses: plain HTTP or HTTPS (rustls, webpki roots), HTTP/1.1,
/// with `connect_timeout` and TCP keep-alive. Shared by the pass-through proxy and relay mode.
pub fn upstream_connector(connect_timeout: Duration) -> Result<Connector, rustls::Error> {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_webpki_roots()
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http))
}

/// The pass-through proxy: pooled upstream connections and the trust list for forwarding
/// headers.
pub struct Proxy {
    /// One pool per distinct connect timeout (usually exactly one): the timeout lives in the
    /// connector, and sharing a pool shares its keep-alive connections.
    pools: Vec<(Duration, Arc<UpstreamPool>)>,
    trusted_proxies: Box<[IpNet]>,
    /// Cancelled by [`Proxy::close_tunnels`] once the server has drained.
    tunnels: CancellationToken,
}

impl Proxy {
    /// Build the upstream clients for every site.
    pub fn new(config: &Config) -> Result<Self, ProxyError> {
        let mut pools: Vec<(Duration, Arc<UpstreamPool>)> = Vec::new();
        for site in &config.sites {
            let timeout = site.upstream_connect_timeout;
            if pools.iter().any(|(t, _)| *t == timeout) {
                continue;
            }
            let pool = UpstreamPool::new(
                upstream_connector(timeout)?,
                UPSTREAM_IDLE_TIMEOUT,
                crate::server::serving_threads(),
            );
            pools.push((timeout, Arc::new(pool)));
        }
        Ok(Proxy {
            pools,
            trusted_proxies: config.server.trusted_proxies.clone().into_boxed_slice(),
            tunnels: CancellationToken::new(),
        })
    }

    /// Close every spliced upgrade tunnel (after the server's drain).
    pub fn close_tunnels(&self) {
        self.tunnels.cancel();
    }

    /// Forward one request to the site's upstream and stream the answer back. Never fails:
    /// errors become short HTML pages (502, 504, 405).
    pub async fn forward(
        &self,
        site: &SiteConfig,
        req: Request<Incoming>,
        conn: ConnInfo,
        log: &mut RequestLog,
    ) -> Response<Body> {
        match self.forward_inner(site, req, conn, log).await {
            Ok(resp) => resp,
            Err(e) => {
                if matches!(e, ProxyError::NotForwardable(_)) {
                    tracing::debug!(site = %site.name, error = %e, "request refused");
                } else {
                    tracing::warn!(
                        site = %site.name,
                        upstream = %site.upstream,
                        error = %e,
                        "pass-through failed"
                    );
                }
                e.into_response()
            }
        }
    }

    async fn forward_inner(
        &self,
        site: &SiteConfig,
        mut req: Request<Incoming>,
        conn: ConnInfo,
        log: &mut RequestLog,
    ) -> Result<Response<Body>, ProxyError> {
        let upgrade = request_headers(&mut req, site, conn, &self.trusted_proxies)?;
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

        let started = Instant::now();
        let mut resp = self.forward_phase(site, req).await?;
        log.upstream = Some(started.elapsed());

        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        let version = resp.version();
        response_headers(resp.headers_mut(), version, switching && upgrade);
        if switching {
            let Some(client_upgrade) = client_upgrade else {
                // 101 to a request that did not ask for an upgrade: nothing to splice.
                return Err(ProxyError::BadUpstream("unsolicited 101"));
            };
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            spawn_tunnel(client_upgrade, upstream_upgrade, self.tunnels.clone());
            return Ok(resp.map(|_| crate::empty_body()));
        }
        Ok(resp.map(|body| body.map_err(|e| Box::new(e) as BoxError).boxed()))
    }

    /// Forward phase: send on a pooled connection; the response-header timeout starts once the
    /// request body has been sent, so a long upload is not mistaken for a silent upstream.
    async fn forward_phase(
        &self,
        site: &SiteConfig,
        req: Request<Incoming>,
    ) -> Result<Response<PooledBody>, ProxyError> {
        let pool = self
            .pools
            .iter()
            .find(|(t, _)| *t == site.upstream_connect_timeout)
            .or_else(|| self.pools.first())
            .map(|(_, p)| p)
            .ok_or(ProxyError::NotForwardable("no upstream client"))?;
        let (req, body_sent) = UpstreamBody::wrap(req);
        let response = pool.send(site, req);
        let deadline = async {
            if let Some(sent) = body_sent {
                // Err means the body was dropped: sent (hyper stops at the declared length) or
                // abandoned (then `response` fails first).
                let _ = sent.await;
            }
            tokio::time::sleep(site.upstream_timeout).await;
        };
        tokio::select! {
            biased;
            resp = response => resp,
            () = deadline => Err(ProxyError::ResponseTimeout),
        }
    }
}

/// How long an idle upstream connection stays in the pool.
const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Which upstream a pooled connection talks to.
type PoolKey = (http::uri::Scheme, http::uri::Authority);

/// Keep-alive HTTP/1.1 connections to the upstreams, idle ones kept per upstream.
///
/// Why not hyper-util's legacy `Client`: per request it builds a pool key, races a checkout
/// against a lazy connect, and, because our response bodies stream, spawns a task per request
/// that waits for the connection to be ready again before pooling it. Here a connection goes
/// back to the pool when its response body has been read to the end ([`PooledBody`]), and the
/// next request waits for it to be ready; that saves a task and a pool round per request.
///
/// The idle connections are kept in one shard per serving thread (see `server.rs`): a
/// connection's driver task runs on the thread that opened it, so a request that only takes
/// connections of its own thread never hands its work to another core, and the shard's lock
/// is never contended. A lent connection holds its shard, not the pool: the shard's reference
/// count is only ever touched by its own thread.
pub struct UpstreamPool {
    connector: Connector,
    /// Indexed by `server::serving_thread()` (modulo their number; 0 on other threads).
    shards: Box<[Arc<PoolShard>]>,
}

/// The idle connections of one serving thread.
struct PoolShard {
    idle_timeout: Duration,
    /// A plain mutex: it is held for a push or a pop, never across an await.
    idle: Mutex<IdleLists>,
}

/// Idle connections per upstream. A handful of upstreams at most: a list compared by key
/// beats hashing the key twice per request. Entries are never removed, so an index into
/// `upstreams` stays valid.
#[derive(Default)]
struct IdleLists {
    upstreams: Vec<(PoolKey, Vec<IdleConnection>)>,
}

struct IdleConnection {
    sender: http1::SendRequest<UpstreamBody>,
    since: Instant,
}

impl UpstreamPool {
    fn new(connector: Connector, idle_timeout: Duration, shards: usize) -> Self {
        UpstreamPool {
            connector,
            shards: (0..shards.max(1))
                .map(|_| {
                    Arc::new(PoolShard {
                        idle_timeout,
                        idle: Mutex::default(),
                    })
                })
                .collect(),
        }
    }

    /// Send `req` (origin-form target) to the site's upstream: on an idle connection when
    /// there is one, else on a new one. A request that a reused connection could not even
    /// start sending (the upstream had closed it meanwhile) is retried on another connection.
    async fn send(
        &self,
        site: &SiteConfig,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<PooledBody>, ProxyError> {
        let thread = crate::server::serving_thread().unwrap_or(0);
        // `shards` is never empty (`new`), so the modulo is defined and the index in range.
        let shard = &self.shards[thread % self.shards.len()];
        let upstream = shard.slot(&site.upstream.scheme, &site.upstream.authority);
        loop {
            let (mut sender, reused) = match shard.checkout(upstream) {
                Some(sender) => (sender, true),
                // Boxed: connecting (TLS state included) is by far the largest part of this
                // future, and rare; unboxed, every request would move it around.
                None => (Box::pin(self.connect(&site.upstream)).await?, false),
            };
            if let Err(e) = sender.ready().await {
                if reused {
                    continue;
                }
                return Err(ProxyError::Unreachable(Box::new(e)));
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    // After a 101 the socket belongs to the tunnel, never to the pool.
                    let conn = (resp.status() != StatusCode::SWITCHING_PROTOCOLS).then(|| {
                        PooledConnection {
                            shard: shard.clone(),
                            upstream,
                            sender,
                        }
                    });
                    return Ok(resp.map(|inner| PooledBody {
                        inner,
                        conn,
                        ended: false,
                    }));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(ProxyError::Unreachable(Box::new(e.into_error()))),
                },
            }
        }
    }

    /// A new connection (connect timeout and TLS in the connector), driven by its own task
    /// until either side closes it; upgrades (101) hand the socket over to the tunnel.
    async fn connect(
        &self,
        upstream: &crate::config::Upstream,
    ) -> Result<http1::SendRequest<UpstreamBody>, ProxyError> {
        use tower_service::Service;
        let uri = Uri::builder()
            .scheme(upstream.scheme.clone())
            .authority(upstream.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|_| ProxyError::NotForwardable("upstream"))?;
        let stream = self
            .connector
            .clone()
            .call(uri)
            .await
            .map_err(classify_connect_error)?;
        let (sender, connection) = http1::Builder::new()
            .handshake(stream)
            .await
            .map_err(|e| ProxyError::Unreachable(Box::new(e)))?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }
}

impl PoolShard {
    fn lists(&self) -> std::sync::MutexGuard<'_, IdleLists> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The index of an upstream's idle list, made on first use.
    fn slot(&self, scheme: &http::uri::Scheme, authority: &Authority) -> usize {
        let mut lists = self.lists();
        let found = lists
            .upstreams
            .iter()
            .position(|((s, a), _)| s == scheme && a == authority);
        found.unwrap_or_else(|| {
            lists
                .upstreams
                .push(((scheme.clone(), authority.clone()), Vec::new()));
            lists.upstreams.len() - 1
        })
    }

    /// The most recently used idle connection to `upstream` that is still open and not stale.
    fn checkout(&self, upstream: usize) -> Option<http1::SendRequest<UpstreamBody>> {
        let mut lists = self.lists();
        let (_, list) = lists.upstreams.get_mut(upstream)?;
        while let Some(conn) = list.pop() {
            if !conn.sender.is_closed() && conn.since.elapsed() < self.idle_timeout {
                return Some(conn.sender);
            }
        }
        None
    }

    fn put_back(&self, upstream: usize, sender: http1::SendRequest<UpstreamBody>) {
        if sender.is_closed() {
            return;
        }
        let mut lists = self.lists();
        let Some((_, list)) = lists.upstreams.get_mut(upstream) else {
            return;
        };
        // The list is in the order the connections came back (taken from the end), so the
        // oldest are at the front, and they may never be taken: drop those idle for too long.
        // Connections the upstream closed meanwhile are dropped when taken, or with age;
        // checking each of them here cost a cache miss per idle connection per request.
        let now = Instant::now();
        let stale = list
            .iter()
            .take_while(|c| now - c.since >= self.idle_timeout)
            .count();
        list.drain(..stale);
        list.push(IdleConnection { sender, since: now });
    }
}

/// Connect timeouts (io `TimedOut` in the source chain) are 504s; every other failure to
/// connect is a 502.
fn classify_connect_error(err: BoxError) -> ProxyError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err.as_ref());
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return ProxyError::ConnectTimeout;
            }
        }
        source = e.source();
    }
    ProxyError::Unreachable(err)
}

/// A connection lent to one request, returned to its pool shard by [`PooledBody`].
struct PooledConnection {
    shard: Arc<PoolShard>,
    upstream: usize,
    sender: http1::SendRequest<UpstreamBody>,
}

/// The upstream's response body. When it is dropped after its end was reached, the connection
/// goes back to the pool; dropped earlier (client gone, error, or a 101 whose socket became a
/// tunnel), the connection is let go with it.
pub struct PooledBody {
    inner: Incoming,
    conn: Option<PooledConnection>,
    ended: bool,
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            None => self.ended = true,
            Some(Err(_)) => self.conn = None,
            Some(Ok(_)) => {}
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

impl Drop for PooledBody {
    fn drop(&mut self) {
        // hyper stops polling a body once `is_end_stream` says so: that counts as the end too.
        if self.ended || self.inner.is_end_stream() {
            if let Some(conn) = self.conn.take() {
                conn.shard.put_back(conn.upstream, conn.sender);
            }
        }
    }
}

/// Request-headers phase, in place. Returns whether this is an upgrade request (WebSocket)
/// whose `Connection: upgrade` and `Upgrade` headers were kept.
fn request_headers(
    req: &mut Request<Incoming>,
    site: &SiteConfig,
    conn: ConnInfo,
    trusted_proxies: &[IpNet],
) -> Result<bool, ProxyError> {
    if req.method() == Method::CONNECT {
        // A reverse proxy never opens tunnels to arbitrary authorities.
        return Err(ProxyError::NotForwardable("CONNECT"));
    }
    let version = req.version();
    // Only the configured upstream, whatever the request target said (absolute-form included).
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    if path.as_str() == "*" {
        return Err(ProxyError::NotForwardable("asterisk-form"));
    }
    let authority = req.uri().authority().cloned();
    // Origin-form: the upstream connection is chosen by the site (forward phase), not by the
    // request target.
    *req.uri_mut() = Uri::from(path);
    *req.version_mut() = Version::HTTP_11;

    let headers = req.headers_mut();
    let upgrade = remove_hop_by_hop(headers, version == Version::HTTP_11);
    // The upstream answers the client's expectation through us; hyper already sent 100.
    headers.remove(header::EXPECT);

    // Host preserved. HTTP/2 carries it as :authority; the HTTP/1.1 upstream needs a header.
    if !headers.contains_key(header::HOST) {
        // An HTTP/1.0 request may have none at all; HTTP/1.1 requires one: the upstream's.
        let host = authority.as_ref().unwrap_or(&site.upstream.authority);
        if let Ok(host) = HeaderValue::from_str(host.as_str()) {
            headers.insert(header::HOST, host);
        }
    }
    if version == Version::HTTP_2 {
        join_cookies(headers);
    }

    let peer = conn.peer.ip().to_canonical();
    let trusted = is_trusted(peer, trusted_proxies);
    set_forwarded_for(headers, peer, trusted);
    if !(trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        let proto = if conn.tls { "https" } else { "http" };
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !(trusted && headers.contains_key(&X_FORWARDED_HOST)) {
        match headers.get(header::HOST).cloned() {
            Some(host) => headers.insert(X_FORWARDED_HOST, host),
            None => headers.remove(X_FORWARDED_HOST),
        };
    }
    headers.append(header::VIA, via_value(version));
    Ok(upgrade)
}

/// Response-headers phase, in place: hop-by-hop headers out (the upgrade pair kept on a 101 to
/// an upgrade request), our `Via` appended.
fn response_headers(headers: &mut HeaderMap, version: Version, keep_upgrade: bool) {
    let upgrade = remove_hop_by_hop(headers, keep_upgrade);
    if keep_upgrade && !upgrade {
        // Upstream switched without naming the protocol; the client cannot use the tunnel.
        headers.remove(header::UPGRADE);
    }
    headers.append(header::VIA, via_value(version));
}

/// Remove the hop-by-hop headers and every header the `Connection` header names. When
/// `allow_upgrade` and the message is an upgrade (`Connection: upgrade` + `Upgrade`), keeps
/// `Upgrade` and sets `Connection: upgrade`; returns whether it did.
fn remove_hop_by_hop(headers: &mut HeaderMap, allow_upgrade: bool) -> bool {
    let mut upgrade = false;
    // Index-based walk over the Connection values: cloning a HeaderValue only bumps a
    // reference count, and nothing is collected.
    let mut index = 0;
    while let Some(value) = headers
        .get_all(header::CONNECTION)
        .iter()
        .nth(index)
        .cloned()
    {
        index += 1;
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',').map(str::trim) {
            if token.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            } else if !token.eq_ignore_ascii_case("close")
                && !token.eq_ignore_ascii_case("keep-alive")
                && !token.eq_ignore_ascii_case("connection")
            {
                // `&str` keys never panic: an invalid name simply matches nothing.
                headers.remove(token);
            }
        }
    }
    let upgrade = allow_upgrade && upgrade && headers.contains_key(header::UPGRADE);
    let kept = if upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if let Some(protocol) = kept {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
    upgrade
}

/// Exactly one `X-Forwarded-For`: the client's chain plus the peer when the peer is a trusted
/// proxy, else only the peer (a client cannot forge its own address).
fn set_forwarded_for(headers: &mut HeaderMap, peer: IpAddr, trusted: bool) {
    use std::io::Write;
    let mut buf = Vec::with_capacity(64);
    if trusted {
        for value in headers.get_all(&X_FORWARDED_FOR) {
            let value = trim_ascii(value.as_bytes());
            if value.is_empty() {
                continue;
            }
            buf.extend_from_slice(value);
            buf.extend_from_slice(b", ");
        }
    }
    // Writing to a Vec cannot fail.
    let _ = write!(buf, "{peer}");
    match HeaderValue::from_maybe_shared(Bytes::from(buf)) {
        Ok(value) => {
            headers.insert(X_FORWARDED_FOR, value);
        }
        // Only reachable with control bytes in a trusted proxy's header: fall back to the peer.
        Err(_) => {
            let mut peer_only = Vec::with_capacity(40);
            let _ = write!(peer_only, "{peer}");
            match HeaderValue::from_maybe_shared(Bytes::from(peer_only)) {
                Ok(value) => headers.insert(X_FORWARDED_FOR, value),
                Err(_) => headers.remove(X_FORWARDED_FOR),
            };
        }
    }
}

fn trim_ascii(mut b: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = b {
        if first.is_ascii_whitespace() || *first == b',' {
            b = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = b {
        if last.is_ascii_whitespace() || *last == b',' {
            b = rest;
        } else {
            break;
        }
    }
    b
}

/// HTTP/2 may split `Cookie` into several fields; an HTTP/1.1 upstream expects one, joined
/// with "; " (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (values.next(), values.next()) else {
        return;
    };
    let mut joined = Vec::with_capacity(first.len() * 2);
    for (i, v) in headers.get_all(header::COOKIE).iter().enumerate() {
        if i > 0 {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from(joined)) {
        headers.insert(header::COOKIE, value);
    }
}

/// `Via` names the protocol version the message was received with.
fn via_value(version: Version) -> HeaderValue {
    HeaderValue::from_static(match version {
        Version::HTTP_09 => "0.9 wpf-gateway",
        Version::HTTP_10 => "1.0 wpf-gateway",
        Version::HTTP_2 => "2 wpf-gateway",
        Version::HTTP_3 => "3 wpf-gateway",
        _ => "1.1 wpf-gateway",
    })
}

/// Tunnel phase: once both sides have switched protocols, copy bytes both ways until either
/// side closes (or the gateway stops).
fn spawn_tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let (client, upstream) = tokio::join!(client, upstream);
        let (Ok(client), Ok(upstream)) = (client, upstream) else {
            return;
        };
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        tokio::select! {
            result = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                if let Ok((up, down)) = result {
                    tracing::debug!(up, down, "tunnel closed");
                }
            }
            () = stop.cancelled() => {}
        }
    });
}

pin_project_lite::pin_project! {
    /// The client's request body on its way upstream; tells the forward phase when it has been
    /// sent completely, so the response-header timeout can start.
    pub struct UpstreamBody {
        #[pin]
        inner: Incoming,
        sent: Option<oneshot::Sender<()>>,
    }
}

impl UpstreamBody {
    fn wrap(req: Request<Incoming>) -> (Request<UpstreamBody>, Option<oneshot::Receiver<()>>) {
        let (parts, inner) = req.into_parts();
        // Bodiless requests (most GETs) start the timer at once and need no channel.
        let (sent, receiver) = if inner.is_end_stream() {
            (None, None)
        } else {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        };
        (
            Request::from_parts(parts, UpstreamBody { inner, sent }),
            receiver,
        )
    }
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) {
            if let Some(sent) = this.sent.take() {
                let _ = sent.send(());
            }
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

/// Log phase: what the access line says about one request. Filled in as the request moves
/// through the phases; written once, when the response body ends or is dropped (a client
/// that went away before the answer is logged with status 499). This is also the one place
/// a request is counted in the metrics: the status is final here.
pub struct RequestLog {
    enabled: bool,
    start: Instant,
    method: Method,
    uri: Uri,
    client: Option<IpAddr>,
    /// The request series of the site the request was routed to (or of unrouted requests);
    /// also names the site in the access line.
    pub site: Option<crate::SiteRef>,
    /// Time from sending the request upstream to its response headers.
    pub upstream: Option<Duration>,
    /// The status sent to the client (0 until known).
    pub status: u16,
    /// Response body bytes sent.
    pub bytes: u64,
    written: bool,
}

impl RequestLog {
    /// Start timing a request. With `enabled` false nothing is copied and nothing is logged.
    pub fn start<B>(
        req: &Request<B>,
        conn: ConnInfo,
        trusted_proxies: &[IpNet],
        enabled: bool,
    ) -> Self {
        let (method, uri, client) = if enabled {
            (
                req.method().clone(),
                req.uri().clone(),
                Some(crate::server::client_ip(
                    req.headers(),
                    conn,
                    trusted_proxies,
                )),
            )
        } else {
            (Method::GET, Uri::default(), None)
        };
        RequestLog {
            enabled,
            start: Instant::now(),
            method,
            uri,
            client,
            site: None,
            upstream: None,
            status: 0,
            bytes: 0,
            written: false,
        }
    }

    /// Count the request and write the access line (once).
    pub fn finish(&mut self) {
        if self.written {
            return;
        }
        self.written = true;
        let status = if self.status == 0 { 499 } else { self.status };
        if let Some(site) = &self.site {
            site.counters().count(status, self.upstream);
        }
        if !self.enabled {
            return;
        }
        tracing::info!(
            target: "access",
            site = self.site.as_ref().map_or("-", |s| s.counters().site()),
            client = %OptionDisplay(self.client),
            method = %self.method,
            path = %RedactedTarget(&self.uri),
            status,
            bytes = self.bytes,
            duration_ms = %Millis(Some(self.start.elapsed())),
            upstream_ms = %Millis(self.upstream),
        );
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        self.finish();
    }
}

struct OptionDisplay<T>(Option<T>);

impl<T: fmt::Display> fmt::Display for OptionDisplay<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

struct Millis(Option<Duration>);

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(d) => write!(f, "{:.3}", d.as_secs_f64() * 1000.0),
            None => f.write_str("-"),
        }
    }
}

/// A request target for logs: path and query with the value of every `access_key` parameter
/// replaced by `***`.
pub struct RedactedTarget<'a>(pub &'a Uri);

impl fmt::Display for RedactedTarget<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.path())?;
        let Some(query) = self.0.query() else {
            return Ok(());
        };
        f.write_str("?")?;
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                f.write_str("&")?;
            }
            let key = pair.split_once('=').map_or(pair, |(k, _)| k);
            if is_secret_param(key) {
                write!(f, "{key}=***")?;
            } else {
                f.write_str(pair)?;
            }
        }
        Ok(())
    }
}

/// Is this query key (still encoded) the access key, as PHP on the site would read it? Case
/// is ignored as well: redacting too much in a log costs nothing.
pub(crate) fn is_secret_param(raw_key: &str) -> bool {
    crate::route::php_key_is(&raw_key.to_ascii_lowercase(), "access_key")
}

/// A short HTML error page.
pub fn error_page(status: StatusCode) -> Response<Body> {
    let reason = status.canonical_reason().unwrap_or("Error");
    let html = format!(
        "<!doctype html><html><head><title>{code} {reason}</title></head>\
         <body><h1>{code} {reason}</h1><p>wpf-gateway</p></body></html>\n",
        code = status.as_u16()
    );
    let mut resp = Response::new(crate::full_body(html));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redact(uri: &str) -> String {
        RedactedTarget(&uri.parse().unwrap()).to_string()
    }

    #[test]
    fn access_key_values_are_redacted() {
        assert_eq!(
            redact("/?x=1&access_key=SECRET&y=2"),
            "/?x=1&access_key=***&y=2"
        );
        assert_eq!(redact("/p?access%5Fkey=S"), "/p?access%5Fkey=***");
        assert_eq!(redact("/p?ACCESS.KEY=S"), "/p?ACCESS.KEY=***");
        assert_eq!(redact("/p?access_key[]=S"), "/p?access_key[]=***");
        assert_eq!(redact("/p?access_keys=S"), "/p?access_keys=S");
        assert_eq!(redact("/p"), "/p");
        assert_eq!(redact("/p?access_key"), "/p?access_key=***");
    }

    #[test]
    fn connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, X-Foo".parse().unwrap());
        h.append(header::CONNECTION, "x-bar".parse().unwrap());
        h.insert("x-foo", "1".parse().unwrap());
        h.insert("x-bar", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        assert!(!remove_hop_by_hop(&mut h, true));
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn upgrade_is_kept_for_upgrades_only() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "Upgrade".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        assert!(remove_hop_by_hop(&mut h.clone(), true));
        let mut no = h.clone();
        assert!(!remove_hop_by_hop(&mut no, false));
        assert!(no.is_empty());
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn forwarded_for_is_one_header() {
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, "1.1.1.1".parse().unwrap());
        h.append(&X_FORWARDED_FOR, " 2.2.2.2, ".parse().unwrap());
        let mut trusted = h.clone();
        set_forwarded_for(&mut trusted, peer, true);
        assert_eq!(trusted.get_all(&X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(trusted[&X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 10.0.0.1");
        set_forwarded_for(&mut h, peer, false);
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1");
    }

    #[test]
    fn h2_cookies_are_joined() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "a=1".parse().unwrap());
        h.append(header::COOKIE, "b=2".parse().unwrap());
        join_cookies(&mut h);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(h[header::COOKIE], "a=1; b=2");
    }
}
