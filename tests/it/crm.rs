//! The CRM adapters (`crm::connect`) against the CRM simulator on 127.0.0.1:0, over real
//! sockets: per CRM, load (tags and fields), find by email, update and read back, wrong
//! credentials, missing contacts; then 429 + Retry-After pausing the account, 5xx, refused
//! connections, timeouts, pacing at 5/s, and ActiveCampaign's tag-name cache.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use tokio_util::sync::{CancellationToken, DropGuard};
use wpf_gateway::config::{CrmConfig, CrmKind, Rate, Secret};
use wpf_gateway::crm::sim::{Failure, SeedData, Sim, SimOptions, SimRate};
use wpf_gateway::crm::{connect, Contact, Crm, CrmError, Link};
use wpf_gateway::pace::Pacer;

const AGILE_ID: &str = "5629499534213120";
const TIMEOUT: Duration = Duration::from_secs(5);

/// What differs between the three CRMs for the same seeded contact.
struct Case {
    kind: CrmKind,
    /// The seeded contact's id (Agile: a 16-digit number).
    id: &'static str,
    /// An id no contact has.
    missing: &'static str,
    /// The custom field: its key in the seed and its name in `Contact::fields`.
    seed_key: &'static str,
    field: &'static str,
    first_name: &'static str,
    /// The seeded tags `VIP`, `Paying Customer` as the adapter names them.
    tags: [&'static str; 2],
}

const CASES: [Case; 3] = [
    Case {
        kind: CrmKind::ActiveCampaign,
        id: "7",
        missing: "999",
        seed_key: "12",
        field: "field:12",
        first_name: "firstName",
        tags: ["VIP", "Paying Customer"],
    },
    Case {
        kind: CrmKind::FluentCrm,
        id: "7",
        missing: "999",
        seed_key: "level",
        field: "level",
        first_name: "first_name",
        // WP Fusion names FluentCRM tags by slug.
        tags: ["vip", "paying-customer"],
    },
    Case {
        kind: CrmKind::AgileCrm,
        id: AGILE_ID,
        missing: "5629499534213999",
        seed_key: "level",
        field: "level",
        first_name: "first_name",
        tags: ["VIP", "Paying Customer"],
    },
];

/// A simulated account serving until dropped.
struct Account {
    sim: Arc<Sim>,
    url: String,
    _serving: DropGuard,
}

impl Account {
    async fn start(case: &Case, adjust: impl FnOnce(&mut SimOptions)) -> Self {
        let seed = format!(
            r#"{{"contacts": [
              {{"id": "{id}", "email": "Ann@Example.com", "first_name": "Ann", "last_name": "Lee",
                "tags": ["VIP", "Paying Customer"], "fields": {{"{key}": "gold"}}}},
              {{"email": "deleted+bob@example.com", "first_name": "Bob"}}
            ]}}"#,
            id = case.id,
            key = case.seed_key,
        );
        let mut options = SimOptions::new(case.kind);
        adjust(&mut options);
        let sim = Sim::new(options, SeedData::parse(&seed).expect("seed")).expect("sim");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        tokio::spawn(sim.clone().serve(listener, stop.clone()));
        Account {
            sim,
            url,
            _serving: stop.drop_guard(),
        }
    }

    /// The adapter for this account with its own credentials, or with `api_key` instead.
    fn adapter(&self, pacer: Arc<Pacer>, api_key: Option<&str>) -> Arc<dyn Crm> {
        let credentials = self.sim.credentials();
        let config = crm_config(
            self.sim.kind(),
            &self.url,
            api_key.unwrap_or(credentials.api_key.expose()),
            &credentials.user,
        );
        connect(&config, Link::new(pacer, TIMEOUT)).expect("adapter")
    }

    fn requests_to(&self, route: &str) -> u64 {
        self.sim
            .stats()
            .by_route
            .get(route)
            .copied()
            .unwrap_or_default()
    }
}

fn crm_config(kind: CrmKind, url: &str, api_key: &str, user: &str) -> CrmConfig {
    CrmConfig {
        kind,
        url: url.to_owned(),
        api_key: Secret::new(api_key),
        user: (kind != CrmKind::ActiveCampaign).then(|| user.to_owned()),
        rate: five_per_second(),
        timeout: TIMEOUT,
        return_password_field: None,
    }
}

fn five_per_second() -> Rate {
    Rate {
        count: 5,
        per: Duration::from_secs(1),
        burst: 5,
    }
}

fn unpaced() -> Arc<Pacer> {
    Arc::new(Pacer::new(None))
}

fn code_of<T: std::fmt::Debug>(result: Result<T, CrmError>) -> &'static str {
    match result {
        Err(CrmError::Permanent { code, .. }) => code,
        other => panic!("expected a permanent error, got {other:?}"),
    }
}

