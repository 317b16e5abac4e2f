//! What the three adapters share on the wire: one reqwest client per account, pacing before
//! every call, and the classification of answers into transient and permanent [`CrmError`]s.
//!
//! ```text
//! pacer.ready() -> send (connect + request timeouts, no redirects)
//!     -> 2xx or a status the call expects (e.g. 404) : read the body (at most MAX_BODY)
//!     -> anything else : Retry-After -> pause the account on 429/503 -> classify
//! ```
//!
//! TLS is rustls with the ring provider and the webpki roots, as for upstreams (proxy.rs):
//! reqwest is built without a provider of its own, so neither OpenSSL nor aws-lc is linked.
//! Error reasons name the status or the root cause only: never a URL, a header or a key.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, ACCEPT, RETRY_AFTER};
use http::StatusCode;
use hyper_rustls::ConfigBuilderExt;
use reqwest::{RequestBuilder, Response, Url};
use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::{CrmError, CrmSetupError};
use crate::config::{CrmConfig, Secret};
use crate::pace::Pacer;

/// Largest answer read; a contact is a few KiB.
const MAX_BODY: usize = 4 << 20;
/// Connecting never waits longer than this, even with a long request timeout.
const CONNECT_TIMEOUT_MAX: Duration = Duration::from_secs(10);
/// A longer `Retry-After` is cut to this (as relay mode does).
const RETRY_AFTER_MAX: Duration = Duration::from_secs(24 * 3600);

/// How an account authenticates.
pub(crate) enum Auth {
    /// A header of its own (ActiveCampaign's `Api-Token`), sent marked as sensitive.
    Header(HeaderName, HeaderValue),
    /// HTTP Basic (FluentCRM application password, Agile CRM email + API key).
    Basic { user: String, password: Secret },
}

impl Auth {
    /// `name: key`, or [`CrmSetupError::BadApiKey`] when the key cannot be a header value.
    pub(crate) fn header(name: &'static str, key: &Secret) -> Result<Self, CrmSetupError> {
        let mut value =
            HeaderValue::from_str(key.expose()).map_err(|_| CrmSetupError::BadApiKey)?;
        value.set_sensitive(true);
        Ok(Auth::Header(HeaderName::from_static(name), value))
    }

    /// HTTP Basic as `config.user`, with `config.api_key` as the password.
    pub(crate) fn basic(config: &CrmConfig, kind: &'static str) -> Result<Self, CrmSetupError> {
        Ok(Auth::Basic {
            user: config
                .user
                .clone()
                .ok_or(CrmSetupError::MissingUser(kind))?,
            password: config.api_key.clone(),
        })
    }
}

/// One CRM account's HTTP side: client, pacer, base URL and credentials.
pub(crate) struct Api {
    client: reqwest::Client,
    pacer: Arc<Pacer>,
    on_answer: Option<super::AnswerHook>,
    /// `{crm.url}{api_path}`, e.g. `https://acct.api-us1.com/api/3`.
    base: Url,
    auth: Auth,
    timeout: Duration,
}

