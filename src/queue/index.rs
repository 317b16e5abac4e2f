//! The queue's in-memory index: which job of each contact is running and which is pending,
//! which pending jobs are ready to run, and the recent deliveries of each pending job (for
//! exact-repeat detection). Pure bookkeeping, no I/O: the queue's writer task owns the one
//! instance and keeps it in step with SQLite, which stays the truth (the index is rebuilt
//! from it on start, and after a failed commit).
//!
//! Invariants, per (site, contact):
//! - at most one job `running` and at most one `pending`;
//! - a pending job is *ready* (in `ready`, leasable once due) only while no job of its
//!   contact runs, so two jobs of one contact never run at once.
//!
//! A plain `HashMap` (foldhash: the keys are short, and this runs on the writer, which every
//! webhook passes through) rather than a TTL cache: an entry evicted from the index would let a
//! second pending job appear for the same contact, so the index must never forget one.

use std::collections::BTreeSet;
use std::sync::Arc;

use foldhash::HashMap;

use super::{Action, JobId};

/// How many recent delivery fingerprints a pending job remembers for exact-repeat detection.
const RECENT_DELIVERIES: usize = 16;

/// What the queue should do with a new delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// No pending job for the contact: create one.
    New,
    /// Merge into the contact's pending job; `action` is the merged (strongest) action.
    Merge { job: JobId, action: Action },
    /// The same delivery is already pending.
    Duplicate { job: JobId },
}

/// What happens to a job that failed transiently and must run again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requeue {
    /// It is the contact's pending job again, due at the given time.
    Pending,
    /// A newer job of the contact is already pending: the failed job folds into it (the newer
    /// one loads the newest CRM state anyway); `action` is the merged action.
    MergeInto { job: JobId, action: Action },
}

#[derive(Debug)]
struct Pending {
    id: JobId,
    action: Action,
    due_ms: i64,
    /// (fingerprint, received at ms) of the newest deliveries merged into this job.
    recent: Vec<(u64, i64)>,
}

#[derive(Debug, Default)]
struct Slot {
    running: Option<JobId>,
    pending: Option<Pending>,
}

#[derive(Debug, Default)]
struct SiteIndex {
    slots: HashMap<Box<str>, Slot>,
    /// Ready pending jobs by (due time, id): the lease order.
    ready: BTreeSet<(i64, JobId)>,
    /// The contact of every pending or running job.
    contact_of: HashMap<JobId, Box<str>>,
}

/// The index of all sites' unfinished jobs.
#[derive(Debug, Default)]
pub struct Index {
    sites: HashMap<Arc<str>, SiteIndex>,
    /// Pending + running jobs.
    active: u64,
}

impl Index {
    /// Pending + running jobs, all sites.
    pub fn active(&self) -> u64 {
        self.active
    }

    /// The sites that have (or had) unfinished jobs.
    pub fn sites(&self) -> impl Iterator<Item = &str> {
        self.sites.keys().map(|s| &**s)
    }

    /// (pending, running) jobs of a site.
    pub fn depth(&self, site: &str) -> (u64, u64) {
        let Some(s) = self.sites.get(site) else {
            return (0, 0);
        };
        let running = s.slots.values().filter(|v| v.running.is_some()).count() as u64;
        (s.contact_of.len() as u64 - running, running)
    }

    /// Decide what a delivery with fingerprint `fp` for `contact` becomes.
    pub fn decide(
        &self,
        site: &str,
        contact: &str,
        action: Action,
        fp: u64,
        now_ms: i64,
        dedupe_window_ms: i64,
    ) -> Decision {
        let pending = self
            .sites
            .get(site)
            .and_then(|s| s.slots.get(contact))
            .and_then(|slot| slot.pending.as_ref());
        match pending {
            None => Decision::New,
            Some(p) => {
                let repeat = p
                    .recent
                    .iter()
                    .any(|&(f, at)| f == fp && now_ms - at <= dedupe_window_ms);
                if repeat {
                    Decision::Duplicate { job: p.id }
                } else {
                    Decision::Merge {
                        job: p.id,
                        action: p.action.max(action),
                    }
                }
            }
        }
    }

    /// Record a new pending job (the contact must have none: [`Decision::New`]).
    pub fn insert_pending(
        &mut self,
        site: &Arc<str>,
        contact: &str,
        id: JobId,
        action: Action,
        due_ms: i64,
        fp: Option<(u64, i64)>,
    ) {
        let s = self.sites.entry(site.clone()).or_default();
        let slot = s.slots.entry(contact.into()).or_default();
        slot.pending = Some(Pending {
            id,
            action,
            due_ms,
            recent: fp.into_iter().collect(),
        });
        if slot.running.is_none() {
            s.ready.insert((due_ms, id));
        }
        s.contact_of.insert(id, contact.into());
        self.active += 1;
    }

