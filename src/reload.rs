//! Live reload (SIGHUP, or a [`crate::ReloadHandle`]): the config file is read again and, if
//! it is valid, its sites, upstreams, keys, limits, workers and certificates take over without
//! dropping a connection or a queued job.
//!
//! ```text
//! read + validate (FILE:LINE errors: keep running as before)
//!   -> note what needs a restart ([server] with listen and data_dir, queue, admin, log,
//!      tls.listen)
//!   -> build the new routing (router, front door, proxy) -> swap it in (new requests use it;
//!      the admin listener reads its sites from it too)
//!   -> restart the workers (the old ones finish the job they hold)
//!   -> certificates: the new [[tls.cert]] list, all or nothing, for new handshakes (the same
//!      list: each read again); the file watch follows the list served
//! ```
//!
//! Requests already in flight keep the routing they started with, TLS connections the
//! certificate they shook hands with; jobs stay in the durable queue throughout, so restarting
//! the workers loses nothing. Certificates come last: when they fail, the rest stays reloaded
//! and the reload is reported as failed, naming the files.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{self, Config};
use crate::metrics::Metrics;
use crate::queue::SqliteQueue;
use crate::{tls, Gateway, ReloadError, Workers};

/// What a reload needs of the running gateway.
pub(crate) struct Reloader {
    pub config: Config,
    pub gateway: Arc<Gateway>,
    pub queue: Arc<SqliteQueue>,
    pub metrics: Arc<Metrics>,
    pub certs: Option<Arc<tls::CertStore>>,
    pub processing: Arc<crate::Processing>,
    pub workers: Workers,
}

impl Reloader {
    /// Reload the configuration, then the certificates. An invalid file changes nothing.
    pub async fn reload(&mut self) -> Result<(), ReloadError> {
        let new = config::load(&self.config.source).map_err(|e| {
            for line in e.to_string().lines() {
                tracing::error!(
                    problem = line,
                    "reload refused: the configuration is invalid"
                );
            }
            ReloadError::Config(e)
        })?;
        for key in needs_restart(&self.config, &new) {
            tracing::warn!(key, "changed, but takes effect only after a restart");
        }
        let routing = crate::Routing::new(&new, &self.queue, &self.metrics)
            .map_err(|e| ReloadError::Build(Box::new(e)))?;
        let processors = self
            .processing
            .processors(&new)
            .await
            .map_err(|e| ReloadError::Build(Box::new(e)))?;
        self.gateway.swap_routing(routing);
        self.workers
            .restart(&new, &self.queue, &self.metrics, processors);
        self.config = new;
        tracing::info!(sites = self.config.sites.len(), "configuration reloaded");
        match &self.certs {
            Some(certs) => certs
                .reload_from(&self.config.tls)
                .map_err(ReloadError::from),
            // No HTTPS at start: adding `[tls]` changes `tls.listen`, a restart (warned above).
            None => Ok(()),
        }
    }
}

/// The parts of the configuration a reload cannot apply, by key, when they changed.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    // The config structs compare by their Debug form: it covers every field, and secrets
    // print masked (none of these sections holds one).
    fn differ<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
        format!("{a:?}") != format!("{b:?}")
    }
    let mut keys = Vec::new();
    if differ(&old.server, &new.server) {
        keys.push("server");
    }
    if differ(&old.queue, &new.queue) {
        keys.push("queue");
    }
    if differ(&old.admin, &new.admin) {
        keys.push("admin");
    }
    if differ(&old.log, &new.log) {
        keys.push("log");
    }
    // Sockets are bound once, by the caller. The certificate list reloads (`tls::CertStore`).
    if differ(&old.tls.listen, &new.tls.listen) {
        keys.push("tls.listen");
    }
    keys
}

impl Workers {
    /// The workers of one configuration, stopped by `root` (shutdown) or by a restart.
    pub(crate) fn new(tracker: TaskTracker, root: CancellationToken) -> Self {
        let generation = root.child_token();
        Workers {
            tracker,
            root,
            generation,
        }
    }

    /// Stop the current workers (each finishes the job it holds) and start `processors`.
    pub(crate) fn restart(
        &mut self,
        config: &Config,
        queue: &Arc<SqliteQueue>,
        metrics: &Arc<Metrics>,
        processors: Vec<crate::SiteProcessor>,
    ) {
        self.generation.cancel();
        self.generation = self.root.child_token();
        self.start(config, queue, metrics, processors);
    }

    /// Start `processors` (built by [`crate::processors`]) in the current generation.
    pub(crate) fn start(
        &self,
        config: &Config,
        queue: &Arc<SqliteQueue>,
        metrics: &Arc<Metrics>,
        processors: Vec<crate::SiteProcessor>,
    ) {
        for (site, processor) in processors {
            let workers = config
                .sites
                .iter()
                .find(|s| s.name == *site)
                .map_or(1, |s| s.workers);
            crate::worker::Worker::spawn(
                workers,
                site,
                queue.clone(),
                processor,
                metrics.clone(),
                &self.tracker,
                self.generation.clone(),
            );
        }
    }
}
