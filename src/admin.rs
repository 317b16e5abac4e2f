//! Admin listener (`[admin] listen`, loopback unless a token is set): health, Prometheus
//! metrics, the status page and the JSON API. HTTP/1.1 on its own small router, apart from the
//! site traffic: nothing here is reachable through the public listeners.
//!
//! ```text
//! GET  /healthz                        200 "ok": the process is up            (no auth)
//! GET  /readyz                         200 ready | 503 starting / draining    (no auth)
//! GET  /metrics                        Prometheus text (see `metrics`)
//! GET  /                               status page (HTML, no JavaScript, no external assets)
//! POST /jobs/{id}/replay               the page's Replay button: form, CSRF token, 303 to /
//! GET  /api/activity?site=&contact=&outcome=&limit=
//! GET  /api/jobs?state=&limit=
//! POST /api/jobs/{id}/replay           200 {"ok":true,"replayed":true} | 404 not dead/failed
//! POST /api/locks                      JSON {"site","contact_id","ttl"}
//! DELETE /api/locks/{site}/{contact}
//! ```
//!
//! **Sites.** Those of the running configuration, read from the gateway's current routing on
//! each request: after a reload the page, the `site` filters and the lock endpoints know the
//! new list, and a name it dropped is `404 unknown_site`.
//!
//! **Who may ask.** With `token_file`, every path but `/healthz` and `/readyz` needs
//! `Authorization: Bearer TOKEN`. A browser opens `/?token=TOKEN` once: the answer is a 303 to
//! `/` that sets an `HttpOnly; SameSite=Strict` cookie holding a random per-process session
//! value (never the token itself), good for every `GET` and for the page's Replay form until
//! the gateway restarts. The JSON API's `POST`/`DELETE` accept only the bearer header.
//! Without a token (loopback only, config check enforces it) the `Host` header must be an IP
//! address or `localhost`, so a DNS-rebinding page cannot reach the API through a browser.
//!
//! **CSRF.** Every `POST`/`DELETE` whose `Origin` (or else `Referer`) names another host than
//! `Host` is refused (403); the page's Replay form also carries a random per-process token
//! (OS RNG) checked in constant time, and `POST /api/locks` must be `application/json` (a
//! cross-site form cannot send that without a CORS preflight, which is never granted).
//!
//! Secrets stay out: jobs and activity lines hold no access key (the front door strips it),
//! the admin token is only ever compared, and every CRM-controlled value is HTML-escaped.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{
    ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, COOKIE, HOST, LOCATION, ORIGIN, REFERER,
    SET_COOKIE, WWW_AUTHENTICATE,
};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Secret, SiteConfig};
use crate::metrics::Metrics;
use crate::queue::{ActivityFilter, ActivityRow, ContactId, JobId, JobRow, SqliteQueue};
use crate::webhook::respond::escape_html;
use crate::{full_body, Body, Gateway};

/// Admin connections open at once; more wait in the accept backlog.
const MAX_CONNECTIONS: usize = 64;
/// A request head must arrive within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// On stop, open admin connections get this long to finish their request.
const STOP_GRACE: Duration = Duration::from_secs(1);
/// Largest request body read (the lock API's JSON, the replay form).
const MAX_BODY: usize = 16 * 1024;
/// Upstream reachability is checked at most this often per site.
const REACH_TTL: Duration = Duration::from_secs(10);
/// Longest wait for an upstream TCP connect in the reachability check.
const REACH_TIMEOUT: Duration = Duration::from_secs(2);
/// Activity lines on the status page.
const PAGE_ACTIVITY: u32 = 100;
/// Dead (and failed) jobs listed on the status page, each.
const PAGE_JOBS: u32 = 100;
/// Default and largest `limit` of the JSON API.
const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;
/// Longest lock the API sets (as the site's lock endpoint).
const MAX_LOCK_TTL: Duration = Duration::from_secs(3600);
/// The browser session cookie.
const COOKIE_NAME: &str = "wpf_admin";
/// Activity outcomes the queue and the front door record.
const OUTCOMES: [&str; 10] = [
    "queued",
    "coalesced",
    "duplicate",
    "locked",
    "rate_limited",
    "done",
    "retry",
    "failed",
    "dead",
    "replay",
];
/// Job states.
const STATES: [&str; 5] = ["pending", "running", "done", "failed", "dead"];

/// Why the admin listener cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot read token_file {}: {error}", path.display())]
    TokenFile {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("token_file {} is empty", .0.display())]
    EmptyToken(PathBuf),
    #[error("no random numbers from the OS: {0}")]
    Random(String),
}

/// An admin request refused or failed: the one error type of this module. [`Route::refuse`]
/// turns it into the answer the route speaks (JSON for the API, HTML for the page, text for
/// the rest).
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Refusal::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl From<crate::queue::QueueError> for Refusal {
    fn from(e: crate::queue::QueueError) -> Self {
        tracing::warn!(error = %e, "admin: queue error");
        Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "queue_unavailable",
            "the queue cannot answer right now; try again",
        )
    }
}

