//! The webhook pipeline end to end in relay mode: durable queue, coalescing, relay pacing,
//! retries and the dead letter, and crash safety of the real binary (`kill -9`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::support::{TestGateway, TestUpstream};

const KEY: &str = "test-key-123";

/// One request the upstream received.
#[derive(Debug, Clone)]
struct Seen {
    started: Instant,
    query: String,
    job: Option<String>,
    relayed: bool,
    host: Option<String>,
}

impl Seen {
    fn param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

/// A site that records every request, holds each for `delay`, counts requests in flight and
/// answers with `answer(n)` for the n-th request (0-based).
struct Site {
    upstream: TestUpstream,
    seen: Arc<Mutex<Vec<Seen>>>,
    max_in_flight: Arc<AtomicUsize>,
}

impl Site {
    async fn start(
        delay: Duration,
        answer: impl Fn(usize) -> (StatusCode, &'static str, Option<&'static str>)
            + Send
            + Sync
            + 'static,
    ) -> Site {
        let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let max_in_flight = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(answer);
        let (s, f, m) = (seen.clone(), in_flight.clone(), max_in_flight.clone());
        let upstream = TestUpstream::start(move |req: Request<hyper::body::Incoming>| {
            let (s, f, m, answer) = (s.clone(), f.clone(), m.clone(), answer.clone());
            async move {
                let now = f.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                let n = {
                    let mut seen = s.lock().unwrap();
                    seen.push(Seen {
                        started: Instant::now(),
                        query: req.uri().query().unwrap_or("").to_owned(),
                        job: req
                            .headers()
                            .get("x-wpf-job")
                            .map(|v| v.to_str().unwrap().to_owned()),
                        relayed: req.headers().get("x-wpf-gateway").is_some(),
                        host: req
                            .headers()
                            .get("host")
                            .map(|v| v.to_str().unwrap().to_owned()),
                    });
                    seen.len() - 1
                };
                let _ = req.into_body().collect().await;
                tokio::time::sleep(delay).await;
                f.fetch_sub(1, Ordering::SeqCst);
                let (status, body, retry_after) = answer(n);
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                *resp.status_mut() = status;
                if let Some(wait) = retry_after {
                    resp.headers_mut()
                        .insert("retry-after", wait.parse().unwrap());
                }
                resp
            }
        })
        .await;
        Site {
            upstream,
            seen,
            max_in_flight,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Wait until `pred` holds for what the site saw, at most `limit`.
    async fn wait_for(&self, limit: Duration, pred: impl Fn(&[Seen]) -> bool) -> Vec<Seen> {
        let deadline = Instant::now() + limit;
        loop {
            let seen = self.seen();
            if pred(&seen) || Instant::now() > deadline {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn ok(_: usize) -> (StatusCode, &'static str, Option<&'static str>) {
    (StatusCode::OK, "<h3>Success</h3>", None)
}

fn relay_config(upstream: &str, extra_site: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
data_dir = "{{data_dir}}"
{extra}
[[site]]
name = "main"
upstream = "{upstream}"
access_key = "{KEY}"
mode = "relay"
{extra_site}
"#
    )
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// POST an ActiveCampaign-style form webhook; returns status and JSON answer.
async fn webhook(
    client: &HttpClient,
    base: &str,
    action: &str,
    contact: &str,
    tags: &str,
) -> (StatusCode, Value) {
    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("contact[id]", contact)
        .append_pair("contact[tags]", tags)
        .finish();
    let req = Request::post(format!("{base}/?wpf_action={action}&access_key={KEY}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("answer in time")
        .expect("answer");
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status, json)
}

#[tokio::test]
async fn concurrent_webhooks_for_one_contact_run_at_most_twice_and_the_last_run_is_fresh() {
    let site = Site::start(Duration::from_millis(150), ok).await;
    let gw = TestGateway::start(&relay_config(&site.upstream.url(), "", "")).await;
    let base = gw.url("");
    let client = client();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let (client, base) = (client.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            webhook(&client, &base, "update_tags", "77", &format!("tag-{i}")).await
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let last_answer = Instant::now();
    for (status, json) in &answers {
        assert_eq!(*status, StatusCode::ACCEPTED, "{json}");
        assert!(
            json["status"] == "queued" || json["status"] == "coalesced",
            "{json}"
        );
    }
    let seen = site
        .wait_for(Duration::from_secs(5), |s| {
            s.last().is_some_and(|l| l.started > last_answer)
        })
        .await;
    // Give a third run every chance to appear before counting.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let seen_after = site.seen();
    assert_eq!(seen.len(), seen_after.len());
    assert!(
        (1..=2).contains(&seen.len()),
        "200 webhooks for one contact ran {} times",
        seen.len()
    );
    let last = seen.last().unwrap();
    assert!(last.started > last_answer || seen.len() == 1);
    assert!(last.relayed);
    assert_eq!(last.param("wpf_action").as_deref(), Some("update_tags"));
    assert_eq!(last.param("access_key").as_deref(), Some(KEY));
    assert_eq!(site.max_in_flight.load(Ordering::SeqCst), 1);
    gw.stop().await;
}

#[tokio::test]
async fn relay_keeps_to_upstream_concurrency_and_every_contact_arrives() {
    let site = Site::start(Duration::from_millis(80), ok).await;
    let gw = TestGateway::start(&relay_config(
        &site.upstream.url(),
        "workers = 6\nupstream_concurrency = 2",
        "",
    ))
    .await;
    let base = gw.url("");
    let client = client();
    for i in 0..20 {
        let (status, json) = webhook(&client, &base, "update", &format!("c{i}"), "").await;
        assert_eq!(status, StatusCode::ACCEPTED, "{json}");
        assert_eq!(json["status"], "queued");
    }
    let seen = site
        .wait_for(Duration::from_secs(10), |s| s.len() >= 20)
        .await;
    assert_eq!(seen.len(), 20);
    let jobs: std::collections::HashSet<_> = seen.iter().filter_map(|s| s.job.clone()).collect();
    assert_eq!(jobs.len(), 20, "each job relayed once");
    // The Host the CRM addressed reaches the site, as on the pass-through path.
    let gw_host = gw.addr.to_string();
    assert!(seen
        .iter()
        .all(|s| s.host.as_deref() == Some(gw_host.as_str())));
    assert_eq!(site.max_in_flight.load(Ordering::SeqCst), 2);
    gw.stop().await;
}

#[tokio::test]
async fn transient_failures_follow_the_schedule_then_the_dead_letter() {
    let site = Site::start(Duration::ZERO, |_| {
        (StatusCode::SERVICE_UNAVAILABLE, "busy", None)
    })
    .await;
    // The config refuses delays under 1 s; the test shortens them after validation.
    let gw = TestGateway::start_with(&relay_config(&site.upstream.url(), "", ""), |c| {
        c.queue.retry_schedule = vec![Duration::from_millis(200), Duration::from_millis(400)];
        c.queue.retry_until = Duration::from_millis(1500);
    })
    .await;
    let (status, json) = webhook(&client(), &gw.url(""), "update", "9", "").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{json}");
    let job = json["job"].as_i64().unwrap();
    let start = Instant::now();
    let db = gw.dir.path().join("queue.sqlite3");
    let state = wait_for_state(&db, job, "dead", Duration::from_secs(5)).await;
    assert_eq!(state.as_deref(), Some("dead"));
    let seen = site.seen();
    // 0, +200, +400, +400 … until 1.5 s after arrival: 4 or 5 attempts with ±20 % jitter, one
    // fewer when a loaded machine (CI runs tests in parallel) delays each attempt a little.
    assert!((3..=5).contains(&seen.len()), "{} attempts", seen.len());
    let gaps: Vec<Duration> = seen
        .windows(2)
        .map(|w| w[1].started - w[0].started)
        .collect();
    assert!(gaps[0] >= Duration::from_millis(150), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(300), "{gaps:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
    let outcomes = activity_outcomes(&db, job).await;
    assert_eq!(outcomes.first().map(String::as_str), Some("queued"));
    assert!(
        outcomes.iter().filter(|o| *o == "retry").count() >= 3,
        "{outcomes:?}"
    );
    assert_eq!(outcomes.last().map(String::as_str), Some("dead"));
    gw.stop().await;
}

#[tokio::test]
async fn permanent_failure_is_not_retried() {
    let site = Site::start(Duration::ZERO, |_| {
        (StatusCode::FORBIDDEN, "Invalid Access Key", None)
    })
    .await;
    let gw = TestGateway::start_with(&relay_config(&site.upstream.url(), "", ""), |c| {
        c.queue.retry_schedule = vec![Duration::from_millis(100)];
    })
    .await;
    let (_, json) = webhook(&client(), &gw.url(""), "update", "9", "").await;
    let job = json["job"].as_i64().unwrap();
    let db = gw.dir.path().join("queue.sqlite3");
    let state = wait_for_state(&db, job, "failed", Duration::from_secs(5)).await;
    assert_eq!(state.as_deref(), Some("failed"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(site.seen().len(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn retry_after_from_the_site_pauses_relaying() {
    let site = Site::start(Duration::ZERO, |n| {
        if n == 0 {
            (StatusCode::TOO_MANY_REQUESTS, "slow down", Some("1"))
        } else {
            (StatusCode::OK, "ok", None)
        }
    })
    .await;
    let gw = TestGateway::start(&relay_config(&site.upstream.url(), "", "")).await;
    let (_, json) = webhook(&client(), &gw.url(""), "update", "5", "").await;
    let job = json["job"].as_i64().unwrap();
    let db = gw.dir.path().join("queue.sqlite3");
    assert_eq!(
        wait_for_state(&db, job, "done", Duration::from_secs(5))
            .await
            .as_deref(),
        Some("done")
    );
    let seen = site.seen();
    assert_eq!(seen.len(), 2);
    let gap = seen[1].started - seen[0].started;
    assert!(gap >= Duration::from_millis(950), "{gap:?}");
    assert!(gap < Duration::from_secs(3), "{gap:?}");
    gw.stop().await;
}

/// The real binary is killed with SIGKILL right after the last 202; restarted on the same
/// data_dir it relays every accepted job. Only jobs that were running at the kill may arrive
/// twice (at-least-once delivery; `X-WPF-Job` lets a site recognise them).
#[tokio::test]
async fn kill_9_loses_no_accepted_job() {
    const JOBS: usize = 500;
    let site = Site::start(Duration::from_millis(20), ok).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().await;
    let config = format!(
        r#"
[server]
listen = ["127.0.0.1:{port}"]
data_dir = "{data}"
[log]
access_log = false
level = "warn"
[[site]]
name = "main"
upstream = "{upstream}"
access_key = "{KEY}"
mode = "relay"
upstream_concurrency = 2
"#,
        data = dir.path().join("data").display(),
        upstream = site.upstream.url(),
    );
    let config_path = dir.path().join("gateway.toml");
    std::fs::write(&config_path, config).unwrap();
    let base = format!("http://127.0.0.1:{port}");

    let mut child = spawn_gateway(&config_path);
    wait_listening(port).await;
    let client = client();
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for worker in 0..10 {
        let (client, base, accepted) = (client.clone(), base.clone(), accepted.clone());
        tasks.push(tokio::spawn(async move {
            for i in (worker..JOBS).step_by(10) {
                let (status, json) =
                    webhook(&client, &base, "update_tags", &format!("k{i}"), "a, b").await;
                assert_eq!(status, StatusCode::ACCEPTED, "{json}");
                accepted
                    .lock()
                    .unwrap()
                    .push(json["job"].as_i64().unwrap().to_string());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let before = site.seen().len();
    assert!(before < JOBS, "the kill came too late to prove anything");

    let mut child = spawn_gateway(&config_path);
    wait_listening(port).await;
    let accepted = accepted.lock().unwrap().clone();
    assert_eq!(accepted.len(), JOBS);
    let seen = site
        .wait_for(Duration::from_secs(60), |s| {
            let jobs: std::collections::HashSet<_> =
                s.iter().filter_map(|x| x.job.clone()).collect();
            accepted.iter().all(|j| jobs.contains(j))
        })
        .await;
    child.kill().ok();
    let _ = child.wait();
    let mut times: HashMap<String, usize> = HashMap::new();
    for s in &seen {
        *times.entry(s.job.clone().unwrap()).or_default() += 1;
    }
    let missing: Vec<_> = accepted
        .iter()
        .filter(|j| !times.contains_key(*j))
        .collect();
    assert!(
        missing.is_empty(),
        "accepted but never relayed: {missing:?}"
    );
    let twice: Vec<_> = times.iter().filter(|(_, n)| **n > 1).collect();
    // A job is `running` from its lease until its result is committed: at most `workers` (4)
    // of them, on the wire or answered but not yet recorded when the kill came.
    assert!(
        twice.len() <= 4 && twice.iter().all(|(_, n)| **n == 2),
        "only the (at most 4) jobs running at the kill may repeat: {twice:?}"
    );
}

fn spawn_gateway(config: &std::path::Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_wpf-gateway"))
        .args(["run", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn wpf-gateway")
}

async fn free_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

async fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "gateway did not start listening");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn open_db(path: &std::path::Path) -> sqlx::SqliteConnection {
    use sqlx::Connection;
    let url = format!("sqlite://{}?mode=ro", path.display());
    sqlx::SqliteConnection::connect(&url)
        .await
        .expect("open queue")
}

async fn wait_for_state(
    db: &std::path::Path,
    job: i64,
    want: &str,
    limit: Duration,
) -> Option<String> {
    let deadline = Instant::now() + limit;
    let mut conn = open_db(db).await;
    loop {
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM jobs WHERE id = ?")
            .bind(job)
            .fetch_optional(&mut conn)
            .await
            .unwrap();
        if state.as_deref() == Some(want) || Instant::now() > deadline {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn activity_outcomes(db: &std::path::Path, job: i64) -> Vec<String> {
    let mut conn = open_db(db).await;
    sqlx::query_scalar("SELECT outcome FROM activity WHERE job = ? ORDER BY id")
        .bind(job)
        .fetch_all(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn relay_keeps_to_the_crm_accounts_pace() {
    let site = Site::start(Duration::ZERO, ok).await;
    let gw = TestGateway::start(&relay_config(
        &site.upstream.url(),
        "workers = 4\nupstream_concurrency = 4\n[site.crm]\nkind = \"activecampaign\"\n\
         url = \"http://127.0.0.1:9\"\napi_key = \"crm-api-key-1\"\nrate = \"5/s\"",
        "",
    ))
    .await;
    let client = client();
    for i in 0..6 {
        let (status, _) = webhook(&client, &gw.url(""), "update", &format!("p{i}"), "").await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    let seen = site
        .wait_for(Duration::from_secs(5), |s| s.len() >= 6)
        .await;
    assert_eq!(seen.len(), 6);
    // 5/s spaced evenly: 200 ms apart, so the six take at least a second.
    let span = seen[5].started - seen[0].started;
    assert!(span >= Duration::from_millis(950), "{span:?}");
    for w in seen.windows(2) {
        let gap = w[1].started - w[0].started;
        assert!(gap >= Duration::from_millis(150), "{gap:?}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_corrupt_queue_file_stops_the_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("queue.sqlite3"), vec![0x5a_u8; 8192]).unwrap();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\ndata_dir = \"{}\"\n[[site]]\nname = \"main\"\n\
         upstream = \"http://127.0.0.1:9\"\naccess_key = \"{KEY}\"\n",
        data.display()
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    let config = wpf_gateway::config::load(&path).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let listeners = wpf_gateway::Listeners {
        http: vec![listener],
        tls: Vec::new(),
        admin: None,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let result = tokio::time::timeout(
        Duration::from_secs(5),
        wpf_gateway::run(config, listeners, shutdown),
    )
    .await
    .expect("run returns at once");
    let message = result
        .expect_err("a corrupt queue must refuse to start")
        .to_string();
    assert!(message.contains("queue.sqlite3"), "{message}");
    assert!(message.contains("not a database"), "{message}");
}

#[tokio::test]
async fn a_second_gateway_on_the_same_data_dir_is_refused() {
    let site = Site::start(Duration::ZERO, ok).await;
    let gw = TestGateway::start(&relay_config(&site.upstream.url(), "", "")).await;
    // The first gateway serves (so its queue is open) before the second one starts.
    let (status, _) = webhook(&client(), &gw.url(""), "test", "1", "").await;
    assert_eq!(status, StatusCode::OK);
    let text = relay_config(&site.upstream.url(), "", "")
        .replace("{data_dir}", &gw.dir.path().display().to_string());
    let path = gw.dir.path().join("second.toml");
    std::fs::write(&path, text).unwrap();
    let config = wpf_gateway::config::load(&path).unwrap();
    let listeners = wpf_gateway::Listeners {
        http: vec![tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()],
        tls: Vec::new(),
        admin: None,
    };
    let result = tokio::time::timeout(
        Duration::from_secs(5),
        wpf_gateway::run(
            config,
            listeners,
            tokio_util::sync::CancellationToken::new(),
        ),
    )
    .await
    .expect("run returns at once");
    let message = result
        .expect_err("second gateway must not start")
        .to_string();
    assert!(
        message.contains("in use by another wpf-gateway"),
        "{message}"
    );
    gw.stop().await;
}

/// A full disk: webhooks get `503 queue_unavailable` (never a 202 for a job that is not on
/// disk), the site still browses, and once space is back webhooks are accepted again. Needs
/// root to mount a small tmpfs; skipped (with a note) otherwise.
#[tokio::test]
async fn a_full_disk_answers_503_and_keeps_serving_the_site() {
    let mount = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(mount.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here (not root?)");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mount.path().to_owned());
    let site = Site::start(Duration::ZERO, ok).await;
    let data = mount.path().join("data");
    // A paused site keeps its accepted jobs in the queue, so they fill the disk.
    let config = relay_config(
        &site.upstream.url(),
        "max_body = \"64KiB\"\npaused = true\n[site.crm]\nkind = \"activecampaign\"\n\
         url = \"http://127.0.0.1:9\"\napi_key = \"crm-api-key-1\"",
        "",
    )
    .replace("mode = \"relay\"", "mode = \"direct\"")
    .replace("{data_dir}", &data.display().to_string());
    let filler = mount.path().join("filler");
    std::fs::write(&filler, vec![0u8; 1024 * 1024]).unwrap();
    let gw = TestGateway::start(&config).await;
    let client = client();
    let big = "x".repeat(60 * 1024);
    let mut accepted = Vec::new();
    let mut refused = None;
    for i in 0..200 {
        let (status, json) = webhook(&client, &gw.url(""), "update", &format!("d{i}"), &big).await;
        match status {
            StatusCode::ACCEPTED => accepted.push(json["job"].as_i64().unwrap()),
            StatusCode::SERVICE_UNAVAILABLE => {
                refused = Some(json);
                break;
            }
            other => panic!("unexpected {other}: {json}"),
        }
    }
    let refused = refused.expect("a 2 MiB disk must fill up");
    assert_eq!(refused["error"], "queue_unavailable", "{refused}");
    assert!(!accepted.is_empty());
    // Pass-through is unaffected.
    let resp = client
        .request(
            Request::get(gw.url("/page"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.expect("pass-through answer").status(), StatusCode::OK);
    // Every 202 is on disk.
    let mut conn = open_db(&data.join("queue.sqlite3")).await;
    for job in &accepted {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE id = ?")
            .bind(job)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(n, 1, "job {job} was acknowledged but is not stored");
    }
    drop(conn);
    // Space is back: webhooks are accepted again.
    std::fs::remove_file(&filler).unwrap();
    let (status, json) = webhook(&client, &gw.url(""), "update", "after", "a").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{json}");
    gw.stop().await;
}
