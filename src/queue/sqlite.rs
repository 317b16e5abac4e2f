//! The durable queue: jobs, loopback locks and the activity log in one SQLite file
//! (`data_dir/queue.sqlite3`, WAL).
//!
//! One writer task owns the connection and the [`Index`]. Everything that changes the queue
//! (admit, lease, finish, lock) is a command sent to it; it takes every command waiting (and
//! those still coming in, for up to `commit_window` after the first), applies them in order in
//! **one transaction**, commits (one fsync with `durability = "fsync"`), and only then
//! answers: a webhook is acknowledged only once its job is on disk, and a thousand concurrent
//! webhooks cost one fsync.
//!
//! ```text
//! front door ─ admit ─┐                        ┌─ commit ok ─> answers, waiters, notify workers
//! workers ── lease ───┼─> channel ─> batch ─> tx ┤
//!          finish ────┘                        └─ commit failed ─> errors, index rebuilt
//! ```
//!
//! A batch of admissions reaches SQLite as one script in one call to sqlx's SQLite thread
//! ([`script`](super::script)); checkpoints run beside the writer
//! ([`checkpoint`](super::checkpoint)).
//!
//! If a batch fails (disk full, I/O error) it is rolled back, every command in it gets
//! [`QueueError::Unavailable`], and the index is rebuilt from the file, so memory never
//! claims what the disk does not hold.

use std::collections::HashMap;
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use foldhash::{HashMap as FastMap, HashSet as FastSet};
use rand::Rng;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection, Row, SqliteConnection};
use tokio::sync::{mpsc, oneshot, Notify};

use super::checkpoint::{CheckpointStats, Checkpointer, WAL_BACKSTOP_PAGES};
use super::index::{Decision, Index, Requeue};
use super::script::{Rows, Script};
use super::{
    Action, Activity, Admission, ContactId, Delivery, Job, JobId, JobOutcome, QueueError,
    StoredRequest,
};
use crate::config::{Durability, QueueConfig};

/// Commands waiting in the channel at most; beyond it callers wait (backpressure).
const CHANNEL_CAPACITY: usize = 65_536;
/// Commands applied in one transaction at most.
const MAX_BATCH: usize = 4096;
/// Rows deleted per prune statement, so pruning never holds the writer for long.
const PRUNE_CHUNK: i64 = 5000;
/// How often finished jobs, old activity and expired locks are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// `Retry-After` answered when the queue is full.
const FULL_RETRY_AFTER: Duration = Duration::from_secs(10);
/// Schema version in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS jobs (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    site              TEXT    NOT NULL,
    contact           TEXT    NOT NULL,
    action            TEXT    NOT NULL,
    role              TEXT,
    send_notification INTEGER,
    payload_tags      TEXT,
    method            TEXT    NOT NULL,
    target            TEXT    NOT NULL,
    content_type      TEXT,
    body              BLOB    NOT NULL,
    client_ip         TEXT    NOT NULL,
    host              TEXT,
    fingerprint       INTEGER NOT NULL,
    deliveries        INTEGER NOT NULL,
    received_at       INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    next_run_at       INTEGER NOT NULL,
    state             TEXT    NOT NULL,
    result            TEXT,
    last_error        TEXT,
    finished_at       INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, id) WHERE state != 'done';
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS locks (
    site     TEXT    NOT NULL,
    contact  TEXT    NOT NULL,
    until_ms INTEGER NOT NULL,
    PRIMARY KEY (site, contact)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS activity (
    id          INTEGER PRIMARY KEY,
    at_ms       INTEGER NOT NULL,
    site        TEXT    NOT NULL,
    contact     TEXT,
    action      TEXT,
    outcome     TEXT    NOT NULL,
    job         INTEGER,
    duration_ms INTEGER,
    detail      TEXT
);
"#;

/// What a worker gets from [`SqliteQueue::lease`].
#[derive(Debug)]
pub enum Lease {
    /// A job, now `running`.
    Job(Box<Job>),
    /// Nothing due; the next job of the site is due in this long (if one waits).
    Idle(Option<Duration>),
}

/// How a running job ended, as the worker reports it.
enum Finish {
    Done {
        detail: String,
        report: Option<Arc<serde_json::Value>>,
    },
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
    Failed {
        code: String,
        reason: String,
    },
}

type Reply<T> = oneshot::Sender<Result<T, QueueError>>;

enum Command {
    Admit {
        delivery: Box<Delivery>,
        /// [`fingerprint`] of the delivery, computed by the caller (off the writer's thread).
        fingerprint: u64,
        dedupe_window: Duration,
        watch: Option<oneshot::Sender<JobOutcome>>,
        reply: Reply<Admission>,
    },
    Lease {
        site: Arc<str>,
        reply: Reply<Lease>,
    },
    Finish {
        site: Arc<str>,
        job: JobId,
        action: Action,
        attempts: u32,
        received_at: SystemTime,
        took: Duration,
        how: Finish,
        reply: Reply<()>,
    },
    Lock {
        site: Arc<str>,
        contact: ContactId,
        until_ms: i64,
        reply: Reply<()>,
    },
    Replay {
        job: JobId,
        reply: Reply<bool>,
    },
    Depth(Reply<Vec<SiteDepth>>),
    Record(Box<Activity>),
    Prune,
    Close(oneshot::Sender<()>),
}

/// Unfinished jobs of one site, from the queue's index.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SiteDepth {
    pub site: String,
    pub pending: u64,
    pub running: u64,
}

/// A line of the activity log as the admin API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ActivityRow {
    pub id: i64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
    pub site: String,
    pub contact: Option<String>,
    pub action: Option<String>,
    pub outcome: String,
    pub job: Option<i64>,
    pub duration_ms: Option<i64>,
    pub detail: Option<String>,
}

/// Which activity lines to read (newest first).
#[derive(Debug, Clone, Default)]
pub struct ActivityFilter {
    pub site: Option<String>,
    pub contact: Option<String>,
    pub outcome: Option<String>,
    pub limit: u32,
}

/// A job as the admin API shows it (no body: it may hold personal data).
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobRow {
    pub id: i64,
    pub site: String,
    pub contact: String,
    pub action: String,
    pub state: String,
    pub attempts: i64,
    pub deliveries: i64,
    pub received_at_ms: i64,
    pub updated_at_ms: i64,
    pub next_run_at_ms: i64,
    pub result: Option<String>,
    pub last_error: Option<String>,
}

/// Loopback locks in memory: [`lock_key`] -> locked until (ms since the epoch). Entries
/// expire on their own at that time. Every webhook looks its contact up here, on the serving
/// threads: one string key lets the lookup borrow a key built on the stack
/// ([`with_lock_key`]) where a (site, contact) pair cost an allocation and a count on the
/// site's shared `Arc` per webhook; foldhash where moka's default is SipHash.
type LockCache = moka::sync::Cache<String, i64, foldhash::fast::RandomState>;

/// `site` NUL `contact`: unambiguous, site names being `a-z 0-9 _ -` (config.rs).
fn lock_key(site: &str, contact: &str) -> String {
    let mut key = String::with_capacity(site.len() + 1 + contact.len());
    key.push_str(site);
    key.push('\0');
    key.push_str(contact);
    key
}

/// Call `f` with [`lock_key`]`(site, contact)`, built on the stack when it is short.
fn with_lock_key<R>(site: &str, contact: &str, f: impl FnOnce(&str) -> R) -> R {
    let mut buf = [0u8; 256];
    let len = site.len() + 1 + contact.len();
    if let Some(key) = buf.get_mut(..len) {
        let (head, tail) = key.split_at_mut(site.len());
        head.copy_from_slice(site.as_bytes());
        tail[0] = 0;
        tail[1..].copy_from_slice(contact.as_bytes());
        // Two `str`s joined by NUL are UTF-8, so this never falls through.
        if let Ok(key) = std::str::from_utf8(key) {
            return f(key);
        }
    }
    f(&lock_key(site, contact))
}

struct LockExpiry;

impl moka::Expiry<String, i64> for LockExpiry {
    fn expire_after_create(
        &self,
        _key: &String,
        until_ms: &i64,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(until(*until_ms))
    }

    fn expire_after_update(
        &self,
        _key: &String,
        until_ms: &i64,
        _updated_at: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        Some(until(*until_ms))
    }
}

