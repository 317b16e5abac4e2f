//! Configuration: raw TOML (serde structs that mirror the file) -> validated [`Config`].
//!
//! The library only ever sees [`Config`]; every check happens here, once, and every problem is
//! reported with the file and line of the key it concerns (`FILE:LINE: key: problem`).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

/// A secret string (access key, API key). `Debug` and `Display` never print it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself: only for comparing and for sending it where it belongs.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The validated configuration the library runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this configuration was read from (for messages and reload).
    pub source: PathBuf,
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub queue: QueueConfig,
    pub sites: Vec<SiteConfig>,
}

/// Whether a commit waits for the disk (`fsync`) or only for the OS (`os`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    Fsync,
    Os,
}

/// The durable job queue (`[queue]`).
#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub durability: Durability,
    /// Jobs held (pending + running + retrying) at most; beyond it webhooks get 503.
    pub queue_max: u64,
    /// Done jobs and activity are pruned after this long.
    pub retention: Duration,
    /// Delays between attempts of a transiently failing job; the last one repeats until
    /// `retry_until` has passed since the job was received, then the job is dead.
    pub retry_schedule: Vec<Duration>,
    pub retry_until: Duration,
    /// How long the group commit waits to gather concurrent webhooks into one transaction.
    pub commit_window: Duration,
}

/// A rate: `count` per `per`, with bursts up to `burst` (`"5/s"`, `"100/min"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
    pub burst: u32,
}

/// Admission limits of one site (`[site.limits]`); `None` is unlimited.
#[derive(Debug, Clone, Default)]
pub struct SiteLimits {
    pub per_ip: Option<Rate>,
    pub per_site: Option<Rate>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrmKind {
    ActiveCampaign,
    FluentCrm,
    AgileCrm,
}

/// The CRM account a site's contacts live in (`[site.crm]`).
#[derive(Debug, Clone)]
pub struct CrmConfig {
    pub kind: CrmKind,
    pub url: String,
    pub api_key: Secret,
    /// FluentCRM application-password user, Agile CRM account email.
    pub user: Option<String>,
    /// Outbound pace for this account (ActiveCampaign: 5/s).
    pub rate: Rate,
}

/// Where direct mode writes users (`[site.store]`).
#[derive(Debug, Clone)]
pub enum StoreConfig {
    Embedded,
    WordPress { url: Secret, table_prefix: String },
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Plain HTTP listeners.
    pub listen: Vec<SocketAddr>,
    /// Queue, locks, activity log and the embedded user store live here.
    pub data_dir: PathBuf,
    /// Open client connections at most; further connections wait in the accept backlog.
    pub max_connections: usize,
    /// A client must send its complete request head within this time (slowloris).
    pub header_read_timeout: Duration,
    /// An idle keep-alive connection is closed after this time.
    pub idle_timeout: Duration,
    /// Largest request head accepted, in bytes.
    pub max_header_size: usize,
    /// On SIGTERM/SIGINT, in-flight requests get this long to finish.
    pub shutdown_grace: Duration,
    /// Forwarding headers (`X-Forwarded-*`) are trusted only from these networks.
    pub trusted_proxies: Vec<IpNet>,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: Option<SocketAddr>,
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    /// `tracing_subscriber::EnvFilter` directive, e.g. `info` or `wpf_gateway=debug`.
    pub level: String,
    /// One line per request (target `access`).
    pub access_log: bool,
}

/// How a site's webhooks are processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The gateway loads the contact from the CRM and writes the user store itself.
    Direct,
    /// The gateway forwards each webhook to the upstream site, paced.
    Relay,
}

/// When a webhook is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Respond {
    /// As soon as the job is durably queued.
    Async,
    /// After the job's outcome, up to `sync_timeout`.
    Sync,
}

/// A site's upstream: scheme and authority only (never an open proxy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