type Answer = Result<Response<Body>, Refusal>;

/// What `/readyz` reports: set by `run_with` (ready once everything is bound and open,
/// draining from the moment shutdown begins).
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
    draining: AtomicBool,
}

impl Health {
    /// Listeners are bound and the queue is open (or not any more).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Shutdown began: not ready again in this process.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// `ready`, `starting` or `draining`.
    pub fn state(&self) -> &'static str {
        if self.draining.load(Ordering::Acquire) {
            "draining"
        } else if self.ready.load(Ordering::Acquire) {
            "ready"
        } else {
            "starting"
        }
    }
}

/// The admin listener's shared state.
pub struct Admin {
    queue: Arc<SqliteQueue>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// Its current routing holds the sites: a reload swaps that, and every admin request reads
    /// the list afresh, so the page and the API never lag behind what requests are routed to.
    gateway: Arc<Gateway>,
    token: Option<Secret>,
    /// Value of the browser session cookie (random per process).
    session: Secret,
    /// The Replay form's CSRF token (random per process).
    csrf: Secret,
    reach: tokio::sync::Mutex<HashMap<String, Reach>>,
}

/// The last reachability check of a site's upstream.
#[derive(Debug, Clone)]
struct Reach {
    /// The upstream checked: a reload that changes it makes the result stale at once.
    upstream: String,
    checked: Instant,
    error: Option<String>,
}

/// 32 bytes from the OS RNG, as hex.
fn random_hex() -> Result<Secret, AdminError> {
    use rand::TryRngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| AdminError::Random(e.to_string()))?;
    let mut hex = String::with_capacity(64);
    for b in bytes {
        let _ = write!(hex, "{b:02x}");
    }
    Ok(Secret::new(hex))
}

