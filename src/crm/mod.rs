//! CRM adapters: one file per CRM behind the [`Crm`] trait, and [`sim`], a simulator that
//! speaks the same three APIs (tests, the demo, the benchmark, admins rehearsing a setup).
//!
//! An adapter loads a contact (fields and tag names), finds one by email, and writes one
//! field. Every call waits on the account's [`Pacer`](crate::pace::Pacer) first; a `429`/`503`
//! with `Retry-After` pauses the whole account. Every error says whether a retry can help
//! ([`CrmError::Transient`] or [`CrmError::Permanent`]); the worker branches on that alone.

pub mod sim;

use std::collections::BTreeMap;
use std::time::Duration;

use crate::queue::BoxFuture;

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
    /// Values are text; empty values are kept (a CRM clearing a field is news).
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
