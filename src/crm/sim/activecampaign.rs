//! ActiveCampaign API v3 (`/api/3`), as far as WP Fusion and our adapter use it:
//!
//! ```text
//! GET /api/3/contacts?email=E            {"contacts":[..],"meta":{"total":"N"}}
//! GET /api/3/contacts/{id}               {"contact":{..},"fieldValues":[..],..} | 404
//! PUT /api/3/contacts/{id}               {"contact":{"firstName"..,"fieldValues":[{"field","value"}]}}
//! GET /api/3/contacts/{id}/contactTags   {"contactTags":[{"contact","tag","id",..}]}
//! GET /api/3/contacts/{id}/fieldValues   {"fieldValues":[..]}
//! GET /api/3/tags/{id}                   {"tag":{"tag":"VIP","tagType":"contact","id"}}
//! ```
//!
//! Auth: the `Api-Token` header (or the legacy `api_key` query parameter); missing or wrong is
//! `403 {"message":..}`. Ids are strings. Errors are `{"message":..}`, validation errors
//! `422 {"errors":[{"title","detail","code","source"}]}`. Contacts whose email starts with
//! `deleted+` are served like any other: it is the adapter's job to treat them as gone.

use std::time::SystemTime;

use http::{HeaderMap, Method, StatusCode};
use serde_json::{json, Value};

use super::http::{query_param, scalar_text, secret_eq, segments, Answer};
use super::model::{utc_parts, Credentials, Store, Stored};
use super::Api;

const PREFIX: &str = "/api/3";
/// Base of the `links` URLs; clients never follow them.
const LINK_BASE: &str = "https://sim.api-us1.com/api/3";
/// Contacts per page of `GET /contacts` unless `limit` says otherwise (AC's default and max).
const DEFAULT_LIMIT: usize = 20;
const MAX_LIMIT: usize = 100;

pub(super) struct ActiveCampaign;

pub(super) enum Route {
    List,
    Contact(String),
    Update(String),
    ContactTags(String),
    FieldValues(String),
    Tag(String),
}

impl Api for ActiveCampaign {
    type Route = Route;

    fn route(method: &Method, path: &str) -> Option<Route> {
        let parts = segments(path, PREFIX)?;
        let route = match (method, parts.as_slice()) {
            (&Method::GET, ["contacts"]) => Route::List,
            (&Method::GET, ["contacts", id]) => Route::Contact((*id).to_owned()),
            (&Method::PUT, ["contacts", id]) => Route::Update((*id).to_owned()),
            (&Method::GET, ["contacts", id, "contactTags"]) => Route::ContactTags((*id).to_owned()),
            (&Method::GET, ["contacts", id, "fieldValues"]) => Route::FieldValues((*id).to_owned()),
            (&Method::GET, ["tags", id]) => Route::Tag((*id).to_owned()),
            _ => return None,
        };
        Some(route)
    }

    fn name(route: &Route) -> &'static str {
        match route {
            Route::List => "GET /api/3/contacts",
            Route::Contact(_) => "GET /api/3/contacts/{id}",
            Route::Update(_) => "PUT /api/3/contacts/{id}",
            Route::ContactTags(_) => "GET /api/3/contacts/{id}/contactTags",
            Route::FieldValues(_) => "GET /api/3/contacts/{id}/fieldValues",
            Route::Tag(_) => "GET /api/3/tags/{id}",
        }
    }

    fn authorize(
        headers: &HeaderMap,
        query: Option<&str>,
        credentials: &Credentials,
    ) -> Result<(), Answer> {
        let token = headers
            .get("api-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| query_param(query, "api_key"));
        match token {
            Some(token) if secret_eq(token.trim(), credentials.api_key.expose()) => Ok(()),
            _ => Err(Self::error(StatusCode::FORBIDDEN, "Forbidden")),
        }
    }

    fn answer(
        route: Route,
        store: &mut Store,
        query: Option<&str>,
        body: &[u8],
        now: SystemTime,
    ) -> Answer {
        match route {
            Route::List => list(store, query),
            Route::Contact(id) => with_contact(store, &id, |_, s| contact_document(s)),
            Route::ContactTags(id) => with_contact(
                store,
                &id,
                |store, s| json!({ "contactTags": contact_tags(store, s) }),
            ),
            Route::FieldValues(id) => with_contact(
                store,
                &id,
                |_, s| json!({ "fieldValues": field_values(s), "meta": {"total": s.contact.fields.len().to_string()} }),
            ),
            Route::Tag(id) => tag(store, &id),
            Route::Update(id) => update(store, &id, body, now),
        }
    }

    fn error(status: StatusCode, message: &str) -> Answer {
        Answer::json(status, json!({ "message": message }))
    }
}

