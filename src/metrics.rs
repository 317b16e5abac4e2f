//! Metrics: one [`Metrics`] value, created by `run_with` and shared (`Arc`) with the stages
//! that count, encoded by the admin listener's `/metrics` in the Prometheus text format
//! (0.0.4).
//!
//! Every family is registered up front; the request path only looks up a label set (the site
//! name is a pre-built `Arc<str>`, the status a `u16`, action and outcome `&'static str`), so
//! counting costs a hash lookup and an atomic add, no allocation once a series exists. Pass-
//! through requests, the hot path, skip even the lookup: each routing keeps the
//! [`RequestCounters`] of its sites, which count per serving thread and are summed at scrape
//! time.
//! Values that live elsewhere are read at scrape time: queue depth (SQLite), locks held (the
//! lock cache), TLS handshakes ([`TlsStats`]).
//!
//! | metric | type | labels | counted in |
//! |---|---|---|---|
//! | `wpf_gateway_requests_total` | counter | site, status | `proxy::RequestLog` (every answer) |
//! | `wpf_gateway_upstream_duration_seconds` | histogram | site | `proxy::RequestLog` |
//! | `wpf_gateway_webhooks_total` | counter | site, action, outcome | webhook front door |
//! | `wpf_gateway_rate_limited_total` | counter | site | webhook front door (429) |
//! | `wpf_gateway_queue_jobs` | gauge | state | scrape: `count_by_state` |
//! | `wpf_gateway_job_duration_seconds` | histogram | site, outcome | worker (received → finish) |
//! | `wpf_gateway_relay_requests_total` | counter | site, status | relay (upstream answers) |
//! | `wpf_gateway_crm_requests_total` | counter | site, status | direct mode (CRM answers) |
//! | `wpf_gateway_locks_held` | gauge | | scrape: lock cache |
//! | `wpf_gateway_tls_handshakes_total` | counter | | scrape: [`TlsStats`] |
//! | `wpf_gateway_tls_handshake_failures_total` | counter | | scrape: [`TlsStats`] |
//! | `wpf_gateway_build_info` | gauge (1) | version | start |
//!
//! Secrets never become label values: labels are site names, status codes and fixed words.
//! A family shows up in the output once it has a series (the text encoder leaves empty ones
//! out): `wpf_gateway_crm_requests_total`, for instance, once direct mode counts into it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::config::Config;
use crate::tls::TlsStats;

/// `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Site label of a request no site took (unknown Host: 421).
const NO_SITE: &str = "-";
/// Job states shown by `wpf_gateway_queue_jobs` even when empty (so a series drops to 0
/// instead of disappearing).
const JOB_STATES: [&str; 4] = ["pending", "running", "failed", "dead"];

/// `site`, `status`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteStatus {
    pub site: Arc<str>,
    pub status: u16,
}

/// `site`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteLabel {
    pub site: Arc<str>,
}

/// `site`, `action`, `outcome`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    pub site: Arc<str>,
    pub action: &'static str,
    pub outcome: &'static str,
}

/// `site`, `outcome`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteOutcome {
    pub site: Arc<str>,
    pub outcome: &'static str,
}

/// `site`, `status`, where the status may also be a word (`timeout`, `unreachable`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteAnswer {
    pub site: Arc<str>,
    pub status: Arc<str>,
}

/// `state`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

/// Statuses [`RequestCounters`] keeps a counter of its own for; others (hyper refuses them
/// anyway) go to a locked map.
const FIRST_STATUS: u16 = 100;
const LAST_STATUS: u16 = 599;
const STATUSES: usize = (LAST_STATUS - FIRST_STATUS + 1) as usize;

/// Upper bounds of the upstream latency buckets, 1 ms to ~16 s (the `+Inf` bucket follows).
const UPSTREAM_BOUNDS: [f64; 15] = {
    let mut bounds = [0.001; 15];
    let mut i = 1;
    while i < bounds.len() {
        bounds[i] = bounds[i - 1] * 2.0;
        i += 1;
    }
    bounds
};