fn transient<T: std::fmt::Debug>(result: Result<T, CrmError>) -> (String, Option<Duration>) {
    match result {
        Err(CrmError::Transient {
            reason,
            retry_after,
        }) => (reason, retry_after),
        other => panic!("expected a transient error, got {other:?}"),
    }
}

fn assert_seeded(case: &Case, contact: &Contact) {
    assert_eq!(contact.id, case.id, "{:?}", case.kind);
    assert_eq!(contact.email, "Ann@Example.com");
    assert_eq!(contact.tags, case.tags, "{:?}", case.kind);
    assert_eq!(contact.fields[case.first_name], "Ann", "{contact:?}");
    assert_eq!(contact.fields[case.field], "gold", "{contact:?}");
}

#[tokio::test]
async fn load_find_and_update_through_the_simulator() {
    for case in &CASES {
        let account = Account::start(case, |_| {}).await;
        let crm = account.adapter(unpaced(), None);

        let contact = crm.load_contact(case.id).await.expect("load");
        assert_seeded(case, &contact);

        let found = crm.find_by_email("ann@example.com").await.expect("find");
        assert_seeded(case, &found.expect("a hit"));
        let none = crm.find_by_email("nobody@example.com").await.expect("find");
        assert_eq!(none, None, "{:?}", case.kind);

        crm.update_field(case.id, case.field, "platinum")
            .await
            .expect("update custom");
        crm.update_field(case.id, case.first_name, "Anna")
            .await
            .expect("update standard");
        let stored = account.sim.contact(case.id).expect("still there");
        assert_eq!(stored.fields[case.seed_key], "platinum", "{:?}", case.kind);
        assert_eq!(stored.first_name, "Anna", "{:?}", case.kind);
        let reread = crm.load_contact(case.id).await.expect("reload");
        assert_eq!(reread.fields[case.field], "platinum");
        assert_eq!(reread.fields[case.first_name], "Anna");
        assert_eq!(reread.tags, case.tags);
    }
}

#[tokio::test]
async fn wrong_api_key_is_invalid_credentials() {
    for case in &CASES {
        let account = Account::start(case, |_| {}).await;
        let crm = account.adapter(unpaced(), Some("WRONG-KEY-123"));
        let error = crm.load_contact(case.id).await.unwrap_err();
        assert!(
            !format!("{error} {error:?}").contains("WRONG-KEY"),
            "{error}"
        );
        assert_eq!(code_of::<()>(Err(error)), "invalid_credentials");
        assert_eq!(
            code_of(crm.find_by_email("ann@example.com").await),
            "invalid_credentials"
        );
        assert_eq!(
            code_of(crm.update_field(case.id, case.field, "x").await),
            "invalid_credentials"
        );
    }
}

#[tokio::test]
async fn missing_contacts_are_not_found() {
    // How each CRM says it: AC 404, FluentCRM 422, Agile 204.
    let said = [404, 422, 204];
    for (case, status) in CASES.iter().zip(said) {
        let account = Account::start(case, |_| {}).await;
        let crm = account.adapter(unpaced(), None);
        assert_eq!(
            code_of(crm.load_contact(case.missing).await),
            "contact_not_found",
            "{:?}",
            case.kind
        );
        let last = account.sim.requests().pop().expect("logged");
        assert_eq!(last.status, status, "{:?}", case.kind);
    }
    // ActiveCampaign keeps deleted contacts as `deleted+…`: gone for us, loaded or found.
    let account = Account::start(&CASES[0], |_| {}).await;
    let crm = account.adapter(unpaced(), None);
    let bob = account
        .sim
        .contacts()
        .into_iter()
        .find(|c| c.email.starts_with("deleted+"))
        .expect("seeded");
    assert_eq!(
        code_of(crm.load_contact(&bob.id).await),
        "contact_not_found"
    );
    assert_eq!(
        crm.find_by_email("deleted+bob@example.com").await.unwrap(),
        None
    );
}