/// Time from now until `ms` since the epoch (zero if past).
fn until(ms: i64) -> Duration {
    Duration::from_millis(ms.saturating_sub(now_ms()).max(0) as u64)
}

/// The durable job queue. Cheap to share (`Arc`); all writes go through one writer task.
pub struct SqliteQueue {
    commands: mpsc::Sender<Command>,
    /// Read-only connections for the admin API, so reading never waits for the writer (WAL).
    reader: sqlx::SqlitePool,
    locks: LockCache,
    notifiers: Mutex<HashMap<Arc<str>, Arc<Notify>>>,
    path: PathBuf,
    checkpoints: Arc<CheckpointStats>,
    /// Held for the queue's lifetime: one gateway per data directory.
    _lock_file: File,
}

impl SqliteQueue {
    /// Open (or create) the queue in `data_dir`: jobs left `running` by a crash become
    /// pending again, the index and the locks are loaded, and the writer task starts.
    pub async fn open(data_dir: &Path, config: &QueueConfig) -> Result<Arc<Self>, QueueError> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            QueueError::Unavailable(format!("cannot create {}: {e}", data_dir.display()))
        })?;
        let lock_path = data_dir.join("queue.lock");
        let lock_file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| QueueError::Unavailable(format!("{}: {e}", lock_path.display())))?;
        lock_file.try_lock().map_err(|_| {
            QueueError::Unavailable(format!(
                "{} is in use by another wpf-gateway (one gateway per data_dir)",
                data_dir.display()
            ))
        })?;
        let path = data_dir.join("queue.sqlite3");
        let named = |e: sqlx::Error| QueueError::Unavailable(format!("{}: {e}", path.display()));
        let options = sqlite_options(
            &path,
            match config.durability {
                // In WAL mode FULL syncs the log on every commit; NORMAL only at checkpoints,
                // which survives a crash of the process but not of the machine.
                Durability::Fsync => SqliteSynchronous::Full,
                Durability::Os => SqliteSynchronous::Normal,
            },
        )
        .map_err(named)?;
        // The writer checkpoints itself only as a backstop; the checkpointer task does it.
        let writer_options = options
            .clone()
            .pragma("wal_autocheckpoint", WAL_BACKSTOP_PAGES.to_string());
        let mut conn = SqliteConnection::connect_with(&writer_options)
            .await
            .map_err(named)?;
        prepare_schema(&mut conn, "queue", SCHEMA, SCHEMA_VERSION)
            .await
            .map_err(named)?;
        let now = now_ms();
        sqlx::query("UPDATE jobs SET state = 'pending' WHERE state = 'running'")
            .execute(&mut conn)
            .await
            .map_err(named)?;
        let locks: LockCache = moka::sync::Cache::builder()
            .max_capacity(1_000_000)
            .expire_after(LockExpiry)
            .build_with_hasher(foldhash::fast::RandomState::default());
        let rows = sqlx::query("SELECT site, contact, until_ms FROM locks WHERE until_ms > ?")
            .bind(now)
            .fetch_all(&mut conn)
            .await
            .map_err(named)?;
        for row in rows {
            let site: String = row.get(0);
            locks.insert(lock_key(&site, row.get(1)), row.get(2));
        }
        let reader = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(2)
            .connect_lazy_with(options.clone().read_only(true).create_if_missing(false));
        let (commands, inbox) = mpsc::channel(CHANNEL_CAPACITY);
        let checkpointer = Checkpointer::start(&options).await.map_err(named)?;
        let checkpoints = checkpointer.stats.clone();
        let mut writer = Writer {
            conn,
            checkpointer: Some(checkpointer),
            state: State {
                index: Index::default(),
                next_id: 1,
                config: config.clone(),
                notify: FastSet::default(),
            },
            waiters: FastMap::default(),
            path: path.clone(),
        };
        writer.rebuild().await.map_err(named)?;
        tracing::info!(file = %path.display(), jobs = writer.state.index.active(), "queue open");
        let queue = Arc::new(SqliteQueue {
            commands,
            reader,
            locks,
            notifiers: Mutex::new(HashMap::new()),
            path,
            checkpoints,
            _lock_file: lock_file,
        });
        let weak = Arc::downgrade(&queue);
        tokio::spawn(writer.run(inbox, weak));
        let prune = queue.commands.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PRUNE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                if prune.send(Command::Prune).await.is_err() {
                    return;
                }
            }
        });
        Ok(queue)
    }

    /// The queue's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, QueueError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    /// Take a delivery: a new job, merged into the contact's pending job, or a duplicate.
    /// Resolves only once the outcome is committed. With `watch`, also returns a receiver of
    /// the job's final outcome (for `respond = "sync"`).
    pub async fn admit(
        &self,
        delivery: Delivery,
        dedupe_window: Duration,
        watch: bool,
    ) -> Result<(Admission, Option<oneshot::Receiver<JobOutcome>>), QueueError> {
        let (watch, outcome) = if watch {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let admission = self
            .call(|reply| Command::Admit {
                fingerprint: fingerprint(&delivery),
                delivery: Box::new(delivery),
                dedupe_window,
                watch,
                reply,
            })
            .await?;
        Ok((admission, outcome))
    }

    /// The oldest due job of `site` whose contact has no job running, now marked running.
    pub async fn lease(&self, site: &Arc<str>) -> Result<Lease, QueueError> {
        self.call(|reply| Command::Lease {
            site: site.clone(),
            reply,
        })
        .await
    }

    /// The job succeeded.
    pub async fn done(
        &self,
        job: &Job,
        took: Duration,
        detail: String,
        report: Option<Arc<serde_json::Value>>,
    ) -> Result<(), QueueError> {
        self.finish(job, took, Finish::Done { detail, report })
            .await
    }

    /// The job failed transiently: run it again on the retry schedule (or after
    /// `retry_after`), or move it to the dead letter once `retry_until` has passed.
    pub async fn retry(
        &self,
        job: &Job,
        took: Duration,
        reason: String,
        retry_after: Option<Duration>,
    ) -> Result<(), QueueError> {
        self.finish(
            job,
            took,
            Finish::Retry {
                reason,
                retry_after,
            },
        )
        .await
    }

    /// The job failed permanently: recorded, not retried.
    pub async fn fail(
        &self,
        job: &Job,
        took: Duration,
        code: &str,
        reason: String,
    ) -> Result<(), QueueError> {
        let code = code.to_owned();
        self.finish(job, took, Finish::Failed { code, reason })
            .await
    }

    async fn finish(&self, job: &Job, took: Duration, how: Finish) -> Result<(), QueueError> {
        self.call(|reply| Command::Finish {
            site: job.delivery.site.clone(),
            job: job.id,
            action: job.delivery.action,
            attempts: job.attempts,
            received_at: job.delivery.received_at,
            took,
            how,
            reply,
        })
        .await
    }

    /// Lock `contact` of `site` for `ttl` (loopback lock); durable once this returns.
    pub async fn lock(
        &self,
        site: &Arc<str>,
        contact: &ContactId,
        ttl: Duration,
    ) -> Result<(), QueueError> {
        let until_ms = now_ms().saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        self.call(|reply| Command::Lock {
            site: site.clone(),
            contact: contact.clone(),
            until_ms,
            reply,
        })
        .await?;
        self.locks
            .insert(lock_key(site, contact.as_str()), until_ms);
        Ok(())
    }

    /// Lift the lock of `contact` of `site` (admin API). `false` if there was none.
    pub async fn unlock(&self, site: &Arc<str>, contact: &ContactId) -> Result<bool, QueueError> {
        let was = self.locked_for(site, contact).is_some();
        self.call(|reply| Command::Lock {
            site: site.clone(),
            contact: contact.clone(),
            until_ms: 0,
            reply,
        })
        .await?;
        with_lock_key(site, contact.as_str(), |key| self.locks.invalidate(key));
        Ok(was)
    }

    /// Run a `dead` or `failed` job again from its first attempt (admin API). `false` if the
    /// job does not exist or is not in one of those states.
    pub async fn replay(&self, job: JobId) -> Result<bool, QueueError> {
        self.call(|reply| Command::Replay { job, reply }).await
    }

    /// Pending and running jobs per site.
    pub async fn depth(&self) -> Result<Vec<SiteDepth>, QueueError> {
        self.call(Command::Depth).await
    }

    /// Jobs per state (`pending`, `running`, `failed`, `dead`; `done` ones are not counted).
    pub async fn count_by_state(&self) -> Result<Vec<(String, i64)>, QueueError> {
        sqlx::query_as(
            "SELECT state, COUNT(*) FROM jobs WHERE state != 'done' GROUP BY state ORDER BY state",
        )
        .fetch_all(&self.reader)
        .await
        .map_err(|e| self.read_error(e))
    }

    /// Unfinished jobs per site and state, as `(site, state, count)` (`done` ones are not
    /// counted): the status page's per-site depth.
    pub async fn count_by_site_state(&self) -> Result<Vec<(String, String, i64)>, QueueError> {
        sqlx::query_as(
            "SELECT site, state, COUNT(*) FROM jobs WHERE state != 'done' \
             GROUP BY site, state ORDER BY site, state",
        )
        .fetch_all(&self.reader)
        .await
        .map_err(|e| self.read_error(e))
    }

    /// Activity lines matching `filter`, newest first (at most 1000).
    pub async fn activity(&self, filter: &ActivityFilter) -> Result<Vec<ActivityRow>, QueueError> {
        let limit = i64::from(filter.limit.clamp(1, 1000));
        let rows = sqlx::query(
            "SELECT id, at_ms, site, contact, action, outcome, job, duration_ms, detail \
             FROM activity WHERE (?1 IS NULL OR site = ?1) AND (?2 IS NULL OR contact = ?2) \
             AND (?3 IS NULL OR outcome = ?3) ORDER BY id DESC LIMIT ?4",
        )
        .bind(filter.site.as_deref())
        .bind(filter.contact.as_deref())
        .bind(filter.outcome.as_deref())
        .bind(limit)
        .fetch_all(&self.reader)
        .await
        .map_err(|e| self.read_error(e))?;
        Ok(rows
            .iter()
            .map(|r| ActivityRow {
                id: r.get(0),
                at_ms: r.get(1),
                site: r.get(2),
                contact: r.get(3),
                action: r.get(4),
                outcome: r.get(5),
                job: r.get(6),
                duration_ms: r.get(7),
                detail: r.get(8),
            })
            .collect())
    }

    /// Jobs, newest first, optionally of one state (at most 1000).
    pub async fn jobs(&self, state: Option<&str>, limit: u32) -> Result<Vec<JobRow>, QueueError> {
        let limit = i64::from(limit.clamp(1, 1000));
        let rows = sqlx::query(
            "SELECT id, site, contact, action, state, attempts, deliveries, received_at, \
             updated_at, next_run_at, result, last_error FROM jobs \
             WHERE (?1 IS NULL OR state = ?1) ORDER BY id DESC LIMIT ?2",
        )
        .bind(state)
        .bind(limit)
        .fetch_all(&self.reader)
        .await
        .map_err(|e| self.read_error(e))?;
        Ok(rows
            .iter()
            .map(|r| JobRow {
                id: r.get(0),
                site: r.get(1),
                contact: r.get(2),
                action: r.get(3),
                state: r.get(4),
                attempts: r.get(5),
                deliveries: r.get(6),
                received_at_ms: r.get(7),
                updated_at_ms: r.get(8),
                next_run_at_ms: r.get(9),
                result: r.get(10),
                last_error: r.get(11),
            })
            .collect())
    }

    fn read_error(&self, e: sqlx::Error) -> QueueError {
        QueueError::Unavailable(format!("{}: {e}", self.path.display()))
    }

    /// Background checkpoints so far: (runs, frames in the log at the last one, frames of
    /// them in the main file).
    fn checkpoints(&self) -> (u64, i64, i64) {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.checkpoints;
        (
            c.runs.load(Relaxed),
            c.log_frames.load(Relaxed),
            c.checkpointed_frames.load(Relaxed),
        )
    }

    /// Is `contact` of `site` locked now? How long the lock still holds, if so.
    pub fn locked_for(&self, site: &Arc<str>, contact: &ContactId) -> Option<Duration> {
        let until_ms = with_lock_key(site, contact.as_str(), |key| self.locks.get(key))?;
        let left = until(until_ms);
        (!left.is_zero()).then_some(left)
    }

    /// Contacts locked now (approximate: expired entries may linger until moka evicts them).
    pub fn locks_held(&self) -> u64 {
        self.locks.run_pending_tasks();
        self.locks.entry_count()
    }

    /// Add a line to the activity log. Best effort: written with the next batch; if the
    /// writer is overwhelmed the line is dropped (jobs never are).
    pub fn record(&self, activity: Activity) {
        if self
            .commands
            .try_send(Command::Record(Box::new(activity)))
            .is_err()
        {
            tracing::debug!("activity line dropped: queue writer busy");
        }
    }

    /// Wakes the site's workers when a job of the site becomes ready. Create the
    /// `Notified` future (and `enable` it) *before* calling [`lease`](Self::lease), so a
    /// wake-up between the two is not missed.
    pub fn notifier(&self, site: &Arc<str>) -> Arc<Notify> {
        let mut map = self
            .notifiers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        map.entry(site.clone()).or_default().clone()
    }

    /// Commit what is in flight and stop the writer. Later calls get `Unavailable`.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Close(tx)).await.is_ok() {
            let _ = rx.await;
            let (runs, log, checkpointed) = self.checkpoints();
            tracing::debug!(
                runs,
                log,
                checkpointed,
                "queue closed; background checkpoints"
            );
        }
    }
}

