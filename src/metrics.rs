//! Metrics: one [`Metrics`] value, created by `run_with` and shared (`Arc`) with the stages
//! that count, encoded by the admin listener's `/metrics` in the Prometheus text format
//! (0.0.4).
//!
//! Every family is registered up front; the request path only looks up a label set (the site
//! name is a pre-built `Arc<str>`, the status a `u16`, action and outcome `&'static str`), so
//! counting costs a hash lookup and an atomic add, no allocation once a series exists. Pass-
//! through requests, the hot path, skip even the lookup: each routing keeps the
//! [`RequestCounters`] of its sites.
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

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
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

/// Statuses [`RequestCounters`] keeps a handle for; others (hyper refuses them anyway) are
/// looked up in the family each time.
const FIRST_STATUS: u16 = 100;
const LAST_STATUS: u16 = 599;

/// The `wpf_gateway_requests_total` and `wpf_gateway_upstream_duration_seconds` series of one
/// site, looked up once (per routing, see `Routing`) instead of per request: counting a request
/// is an index and an atomic add, with no hashing of label sets and no lock. A series is made
/// on first use, so the output only shows statuses that happened, as before.
pub struct RequestCounters {
    site: Arc<str>,
    /// One slot per status in `FIRST_STATUS..=LAST_STATUS`.
    by_status: Box<[OnceLock<Counter>]>,
    upstream: OnceLock<Histogram>,
    requests: Family<SiteStatus, Counter>,
    upstream_duration: HistogramFamily<SiteLabel>,
}

impl std::fmt::Debug for RequestCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestCounters")
            .field("site", &self.site)
            .finish_non_exhaustive()
    }
}

impl RequestCounters {
    /// The site label (`-` for requests no site took).
    pub fn site(&self) -> &str {
        &self.site
    }

    /// A request was answered with `status`; `upstream` is the time to the upstream's
    /// response headers, if it was forwarded.
    pub fn count(&self, status: u16, upstream: Option<Duration>) {
        if let Some(took) = upstream {
            self.upstream
                .get_or_init(|| {
                    let label = SiteLabel {
                        site: self.site.clone(),
                    };
                    self.upstream_duration.get_or_create(&label).clone()
                })
                .observe(took.as_secs_f64());
        }
        let slot = status
            .checked_sub(FIRST_STATUS)
            .and_then(|i| self.by_status.get(usize::from(i)));
        let series = || SiteStatus {
            site: self.site.clone(),
            status,
        };
        match slot {
            Some(slot) => {
                slot.get_or_init(|| self.requests.get_or_create(&series()).clone())
                    .inc();
            }
            None => {
                self.requests.get_or_create(&series()).inc();
            }
        }
    }
}

/// Every metric of the gateway. Cheap to count into from any task.
pub struct Metrics {
    registry: Registry,
    sites: HashMap<String, Arc<str>>,
    no_site: Arc<str>,
    requests: Family<SiteStatus, Counter>,
    upstream_duration: HistogramFamily<SiteLabel>,
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

/// Upstream answers: 1 ms to ~16 s.
fn upstream_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
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
        let requests = Family::<SiteStatus, Counter>::default();
        registry.register(
            "wpf_gateway_requests",
            "Requests answered, by site and HTTP status (499: client went away)",
            requests.clone(),
        );
        let upstream_duration: HistogramFamily<SiteLabel> =
            Family::new_with_constructor(upstream_buckets);
        registry.register(
            "wpf_gateway_upstream_duration_seconds",
            "Pass-through: time from sending a request upstream to its response headers",
            upstream_duration.clone(),
        );
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
        let sites: HashMap<String, Arc<str>> = config
            .sites
            .iter()
            .map(|s| (s.name.clone(), Arc::from(s.name.as_str())))
            .collect();
        // Zero from the start, so `rate()` sees the first rejection.
        for site in sites.values() {
            drop(rate_limited.get_or_create(&SiteLabel { site: site.clone() }));
        }
        Metrics {
            registry,
            sites,
            no_site: Arc::from(NO_SITE),
            requests,
            upstream_duration,
            webhooks,
            rate_limited,
            queue_jobs,
            job_duration,
            relay_requests,
            crm_requests,
            locks_held,
        }
    }

    /// The label value of a site: shared for the sites of the starting config, made anew for
    /// a site a reload added (its own name, not `-`); `-` when no site took the request.
    fn site(&self, name: Option<&str>) -> Arc<str> {
        match name {
            Some(name) => self
                .sites
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
    /// keep: [`RequestCounters::count`] then needs no label lookup. A site that a reload added
    /// is labelled with its own name.
    pub fn request_counters(&self, site: Option<&str>) -> RequestCounters {
        let label = self.site(site);
        RequestCounters {
            by_status: (FIRST_STATUS..=LAST_STATUS)
                .map(|_| OnceLock::new())
                .collect(),
            upstream: OnceLock::new(),
            site: label,
            requests: self.requests.clone(),
            upstream_duration: self.upstream_duration.clone(),
        }
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
        let text = m.encode();
        for line in [
            "wpf_gateway_requests_total{site=\"main\",status=\"200\"} 2",
            "wpf_gateway_requests_total{site=\"-\",status=\"421\"} 1",
            "wpf_gateway_upstream_duration_seconds_count{site=\"main\"} 1",
            "wpf_gateway_webhooks_total{site=\"main\",action=\"update\",outcome=\"queued\"} 1",
            "wpf_gateway_rate_limited_total{site=\"main\"} 1",
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
}
