//! The embedded user store: the users of every site in `data_dir/users.sqlite` (SQLite, WAL).
//! A file of its own, so that a user write never holds up the queue's single writer.
//!
//! ```text
//! apply ─ BEGIN IMMEDIATE ─ by contact id ─ else by email ─┬─ found ─ update, relink ─ COMMIT
//!                                                          ├─ none, no `create` ─ NoMatchingUser
//!                                                          └─ none, `create` ─ ROLLBACK
//!       ─ bcrypt (blocking pool) ─ BEGIN IMMEDIATE ─ find again ─ found: update / none: insert ─ COMMIT
//! ```
//!
//! `BEGIN IMMEDIATE` takes SQLite's write lock before the first read, so two `apply` calls for
//! one contact (two tasks, two pools, two processes) run one after the other and the second
//! finds what the first created: `add` never makes a second user. A password is hashed (tens
//! of milliseconds) between two transactions, never while the lock is held; the second one
//! finds again, as another call may have created the user in between.
//!
//! Schema, version 1 (`PRAGMA user_version`):
//! - `users`: one row a user of a site. `username` unique per site ignoring ASCII case (as
//!   WordPress's MySQL collation compares `user_login`); `email_key` (the email trimmed and
//!   lower-cased) unique per site, so emails are compared case-insensitively beyond ASCII while
//!   `email` keeps the CRM's spelling; `contact_id` unique per site when set; `password` the
//!   bcrypt hash; times in milliseconds since the epoch (UTC).
//! - `user_tags`: the tag list, by position; a tag at most once a user.
//! - `user_meta`: key → value.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use sqlx::sqlite::{SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{Row, SqliteConnection};

use super::{
    hash_password, Applied, NewUser, StoreError, User, UserChange, UserStore, BCRYPT_COST,
};
use crate::queue::{from_ms, now_ms, prepare_schema, sqlite_options, BoxFuture};

/// The store's file in `data_dir`.
pub const FILE_NAME: &str = "users.sqlite";
/// Schema version in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 1;
/// Connections at most: one writes at a time (the write lock), the others read meanwhile.
const POOL_SIZE: u32 = 4;
/// `name`, `name-2` … `name-1000`: enough for any real clash, and a bound on the search.
pub(super) const MAX_USERNAME_TRIES: u32 = 1000;
/// The costs bcrypt accepts.
pub(super) const BCRYPT_COSTS: std::ops::RangeInclusive<u32> = 4..=31;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS users (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    site       TEXT    NOT NULL,
    username   TEXT    NOT NULL COLLATE NOCASE,
    email      TEXT    NOT NULL,
    email_key  TEXT    NOT NULL,
    password   TEXT    NOT NULL,
    role       TEXT    NOT NULL,
    contact_id TEXT,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    UNIQUE (site, username),
    UNIQUE (site, email_key),
    UNIQUE (site, contact_id)
);
CREATE TABLE IF NOT EXISTS user_tags (
    user_id  INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    tag      TEXT    NOT NULL,
    PRIMARY KEY (user_id, position),
    UNIQUE (user_id, tag)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS user_meta (
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    key     TEXT    NOT NULL,
    value   TEXT    NOT NULL,
    PRIMARY KEY (user_id, key)
) WITHOUT ROWID;
"#;

/// The columns of `users` that make a [`User`] (never `password`).
const USER_COLUMNS: &str = "id, username, email, role, contact_id, created_ms, updated_ms";

/// How [`EmbeddedStore::open_with`] sets the store up.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// bcrypt cost of new passwords (4 to 31). [`BCRYPT_COST`] (10, WordPress's) unless a
    /// test wants hashing fast; the code path is the same.
    pub bcrypt_cost: u32,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            bcrypt_cost: BCRYPT_COST,
        }
    }
}

/// Users of every site in `data_dir/users.sqlite`. Cheap to share behind an `Arc`; any number
/// of stores (and processes) may open the same file: SQLite's lock orders their writes.
pub struct EmbeddedStore {
    pool: SqlitePool,
    path: PathBuf,
    bcrypt_cost: u32,
    read_only: bool,
}