#[tokio::test]
async fn too_many_requests_pauses_the_account_for_retry_after() {
    for case in &CASES {
        let account = Account::start(case, |_| {}).await;
        let pacer = unpaced();
        let crm = account.adapter(pacer.clone(), None);
        account.sim.inject(Failure {
            status: StatusCode::TOO_MANY_REQUESTS,
            count: 1,
            retry_after: Some(Duration::from_secs(1)),
        });
        let (reason, retry_after) = transient(crm.load_contact(case.id).await);
        assert_eq!(retry_after, Some(Duration::from_secs(1)), "{reason}");
        assert!(reason.contains("429"), "{reason}");
        let until = pacer.paused_until().expect("paused");
        assert!(until > tokio::time::Instant::now() + Duration::from_millis(500));
        // The next call waits out the pause, then succeeds.
        let start = Instant::now();
        let contact = crm.load_contact(case.id).await.expect("after the pause");
        assert!(
            start.elapsed() >= Duration::from_millis(800),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(contact.id, case.id);
    }
}

#[tokio::test]
async fn server_errors_refused_connections_and_timeouts_are_transient() {
    let case = &CASES[0];
    let account = Account::start(case, |_| {}).await;
    let pacer = unpaced();
    let crm = account.adapter(pacer.clone(), None);

    account.sim.fail_next(StatusCode::INTERNAL_SERVER_ERROR, 1);
    let (reason, retry_after) = transient(crm.load_contact(case.id).await);
    assert_eq!((reason.as_str(), retry_after), ("CRM answered 500", None));
    assert!(pacer.paused_until().is_none(), "a 500 does not pause");

    account.sim.inject(Failure {
        status: StatusCode::SERVICE_UNAVAILABLE,
        count: 1,
        retry_after: Some(Duration::from_secs(1)),
    });
    let (_, retry_after) = transient(crm.find_by_email("ann@example.com").await);
    assert_eq!(retry_after, Some(Duration::from_secs(1)));
    assert!(
        pacer.paused_until().is_some(),
        "a 503 with Retry-After pauses"
    );

    // Nothing listens on a port just freed.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", free.local_addr().unwrap());
    drop(free);
    for case in &CASES {
        let config = crm_config(case.kind, &url, "SECRET-KEY-9", "u@example.com");
        let crm = connect(&config, Link::new(unpaced(), TIMEOUT)).unwrap();
        let (reason, _) = transient(crm.load_contact(case.id).await);
        assert!(reason.starts_with("CRM unreachable"), "{reason}");
        assert!(
            !reason.contains("127.0.0.1") && !reason.contains("SECRET"),
            "{reason}"
        );
    }

    // A CRM slower than the timeout.
    let slow = Account::start(case, |o| o.latency = Duration::from_millis(800)).await;
    let credentials = slow.sim.credentials();
    let config = crm_config(
        case.kind,
        &slow.url,
        credentials.api_key.expose(),
        &credentials.user,
    );
    let crm = connect(&config, Link::new(unpaced(), Duration::from_millis(200))).unwrap();
    let (reason, _) = transient(crm.load_contact(case.id).await);
    assert!(reason.contains("did not answer within"), "{reason}");
}

#[tokio::test]
async fn pacing_at_five_per_second_spaces_calls() {
    // Agile's load is one request, so calls and requests are one to one. The simulator allows
    // 5 in any second, as ActiveCampaign does: evenly spaced calls never meet a 429.
    let case = &CASES[2];
    let account = Account::start(case, |o| {
        o.rate = Some(SimRate {
            count: 5,
            per: Duration::from_secs(1),
        })
    })
    .await;
    let crm = account.adapter(Arc::new(Pacer::new(Some(five_per_second()))), None);
    let start = Instant::now();
    for _ in 0..8 {
        crm.load_contact(case.id).await.expect("paced load");
    }
    let elapsed = start.elapsed();
    // Seven gaps of 200 ms after the first call.
    assert!(elapsed >= Duration::from_millis(1350), "{elapsed:?}");
    let stats = account.sim.stats();
    assert_eq!(stats.by_status.get(&429), None, "{stats:?}");
    let times: Vec<_> = account.sim.requests().iter().map(|r| r.at).collect();
    assert_eq!(times.len(), 8);
    for pair in times.windows(2) {
        let gap = pair[1].duration_since(pair[0]).unwrap_or_default();
        assert!(gap >= Duration::from_millis(150), "{gap:?} in {times:?}");
    }
}

#[tokio::test]
async fn activecampaign_tag_names_are_cached() {
    let case = &CASES[0];
    let account = Account::start(case, |_| {}).await;
    let crm = account.adapter(unpaced(), None);
    const TAG: &str = "GET /api/3/tags/{id}";

    assert_eq!(crm.load_contact(case.id).await.unwrap().tags, case.tags);
    assert_eq!(account.requests_to(TAG), 2, "one per tag on the first load");
    assert_eq!(
        account.requests_to("GET /api/3/contacts/{id}/contactTags"),
        1
    );
    account.sim.clear_requests();

    assert_eq!(crm.load_contact(case.id).await.unwrap().tags, case.tags);
    assert_eq!(account.requests_to(TAG), 0, "names come from the cache");
    assert_eq!(
        account.sim.stats().requests,
        2,
        "contact + contactTags only"
    );
}
