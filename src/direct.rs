//! Direct mode: the gateway does what WP Fusion's webhook handler does inside the site, so the
//! site spends no PHP on webhooks. One job, one contact:
//!
//! ```text
//! job -> what the CRM says (payload tags for update_tags, else load the contact: paced)
//!     -> the change (tags; update/add: mapped fields and an allowed role)
//!     -> add of a new user: username, password, role; return password -> lock, write to CRM
//!     -> store.apply (one transaction: find by contact id, else email; update or create)
//!     -> welcome mail (add, send_notification, created)
//!     -> notify the site ([site.store] notify; a failure retries the job) -> Processed
//! ```
//!
//! Errors keep their kind: CRM and store errors that a retry can fix are transient, the rest
//! (contact not found, no matching user, bad credentials) permanent. Where we differ from WP
//! Fusion we are safer: `administrator` is never granted, a role must be listed in
//! `[site.users] roles`, and an unknown user is never created by `update`.

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::TryRngCore;
use serde_json::json;

use crate::config::SiteConfig;
use crate::crm::{Contact, Crm, CrmError};
use crate::mail::{Mailer, Welcome};
use crate::notify::Notifier;
use crate::queue::{Action, BoxFuture, Job, SqliteQueue};
use crate::store::{Applied, NewUser, StoreError, User, UserChange, UserStore};
use crate::worker::{ProcessError, Processed, Processor};

/// `[site.fields]` keys that feed a new user instead of meta.
const USER_LOGIN: &str = "user_login";
const USER_PASS: &str = "user_pass";
/// Length of a generated password (WP Fusion generates 12; more costs nothing).
const PASSWORD_LEN: usize = 16;

/// Processes one direct-mode site's jobs.
pub struct Direct {
    site: Arc<SiteConfig>,
    site_name: Arc<str>,
    crm: Arc<dyn Crm>,
    store: Arc<dyn UserStore>,
    /// Loopback locks after the gateway's own CRM writes (return password).
    queue: Arc<SqliteQueue>,
    mailer: Option<Mailer>,
    /// `[site.store] notify = true`: tell the site after a user changed.
    notifier: Option<Notifier>,
}

impl Direct {
    pub fn new(
        site: Arc<SiteConfig>,
        crm: Arc<dyn Crm>,
        store: Arc<dyn UserStore>,
        queue: Arc<SqliteQueue>,
        mailer: Option<Mailer>,
    ) -> Self {
        Direct {
            site_name: Arc::from(site.name.as_str()),
            site,
            crm,
            store,
            queue,
            mailer,
            notifier: None,
        }
    }

    /// Tell the site (its companion mu-plugin) after each user change.
    pub fn with_notifier(mut self, notifier: Option<Notifier>) -> Self {
        self.notifier = notifier;
        self
    }

    async fn run(&self, job: &Job) -> Result<Processed, ProcessError> {
        let delivery = &job.delivery;
        let action = delivery.action;
        let site = self.site.name.as_str();
        // A contact the webhook named only by email: find it in the CRM first.
        let mut found = None;
        if let Some(email) = delivery.contact.email() {
            let contact = self.crm.find_by_email(email).await.map_err(crm_error)?;
            found = Some(contact.ok_or_else(|| ProcessError::Permanent {
                code: "contact_not_found",
                reason: format!("CRM: no contact has the email {email}"),
            })?);
        }
        let contact_id = match &found {
            Some(contact) => contact.id.as_str(),
            None => delivery.contact.as_str(),
        };

        // What the CRM says. Payload tags spare `update_tags` the CRM when the user is known
        // by contact id (finding one by email needs the contact's email: load it then).
        let mut known = None;
        let payload = match (action, &delivery.payload_tags, &found) {
            (Action::UpdateTags, Some(tags), None) => {
                known = self
                    .store
                    .by_contact(site, contact_id)
                    .await
                    .map_err(store_error)?;
                known.as_ref().map(|user| Contact {
                    id: contact_id.to_owned(),
                    email: user.email.clone(),
                    tags: tags.clone(),
                    fields: BTreeMap::new(),
                })
            }
            _ => None,
        };
        let from_payload = payload.is_some();
        let contact = match (payload, found.clone()) {
            (Some(contact), _) | (None, Some(contact)) => contact,
            (None, None) => self.crm.load_contact(contact_id).await.map_err(crm_error)?,
        };

        let mut change = UserChange {
            contact_id: contact_id.to_owned(),
            email: contact.email.trim().to_owned(),
            tags: contact.tags.clone(),
            ..UserChange::default()
        };
        let mut notes = Vec::new();
        let role = match delivery.role.as_deref() {
            Some(role) if action != Action::UpdateTags => {
                let allowed = self.allowed_role(role);
                if allowed.is_none() {
                    notes.push(format!("role {role:?} is not allowed; left unchanged"));
                }
                allowed
            }
            _ => None,
        };
        if action != Action::UpdateTags {
            change.meta = self.mapped_meta(&contact);
            change.role = role.clone();
        }
        if change.email.is_empty() {
            // The CRM holds no email (Agile CRM allows that): keep the stored one.
            if known.is_none() {
                known = self
                    .store
                    .by_contact(site, contact_id)
                    .await
                    .map_err(store_error)?;
            }
            match &known {
                Some(user) => change.email = user.email.clone(),
                None => {
                    return Err(ProcessError::Permanent {
                        code: "contact_has_no_email",
                        reason: format!(
                            "contact {contact_id} has no email and no user is linked to it"
                        ),
                    })
                }
            }
        }

        let mut generated = None;
        if action == Action::Add && !self.user_exists(contact_id, &change.email).await? {
            let (new_user, password_is_new) = self.new_user(&contact, role)?;
            if password_is_new {
                self.return_password(&contact, &new_user.password).await?;
                generated = Some(new_user.password.clone());
            }
            change.create = Some(new_user);
        }

        let applied = self.store.apply(site, change).await.map_err(store_error)?;
        if applied.created && delivery.send_notification == Some(true) {
            notes.push(
                self.welcome(&applied.user, &contact, generated.as_deref())
                    .await,
            );
        }
        // After the commit (and the mail): a failed notify retries the job, whose second run
        // finds the user up to date and notifies again; so a retry always notifies.
        if let Some(notifier) = &self.notifier {
            if !applied.changed.is_empty() || job.attempts > 1 {
                notifier
                    .user_changed(&applied.user)
                    .await
                    .map_err(|reason| ProcessError::Transient {
                        reason: format!("user saved; notifying the site failed: {reason}"),
                        retry_after: None,
                    })?;
                notes.push("site notified".into());
            }
        }
        Ok(self.processed(action, &contact, from_payload, &applied, notes))
    }