    /// Record a job found `running` in the store (rebuilding the index while the gateway runs).
    pub fn insert_running(&mut self, site: &Arc<str>, contact: &str, id: JobId) {
        let s = self.sites.entry(site.clone()).or_default();
        s.slots.entry(contact.into()).or_default().running = Some(id);
        s.contact_of.insert(id, contact.into());
        self.active += 1;
    }

    /// The contact's pending job and its action, if any.
    pub fn pending_of(&self, site: &str, contact: &str) -> Option<(JobId, Action)> {
        let p = self.sites.get(site)?.slots.get(contact)?.pending.as_ref()?;
        Some((p.id, p.action))
    }

    /// Record a delivery merged into the contact's pending job.
    pub fn merge(&mut self, site: &str, contact: &str, action: Action, fp: (u64, i64)) {
        let Some(p) = self.pending_mut(site, contact) else {
            return;
        };
        p.action = p.action.max(action);
        if p.recent.len() >= RECENT_DELIVERIES {
            p.recent.remove(0);
        }
        p.recent.push(fp);
    }

    /// Raise the action of the contact's pending job (another job folded into it).
    pub fn upgrade(&mut self, site: &str, contact: &str, action: Action) {
        if let Some(p) = self.pending_mut(site, contact) {
            p.action = p.action.max(action);
        }
    }

    fn pending_mut(&mut self, site: &str, contact: &str) -> Option<&mut Pending> {
        self.sites
            .get_mut(site)?
            .slots
            .get_mut(contact)?
            .pending
            .as_mut()
    }

    /// The oldest ready job of `site` due by `now_ms`, now marked running; else the time the
    /// next ready job is due, if any.
    pub fn lease(&mut self, site: &str, now_ms: i64) -> Result<JobId, Option<i64>> {
        let Some(s) = self.sites.get_mut(site) else {
            return Err(None);
        };
        let Some(&(due, id)) = s.ready.first() else {
            return Err(None);
        };
        if due > now_ms {
            return Err(Some(due));
        }
        s.ready.remove(&(due, id));
        if let Some(slot) = s.contact_of.get(&id).and_then(|c| s.slots.get_mut(c)) {
            slot.pending = None;
            slot.running = Some(id);
        }
        Ok(id)
    }

    /// A running job ended for good (done, failed, dead). Returns the contact's pending job if
    /// it just became ready.
    pub fn finish(&mut self, site: &str, id: JobId) -> Option<JobId> {
        let s = self.sites.get_mut(site)?;
        let contact = s.contact_of.remove(&id)?;
        self.active = self.active.saturating_sub(1);
        let slot = s.slots.get_mut(&contact)?;
        if slot.running == Some(id) {
            slot.running = None;
        }
        let released = match &slot.pending {
            Some(p) if slot.running.is_none() => {
                s.ready.insert((p.due_ms, p.id));
                Some(p.id)
            }
            _ => None,
        };
        if slot.running.is_none() && slot.pending.is_none() {
            s.slots.remove(&contact);
        }
        released
    }

    /// A running job failed transiently: it becomes pending again, due at `due_ms`, unless a
    /// newer job of its contact is pending already ([`Requeue::MergeInto`]; the failed job is
    /// then finished and the newer one is ready).
    pub fn requeue(&mut self, site: &str, id: JobId, action: Action, due_ms: i64) -> Requeue {
        let Some(s) = self.sites.get_mut(site) else {
            return Requeue::Pending;
        };
        let Some(contact) = s.contact_of.get(&id).cloned() else {
            return Requeue::Pending;
        };
        let slot = s.slots.entry(contact).or_default();
        if slot.running == Some(id) {
            slot.running = None;
        }
        match &mut slot.pending {
            Some(p) => {
                p.action = p.action.max(action);
                let merged = Requeue::MergeInto {
                    job: p.id,
                    action: p.action,
                };
                s.ready.insert((p.due_ms, p.id));
                s.contact_of.remove(&id);
                self.active = self.active.saturating_sub(1);
                merged
            }
            None => {
                slot.pending = Some(Pending {
                    id,
                    action,
                    due_ms,
                    recent: Vec::new(),
                });
                s.ready.insert((due_ms, id));
                Requeue::Pending
            }
        }
    }