fn closed() -> QueueError {
    QueueError::Unavailable("queue is closed".into())
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    to_ms(SystemTime::now())
}

/// Milliseconds since the Unix epoch, as SQLite columns keep times (0 before the epoch).
fn to_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The inverse of [`to_ms`].
pub(crate) fn from_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Identity of a delivery for exact-repeat detection: everything the CRM sent that matters.
///
/// Stored with pending jobs, so a CRM's retry after a restart is still a duplicate: hence a
/// fixed seed. Stable for a given foldhash version (Cargo.lock); an upgrade that changed it
/// would only turn a repeat arriving across the upgrade into a merge, never lose news.
/// (std's `DefaultHasher`, used before, has the same caveat across Rust releases.)
fn fingerprint(d: &Delivery) -> u64 {
    use std::hash::BuildHasher;
    /// Any constant; changing it makes the stored fingerprints of pending jobs stale (above).
    const SEED: u64 = 0x7770_665f_6761_7465; // "wpf_gate"
    let mut h = foldhash::quality::FixedState::with_seed(SEED).build_hasher();
    d.contact.hash(&mut h);
    d.action.hash(&mut h);
    d.role.hash(&mut h);
    d.send_notification.hash(&mut h);
    d.request.method.hash(&mut h);
    d.request.path_and_query.hash(&mut h);
    d.request.content_type.hash(&mut h);
    d.request.body.hash(&mut h);
    h.finish()
}

/// Connection options every SQLite file of the gateway opens with: created if missing, WAL
/// (readers never wait for the writer), a busy timeout (a connection that finds the file
/// locked by another one waits instead of failing) and cached statements.
pub(crate) fn sqlite_options(
    path: &Path,
    synchronous: SqliteSynchronous,
) -> Result<SqliteConnectOptions, sqlx::Error> {
    Ok(SqliteConnectOptions::from_str("sqlite://")?
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(synchronous)
        .busy_timeout(Duration::from_secs(5))
        .statement_cache_capacity(64))
}

/// Create `schema` (idempotent `CREATE … IF NOT EXISTS` statements separated by `;`) and
/// record `version` in `PRAGMA user_version`; a file of a newer version is refused, so an
/// older binary never writes a layout it does not know. `what` names the file in that error.
pub(crate) async fn prepare_schema(
    conn: &mut SqliteConnection,
    what: &str,
    schema: &str,
    version: i64,
) -> Result<(), sqlx::Error> {
    let found: i64 = sqlx::query_scalar("PRAGMA user_version")
        .fetch_one(&mut *conn)
        .await?;
    if found > version {
        return Err(sqlx::Error::Protocol(format!(
            "{what} schema version {found} is newer than this wpf-gateway ({version})"
        )));
    }
    // `sqlx::raw_sql` would run the script at once, but its futures are not `Send` in a
    // spawned task (rust-lang/rust#102211); the statements are few, so run them one by one.
    for statement in schema.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        sqlx::query(statement).execute(&mut *conn).await?;
    }
    sqlx::query(&format!("PRAGMA user_version = {version}"))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A new job row waiting for the batch's INSERT.
