//! `wpf-gateway demo`: a self-contained tour on loopback. It starts a demo upstream site, an
//! ActiveCampaign simulator (5 requests/s, 50 ms per answer, like the real API) with seeded
//! contacts, and the gateway in direct mode with the embedded user store; then it sends an
//! `add`, an `update`, and a burst of 500 webhooks for 20 contacts with repeats and tag
//! changes, prints what happened, and leaves everything up (status page included) until
//! Ctrl-C.
//!
//! ```text
//! demo site (127.0.0.1:0) <- gateway (8080, admin 9180; any free port if taken) -> CRM sim
//!                               ^ add, update, burst of 500
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::CrmKind;
use crate::crm::sim::{SeedData, Sim, SimContact, SimOptions, SimRate};
use crate::store::{EmbeddedStore, UserStore};

/// The demo's access key: it only ever listens on loopback.
pub const KEY: &str = "demo-access-key";
/// Contacts of the burst, and webhooks in it.
const BURST_CONTACTS: usize = 20;
const BURST_WEBHOOKS: usize = 500;
/// How long the demo waits for the burst to be processed before it reports anyway.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("CRM simulator: {0}")]
    Sim(#[from] crate::crm::sim::SimError),
    #[error("user store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("gateway: {0}")]
    Gateway(#[from] crate::RunError),
    #[error("webhook: {0}")]
    Webhook(String),
}

/// Run the demo until `shutdown` (Ctrl-C in `main`).
pub async fn run(shutdown: CancellationToken) -> Result<(), DemoError> {
    let dir = std::env::temp_dir().join(format!("wpf-gateway-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = tour(&dir, shutdown).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn tour(dir: &std::path::Path, shutdown: CancellationToken) -> Result<(), DemoError> {
    let helpers = CancellationToken::new();
    let _stop_helpers = helpers.clone().drop_guard();

    let site_addr = start_site(helpers.clone()).await?;
    let mut seed = vec![SimContact {
        email: "ann@example.com".into(),
        first_name: "Ann".into(),
        last_name: "Example".into(),
        tags: vec!["Newsletter".into()],
        ..SimContact::default()
    }];
    for n in 1..=BURST_CONTACTS {
        seed.push(SimContact {
            email: format!("member{n}@example.com"),
            first_name: format!("Member {n}"),
            tags: vec!["Member".into()],
            ..SimContact::default()
        });
    }
    let (sim, crm_addr) = start_sim(activecampaign_options(), seed, helpers.clone()).await?;
    let ids: Vec<String> = sim.contacts().into_iter().map(|c| c.id).collect();

    let gateway = start_gateway(
        dir,
        bind_preferred(8080).await?,
        bind_preferred(9180).await?,
        site_addr,
        crm_addr,
    )
    .await?;
    let (gateway_addr, admin_addr) = (gateway.addr, gateway.admin);

    println!("wpf-gateway demo (loopback only; Ctrl-C stops it)");
    println!("  gateway      http://{gateway_addr}/   (in front of the demo site at http://{site_addr}/)");
    println!("  status page  http://{admin_addr}/");
    println!(
        "  CRM          ActiveCampaign simulator at http://{crm_addr}/ (5 requests/s, 50 ms each)"
    );
    println!("  data         {}", dir.display());
    println!();

    let client = client();
    let base = format!("http://{gateway_addr}");
    let first = ids.first().cloned().unwrap_or_default();

    // 1. add: the gateway loads the contact and creates the user itself.
    let (status, answer) = webhook(&client, &base, "add", &first, None).await?;
    println!("1. add contact {first}: {status} {answer}");
    let store = EmbeddedStore::open_read_only(dir).await?;
    let user = wait_for(|| async { store.by_contact("main", &first).await.ok().flatten() }).await;
    match &user {
        Some(u) => println!(
            "   -> user {} {:?} <{}>, role {}, tags {:?}",
            u.id, u.username, u.email, u.role, u.tags
        ),
        None => println!("   -> not processed yet"),
    }

    // 2. update: the CRM changed the contact; the gateway applies it.
    if let Some(mut c) = sim.contact(&first) {
        c.tags.push("Customer".into());
        c.first_name = "Annie".into();
        let _ = sim.put_contact(c);
    }
    let (status, answer) = webhook(&client, &base, "update", &first, None).await?;
    println!(
        "2. update contact {first} (CRM now says: first name Annie, +Customer): {status} {answer}"
    );
    let user = wait_for(|| async {
        store
            .by_contact("main", &first)
            .await
            .ok()
            .flatten()
            .filter(|u| u.tags.iter().any(|t| t == "Customer"))
    })
    .await;
    if let Some(u) = &user {
        println!(
            "   -> tags {:?}, first_name {:?}",
            u.tags,
            u.meta.get("first_name").map(String::as_str).unwrap_or("")
        );
    }

    // 3. The flood: 500 webhooks for 20 contacts, every one sent 25 times, with a tag change
    // in the CRM halfway through.
    let burst: Vec<String> = ids.iter().skip(1).take(BURST_CONTACTS).cloned().collect();
    let calls_before = sim.stats().requests;
    println!(
        "3. burst: {BURST_WEBHOOKS} add/update webhooks for {} contacts, each sent 25 times, a tag added in the CRM halfway",
        burst.len()
    );
    let started = Instant::now();
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    for round in 0..BURST_WEBHOOKS / BURST_CONTACTS.max(1) {
        if round == 12 {
            for id in &burst {
                if let Some(mut c) = sim.contact(id) {
                    c.tags.push("Flood-survivor".into());
                    let _ = sim.put_contact(c);
                }
            }
        }
        let mut sends = Vec::new();
        for id in &burst {
            // Every webhook goes out twice in a row (a CRM retry or double fire); the pairs
            // alternate between add and update.
            let pair = round / 2;
            let action = if pair % 2 == 0 { "add" } else { "update" };
            let body = format!("contact%5Bid%5D={id}&pair={pair}");
            sends.push(webhook_owned(
                client.clone(),
                base.clone(),
                action,
                id.clone(),
                body,
            ));
        }
        for result in futures_join(sends).await {
            let (_, answer) = result?;
            *answers.entry(answer).or_default() += 1;
        }
    }
    let sent_in = started.elapsed();
    let summary: Vec<String> = answers.iter().map(|(k, v)| format!("{v} {k}")).collect();
    println!(
        "   answered in {:.2} s: {}",
        sent_in.as_secs_f64(),
        summary.join(", ")
    );
    println!("   processing at the CRM's pace ...");
    let drained = wait_until(DRAIN_LIMIT, || async {
        for id in &burst {
            let Some(contact) = sim.contact(id) else {
                continue;
            };
            let stored = store.by_contact("main", id).await.ok().flatten();
            if stored.map(|u| u.tags) != Some(contact.tags) {
                return false;
            }
        }
        true
    })
    .await;
    let calls = sim.stats().requests.saturating_sub(calls_before);
    let took = started.elapsed();
    if drained {
        println!(
            "   done in {:.1} s: every user has its contact's newest tags",
            took.as_secs_f64()
        );
    } else {
        println!(
            "   not finished after {} s (see the status page)",
            DRAIN_LIMIT.as_secs()
        );
    }
    println!(
        "   CRM requests: {calls} for {BURST_WEBHOOKS} webhooks ({:.1} per contact; the in-site handler makes 2 or more per webhook: {})",
        calls as f64 / burst.len().max(1) as f64,
        2 * BURST_WEBHOOKS
    );
    println!(
        "   CRM 429s received: {}",
        sim.stats().by_status.get(&429).copied().unwrap_or(0)
    );
    let mut users = 0;
    for id in &ids {
        if store.by_contact("main", id).await?.is_some() {
            users += 1;
        }
    }
    println!("   users in the embedded store: {users}");
    store.close().await;
    println!();
    println!("Still running: open http://{admin_addr}/ for the status page and activity log.");
    println!("Try: curl -X POST 'http://{gateway_addr}/?wpf_action=update_tags&access_key={KEY}&contact_id={first}'");
    println!("Ctrl-C to stop.");

    gateway.serve_until(shutdown).await
}

/// The demo's CRM: ActiveCampaign at the real API's limits, 5 requests/s and 50 ms an answer
/// (the simulator answers `429` beyond the rate). `examples/crm_bench.rs` measures against it.
pub fn activecampaign_options() -> SimOptions {
    SimOptions {
        kind: CrmKind::ActiveCampaign,
        rate: Some(SimRate {
            count: 5,
            per: Duration::from_secs(1),
        }),
        latency: Duration::from_millis(50),
    }
}

/// A CRM simulator with `seed`'s contacts on a free loopback port, serving until `stop`.
pub async fn start_sim(
    options: SimOptions,
    seed: Vec<SimContact>,
    stop: CancellationToken,
) -> Result<(Arc<Sim>, SocketAddr), DemoError> {
    let sim = Sim::new(
        options,
        SeedData {
            contacts: seed,
            ..SeedData::default()
        },
    )?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(sim.clone().serve(listener, stop));
    Ok((sim, addr))
}

/// The demo site (one page that says where it is) on a free loopback port, until `stop`.
pub async fn start_site(stop: CancellationToken) -> Result<SocketAddr, DemoError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(demo_site(listener, stop));
    Ok(addr)
}

/// The demo's gateway, running in-process ([`crate::run`]): one site `main` in direct mode,
/// embedded user store, webhooks on `addr`, admin API and status page on `admin`.
pub struct RunningGateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), crate::RunError>>,
}

