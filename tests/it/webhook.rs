//! The webhook front door over real sockets: every answer of DESIGN §3 the gateway gives
//! today, the loopback locks (and their durability), limits, backpressure, the browser view,
//! sync and relay mode against a real upstream, and what reaches the data directory.
//!
//! The direct-mode site of these tests is `paused`, so its jobs stay pending: its answers
//! (queued, coalesced, duplicate) are deterministic. Relay mode is used where a job must
//! actually run.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE, HOST, RETRY_AFTER};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection, SqliteConnection};
use tokio::sync::mpsc;

use crate::support::{eventually, raw_exchange, send, Reply, TestGateway, TestUpstream};

/// The site's access key.
const KEY: &str = "s3cret-Key-4242";
/// Every wait in these tests is bounded by this.
const WAIT: Duration = Duration::from_secs(10);
const FORM: &str = "application/x-www-form-urlencoded";
const JSON: &str = "application/json";
/// What a browser sends.
const BROWSER_ACCEPT: &str = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// A one-site config. `site_lines` go into the `[[site]]` table (they may end with sub-tables
/// such as `[site.limits]`), `queue_lines` into `[queue]`. Direct mode is paused (its jobs stay
/// pending) and gets a `[site.crm]` table (required by the config; never contacted).
fn config(upstream: &str, mode: &str, site_lines: &str, queue_lines: &str) -> String {
    let paused = if mode == "direct" {
        "paused = true"
    } else {
        ""
    };
    let crm = if mode == "direct" {
        "[site.crm]\nkind = \"activecampaign\"\nurl = \"http://127.0.0.1:9\"\napi_key = \"crm-api-key\"\n"
    } else {
        ""
    };
    format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
data_dir = "{{data_dir}}"
shutdown_grace = "3s"

[queue]
{queue_lines}

[[site]]
name = "main"
upstream = "{upstream}"
access_key = "{KEY}"
mode = "{mode}"
{paused}
{site_lines}
{crm}"#
    )
}

/// A direct-mode site in front of an upstream nobody listens on (nothing is passed through).
fn direct(site_lines: &str) -> String {
    config(&closed_port_url(), "direct", site_lines, "")
}

/// A loopback URL whose port has no listener.
fn closed_port_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    format!("http://{}", l.local_addr().expect("addr"))
}

/// A webhook URL with the right key: `/?wpf_action=ACTION&access_key=KEY[&contact_id=ID]`.
fn hook(action: &str, contact: Option<&str>) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("wpf_action", action);
    q.append_pair("access_key", KEY);
    if let Some(contact) = contact {
        q.append_pair("contact_id", contact);
    }
    format!("/?{}", q.finish())
}

// `Reply` (a complete answer) is in support.rs; what only these tests ask of it:
impl Reply {
    /// The `job` field of a JSON answer.
    fn job(&self) -> i64 {
        self.json()["job"]
            .as_i64()
            .unwrap_or_else(|| panic!("no job in {}", self.text()))
    }

    /// `Retry-After` as whole seconds.
    fn retry_after(&self) -> u64 {
        let value = self.headers.get(RETRY_AFTER).expect("Retry-After header");
        value
            .to_str()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("Retry-After is not whole seconds: {value:?}"))
    }
}

fn request(
    gw: &TestGateway,
    method: Method,
    path_and_query: &str,
    content_type: Option<&str>,
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(gw.url(path_and_query));
    if let Some(ct) = content_type {
        b = b.header(CONTENT_TYPE, ct);
    }
    b.body(Full::new(body.into())).expect("request")
}

async fn post(gw: &TestGateway, path_and_query: &str, ct: Option<&str>, body: &str) -> Reply {
    send(request(
        gw,
        Method::POST,
        path_and_query,
        ct,
        body.to_owned(),
    ))
    .await
}

async fn get(gw: &TestGateway, path_and_query: &str) -> Reply {
    send(request(gw, Method::GET, path_and_query, None, "")).await
}

/// The queue file, opened read-only (the gateway may still be running: WAL readers are fine).
async fn queue_db(dir: &Path) -> SqliteConnection {
    let options = SqliteConnectOptions::new()
        .filename(dir.join("queue.sqlite3"))
        .read_only(true);
    tokio::time::timeout(WAIT, SqliteConnection::connect_with(&options))
        .await
        .expect("open in time")
        .expect("open the queue read-only")
}

/// One job row: (contact, action, deliveries, payload_tags, state, target).
type JobRow = (String, String, i64, Option<String>, String, String);

async fn job_row(gw: &TestGateway, job: i64) -> JobRow {
    let mut db = queue_db(gw.dir.path()).await;
    let row = sqlx::query_as(
        "SELECT contact, action, deliveries, payload_tags, state, target FROM jobs WHERE id = ?",
    )
    .bind(job)
    .fetch_one(&mut db)
    .await
    .unwrap_or_else(|e| panic!("job {job}: {e}"));
    db.close().await.ok();
    row
}

async fn jobs_of(gw: &TestGateway, contact: &str) -> i64 {
    let mut db = queue_db(gw.dir.path()).await;
    let n = sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE contact = ?")
        .bind(contact)
        .fetch_one(&mut db)
        .await
        .expect("count jobs");
    db.close().await.ok();
    n
}

/// One activity line: (outcome, contact, action, job).
type ActivityRow = (String, Option<String>, Option<String>, Option<i64>);

async fn activity(gw: &TestGateway) -> Vec<ActivityRow> {
    let mut db = queue_db(gw.dir.path()).await;
    let rows = sqlx::query_as("SELECT outcome, contact, action, job FROM activity ORDER BY id")
        .fetch_all(&mut db)
        .await
        .expect("read activity");
    db.close().await.ok();
    rows
}