struct NewJob {
    id: JobId,
    delivery: Box<Delivery>,
    fingerprint: u64,
    at_ms: i64,
}

/// A merge waiting for the batch's UPDATE (several merges into one job collapse into one).
struct Merge {
    action: Action,
    delivery: Box<Delivery>,
    fingerprint: u64,
    deliveries: i64,
    at_ms: i64,
}

/// An answer to send once the batch's commit succeeded (or failed).
type PendingReply = Box<dyn FnOnce(Result<(), QueueError>) + Send>;

/// The writes and answers of one batch, applied on commit.
#[derive(Default)]
struct Batch {
    inserts: Vec<NewJob>,
    merges: FastMap<JobId, Merge>,
    activity: Vec<Activity>,
    replies: Vec<PendingReply>,
    waiters: Vec<(JobId, oneshot::Sender<JobOutcome>)>,
    outcomes: Vec<(JobId, Option<JobId>, Option<JobOutcome>)>,
    close: Option<oneshot::Sender<()>>,
    /// `BEGIN` was sent: the transaction is open (or failed to open).
    open: bool,
}

/// The writer task: the connection, plus the state the batch's commands change.
struct Writer {
    conn: SqliteConnection,
    /// Checkpoints the log beside the writer; `None` once stopped (on close).
    checkpointer: Option<Checkpointer>,
    state: State,
    /// Sync-mode answers waiting for a job's final outcome.
    waiters: FastMap<JobId, Vec<oneshot::Sender<JobOutcome>>>,
    path: PathBuf,
}

struct State {
    index: Index,
    next_id: i64,
    config: QueueConfig,
    /// Sites whose workers must be woken after the commit.
    notify: FastSet<Arc<str>>,
}

impl Writer {
    async fn run(
        mut self,
        mut inbox: mpsc::Receiver<Command>,
        queue: std::sync::Weak<SqliteQueue>,
    ) {
        while let Some(first) = inbox.recv().await {
            let commands = collect(first, &mut inbox, self.state.config.commit_window).await;
            if let Some(done) = self.apply(commands, &queue).await {
                inbox.close();
                while let Ok(c) = inbox.try_recv() {
                    reject(c);
                }
                if let Some(checkpointer) = self.checkpointer.take() {
                    checkpointer.stop().await;
                }
                if let Err(e) = checkpoint(&mut self.conn).await {
                    tracing::warn!(file = %self.path.display(), error = %e, "checkpoint on close failed");
                }
                let _ = done.send(());
                return;
            }
        }
    }

    /// Apply one batch in one transaction, then answer; returns the Close request if any.
    async fn apply(
        &mut self,
        commands: Vec<Command>,
        queue: &std::sync::Weak<SqliteQueue>,
    ) -> Option<oneshot::Sender<()>> {
        let mut batch = Batch::default();
        let result = apply_batch(&mut self.conn, &mut self.state, commands, &mut batch).await;
        let close = batch.close.take();
        match result {
            Ok(()) => {
                if batch.open {
                    if let Some(checkpointer) = &self.checkpointer {
                        checkpointer.committed();
                    }
                }
                for reply in batch.replies {
                    reply(Ok(()));
                }
                for (job, watcher) in batch.waiters {
                    self.waiters.entry(job).or_default().push(watcher);
                }
                for (job, moved_to, outcome) in batch.outcomes {
                    let waiting = self.waiters.remove(&job).unwrap_or_default();
                    match (moved_to, outcome) {
                        (Some(to), _) => self.waiters.entry(to).or_default().extend(waiting),
                        (None, Some(outcome)) => {
                            for w in waiting {
                                let _ = w.send(outcome.clone());
                            }
                        }
                        (None, None) => {}
                    }
                }
                // Watchers whose webhook was answered already (sync timeout) are let go.
                self.waiters.retain(|_, w| {
                    w.retain(|tx| !tx.is_closed());
                    !w.is_empty()
                });
                if let Some(queue) = queue.upgrade() {
                    for site in self.state.notify.drain() {
                        queue.notifier(&site).notify_waiters();
                    }
                }
            }
            Err(e) => {
                tracing::error!(file = %self.path.display(), error = %e, "queue commit failed");
                let err = QueueError::Unavailable(e.to_string());
                for reply in batch.replies {
                    reply(Err(err.clone()));
                }
                self.state.notify.clear();
                if let Err(e) = self.rebuild().await {
                    tracing::error!(file = %self.path.display(), error = %e, "queue index rebuild failed");
                }
            }
        }
        close
    }

    /// Rebuild the index from the file: after open (jobs left `running` are pending by now)
    /// and after a failed batch (its `running` jobs are still held by workers). Two pending
    /// jobs of one contact (a job that ran when the gateway crashed, and a newer one) fold
    /// into the newer. A pending job remembers its newest delivery (fingerprint and time), so
    /// a CRM retry of it after a restart is still a duplicate.
    async fn rebuild(&mut self) -> Result<(), sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, site, contact, action, state, next_run_at, fingerprint, updated_at \
             FROM jobs WHERE state IN ('pending', 'running') ORDER BY id",
        )
        .fetch_all(&mut self.conn)
        .await?;
        let mut index = Index::default();
        let mut folds: Vec<(JobId, JobId, Action)> = Vec::new();
        for row in rows {
            let id = JobId(row.get(0));
            let site: Arc<str> = Arc::from(row.get::<String, _>(1));
            let contact: String = row.get(2);
            let action = Action::from_wpf_action(row.get(3)).unwrap_or(Action::Update);
            if row.get::<&str, _>(4) == "running" {
                index.insert_running(&site, &contact, id);
                continue;
            }
            if let Some((older, older_action)) = index.pending_of(&site, &contact) {
                index.finish(&site, older);
                folds.push((older, id, action.max(older_action)));
            }
            let merged = folds
                .iter()
                .filter(|(_, into, _)| *into == id)
                .map(|(_, _, a)| *a)
                .max()
                .unwrap_or(action);
            let newest = (row.get::<i64, _>(6) as u64, row.get(7));
            index.insert_pending(&site, &contact, id, merged, row.get(5), Some(newest));
        }
        if !folds.is_empty() {
            let mut tx = self.conn.begin().await?;
            for (older, into, action) in &folds {
                fold_into(
                    &mut tx,
                    *older,
                    *into,
                    *action,
                    now_ms(),
                    "recovered after restart",
                )
                .await?;
            }
            tx.commit().await?;
        }
        let seq: i64 = sqlx::query_scalar(
            "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'jobs'), 0), \
                        COALESCE((SELECT MAX(id) FROM jobs), 0))",
        )
        .fetch_one(&mut self.conn)
        .await?;
        self.state.index = index;
        self.state.next_id = seq + 1;
        Ok(())
    }
}

/// One batch: `first` and every command already waiting. While more keep coming, the batch
/// stays open for up to `window` after the first; as soon as a turn of the runtime (which lets
/// request tasks already running hand in their commands) brings none, it closes. Waiting out the
/// window with nothing arriving would only add latency and lower throughput: whatever arrives
/// while this batch commits forms the next batch anyway (natural group commit).
async fn collect(
    first: Command,
    inbox: &mut mpsc::Receiver<Command>,
    window: Duration,
) -> Vec<Command> {
    let mut commands = vec![first];
    let deadline = tokio::time::Instant::now() + window;
    loop {
        while commands.len() < MAX_BATCH {
            match inbox.try_recv() {
                Ok(c) => commands.push(c),
                Err(_) => break,
            }
        }
        if commands.len() >= MAX_BATCH
            || window.is_zero()
            || tokio::time::Instant::now() >= deadline
        {
            return commands;
        }
        tokio::task::yield_now().await;
        if inbox.is_empty() {
            return commands;
        }
    }
}

/// One transaction: every command of the batch, then the staged writes and the commit. The
/// transaction is opened by the first script sent ([`Batch::flush`] or [`Batch::commit`]); a
/// batch of admissions alone is one call to SQLite's thread. On an error the transaction is
/// rolled back here (sqlx's `Transaction` is not used: it costs a round trip of its own for
/// `BEGIN` and for `COMMIT`).
async fn apply_batch(
    conn: &mut SqliteConnection,
    state: &mut State,
    commands: Vec<Command>,
    batch: &mut Batch,
) -> Result<(), sqlx::Error> {
    let mut result = Ok(());
    for command in commands {
        result = state.apply(command, batch, conn).await;
        if result.is_err() {
            break;
        }
    }
    if result.is_ok() {
        result = batch.commit(conn).await;
    }
    if result.is_err() && batch.open {
        // Fails with "no transaction is active" when SQLite rolled back already.
        if let Err(e) = sqlx::query("ROLLBACK").execute(&mut *conn).await {
            tracing::debug!(error = %e, "rollback after a failed batch");
        }
    }
    result
}

