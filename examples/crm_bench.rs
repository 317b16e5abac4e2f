//! The CRM-efficiency benchmark (DESIGN §7, issue 5), run by `bench/crm.sh` (see
//! `bench/README.md`). Everything runs in this one process, on loopback:
//!
//! ```text
//! flood: 5,000 `update` webhooks  ->  gateway (direct mode, [site.crm] rate = "5/s")
//!        over 100 contacts, ~10 s        |  workers load each contact (paced)
//!                                        v
//! tag changes during the flood  ->  ActiveCampaign simulator (5 req/s, 429 beyond, 50 ms)
//!                                        |
//!                                        v
//!                         embedded user store: every user's tags == the simulator's?
//! ```
//!
//! The simulator, the demo site and the gateway are `wpf-gateway demo`'s (`wpf_gateway::demo`),
//! so the benchmark measures the configuration the demo shows. The users exist before the
//! gateway starts (written into the embedded store directly, not counted), so every
//! `update` finds its user. The program waits (bounded) until every user's tags equal the
//! simulator's and the queue is empty, then reports CRM requests per contact and route,
//! processing rounds per contact, 429s, the drain time against the floor that 5 req/s sets,
//! and correctness; last a `RESULT key=value ...` line for the script.
//!
//! Exit status: 0 when it ran (targets met or not, unless `--strict`), 1 when it could not
//! run or did not drain within `--drain-limit`, 3 with `--strict` and a missed target.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use wpf_gateway::crm::sim::{Sim, SimContact};
use wpf_gateway::demo::{self, DemoClient};
use wpf_gateway::store::{EmbeddedOptions, EmbeddedStore, NewUser, UserChange, UserStore};

/// The demo config's site name.
const SITE: &str = "main";
/// The simulator's limit (`demo::activecampaign_options`) and the gateway's pace.
const RATE_PER_S: f64 = 5.0;
/// CRM requests of one processing round: the contact, then its tags (the simulator's contact
/// answer does not side-load them, so the adapter asks `/contactTags`).
const REQUESTS_PER_ROUND: f64 = 2.0;
/// Tags every contact starts with, besides its group.
const BASE_TAG: &str = "Member";
/// Groups (`Group-0` ...): a few distinct tag names, so the tag-name cache is exercised.
const GROUPS: usize = 5;
/// How often the drain is checked.
const POLL: Duration = Duration::from_millis(200);
/// Largest page of the admin API.
const API_LIMIT: usize = 1000;

