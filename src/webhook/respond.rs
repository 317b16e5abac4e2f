//! Webhook answers (DESIGN §3): the one place a webhook outcome becomes an HTTP response,
//! JSON for CRMs and scripts, an HTML page of the same outcome for a browser.
//!
//! JSON is `{"ok":bool,"status":STR,...}`; errors add `"error":CODE,"message":TEXT`. Nothing
//! here ever holds the access key: answers are built from parsed fields, not from the URL.

use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Response, StatusCode};
use serde_json::{Map, Value};

use crate::queue::{Action, ContactId, JobId};
use crate::Body;

/// What happened to one webhook request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Queued {
        job: JobId,
        action: Action,
        contact: ContactId,
    },
    Coalesced {
        job: JobId,
        action: Action,
        contact: ContactId,
    },
    Duplicate {
        job: JobId,
        contact: ContactId,
    },
    /// A loopback lock holds the contact: the webhook is the echo of our own write.
    Locked {
        contact: ContactId,
        remaining: Duration,
    },
    /// `respond = "sync"`: the job ran.
    Done {
        job: JobId,
        contact: ContactId,
        result: String,
        /// Direct mode: the contact as loaded and what changed in the user store.
        report: Option<Arc<Value>>,
    },
    /// `wpf_action=test`.
    Test,
    /// `wpf_action=lock`: the site locked a contact.
    LockSet {
        contact: ContactId,
        ttl: Duration,
    },
    /// A request that is refused or failed; nothing was queued (or, for 422, the job failed).
    Error(Rejection),
}

/// An error answer: status, machine-readable code, human message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<Duration>,
    /// The job, for a sync-mode permanent failure.
    pub job: Option<JobId>,
}

impl Rejection {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Rejection {
            status,
            code,
            message: message.into(),
            retry_after: None,
            job: None,
        }
    }

    pub fn retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }
}

impl From<Rejection> for Answer {
    fn from(r: Rejection) -> Self {
        Answer::Error(r)
    }
}

impl Answer {
    pub fn status(&self) -> StatusCode {
        match self {
            Answer::Queued { .. } | Answer::Coalesced { .. } => StatusCode::ACCEPTED,
            Answer::Duplicate { .. }
            | Answer::Locked { .. }
            | Answer::Done { .. }
            | Answer::Test
            | Answer::LockSet { .. } => StatusCode::OK,
            Answer::Error(r) => r.status,
        }
    }