impl fmt::Debug for Api {
    // The base URL carries no secret (config refuses user info); the credentials stay out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Api")
            .field("base", &self.base.as_str())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Api {
    /// A client for `{crm_url}{api_path}` with connect and request timeouts.
    pub(crate) fn new(
        crm_url: &str,
        api_path: &str,
        auth: Auth,
        link: super::Link,
    ) -> Result<Self, CrmSetupError> {
        let super::Link {
            pacer,
            timeout,
            on_answer,
        } = link;
        let base = Url::parse(&format!("{}{api_path}", crm_url.trim_end_matches('/')))
            .map_err(|e| CrmSetupError::Url(e.to_string()))?;
        if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
            return Err(CrmSetupError::Url("expected http:// or https://".into()));
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_webpki_roots()
        .with_no_client_auth();
        let mut headers = http::HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(timeout.min(CONNECT_TIMEOUT_MAX))
            .timeout(timeout)
            // A redirect would carry `Api-Token` to wherever it points; a CRM API that
            // redirects is misconfigured (http -> https), which the 3xx reason says.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("wpf-gateway/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .build()
            .map_err(|e| CrmSetupError::Client(root_cause(&e.without_url())))?;
        Ok(Api {
            client,
            pacer,
            on_answer,
            base,
            auth,
            timeout,
        })
    }

    /// The base URL with `segments` appended, each percent-encoded, so an id or an email
    /// can never change the path (`/`, `?`, `#` are escaped).
    pub(crate) fn url<'s>(&self, segments: impl IntoIterator<Item = &'s str>) -> Url {
        let mut url = self.base.clone();
        // `new` refused bases that cannot be a base, the only case where this is `Err`.
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// A GET of `url`, authenticated.
    pub(crate) fn get(&self, url: Url) -> RequestBuilder {
        self.authorize(self.client.get(url))
    }

    /// A PUT of `body` as JSON to `url`, authenticated.
    pub(crate) fn put_json(&self, url: Url, body: &Value) -> RequestBuilder {
        self.authorize(self.client.put(url).json(body))
    }

    fn authorize(&self, request: RequestBuilder) -> RequestBuilder {
        match &self.auth {
            Auth::Header(name, value) => request.header(name.clone(), value.clone()),
            // reqwest marks the Authorization header it builds as sensitive.
            Auth::Basic { user, password } => request.basic_auth(user, Some(password.expose())),
        }
    }

    /// Wait for the account's pacer, send, and read the answer when its status is a success
    /// or one of `expected` (how this call's CRM says "not found"). Any other status is an
    /// error: 429/503 with `Retry-After` pause the whole account first.
    pub(crate) async fn send(
        &self,
        request: RequestBuilder,
        expected: &[StatusCode],
    ) -> Result<Answer, CrmError> {
        self.pacer.ready().await;
        let sent = request.send().await;
        if let Some(hook) = &self.on_answer {
            match &sent {
                Ok(response) => hook(response.status().as_str()),
                Err(_) => hook("error"),
            }
        }
        let response = sent.map_err(|e| self.send_error(&e))?;
        let status = response.status();
        if !status.is_success() && !expected.contains(&status) {
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now()));
            if let Some(wait) = retry_after {
                if matches!(
                    status,
                    StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
                ) {
                    self.pacer.pause(wait);
                }
            }
            return Err(classify(status, retry_after));
        }
        let body = self.read_body(response).await?;
        Ok(Answer { status, body })
    }

    async fn read_body(&self, mut response: Response) -> Result<Bytes, CrmError> {
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| self.send_error(&e))? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(CrmError::transient(format!(
                    "CRM answer is larger than {} MiB",
                    MAX_BODY >> 20
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.into())
    }

    /// A failed exchange: unreachable, timed out, or cut off. All transient.
    fn send_error(&self, error: &reqwest::Error) -> CrmError {
        let reason = if error.is_timeout() {
            format!("CRM did not answer within {:?}", self.timeout)
        } else if error.is_connect() {
            format!("CRM unreachable: {}", root_cause(error))
        } else {
            format!("CRM exchange failed: {}", root_cause(error))
        };
        CrmError::transient(reason)
    }
}

/// A CRM answer that was read: a success or one of the statuses the call expected.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) body: Bytes,
}

impl Answer {
    /// No body, or only white space (Agile CRM's 204, an empty 200).
    pub(crate) fn is_empty(&self) -> bool {
        self.body.iter().all(u8::is_ascii_whitespace)
    }

    /// The body decoded as `T`. A body that is not what the API documents is transient: a
    /// proxy's error page or a half-deployed CRM is usually gone on the next try.
    pub(crate) fn json<T: DeserializeOwned>(&self) -> Result<T, CrmError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            CrmError::transient(format!(
                "CRM answered {} with unexpected JSON: {e}",
                self.status.as_u16()
            ))
        })
    }
}

#[cfg(test)]
impl Answer {
    /// An answer as the adapters' decoders see it.
    pub(crate) fn sample(status: u16, body: &str) -> Self {
        Answer {
            status: StatusCode::from_u16(status).unwrap(),
            body: Bytes::copy_from_slice(body.as_bytes()),
        }
    }
}

