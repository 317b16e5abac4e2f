//! The admin listener over real sockets: health and readiness (503 while draining), metrics
//! that parse as Prometheus text and move, the JSON API (activity filters, jobs by state,
//! replay of a dead job, locks), the bearer token and the browser cookie, CSRF on the
//! status page's Replay form, the status page in a real headless Chromium (CRM values escaped,
//! no injected script element), and secrets absent from every page.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    ALLOW, AUTHORIZATION, CONTENT_TYPE, COOKIE, HOST, LOCATION, ORIGIN, SET_COOKIE,
    WWW_AUTHENTICATE,
};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::support::{eventually, send, Reply, TestGateway, TestUpstream};

/// The site's access key.
const KEY: &str = "admin-test-Key-5151";
/// The admin token (written to a file for `token_file`).
const TOKEN: &str = "admin-Token-9f8e7d6c";
/// Every wait in these tests is bounded by this.
const WAIT: Duration = Duration::from_secs(10);
/// A CRM-controlled value that must be shown as text, never run.
const XSS: &str = "<script>alert(1)</script>";

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// A one-site config with `[admin] listen` (the harness binds it on 127.0.0.1:0).
/// `mode = "direct"` is paused (jobs stay pending), so answers are deterministic.
fn config(upstream: &str, mode: &str, admin_lines: &str) -> String {
    let crm = if mode == "direct" {
        "paused = true\n[site.crm]\nkind = \"activecampaign\"\nurl = \"http://127.0.0.1:9\"\napi_key = \"crm-api-key-77\"\n"
    } else {
        ""
    };
    format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
data_dir = "{{data_dir}}"
shutdown_grace = "5s"

[admin]
listen = "127.0.0.1:0"
{admin_lines}

[[site]]
name = "main"
upstream = "{upstream}"
access_key = "{KEY}"
mode = "{mode}"
{crm}"#
    )
}

/// A loopback URL whose port has no listener.
fn closed_port_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    format!("http://{}", l.local_addr().expect("addr"))
}

/// A token file outside the gateway's data directory (the config is read before it exists).
fn token_file() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("admin-token");
    std::fs::write(&path, format!("{TOKEN}\n")).expect("write token");
    let line = format!("token_file = \"{}\"", path.display());
    (dir, line)
}

// `Reply` (a complete answer) is in support.rs; what only these tests ask of it:
impl Reply {
    fn header(&self, name: http::header::HeaderName) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// A JSON error answer: its status and `error` code.
    fn assert_error(&self, status: StatusCode, code: &str) {
        assert_eq!(self.status, status, "{}", self.text());
        let json = self.json();
        assert_eq!(json["ok"], false, "{json}");
        assert_eq!(json["error"], code, "{json}");
        assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
}

/// A request to `url` with extra headers and a body.
fn request(
    method: Method,
    url: &str,
    headers: &[(http::header::HeaderName, &str)],
    body: &str,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        b = b.header(name, *value);
    }
    b.body(Full::new(Bytes::from(body.to_owned())))
        .expect("request")
}

async fn get(url: &str) -> Reply {
    send(request(Method::GET, url, &[], "")).await
}

async fn get_with(url: &str, headers: &[(http::header::HeaderName, &str)]) -> Reply {
    send(request(Method::GET, url, headers, "")).await
}

async fn post_json(url: &str, body: &Value) -> Reply {
    send(request(
        Method::POST,
        url,
        &[(CONTENT_TYPE, "application/json")],
        &body.to_string(),
    ))
    .await
}

/// A webhook URL with the right key.
fn hook(gw: &TestGateway, action: &str, contact: &str) -> String {
    let q = form_urlencoded::Serializer::new(String::new())
        .append_pair("wpf_action", action)
        .append_pair("access_key", KEY)
        .append_pair("contact_id", contact)
        .finish();
    gw.url(&format!("/?{q}"))
}

async fn webhook(gw: &TestGateway, action: &str, contact: &str) -> Reply {
    send(request(Method::POST, &hook(gw, action, contact), &[], "")).await
}

