//! User stores: where direct mode writes what the CRM says about a contact. [`UserStore`] is
//! the boundary; `embedded` keeps users in SQLite in `data_dir`, and (issue 6) `wordpress`
//! writes WP Fusion's own layout in the site's database.
//!
//! A store change is one call, [`UserStore::apply`], and one transaction: find the user by
//! contact id, else by email; update it, or create it when asked to. Finding and creating in
//! one transaction is what keeps `add` from ever making a second user for one contact.

use std::collections::BTreeMap;
use std::time::SystemTime;

use crate::queue::BoxFuture;

/// A stored user. The password hash never leaves the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: u64,
    pub username: String,
    pub email: String,
    pub role: String,
    /// The CRM contact this user is linked to (unique per site).
    pub contact_id: Option<String>,
    /// Tag names, in order, without repeats.
    pub tags: Vec<String>,
    /// Meta key -> value (the `[site.fields]` mapping writes here).
    pub meta: BTreeMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
}

/// What the CRM says now, to be applied to the user of `contact_id` (or of `email`).
#[derive(Debug, Clone, Default)]
pub struct UserChange {
    pub contact_id: String,
    /// The contact's email: finds a user not yet linked to the contact, and is written.
    pub email: String,
    /// The complete tag list (replaces the stored one).
    pub tags: Vec<String>,
    /// Meta to set; keys not named here are left as they are.
    pub meta: BTreeMap<String, String>,
    /// A new role, already checked against the site's allowed roles.
    pub role: Option<String>,
    /// When no user matches: create one (`add`), else [`StoreError::NoMatchingUser`].
    pub create: Option<NewUser>,
}

/// How to create the user when none matches.
#[derive(Debug, Clone)]
pub struct NewUser {
    /// Preferred username; the store appends `-2`, `-3`, ... until it is unique.
    pub username: String,
    /// Plain password; the store keeps only its bcrypt hash.
    pub password: String,
    /// Role when [`UserChange::role`] is `None`.
    pub role: String,
}

/// What [`UserStore::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The user after the change.
    pub user: User,
    /// True when the user was created by this change.
    pub created: bool,
    /// What changed, for the activity log and the browser view: `tags`, `email`, `role`,
    /// `contact_id`, `meta:KEY`, in that order. Empty when the user already matched.
    pub changed: Vec<String>,
}

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No user has the contact id or the email, and the change did not ask to create one.
    #[error("no user is linked to contact {contact_id} or has its email")]
    NoMatchingUser { contact_id: String },
    /// The change would break a rule of the store (an email used by another user linked to a
    /// different contact, ...): a retry cannot help.
    #[error("{0}")]
    Conflict(String),
    /// The database failed (I/O, busy, connection lost): a retry can help.
    #[error("user store unavailable: {0}")]
    Unavailable(String),
}

/// Users of every site, keyed by site name.
pub trait UserStore: Send + Sync + 'static {
    /// Apply `change` to the matching user of `site` in one transaction.
    fn apply<'a>(
        &'a self,
        site: &'a str,
        change: UserChange,
    ) -> BoxFuture<'a, Result<Applied, StoreError>>;

    /// The user of `site` linked to `contact_id`.
    fn by_contact<'a>(
        &'a self,
        site: &'a str,
        contact_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<User>, StoreError>>;

    /// The user of `site` with this email (case-insensitive).
    fn by_email<'a>(
        &'a self,
        site: &'a str,
        email: &'a str,
    ) -> BoxFuture<'a, Result<Option<User>, StoreError>>;
}