/// Job `older` is superseded by the contact's newer pending job `into`, which takes its
/// action (merged) and its count of deliveries.
async fn fold_into(
    conn: &mut SqliteConnection,
    older: JobId,
    into: JobId,
    action: Action,
    now: i64,
    why: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE jobs SET action = ?, updated_at = ?, \
         deliveries = deliveries + (SELECT deliveries FROM jobs WHERE id = ?) WHERE id = ?",
    )
    .bind(action.as_str())
    .bind(now)
    .bind(older.0)
    .bind(into.0)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE jobs SET state = 'done', result = ?, finished_at = ?, updated_at = ? WHERE id = ?",
    )
    .bind(format!("superseded by job {into} ({why})"))
    .bind(now)
    .bind(now)
    .bind(older.0)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Fold the write-ahead log into the main file (on close, so the next start is quick).
async fn checkpoint(conn: &mut SqliteConnection) -> Result<(), sqlx::Error> {
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(conn)
        .await
        .map(|_| ())
}

/// Answer a command that arrived after Close.
fn reject(command: Command) {
    match command {
        Command::Admit { reply, .. } => {
            let _ = reply.send(Err(closed()));
        }
        Command::Lease { reply, .. } => {
            let _ = reply.send(Err(closed()));
        }
        Command::Finish { reply, .. } | Command::Lock { reply, .. } => {
            let _ = reply.send(Err(closed()));
        }
        Command::Replay { reply, .. } => {
            let _ = reply.send(Err(closed()));
        }
        Command::Depth(reply) => {
            let _ = reply.send(Err(closed()));
        }
        Command::Close(done) => {
            let _ = done.send(());
        }
        Command::Record(_) | Command::Prune => {}
    }
}

impl State {
    async fn apply(
        &mut self,
        command: Command,
        batch: &mut Batch,
        tx: &mut SqliteConnection,
    ) -> Result<(), sqlx::Error> {
        let now = now_ms();
        match command {
            Command::Admit {
                delivery,
                fingerprint,
                dedupe_window,
                watch,
                reply,
            } => self.admit(
                delivery,
                fingerprint,
                dedupe_window,
                watch,
                reply,
                batch,
                now,
            ),
            Command::Lease { site, reply } => {
                batch.flush(tx).await?;
                let lease = self.lease(&site, now, tx).await?;
                batch.reply(reply, lease);
            }
            Command::Finish {
                site,
                job,
                action,
                attempts,
                received_at,
                took,
                how,
                reply,
            } => {
                batch.flush(tx).await?;
                let finished = Finished {
                    site,
                    job,
                    action,
                    attempts,
                    received_at,
                    took,
                };
                self.finish(finished, how, batch, tx, now).await?;
                batch.reply(reply, ());
            }
            Command::Lock {
                site,
                contact,
                until_ms,
                reply,
            } => {
                batch.flush(tx).await?;
                let detail = if until_ms > now {
                    sqlx::query(
                        "INSERT INTO locks (site, contact, until_ms) VALUES (?, ?, ?) \
                         ON CONFLICT (site, contact) DO UPDATE SET until_ms = excluded.until_ms",
                    )
                    .bind(&*site)
                    .bind(contact.as_str())
                    .bind(until_ms)
                    .execute(&mut *tx)
                    .await?;
                    format!(
                        "locked for {}",
                        crate::config::format_duration(until(until_ms))
                    )
                } else {
                    sqlx::query("DELETE FROM locks WHERE site = ? AND contact = ?")
                        .bind(&*site)
                        .bind(contact.as_str())
                        .execute(&mut *tx)
                        .await?;
                    "unlocked".to_owned()
                };
                batch.activity.push(Activity {
                    at: SystemTime::now(),
                    site,
                    contact: Some(contact.as_str().to_owned()),
                    action: Some("lock".into()),
                    outcome: if until_ms > now { "lock" } else { "unlock" },
                    job: None,
                    duration: None,
                    detail,
                });
                batch.reply(reply, ());
            }
            Command::Replay { job, reply } => {
                batch.flush(tx).await?;
                let replayed = self.replay(job, batch, tx, now).await?;
                batch.reply(reply, replayed);
            }
            Command::Depth(reply) => {
                let depth = self
                    .index
                    .sites()
                    .map(|site| {
                        let (pending, running) = self.index.depth(site);
                        SiteDepth {
                            site: site.to_owned(),
                            pending,
                            running,
                        }
                    })
                    .collect();
                batch.reply(reply, depth);
            }
            Command::Record(activity) => batch.activity.push(*activity),
            Command::Prune => {
                batch.flush(tx).await?;
                self.prune(tx, now).await?;
            }
            Command::Close(done) => batch.close = Some(done),
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)] // the fields of `Command::Admit`, plus the batch
    fn admit(
        &mut self,
        delivery: Box<Delivery>,
        fp: u64,
        dedupe_window: Duration,
        watch: Option<oneshot::Sender<JobOutcome>>,
        reply: Reply<Admission>,
        batch: &mut Batch,
        now: i64,
    ) {
        let site = delivery.site.clone();
        let contact = delivery.contact.as_str();
        let decision = self.index.decide(
            &site,
            contact,
            delivery.action,
            fp,
            now,
            duration_ms(dedupe_window),
        );
        let (admission, outcome) = match decision {
            Decision::New => {
                if self.index.active() >= self.config.queue_max {
                    let _ = reply.send(Err(QueueError::Full {
                        retry_after: FULL_RETRY_AFTER,
                    }));
                    return;
                }
                let id = JobId(self.next_id);
                self.next_id += 1;
                self.index.insert_pending(
                    &site,
                    contact,
                    id,
                    delivery.action,
                    now,
                    Some((fp, now)),
                );
                self.notify.insert(site.clone());
                (Admission::Queued { job: id }, "queued")
            }
            Decision::Merge { job, .. } => {
                self.index.merge(&site, contact, delivery.action, (fp, now));
                (Admission::Coalesced { job }, "coalesced")
            }
            Decision::Duplicate { job } => (Admission::Duplicate { job }, "duplicate"),
        };
        batch.activity.push(Activity {
            at: from_ms(now),
            site: site.clone(),
            contact: Some(contact.to_owned()),
            action: Some(delivery.action.as_str().to_owned()),
            outcome,
            job: Some(admission.job()),
            duration: None,
            detail: String::new(),
        });
        match admission {
            Admission::Queued { job } => batch.inserts.push(NewJob {
                id: job,
                delivery,
                fingerprint: fp,
                at_ms: now,
            }),
            Admission::Coalesced { job } => {
                let action = self
                    .index
                    .pending_of(&site, contact)
                    .map_or(delivery.action, |(_, a)| a);
                batch.stage_merge(job, action, delivery, fp, now);
            }
            Admission::Duplicate { .. } => {}
        }
        if let Some(watch) = watch {
            batch.waiters.push((admission.job(), watch));
        }
        batch.reply(reply, admission);
    }

    async fn lease(
        &mut self,
        site: &Arc<str>,
        now: i64,
        tx: &mut SqliteConnection,
    ) -> Result<Lease, sqlx::Error> {
        loop {
            let id = match self.index.lease(site, now) {
                Ok(id) => id,
                Err(next_due) => {
                    let wait = next_due.map(|due| Duration::from_millis((due - now).max(0) as u64));
                    return Ok(Lease::Idle(wait));
                }
            };
            let row = sqlx::query(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, updated_at = ? \
                 WHERE id = ? AND state = 'pending' \
                 RETURNING id, site, contact, action, role, send_notification, payload_tags, \
                 method, target, content_type, body, client_ip, host, received_at, attempts, deliveries",
            )
            .bind(now)
            .bind(id.0)
            .fetch_optional(&mut *tx)
            .await?;
            match row.map(|r| job_from_row(&r)) {
                Some(Ok(job)) => return Ok(Lease::Job(Box::new(job))),
                Some(Err(reason)) => {
                    // A row this gateway cannot read (edited by hand?): park it as failed.
                    tracing::error!(job = %id, %reason, "unreadable job row, marked failed");
                    sqlx::query(
                        "UPDATE jobs SET state = 'failed', result = 'unreadable', last_error = ?, \
                         finished_at = ? WHERE id = ?",
                    )
                    .bind(reason)
                    .bind(now)
                    .bind(id.0)
                    .execute(&mut *tx)
                    .await?;
                    self.index.finish(site, id);
                }
                None => {
                    tracing::error!(job = %id, "job in the index is not pending in the file");
                    self.index.finish(site, id);
                }
            }
        }
    }