/// The `wpf_gateway_requests_total` and `wpf_gateway_upstream_duration_seconds` series of one
/// site (or of requests no site took), counted on the request path of every pass-through
/// request and read at scrape time.
///
/// Counting is an atomic add into the counting thread's own shard: each serving thread (see
/// `server.rs`) has one, every other thread counts into shard 0. With one counter per series
/// shared by all threads (a prometheus-client `Counter`, a `Histogram` behind a mutex), each
/// request wrote cache lines the other core had just written. A series shows up once it has
/// counted something, as a family's series did.
pub struct RequestCounters {
    site: Arc<str>,
    shards: Box<[RequestShard]>,
    /// Statuses outside `FIRST_STATUS..=LAST_STATUS`.
    other: Mutex<BTreeMap<u16, u64>>,
}

/// One thread's counts; aligned so that no two shards share a cache line.
#[repr(align(128))]
struct RequestShard {
    by_status: [AtomicU64; STATUSES],
    /// Per bucket of `UPSTREAM_BOUNDS`, then `+Inf` (not cumulative).
    upstream_buckets: [AtomicU64; UPSTREAM_BOUNDS.len() + 1],
    upstream_count: AtomicU64,
    upstream_sum_ns: AtomicU64,
}

impl RequestShard {
    fn new() -> Self {
        RequestShard {
            by_status: std::array::from_fn(|_| AtomicU64::new(0)),
            upstream_buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            upstream_count: AtomicU64::new(0),
            upstream_sum_ns: AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for RequestCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestCounters")
            .field("site", &self.site)
            .finish_non_exhaustive()
    }
}

impl RequestCounters {
    fn new(site: Arc<str>) -> Self {
        RequestCounters {
            site,
            shards: (0..crate::server::serving_threads().max(1))
                .map(|_| RequestShard::new())
                .collect(),
            other: Mutex::default(),
        }
    }

    /// The site label (`-` for requests no site took).
    pub fn site(&self) -> &str {
        &self.site
    }

    /// A request was answered with `status`; `upstream` is the time to the upstream's
    /// response headers, if it was forwarded.
    pub fn count(&self, status: u16, upstream: Option<Duration>) {
        let thread = crate::server::serving_thread().unwrap_or(0);
        // `shards` is never empty (`new`): the modulo is defined and the index in range.
        let shard = &self.shards[thread % self.shards.len()];
        if let Some(took) = upstream {
            let secs = took.as_secs_f64();
            let bucket = UPSTREAM_BOUNDS
                .iter()
                .position(|&bound| secs <= bound)
                .unwrap_or(UPSTREAM_BOUNDS.len());
            shard.upstream_buckets[bucket].fetch_add(1, Ordering::Relaxed);
            shard.upstream_count.fetch_add(1, Ordering::Relaxed);
            let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
            shard.upstream_sum_ns.fetch_add(ns, Ordering::Relaxed);
        }
        let slot = status
            .checked_sub(FIRST_STATUS)
            .and_then(|i| shard.by_status.get(usize::from(i)));
        match slot {
            Some(slot) => {
                slot.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                *self
                    .other
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .entry(status)
                    .or_default() += 1;
            }
        }
    }

    /// One counter summed over the shards.
    fn total(&self, counter: impl Fn(&RequestShard) -> &AtomicU64) -> u64 {
        self.shards
            .iter()
            .map(|s| counter(s).load(Ordering::Relaxed))
            .fold(0, u64::saturating_add)
    }

