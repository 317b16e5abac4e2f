//! The durable job queue: what the front door hands over (a [`Delivery`]), how the queue
//! answers ([`Admission`]), and the [`Job`]s workers lease. [`SqliteQueue`] is the queue
//! (SQLite in `data_dir`, group commit); [`index`] is its in-memory picture of who runs and
//! who waits.

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

mod checkpoint;
pub mod index;
mod script;
mod sqlite;

pub use sqlite::{ActivityFilter, ActivityRow, JobRow, Lease, SiteDepth, SqliteQueue};
// SQLite helpers the embedded user store shares (one way to open, migrate and keep times).
pub(crate) use sqlite::{from_ms, now_ms, prepare_schema, sqlite_options};

/// A boxed future, so that [`JobQueue`] can be used as `dyn JobQueue`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The webhook actions that create jobs, weakest first: merging keeps the strongest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    UpdateTags,
    Update,
    Add,
}

impl Action {
    /// The `wpf_action` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::UpdateTags => "update_tags",
            Action::Update => "update",
            Action::Add => "add",
        }
    }

    pub fn from_wpf_action(value: &str) -> Option<Self> {
        match value {
            "update_tags" => Some(Action::UpdateTags),
            "update" => Some(Action::Update),
            "add" => Some(Action::Add),
            _ => None,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A CRM contact id, kept as a string (CRMs send strings or numbers up to 64-bit).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContactId(String);

impl ContactId {
    /// Longest id accepted.
    pub const MAX_LEN: usize = 128;

    /// A trimmed, non-empty id of printable characters, at most [`Self::MAX_LEN`] bytes.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        let ok = !value.is_empty()
            && value.len() <= Self::MAX_LEN
            && !value.chars().any(char::is_control);
        ok.then(|| ContactId(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Marks a contact known only by its email (DESIGN §2: an Agile CRM webhook may carry
    /// `email` and no id): the key is `email:` and the lower-cased address, so repeats for one
    /// address still coalesce, and direct mode looks the contact up in the CRM.
    pub const EMAIL_PREFIX: &'static str = "email:";

    /// The key of a contact known only by `email` (which must look like an address).
    pub fn for_email(email: &str) -> Option<Self> {
        let email = email.trim();
        let (local, domain) = email.split_once('@')?;
        if local.is_empty() || domain.is_empty() || email.contains(char::is_whitespace) {
            return None;
        }
        Self::parse(&format!("{}{}", Self::EMAIL_PREFIX, email.to_lowercase()))
    }

    /// The email of a key made by [`ContactId::for_email`].
    pub fn email(&self) -> Option<&str> {
        self.0.strip_prefix(Self::EMAIL_PREFIX)
    }
}

impl fmt::Display for ContactId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A job's id in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub i64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The webhook request as received, kept so relay mode can send it on and direct mode can read
/// the CRM payload. The `access_key` parameter is removed from the query before it is stored:
/// relay adds the site's current key back when it sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRequest {
    pub method: String,
    /// Path and query, without `access_key`.
    pub path_and_query: String,
    pub content_type: Option<String>,
    pub body: Bytes,
    pub client_ip: IpAddr,
    /// The `Host` the CRM addressed (multisite and host-based setups route on it).
    pub host: Option<String>,
}

/// One authenticated, parsed webhook, handed from the front door to the queue.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub site: Arc<str>,
    pub contact: ContactId,
    pub action: Action,
    /// `role` parameter (query, else payload).
    pub role: Option<String>,
    /// `send_notification` parameter (query, else payload).
    pub send_notification: Option<bool>,
    /// Tags the CRM sent in its payload, if any (lets `update_tags` skip a CRM call).
    pub payload_tags: Option<Vec<String>>,
    pub request: StoredRequest,
    pub received_at: SystemTime,
}

/// How the queue took a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A new job was committed.
    Queued { job: JobId },
    /// Merged into the contact's pending job.
    Coalesced { job: JobId },
    /// The same delivery is already pending (CRM retry or double fire).
    Duplicate { job: JobId },
}

impl Admission {
    pub fn job(self) -> JobId {
        match self {
            Admission::Queued { job }
            | Admission::Coalesced { job }
            | Admission::Duplicate { job } => job,
        }
    }
}

/// Why the queue could not do what was asked. For an admission: nothing was committed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    #[error("queue full")]
    Full { retry_after: Duration },
    #[error("queue unavailable: {0}")]
    Unavailable(String),
}

/// A job as a worker runs it.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: JobId,
    /// What to run: the merged action, the newest `role`, `send_notification`, payload tags
    /// and request; `received_at` is when the job's *first* delivery arrived.
    pub delivery: Delivery,
    /// Attempts so far, this one included.
    pub attempts: u32,
    /// Deliveries merged into this job (1 when none was merged).
    pub deliveries: u32,
}

/// How a job ended, for a webhook answered in `respond = "sync"` mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    /// `report`: what a direct-mode job loaded and changed (the sync answer shows it).
    Done {
        detail: String,
        report: Option<Arc<serde_json::Value>>,
    },
    Failed {
        code: String,
        reason: String,
    },
    Dead {
        reason: String,
    },
}

/// One line of the activity log: what happened to a webhook or a job. Never holds secrets.
#[derive(Debug, Clone)]
pub struct Activity {
    pub at: SystemTime,
    pub site: Arc<str>,
    pub contact: Option<String>,
    pub action: Option<String>,
    /// `queued`, `coalesced`, `duplicate`, `locked`, `rate_limited`, `done`, `retry`,
    /// `failed`, `dead`.
    pub outcome: &'static str,
    pub job: Option<JobId>,
    pub duration: Option<Duration>,
    pub detail: String,
}