fn ct_eq(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

impl Admin {
    /// Read the token file (if any) and draw the session and CSRF values. The sites are those
    /// of `gateway`'s current routing, whichever configuration that is at the time of a request.
    pub fn new(
        config: &Config,
        gateway: Arc<Gateway>,
        queue: Arc<SqliteQueue>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Result<Arc<Self>, AdminError> {
        let token = match &config.admin.token_file {
            None => None,
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|error| AdminError::TokenFile {
                        path: path.clone(),
                        error,
                    })?;
                let token = text.trim();
                if token.is_empty() {
                    return Err(AdminError::EmptyToken(path.clone()));
                }
                Some(Secret::new(token))
            }
        };
        Ok(Arc::new(Admin {
            queue,
            metrics,
            health,
            gateway,
            token,
            session: random_hex()?,
            csrf: random_hex()?,
            reach: tokio::sync::Mutex::new(HashMap::new()),
        }))
    }

    /// Serve admin requests on `listener` until `stop`; then open connections get a short
    /// grace to finish and are cut.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        let server = crate::server::InternalServer {
            name: "admin",
            max_connections: MAX_CONNECTIONS,
            header_read_timeout: HEADER_READ_TIMEOUT,
            stop_grace: STOP_GRACE,
        };
        server
            .serve(listener, move |req| self.clone().handle(req), stop)
            .await;
    }

    /// Route one request: health first (no auth), then host, auth and origin checks.
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let Some((route, allowed)) = Route::parse(&path) else {
            return not_found(&path);
        };
        if !allowed.contains(req.method()) {
            return method_not_allowed(&route, allowed);
        }
        match self.answer(&route, req).await {
            Ok(resp) => resp,
            Err(refusal) => {
                let challenge = refusal.status == StatusCode::UNAUTHORIZED;
                let mut resp = route.refuse(refusal);
                if challenge {
                    resp.headers_mut().insert(
                        WWW_AUTHENTICATE,
                        HeaderValue::from_static("Bearer realm=\"wpf-gateway admin\""),
                    );
                }
                resp
            }
        }
    }

    async fn answer(&self, route: &Route, req: Request<Incoming>) -> Answer {
        match route {
            Route::Healthz => return Ok(text(StatusCode::OK, "ok\n")),
            Route::Readyz => return Ok(self.readyz().await),
            _ => {}
        }
        if self.token.is_none() && !local_host(req.headers()) {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "host_not_allowed",
                "without admin.token_file the admin listener answers only requests for an IP \
                 address or localhost",
            ));
        }
        if *route == Route::Page && self.token.is_some() {
            if let Some(token) = query_param(req.uri().query(), "token") {
                return self.log_in(&token);
            }
        }
        self.authorize(&req, route)?;
        let mutating = req.method() == Method::POST || req.method() == Method::DELETE;
        if mutating && !same_origin(req.headers()) {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "cross_origin",
                "Origin or Referer names another host than this admin listener",
            ));
        }
        let query = req.uri().query().map(str::to_owned);
        match route {
            Route::Healthz | Route::Readyz => Ok(text(StatusCode::OK, "ok\n")),
            Route::Metrics => Ok(self.metrics().await),
            Route::Page => Ok(self.page(query.as_deref()).await),
            Route::FormReplay(id) => self.form_replay(req, id).await,
            Route::Activity => self.api_activity(query.as_deref()).await,
            Route::Jobs => self.api_jobs(query.as_deref()).await,
            Route::ApiReplay(id) => self.api_replay(id).await,
            Route::Locks => self.api_lock(req).await,
            Route::Lock(site, contact) => self.api_unlock(site, contact).await,
        }
    }

    /// Bearer token (any route) or session cookie (GETs and the Replay form).
    fn authorize(&self, req: &Request<Incoming>, route: &Route) -> Result<(), Refusal> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let bearer = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if bearer.is_some_and(|given| ct_eq(given, token.expose())) {
            return Ok(());
        }
        let cookie_ok = req.method() == Method::GET || matches!(route, Route::FormReplay(_));
        if cookie_ok
            && cookie(req.headers(), COOKIE_NAME)
                .is_some_and(|given| ct_eq(given, self.session.expose()))
        {
            return Ok(());
        }
        Err(Refusal::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send Authorization: Bearer TOKEN (the token in admin.token_file); in a browser, \
             open /?token=TOKEN once",
        ))
    }

    /// `/?token=`: right token -> session cookie and 303 to `/` (the token leaves the address
    /// bar and the history); wrong -> 401.
    fn log_in(&self, given: &str) -> Answer {
        let ok = self
            .token
            .as_ref()
            .is_some_and(|token| ct_eq(given, token.expose()));
        if !ok {
            return Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the token is wrong",
            ));
        }
        let mut resp = see_other("/");
        let cookie = format!(
            "{COOKIE_NAME}={}; Path=/; HttpOnly; SameSite=Strict",
            self.session.expose()
        );
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            resp.headers_mut().insert(SET_COOKIE, value);
        }
        Ok(resp)
    }

    async fn readyz(&self) -> Response<Body> {
        match self.health.state() {
            "ready" => match self.queue.depth().await {
                Ok(_) => text(StatusCode::OK, "ready\n"),
                Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, &format!("{e}\n")),
            },
            state => text(StatusCode::SERVICE_UNAVAILABLE, &format!("{state}\n")),
        }
    }

    async fn metrics(&self) -> Response<Body> {
        match self.queue.count_by_state().await {
            Ok(by_state) => self.metrics.set_queue(&by_state, self.queue.locks_held()),
            Err(e) => tracing::warn!(error = %e, "metrics: queue depth unknown"),
        }
        let mut resp = Response::new(full_body(self.metrics.encode()));
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
        );
        resp
    }

    /// A site of the running configuration, or 404.
    fn known_site(&self, name: &str) -> Result<Arc<SiteConfig>, Refusal> {
        let routing = self.gateway.routing();
        let site = routing.router.sites().iter().find(|s| s.name == name);
        site.cloned().ok_or_else(|| {
            Refusal::new(
                StatusCode::NOT_FOUND,
                "unknown_site",
                format!("no site is named {name:?}"),
            )
        })
    }

    async fn api_activity(&self, query: Option<&str>) -> Answer {
        let params = Params::parse(query, &["site", "contact", "outcome", "limit"])?;
        let site = params.get("site");
        if let Some(site) = site {
            self.known_site(site)?;
        }
        let outcome = params.get("outcome");
        if outcome.is_some_and(|o| !OUTCOMES.contains(&o)) {
            return Err(Refusal::bad_request(
                "invalid_outcome",
                format!("outcome must be one of {}", OUTCOMES.join(", ")),
            ));
        }
        let filter = ActivityFilter {
            site: site.map(str::to_owned),
            contact: params.get("contact").map(str::to_owned),
            outcome: outcome.map(str::to_owned),
            limit: params.limit()?,
        };
        let rows = self.queue.activity(&filter).await?;
        Ok(json_ok(json!({"ok": true, "activity": rows})))
    }

    async fn api_jobs(&self, query: Option<&str>) -> Answer {
        let params = Params::parse(query, &["state", "limit"])?;
        let state = params.get("state");
        if state.is_some_and(|s| !STATES.contains(&s)) {
            return Err(Refusal::bad_request(
                "invalid_state",
                format!("state must be one of {}", STATES.join(", ")),
            ));
        }
        let rows = self.queue.jobs(state, params.limit()?).await?;
        Ok(json_ok(json!({"ok": true, "jobs": rows})))
    }

    async fn api_replay(&self, id: &str) -> Answer {
        let job = job_id(id)?;
        if self.queue.replay(job).await? {
            Ok(json_ok(json!({"ok": true, "replayed": true, "job": job.0})))
        } else {
            Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "not_replayable",
                format!("job {job} does not exist or is not dead or failed"),
            ))
        }
    }

    async fn api_lock(&self, req: Request<Incoming>) -> Answer {
        let is_json = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !is_json {
            return Err(Refusal::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the lock as Content-Type: application/json",
            ));
        }
        let body = read_body(req).await?;
        let value: Value = serde_json::from_slice(&body).map_err(|e| {
            Refusal::bad_request("malformed_body", format!("the body is not JSON: {e}"))
        })?;
        let site_name = value.get("site").and_then(Value::as_str).ok_or_else(|| {
            Refusal::bad_request("missing_site", "\"site\" (a string) is required")
        })?;
        let site = self.known_site(site_name)?;
        let raw_contact = match value.get("contact_id") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => {
                return Err(Refusal::bad_request(
                    "missing_contact_id",
                    "\"contact_id\" (a string or a number) is required",
                ))
            }
        };
        let contact = contact_id(&raw_contact)?;
        let ttl = match value.get("ttl") {
            None | Some(Value::Null) => site.loopback_lock,
            Some(v) => match v.as_u64() {
                Some(secs) if secs > 0 && secs <= MAX_LOCK_TTL.as_secs() => {
                    Duration::from_secs(secs)
                }
                _ => {
                    return Err(Refusal::bad_request(
                        "invalid_ttl",
                        "ttl must be a whole number of seconds, 1 to 3600",
                    ))
                }
            },
        };
        let site_name: Arc<str> = Arc::from(site.name.as_str());
        self.queue.lock(&site_name, &contact, ttl).await?;
        Ok(json_ok(json!({
            "ok": true,
            "site": site.name,
            "contact_id": contact.as_str(),
            "ttl": ttl.as_secs(),
        })))
    }

    async fn api_unlock(&self, site: &str, contact: &str) -> Answer {
        let site = self.known_site(site)?;
        let contact = contact_id(contact)?;
        let site_name: Arc<str> = Arc::from(site.name.as_str());
        let was = self.queue.unlock(&site_name, &contact).await?;
        Ok(json_ok(json!({
            "ok": true,
            "site": site.name,
            "contact_id": contact.as_str(),
            "unlocked": was,
        })))
    }

    /// The status page's Replay button: CSRF token checked, then 303 back to `/` with a
    /// notice of what happened.
    async fn form_replay(&self, req: Request<Incoming>, id: &str) -> Answer {
        let body = read_body(req).await?;
        let csrf = form_urlencoded::parse(&body)
            .find(|(k, _)| k == "csrf")
            .map(|(_, v)| v.into_owned());
        if !csrf.is_some_and(|given| ct_eq(&given, self.csrf.expose())) {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "csrf",
                "the form's CSRF token is missing or stale (the gateway restarted?): reload the \
                 status page and try again",
            ));
        }
        let job = job_id(id)?;
        Ok(if self.queue.replay(job).await? {
            see_other(&format!("/?replayed={}", job.0))
        } else {
            see_other(&format!("/?not_replayed={}", job.0))
        })
    }

    /// Each site's upstream: a TCP connect at most every [`REACH_TTL`], checked concurrently.
    async fn reachability(&self, sites: &[Arc<SiteConfig>]) -> HashMap<String, Reach> {
        let mut cache = self.reach.lock().await;
        // Sites a reload removed are forgotten.
        cache.retain(|name, _| sites.iter().any(|s| s.name == *name));
        let mut checks = tokio::task::JoinSet::new();
        for site in sites {
            let shown = site.upstream.to_string();
            let fresh = cache
                .get(&site.name)
                .is_some_and(|r| r.checked.elapsed() < REACH_TTL && r.upstream == shown);
            if fresh {
                continue;
            }
            let name = site.name.clone();
            let upstream = site.upstream.clone();
            let timeout = site.upstream_connect_timeout.min(REACH_TIMEOUT);
            checks.spawn(async move {
                let host = upstream
                    .authority
                    .host()
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned();
                let port = upstream.authority.port_u16().unwrap_or(
                    if upstream.scheme == http::uri::Scheme::HTTPS {
                        443
                    } else {
                        80
                    },
                );
                let connect = tokio::net::TcpStream::connect((host.as_str(), port));
                let error = match tokio::time::timeout(timeout, connect).await {
                    Ok(Ok(_)) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some(format!("no connection within {timeout:?}")),
                };
                (
                    name,
                    Reach {
                        upstream: shown,
                        checked: Instant::now(),
                        error,
                    },
                )
            });
        }
        while let Some(done) = checks.join_next().await {
            if let Ok((name, reach)) = done {
                cache.insert(name, reach);
            }
        }
        cache.clone()
    }

    async fn page(&self, query: Option<&str>) -> Response<Body> {
        // One routing for the whole page, so a reload meanwhile cannot mix two site lists.
        let routing = self.gateway.routing();
        let sites = routing.router.sites();
        let reach = self.reachability(sites).await;
        let depth = self.queue.count_by_site_state().await;
        let activity = self
            .queue
            .activity(&ActivityFilter {
                limit: PAGE_ACTIVITY,
                ..ActivityFilter::default()
            })
            .await;
        let mut stuck = Vec::new();
        let mut errors = Vec::new();
        for state in ["dead", "failed"] {
            match self.queue.jobs(Some(state), PAGE_JOBS).await {
                Ok(rows) => stuck.extend(rows),
                Err(e) => errors.push(e.to_string()),
            }
        }
        let depth = depth.unwrap_or_else(|e| {
            errors.push(e.to_string());
            Vec::new()
        });
        let activity = activity.unwrap_or_else(|e| {
            errors.push(e.to_string());
            Vec::new()
        });
        let notice = query.and_then(|q| {
            if let Some(id) = query_param(Some(q), "replayed").and_then(|v| parse_job_id(&v)) {
                Some(("ok", format!("Job {id} is queued again.")))
            } else {
                query_param(Some(q), "not_replayed")
                    .and_then(|v| parse_job_id(&v))
                    .map(|id| {
                        (
                            "warn",
                            format!("Job {id} was not replayed: it is no longer dead or failed."),
                        )
                    })
            }
        });
        let view = PageView {
            state: self.health.state(),
            sites,
            reach: &reach,
            depth: &depth,
            activity: &activity,
            stuck: &stuck,
            errors: &errors,
            notice,
            csrf: self.csrf.expose(),
        };
        let mut resp = Response::new(full_body(view.render()));
        *resp.status_mut() = StatusCode::OK;
        html_headers(resp.headers_mut());
        resp
    }
}

