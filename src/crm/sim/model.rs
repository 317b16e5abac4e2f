//! The simulator's account: its credentials, its contacts in a CRM-neutral model, the tag
//! table, and the seed file they are read from.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Deserializer, Serialize};

use crate::config::{CrmKind, Secret};

use super::SimError;

/// API key (ActiveCampaign `Api-Token`, FluentCRM application password, Agile CRM API key)
/// when neither the caller nor the seed file names one.
pub const DEFAULT_API_KEY: &str = "sim-key";
/// FluentCRM application-password user and Agile CRM account email by default.
pub const DEFAULT_USER: &str = "sim@example.com";
/// The first id given to an Agile CRM contact: Agile ids are 16-digit numbers.
const AGILE_FIRST_ID: u64 = 5_629_499_534_213_120;

/// What an API client must present. `Debug` never prints the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// `Api-Token` (ActiveCampaign), the Basic-auth password (FluentCRM, Agile CRM).
    pub api_key: Secret,
    /// The Basic-auth user: WordPress user (FluentCRM), account email (Agile CRM). Not used by
    /// ActiveCampaign.
    pub user: String,
}

impl Default for Credentials {
    fn default() -> Self {
        Credentials {
            api_key: Secret::new(DEFAULT_API_KEY),
            user: DEFAULT_USER.to_owned(),
        }
    }
}

/// A contact, the same for every CRM kind; each API renders it in its own shape.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimContact {
    /// A positive integer as text (`"7"`, `"5629499534213120"`); JSON strings and numbers are
    /// both read. Empty: the simulator gives the next id of its kind.
    #[serde(default, deserialize_with = "id_text")]
    pub id: String,
    pub email: String,
    #[serde(default)]
    pub first_name: String,
    #[serde(default)]
    pub last_name: String,
    #[serde(default)]
    pub phone: String,
    /// Tag names, in order.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Custom fields: ActiveCampaign field ids (`"7"`), FluentCRM `custom_values` keys, Agile
    /// CRM custom property names.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
}

/// The seed file: the account's credentials (optional, see [`Credentials::default`]) and its
/// contacts.
#[derive(Debug, Clone, Default)]
pub struct SeedData {
    pub credentials: Credentials,
    pub contacts: Vec<SimContact>,
}

/// The seed file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedFile {
    api_key: Option<String>,
    user: Option<String>,
    #[serde(default)]
    contacts: Vec<SimContact>,
}

impl SeedData {
    /// Read a seed file. Errors name the file, and the line and column for JSON errors.
    pub fn load(path: &Path) -> Result<SeedData, SimError> {
        let text = std::fs::read_to_string(path).map_err(|error| SimError::SeedRead {
            path: path.to_owned(),
            error,
        })?;
        SeedData::parse(&text).map_err(|problem| SimError::Seed {
            path: path.to_owned(),
            problem,
        })
    }

    /// Parse seed JSON; the error says where (`line L, column C: ...`) or which contact.
    pub fn parse(text: &str) -> Result<SeedData, String> {
        let file: SeedFile = serde_json::from_str(text).map_err(|e| json_error(&e))?;
        let mut credentials = Credentials::default();
        if let Some(key) = file.api_key {
            if key.is_empty() {
                return Err("api_key is empty".into());
            }
            credentials.api_key = Secret::new(key);
        }
        if let Some(user) = file.user {
            if user.is_empty() {
                return Err("user is empty".into());
            }
            credentials.user = user;
        }
        // The same checks as `put_contact`, so a file the simulator accepts loads entirely.
        let mut store = Store::default();
        for (i, contact) in file.contacts.iter().enumerate() {
            store
                .insert(CrmKind::ActiveCampaign, contact.clone(), SystemTime::now())
                .map_err(|e| format!("contacts[{i}]: {e}"))?;
        }
        Ok(SeedData {
            credentials,
            contacts: file.contacts,
        })
    }
}

/// `line L, column C: problem` (serde_json's own text ends in ` at line L column C`, which
/// would say it twice).
pub(super) fn json_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let problem = text.strip_suffix(&suffix).unwrap_or(&text);
    format!("line {}, column {}: {problem}", e.line(), e.column())
}

/// Reads a JSON string or a non-negative integer as text.
fn id_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        Text(String),
        Number(u64),
    }
    Ok(match Id::deserialize(deserializer)? {
        Id::Text(text) => text,
        Id::Number(n) => n.to_string(),
    })
}

/// A contact id: a positive integer (every simulated CRM uses numeric ids).
pub(super) fn parse_id(text: &str) -> Result<u64, String> {
    match text.trim().parse::<u64>() {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(format!("id {text:?} is not a positive integer")),
    }
}

/// Why a contact cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContactError {
    #[error("{0}")]
    BadId(String),
    #[error("email is empty")]
    NoEmail,
    #[error("contact {id} already has email {email:?}")]
    EmailTaken { id: u64, email: String },
    #[error("contact {0} exists already")]
    Exists(u64),
}

