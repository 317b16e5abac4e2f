//! WAL checkpoints off the writer's path.
//!
//! SQLite's automatic checkpoint runs inside the `COMMIT` that takes the write-ahead log past
//! `wal_autocheckpoint` pages (1,000 by default): about twice a second under load the writer
//! copied the log into the main file and fsynced it (~5 ms) while every webhook of the next
//! batch waited. Here a task with a connection of its own runs a `PASSIVE` checkpoint shortly
//! after commits happen ([`CHECKPOINT_AFTER`]); a passive checkpoint never waits for the writer
//! and the writer never waits for it (WAL: appending and checkpointing go on side by side).
//!
//! SQLite starts the log again from its beginning only when a write finds it checkpointed to
//! the end, which under steady writes a checkpointer beside the writer rarely sees. So the
//! writer keeps an automatic checkpoint as a backstop at [`WAL_BACKSTOP_PAGES`]: rarely, and
//! with little left to copy, since this task has copied the rest.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection, SqliteConnection};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How long after a commit the checkpoint runs: the commits of that time share it.
///
/// Short on purpose. The checkpoint ends with an fsync of the main file, and the commits
/// fsyncing the log meanwhile wait behind it in the disk's queue: the longer the interval, the
/// more pages that fsync carries and the longer those commits stall. At 5,000 webhooks/s,
/// 250 ms made batches of > 8 ms (each one a p99 answer) two to three times as often as 50 ms;
/// 1 s was no better than 250 ms; webhooks/s measured the same at 50 and 250 ms
/// (bench/PIPELINE.md, "Stop 12").
pub(super) const CHECKPOINT_AFTER: Duration = Duration::from_millis(50);

/// `wal_autocheckpoint` of the writer's connection: the log size (pages of 4 KiB) at which
/// the writer checkpoints itself, should this task fall behind (40 MiB).
pub(super) const WAL_BACKSTOP_PAGES: u32 = 10_000;

/// What the checkpoints did, for tests and logs.
#[derive(Debug, Default)]
pub(super) struct CheckpointStats {
    /// Checkpoints run.
    pub runs: AtomicU64,
    /// Frames in the log at the last checkpoint, and how many of them are in the main file.
    pub log_frames: AtomicI64,
    pub checkpointed_frames: AtomicI64,
}

/// The checkpointer task; stop it with [`stop`](Self::stop) before the writer's last
/// checkpoint on close.
pub(super) struct Checkpointer {
    commits: mpsc::Sender<()>,
    task: JoinHandle<()>,
    pub(super) stats: Arc<CheckpointStats>,
}

impl Checkpointer {
    /// Connect (with the writer's options: the checkpoint fsyncs as the commits do) and start.
    pub(super) async fn start(options: &SqliteConnectOptions) -> Result<Self, sqlx::Error> {
        let mut conn = SqliteConnection::connect_with(options).await?;
        let stats = Arc::new(CheckpointStats::default());
        let (commits, mut committed) = mpsc::channel::<()>(1);
        let task = {
            let stats = stats.clone();
            tokio::spawn(async move {
                while committed.recv().await.is_some() {
                    tokio::time::sleep(CHECKPOINT_AFTER).await;
                    // A commit signalled during the sleep is covered by this checkpoint.
                    let _ = committed.try_recv();
                    match passive_checkpoint(&mut conn).await {
                        Ok((log, done)) => {
                            stats.log_frames.store(log, Ordering::Relaxed);
                            stats.checkpointed_frames.store(done, Ordering::Relaxed);
                            stats.runs.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
                    }
                }
                if let Err(e) = conn.close().await {
                    tracing::debug!(error = %e, "checkpoint connection close");
                }
            })
        };
        Ok(Checkpointer {
            commits,
            task,
            stats,
        })
    }

    /// A commit happened (never waits).
    pub(super) fn committed(&self) {
        let _ = self.commits.try_send(());
    }

    /// Run what is due and end the task.
    pub(super) async fn stop(self) {
        drop(self.commits);
        let _ = self.task.await;
    }
}

/// `PRAGMA wal_checkpoint(PASSIVE)`: (frames in the log, frames in the main file).
async fn passive_checkpoint(conn: &mut SqliteConnection) -> Result<(i64, i64), sqlx::Error> {
    let (_busy, log, checkpointed): (i64, i64, i64) =
        sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(conn)
            .await?;
    Ok((log, checkpointed))
}