#[derive(Parser)]
#[command(about = "CRM-efficiency benchmark: a webhook flood against the ActiveCampaign simulator")]
struct Args {
    /// Contacts (and users).
    #[arg(long, default_value_t = 100)]
    contacts: usize,
    /// `update` webhooks, interleaved over the contacts (webhook i -> contact i % contacts).
    #[arg(long, default_value_t = 5000)]
    webhooks: usize,
    /// The webhooks are spread evenly over this many seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Webhooks in flight at most.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seed of the tag-change times.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Longest wait for the drain, in seconds.
    #[arg(long, default_value_t = 600)]
    drain_limit: u64,
    /// Target: drain time / floor at most this ("close to the floor", DESIGN §7).
    #[arg(long, default_value_t = 1.5)]
    max_drain_ratio: f64,
    /// Exit 3 when a target is missed.
    #[arg(long)]
    strict: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.contacts == 0 || args.webhooks == 0 || args.concurrency == 0 || args.seconds <= 0.0 {
        eprintln!(
            "crm_bench: --contacts, --webhooks, --concurrency and --seconds must be positive"
        );
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("crm_bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench(&args)) {
        Ok(report) => {
            report.print(&args);
            if args.strict && !report.targets_met(&args) {
                ExitCode::from(3)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("crm_bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A tag change the simulator makes during the flood.
#[derive(Clone, Copy)]
enum Change {
    /// Add `Wave-1`.
    First,
    /// Drop the group tag, add `Wave-2`.
    Second,
}

async fn bench(args: &Args) -> anyhow::Result<Report> {
    let dir = tempfile::Builder::new()
        .prefix("wpf-crm-bench.")
        .tempdir()
        .context("temp dir")?;
    let helpers = CancellationToken::new();
    let _stop_helpers = helpers.clone().drop_guard();

    // The CRM: contacts with a base tag and a group tag.
    let seed: Vec<SimContact> = (0..args.contacts)
        .map(|n| SimContact {
            email: format!("bench{n}@example.com"),
            first_name: format!("Bench {n}"),
            tags: vec![BASE_TAG.into(), format!("Group-{}", n % GROUPS)],
            ..SimContact::default()
        })
        .collect();
    let (sim, crm_addr) =
        demo::start_sim(demo::activecampaign_options(), seed, helpers.clone()).await?;
    let contacts = sim.contacts();

    // The users, before the gateway starts (not measured). The lowest bcrypt cost: the
    // passwords are never checked, and cost 10 would spend seconds of CPU here.
    let store = EmbeddedStore::open_with(dir.path(), EmbeddedOptions { bcrypt_cost: 4 }).await?;
    for c in &contacts {
        let change = UserChange {
            contact_id: c.id.clone(),
            email: c.email.clone(),
            tags: c.tags.clone(),
            create: Some(NewUser {
                username: c.email.clone(),
                password: format!("bench-password-{}", c.id),
                role: "subscriber".into(),
            }),
            ..UserChange::default()
        };
        store.apply(SITE, change).await?;
    }
    store.close().await;

    let site = demo::start_site(helpers.clone()).await?;
    let gateway = demo::start_gateway(
        dir.path(),
        TcpListener::bind("127.0.0.1:0").await?,
        TcpListener::bind("127.0.0.1:0").await?,
        site,
        crm_addr,
    )
    .await?;
    let client = demo::client();
    let admin = format!("http://{}", gateway.admin);
    wait_ready(&client, &admin).await?;
    let store = EmbeddedStore::open_read_only(dir.path()).await?;
    sim.clear_requests();

    let ids: Vec<String> = contacts.iter().map(|c| c.id.clone()).collect();
    let flood = Duration::from_secs_f64(args.seconds);
    let changes = change_schedule(&ids, flood, args.seed);
    let start = Instant::now();
    let start_ms = epoch_ms(SystemTime::now());
    let changer = tokio::spawn(apply_changes(sim.clone(), changes, start));
    let answers = send_flood(
        &client,
        &format!("http://{}", gateway.addr),
        &ids,
        args,
        start,
    )
    .await;
    let sent_in = start.elapsed();
    let last_change = changer.await.context("tag changes")?;

    // Drained: every user has the simulator's tags (after the last change), and no job is
    // pending or running.
    let deadline = Instant::now() + Duration::from_secs(args.drain_limit);
    let mut correct_at = None;
    let mut mismatches;
    loop {
        mismatches = mismatched_users(&sim, &store, &ids).await?;
        if mismatches == 0 && correct_at.is_none() {
            correct_at = Some(start.elapsed());
        }
        if correct_at.is_some() && open_jobs(&client, &admin).await? == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "not drained after {} s: {mismatches} users differ from the simulator, {} jobs open",
                args.drain_limit,
                open_jobs(&client, &admin).await?
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let queue_empty_seen = start.elapsed();

    let done = activity(&client, &admin, "done").await?;
    let retries = activity(&client, &admin, "retry").await?.len();
    let failed = activity(&client, &admin, "failed").await?.len();
    let log = sim.requests();
    let stats = sim.stats();
    store.close().await;
    gateway.stop().await?;

    let mut rounds: BTreeMap<String, usize> = ids.iter().map(|id| (id.clone(), 0)).collect();
    let mut last_done_ms = start_ms;
    for (contact, at_ms) in &done {
        *rounds.entry(contact.clone()).or_default() += 1;
        last_done_ms = last_done_ms.max(*at_ms);
    }
    let last_done = Duration::from_millis(u64::try_from(last_done_ms - start_ms).unwrap_or(0));
    let mut per_contact: BTreeMap<String, usize> = ids.iter().map(|id| (id.clone(), 0)).collect();
    let mut by_route: BTreeMap<&'static str, usize> = BTreeMap::new();
    for r in &log {
        *by_route.entry(r.route).or_default() += 1;
        if let Some(id) = contact_of_path(&r.path) {
            *per_contact.entry(id.to_owned()).or_default() += 1;
        }
    }
    // The closest the served requests came to the simulator's limit: the shortest time from a
    // request to the `rate`-th one after it (the simulator refuses one under a second).
    let served: Vec<SystemTime> = log
        .iter()
        .filter(|r| r.status != 429)
        .map(|r| r.at)
        .collect();
    let window = usize::try_from(demo::activecampaign_options().rate.map_or(5, |r| r.count))?;
    let tightest = served
        .iter()
        .zip(served.iter().skip(window))
        .filter_map(|(a, b)| b.duration_since(*a).ok())
        .min();
    let route = |name: &str| by_route.get(name).copied().unwrap_or(0);
    let loads = route("GET /api/3/contacts/{id}");
    let contact_tags = route("GET /api/3/contacts/{id}/contactTags");
    let tag_lookups = route("GET /api/3/tags/{id}");
    let distinct_tags: BTreeSet<String> = contacts
        .iter()
        .flat_map(|c| c.tags.iter().cloned())
        .chain(sim.contacts().into_iter().flat_map(|c| c.tags))
        .collect();
    Ok(Report {
        contacts: ids.len(),
        webhooks: args.webhooks,
        answers,
        sent_in,
        last_change,
        correct_at: correct_at.unwrap_or(queue_empty_seen),
        requests: stats.requests,
        too_many: stats.by_status.get(&429).copied().unwrap_or(0),
        other_errors: stats
            .by_status
            .iter()
            .filter(|(s, _)| **s >= 400 && **s != 429)
            .map(|(_, n)| *n)
            .sum(),
        loads,
        contact_tags,
        tag_lookups,
        other_routes: log.len() - loads - contact_tags - tag_lookups,
        per_contact: per_contact.into_values().collect(),
        rounds: rounds.into_values().collect(),
        done_rows: done.len(),
        retries,
        failed,
        distinct_tags: distinct_tags.len(),
        mismatches,
        last_done,
        tightest,
    })
}

/// When each contact's tags change: every contact once at a random time in the middle 90% of
/// the flood, every other one a second time later (still within the flood).
fn change_schedule(ids: &[String], flood: Duration, seed: u64) -> Vec<(Duration, String, Change)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut changes = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        let first = rng.random_range(0.05..0.95);
        changes.push((flood.mul_f64(first), id.clone(), Change::First));
        if n % 2 == 0 {
            let second = rng.random_range(first..0.98);
            changes.push((flood.mul_f64(second), id.clone(), Change::Second));
        }
    }
    changes.sort_by_key(|(at, _, _)| *at);
    changes
}

/// Make the changes at their times (in the simulator's store: no API request, not counted);
/// returns when the last one was made, after `start`.
async fn apply_changes(
    sim: Arc<Sim>,
    changes: Vec<(Duration, String, Change)>,
    start: Instant,
) -> Duration {
    let mut last = Duration::ZERO;
    for (at, id, change) in changes {
        tokio::time::sleep_until((start + at).into()).await;
        let Some(mut contact) = sim.contact(&id) else {
            continue;
        };
        match change {
            Change::First => contact.tags.push("Wave-1".into()),
            Change::Second => {
                contact.tags.retain(|t| !t.starts_with("Group-"));
                contact.tags.push("Wave-2".into());
            }
        }
        if sim.put_contact(contact).is_ok() {
            last = start.elapsed();
        }
    }
    last
}

/// Answers of the flood by kind: `queued`, `coalesced`, `duplicate`, or `STATUS word`.
type Answers = BTreeMap<String, usize>;

/// Send the flood: webhook `i` (for contact `i % n`) is due at `start + i * seconds / count`;
/// at most `concurrency` in flight (a webhook whose slot passed waits for a free one).
async fn send_flood(
    client: &DemoClient,
    base: &str,
    ids: &[String],
    args: &Args,
    start: Instant,
) -> Answers {
    let gap = Duration::from_secs_f64(args.seconds / args.webhooks as f64);
    let slots = Arc::new(Semaphore::new(args.concurrency));
    let mut sends = JoinSet::new();
    for i in 0..args.webhooks {
        tokio::time::sleep_until((start + gap * i as u32).into()).await;
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let id = ids[i % ids.len()].clone();
        let (client, base) = (client.clone(), base.to_owned());
        sends.spawn(async move {
            let body = format!("contact%5Bid%5D={id}&seq={i}");
            let answer = demo::webhook(&client, &base, "update", &id, Some(body)).await;
            drop(slot);
            match answer {
                Ok((status, word))
                    if matches!(word.as_str(), "queued" | "coalesced" | "duplicate") =>
                {
                    if status.is_success() {
                        word
                    } else {
                        format!("{} {word}", status.as_u16())
                    }
                }
                Ok((status, word)) => format!("{} {word}", status.as_u16()),
                Err(e) => format!("error {e}"),
            }
        });
    }
    let mut answers = Answers::new();
    while let Some(joined) = sends.join_next().await {
        let kind = joined.unwrap_or_else(|e| format!("error {e}"));
        *answers.entry(kind).or_default() += 1;
    }
    answers
}

/// Users whose stored tags differ from the contact's in the simulator (a missing user too).
async fn mismatched_users(
    sim: &Sim,
    store: &EmbeddedStore,
    ids: &[String],
) -> anyhow::Result<usize> {
    let mut differ = 0;
    for id in ids {
        let crm = sim.contact(id).map(|c| c.tags);
        let stored = store.by_contact(SITE, id).await?.map(|u| u.tags);
        if crm.is_none() || crm != stored {
            differ += 1;
        }
    }
    Ok(differ)
}

/// `GET` an admin JSON API path; the decoded answer.
async fn admin_get(
    client: &DemoClient,
    admin: &str,
    path: &str,
) -> anyhow::Result<serde_json::Value> {
    let req = hyper::Request::get(format!("{admin}{path}"))
        .body(Full::new(Bytes::new()))
        .context("admin request")?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .context("admin API: no answer within 10 s")?
        .context("admin API")?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("admin {path}: {status} {}", String::from_utf8_lossy(&body));
    }
    Ok(serde_json::from_slice(&body)?)
}

/// Wait (at most 20 s) until the gateway says it is ready.
async fn wait_ready(client: &DemoClient, admin: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let req = hyper::Request::get(format!("{admin}/readyz")).body(Full::new(Bytes::new()))?;
        if let Ok(Ok(resp)) =
            tokio::time::timeout(Duration::from_secs(2), client.request(req)).await
        {
            if resp.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the gateway was not ready within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Jobs pending or running.
async fn open_jobs(client: &DemoClient, admin: &str) -> anyhow::Result<usize> {
    let mut open = 0;
    for state in ["pending", "running"] {
        let answer = admin_get(client, admin, &format!("/api/jobs?state={state}&limit=1")).await?;
        open += answer["jobs"].as_array().map_or(0, Vec::len);
    }
    Ok(open)
}

/// The activity rows with `outcome` of the site: (contact, at ms), newest first.
async fn activity(
    client: &DemoClient,
    admin: &str,
    outcome: &str,
) -> anyhow::Result<Vec<(String, i64)>> {
    let answer = admin_get(
        client,
        admin,
        &format!("/api/activity?site={SITE}&outcome={outcome}&limit={API_LIMIT}"),
    )
    .await?;
    let rows: Vec<(String, i64)> = answer["activity"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    let contact = r["contact"].as_str().unwrap_or("").to_owned();
                    (contact, r["at_ms"].as_i64().unwrap_or(0))
                })
                .collect()
        })
        .unwrap_or_default();
    if rows.len() >= API_LIMIT {
        bail!("more than {API_LIMIT} `{outcome}` rows: the admin API cannot list them all");
    }
    Ok(rows)
}

fn epoch_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The contact id of `/api/3/contacts/{id}` and `/api/3/contacts/{id}/...` request paths.
fn contact_of_path(path: &str) -> Option<&str> {
    let path = path.split('?').next()?;
    let rest = path.strip_prefix("/api/3/contacts/")?;
    rest.split('/').next().filter(|id| !id.is_empty())
}

struct Report {
    contacts: usize,
    webhooks: usize,
    answers: Answers,
    sent_in: Duration,
    last_change: Duration,
    correct_at: Duration,
    requests: u64,
    too_many: u64,
    other_errors: u64,
    loads: usize,
    contact_tags: usize,
    tag_lookups: usize,
    other_routes: usize,
    /// CRM requests naming each contact (loads + contactTags).
    per_contact: Vec<usize>,
    /// Jobs done per contact.
    rounds: Vec<usize>,
    done_rows: usize,
    retries: usize,
    failed: usize,
    distinct_tags: usize,
    mismatches: usize,
    /// The last job done, after the first webhook was sent.
    last_done: Duration,
    /// The shortest span of `rate + 1` consecutive served requests.
    tightest: Option<Duration>,
}

impl Report {
    /// CRM requests one processing round of a contact makes (the contact, then its tags when
    /// the contact answer does not side-load them).
    fn per_round(&self) -> f64 {
        REQUESTS_PER_ROUND
    }

    /// The least the 5 req/s limit allows for one round per contact and one name lookup per
    /// tag; and the flood's own bound: the last tag change, then one round.
    fn floors(&self) -> (f64, f64) {
        let crm =
            (self.contacts as f64 * self.per_round() + self.distinct_tags as f64) / RATE_PER_S;
        let flood = self.last_change.as_secs_f64() + self.per_round() / RATE_PER_S;
        (crm, flood)
    }

    fn floor(&self) -> f64 {
        let (crm, flood) = self.floors();
        crm.max(flood)
    }

    fn drain_ratio(&self) -> f64 {
        self.correct_at.as_secs_f64() / self.floor()
    }

    fn max_rounds(&self) -> usize {
        self.rounds.iter().copied().max().unwrap_or(0)
    }

    fn mean(values: &[usize]) -> f64 {
        values.iter().sum::<usize>() as f64 / values.len().max(1) as f64
    }

    /// What WP Fusion's in-site handler asks the CRM for the same flood: it loads the contact
    /// (contact + contactTags; tag names come from its cached tag list) for every webhook.
    fn in_site_requests(&self) -> f64 {
        self.webhooks as f64 * self.per_round()
    }

    fn targets_met(&self, args: &Args) -> bool {
        self.max_rounds() <= 2
            && self.too_many == 0
            && self.mismatches == 0
            && self.drain_ratio() <= args.max_drain_ratio
    }

    fn print(&self, args: &Args) {
        let answers: Vec<String> = self
            .answers
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect();
        let (floor_crm, floor_flood) = self.floors();
        let per_round = self.per_round();
        let rounds_mean = Self::mean(&self.rounds);
        let twice = self.rounds.iter().filter(|&&r| r >= 2).count();
        let requests = self.requests as f64;
        println!(
            "flood         {} update webhooks over {} contacts, sent in {:.2} s: {}",
            self.webhooks,
            self.contacts,
            self.sent_in.as_secs_f64(),
            answers.join(", ")
        );
        println!(
            "tag changes   {} contacts changed in the simulator during the flood, the last at {:.2} s",
            self.contacts,
            self.last_change.as_secs_f64()
        );
        println!(
            "CRM requests  {} = {} contact loads + {} contactTags + {} tags/{{id}} + {} other",
            self.requests, self.loads, self.contact_tags, self.tag_lookups, self.other_routes
        );
        println!(
            "  per contact max {}, mean {:.2} (loads + contactTags); {:.2} per webhook",
            self.per_contact.iter().copied().max().unwrap_or(0),
            Self::mean(&self.per_contact),
            requests / self.webhooks as f64
        );
        println!(
            "rounds        jobs done per contact: max {}, mean {:.2}; {} contacts twice or more (target: max <= 2); {} retries, {} failed",
            self.max_rounds(),
            rounds_mean,
            twice,
            self.retries,
            self.failed
        );
        println!(
            "429s          {} received from the simulator (target 0); other 4xx/5xx: {}; tightest 6 consecutive served requests {} ms apart (the simulator refuses < 1000)",
            self.too_many,
            self.other_errors,
            self.tightest.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64() * 1000.0))
        );
        println!(
            "drain         {:.1} s first webhook sent -> every user correct (last job done at {:.1} s)",
            self.correct_at.as_secs_f64(),
            self.last_done.as_secs_f64()
        );
        println!(
            "floor         {:.1} s = max(({} contacts x {per_round:.0} requests a round + {} tag names) / {RATE_PER_S}/s = {floor_crm:.1} s, last change {:.1} s + one round {:.1} s = {floor_flood:.1} s)",
            self.floor(),
            self.contacts,
            self.distinct_tags,
            self.last_change.as_secs_f64(),
            per_round / RATE_PER_S
        );
        println!(
            "  pace        the {} requests made need {:.1} s at {RATE_PER_S}/s: {:.0}% of the time until the last job was done",
            self.requests,
            requests / RATE_PER_S,
            100.0 * requests / RATE_PER_S / self.last_done.as_secs_f64().max(f64::EPSILON)
        );
        println!(
            "correctness   {} of {} users differ from the simulator's tags (target 0)",
            self.mismatches, self.contacts
        );
        println!();
        println!(
            "ratio drain / floor                        {:.3}  (target <= {})",
            self.drain_ratio(),
            args.max_drain_ratio
        );
        println!(
            "ratio in-site handler / gateway requests   {:.1}  (WP Fusion: {} webhooks x {per_round:.0} = {:.0} requests, {:.0} s at {RATE_PER_S}/s)",
            self.in_site_requests() / requests.max(1.0),
            self.webhooks,
            self.in_site_requests(),
            self.in_site_requests() / RATE_PER_S
        );
        println!(
            "targets       {}",
            if self.targets_met(args) {
                "met"
            } else {
                "MISSED"
            }
        );
        let count = |k: &str| self.answers.get(k).copied().unwrap_or(0);
        let other = self.webhooks - count("queued") - count("coalesced") - count("duplicate");
        println!(
            "RESULT queued={} coalesced={} duplicate={} other={} requests={} loads={} contact_tags={} tag_lookups={} \
             per_contact_max={} per_contact_mean={:.3} rounds_max={} rounds_mean={:.3} retries={} failed={} \
             429s={} drain_s={:.2} last_done_s={:.2} floor_s={:.2} ratio={:.3} in_site_ratio={:.2} \
             mismatches={} done_rows={} tightest_ms={:.1} met={}",
            count("queued"),
            count("coalesced"),
            count("duplicate"),
            other,
            self.requests,
            self.loads,
            self.contact_tags,
            self.tag_lookups,
            self.per_contact.iter().copied().max().unwrap_or(0),
            Self::mean(&self.per_contact),
            self.max_rounds(),
            rounds_mean,
            self.retries,
            self.failed,
            self.too_many,
            self.correct_at.as_secs_f64(),
            self.last_done.as_secs_f64(),
            self.floor(),
            self.drain_ratio(),
            self.in_site_requests() / requests.max(1.0),
            self.mismatches,
            self.done_rows,
            self.tightest.map_or(0.0, |d| d.as_secs_f64() * 1000.0),
            u8::from(self.targets_met(args)),
        );
    }
}