    /// Every status counted so far, with its count summed over the shards, in status order.
    fn statuses(&self) -> Vec<(u16, u64)> {
        let mut out: Vec<(u16, u64)> = (0..STATUSES)
            .filter_map(|i| {
                let n = self.total(|s| &s.by_status[i]);
                let status = FIRST_STATUS + u16::try_from(i).ok()?;
                (n > 0).then_some((status, n))
            })
            .collect();
        let other = self
            .other
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        out.extend(other.iter().map(|(s, n)| (*s, *n)));
        out.sort_unstable();
        out
    }

    /// The upstream histogram summed over the shards; `None` before the first observation.
    fn upstream(&self) -> Option<UpstreamSnapshot> {
        let count = self.total(|s| &s.upstream_count);
        if count == 0 {
            return None;
        }
        let sum_ns = self.total(|s| &s.upstream_sum_ns);
        let buckets = UPSTREAM_BOUNDS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .enumerate()
            .map(|(i, bound)| (bound, self.total(|s| &s.upstream_buckets[i])))
            .collect();
        // Nanoseconds as f64 lose precision only past 2^53 ns (104 days of waiting).
        #[allow(clippy::cast_precision_loss)]
        let secs = sum_ns as f64 / 1e9;
        Some(UpstreamSnapshot {
            sum: secs,
            count,
            buckets,
        })
    }
}

/// A site's upstream latency histogram at scrape time.
struct UpstreamSnapshot {
    /// Seconds.
    sum: f64,
    count: u64,
    /// Per-bucket counts (not cumulative) with their upper bounds, `+Inf` last.
    buckets: Vec<(f64, u64)>,
}

/// The request series of every site, encoded at scrape time. Sites are never removed: a site
/// that a reload drops keeps its counts (a counter must not go back), and one that comes back
/// counts on from them.
#[derive(Default)]
struct RequestSeries {
    sites: Mutex<Vec<Arc<RequestCounters>>>,
}

impl std::fmt::Debug for RequestSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestSeries")
    }
}

impl RequestSeries {
    /// The series of `site`, made on first use.
    fn of(&self, site: Arc<str>) -> Arc<RequestCounters> {
        let mut sites = self
            .sites
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(found) = sites.iter().find(|c| c.site == site) {
            return found.clone();
        }
        let counters = Arc::new(RequestCounters::new(site));
        sites.push(counters.clone());
        counters
    }
}

impl Collector for RequestSeries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let sites = self
            .sites
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let requests: Vec<_> = sites
            .iter()
            .flat_map(|c| {
                c.statuses()
                    .into_iter()
                    .map(move |(status, n)| (c, status, n))
            })
            .collect();
        // A family without series is left out, as the registry's own encoder does.
        if !requests.is_empty() {
            let mut metric = encoder.encode_descriptor(
                "wpf_gateway_requests",
                "Requests answered, by site and HTTP status (499: client went away)",
                None,
                MetricType::Counter,
            )?;
            for (counters, status, n) in requests {
                let labels = SiteStatus {
                    site: counters.site.clone(),
                    status,
                };
                ConstCounter::new(n).encode(metric.encode_family(&labels)?)?;
            }
        }
        let upstream: Vec<_> = sites
            .iter()
            .filter_map(|c| Some((c, c.upstream()?)))
            .collect();
        if !upstream.is_empty() {
            let mut metric = encoder.encode_descriptor(
                "wpf_gateway_upstream_duration_seconds",
                "Pass-through: time from sending a request upstream to its response headers",
                None,
                MetricType::Histogram,
            )?;
            for (counters, h) in upstream {
                let labels = SiteLabel {
                    site: counters.site.clone(),
                };
                metric
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)?;
            }
        }
        Ok(())
    }
}