/// How a user is looked up.
#[derive(Clone, Copy)]
enum Key<'a> {
    Contact(&'a str),
    /// Already an [`email_key`].
    Email(&'a str),
}

impl EmbeddedStore {
    /// Open (or create) the store in `data_dir`, creating or migrating its schema.
    pub async fn open(data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(data_dir, EmbeddedOptions::default()).await
    }

    /// [`open`](Self::open) with `options`.
    pub async fn open_with(data_dir: &Path, options: EmbeddedOptions) -> Result<Self, StoreError> {
        if !BCRYPT_COSTS.contains(&options.bcrypt_cost) {
            return Err(StoreError::Conflict(format!(
                "bcrypt cost {} is outside {}..={}",
                options.bcrypt_cost,
                BCRYPT_COSTS.start(),
                BCRYPT_COSTS.end()
            )));
        }
        std::fs::create_dir_all(data_dir).map_err(|e| {
            StoreError::Unavailable(format!("cannot create {}: {e}", data_dir.display()))
        })?;
        let path = data_dir.join(FILE_NAME);
        let named = |e: sqlx::Error| in_file(&path, e.into());
        // FULL: a user write is committed to disk before the job that made it is marked
        // done, so a machine crash cannot keep the job's `done` and lose its user. User
        // writes come at the CRM's pace, a few a second: the fsync costs nothing that matters.
        let connect = sqlite_options(&path, SqliteSynchronous::Full).map_err(named)?;
        let pool = SqlitePoolOptions::new()
            .max_connections(POOL_SIZE)
            .connect_with(connect)
            .await
            .map_err(named)?;
        let mut conn = pool.acquire().await.map_err(named)?;
        prepare_schema(&mut conn, "user store", SCHEMA, SCHEMA_VERSION)
            .await
            .map_err(named)?;
        drop(conn);
        Ok(EmbeddedStore {
            pool,
            path,
            bcrypt_cost: options.bcrypt_cost,
            read_only: false,
        })
    }

    /// Open the store in `data_dir` to read only (`wpf-gateway user`), safe while a gateway
    /// writes to it: WAL readers never block the writer. Creates and migrates nothing; a
    /// missing file or another schema version is an error. [`UserStore::apply`] is refused.
    pub async fn open_read_only(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join(FILE_NAME);
        if !path.exists() {
            return Err(StoreError::Unavailable(format!(
                "{} does not exist: no user has been stored in {} yet",
                path.display(),
                data_dir.display()
            )));
        }
        let named = |e: sqlx::Error| in_file(&path, e.into());
        let connect = sqlite_options(&path, SqliteSynchronous::Full)
            .map_err(named)?
            .create_if_missing(false)
            .read_only(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(connect)
            .await
            .map_err(named)?;
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&pool)
            .await
            .map_err(named)?;
        if version != SCHEMA_VERSION {
            pool.close().await;
            return Err(StoreError::Unavailable(format!(
                "{}: user store schema version {version}, this wpf-gateway reads version \
                 {SCHEMA_VERSION} (a gateway of this version migrates it when it starts)",
                path.display()
            )));
        }
        Ok(EmbeddedStore {
            pool,
            path,
            bcrypt_cost: BCRYPT_COST,
            read_only: true,
        })
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Close the connections (waits for calls in flight). Later calls get `Unavailable`.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn apply_change(&self, site: &str, change: UserChange) -> Result<Applied, StoreError> {
        if self.read_only {
            return Err(StoreError::Conflict(format!(
                "{} was opened read-only",
                self.path.display()
            )));
        }
        let change = Normalized::from(change);
        if let Some(applied) = self.try_apply(site, &change, None).await? {
            return Ok(applied);
        }
        // A user must be created: hash outside any transaction, then find and decide again.
        let password = change
            .create
            .as_ref()
            .map(|new| new.password.clone())
            .unwrap_or_default();
        let hash = hash_password(password, self.bcrypt_cost).await?;
        self.try_apply(site, &change, Some(&hash))
            .await?
            // With a hash at hand `try_apply` always decides; this is never reached.
            .ok_or_else(|| StoreError::Unavailable("user creation did not decide".into()))
    }

    /// One transaction of [`apply_change`](Self::apply_change): the applied change, or `None`
    /// when a user must be created and `password_hash` is not given yet (nothing written).
    async fn try_apply(
        &self,
        site: &str,
        change: &Normalized,
        password_hash: Option<&str>,
    ) -> Result<Option<Applied>, StoreError> {
        let named = |e: StoreError| in_file(&self.path, e);
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| named(e.into()))?;
        let mut found = find(&mut tx, site, Key::Contact(&change.contact_id))
            .await
            .map_err(named)?;
        if found.is_none() && !change.email_key.is_empty() {
            found = find(&mut tx, site, Key::Email(&change.email_key))
                .await
                .map_err(named)?;
        }
        let applied = match (found, &change.create, password_hash) {
            (Some(user), _, _) => update(&mut tx, site, user, change).await,
            (None, None, _) => Err(StoreError::NoMatchingUser {
                contact_id: change.contact_id.clone(),
            }),
            (None, Some(new), Some(hash)) => create(&mut tx, site, change, new, hash).await,
            (None, Some(_), None) => {
                tx.rollback().await.map_err(|e| named(e.into()))?;
                return Ok(None);
            }
        }
        .map_err(named)?;
        // An error above drops `tx`, which rolls back: nothing of the change is written.
        tx.commit().await.map_err(|e| named(e.into()))?;
        Ok(Some(applied))
    }

    async fn find_user(&self, site: &str, key: Key<'_>) -> Result<Option<User>, StoreError> {
        let named = |e: StoreError| in_file(&self.path, e);
        let mut conn = self.pool.acquire().await.map_err(|e| named(e.into()))?;
        find(&mut conn, site, key).await.map_err(named)
    }
}

impl UserStore for EmbeddedStore {
    fn apply<'a>(
        &'a self,
        site: &'a str,
        change: UserChange,
    ) -> BoxFuture<'a, Result<Applied, StoreError>> {
        Box::pin(self.apply_change(site, change))
    }

    fn by_contact<'a>(
        &'a self,
        site: &'a str,
        contact_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<User>, StoreError>> {
        Box::pin(self.find_user(site, Key::Contact(contact_id)))
    }

    fn by_email<'a>(
        &'a self,
        site: &'a str,
        email: &'a str,
    ) -> BoxFuture<'a, Result<Option<User>, StoreError>> {
        Box::pin(async move { self.find_user(site, Key::Email(&email_key(email))).await })
    }
}

