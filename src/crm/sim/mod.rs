//! CRM simulator: one account of ActiveCampaign (API v3), FluentCRM (WordPress REST) or Agile
//! CRM, speaking the API shapes, auth and error codes the adapters meet in production, for
//! the integration tests (in-process on port 0), `wpf-gateway demo`, the CRM-efficiency
//! benchmark and admins rehearsing a setup (`wpf-gateway crm-sim`).
//!
//! Every API request goes through the same steps, in this order:
//!
//! ```text
//! route (unknown: 404 after the limit) -> rate limit (429 + Retry-After) -> injected failure
//!   -> auth (403 / 401) -> body (1 MiB) -> the CRM's answer -> latency -> request log
//! ```
//!
//! The CRM-specific parts (routes, auth, shapes, error bodies) live in one file per CRM
//! behind [`Api`]; `model` holds the CRM-neutral account. The control API (`/_sim/`, see
//! `control`) adds and changes contacts, injects failures and reads the request log; it
//! has no auth, is never rate-limited, delayed or logged, and is meant for loopback only.
//!
//! State sits behind one `std::sync::Mutex`, never held across an `await`: this is a
//! simulator, not a hot path.

mod activecampaign;
mod agilecrm;
mod control;
mod fluentcrm;
mod http;
mod limit;
mod model;

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use ::http::request::Parts;
use ::http::{HeaderMap, Method, Request, Response, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::CrmKind;
use crate::Body;

use self::http::Answer;
pub use self::limit::SimRate;
use self::limit::SlidingWindow;
use self::model::Store;
pub use self::model::{ContactError, Credentials, SeedData, SimContact};
pub use self::model::{DEFAULT_API_KEY, DEFAULT_USER};

/// Largest request body read (a contact update is a few hundred bytes).
const MAX_BODY: usize = 1024 * 1024;
/// Entries kept in the request log; older ones are dropped (the stats keep counting).
const MAX_LOG: usize = 100_000;
/// A request head must arrive within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// On shutdown, open connections get this long to finish their request.
const STOP_GRACE: Duration = Duration::from_secs(1);
/// Open connections at most (a load test's connections, with room to spare).
const MAX_CONNECTIONS: usize = 1024;
/// Query parameters whose values never reach the request log.
const SECRET_PARAMS: [&str; 6] = [
    "api_key",
    "apikey",
    "key",
    "token",
    "access_key",
    "password",
];

/// How the simulated account behaves.
#[derive(Debug, Clone)]
pub struct SimOptions {
    pub kind: CrmKind,
    /// API requests allowed in any window (`None`: unlimited).
    pub rate: Option<SimRate>,
    /// Added before every API answer.
    pub latency: Duration,
}

impl SimOptions {
    /// `kind`, unlimited, no latency.
    pub fn new(kind: CrmKind) -> Self {
        SimOptions {
            kind,
            rate: None,
            latency: Duration::ZERO,
        }
    }
}

/// Why the simulator cannot start or take a contact.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot read {}: {error}", path.display())]
    SeedRead {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    /// `problem` says where: `line L, column C: ...` or `contacts[i]: ...`.
    #[error("{}: {problem}", path.display())]
    Seed {
        path: std::path::PathBuf,
        problem: String,
    },
    #[error("contact: {0}")]
    Contact(#[from] ContactError),
}

/// The next API calls answer `status` instead of being served (`POST /_sim/fail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    pub status: StatusCode,
    /// How many API calls; `0` cancels a pending failure.
    pub count: u32,
    /// Sent as `Retry-After` (whole seconds). A `429` without one says `Retry-After: 1`.
    pub retry_after: Option<Duration>,
}

/// One API request as the request log keeps it: never a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRequest {
    pub method: String,
    /// Path and query; secret-looking query values (`api_key`, `token`, ...) read `***`.
    pub path: String,
    /// The route template, e.g. `GET /api/3/contacts/{id}`; `unknown` for unknown routes.
    pub route: &'static str,
    pub status: u16,
    /// When the request arrived.
    pub at: SystemTime,
}

/// Counts of API requests since start (or the last [`Sim::clear_requests`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub requests: u64,
    pub by_status: BTreeMap<u16, u64>,
    pub by_route: BTreeMap<&'static str, u64>,
}

/// One simulated CRM account; share it as `Arc<Sim>` between the server and the test.
pub struct Sim {
    options: SimOptions,
    credentials: Credentials,
    state: Mutex<State>,
}

struct State {
    store: Store,
    window: Option<SlidingWindow>,
    failure: Option<Failure>,
    log: VecDeque<LoggedRequest>,
    stats: Stats,
}

impl Sim {
    /// An account with `seed`'s credentials and contacts.
    pub fn new(options: SimOptions, seed: SeedData) -> Result<Arc<Sim>, SimError> {
        let now = SystemTime::now();
        let mut store = Store::default();
        for contact in seed.contacts {
            store.insert(options.kind, contact, now)?;
        }
        Ok(Arc::new(Sim {
            state: Mutex::new(State {
                store,
                window: options.rate.map(SlidingWindow::new),
                failure: None,
                log: VecDeque::new(),
                stats: Stats::default(),
            }),
            credentials: seed.credentials,
            options,
        }))
    }

