//! The webhook front door: requests with `wpf_action` in the query. They are never forwarded
//! as they are; each is answered in milliseconds, in this order:
//!
//! ```text
//! per-IP limit (429) -> access_key, constant time (403) -> action (400; test: 200)
//!   -> per-site limit (429) -> custom action? -> pass-through to the site
//!   -> body, capped (413) -> payload (400) -> lock? (lock endpoint: 200)
//!   -> contact id (400) -> loopback lock (200 locked) -> durable queue (202 / 200 / 503)
//!   -> sync mode: wait for the outcome (200 done / 422 / 202)
//! ```
//!
//! [`parse`] reads the query and the CRM payloads, [`limits`] holds the admission limits,
//! [`respond`] turns every outcome into its answer.

pub mod limits;
pub mod parse;
pub mod respond;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use subtle::ConstantTimeEq;

use crate::config::{Config, Respond, SiteConfig};
use crate::metrics::Metrics;
use crate::queue::{
    Action, Activity, Admission, ContactId, Delivery, JobOutcome, QueueError, SqliteQueue,
    StoredRequest,
};
use crate::server::ConnInfo;
use crate::Body;
use limits::Limits;
use parse::{Payload, Query, WebhookAction};
use respond::{Answer, Rejection};

/// Longest lock a site may ask for through the lock endpoint.
const MAX_LOCK_TTL: Duration = Duration::from_secs(3600);
/// `Retry-After` when the queue cannot commit (disk full, I/O error).
const UNAVAILABLE_RETRY_AFTER: Duration = Duration::from_secs(5);
/// How often idle per-IP limiter states are forgotten.
pub(crate) const LIMITER_HOUSEKEEPING: Duration = Duration::from_secs(60);

/// What the front door decided for a webhook request.
pub enum Outcome {
    /// Answered here.
    Answered(Response<Body>),
    /// A custom action (`wpf_action=ck_unsubscribed` …), authenticated and within limits:
    /// the site handles it, through the ordinary pass-through.
    PassThrough(Request<Incoming>),
}

/// Authenticates, parses, limits and queues webhooks.
pub struct FrontDoor {
    queue: Arc<SqliteQueue>,
    metrics: Arc<Metrics>,
    limits: HashMap<String, Limits>,
    trusted_proxies: Vec<ipnet::IpNet>,
    body_timeout: Duration,
}

impl FrontDoor {
    /// Limits from each site's config; answers are counted in `metrics`.
    pub fn new(config: &Config, queue: Arc<SqliteQueue>, metrics: Arc<Metrics>) -> Self {
        let limits = config
            .sites
            .iter()
            .map(|s| (s.name.clone(), Limits::new(&s.limits)))
            .collect();
        FrontDoor {
            queue,
            metrics,
            limits,
            trusted_proxies: config.server.trusted_proxies.clone(),
            body_timeout: config.server.header_read_timeout,
        }
    }

    /// Forget idle per-IP limiter states (called now and then, so the tables stay small).
    pub fn forget_idle(&self) {
        self.limits.values().for_each(Limits::forget_idle);
    }