/// Activity lines from the API (newest first).
async fn activity(gw: &TestGateway, query: &str) -> Vec<Value> {
    let r = get(&gw.admin_url(&format!("/api/activity{query}"))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()["activity"].as_array().expect("activity").clone()
}

/// Jobs from the API (newest first).
async fn jobs(gw: &TestGateway, query: &str) -> Vec<Value> {
    let r = get(&gw.admin_url(&format!("/api/jobs{query}"))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()["jobs"].as_array().expect("jobs").clone()
}

// ---------------------------------------------------------------------------------------------
// A Prometheus text-format (0.0.4) reader, strict enough to catch a malformed exposition
// ---------------------------------------------------------------------------------------------

/// Samples by `name{labels}` (labels as written), after checking every line's syntax and that
/// each sample belongs to a family announced by `# TYPE`.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    fn valid_name(name: &str) -> bool {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap_or("");
            let name = parts.next().unwrap_or("");
            assert!(valid_name(name), "bad name in {}", at());
            match kind {
                "HELP" => {}
                "TYPE" => {
                    let ty = parts.next().unwrap_or("");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty),
                        "bad type in {}",
                        at()
                    );
                    assert!(
                        types.insert(name.to_owned(), ty.to_owned()).is_none(),
                        "family typed twice: {}",
                        at()
                    );
                }
                _ => panic!("unknown comment in {}", at()),
            }
            continue;
        }
        assert!(!line.starts_with('#'), "bad comment in {}", at());
        let name_end = line.find(['{', ' ']).unwrap_or_else(|| panic!("{}", at()));
        let name = &line[..name_end];
        assert!(valid_name(name), "bad sample name in {}", at());
        let mut rest = &line[name_end..];
        let mut labels = String::new();
        if rest.starts_with('{') {
            // k="v" pairs, values with \\ \" \n escapes, separated by commas.
            let bytes = rest.as_bytes();
            let mut i = 1;
            loop {
                if bytes[i] == b'}' {
                    break;
                }
                let eq = rest[i..].find('=').unwrap_or_else(|| panic!("{}", at())) + i;
                assert!(valid_name(&rest[i..eq]), "bad label name in {}", at());
                assert_eq!(bytes[eq + 1], b'"', "unquoted label in {}", at());
                let mut j = eq + 2;
                while bytes[j] != b'"' {
                    if bytes[j] == b'\\' {
                        assert!(
                            matches!(bytes[j + 1], b'\\' | b'"' | b'n'),
                            "bad escape in {}",
                            at()
                        );
                        j += 1;
                    }
                    j += 1;
                }
                i = j + 1;
                if bytes[i] == b',' {
                    i += 1;
                }
            }
            labels = rest[..=i].to_owned();
            rest = &rest[i + 1..];
        }
        let value = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("no value in {}", at()));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {}", at())),
        };
        let family_ok = types.contains_key(name)
            || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .and_then(|base| types.get(base))
                    .is_some_and(|ty| ty == "histogram" || ty == "summary")
            });
        assert!(family_ok, "sample without # TYPE in {}", at());
        samples.insert(format!("{name}{labels}"), value);
    }
    samples
}

async fn scrape(gw: &TestGateway, headers: &[(http::header::HeaderName, &str)]) -> Reply {
    let r = get_with(&gw.admin_url("/metrics"), headers).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r
}