fn not_found(kind: &str, id: &str) -> Answer {
    ActiveCampaign::error(
        StatusCode::NOT_FOUND,
        &format!("No Result found for {kind} with id {id}"),
    )
}

/// 422 with AC's validation error list.
fn invalid(title: &str, code: &str, pointer: &str) -> Answer {
    Answer::json(
        StatusCode::UNPROCESSABLE_ENTITY,
        json!({"errors": [{
            "title": title,
            "detail": "",
            "code": code,
            "source": {"pointer": pointer}
        }]}),
    )
}

fn with_contact(store: &Store, id: &str, render: impl FnOnce(&Store, &Stored) -> Value) -> Answer {
    match store.get_text(id) {
        Some(stored) => Answer::json(StatusCode::OK, render(store, stored)),
        None => not_found("Subscriber", id),
    }
}

/// AC dates: ISO 8601 with an offset (the simulated account is on UTC).
fn ac_date(time: SystemTime) -> String {
    let (date, clock) = utc_parts(time);
    format!("{date}T{clock}+00:00")
}

/// The `contact` object (lists and `GET /contacts/{id}` share it).
fn contact_json(s: &Stored) -> Value {
    let c = &s.contact;
    let id = s.id.to_string();
    let (local, domain) = c.email.split_once('@').unwrap_or((&c.email, ""));
    json!({
        "cdate": ac_date(s.created),
        "udate": ac_date(s.updated),
        "email": c.email,
        "phone": c.phone,
        "firstName": c.first_name,
        "lastName": c.last_name,
        "orgid": "0",
        "orgname": "",
        "segmentio_id": "",
        "bounced_hard": "0",
        "bounced_soft": "0",
        "bounced_date": null,
        "ip": "0",
        "ua": null,
        "hash": format!("{:032x}", s.id),
        "email_empty": c.email.is_empty(),
        "email_local": local,
        "email_domain": domain,
        "sentcnt": "0",
        "gravatar": "0",
        "deleted": "0",
        "anonymized": "0",
        "adate": null,
        "edate": null,
        "links": {
            "contactTags": format!("{LINK_BASE}/contacts/{id}/contactTags"),
            "fieldValues": format!("{LINK_BASE}/contacts/{id}/fieldValues"),
            "contactLists": format!("{LINK_BASE}/contacts/{id}/contactLists"),
        },
        "id": id,
        "organization": null,
    })
}

/// `GET /contacts/{id}` and the update answer: the contact with its field values beside it.
fn contact_document(s: &Stored) -> Value {
    let values = field_values(s);
    let mut contact = contact_json(s);
    // The contact lists the ids of its field values; the objects are in `fieldValues`.
    contact["fieldValues"] = values
        .iter()
        .map(|v| v["id"].clone())
        .collect::<Vec<_>>()
        .into();
    json!({
        "contactAutomations": [],
        "contactLists": [],
        "deals": [],
        "fieldValues": values,
        "geoAddresses": [],
        "geoIps": [],
        "contact": contact,
    })
}

/// Ids of a contact's sub-objects: the contact id and a running number, so they are stable
/// between calls and distinct across contacts.
fn child_id(contact: u64, index: usize) -> String {
    format!("{contact}{:03}", index + 1)
}

fn field_values(s: &Stored) -> Vec<Value> {
    let contact = s.id.to_string();
    s.contact
        .fields
        .iter()
        .enumerate()
        .map(|(i, (field, value))| {
            let id = child_id(s.id, i);
            json!({
                "contact": contact,
                "field": field,
                "value": value,
                "cdate": ac_date(s.created),
                "udate": ac_date(s.updated),
                "created_by": null,
                "updated_by": null,
                "links": {
                    "owner": format!("{LINK_BASE}/fieldValues/{id}/owner"),
                    "field": format!("{LINK_BASE}/fieldValues/{id}/field"),
                },
                "id": id,
                "owner": contact,
            })
        })
        .collect()
}

fn contact_tags(store: &Store, s: &Stored) -> Value {
    let contact = s.id.to_string();
    let tags: Vec<Value> = s
        .contact
        .tags
        .iter()
        .enumerate()
        .filter_map(|(i, name)| {
            // Every stored contact's tags are in the table (`Store` adds them on write).
            let tag = store.known_tag_id(name)?;
            let id = child_id(s.id, i);
            Some(json!({
                "contact": contact,
                "tag": tag.to_string(),
                "cdate": ac_date(s.updated),
                "created_timestamp": utc_parts(s.updated).0,
                "updated_timestamp": utc_parts(s.updated).0,
                "created_by": null,
                "updated_by": null,
                "links": {
                    "tag": format!("{LINK_BASE}/contactTags/{id}/tag"),
                    "contact": format!("{LINK_BASE}/contactTags/{id}/contact"),
                },
                "id": id,
            }))
        })
        .collect();
    tags.into()
}

