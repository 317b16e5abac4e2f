//! Configuration stage: TOML text -> validated [`Config`], in two steps.
//!
//! 1. **Raw** (`mod raw`): serde structs that mirror the file, `deny_unknown_fields`, every
//!    value wrapped in [`toml::Spanned`] so later messages know its line. Value syntax
//!    (durations, sizes, rates, enum words) is parsed here. serde stops at the first error, so
//!    the reader removes the offending key from the parsed document and tries again: every
//!    typo and every badly typed value is reported, not just the first.
//! 2. **Validate** (`mod validate`): defaults, ranges, files (`*_file` keys), cross-checks
//!    (unique site names and hosts, one catch-all, admin token) into the [`Config`] the library
//!    sees.
//!
//! Every problem of both steps is collected and reported at once as `FILE:LINE: key: problem`,
//! with `key` the dotted path (`site[1].crm.api_key`, `server.listen[0]`). Messages never
//! contain a secret value. [`render_resolved`] prints the result back as TOML for `check`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

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
    pub tls: TlsConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub queue: QueueConfig,
    pub sites: Vec<SiteConfig>,
}

/// Whether a commit waits for the disk (`fsync`) or only for the OS (`os`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
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
    /// How long at most the group commit keeps a batch open while concurrent webhooks keep
    /// arriving (it closes as soon as none is waiting), to gather them into one transaction.
    pub commit_window: Duration,
}

/// A rate: `count` per `per`, with bursts up to `burst` (`"5/s"`, `"100/min"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
    /// Defaults to `count` (a full period's worth at once), like `governor::Quota::per_second`.
    pub burst: u32,
}

/// Admission limits of one site (`[site.limits]`); `None` is unlimited.
#[derive(Debug, Clone, Default)]
pub struct SiteLimits {
    pub per_ip: Option<Rate>,
    pub per_site: Option<Rate>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CrmKind {
    ActiveCampaign,
    FluentCrm,
    AgileCrm,
}

/// The CRM account a site's contacts live in (`[site.crm]`).
#[derive(Debug, Clone)]
pub struct CrmConfig {
    pub kind: CrmKind,
    /// `http(s)://host[/path]`, without a trailing `/` (so `format!("{url}/api/…")` works).
    pub url: String,
    pub api_key: Secret,
    /// FluentCRM application-password user, Agile CRM account email.
    pub user: Option<String>,
    /// Outbound pace for this account (ActiveCampaign: 5/s).
    pub rate: Rate,
    /// Longest time one API call may take (connect included).
    pub timeout: Duration,
    /// `add` with a generated password writes it to this CRM field (named as a
    /// `[site.fields]` value, e.g. `field:12`), then locks the contact against the echo.
    pub return_password_field: Option<String>,
}

/// Who a webhook may make a user (`[site.users]`).
#[derive(Debug, Clone)]
pub struct UsersConfig {
    /// Roles a webhook's `role` parameter may grant; never `administrator`.
    pub roles: Vec<String>,
    /// Role of a new user when the webhook names none (or one not in `roles`).
    pub default_role: String,
}

impl Default for UsersConfig {
    fn default() -> Self {
        UsersConfig {
            roles: Vec::new(),
            default_role: "subscriber".into(),
        }
    }
}

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MailTls {
    /// Plain SMTP (a relay on localhost).
    None,
    /// STARTTLS on a plain connection (port 587), required.
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
}

/// Welcome mail for users created by `add` with `send_notification=true` (`[site.mail]`).
#[derive(Debug, Clone)]
pub struct MailConfig {
    pub host: String,
    pub port: u16,
    pub tls: MailTls,
    pub user: Option<String>,
    pub password: Option<Secret>,
    /// `Name <address>` or `address`; checked at load.
    pub from: String,
    pub subject: String,
    /// Shown in the mail so the user knows where to log in.
    pub login_url: Option<String>,
    /// Put the password in the mail (off by default: mail is not a safe channel).
    pub include_password: bool,
}

/// Where direct mode writes users (`[site.store]`).
#[derive(Debug, Clone)]
pub enum StoreConfig {
    Embedded,
    /// `url` is `mysql://user:password@host/database`: a secret because of the password.
    WordPress {
        url: Secret,
        table_prefix: String,
        /// WP Fusion's slug of the CRM, the start of its user meta keys
        /// (`{crm_slug}_contact_id`, `{crm_slug}_tags`): by default the one WP Fusion uses for
        /// `[site.crm] kind` ([`default_crm_slug`]).
        crm_slug: String,
        /// After a user changed, call the companion mu-plugin on the upstream
        /// (`contrib/wordpress/wpf-gateway.php`, [`crate::notify`]).
        notify: bool,
    },
}

/// The slug WP Fusion registers for the CRM (`wpf_get_option('crm')`), which starts its user
/// meta keys: `activecampaign`, `fluentcrm-rest` (FluentCRM on another site, over its REST
/// API, as the gateway talks to it; `fluentcrm` is FluentCRM on the same site), `agilecrm`.
pub fn default_crm_slug(kind: CrmKind) -> &'static str {
    match kind {
        CrmKind::ActiveCampaign => "activecampaign",
        CrmKind::FluentCrm => "fluentcrm-rest",
        CrmKind::AgileCrm => "agilecrm",
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Plain HTTP listeners.
    pub listen: Vec<SocketAddr>,
    /// Queue, locks, activity log and the embedded user store live here. Resolved against
    /// the config file's directory when relative.
    pub data_dir: PathBuf,
    /// Open client connections at most; further connections wait in the accept backlog.
    pub max_connections: usize,
    /// A client must send its complete request head within this time (slowloris).
    pub header_read_timeout: Duration,
    /// An idle keep-alive connection is closed after this time.
    pub idle_timeout: Duration,
    /// Largest request head accepted, in bytes (at least 8 KiB: hyper's smallest buffer).
    pub max_header_size: usize,
    /// On SIGTERM/SIGINT, in-flight requests get this long to finish.
    pub shutdown_grace: Duration,
    /// Forwarding headers (`X-Forwarded-*`) are trusted only from these networks.
    pub trusted_proxies: Vec<IpNet>,
}

/// HTTPS listeners and their certificates (`[tls]`, `[[tls.cert]]`). Empty without `[tls]`.
#[derive(Debug, Clone, Default)]
pub struct TlsConfig {
    /// HTTPS listeners. Not empty when `certs` is not, and the other way round.
    pub listen: Vec<SocketAddr>,
    /// Certificates, chosen per handshake by SNI; exactly one is the default.
    pub certs: Vec<CertConfig>,
}

/// One certificate (`[[tls.cert]]`): PEM files, resolved against the config file's directory.
/// Validation read both and checked that the key belongs to the chain's first certificate.
#[derive(Debug, Clone)]
pub struct CertConfig {
    /// The server's certificate first, then intermediates (`fullchain.pem`).
    pub chain: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 RSA or SEC1 EC, unencrypted).
    pub key: PathBuf,
    /// Served when SNI is absent or names no certificate.
    pub default: bool,
}

/// The admin listener (`[admin]`).
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// `None` (key absent): no admin listener. There is no implicit default port, so two
    /// gateways on one host never collide on it and nothing listens that was not asked for.
    pub listen: Option<SocketAddr>,
    /// File holding the bearer token of the admin API (resolved against the config file's
    /// directory; checked readable and non-empty). Required when `listen` is not loopback.
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The gateway loads the contact from the CRM and writes the user store itself.
    Direct,
    /// The gateway forwards each webhook to the upstream site, paced.
    Relay,
}

/// When a webhook is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
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
    /// Lower-cased host names without port, brackets or trailing dot; empty means catch-all.
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
    /// Webhooks are answered and queued as usual, but no job runs (maintenance of the site,
    /// a CRM outage): the queue keeps them, durably, until a reload unpauses the site.
    pub paused: bool,
    /// Relay mode: requests to the upstream at once, across the site.
    pub upstream_concurrency: usize,
    pub limits: SiteLimits,
    pub crm: Option<CrmConfig>,
    pub store: StoreConfig,
    /// `[site.fields]`: user meta key -> CRM field (as in [`crate::crm::Contact::fields`]).
    /// `user_login` and `user_pass` name the fields a new user's username and password come
    /// from. Defaults to first and last name for the site's CRM.
    pub fields: BTreeMap<String, String>,
    pub users: UsersConfig,
    pub mail: Option<MailConfig>,
}

/// A configuration problem, located in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line of the key (or of its table when the key is missing); 0 when the file
    /// itself could not be read.
    pub line: usize,
    /// Dotted path: `server.listen[0]`, `site[1].crm.api_key`; `(file)` for the whole file.
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

/// Validate configuration text; `path` names it in messages and resolves relative paths
/// (`data_dir`, `*_file`) against its directory. Files named by `*_file` keys are read.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let mut report = Report::new(text);
    let config =
        raw::read(text, &mut report).and_then(|raw| validate::config(raw, path, &mut report));
    match config {
        Some(config) if report.problems.is_empty() => Ok(config),
        _ => {
            let mut problems = report.problems;
            if problems.is_empty() {
                // Unreachable by construction (every `None` records a problem); keep the
                // promise "no config without a reason" anyway.
                problems.push(Problem {
                    line: 1,
                    key: "(file)".into(),
                    message: "invalid configuration".into(),
                });
            }
            // File order reads best; equal lines keep the order they were found in.
            problems.sort_by_key(|p| p.line);
            problems.dedup();
            Err(ConfigError {
                file: path.to_owned(),
                problems,
            })
        }
    }
}

/// Problems found so far, and byte offset -> line.
struct Report {
    line_starts: Vec<usize>,
    problems: Vec<Problem>,
    /// Keys already reported by the raw step and removed from the document: the validate
    /// step does not also call them (or anything under them) missing.
    removed: Vec<String>,
}

impl Report {
    fn new(text: &str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Report {
            line_starts,
            problems: Vec::new(),
            removed: Vec::new(),
        }
    }

    /// 1-based line holding byte `offset`.
    fn line(&self, offset: usize) -> usize {
        self.line_starts
            .partition_point(|&start| start <= offset)
            .max(1)
    }

    fn add(&mut self, offset: usize, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            line: self.line(offset),
            key: key.into(),
            message: message.into(),
        });
    }

    /// Was `key` (or a table holding it) already reported and removed?
    fn was_removed(&self, key: &str) -> bool {
        self.removed.iter().any(|r| {
            key == r
                || key
                    .strip_prefix(r.as_str())
                    .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Value syntax: durations, sizes, rates. Small enough to own; each has a formatter that
// round-trips, used by `render_resolved`.

const MS_PER_UNIT: [(&str, u64); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

/// `"500ms"`, `"60s"`, `"5m"`, `"1h"`, `"1d"`, and sums of them written together: `"1m30s"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    let mut total_ms: u64 = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("{text:?} is not a duration"));
        }
        let (number, after) = rest.split_at(digits);
        let letters = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after) = after.split_at(letters);
        let per = match unit {
            "" => return Err(format!("{text:?} has a number without a unit")),
            "min" => 60_000,
            _ => MS_PER_UNIT
                .iter()
                .find(|(name, _)| *name == unit)
                .map(|&(_, ms)| ms)
                .ok_or_else(|| format!("{text:?} has an unknown unit {unit:?}"))?,
        };
        let ms = number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(per))
            .and_then(|ms| total_ms.checked_add(ms))
            .ok_or_else(|| format!("{text:?} is too long"))?;
        total_ms = ms;
        rest = after;
    }
    Ok(Duration::from_millis(total_ms))
}

/// The shortest text [`parse_duration`] reads back as `d` (to the millisecond).
pub fn format_duration(d: Duration) -> String {
    let mut ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, per) in MS_PER_UNIT {
        if ms >= per {
            out.push_str(&format!("{}{unit}", ms / per));
            ms %= per;
        }
    }
    out
}

const SIZE_UNITS: [(&str, u64); 7] = [
    ("gib", 1 << 30),
    ("mib", 1 << 20),
    ("kib", 1 << 10),
    ("gb", 1_000_000_000),
    ("mb", 1_000_000),
    ("kb", 1_000),
    ("b", 1),
];

/// `"1MiB"`, `"64KiB"`, `"1GiB"`, `"10MB"`, `"512"` (bytes); units are case-insensitive.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let digits = trimmed.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(format!("{text:?} is not a size"));
    }
    let (number, unit) = trimmed.split_at(digits);
    let unit = unit.trim_start().to_ascii_lowercase();
    let per = if unit.is_empty() {
        1
    } else {
        SIZE_UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|&(_, per)| per)
            .ok_or_else(|| format!("{text:?} has an unknown unit {unit:?}"))?
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(per))
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// `"1MiB"` when a whole number of KiB/MiB/GiB, else the bytes: read back by [`parse_size`].
pub fn format_size(bytes: u64) -> String {
    for (unit, per) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes != 0 && bytes.is_multiple_of(per) {
            return format!("{}{unit}", bytes / per);
        }
    }
    bytes.to_string()
}

/// `"5/s"`, `"100/min"`, `"1000/h"`, `"20000/d"`, or any duration after the slash: `"10/5m"`.
/// Returns (count, period); the burst is a separate key.
pub fn parse_rate(text: &str) -> Result<(u32, Duration), String> {
    let (count, per) = text
        .trim()
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not a rate"))?;
    let count: u32 = count
        .trim()
        .parse()
        .map_err(|_| format!("{text:?}: the count must be a whole number up to 4294967295"))?;
    if count == 0 {
        return Err(format!("{text:?}: the count must be at least 1"));
    }
    let per = match per.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        "d" | "day" => Duration::from_secs(86_400),
        other => parse_duration(other).map_err(|_| format!("{text:?} has an unknown period"))?,
    };
    if per.is_zero() {
        return Err(format!("{text:?}: the period must be longer than 0"));
    }
    Ok((count, per))
}

/// `"5/s"`, `"100/min"`, …: read back by [`parse_rate`].
pub fn format_rate(count: u32, per: Duration) -> String {
    let unit = match per.as_millis() {
        1_000 => "s".to_string(),
        60_000 => "min".to_string(),
        3_600_000 => "h".to_string(),
        86_400_000 => "d".to_string(),
        _ => format_duration(per),
    };
    format!("{count}/{unit}")
}

