//! Workers: take due jobs of a site from the durable queue, run them through the site's
//! [`Processor`], and record the result. The only place that decides between done, retry and
//! permanent failure is [`Worker::finish`], from the [`ProcessError`] kind.
//!
//! ```text
//! lease (oldest due job whose contact is not running) -> process -> done | retry | fail
//!   ^                                                                   |
//!   +---- wait: new work (notify) or the next retry time, or shutdown --+
//! ```

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::metrics::Metrics;
use crate::queue::{BoxFuture, Job, Lease, SqliteQueue};

/// Runs one job. Implementations: relay mode (forward to the site) and direct mode (CRM ->
/// user store).
pub trait Processor: Send + Sync + 'static {
    /// Process `job`; `Ok` says what was done.
    fn process<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<Processed, ProcessError>>;
}

/// What a processor did with a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Processed {
    /// One line for the activity log.
    pub detail: String,
    /// Structured detail for a sync answer (direct mode: the contact loaded, the user
    /// changed). Never holds secrets.
    pub report: Option<serde_json::Value>,
}

impl From<String> for Processed {
    fn from(detail: String) -> Self {
        Processed {
            detail,
            report: None,
        }
    }
}

/// Why processing failed, and whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// Unreachable, timed out, 5xx, 429, the site's own lock: retried on the schedule (or after
    /// `retry_after` when the far side said how long to wait).
    #[error("{reason}")]
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Contact not found, no matching user, rejected: recorded, not retried.
    #[error("{code}: {reason}")]
    Permanent { code: &'static str, reason: String },
}

/// How long a worker sleeps after the queue itself failed before trying again.
const QUEUE_ERROR_BACKOFF: Duration = Duration::from_secs(1);
/// Longest sleep without re-checking the queue (covers a retry time set by another worker).
const MAX_IDLE_WAIT: Duration = Duration::from_secs(5);

/// One worker loop of one site.
pub struct Worker {
    site: Arc<str>,
    queue: Arc<SqliteQueue>,
    processor: Arc<dyn Processor>,
    metrics: Arc<Metrics>,
}

impl Worker {
    /// Start `count` workers for `site` on `tracker`; they stop when `shutdown` is cancelled,
    /// after finishing the job they hold (an unfinished job stays `running` in the queue and
    /// is picked up again on the next start).
    pub fn spawn(
        count: usize,
        site: Arc<str>,
        queue: Arc<SqliteQueue>,
        processor: Arc<dyn Processor>,
        metrics: Arc<Metrics>,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) {
        for n in 0..count.max(1) {
            let worker = Worker {
                site: site.clone(),
                queue: queue.clone(),
                processor: processor.clone(),
                metrics: metrics.clone(),
            };
            let span = tracing::info_span!("worker", site = %site, n);
            tracker.spawn(worker.run(shutdown.clone()).instrument(span));
        }
    }

    async fn run(self, shutdown: CancellationToken) {
        let notify = self.queue.notifier(&self.site);
        while !shutdown.is_cancelled() {
            // Registered before the lease, so a job made ready meanwhile still wakes us.
            let work = notify.notified();
            tokio::pin!(work);
            work.as_mut().enable();
            let wait = match self.queue.lease(&self.site).await {
                Ok(Lease::Job(job)) => {
                    self.run_job(*job).await;
                    continue;
                }
                Ok(Lease::Idle(next_due)) => next_due.unwrap_or(MAX_IDLE_WAIT),
                Err(e) => {
                    tracing::error!(error = %e, "cannot lease a job");
                    QUEUE_ERROR_BACKOFF
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = work => {}
                _ = tokio::time::sleep(wait.min(MAX_IDLE_WAIT)) => {}
            }
        }
    }

    #[tracing::instrument(skip_all, fields(job = %job.id, contact = %job.delivery.contact, action = %job.delivery.action))]
    async fn run_job(&self, job: Job) {
        let started = std::time::Instant::now();
        let result = self.processor.process(&job).await;
        self.finish(&job, started.elapsed(), result).await;
    }

    /// Record the result: the one place that branches on transient vs permanent. The job's
    /// latency (first delivery to now) is observed here, by outcome.
    async fn finish(&self, job: &Job, took: Duration, result: Result<Processed, ProcessError>) {
        let outcome = match &result {
            Ok(_) => "done",
            Err(ProcessError::Transient { .. }) => "retry",
            Err(ProcessError::Permanent { .. }) => "failed",
        };
        // A clock set back makes the age unknown; count it as zero rather than not at all.
        let age = job.delivery.received_at.elapsed().unwrap_or_default();
        self.metrics.job(&self.site, outcome, age);
        let recorded = match result {
            Ok(Processed { detail, report }) => {
                tracing::debug!(%detail, "job done");
                self.queue
                    .done(job, took, detail, report.map(Arc::new))
                    .await
            }
            Err(ProcessError::Transient {
                reason,
                retry_after,
            }) => {
                tracing::info!(%reason, attempts = job.attempts, "job will be retried");
                self.queue.retry(job, took, reason, retry_after).await
            }
            Err(ProcessError::Permanent { code, reason }) => {
                tracing::info!(code, %reason, "job failed permanently");
                self.queue.fail(job, took, code, reason).await
            }
        };
        if let Err(e) = recorded {
            // The job stays `running` in the queue; it is picked up again after a restart.
            tracing::error!(error = %e, "cannot record the job's result");
        }
    }
}