/// A [`UserChange`] as the stores compare it: email trimmed (and its key), tags without
/// repeats (the first of each kept, in order).
pub(super) struct Normalized {
    pub contact_id: String,
    pub email: String,
    pub email_key: String,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub role: Option<String>,
    pub create: Option<NewUser>,
}

impl From<UserChange> for Normalized {
    fn from(c: UserChange) -> Self {
        let mut seen = HashSet::new();
        let tags = c
            .tags
            .into_iter()
            .filter(|t| seen.insert(t.clone()))
            .collect();
        Normalized {
            email_key: email_key(&c.email),
            email: c.email.trim().to_owned(),
            contact_id: c.contact_id,
            tags,
            meta: c.meta,
            role: c.role,
            create: c.create,
        }
    }
}

/// What emails are compared by: trimmed, lower-cased (Unicode, not only ASCII).
pub(super) fn email_key(email: &str) -> String {
    email.trim().to_lowercase()
}

/// Prefix the file's name to a database failure, so the operator knows which file failed.
fn in_file(path: &Path, e: StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(m) => StoreError::Unavailable(format!("{}: {m}", path.display())),
        other => other,
    }
}

/// The user of `site` that `key` names, with its tags and meta.
async fn find(
    conn: &mut SqliteConnection,
    site: &str,
    key: Key<'_>,
) -> Result<Option<User>, StoreError> {
    let (column, value) = match key {
        Key::Contact(id) => ("contact_id", id),
        Key::Email(key) => ("email_key", key),
    };
    let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE site = ? AND {column} = ?");
    let row = sqlx::query(&sql)
        .bind(site)
        .bind(value)
        .fetch_optional(&mut *conn)
        .await?;
    match row {
        Some(row) => Ok(Some(load(conn, &row).await?)),
        None => Ok(None),
    }
}