    /// `role` when the site lets webhooks grant it; `administrator` never.
    fn allowed_role(&self, role: &str) -> Option<String> {
        let listed = self.site.users.roles.iter().any(|r| r == role);
        (listed && role != "administrator").then(|| role.to_owned())
    }

    /// `[site.fields]` applied to the contact: meta key -> value, for the fields the CRM
    /// returned. The username and password sources are not meta.
    fn mapped_meta(&self, contact: &Contact) -> BTreeMap<String, String> {
        self.site
            .fields
            .iter()
            .filter(|(meta, _)| !matches!(meta.as_str(), USER_LOGIN | USER_PASS))
            .filter_map(|(meta, field)| {
                let value = contact.fields.get(field)?;
                Some((meta.clone(), value.clone()))
            })
            .collect()
    }

    /// A mapped field's non-empty value.
    fn mapped<'c>(&self, contact: &'c Contact, key: &str) -> Option<&'c str> {
        let field = self.site.fields.get(key)?;
        contact
            .fields
            .get(field)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    async fn user_exists(&self, contact_id: &str, email: &str) -> Result<bool, ProcessError> {
        let site = self.site.name.as_str();
        if self
            .store
            .by_contact(site, contact_id)
            .await
            .map_err(store_error)?
            .is_some()
        {
            return Ok(true);
        }
        Ok(self
            .store
            .by_email(site, email)
            .await
            .map_err(store_error)?
            .is_some())
    }

    /// The new user `add` creates, and whether its password was generated here.
    fn new_user(
        &self,
        contact: &Contact,
        role: Option<String>,
    ) -> Result<(NewUser, bool), ProcessError> {
        let username = self
            .mapped(contact, USER_LOGIN)
            .unwrap_or(contact.email.trim())
            .to_owned();
        let (password, generated) = match self.mapped(contact, USER_PASS) {
            Some(p) => (p.to_owned(), false),
            None => (generate_password()?, true),
        };
        let user = NewUser {
            username,
            password,
            role: role.unwrap_or_else(|| self.site.users.default_role.clone()),
        };
        Ok((user, generated))
    }

    /// Return password: lock the contact first (the CRM's echo webhook of this write must find
    /// the lock in place), then write the password to the CRM. A failed write fails the job
    /// before any user exists, so the retry generates and returns a password again.
    async fn return_password(&self, contact: &Contact, password: &str) -> Result<(), ProcessError> {
        let Some(field) = self
            .site
            .crm
            .as_ref()
            .and_then(|c| c.return_password_field.as_deref())
        else {
            return Ok(());
        };
        let id =
            crate::queue::ContactId::parse(&contact.id).ok_or_else(|| ProcessError::Permanent {
                code: "rejected",
                reason: "the CRM returned an unusable contact id".into(),
            })?;
        self.queue
            .lock(&self.site_name, &id, self.site.loopback_lock)
            .await
            .map_err(|e| ProcessError::Transient {
                reason: format!("cannot lock the contact before returning its password: {e}"),
                retry_after: None,
            })?;
        self.crm
            .update_field(&contact.id, field, password)
            .await
            .map_err(crm_error)
    }

    /// Send the welcome mail; a failure is noted, not retried (the user exists: a retry would
    /// find it and never mail again, and mailing twice is worse than a note).
    async fn welcome(&self, user: &User, contact: &Contact, generated: Option<&str>) -> String {
        let Some(mailer) = &self.mailer else {
            return "send_notification asked, but [site.mail] is not configured".into();
        };
        let welcome = Welcome {
            to: &user.email,
            username: &user.username,
            first_name: self.mapped(contact, "first_name"),
            password: generated,
        };
        match mailer.send(welcome).await {
            Ok(()) => format!("welcome mail sent to {}", user.email),
            Err(e) => {
                tracing::warn!(error = %e, "welcome mail not sent");
                format!("welcome mail not sent: {e}")
            }
        }
    }

    fn processed(
        &self,
        action: Action,
        contact: &Contact,
        from_payload: bool,
        applied: &Applied,
        notes: Vec<String>,
    ) -> Processed {
        let user = &applied.user;
        let verb = if applied.created {
            "created"
        } else if applied.changed.is_empty() {
            "unchanged"
        } else {
            "updated"
        };
        let mut detail = format!("{action}: user {} ({}) {verb}", user.id, user.username);
        if !applied.changed.is_empty() && !applied.created {
            detail.push_str(&format!(": {}", applied.changed.join(", ")));
        }
        for note in &notes {
            detail.push_str("; ");
            detail.push_str(note);
        }
        // The report shows what the CRM said and what changed. The fields that carry a
        // password (a mapped `user_pass`, the return-password field) are left out.
        let secret_fields: Vec<&str> = [
            self.site.fields.get(USER_PASS).map(String::as_str),
            self.site
                .crm
                .as_ref()
                .and_then(|c| c.return_password_field.as_deref()),
        ]
        .into_iter()
        .flatten()
        .collect();
        let fields: serde_json::Map<String, serde_json::Value> = contact
            .fields
            .iter()
            .filter(|(k, _)| !secret_fields.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.as_str().into()))
            .collect();
        let report = json!({
            "contact": {
                "id": contact.id,
                "email": contact.email,
                "tags": contact.tags,
                "fields": fields,
                "source": if from_payload { "webhook payload" } else { "crm" },
            },
            "user": {
                "id": user.id,
                "username": user.username,
                "email": user.email,
                "role": user.role,
                "tags": user.tags,
                "created": applied.created,
            },
            "changed": applied.changed,
            "notes": notes,
        });
        Processed {
            detail,
            report: Some(report),
        }
    }
}