/// A contact with the times the CRM keeps.
#[derive(Debug, Clone)]
pub(super) struct Stored {
    pub contact: SimContact,
    pub id: u64,
    pub created: SystemTime,
    pub updated: SystemTime,
}

/// Contacts by id and the tag table. Emails are looked up by a linear scan: a simulator holds
/// hundreds of contacts, not millions.
#[derive(Debug, Default)]
pub(super) struct Store {
    contacts: BTreeMap<u64, Stored>,
    /// Tag id -> name, and back (ActiveCampaign and FluentCRM address tags by id).
    tags: BTreeMap<u64, String>,
    tag_ids: HashMap<String, u64>,
}

impl Store {
    pub fn get(&self, id: u64) -> Option<&Stored> {
        self.contacts.get(&id)
    }

    pub fn get_text(&self, id: &str) -> Option<&Stored> {
        parse_id(id).ok().and_then(|id| self.contacts.get(&id))
    }

    pub fn all(&self) -> impl Iterator<Item = &Stored> {
        self.contacts.values()
    }

    /// The contact with this email, compared case-insensitively as every CRM does.
    pub fn find_by_email(&self, email: &str) -> Option<&Stored> {
        let wanted = email.trim().to_lowercase();
        self.contacts
            .values()
            .find(|s| s.contact.email.to_lowercase() == wanted)
    }

    /// Add a new contact (the next id of `kind`'s style when it has none).
    pub fn insert(
        &mut self,
        kind: CrmKind,
        mut contact: SimContact,
        now: SystemTime,
    ) -> Result<&Stored, ContactError> {
        let id = if contact.id.trim().is_empty() {
            self.next_id(kind)
        } else {
            parse_id(&contact.id).map_err(ContactError::BadId)?
        };
        if self.contacts.contains_key(&id) {
            return Err(ContactError::Exists(id));
        }
        contact.id = id.to_string();
        self.check_email(id, &contact.email)?;
        self.remember_tags(&contact.tags);
        let stored = Stored {
            contact,
            id,
            created: now,
            updated: now,
        };
        Ok(self.contacts.entry(id).or_insert(stored))
    }

    /// Add or replace contact `contact.id`; a replaced contact keeps its creation time.
    pub fn replace(
        &mut self,
        mut contact: SimContact,
        now: SystemTime,
    ) -> Result<&Stored, ContactError> {
        let id = parse_id(&contact.id).map_err(ContactError::BadId)?;
        contact.id = id.to_string();
        self.check_email(id, &contact.email)?;
        self.remember_tags(&contact.tags);
        let created = self.contacts.get(&id).map_or(now, |s| s.created);
        let stored = Stored {
            contact,
            id,
            created,
            updated: now,
        };
        self.contacts.insert(id, stored);
        Ok(&self.contacts[&id])
    }

    /// Change a stored contact in place (an API update); `None` if there is no such contact.
    pub fn update(
        &mut self,
        id: u64,
        now: SystemTime,
        change: impl FnOnce(&mut SimContact),
    ) -> Option<Result<&Stored, ContactError>> {
        let mut contact = self.contacts.get(&id)?.contact.clone();
        change(&mut contact);
        contact.id = id.to_string();
        Some(self.replace(contact, now))
    }

    pub fn remove(&mut self, id: u64) -> Option<SimContact> {
        self.contacts.remove(&id).map(|s| s.contact)
    }

    /// The tag's id, creating the tag on demand (as ActiveCampaign does when a tag is applied).
    pub fn tag_id(&mut self, name: &str) -> u64 {
        if let Some(id) = self.tag_ids.get(name) {
            return *id;
        }
        let id = self.tags.keys().next_back().map_or(1, |last| last + 1);
        self.tags.insert(id, name.to_owned());
        self.tag_ids.insert(name.to_owned(), id);
        id
    }

    /// The id of a tag the table has (every stored contact's tags are in it).
    pub fn known_tag_id(&self, name: &str) -> Option<u64> {
        self.tag_ids.get(name).copied()
    }

    pub fn tag_name(&self, id: u64) -> Option<&str> {
        self.tags.get(&id).map(String::as_str)
    }

    fn remember_tags(&mut self, tags: &[String]) {
        for tag in tags {
            self.tag_id(tag);
        }
    }

    fn check_email(&self, id: u64, email: &str) -> Result<(), ContactError> {
        if email.trim().is_empty() {
            return Err(ContactError::NoEmail);
        }
        match self.find_by_email(email) {
            Some(other) if other.id != id => Err(ContactError::EmailTaken {
                id: other.id,
                email: email.to_owned(),
            }),
            _ => Ok(()),
        }
    }