    /// The `status` field, or the error code for errors (activity log, metrics).
    pub fn outcome(&self) -> &'static str {
        match self {
            Answer::Queued { .. } => "queued",
            Answer::Coalesced { .. } => "coalesced",
            Answer::Duplicate { .. } => "duplicate",
            Answer::Locked { .. } => "locked",
            Answer::Done { .. } => "done",
            Answer::Test => "ok",
            Answer::LockSet { .. } => "lock_set",
            Answer::Error(r) => r.code,
        }
    }

    /// [`to_json`](Self::to_json) as text. The answers of every admitted webhook are written
    /// straight from their fields (one allocation; the `Value` map took a dozen per answer),
    /// byte for byte as the map writes them: keys in its (sorted) order.
    fn json_text(&self) -> String {
        #[derive(serde::Serialize)]
        struct Admitted<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            action: Option<&'static str>,
            contact_id: &'a str,
            job: i64,
            ok: bool,
            status: &'static str,
        }
        let admitted = match self {
            Answer::Queued {
                job,
                action,
                contact,
            }
            | Answer::Coalesced {
                job,
                action,
                contact,
            } => Some((job, Some(action.as_str()), contact)),
            Answer::Duplicate { job, contact } => Some((job, None, contact)),
            _ => None,
        };
        let text = admitted.and_then(|(job, action, contact)| {
            serde_json::to_string(&Admitted {
                action,
                contact_id: contact.as_str(),
                job: job.0,
                ok: true,
                status: self.outcome(),
            })
            .ok()
        });
        text.unwrap_or_else(|| self.to_json().to_string())
    }

    /// The JSON body.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        let ok = !matches!(self, Answer::Error(_));
        m.insert("ok".into(), ok.into());
        match self {
            Answer::Queued {
                job,
                action,
                contact,
            } => {
                m.insert("status".into(), "queued".into());
                m.insert("job".into(), job.0.into());
                m.insert("action".into(), action.as_str().into());
                m.insert("contact_id".into(), contact.as_str().into());
            }
            Answer::Coalesced {
                job,
                action,
                contact,
            } => {
                m.insert("status".into(), "coalesced".into());
                m.insert("job".into(), job.0.into());
                m.insert("action".into(), action.as_str().into());
                m.insert("contact_id".into(), contact.as_str().into());
            }
            Answer::Duplicate { job, contact } => {
                m.insert("status".into(), "duplicate".into());
                m.insert("job".into(), job.0.into());
                m.insert("contact_id".into(), contact.as_str().into());
            }
            Answer::Locked { contact, remaining } => {
                m.insert("status".into(), "locked".into());
                m.insert("contact_id".into(), contact.as_str().into());
                m.insert("lock_remaining".into(), ceil_secs(*remaining).into());
            }
            Answer::Done {
                job,
                contact,
                result,
                report,
            } => {
                m.insert("status".into(), "done".into());
                m.insert("job".into(), job.0.into());
                m.insert("contact_id".into(), contact.as_str().into());
                m.insert("result".into(), result.as_str().into());
                if let Some(report) = report {
                    m.insert("report".into(), Value::clone(report));
                }
            }
            Answer::Test => {
                m.insert("status".into(), "ok".into());
                m.insert("success".into(), true.into());
            }
            Answer::LockSet { contact, ttl } => {
                m.insert("status".into(), "locked".into());
                m.insert("contact_id".into(), contact.as_str().into());
                m.insert("ttl".into(), ceil_secs(*ttl).into());
            }
            Answer::Error(r) => {
                m.insert(
                    "status".into(),
                    if r.status == StatusCode::UNPROCESSABLE_ENTITY {
                        "failed"
                    } else {
                        "error"
                    }
                    .into(),
                );
                m.insert("error".into(), r.code.into());
                m.insert("message".into(), r.message.as_str().into());
                if let Some(job) = r.job {
                    m.insert("job".into(), job.0.into());
                }
                if let Some(wait) = r.retry_after {
                    m.insert("retry_after".into(), ceil_secs(wait).into());
                }
            }
        }
        Value::Object(m)
    }

    /// A small self-contained HTML page of the same outcome (every value escaped).
    pub fn to_html(&self) -> String {
        let json = self.to_json();
        let (colour, title) = match self {
            Answer::Error(_) => ("#d63638", "Webhook refused"),
            Answer::Duplicate { .. } | Answer::Locked { .. } => ("#dba617", "Webhook ignored"),
            Answer::Queued { .. } | Answer::Coalesced { .. } => ("#2271b1", "Webhook accepted"),
            _ => ("#00a32a", "Webhook processed"),
        };
        let rows = match &json {
            Value::Object(m) => html_rows(m),
            _ => String::new(),
        };
        format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title>\
             <style>body{{font:15px sans-serif;margin:2em}}.n{{border-left:4px solid {colour};\
             padding:.5em 1em;background:#fff;box-shadow:0 1px 1px rgba(0,0,0,.1)}}\
             th{{text-align:left;padding-right:1em}}</style></head><body>\
             <div class=\"n\"><h1>{title}</h1><table>{rows}</table></div>\
             <p>wpf-gateway</p></body></html>\n"
        )
    }

    /// The HTTP response: JSON, or HTML when the client prefers it.
    pub fn into_response(self, html: bool) -> Response<Body> {
        let status = self.status();
        let retry_after = match &self {
            Answer::Error(r) => r.retry_after,
            _ => None,
        };
        let (body, content_type) = if html {
            (self.to_html(), "text/html; charset=utf-8")
        } else {
            let mut text = self.json_text();
            text.push('\n');
            (text, "application/json")
        };
        let mut resp = Response::new(crate::full_body(body));
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        if let Some(wait) = retry_after {
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(ceil_secs(wait)));
        }
        resp
    }
}

/// Table rows of an object: nested objects become nested tables (a sync answer's report:
/// the contact's fields, the user), arrays comma-separated lists. Every key and value is
/// escaped: CRM data is whatever someone typed into the CRM.
fn html_rows(object: &Map<String, Value>) -> String {
    let mut rows = String::new();
    for (k, v) in object {
        rows.push_str(&format!(
            "<tr><th>{}</th><td>{}</td></tr>",
            escape_html(k),
            html_value(v)
        ));
    }
    rows
}