/// A contact's fields as `(name, value)` pairs, sorted by name (test assertions).
#[cfg(test)]
pub(crate) fn field_pairs(contact: &super::Contact) -> Vec<(&str, &str)> {
    contact
        .fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// What a status that is neither a success nor expected by the call means.
///
/// 408, 429 and 5xx are transient (with the `Retry-After` the CRM sent); 401/403 mean the
/// credentials are wrong; redirects are not followed (see [`Api::new`]); any other 4xx is a
/// request the CRM will never accept.
pub(crate) fn classify(status: StatusCode, retry_after: Option<Duration>) -> CrmError {
    let code = status.as_u16();
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => CrmError::Permanent {
            code: "invalid_credentials",
            reason: format!("CRM refused the credentials ({code})"),
        },
        StatusCode::TOO_MANY_REQUESTS | StatusCode::REQUEST_TIMEOUT => CrmError::Transient {
            reason: format!("CRM answered {code}"),
            retry_after,
        },
        s if s.is_server_error() => CrmError::Transient {
            reason: format!("CRM answered {code}"),
            retry_after,
        },
        s if s.is_redirection() => CrmError::Permanent {
            code: "rejected",
            reason: format!("CRM answered {code} (a redirect: check crm.url, e.g. https://)"),
        },
        s if s.is_client_error() => CrmError::Permanent {
            code: "rejected",
            reason: format!("CRM rejected the request ({code})"),
        },
        _ => CrmError::Transient {
            reason: format!("CRM answered {code}"),
            retry_after,
        },
    }
}

/// `Retry-After` as delay-seconds or an HTTP date (RFC 9110 §10.2.3), measured from `now`;
/// a date in the past is no wait. Capped at a day.
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // All digits but too many for u64: as long as the cap anyway.
        Duration::from_secs(value.parse().unwrap_or(u64::MAX))
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(RETRY_AFTER_MAX))
}

