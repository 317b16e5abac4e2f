//! Relay mode: a job is sent to the site's upstream as the original webhook, one contact at a
//! time, at most `upstream_concurrency` at once per site, so WordPress + WP Fusion process the
//! flood at a pace the site can take.
//!
//! ```text
//! job -> wait for a slot (upstream_concurrency) -> pace (Retry-After pauses)
//!     -> build request (query with the job's merged action + the site's current key)
//!     -> send (connect + response timeouts) -> classify the answer (done / retry / fail)
//! ```

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST, RETRY_AFTER};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;

use crate::config::SiteConfig;
use crate::metrics::Metrics;
use crate::pace::Pacer;
use crate::proxy::{upstream_connector, Connector};
use crate::queue::{BoxFuture, Job};
use crate::worker::{ProcessError, Processed, Processor};

/// Marks requests the gateway relays, so a site (or a test) can tell them from direct hits.
pub const RELAYED_HEADER: HeaderName = HeaderName::from_static("x-wpf-gateway");
/// The job id, so a site can recognise a redelivery after a crash (at-least-once delivery).
pub const JOB_HEADER: HeaderName = HeaderName::from_static("x-wpf-job");

/// How long WP Fusion holds its own per-contact lock (`wpf_api_lock_{id}` transient, one
/// minute): a relayed webhook it calls "Doing it wrong" is retried after it.
const SITE_LOCK: Duration = Duration::from_secs(60);
/// How much of an answer is read to classify it.
const ANSWER_SCAN_LIMIT: usize = 64 * 1024;

/// Relays one site's jobs to its upstream.
pub struct Relay {
    site: Arc<SiteConfig>,
    client: Client<Connector, Full<Bytes>>,
    slots: Semaphore,
    /// The site's own `Retry-After` pauses (a `429`/`503` from the upstream).
    site_pause: Pacer,
    /// Each relayed webhook makes the site call its CRM: relay no faster than the account's
    /// rate (when `[site.crm]` is configured), shared with other sites on that account.
    crm: Option<Arc<Pacer>>,
    /// `wpf_gateway_relay_requests_total`, by the site's answer.
    metrics: Arc<Metrics>,
}

impl Relay {
    /// A relay for `site`, paced by its CRM account's `crm` pacer when there is one.
    pub fn new(
        site: Arc<SiteConfig>,
        crm: Option<Arc<Pacer>>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, rustls::Error> {
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(upstream_connector(site.upstream_connect_timeout)?);
        Ok(Relay {
            slots: Semaphore::new(site.upstream_concurrency.max(1)),
            site_pause: Pacer::new(None),
            crm,
            client,
            site,
            metrics,
        })
    }

    async fn relay(&self, job: &Job) -> Result<String, ProcessError> {
        // The semaphore is never closed, so acquire only fails if it were; treat that as a
        // transient fault rather than panicking.
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| ProcessError::Transient {
                reason: "relay slots closed".into(),
                retry_after: None,
            })?;
        self.site_pause.ready().await;
        if let Some(crm) = &self.crm {
            crm.ready().await;
        }
        let request = build_request(&self.site, job)?;
        let answer = tokio::time::timeout(self.site.upstream_timeout, self.client.request(request))
            .await
            .map_err(|_| {
                self.metrics.relay_request(&self.site.name, "timeout");
                ProcessError::Transient {
                    reason: format!("upstream timed out after {:?}", self.site.upstream_timeout),
                    retry_after: None,
                }
            })?
            .map_err(|e| {
                self.metrics.relay_request(&self.site.name, "unreachable");
                ProcessError::Transient {
                    reason: format!("upstream unreachable: {}", error_chain(&e)),
                    retry_after: None,
                }
            })?;
        let status = answer.status();
        self.metrics.relay_request(&self.site.name, status.as_str());
        let retry_after = retry_after(answer.headers().get(RETRY_AFTER));
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            if let Some(wait) = retry_after {
                self.site_pause.pause(wait);
            }
        }
        let body = Limited::new(answer.into_body(), ANSWER_SCAN_LIMIT)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        classify(status, retry_after, &body)
    }
}

impl Processor for Relay {
    fn process<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<Processed, ProcessError>> {
        Box::pin(async move { self.relay(job).await.map(Processed::from) })
    }
}

/// The request the site receives: the newest delivery's method, path, Host, body and content type,
/// with `wpf_action` set to the job's merged action, `role`/`send_notification` from the job,
/// and the site's current `access_key` (keys are never stored with jobs).
fn build_request(site: &SiteConfig, job: &Job) -> Result<Request<Full<Bytes>>, ProcessError> {
    let stored = &job.delivery.request;
    let (path, query) = stored
        .path_and_query
        .split_once('?')
        .unwrap_or((stored.path_and_query.as_str(), ""));
    let target = format!(
        "{}://{}{}?{}",
        site.upstream.scheme,
        site.upstream.authority,
        if path.is_empty() { "/" } else { path },
        relay_query(query, job, site.access_key.expose())
    );
    let method = Method::from_bytes(stored.method.as_bytes()).unwrap_or(Method::POST);
    // The Host the CRM addressed, as the pass-through would keep it; for jobs stored without
    // one, the site's first name, else the upstream itself.
    let host = stored
        .host
        .as_deref()
        .or_else(|| site.hosts.first().map(String::as_str))
        .unwrap_or_else(|| site.upstream.authority.as_str());
    let mut builder = Request::builder()
        .method(method)
        .uri(target)
        .header(HOST, host)
        .header("x-forwarded-for", stored.client_ip.to_string())
        .header(RELAYED_HEADER, "relayed")
        .header(JOB_HEADER, job.id.to_string());
    if let Some(ct) = stored
        .content_type
        .as_deref()
        .and_then(|v| HeaderValue::from_str(v).ok())
    {
        builder = builder.header(CONTENT_TYPE, ct);
    }
    builder
        .body(Full::new(stored.body.clone()))
        .map_err(|e| ProcessError::Permanent {
            code: "bad_request",
            reason: format!("stored request cannot be relayed: {e}"),
        })
}