/// A [`User`] from its `users` row (selected as [`USER_COLUMNS`]), its tags and its meta.
async fn load(conn: &mut SqliteConnection, row: &SqliteRow) -> Result<User, StoreError> {
    let id: i64 = row.get(0);
    let tags = sqlx::query_scalar("SELECT tag FROM user_tags WHERE user_id = ? ORDER BY position")
        .bind(id)
        .fetch_all(&mut *conn)
        .await?;
    let meta =
        sqlx::query_as::<_, (String, String)>("SELECT key, value FROM user_meta WHERE user_id = ?")
            .bind(id)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect();
    Ok(User {
        // A rowid from AUTOINCREMENT is always positive.
        id: u64::try_from(id).unwrap_or_default(),
        username: row.get(1),
        email: row.get(2),
        role: row.get(3),
        contact_id: row.get(4),
        tags,
        meta,
        created: from_ms(row.get(5)),
        updated: from_ms(row.get(6)),
    })
}

/// Bring `user` to what `change` says; [`Applied::changed`] in its documented order.
async fn update(
    conn: &mut SqliteConnection,
    site: &str,
    mut user: User,
    change: &Normalized,
) -> Result<Applied, StoreError> {
    let id = i64::try_from(user.id).unwrap_or(i64::MAX);
    let new_email = !change.email.is_empty() && user.email != change.email;
    // Checked before anything is written; an error rolls the transaction back in any case.
    if new_email {
        let other: Option<(i64, Option<String>)> = sqlx::query_as(
            "SELECT id, contact_id FROM users WHERE site = ? AND email_key = ? AND id != ?",
        )
        .bind(site)
        .bind(&change.email_key)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some((other, other_contact)) = other {
            return Err(StoreError::Conflict(format!(
                "the email of contact {} belongs to user {other} of site {site:?} (linked to {})",
                change.contact_id,
                other_contact.map_or("no contact".to_owned(), |c| format!("contact {c}"))
            )));
        }
    }
    let mut changed = Vec::new();
    if user.tags != change.tags {
        replace_tags(conn, id, &change.tags).await?;
        user.tags = change.tags.clone();
        changed.push("tags".to_owned());
    }
    if new_email {
        user.email = change.email.clone();
        changed.push("email".to_owned());
    }
    if let Some(role) = change.role.as_ref().filter(|r| **r != user.role) {
        user.role = role.clone();
        changed.push("role".to_owned());
    }
    // Found by email, linked to another contact or to none: this contact is now the user's,
    // as WP Fusion links a user it finds by email.
    if user.contact_id.as_deref() != Some(change.contact_id.as_str()) {
        user.contact_id = Some(change.contact_id.clone());
        changed.push("contact_id".to_owned());
    }
    let meta: BTreeMap<String, String> = change
        .meta
        .iter()
        .filter(|(k, v)| user.meta.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    set_meta(conn, id, &meta).await?;
    changed.extend(meta.keys().map(|k| format!("meta:{k}")));
    user.meta.extend(meta);
    if changed.is_empty() {
        return Ok(Applied {
            user,
            created: false,
            changed,
        });
    }
    let now = now_ms();
    sqlx::query(
        "UPDATE users SET email = ?, email_key = ?, role = ?, contact_id = ?, updated_ms = ? \
         WHERE id = ?",
    )
    .bind(&user.email)
    .bind(email_key(&user.email))
    .bind(&user.role)
    .bind(&user.contact_id)
    .bind(now)
    .bind(id)
    .execute(&mut *conn)
    .await?;
    user.updated = from_ms(now);
    Ok(Applied {
        user,
        created: false,
        changed,
    })
}

/// Insert the user `change` describes; no user of `site` has its contact id or email.
async fn create(
    conn: &mut SqliteConnection,
    site: &str,
    change: &Normalized,
    new: &NewUser,
    password_hash: &str,
) -> Result<Applied, StoreError> {
    if change.email.is_empty() {
        return Err(StoreError::Conflict(format!(
            "contact {} has no email: a user cannot be created without one",
            change.contact_id
        )));
    }
    let preferred = new.username.trim();
    let base = if preferred.is_empty() {
        change.email.as_str()
    } else {
        preferred
    };
    let username = free_username(conn, site, base).await?;
    let role = change.role.clone().unwrap_or_else(|| new.role.clone());
    let now = now_ms();
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO users (site, username, email, email_key, password, role, contact_id, \
         created_ms, updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
    )
    .bind(site)
    .bind(&username)
    .bind(&change.email)
    .bind(&change.email_key)
    .bind(password_hash)
    .bind(&role)
    .bind(&change.contact_id)
    .bind(now)
    .bind(now)
    .fetch_one(&mut *conn)
    .await?;
    replace_tags(conn, id, &change.tags).await?;
    set_meta(conn, id, &change.meta).await?;
    let mut changed = Vec::new();
    if !change.tags.is_empty() {
        changed.push("tags".to_owned());
    }
    changed.extend(["email", "role", "contact_id"].map(String::from));
    changed.extend(change.meta.keys().map(|k| format!("meta:{k}")));
    Ok(Applied {
        user: User {
            id: u64::try_from(id).unwrap_or_default(),
            username,
            email: change.email.clone(),
            role,
            contact_id: Some(change.contact_id.clone()),
            tags: change.tags.clone(),
            meta: change.meta.clone(),
            created: from_ms(now),
            updated: from_ms(now),
        },
        created: true,
        changed,
    })
}

/// `base`, else `base-2`, `base-3` … : the first that no user of `site` has (ignoring ASCII
/// case, as the column's collation does).
async fn free_username(
    conn: &mut SqliteConnection,
    site: &str,
    base: &str,
) -> Result<String, StoreError> {
    for n in 1..=MAX_USERNAME_TRIES {
        let candidate = if n == 1 {
            base.to_owned()
        } else {
            format!("{base}-{n}")
        };
        let taken: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM users WHERE site = ? AND username = ?)",
        )
        .bind(site)
        .bind(&candidate)
        .fetch_one(&mut *conn)
        .await?;
        if !taken {
            return Ok(candidate);
        }
    }
    Err(StoreError::Conflict(format!(
        "no free username from {base:?} to {base:?}-{MAX_USERNAME_TRIES} in site {site:?}"
    )))
}