/// What a [`recording_upstream`] saw of one request.
#[derive(Debug)]
struct Seen {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
}

impl Seen {
    /// Values of query parameter `key`, in order.
    fn param(&self, key: &str) -> Vec<&str> {
        self.query
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }
}

/// An upstream that reports every request it receives on the returned channel, then waits
/// and answers `200` with the body `answer` chooses for it.
async fn recording_upstream(
    answer: impl Fn(&Seen) -> (Duration, &'static str) + Send + Sync + 'static,
) -> (TestUpstream, mpsc::UnboundedReceiver<Seen>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let answer = Arc::new(answer);
    let upstream = TestUpstream::start(move |req: Request<hyper::body::Incoming>| {
        let tx = tx.clone();
        let answer = answer.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let seen = Seen {
                method: parts.method,
                path: parts.uri.path().to_owned(),
                query: form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
                    .into_owned()
                    .collect(),
                headers: parts.headers,
                body,
            };
            let (delay, text) = answer(&seen);
            let _ = tx.send(seen);
            tokio::time::sleep(delay).await;
            hyper::Response::new(Full::new(Bytes::from_static(text.as_bytes())))
        }
    })
    .await;
    (upstream, rx)
}

async fn next_seen(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("upstream saw a request in time")
        .expect("upstream running")
}

fn queued(job: i64, action: &str, contact: &str) -> Value {
    json!({"ok":true,"status":"queued","job":job,"action":action,"contact_id":contact})
}

fn coalesced(job: i64, action: &str, contact: &str) -> Value {
    json!({"ok":true,"status":"coalesced","job":job,"action":action,"contact_id":contact})
}

/// Assert a `locked` answer for `contact` whose lock has 1..=`ttl` seconds left.
fn assert_locked(reply: &Reply, contact: &str, ttl: u64) {
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let mut body = reply.json();
    let left = body["lock_remaining"].as_u64().expect("lock_remaining");
    assert!((1..=ttl).contains(&left), "lock_remaining {left} of {ttl}");
    body.as_object_mut().unwrap().remove("lock_remaining");
    assert_eq!(
        body,
        json!({"ok":true,"status":"locked","contact_id":contact})
    );
}

fn error(code: &str, message: &str) -> Value {
    json!({"ok":false,"status":"error","error":code,"message":message})
}