/// The stored query with `wpf_action` = the job's action, `role` and `send_notification` from
/// the job (merged: newest wins), any `access_key` dropped, and the site's key appended.
fn relay_query(stored_query: &str, job: &Job, key: &str) -> String {
    let overridden = ["wpf_action", "access_key", "role", "send_notification"];
    let mut out = form_urlencoded::Serializer::new(String::new());
    out.append_pair("wpf_action", job.delivery.action.as_str());
    for (k, v) in form_urlencoded::parse(stored_query.as_bytes()) {
        if !overridden.contains(&k.as_ref()) {
            out.append_pair(&k, &v);
        }
    }
    if let Some(role) = &job.delivery.role {
        out.append_pair("role", role);
    }
    if let Some(notify) = job.delivery.send_notification {
        out.append_pair("send_notification", if notify { "true" } else { "false" });
    }
    out.append_pair("access_key", key);
    out.finish()
}

/// What the site's answer means for the job.
///
/// WP Fusion answers most outcomes with `200` and an HTML message (`wp_die`), so the body is
/// read: "Doing it wrong" means the site still holds its own lock for the contact (retry once
/// that lock has expired); "No matching user found" and "Contact data not found" are final.
fn classify(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Result<String, ProcessError> {
    let text = String::from_utf8_lossy(body);
    if status.is_success() {
        if text.contains("Doing it wrong") {
            return Err(ProcessError::Transient {
                reason: "site is still processing this contact (WP Fusion lock)".into(),
                retry_after: Some(SITE_LOCK),
            });
        }
        if text.contains("No matching user found") {
            return Err(ProcessError::Permanent {
                code: "no_matching_user",
                reason: "site found no user for this contact".into(),
            });
        }
        if text.contains("Contact data not found") {
            return Err(ProcessError::Permanent {
                code: "contact_not_found",
                reason: "site found no contact data in the webhook".into(),
            });
        }
        return Ok(format!("upstream answered {}", status.as_u16()));
    }
    let reason = format!("upstream answered {}", status.as_u16());
    let transient = status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_redirection();
    if transient {
        Err(ProcessError::Transient {
            reason,
            retry_after,
        })
    } else {
        Err(ProcessError::Permanent {
            code: if status == StatusCode::FORBIDDEN {
                "upstream_forbidden"
            } else {
                "upstream_rejected"
            },
            reason,
        })
    }
}

/// `Retry-After` in seconds (HTTP dates are rare from CRMs and sites; treated as absent).
fn retry_after(value: Option<&HeaderValue>) -> Option<Duration> {
    let secs: u64 = value?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs.min(24 * 3600)))
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doing_it_wrong_waits_for_the_site_lock() {
        let body = b"<strong>Doing it wrong:</strong> An <strong>update</strong> webhook is already being processed";
        match classify(StatusCode::OK, None, body) {
            Err(ProcessError::Transient { retry_after, .. }) => {
                assert_eq!(retry_after, Some(SITE_LOCK))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn answers_are_classified() {
        assert!(classify(StatusCode::OK, None, b"<h3>Success</h3>").is_ok());
        assert!(matches!(
            classify(StatusCode::OK, None, b"No matching user found"),
            Err(ProcessError::Permanent {
                code: "no_matching_user",
                ..
            })
        ));
        assert!(matches!(
            classify(StatusCode::BAD_GATEWAY, None, b""),
            Err(ProcessError::Transient { .. })
        ));
        assert!(matches!(
            classify(StatusCode::TOO_MANY_REQUESTS, Some(Duration::from_secs(7)), b""),
            Err(ProcessError::Transient { retry_after: Some(d), .. }) if d == Duration::from_secs(7)
        ));
        assert!(matches!(
            classify(StatusCode::FORBIDDEN, None, b"Invalid Access Key"),
            Err(ProcessError::Permanent {
                code: "upstream_forbidden",
                ..
            })
        ));
    }

    #[test]
    fn retry_after_parses_seconds_only() {
        assert_eq!(
            retry_after(Some(&HeaderValue::from_static("12"))),
            Some(Duration::from_secs(12))
        );
        assert_eq!(
            retry_after(Some(&HeaderValue::from_static(
                "Wed, 21 Oct 2015 07:28:00 GMT"
            ))),
            None
        );
    }
}