async fn metrics(gw: &TestGateway) -> HashMap<String, f64> {
    let r = scrape(gw, &[]).await;
    assert_eq!(
        r.header(CONTENT_TYPE),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    parse_prometheus(&r.text())
}

fn value(samples: &HashMap<String, f64>, key: &str) -> f64 {
    samples.get(key).copied().unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------------
// Health and readiness
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn health_is_up_and_ready_turns_503_while_draining() {
    let arrived = Arc::new(Notify::new());
    let seen = arrived.clone();
    let upstream = TestUpstream::start(move |_req| {
        let seen = seen.clone();
        async move {
            seen.notify_one();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Response::new(Full::new(Bytes::from_static(b"slow")))
        }
    })
    .await;
    let gw = TestGateway::start(&config(&upstream.url(), "relay", "")).await;
    let r = get(&gw.admin_url("/healthz")).await;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "ok\n"));
    let r = get(&gw.admin_url("/readyz")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = send(request(Method::POST, &gw.admin_url("/healthz"), &[], "")).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.header(ALLOW), Some("GET, HEAD"));

    let slow_url = gw.url("/slow");
    let slow = tokio::spawn(async move { get(&slow_url).await });
    tokio::time::timeout(WAIT, arrived.notified())
        .await
        .expect("the slow request reached the upstream");
    gw.shutdown.cancel();
    let r = eventually("readyz 503", || async {
        let r = get(&gw.admin_url("/readyz")).await;
        (r.status != StatusCode::OK).then_some(r)
    })
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.text(), "draining\n");
    // Still alive while it drains.
    let r = get(&gw.admin_url("/healthz")).await;
    assert_eq!(r.status, StatusCode::OK);
    let slow = slow.await.expect("slow request task");
    assert_eq!(
        (slow.status, slow.text().as_str()),
        (StatusCode::OK, "slow")
    );
    tokio::time::timeout(WAIT, gw.task)
        .await
        .expect("run returns")
        .expect("joined")
        .expect("clean stop");
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_move_with_traffic() {
    let upstream =
        TestUpstream::start(|_req| async { Response::new(Full::new(Bytes::from("page"))) }).await;
    let gw = TestGateway::start(&config(&upstream.url(), "direct", "")).await;
    let before = metrics(&gw).await;
    for family in [
        "wpf_gateway_build_info{version=\"",
        "wpf_gateway_locks_held",
        "wpf_gateway_tls_handshakes_total",
        "wpf_gateway_tls_handshake_failures_total",
        "wpf_gateway_queue_jobs{state=\"pending\"}",
    ] {
        assert!(
            before.keys().any(|k| k.starts_with(family)),
            "{family} missing: {before:?}"
        );
    }
    let r = webhook(&gw, "update", "1").await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let r = get(&gw.url("/some/page")).await;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "page"));
    let r = webhook(&gw, "bogus!", "1").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // Requests are counted when their answer's body ends; give that a moment.
    let after = eventually("request counters", || async {
        let m = metrics(&gw).await;
        let moved = value(
            &m,
            "wpf_gateway_requests_total{site=\"main\",status=\"200\"}",
        ) >= value(
            &before,
            "wpf_gateway_requests_total{site=\"main\",status=\"200\"}",
        ) + 1.0
            && value(
                &m,
                "wpf_gateway_requests_total{site=\"main\",status=\"202\"}",
            ) >= 1.0
            && value(
                &m,
                "wpf_gateway_requests_total{site=\"main\",status=\"400\"}",
            ) >= 1.0;
        moved.then_some(m)
    })
    .await;
    assert_eq!(
        value(
            &after,
            "wpf_gateway_webhooks_total{site=\"main\",action=\"update\",outcome=\"queued\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "wpf_gateway_webhooks_total{site=\"main\",action=\"invalid\",outcome=\"invalid_action\"}"
        ),
        1.0
    );
    assert!(
        value(
            &after,
            "wpf_gateway_upstream_duration_seconds_count{site=\"main\"}"
        ) >= 1.0
    );
    assert!(
        value(
            &after,
            "wpf_gateway_upstream_duration_seconds_bucket{site=\"main\",le=\"+Inf\"}"
        ) >= 1.0
    );
    assert_eq!(
        value(&after, "wpf_gateway_queue_jobs{state=\"pending\"}"),
        1.0
    );
    // Families with samples are announced with their type (empty ones are left out).
    let text = scrape(&gw, &[]).await.text();
    for typed in [
        "# TYPE wpf_gateway_requests_total counter",
        "# TYPE wpf_gateway_upstream_duration_seconds histogram",
        "# TYPE wpf_gateway_webhooks_total counter",
        "# TYPE wpf_gateway_rate_limited_total counter",
        "# TYPE wpf_gateway_queue_jobs gauge",
        "# TYPE wpf_gateway_locks_held gauge",
    ] {
        assert!(text.contains(typed), "{typed} missing:\n{text}");
    }
    assert_eq!(
        value(&after, "wpf_gateway_rate_limited_total{site=\"main\"}"),
        0.0
    );
    // Admin requests are not site traffic.
    assert!(!after.keys().any(|k| k.contains("status=\"401\"")));
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// JSON API
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn api_activity_filters_and_jobs_by_state() {
    let gw = TestGateway::start(&config(&closed_port_url(), "direct", "")).await;
    for (action, contact, status) in [
        ("update", "1", StatusCode::ACCEPTED),
        ("update", "1", StatusCode::OK), // exact repeat: duplicate
        ("update", "2", StatusCode::ACCEPTED),
        ("add", "3", StatusCode::ACCEPTED),
    ] {
        let r = webhook(&gw, action, contact).await;
        assert_eq!(r.status, status, "{}", r.text());
    }
    // Activity lines are written with the queue's next batch.
    eventually("4 activity lines", || async {
        (activity(&gw, "").await.len() == 4).then_some(())
    })
    .await;
    let rows = activity(&gw, "?contact=1").await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows
        .iter()
        .all(|r| r["contact"] == "1" && r["site"] == "main"));
    let rows = activity(&gw, "?outcome=duplicate").await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["contact"], "1");
    let rows = activity(&gw, "?site=main&outcome=queued&limit=2").await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["contact"], "3", "newest first: {rows:?}");
    assert_eq!(rows[0]["action"], "add");

    get(&gw.admin_url("/api/activity?site=nope"))
        .await
        .assert_error(StatusCode::NOT_FOUND, "unknown_site");
    get(&gw.admin_url("/api/activity?limit=0"))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_limit");
    get(&gw.admin_url("/api/activity?limit=many"))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_limit");
    get(&gw.admin_url("/api/activity?outcome=bogus"))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_outcome");
    get(&gw.admin_url("/api/activity?contcat=1"))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "unknown_parameter");

    let pending = jobs(&gw, "?state=pending").await;
    let mut contacts: Vec<&str> = pending
        .iter()
        .map(|j| j["contact"].as_str().unwrap())
        .collect();
    contacts.sort_unstable();
    assert_eq!(contacts, ["1", "2", "3"]);
    assert!(pending.iter().all(|j| j["state"] == "pending"));
    assert_eq!(jobs(&gw, "?state=pending&limit=1").await.len(), 1);
    assert!(jobs(&gw, "?state=dead").await.is_empty());
    assert_eq!(jobs(&gw, "").await.len(), 3);
    get(&gw.admin_url("/api/jobs?state=stuck"))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_state");

    get(&gw.admin_url("/api/nope"))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    let r = send(request(
        Method::POST,
        &gw.admin_url("/api/activity"),
        &[],
        "",
    ))
    .await;
    r.assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    assert_eq!(r.header(ALLOW), Some("GET, HEAD"));
    // A name that is not an IP or localhost (DNS rebinding) is refused without a token.
    get_with(
        &gw.admin_url("/api/jobs"),
        &[(HOST, "rebound.example.com:9180")],
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "host_not_allowed");
    gw.stop().await;
}

