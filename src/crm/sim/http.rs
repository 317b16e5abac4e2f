//! Small HTTP pieces the simulated APIs share: the answer type, query parameters, Basic
//! auth, path decoding.

use http::header::{HeaderName, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use serde_json::Value;
use subtle::ConstantTimeEq;

use crate::{empty_body, full_body, Body};

/// WordPress answers REST requests with this content type; the others say `application/json`.
pub(super) const WP_JSON: &str = "application/json; charset=UTF-8";
const JSON: &str = "application/json";

/// One answer, built by a simulated API or the control API and sent by `Sim::handle`.
#[derive(Debug)]
pub(super) struct Answer {
    pub status: StatusCode,
    /// `None`: an empty body (Agile CRM's `204`).
    pub body: Option<Value>,
    pub content_type: &'static str,
    /// Extra headers (`Retry-After`, `Allow`); a list, to keep the answer small.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Answer {
    pub fn json(status: StatusCode, body: Value) -> Self {
        Answer {
            status,
            body: Some(body),
            content_type: JSON,
            headers: Vec::new(),
        }
    }

    pub fn empty(status: StatusCode) -> Self {
        Answer {
            status,
            body: None,
            content_type: JSON,
            headers: Vec::new(),
        }
    }

    /// The same answer with another content type.
    pub fn typed(mut self, content_type: &'static str) -> Self {
        self.content_type = content_type;
        self
    }

    pub fn retry_after(self, secs: u64) -> Self {
        self.header(RETRY_AFTER, &secs.to_string())
    }

    pub fn header(mut self, name: HeaderName, value: &str) -> Self {
        if let Ok(value) = HeaderValue::from_str(value) {
            self.headers.push((name, value));
        }
        self
    }

    pub fn into_response(self) -> Response<Body> {
        let mut resp = match &self.body {
            Some(value) => {
                let mut resp = Response::new(full_body(value.to_string()));
                resp.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
                resp
            }
            None => Response::new(empty_body()),
        };
        *resp.status_mut() = self.status;
        for (name, value) in self.headers {
            resp.headers_mut().insert(name, value);
        }
        resp
    }
}

/// The first value of query parameter `name` (form-decoded).
pub(super) fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// Every value of query parameter `name` (`with[]=a&with[]=b`).
pub(super) fn query_values(query: Option<&str>, name: &str) -> Vec<String> {
    let Some(query) = query else {
        return Vec::new();
    };
    form_urlencoded::parse(query.as_bytes())
        .filter(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
        .collect()
}

/// A percent-encoded path segment, decoded. `+` stays `+` (in paths it is not a space, and
/// emails like `deleted+ann@example.com` contain it), so it is escaped before form-decoding.
pub(super) fn decode_segment(segment: &str) -> String {
    let escaped = segment.replace('+', "%2B");
    form_urlencoded::parse(format!("s={escaped}").as_bytes())
        .next()
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default()
}

/// The user and password of an `Authorization: Basic` header.
pub(super) fn basic_auth(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(base64_decode(encoded.trim())?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// Standard base64 with optional padding; `None` on anything else. Ten lines instead of a
/// crate, for one header.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        acc = (acc << 6) | value(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // A lone trailing character (6 bits) cannot be valid base64.
    (bits < 6).then_some(out)
}

/// Compare a presented secret with the real one in constant time.
pub(super) fn secret_eq(given: &str, expected: &str) -> bool {
    given.as_bytes().ct_eq(expected.as_bytes()).into()
}

/// A JSON scalar as the text a CRM field holds (`null` is empty); `None` for arrays and
/// objects, which no simulated field takes.
pub(super) fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Null => Some(String::new()),
        Value::Array(_) | Value::Object(_) => None,
    }
}

/// The path below `prefix`, split at `/` (a trailing `/` ignored); `None` outside `prefix`.
pub(super) fn segments<'a>(path: &'a str, prefix: &str) -> Option<Vec<&'a str>> {
    let rest = path.strip_prefix(prefix)?;
    if !rest.is_empty() && !rest.starts_with('/') {
        return None;
    }
    Some(
        rest.trim_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        assert_eq!(
            base64_decode("c2ltQGV4YW1wbGUuY29tOnNpbS1rZXk=").as_deref(),
            Some(&b"sim@example.com:sim-key"[..])
        );
        assert_eq!(base64_decode("YQ==").as_deref(), Some(&b"a"[..]));
        assert_eq!(base64_decode("YWI").as_deref(), Some(&b"ab"[..]));
        assert_eq!(base64_decode("").as_deref(), Some(&b""[..]));
        assert_eq!(base64_decode("Y"), None);
        assert_eq!(base64_decode("a*b="), None);
    }

    #[test]
    fn basic_auth_header() {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Basic dTpwOnc="),
        );
        assert_eq!(basic_auth(&headers), Some(("u".into(), "p:w".into())));
        headers.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer dTpw"),
        );
        assert_eq!(basic_auth(&headers), None);
    }

    #[test]
    fn segments_keep_plus_signs() {
        assert_eq!(
            decode_segment("deleted+ann%40example.com"),
            "deleted+ann@example.com"
        );
        assert_eq!(decode_segment("a%20b"), "a b");
    }

    #[test]
    fn query_parameters() {
        let q = Some("with%5B%5D=subscriber.custom_values&with[]=x&get_by_email=a%2Bb%40x.org");
        assert_eq!(query_values(q, "with[]"), ["subscriber.custom_values", "x"]);
        assert_eq!(query_param(q, "get_by_email").as_deref(), Some("a+b@x.org"));
        assert_eq!(query_param(None, "x"), None);
    }
}