/// What a path names, with the methods it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Healthz,
    Readyz,
    Metrics,
    Page,
    FormReplay(String),
    Activity,
    Jobs,
    ApiReplay(String),
    Locks,
    Lock(String, String),
}

const GET: &[Method] = &[Method::GET, Method::HEAD];
const POST: &[Method] = &[Method::POST];
const DELETE: &[Method] = &[Method::DELETE];

impl Route {
    fn parse(path: &str) -> Option<(Route, &'static [Method])> {
        let segments: Vec<String> = path
            .strip_prefix('/')?
            .split('/')
            .map(percent_decode)
            .collect::<Option<_>>()?;
        let s: Vec<&str> = segments.iter().map(String::as_str).collect();
        Some(match s.as_slice() {
            [""] => (Route::Page, GET),
            ["healthz"] => (Route::Healthz, GET),
            ["readyz"] => (Route::Readyz, GET),
            ["metrics"] => (Route::Metrics, GET),
            ["jobs", id, "replay"] => (Route::FormReplay((*id).to_owned()), POST),
            ["api", "activity"] => (Route::Activity, GET),
            ["api", "jobs"] => (Route::Jobs, GET),
            ["api", "jobs", id, "replay"] => (Route::ApiReplay((*id).to_owned()), POST),
            ["api", "locks"] => (Route::Locks, POST),
            ["api", "locks", site, contact] => (
                Route::Lock((*site).to_owned(), (*contact).to_owned()),
                DELETE,
            ),
            _ => return None,
        })
    }