    async fn finish(
        &mut self,
        f: Finished,
        how: Finish,
        batch: &mut Batch,
        tx: &mut SqliteConnection,
        now: i64,
    ) -> Result<(), sqlx::Error> {
        let Finished {
            site,
            job,
            action,
            attempts,
            received_at,
            took,
        } = f;
        let mut activity = Activity {
            at: from_ms(now),
            site: site.clone(),
            contact: self.index.contact_of(&site, job).map(str::to_owned),
            action: Some(action.as_str().to_owned()),
            outcome: "done",
            job: Some(job),
            duration: Some(took),
            detail: String::new(),
        };
        let (state, result, error, outcome) = match how {
            Finish::Done { detail, report } => {
                activity.detail = detail.clone();
                (
                    "done",
                    detail.clone(),
                    None,
                    JobOutcome::Done { detail, report },
                )
            }
            Finish::Failed { code, reason } => {
                activity.outcome = "failed";
                activity.detail = format!("{code}: {reason}");
                let outcome = JobOutcome::Failed {
                    code: code.clone(),
                    reason: reason.clone(),
                };
                ("failed", code, Some(reason), outcome)
            }
            Finish::Retry {
                reason,
                retry_after,
            } => {
                let delay = retry_after.unwrap_or_else(|| self.backoff(attempts));
                let due = now.saturating_add(duration_ms(delay));
                let give_up_at =
                    to_ms(received_at).saturating_add(duration_ms(self.config.retry_until));
                if due <= give_up_at {
                    activity.outcome = "retry";
                    activity.detail = format!(
                        "attempt {attempts} failed: {reason}; next in {}",
                        crate::config::format_duration(delay)
                    );
                    batch.activity.push(activity);
                    self.notify.insert(site.clone());
                    return match self.index.requeue(&site, job, action, due) {
                        Requeue::Pending => {
                            sqlx::query(
                                "UPDATE jobs SET state = 'pending', next_run_at = ?, \
                                 last_error = ?, updated_at = ? WHERE id = ?",
                            )
                            .bind(due)
                            .bind(reason)
                            .bind(now)
                            .bind(job.0)
                            .execute(&mut *tx)
                            .await?;
                            Ok(())
                        }
                        Requeue::MergeInto { job: into, action } => {
                            fold_into(tx, job, into, action, now, "newer delivery pending").await?;
                            batch.outcomes.push((job, Some(into), None));
                            Ok(())
                        }
                    };
                }
                activity.outcome = "dead";
                activity.detail = format!("gave up after {attempts} attempts: {reason}");
                let outcome = JobOutcome::Dead {
                    reason: reason.clone(),
                };
                ("dead", "dead".to_owned(), Some(reason), outcome)
            }
        };
        sqlx::query(
            "UPDATE jobs SET state = ?, result = ?, last_error = COALESCE(?, last_error), \
             finished_at = ?, updated_at = ? WHERE id = ?",
        )
        .bind(state)
        .bind(result)
        .bind(error)
        .bind(now)
        .bind(now)
        .bind(job.0)
        .execute(&mut *tx)
        .await?;
        if self.index.finish(&site, job).is_some() {
            self.notify.insert(site);
        }
        batch.activity.push(activity);
        batch.outcomes.push((job, None, Some(outcome)));
        Ok(())
    }

    /// A `dead` or `failed` job runs again from its first attempt, as if it had just arrived;
    /// if its contact has a pending job already, it folds into that one.
    async fn replay(
        &mut self,
        job: JobId,
        batch: &mut Batch,
        tx: &mut SqliteConnection,
        now: i64,
    ) -> Result<bool, sqlx::Error> {
        let row = sqlx::query(
            "SELECT site, contact, action FROM jobs WHERE id = ? AND state IN ('dead', 'failed')",
        )
        .bind(job.0)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(false);
        };
        let site: Arc<str> = Arc::from(row.get::<String, _>(0));
        let contact: String = row.get(1);
        let action = Action::from_wpf_action(row.get(2)).unwrap_or(Action::Update);
        let detail = match self.index.pending_of(&site, &contact) {
            Some((into, pending_action)) => {
                let merged = pending_action.max(action);
                self.index.upgrade(&site, &contact, merged);
                fold_into(tx, job, into, merged, now, "replayed").await?;
                format!("replayed into pending job {into}")
            }
            None => {
                sqlx::query(
                    "UPDATE jobs SET state = 'pending', attempts = 0, next_run_at = ?, \
                     received_at = ?, updated_at = ?, finished_at = NULL WHERE id = ?",
                )
                .bind(now)
                .bind(now)
                .bind(now)
                .bind(job.0)
                .execute(&mut *tx)
                .await?;
                self.index
                    .insert_pending(&site, &contact, job, action, now, None);
                self.notify.insert(site.clone());
                "replayed".to_owned()
            }
        };
        batch.activity.push(Activity {
            at: from_ms(now),
            site,
            contact: Some(contact),
            action: Some(action.as_str().to_owned()),
            outcome: "replay",
            job: Some(job),
            duration: None,
            detail,
        });
        Ok(true)
    }

    /// The delay before attempt `attempts + 1`: the schedule's entry (the last one repeats),
    /// with ±20 % jitter so jobs that failed together do not retry together.
    fn backoff(&self, attempts: u32) -> Duration {
        let schedule = &self.config.retry_schedule;
        let step = (attempts.max(1) - 1) as usize;
        let base = schedule
            .get(step.min(schedule.len().saturating_sub(1)))
            .copied()
            .unwrap_or(Duration::from_secs(60));
        base.mul_f64(rand::rng().random_range(0.8..=1.2))
    }

    /// Delete finished jobs and activity older than `retention`, and expired locks. Dead
    /// jobs stay until replayed or deleted by an admin.
    async fn prune(&mut self, tx: &mut SqliteConnection, now: i64) -> Result<(), sqlx::Error> {
        let before = now.saturating_sub(duration_ms(self.config.retention));
        let jobs = sqlx::query(
            "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE finished_at < ? \
             AND state IN ('done', 'failed') LIMIT ?)",
        )
        .bind(before)
        .bind(PRUNE_CHUNK)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let activity = sqlx::query(
            "DELETE FROM activity WHERE id IN (SELECT id FROM activity WHERE at_ms < ? \
             ORDER BY id LIMIT ?)",
        )
        .bind(before)
        .bind(PRUNE_CHUNK)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("DELETE FROM locks WHERE until_ms < ?")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        if jobs + activity > 0 {
            tracing::debug!(jobs, activity, "pruned");
        }
        Ok(())
    }
}

/// A finished job's identity, as the worker reported it.
struct Finished {
    site: Arc<str>,
    job: JobId,
    action: Action,
    attempts: u32,
    received_at: SystemTime,
    took: Duration,
}

fn job_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Job, String> {
    let contact: String = row.get("contact");
    let action: String = row.get("action");
    let tags: Option<String> = row.get("payload_tags");
    let client_ip: String = row.get("client_ip");
    let body: Vec<u8> = row.get("body");
    let delivery = Delivery {
        site: Arc::from(row.get::<String, _>("site")),
        contact: ContactId::parse(&contact).ok_or("bad contact id")?,
        action: Action::from_wpf_action(&action).ok_or("bad action")?,
        role: row.get("role"),
        send_notification: row.get::<Option<bool>, _>("send_notification"),
        payload_tags: tags
            .map(|t| serde_json::from_str(&t))
            .transpose()
            .map_err(|e| format!("bad payload_tags: {e}"))?,
        request: StoredRequest {
            method: row.get("method"),
            path_and_query: row.get("target"),
            content_type: row.get("content_type"),
            body: Bytes::from(body),
            client_ip: client_ip.parse().map_err(|_| "bad client_ip")?,
            host: row.get("host"),
        },
        received_at: from_ms(row.get("received_at")),
    };
    Ok(Job {
        id: JobId(row.get("id")),
        delivery,
        attempts: u32::try_from(row.get::<i64, _>("attempts")).unwrap_or(u32::MAX),
        deliveries: u32::try_from(row.get::<i64, _>("deliveries")).unwrap_or(u32::MAX),
    })
}