fn tag(store: &Store, id: &str) -> Answer {
    let name = id.parse::<u64>().ok().and_then(|n| store.tag_name(n));
    let Some(name) = name else {
        return not_found("Tag", id);
    };
    Answer::json(
        StatusCode::OK,
        json!({"tag": {
            "tagType": "contact",
            "tag": name,
            "description": "",
            "subscriber_count": "0",
            "cdate": ac_date(SystemTime::UNIX_EPOCH),
            "links": {
                "contactGoalTags": format!("{LINK_BASE}/tags/{id}/contactGoalTags"),
            },
            "id": id,
        }}),
    )
}

/// `GET /contacts`, filtered by `email` (exact, case-insensitive), paged by `limit`/`offset`.
fn list(store: &Store, query: Option<&str>) -> Answer {
    let email = query_param(query, "email");
    let limit = query_param(query, "limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(DEFAULT_LIMIT)
        .min(MAX_LIMIT);
    let offset = query_param(query, "offset")
        .and_then(|o| o.parse::<usize>().ok())
        .unwrap_or(0);
    let matching: Vec<&Stored> = match &email {
        Some(email) => store.find_by_email(email).into_iter().collect(),
        None => store.all().collect(),
    };
    let page: Vec<Value> = matching
        .iter()
        .skip(offset)
        .take(limit)
        .map(|s| contact_json(s))
        .collect();
    Answer::json(
        StatusCode::OK,
        json!({
            "scoreValues": [],
            "contacts": page,
            "meta": {"total": matching.len().to_string(), "page_input": {"email": email}},
        }),
    )
}

/// `PUT /contacts/{id}`: the standard fields present and `fieldValues` are written.
fn update(store: &mut Store, id: &str, body: &[u8], now: SystemTime) -> Answer {
    let Ok(body) = serde_json::from_slice::<Value>(body) else {
        return ActiveCampaign::error(
            StatusCode::BAD_REQUEST,
            "The request body is not valid JSON",
        );
    };
    let Some(changes) = body.get("contact").and_then(Value::as_object) else {
        return invalid(
            "The contact field is required",
            "field_missing",
            "/data/attributes/contact",
        );
    };
    let Some(stored) = store.get_text(id) else {
        return not_found("Subscriber", id);
    };
    let contact_id = stored.id;
    let mut fields = Vec::new();
    for (key, pointer) in [
        ("email", "email"),
        ("firstName", "first_name"),
        ("lastName", "last_name"),
        ("phone", "phone"),
    ] {
        if let Some(value) = changes.get(key) {
            match scalar_text(value) {
                Some(text) => fields.push((pointer, text)),
                None => {
                    return invalid(
                        "The value must be text",
                        "field_invalid",
                        &format!("/data/attributes/{key}"),
                    )
                }
            }
        }
    }
    let mut values = Vec::new();
    if let Some(list) = changes.get("fieldValues") {
        let Some(list) = list.as_array() else {
            return invalid(
                "fieldValues must be a list",
                "field_invalid",
                "/data/attributes/fieldValues",
            );
        };
        for item in list {
            let field = item
                .get("field")
                .and_then(scalar_text)
                .filter(|f| !f.is_empty());
            let value = item.get("value").map_or(Some(String::new()), scalar_text);
            match (field, value) {
                (Some(field), Some(value)) => values.push((field, value)),
                _ => {
                    return invalid(
                        "Each field value needs a field id and a text value",
                        "field_invalid",
                        "/data/attributes/fieldValues",
                    )
                }
            }
        }
    }
    let outcome = store.update(contact_id, now, |c| {
        for (field, text) in fields {
            match field {
                "email" => c.email = text,
                "first_name" => c.first_name = text,
                "last_name" => c.last_name = text,
                _ => c.phone = text,
            }
        }
        for (field, value) in values {
            c.fields.insert(field, value);
        }
    });
    match outcome {
        Some(Ok(stored)) => Answer::json(StatusCode::OK, contact_document(stored)),
        Some(Err(super::model::ContactError::EmailTaken { .. })) => invalid(
            "Email address already exists in the system.",
            "duplicate",
            "/data/attributes/email",
        ),
        Some(Err(e)) => invalid(&e.to_string(), "field_invalid", "/data/attributes/email"),
        None => not_found("Subscriber", id),
    }
}