/// Write the demo config into `dir` (also its data dir) and start the gateway on `http` and
/// `admin`, in front of `site`, with the ActiveCampaign account at `crm` paced at `5/s`.
pub async fn start_gateway(
    dir: &std::path::Path,
    http: TcpListener,
    admin: TcpListener,
    site: SocketAddr,
    crm: SocketAddr,
) -> Result<RunningGateway, DemoError> {
    let addr = http.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let config_path = dir.join("demo.toml");
    std::fs::write(&config_path, config_text(dir, addr, admin_addr, site, crm))?;
    let config = crate::config::load(&config_path)?;
    let listeners = crate::Listeners {
        http: vec![http],
        tls: Vec::new(),
        admin: Some(admin),
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(crate::run(config, listeners, stop.clone()));
    Ok(RunningGateway {
        addr,
        admin: admin_addr,
        stop,
        task,
    })
}

impl RunningGateway {
    /// Serve until `shutdown` (or until the gateway exits by itself), then stop it.
    pub async fn serve_until(mut self, shutdown: CancellationToken) -> Result<(), DemoError> {
        tokio::select! {
            () = shutdown.cancelled() => self.stop().await,
            result = &mut self.task => joined(result),
        }
    }

    /// Stop the gateway and wait until it has drained and closed its queue (so that its data
    /// directory can be removed).
    pub async fn stop(self) -> Result<(), DemoError> {
        self.stop.cancel();
        joined(self.task.await)
    }
}

fn joined(
    result: Result<Result<(), crate::RunError>, tokio::task::JoinError>,
) -> Result<(), DemoError> {
    match result {
        Ok(r) => r.map_err(DemoError::from),
        Err(e) => Err(DemoError::Webhook(e.to_string())),
    }
}

/// 127.0.0.1:`port`, or any free port when it is taken.
async fn bind_preferred(port: u16) -> std::io::Result<TcpListener> {
    match TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => Ok(l),
        Err(_) => TcpListener::bind("127.0.0.1:0").await,
    }
}