// ---------------------------------------------------------------------------------------------
// queued, coalesced, duplicate
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn contact_ids_come_from_the_query_or_the_crm_payload() {
    let gw = TestGateway::start(&direct("")).await;

    // ActiveCampaign: a form with contact[id] and contact[tags] (", " separated).
    let r = post(
        &gw,
        &hook("update_tags", None),
        Some(FORM),
        "type=update&contact%5Bid%5D=123&contact%5Btags%5D=Gold%2C+Silver+Member",
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let ac = r.job();
    assert_eq!(r.json(), queued(ac, "update_tags", "123"));
    let (contact, action, _, tags, state, _) = job_row(&gw, ac).await;
    assert_eq!((contact.as_str(), action.as_str()), ("123", "update_tags"));
    assert_eq!(tags.as_deref(), Some(r#"["Gold","Silver Member"]"#));
    assert_eq!(state, "pending");

    // FluentCRM: the subscriber as JSON, `id` and tags[].slug.
    let r = post(
        &gw,
        &hook("update", None),
        Some(JSON),
        r#"{"id":1024,"email":"jane@example.com","status":"subscribed",
            "tags":[{"id":3,"title":"Member Gold","slug":"member-gold"},{"title":"VIP","slug":"vip"}]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let fluent = r.job();
    assert_eq!(r.json(), queued(fluent, "update", "1024"));
    let tags = job_row(&gw, fluent).await.3;
    assert_eq!(tags.as_deref(), Some(r#"["member-gold","vip"]"#));

    // Agile CRM: eventData.id.
    let r = post(
        &gw,
        &hook("add", None),
        Some(JSON),
        r#"{"eventName":"Contact is Updated","eventData":{"id":5667649732214784,"tags":["Customer"]}}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let agile = r.job();
    assert_eq!(r.json(), queued(agile, "add", "5667649732214784"));

    // The query's contact_id, no body at all.
    let r = get(&gw, &hook("update", Some("77"))).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let query = r.job();
    assert_eq!(r.json(), queued(query, "update", "77"));

    // The query's contact_id wins over the payload's.
    let r = post(
        &gw,
        &hook("update", Some("78")),
        Some(FORM),
        "contact%5Bid%5D=79",
    )
    .await;
    assert_eq!(r.json(), queued(r.job(), "update", "78"));
    assert_eq!(jobs_of(&gw, "79").await, 0);

    // A JSON number up to u64::MAX is kept exactly, as text ...
    let r = post(
        &gw,
        &hook("update", None),
        Some(JSON),
        r#"{"id":18446744073709551615}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let max = r.job();
    assert_eq!(r.json(), queued(max, "update", "18446744073709551615"));
    // ... and the same id as a JSON string is the same contact.
    let r = post(
        &gw,
        &hook("update", None),
        Some(JSON),
        r#"{"contact_id":"18446744073709551615"}"#,
    )
    .await;
    assert_eq!(r.json(), coalesced(max, "update", "18446744073709551615"));
    // String ids are trimmed, leading zeros kept.
    let r = post(
        &gw,
        &hook("update", None),
        Some(JSON),
        r#"{"id":" 00123 "}"#,
    )
    .await;
    assert_eq!(r.json(), queued(r.job(), "update", "00123"));

    let mut ids = vec![ac, fluent, agile, query, max];
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 5, "one job each: {ids:?}");
    gw.stop().await;
}

#[tokio::test]
async fn webhooks_for_a_pending_contact_coalesce_into_one_job() {
    let gw = TestGateway::start(&direct("")).await;
    let r = post(&gw, &hook("update_tags", Some("7")), None, "").await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let job = r.job();
    assert_eq!(r.json(), queued(job, "update_tags", "7"));
    let row = job_row(&gw, job).await;
    assert_eq!((row.1.as_str(), row.2), ("update_tags", 1));

    // `add` is stronger: the job becomes an `add`.
    let r = post(&gw, &hook("add", Some("7")), None, "").await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(r.json(), coalesced(job, "add", "7"));
    let row = job_row(&gw, job).await;
    assert_eq!((row.1.as_str(), row.2), ("add", 2));

    // A weaker action afterwards does not downgrade it.
    let r = post(&gw, &hook("update", Some("7")), None, "").await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(r.json(), coalesced(job, "update", "7"));
    let row = job_row(&gw, job).await;
    assert_eq!(
        (row.1.as_str(), row.2, row.4.as_str()),
        ("add", 3, "pending")
    );
    assert_eq!(jobs_of(&gw, "7").await, 1);

    // Another contact gets its own job.
    let r = post(&gw, &hook("update", Some("8")), None, "").await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_ne!(r.job(), job);
    assert_eq!(r.json()["status"], "queued");
    gw.stop().await;
}

#[tokio::test]
async fn an_exact_repeat_of_a_pending_delivery_is_a_duplicate() {
    let gw = TestGateway::start(&direct("")).await;
    let body = "contact%5Bid%5D=8&contact%5Btags%5D=A%2C+B";
    let first = post(&gw, &hook("update_tags", None), Some(FORM), body).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.text());
    let job = first.job();
    assert_eq!(first.json(), queued(job, "update_tags", "8"));

    let again = post(&gw, &hook("update_tags", None), Some(FORM), body).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text());
    assert_eq!(
        again.json(),
        json!({"ok":true,"status":"duplicate","job":job,"contact_id":"8"})
    );
    assert_eq!(
        job_row(&gw, job).await.2,
        1,
        "a duplicate is not a delivery"
    );

    // The body is part of the delivery: other tags are a change, merged in.
    let changed = post(
        &gw,
        &hook("update_tags", None),
        Some(FORM),
        "contact%5Bid%5D=8&contact%5Btags%5D=A",
    )
    .await;
    assert_eq!(changed.status, StatusCode::ACCEPTED);
    assert_eq!(changed.json(), coalesced(job, "update_tags", "8"));
    let row = job_row(&gw, job).await;
    assert_eq!((row.2, row.3.as_deref()), (2, Some(r#"["A"]"#)));
    // So is another action with the same body.
    let other = post(&gw, &hook("update", None), Some(FORM), body).await;
    assert_eq!(other.status, StatusCode::ACCEPTED);
    assert_eq!(other.json()["status"], "coalesced");
    assert_eq!(jobs_of(&gw, "8").await, 1);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Loopback locks
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_locked_contact_ignores_updates_but_not_add() {
    let gw = TestGateway::start(&direct("")).await;
    let r = post(
        &gw,
        &format!("{}&ttl=30", hook("lock", Some("9"))),
        None,
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"ok":true,"status":"locked","contact_id":"9","ttl":30})
    );

    assert_locked(
        &post(&gw, &hook("update", Some("9")), None, "").await,
        "9",
        30,
    );
    assert_locked(
        &post(&gw, &hook("update_tags", Some("9")), None, "").await,
        "9",
        30,
    );
    // The contact id may come from the payload too.
    assert_locked(
        &post(&gw, &hook("update", None), Some(FORM), "contact%5Bid%5D=9").await,
        "9",
        30,
    );
    assert_eq!(jobs_of(&gw, "9").await, 0, "locked webhooks are not queued");

    let r = post(&gw, &hook("add", Some("9")), None, "").await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    assert_eq!(r.json(), queued(r.job(), "add", "9"));

    // Locks are per contact, and only the right key sets one.
    let r = post(&gw, &hook("update", Some("10")), None, "").await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let r = post(
        &gw,
        "/?wpf_action=lock&access_key=wrong-key-0000&contact_id=11&ttl=30",
        None,
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = post(&gw, &hook("update", Some("11")), None, "").await;
    assert_eq!(r.status, StatusCode::ACCEPTED);

    // A lock needs a whole number of seconds.
    for ttl in ["0", "-5", "1.5", "soon"] {
        let r = post(
            &gw,
            &format!("{}&ttl={ttl}", hook("lock", Some("12"))),
            None,
            "",
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{ttl}: {}", r.text());
        assert_eq!(
            r.json(),
            error(
                "invalid_ttl",
                "ttl must be a whole number of seconds, 1 to 3600"
            )
        );
    }

    // The lock is on disk.
    let mut db = queue_db(gw.dir.path()).await;
    let locks: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT site, contact, until_ms FROM locks ORDER BY contact")
            .fetch_all(&mut db)
            .await
            .unwrap();
    db.close().await.ok();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let now = i64::try_from(now.as_millis()).unwrap();
    assert_eq!(locks.len(), 1, "{locks:?}");
    assert_eq!((locks[0].0.as_str(), locks[0].1.as_str()), ("main", "9"));
    assert!(locks[0].2 > now && locks[0].2 <= now + 30_000, "{locks:?}");
    gw.stop().await;
}

#[tokio::test]
async fn a_lock_expires_after_its_ttl() {
    let gw = TestGateway::start(&direct("")).await;
    let r = post(
        &gw,
        &format!("{}&ttl=1", hook("lock", Some("12"))),
        None,
        "",
    )
    .await;
    assert_eq!(
        r.json(),
        json!({"ok":true,"status":"locked","contact_id":"12","ttl":1})
    );
    assert_locked(
        &post(&gw, &hook("update", Some("12")), None, "").await,
        "12",
        1,
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = post(&gw, &hook("update", Some("12")), None, "").await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    assert_eq!(r.json(), queued(r.job(), "update", "12"));
    gw.stop().await;
}

#[tokio::test]
async fn locks_and_pending_jobs_survive_a_restart() {
    let config = direct("");
    let gw = TestGateway::start(&config).await;
    let r = post(
        &gw,
        &format!("{}&ttl=60", hook("lock", Some("13"))),
        None,
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let delivery = "contact%5Bid%5D=14&contact%5Btags%5D=A";
    let r = post(&gw, &hook("update", None), Some(FORM), delivery).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let pending = r.job();
    let dir = gw.stop_keeping_dir().await;

    let gw = TestGateway::start_in(dir, &config).await;
    assert_locked(
        &post(&gw, &hook("update", Some("13")), None, "").await,
        "13",
        60,
    );
    assert_locked(
        &post(&gw, &hook("update_tags", Some("13")), None, "").await,
        "13",
        60,
    );
    let r = post(&gw, &hook("add", Some("13")), None, "").await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    assert_eq!(r.json()["status"], "queued");
    // The pending job is still the contact's pending job, and a CRM retry of its delivery
    // is still recognised.
    let r = post(&gw, &hook("update", None), Some(FORM), delivery).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"ok":true,"status":"duplicate","job":pending,"contact_id":"14"})
    );
    let r = post(&gw, &hook("update_tags", Some("14")), None, "").await;
    assert_eq!(r.json(), coalesced(pending, "update_tags", "14"));
    assert_eq!(job_row(&gw, pending).await.2, 2);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// test, authentication, refusals
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn test_action_answers_success_without_queuing() {
    let gw = TestGateway::start(&direct("")).await;
    for r in [
        get(&gw, &hook("test", None)).await,
        post(&gw, &hook("test", None), Some(JSON), "{}").await,
        get(&gw, &format!("/?wpf_action=TEST&access_key={KEY}")).await,
    ] {
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.json(), json!({"ok":true,"status":"ok","success":true}));
    }
    let mut db = queue_db(gw.dir.path()).await;
    let jobs: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs")
        .fetch_one(&mut db)
        .await
        .unwrap();
    db.close().await.ok();
    assert_eq!(jobs, 0);
    gw.stop().await;
}

#[tokio::test]
async fn a_missing_or_wrong_access_key_is_403() {
    let gw = TestGateway::start(&direct("")).await;
    let missing = error("invalid_access_key", "the access_key parameter is missing");
    let wrong = error("invalid_access_key", "the access key is wrong");
    let cases = [
        (
            "/?wpf_action=update&contact_id=5".to_owned(),
            &missing,
            None,
        ),
        ("/?wpf_action=test&access_key=".to_owned(), &missing, None),
        (
            "/?wpf_action=update&access_key=s3cret-Key-4243&contact_id=5".to_owned(),
            &wrong,
            Some("s3cret-Key-4243"), // same length, last byte differs
        ),
        (
            "/?wpf_action=test&access_key=S3CRET-KEY-4242".to_owned(),
            &wrong,
            Some("S3CRET-KEY-4242"), // case matters
        ),
        (
            "/?wpf_action=update&access_key=s3cret&contact_id=5".to_owned(),
            &wrong,
            Some("s3cret"), // a prefix of the key
        ),
        (
            format!("/?wpf_action=update&access_key={KEY}-and-more&contact_id=5"),
            &wrong,
            Some("-and-more"),
        ),
        // The last access_key counts (as in PHP).
        (
            format!("/?wpf_action=update&access_key={KEY}&access_key=other-key-777&contact_id=5"),
            &wrong,
            Some("other-key-777"),
        ),
    ];
    for (target, expected, sent) in cases {
        for r in [
            get(&gw, &target).await,
            post(&gw, &target, Some(FORM), "contact%5Bid%5D=5").await,
        ] {
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{target}: {}", r.text());
            assert_eq!(&r.json(), expected, "{target}");
            if let Some(sent) = sent {
                assert!(!r.text().contains(sent), "{target}: {}", r.text());
            }
            assert!(!r.text().contains(KEY), "{target}: {}", r.text());
        }
    }
    assert_eq!(jobs_of(&gw, "5").await, 0);
    gw.stop().await;
}

/// An Agile CRM webhook with the contact's email and no id is keyed by the email.
#[tokio::test]
async fn a_payload_with_only_an_email_is_keyed_by_it() {
    let gw = TestGateway::start(&direct("")).await;
    let body = r#"{"eventName":"contact_updated","eventData":{"properties":[{"name":"email","value":"Ann@Example.com"}]}}"#;
    let r = post(&gw, &hook("update", None), Some(JSON), body).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    assert_eq!(r.json()["contact_id"], "email:ann@example.com");
    let again = post(&gw, &hook("update", None), Some(JSON), body).await;
    assert_eq!(again.json()["status"], "duplicate", "{}", again.text());
    gw.stop().await;
}

#[tokio::test]
async fn unusable_requests_are_400() {
    let gw = TestGateway::start(&direct("")).await;
    // No contact id anywhere.
    for r in [
        get(&gw, &hook("update", None)).await,
        post(
            &gw,
            &hook("update_tags", None),
            Some(FORM),
            "type=update&x=1",
        )
        .await,
        post(
            &gw,
            &hook("add", None),
            Some(JSON),
            r#"{"email":"not-an-address"}"#,
        )
        .await,
        post(&gw, &hook("lock", None), None, "").await,
    ] {
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
        assert_eq!(
            r.json(),
            error(
                "missing_contact_id",
                "no contact_id in the query and no contact id or email in the CRM payload"
            )
        );
    }
    // A body that is not what its content type says.
    for body in [r#"{"id": 5"#, "contact_id=5", "{'id': 5}"] {
        let r = post(&gw, &hook("update", Some("5")), Some(JSON), body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text());
        let json = r.json();
        assert_eq!(json["ok"], false);
        assert_eq!(json["status"], "error");
        assert_eq!(json["error"], "malformed_body", "{body}");
        let message = json["message"].as_str().unwrap();
        assert!(message.contains("JSON"), "{message}");
    }
    // An empty or garbage action.
    let invalid = error(
        "invalid_action",
        "wpf_action must be update_tags, update, add, test, lock or a site action name",
    );
    for action in ["", "%20", "%3Cscript%3E", "update%20tags", &"x".repeat(65)] {
        let r = get(
            &gw,
            &format!("/?wpf_action={action}&access_key={KEY}&contact_id=5"),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{action}: {}", r.text());
        assert_eq!(r.json(), invalid, "{action}");
    }
    assert_eq!(jobs_of(&gw, "5").await, 0);
    gw.stop().await;
}

#[tokio::test]
async fn a_body_over_max_body_is_413() {
    let gw = TestGateway::start(&direct("max_body = \"1KiB\"")).await;
    let too_large = error("body_too_large", "the body is larger than max_body (1KiB)");
    /// A form body of exactly `len` bytes for contact `id`.
    fn form_of(id: &str, len: usize) -> String {
        let head = format!("contact%5Bid%5D={id}&pad=");
        format!("{head}{}", "x".repeat(len - head.len()))
    }

    // With Content-Length: exactly max_body is fine, one byte more is not.
    let r = post(&gw, &hook("update", None), Some(FORM), &form_of("20", 1024)).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    assert_eq!(r.json(), queued(r.job(), "update", "20"));
    let r = post(&gw, &hook("update", None), Some(FORM), &form_of("21", 1025)).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text());
    assert_eq!(r.json(), too_large);
    let r = post(
        &gw,
        &hook("update", None),
        Some(FORM),
        &form_of("21", 64 * 1024),
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);

    // Chunked, without Content-Length: the cap applies to what arrives.
    let chunked = |body: &str| {
        let mut req = format!(
            "POST {} HTTP/1.1\r\nHost: example.com\r\nContent-Type: {FORM}\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            hook("update", None)
        );
        for piece in body.as_bytes().chunks(300) {
            req.push_str(&format!("{:x}\r\n", piece.len()));
            req.push_str(std::str::from_utf8(piece).unwrap());
            req.push_str("\r\n");
        }
        req.push_str("0\r\n\r\n");
        req
    };
    let answer = raw_exchange(gw.addr, chunked(&form_of("22", 1024)).as_bytes(), WAIT).await;
    assert!(answer.starts_with("HTTP/1.1 202 "), "{answer}");
    assert!(answer.contains(r#""contact_id":"22""#), "{answer}");
    let answer = raw_exchange(gw.addr, chunked(&form_of("23", 1025)).as_bytes(), WAIT).await;
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("retry-after"),
        "{answer}"
    );
    let body = answer.split_once("\r\n\r\n").expect("a complete answer").1;
    let json: Value = serde_json::from_str(body).expect("JSON");
    assert_eq!(json, too_large);

    assert_eq!(jobs_of(&gw, "21").await, 0);
    assert_eq!(jobs_of(&gw, "23").await, 0);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Limits and backpressure
// ---------------------------------------------------------------------------------------------

/// Assert a `429 rate_limited` answer with `message`; returns its `Retry-After`.
fn assert_rate_limited(r: &Reply, message: &str) -> u64 {
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    let wait = r.retry_after();
    assert!((1..=60).contains(&wait), "Retry-After {wait}");
    let mut expected = error("rate_limited", message);
    expected["retry_after"] = wait.into();
    assert_eq!(r.json(), expected);
    wait
}

#[tokio::test]
async fn per_ip_limit_is_429_with_retry_after() {
    let gw = TestGateway::start(&direct("[site.limits]\nper_ip = \"2/min\"")).await;
    let r = post(&gw, &hook("update", Some("30")), None, "").await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let r = get(&gw, &hook("test", None)).await;
    assert_eq!(r.status, StatusCode::OK);
    // The third webhook from this client within the minute, whatever it is.
    let message = "too many webhooks from this client";
    assert_rate_limited(
        &post(&gw, &hook("update", Some("31")), None, "").await,
        message,
    );
    assert_rate_limited(&get(&gw, &hook("test", None)).await, message);
    // Checked before the key: a flood with wrong keys is limited too.
    assert_rate_limited(
        &get(&gw, "/?wpf_action=test&access_key=nope").await,
        message,
    );
    assert_eq!(jobs_of(&gw, "31").await, 0);
    gw.stop().await;
}

#[tokio::test]
async fn per_site_limit_is_429_with_retry_after() {
    let gw = TestGateway::start(&direct("[site.limits]\nper_site = \"2/min\"")).await;
    for contact in ["40", "41"] {
        let r = post(&gw, &hook("update", Some(contact)), None, "").await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    }
    let message = "too many webhooks for this site";
    assert_rate_limited(
        &post(&gw, &hook("update", Some("42")), None, "").await,
        message,
    );
    assert_rate_limited(
        &post(&gw, &hook("add", Some("40")), None, "").await,
        message,
    );
    assert_eq!(jobs_of(&gw, "42").await, 0);
    // WP Fusion's connection test and refused keys do not count against the site.
    let r = get(&gw, &hook("test", None)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = get(&gw, "/?wpf_action=update&access_key=nope&contact_id=1").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    gw.stop().await;
}

#[tokio::test]
async fn a_full_queue_is_503_with_retry_after() {
    let gw = TestGateway::start(&config(&closed_port_url(), "direct", "", "queue_max = 2")).await;
    let mut jobs = Vec::new();
    for contact in ["50", "51"] {
        let r = post(&gw, &hook("update", Some(contact)), None, "").await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
        jobs.push(r.job());
    }
    let r = post(&gw, &hook("update", Some("52")), None, "").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    let wait = r.retry_after();
    assert_eq!(wait, 10);
    let mut expected = error("queue_full", "the queue is full; try again later");
    expected["retry_after"] = wait.into();
    assert_eq!(r.json(), expected);
    assert_eq!(jobs_of(&gw, "52").await, 0);
    // Nothing accepted was dropped.
    for (job, contact) in jobs.iter().zip(["50", "51"]) {
        let row = job_row(&gw, *job).await;
        assert_eq!((row.0.as_str(), row.4.as_str()), (contact, "pending"));
    }
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Custom actions, the browser view
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_custom_action_reaches_the_site_only_with_the_right_key() {
    let (upstream, mut seen) = recording_upstream(|_| (Duration::ZERO, "site handled it")).await;
    let gw = TestGateway::start(&config(&upstream.url(), "direct", "", "")).await;

    let r = post(
        &gw,
        &hook("ck_unsubscribed", Some("5")),
        Some(FORM),
        "subscriber%5Bemail%5D=a%40example.com",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.text(), "site handled it");
    let s = next_seen(&mut seen).await;
    assert_eq!(s.method, Method::POST);
    assert_eq!(s.path, "/");
    assert_eq!(s.param("wpf_action"), ["ck_unsubscribed"]);
    assert_eq!(s.param("contact_id"), ["5"]);
    assert_eq!(
        s.param("access_key"),
        [KEY],
        "the site checks the key itself"
    );
    assert_eq!(&s.body[..], b"subscriber%5Bemail%5D=a%40example.com");

    for target in [
        "/?wpf_action=ck_unsubscribed&access_key=wrong-key-0000&contact_id=5",
        "/?wpf_action=ck_unsubscribed&contact_id=5",
    ] {
        let r = post(&gw, target, Some(FORM), "x=1").await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{target}: {}", r.text());
        assert_eq!(r.json()["error"], "invalid_access_key");
    }
    // Pass-through is synchronous: had the site been asked, it would have said so by now.
    assert!(
        seen.try_recv().is_err(),
        "the site saw a refused custom action"
    );
    assert_eq!(jobs_of(&gw, "5").await, 0);
    gw.stop().await;
}

#[tokio::test]
async fn browsers_get_an_escaped_html_page_of_the_same_outcome() {
    let gw = TestGateway::start(&direct("")).await;
    let browse = |target: String| {
        Request::get(gw.url(&target))
            .header(ACCEPT, BROWSER_ACCEPT)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let assert_html = |r: &Reply| {
        let ct = r.headers[CONTENT_TYPE].to_str().unwrap();
        assert!(ct.starts_with("text/html"), "{ct}");
        let page = r.text();
        assert!(page.starts_with("<!doctype html>"), "{page}");
        assert!(!page.contains(KEY), "{page}");
        page
    };

    let r = send(browse(hook("update", Some("<script>x</script>")))).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let page = assert_html(&r);
    assert!(!page.contains("<script>x"), "{page}");
    assert!(
        page.contains("<td>&lt;script&gt;x&lt;/script&gt;</td>"),
        "{page}"
    );
    assert!(page.contains("<td>queued</td>"), "{page}");
    assert!(page.contains("<td>update</td>"), "{page}");

    // The same contact again: the page says coalesced, for the same job.
    let job = {
        let mut db = queue_db(gw.dir.path()).await;
        let id: i64 = sqlx::query_scalar("SELECT id FROM jobs WHERE contact = ?")
            .bind("<script>x</script>")
            .fetch_one(&mut db)
            .await
            .unwrap();
        db.close().await.ok();
        id
    };
    let r = send(browse(hook("update_tags", Some("<script>x</script>")))).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let page = assert_html(&r);
    assert!(page.contains("<td>coalesced</td>"), "{page}");
    assert!(
        page.contains(&format!("<th>job</th><td>{job}</td>")),
        "{page}"
    );

    let r = send(browse(hook("test", None))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(assert_html(&r).contains("<th>success</th><td>true</td>"));

    // Refusals too, without the key that was sent.
    let r = send(browse(
        "/?wpf_action=update&access_key=%3Cb%3Ewrong-key%3C%2Fb%3E&contact_id=1".into(),
    ))
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let page = assert_html(&r);
    assert!(page.contains("<td>invalid_access_key</td>"), "{page}");
    assert!(!page.contains("wrong-key"), "{page}");

    let r = send(browse(format!("/?wpf_action=%3Ci%3E&access_key={KEY}"))).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let page = assert_html(&r);
    assert!(page.contains("<td>invalid_action</td>"), "{page}");
    assert!(!page.contains("<i>"), "{page}");

    // Scripts and CRMs that accept anything still get JSON.
    let r = send(
        Request::get(gw.url(&hook("test", None)))
            .header(ACCEPT, "*/*")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.json(), json!({"ok":true,"status":"ok","success":true}));
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Relay mode, sync and async
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn sync_mode_answers_the_outcome_or_202_after_sync_timeout() {
    let (upstream, mut seen) = recording_upstream(|s| match s.param("contact_id").first() {
        Some(&"2") => (
            Duration::ZERO,
            "<p>No matching user found for contact ID 2.</p>",
        ),
        Some(&"3") => (Duration::from_millis(1500), "<h3>Success</h3>"),
        _ => (Duration::ZERO, "<h3>Success</h3>"),
    })
    .await;
    let gw = TestGateway::start(&config(
        &upstream.url(),
        "relay",
        "respond = \"sync\"\nsync_timeout = \"500ms\"",
        "",
    ))
    .await;

    let r = post(&gw, &hook("update", Some("1")), None, "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let job = r.job();
    assert_eq!(
        r.json(),
        json!({"ok":true,"status":"done","job":job,"contact_id":"1",
               "result":"upstream answered 200"})
    );
    assert_eq!(next_seen(&mut seen).await.param("contact_id"), ["1"]);
    assert_eq!(job_row(&gw, job).await.4, "done");

    let r = post(&gw, &hook("update", Some("2")), None, "").await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text());
    let job = r.job();
    assert_eq!(
        r.json(),
        json!({"ok":false,"status":"failed","error":"no_matching_user",
               "message":"site found no user for this contact","job":job})
    );
    assert_eq!(next_seen(&mut seen).await.param("contact_id"), ["2"]);
    assert_eq!(job_row(&gw, job).await.4, "failed");

    let started = Instant::now();
    let r = post(&gw, &hook("update", Some("3")), None, "").await;
    let took = started.elapsed();
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let job = r.job();
    assert_eq!(r.json(), queued(job, "update", "3"));
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    // The job still runs to its end.
    assert_eq!(next_seen(&mut seen).await.param("contact_id"), ["3"]);
    let state = eventually("the slow job to finish", || async {
        let state = job_row(&gw, job).await.4;
        (state == "done").then_some(state)
    })
    .await;
    assert_eq!(state, "done");
    gw.stop().await;
}

#[tokio::test]
async fn relay_mode_sends_the_webhook_on_to_the_site() {
    let (upstream, mut seen) = recording_upstream(|_| (Duration::ZERO, "<h3>Success</h3>")).await;
    let gw = TestGateway::start(&config(&upstream.url(), "relay", "", "")).await;
    let body = "contact%5Bid%5D=42&contact%5Btags%5D=Gold";
    let ct = "application/x-www-form-urlencoded; charset=UTF-8";
    let target = format!(
        "/shop/hook?wpf_action=update_tags&access_key={KEY}&contact_id=42&role=customer&extra=a+b"
    );
    let r = send(request(&gw, Method::PUT, &target, Some(ct), body)).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let job = r.job();
    assert_eq!(r.json(), queued(job, "update_tags", "42"));

    let s = next_seen(&mut seen).await;
    assert_eq!(s.method, Method::PUT);
    assert_eq!(s.path, "/shop/hook");
    assert_eq!(s.param("wpf_action"), ["update_tags"]);
    assert_eq!(s.param("access_key"), [KEY]);
    assert_eq!(s.param("contact_id"), ["42"]);
    assert_eq!(s.param("role"), ["customer"]);
    assert_eq!(s.param("extra"), ["a b"]);
    assert_eq!(&s.body[..], body.as_bytes());
    assert_eq!(s.header("content-type"), [ct]);
    assert_eq!(s.header("x-wpf-gateway"), ["relayed"]);
    assert_eq!(s.header("x-wpf-job"), [job.to_string()]);
    assert_eq!(s.header("x-forwarded-for"), ["127.0.0.1"]);

    let state = eventually("the relayed job to be done", || async {
        let state = job_row(&gw, job).await.4;
        (state == "done").then_some(state)
    })
    .await;
    assert_eq!(state, "done");
    assert!(seen.try_recv().is_err(), "relayed once");
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// What the gateway keeps
// ---------------------------------------------------------------------------------------------

/// Every file of the data directory except the test's own config file.
fn data_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    std::fs::read_dir(dir)
        .expect("data_dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.file_name().is_some_and(|n| n != "gateway.toml"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).expect("read"))
        })
        .collect()
}

fn assert_no_secret(files: &[(String, Vec<u8>)], secrets: &[&str]) {
    assert!(
        files
            .iter()
            .any(|(n, b)| n == "queue.sqlite3" && !b.is_empty()),
        "no queue file in {:?}",
        files.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    for (name, bytes) in files {
        for secret in secrets {
            let found = bytes
                .windows(secret.len())
                .any(|w| w.eq_ignore_ascii_case(secret.as_bytes()));
            assert!(!found, "{secret:?} is in {name}");
        }
    }
}

#[tokio::test]
async fn access_keys_never_reach_the_data_dir() {
    let wrong = "wrong-key-31337";
    let relay_key = "relay-Key-5151";
    let (upstream, mut seen) = recording_upstream(|_| (Duration::ZERO, "ok")).await;
    // A second site relays to an upstream that is down: its job fails and is retried.
    let text = format!(
        "{}\n[[site]]\nname = \"relay\"\nhosts = [\"relay.test\"]\nupstream = \"{}\"\n\
         access_key = \"{relay_key}\"\nmode = \"relay\"\n[site.limits]\nper_site = \"1/min\"\n",
        config(&upstream.url(), "direct", "max_body = \"4KiB\"", ""),
        closed_port_url(),
    );
    let gw = TestGateway::start(&text).await;
    let relay = |contact: &str| {
        Request::post(gw.url(&format!(
            "/?wpf_action=update&access_key={relay_key}&contact_id={contact}"
        )))
        .header(HOST, "relay.test")
        .body(Full::new(Bytes::new()))
        .unwrap()
    };
    let form = Some(FORM);
    let mut answers = vec![
        post(&gw, &hook("update", Some("60")), None, "").await,
        post(&gw, &hook("update_tags", Some("60")), None, "").await,
        post(&gw, &hook("update_tags", Some("60")), None, "").await,
        post(
            &gw,
            &hook("update", None),
            form,
            "contact%5Bid%5D=61&contact%5Btags%5D=A",
        )
        .await,
        post(
            &gw,
            &hook("add", None),
            Some(JSON),
            r#"{"id":62,"tags":["B"]}"#,
        )
        .await,
        post(
            &gw,
            &format!("{}&ttl=60", hook("lock", Some("63"))),
            None,
            "",
        )
        .await,
        post(&gw, &hook("update", Some("63")), None, "").await,
        get(&gw, &hook("test", None)).await,
        post(&gw, &hook("ck_unsubscribed", Some("64")), form, "x=1").await,
        // The key in the forms PHP also reads as access_key, and twice.
        get(
            &gw,
            &format!("/?wpf_action=update&access%5Fkey={KEY}&contact_id=65"),
        )
        .await,
        get(
            &gw,
            &format!("/?wpf_action=update&access_key={KEY}&contact_id=66&access_key={KEY}"),
        )
        .await,
        get(
            &gw,
            &format!("/p?wpf_action=update&access_key={KEY}&ACCESS_KEY={KEY}&contact_id=67"),
        )
        .await,
        get(
            &gw,
            &format!("/?wpf_action=update&access_key%5B%5D={KEY}&access_key={KEY}&contact_id=68"),
        )
        .await,
        // Refusals.
        get(
            &gw,
            &format!("/?wpf_action=update&access_key={wrong}&contact_id=69"),
        )
        .await,
        post(&gw, &hook("update", None), Some(JSON), "{oops").await,
        post(&gw, &hook("update", None), None, "").await,
        post(&gw, &hook("update", Some("71")), form, &"x".repeat(8192)).await,
        send(relay("80")).await,
        send(relay("81")).await,
    ];
    let statuses: Vec<u16> = answers.iter().map(|r| r.status.as_u16()).collect();
    assert_eq!(
        statuses,
        [
            202, 202, 200, 202, 202, 200, 200, 200, 200, 202, 202, 202, 202, 403, 400, 400, 413,
            202, 429
        ]
    );
    assert_eq!(
        next_seen(&mut seen).await.param("wpf_action"),
        ["ck_unsubscribed"]
    );
    let browser = Request::get(gw.url(&hook("update", Some("70"))))
        .header(ACCEPT, BROWSER_ACCEPT)
        .body(Full::new(Bytes::new()))
        .unwrap();
    answers.push(send(browser).await);
    for r in &answers {
        assert!(!r.text().contains(KEY), "{}", r.text());
        assert!(!r.text().contains(wrong), "{}", r.text());
    }

    // Stored targets keep everything but the key.
    let mut db = queue_db(gw.dir.path()).await;
    let targets: Vec<(String, String)> = sqlx::query_as(
        "SELECT contact, target FROM jobs WHERE contact BETWEEN '65' AND '68' ORDER BY contact",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    db.close().await.ok();
    assert_eq!(
        targets,
        [
            ("65".into(), "/?wpf_action=update&contact_id=65".into()),
            ("66".into(), "/?wpf_action=update&contact_id=66".into()),
            ("67".into(), "/p?wpf_action=update&contact_id=67".into()),
            ("68".into(), "/?wpf_action=update&contact_id=68".into()),
        ]
    );

    // The relayed job was tried (with the key in its URL) and failed.
    let error: String = eventually("the relayed job to fail once", || async {
        let mut db = queue_db(gw.dir.path()).await;
        let error: Option<String> =
            sqlx::query_scalar("SELECT last_error FROM jobs WHERE site = 'relay'")
                .fetch_one(&mut db)
                .await
                .unwrap();
        db.close().await.ok();
        error
    })
    .await;
    assert!(error.starts_with("upstream unreachable"), "{error}");

    let secrets = [KEY, relay_key, wrong];
    assert_no_secret(&data_files(gw.dir.path()), &secrets);
    let dir = gw.stop_keeping_dir().await;
    assert_no_secret(&data_files(dir.path()), &secrets);
}

#[tokio::test]
async fn the_activity_log_records_each_outcome() {
    // Six webhooks from this client are admitted, the seventh is limited.
    let gw = TestGateway::start(&direct("[site.limits]\nper_ip = \"6/min\"")).await;
    let queued_job = post(&gw, &hook("update", Some("1")), None, "").await.job();
    let r = post(&gw, &hook("update_tags", Some("1")), None, "").await;
    assert_eq!(r.json(), coalesced(queued_job, "update_tags", "1"));
    let r = post(&gw, &hook("update_tags", Some("1")), None, "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["status"], "duplicate");
    let r = post(
        &gw,
        &format!("{}&ttl=60", hook("lock", Some("9"))),
        None,
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_locked(
        &post(&gw, &hook("update", Some("9")), None, "").await,
        "9",
        60,
    );
    let r = post(&gw, &hook("add", Some("2")), None, "").await;
    let add_job = r.job();
    let r = post(&gw, &hook("update", Some("3")), None, "").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);

    let some = |s: &str| Some(s.to_owned());
    let expected: Vec<ActivityRow> = vec![
        ("queued".into(), some("1"), some("update"), Some(queued_job)),
        (
            "coalesced".into(),
            some("1"),
            some("update_tags"),
            Some(queued_job),
        ),
        (
            "duplicate".into(),
            some("1"),
            some("update_tags"),
            Some(queued_job),
        ),
        ("lock".into(), some("9"), some("lock"), None),
        ("locked".into(), some("9"), some("update"), None),
        ("queued".into(), some("2"), some("add"), Some(add_job)),
        ("rate_limited".into(), some("3"), some("update"), None),
    ];
    // Locked and rate-limited lines are written with the next batch, after the answer.
    let rows = eventually("every activity line", || async {
        let rows = activity(&gw).await;
        (rows.len() >= expected.len()).then_some(rows)
    })
    .await;
    assert_eq!(rows, expected);
    gw.stop().await;
}
