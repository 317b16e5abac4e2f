//! FluentCRM adapter: the REST API of a remote WordPress with FluentCRM, as an application
//! password user (HTTP Basic), under `{url}/wp-json/fluent-crm/v2`.
//!
//! ```text
//! load_contact(id):  GET /subscribers/{id}?with[]=subscriber.custom_values
//! find_by_email(e):  GET /subscribers/0?get_by_email=e&with[]=subscriber.custom_values
//! update_field:      PUT /subscribers/{id}  {"subscriber":{"first_name":v}}
//!                                        or {"subscriber":{"custom_values":{key:v}}}
//! ```
//!
//! Followed from WP Fusion's `fluentcrm-rest` integration: the same `with[]` side-load, custom
//! values merged over the subscriber's own keys (`array_merge`), custom fields written under
//! `custom_values` unless they are one of its "Standard Fields", and tags named by **slug**:
//! WP Fusion's `get_tags` returns `$tag->slug` (the title is only the label it shows; newer
//! versions can be switched to numeric ids, slugs stay the default of existing installs). The
//! title stands in only for a tag without a slug, as the webhook parser does.
//!
//! A missing subscriber is answered 404 or 422, or 200 with an empty or `null` subscriber.

use std::collections::BTreeMap;

use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::http::{id_of, push_tag, scalar_text, Answer, Api, Auth};
use super::{Adapter, Contact, CrmError, CrmSetupError};
use crate::config::CrmConfig;
use crate::crm::Link;

/// The subscriber's own columns, written at the top level of `subscriber`: WP Fusion's
/// "Standard Fields" for FluentCRM, plus the other writable columns. Every other name is a
/// custom field.
const SUBSCRIBER_COLUMNS: [&str; 19] = [
    "prefix",
    "first_name",
    "last_name",
    "email",
    "phone",
    "timezone",
    "address_line_1",
    "address_line_2",
    "postal_code",
    "city",
    "state",
    "country",
    "ip",
    "status",
    "contact_type",
    "source",
    "date_of_birth",
    "avatar",
    "photo",
];

/// How FluentCRM says "no such subscriber" to a read.
const MISSING: [StatusCode; 2] = [StatusCode::NOT_FOUND, StatusCode::UNPROCESSABLE_ENTITY];

/// One FluentCRM site.
pub struct FluentCrm {
    api: Api,
}

impl FluentCrm {
    /// The adapter for `config` (`kind = "fluentcrm"`, `user` = the application-password user).
    pub fn new(config: &CrmConfig, link: Link) -> Result<Self, CrmSetupError> {
        let auth = Auth::basic(config, "fluentcrm")?;
        Ok(FluentCrm {
            api: Api::new(&config.url, "/wp-json/fluent-crm/v2", auth, link)?,
        })
    }

    /// `GET /subscribers/{segment}` with custom values and `query`; `None` when missing.
    async fn get_subscriber(
        &self,
        segment: &str,
        query: Option<(&str, &str)>,
    ) -> Result<Option<Contact>, CrmError> {
        let mut url = self.api.url(["subscribers", segment]);
        {
            let mut pairs = url.query_pairs_mut();
            pairs.append_pair("with[]", "subscriber.custom_values");
            if let Some((k, v)) = query {
                pairs.append_pair(k, v);
            }
        }
        let answer = self.api.send(self.api.get(url), &MISSING).await?;
        decode_answer(&answer)
    }
}

impl Adapter for FluentCrm {
    #[tracing::instrument(skip_all, fields(crm = "fluentcrm", contact = %id))]
    async fn load(&self, id: &str) -> Result<Contact, CrmError> {
        self.get_subscriber(id, None)
            .await?
            .ok_or_else(|| CrmError::not_found(format!("no subscriber {id}")))
    }

    #[tracing::instrument(skip_all, fields(crm = "fluentcrm"))]
    async fn find(&self, email: &str) -> Result<Option<Contact>, CrmError> {
        let found = self
            .get_subscriber("0", Some(("get_by_email", email)))
            .await?;
        Ok(found.filter(|c| c.email.eq_ignore_ascii_case(email)))
    }