fn config_text(
    dir: &std::path::Path,
    gateway: SocketAddr,
    admin: SocketAddr,
    site: SocketAddr,
    crm: SocketAddr,
) -> String {
    format!(
        r#"# Written by `wpf-gateway demo`.
[server]
listen = ["{gateway}"]
data_dir = "{data}"

[admin]
listen = "{admin}"

[log]
level = "warn"
access_log = false

[[site]]
name = "main"
upstream = "http://{site}"
access_key = "{KEY}"
mode = "direct"
workers = 4

[site.crm]
kind = "activecampaign"
url = "http://{crm}"
api_key = "{api_key}"
rate = "5/s"

[site.users]
roles = ["subscriber", "customer"]
"#,
        data = dir.display(),
        api_key = crate::crm::sim::DEFAULT_API_KEY,
    )
}

/// The demo upstream: a page that says where it is.
async fn demo_site(listener: TcpListener, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_req| async {
                let mut resp = Response::new(Full::new(Bytes::from_static(
                    b"<!doctype html><title>Demo site</title><h1>Demo site</h1>\
                      <p>This page came through wpf-gateway.</p>\n",
                )));
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/html; charset=utf-8"),
                );
                Ok::<_, std::convert::Infallible>(resp)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The HTTP client the demo sends webhooks with (pooled keep-alive connections).
pub type DemoClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// A new [`DemoClient`].
pub fn client() -> DemoClient {
    Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>()
}

/// Send one webhook to the gateway at `base` (`http://ADDR`) with [`KEY`]: `action` with
/// `body` as its form payload, or with `contact_id=contact` in the query when `body` is
/// `None`. The answer as `STATUS` and its `status` (or `error`) field; at most 10 s.
pub async fn webhook(
    client: &DemoClient,
    base: &str,
    action: &str,
    contact: &str,
    body: Option<String>,
) -> Result<(StatusCode, String), DemoError> {
    let mut uri = format!("{base}/?wpf_action={action}&access_key={KEY}");
    if body.is_none() {
        uri.push_str(&format!("&contact_id={contact}"));
    }
    let req = Request::post(uri)
        .header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| DemoError::Webhook(e.to_string()))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| DemoError::Webhook("no answer within 10 s".into()))?
        .map_err(|e| DemoError::Webhook(e.to_string()))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| DemoError::Webhook(e.to_string()))?
        .to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let word = json["status"]
        .as_str()
        .filter(|s| *s != "error")
        .or_else(|| json["error"].as_str())
        .unwrap_or("?")
        .to_owned();
    Ok((status, word))
}

async fn webhook_owned(
    client: DemoClient,
    base: String,
    action: &'static str,
    contact: String,
    body: String,
) -> Result<(StatusCode, String), DemoError> {
    webhook(&client, &base, action, &contact, Some(body)).await
}

/// Run `futures` concurrently; results in order.
async fn futures_join<F, T>(futures: Vec<F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

/// Poll `probe` every 100 ms for up to 10 s until it gives a value.
async fn wait_for<T, F, Fut>(probe: F) -> Option<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = probe().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Poll `done` every 200 ms for up to `limit`; whether it came true.
pub async fn wait_until<F, Fut>(limit: Duration, done: F) -> bool
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if done().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
