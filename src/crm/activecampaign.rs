//! ActiveCampaign adapter (API v3, header `Api-Token`).
//!
//! ```text
//! load_contact(id):  GET /api/3/contacts/{id}              contact + fieldValues (+ contactTags)
//!                    GET /api/3/contacts/{id}/contactTags  only when not side-loaded above
//!                    GET /api/3/tags/{tag}                 only for tag ids not in the cache
//! find_by_email(e):  GET /api/3/contacts?email=e, then load_contact(first match)
//! update_field:      PUT /api/3/contacts/{id}  {"contact":{"fieldValues":[{field,value}]}}
//!                                          or {"contact":{"firstName":value}}
//! ```
//!
//! v3 names a contact's tags by id only, so names come from `/tags/{id}`, cached per account
//! (tag ids are never reused; a renamed tag shows its new name after [`TAG_NAME_TTL`]).
//! WP Fusion (`class-activecampaign.php`) stores AC tag *names* on the user, reads custom
//! fields as `field[ID,0]` and turns multi-value answers (`||a||b||`) into `a,b`; this adapter
//! does the same, with `field:ID` as the field's name (see [`Contact::fields`]).

use std::collections::BTreeMap;
use std::time::Duration;

use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::http::{id_of, push_tag, scalar_text, Api, Auth, Id};
use super::{Adapter, Contact, CrmError, CrmSetupError};
use crate::config::CrmConfig;
use crate::crm::Link;

/// The standard contact fields reported (and written into the contact object by name).
const STANDARD_FIELDS: [&str; 4] = ["email", "firstName", "lastName", "phone"];
/// Custom fields are named `field:ID`.
const CUSTOM_PREFIX: &str = "field:";
/// How long a tag name is trusted before it is fetched again.
pub const TAG_NAME_TTL: Duration = Duration::from_secs(3600);
/// An account with more tags than this forgets the least used names first.
const TAG_NAME_CAPACITY: u64 = 100_000;
/// AC keeps deleted contacts' records with the email rewritten to `deleted+…`.
const DELETED_PREFIX: &str = "deleted+";

/// One ActiveCampaign account.
pub struct ActiveCampaign {
    api: Api,
    /// Tag id -> name; `None` for an id `/tags/{id}` does not know (deleted tag).
    tag_names: moka::future::Cache<String, Option<String>>,
}

impl ActiveCampaign {
    /// The adapter for `config` (`kind = "activecampaign"`).
    pub fn new(config: &CrmConfig, link: Link) -> Result<Self, CrmSetupError> {
        let auth = Auth::header("api-token", &config.api_key)?;
        Ok(ActiveCampaign {
            api: Api::new(&config.url, "/api/3", auth, link)?,
            tag_names: moka::future::Cache::builder()
                .max_capacity(TAG_NAME_CAPACITY)
                .time_to_live(TAG_NAME_TTL)
                .build(),
        })
    }

    /// The ids of the tags on contact `id`, in AC's order.
    async fn contact_tag_ids(&self, id: &str) -> Result<Vec<String>, CrmError> {
        let url = self.api.url(["contacts", id, "contactTags"]);
        let answer = self
            .api
            .send(self.api.get(url), &[StatusCode::NOT_FOUND])
            .await?;
        if answer.status == StatusCode::NOT_FOUND {
            // Deleted between the two calls.
            return Err(CrmError::not_found(format!("no contact {id}")));
        }
        let tags: ContactTags = answer.json()?;
        Ok(tag_ids(&tags.contact_tags))
    }

    /// The name of tag `tag_id`, from the cache or `/tags/{id}` (concurrent misses for one id
    /// make one call).
    async fn tag_name(&self, tag_id: &str) -> Result<Option<String>, CrmError> {
        self.tag_names
            .try_get_with_by_ref(tag_id, self.fetch_tag_name(tag_id))
            .await
            .map_err(|e| (*e).clone())
    }

    async fn fetch_tag_name(&self, tag_id: &str) -> Result<Option<String>, CrmError> {
        let url = self.api.url(["tags", tag_id]);
        let answer = self
            .api
            .send(self.api.get(url), &[StatusCode::NOT_FOUND])
            .await?;
        if answer.status == StatusCode::NOT_FOUND {
            // The tag was deleted after it was read from the contact: not the contact's fault.
            return Ok(None);
        }
        let tag: TagAnswer = answer.json()?;
        Ok(tag.tag.map(|t| t.tag).filter(|name| !name.is_empty()))
    }
}

