//! The CRM simulator on 127.0.0.1:0, spoken to over real sockets: each kind's load, find and
//! update, auth, Agile's 204, 16-digit ids, the rate limit, injected failures, latency, the
//! control API and the request log; and the `crm-sim` binary itself.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;
use wpf_gateway::config::CrmKind;
use wpf_gateway::crm::sim::{SeedData, Sim, SimOptions, SimRate};

use crate::support::{send, Reply};

const SEED: &str = r#"{
  "contacts": [
    {"id": "7", "email": "Ann@Example.com", "first_name": "Ann", "last_name": "Lee",
     "phone": "555-0100", "tags": ["VIP", "Customer"], "fields": {"7": "gold", "plan": "pro"}},
    {"id": "8", "email": "deleted+bob@example.com", "first_name": "Bob", "tags": []}
  ]
}"#;
const AGILE_ID: u64 = 5_629_499_534_213_120;

/// A simulator serving in this process; stopped on drop.
struct RunningSim {
    sim: Arc<Sim>,
    addr: std::net::SocketAddr,
    shutdown: CancellationToken,
}

impl RunningSim {
    async fn start(kind: CrmKind, seed: &str, adjust: impl FnOnce(&mut SimOptions)) -> Self {
        let mut options = SimOptions::new(kind);
        adjust(&mut options);
        let seed = SeedData::parse(seed).expect("valid seed");
        let sim = Sim::new(options, seed).expect("sim");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        tokio::spawn(sim.clone().serve(listener, shutdown.clone()));
        RunningSim {
            sim,
            addr,
            shutdown,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(self.url(path));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let body = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        send(req.body(Full::new(body)).unwrap()).await
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.call(Method::GET, path, headers, None).await
    }

    /// A control API call.
    async fn control(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        self.call(method, path, &[], body).await
    }
}

impl Drop for RunningSim {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The body as JSON, whatever the exact content type (WordPress adds a charset).
fn json_of(reply: &Reply) -> Value {
    let content_type = reply
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(content_type.starts_with("application/json"), "{reply:?}");
    serde_json::from_slice(&reply.body).unwrap_or_else(|e| panic!("not JSON ({e}): {reply:?}"))
}

fn retry_after(reply: &Reply) -> u64 {
    reply
        .headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("integer Retry-After: {reply:?}"))
}

fn base64(data: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.as_bytes().chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64(&format!("{user}:{password}")))
}

const AC_AUTH: (&str, &str) = ("api-token", "sim-key");