#[derive(Debug, Clone)]
pub struct SiteConfig {
    pub name: String,
    /// Lower-cased host names without port; empty means catch-all.
    pub hosts: Vec<String>,
    pub upstream: Upstream,
    pub upstream_connect_timeout: Duration,
    /// Time allowed for the upstream to send response headers.
    pub upstream_timeout: Duration,
    pub access_key: Secret,
    pub mode: Mode,
    pub respond: Respond,
    /// Largest webhook body accepted, in bytes.
    pub max_body: u64,
    pub sync_timeout: Duration,
    /// An exact repeat of a still-pending delivery within this window answers `duplicate`.
    pub dedupe_window: Duration,
    /// How long a contact stays locked after a loopback write.
    pub loopback_lock: Duration,
    /// Jobs of this site processed at once.
    pub workers: usize,
    /// Relay mode: requests to the upstream at once, across the site.
    pub upstream_concurrency: usize,
    pub limits: SiteLimits,
    pub crm: Option<CrmConfig>,
    pub store: StoreConfig,
}

/// A configuration problem, located in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub key: String,
    pub message: String,
}

/// All problems found in one file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "{}:{}: {}: {}",
                self.file.display(),
                p.line,
                p.key,
                p.message
            )?;
        }
        Ok(())
    }
}

/// Read and validate a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        problems: vec![Problem {
            line: 0,
            key: "(file)".into(),
            message: format!("cannot read: {e}"),
        }],
    })?;
    parse(&text, path)
}

/// Validate configuration text; `path` names it in messages and resolves relative paths.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    raw::parse(text, path)
}

mod raw {
    //! Skeleton parser: serde with `deny_unknown_fields`; replaced by the span-aware one.
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RawConfig {
        server: RawServer,
        #[serde(default)]
        admin: Option<RawAdmin>,
        #[serde(default)]
        site: Vec<RawSite>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RawServer {
        listen: Vec<SocketAddr>,
        #[serde(default)]
        data_dir: Option<PathBuf>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RawAdmin {
        listen: Option<SocketAddr>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RawSite {
        name: String,
        #[serde(default)]
        hosts: Vec<String>,
        upstream: String,
        access_key: String,
    }

    pub(super) fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let fail = |message: String| ConfigError {
            file: path.to_owned(),
            problems: vec![Problem {
                line: 0,
                key: "(file)".into(),
                message,
            }],
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| fail(e.to_string()))?;
        let mut sites = Vec::new();
        for s in raw.site {
            let uri: http::Uri = s.upstream.parse().map_err(|e| fail(format!("{e}")))?;
            sites.push(SiteConfig {
                name: s.name,
                hosts: s.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
                upstream: Upstream {
                    scheme: uri.scheme().cloned().unwrap_or(http::uri::Scheme::HTTP),
                    authority: uri
                        .authority()
                        .cloned()
                        .ok_or_else(|| fail("upstream needs a host".into()))?,
                },
                upstream_connect_timeout: Duration::from_secs(5),
                upstream_timeout: Duration::from_secs(60),
                access_key: Secret::new(s.access_key),
                mode: Mode::Relay,
                respond: Respond::Async,
                max_body: 1 << 20,
                sync_timeout: Duration::from_secs(4),
                dedupe_window: Duration::from_secs(300),
                loopback_lock: Duration::from_secs(60),
                workers: 4,
                upstream_concurrency: 2,
                limits: SiteLimits::default(),
                crm: None,
                store: StoreConfig::Embedded,
            });
        }
        Ok(Config {
            source: path.to_owned(),
            server: ServerConfig {
                listen: raw.server.listen,
                data_dir: raw.server.data_dir.unwrap_or_else(|| "./data".into()),
                max_connections: 10_000,
                header_read_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(60),
                max_header_size: 64 * 1024,
                shutdown_grace: Duration::from_secs(30),
                trusted_proxies: Vec::new(),
            },
            admin: AdminConfig {
                listen: raw.admin.and_then(|a| a.listen),
                token_file: None,
            },
            log: LogConfig {
                format: LogFormat::Text,
                level: "info".into(),
                access_log: true,
            },
            queue: QueueConfig {
                durability: Durability::Fsync,
                queue_max: 1_000_000,
                retention: Duration::from_secs(7 * 24 * 3600),
                retry_schedule: [5, 30, 120, 600, 1800, 3600]
                    .into_iter()
                    .map(Duration::from_secs)
                    .collect(),
                retry_until: Duration::from_secs(24 * 3600),
                commit_window: Duration::from_millis(2),
            },
            sites,
        })
    }
}