impl Adapter for ActiveCampaign {
    #[tracing::instrument(skip_all, fields(crm = "activecampaign", contact = %id))]
    async fn load(&self, id: &str) -> Result<Contact, CrmError> {
        let answer = self
            .api
            .send(
                self.api.get(self.api.url(["contacts", id])),
                &[StatusCode::NOT_FOUND],
            )
            .await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Err(CrmError::not_found(format!("no contact {id}")));
        }
        let loaded = decode_contact(&answer.json()?)?;
        let tag_ids = match loaded.side_loaded_tags {
            Some(ids) => ids,
            None => self.contact_tag_ids(id).await?,
        };
        let mut contact = loaded.contact;
        for tag_id in tag_ids {
            if let Some(name) = self.tag_name(&tag_id).await? {
                push_tag(&mut contact.tags, &name);
            }
        }
        Ok(contact)
    }

    #[tracing::instrument(skip_all, fields(crm = "activecampaign"))]
    async fn find(&self, email: &str) -> Result<Option<Contact>, CrmError> {
        let mut url = self.api.url(["contacts"]);
        url.query_pairs_mut().append_pair("email", email);
        let answer = self.api.send(self.api.get(url), &[]).await?;
        let found: ContactList = answer.json()?;
        let Some(id) = first_match(&found.contacts, email) else {
            return Ok(None);
        };
        match self.load(&id).await {
            Ok(contact) => Ok(Some(contact)),
            Err(CrmError::Permanent {
                code: "contact_not_found",
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    #[tracing::instrument(skip_all, fields(crm = "activecampaign", contact = %id, field = %field))]
    async fn update(&self, id: &str, field: &str, value: &str) -> Result<(), CrmError> {
        let url = self.api.url(["contacts", id]);
        let request = self.api.put_json(url, &update_body(field, value));
        let answer = self.api.send(request, &[StatusCode::NOT_FOUND]).await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Err(CrmError::not_found(format!("no contact {id}")));
        }
        Ok(())
    }
}

/// `GET /contacts/{id}`. The contact stays a map so that an absent field and a `null` one
/// (a cleared field, reported as empty text) can be told apart.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContactAnswer {
    contact: Option<Map<String, Value>>,
    #[serde(default)]
    field_values: Vec<FieldValue>,
    /// Side-loaded by the real API; when present, `/contactTags` is not asked.
    contact_tags: Option<Vec<ContactTag>>,
}

#[derive(Deserialize)]
struct FieldValue {
    field: Id,
    #[serde(default)]
    value: Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContactTags {
    #[serde(default)]
    contact_tags: Vec<ContactTag>,
}

#[derive(Deserialize)]
struct ContactTag {
    tag: Option<Id>,
}

#[derive(Deserialize)]
struct TagAnswer {
    tag: Option<TagObject>,
}

#[derive(Deserialize)]
struct TagObject {
    #[serde(default)]
    tag: String,
}

#[derive(Deserialize)]
struct ContactList {
    #[serde(default)]
    contacts: Vec<Map<String, Value>>,
}

/// A decoded contact (without tag names yet) and the tag ids side-loaded with it, if any.
struct Loaded {
    contact: Contact,
    side_loaded_tags: Option<Vec<String>>,
}

fn decode_contact(answer: &ContactAnswer) -> Result<Loaded, CrmError> {
    let Some(c) = &answer.contact else {
        return Err(CrmError::not_found("empty contact"));
    };
    let Some(id) = id_of(c.get("id")) else {
        return Err(CrmError::not_found("contact without id"));
    };
    let email = c.get("email").and_then(scalar_text).unwrap_or_default();
    if is_deleted(&email) {
        return Err(CrmError::not_found(format!("contact {id} is deleted")));
    }
    let mut fields = BTreeMap::new();
    for name in STANDARD_FIELDS {
        if let Some(text) = c.get(name).and_then(scalar_text) {
            fields.insert(name.to_owned(), text);
        }
    }
    for fv in &answer.field_values {
        if let Some(text) = scalar_text(&fv.value) {
            fields.insert(format!("{CUSTOM_PREFIX}{}", fv.field.0), multi_value(&text));
        }
    }
    Ok(Loaded {
        contact: Contact {
            id,
            email,
            tags: Vec::new(),
            fields,
        },
        side_loaded_tags: answer.contact_tags.as_deref().map(tag_ids),
    })
}

fn tag_ids(tags: &[ContactTag]) -> Vec<String> {
    tags.iter()
        .filter_map(|t| t.tag.as_ref())
        .map(|Id(id)| id.clone())
        .filter(|id| !id.is_empty())
        .collect()
}

fn is_deleted(email: &str) -> bool {
    email
        .get(..DELETED_PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(DELETED_PREFIX))
}

/// AC answers checkbox and multi-select values as `||a||b||`; WP Fusion hands `a,b` to the
/// site, and so does this.
fn multi_value(text: &str) -> String {
    if !text.contains("||") {
        return text.to_owned();
    }
    let inner = text.strip_prefix("||").unwrap_or(text);
    let inner = inner.strip_suffix("||").unwrap_or(inner);
    inner.replace("||", ",")
}

/// The id of the first listed contact whose email is `email` (any case) and not deleted.
fn first_match(contacts: &[Map<String, Value>], email: &str) -> Option<String> {
    contacts.iter().find_map(|c| {
        let found = c.get("email").and_then(scalar_text).unwrap_or_default();
        (found.eq_ignore_ascii_case(email) && !is_deleted(&found))
            .then(|| id_of(c.get("id")))
            .flatten()
    })
}

/// The PUT body writing `field` (`field:ID` or a standard name) of a contact.
fn update_body(field: &str, value: &str) -> Value {
    match field.strip_prefix(CUSTOM_PREFIX) {
        Some(field_id) => {
            json!({"contact": {"fieldValues": [{"field": field_id, "value": value}]}})
        }
        None => json!({"contact": {field: value}}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crm::http::field_pairs;

    fn decode(body: &str) -> Result<Loaded, CrmError> {
        decode_contact(&serde_json::from_str(body).unwrap())
    }

    #[test]
    fn contact_with_string_ids_and_field_values() {
        let body = r#"{
          "contactLists": [],
          "contact": {"cdate": "2024-01-02T03:04:05-06:00", "email": "Ann@Example.com",
                      "phone": "", "firstName": "Ann", "lastName": null, "orgid": "0",
                      "id": "42", "links": {"contactTags": "https://x/api/3/contacts/42/contactTags"}},
          "fieldValues": [
            {"contact": "42", "field": "1", "value": "Gold", "id": "9"},
            {"contact": "42", "field": 3, "value": "||red||blue||", "id": "10"},
            {"contact": "42", "field": "4", "value": null, "id": "11"}
          ]
        }"#;
        let loaded = decode(body).unwrap();
        let c = loaded.contact;
        assert_eq!(c.id, "42");
        assert_eq!(c.email, "Ann@Example.com");
        assert_eq!(
            field_pairs(&c),
            [
                ("email", "Ann@Example.com"),
                ("field:1", "Gold"),
                ("field:3", "red,blue"),
                ("field:4", ""),
                ("firstName", "Ann"),
                ("lastName", ""),
                ("phone", ""),
            ]
        );
        // No side-loaded tags: ask /contactTags.
        assert!(loaded.side_loaded_tags.is_none());
    }

    #[test]
    fn number_ids_and_side_loaded_tags() {
        let body = r#"{"contact": {"id": 9007199254740993, "email": "b@x.test"},
                       "contactTags": [{"contact": "1", "tag": "20", "id": "5"}, {"tag": 21}, {"tag": null}]}"#;
        let loaded = decode(body).unwrap();
        assert_eq!(loaded.contact.id, "9007199254740993");
        assert_eq!(loaded.side_loaded_tags.unwrap(), ["20", "21"]);
    }

    #[test]
    fn deleted_and_empty_contacts_are_not_found() {
        for body in [
            r#"{"contact": {"id": "7", "email": "deleted+7@example.com"}}"#,
            r#"{"contact": {"id": "7", "email": "DELETED+ann@example.com"}}"#,
            r#"{"contact": null}"#,
            r#"{}"#,
            r#"{"contact": {"email": "a@x.test"}}"#,
        ] {
            assert!(
                matches!(
                    decode(body),
                    Err(CrmError::Permanent {
                        code: "contact_not_found",
                        ..
                    })
                ),
                "{body}"
            );
        }
        assert!(!is_deleted("deleted@example.com"));
        assert!(!is_deleted("dé"));
    }

    #[test]
    fn contact_tags_and_tag_answers() {
        let tags: ContactTags = serde_json::from_str(
            r#"{"contactTags": [{"contact": "42", "tag": "3", "id": "100",
                "links": {"tag": "https://x/api/3/contactTags/100/tag"}}, {"tag": 4}], "meta": {"total": "2"}}"#,
        )
        .unwrap();
        assert_eq!(tag_ids(&tags.contact_tags), ["3", "4"]);
        let tag: TagAnswer =
            serde_json::from_str(r#"{"tag": {"tagType": "contact", "tag": "VIP", "id": "3"}}"#)
                .unwrap();
        assert_eq!(tag.tag.unwrap().tag, "VIP");
    }

    #[test]
    fn find_takes_the_first_live_exact_match() {
        let list: ContactList = serde_json::from_str(
            r#"{"contacts": [{"id": "1", "email": "deleted+ann@x.test"},
                             {"id": "2", "email": "other@x.test"},
                             {"id": 3, "email": "ANN@x.test"}], "meta": {"total": "3"}}"#,
        )
        .unwrap();
        assert_eq!(
            first_match(&list.contacts, "ann@x.test").as_deref(),
            Some("3")
        );
        assert_eq!(first_match(&list.contacts, "nobody@x.test"), None);
        let empty: ContactList = serde_json::from_str(r#"{"contacts": []}"#).unwrap();
        assert_eq!(first_match(&empty.contacts, "ann@x.test"), None);
    }

    #[test]
    fn update_bodies() {
        assert_eq!(
            update_body("field:12", "Gold"),
            json!({"contact": {"fieldValues": [{"field": "12", "value": "Gold"}]}})
        );
        assert_eq!(
            update_body("firstName", "Ann"),
            json!({"contact": {"firstName": "Ann"}})
        );
    }

    #[test]
    fn multi_values_lose_their_pipes() {
        assert_eq!(multi_value("||a||b||"), "a,b");
        assert_eq!(multi_value("a||b"), "a,b");
        assert_eq!(multi_value("plain"), "plain");
    }
}
