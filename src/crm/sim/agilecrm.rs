//! Agile CRM's REST API (`/dev/api`), as WP Fusion and our adapter use it:
//!
//! ```text
//! GET /dev/api/contacts/{id}                 the contact | 204 (empty body) if none
//! GET /dev/api/contacts/search/email/{email} the contact | 204
//! PUT /dev/api/contacts/edit-properties      {"id":ID,"properties":[{"type","name","value"}]}
//!                                            -> 200 the updated contact
//! ```
//!
//! Auth: HTTP Basic `email:api_key`; missing or wrong is `401`. Clients send `Accept:
//! application/json` (Agile answers XML otherwise); an `Accept` that rules JSON out is `406`
//! here, since the simulator speaks JSON only. Ids are 16-digit JSON *numbers* (beyond what a
//! JavaScript double holds exactly in real accounts, hence WP Fusion's regex that quotes them).
//! Properties: `first_name`, `last_name`, `email` and `phone` are `SYSTEM` (only when set,
//! as Agile leaves unset ones out); every other name is a `CUSTOM` field. An `edit-properties`
//! for an unknown id is `400`. Error bodies are `{"status":N,"message":..}`.

use std::time::SystemTime;

use http::header::ACCEPT;
use http::{HeaderMap, Method, StatusCode};
use serde_json::{json, Value};

use super::http::{basic_auth, decode_segment, scalar_text, secret_eq, segments, Answer};
use super::model::{parse_id, unix_secs, ContactError, Credentials, Store, Stored};
use super::Api;

const PREFIX: &str = "/dev/api";

pub(super) struct AgileCrm;

pub(super) enum Route {
    Show(String),
    ByEmail(String),
    EditProperties,
}

impl Api for AgileCrm {
    type Route = Route;

    fn route(method: &Method, path: &str) -> Option<Route> {
        let parts = segments(path, PREFIX)?;
        let route = match (method, parts.as_slice()) {
            (&Method::GET, ["contacts", "search", "email", email]) => {
                Route::ByEmail(decode_segment(email))
            }
            (&Method::PUT, ["contacts", "edit-properties"]) => Route::EditProperties,
            (&Method::GET, ["contacts", id]) => Route::Show((*id).to_owned()),
            _ => return None,
        };
        Some(route)
    }

    fn name(route: &Route) -> &'static str {
        match route {
            Route::Show(_) => "GET /dev/api/contacts/{id}",
            Route::ByEmail(_) => "GET /dev/api/contacts/search/email/{email}",
            Route::EditProperties => "PUT /dev/api/contacts/edit-properties",
        }
    }

    /// Credentials first, then whether the client takes JSON.
    fn authorize(
        headers: &HeaderMap,
        _query: Option<&str>,
        credentials: &Credentials,
    ) -> Result<(), Answer> {
        let authorized = basic_auth(headers).is_some_and(|(user, key)| {
            user.eq_ignore_ascii_case(&credentials.user)
                && secret_eq(&key, credentials.api_key.expose())
        });
        if !authorized {
            return Err(Self::error(StatusCode::UNAUTHORIZED, "Unauthorized"));
        }
        let accept = headers
            .get(ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("*/*");
        let json_ok = accept.split(',').any(|range| {
            let range = range.split(';').next().unwrap_or("").trim();
            matches!(range, "application/json" | "application/*" | "*/*")
        });
        if !json_ok {
            return Err(Self::error(
                StatusCode::NOT_ACCEPTABLE,
                "the simulator answers JSON only: send Accept: application/json",
            ));
        }
        Ok(())
    }

    fn answer(
        route: Route,
        store: &mut Store,
        _query: Option<&str>,
        body: &[u8],
        now: SystemTime,
    ) -> Answer {
        match route {
            Route::Show(id) => found(store.get_text(&id)),
            Route::ByEmail(email) => found(store.find_by_email(&email)),
            Route::EditProperties => edit_properties(store, body, now),
        }
    }

    fn error(status: StatusCode, message: &str) -> Answer {
        Answer::json(
            status,
            json!({"status": status.as_u16(), "message": message}),
        )
    }
}

/// The contact, or Agile's `204` with an empty body.
fn found(stored: Option<&Stored>) -> Answer {
    match stored {
        Some(s) => Answer::json(StatusCode::OK, contact_json(s)),
        None => Answer::empty(StatusCode::NO_CONTENT),
    }
}