/// Make `tags` (without repeats) the user's tag list, in their order.
async fn replace_tags(
    conn: &mut SqliteConnection,
    user_id: i64,
    tags: &[String],
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM user_tags WHERE user_id = ?")
        .bind(user_id)
        .execute(&mut *conn)
        .await?;
    if tags.is_empty() {
        return Ok(());
    }
    // One statement for the whole list: `json_each` numbers the array's elements from 0.
    sqlx::query(
        "INSERT INTO user_tags (user_id, position, tag) SELECT ?, key, value FROM json_each(?)",
    )
    .bind(user_id)
    .bind(serde_json::to_string(tags).map_err(|e| StoreError::Conflict(e.to_string()))?)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Set the user's `meta` keys (others stay as they are).
async fn set_meta(
    conn: &mut SqliteConnection,
    user_id: i64,
    meta: &BTreeMap<String, String>,
) -> Result<(), StoreError> {
    if meta.is_empty() {
        return Ok(());
    }
    // `WHERE true` lets SQLite parse the upsert after a SELECT (its documented workaround).
    sqlx::query(
        "INSERT INTO user_meta (user_id, key, value) SELECT ?, key, value FROM json_each(?) \
         WHERE true ON CONFLICT (user_id, key) DO UPDATE SET value = excluded.value",
    )
    .bind(user_id)
    .bind(serde_json::to_string(meta).map_err(|e| StoreError::Conflict(e.to_string()))?)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The lowest cost bcrypt allows: the same code path, fast enough for tests.
    const FAST: EmbeddedOptions = EmbeddedOptions { bcrypt_cost: 4 };
    const SITE: &str = "main";

    async fn store(dir: &Path) -> EmbeddedStore {
        EmbeddedStore::open_with(dir, FAST).await.unwrap()
    }

    fn change(contact: &str, email: &str, tags: &[&str]) -> UserChange {
        UserChange {
            contact_id: contact.into(),
            email: email.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        }
    }

    fn add(contact: &str, email: &str, username: &str) -> UserChange {
        UserChange {
            create: Some(NewUser {
                username: username.into(),
                password: format!("pw-{contact}"),
                role: "subscriber".into(),
            }),
            ..change(contact, email, &["a"])
        }
    }

    fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    async fn count_users(s: &EmbeddedStore) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(&s.pool)
            .await
            .unwrap()
    }

    async fn password_of(s: &EmbeddedStore, id: u64) -> String {
        sqlx::query_scalar("SELECT password FROM users WHERE id = ?")
            .bind(id as i64)
            .fetch_one(&s.pool)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn created_user_is_found_by_contact_and_by_email_in_any_case() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path()).await;
        let mut c = add("7", " Ann@Example.COM ", "ann");
        c.meta = meta(&[("first_name", "Ann")]);
        c.role = Some("customer".into());
        let a = s.apply(SITE, c).await.unwrap();
        assert!(a.created);
        assert_eq!(
            a.changed,
            ["tags", "email", "role", "contact_id", "meta:first_name"]
        );
        let u = &a.user;
        assert_eq!(
            (&*u.username, &*u.email, &*u.role, u.contact_id.as_deref()),
            ("ann", "Ann@Example.COM", "customer", Some("7"))
        );
        assert_eq!(u.created, u.updated);
        assert_eq!(s.by_contact(SITE, "7").await.unwrap().as_ref(), Some(u));
        assert_eq!(
            s.by_email(SITE, "ann@example.com").await.unwrap().as_ref(),
            Some(u)
        );
        assert_eq!(
            s.by_email(SITE, "ANN@EXAMPLE.COM").await.unwrap().as_ref(),
            Some(u)
        );
        assert_eq!(s.by_contact("other", "7").await.unwrap(), None, "per site");
        assert_eq!(s.by_contact(SITE, "8").await.unwrap(), None);
    }

    #[tokio::test]
    async fn password_is_a_2y_bcrypt_hash_that_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path()).await;
        let a = s.apply(SITE, add("7", "a@x.org", "a")).await.unwrap();
        let hash = password_of(&s, a.user.id).await;
        assert!(hash.starts_with("$2y$04$"), "{hash}");
        assert!(bcrypt::verify("pw-7", &hash).unwrap());
        assert!(!bcrypt::verify("pw-8", &hash).unwrap());
        let shown = format!("{:?} {a:?}", add("7", "a@x.org", "a"));
        assert!(
            !shown.contains("pw-7") && !shown.contains("$2y$"),
            "{shown}"
        );
        assert_eq!(EmbeddedOptions::default().bcrypt_cost, 10);
        assert!(
            EmbeddedStore::open_with(dir.path(), EmbeddedOptions { bcrypt_cost: 3 })
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn add_twice_makes_one_user_and_update_without_user_is_no_match() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path()).await;
        let first = s.apply(SITE, add("7", "a@x.org", "a")).await.unwrap();
        let second = s.apply(SITE, add("7", "a@x.org", "a")).await.unwrap();
        assert!(!second.created);
        assert!(second.changed.is_empty(), "{:?}", second.changed);
        assert_eq!(second.user, first.user, "nothing changed, not even updated");
        assert_eq!(count_users(&s).await, 1);
        let err = s
            .apply(SITE, change("9", "b@x.org", &[]))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::NoMatchingUser { contact_id } if contact_id == "9"),
            "{err:?}"
        );
        assert_eq!(count_users(&s).await, 1);
    }

    #[tokio::test]
    async fn usernames_get_suffixes_until_unique() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path()).await;
        let mut names = Vec::new();
        for n in 1..=4 {
            let a = s
                .apply(SITE, add(&n.to_string(), &format!("u{n}@x.org"), "ann"))
                .await
                .unwrap();
            names.push(a.user.username);
        }
        assert_eq!(names, ["ann", "ann-2", "ann-3", "ann-4"]);
        let a = s.apply(SITE, add("5", "u5@x.org", "ANN")).await.unwrap();
        assert_eq!(a.user.username, "ANN-5", "unique ignoring case");
        let a = s.apply(SITE, add("6", "u6@x.org", "  ")).await.unwrap();
        assert_eq!(a.user.username, "u6@x.org", "no username: the email");
        let a = s.apply("other", add("1", "u1@x.org", "ann")).await.unwrap();
        assert_eq!(a.user.username, "ann", "per site");
    }

    #[tokio::test]
    async fn user_found_by_email_is_linked_to_the_contact() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path()).await;
        let old = s.apply(SITE, add("7", "a@x.org", "a")).await.unwrap();
        let a = s
            .apply(SITE, change("70", "A@X.org", &["a"]))
            .await
            .unwrap();
        assert_eq!(a.user.id, old.user.id);
        assert_eq!(a.changed, ["email", "contact_id"]);
        assert_eq!(a.user.contact_id.as_deref(), Some("70"));
        assert!(a.user.updated >= old.user.updated);
        assert_eq!(s.by_contact(SITE, "7").await.unwrap(), None);
        assert_eq!(s.by_contact(SITE, "70").await.unwrap(), Some(a.user));
        // A user linked to no contact (made by hand, or imported) is linked the same way.
        let unlinked = s.apply(SITE, add("8", "b@x.org", "b")).await.unwrap();
        sqlx::query("UPDATE users SET contact_id = NULL WHERE id = ?")
            .bind(unlinked.user.id as i64)
            .execute(&s.pool)
            .await
            .unwrap();
        let a = s.apply(SITE, add("80", "b@x.org", "x")).await.unwrap();
        assert!(!a.created);
        assert_eq!(
            (a.user.id, a.changed),
            (unlinked.user.id, vec!["contact_id".to_owned()])
        );
    }

    #[tokio::test]
    async fn email_of_another_user_is_a_conflict_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path()).await;
        s.apply(SITE, add("1", "one@x.org", "one")).await.unwrap();
        let two = s.apply(SITE, add("2", "two@x.org", "two")).await.unwrap();
        let mut c = change("2", "ONE@x.org", &["new"]);
        c.meta = meta(&[("k", "v")]);
        c.role = Some("editor".into());
        let err = s.apply(SITE, c).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
        assert!(!err.to_string().contains("$2y$"));
        assert_eq!(
            s.by_contact(SITE, "2").await.unwrap(),
            Some(two.user),
            "tags, meta and role rolled back with the email"
        );
    }

    #[tokio::test]
    async fn tags_are_replaced_in_order_without_repeats() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path()).await;
        s.apply(SITE, add("7", "a@x.org", "a")).await.unwrap();
        let a = s
            .apply(SITE, change("7", "a@x.org", &["c", "a", "c", "b", "a"]))
            .await
            .unwrap();
        assert_eq!(a.user.tags, ["c", "a", "b"]);
        assert_eq!(a.changed, ["tags"]);
        let same = s
            .apply(SITE, change("7", "a@x.org", &["c", "a", "b", "b"]))
            .await
            .unwrap();
        assert!(same.changed.is_empty());
        let reordered = s
            .apply(SITE, change("7", "", &["b", "c", "a"]))
            .await
            .unwrap();
        assert_eq!(reordered.changed, ["tags"], "an empty email is left as is");
        let stored = s.by_contact(SITE, "7").await.unwrap().unwrap();
        assert_eq!(
            (&*stored.email, stored.tags),
            ("a@x.org", vec!["b".into(), "c".into(), "a".into()])
        );
        let none = s.apply(SITE, change("7", "", &[])).await.unwrap();
        assert!(none.user.tags.is_empty());
    }

    #[tokio::test]
    async fn meta_merges_role_changes_and_changed_keeps_its_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path()).await;
        let mut c = add("7", "a@x.org", "a");
        c.meta = meta(&[("first_name", "Ann"), ("phone", "1")]);
        let created = s.apply(SITE, c).await.unwrap();
        let mut c = change("7", "b@x.org", &["a", "b"]);
        c.meta = meta(&[("phone", "2"), ("city", "Oslo"), ("first_name", "Ann")]);
        c.role = Some("editor".into());
        let a = s.apply(SITE, c).await.unwrap();
        assert_eq!(
            a.changed,
            ["tags", "email", "role", "meta:city", "meta:phone"]
        );
        assert_eq!(
            a.user.meta,
            meta(&[("city", "Oslo"), ("first_name", "Ann"), ("phone", "2")])
        );
        assert_eq!(a.user.role, "editor");
        assert!(a.user.updated >= created.user.updated);
        assert_eq!(s.by_contact(SITE, "7").await.unwrap(), Some(a.user.clone()));
        let mut same_role = change("7", "b@x.org", &["a", "b"]);
        same_role.role = Some("editor".into());
        assert!(s.apply(SITE, same_role).await.unwrap().changed.is_empty());
    }

    #[tokio::test]
    async fn reopened_store_keeps_its_users() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path()).await;
        let mut c = add("7", "a@x.org", "a");
        c.meta = meta(&[("k", "v")]);
        let a = s.apply(SITE, c).await.unwrap();
        s.close().await;
        drop(s);
        let s = store(dir.path()).await;
        assert_eq!(s.by_contact(SITE, "7").await.unwrap(), Some(a.user.clone()));
        s.close().await;
        let r = EmbeddedStore::open_read_only(dir.path()).await.unwrap();
        assert_eq!(r.by_email(SITE, "A@x.org").await.unwrap(), Some(a.user));
        let err = r.apply(SITE, change("7", "", &[])).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    }

    #[tokio::test]
    async fn read_only_open_needs_an_existing_store() {
        let dir = tempfile::tempdir().unwrap();
        let err = EmbeddedStore::open_read_only(dir.path())
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("does not exist"), "{err}");
        assert!(!dir.path().join(FILE_NAME).exists(), "nothing created");
    }

    #[tokio::test]
    async fn read_only_store_reads_while_a_writer_has_it_open() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path()).await;
        s.apply(SITE, add("7", "a@x.org", "a")).await.unwrap();
        let r = EmbeddedStore::open_read_only(dir.path()).await.unwrap();
        assert!(r.by_contact(SITE, "7").await.unwrap().is_some());
        s.apply(SITE, add("8", "b@x.org", "b")).await.unwrap();
        assert!(r.by_contact(SITE, "8").await.unwrap().is_some());
    }

    /// Many `add`s for one contact (and for one email) at once, from tasks on two stores
    /// (two pools): exactly one user, created exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_adds_make_exactly_one_user() {
        let dir = tempfile::tempdir().unwrap();
        let stores = [
            Arc::new(store(dir.path()).await),
            Arc::new(store(dir.path()).await),
        ];
        for same_contact in [true, false] {
            let mut tasks = Vec::new();
            for i in 0..16 {
                let s = stores[i % 2].clone();
                let (contact, site) = if same_contact {
                    ("7".to_owned(), "a")
                } else {
                    (format!("{}", 100 + i), "b")
                };
                tasks.push(tokio::spawn(async move {
                    s.apply(site, add(&contact, "same@x.org", &format!("u{i}")))
                        .await
                }));
            }
            let mut created = 0;
            for t in tasks {
                created += usize::from(t.await.unwrap().unwrap().created);
            }
            assert_eq!(created, 1, "same contact: {same_contact}");
        }
        let per_site: Vec<(String, i64)> =
            sqlx::query_as("SELECT site, COUNT(*) FROM users GROUP BY site ORDER BY site")
                .fetch_all(&stores[0].pool)
                .await
                .unwrap();
        assert_eq!(per_site, [("a".to_owned(), 1), ("b".to_owned(), 1)]);
    }
}