    #[tracing::instrument(skip_all, fields(crm = "fluentcrm", contact = %id, field = %field))]
    async fn update(&self, id: &str, field: &str, value: &str) -> Result<(), CrmError> {
        let url = self.api.url(["subscribers", id]);
        let request = self.api.put_json(url, &update_body(field, value));
        // A 422 here is a value FluentCRM refuses (e.g. a malformed email): `rejected`.
        let answer = self.api.send(request, &[StatusCode::NOT_FOUND]).await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Err(CrmError::not_found(format!("no subscriber {id}")));
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct SubscriberAnswer {
    #[serde(default)]
    subscriber: Value,
}

/// The subscriber of a read's answer, `None` when FluentCRM says there is none.
fn decode_answer(answer: &Answer) -> Result<Option<Contact>, CrmError> {
    if MISSING.contains(&answer.status) || answer.is_empty() {
        return Ok(None);
    }
    let SubscriberAnswer { subscriber } = answer.json()?;
    Ok(decode_subscriber(&subscriber))
}

/// A subscriber object as a [`Contact`]; `None` for `null`, `[]`, `{}` or one without an id.
fn decode_subscriber(subscriber: &Value) -> Option<Contact> {
    let s = subscriber.as_object()?;
    let id = id_of(s.get("id"))?;
    let mut fields = BTreeMap::new();
    for (key, value) in s {
        if let Some(text) = scalar_text(value) {
            fields.insert(key.clone(), text);
        }
    }
    // PHP sends an empty `custom_values` as `[]`; only an object has values.
    if let Some(custom) = s.get("custom_values").and_then(Value::as_object) {
        for (key, value) in custom {
            if let Some(text) = custom_text(value) {
                fields.insert(key.clone(), text);
            }
        }
    }
    Some(Contact {
        id,
        email: s.get("email").and_then(scalar_text).unwrap_or_default(),
        tags: tag_names(s.get("tags")),
        fields,
    })
}

/// A custom value as text: scalars as they are, a multi-value field (checkboxes) as its
/// values joined with `,` (as WP Fusion hands ActiveCampaign's multi-values to the site).
fn custom_text(value: &Value) -> Option<String> {
    match value {
        Value::Array(items) => Some(
            items
                .iter()
                .filter_map(scalar_text)
                .collect::<Vec<_>>()
                .join(","),
        ),
        other => scalar_text(other),
    }
}

/// Tag slugs (title when a tag has no slug), in FluentCRM's order.
fn tag_names(tags: Option<&Value>) -> Vec<String> {
    let mut names = Vec::new();
    for tag in tags.and_then(Value::as_array).into_iter().flatten() {
        let name = match tag {
            Value::Object(t) => ["slug", "title"]
                .iter()
                .filter_map(|k| t.get(*k).and_then(Value::as_str))
                .find(|v| !v.trim().is_empty()),
            Value::String(s) => Some(s.as_str()),
            _ => None,
        };
        if let Some(name) = name {
            push_tag(&mut names, name);
        }
    }
    names
}

/// The PUT body writing `field`: a subscriber column at the top, anything else a custom value.
fn update_body(field: &str, value: &str) -> Value {
    let mut subscriber = Map::new();
    if SUBSCRIBER_COLUMNS.contains(&field) {
        subscriber.insert(field.to_owned(), json!(value));
    } else {
        subscriber.insert("custom_values".into(), json!({ field: value }));
    }
    json!({ "subscriber": subscriber })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Answer {
        Answer::sample(status, body)
    }

    #[test]
    fn subscriber_with_tags_and_custom_values() {
        let body = r#"{"subscriber": {
            "id": 17, "user_id": null, "hash": "abc", "contact_owner": null,
            "prefix": "", "first_name": "Ann", "last_name": "Lee", "email": "ann@x.test",
            "phone": "", "status": "subscribed", "life_time_value": 0, "total_points": 12,
            "full_name": "Ann Lee", "photo": "https://gravatar/x",
            "tags": [{"id": 3, "title": "Member Gold", "slug": "member-gold",
                      "pivot": {"subscriber_id": 17, "object_id": 3}},
                     {"id": 7, "title": "VIP", "slug": ""}, {"id": 8, "title": "Member Gold", "slug": "member-gold"}],
            "lists": [{"id": 1, "title": "Newsletter", "slug": "newsletter"}],
            "custom_values": {"level": "gold", "interests": ["a", "b"], "since": 2019, "first_name": "Annie"}
        }}"#;
        let c = decode_answer(&answer(200, body)).unwrap().unwrap();
        assert_eq!(c.id, "17");
        assert_eq!(c.email, "ann@x.test");
        assert_eq!(c.tags, ["member-gold", "VIP"]);
        assert_eq!(c.fields["level"], "gold");
        assert_eq!(c.fields["interests"], "a,b");
        assert_eq!(c.fields["since"], "2019");
        assert_eq!(c.fields["last_name"], "Lee");
        assert_eq!(c.fields["phone"], "");
        assert_eq!(c.fields["user_id"], "");
        // Custom values win over the subscriber's own keys, as WP Fusion's array_merge.
        assert_eq!(c.fields["first_name"], "Annie");
        assert!(!c.fields.contains_key("tags") && !c.fields.contains_key("custom_values"));
    }

    #[test]
    fn string_ids_and_php_empty_custom_values() {
        let body = r#"{"subscriber": {"id": "5717141784920064", "email": "b@x.test",
                       "tags": [], "custom_values": []}}"#;
        let c = decode_answer(&answer(200, body)).unwrap().unwrap();
        assert_eq!(c.id, "5717141784920064");
        assert!(c.tags.is_empty());
    }

    #[test]
    fn missing_subscribers() {
        for (status, body) in [
            (404, r#"{"code":"rest_no_route"}"#),
            (422, r#"{"message":"Subscriber not found"}"#),
            (200, r#"{"subscriber": null}"#),
            (200, r#"{"subscriber": []}"#),
            (200, r#"{"subscriber": {}}"#),
            (200, r#"{}"#),
            (200, ""),
        ] {
            assert!(
                decode_answer(&answer(status, body)).unwrap().is_none(),
                "{status} {body}"
            );
        }
        assert!(matches!(
            decode_answer(&answer(200, "<html>")),
            Err(CrmError::Transient { .. })
        ));
    }

    #[test]
    fn update_bodies() {
        assert_eq!(
            update_body("first_name", "Ann"),
            json!({"subscriber": {"first_name": "Ann"}})
        );
        assert_eq!(
            update_body("level", "gold"),
            json!({"subscriber": {"custom_values": {"level": "gold"}}})
        );
    }
}