    /// JSON for the API, a short HTML page for the browser paths, text for the rest.
    fn refuse(&self, refusal: Refusal) -> Response<Body> {
        let Refusal {
            status,
            code,
            message,
        } = refusal;
        let message = message.as_str();
        match self {
            Route::Activity
            | Route::Jobs
            | Route::ApiReplay(_)
            | Route::Locks
            | Route::Lock(..) => api_error(status, code, message),
            Route::Page | Route::FormReplay(_) => html_page(
                status,
                &format!(
                    "{} {}",
                    status.as_u16(),
                    status.canonical_reason().unwrap_or("")
                ),
                &format!(
                    "<p>{}</p><p><a href=\"/\">Status page</a></p>",
                    escape_html(message)
                ),
            ),
            Route::Healthz | Route::Readyz | Route::Metrics => {
                text(status, &format!("{code}: {message}\n"))
            }
        }
    }
}

/// `%XX` decoding of one path segment; `None` when it is not valid UTF-8 or a `%` is broken.
fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn parse_job_id(text: &str) -> Option<JobId> {
    text.parse::<i64>().ok().filter(|id| *id > 0).map(JobId)
}

fn job_id(text: &str) -> Result<JobId, Refusal> {
    parse_job_id(text).ok_or_else(|| {
        Refusal::bad_request("invalid_job_id", "the job id must be a positive integer")
    })
}

fn contact_id(text: &str) -> Result<ContactId, Refusal> {
    ContactId::parse(text).ok_or_else(|| {
        Refusal::bad_request(
            "invalid_contact_id",
            format!(
                "contact_id must be 1 to {} printable characters",
                ContactId::MAX_LEN
            ),
        )
    })
}

/// The first value of `name` in a query string.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The value of cookie `name`.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The request's `Host` without the port, lower-cased.
fn host_name(headers: &HeaderMap) -> Option<String> {
    let host = headers.get(HOST)?.to_str().ok()?;
    let authority: http::uri::Authority = host.parse().ok()?;
    Some(authority.host().to_ascii_lowercase())
}

/// `Host` is an IP address or `localhost` (or absent, as in HTTP/1.0).
fn local_host(headers: &HeaderMap) -> bool {
    if headers.get(HOST).is_none() {
        return true;
    }
    match host_name(headers) {
        None => false,
        Some(host) => {
            host == "localhost"
                || host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok()
        }
    }
}