/// Every metric of the gateway. Cheap to count into from any task.
pub struct Metrics {
    registry: Registry,
    /// Label values of the sites taken on so far (see `add_site`); read per count, written
    /// by a reload.
    sites: arc_swap::ArcSwap<HashMap<String, Arc<str>>>,
    no_site: Arc<str>,
    requests: Arc<RequestSeries>,
    webhooks: Family<WebhookLabels, Counter>,
    rate_limited: Family<SiteLabel, Counter>,
    queue_jobs: Family<StateLabel, Gauge>,
    job_duration: HistogramFamily<SiteOutcome>,
    relay_requests: Family<SiteAnswer, Counter>,
    crm_requests: Family<SiteAnswer, Counter>,
    locks_held: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Jobs, from arrival to their end: 10 ms to ~23 h (retries stretch it).
fn job_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 3.0, 16))
}

/// TLS counters live in [`TlsStats`] (the server stage counts there); read at scrape time.
struct TlsCollector(Arc<TlsStats>);

impl std::fmt::Debug for TlsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsCollector")
    }
}

impl Collector for TlsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters = [
            (
                "wpf_gateway_tls_handshakes",
                "TLS handshakes completed",
                self.0.handshakes.load(Ordering::Relaxed),
            ),
            (
                "wpf_gateway_tls_handshake_failures",
                "TLS handshakes that failed or timed out",
                self.0.handshake_failures.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}

impl Metrics {
    /// Register every family; site labels come from `config.sites`.
    pub fn new(config: &Config, tls: Arc<TlsStats>) -> Self {
        let mut registry = Registry::default();
        let requests = Arc::new(RequestSeries::default());
        registry.register_collector(Box::new(requests.clone()));
        let webhooks = Family::<WebhookLabels, Counter>::default();
        registry.register(
            "wpf_gateway_webhooks",
            "Webhooks answered by the front door, by site, action and outcome",
            webhooks.clone(),
        );
        let rate_limited = Family::<SiteLabel, Counter>::default();
        registry.register(
            "wpf_gateway_rate_limited",
            "Webhooks refused with 429 by an admission limit (per client IP or per site)",
            rate_limited.clone(),
        );
        let queue_jobs = Family::<StateLabel, Gauge>::default();
        registry.register(
            "wpf_gateway_queue_jobs",
            "Jobs in the durable queue by state (done jobs are not counted)",
            queue_jobs.clone(),
        );
        let job_duration: HistogramFamily<SiteOutcome> = Family::new_with_constructor(job_buckets);
        registry.register(
            "wpf_gateway_job_duration_seconds",
            "Jobs: time from the first delivery to the end of an attempt, by site and outcome \
             (done, retry, failed)",
            job_duration.clone(),
        );
        let relay_requests = Family::<SiteAnswer, Counter>::default();
        registry.register(
            "wpf_gateway_relay_requests",
            "Relay mode: webhooks sent to the site, by the site's answer status (or timeout, \
             unreachable)",
            relay_requests.clone(),
        );
        let crm_requests = Family::<SiteAnswer, Counter>::default();
        registry.register(
            "wpf_gateway_crm_requests",
            "Direct mode: CRM API requests, by answer status (or timeout, unreachable)",
            crm_requests.clone(),
        );
        let locks_held = Gauge::default();
        registry.register(
            "wpf_gateway_locks_held",
            "Contacts under a loopback lock",
            locks_held.clone(),
        );
        registry.register(
            "wpf_gateway_build",
            "Build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register_collector(Box::new(TlsCollector(tls)));
        let metrics = Metrics {
            registry,
            sites: arc_swap::ArcSwap::default(),
            no_site: Arc::from(NO_SITE),
            requests,
            webhooks,
            rate_limited,
            queue_jobs,
            job_duration,
            relay_requests,
            crm_requests,
            locks_held,
        };
        for site in &config.sites {
            metrics.add_site(&site.name);
        }
        metrics
    }

    /// Take a site on (at start, and for each site of a reloaded config): its label is kept,
    /// so counting for it allocates nothing, and its rate-limited series starts at zero, so
    /// `rate()` sees the first rejection.
    fn add_site(&self, name: &str) -> Arc<str> {
        if let Some(label) = self.sites.load().get(name) {
            return label.clone();
        }
        let label: Arc<str> = Arc::from(name);
        self.sites.rcu(|sites| {
            let mut sites = HashMap::clone(sites);
            sites
                .entry(name.to_owned())
                .or_insert_with(|| label.clone());
            sites
        });
        drop(self.rate_limited.get_or_create(&SiteLabel {
            site: label.clone(),
        }));
        label
    }

    /// The label value of a site (`-` when no site took the request). A site no config
    /// named (only in tests) gets a label made for the call.
    fn site(&self, name: Option<&str>) -> Arc<str> {
        match name {
            Some(name) => self
                .sites
                .load()
                .get(name)
                .cloned()
                .unwrap_or_else(|| Arc::from(name)),
            None => self.no_site.clone(),
        }
    }

    /// A request was answered with `status` (`site` is `None` when no site took it).
    pub fn request(&self, site: Option<&str>, status: u16, upstream: Option<Duration>) {
        self.request_counters(site).count(status, upstream);
    }

    /// The request series of `site` (`None`: requests no site took), for the request path to
    /// keep: [`RequestCounters::count`] then needs no label lookup. The same series for the
    /// same site in every routing, so counts carry on across reloads. Each routing asks for
    /// each of its sites, which takes a site a reload added on (see `add_site`).
    pub fn request_counters(&self, site: Option<&str>) -> Arc<RequestCounters> {
        let label = match site {
            Some(name) => self.add_site(name),
            None => self.no_site.clone(),
        };
        self.requests.of(label)
    }

    /// The front door answered a webhook.
    pub fn webhook(&self, site: &str, action: &'static str, outcome: &'static str) {
        let site = self.site(Some(site));
        if outcome == "rate_limited" {
            self.rate_limited
                .get_or_create(&SiteLabel { site: site.clone() })
                .inc();
        }
        self.webhooks
            .get_or_create(&WebhookLabels {
                site,
                action,
                outcome,
            })
            .inc();
    }

    /// An attempt of a job ended (`done`, `retry`, `failed`) `age` after the job arrived.
    pub fn job(&self, site: &str, outcome: &'static str, age: Duration) {
        self.job_duration
            .get_or_create(&SiteOutcome {
                site: self.site(Some(site)),
                outcome,
            })
            .observe(age.as_secs_f64());
    }

    /// Relay mode: the site answered a relayed webhook (`status` a code or a word).
    pub fn relay_request(&self, site: &str, status: &str) {
        self.relay_requests
            .get_or_create(&SiteAnswer {
                site: self.site(Some(site)),
                status: Arc::from(status),
            })
            .inc();
    }

    /// Direct mode: the CRM answered an API request (`status` a code or a word).
    pub fn crm_request(&self, site: &str, status: &str) {
        self.crm_requests
            .get_or_create(&SiteAnswer {
                site: self.site(Some(site)),
                status: Arc::from(status),
            })
            .inc();
    }

    /// Values read at scrape time: jobs per state and contacts locked.
    pub fn set_queue(&self, by_state: &[(String, i64)], locks_held: u64) {
        for state in JOB_STATES {
            let count = by_state
                .iter()
                .find(|(s, _)| s == state)
                .map_or(0, |(_, n)| *n);
            self.queue_jobs
                .get_or_create(&StateLabel {
                    state: state.to_owned(),
                })
                .set(count);
        }
        self.locks_held
            .set(i64::try_from(locks_held).unwrap_or(i64::MAX));
    }

    /// Everything, in the Prometheus text format ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would be a bug in a metric.
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::error!(error = %e, "metrics could not be encoded");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.toml");
        let text = "[server]\nlisten = [\"127.0.0.1:0\"]\n[[site]]\nname = \"main\"\n\
                    upstream = \"http://127.0.0.1:9\"\naccess_key = \"k-12345678\"\n";
        let config = crate::config::parse(text, &path).unwrap();
        Metrics::new(&config, Arc::default())
    }

    #[test]
    fn counts_and_encodes() {
        let m = metrics();
        m.request(Some("main"), 200, Some(Duration::from_millis(3)));
        m.request(Some("main"), 200, None);
        m.request(None, 421, None);
        m.webhook("main", "update", "queued");
        m.webhook("main", "update", "rate_limited");
        m.set_queue(&[("pending".into(), 3)], 2);
        // A site that a reload added, unknown when the metrics were made.
        m.webhook("added", "update_tags", "queued");
        m.job("added", "done", Duration::from_millis(40));
        m.relay_request("added", "200");
        m.crm_request("added", "200");
        // A site of a reloaded config: the routing asks for its request series.
        drop(m.request_counters(Some("reloaded")));
        let text = m.encode();
        for line in [
            "wpf_gateway_requests_total{site=\"main\",status=\"200\"} 2",
            "wpf_gateway_requests_total{site=\"-\",status=\"421\"} 1",
            "wpf_gateway_upstream_duration_seconds_count{site=\"main\"} 1",
            "wpf_gateway_webhooks_total{site=\"main\",action=\"update\",outcome=\"queued\"} 1",
            "wpf_gateway_rate_limited_total{site=\"main\"} 1",
            "wpf_gateway_rate_limited_total{site=\"reloaded\"} 0",
            "wpf_gateway_queue_jobs{state=\"pending\"} 3",
            "wpf_gateway_queue_jobs{state=\"dead\"} 0",
            "wpf_gateway_locks_held 2",
            "wpf_gateway_webhooks_total{site=\"added\",action=\"update_tags\",outcome=\"queued\"} 1",
            "wpf_gateway_job_duration_seconds_count{site=\"added\",outcome=\"done\"} 1",
            "wpf_gateway_relay_requests_total{site=\"added\",status=\"200\"} 1",
            "wpf_gateway_crm_requests_total{site=\"added\",status=\"200\"} 1",
            "wpf_gateway_tls_handshakes_total 0",
            "wpf_gateway_build_info{version=\"",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn request_series_sum_their_threads_and_outlive_a_routing() {
        let m = Arc::new(metrics());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    // A routing's handle, as each reload makes anew.
                    let counters = m.request_counters(Some("main"));
                    for _ in 0..1000 {
                        counters.count(200, Some(Duration::from_millis(3)));
                    }
                    counters.count(404, None);
                    counters.count(999, None);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let text = m.encode();
        for line in [
            "wpf_gateway_requests_total{site=\"main\",status=\"200\"} 4000",
            "wpf_gateway_requests_total{site=\"main\",status=\"404\"} 4",
            "wpf_gateway_requests_total{site=\"main\",status=\"999\"} 4",
            "wpf_gateway_upstream_duration_seconds_count{site=\"main\"} 4000",
            "wpf_gateway_upstream_duration_seconds_bucket{site=\"main\",le=\"0.002\"} 0",
            "wpf_gateway_upstream_duration_seconds_bucket{site=\"main\",le=\"0.004\"} 4000",
            "wpf_gateway_upstream_duration_seconds_bucket{site=\"main\",le=\"+Inf\"} 4000",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        let sum = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("wpf_gateway_upstream_duration_seconds_sum{site=\"main\"} ")
            })
            .and_then(|v| v.parse::<f64>().ok())
            .expect("a sum");
        assert!((sum - 12.0).abs() < 1e-6, "sum {sum}");
        // One TYPE line per family, however many sites and statuses.
        assert_eq!(
            text.matches("# TYPE wpf_gateway_requests").count(),
            1,
            "{text}"
        );
    }

    #[test]
    fn families_without_requests_are_left_out() {
        let text = metrics().encode();
        assert!(!text.contains("wpf_gateway_requests"), "{text}");
        assert!(!text.contains("wpf_gateway_upstream_duration"), "{text}");
    }
}