#[tokio::test]
async fn dead_jobs_are_replayed_from_the_api_and_the_status_page() {
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    let upstream = TestUpstream::start(move |_req| {
        let ok = h.load(Ordering::SeqCst);
        async move {
            let mut resp = Response::new(Full::new(Bytes::from(if ok {
                "<h3>Success</h3>"
            } else {
                "busy"
            })));
            if !ok {
                *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            resp
        }
    })
    .await;
    // The config refuses delays under 1 s; the test shortens them after validation.
    let gw = TestGateway::start_with(&config(&upstream.url(), "relay", ""), |c| {
        c.queue.retry_schedule = vec![Duration::from_millis(50)];
        c.queue.retry_until = Duration::from_millis(300);
    })
    .await;
    let mut ids = Vec::new();
    for contact in ["9", "10"] {
        let r = webhook(&gw, "update", contact).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
        ids.push(r.json()["job"].as_i64().unwrap());
    }
    eventually("two dead jobs", || async {
        (jobs(&gw, "?state=dead").await.len() == 2).then_some(())
    })
    .await;
    let m = metrics(&gw).await;
    assert!(
        value(
            &m,
            "wpf_gateway_relay_requests_total{site=\"main\",status=\"503\"}"
        ) >= 2.0
    );
    assert!(
        value(
            &m,
            "wpf_gateway_job_duration_seconds_count{site=\"main\",outcome=\"retry\"}"
        ) >= 2.0
    );
    assert_eq!(value(&m, "wpf_gateway_queue_jobs{state=\"dead\"}"), 2.0);

    healthy.store(true, Ordering::SeqCst);
    // API replay.
    let replay = |id: i64| gw.admin_url(&format!("/api/jobs/{id}/replay"));
    let r = send(request(Method::POST, &replay(ids[0]), &[], "")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"ok": true, "replayed": true, "job": ids[0]})
    );
    send(request(Method::POST, &replay(999_999), &[], ""))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_replayable");
    send(request(
        Method::POST,
        &gw.admin_url("/api/jobs/abc/replay"),
        &[],
        "",
    ))
    .await
    .assert_error(StatusCode::BAD_REQUEST, "invalid_job_id");
    send(request(
        Method::POST,
        &replay(ids[1]),
        &[(ORIGIN, "http://evil.example")],
        "",
    ))
    .await
    .assert_error(StatusCode::FORBIDDEN, "cross_origin");

    // Status page replay: the form's CSRF token is required, and the origin must match.
    let page = get(&gw.admin_url("/")).await;
    assert_eq!(page.status, StatusCode::OK);
    let html = page.text();
    let csrf = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a CSRF field on the Replay form")
        .to_owned();
    assert!(html.contains(&format!("action=\"/jobs/{}/replay\"", ids[1])));
    let form = gw.admin_url(&format!("/jobs/{}/replay", ids[1]));
    let form_ct = (CONTENT_TYPE, "application/x-www-form-urlencoded");
    let r = send(request(
        Method::POST,
        &form,
        std::slice::from_ref(&form_ct),
        "",
    ))
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "no token: {}", r.text());
    let r = send(request(
        Method::POST,
        &form,
        std::slice::from_ref(&form_ct),
        "csrf=not-the-token",
    ))
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "wrong token: {}", r.text());
    let body = format!("csrf={csrf}");
    let r = send(request(
        Method::POST,
        &form,
        &[form_ct.clone(), (ORIGIN, "http://evil.example")],
        &body,
    ))
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "cross-site: {}", r.text());
    let origin = gw.admin_url("");
    let r = send(request(
        Method::POST,
        &form,
        &[form_ct, (ORIGIN, origin.as_str())],
        &body,
    ))
    .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text());
    assert_eq!(
        r.header(LOCATION),
        Some(format!("/?replayed={}", ids[1]).as_str())
    );
    let notice = get(&gw.admin_url(&format!("/?replayed={}", ids[1])))
        .await
        .text();
    assert!(notice.contains(&format!("Job {} is queued again.", ids[1])));

    let done = eventually("both replayed jobs done", || async {
        let done = jobs(&gw, "?state=done").await;
        (done.len() == 2).then_some(done)
    })
    .await;
    let mut done_ids: Vec<i64> = done.iter().map(|j| j["id"].as_i64().unwrap()).collect();
    done_ids.sort_unstable();
    assert_eq!(done_ids, ids);
    let replays = activity(&gw, "?outcome=replay").await;
    assert_eq!(replays.len(), 2, "{replays:?}");
    let m = metrics(&gw).await;
    assert!(
        value(
            &m,
            "wpf_gateway_relay_requests_total{site=\"main\",status=\"200\"}"
        ) >= 2.0
    );
    assert!(
        value(
            &m,
            "wpf_gateway_job_duration_seconds_count{site=\"main\",outcome=\"done\"}"
        ) >= 2.0
    );
    assert_eq!(value(&m, "wpf_gateway_queue_jobs{state=\"dead\"}"), 0.0);
    gw.stop().await;
}