    /// Read a seed file (see [`SeedData::load`]).
    pub fn load_seed(path: &Path) -> Result<SeedData, SimError> {
        SeedData::load(path)
    }

    pub fn kind(&self) -> CrmKind {
        self.options.kind
    }

    /// What API clients must present.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// Add or replace a contact; one without an id gets the next id of the kind's style.
    /// Returns the contact as stored (with its id).
    pub fn put_contact(&self, contact: SimContact) -> Result<SimContact, ContactError> {
        let mut state = self.lock();
        let now = SystemTime::now();
        let stored = if contact.id.trim().is_empty() {
            state.store.insert(self.options.kind, contact, now)?
        } else {
            state.store.replace(contact, now)?
        };
        Ok(stored.contact.clone())
    }

    /// Add a contact that must be new (an id already taken is [`ContactError::Exists`]).
    pub fn create_contact(&self, contact: SimContact) -> Result<SimContact, ContactError> {
        let mut state = self.lock();
        let stored = state
            .store
            .insert(self.options.kind, contact, SystemTime::now())?;
        Ok(stored.contact.clone())
    }

    pub fn contact(&self, id: &str) -> Option<SimContact> {
        self.lock().store.get_text(id).map(|s| s.contact.clone())
    }

    /// Every contact, by id.
    pub fn contacts(&self) -> Vec<SimContact> {
        self.lock().store.all().map(|s| s.contact.clone()).collect()
    }

    pub fn remove_contact(&self, id: &str) -> Option<SimContact> {
        let id = model::parse_id(id).ok()?;
        self.lock().store.remove(id)
    }

    /// The API requests served, oldest first (the last 100,000).
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.lock().log.iter().cloned().collect()
    }

    /// Forget the request log and the stats.
    pub fn clear_requests(&self) {
        let mut state = self.lock();
        state.log.clear();
        state.stats = Stats::default();
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    /// The next `count` API calls answer `status` (with `Retry-After: 1` for a 429).
    pub fn fail_next(&self, status: StatusCode, count: u32) {
        self.inject(Failure {
            status,
            count,
            retry_after: None,
        });
    }

    /// Replace any pending failure with `failure`.
    pub fn inject(&self, failure: Failure) {
        self.lock().failure = (failure.count > 0).then_some(failure);
    }

    /// Serve the API and the control API on `listener` until `shutdown`; then open
    /// connections get a second to finish and are cut.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let server = crate::server::InternalServer {
            name: "crm-sim",
            max_connections: MAX_CONNECTIONS,
            header_read_timeout: HEADER_READ_TIMEOUT,
            stop_grace: STOP_GRACE,
        };
        server
            .serve(listener, move |req| self.clone().handle(req), shutdown)
            .await;
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let at = SystemTime::now();
        let arrived = Instant::now();
        let (parts, body) = req.into_parts();
        let path = parts.uri.path();
        if path == "/_sim" || path.starts_with("/_sim/") {
            return control::handle(&self, &parts, body).await.into_response();
        }
        let (answer, route) = match self.options.kind {
            CrmKind::ActiveCampaign => {
                self.api_call::<activecampaign::ActiveCampaign>(&parts, body, arrived)
                    .await
            }
            CrmKind::FluentCrm => {
                self.api_call::<fluentcrm::FluentCrm>(&parts, body, arrived)
                    .await
            }
            CrmKind::AgileCrm => {
                self.api_call::<agilecrm::AgileCrm>(&parts, body, arrived)
                    .await
            }
        };
        if !self.options.latency.is_zero() {
            tokio::time::sleep(self.options.latency).await;
        }
        self.record(LoggedRequest {
            method: parts.method.to_string(),
            path: loggable_path(&parts.uri),
            route,
            status: answer.status.as_u16(),
            at,
        });
        answer.into_response()
    }

    /// The steps of the module doc, up to the CRM's answer.
    async fn api_call<A: Api>(
        &self,
        parts: &Parts,
        body: Incoming,
        arrived: Instant,
    ) -> (Answer, &'static str) {
        let route = A::route(&parts.method, parts.uri.path());
        let name = route.as_ref().map_or("unknown", A::name);
        let query = parts.uri.query();
        {
            let mut state = self.lock();
            if let Some(window) = &mut state.window {
                if let Err(wait) = window.admit(arrived) {
                    let secs = limit::retry_after_secs(wait);
                    return (A::rate_limited().retry_after(secs), name);
                }
            }
            if let Some(failure) = take_failure(&mut state.failure) {
                return (
                    injected(A::error(failure.status, "simulated failure"), &failure),
                    name,
                );
            }
        }
        let Some(route) = route else {
            return (A::error(StatusCode::NOT_FOUND, "no such API route"), name);
        };
        if let Err(refusal) = A::authorize(&parts.headers, query, &self.credentials) {
            return (refusal, name);
        }
        let body = match read_body(body).await {
            Ok(body) => body,
            Err(status) => return (A::error(status, "the request body could not be read"), name),
        };
        let mut state = self.lock();
        let answer = A::answer(route, &mut state.store, query, &body, SystemTime::now());
        (answer, name)
    }

    fn record(&self, entry: LoggedRequest) {
        let mut state = self.lock();
        state.stats.requests += 1;
        *state.stats.by_status.entry(entry.status).or_default() += 1;
        *state.stats.by_route.entry(entry.route).or_default() += 1;
        if state.log.len() == MAX_LOG {
            state.log.pop_front();
        }
        state.log.push_back(entry);
    }

    /// A panic while holding the lock (a bug) must not stop the simulator: the state is still
    /// consistent between statements, so the poisoned guard is used as is.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The CRM-specific part of the simulator: one implementation per CRM file.