fn contact_json(s: &Stored) -> Value {
    let c = &s.contact;
    let mut properties = Vec::new();
    for (name, value) in [
        ("first_name", &c.first_name),
        ("last_name", &c.last_name),
        ("email", &c.email),
        ("phone", &c.phone),
    ] {
        if value.is_empty() {
            continue;
        }
        let mut property = json!({"type": "SYSTEM", "name": name, "value": value});
        if name == "email" || name == "phone" {
            property["subtype"] = json!("work");
        }
        properties.push(property);
    }
    for (name, value) in &c.fields {
        properties.push(json!({"type": "CUSTOM", "name": name, "value": value}));
    }
    let created_ms = unix_secs(s.created) * 1000;
    let tags_with_time: Vec<Value> = c
        .tags
        .iter()
        .map(|t| json!({"tag": t, "createdTime": created_ms, "availableCount": 0, "entity_type": "tag"}))
        .collect();
    let mut out = json!({
        "id": s.id,
        "type": "PERSON",
        "created_time": unix_secs(s.created),
        "updated_time": unix_secs(s.updated),
        "viewed": {"viewed_time": 0},
        "klout_score": "",
        "tags": c.tags,
        "tagsWithTime": tags_with_time,
        "properties": properties,
        "entity_type": "contact_entity",
        "source": "api",
        "contact_company_id": null,
        "owner": {
            "id": 5_066_549_580_791_808u64,
            "domain": "sim",
            "email": "owner@example.com",
            "is_admin": true,
            "is_account_owner": true,
            "is_disabled": false,
            "name": "Sim Owner",
        },
    });
    // The rest of Agile's contact, always the same here (one `json!` would be too deep).
    for key in [
        "last_contacted",
        "last_emailed",
        "last_campaign_emaild",
        "last_called",
        "viewed_time",
        "star_value",
        "lead_score",
        "formId",
        "lead_source_id",
        "lead_status_id",
        "lead_converted_time",
        "trashed_time",
        "restored_time",
    ] {
        out[key] = json!(0);
    }
    for key in [
        "campaignStatus",
        "unsubscribeStatus",
        "emailBounceStatus",
        "browserId",
    ] {
        out[key] = json!([]);
    }
    for key in [
        "is_lead_converted",
        "is_duplicate_existed",
        "is_duplicate_verification_failed",
        "is_client_import",
        "concurrent_save_allowed",
    ] {
        out[key] = json!(false);
    }
    out
}

fn bad_request(message: &str) -> Answer {
    AgileCrm::error(StatusCode::BAD_REQUEST, message)
}

/// `PUT /contacts/edit-properties`: each property replaces the one of the same name.
fn edit_properties(store: &mut Store, body: &[u8], now: SystemTime) -> Answer {
    let Ok(body) = serde_json::from_slice::<Value>(body) else {
        return bad_request("the request body is not valid JSON");
    };
    // Ids are numbers; WP Fusion sometimes sends them as strings, which Agile takes too.
    let id = match body.get("id") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => parse_id(s).ok(),
        _ => None,
    };
    let Some(id) = id else {
        return bad_request("id is missing or not a contact id");
    };
    let Some(list) = body.get("properties").and_then(Value::as_array) else {
        return bad_request("properties must be a list");
    };
    let mut changes = Vec::new();
    for property in list {
        let name = property
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty());
        let value = property
            .get("value")
            .map_or(Some(String::new()), scalar_text);
        match (name, value) {
            (Some(name), Some(value)) => changes.push((name.to_owned(), value)),
            _ => return bad_request("each property needs a name and a text value"),
        }
    }
    let outcome = store.update(id, now, |c| {
        for (name, value) in changes {
            match name.as_str() {
                "first_name" => c.first_name = value,
                "last_name" => c.last_name = value,
                "email" => c.email = value,
                "phone" => c.phone = value,
                _ => {
                    c.fields.insert(name, value);
                }
            }
        }
    });
    match outcome {
        Some(Ok(stored)) => Answer::json(StatusCode::OK, contact_json(stored)),
        Some(Err(ContactError::EmailTaken { .. })) => {
            bad_request("Sorry, duplicate contact found with the same email address.")
        }
        Some(Err(e)) => bad_request(&e.to_string()),
        None => bad_request(&format!("no contact with id {id}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crm::sim::SimContact;

    #[test]
    fn sixteen_digit_ids_are_numbers_and_unset_properties_absent() {
        let mut store = Store::default();
        let contact = SimContact {
            id: "5629499534213120".into(),
            email: "a@example.com".into(),
            first_name: "Ann".into(),
            fields: [("Plan".to_owned(), "gold".to_owned())].into(),
            ..Default::default()
        };
        store.replace(contact, SystemTime::now()).unwrap();
        let Some(s) = store.get(5_629_499_534_213_120) else {
            panic!("stored")
        };
        let v = contact_json(s);
        assert_eq!(v["id"].as_u64(), Some(5_629_499_534_213_120));
        assert!(v.to_string().contains("\"id\":5629499534213120,"));
        let names: Vec<&str> = v["properties"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["first_name", "email", "Plan"]);
        assert_eq!(v["properties"][1]["subtype"], "work");
        assert_eq!(v["properties"][2]["type"], "CUSTOM");
    }

    #[test]
    fn routes() {
        assert!(matches!(
            AgileCrm::route(&Method::GET, "/dev/api/contacts/search/email/deleted+a%40x.org"),
            Some(Route::ByEmail(e)) if e == "deleted+a@x.org"
        ));
        assert!(matches!(
            AgileCrm::route(&Method::PUT, "/dev/api/contacts/edit-properties"),
            Some(Route::EditProperties)
        ));
        assert!(AgileCrm::route(&Method::DELETE, "/dev/api/contacts/1").is_none());
        assert!(AgileCrm::route(&Method::GET, "/dev/apix/contacts/1").is_none());
    }
}