#[tokio::test]
async fn locks_are_set_and_lifted_through_the_api() {
    let gw = TestGateway::start(&config(&closed_port_url(), "direct", "")).await;
    let locks = gw.admin_url("/api/locks");
    let r = post_json(
        &locks,
        &json!({"site": "main", "contact_id": "9", "ttl": 120}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"ok": true, "site": "main", "contact_id": "9", "ttl": 120})
    );
    let r = webhook(&gw, "update", "9").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["status"], "locked");
    assert_eq!(
        value(&metrics(&gw).await, "wpf_gateway_locks_held"),
        1.0,
        "one lock held"
    );

    // A number as contact id; no ttl: the site's loopback_lock (60 s by default).
    let r = post_json(&locks, &json!({"site": "main", "contact_id": 42})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["contact_id"], "42");
    assert_eq!(r.json()["ttl"], 60);

    let unlock = gw.admin_url("/api/locks/main/9");
    let r = send(request(Method::DELETE, &unlock, &[], "")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["unlocked"], true);
    let r = webhook(&gw, "update", "9").await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let r = send(request(Method::DELETE, &unlock, &[], "")).await;
    assert_eq!(r.json()["unlocked"], false);

    post_json(&locks, &json!({"site": "nope", "contact_id": "9"}))
        .await
        .assert_error(StatusCode::NOT_FOUND, "unknown_site");
    post_json(
        &locks,
        &json!({"site": "main", "contact_id": "9", "ttl": 0}),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "invalid_ttl");
    post_json(&locks, &json!({"site": "main"}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "missing_contact_id");
    post_json(&locks, &json!({"contact_id": "9"}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "missing_site");
    send(request(
        Method::POST,
        &locks,
        &[(CONTENT_TYPE, "application/json")],
        "{not json",
    ))
    .await
    .assert_error(StatusCode::BAD_REQUEST, "malformed_body");
    // A cross-site HTML form can only send "simple" content types.
    send(request(
        Method::POST,
        &locks,
        &[(CONTENT_TYPE, "text/plain")],
        &json!({"site": "main", "contact_id": "9"}).to_string(),
    ))
    .await
    .assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    send(request(
        Method::DELETE,
        &gw.admin_url("/api/locks/nope/9"),
        &[],
        "",
    ))
    .await
    .assert_error(StatusCode::NOT_FOUND, "unknown_site");
    send(request(
        Method::DELETE,
        &unlock,
        &[(ORIGIN, "http://evil.example")],
        "",
    ))
    .await
    .assert_error(StatusCode::FORBIDDEN, "cross_origin");
    let r = get(&locks).await;
    r.assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    assert_eq!(r.header(ALLOW), Some("POST"));
    gw.stop().await;
}

/// Direct-mode sites with `[admin]`: the first a catch-all, each other on `NAME.test`.
fn sites_config(upstream: &str, names: &[&str]) -> String {
    let mut text = String::from(
        "[server]\nlisten = [\"127.0.0.1:0\"]\ndata_dir = \"{data_dir}\"\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n",
    );
    for (i, name) in names.iter().enumerate() {
        let hosts = if i == 0 {
            String::new()
        } else {
            format!("hosts = [\"{name}.test\"]\n")
        };
        text.push_str(&format!(
            "\n[[site]]\nname = \"{name}\"\n{hosts}upstream = \"{upstream}\"\n\
             access_key = \"{KEY}\"\nmode = \"direct\"\n[site.crm]\nkind = \"activecampaign\"\n\
             url = \"http://127.0.0.1:9\"\napi_key = \"crm-api-key-77\"\n"
        ));
    }
    text
}

#[tokio::test]
async fn after_a_reload_the_page_and_the_api_know_the_new_sites() {
    let upstream = closed_port_url();
    let gw = TestGateway::start(&sites_config(&upstream, &["main"])).await;
    let locks = gw.admin_url("/api/locks");
    post_json(&locks, &json!({"site": "shop", "contact_id": "9"}))
        .await
        .assert_error(StatusCode::NOT_FOUND, "unknown_site");

    // `main` renamed to `front`, `shop` added.
    gw.write_config(&sites_config(&upstream, &["front", "shop"]));
    gw.reload.reload().await.expect("reload");

    let page = get(&gw.admin_url("/")).await;
    assert_eq!(page.status, StatusCode::OK);
    let page = page.text();
    assert!(page.contains("<tr class=\"site\"><td>front</td>"), "{page}");
    assert!(page.contains("<tr class=\"site\"><td>shop</td><td>shop.test</td>"));
    assert!(!page.contains("<td>main</td>"), "{page}");

    assert!(activity(&gw, "?site=shop").await.is_empty());
    get(&gw.admin_url("/api/activity?site=main"))
        .await
        .assert_error(StatusCode::NOT_FOUND, "unknown_site");

    let r = post_json(&locks, &json!({"site": "shop", "contact_id": "9"})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["site"], "shop");
    // The front door sees the same lock for the same site.
    let r = send(request(
        Method::POST,
        &hook(&gw, "update", "9"),
        &[(HOST, "shop.test")],
        "",
    ))
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["status"], "locked");

    post_json(&locks, &json!({"site": "main", "contact_id": "9"}))
        .await
        .assert_error(StatusCode::NOT_FOUND, "unknown_site");
    send(request(
        Method::DELETE,
        &gw.admin_url("/api/locks/main/9"),
        &[],
        "",
    ))
    .await
    .assert_error(StatusCode::NOT_FOUND, "unknown_site");
    let r = send(request(
        Method::DELETE,
        &gw.admin_url("/api/locks/shop/9"),
        &[],
        "",
    ))
    .await;
    assert_eq!(r.json()["unlocked"], true, "{}", r.text());
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Token
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn token_is_required_when_configured() {
    let (_token_dir, token_line) = token_file();
    let gw = TestGateway::start(&config(&closed_port_url(), "direct", &token_line)).await;
    let bearer = format!("Bearer {TOKEN}");
    let auth = [(AUTHORIZATION, bearer.as_str())];

    // Health never needs the token.
    assert_eq!(get(&gw.admin_url("/healthz")).await.status, StatusCode::OK);
    assert_eq!(get(&gw.admin_url("/readyz")).await.status, StatusCode::OK);

    let r = get(&gw.admin_url("/metrics")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.header(WWW_AUTHENTICATE).unwrap().starts_with("Bearer"));
    let r = get_with(
        &gw.admin_url("/metrics"),
        &[(AUTHORIZATION, "Bearer wrong-token")],
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(scrape(&gw, &auth).await.status, StatusCode::OK);

    get(&gw.admin_url("/api/jobs"))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    let r = get_with(&gw.admin_url("/api/jobs"), &auth).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // With a token, any Host name is fine (behind a proxy, on a LAN name).
    let r = get_with(
        &gw.admin_url("/api/jobs"),
        &[auth[0].clone(), (HOST, "gateway.lan:9180")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = send(request(
        Method::POST,
        &gw.admin_url("/api/jobs/1/replay"),
        &auth,
        "",
    ))
    .await;
    r.assert_error(StatusCode::NOT_FOUND, "not_replayable");

    // Browser: / without anything -> 401 page; /?token= once -> cookie -> /.
    let r = get(&gw.admin_url("/")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.header(CONTENT_TYPE).unwrap().starts_with("text/html"));
    let r = get(&gw.admin_url("/?token=wrong")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = get(&gw.admin_url(&format!("/?token={TOKEN}"))).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.header(LOCATION), Some("/"));
    let set_cookie = r.header(SET_COOKIE).expect("a session cookie").to_owned();
    assert!(set_cookie.contains("HttpOnly"), "{set_cookie}");
    assert!(set_cookie.contains("SameSite=Strict"), "{set_cookie}");
    assert!(!set_cookie.contains(TOKEN), "the cookie is not the token");
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let r = get_with(&gw.admin_url("/"), &[(COOKIE, cookie.as_str())]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(r.text().contains("wpf-gateway"));
    let r = get_with(&gw.admin_url("/api/activity"), &[(COOKIE, cookie.as_str())]).await;
    assert_eq!(r.status, StatusCode::OK, "cookie reads the API");
    // The JSON API's writes want the bearer header, not the cookie.
    send(request(
        Method::POST,
        &gw.admin_url("/api/jobs/1/replay"),
        &[(COOKIE, cookie.as_str())],
        "",
    ))
    .await
    .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    let r = get_with(&gw.admin_url("/"), &[(COOKIE, "wpf_admin=forged")]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn secrets_appear_in_no_metric_page_or_api_answer() {
    let (_token_dir, token_line) = token_file();
    let gw = TestGateway::start(&config(&closed_port_url(), "direct", &token_line)).await;
    let bearer = format!("Bearer {TOKEN}");
    let auth = [(AUTHORIZATION, bearer.as_str())];
    for contact in ["1", "2", "2", XSS] {
        let r = webhook(&gw, "update", contact).await;
        assert!(r.status.is_success(), "{}", r.text());
    }
    // A wrong key is refused and must not be echoed anywhere either.
    let wrong = gw.url("/?wpf_action=update&access_key=wrong-Key-0000&contact_id=5");
    let r = send(request(Method::POST, &wrong, &[], "")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    eventually("4 activity lines", || async {
        let r = get_with(&gw.admin_url("/api/activity"), &auth).await;
        (r.json()["activity"].as_array().unwrap().len() >= 4).then_some(())
    })
    .await;
    for path in ["/metrics", "/", "/api/activity", "/api/jobs"] {
        let r = get_with(&gw.admin_url(path), &auth).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
        let text = r.text();
        for secret in [KEY, TOKEN, "wrong-Key-0000", "crm-api-key-77"] {
            assert!(!text.contains(secret), "{path} shows {secret}:\n{text}");
        }
        if path == "/" {
            assert!(!text.contains(XSS), "the page shows the raw CRM value");
        }
    }
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Status page in a real browser
// ---------------------------------------------------------------------------------------------

const CHROMIUM: &str = "/usr/bin/chromium";

/// The DOM Chromium built from `url`, after it followed redirects (`--dump-dom`).
async fn chromium_dom(url: &str) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let run = tokio::process::Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--dump-dom", url])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("chromium finishes within 90 s")
        .expect("chromium runs");
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !dom.is_empty(),
        "chromium failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    dom
}

#[tokio::test]
async fn status_page_in_headless_chromium_shows_activity_and_escapes_crm_values() {
    if !Path::new(CHROMIUM).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have {CHROMIUM} (.ci/run installs it)"
        );
        eprintln!("note: {CHROMIUM} is absent; the headless status page test is skipped");
        return;
    }
    let (_token_dir, token_line) = token_file();
    let gw = TestGateway::start(&config(&closed_port_url(), "direct", &token_line)).await;
    let bearer = format!("Bearer {TOKEN}");
    let auth = [(AUTHORIZATION, bearer.as_str())];
    for (contact, status) in [
        (XSS, StatusCode::ACCEPTED),
        ("7", StatusCode::ACCEPTED),
        ("7", StatusCode::OK),
    ] {
        let r = webhook(&gw, "update", contact).await;
        assert_eq!(r.status, status, "{}", r.text());
    }
    eventually("3 activity lines", || async {
        let r = get_with(&gw.admin_url("/api/activity"), &auth).await;
        (r.json()["activity"].as_array().unwrap().len() == 3).then_some(())
    })
    .await;

    // The browser logs in with ?token= once, follows the 303 and loads / with its cookie.
    let dom = chromium_dom(&gw.admin_url(&format!("/?token={TOKEN}"))).await;
    assert!(dom.contains("<table id=\"activity\""), "{dom}");
    let rows = dom.matches("<tr class=\"activity ").count();
    assert_eq!(rows, 3, "{dom}");
    assert!(
        dom.contains("<tr class=\"activity o-warn\">"),
        "duplicate is yellow"
    );
    assert!(
        dom.contains("<tr class=\"activity o-info\">"),
        "queued is blue"
    );
    assert!(dom.contains("<tr class=\"site\">"), "{dom}");
    // The CRM value is text: serialized back escaped, and no script element was created.
    assert!(
        dom.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{dom}"
    );
    assert!(!dom.to_ascii_lowercase().contains("<script"), "{dom}");
    for secret in [KEY, TOKEN] {
        assert!(!dom.contains(secret), "the page shows {secret}");
    }
    gw.stop().await;
}