/// `Origin` (else `Referer`), when present, names the same host and port as `Host`.
fn same_origin(headers: &HeaderMap) -> bool {
    let claimed = headers
        .get(ORIGIN)
        .or_else(|| headers.get(REFERER))
        .map(|v| v.to_str().ok().and_then(|s| s.parse::<http::Uri>().ok()));
    let Some(claimed) = claimed else {
        // Not a browser (curl, scripts): nothing to compare.
        return true;
    };
    let host = headers.get(HOST).and_then(|v| v.to_str().ok());
    match (claimed.as_ref().and_then(http::Uri::authority), host) {
        (Some(origin), Some(host)) => origin.as_str().eq_ignore_ascii_case(host),
        // `Origin: null`, an unparsable value, or no Host to compare with.
        _ => false,
    }
}

/// The query parameters of an API call; unknown names are a 400 (a typo would otherwise
/// silently widen the answer).
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(query: Option<&str>, known: &[&str]) -> Result<Self, Refusal> {
        let mut out = Vec::new();
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            if !known.contains(&k.as_ref()) {
                return Err(Refusal::bad_request(
                    "unknown_parameter",
                    format!(
                        "unknown query parameter {:?}; known: {}",
                        k.as_ref(),
                        known.join(", ")
                    ),
                ));
            }
            out.push((k.into_owned(), v.into_owned()));
        }
        Ok(Params(out))
    }

    /// A non-empty value of `name`.
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }

    fn limit(&self) -> Result<u32, Refusal> {
        match self.get("limit") {
            None => Ok(DEFAULT_LIMIT),
            Some(text) => match text.parse::<u32>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
                _ => Err(Refusal::bad_request(
                    "invalid_limit",
                    format!("limit must be a whole number from 1 to {MAX_LIMIT}"),
                )),
            },
        }
    }
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Refusal> {
    let read = Limited::new(req.into_body(), MAX_BODY).collect();
    match tokio::time::timeout(HEADER_READ_TIMEOUT, read).await {
        Ok(Ok(body)) => Ok(body.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body is larger than {MAX_BODY} bytes"),
        )),
        Ok(Err(e)) => Err(Refusal::bad_request(
            "malformed_body",
            format!("the body could not be read: {e}"),
        )),
        Err(_) => Err(Refusal::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "the body did not arrive in time",
        )),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut resp = Response::new(full_body(body.to_owned()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut resp = Response::new(full_body(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn json_ok(value: Value) -> Response<Body> {
    json_response(StatusCode::OK, &value)
}

/// `{"ok":false,"error":CODE,"message":TEXT}`.
fn api_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(
        status,
        &json!({"ok": false, "error": code, "message": message}),
    )
}

fn not_found(path: &str) -> Response<Body> {
    if path.starts_with("/api/") {
        api_error(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
    } else {
        text(StatusCode::NOT_FOUND, "not found\n")
    }
}

fn method_not_allowed(route: &Route, allowed: &[Method]) -> Response<Body> {
    let names: Vec<&str> = allowed.iter().map(Method::as_str).collect();
    let mut resp = route.refuse(Refusal::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("use {}", names.join(", ")),
    ));
    if let Ok(value) = HeaderValue::from_str(&names.join(", ")) {
        resp.headers_mut().insert(ALLOW, value);
    }
    resp
}

fn see_other(location: &str) -> Response<Body> {
    let mut resp = Response::new(crate::empty_body());
    *resp.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(value) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(LOCATION, value);
    }
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Headers of every admin HTML page: no caching, no framing, no scripts at all.
fn html_headers(headers: &mut HeaderMap) {
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("same-origin"));
}

/// A small HTML page; `body` is already HTML (escaped by the caller).
fn html_page(status: StatusCode, title: &str, body: &str) -> Response<Body> {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title>\
         </head><body><h1>{t}</h1>{body}</body></html>\n",
        t = escape_html(title)
    );
    let mut resp = Response::new(full_body(html));
    *resp.status_mut() = status;
    html_headers(resp.headers_mut());
    resp
}

/// CSS class of an outcome: green done, blue queued, yellow duplicate/locked (like WP
/// Fusion's notices), red failures.
fn outcome_class(outcome: &str) -> &'static str {
    match outcome {
        "done" | "ok" | "lock_set" => "o-ok",
        "queued" | "coalesced" | "replay" => "o-info",
        "duplicate" | "locked" | "retry" => "o-warn",
        "failed" | "dead" | "rate_limited" => "o-err",
        _ => "o-other",
    }
}

