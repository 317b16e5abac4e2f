//! Direct mode end to end: the real gateway, the CRM simulator of each kind over real sockets,
//! the embedded user store in the test's data directory, and a real SMTP listener.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, StatusCode};
use serde_json::Value;
use tokio_util::sync::{CancellationToken, DropGuard};
use wpf_gateway::config::CrmKind;
use wpf_gateway::crm::sim::{SeedData, Sim, SimContact, SimOptions};
use wpf_gateway::store::{EmbeddedStore, User, UserStore};

use crate::support::{send, Reply, SmtpSink, TestGateway, TestUpstream};

const KEY: &str = "test-key-123";

/// A simulator serving on 127.0.0.1:0 until dropped.
pub(crate) struct RunningSim {
    pub sim: Arc<Sim>,
    pub url: String,
    _stop: DropGuard,
}

pub(crate) async fn start_sim(kind: CrmKind, contacts: Vec<SimContact>) -> RunningSim {
    start_sim_with(SimOptions::new(kind), contacts).await
}

async fn start_sim_with(options: SimOptions, contacts: Vec<SimContact>) -> RunningSim {
    let sim = Sim::new(
        options,
        SeedData {
            contacts,
            ..SeedData::default()
        },
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(sim.clone().serve(listener, stop.clone()));
    RunningSim {
        sim,
        url,
        _stop: stop.drop_guard(),
    }
}

pub(crate) fn contact(id: &str, email: &str, first: &str, tags: &[&str]) -> SimContact {
    SimContact {
        id: id.into(),
        email: email.into(),
        first_name: first.into(),
        last_name: "Lee".into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ..SimContact::default()
    }
}

pub(crate) fn kind_name(kind: CrmKind) -> &'static str {
    match kind {
        CrmKind::ActiveCampaign => "activecampaign",
        CrmKind::FluentCrm => "fluentcrm",
        CrmKind::AgileCrm => "agilecrm",
    }
}

/// One direct-mode site on `crm`, answering in `respond` mode, with `extra` TOML appended to
/// the site (its own tables: `[site.fields]`, `[site.users]` ...) and short retries.
pub(crate) fn config(
    kind: CrmKind,
    crm: &str,
    respond: &str,
    crm_extra: &str,
    extra: &str,
) -> String {
    let user = match kind {
        CrmKind::ActiveCampaign => String::new(),
        _ => "user = \"sim@example.com\"\n".to_string(),
    };
    format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
data_dir = "{{data_dir}}"

[admin]
listen = "127.0.0.1:0"

[[site]]
name = "main"
upstream = "http://127.0.0.1:9"
access_key = "{KEY}"
mode = "direct"
respond = "{respond}"
sync_timeout = "4s"

[site.crm]
kind = "{kind}"
url = "{crm}"
api_key = "sim-key"
rate = "50/s"
timeout = "2s"
{user}{crm_extra}
{extra}
"#,
        kind = kind_name(kind),
    )
}

/// Start the gateway with short retries (200 ms, 400 ms, then dead after 2 s): shorter than
/// the config file allows.
pub(crate) async fn start(text: &str) -> TestGateway {
    TestGateway::start_with(text, |c| {
        c.queue.retry_schedule = vec![Duration::from_millis(200), Duration::from_millis(400)];
        c.queue.retry_until = Duration::from_secs(2);
    })
    .await
}

pub(crate) async fn webhook(gw: &TestGateway, query: &str) -> Reply {
    webhook_with(gw, query, None, "").await
}

async fn webhook_with(
    gw: &TestGateway,
    query: &str,
    content_type: Option<&str>,
    body: &str,
) -> Reply {
    let mut req = Request::post(format!("http://{}/?access_key={KEY}&{query}", gw.addr));
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    send(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap()).await
}

async fn store_of(gw: &TestGateway) -> EmbeddedStore {
    EmbeddedStore::open_read_only(gw.dir.path()).await.unwrap()
}

