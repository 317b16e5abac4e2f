//! CRM adapters: one file per CRM behind the [`Crm`] trait, and [`sim`], a simulator that
//! speaks the same three APIs (tests, the demo, the benchmark, admins rehearsing a setup).
//!
//! An adapter loads a contact (fields and tag names), finds one by email, and writes one
//! field. Every call waits on the account's [`Pacer`](crate::pace::Pacer) first; a `429`/`503`
//! with `Retry-After` pauses the whole account. Every error says whether a retry can help
//! ([`CrmError::Transient`] or [`CrmError::Permanent`]); the worker branches on that alone.
//!
//! [`connect`] builds the adapter a `[site.crm]` names: [`activecampaign`], [`fluentcrm`] or
//! [`agilecrm`], all on the shared HTTP plumbing of `http.rs` (one client per account,
//! pacing, `Retry-After`, status classification).

pub mod sim;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{CrmConfig, CrmKind};
use crate::pace::Pacer;
use crate::queue::BoxFuture;

pub mod activecampaign;
pub mod agilecrm;
pub mod fluentcrm;
mod http;

/// Told the status of every CRM answer (`"200"`, `"429"` ...) or `"error"` when none came:
/// the `wpf_gateway_crm_requests_total` counter.
pub type AnswerHook = Arc<dyn Fn(&str) + Send + Sync>;

/// How the gateway calls one CRM account.
#[derive(Clone)]
pub struct Link {
    /// The account's pacer, shared by every site on it.
    pub pacer: Arc<Pacer>,
    /// Bounds each call, from connecting to the last byte of the answer; connecting alone
    /// gets at most 10 s of it.
    pub timeout: Duration,
    pub on_answer: Option<AnswerHook>,
}

impl Link {
    /// `pacer` and `timeout`, nobody told of answers.
    pub fn new(pacer: Arc<Pacer>, timeout: Duration) -> Self {
        Link {
            pacer,
            timeout,
            on_answer: None,
        }
    }
}

/// The adapter for `config.kind`, calling the account at `config.url` over `link`.
pub fn connect(config: &CrmConfig, link: Link) -> Result<Arc<dyn Crm>, CrmSetupError> {
    Ok(match config.kind {
        CrmKind::ActiveCampaign => Arc::new(activecampaign::ActiveCampaign::new(config, link)?),
        CrmKind::FluentCrm => Arc::new(fluentcrm::FluentCrm::new(config, link)?),
        CrmKind::AgileCrm => Arc::new(agilecrm::AgileCrm::new(config, link)?),
    })
}

/// Why [`connect`] could not build an adapter. Never contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum CrmSetupError {
    #[error("crm.url: {0}")]
    Url(String),
    /// FluentCRM and Agile CRM authenticate as a user (config validation requires one).
    #[error("crm.user: missing ({0} needs it)")]
    MissingUser(&'static str),
    #[error("crm.api_key: not usable in an HTTP header (control characters?)")]
    BadApiKey,
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("HTTP client: {0}")]
    Client(String),
}

/// A contact as the CRM holds it now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contact {
    /// The CRM's id, as text (JSON strings or numbers up to 64-bit).
    pub id: String,
    pub email: String,
    /// Tag names, in the CRM's order, without repeats.
    pub tags: Vec<String>,
    /// Every field the CRM returned, by the name a `[site.fields]` mapping uses:
    /// - ActiveCampaign: `email`, `firstName`, `lastName`, `phone`, and custom fields as
    ///   `field:ID` (from `fieldValues`);
    /// - FluentCRM: the subscriber's top-level scalar keys (`email`, `first_name`,
    ///   `last_name`, `phone`, ...) and each `custom_values` key;
    /// - Agile CRM: each property's `name` (`first_name`, `last_name`, `email`, `phone`, and
    ///   custom ones).
    ///
    /// Values are text; empty values are kept (a CRM clearing a field is news), `null` reads
    /// as empty. Multi-value fields are joined with `,` as WP Fusion does (ActiveCampaign's
    /// `||a||b||`, a FluentCRM checkbox list), and ids keep every digit.
    pub fields: BTreeMap<String, String>,
}

/// Why a CRM call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrmError {
    /// Connect error, timeout, 5xx, 429: a retry can help. `retry_after` when the CRM said how
    /// long to wait.
    #[error("{reason}")]
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// A retry cannot help: `code` is a stable identifier for the activity log and sync
    /// answers: `contact_not_found`, `invalid_credentials`, `rejected` (another 4xx).
    #[error("{code}: {reason}")]
    Permanent { code: &'static str, reason: String },
}

impl CrmError {
    /// Transient, with no `Retry-After`.
    pub(crate) fn transient(reason: impl Into<String>) -> Self {
        CrmError::Transient {
            reason: reason.into(),
            retry_after: None,
        }
    }

    /// `Permanent { code: "contact_not_found" }`.
    pub(crate) fn not_found(reason: impl Into<String>) -> Self {
        CrmError::Permanent {
            code: "contact_not_found",
            reason: reason.into(),
        }
    }
}

/// One CRM account.
pub trait Crm: Send + Sync + 'static {
    /// The contact with its tags and fields. A contact that does not exist (or, on
    /// ActiveCampaign, whose email starts with `deleted+`) is `Permanent { code:
    /// "contact_not_found" }`.
    fn load_contact<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Contact, CrmError>>;

    /// The contact with this email (case-insensitive), if any.
    fn find_by_email<'a>(
        &'a self,
        email: &'a str,
    ) -> BoxFuture<'a, Result<Option<Contact>, CrmError>>;

    /// Write one field (named as in [`Contact::fields`]) of contact `id`.
    fn update_field<'a>(
        &'a self,
        id: &'a str,
        field: &'a str,
        value: &'a str,
    ) -> BoxFuture<'a, Result<(), CrmError>>;
}

/// The three calls as each adapter writes them (plain `async fn`s); the blanket [`Crm`] impl
/// boxes their futures for `dyn Crm`.
trait Adapter: Send + Sync + 'static {
    fn load(&self, id: &str) -> impl Future<Output = Result<Contact, CrmError>> + Send;
    fn find(&self, email: &str) -> impl Future<Output = Result<Option<Contact>, CrmError>> + Send;
    fn update(
        &self,
        id: &str,
        field: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), CrmError>> + Send;
}

impl<T: Adapter> Crm for T {
    fn load_contact<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Contact, CrmError>> {
        Box::pin(self.load(id))
    }

    fn find_by_email<'a>(
        &'a self,
        email: &'a str,
    ) -> BoxFuture<'a, Result<Option<Contact>, CrmError>> {
        Box::pin(self.find(email))
    }

    fn update_field<'a>(
        &'a self,
        id: &'a str,
        field: &'a str,
        value: &'a str,
    ) -> BoxFuture<'a, Result<(), CrmError>> {
        Box::pin(self.update(id, field, value))
    }
}