#[tokio::test]
async fn activecampaign_load_find_update() {
    let crm = RunningSim::start(CrmKind::ActiveCampaign, SEED, |_| {}).await;
    let reply = crm.get("/api/3/contacts/7", &[AC_AUTH]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let doc = json_of(&reply);
    assert_eq!(doc["contact"]["id"], "7");
    assert_eq!(doc["contact"]["email"], "Ann@Example.com");
    assert_eq!(doc["contact"]["firstName"], "Ann");
    assert_eq!(doc["contact"]["phone"], "555-0100");
    let values = doc["fieldValues"].as_array().unwrap();
    assert!(values
        .iter()
        .any(|v| v["contact"] == "7" && v["field"] == "7" && v["value"] == "gold"));

    // Tags: association rows, then each tag's name by id.
    let tags = json_of(&crm.get("/api/3/contacts/7/contactTags", &[AC_AUTH]).await);
    let mut names = Vec::new();
    for row in tags["contactTags"].as_array().unwrap() {
        assert_eq!(row["contact"], "7");
        let tag = row["tag"].as_str().unwrap();
        let doc = json_of(&crm.get(&format!("/api/3/tags/{tag}"), &[AC_AUTH]).await);
        assert_eq!(doc["tag"]["id"], tag);
        assert_eq!(doc["tag"]["tagType"], "contact");
        names.push(doc["tag"]["tag"].as_str().unwrap().to_owned());
    }
    assert_eq!(names, ["VIP", "Customer"]);
    let reply = crm.get("/api/3/tags/99", &[AC_AUTH]).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);

    // Find by email, case-insensitively; `deleted+` contacts come back like any other.
    let found = json_of(
        &crm.get("/api/3/contacts?email=ann%40example.COM", &[AC_AUTH])
            .await,
    );
    assert_eq!(found["meta"]["total"], "1");
    assert_eq!(found["contacts"][0]["id"], "7");
    let found = json_of(
        &crm.get(
            "/api/3/contacts?email=deleted%2Bbob%40example.com",
            &[AC_AUTH],
        )
        .await,
    );
    assert_eq!(found["contacts"][0]["id"], "8");
    let none = json_of(
        &crm.get("/api/3/contacts?email=nobody%40x.org", &[AC_AUTH])
            .await,
    );
    assert_eq!(none["meta"]["total"], "0");
    assert_eq!(none["contacts"], json!([]));

    // Update a custom field and a standard one.
    let reply = crm
        .call(
            Method::PUT,
            "/api/3/contacts/7",
            &[AC_AUTH],
            Some(json!({"contact": {"firstName": "Anna", "fieldValues": [{"field": "7", "value": "platinum"}]}})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(json_of(&reply)["contact"]["firstName"], "Anna");
    let doc = json_of(&crm.get("/api/3/contacts/7", &[AC_AUTH]).await);
    assert!(doc["fieldValues"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["field"] == "7" && v["value"] == "platinum"));
    let stored = crm.sim.contact("7").unwrap();
    assert_eq!(stored.first_name, "Anna");
    assert_eq!(stored.fields["7"], "platinum");

    // Unknown contact and malformed update.
    let reply = crm.get("/api/3/contacts/70", &[AC_AUTH]).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(
        json_of(&reply)["message"],
        "No Result found for Subscriber with id 70"
    );
    let reply = crm
        .call(
            Method::PUT,
            "/api/3/contacts/7",
            &[AC_AUTH],
            Some(json!({"firstName": "x"})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(json_of(&reply)["errors"][0]["title"].is_string());
}

#[tokio::test]
async fn activecampaign_refuses_missing_or_wrong_token() {
    let crm = RunningSim::start(CrmKind::ActiveCampaign, SEED, |_| {}).await;
    for headers in [&[][..], &[("api-token", "wrong")][..]] {
        let reply = crm.get("/api/3/contacts/7", headers).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{headers:?}");
        assert!(json_of(&reply)["message"].is_string());
    }
    // The legacy query parameter works too.
    let reply = crm.get("/api/3/contacts/7?api_key=sim-key", &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn fluentcrm_load_find_update() {
    let crm = RunningSim::start(CrmKind::FluentCrm, SEED, |_| {}).await;
    let auth = basic("sim@example.com", "sim-key");
    let auth = [("authorization", auth.as_str())];
    let reply = crm
        .get(
            "/wp-json/fluent-crm/v2/subscribers/7?with%5B%5D=subscriber.custom_values",
            &auth,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let sub = &json_of(&reply)["subscriber"];
    assert_eq!(sub["id"], json!(7));
    assert_eq!(sub["email"], "Ann@Example.com");
    assert_eq!(sub["first_name"], "Ann");
    assert_eq!(sub["last_name"], "Lee");
    assert_eq!(sub["custom_values"], json!({"7": "gold", "plan": "pro"}));
    let tags: Vec<(&str, &str)> = sub["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            assert!(t["id"].is_u64(), "{t}");
            (t["title"].as_str().unwrap(), t["slug"].as_str().unwrap())
        })
        .collect();
    assert_eq!(tags, [("VIP", "vip"), ("Customer", "customer")]);
    // Without `with[]`, no custom values.
    let plain = json_of(&crm.get("/wp-json/fluent-crm/v2/subscribers/7", &auth).await);
    assert!(plain["subscriber"].get("custom_values").is_none());

    // By email: the `get_by_email` form and the search WP Fusion uses.
    let by_email = json_of(
        &crm.get(
            "/wp-json/fluent-crm/v2/subscribers/0?get_by_email=ann%40example.com",
            &auth,
        )
        .await,
    );
    assert_eq!(by_email["subscriber"]["id"], json!(7));
    let search = json_of(
        &crm.get(
            "/wp-json/fluent-crm/v2/subscribers?per_page=1&search=ann%40example.com",
            &auth,
        )
        .await,
    );
    assert_eq!(search["subscribers"]["total"], json!(1));
    assert_eq!(search["subscribers"]["data"][0]["id"], json!(7));
    let reply = crm
        .get(
            "/wp-json/fluent-crm/v2/subscribers/0?get_by_email=nobody%40x.org",
            &auth,
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    let reply = crm
        .get("/wp-json/fluent-crm/v2/subscribers/70", &auth)
        .await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(json_of(&reply)["message"], "Subscriber not found");

    // Update (WP Fusion sends POST; PUT is the documented verb).
    for (method, value) in [(Method::PUT, "team"), (Method::POST, "enterprise")] {
        let reply = crm
            .call(
                method,
                "/wp-json/fluent-crm/v2/subscribers/7",
                &auth,
                Some(json!({"subscriber": {"last_name": "Lim", "custom_values": {"plan": value}}})),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        let doc = json_of(&reply);
        assert!(doc["message"].is_string());
        assert_eq!(doc["subscriber"]["custom_values"]["plan"], value);
    }
    let stored = crm.sim.contact("7").unwrap();
    assert_eq!(stored.last_name, "Lim");
    assert_eq!(stored.fields["plan"], "enterprise");
}

#[tokio::test]
async fn fluentcrm_refuses_like_wordpress() {
    let crm = RunningSim::start(CrmKind::FluentCrm, SEED, |_| {}).await;
    let path = "/wp-json/fluent-crm/v2/subscribers/7";
    let cases = [
        (None, "rest_forbidden"),
        (Some(basic("someone", "sim-key")), "invalid_username"),
        (
            Some(basic("sim@example.com", "wrong")),
            "incorrect_password",
        ),
    ];
    for (auth, code) in cases {
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        let reply = crm.get(path, &headers).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{code}");
        let body = json_of(&reply);
        assert_eq!(body["code"], code);
        assert_eq!(body["data"]["status"], json!(401));
    }
    // Application passwords are shown with spaces; WordPress ignores them.
    let spaced = RunningSim::start(
        CrmKind::FluentCrm,
        r#"{"user":"admin","api_key":"abcd EFGH ijkl","contacts":[{"id":1,"email":"a@x.org"}]}"#,
        |_| {},
    )
    .await;
    let auth = basic("admin", "abcdEFGHijkl");
    let reply = spaced
        .get(
            "/wp-json/fluent-crm/v2/subscribers/1",
            &[("authorization", &auth)],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
}

const AGILE_SEED: &str = r#"{"contacts": [
  {"id": 5629499534213120, "email": "ann@example.com", "first_name": "Ann", "last_name": "Lee",
   "tags": ["VIP"], "fields": {"Plan": "gold"}}
]}"#;

fn agile_auth() -> [(&'static str, String); 2] {
    [
        ("authorization", basic("sim@example.com", "sim-key")),
        ("accept", "application/json".to_owned()),
    ]
}

#[tokio::test]
async fn agilecrm_load_find_update_and_204() {
    let crm = RunningSim::start(CrmKind::AgileCrm, AGILE_SEED, |_| {}).await;
    let auth = agile_auth();
    let auth: Vec<(&str, &str)> = auth.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let reply = crm
        .get(&format!("/dev/api/contacts/{AGILE_ID}"), &auth)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    // The id is a JSON number, digit for digit.
    assert!(
        reply.text().contains("\"id\":5629499534213120"),
        "{}",
        reply.text()
    );
    let doc = json_of(&reply);
    assert_eq!(doc["id"].as_u64(), Some(AGILE_ID));
    assert_eq!(doc["type"], "PERSON");
    assert_eq!(doc["tags"], json!(["VIP"]));
    let props = doc["properties"].as_array().unwrap();
    let prop = |name: &str| props.iter().find(|p| p["name"] == name).cloned();
    assert_eq!(prop("first_name").unwrap()["type"], "SYSTEM");
    assert_eq!(prop("email").unwrap()["subtype"], "work");
    assert_eq!(
        prop("Plan").unwrap(),
        json!({"type":"CUSTOM","name":"Plan","value":"gold"})
    );

    let found = crm
        .get("/dev/api/contacts/search/email/ANN%40example.com", &auth)
        .await;
    assert_eq!(found.status, StatusCode::OK);
    assert_eq!(json_of(&found)["id"].as_u64(), Some(AGILE_ID));

    // Missing: 204 with an empty body, by id and by email.
    for path in [
        "/dev/api/contacts/1234567890123456",
        "/dev/api/contacts/search/email/no%40x.org",
    ] {
        let reply = crm.get(path, &auth).await;
        assert_eq!(reply.status, StatusCode::NO_CONTENT, "{path}");
        assert!(reply.body.is_empty());
    }

    let reply = crm
        .call(
            Method::PUT,
            "/dev/api/contacts/edit-properties",
            &auth,
            Some(json!({"id": AGILE_ID, "properties": [
                {"type": "CUSTOM", "name": "Plan", "value": "platinum"},
                {"type": "SYSTEM", "name": "last_name", "value": "Lim"}
            ]})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let doc = json_of(&reply);
    assert_eq!(doc["id"].as_u64(), Some(AGILE_ID));
    assert!(doc["properties"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "Plan" && p["value"] == "platinum"));
    let stored = crm.sim.contact(&AGILE_ID.to_string()).unwrap();
    assert_eq!(stored.last_name, "Lim");
    assert_eq!(stored.fields["Plan"], "platinum");

    // A new contact through the control API gets the next 16-digit id.
    let created = crm
        .control(
            Method::POST,
            "/_sim/contacts",
            Some(json!({"email": "new@example.com"})),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    assert_eq!(json_of(&created)["id"], (AGILE_ID + 1).to_string());
}

#[tokio::test]
async fn agilecrm_refuses_bad_auth_and_non_json_accept() {
    let crm = RunningSim::start(CrmKind::AgileCrm, AGILE_SEED, |_| {}).await;
    let path = format!("/dev/api/contacts/{AGILE_ID}");
    let wrong = basic("sim@example.com", "nope");
    for headers in [&[][..], &[("authorization", wrong.as_str())][..]] {
        let reply = crm.get(&path, headers).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }
    let auth = basic("sim@example.com", "sim-key");
    let reply = crm
        .get(
            &path,
            &[("authorization", &auth), ("accept", "application/xml")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::NOT_ACCEPTABLE);
}

#[tokio::test]
async fn unknown_routes_are_404_json_for_every_kind() {
    for kind in [
        CrmKind::ActiveCampaign,
        CrmKind::FluentCrm,
        CrmKind::AgileCrm,
    ] {
        let crm = RunningSim::start(kind, SEED, |_| {}).await;
        for path in [
            "/nothing",
            "/api/3/deals/1",
            "/wp-json/fluent-crm/v2/lists",
            "/dev/api/deals",
        ] {
            let reply = crm.get(path, &[]).await;
            assert_eq!(reply.status, StatusCode::NOT_FOUND, "{kind:?} {path}");
            json_of(&reply);
        }
        let stats = json_of(&crm.control(Method::GET, "/_sim/stats", None).await);
        assert_eq!(stats["by_route"]["unknown"], json!(4));
    }
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after() {
    // A 2 s window: the four calls below fit in it with room to spare on a busy machine.
    let crm = RunningSim::start(CrmKind::ActiveCampaign, SEED, |o| {
        o.rate = Some(SimRate::parse("3/2s").unwrap());
    })
    .await;
    for _ in 0..3 {
        let reply = crm.get("/api/3/contacts/7", &[AC_AUTH]).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let limited = crm.get("/api/3/contacts/7", &[AC_AUTH]).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS, "{limited:?}");
    let wait = retry_after(&limited);
    assert!((1..=2).contains(&wait), "{limited:?}");
    assert!(json_of(&limited)["message"].is_string());
    // The control API is never limited.
    for _ in 0..10 {
        let reply = crm.control(Method::GET, "/_sim/stats", None).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    // Once Retry-After has passed, calls are served again.
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let reply = crm.get("/api/3/contacts/7", &[AC_AUTH]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let stats = crm.sim.stats();
    assert_eq!(stats.by_status.get(&200), Some(&4));
    assert_eq!(stats.by_status.get(&429), Some(&1));
}

#[tokio::test]
async fn injected_failures_answer_the_next_calls() {
    let crm = RunningSim::start(CrmKind::FluentCrm, SEED, |_| {}).await;
    let auth = basic("sim@example.com", "sim-key");
    let auth = [("authorization", auth.as_str())];
    let path = "/wp-json/fluent-crm/v2/subscribers/7";
    let reply = crm
        .control(
            Method::POST,
            "/_sim/fail",
            Some(json!({"status": 503, "count": 2, "retry_after": 1})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    for _ in 0..2 {
        let reply = crm.get(path, &auth).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(retry_after(&reply), 1);
        assert_eq!(json_of(&reply)["data"]["status"], json!(503));
    }
    assert_eq!(crm.get(path, &auth).await.status, StatusCode::OK);

    // From the library: a 429 says Retry-After: 1 unless told otherwise.
    crm.sim.fail_next(StatusCode::TOO_MANY_REQUESTS, 1);
    let reply = crm.get(path, &auth).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(retry_after(&reply), 1);
    crm.sim.fail_next(StatusCode::INTERNAL_SERVER_ERROR, 1);
    let reply = crm.get(path, &auth).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(reply.headers.get("retry-after").is_none());
    assert_eq!(crm.get(path, &auth).await.status, StatusCode::OK);

    // Bad requests to the control API are clear errors.
    let reply = crm
        .control(Method::POST, "/_sim/fail", Some(json!({"status": 200})))
        .await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    let reply = crm
        .control(
            Method::POST,
            "/_sim/fail",
            Some(json!({"status": 503, "cuont": 1})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(json_of(&reply)["message"]
        .as_str()
        .unwrap()
        .contains("cuont"));
}

#[tokio::test]
async fn latency_delays_api_answers_only() {
    let latency = Duration::from_millis(300);
    let crm = RunningSim::start(CrmKind::ActiveCampaign, SEED, |o| o.latency = latency).await;
    let started = Instant::now();
    let reply = crm.get("/api/3/contacts/7", &[AC_AUTH]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(started.elapsed() >= latency, "{:?}", started.elapsed());
    // Refusals are delayed as well: the CRM is slow, not the happy path.
    let started = Instant::now();
    assert_eq!(
        crm.get("/api/3/contacts/7", &[]).await.status,
        StatusCode::FORBIDDEN
    );
    assert!(started.elapsed() >= latency);
    let started = Instant::now();
    crm.control(Method::GET, "/_sim/stats", None).await;
    assert!(started.elapsed() < latency, "{:?}", started.elapsed());
}

#[tokio::test]
async fn control_api_contacts_show_through_the_api() {
    let crm = RunningSim::start(CrmKind::ActiveCampaign, SEED, |_| {}).await;
    let reply = crm
        .control(
            Method::PUT,
            "/_sim/contacts/9",
            Some(json!({"email": "cy@example.com", "first_name": "Cy", "tags": ["New"], "fields": {"3": "x"}})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let doc = json_of(&crm.get("/api/3/contacts/9", &[AC_AUTH]).await);
    assert_eq!(doc["contact"]["firstName"], "Cy");
    assert_eq!(doc["fieldValues"][0]["value"], "x");
    let tags = json_of(&crm.get("/api/3/contacts/9/contactTags", &[AC_AUTH]).await);
    let tag = tags["contactTags"][0]["tag"].as_str().unwrap().to_owned();
    let tag = json_of(&crm.get(&format!("/api/3/tags/{tag}"), &[AC_AUTH]).await);
    assert_eq!(tag["tag"]["tag"], "New");

    // Modify: the API sees the change at once.
    let reply = crm
        .control(
            Method::PUT,
            "/_sim/contacts/9",
            Some(json!({"email": "cy@example.com", "tags": []})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let tags = json_of(&crm.get("/api/3/contacts/9/contactTags", &[AC_AUTH]).await);
    assert_eq!(tags["contactTags"], json!([]));

    // Create: the next small id. List, read, delete.
    let created = crm
        .control(
            Method::POST,
            "/_sim/contacts",
            Some(json!({"email": "dee@example.com"})),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert_eq!(json_of(&created)["id"], "10");
    let all = json_of(&crm.control(Method::GET, "/_sim/contacts", None).await);
    let ids: Vec<&str> = all["contacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["7", "8", "9", "10"]);
    let one = json_of(&crm.control(Method::GET, "/_sim/contacts/10", None).await);
    assert_eq!(one["contact"]["email"], "dee@example.com");
    let reply = crm.control(Method::DELETE, "/_sim/contacts/10", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        crm.get("/api/3/contacts/10", &[AC_AUTH]).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        crm.control(Method::GET, "/_sim/contacts/10", None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );

    // Clear errors: taken email, bad JSON (with its line), bad id, wrong method.
    let reply = crm
        .control(
            Method::POST,
            "/_sim/contacts",
            Some(json!({"email": "ANN@example.com"})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CONFLICT);
    assert_eq!(json_of(&reply)["error"], "email_taken");
    let bad = Request::put(crm.url("/_sim/contacts/11"))
        .body(Full::new(Bytes::from("{\n\"email\": }")))
        .unwrap();
    let reply = send(bad).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(json_of(&reply)["message"]
        .as_str()
        .unwrap()
        .starts_with("line 2,"));
    let reply = crm
        .control(
            Method::PUT,
            "/_sim/contacts/abc",
            Some(json!({"email": "z@x.org"})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let reply = crm.control(Method::PATCH, "/_sim/stats", None).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.headers.get("allow").unwrap(), "GET");
}

#[tokio::test]
async fn request_log_and_stats_hold_no_credentials() {
    let crm = RunningSim::start(CrmKind::ActiveCampaign, SEED, |_| {}).await;
    crm.get("/api/3/contacts/7", &[AC_AUTH]).await;
    crm.get(
        "/api/3/contacts?email=ann%40example.com&api_key=sim-key",
        &[],
    )
    .await;
    crm.get("/api/3/contacts/7", &[("api-token", "wrong-secret")])
        .await;
    let log = crm.control(Method::GET, "/_sim/requests", None).await;
    let text = log.text();
    assert!(
        !text.contains("sim-key") && !text.contains("wrong-secret"),
        "{text}"
    );
    let entries = json_of(&log)["requests"].as_array().unwrap().clone();
    assert_eq!(entries.len(), 3, "control calls are not logged: {text}");
    assert_eq!(entries[0]["method"], "GET");
    assert_eq!(entries[0]["path"], "/api/3/contacts/7");
    assert_eq!(entries[0]["route"], "GET /api/3/contacts/{id}");
    assert_eq!(entries[0]["status"], json!(200));
    assert!(entries[0]["at_ms"].as_u64().unwrap() > 0);
    assert_eq!(
        entries[1]["path"],
        "/api/3/contacts?email=ann%40example.com&api_key=***"
    );
    assert_eq!(entries[2]["status"], json!(403));

    let stats = json_of(&crm.control(Method::GET, "/_sim/stats", None).await);
    assert_eq!(stats["requests"], json!(3));
    assert_eq!(stats["by_status"], json!({"200": 2, "403": 1}));
    assert_eq!(stats["by_route"]["GET /api/3/contacts/{id}"], json!(2));
    assert_eq!(stats["by_route"]["GET /api/3/contacts"], json!(1));

    // Basic-auth kinds: the header never reaches the log either.
    let fluent = RunningSim::start(CrmKind::FluentCrm, SEED, |_| {}).await;
    let auth = basic("sim@example.com", "sim-key");
    fluent
        .get(
            "/wp-json/fluent-crm/v2/subscribers/7",
            &[("authorization", &auth)],
        )
        .await;
    let text = fluent
        .control(Method::GET, "/_sim/requests", None)
        .await
        .text();
    assert!(
        !text.contains("sim-key") && !text.contains(&base64("sim@example.com:sim-key")),
        "{text}"
    );
    assert_eq!(fluent.sim.requests().len(), 1);

    let reply = crm.control(Method::DELETE, "/_sim/requests", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(crm.sim.requests().is_empty());
    assert_eq!(crm.sim.stats().requests, 0);
}

#[tokio::test]
async fn binary_serves_until_sigterm_and_exits_zero() {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wpf-gateway"))
        .args(["crm-sim", "--kind", "agilecrm", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn crm-sim");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("crm-sim prints its address in time")
        .unwrap()
        .expect("a line");
    assert!(
        line.starts_with("crm-sim agilecrm listening on http://127.0.0.1:"),
        "{line}"
    );
    let base = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_owned();
    assert!(!base.ends_with(":0"), "{line}");
    // The default credentials, as `--help` documents them.
    let req = Request::get(format!("{base}/dev/api/contacts/123"))
        .header("authorization", basic("sim@example.com", "sim-key"))
        .header("accept", "application/json")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(req).await.status, StatusCode::NO_CONTENT);

    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn binary_refuses_a_bad_seed_file_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed.json");
    std::fs::write(&path, "{\n  \"contacts\": [\n    {\"email\": }\n  ]\n}\n").unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_wpf-gateway"))
        .args([
            "crm-sim",
            "--kind",
            "activecampaign",
            "--listen",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(&path)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(10), out)
        .await
        .expect("exits in time")
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}: line 3, column", path.display())),
        "{stderr}"
    );
}