impl Batch {
    /// Answer `reply` with `value` once the batch commits (or with its error).
    fn reply<T: Send + 'static>(&mut self, reply: Reply<T>, value: T) {
        self.replies.push(Box::new(move |result| {
            let _ = reply.send(result.map(|()| value));
        }));
    }

    /// Stage a merge into `job`; several merges into one job in a batch become one UPDATE.
    fn stage_merge(
        &mut self,
        job: JobId,
        action: Action,
        delivery: Box<Delivery>,
        fingerprint: u64,
        at_ms: i64,
    ) {
        match self.merges.get_mut(&job) {
            Some(m) => {
                let older_role = m.delivery.role.take();
                let older_notify = m.delivery.send_notification;
                m.action = action;
                m.delivery = delivery;
                m.delivery.role = m.delivery.role.take().or(older_role);
                m.delivery.send_notification = m.delivery.send_notification.or(older_notify);
                m.fingerprint = fingerprint;
                m.deliveries += 1;
                m.at_ms = at_ms;
            }
            None => {
                self.merges.insert(
                    job,
                    Merge {
                        action,
                        delivery,
                        fingerprint,
                        deliveries: 1,
                        at_ms,
                    },
                );
            }
        }
    }

    /// Send the staged writes, opening the batch's transaction first if it is not: before a
    /// command that reads or writes the file itself (lease, finish, lock …), so it sees them.
    async fn flush(&mut self, conn: &mut SqliteConnection) -> Result<(), sqlx::Error> {
        let mut script = Script::default();
        self.open_transaction(&mut script);
        self.stage_writes(&mut script)?;
        script.run(conn).await
    }

    /// The batch's last call: the staged writes and `COMMIT`, in one script (with `BEGIN` in
    /// front when nothing opened the transaction yet). A batch that wrote nothing (only
    /// `depth` questions) sends nothing.
    async fn commit(&mut self, conn: &mut SqliteConnection) -> Result<(), sqlx::Error> {
        let mut script = Script::default();
        if !self.open && !self.has_writes() {
            return Ok(());
        }
        self.open_transaction(&mut script);
        self.stage_writes(&mut script)?;
        script.push("COMMIT");
        script.run(conn).await
    }

    fn open_transaction(&mut self, script: &mut Script) {
        if !self.open {
            // IMMEDIATE: the write lock is taken now, not at the first write (one writer
            // anyway; it makes a locked file an error of BEGIN, not of a later statement).
            script.push("BEGIN IMMEDIATE");
            self.open = true;
        }
    }

    fn has_writes(&self) -> bool {
        !self.inserts.is_empty() || !self.merges.is_empty() || !self.activity.is_empty()
    }

    /// The staged inserts, merges and activity lines as statements of `script`; their values
    /// move into it.
    fn stage_writes(&mut self, script: &mut Script) -> Result<(), sqlx::Error> {
        script.rows(Rows::Jobs, std::mem::take(&mut self.inserts), |s, j| {
            let mut d = *j.delivery;
            s.bind(j.id.0)?;
            s.bind(d.site.to_string())?;
            s.bind(d.contact.as_str().to_owned())?;
            s.bind(d.action.as_str())?;
            bind_delivered(s, &mut d)?;
            s.bind(j.fingerprint as i64)?;
            s.bind(to_ms(d.received_at))?;
            s.bind(j.at_ms)
        })?;
        let merges: Vec<(JobId, Merge)> = self.merges.drain().collect();
        script.rows(Rows::Merges, merges, |s, (job, mut m)| {
            s.bind(job.0)?;
            s.bind(m.action.as_str())?;
            bind_delivered(s, &mut m.delivery)?;
            s.bind(m.fingerprint as i64)?;
            s.bind(m.deliveries)?;
            s.bind(m.at_ms)
        })?;
        script.rows(
            Rows::Activity,
            std::mem::take(&mut self.activity),
            |s, a| {
                s.bind(to_ms(a.at))?;
                s.bind(a.site.to_string())?;
                s.bind(a.contact)?;
                s.bind(a.action)?;
                s.bind(a.outcome)?;
                s.bind(a.job.map(|j| j.0))?;
                s.bind(a.duration.map(duration_ms))?;
                s.bind(a.detail)
            },
        )
    }
}

/// What a new job and a merge both write of the delivery, `role` to `host` in this order
/// (taken out of it).
fn bind_delivered(s: &mut Script, d: &mut Delivery) -> Result<(), sqlx::Error> {
    s.bind(d.role.take())?;
    s.bind(d.send_notification)?;
    s.bind(tags_json(&d.payload_tags))?;
    s.bind(std::mem::take(&mut d.request.method))?;
    s.bind(std::mem::take(&mut d.request.path_and_query))?;
    s.bind(d.request.content_type.take())?;
    s.bind(Vec::from(std::mem::take(&mut d.request.body)))?;
    s.bind(d.request.client_ip.to_string())?;
    s.bind(d.request.host.take())
}