trait Api {
    /// A known API route with its path parameters.
    type Route;
    /// `None` for an unknown route.
    fn route(method: &Method, path: &str) -> Option<Self::Route>;
    /// The route template for the log and the stats.
    fn name(route: &Self::Route) -> &'static str;
    /// Refuse missing or wrong credentials the way the CRM does.
    fn authorize(
        headers: &HeaderMap,
        query: Option<&str>,
        credentials: &Credentials,
    ) -> Result<(), Answer>;
    /// Serve an authorized call.
    fn answer(
        route: Self::Route,
        store: &mut Store,
        query: Option<&str>,
        body: &[u8],
        now: SystemTime,
    ) -> Answer;
    /// The CRM's error body for `status`.
    fn error(status: StatusCode, message: &str) -> Answer;
    /// The CRM's `429` (the caller adds `Retry-After`).
    fn rate_limited() -> Answer {
        Self::error(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests")
    }
}

/// Use up one call of a pending failure.
fn take_failure(pending: &mut Option<Failure>) -> Option<Failure> {
    let failure = pending.as_mut()?;
    let taken = *failure;
    failure.count -= 1;
    if failure.count == 0 {
        *pending = None;
    }
    Some(taken)
}

fn injected(answer: Answer, failure: &Failure) -> Answer {
    let secs = match failure.retry_after {
        Some(wait) => Some(limit::retry_after_secs(wait)),
        None if failure.status == StatusCode::TOO_MANY_REQUESTS => Some(1),
        None => None,
    };
    match secs {
        Some(secs) => answer.retry_after(secs),
        None => answer,
    }
}

/// The whole body, up to [`MAX_BODY`]: `413` above it, `400` when the client broke off.
async fn read_body(body: Incoming) -> Result<Bytes, StatusCode> {
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(StatusCode::PAYLOAD_TOO_LARGE),
        Err(_) => Err(StatusCode::BAD_REQUEST),
    }
}

/// Path and query with the values of secret-looking parameters replaced by `***`.
fn loggable_path(uri: &::http::Uri) -> String {
    let path = uri.path();
    let Some(query) = uri.query() else {
        return path.to_owned();
    };
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let secret = SECRET_PARAMS.iter().any(|s| key.eq_ignore_ascii_case(s));
        out.append_pair(&key, if secret { "***" } else { &value });
    }
    format!("{path}?{}", out.finish())
}

/// `activecampaign`, `fluentcrm` or `agilecrm` (the `--kind` and config spelling).
pub fn parse_kind(text: &str) -> Result<CrmKind, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "activecampaign" => Ok(CrmKind::ActiveCampaign),
        "fluentcrm" => Ok(CrmKind::FluentCrm),
        "agilecrm" => Ok(CrmKind::AgileCrm),
        _ => Err(format!(
            "{text:?}: expected activecampaign, fluentcrm or agilecrm"
        )),
    }
}

/// The `--kind` spelling of `kind`.
pub fn kind_name(kind: CrmKind) -> &'static str {
    match kind {
        CrmKind::ActiveCampaign => "activecampaign",
        CrmKind::FluentCrm => "fluentcrm",
        CrmKind::AgileCrm => "agilecrm",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_used_up() {
        let mut pending = Some(Failure {
            status: StatusCode::SERVICE_UNAVAILABLE,
            count: 2,
            retry_after: None,
        });
        assert!(take_failure(&mut pending).is_some());
        assert!(take_failure(&mut pending).is_some());
        assert!(take_failure(&mut pending).is_none());
    }

    #[test]
    fn secrets_stay_out_of_logged_paths() {
        let uri: ::http::Uri = "/api/3/contacts?email=a%40x.org&api_key=sim-key&Token=t"
            .parse()
            .unwrap();
        assert_eq!(
            loggable_path(&uri),
            "/api/3/contacts?email=a%40x.org&api_key=***&Token=***"
        );
        let uri: ::http::Uri = "/dev/api/contacts/7".parse().unwrap();
        assert_eq!(loggable_path(&uri), "/dev/api/contacts/7");
    }

    #[test]
    fn kinds_parse_and_print() {
        for kind in [
            CrmKind::ActiveCampaign,
            CrmKind::FluentCrm,
            CrmKind::AgileCrm,
        ] {
            assert_eq!(parse_kind(kind_name(kind)), Ok(kind));
        }
        assert!(parse_kind("hubspot").is_err());
    }
}