impl Processor for Direct {
    fn process<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<Processed, ProcessError>> {
        Box::pin(self.run(job))
    }
}

/// 16 characters from the OS CSPRNG over a 64-symbol alphabet (each byte's low 6 bits: no
/// modulo bias).
fn generate_password() -> Result<String, ProcessError> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bytes = [0u8; PASSWORD_LEN];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| ProcessError::Transient {
            reason: format!("the OS random number generator failed: {e}"),
            retry_after: None,
        })?;
    Ok(bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(b & 63)]))
        .collect())
}

fn crm_error(e: CrmError) -> ProcessError {
    match e {
        CrmError::Transient {
            reason,
            retry_after,
        } => ProcessError::Transient {
            reason: format!("CRM: {reason}"),
            retry_after,
        },
        CrmError::Permanent { code, reason } => ProcessError::Permanent {
            code,
            reason: format!("CRM: {reason}"),
        },
    }
}

fn store_error(e: StoreError) -> ProcessError {
    match e {
        StoreError::NoMatchingUser { .. } => ProcessError::Permanent {
            code: "no_matching_user",
            reason: e.to_string(),
        },
        StoreError::Conflict(reason) => ProcessError::Permanent {
            code: "conflict",
            reason,
        },
        StoreError::UnreadableMeta { .. } => ProcessError::Permanent {
            code: "unreadable_meta",
            reason: e.to_string(),
        },
        StoreError::Unavailable(_) => ProcessError::Transient {
            reason: e.to_string(),
            retry_after: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_passwords_are_long_varied_and_plain() {
        let a = generate_password().unwrap();
        let b = generate_password().unwrap();
        assert_eq!(a.len(), PASSWORD_LEN);
        assert_ne!(a, b);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
    }

    #[test]
    fn errors_keep_their_kind() {
        let e = store_error(StoreError::NoMatchingUser {
            contact_id: "7".into(),
        });
        assert!(matches!(
            e,
            ProcessError::Permanent {
                code: "no_matching_user",
                ..
            }
        ));
        let e = store_error(StoreError::Unavailable("busy".into()));
        assert!(matches!(e, ProcessError::Transient { .. }));
        let e = crm_error(CrmError::Transient {
            reason: "429".into(),
            retry_after: Some(std::time::Duration::from_secs(2)),
        });
        assert!(matches!(
            e,
            ProcessError::Transient {
                retry_after: Some(_),
                ..
            }
        ));
        let e = crm_error(CrmError::Permanent {
            code: "invalid_credentials",
            reason: "401".into(),
        });
        assert!(matches!(
            e,
            ProcessError::Permanent {
                code: "invalid_credentials",
                ..
            }
        ));
    }
}