mod raw {
    //! Step 1: serde structs mirroring the TOML. Every key is optional here (defaults and
    //! "required" are the validate step's business), so serde's only errors are unknown keys
    //! and badly typed or unparsable values, each with a span.
    use std::marker::PhantomData;
    use std::ops::Range;

    use serde::de::{self, Deserializer, Unexpected, Visitor};
    use toml::de::{DeTable, DeValue};
    use toml::Spanned;

    use super::*;

    /// An optional key, with where it was written.
    pub(super) type Opt<T> = Option<Spanned<T>>;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct RawConfig {
        pub server: Opt<RawServer>,
        pub tls: Opt<RawTls>,
        pub admin: Opt<RawAdmin>,
        pub log: Opt<RawLog>,
        pub queue: Opt<RawQueue>,
        pub site: Option<Vec<Spanned<RawSite>>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct RawServer {
        pub listen: Opt<Vec<Spanned<String>>>,
        pub data_dir: Opt<String>,
        pub max_connections: Opt<Count>,
        pub header_read_timeout: Opt<Dur>,
        pub idle_timeout: Opt<Dur>,
        pub max_header_size: Opt<Size>,
        pub shutdown_grace: Opt<Dur>,
        pub trusted_proxies: Opt<Vec<Spanned<String>>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct RawTls {
        pub listen: Opt<Vec<Spanned<String>>>,
        pub cert: Option<Vec<Spanned<RawCert>>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct RawCert {
        pub chain: Opt<String>,
        pub key: Opt<String>,
        pub default: Opt<bool>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct RawAdmin {
        pub listen: Opt<String>,
        pub token_file: Opt<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct RawLog {
        pub format: Opt<LogFormat>,
        pub level: Opt<String>,
        pub access_log: Opt<bool>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct RawQueue {
        pub durability: Opt<Durability>,
        pub queue_max: Opt<Count>,
        pub retention: Opt<Dur>,
        pub retry_schedule: Opt<Vec<Spanned<Dur>>>,
        pub retry_until: Opt<Dur>,
        pub commit_window: Opt<Dur>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct RawSite {
        pub name: Opt<String>,
        pub hosts: Opt<Vec<Spanned<String>>>,
        pub upstream: Opt<String>,
        pub upstream_connect_timeout: Opt<Dur>,
        pub upstream_timeout: Opt<Dur>,
        pub access_key: Opt<String>,
        pub access_key_file: Opt<String>,
        pub mode: Opt<Mode>,
        pub respond: Opt<Respond>,
        pub max_body: Opt<Size>,
        pub sync_timeout: Opt<Dur>,
        pub dedupe_window: Opt<Dur>,
        pub loopback_lock: Opt<Dur>,
        pub workers: Opt<Count>,
        pub paused: Opt<bool>,
        pub upstream_concurrency: Opt<Count>,
        pub limits: Opt<RawLimits>,
        pub crm: Opt<RawCrm>,
        pub store: Opt<RawStore>,
        pub fields: Opt<BTreeMap<String, Spanned<String>>>,
        pub users: Opt<RawUsers>,
        pub mail: Opt<RawMail>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct RawUsers {
        pub roles: Opt<Vec<Spanned<String>>>,
        pub default_role: Opt<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct RawMail {
        pub host: Opt<String>,
        pub port: Opt<Count>,
        pub tls: Opt<MailTls>,
        pub user: Opt<String>,
        pub password: Opt<String>,
        pub password_file: Opt<String>,
        pub from: Opt<String>,
        pub subject: Opt<String>,
        pub login_url: Opt<String>,
        pub include_password: Opt<bool>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct RawLimits {
        pub per_ip: Opt<RateText>,
        pub per_ip_burst: Opt<Count>,
        pub per_site: Opt<RateText>,
        pub per_site_burst: Opt<Count>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct RawCrm {
        pub kind: Opt<CrmKind>,
        pub url: Opt<String>,
        pub api_key: Opt<String>,
        pub api_key_file: Opt<String>,
        pub user: Opt<String>,
        pub rate: Opt<RateText>,
        pub rate_burst: Opt<Count>,
        pub timeout: Opt<Dur>,
        pub return_password_field: Opt<String>,
    }

    #[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
    #[serde(rename_all = "lowercase")]
    pub(super) enum StoreKind {
        Embedded,
        WordPress,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct RawStore {
        pub kind: Opt<StoreKind>,
        pub url: Opt<String>,
        pub url_file: Opt<String>,
        pub table_prefix: Opt<String>,
        pub crm_slug: Opt<String>,
        pub notify: Opt<bool>,
    }

    /// A value written as a string with its own syntax (or, for some, as a TOML integer).
    pub(super) trait ValueSyntax: Sized {
        /// Completes "expected …" in messages.
        const EXPECTED: &'static str;
        fn from_text(_text: &str) -> Option<Result<Self, String>> {
            None
        }
        fn from_integer(_n: i64) -> Option<Result<Self, String>> {
            None
        }
    }

    /// A duration key: `"60s"`.
    #[derive(Clone, Copy)]
    pub(super) struct Dur(pub Duration);
    /// A size key: `"1MiB"`, `"512"` or `512`.
    #[derive(Clone, Copy)]
    pub(super) struct Size(pub u64);
    /// A rate key without its burst: `"5/s"`.
    #[derive(Clone, Copy)]
    pub(super) struct RateText(pub u32, pub Duration);
    /// A whole number key (never negative): `4`.
    #[derive(Clone, Copy)]
    pub(super) struct Count(pub u64);

    impl ValueSyntax for Dur {
        const EXPECTED: &'static str = "a duration like \"60s\", \"500ms\" or \"1m30s\"";
        fn from_text(text: &str) -> Option<Result<Self, String>> {
            Some(parse_duration(text).map(Dur))
        }
    }
    impl ValueSyntax for Size {
        const EXPECTED: &'static str = "a size like \"1MiB\", \"64KiB\" or \"512\" (bytes)";
        fn from_text(text: &str) -> Option<Result<Self, String>> {
            Some(parse_size(text).map(Size))
        }
        fn from_integer(n: i64) -> Option<Result<Self, String>> {
            Some(
                u64::try_from(n)
                    .map(Size)
                    .map_err(|_| "negative size".into()),
            )
        }
    }
    impl ValueSyntax for RateText {
        const EXPECTED: &'static str = "a rate like \"5/s\", \"100/min\" or \"1000/h\"";
        fn from_text(text: &str) -> Option<Result<Self, String>> {
            Some(parse_rate(text).map(|(count, per)| RateText(count, per)))
        }
    }
    impl ValueSyntax for Count {
        const EXPECTED: &'static str = "a whole number like 4 (no quotes)";
        fn from_integer(n: i64) -> Option<Result<Self, String>> {
            Some(
                u64::try_from(n)
                    .map(Count)
                    .map_err(|_| format!("{n} is negative")),
            )
        }
    }

    struct SyntaxVisitor<T>(PhantomData<T>);

    impl<T: ValueSyntax> Visitor<'_> for SyntaxVisitor<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(T::EXPECTED)
        }
        fn visit_str<E: de::Error>(self, text: &str) -> Result<T, E> {
            match T::from_text(text) {
                Some(parsed) => {
                    parsed.map_err(|m| E::custom(format!("{m}; expected {}", T::EXPECTED)))
                }
                None => Err(E::invalid_type(Unexpected::Str(text), &self)),
            }
        }
        fn visit_i64<E: de::Error>(self, n: i64) -> Result<T, E> {
            match T::from_integer(n) {
                Some(parsed) => {
                    parsed.map_err(|m| E::custom(format!("{m}; expected {}", T::EXPECTED)))
                }
                None => Err(E::invalid_type(Unexpected::Signed(n), &self)),
            }
        }
        fn visit_u64<E: de::Error>(self, n: u64) -> Result<T, E> {
            match i64::try_from(n) {
                Ok(n) => self.visit_i64(n),
                Err(_) => Err(E::invalid_value(Unexpected::Unsigned(n), &self)),
            }
        }
    }

    macro_rules! deserialize_via_syntax {
        ($($t:ty),*) => {$(
            impl<'de> Deserialize<'de> for $t {
                fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                    d.deserialize_any(SyntaxVisitor::<$t>(PhantomData))
                }
            }
        )*};
    }
    deserialize_via_syntax!(Dur, Size, RateText, Count);

    /// Keys whose values are secrets: their type errors must not echo the value.
    fn is_secret_key(path: &str) -> bool {
        path.ends_with(".access_key")
            || path.ends_with(".api_key")
            || path.ends_with(".store.url")
            || path.ends_with(".mail.password")
    }

    /// Upper bound on serde passes: each pass removes one key, documents are small. Reaching
    /// it only drops further messages, never a config problem.
    const MAX_PASSES: usize = 200;

    /// Parse and deserialize, reporting every syntax error, unknown key and bad value.
    /// `None` when anything was reported.
    pub(super) fn read(text: &str, report: &mut Report) -> Option<RawConfig> {
        let (mut root, syntax_errors) = DeTable::parse_recoverable(text);
        if !syntax_errors.is_empty() {
            // The recovered tree is a guess; checking it would add misleading messages. The
            // parser's recovery also cascades (an unclosed `[` errs on every following line):
            // keep the first error of each line.
            let mut errors: Vec<(usize, String)> = syntax_errors
                .iter()
                .map(|e| {
                    let span = e.span().unwrap_or(0..0);
                    let mut message = e.message().trim().to_string();
                    // "duplicate key" alone does not say which; the key's own text does (a
                    // key name, never a value).
                    if let Some(key) = text.get(span.clone()).filter(|k| {
                        message == "duplicate key" && k.len() <= 64 && !k.contains('\n')
                    }) {
                        message = format!("duplicate key `{key}`");
                    }
                    (span.start, message)
                })
                .collect();
            errors.sort_by_key(|(offset, _)| *offset);
            let mut last_line = 0;
            for (offset, message) in errors {
                if report.line(offset) != last_line {
                    last_line = report.line(offset);
                    report.add(offset, "(syntax)", message);
                }
            }
            return None;
        }
        for _ in 0..MAX_PASSES {
            let attempt = RawConfig::deserialize(toml::de::Deserializer::from(root.clone()));
            let e = match attempt {
                // Also after errors: the validate step reports what is left, and skips
                // what was removed here.
                Ok(raw) => return Some(raw),
                Err(e) => e,
            };
            let span = e.span().unwrap_or(0..0);
            let removed = remove_at(root.get_mut(), &span, "");
            let message = plain_words(e.message());
            match removed {
                Some((key, removed_key)) => {
                    let message = if is_secret_key(&key) {
                        "expected a string (the value is not shown: it is a secret)".to_string()
                    } else {
                        message
                    };
                    report.add(span.start, key, message);
                    report.removed.push(removed_key);
                }
                None => {
                    // Not located: report it once and stop, there is nothing to remove.
                    report.add(span.start, "(file)", message);
                    return None;
                }
            }
        }
        None
    }

    /// serde's words -> the file's words: keys, values, tables, lists.
    fn plain_words(message: &str) -> String {
        let mut message = message
            .replace("unknown field", "unknown key")
            .replace("unknown variant", "unknown value")
            .replace("expected a sequence", "expected a list");
        if let Some(at) = message.find("expected struct Raw") {
            message.truncate(at);
            message.push_str("expected a table");
        }
        message
    }

    /// Remove the key whose name or value has `span`; returns (path of the problem, path of
    /// what was removed). An array element is not removed alone: later indices would shift and
    /// name the wrong element, so its whole array goes.
    fn remove_at(
        table: &mut DeTable<'_>,
        span: &Range<usize>,
        prefix: &str,
    ) -> Option<(String, String)> {
        let mut found: Option<(String, String, String)> = None; // (map key, problem, removed)
        for (key, value) in table.iter_mut() {
            let path = if prefix.is_empty() {
                key.get_ref().to_string()
            } else {
                format!("{prefix}.{}", key.get_ref())
            };
            if key.span() == *span || value.span() == *span {
                found = Some((key.get_ref().to_string(), path.clone(), path));
                break;
            }
            match value.get_mut() {
                DeValue::Table(inner) => {
                    if let Some(hit) = remove_at(inner, span, &path) {
                        return Some(hit);
                    }
                }
                DeValue::Array(items) => {
                    for (i, item) in items.iter_mut().enumerate() {
                        let item_path = format!("{path}[{i}]");
                        if item.span() == *span {
                            found = Some((key.get_ref().to_string(), item_path, path.clone()));
                            break;
                        }
                        if let DeValue::Table(inner) = item.get_mut() {
                            if let Some(hit) = remove_at(inner, span, &item_path) {
                                return Some(hit);
                            }
                        }
                    }
                    if found.is_some() {
                        break;
                    }
                }
                _ => {}
            }
        }
        let (map_key, problem, removed) = found?;
        table.remove(map_key.as_str())?;
        Some((problem, removed))
    }
}

mod validate {
    //! Step 2: raw structs -> [`Config`]: defaults, ranges, files, cross-checks. Every check
    //! records its problem and carries on with a stand-in value, so one pass finds them all.
    use std::collections::HashMap;
    use std::net::{IpAddr, Ipv6Addr};

    use toml::Spanned;

    use super::raw::{
        Count, Dur, Opt, RawAdmin, RawConfig, RawCrm, RawLimits, RawLog, RawMail, RawQueue,
        RawServer, RawSite, RawStore, RawTls, RawUsers, Size, StoreKind,
    };
    use super::*;

    /// Shortest accepted site access key: it is the only thing between the internet and the
    /// webhook path.
    const MIN_ACCESS_KEY_LEN: usize = 8;
    /// CRMs (ActiveCampaign, FluentCRM, Agile CRM) give up on a webhook after 5 s.
    const CRM_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);
    const MIN_POSITIVE: Duration = Duration::from_millis(1);

    struct Ctx<'r> {
        report: &'r mut Report,
        /// Relative paths in the file are relative to the file.
        base_dir: PathBuf,
    }

    impl Ctx<'_> {
        fn problem<T>(&mut self, at: &Spanned<T>, key: &str, message: impl Into<String>) {
            self.report.add(at.span().start, key, message);
        }

        /// A required key is absent; `table_offset` locates its table. Silent when the raw
        /// step already reported (and removed) the key.
        fn missing(&mut self, table_offset: usize, key: &str, message: impl Into<String>) {
            if !self.report.was_removed(key) {
                self.report.add(table_offset, key, message);
            }
        }

        fn duration(
            &mut self,
            f: &Opt<Dur>,
            key: &str,
            default: Duration,
            min: Duration,
        ) -> Duration {
            self.duration_within(f, key, default, min, Duration::MAX)
        }

        fn duration_within(
            &mut self,
            f: &Opt<Dur>,
            key: &str,
            default: Duration,
            min: Duration,
            max: Duration,
        ) -> Duration {
            let Some(v) = f else { return default };
            let d = v.get_ref().0;
            if d < min {
                self.problem(v, key, format!("must be at least {}", format_duration(min)));
            } else if d > max {
                self.problem(v, key, format!("must be at most {}", format_duration(max)));
            }
            d
        }

        fn count(&mut self, f: &Opt<Count>, key: &str, default: u64, min: u64, max: u64) -> u64 {
            let Some(v) = f else { return default };
            let n = v.get_ref().0;
            if n < min || n > max {
                self.problem(v, key, format!("must be between {min} and {max}"));
                return default;
            }
            n
        }

        fn size(&mut self, f: &Opt<Size>, key: &str, default: u64, min: u64, max: u64) -> u64 {
            let Some(v) = f else { return default };
            let n = v.get_ref().0;
            if n < min || n > max {
                self.problem(
                    v,
                    key,
                    format!(
                        "must be between {} and {}",
                        format_size(min),
                        format_size(max)
                    ),
                );
                return default;
            }
            n
        }

        fn resolve(&self, path: &str) -> PathBuf {
            let joined = self.base_dir.join(path);
            // `dir/./data` -> `dir/data`; `..` is kept (resolving it needs the file system).
            let cleaned: PathBuf = joined
                .components()
                .filter(|c| !matches!(c, std::path::Component::CurDir))
                .collect();
            if cleaned.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                cleaned
            }
        }

        /// A secret given inline (`key`) or in a file (`key_file`), exactly one of them.
        fn secret(
            &mut self,
            table_offset: usize,
            prefix: &str,
            name: &str,
            inline: &Opt<String>,
            file: &Opt<String>,
            min_len: usize,
        ) -> Secret {
            let key = format!("{prefix}.{name}");
            let file_key = format!("{key}_file");
            let (text, at, at_key) = match (inline, file) {
                (Some(_), Some(f)) => {
                    self.problem(
                        f,
                        &file_key,
                        format!("give either {name} or {name}_file, not both"),
                    );
                    return Secret::new("");
                }
                (None, None) => {
                    if !self.report.was_removed(&key) && !self.report.was_removed(&file_key) {
                        self.report.add(
                            table_offset,
                            &key,
                            format!("missing: give {name} or {name}_file"),
                        );
                    }
                    return Secret::new("");
                }
                (Some(v), None) => (v.get_ref().clone(), v.span().start, key),
                (None, Some(f)) => {
                    let path = self.resolve(f.get_ref());
                    match std::fs::read_to_string(&path) {
                        // Files written by `echo` or editors end in a newline that is not
                        // part of the secret.
                        Ok(text) => (
                            text.trim_end_matches(['\n', '\r']).to_string(),
                            f.span().start,
                            file_key,
                        ),
                        Err(e) => {
                            let message = format!("cannot read {}: {e}", path.display());
                            self.problem(f, &file_key, message);
                            return Secret::new("");
                        }
                    }
                }
            };
            if text.is_empty() {
                self.report.add(at, &at_key, "is empty");
            } else if text.chars().count() < min_len {
                self.report.add(
                    at,
                    &at_key,
                    format!("is shorter than {min_len} characters; use a long random key"),
                );
            }
            Secret::new(text)
        }
    }

    pub(super) fn config(raw: RawConfig, path: &Path, report: &mut Report) -> Option<Config> {
        let base_dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let mut cx = Ctx { report, base_dir };
        // HTTPS alone is a complete setup: then [server] listen may be left out.
        let serves_https = raw
            .tls
            .as_ref()
            .and_then(|t| t.get_ref().listen.as_ref())
            .is_some_and(|l| !l.get_ref().is_empty());
        let server = server(&mut cx, raw.server, serves_https);
        let admin = admin(&mut cx, raw.admin, &server);
        let tls = tls(&mut cx, raw.tls, &server, &admin);
        let log = log(&mut cx, raw.log);
        let queue = queue(&mut cx, raw.queue);
        let sites = sites(&mut cx, raw.site);
        Some(Config {
            source: path.to_owned(),
            server,
            tls,
            admin,
            log,
            queue,
            sites,
        })
    }

    fn socket_addr(text: &str) -> Result<SocketAddr, String> {
        text.parse().map_err(|_| {
            format!(
                "{text:?} is not an address; expected IP and port like \"127.0.0.1:8080\" or \
                 \"[::1]:8080\" (host names are not resolved)"
            )
        })
    }

    fn server(cx: &mut Ctx<'_>, raw: Opt<RawServer>, serves_https: bool) -> ServerConfig {
        let (offset, s) = match raw {
            Some(s) => (s.span().start, s.into_inner()),
            None => {
                if !serves_https {
                    cx.missing(
                        0,
                        "server",
                        "missing [server] table (with listen = [\"IP:PORT\"])",
                    );
                }
                (0, empty_server())
            }
        };
        let mut listen = Vec::new();
        match &s.listen {
            None if serves_https => {}
            Some(list) if serves_https && list.get_ref().is_empty() => {}
            None => cx.missing(
                offset,
                "server.listen",
                "missing: the addresses to serve HTTP on, like [\"127.0.0.1:8080\"]",
            ),
            Some(list) if list.get_ref().is_empty() => cx.problem(
                list,
                "server.listen",
                "is empty: give at least one address like \"127.0.0.1:8080\"",
            ),
            Some(list) => {
                for (i, item) in list.get_ref().iter().enumerate() {
                    let key = format!("server.listen[{i}]");
                    match socket_addr(item.get_ref()) {
                        // Port 0 (tests) binds a fresh port each time: never a duplicate.
                        Ok(addr) if addr.port() != 0 && listen.contains(&addr) => {
                            cx.problem(item, &key, format!("{addr} is listed twice"))
                        }
                        Ok(addr) => listen.push(addr),
                        Err(m) => cx.problem(item, &key, m),
                    }
                }
            }
        }
        let data_dir = match &s.data_dir {
            None => cx.resolve("./data"),
            Some(d) if d.get_ref().is_empty() => {
                cx.problem(
                    d,
                    "server.data_dir",
                    "is empty; expected a directory like \"./data\"",
                );
                PathBuf::new()
            }
            Some(d) => {
                let dir = cx.resolve(d.get_ref());
                if dir.exists() && !dir.is_dir() {
                    cx.problem(
                        d,
                        "server.data_dir",
                        format!("{} is not a directory", dir.display()),
                    );
                }
                dir
            }
        };
        let max_connections = cx.count(
            &s.max_connections,
            "server.max_connections",
            10_000,
            1,
            10_000_000,
        );
        let header_read_timeout = cx.duration(
            &s.header_read_timeout,
            "server.header_read_timeout",
            Duration::from_secs(10),
            MIN_POSITIVE,
        );
        let idle_timeout = cx.duration(
            &s.idle_timeout,
            "server.idle_timeout",
            Duration::from_secs(60),
            MIN_POSITIVE,
        );
        // hyper refuses HTTP/1 buffers under 8 KiB (it panics), so that is the floor.
        let max_header_size = cx.size(
            &s.max_header_size,
            "server.max_header_size",
            64 * 1024,
            8 * 1024,
            16 * 1024 * 1024,
        );
        let shutdown_grace = cx.duration(
            &s.shutdown_grace,
            "server.shutdown_grace",
            Duration::from_secs(30),
            Duration::ZERO,
        );
        let mut trusted_proxies = Vec::new();
        for (i, item) in s
            .trusted_proxies
            .iter()
            .flat_map(|l| l.get_ref().iter())
            .enumerate()
        {
            let text = item.get_ref().trim();
            let net = text
                .parse::<IpNet>()
                .map(|n| n.trunc())
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
            match net {
                Ok(net) => trusted_proxies.push(net),
                Err(_) => cx.problem(
                    item,
                    &format!("server.trusted_proxies[{i}]"),
                    format!("{text:?} is not a network; expected CIDR like \"10.0.0.0/8\" or an IP like \"192.0.2.7\""),
                ),
            }
        }
        ServerConfig {
            listen,
            data_dir,
            max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
            header_read_timeout,
            idle_timeout,
            max_header_size: usize::try_from(max_header_size).unwrap_or(usize::MAX),
            shutdown_grace,
            trusted_proxies,
        }
    }

    fn empty_server() -> RawServer {
        RawServer {
            listen: None,
            data_dir: None,
            max_connections: None,
            header_read_timeout: None,
            idle_timeout: None,
            max_header_size: None,
            shutdown_grace: None,
            trusted_proxies: None,
        }
    }

    fn admin(cx: &mut Ctx<'_>, raw: Opt<RawAdmin>, server: &ServerConfig) -> AdminConfig {
        let Some(a) = raw.map(Spanned::into_inner) else {
            return AdminConfig {
                listen: None,
                token_file: None,
            };
        };
        let token_file = a.token_file.as_ref().map(|f| {
            let path = cx.resolve(f.get_ref());
            match std::fs::read_to_string(&path) {
                Ok(token) if token.trim().is_empty() => cx.problem(
                    f,
                    "admin.token_file",
                    format!("{} is empty", path.display()),
                ),
                Ok(_) => {}
                Err(e) => cx.problem(
                    f,
                    "admin.token_file",
                    format!("cannot read {}: {e}", path.display()),
                ),
            }
            path
        });
        let listen = a
            .listen
            .as_ref()
            .and_then(|l| match socket_addr(l.get_ref()) {
                Err(m) => {
                    cx.problem(l, "admin.listen", m);
                    None
                }
                Ok(addr) => {
                    if !addr.ip().is_loopback() && token_file.is_none() {
                        cx.problem(
                            l,
                            "admin.listen",
                            format!(
                                "{addr} is not a loopback address, so token_file is required (the \
                             admin API replays jobs and shows contacts); or listen on 127.0.0.1"
                            ),
                        );
                    }
                    if addr.port() != 0 && server.listen.contains(&addr) {
                        cx.problem(
                            l,
                            "admin.listen",
                            format!("{addr} is also in server.listen"),
                        );
                    }
                    Some(addr)
                }
            });
        AdminConfig { listen, token_file }
    }

    fn tls(
        cx: &mut Ctx<'_>,
        raw: Opt<RawTls>,
        server: &ServerConfig,
        admin: &AdminConfig,
    ) -> TlsConfig {
        let Some(raw) = raw else {
            return TlsConfig::default();
        };
        let offset = raw.span().start;
        let t = raw.into_inner();
        let mut listen = Vec::new();
        match &t.listen {
            None => cx.missing(
                offset,
                "tls.listen",
                "missing: the addresses to serve HTTPS on, like [\"0.0.0.0:443\"]",
            ),
            Some(list) if list.get_ref().is_empty() => cx.problem(
                list,
                "tls.listen",
                "is empty: give at least one address like \"0.0.0.0:443\", or remove [tls]",
            ),
            Some(list) => {
                for (i, item) in list.get_ref().iter().enumerate() {
                    let key = format!("tls.listen[{i}]");
                    match socket_addr(item.get_ref()) {
                        Err(m) => cx.problem(item, &key, m),
                        // Port 0 (tests) binds a fresh port each time: never a clash.
                        Ok(addr) if addr.port() == 0 => listen.push(addr),
                        Ok(addr) if listen.contains(&addr) => {
                            cx.problem(item, &key, format!("{addr} is listed twice"))
                        }
                        Ok(addr) if server.listen.contains(&addr) => {
                            cx.problem(item, &key, format!("{addr} is also in server.listen"))
                        }
                        Ok(addr) if admin.listen == Some(addr) => {
                            cx.problem(item, &key, format!("{addr} is also admin.listen"))
                        }
                        Ok(addr) => listen.push(addr),
                    }
                }
            }
        }
        let raw_certs = t.cert.unwrap_or_default();
        if raw_certs.is_empty() {
            cx.missing(
                offset,
                "tls.cert",
                "no [[tls.cert]]: HTTPS needs at least one certificate (chain and key)",
            );
        }
        let mut certs = Vec::new();
        let mut default: Option<usize> = None;
        for (i, c) in raw_certs.into_iter().enumerate() {
            let c_offset = c.span().start;
            let prefix = format!("tls.cert[{i}]");
            let c = c.into_inner();
            let path = |cx: &mut Ctx<'_>, field: &Opt<String>, name: &str, what: &str| {
                let key = format!("{prefix}.{name}");
                match field {
                    None => {
                        cx.missing(c_offset, &key, format!("missing: {what}"));
                        None
                    }
                    Some(p) if p.get_ref().is_empty() => {
                        cx.problem(p, &key, format!("is empty; expected {what}"));
                        None
                    }
                    Some(p) => Some(cx.resolve(p.get_ref())),
                }
            };
            let chain = path(
                cx,
                &c.chain,
                "chain",
                "the PEM certificate chain file, server certificate first, like \"fullchain.pem\"",
            );
            let key = path(
                cx,
                &c.key,
                "key",
                "the PEM private key file, like \"privkey.pem\"",
            );
            let is_default = c.default.as_ref().is_some_and(|d| *d.get_ref());
            if let Some(d) = c.default.as_ref().filter(|_| is_default) {
                match default {
                    Some(first) => cx.problem(
                        d,
                        &format!("{prefix}.default"),
                        format!("tls.cert[{first}] is already the default; only one can be"),
                    ),
                    None => default = Some(i),
                }
            }
            let (Some(chain), Some(key)) = (chain, key) else {
                continue;
            };
            if let Err(e) = crate::tls::load_cert(&chain, &key) {
                let (at, name) = match e.file() {
                    crate::tls::CertFile::Chain => (&c.chain, "chain"),
                    crate::tls::CertFile::Key => (&c.key, "key"),
                };
                let at = at.as_ref().map_or(c_offset, |p| p.span().start);
                cx.report.add(at, format!("{prefix}.{name}"), e.to_string());
            }
            certs.push(CertConfig {
                chain,
                key,
                default: is_default,
            });
        }
        // Without an explicit default, the first certificate is it.
        if default.is_none() {
            if let Some(first) = certs.first_mut() {
                first.default = true;
            }
        }
        TlsConfig { listen, certs }
    }

    fn log(cx: &mut Ctx<'_>, raw: Opt<RawLog>) -> LogConfig {
        let l = raw.map(Spanned::into_inner);
        let l = l.as_ref();
        let level = match l.and_then(|l| l.level.as_ref()) {
            None => "info".to_string(),
            Some(level) => {
                if let Err(e) = tracing_subscriber::EnvFilter::try_new(level.get_ref()) {
                    cx.problem(
                        level,
                        "log.level",
                        format!(
                            "{e}; expected a level like \"info\" or \"info,wpf_gateway=debug\""
                        ),
                    );
                }
                level.get_ref().clone()
            }
        };
        LogConfig {
            format: l
                .and_then(|l| l.format.as_ref())
                .map_or(LogFormat::Text, |f| *f.get_ref()),
            level,
            access_log: l
                .and_then(|l| l.access_log.as_ref())
                .is_none_or(|a| *a.get_ref()),
        }
    }

    fn queue(cx: &mut Ctx<'_>, raw: Opt<RawQueue>) -> QueueConfig {
        let q = raw.map(Spanned::into_inner).unwrap_or(RawQueue {
            durability: None,
            queue_max: None,
            retention: None,
            retry_schedule: None,
            retry_until: None,
            commit_window: None,
        });
        let retry_schedule = match &q.retry_schedule {
            None => [5, 30, 120, 600, 1800, 3600]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
            Some(list) if list.get_ref().is_empty() => {
                cx.problem(
                    list,
                    "queue.retry_schedule",
                    "is empty; expected delays like [\"5s\", \"30s\", \"2m\"]",
                );
                Vec::new()
            }
            Some(list) => {
                let mut delays = Vec::new();
                for (i, d) in list.get_ref().iter().enumerate() {
                    if d.get_ref().0 < Duration::from_secs(1) {
                        cx.problem(
                            d,
                            &format!("queue.retry_schedule[{i}]"),
                            "must be at least 1s",
                        );
                    }
                    delays.push(d.get_ref().0);
                }
                delays
            }
        };
        let day = Duration::from_secs(86_400);
        QueueConfig {
            durability: q
                .durability
                .as_ref()
                .map_or(Durability::Fsync, |d| *d.get_ref()),
            queue_max: cx.count(&q.queue_max, "queue.queue_max", 1_000_000, 1, u64::MAX),
            retention: cx.duration(
                &q.retention,
                "queue.retention",
                7 * day,
                Duration::from_secs(60),
            ),
            retry_schedule,
            retry_until: cx.duration(&q.retry_until, "queue.retry_until", day, Duration::ZERO),
            // Every webhook answer waits for its commit: a long window is a slow gateway.
            commit_window: cx.duration_within(
                &q.commit_window,
                "queue.commit_window",
                Duration::from_millis(2),
                Duration::ZERO,
                Duration::from_secs(1),
            ),
        }
    }

    fn sites(cx: &mut Ctx<'_>, raw: Option<Vec<Spanned<RawSite>>>) -> Vec<SiteConfig> {
        let raw = raw.unwrap_or_default();
        if raw.is_empty() {
            cx.missing(0, "site", "no [[site]]: at least one site is required");
        }
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut hosts: HashMap<String, usize> = HashMap::new();
        let mut catch_all: Option<usize> = None;
        let mut sites = Vec::new();
        for (i, s) in raw.into_iter().enumerate() {
            let offset = s.span().start;
            let prefix = format!("site[{i}]");
            let s = s.into_inner();
            let site = site(cx, &s, offset, &prefix);
            if let Some(name) = &s.name {
                if let Some(first) = names.get(&site.name) {
                    cx.problem(
                        name,
                        &format!("{prefix}.name"),
                        format!("{:?} is also the name of site[{first}]", site.name),
                    );
                } else {
                    names.insert(site.name.clone(), i);
                }
            }
            let written_hosts = s.hosts.as_ref().map_or(&[][..], |l| l.get_ref().as_slice());
            for (j, item) in written_hosts.iter().enumerate() {
                // Invalid hosts were reported by `site`.
                let Ok(host) = host(item.get_ref()) else {
                    continue;
                };
                let key = format!("{prefix}.hosts[{j}]");
                match hosts.get(&host) {
                    Some(&other) if other == i => {
                        cx.problem(item, &key, format!("{host:?} is listed twice"))
                    }
                    Some(&other) => cx.problem(
                        item,
                        &key,
                        format!(
                            "{host:?} is also a host of site[{other}]; a host belongs to one site"
                        ),
                    ),
                    None => {
                        hosts.insert(host, i);
                    }
                }
            }
            let is_catch_all =
                written_hosts.is_empty() && !cx.report.was_removed(&format!("{prefix}.hosts"));
            if is_catch_all {
                match catch_all {
                    Some(first) => {
                        let message = format!(
                            "site[{first}] is already the catch-all (no hosts); give this site hosts"
                        );
                        match &s.hosts {
                            Some(list) => cx.problem(list, &format!("{prefix}.hosts"), message),
                            None => cx.report.add(offset, format!("{prefix}.hosts"), message),
                        }
                    }
                    None => catch_all = Some(i),
                }
            }
            sites.push(site);
        }
        sites
    }

    /// 1 to 64 of `a-z 0-9 _ -`: site names and WordPress role slugs.
    fn is_slug(text: &str) -> bool {
        !text.is_empty()
            && text.len() <= 64
            && text
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    }

    fn site_name(name: &str) -> Result<(), String> {
        if is_slug(name) {
            Ok(())
        } else {
            Err(format!(
                "{name:?} is not a site name; expected 1 to 64 of a-z 0-9 _ -"
            ))
        }
    }

    /// Lower-cased host as the router compares it: no brackets, no trailing dot.
    pub(super) fn host(text: &str) -> Result<String, String> {
        let lower = text.to_ascii_lowercase();
        if lower.is_empty() {
            return Err("is empty; omit hosts for a catch-all site".into());
        }
        if let Some(inner) = lower.strip_prefix('[') {
            return match inner.strip_suffix(']').map(str::parse::<Ipv6Addr>) {
                Some(Ok(_)) => Ok(inner.trim_end_matches(']').to_string()),
                _ => Err(format!(
                    "{text:?} is not an IPv6 literal like \"[::1]\" (without port)"
                )),
            };
        }
        if lower.parse::<Ipv6Addr>().is_ok() {
            return Ok(lower);
        }
        if lower.contains("://") || lower.contains('/') {
            return Err(format!(
                "{text:?}: expected a host name only, without scheme or path"
            ));
        }
        if lower.contains(':') {
            return Err(format!(
                "{text:?}: expected a host name without port (the port is ignored when routing)"
            ));
        }
        if lower.contains('*') {
            return Err(format!(
                "{text:?}: wildcards are not supported; list every host name"
            ));
        }
        let name = lower.strip_suffix('.').unwrap_or(&lower);
        let valid = name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        });
        if valid && name.len() <= 253 {
            Ok(name.to_string())
        } else {
            Err(format!("{text:?} is not a host name"))
        }
    }

    /// `http(s)://host[:port][/]`: the request's own path and query are appended when
    /// forwarding, so the upstream has none (and no credentials: never echoed, never logged).
    /// A URL for messages: quoted, unless it may carry credentials (`user:password@`).
    fn shown_url(text: &str) -> String {
        if text.contains('@') {
            "the URL (not shown: it contains user info)".to_string()
        } else {
            format!("{text:?}")
        }
    }

    pub(super) fn upstream(text: &str) -> Result<Upstream, String> {
        let shown = shown_url(text);
        let expected =
            "expected a URL like \"http://127.0.0.1:8081\" (scheme, host, optional port)";
        let uri: http::Uri = text
            .parse()
            .map_err(|_| format!("{shown} is not a URL; {expected}"))?;
        let scheme = match uri.scheme_str() {
            Some("http") => http::uri::Scheme::HTTP,
            Some("https") => http::uri::Scheme::HTTPS,
            _ => return Err(format!("{shown} must start with http:// or https://")),
        };
        let authority = uri.authority().cloned().filter(|a| !a.host().is_empty());
        let Some(authority) = authority else {
            return Err(format!("{shown} has no host; {expected}"));
        };
        if authority.as_str().contains('@') {
            return Err("must not contain user info (user:password@)".into());
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() || text.contains('#') {
            return Err(format!(
                "{shown} has a path, query or fragment; the gateway forwards each request's own \
                 path, so give scheme, host and port only"
            ));
        }
        Ok(Upstream { scheme, authority })
    }

    /// A CRM API base URL: `http(s)://host[:port][/path]`, trailing `/` removed.
    fn crm_url(text: &str) -> Result<String, String> {
        let shown = shown_url(text);
        let uri: http::Uri = text.parse().map_err(|_| {
            format!("{shown} is not a URL; expected like \"https://account.api-us1.com\"")
        })?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(format!("{shown} must start with http:// or https://"));
        }
        match uri.authority() {
            Some(a) if a.as_str().contains('@') => {
                Err("must not contain user info (user:password@); use user and api_key".into())
            }
            Some(a) if !a.host().is_empty() => {
                if uri.query().is_some() || text.contains('#') {
                    Err(format!("{shown} must not have a query or fragment"))
                } else {
                    Ok(text.trim_end_matches('/').to_string())
                }
            }
            _ => Err(format!("{shown} has no host")),
        }
    }

    fn site(cx: &mut Ctx<'_>, s: &RawSite, offset: usize, prefix: &str) -> SiteConfig {
        let key = |name: &str| format!("{prefix}.{name}");
        let name = match &s.name {
            None => {
                cx.missing(
                    offset,
                    &key("name"),
                    "missing: a name like \"main\" (used in logs, metrics and the admin API)",
                );
                String::new()
            }
            Some(n) => {
                if let Err(m) = site_name(n.get_ref()) {
                    cx.problem(n, &key("name"), m);
                }
                n.get_ref().clone()
            }
        };
        let mut hosts = Vec::new();
        for (j, item) in s.hosts.iter().flat_map(|l| l.get_ref().iter()).enumerate() {
            match host(item.get_ref()) {
                Ok(h) => hosts.push(h),
                Err(m) => {
                    cx.problem(item, &format!("{prefix}.hosts[{j}]"), m);
                    // Keep indices aligned with the file for the duplicate check.
                    hosts.push(String::new());
                }
            }
        }
        let upstream = match &s.upstream {
            None => {
                cx.missing(
                    offset,
                    &key("upstream"),
                    "missing: the site's own address, like \"http://127.0.0.1:8081\"",
                );
                None
            }
            Some(u) => upstream(u.get_ref())
                .map_err(|m| cx.problem(u, &key("upstream"), m))
                .ok(),
        };
        let upstream = upstream.unwrap_or(Upstream {
            scheme: http::uri::Scheme::HTTP,
            // A stand-in: a problem was recorded, so this config is never returned.
            authority: http::uri::Authority::from_static("upstream.invalid"),
        });
        let access_key = cx.secret(
            offset,
            prefix,
            "access_key",
            &s.access_key,
            &s.access_key_file,
            MIN_ACCESS_KEY_LEN,
        );
        let mode = s.mode.as_ref().map_or(Mode::Relay, |m| *m.get_ref());
        let respond = s.respond.as_ref().map_or(Respond::Async, |r| *r.get_ref());
        let sync_timeout = cx.duration(
            &s.sync_timeout,
            &key("sync_timeout"),
            Duration::from_secs(4),
            MIN_POSITIVE,
        );
        if respond == Respond::Sync && sync_timeout >= CRM_WEBHOOK_TIMEOUT {
            if let Some(t) = &s.sync_timeout {
                cx.problem(
                    t,
                    &key("sync_timeout"),
                    "must be under 5s with respond = \"sync\": CRMs give up on a webhook after 5 s \
                     and send it again, so a longer wait turns slow jobs into repeat deliveries",
                );
            }
        }
        let limits = s
            .limits
            .as_ref()
            .map(|l| limits(cx, l.get_ref(), prefix))
            .unwrap_or_default();
        let crm = s.crm.as_ref().map(|c| crm(cx, c, prefix));
        if mode == Mode::Direct && s.crm.is_none() {
            if let Some(m) = &s.mode {
                cx.problem(m, &key("mode"), "\"direct\" needs a [site.crm] table: the gateway loads contacts from the CRM itself");
            }
        }
        let store = s.store.as_ref().map_or(StoreConfig::Embedded, |st| {
            store(cx, st, prefix, crm.as_ref().map(|c| c.kind))
        });
        let fields = match &s.fields {
            Some(f) => fields(cx, f.get_ref(), prefix),
            None => default_fields(crm.as_ref().map(|c| c.kind)),
        };
        let users = s
            .users
            .as_ref()
            .map(|u| users(cx, u, prefix))
            .unwrap_or_default();
        let mail = s.mail.as_ref().map(|m| mail(cx, m, prefix));
        SiteConfig {
            name,
            hosts: hosts.into_iter().filter(|h| !h.is_empty()).collect(),
            upstream,
            upstream_connect_timeout: cx.duration(
                &s.upstream_connect_timeout,
                &key("upstream_connect_timeout"),
                Duration::from_secs(5),
                MIN_POSITIVE,
            ),
            upstream_timeout: cx.duration(
                &s.upstream_timeout,
                &key("upstream_timeout"),
                Duration::from_secs(60),
                MIN_POSITIVE,
            ),
            access_key,
            mode,
            respond,
            max_body: cx.size(&s.max_body, &key("max_body"), 1 << 20, 1, 1 << 30),
            sync_timeout,
            dedupe_window: cx.duration(
                &s.dedupe_window,
                &key("dedupe_window"),
                Duration::from_secs(300),
                Duration::ZERO,
            ),
            loopback_lock: cx.duration(
                &s.loopback_lock,
                &key("loopback_lock"),
                Duration::from_secs(60),
                Duration::ZERO,
            ),
            workers: usize::try_from(cx.count(&s.workers, &key("workers"), 4, 1, 1024))
                .unwrap_or(1),
            paused: s.paused.as_ref().is_some_and(|p| *p.get_ref()),
            upstream_concurrency: usize::try_from(cx.count(
                &s.upstream_concurrency,
                &key("upstream_concurrency"),
                2,
                1,
                1024,
            ))
            .unwrap_or(1),
            limits,
            crm,
            store,
            fields,
            users,
            mail,
        }
    }

    /// The names WP Fusion maps by default: first and last name, in the CRM's own spelling.
    fn default_fields(kind: Option<CrmKind>) -> BTreeMap<String, String> {
        let (first, last) = match kind {
            Some(CrmKind::ActiveCampaign) => ("firstName", "lastName"),
            _ => ("first_name", "last_name"),
        };
        BTreeMap::from([
            ("first_name".to_string(), first.to_string()),
            ("last_name".to_string(), last.to_string()),
        ])
    }

    fn fields(
        cx: &mut Ctx<'_>,
        raw: &BTreeMap<String, Spanned<String>>,
        prefix: &str,
    ) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (meta, field) in raw {
            let key = format!("{prefix}.fields.{meta}");
            let name = field.get_ref().trim();
            if meta.trim().is_empty() || meta.chars().any(char::is_control) {
                cx.problem(
                    field,
                    &key,
                    "the meta key is empty or has control characters",
                );
            } else if name.is_empty() {
                cx.problem(field, &key, "names no CRM field");
            } else {
                out.insert(meta.clone(), name.to_string());
            }
        }
        out
    }

    /// A WordPress role slug: what `add_role()` accepts in practice.
    fn role_name(text: &str) -> Result<(), String> {
        if !is_slug(text) {
            return Err(format!(
                "{text:?}: expected a role slug like \"subscriber\" (a-z, 0-9, _ and -)"
            ));
        }
        if text == "administrator" {
            return Err("\"administrator\" is never granted by a webhook".into());
        }
        Ok(())
    }

    fn users(cx: &mut Ctx<'_>, u: &Spanned<RawUsers>, prefix: &str) -> UsersConfig {
        let u = u.get_ref();
        let mut roles = Vec::new();
        for (i, r) in u.roles.iter().flat_map(|r| r.get_ref().iter()).enumerate() {
            match role_name(r.get_ref()) {
                Ok(()) => roles.push(r.get_ref().clone()),
                Err(m) => cx.problem(r, &format!("{prefix}.users.roles[{i}]"), m),
            }
        }
        let default_role = match &u.default_role {
            None => UsersConfig::default().default_role,
            Some(r) => {
                if let Err(m) = role_name(r.get_ref()) {
                    cx.problem(r, &format!("{prefix}.users.default_role"), m);
                }
                r.get_ref().clone()
            }
        };
        UsersConfig {
            roles,
            default_role,
        }
    }

    fn mail(cx: &mut Ctx<'_>, m: &Spanned<RawMail>, prefix: &str) -> MailConfig {
        let offset = m.span().start;
        let prefix = format!("{prefix}.mail");
        let key = |name: &str| format!("{prefix}.{name}");
        let m = m.get_ref();
        let text = |f: &Opt<String>| f.as_ref().map(|v| v.get_ref().trim().to_string());
        let host = text(&m.host).unwrap_or_default();
        if host.is_empty() {
            match &m.host {
                Some(h) => cx.problem(h, &key("host"), "is empty"),
                None => cx.missing(offset, &key("host"), "missing: the SMTP server's name"),
            }
        }
        let tls = m.tls.as_ref().map_or(MailTls::Starttls, |t| *t.get_ref());
        let default_port = match tls {
            MailTls::None => 25,
            MailTls::Starttls => 587,
            MailTls::Tls => 465,
        };
        let port = cx.count(&m.port, &key("port"), default_port, 1, 65535);
        let password = (m.password.is_some() || m.password_file.is_some()).then(|| {
            cx.secret(
                offset,
                &prefix,
                "password",
                &m.password,
                &m.password_file,
                1,
            )
        });
        if password.is_some() != m.user.is_some() {
            cx.missing(
                offset,
                &key("user"),
                "user and password (or password_file) go together",
            );
        }
        let from = text(&m.from).unwrap_or_default();
        match &m.from {
            None => cx.missing(
                offset,
                &key("from"),
                "missing: the sender, e.g. \"Site <no-reply@example.com>\"",
            ),
            Some(f) => {
                if from.parse::<lettre::message::Mailbox>().is_err() {
                    cx.problem(f, &key("from"), format!("{from:?} is not a mail address"));
                }
            }
        }
        MailConfig {
            host,
            port: u16::try_from(port).unwrap_or(25),
            tls,
            user: text(&m.user),
            password,
            from,
            subject: text(&m.subject).unwrap_or_else(|| "Your account".into()),
            login_url: text(&m.login_url),
            include_password: m.include_password.as_ref().is_some_and(|b| *b.get_ref()),
        }
    }

    fn rate(
        cx: &mut Ctx<'_>,
        (count, per): (u32, Duration),
        burst: &Opt<Count>,
        burst_key: &str,
    ) -> Rate {
        let burst = cx.count(burst, burst_key, u64::from(count), 1, u64::from(u32::MAX));
        Rate {
            count,
            per,
            burst: u32::try_from(burst).unwrap_or(count),
        }
    }

    fn limits(cx: &mut Ctx<'_>, l: &RawLimits, prefix: &str) -> SiteLimits {
        let mut one = |rate_field: &Opt<super::raw::RateText>, burst: &Opt<Count>, name: &str| {
            match rate_field {
                Some(r) => Some(rate(
                    cx,
                    (r.get_ref().0, r.get_ref().1),
                    burst,
                    &format!("{prefix}.limits.{name}_burst"),
                )),
                None => {
                    if let Some(b) = burst {
                        cx.problem(
                            b,
                            &format!("{prefix}.limits.{name}_burst"),
                            format!("needs {name} (a burst of what rate?)"),
                        );
                    }
                    None
                }
            }
        };
        SiteLimits {
            per_ip: one(&l.per_ip, &l.per_ip_burst, "per_ip"),
            per_site: one(&l.per_site, &l.per_site_burst, "per_site"),
        }
    }

    fn crm(cx: &mut Ctx<'_>, c: &Spanned<RawCrm>, prefix: &str) -> CrmConfig {
        let offset = c.span().start;
        let prefix = format!("{prefix}.crm");
        let key = |name: &str| format!("{prefix}.{name}");
        let c = c.get_ref();
        let kind = match &c.kind {
            Some(k) => *k.get_ref(),
            None => {
                cx.missing(
                    offset,
                    &key("kind"),
                    "missing: \"activecampaign\", \"fluentcrm\" or \"agilecrm\"",
                );
                CrmKind::ActiveCampaign
            }
        };
        let url = match &c.url {
            Some(u) => crm_url(u.get_ref()).unwrap_or_else(|m| {
                cx.problem(u, &key("url"), m);
                String::new()
            }),
            None => {
                cx.missing(offset, &key("url"), "missing: the CRM's API address");
                String::new()
            }
        };
        let api_key = cx.secret(offset, &prefix, "api_key", &c.api_key, &c.api_key_file, 1);
        let needs_user = matches!(kind, CrmKind::FluentCrm | CrmKind::AgileCrm);
        match (&c.user, needs_user) {
            (None, true) if c.kind.is_some() => cx.missing(
                offset,
                &key("user"),
                "missing: fluentcrm needs the application-password user, agilecrm the account email",
            ),
            (Some(u), false) if c.kind.is_some() => {
                cx.problem(u, &key("user"), "is only used by fluentcrm and agilecrm")
            }
            (Some(u), true) if u.get_ref().is_empty() => cx.problem(u, &key("user"), "is empty"),
            _ => {}
        }
        let rate_text = c.rate.as_ref().map_or((5, Duration::from_secs(1)), |r| {
            (r.get_ref().0, r.get_ref().1)
        });
        let return_password_field = c.return_password_field.as_ref().map(|f| {
            let name = f.get_ref().trim();
            if name.is_empty() {
                cx.problem(f, &key("return_password_field"), "is empty");
            }
            name.to_string()
        });
        CrmConfig {
            kind,
            url,
            api_key,
            user: c.user.as_ref().map(|u| u.get_ref().clone()),
            rate: rate(cx, rate_text, &c.rate_burst, &key("rate_burst")),
            timeout: cx.duration(
                &c.timeout,
                &key("timeout"),
                Duration::from_secs(10),
                MIN_POSITIVE,
            ),
            return_password_field,
        }
    }

    fn store(
        cx: &mut Ctx<'_>,
        st: &Spanned<RawStore>,
        prefix: &str,
        crm_kind: Option<CrmKind>,
    ) -> StoreConfig {
        let offset = st.span().start;
        let prefix = format!("{prefix}.store");
        let key = |name: &str| format!("{prefix}.{name}");
        let st = st.get_ref();
        match st
            .kind
            .as_ref()
            .map_or(StoreKind::Embedded, |k| *k.get_ref())
        {
            StoreKind::Embedded => {
                for (name, present) in [
                    ("url", st.url.as_ref().map(Spanned::span)),
                    ("url_file", st.url_file.as_ref().map(Spanned::span)),
                    ("table_prefix", st.table_prefix.as_ref().map(Spanned::span)),
                    ("crm_slug", st.crm_slug.as_ref().map(Spanned::span)),
                    ("notify", st.notify.as_ref().map(Spanned::span)),
                ] {
                    if let Some(span) = present {
                        cx.report.add(
                            span.start,
                            key(name),
                            "is only used with kind = \"wordpress\"",
                        );
                    }
                }
                StoreConfig::Embedded
            }
            StoreKind::WordPress => {
                let url = cx.secret(offset, &prefix, "url", &st.url, &st.url_file, 1);
                let url_ok = ["mysql://", "mariadb://"]
                    .iter()
                    .any(|s| url.expose().starts_with(s));
                if !url.expose().is_empty() && !url_ok {
                    // The value holds a password: describe, never echo.
                    let at = st
                        .url
                        .as_ref()
                        .or(st.url_file.as_ref())
                        .map_or(offset, |u| u.span().start);
                    let which = if st.url.is_some() { "url" } else { "url_file" };
                    cx.report.add(
                        at,
                        key(which),
                        "expected \"mysql://user:password@host/database\"",
                    );
                }
                let table_prefix = match &st.table_prefix {
                    None => "wp_".to_string(),
                    Some(p) => {
                        let text = p.get_ref();
                        // Spliced into SQL identifiers: only identifier characters.
                        let ok = !text.is_empty()
                            && text.len() <= 64
                            && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                        if !ok {
                            cx.problem(
                                p,
                                &key("table_prefix"),
                                format!("{text:?}: expected letters, digits and _ like \"wp_\""),
                            );
                        }
                        text.clone()
                    }
                };
                let crm_slug = match &st.crm_slug {
                    Some(slug) => {
                        let text = slug.get_ref();
                        let ok = !text.is_empty()
                            && text.len() <= 64
                            && text.bytes().all(|b| {
                                b.is_ascii_lowercase()
                                    || b.is_ascii_digit()
                                    || b == b'_'
                                    || b == b'-'
                            });
                        if !ok {
                            cx.problem(
                                slug,
                                &key("crm_slug"),
                                format!(
                                    "{text:?}: expected WP Fusion's CRM slug, lower-case letters, \
                                     digits, - and _ like \"activecampaign\" or \"fluentcrm-rest\""
                                ),
                            );
                        }
                        text.clone()
                    }
                    // Direct mode without [site.crm] is reported elsewhere; relay mode does not
                    // write users.
                    None => crm_kind.map_or("", default_crm_slug).to_owned(),
                };
                StoreConfig::WordPress {
                    url,
                    table_prefix,
                    crm_slug,
                    notify: st.notify.as_ref().is_some_and(|n| *n.get_ref()),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering for `check`.

/// The resolved configuration as TOML, every default filled in, for `wpf-gateway check`.
/// Secrets (access keys, API keys, the WordPress database URL) are written as `"***"`, so the
/// text is safe to paste anywhere; it is for reading, not for loading back.
pub fn render_resolved(config: &Config) -> String {
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    let q = |text: &str| toml::Value::String(text.to_string()).to_string();
    let path = |p: &Path| q(&p.display().to_string());
    let dur = |d: Duration| q(&format_duration(d));
    let list = |items: Vec<String>| format!("[{}]", items.join(", "));
    const MASK: &str = "\"***\"";

    line(format!(
        "# Resolved configuration of {} (defaults filled in, secrets shown as \"***\").",
        config.source.display()
    ));
    let s = &config.server;
    line("\n[server]".into());
    line(format!(
        "listen = {}",
        list(s.listen.iter().map(|a| q(&a.to_string())).collect())
    ));
    line(format!("data_dir = {}", path(&s.data_dir)));
    line(format!("max_connections = {}", s.max_connections));
    line(format!(
        "header_read_timeout = {}",
        dur(s.header_read_timeout)
    ));
    line(format!("idle_timeout = {}", dur(s.idle_timeout)));
    line(format!(
        "max_header_size = {}",
        q(&format_size(s.max_header_size as u64))
    ));
    line(format!("shutdown_grace = {}", dur(s.shutdown_grace)));
    line(format!(
        "trusted_proxies = {}",
        list(
            s.trusted_proxies
                .iter()
                .map(|n| q(&n.to_string()))
                .collect()
        )
    ));

    let t = &config.tls;
    if t.listen.is_empty() && t.certs.is_empty() {
        line("\n# [tls]: not set, no HTTPS listener".into());
    } else {
        line("\n[tls]".into());
        line(format!(
            "listen = {}",
            list(t.listen.iter().map(|a| q(&a.to_string())).collect())
        ));
        for cert in &t.certs {
            // Paths only: the key file's contents never leave it.
            line("\n[[tls.cert]]".into());
            line(format!("chain = {}", path(&cert.chain)));
            line(format!("key = {}", path(&cert.key)));
            line(format!("default = {}", cert.default));
        }
    }

    let a = &config.admin;
    line("\n[admin]".into());
    match a.listen {
        Some(addr) => line(format!("listen = {}", q(&addr.to_string()))),
        None => line("# listen: not set, no admin listener".into()),
    }
    match &a.token_file {
        Some(p) => line(format!("token_file = {}", path(p))),
        None => line("# token_file: not set".into()),
    }

    let l = &config.log;
    line("\n[log]".into());
    line(format!("format = {}", q(log_format_name(l.format))));
    line(format!("level = {}", q(&l.level)));
    line(format!("access_log = {}", l.access_log));

    let qc = &config.queue;
    line("\n[queue]".into());
    line(format!(
        "durability = {}",
        q(durability_name(qc.durability))
    ));
    line(format!("queue_max = {}", qc.queue_max));
    line(format!("retention = {}", dur(qc.retention)));
    line(format!(
        "retry_schedule = {}",
        list(qc.retry_schedule.iter().map(|d| dur(*d)).collect())
    ));
    line(format!("retry_until = {}", dur(qc.retry_until)));
    line(format!("commit_window = {}", dur(qc.commit_window)));

    for site in &config.sites {
        line("\n[[site]]".into());
        line(format!("name = {}", q(&site.name)));
        let catch_all = if site.hosts.is_empty() {
            "  # catch-all"
        } else {
            ""
        };
        line(format!(
            "hosts = {}{catch_all}",
            list(site.hosts.iter().map(|h| q(h)).collect())
        ));
        line(format!("upstream = {}", q(&site.upstream.to_string())));
        line(format!(
            "upstream_connect_timeout = {}",
            dur(site.upstream_connect_timeout)
        ));
        line(format!("upstream_timeout = {}", dur(site.upstream_timeout)));
        line(format!("access_key = {MASK}"));
        line(format!("mode = {}", q(mode_name(site.mode))));
        line(format!("respond = {}", q(respond_name(site.respond))));
        line(format!("max_body = {}", q(&format_size(site.max_body))));
        line(format!("sync_timeout = {}", dur(site.sync_timeout)));
        line(format!("dedupe_window = {}", dur(site.dedupe_window)));
        line(format!("loopback_lock = {}", dur(site.loopback_lock)));
        line(format!("workers = {}", site.workers));
        if site.paused {
            line("paused = true  # webhooks are queued, no job runs".into());
        } else {
            line("paused = false".into());
        }
        line(format!(
            "upstream_concurrency = {}",
            site.upstream_concurrency
        ));

        line("\n[site.limits]".into());
        for (name, rate) in [
            ("per_ip", site.limits.per_ip),
            ("per_site", site.limits.per_site),
        ] {
            match rate {
                Some(r) => {
                    line(format!("{name} = {}", q(&format_rate(r.count, r.per))));
                    line(format!("{name}_burst = {}", r.burst));
                }
                None => line(format!("# {name}: unlimited")),
            }
        }

        match &site.crm {
            Some(c) => {
                line("\n[site.crm]".into());
                line(format!("kind = {}", q(crm_kind_name(c.kind))));
                line(format!("url = {}", q(&c.url)));
                line(format!("api_key = {MASK}"));
                if let Some(user) = &c.user {
                    line(format!("user = {}", q(user)));
                }
                line(format!(
                    "rate = {}",
                    q(&format_rate(c.rate.count, c.rate.per))
                ));
                line(format!("rate_burst = {}", c.rate.burst));
                line(format!("timeout = {}", q(&format_duration(c.timeout))));
                match &c.return_password_field {
                    Some(f) => line(format!("return_password_field = {}", q(f))),
                    None => line("# return_password_field: not set".into()),
                }
            }
            None => line("\n# [site.crm]: not set".into()),
        }

        line("\n[site.store]".into());
        match &site.store {
            StoreConfig::Embedded => line("kind = \"embedded\"".into()),
            StoreConfig::WordPress {
                url: _,
                table_prefix,
                crm_slug,
                notify,
            } => {
                line("kind = \"wordpress\"".into());
                line(format!("url = {MASK}"));
                line(format!("table_prefix = {}", q(table_prefix)));
                line(format!("crm_slug = {}", q(crm_slug)));
                line(format!("notify = {notify}"));
            }
        }

        line("\n[site.fields]".into());
        for (meta, field) in &site.fields {
            line(format!("{} = {}", q(meta), q(field)));
        }

        line("\n[site.users]".into());
        let roles: Vec<String> = site.users.roles.iter().map(|r| q(r)).collect();
        line(format!("roles = [{}]", roles.join(", ")));
        line(format!("default_role = {}", q(&site.users.default_role)));

        match &site.mail {
            Some(m) => {
                line("\n[site.mail]".into());
                line(format!("host = {}", q(&m.host)));
                line(format!("port = {}", m.port));
                line(format!("tls = {}", q(mail_tls_name(m.tls))));
                if let Some(user) = &m.user {
                    line(format!("user = {}", q(user)));
                    line(format!("password = {MASK}"));
                }
                line(format!("from = {}", q(&m.from)));
                line(format!("subject = {}", q(&m.subject)));
                if let Some(url) = &m.login_url {
                    line(format!("login_url = {}", q(url)));
                }
                line(format!("include_password = {}", m.include_password));
            }
            None => line("\n# [site.mail]: not set (no welcome mail)".into()),
        }
    }
    out
}

fn mail_tls_name(t: MailTls) -> &'static str {
    match t {
        MailTls::None => "none",
        MailTls::Starttls => "starttls",
        MailTls::Tls => "tls",
    }
}

fn log_format_name(f: LogFormat) -> &'static str {
    match f {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    }
}

fn durability_name(d: Durability) -> &'static str {
    match d {
        Durability::Fsync => "fsync",
        Durability::Os => "os",
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Direct => "direct",
        Mode::Relay => "relay",
    }
}

fn respond_name(r: Respond) -> &'static str {
    match r {
        Respond::Async => "async",
        Respond::Sync => "sync",
    }
}

fn crm_kind_name(k: CrmKind) -> &'static str {
    match k {
        CrmKind::ActiveCampaign => "activecampaign",
        CrmKind::FluentCrm => "fluentcrm",
        CrmKind::AgileCrm => "agilecrm",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[server]
listen = ["127.0.0.1:8080"]

[[site]]
name = "main"
upstream = "http://127.0.0.1:8081"
access_key = "key-12345678"
"#;

    pub(super) fn parse_text(text: &str) -> Result<Config, ConfigError> {
        parse(text, Path::new("/etc/wpf/gw.toml"))
    }

    /// `LINE: key: message` of every problem.
    pub(super) fn problems(text: &str) -> Vec<String> {
        match parse_text(text) {
            Ok(_) => Vec::new(),
            Err(e) => e
                .problems
                .iter()
                .map(|p| format!("{}: {}: {}", p.line, p.key, p.message))
                .collect(),
        }
    }

    fn assert_problem(text: &str, prefix: &str) {
        let found = problems(text);
        assert!(
            found.iter().any(|p| p.starts_with(prefix)),
            "no problem starting with {prefix:?} in {found:#?}"
        );
    }

    #[test]
    fn durations() {
        let ms = Duration::from_millis;
        assert_eq!(parse_duration("500ms"), Ok(ms(500)));
        assert_eq!(parse_duration("60s"), Ok(ms(60_000)));
        assert_eq!(parse_duration("5m"), Ok(ms(300_000)));
        assert_eq!(parse_duration("5min"), Ok(ms(300_000)));
        assert_eq!(parse_duration("1h"), Ok(ms(3_600_000)));
        assert_eq!(parse_duration("1d"), Ok(ms(86_400_000)));
        assert_eq!(parse_duration("1m30s"), Ok(ms(90_000)));
        assert_eq!(parse_duration(" 1h1ms "), Ok(ms(3_600_001)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in [
            "",
            "60",
            "s",
            "5x",
            "1.5s",
            "-1s",
            "1m 30s",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        assert!(
            parse_duration("99999999999999d").is_err(),
            "overflow accepted"
        );
    }

    #[test]
    fn durations_format_round_trips() {
        for text in [
            "0s",
            "500ms",
            "5s",
            "2m",
            "1h",
            "1d",
            "1m30s",
            "1d2h3m4s5ms",
        ] {
            let d = parse_duration(text).unwrap();
            assert_eq!(format_duration(d), text);
        }
        assert_eq!(format_duration(Duration::from_secs(7 * 86_400)), "7d");
        assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64KiB"), Ok(65_536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("1mib"), Ok(1 << 20));
        assert_eq!(parse_size("1 GiB"), Ok(1 << 30));
        assert_eq!(parse_size("10KB"), Ok(10_000));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
        assert_eq!(parse_size("3GB"), Ok(3_000_000_000));
        assert_eq!(parse_size("7B"), Ok(7));
        for bad in ["", "MiB", "1XB", "-1", "1.5MiB", "99999999999999GiB"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        for bytes in [0, 512, 1 << 10, 1 << 20, 3 << 30, 1000, 65_537] {
            assert_eq!(parse_size(&format_size(bytes)), Ok(bytes));
        }
        assert_eq!(format_size(1 << 20), "1MiB");
        assert_eq!(format_size(1000), "1000");
    }

    #[test]
    fn rates() {
        let s = Duration::from_secs;
        assert_eq!(parse_rate("5/s"), Ok((5, s(1))));
        assert_eq!(parse_rate("100/min"), Ok((100, s(60))));
        assert_eq!(parse_rate("1000/h"), Ok((1000, s(3600))));
        assert_eq!(parse_rate("20000/d"), Ok((20000, s(86_400))));
        assert_eq!(parse_rate("10/5m"), Ok((10, s(300))));
        for bad in ["", "5", "0/s", "-1/s", "5/", "5/x", "5/0s", "99999999999/s"] {
            assert!(parse_rate(bad).is_err(), "{bad:?} accepted");
        }
        for (count, per) in [
            (5, s(1)),
            (100, s(60)),
            (1000, s(3600)),
            (3, s(86_400)),
            (10, s(300)),
        ] {
            assert_eq!(parse_rate(&format_rate(count, per)), Ok((count, per)));
        }
    }

    #[test]
    fn minimal_config_gets_every_default() {
        let c = parse_text(MINIMAL).unwrap();
        assert_eq!(c.server.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
        assert_eq!(c.server.data_dir, PathBuf::from("/etc/wpf/data"));
        assert_eq!(c.server.max_connections, 10_000);
        assert_eq!(c.server.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.server.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.server.max_header_size, 64 * 1024);
        assert_eq!(c.server.shutdown_grace, Duration::from_secs(30));
        assert!(c.server.trusted_proxies.is_empty());
        assert_eq!(c.admin.listen, None);
        assert_eq!(c.admin.token_file, None);
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.log.level, "info");
        assert!(c.log.access_log);
        assert_eq!(c.queue.durability, Durability::Fsync);
        assert_eq!(c.queue.queue_max, 1_000_000);
        assert_eq!(c.queue.retention, Duration::from_secs(7 * 86_400));
        assert_eq!(c.queue.retry_schedule.len(), 6);
        assert_eq!(c.queue.retry_until, Duration::from_secs(86_400));
        assert_eq!(c.queue.commit_window, Duration::from_millis(2));
        let site = &c.sites[0];
        assert_eq!(site.name, "main");
        assert!(site.hosts.is_empty());
        assert_eq!(site.upstream.to_string(), "http://127.0.0.1:8081");
        assert_eq!(site.access_key.expose(), "key-12345678");
        assert_eq!(site.mode, Mode::Relay);
        assert_eq!(site.respond, Respond::Async);
        assert_eq!(site.max_body, 1 << 20);
        assert_eq!(site.sync_timeout, Duration::from_secs(4));
        assert_eq!(site.dedupe_window, Duration::from_secs(300));
        assert_eq!(site.loopback_lock, Duration::from_secs(60));
        assert_eq!(site.workers, 4);
        assert_eq!(site.upstream_concurrency, 2);
        assert!(site.limits.per_ip.is_none() && site.limits.per_site.is_none());
        assert!(site.crm.is_none());
        assert!(matches!(site.store, StoreConfig::Embedded));
    }

    #[test]
    fn every_key_set_is_read() {
        let text = r#"
[server]
listen = ["127.0.0.1:8080", "[::1]:8080"]
data_dir = "/var/lib/wpf"
max_connections = 50
header_read_timeout = "3s"
idle_timeout = "1m"
max_header_size = "16KiB"
shutdown_grace = "0s"
trusted_proxies = ["10.1.2.3/8", "192.0.2.7", "2001:db8::1"]
[log]
format = "json"
level = "info,wpf_gateway=debug"
access_log = false
[queue]
durability = "os"
queue_max = 10
retention = "1h"
retry_schedule = ["1s", "2s"]
retry_until = "10m"
commit_window = "0s"
[[site]]
name = "shop-1"
hosts = ["Shop.Example.COM.", "[::1]", "2001:DB8::2"]
upstream = "https://127.0.0.1:8443/"
upstream_connect_timeout = "1s"
upstream_timeout = "2s"
access_key = "key-12345678"
mode = "direct"
respond = "sync"
max_body = 2048
sync_timeout = "4900ms"
dedupe_window = "0s"
loopback_lock = "2m"
workers = 8
upstream_concurrency = 3
[site.limits]
per_ip = "10/s"
per_site = "100/min"
per_site_burst = 7
[site.crm]
kind = "agilecrm"
url = "https://acct.agilecrm.com/"
api_key = "api-key"
user = "me@example.com"
rate = "2/s"
rate_burst = 1
[site.store]
kind = "wordpress"
url = "mysql://u:pw@127.0.0.1/wp"
table_prefix = "wpx_"
"#;
        let c = parse_text(text).unwrap();
        assert_eq!(c.server.listen.len(), 2);
        assert_eq!(c.server.data_dir, PathBuf::from("/var/lib/wpf"));
        assert_eq!(c.server.max_connections, 50);
        assert_eq!(c.server.max_header_size, 16 * 1024);
        assert_eq!(c.server.shutdown_grace, Duration::ZERO);
        let nets: Vec<String> = c
            .server
            .trusted_proxies
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(nets, ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::1/128"]);
        assert_eq!(c.log.format, LogFormat::Json);
        assert!(!c.log.access_log);
        assert_eq!(c.queue.durability, Durability::Os);
        assert_eq!(
            c.queue.retry_schedule,
            [Duration::from_secs(1), Duration::from_secs(2)]
        );
        assert_eq!(c.queue.commit_window, Duration::ZERO);
        let s = &c.sites[0];
        assert_eq!(s.hosts, ["shop.example.com", "::1", "2001:db8::2"]);
        assert_eq!(s.upstream.to_string(), "https://127.0.0.1:8443");
        assert_eq!((s.mode, s.respond), (Mode::Direct, Respond::Sync));
        assert_eq!(s.max_body, 2048);
        assert_eq!(s.sync_timeout, Duration::from_millis(4900));
        assert_eq!((s.workers, s.upstream_concurrency), (8, 3));
        let per_ip = s.limits.per_ip.unwrap();
        assert_eq!(
            (per_ip.count, per_ip.per, per_ip.burst),
            (10, Duration::from_secs(1), 10)
        );
        let per_site = s.limits.per_site.unwrap();
        assert_eq!((per_site.count, per_site.burst), (100, 7));
        let crm = s.crm.as_ref().unwrap();
        assert_eq!(crm.kind, CrmKind::AgileCrm);
        assert_eq!(crm.url, "https://acct.agilecrm.com");
        assert_eq!(crm.api_key.expose(), "api-key");
        assert_eq!(crm.user.as_deref(), Some("me@example.com"));
        assert_eq!((crm.rate.count, crm.rate.burst), (2, 1));
        match &s.store {
            StoreConfig::WordPress {
                url,
                table_prefix,
                crm_slug,
                notify,
            } => {
                assert!(!notify);
                assert_eq!(url.expose(), "mysql://u:pw@127.0.0.1/wp");
                assert_eq!(table_prefix, "wpx_");
                assert_eq!(crm_slug, "agilecrm", "WP Fusion's slug of the CRM kind");
            }
            StoreConfig::Embedded => panic!("expected wordpress"),
        }
    }

    #[test]
    fn relative_data_dir_resolves_against_the_config_file() {
        let text = MINIMAL.replace("[server]", "[server]\ndata_dir = \"./state/q\"");
        let c = parse(&text, Path::new("conf/gw.toml")).unwrap();
        assert_eq!(c.server.data_dir, PathBuf::from("conf/state/q"));
        let c = parse(&text, Path::new("gw.toml")).unwrap();
        assert_eq!(c.server.data_dir, PathBuf::from("state/q"));
    }

    #[test]
    fn problems_carry_line_and_dotted_key() {
        let text = "[server]\nlisten = [\"127.0.0.1:8080\", \"localhost:80\"]\nidle_timeout = 60\n\n[[site]]\nname = \"a\"\nupstream = \"http://h\"\naccess_key = \"key-12345678\"\n\n[[site]]\nname = \"b\"\nhosts = [\"x.test\"]\nupstream = \"http://h\"\naccess_key = \"key-12345678\"\nworkers = 0\n";
        assert_eq!(
            problems(text),
            [
                "2: server.listen[1]: \"localhost:80\" is not an address; expected IP and port like \"127.0.0.1:8080\" or \"[::1]:8080\" (host names are not resolved)",
                "3: server.idle_timeout: invalid type: integer `60`, expected a duration like \"60s\", \"500ms\" or \"1m30s\"",
                "15: site[1].workers: must be between 1 and 1024",
            ]
        );
    }

    #[test]
    fn unknown_keys_all_reported() {
        let text = format!("{MINIMAL}acces_key = \"x\"\n[log]\nlevle = \"debug\"\n");
        let found = problems(&text);
        assert!(
            found[0].starts_with("9: site[0].acces_key: unknown key `acces_key`"),
            "{found:?}"
        );
        assert!(
            found[1].starts_with("11: log.levle: unknown key `levle`"),
            "{found:?}"
        );
        assert_eq!(found.len(), 2, "{found:?}");
    }

    #[test]
    fn missing_required_keys_point_at_their_table() {
        assert_eq!(
            problems("[server]\nlisten = [\"127.0.0.1:1\"]\n\n[[site]]\nhosts = [\"a.test\"]\n"),
            [
                "4: site[0].name: missing: a name like \"main\" (used in logs, metrics and the admin API)",
                "4: site[0].upstream: missing: the site's own address, like \"http://127.0.0.1:8081\"",
                "4: site[0].access_key: missing: give access_key or access_key_file",
            ]
        );
        assert_problem("", "1: server: missing [server]");
        assert_problem(
            "[server]\nlisten = [\"127.0.0.1:1\"]\n",
            "1: site: no [[site]]",
        );
        assert_problem("[server]\nlisten = []\n", "2: server.listen: is empty");
    }

    #[test]
    fn a_bad_value_removed_is_not_also_called_missing() {
        let text = MINIMAL.replace("name = \"main\"", "name = 7");
        assert_eq!(
            problems(&text),
            ["6: site[0].name: invalid type: integer `7`, expected a string"]
        );
    }

    #[test]
    fn secrets_never_appear_in_messages() {
        let secret = "S3CR3T-VALUE-do-not-print";
        let texts = [
            MINIMAL.replace("key-12345678", &format!("{secret}\" \n x = \"")),
            MINIMAL.replace("\"key-12345678\"", "12345678987654321"),
            format!("{MINIMAL}[site.store]\nkind = \"wordpress\"\nurl = \"postgres://u:{secret}@h/db\"\n"),
            format!("{MINIMAL}[site.store]\nkind = \"embedded\"\nurl = \"mysql://u:{secret}@h/db\"\n"),
            format!("{MINIMAL}[site.crm]\nkind = \"activecampaign\"\nurl = \"http://c\"\napi_key = [\"{secret}\"]\n"),
        ];
        for text in texts {
            let err = parse_text(&text).expect_err("invalid");
            let shown = err.to_string();
            assert!(
                !shown.contains(secret) && !shown.contains("12345678987654321"),
                "{shown}"
            );
        }
    }

    #[test]
    fn access_key_rules() {
        assert_problem(
            &MINIMAL.replace("key-12345678", ""),
            "8: site[0].access_key: is empty",
        );
        assert_problem(
            &MINIMAL.replace("key-12345678", "short"),
            "8: site[0].access_key: is shorter than 8 characters",
        );
        let both = MINIMAL.replace("access_key = ", "access_key_file = \"k\"\naccess_key = ");
        assert_problem(
            &both,
            "8: site[0].access_key_file: give either access_key or access_key_file, not both",
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), "file-key-123\r\n").unwrap();
        let text = MINIMAL.replace("access_key = \"key-12345678\"", "access_key_file = \"k\"");
        let c = parse(&text, &dir.path().join("gw.toml")).unwrap();
        assert_eq!(c.sites[0].access_key.expose(), "file-key-123");
        std::fs::write(dir.path().join("k"), "\n").unwrap();
        let err = parse(&text, &dir.path().join("gw.toml")).unwrap_err();
        assert_eq!(err.problems[0].key, "site[0].access_key_file");
        assert!(err.problems[0].message.ends_with("is empty"), "{err}");
    }

    #[test]
    fn sites_cross_checks() {
        let two = |a: &str, b: &str| {
            format!(
                "[server]\nlisten = [\"127.0.0.1:1\"]\n[[site]]\nname = \"a\"\n{a}\nupstream = \"http://h\"\naccess_key = \"key-12345678\"\n[[site]]\nname = \"b\"\n{b}\nupstream = \"http://h\"\naccess_key = \"key-12345678\"\n"
            )
        };
        assert_problem(
            &two("", ""),
            "8: site[1].hosts: site[0] is already the catch-all",
        );
        assert_problem(
            &two("", "hosts = []"),
            "10: site[1].hosts: site[0] is already the catch-all",
        );
        assert_problem(
            &two("hosts = [\"x.test\"]", "hosts = [\"y.test\", \"X.TEST.\"]"),
            "10: site[1].hosts[1]: \"x.test\" is also a host of site[0]",
        );
        assert_problem(
            &two("hosts = [\"x.test\", \"x.test\"]", ""),
            "5: site[0].hosts[1]: \"x.test\" is listed twice",
        );
        let same_name = two("", "hosts = [\"b.test\"]").replace("name = \"b\"", "name = \"a\"");
        assert_problem(
            &same_name,
            "9: site[1].name: \"a\" is also the name of site[0]",
        );
        assert!(problems(&two("", "hosts = [\"b.test\"]")).is_empty());
    }

    #[test]
    fn hosts() {
        use super::validate::host;
        assert_eq!(host("Example.COM").as_deref(), Ok("example.com"));
        assert_eq!(host("example.com.").as_deref(), Ok("example.com"));
        assert_eq!(host("[::1]").as_deref(), Ok("::1"));
        assert_eq!(host("2001:DB8::2").as_deref(), Ok("2001:db8::2"));
        assert_eq!(host("127.0.0.1").as_deref(), Ok("127.0.0.1"));
        for bad in [
            "",
            "example.com:8080",
            "http://x",
            "x/y",
            "*.example.com",
            "a..b",
            "a b",
            "[::1]:80",
        ] {
            assert!(host(bad).is_err(), "{bad:?} accepted");
        }
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(text in "\\PC{0,300}") {
            let _ = parse_text(&text);
            let _ = parse_duration(&text);
            let _ = parse_size(&text);
            let _ = parse_rate(&text);
        }

        #[test]
        fn damaged_configs_never_panic(at in 0usize..200, len in 0usize..20, junk in "[\\[\\]=\"#a-z0-9.:/ \n-]{0,12}") {
            let mut text = MINIMAL.to_string();
            let start = at.min(text.len());
            let end = (start + len).min(text.len());
            text.replace_range(start..end, &junk);
            let _ = parse_text(&text);
        }
    }

    #[test]
    fn upstreams() {
        use super::validate::upstream;
        assert_eq!(
            upstream("http://127.0.0.1:8081").unwrap().to_string(),
            "http://127.0.0.1:8081"
        );
        assert_eq!(
            upstream("https://site.test/").unwrap().to_string(),
            "https://site.test"
        );
        for bad in [
            "",
            "127.0.0.1:8081",
            "ftp://x",
            "http://",
            "http://h/path",
            "http://h/?q=1",
            "http://h#f",
            "http://user:pw@h",
        ] {
            assert!(upstream(bad).is_err(), "{bad:?} accepted");
        }
        for leaky in [
            "http://user:SECRETPW@h",
            "http://u:SECRETPW@h/path",
            "ftp://u:SECRETPW@h",
            "http://u:SECRETPW@",
        ] {
            let err = upstream(leaky).unwrap_err();
            assert!(!err.contains("SECRETPW"), "{err}");
        }
    }

    #[test]
    fn sync_respond_must_answer_before_the_crm_gives_up() {
        let text = MINIMAL.replace(
            "access_key",
            "respond = \"sync\"\nsync_timeout = \"5s\"\naccess_key",
        );
        assert_problem(
            &text,
            "9: site[0].sync_timeout: must be under 5s with respond = \"sync\": CRMs give up",
        );
        assert!(problems(&text.replace("\"5s\"", "\"4s\"")).is_empty());
        // Async never waits, so the same timeout is fine there.
        assert!(problems(&text.replace("\"sync\"", "\"async\"")).is_empty());
    }

    #[test]
    fn crm_store_and_limits_rules() {
        let direct = MINIMAL.replace("access_key", "mode = \"direct\"\naccess_key");
        assert_problem(
            &direct,
            "8: site[0].mode: \"direct\" needs a [site.crm] table",
        );
        let crm = |body: &str| format!("{MINIMAL}[site.crm]\n{body}\n");
        assert_problem(
            &crm("kind = \"fluentcrm\"\nurl = \"http://c\"\napi_key = \"k\""),
            "9: site[0].crm.user: missing",
        );
        assert_problem(
            &crm("kind = \"activecampaign\"\nurl = \"http://c\"\napi_key = \"k\"\nuser = \"u\""),
            "13: site[0].crm.user: is only used by fluentcrm and agilecrm",
        );
        assert_problem(
            &crm("kind = \"hubspot\""),
            "10: site[0].crm.kind: unknown value `hubspot`",
        );
        assert_problem(
            &crm("kind = \"agilecrm\"\nuser = \"u\"\napi_key = \"k\"\nurl = \"c.test\""),
            "13: site[0].crm.url:",
        );
        let c = parse_text(&crm(
            "kind = \"activecampaign\"\nurl = \"https://a.api-us1.com\"\napi_key = \"k\"",
        ))
        .unwrap();
        let rate = c.sites[0].crm.as_ref().unwrap().rate;
        assert_eq!(
            (rate.count, rate.per, rate.burst),
            (5, Duration::from_secs(1), 5)
        );

        let store = |body: &str| format!("{MINIMAL}[site.store]\n{body}\n");
        assert_problem(
            &store("table_prefix = \"x_\""),
            "10: site[0].store.table_prefix: is only used with kind = \"wordpress\"",
        );
        assert_problem(
            &store("kind = \"wordpress\""),
            "9: site[0].store.url: missing: give url or url_file",
        );
        assert_problem(
            &store("kind = \"wordpress\"\nurl = \"mysql://u:p@h/d\"\ntable_prefix = \"wp; drop\""),
            "12: site[0].store.table_prefix:",
        );

        let limits = |body: &str| format!("{MINIMAL}[site.limits]\n{body}\n");
        assert_problem(
            &limits("per_ip_burst = 3"),
            "10: site[0].limits.per_ip_burst: needs per_ip",
        );
        assert_problem(
            &limits("per_ip = \"fast\""),
            "10: site[0].limits.per_ip: \"fast\" is not a rate; expected a rate like",
        );
        assert_problem(
            &limits("per_site = \"5/s\"\nper_site_burst = 0"),
            "11: site[0].limits.per_site_burst: must be between 1",
        );
    }

    #[test]
    fn admin_rules() {
        let admin = |body: &str| format!("{MINIMAL}[admin]\n{body}\n");
        assert!(problems(&admin("listen = \"127.0.0.1:9180\"")).is_empty());
        assert!(problems(&admin("listen = \"[::1]:9180\"")).is_empty());
        assert_problem(
            &admin("listen = \"0.0.0.0:9180\""),
            "10: admin.listen: 0.0.0.0:9180 is not a loopback address, so token_file is required",
        );
        assert_problem(
            &admin("listen = \"127.0.0.1:8080\""),
            "10: admin.listen: 127.0.0.1:8080 is also in server.listen",
        );
        assert_problem(
            &admin("token_file = \"/nonexistent/wpf-token\""),
            "10: admin.token_file: cannot read /nonexistent/wpf-token",
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "admin-token\n").unwrap();
        let text = admin("listen = \"0.0.0.0:9180\"\ntoken_file = \"token\"");
        let c = parse(&text, &dir.path().join("gw.toml")).unwrap();
        assert_eq!(c.admin.token_file, Some(dir.path().join("token")));
    }

    #[test]
    fn server_value_rules() {
        let server = |line: &str| MINIMAL.replace("[server]", &format!("[server]\n{line}"));
        assert_problem(
            &server("max_header_size = \"4KiB\""),
            "3: server.max_header_size: must be between 8KiB and 16MiB",
        );
        assert_problem(
            &server("trusted_proxies = [\"10.0.0.0/33\"]"),
            "3: server.trusted_proxies[0]: \"10.0.0.0/33\" is not a network",
        );
        assert_problem(
            &server("idle_timeout = \"0s\""),
            "3: server.idle_timeout: must be at least 1ms",
        );
        assert_problem(
            &server("max_connections = -1"),
            "3: server.max_connections: -1 is negative",
        );
        assert_problem(
            &MINIMAL.replace(
                "\"127.0.0.1:8080\"]",
                "\"127.0.0.1:8080\", \"127.0.0.1:8080\"]",
            ),
            "3: server.listen[1]: 127.0.0.1:8080 is listed twice",
        );
        assert_problem(
            &format!("{MINIMAL}[log]\nformat = \"xml\""),
            "10: log.format: unknown value `xml`, expected `text` or `json`",
        );
        assert_problem(
            &format!("{MINIMAL}[queue]\ncommit_window = \"2s\""),
            "10: queue.commit_window: must be at most 1s",
        );
        assert_problem(
            &format!("{MINIMAL}[queue]\nretry_schedule = []"),
            "10: queue.retry_schedule: is empty",
        );
    }

    #[test]
    fn syntax_errors_are_located() {
        assert_problem(
            "[server]\nlisten = [\"127.0.0.1:1\"]\nlisten = []\n",
            "3: (syntax): duplicate key `listen`",
        );
        assert_problem("[server]\n\nx = \n", "3: (syntax):");
    }

    #[test]
    fn render_masks_secrets_and_reads_as_toml() {
        let text = format!(
            "{}[site.crm]\nkind = \"fluentcrm\"\nurl = \"http://c\"\napi_key = \"API-SECRET-1\"\nuser = \"u\"\n[site.store]\nkind = \"wordpress\"\nurl = \"mysql://u:DB-SECRET-2@h/d\"\n",
            MINIMAL.replace("key-12345678", "ACCESS-SECRET-0")
        );
        let c = parse_text(&text).unwrap();
        let shown = render_resolved(&c);
        for secret in ["ACCESS-SECRET-0", "API-SECRET-1", "DB-SECRET-2"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        let table: toml::Table = toml::from_str(&shown).expect("rendered text is TOML");
        let site = &table["site"].as_array().unwrap()[0];
        assert_eq!(site["access_key"].as_str(), Some("***"));
        assert_eq!(site["crm"]["api_key"].as_str(), Some("***"));
        assert_eq!(site["store"]["url"].as_str(), Some("***"));
        assert_eq!(table["queue"]["retention"].as_str(), Some("7d"));
        assert_eq!(table["server"]["max_header_size"].as_str(), Some("64KiB"));
    }

    /// A directory holding `a.pem`/`a.key` (a.test) and `b.pem`/`b.key` (b.test).
    fn tls_files() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a", "b"] {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![format!("{name}.test")])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
        }
        dir
    }

    #[test]
    fn tls_is_read_with_paths_relative_to_the_file() {
        let dir = tls_files();
        let text = format!(
            "{MINIMAL}[tls]\nlisten = [\"127.0.0.1:8443\"]\n[[tls.cert]]\nchain = \"a.pem\"\nkey = \"a.key\"\n[[tls.cert]]\nchain = \"b.pem\"\nkey = \"b.key\"\ndefault = true\n"
        );
        let c = parse(&text, &dir.path().join("gw.toml")).unwrap();
        assert_eq!(c.tls.listen, vec!["127.0.0.1:8443".parse().unwrap()]);
        assert_eq!(c.tls.certs.len(), 2);
        assert_eq!(c.tls.certs[0].chain, dir.path().join("a.pem"));
        assert_eq!(c.tls.certs[1].key, dir.path().join("b.key"));
        assert!(!c.tls.certs[0].default && c.tls.certs[1].default);
        // Without `default`, the first is.
        let c = parse(
            &text.replace("default = true\n", ""),
            &dir.path().join("gw.toml"),
        )
        .unwrap();
        assert!(c.tls.certs[0].default && !c.tls.certs[1].default);
        // HTTPS alone needs no [server] listen.
        let https_only = text.replace("listen = [\"127.0.0.1:8080\"]\n", "");
        let c = parse(&https_only, &dir.path().join("gw.toml")).unwrap();
        assert!(c.server.listen.is_empty());
        // Rendered: paths, never what is in them.
        let shown = render_resolved(&c);
        let key_text = std::fs::read_to_string(dir.path().join("a.key")).unwrap();
        assert!(!shown.contains(key_text.lines().nth(1).unwrap()), "{shown}");
        let table: toml::Table = toml::from_str(&shown).expect("rendered text is TOML");
        let certs = table["tls"]["cert"].as_array().unwrap();
        assert_eq!(
            certs[0]["key"].as_str(),
            Some(dir.path().join("a.key").to_str().unwrap())
        );
        assert_eq!(certs[1]["default"].as_bool(), Some(true));
        assert!(render_resolved(&parse_text(MINIMAL).unwrap()).contains("# [tls]: not set"));
    }

    #[test]
    fn tls_rules() {
        let dir = tls_files();
        let tls_problems = |tls: &str| {
            let text = format!("{MINIMAL}{tls}");
            match parse(&text, &dir.path().join("gw.toml")) {
                Ok(_) => Vec::new(),
                Err(e) => e
                    .problems
                    .iter()
                    .map(|p| format!("{}: {}: {}", p.line, p.key, p.message))
                    .collect::<Vec<_>>(),
            }
        };
        let has = |found: Vec<String>, prefix: &str| {
            assert!(
                found.iter().any(|p| p.starts_with(prefix)),
                "no problem starting with {prefix:?} in {found:#?}"
            );
        };
        let cert = |chain: &str, key: &str| {
            format!("[[tls.cert]]\nchain = \"{chain}\"\nkey = \"{key}\"\n")
        };
        let listen = "[tls]\nlisten = [\"127.0.0.1:8443\"]\n";
        assert!(tls_problems(&format!("{listen}{}", cert("a.pem", "a.key"))).is_empty());
        has(
            tls_problems(listen),
            "9: tls.cert: no [[tls.cert]]: HTTPS needs at least one certificate",
        );
        has(
            tls_problems(&format!("[tls]\n{}", cert("a.pem", "a.key"))),
            "9: tls.listen: missing: the addresses to serve HTTPS on",
        );
        has(
            tls_problems(&format!("{listen}{}", cert("missing.pem", "a.key"))),
            &format!(
                "12: tls.cert[0].chain: cannot read {}",
                dir.path().join("missing.pem").display()
            ),
        );
        has(
            tls_problems(&format!("{listen}{}", cert("a.pem", "b.key"))),
            &format!(
                "13: tls.cert[0].key: {}: the private key does not belong to the first certificate",
                dir.path().join("b.key").display()
            ),
        );
        has(
            tls_problems(&format!("{listen}{}", cert("a.key", "a.key"))),
            "12: tls.cert[0].chain:",
        );
        has(
            tls_problems(&format!("{listen}{}", cert("a.pem", "a.pem"))),
            "13: tls.cert[0].key:",
        );
        has(
            tls_problems(&format!("{listen}[[tls.cert]]\nkey = \"a.key\"\n")),
            "11: tls.cert[0].chain: missing:",
        );
        let two_defaults = format!(
            "{listen}{}default = true\n{}default = true\n",
            cert("a.pem", "a.key"),
            cert("b.pem", "b.key")
        );
        has(
            tls_problems(&two_defaults),
            "18: tls.cert[1].default: tls.cert[0] is already the default",
        );
        has(
            tls_problems(&format!(
                "[tls]\nlisten = [\"127.0.0.1:8080\"]\n{}",
                cert("a.pem", "a.key")
            )),
            "10: tls.listen[0]: 127.0.0.1:8080 is also in server.listen",
        );
        has(
            tls_problems(&format!("[tls]\nlisten = []\n{}", cert("a.pem", "a.key"))),
            "10: tls.listen: is empty",
        );
        has(
            tls_problems(&format!(
                "{listen}{}chian = \"x\"\n",
                cert("a.pem", "a.key")
            )),
            "14: tls.cert[0].chian: unknown key `chian`",
        );
    }

    #[test]
    fn rendered_defaults_load_back_to_the_same_values() {
        let c = parse_text(MINIMAL).unwrap();
        // The masked key is too short to load: put a real one back, nothing else.
        let shown = render_resolved(&c).replace("\"***\"", "\"key-12345678\"");
        let again = parse_text(&shown).unwrap();
        assert_eq!(format!("{:?}", again), format!("{:?}", c));
    }
}

#[cfg(test)]
mod direct_mode_tests {
    use super::*;

    const SITE: &str = r#"
[server]
listen = ["127.0.0.1:8080"]
[[site]]
name = "main"
upstream = "http://127.0.0.1:8081"
access_key = "0123456789abcdef"
mode = "direct"
[site.crm]
kind = "activecampaign"
url = "http://127.0.0.1:7001"
api_key = "k"
"#;

    use super::tests::parse_text;

    fn problems(extra: &str) -> Vec<String> {
        super::tests::problems(&format!("{SITE}{extra}"))
    }

    #[test]
    fn defaults_map_first_and_last_name_in_the_crms_spelling() {
        let config = parse_text(SITE).unwrap();
        let site = &config.sites[0];
        assert_eq!(site.fields["first_name"], "firstName");
        assert_eq!(site.fields["last_name"], "lastName");
        assert!(site.users.roles.is_empty());
        assert_eq!(site.users.default_role, "subscriber");
        assert!(site.mail.is_none());
        let crm = site.crm.as_ref().unwrap();
        assert_eq!(crm.timeout, Duration::from_secs(10));
        assert_eq!(crm.return_password_field, None);
    }

    #[test]
    fn fields_users_and_mail_are_read() {
        let config = parse_text(&format!(
            "{SITE}return_password_field = \"field:12\"\n\
             [site.fields]\nphone = \"phone\"\nuser_login = \"field:3\"\n\
             [site.users]\nroles = [\"customer\", \"subscriber\"]\ndefault_role = \"customer\"\n\
             [site.mail]\nhost = \"127.0.0.1\"\ntls = \"none\"\nfrom = \"Site <no-reply@example.com>\"\n"
        ))
        .unwrap();
        let site = &config.sites[0];
        assert_eq!(
            site.crm.as_ref().unwrap().return_password_field.as_deref(),
            Some("field:12")
        );
        assert_eq!(
            site.fields.len(),
            2,
            "an explicit table replaces the defaults"
        );
        assert_eq!(site.fields["user_login"], "field:3");
        assert_eq!(site.users.roles, ["customer", "subscriber"]);
        let mail = site.mail.as_ref().unwrap();
        assert_eq!((mail.port, mail.tls), (25, MailTls::None));
        assert!(!mail.include_password);
        let shown = render_resolved(&config);
        assert!(
            shown.contains("return_password_field = \"field:12\""),
            "{shown}"
        );
        assert!(
            shown.contains("roles = [\"customer\", \"subscriber\"]"),
            "{shown}"
        );
    }

    #[test]
    fn administrator_is_never_grantable() {
        let found = problems("[site.users]\nroles = [\"subscriber\", \"administrator\"]\n");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].contains("site[0].users.roles[1]: \"administrator\" is never granted"),
            "{found:?}"
        );
        let found = problems("[site.users]\ndefault_role = \"administrator\"\n");
        assert!(found[0].contains("site[0].users.default_role"), "{found:?}");
        let found = problems("[site.users]\nroles = [\"Bad Role\"]\n");
        assert!(found[0].contains("expected a role slug"), "{found:?}");
    }

    #[test]
    fn mail_problems_name_their_keys_and_hide_the_password() {
        let found = problems(
            "[site.mail]\nhost = \"\"\nfrom = \"not an address\"\npassword = \"hunter22\"\n",
        );
        let text = found.join("\n");
        assert!(text.contains("site[0].mail.host: is empty"), "{text}");
        assert!(
            text.contains("site[0].mail.from: \"not an address\" is not a mail address"),
            "{text}"
        );
        assert!(
            text.contains("site[0].mail.user: user and password"),
            "{text}"
        );
        assert!(!text.contains("hunter22"), "{text}");
        let found = problems("[site.fields]\nphone = \" \"\n");
        assert!(
            found[0].contains("site[0].fields.phone: names no CRM field"),
            "{found:?}"
        );
    }
}