    /// Answer one webhook request (or hand a custom action to the pass-through).
    #[tracing::instrument(skip_all, fields(site = %site.name))]
    pub async fn handle(
        &self,
        site: &Arc<SiteConfig>,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> Outcome {
        let html = respond::prefers_html(req.headers());
        let client = crate::server::client_ip(req.headers(), conn, &self.trusted_proxies);
        let query = parse::parse_query(req.uri().query().unwrap_or(""));
        let action = action_label(query.action.as_deref());
        match self.admit(site, req, client, &query).await {
            Ok(Admitted::Answer(answer)) => {
                self.metrics.webhook(&site.name, action, answer.outcome());
                Outcome::Answered(answer.into_response(html))
            }
            Ok(Admitted::PassThrough(req)) => {
                self.metrics.webhook(&site.name, action, "pass_through");
                Outcome::PassThrough(req)
            }
            Err(rejection) => {
                self.metrics.webhook(&site.name, action, rejection.code);
                if rejection.status == StatusCode::TOO_MANY_REQUESTS {
                    self.record(
                        site,
                        query.contact_id.clone(),
                        query.action.clone(),
                        "rate_limited",
                        rejection.message.clone(),
                    );
                }
                tracing::debug!(code = rejection.code, "webhook refused");
                Outcome::Answered(Answer::Error(rejection).into_response(html))
            }
        }
    }

    async fn admit(
        &self,
        site: &Arc<SiteConfig>,
        req: Request<Incoming>,
        client: IpAddr,
        query: &Query,
    ) -> Result<Admitted, Rejection> {
        let limits = self.limits.get(&site.name);
        if let Some(Err(wait)) = limits.map(|l| l.check_ip(client)) {
            return Err(rate_limited("too many webhooks from this client", wait));
        }
        authenticate(site, query)?;
        let action =
            parse::classify_action(query.action.as_deref().unwrap_or("")).map_err(|_| {
                Rejection::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_action",
                    "wpf_action must be update_tags, update, add, test, lock or a site action name",
                )
            })?;
        if action == WebhookAction::Test {
            return Ok(Admitted::Answer(Answer::Test));
        }
        if let Some(Err(wait)) = limits.map(Limits::check_site) {
            return Err(rate_limited("too many webhooks for this site", wait));
        }
        let action = match action {
            WebhookAction::Other(_) => return Ok(Admitted::PassThrough(req)),
            WebhookAction::Job(action) => Some(action),
            WebhookAction::Lock => None,
            WebhookAction::Test => return Ok(Admitted::Answer(Answer::Test)),
        };
        let (parts, body) = req.into_parts();
        let body = self.read_body(site, &parts.headers, body).await?;
        let content_type = parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let payload = parse::parse_payload(content_type.as_deref(), &body).map_err(|e| {
            Rejection::new(StatusCode::BAD_REQUEST, "malformed_body", e.to_string())
        })?;
        let contact = contact_id(query, &payload)?;
        let Some(action) = action else {
            return self.lock(site, query, contact).await;
        };
        let site_name: Arc<str> = Arc::from(site.name.as_str());
        if action != Action::Add {
            if let Some(remaining) = self.queue.locked_for(&site_name, &contact) {
                self.record(
                    site,
                    Some(contact.to_string()),
                    Some(action.to_string()),
                    "locked",
                    String::new(),
                );
                return Ok(Admitted::Answer(Answer::Locked { contact, remaining }));
            }
        }
        let delivery = Delivery {
            site: site_name,
            contact: contact.clone(),
            action,
            role: query.role.clone().or(payload.role),
            send_notification: query.send_notification.or(payload.send_notification),
            payload_tags: payload.tags,
            request: StoredRequest {
                method: parts.method.to_string(),
                path_and_query: without_access_key(&parts.uri),
                content_type,
                body,
                client_ip: client,
                host: parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
                    .or_else(|| parts.uri.authority().map(|a| a.to_string())),
            },
            received_at: SystemTime::now(),
        };
        let sync = site.respond == Respond::Sync;
        let started = tokio::time::Instant::now();
        let (admission, outcome) = self
            .queue
            .admit(delivery, site.dedupe_window, sync)
            .await
            .map_err(queue_rejection)?;
        if let Some(outcome) = outcome {
            let left = site.sync_timeout.saturating_sub(started.elapsed());
            if let Ok(Ok(outcome)) = tokio::time::timeout(left, outcome).await {
                return Ok(Admitted::Answer(sync_answer(admission, contact, outcome)));
            }
        }
        Ok(Admitted::Answer(match admission {
            Admission::Queued { job } => Answer::Queued {
                job,
                action,
                contact,
            },
            Admission::Coalesced { job } => Answer::Coalesced {
                job,
                action,
                contact,
            },
            Admission::Duplicate { job } => Answer::Duplicate { job, contact },
        }))
    }