fn html_value(value: &Value) -> String {
    match value {
        Value::String(s) => escape_html(s),
        Value::Object(m) => format!("<table>{}</table>", html_rows(m)),
        Value::Array(items) => items.iter().map(html_value).collect::<Vec<_>>().join(", "),
        other => escape_html(&other.to_string()),
    }
}

/// Whole seconds, rounded up, at least 1 (for `Retry-After`).
pub fn ceil_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

/// Does the client prefer HTML to JSON (a browser opening the webhook URL)? Compares the
/// `Accept` q-values of `text/html` and `application/json`; `*/*` counts for both, so curl
/// and CRMs get JSON.
pub fn prefers_html(headers: &HeaderMap) -> bool {
    let mut html = 0.0_f32;
    let mut json = 0.0_f32;
    for value in headers.get_all(http::header::ACCEPT) {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let mut parts = item.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "text/html" | "application/xhtml+xml" => html = html.max(q),
                "application/json" => json = json.max(q),
                "*/*" => {
                    html = html.max(q * 0.999);
                    json = json.max(q);
                }
                _ => {}
            }
        }
    }
    html > json
}

/// Escape text for HTML element content and attribute values.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn contact(id: &str) -> ContactId {
        ContactId::parse(id).unwrap()
    }

    #[test]
    fn admitted_answers_are_written_as_their_json_value() {
        for id in ["42", "a\"b\\c</script>", "é 7"] {
            let answers = [
                Answer::Queued {
                    job: JobId(7),
                    action: Action::Update,
                    contact: contact(id),
                },
                Answer::Coalesced {
                    job: JobId(i64::MAX),
                    action: Action::UpdateTags,
                    contact: contact(id),
                },
                Answer::Duplicate {
                    job: JobId(1),
                    contact: contact(id),
                },
            ];
            for answer in answers {
                assert_eq!(answer.json_text(), answer.to_json().to_string());
            }
        }
    }

    #[test]
    fn json_shapes_follow_the_contract() {
        let q = Answer::Queued {
            job: JobId(7),
            action: Action::Update,
            contact: contact("42"),
        };
        assert_eq!(q.status(), StatusCode::ACCEPTED);
        assert_eq!(
            q.to_json(),
            json!({"ok":true,"status":"queued","job":7,"action":"update","contact_id":"42"})
        );
        assert_eq!(
            Answer::Test.to_json(),
            json!({"ok":true,"status":"ok","success":true})
        );
        let e = Answer::Error(
            Rejection::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "slow down")
                .retry_after(Duration::from_millis(1500)),
        );
        assert_eq!(
            e.to_json(),
            json!({"ok":false,"status":"error","error":"rate_limited","message":"slow down","retry_after":2})
        );
        let resp = e.into_response(false);
        assert_eq!(resp.headers()[RETRY_AFTER], "2");
    }

    #[test]
    fn html_escapes_everything() {
        let a = Answer::Done {
            job: JobId(1),
            contact: contact("<script>alert(1)</script>"),
            result: "a & b".into(),
            report: Some(Arc::new(serde_json::json!({
                "contact": {
                    "fields": {"firstName": "<script>alert(1)</script>", "<b>": "x"},
                    "tags": ["<i>VIP</i>", "a\"b"],
                },
            }))),
        };
        let html = a.to_html();
        assert!(!html.contains("<script>"), "{html}");
        assert!(!html.contains("<b>") && !html.contains("<i>"), "{html}");
        assert!(html.contains("&lt;script&gt;"));
        assert!(html.contains("a &amp; b"));
        assert!(html.contains("&lt;i&gt;VIP&lt;/i&gt;, a&quot;b"), "{html}");
    }

    #[test]
    fn browsers_get_html_scripts_get_json() {
        let mut h = HeaderMap::new();
        assert!(!prefers_html(&h));
        h.insert(
            http::header::ACCEPT,
            HeaderValue::from_static(
                "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
            ),
        );
        assert!(prefers_html(&h));
        h.insert(http::header::ACCEPT, HeaderValue::from_static("*/*"));
        assert!(!prefers_html(&h));
        h.insert(
            http::header::ACCEPT,
            HeaderValue::from_static("application/json, text/html;q=0.5"),
        );
        assert!(!prefers_html(&h));
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(3)), 3);
        assert_eq!(ceil_secs(Duration::from_millis(3001)), 4);
    }
}