/// `YYYY-MM-DD HH:MM:SS` UTC from milliseconds since the epoch (the epoch itself for times
/// `time` cannot represent).
fn format_utc(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

const PAGE_CSS: &str = "\
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2327;background:#f0f0f1}\
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}\
table{border-collapse:collapse;background:#fff;width:100%}\
th,td{text-align:left;padding:.3em .6em;border-bottom:1px solid #dcdcde;vertical-align:top}\
th{background:#f6f7f7}td.n{text-align:right;font-variant-numeric:tabular-nums}\
code,.mono{font-family:ui-monospace,monospace;font-size:.95em;word-break:break-all}\
.badge{display:inline-block;padding:0 .5em;border-left:4px solid;border-radius:2px}\
.o-ok .badge,.o-ok.badge{background:#edfaef;border-color:#00a32a;color:#00450c}\
.o-info .badge,.o-info.badge{background:#f0f6fc;border-color:#72aee6;color:#043959}\
.o-warn .badge,.o-warn.badge{background:#fcf9e8;border-color:#dba617;color:#614200}\
.o-err .badge,.o-err.badge{background:#fcf0f1;border-color:#d63638;color:#8a2424}\
.o-other .badge{background:#f6f7f7;border-color:#8c8f94}\
.notice{background:#fff;border-left:4px solid #72aee6;padding:.5em 1em;margin:1em 0}\
.notice.warn{border-color:#dba617}.notice.err{border-color:#d63638}.notice.ok{border-color:#00a32a}\
.muted{color:#646970}button{cursor:pointer}";

/// Everything the status page shows, gathered before rendering.
struct PageView<'a> {
    state: &'static str,
    sites: &'a [Arc<SiteConfig>],
    reach: &'a HashMap<String, Reach>,
    depth: &'a [(String, String, i64)],
    activity: &'a [ActivityRow],
    stuck: &'a [JobRow],
    errors: &'a [String],
    notice: Option<(&'static str, String)>,
    csrf: &'a str,
}

impl PageView<'_> {
    fn count(&self, site: &str, state: &str) -> i64 {
        self.depth
            .iter()
            .filter(|(s, st, _)| s == site && st == state)
            .map(|(_, _, n)| *n)
            .sum()
    }

    fn render(&self) -> String {
        let mut h = String::with_capacity(32 * 1024);
        let state_class = if self.state == "ready" {
            "o-ok"
        } else {
            "o-warn"
        };
        let _ = write!(
            h,
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
             <title>wpf-gateway status</title><style>{PAGE_CSS}</style></head><body>\
             <h1>wpf-gateway <span class=\"muted\">{version}</span></h1>\
             <p>State: <span id=\"state\" class=\"badge {state_class}\">{state}</span> \
             <span class=\"muted\">· {now} UTC · <a href=\"/\">refresh</a> · \
             <a href=\"/metrics\">metrics</a></span></p>",
            version = escape_html(env!("CARGO_PKG_VERSION")),
            state = self.state,
            now = format_utc(now_ms()),
        );
        if let Some((class, text)) = &self.notice {
            let _ = write!(
                h,
                "<p class=\"notice {class}\" id=\"notice\">{}</p>",
                escape_html(text)
            );
        }
        for e in self.errors {
            let _ = write!(h, "<p class=\"notice err\">{}</p>", escape_html(e));
        }
        self.render_sites(&mut h);
        self.render_stuck(&mut h);
        self.render_activity(&mut h);
        h.push_str("</body></html>\n");
        h
    }

    fn render_sites(&self, h: &mut String) {
        h.push_str(
            "<h2>Sites</h2><table id=\"sites\"><thead><tr><th>site</th><th>hosts</th>\
             <th>mode</th><th>upstream</th><th>reachable</th><th>pending</th><th>running</th>\
             <th>failed</th><th>dead</th></tr></thead><tbody>",
        );
        for site in self.sites {
            let hosts = if site.hosts.is_empty() {
                "(any)".to_owned()
            } else {
                site.hosts.join(", ")
            };
            let reach = match self.reach.get(&site.name) {
                Some(Reach { error: None, .. }) => {
                    "<span class=\"badge o-ok\">yes</span>".to_owned()
                }
                Some(Reach {
                    error: Some(e),
                    checked,
                    ..
                }) => format!(
                    "<span class=\"badge o-err\" title=\"{}\">no</span> \
                     <span class=\"muted\">{}s ago</span>",
                    escape_html(e),
                    checked.elapsed().as_secs()
                ),
                None => "<span class=\"muted\">unknown</span>".to_owned(),
            };
            let mode = match site.mode {
                crate::config::Mode::Direct => "direct",
                crate::config::Mode::Relay => "relay",
            };
            let _ = write!(
                h,
                "<tr class=\"site\"><td>{name}</td><td>{hosts}</td><td>{mode}</td>\
                 <td><code>{upstream}</code></td><td>{reach}</td><td class=\"n\">{p}</td>\
                 <td class=\"n\">{r}</td><td class=\"n\">{f}</td><td class=\"n\">{d}</td></tr>",
                name = escape_html(&site.name),
                hosts = escape_html(&hosts),
                upstream = escape_html(&site.upstream.to_string()),
                p = self.count(&site.name, "pending"),
                r = self.count(&site.name, "running"),
                f = self.count(&site.name, "failed"),
                d = self.count(&site.name, "dead"),
            );
        }
        h.push_str("</tbody></table>");
    }

    fn render_stuck(&self, h: &mut String) {
        h.push_str("<h2>Dead and failed jobs</h2>");
        if self.stuck.is_empty() {
            h.push_str("<p class=\"muted\" id=\"no-dead\">None.</p>");
            return;
        }
        h.push_str(
            "<table id=\"dead\"><thead><tr><th>job</th><th>state</th><th>site</th>\
             <th>contact</th><th>action</th><th>attempts</th><th>last error</th>\
             <th>updated (UTC)</th><th></th></tr></thead><tbody>",
        );
        for job in self.stuck {
            let _ = write!(
                h,
                "<tr class=\"job {class}\"><td class=\"n\">{id}</td>\
                 <td><span class=\"badge\">{state}</span></td><td>{site}</td>\
                 <td class=\"mono\">{contact}</td><td>{action}</td><td class=\"n\">{attempts}</td>\
                 <td>{error}</td><td>{updated}</td><td>\
                 <form method=\"post\" action=\"/jobs/{id}/replay\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                 <button type=\"submit\">Replay</button></form></td></tr>",
                class = outcome_class(&job.state),
                id = job.id,
                state = escape_html(&job.state),
                site = escape_html(&job.site),
                contact = escape_html(&job.contact),
                action = escape_html(&job.action),
                attempts = job.attempts,
                error = escape_html(job.last_error.as_deref().unwrap_or("")),
                updated = format_utc(job.updated_at_ms),
                csrf = escape_html(self.csrf),
            );
        }
        h.push_str("</tbody></table>");
    }

    fn render_activity(&self, h: &mut String) {
        let _ = write!(
            h,
            "<h2>Recent activity <span class=\"muted\">(last {PAGE_ACTIVITY})</span></h2>"
        );
        if self.activity.is_empty() {
            h.push_str("<p class=\"muted\" id=\"no-activity\">Nothing yet.</p>");
            return;
        }
        h.push_str(
            "<table id=\"activity\"><thead><tr><th>time (UTC)</th><th>site</th>\
             <th>contact</th><th>action</th><th>outcome</th><th>job</th><th>took</th>\
             <th>detail</th></tr></thead><tbody>",
        );
        for row in self.activity {
            let took = row
                .duration_ms
                .map(|ms| format!("{ms} ms"))
                .unwrap_or_default();
            let job = row.job.map(|j| j.to_string()).unwrap_or_default();
            let _ = write!(
                h,
                "<tr class=\"activity {class}\"><td>{at}</td><td>{site}</td>\
                 <td class=\"mono\">{contact}</td><td>{action}</td>\
                 <td><span class=\"badge\">{outcome}</span></td><td class=\"n\">{job}</td>\
                 <td class=\"n\">{took}</td><td>{detail}</td></tr>",
                class = outcome_class(&row.outcome),
                at = format_utc(row.at_ms),
                site = escape_html(&row.site),
                contact = escape_html(row.contact.as_deref().unwrap_or("")),
                action = escape_html(row.action.as_deref().unwrap_or("")),
                outcome = escape_html(&row.outcome),
                detail = escape_html(row.detail.as_deref().unwrap_or("")),
            );
        }
        h.push_str("</tbody></table>");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(Route::parse("/").unwrap().0, Route::Page);
        assert_eq!(
            Route::parse("/api/locks/main/a%20b").unwrap().0,
            Route::Lock("main".into(), "a b".into())
        );
        assert_eq!(
            Route::parse("/api/jobs/7/replay").unwrap().0,
            Route::ApiReplay("7".into())
        );
        assert!(Route::parse("/api/nope").is_none());
        assert!(Route::parse("/api/locks/main/%zz").is_none());
        assert!(Route::parse("/metrics/").is_none());
    }

    #[test]
    fn utc_dates() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00");
        assert_eq!(format_utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(format_utc(1_700_000_000_123), "2023-11-14 22:13:20");
    }

    #[test]
    fn hosts_and_origins() {
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_static("127.0.0.1:9180"));
        assert!(local_host(&h));
        assert!(same_origin(&h));
        h.insert(ORIGIN, HeaderValue::from_static("http://127.0.0.1:9180"));
        assert!(same_origin(&h));
        h.insert(ORIGIN, HeaderValue::from_static("http://evil.example"));
        assert!(!same_origin(&h));
        h.insert(ORIGIN, HeaderValue::from_static("null"));
        assert!(!same_origin(&h));
        h.remove(ORIGIN);
        h.insert(
            REFERER,
            HeaderValue::from_static("http://127.0.0.1:9180/?x=1"),
        );
        assert!(same_origin(&h));
        h.insert(HOST, HeaderValue::from_static("rebound.example:9180"));
        assert!(!local_host(&h));
        h.insert(HOST, HeaderValue::from_static("[::1]:9180"));
        assert!(local_host(&h));
        h.insert(HOST, HeaderValue::from_static("LOCALHOST"));
        assert!(local_host(&h));
    }

    #[test]
    fn cookies() {
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_static("a=1; wpf_admin=xyz; b=2"));
        assert_eq!(cookie(&h, "wpf_admin"), Some("xyz"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
