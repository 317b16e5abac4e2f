//! Agile CRM adapter: REST under `{url}/dev/api`, HTTP Basic with the account email and the
//! REST API key, `Accept: application/json`.
//!
//! ```text
//! load_contact(id):  GET /contacts/{id}                  204 = no such contact
//! find_by_email(e):  GET /contacts/search/email/{e}      204 = none (e percent-encoded)
//! update_field:      PUT /contacts/edit-properties
//!                    {"id":ID,"properties":[{"type":"SYSTEM"|"CUSTOM","name":N,"value":V}]}
//! ```
//!
//! Ids are 16-digit numbers: read exactly (never through `f64`; WP Fusion rewrites them into
//! strings with a regex before `json_decode` for the same reason) and sent back as JSON
//! numbers. As in WP Fusion's `agilecrm` integration, tags are the contact's `tags` (names) and
//! fields its `properties` by `name`, the first of a name winning (Agile lists the primary
//! email or phone first); writes use `SYSTEM` for Agile's own properties, `CUSTOM` otherwise.
//! Agile compares emails case-sensitively; the lookup is as exact as Agile is.

use std::collections::BTreeMap;

use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};

use super::http::{id_of, push_tag, scalar_text, Answer, Api, Auth};
use super::{Adapter, Contact, CrmError, CrmSetupError};
use crate::config::CrmConfig;
use crate::crm::Link;

/// Agile's own contact properties (type `SYSTEM`); every other name is `CUSTOM`.
const SYSTEM_PROPERTIES: [&str; 9] = [
    "first_name",
    "last_name",
    "email",
    "phone",
    "company",
    "title",
    "website",
    "address",
    "image",
];

/// How Agile CRM says "no such contact": `204 No Content` (and 404 for good measure).
const MISSING: [StatusCode; 2] = [StatusCode::NO_CONTENT, StatusCode::NOT_FOUND];

/// One Agile CRM account.
pub struct AgileCrm {
    api: Api,
}

impl AgileCrm {
    /// The adapter for `config` (`kind = "agilecrm"`, `user` = the account email).
    pub fn new(config: &CrmConfig, link: Link) -> Result<Self, CrmSetupError> {
        let auth = Auth::basic(config, "agilecrm")?;
        Ok(AgileCrm {
            api: Api::new(&config.url, "/dev/api", auth, link)?,
        })
    }
}

impl Adapter for AgileCrm {
    #[tracing::instrument(skip_all, fields(crm = "agilecrm", contact = %id))]
    async fn load(&self, id: &str) -> Result<Contact, CrmError> {
        let url = self.api.url(["contacts", id]);
        let answer = self.api.send(self.api.get(url), &MISSING).await?;
        decode_answer(&answer)?.ok_or_else(|| CrmError::not_found(format!("no contact {id}")))
    }

    #[tracing::instrument(skip_all, fields(crm = "agilecrm"))]
    async fn find(&self, email: &str) -> Result<Option<Contact>, CrmError> {
        let url = self.api.url(["contacts", "search", "email", email]);
        let answer = self.api.send(self.api.get(url), &MISSING).await?;
        decode_answer(&answer)
    }