    /// The body, at most `max_body` bytes (413 beyond), within the body timeout.
    async fn read_body(
        &self,
        site: &SiteConfig,
        headers: &http::HeaderMap,
        body: Incoming,
    ) -> Result<Bytes, Rejection> {
        let too_large = || {
            Rejection::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "the body is larger than max_body ({})",
                    crate::config::format_size(site.max_body)
                ),
            )
        };
        let declared = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > site.max_body) {
            return Err(too_large());
        }
        let limit = usize::try_from(site.max_body).unwrap_or(usize::MAX);
        let read = tokio::time::timeout(self.body_timeout, Limited::new(body, limit).collect());
        match read.await {
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
            Ok(Err(e)) => Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                "malformed_body",
                format!("the body could not be read: {e}"),
            )),
            Err(_) => Err(Rejection::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "the body did not arrive in time",
            )),
        }
    }

    /// `wpf_action=lock`: the site applied tags to a contact and asks us to ignore the
    /// CRM's echo for `ttl` seconds (default `loopback_lock`, at most an hour).
    async fn lock(
        &self,
        site: &SiteConfig,
        query: &Query,
        contact: ContactId,
    ) -> Result<Admitted, Rejection> {
        let ttl = match query.ttl.as_deref() {
            None => site.loopback_lock,
            Some(text) => match text.trim().parse::<u64>() {
                Ok(secs) if secs > 0 => Duration::from_secs(secs).min(MAX_LOCK_TTL),
                _ => {
                    return Err(Rejection::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_ttl",
                        "ttl must be a whole number of seconds, 1 to 3600",
                    ))
                }
            },
        };
        let site_name: Arc<str> = Arc::from(site.name.as_str());
        self.queue
            .lock(&site_name, &contact, ttl)
            .await
            .map_err(queue_rejection)?;
        Ok(Admitted::Answer(Answer::LockSet { contact, ttl }))
    }

    fn record(
        &self,
        site: &SiteConfig,
        contact: Option<String>,
        action: Option<String>,
        outcome: &'static str,
        detail: String,
    ) {
        self.queue.record(Activity {
            at: SystemTime::now(),
            site: Arc::from(site.name.as_str()),
            contact,
            action,
            outcome,
            job: None,
            duration: None,
            detail,
        });
    }
}

enum Admitted {
    Answer(Answer),
    PassThrough(Request<Incoming>),
}

/// The query's `access_key` against the site's, in constant time (no early exit on the
/// first differing byte, so the key cannot be guessed byte by byte from answer times).
fn authenticate(site: &SiteConfig, query: &Query) -> Result<(), Rejection> {
    let expected = site.access_key.expose().as_bytes();
    let given = query.access_key.as_ref().map(|k| k.expose().as_bytes());
    match given {
        Some(given) if bool::from(given.ct_eq(expected)) => Ok(()),
        Some(_) => Err(Rejection::new(
            StatusCode::FORBIDDEN,
            "invalid_access_key",
            "the access key is wrong",
        )),
        None => Err(Rejection::new(
            StatusCode::FORBIDDEN,
            "invalid_access_key",
            "the access_key parameter is missing",
        )),
    }
}

/// The `action` label of a webhook's metrics: a fixed word, never the raw (CRM-controlled)
/// value, so the number of series stays bounded.
fn action_label(raw: Option<&str>) -> &'static str {
    match raw.map(parse::classify_action) {
        None => "none",
        Some(Ok(WebhookAction::Job(action))) => action.as_str(),
        Some(Ok(WebhookAction::Test)) => "test",
        Some(Ok(WebhookAction::Lock)) => "lock",
        Some(Ok(WebhookAction::Other(_))) => "other",
        Some(Err(_)) => "invalid",
    }
}