/// Poll the store until `contact` has a user for which `pred` holds (or 10 s pass).
async fn wait_user(gw: &TestGateway, contact: &str, pred: impl Fn(&User) -> bool) -> Option<User> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(store) = EmbeddedStore::open_read_only(gw.dir.path()).await {
            let user = store.by_contact("main", contact).await.unwrap();
            store.close().await;
            if let Some(user) = user.filter(|u| pred(u)) {
                return Some(user);
            }
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Activity lines of the admin API for `outcome`.
async fn activity(gw: &TestGateway, outcome: &str) -> Vec<Value> {
    let url = format!(
        "http://{}/api/activity?outcome={outcome}",
        gw.admin_addr.unwrap()
    );
    let reply = send(
        Request::get(url)
            .header("host", "127.0.0.1")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()["activity"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn tags(user: &User) -> Vec<&str> {
    user.tags.iter().map(String::as_str).collect()
}

/// Every CRM kind: `add` creates the user with the CRM's tags and mapped fields, `update`
/// applies a changed field and tags, `update_tags` applies tags only.
#[tokio::test]
async fn each_crm_adds_updates_and_retags_a_user() {
    for kind in [
        CrmKind::ActiveCampaign,
        CrmKind::FluentCrm,
        CrmKind::AgileCrm,
    ] {
        let crm = start_sim(kind, vec![]).await;
        let created = crm
            .sim
            .create_contact(contact("", "Ann@Example.com", "Ann", &["VIP", "Customer"]))
            .unwrap();
        let id = created.id.clone();
        let gw = start(&config(kind, &crm.url, "sync", "", "")).await;

        let reply = webhook(&gw, &format!("wpf_action=add&contact_id={id}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{kind:?}: {}", reply.text());
        let json = reply.json();
        assert_eq!(json["status"], "done", "{json}");
        assert_eq!(json["report"]["user"]["created"], true, "{json}");
        let store = store_of(&gw).await;
        let user = store.by_contact("main", &id).await.unwrap().expect("user");
        assert_eq!(user.email.to_lowercase(), "ann@example.com", "{kind:?}");
        // WP Fusion keeps FluentCRM tags by slug, the others by name.
        let expected = match kind {
            CrmKind::FluentCrm => ["vip", "customer"],
            _ => ["VIP", "Customer"],
        };
        assert_eq!(tags(&user), expected, "{kind:?}");
        assert_eq!(
            user.meta.get("first_name").map(String::as_str),
            Some("Ann"),
            "{kind:?}"
        );
        assert_eq!(user.role, "subscriber");

        let mut changed = crm.sim.contact(&id).unwrap();
        changed.first_name = "Anna".into();
        changed.tags = vec!["VIP".into(), "Gold".into()];
        crm.sim.put_contact(changed).unwrap();
        let reply = webhook(&gw, &format!("wpf_action=update&contact_id={id}")).await;
        assert_eq!(reply.json()["status"], "done", "{kind:?}: {}", reply.text());
        let user = store.by_contact("main", &id).await.unwrap().unwrap();
        let expected = match kind {
            CrmKind::FluentCrm => ["vip", "gold"],
            _ => ["VIP", "Gold"],
        };
        assert_eq!(tags(&user), expected, "{kind:?}");
        assert_eq!(user.meta["first_name"], "Anna", "{kind:?}");

        let mut changed = crm.sim.contact(&id).unwrap();
        changed.first_name = "Not applied".into();
        changed.tags = vec!["Gold".into()];
        crm.sim.put_contact(changed).unwrap();
        let reply = webhook(&gw, &format!("wpf_action=update_tags&contact_id={id}")).await;
        assert_eq!(reply.json()["status"], "done", "{kind:?}: {}", reply.text());
        let user = store.by_contact("main", &id).await.unwrap().unwrap();
        let expected = match kind {
            CrmKind::FluentCrm => ["gold"],
            _ => ["Gold"],
        };
        assert_eq!(tags(&user), expected, "{kind:?}");
        assert_eq!(
            user.meta["first_name"], "Anna",
            "update_tags leaves fields alone"
        );
        store.close().await;
    }
}

/// ActiveCampaign's own form-encoded webhook, without `contact_id` in the query: the id comes
/// from `contact[id]` and the payload's tags spare the CRM call.
#[tokio::test]
async fn activecampaign_form_payload_without_contact_id() {
    let crm = start_sim(
        CrmKind::ActiveCampaign,
        vec![contact("7", "bo@example.com", "Bo", &["Old"])],
    )
    .await;
    let gw = start(&config(CrmKind::ActiveCampaign, &crm.url, "sync", "", "")).await;
    let reply = webhook(&gw, "wpf_action=add&contact_id=7").await;
    assert_eq!(reply.json()["status"], "done", "{}", reply.text());
    crm.sim.clear_requests();

    let body = "contact%5Bid%5D=7&contact%5Bemail%5D=bo%40example.com\
                &contact%5Btags%5D=Member%2C+Gold&type=contact_tag_added";
    let reply = webhook_with(
        &gw,
        "wpf_action=update_tags",
        Some("application/x-www-form-urlencoded"),
        body,
    )
    .await;
    let json = reply.json();
    assert_eq!(json["status"], "done", "{json}");
    assert_eq!(json["contact_id"], "7");
    assert_eq!(json["report"]["contact"]["source"], "webhook payload");
    let user = wait_user(&gw, "7", |_| true).await.unwrap();
    assert_eq!(tags(&user), ["Member", "Gold"]);
    assert_eq!(crm.sim.stats().requests, 0, "payload tags need no CRM call");
}

/// Agile CRM ids are 16-digit numbers, in the API's JSON and in Agile's webhook payload.
#[tokio::test]
async fn agile_sixteen_digit_ids() {
    let crm = start_sim(CrmKind::AgileCrm, vec![]).await;
    let created = crm
        .sim
        .create_contact(contact("", "cy@example.com", "Cy", &["Lead"]))
        .unwrap();
    assert_eq!(created.id.len(), 16, "{}", created.id);
    let gw = start(&config(CrmKind::AgileCrm, &crm.url, "sync", "", "")).await;
    let body = format!(
        r#"{{"eventName":"contact_created","eventData":{{"id":{},"tags":["Lead"]}}}}"#,
        created.id
    );
    let reply = webhook_with(&gw, "wpf_action=add", Some("application/json"), &body).await;
    let json = reply.json();
    assert_eq!(json["status"], "done", "{json}");
    assert_eq!(json["contact_id"], created.id.as_str());
    let user = wait_user(&gw, &created.id, |_| true).await.unwrap();
    assert_eq!(user.contact_id.as_deref(), Some(created.id.as_str()));
}

/// A 429 with Retry-After, then a CRM that is down for a while: the job waits and retries,
/// then succeeds; nothing is lost.
#[tokio::test]
async fn crm_rate_limit_and_outage_are_retried_until_success() {
    let crm = start_sim(
        CrmKind::ActiveCampaign,
        vec![contact("8", "di@example.com", "Di", &["A"])],
    )
    .await;
    let gw = start(&config(CrmKind::ActiveCampaign, &crm.url, "async", "", "")).await;
    crm.sim.inject(wpf_gateway::crm::sim::Failure {
        status: StatusCode::TOO_MANY_REQUESTS,
        count: 1,
        retry_after: Some(Duration::from_secs(1)),
    });
    let started = Instant::now();
    let reply = webhook(&gw, "wpf_action=add&contact_id=8").await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    let user = wait_user(&gw, "8", |_| true)
        .await
        .expect("user after the 429");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "Retry-After honoured"
    );
    assert_eq!(tags(&user), ["A"]);
    assert_eq!(crm.sim.stats().by_status.get(&429), Some(&1));

    // Down: three 503s in a row, then up again.
    crm.sim.fail_next(StatusCode::SERVICE_UNAVAILABLE, 3);
    let mut c = crm.sim.contact("8").unwrap();
    c.tags = vec!["B".into()];
    crm.sim.put_contact(c).unwrap();
    let reply = webhook(&gw, "wpf_action=update_tags&contact_id=8").await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let user = wait_user(&gw, "8", |u| u.tags == ["B"]).await;
    assert!(user.is_some(), "retried until the CRM answered");
    assert!(
        !activity(&gw, "retry").await.is_empty(),
        "retries are in the activity log"
    );

    // Every CRM answer is counted by status.
    let metrics = send(
        Request::get(format!("http://{}/metrics", gw.admin_addr.unwrap()))
            .header("host", "127.0.0.1")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
    .text();
    for status in ["200", "429", "503"] {
        let line = format!("wpf_gateway_crm_requests_total{{site=\"main\",status=\"{status}\"}}");
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    }
    assert!(metrics.contains("wpf_gateway_crm_requests_total{site=\"main\",status=\"503\"} 3"));
}

/// A CRM that is down (connection refused) is transient: the job is retried; when the CRM
/// comes back on the same address the job succeeds. One that never comes back ends in the
/// dead letter, where the admin API can replay it.
#[tokio::test]
async fn crm_down_is_retried_until_it_is_back_or_dead() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let gw = start(&config(
        CrmKind::ActiveCampaign,
        &format!("http://{addr}"),
        "async",
        "",
        "",
    ))
    .await;
    let reply = webhook(&gw, "wpf_action=add&contact_id=9").await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let deadline = Instant::now() + Duration::from_secs(10);
    while activity(&gw, "retry").await.is_empty() {
        assert!(Instant::now() < deadline, "never retried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The CRM comes back on its address.
    let sim = Sim::new(
        SimOptions::new(CrmKind::ActiveCampaign),
        SeedData {
            contacts: vec![contact("9", "nia@example.com", "Nia", &["Back"])],
            ..SeedData::default()
        },
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    tokio::spawn(sim.clone().serve(listener, stop));
    let user = wait_user(&gw, "9", |_| true)
        .await
        .expect("processed once the CRM is back");
    assert_eq!(tags(&user), ["Back"]);

    // Down for good: retried on the schedule, then dead.
    drop(_stop);
    let reply = webhook(&gw, "wpf_action=update&contact_id=9").await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    while activity(&gw, "dead").await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "job never went to the dead letter"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A wrong API key is permanent: one attempt, visible in the activity log, 422 in sync mode.
#[tokio::test]
async fn wrong_api_key_fails_permanently_and_is_logged() {
    for kind in [
        CrmKind::ActiveCampaign,
        CrmKind::FluentCrm,
        CrmKind::AgileCrm,
    ] {
        let crm = start_sim(kind, vec![]).await;
        let id = crm
            .sim
            .create_contact(contact("", "ed@example.com", "Ed", &[]))
            .unwrap()
            .id;
        let text = config(kind, &crm.url, "sync", "", "").replace("sim-key", "wrong-key");
        let gw = start(&text).await;
        let reply = webhook(&gw, &format!("wpf_action=add&contact_id={id}")).await;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{kind:?}: {}",
            reply.text()
        );
        assert_eq!(reply.json()["error"], "invalid_credentials", "{kind:?}");
        assert!(!reply.text().contains("wrong-key"));
        let failed = activity(&gw, "failed").await;
        assert_eq!(failed.len(), 1, "{kind:?}: {failed:?}");
        assert!(
            failed[0]["detail"]
                .as_str()
                .unwrap()
                .contains("invalid_credentials"),
            "{failed:?}"
        );
        assert!(!failed[0].to_string().contains("wrong-key"));
        assert_eq!(crm.sim.stats().requests, 1, "{kind:?}: not retried");
    }
}

/// Contact not found (AC 404, FluentCRM, Agile 204) and no matching user for `update`.
#[tokio::test]
async fn missing_contact_and_missing_user_are_permanent() {
    for kind in [
        CrmKind::ActiveCampaign,
        CrmKind::FluentCrm,
        CrmKind::AgileCrm,
    ] {
        let crm = start_sim(kind, vec![]).await;
        let gw = start(&config(kind, &crm.url, "sync", "", "")).await;
        let reply = webhook(&gw, "wpf_action=update&contact_id=4242").await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{kind:?}");
        assert_eq!(
            reply.json()["error"],
            "contact_not_found",
            "{kind:?}: {}",
            reply.text()
        );

        let id = crm
            .sim
            .create_contact(contact("", "fay@example.com", "Fay", &[]))
            .unwrap()
            .id;
        let reply = webhook(&gw, &format!("wpf_action=update&contact_id={id}")).await;
        assert_eq!(
            reply.json()["error"],
            "no_matching_user",
            "{kind:?}: {}",
            reply.text()
        );
    }
}

/// `add` twice (and for a contact whose email a user already has) makes one user.
#[tokio::test]
async fn add_twice_makes_one_user() {
    let crm = start_sim(
        CrmKind::ActiveCampaign,
        vec![contact("11", "gus@example.com", "Gus", &["T"])],
    )
    .await;
    let gw = start(&config(CrmKind::ActiveCampaign, &crm.url, "sync", "", "")).await;
    let first = webhook(&gw, "wpf_action=add&contact_id=11").await.json();
    let second = webhook(&gw, "wpf_action=add&contact_id=11").await.json();
    assert_eq!(first["report"]["user"]["created"], true, "{first}");
    assert_eq!(second["report"]["user"]["created"], false, "{second}");
    assert_eq!(
        first["report"]["user"]["id"],
        second["report"]["user"]["id"]
    );
    let store = store_of(&gw).await;
    assert!(store
        .by_email("main", "GUS@example.com")
        .await
        .unwrap()
        .is_some());
}

/// Roles: a listed role is granted, `administrator` never is (config refuses to list it, and
/// a webhook asking for it gets the default role).
#[tokio::test]
async fn roles_are_granted_only_when_listed_and_never_administrator() {
    let crm = start_sim(
        CrmKind::ActiveCampaign,
        vec![
            contact("21", "hal@example.com", "Hal", &[]),
            contact("22", "ivy@example.com", "Ivy", &[]),
        ],
    )
    .await;
    let extra = "[site.users]\nroles = [\"customer\"]\n";
    let gw = start(&config(
        CrmKind::ActiveCampaign,
        &crm.url,
        "sync",
        "",
        extra,
    ))
    .await;
    let json = webhook(&gw, "wpf_action=add&contact_id=21&role=administrator")
        .await
        .json();
    assert_eq!(json["report"]["user"]["role"], "subscriber", "{json}");
    assert!(
        json["result"].as_str().unwrap().contains("not allowed"),
        "{json}"
    );
    let json = webhook(&gw, "wpf_action=add&contact_id=22&role=customer")
        .await
        .json();
    assert_eq!(json["report"]["user"]["role"], "customer", "{json}");
    let json = webhook(&gw, "wpf_action=update&contact_id=22&role=administrator")
        .await
        .json();
    assert_eq!(json["report"]["user"]["role"], "customer", "{json}");
}

/// Return password: the generated password is written to the CRM field, the contact is locked,
/// and the CRM's echo webhook is answered `locked`. The password never shows in answers.
#[tokio::test]
async fn return_password_is_written_and_the_echo_is_locked() {
    let crm = start_sim(
        CrmKind::ActiveCampaign,
        vec![contact("31", "jo@example.com", "Jo", &["New"])],
    )
    .await;
    let gw = start(&config(
        CrmKind::ActiveCampaign,
        &crm.url,
        "sync",
        "return_password_field = \"field:5\"\n",
        "",
    ))
    .await;
    let reply = webhook(&gw, "wpf_action=add&contact_id=31").await;
    let json = reply.json();
    assert_eq!(json["status"], "done", "{json}");
    let password = crm.sim.contact("31").unwrap().fields.get("5").cloned();
    let password = password.expect("password written to field 5");
    assert_eq!(password.len(), 16);
    assert!(
        !reply.text().contains(&password),
        "the answer never holds the password"
    );

    let echo = webhook(&gw, "wpf_action=update&contact_id=31").await;
    assert_eq!(echo.status, StatusCode::OK);
    assert_eq!(echo.json()["status"], "locked", "{}", echo.text());

    // The stored hash is the returned password's.
    let db = gw.dir.path().join("users.sqlite");
    let hash: String = {
        use sqlx::Connection;
        let mut conn =
            sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=ro", db.display()))
                .await
                .unwrap();
        sqlx::query_scalar("SELECT password FROM users")
            .fetch_one(&mut conn)
            .await
            .unwrap()
    };
    assert!(hash.starts_with("$2y$10$"), "{hash}");
    assert!(bcrypt::verify(&password, &hash).unwrap());
}

/// `send_notification=true` on `add` mails the new user over SMTP, without the password.
#[tokio::test]
async fn welcome_mail_reaches_a_real_smtp_listener() {
    let smtp = SmtpSink::start().await;
    let crm = start_sim(CrmKind::FluentCrm, vec![]).await;
    let id = crm
        .sim
        .create_contact(contact("", "kim@example.com", "Kim", &[]))
        .unwrap()
        .id;
    let extra = format!(
        "[site.mail]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
         from = \"Site <no-reply@example.com>\"\nsubject = \"Welcome aboard\"\n\
         login_url = \"https://example.com/wp-login.php\"\n",
        smtp.addr.port()
    );
    let gw = start(&config(CrmKind::FluentCrm, &crm.url, "sync", "", &extra)).await;
    let json = webhook(
        &gw,
        &format!("wpf_action=add&contact_id={id}&send_notification=true"),
    )
    .await
    .json();
    assert!(
        json["result"]
            .as_str()
            .unwrap()
            .contains("welcome mail sent"),
        "{json}"
    );
    let mails = smtp.mails();
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    assert!(mail.contains("To: kim@example.com"), "{mail}");
    assert!(mail.contains("Subject: Welcome aboard"), "{mail}");
    assert!(mail.contains("Hello Kim,"), "{mail}");
    assert!(mail.contains("https://example.com/wp-login.php"), "{mail}");
    assert!(!mail.contains("Password:"), "{mail}");

    // Without send_notification, or for an existing user, no mail.
    webhook(
        &gw,
        &format!("wpf_action=add&contact_id={id}&send_notification=true"),
    )
    .await;
    assert_eq!(smtp.mails().len(), 1);
}

/// A browser opening a sync webhook sees the contact and the change, every CRM value escaped.
#[tokio::test]
async fn browser_view_escapes_crm_data() {
    let crm = start_sim(
        CrmKind::ActiveCampaign,
        vec![contact(
            "41",
            "lu@example.com",
            "<script>alert(1)</script>",
            &["<b>VIP</b>"],
        )],
    )
    .await;
    let gw = start(&config(CrmKind::ActiveCampaign, &crm.url, "sync", "", "")).await;
    let reply = send(
        Request::get(format!(
            "http://{}/?wpf_action=add&contact_id=41&access_key={KEY}",
            gw.addr
        ))
        .header("accept", "text/html,application/xhtml+xml")
        .body(Full::new(Bytes::new()))
        .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let html = reply.text();
    assert!(html.contains("Webhook processed"), "{html}");
    assert!(!html.contains("<script>alert(1)"), "{html}");
    assert!(
        html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{html}"
    );
    assert!(html.contains("&lt;b&gt;VIP&lt;/b&gt;"), "{html}");
    assert!(!html.contains(KEY), "{html}");
}

/// Ordinary traffic of a direct-mode site still reaches the site.
#[tokio::test]
async fn direct_mode_site_still_proxies_pages() {
    let upstream = TestUpstream::start(|_req| async {
        hyper::Response::new(Full::new(Bytes::from_static(b"page")))
    })
    .await;
    let crm = start_sim(CrmKind::ActiveCampaign, vec![]).await;
    let text = config(CrmKind::ActiveCampaign, &crm.url, "async", "", "")
        .replace("http://127.0.0.1:9", &upstream.url());
    let gw = start(&text).await;
    let reply = send(
        Request::get(format!("http://{}/shop", gw.addr))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.text(), "page");
}

/// An Agile CRM webhook that carries only the contact's email: the gateway finds the contact
/// by email in the CRM and links the user to its real (16-digit) id.
#[tokio::test]
async fn agile_webhook_with_only_an_email_is_looked_up() {
    let crm = start_sim(CrmKind::AgileCrm, vec![]).await;
    let created = crm
        .sim
        .create_contact(contact("", "mo@example.com", "Mo", &["Lead"]))
        .unwrap();
    let gw = start(&config(CrmKind::AgileCrm, &crm.url, "sync", "", "")).await;
    let body = r#"{"eventName":"contact_created","eventData":{"properties":[{"type":"SYSTEM","name":"email","value":"mo@example.com"}]}}"#;
    let reply = webhook_with(&gw, "wpf_action=add", Some("application/json"), body).await;
    let json = reply.json();
    assert_eq!(json["status"], "done", "{json}");
    assert_eq!(json["contact_id"], "email:mo@example.com");
    let user = wait_user(&gw, &created.id, |_| true)
        .await
        .expect("linked to the real id");
    assert_eq!(tags(&user), ["Lead"]);

    let body = r#"{"eventData":{"properties":[{"name":"email","value":"nobody@example.com"}]}}"#;
    let reply = webhook_with(&gw, "wpf_action=add", Some("application/json"), body).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        reply.json()["error"],
        "contact_not_found",
        "{}",
        reply.text()
    );
}