    #[tracing::instrument(skip_all, fields(crm = "agilecrm", contact = %id, field = %field))]
    async fn update(&self, id: &str, field: &str, value: &str) -> Result<(), CrmError> {
        let url = self.api.url(["contacts", "edit-properties"]);
        let request = self.api.put_json(url, &update_body(id, field, value));
        let answer = self.api.send(request, &MISSING).await?;
        if MISSING.contains(&answer.status) {
            return Err(CrmError::not_found(format!("no contact {id}")));
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct AgileContact {
    id: Value,
    #[serde(default)]
    tags: Vec<Value>,
    #[serde(default)]
    properties: Vec<Property>,
}

#[derive(Deserialize)]
struct Property {
    #[serde(default)]
    name: String,
    #[serde(default)]
    value: Value,
}

/// The contact of an answer; `None` for 204, 404, an empty body or a contact without an id.
fn decode_answer(answer: &Answer) -> Result<Option<Contact>, CrmError> {
    if MISSING.contains(&answer.status) || answer.is_empty() {
        return Ok(None);
    }
    let contact: AgileContact = answer.json()?;
    let Some(id) = id_of(Some(&contact.id)) else {
        return Ok(None);
    };
    let mut tags = Vec::new();
    for tag in contact.tags.iter().filter_map(Value::as_str) {
        push_tag(&mut tags, tag);
    }
    let mut fields = BTreeMap::new();
    for p in &contact.properties {
        if p.name.is_empty() || fields.contains_key(&p.name) {
            continue;
        }
        if let Some(text) = scalar_text(&p.value) {
            fields.insert(p.name.clone(), text);
        }
    }
    Ok(Some(Contact {
        id,
        email: fields.get("email").cloned().unwrap_or_default(),
        tags,
        fields,
    }))
}

/// The `edit-properties` body writing `field` of contact `id` (a JSON number when it is one).
fn update_body(id: &str, field: &str, value: &str) -> Value {
    let id = match id.parse::<u64>() {
        Ok(n) => json!(n),
        Err(_) => json!(id),
    };
    let kind = if SYSTEM_PROPERTIES.contains(&field) {
        "SYSTEM"
    } else {
        "CUSTOM"
    };
    json!({"id": id, "properties": [{"type": kind, "name": field, "value": value}]})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crm::http::field_pairs;

    fn answer(status: u16, body: &str) -> Answer {
        Answer::sample(status, body)
    }

    #[test]
    fn contact_with_16_digit_id_tags_and_properties() {
        let body = r#"{
          "id": 5717141784920064, "type": "PERSON", "created_time": 1460111111,
          "star_value": 0, "lead_score": 10, "tags": ["Member Gold", "VIP", "VIP"],
          "tagsWithTime": [{"tag": "VIP", "createdTime": 1460111111000}],
          "properties": [
            {"type": "SYSTEM", "name": "first_name", "value": "Ann"},
            {"type": "SYSTEM", "name": "last_name", "value": ""},
            {"type": "SYSTEM", "name": "email", "subtype": "work", "value": "ann@x.test"},
            {"type": "SYSTEM", "name": "email", "subtype": "home", "value": "ann@home.test"},
            {"type": "CUSTOM", "name": "Level", "value": "gold"},
            {"type": "CUSTOM", "name": "Score", "value": 42}
          ],
          "owner": {"id": 5629499534213120, "email": "owner@x.test"}
        }"#;
        let c = decode_answer(&answer(200, body)).unwrap().unwrap();
        assert_eq!(c.id, "5717141784920064");
        assert_eq!(c.email, "ann@x.test");
        assert_eq!(c.tags, ["Member Gold", "VIP"]);
        assert_eq!(
            field_pairs(&c),
            [
                ("Level", "gold"),
                ("Score", "42"),
                ("email", "ann@x.test"),
                ("first_name", "Ann"),
                ("last_name", ""),
            ]
        );
    }

    #[test]
    fn string_ids_are_accepted() {
        let c = decode_answer(&answer(200, r#"{"id": "5717141784920064", "tags": []}"#))
            .unwrap()
            .unwrap();
        assert_eq!(c.id, "5717141784920064");
        assert!(c.fields.is_empty() && c.email.is_empty());
    }

    #[test]
    fn missing_contacts() {
        for (status, body) in [
            (204, ""),
            (404, "Contact not found"),
            (200, ""),
            (200, " \n"),
        ] {
            assert!(decode_answer(&answer(status, body)).unwrap().is_none());
        }
        assert!(decode_answer(&answer(200, r#"{"id": null}"#))
            .unwrap()
            .is_none());
        // A float id would have lost digits somewhere: refused, not rounded.
        assert!(decode_answer(&answer(200, r#"{"id": 5.7e15}"#))
            .unwrap()
            .is_none());
    }

    #[test]
    fn update_bodies() {
        assert_eq!(
            update_body("5717141784920064", "first_name", "Ann"),
            json!({"id": 5717141784920064u64, "properties": [
                {"type": "SYSTEM", "name": "first_name", "value": "Ann"}]})
        );
        assert_eq!(
            update_body("abc", "Level", "gold"),
            json!({"id": "abc", "properties": [
                {"type": "CUSTOM", "name": "Level", "value": "gold"}]})
        );
    }
}