/// `contact_id` from the query first, else from the CRM payload: its id, else its email (an
/// `email:` key: direct mode finds the contact by email in the CRM, relay mode sends the
/// webhook on and the site does).
fn contact_id(query: &Query, payload: &Payload) -> Result<ContactId, Rejection> {
    if let Some(raw) = &query.contact_id {
        return ContactId::parse(raw).ok_or_else(|| {
            Rejection::new(
                StatusCode::BAD_REQUEST,
                "missing_contact_id",
                format!(
                    "contact_id must be 1 to {} printable characters",
                    ContactId::MAX_LEN
                ),
            )
        });
    }
    payload
        .contact_id
        .clone()
        .or_else(|| {
            query
                .email
                .as_deref()
                .or(payload.email.as_deref())
                .and_then(ContactId::for_email)
        })
        .ok_or_else(|| {
            Rejection::new(
                StatusCode::BAD_REQUEST,
                "missing_contact_id",
                "no contact_id in the query and no contact id or email in the CRM payload",
            )
        })
}

fn rate_limited(message: &str, wait: Duration) -> Rejection {
    Rejection::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message).retry_after(wait)
}

fn queue_rejection(e: QueueError) -> Rejection {
    match e {
        QueueError::Full { retry_after } => Rejection::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "queue_full",
            "the queue is full; try again later",
        )
        .retry_after(retry_after),
        QueueError::Unavailable(reason) => {
            tracing::error!(%reason, "webhook not queued");
            Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "queue_unavailable",
                "the queue cannot store webhooks right now; try again later",
            )
            .retry_after(UNAVAILABLE_RETRY_AFTER)
        }
    }
}

/// The answer of a sync-mode webhook whose job finished in time.
fn sync_answer(admission: Admission, contact: ContactId, outcome: JobOutcome) -> Answer {
    let job = admission.job();
    match outcome {
        JobOutcome::Done { detail, report } => Answer::Done {
            job,
            contact,
            result: detail,
            report,
        },
        JobOutcome::Failed { code, reason } => {
            let mut r = Rejection::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                permanent_code(&code),
                reason,
            );
            r.job = Some(job);
            Answer::Error(r)
        }
        JobOutcome::Dead { reason } => {
            let mut r = Rejection::new(StatusCode::UNPROCESSABLE_ENTITY, "dead", reason);
            r.job = Some(job);
            Answer::Error(r)
        }
    }
}

/// Error codes are `&'static str` in answers; map the processors' codes onto the known set.
fn permanent_code(code: &str) -> &'static str {
    match code {
        "contact_not_found" => "contact_not_found",
        "no_matching_user" => "no_matching_user",
        "upstream_forbidden" => "upstream_forbidden",
        "upstream_rejected" => "upstream_rejected",
        "bad_credentials" => "bad_credentials",
        "invalid_credentials" => "invalid_credentials",
        "rejected" => "rejected",
        "conflict" => "conflict",
        "contact_has_no_email" => "contact_has_no_email",
        _ => "failed",
    }
}

/// Path and query as stored with a job: every `access_key` parameter removed (relay adds the
/// site's current key back when it sends).
fn without_access_key(uri: &http::Uri) -> String {
    let mut out = uri.path().to_owned();
    if let Some(query) = uri.query() {
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| {
                let key = pair.split_once('=').map_or(*pair, |(k, _)| k);
                !crate::proxy::is_secret_param(key)
            })
            .collect();
        if !kept.is_empty() {
            out.push('?');
            out.push_str(&kept.join("&"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_target_drops_every_access_key_form() {
        let uri: http::Uri = "/?wpf_action=update&access_key=s3cret&contact_id=7&access.key=x&a=1"
            .parse()
            .unwrap();
        assert_eq!(
            without_access_key(&uri),
            "/?wpf_action=update&contact_id=7&a=1"
        );
        let uri: http::Uri = "/hook?access_key=s3cret".parse().unwrap();
        assert_eq!(without_access_key(&uri), "/hook");
    }
}
