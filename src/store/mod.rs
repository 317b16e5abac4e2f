//! User stores: where direct mode writes what the CRM says about a contact. [`UserStore`] is
//! the boundary; `embedded` keeps users in SQLite in `data_dir`, and (issue 6) `wordpress`
//! writes WP Fusion's own layout in the site's database.
//!
//! A store change is one call, [`UserStore::apply`], and one transaction: find the user by
//! contact id, else by email; update it, or create it when asked to. Finding and creating in
//! one transaction is what keeps `add` from ever making a second user for one contact.
//!
//! Also here, for every store: the WordPress-compatible password hash ([`hash_password`]),
//! and what `wpf-gateway user` prints ([`lookup_user`], [`render_user_json`]).

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use crate::config::{Config, StoreConfig};
use crate::queue::BoxFuture;

pub mod embedded;
pub mod php;
pub mod wordpress;

pub use embedded::{EmbeddedOptions, EmbeddedStore};
pub use wordpress::{WordPressOptions, WordPressStore};

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
#[derive(Clone)]
pub struct NewUser {
    /// Preferred username; the store appends `-2`, `-3`, ... until it is unique. Empty: the
    /// email is the username (as WP Fusion does when no username is mapped).
    pub username: String,
    /// Plain password; the store keeps only its bcrypt hash. `Debug` prints `***`.
    pub password: String,
    /// Role when [`UserChange::role`] is `None`.
    pub role: String,
}

// By hand, so that a `{:?}` of a change (a log line, a test failure) never shows a password.
impl fmt::Debug for NewUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewUser")
            .field("username", &self.username)
            .field("password", &"***")
            .field("role", &self.role)
            .finish()
    }
}

/// What [`UserStore::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The user after the change.
    pub user: User,
    /// True when the user was created by this change.
    pub created: bool,
    /// What changed, for the activity log and the browser view: `tags`, `email`, `role`,
    /// `contact_id`, `meta:KEY` (keys in order), in that order. Empty when the user already
    /// matched. For a created user: what the creation set (`tags` only when there are some).
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
    /// A stored meta value the store cannot read (not the PHP array WP Fusion writes, or a
    /// serialized value that does not parse): the value is left as it is and the change is
    /// not applied; a retry cannot help until someone looks at it.
    #[error("user {user_id} of site {site:?}: meta {key:?} cannot be read: {reason}")]
    UnreadableMeta {
        site: String,
        user_id: u64,
        key: String,
        reason: String,
    },
    /// The database failed (I/O, busy, connection lost): a retry can help.
    #[error("user store unavailable: {0}")]
    Unavailable(String),
}

/// SQL failures as the worker needs them: a broken rule of the schema (a unique email,
/// username or contact id, a missing value) is a [`StoreError::Conflict`] that no retry fixes;
/// anything else (busy, locked, I/O, a lost connection, a pool timeout) is
/// [`StoreError::Unavailable`]. sqlx's error kinds are the same for SQLite and MySQL, so both
/// stores map alike. Messages never hold bound values, so no password or hash.
impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        use sqlx::error::ErrorKind;
        match &e {
            sqlx::Error::Database(db)
                if matches!(
                    db.kind(),
                    ErrorKind::UniqueViolation
                        | ErrorKind::ForeignKeyViolation
                        | ErrorKind::NotNullViolation
                        | ErrorKind::CheckViolation
                ) =>
            {
                StoreError::Conflict(db.message().to_owned())
            }
            _ => StoreError::Unavailable(e.to_string()),
        }
    }
}

/// WordPress's cost for bcrypt (`password_hash` with `PASSWORD_BCRYPT`, PHP's default).
pub const BCRYPT_COST: u32 = 10;