fn tags_json(tags: &Option<Vec<String>>) -> Option<String> {
    tags.as_ref()
        .map(|t| serde_json::to_string(t).unwrap_or_else(|_| "[]".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn config() -> QueueConfig {
        QueueConfig {
            durability: Durability::Os,
            queue_max: 100,
            retention: Duration::from_secs(3600),
            retry_schedule: vec![Duration::from_millis(1)],
            retry_until: Duration::from_millis(50),
            commit_window: Duration::ZERO,
        }
    }

    fn delivery(contact: &str, action: Action, body: &str) -> Delivery {
        Delivery {
            site: Arc::from("main"),
            contact: ContactId::parse(contact).unwrap(),
            action,
            role: None,
            send_notification: None,
            payload_tags: Some(vec!["a".into()]),
            request: StoredRequest {
                method: "POST".into(),
                path_and_query: format!("/?wpf_action={action}"),
                content_type: None,
                body: Bytes::from(body.to_owned()),
                client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                host: Some("example.com".into()),
            },
            received_at: SystemTime::now(),
        }
    }

    /// The last ten activity lines, newest first.
    async fn recent_activity(q: &SqliteQueue) -> impl Iterator<Item = ActivityRow> {
        let filter = ActivityFilter {
            limit: 10,
            ..Default::default()
        };
        q.activity(&filter).await.unwrap().into_iter()
    }

    /// A queue in a new directory with room for thousands of jobs.
    async fn open_roomy() -> (tempfile::TempDir, QueueConfig, Arc<SqliteQueue>) {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config();
        cfg.queue_max = 10_000;
        let q = SqliteQueue::open(dir.path(), &cfg).await.unwrap();
        (dir, cfg, q)
    }

    async fn lease(q: &SqliteQueue) -> Option<Job> {
        match q.lease(&Arc::from("main")).await.unwrap() {
            Lease::Job(job) => Some(*job),
            Lease::Idle(_) => None,
        }
    }

    #[tokio::test]
    async fn dead_jobs_replay_from_the_first_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let q = SqliteQueue::open(dir.path(), &config()).await.unwrap();
        let (adm, _) = q
            .admit(
                delivery("7", Action::Add, "x"),
                Duration::from_secs(60),
                false,
            )
            .await
            .unwrap();
        let id = adm.job();
        tokio::time::sleep(Duration::from_millis(60)).await;
        let job = lease(&q).await.expect("due");
        assert_eq!(job.attempts, 1);
        q.retry(&job, Duration::ZERO, "down".into(), None)
            .await
            .unwrap();
        assert!(
            lease(&q).await.is_none(),
            "past retry_until: dead, not pending"
        );
        assert_eq!(q.jobs(Some("dead"), 10).await.unwrap()[0].id, id.0);
        assert!(q.replay(id).await.unwrap());
        assert!(
            !q.replay(id).await.unwrap(),
            "only dead or failed jobs replay"
        );
        let again = lease(&q).await.expect("replayed job is pending");
        assert_eq!((again.id, again.attempts), (id, 1));
        q.done(&again, Duration::ZERO, "ok".into(), None)
            .await
            .unwrap();
        let outcomes: Vec<String> = recent_activity(&q).await.map(|a| a.outcome).collect();
        assert_eq!(outcomes, ["done", "replay", "dead", "queued"]);
        q.close().await;
    }

    #[tokio::test]
    async fn replay_folds_into_a_pending_job_of_the_contact() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config();
        cfg.retry_until = Duration::ZERO;
        let q = SqliteQueue::open(dir.path(), &cfg).await.unwrap();
        let w = Duration::from_secs(60);
        let (first, _) = q
            .admit(delivery("7", Action::Add, "1"), w, false)
            .await
            .unwrap();
        let job = lease(&q).await.unwrap();
        q.retry(&job, Duration::ZERO, "down".into(), None)
            .await
            .unwrap();
        let (second, _) = q
            .admit(delivery("7", Action::UpdateTags, "2"), w, false)
            .await
            .unwrap();
        assert!(matches!(second, Admission::Queued { .. }));
        assert!(q.replay(first.job()).await.unwrap());
        let depth = q.depth().await.unwrap();
        assert_eq!((depth[0].pending, depth[0].running), (1, 0));
        let next = lease(&q).await.unwrap();
        assert_eq!(
            (next.id, next.delivery.action, next.deliveries),
            (second.job(), Action::Add, 2)
        );
        q.close().await;
    }

    /// Batches whose sizes fall on and around the chunk sizes of the multi-row statements
    /// (padded chunks, several chunks): every row is written, merged and counted once.
    #[tokio::test]
    async fn batches_of_any_size_write_every_row() {
        let (dir, cfg, q) = open_roomy().await;
        let w = Duration::from_secs(60);
        let mut next = 0;
        for size in [1, 2, 5, 64, 65, 257, 600] {
            let contacts: Vec<String> = (next..next + size).map(|c| c.to_string()).collect();
            next += size;
            // The admissions of a round are all in the channel before the writer runs (one
            // thread): new jobs in one batch, merges into them in the next, then repeats.
            for (round, body) in ["first", "second", "second"].into_iter().enumerate() {
                let admits = contacts
                    .iter()
                    .map(|c| q.admit(delivery(c, Action::UpdateTags, body), w, false));
                for result in futures_util::future::join_all(admits).await {
                    let (admission, _) = result.unwrap();
                    match round {
                        0 => assert!(matches!(admission, Admission::Queued { .. })),
                        1 => assert!(matches!(admission, Admission::Coalesced { .. })),
                        _ => assert!(matches!(admission, Admission::Duplicate { .. })),
                    }
                }
            }
        }
        let rows = q.jobs(Some("pending"), 1000).await.unwrap();
        assert_eq!(rows.len(), next);
        assert!(rows
            .iter()
            .all(|r| r.deliveries == 2 && r.action == "update_tags"));
        let lines: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM activity")
            .fetch_one(&q.reader)
            .await
            .unwrap();
        assert_eq!(
            lines,
            3 * next as i64,
            "queued, coalesced, duplicate per contact"
        );
        let job = lease(&q).await.unwrap();
        assert_eq!(
            (&job.delivery.request.body[..], job.deliveries),
            (&b"second"[..], 2)
        );
        q.close().await;
        drop(q);
        let q = SqliteQueue::open(dir.path(), &cfg).await.unwrap();
        assert_eq!(q.depth().await.unwrap()[0].pending, next as u64);
        q.close().await;
    }

    /// A batch that fails half way (here: a job id taken behind the queue's back) is rolled
    /// back whole, its callers get `Unavailable`, and the next batch opens a transaction of
    /// its own and commits.
    #[tokio::test]
    async fn a_failed_batch_is_rolled_back_and_the_next_one_commits() {
        let dir = tempfile::tempdir().unwrap();
        let q = SqliteQueue::open(dir.path(), &config()).await.unwrap();
        let w = Duration::from_secs(60);
        let (first, _) = q
            .admit(delivery("1", Action::Update, "x"), w, false)
            .await
            .unwrap();
        assert_eq!(first.job(), JobId(1));
        let options = sqlite_options(q.path(), SqliteSynchronous::Normal).unwrap();
        let mut other = SqliteConnection::connect_with(&options).await.unwrap();
        sqlx::query(
            "INSERT INTO jobs (id, site, contact, action, method, target, body, client_ip, \
             fingerprint, deliveries, received_at, updated_at, next_run_at, state) \
             VALUES (2, 'main', 'x', 'update', 'POST', '/', x'', '127.0.0.1', 0, 1, 0, 0, 0, 'done')",
        )
        .execute(&mut other)
        .await
        .unwrap();
        other.close().await.unwrap();
        let failed = q.admit(delivery("2", Action::Update, "x"), w, false).await;
        assert!(
            matches!(failed, Err(QueueError::Unavailable(_))),
            "{failed:?}"
        );
        let (again, _) = q
            .admit(delivery("2", Action::Update, "x"), w, false)
            .await
            .unwrap();
        assert_eq!(again, Admission::Queued { job: JobId(3) });
        let queued: Vec<Option<i64>> = recent_activity(&q).await.map(|a| a.job).collect();
        assert_eq!(
            queued,
            [Some(3), Some(1)],
            "nothing of the failed batch stayed"
        );
        q.close().await;
    }

    /// The checkpointer copies the log into the main file shortly after commits, and the
    /// writer then starts the log again from its beginning (it does not grow).
    #[tokio::test]
    async fn the_log_is_checkpointed_beside_the_writer() {
        let (_dir, _, q) = open_roomy().await;
        let w = Duration::from_secs(60);
        // Once the writer is idle: the checkpoints stop, the last one having copied it all.
        let settled = || {
            let q = &q;
            async move {
                for _ in 0..20 {
                    let before = q.checkpoints();
                    // Several intervals, plus room for a checkpoint slowed by a busy disk.
                    let quiet = crate::queue::checkpoint::CHECKPOINT_AFTER * 3;
                    tokio::time::sleep(quiet + Duration::from_millis(500)).await;
                    let after = q.checkpoints();
                    if before == after && after.0 > 0 {
                        return after;
                    }
                }
                panic!("checkpoints did not settle");
            }
        };
        assert_eq!(q.checkpoints().0, 0, "nothing committed, nothing to do");
        for c in 0..200 {
            q.admit(delivery(&c.to_string(), Action::Update, "x"), w, false)
                .await
                .unwrap();
        }
        let (_, log, done) = settled().await;
        assert!(log > 200, "one commit per admission: {log} frames");
        assert_eq!(done, log, "idle writer: checkpointed to the end");
        q.admit(delivery("new", Action::Update, "x"), w, false)
            .await
            .unwrap();
        let (_, log_after, done_after) = settled().await;
        assert!(
            log_after < 20,
            "the log started again from its beginning: {log_after} frames"
        );
        assert_eq!(done_after, log_after);
        q.close().await;
    }

    #[test]
    fn lock_keys_on_the_stack_and_on_the_heap_agree() {
        let long = "c".repeat(400);
        for contact in ["42", "email:ann@example.com", "", long.as_str()] {
            let built = with_lock_key("shop", contact, str::to_owned);
            assert_eq!(built, lock_key("shop", contact));
        }
        // The separator keeps (site, contact) pairs apart.
        assert_ne!(lock_key("shop", "1"), lock_key("shop1", ""));
    }

    #[tokio::test]
    async fn unlock_lifts_a_lock_durably() {
        let dir = tempfile::tempdir().unwrap();
        let site: Arc<str> = Arc::from("main");
        let c = ContactId::parse("9").unwrap();
        let q = SqliteQueue::open(dir.path(), &config()).await.unwrap();
        q.lock(&site, &c, Duration::from_secs(60)).await.unwrap();
        assert!(q.locked_for(&site, &c).is_some());
        assert!(q.unlock(&site, &c).await.unwrap());
        assert!(q.locked_for(&site, &c).is_none());
        assert!(!q.unlock(&site, &c).await.unwrap());
        q.close().await;
        drop(q);
        let q = SqliteQueue::open(dir.path(), &config()).await.unwrap();
        assert!(
            q.locked_for(&site, &c).is_none(),
            "unlock survives a restart"
        );
        q.close().await;
    }
}