    /// The contact of an unfinished job, if any.
    pub fn contact_of(&self, site: &str, id: JobId) -> Option<&str> {
        self.sites.get(site)?.contact_of.get(&id).map(|c| &**c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: i64 = 300_000;

    fn site() -> Arc<str> {
        Arc::from("main")
    }

    #[test]
    fn one_pending_per_contact_merges_and_upgrades() {
        let mut ix = Index::default();
        let s = site();
        assert_eq!(ix.decide(&s, "7", Action::Update, 1, 0, W), Decision::New);
        ix.insert_pending(&s, "7", JobId(1), Action::Update, 0, Some((1, 0)));
        assert_eq!(
            ix.decide(&s, "7", Action::UpdateTags, 2, 1, W),
            Decision::Merge {
                job: JobId(1),
                action: Action::Update
            }
        );
        ix.merge(&s, "7", Action::Add, (2, 1));
        assert_eq!(
            ix.decide(&s, "7", Action::UpdateTags, 3, 2, W),
            Decision::Merge {
                job: JobId(1),
                action: Action::Add
            }
        );
        assert_eq!(ix.active(), 1);
        assert_eq!(ix.depth(&s), (1, 0));
    }

    #[test]
    fn exact_repeat_within_window_is_duplicate() {
        let mut ix = Index::default();
        let s = site();
        ix.insert_pending(&s, "7", JobId(1), Action::Update, 0, Some((42, 0)));
        assert_eq!(
            ix.decide(&s, "7", Action::Update, 42, 10, W),
            Decision::Duplicate { job: JobId(1) }
        );
        // Outside the window the same delivery is news again.
        assert!(matches!(
            ix.decide(&s, "7", Action::Update, 42, W + 1, W),
            Decision::Merge { .. }
        ));
    }

    #[test]
    fn running_contact_gets_a_pending_job_that_waits() {
        let mut ix = Index::default();
        let s = site();
        ix.insert_pending(&s, "7", JobId(1), Action::Update, 0, None);
        assert_eq!(ix.lease(&s, 0), Ok(JobId(1)));
        // A webhook during the run is a new pending job, not ready while job 1 runs.
        assert_eq!(
            ix.decide(&s, "7", Action::UpdateTags, 9, 1, W),
            Decision::New
        );
        ix.insert_pending(&s, "7", JobId(2), Action::UpdateTags, 1, None);
        assert_eq!(ix.lease(&s, 10), Err(None));
        assert_eq!(ix.depth(&s), (1, 1));
        assert_eq!(ix.finish(&s, JobId(1)), Some(JobId(2)));
        assert_eq!(ix.lease(&s, 10), Ok(JobId(2)));
        assert_eq!(ix.finish(&s, JobId(2)), None);
        assert_eq!(ix.active(), 0);
        assert_eq!(ix.depth(&s), (0, 0));
    }

    #[test]
    fn lease_in_due_order_and_reports_next_due() {
        let mut ix = Index::default();
        let s = site();
        ix.insert_pending(&s, "a", JobId(1), Action::Update, 50, None);
        ix.insert_pending(&s, "b", JobId(2), Action::Update, 10, None);
        assert_eq!(ix.lease(&s, 5), Err(Some(10)));
        assert_eq!(ix.lease(&s, 60), Ok(JobId(2)));
        assert_eq!(ix.lease(&s, 60), Ok(JobId(1)));
        assert_eq!(ix.lease(&s, 60), Err(None));
    }

    #[test]
    fn requeue_alone_or_into_newer_pending() {
        let mut ix = Index::default();
        let s = site();
        ix.insert_pending(&s, "7", JobId(1), Action::Add, 0, None);
        assert_eq!(ix.lease(&s, 0), Ok(JobId(1)));
        assert_eq!(ix.requeue(&s, JobId(1), Action::Add, 100), Requeue::Pending);
        assert_eq!(ix.lease(&s, 50), Err(Some(100)));
        assert_eq!(ix.lease(&s, 100), Ok(JobId(1)));
        ix.insert_pending(&s, "7", JobId(2), Action::UpdateTags, 120, None);
        assert_eq!(
            ix.requeue(&s, JobId(1), Action::Add, 500),
            Requeue::MergeInto {
                job: JobId(2),
                action: Action::Add
            }
        );
        assert_eq!(ix.active(), 1);
        assert_eq!(ix.lease(&s, 120), Ok(JobId(2)));
    }
}