/// The bcrypt hash of `password` at `cost`, with the `$2y$` prefix PHP writes, which
/// WordPress (≥ 6.8, `wp_check_password` → `password_verify`) accepts as it is. Runs on the
/// blocking pool: a cost-10 hash takes tens of milliseconds of CPU, too long for the async
/// threads. Passwords longer than 72 bytes are cut there, as PHP's bcrypt does, so both sides
/// agree. The error never contains the password.
pub async fn hash_password(password: String, cost: u32) -> Result<String, StoreError> {
    let parts = tokio::task::spawn_blocking(move || bcrypt::hash_with_result(password, cost))
        .await
        .map_err(|e| StoreError::Unavailable(format!("password hashing task failed: {e}")))?
        .map_err(|e| match e {
            // The OS had no randomness for the salt: may pass on a retry.
            bcrypt::BcryptError::Rand(_) => {
                StoreError::Unavailable(format!("cannot hash the password: {e}"))
            }
            // A cost out of range: a bug or a bad option, the same on every retry.
            _ => StoreError::Conflict(format!("cannot hash the password: {e}")),
        })?;
    Ok(parts.format_for_version(bcrypt::Version::TwoY))
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

/// Which user `wpf-gateway user` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserQuery {
    ContactId(String),
    /// Compared case-insensitively.
    Email(String),
}

/// Why `wpf-gateway user` found no user to print.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("no site named {site:?} in {file}")]
    UnknownSite { site: String, file: String },
    #[error("no user of site {site:?} is linked to contact {contact_id}")]
    NoUserForContact { site: String, contact_id: String },
    #[error("no user of site {site:?} has the email {email}")]
    NoUserForEmail { site: String, email: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The stored user of `site` that `query` names, for `wpf-gateway user`. Opens the embedded
/// store read-only, so it is safe while a gateway is running on the same `data_dir`; a
/// WordPress site's user is read from its database as the gateway reads it (same lookups,
/// same meta keys).
pub async fn lookup_user(
    config: &Config,
    site: &str,
    query: &UserQuery,
) -> Result<User, LookupError> {
    let site_config = config
        .sites
        .iter()
        .find(|s| s.name == site)
        .ok_or_else(|| LookupError::UnknownSite {
            site: site.to_owned(),
            file: config.source.display().to_string(),
        })?;
    let found = match &site_config.store {
        StoreConfig::Embedded => {
            let store = EmbeddedStore::open_read_only(&config.server.data_dir).await?;
            let found = find(&store, site, query).await;
            store.close().await;
            found
        }
        StoreConfig::WordPress {
            url,
            table_prefix,
            crm_slug,
            ..
        } => {
            let options = wordpress::options_for(site_config, table_prefix, crm_slug);
            let store = WordPressStore::connect(url, options)?;
            let found = find(&store, site, query).await;
            store.close().await;
            found
        }
    };
    found?.ok_or_else(|| match query {
        UserQuery::ContactId(id) => LookupError::NoUserForContact {
            site: site.to_owned(),
            contact_id: id.clone(),
        },
        UserQuery::Email(email) => LookupError::NoUserForEmail {
            site: site.to_owned(),
            email: email.clone(),
        },
    })
}

async fn find(
    store: &dyn UserStore,
    site: &str,
    query: &UserQuery,
) -> Result<Option<User>, StoreError> {
    match query {
        UserQuery::ContactId(id) => store.by_contact(site, id).await,
        UserQuery::Email(email) => store.by_email(site, email).await,
    }
}

/// `user` as the JSON `wpf-gateway user` prints (DESIGN §5): `id`, `username`, `email`,
/// `role`, `contact_id` (`null` when unlinked), `tags`, `meta`, then `created` and `updated`
/// as RFC 3339 UTC. [`User`] has no password hash, so none can be printed.
pub fn render_user_json(user: &User) -> String {
    #[derive(serde::Serialize)]
    struct Json<'a> {
        id: u64,
        username: &'a str,
        email: &'a str,
        role: &'a str,
        contact_id: Option<&'a str>,
        tags: &'a [String],
        meta: &'a BTreeMap<String, String>,
        created: String,
        updated: String,
    }
    let json = Json {
        id: user.id,
        username: &user.username,
        email: &user.email,
        role: &user.role,
        contact_id: user.contact_id.as_deref(),
        tags: &user.tags,
        meta: &user.meta,
        created: rfc3339(user.created),
        updated: rfc3339(user.updated),
    };
    // Strings, numbers and string maps only: serializing cannot fail.
    serde_json::to_string_pretty(&json).unwrap_or_default()
}

/// `2025-01-31T12:00:00.123Z`.
fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