/// The innermost cause of an error (an OS error like "Connection refused"): short, and
/// without the URL that reqwest's own message carries.
fn root_cause(error: &(dyn StdError + 'static)) -> String {
    let mut cause = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// A CRM id as text, from a JSON string or an integer (up to 64-bit, read exactly: serde_json
/// hands integers over as `u64`/`i64`, never through `f64`). Fractions are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Id(pub(crate) String);

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IdVisitor;
        impl Visitor<'_> for IdVisitor {
            type Value = Id;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an id (a string or an integer)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Id, E> {
                Ok(Id(v.to_owned()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Id, E> {
                Ok(Id(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Id, E> {
                Ok(Id(v.to_string()))
            }
        }
        deserializer.deserialize_any(IdVisitor)
    }
}

/// The id in `value`, if it is one (see [`Id`]) and not empty.
pub(crate) fn id_of(value: Option<&Value>) -> Option<String> {
    let Id(id) = Id::deserialize(value?).ok()?;
    (!id.is_empty()).then_some(id)
}

/// A scalar JSON value as field text: `null` is the empty text (a cleared field), numbers
/// keep their digits. Arrays and objects are not scalars: `None`.
pub(crate) fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::Null => Some(String::new()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.clone()),
        Value::Array(_) | Value::Object(_) => None,
    }
}

/// Append `tag` to `tags` unless it is empty or already there (tags keep the CRM's order).
pub(crate) fn push_tag(tags: &mut Vec<String>, tag: &str) {
    let tag = tag.trim();
    if !tag.is_empty() && !tags.iter().any(|t| t == tag) {
        tags.push(tag.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_from_strings_and_exact_64_bit_numbers() {
        let ids: Vec<Id> =
            serde_json::from_str(r#"["7", 7, 5717141784920064, 18446744073709551615, -3]"#)
                .unwrap();
        let ids: Vec<&str> = ids.iter().map(|Id(s)| s.as_str()).collect();
        assert_eq!(
            ids,
            ["7", "7", "5717141784920064", "18446744073709551615", "-3"]
        );
        // Through f64 the 16-digit id would round; fractions and too-large numbers are refused.
        assert!(serde_json::from_str::<Id>("1.5").is_err());
        assert!(serde_json::from_str::<Id>("18446744073709551616").is_err());
        assert!(serde_json::from_str::<Id>("null").is_err());
        assert_eq!(id_of(Some(&serde_json::json!(""))), None);
        assert_eq!(id_of(None), None);
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(
            parse_retry_after(" 12 ", now),
            Some(Duration::from_secs(12))
        );
        assert_eq!(parse_retry_after("0", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        // Obsolete RFC 850 form, as RFC 9110 says recipients must accept.
        assert_eq!(
            parse_retry_after("Wednesday, 21-Oct-15 07:29:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(RETRY_AFTER_MAX)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("", now), None);
    }

    fn code(e: CrmError) -> &'static str {
        match e {
            CrmError::Permanent { code, .. } => code,
            CrmError::Transient { .. } => "transient",
        }
    }

    #[test]
    fn statuses_are_classified() {
        let s = StatusCode::from_u16;
        assert_eq!(code(classify(s(401).unwrap(), None)), "invalid_credentials");
        assert_eq!(code(classify(s(403).unwrap(), None)), "invalid_credentials");
        assert_eq!(code(classify(s(400).unwrap(), None)), "rejected");
        assert_eq!(code(classify(s(404).unwrap(), None)), "rejected");
        assert_eq!(code(classify(s(422).unwrap(), None)), "rejected");
        assert_eq!(code(classify(s(301).unwrap(), None)), "rejected");
        for transient in [408, 429, 500, 502, 503, 504] {
            assert_eq!(code(classify(s(transient).unwrap(), None)), "transient");
        }
        let wait = Some(Duration::from_secs(3));
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, wait),
            CrmError::Transient {
                reason: "CRM answered 429".into(),
                retry_after: wait
            }
        );
    }

    #[test]
    fn scalars_become_text() {
        use serde_json::json;
        assert_eq!(scalar_text(&json!(null)).as_deref(), Some(""));
        assert_eq!(
            scalar_text(&json!(5717141784920064u64)).as_deref(),
            Some("5717141784920064")
        );
        assert_eq!(scalar_text(&json!(true)).as_deref(), Some("true"));
        assert_eq!(scalar_text(&json!("x")).as_deref(), Some("x"));
        assert_eq!(scalar_text(&json!([1])), None);
        assert_eq!(scalar_text(&json!({})), None);
    }

    #[test]
    fn tags_keep_order_without_repeats() {
        let mut tags = Vec::new();
        for t in ["b", "a", " b ", "", "c"] {
            push_tag(&mut tags, t);
        }
        assert_eq!(tags, ["b", "a", "c"]);
    }

    fn api(base: &str) -> Api {
        let auth = Auth::header("api-token", &Secret::new("SECRET-KEY")).unwrap();
        Api::new(
            base,
            "/api/3",
            auth,
            crate::crm::Link::new(Arc::new(Pacer::new(None)), Duration::from_secs(1)),
        )
        .unwrap()
    }

    #[test]
    fn url_segments_are_escaped() {
        let api = api("https://acct.example/sub/");
        assert_eq!(
            api.url(["contacts", "7"]).as_str(),
            "https://acct.example/sub/api/3/contacts/7"
        );
        assert_eq!(
            api.url(["contacts", "../a b?x#y/z"]).as_str(),
            "https://acct.example/sub/api/3/contacts/..%2Fa%20b%3Fx%23y%2Fz"
        );
    }

    #[test]
    fn setup_errors_and_debug_hide_the_key() {
        assert!(matches!(
            Auth::header("api-token", &Secret::new("bad\nkey")),
            Err(CrmSetupError::BadApiKey)
        ));
        let auth = Auth::header("api-token", &Secret::new("k")).unwrap();
        let err = Api::new(
            "mailto:x",
            "/api/3",
            auth,
            crate::crm::Link::new(Arc::new(Pacer::new(None)), Duration::from_secs(1)),
        )
        .unwrap_err();
        assert!(matches!(err, CrmSetupError::Url(_)), "{err}");
        let shown = format!("{:?}", api("https://a.example"));
        assert!(
            !shown.contains("SECRET") && shown.contains("a.example"),
            "{shown}"
        );
    }
}