    /// ActiveCampaign and FluentCRM count up from 1; Agile CRM ids are 16-digit numbers.
    fn next_id(&self, kind: CrmKind) -> u64 {
        let next = self.contacts.keys().next_back().map_or(1, |last| last + 1);
        match kind {
            CrmKind::AgileCrm => next.max(AGILE_FIRST_ID),
            CrmKind::ActiveCampaign | CrmKind::FluentCrm => next,
        }
    }
}

/// `YYYY-MM-DD`, `HH:MM:SS` (UTC) of a time, for the CRMs' date strings.
pub(super) fn utc_parts(time: SystemTime) -> (String, String) {
    let t = time::OffsetDateTime::from(time);
    (
        format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day()),
        format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second()),
    )
}

/// Seconds since the Unix epoch (Agile CRM's times).
pub(super) fn unix_secs(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn seed_with_defaults_and_numeric_ids() {
        let seed = SeedData::parse(
            r#"{"contacts":[{"id":5629499534213120,"email":"a@example.com","tags":["VIP"]},
                            {"id":"7","email":"b@example.com","fields":{"7":"x"}}]}"#,
        )
        .unwrap();
        assert_eq!(seed.credentials, Credentials::default());
        assert_eq!(seed.contacts[0].id, "5629499534213120");
        assert_eq!(seed.contacts[1].fields["7"], "x");
    }

    #[test]
    fn seed_credentials_from_file() {
        let seed = SeedData::parse(r#"{"api_key":"k1","user":"u@x.org"}"#).unwrap();
        assert_eq!(seed.credentials.api_key.expose(), "k1");
        assert_eq!(seed.credentials.user, "u@x.org");
        assert!(seed.contacts.is_empty());
    }

    #[test]
    fn seed_errors_say_where() {
        let e = SeedData::parse("{\n  \"contacts\": [\n    {\"email\": }\n]}").unwrap_err();
        assert_eq!(e, "line 3, column 15: expected value");
        let e =
            SeedData::parse(r#"{"contacts":[{"email":"a@x.org","nickname":"z"}]}"#).unwrap_err();
        assert!(e.contains("nickname"), "{e}");
        let e = SeedData::parse(r#"{"contacts":[{"id":"x7","email":"a@x.org"}]}"#).unwrap_err();
        assert!(e.starts_with("contacts[0]: id \"x7\""), "{e}");
        let e = SeedData::parse(
            r#"{"contacts":[{"id":1,"email":"a@x.org"},{"id":2,"email":"A@X.org"}]}"#,
        )
        .unwrap_err();
        assert!(
            e.starts_with("contacts[1]: contact 1 already has email"),
            "{e}"
        );
        let e = SeedData::parse(
            r#"{"contacts":[{"id":1,"email":"a@x.org"},{"id":1,"email":"b@x.org"}]}"#,
        )
        .unwrap_err();
        assert_eq!(e, "contacts[1]: contact 1 exists already");
    }

    #[test]
    fn next_ids_follow_the_kind() {
        let now = SystemTime::now();
        let mut store = Store::default();
        let new = |email: &str| SimContact {
            email: email.into(),
            ..Default::default()
        };
        assert_eq!(
            store
                .insert(CrmKind::ActiveCampaign, new("a@x"), now)
                .unwrap()
                .id,
            1
        );
        assert_eq!(
            store
                .insert(CrmKind::FluentCrm, new("b@x"), now)
                .unwrap()
                .id,
            2
        );
        assert_eq!(
            store.insert(CrmKind::AgileCrm, new("c@x"), now).unwrap().id,
            AGILE_FIRST_ID
        );
        assert_eq!(
            store.insert(CrmKind::AgileCrm, new("d@x"), now).unwrap().id,
            AGILE_FIRST_ID + 1
        );
    }

    #[test]
    fn emails_match_case_insensitively_and_tags_get_ids() {
        let now = SystemTime::now();
        let mut store = Store::default();
        let contact = SimContact {
            id: "3".into(),
            email: "Ann@Example.com".into(),
            tags: vec!["VIP".into(), "Customer".into()],
            ..Default::default()
        };
        store.replace(contact, now).unwrap();
        assert_eq!(
            store.find_by_email("ann@example.COM").map(|s| s.id),
            Some(3)
        );
        assert_eq!(store.known_tag_id("VIP"), Some(1));
        assert_eq!(store.known_tag_id("Customer"), Some(2));
        assert_eq!(store.tag_id("New"), 3);
        assert_eq!(store.tag_name(2), Some("Customer"));
    }

    #[test]
    fn utc_dates() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_671_681_257);
        assert_eq!(utc_parts(t), ("2022-12-22".into(), "03:54:17".into()));
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // leap day
        assert_eq!(utc_parts(t).0, "2000-02-29");
        assert_eq!(utc_parts(SystemTime::UNIX_EPOCH).0, "1970-01-01");
    }
}
