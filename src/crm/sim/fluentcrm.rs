//! FluentCRM's REST API (a WordPress plugin: `/wp-json/fluent-crm/v2`), as WP Fusion's
//! FluentCRM (REST API) module and our adapter use it:
//!
//! ```text
//! GET  /subscribers?search=E&per_page=1        {"subscribers":{"total",..,"data":[..]}}
//! GET  /subscribers/{id}?with[]=subscriber.custom_values   {"subscriber":{..}}
//! GET  /subscribers/0?get_by_email=E           the same, looked up by email
//! PUT  /subscribers/{id}  (POST and PATCH too, as WordPress's EDITABLE routes take)
//!      {"subscriber":{"first_name"..,"custom_values":{"KEY":"V"}}}
//!      -> {"message":..,"subscriber":{..}}
//! ```
//!
//! Auth: HTTP Basic with a WordPress user and its application password (spaces in the
//! password are ignored, as WordPress does). Missing: `401 rest_forbidden`; unknown user:
//! `401 invalid_username`; wrong password: `401 incorrect_password`, each as WordPress's
//! `{"code","message","data":{"status"}}`.
//!
//! Ids (subscribers and tags) are JSON numbers. An unknown subscriber is `422
//! {"message":"Subscriber not found"}`: FluentCRM's controllers answer errors through
//! `sendError`, whose status is 422 (a 404 would come from WordPress itself for an unknown
//! route). `custom_values` is only included when `with[]=subscriber.custom_values` asks for
//! it, and, being a PHP array, an empty one is `[]`, not `{}`.

use std::time::SystemTime;

use http::{HeaderMap, Method, StatusCode};
use serde_json::{json, Map, Value};

use super::http::{
    basic_auth, query_param, query_values, scalar_text, secret_eq, segments, Answer, WP_JSON,
};
use super::model::{utc_parts, ContactError, Credentials, Store, Stored};
use super::Api;

const PREFIX: &str = "/wp-json/fluent-crm/v2";
const DEFAULT_PER_PAGE: usize = 10;

pub(super) struct FluentCrm;

pub(super) enum Route {
    List,
    Show(String),
    Update(String),
}

impl Api for FluentCrm {
    type Route = Route;

    fn route(method: &Method, path: &str) -> Option<Route> {
        let parts = segments(path, PREFIX)?;
        let route = match (method, parts.as_slice()) {
            (&Method::GET, ["subscribers"]) => Route::List,
            (&Method::GET, ["subscribers", id]) => Route::Show((*id).to_owned()),
            (&Method::PUT | &Method::POST | &Method::PATCH, ["subscribers", id]) => {
                Route::Update((*id).to_owned())
            }
            _ => return None,
        };
        Some(route)
    }

    fn name(route: &Route) -> &'static str {
        match route {
            Route::List => "GET /wp-json/fluent-crm/v2/subscribers",
            Route::Show(_) => "GET /wp-json/fluent-crm/v2/subscribers/{id}",
            Route::Update(_) => "PUT /wp-json/fluent-crm/v2/subscribers/{id}",
        }
    }

    fn authorize(
        headers: &HeaderMap,
        _query: Option<&str>,
        credentials: &Credentials,
    ) -> Result<(), Answer> {
        let Some((user, password)) = basic_auth(headers) else {
            return Err(wp_error(
                StatusCode::UNAUTHORIZED,
                "rest_forbidden",
                "Sorry, you are not allowed to do that.",
            ));
        };
        // WordPress shows application passwords in groups of four and ignores the spaces.
        let password: String = password.chars().filter(|c| !c.is_whitespace()).collect();
        let expected: String = credentials
            .api_key
            .expose()
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        if user != credentials.user {
            Err(wp_error(
                StatusCode::UNAUTHORIZED,
                "invalid_username",
                "Unknown username. Check again or try your email address.",
            ))
        } else if !secret_eq(&password, &expected) {
            Err(wp_error(
                StatusCode::UNAUTHORIZED,
                "incorrect_password",
                "The provided password is an invalid application password.",
            ))
        } else {
            Ok(())
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
            Route::Show(id) => show(store, &id, query),
            Route::Update(id) => update(store, &id, body, now),
        }
    }

    fn error(status: StatusCode, message: &str) -> Answer {
        let code = match status {
            StatusCode::NOT_FOUND => "rest_no_route",
            StatusCode::TOO_MANY_REQUESTS => "too_many_requests",
            s if s.is_server_error() => "internal_server_error",
            _ => "rest_error",
        };
        wp_error(status, code, message)
    }
}

/// WordPress's REST error body.
fn wp_error(status: StatusCode, code: &str, message: &str) -> Answer {
    Answer::json(
        status,
        json!({"code": code, "message": message, "data": {"status": status.as_u16()}}),
    )
    .typed(WP_JSON)
}

/// FluentCRM's own errors (`sendError`): a message and 422.
fn not_found() -> Answer {
    Answer::json(
        StatusCode::UNPROCESSABLE_ENTITY,
        json!({"message": "Subscriber not found"}),
    )
    .typed(WP_JSON)
}

fn wp_date(time: SystemTime) -> String {
    let (date, clock) = utc_parts(time);
    format!("{date} {clock}")
}

/// FluentCRM tag slugs: lowercase words joined by `-`.
fn slug(title: &str) -> String {
    let mut out = String::new();
    for word in title
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        if !out.is_empty() {
            out.push('-');
        }
        out.push_str(&word.to_lowercase());
    }
    out
}

fn subscriber_json(store: &Store, s: &Stored, with_custom_values: bool) -> Value {
    let c = &s.contact;
    let tags: Vec<Value> = c
        .tags
        .iter()
        .filter_map(|title| {
            // Every stored contact's tags are in the table (`Store` adds them on write).
            let id = store.known_tag_id(title)?;
            Some(json!({
                "id": id,
                "title": title,
                "slug": slug(title),
                "description": null,
                "created_at": wp_date(s.created),
                "updated_at": wp_date(s.created),
                "pivot": {"subscriber_id": s.id, "object_id": id, "object_type": "FluentCrm\\App\\Models\\Tag"},
            }))
        })
        .collect();
    let full_name = format!("{} {}", c.first_name, c.last_name)
        .trim()
        .to_owned();
    let mut out = json!({
        "id": s.id,
        "user_id": null,
        "hash": format!("{:032x}", s.id),
        "contact_owner": null,
        "company_id": null,
        "prefix": null,
        "first_name": c.first_name,
        "last_name": c.last_name,
        "email": c.email,
        "timezone": null,
        "address_line_1": "",
        "address_line_2": "",
        "postal_code": "",
        "city": "",
        "state": "",
        "country": "",
        "ip": null,
        "phone": c.phone,
        "status": "subscribed",
        "contact_type": "lead",
        "source": "api",
        "avatar": null,
        "date_of_birth": null,
        "created_at": wp_date(s.created),
        "last_activity": null,
        "updated_at": wp_date(s.updated),
        "full_name": full_name,
        "tags": tags,
        "lists": [],
    });
    if with_custom_values {
        out["custom_values"] = if c.fields.is_empty() {
            // PHP's json_encode of an empty array.
            json!([])
        } else {
            let map: Map<String, Value> = c
                .fields
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            Value::Object(map)
        };
    }
    out
}

fn wants_custom_values(query: Option<&str>) -> bool {
    query_values(query, "with[]")
        .iter()
        .any(|w| w == "subscriber.custom_values")
}

fn show(store: &Store, id: &str, query: Option<&str>) -> Answer {
    let stored = match query_param(query, "get_by_email") {
        Some(email) => store.find_by_email(&email),
        None => store.get_text(id),
    };
    match stored {
        Some(s) => Answer::json(
            StatusCode::OK,
            json!({"subscriber": subscriber_json(store, s, wants_custom_values(query))}),
        )
        .typed(WP_JSON),
        None => not_found(),
    }
}

/// `GET /subscribers?search=`: contacts whose email or name contains the text.
fn list(store: &Store, query: Option<&str>) -> Answer {
    let search = query_param(query, "search").map(|s| s.trim().to_lowercase());
    let per_page = query_param(query, "per_page")
        .and_then(|p| p.parse::<usize>().ok())
        .filter(|p| *p > 0)
        .unwrap_or(DEFAULT_PER_PAGE);
    let page = query_param(query, "page")
        .and_then(|p| p.parse::<usize>().ok())
        .filter(|p| *p > 0)
        .unwrap_or(1);
    let matching: Vec<&Stored> = store
        .all()
        .filter(|s| match &search {
            Some(text) => {
                let c = &s.contact;
                [&c.email, &c.first_name, &c.last_name]
                    .iter()
                    .any(|v| v.to_lowercase().contains(text.as_str()))
            }
            None => true,
        })
        .collect();
    let total = matching.len();
    let data: Vec<Value> = matching
        .iter()
        .skip((page - 1).saturating_mul(per_page))
        .take(per_page)
        .map(|s| subscriber_json(store, s, false))
        .collect();
    let from = if data.is_empty() {
        Value::Null
    } else {
        json!((page - 1) * per_page + 1)
    };
    let to = if data.is_empty() {
        Value::Null
    } else {
        json!((page - 1) * per_page + data.len())
    };
    Answer::json(
        StatusCode::OK,
        json!({"subscribers": {
            "current_page": page,
            "per_page": per_page,
            "from": from,
            "to": to,
            "last_page": total.div_ceil(per_page).max(1),
            "total": total,
            "data": data,
        }}),
    )
    .typed(WP_JSON)
}

/// `PUT /subscribers/{id}`: the standard fields present and `custom_values` are written;
/// other keys are ignored, as FluentCRM ignores what it does not know.
fn update(store: &mut Store, id: &str, body: &[u8], now: SystemTime) -> Answer {
    let Ok(body) = serde_json::from_slice::<Value>(body) else {
        return wp_error(
            StatusCode::BAD_REQUEST,
            "rest_invalid_json",
            "Invalid JSON body passed.",
        );
    };
    // WP Fusion wraps the changes in `subscriber`; a bare object is read the same way.
    let changes = body.get("subscriber").unwrap_or(&body);
    let Some(changes) = changes.as_object() else {
        return validation("subscriber", "The subscriber must be an object");
    };
    let Some(contact_id) = store.get_text(id).map(|s| s.id) else {
        return not_found();
    };
    let mut standard = Vec::new();
    for key in ["email", "first_name", "last_name", "phone"] {
        if let Some(value) = changes.get(key) {
            match scalar_text(value) {
                Some(text) => standard.push((key, text)),
                None => return validation(key, "The value must be text"),
            }
        }
    }
    let mut custom = Vec::new();
    match changes.get("custom_values") {
        None => {}
        Some(Value::Object(values)) => {
            for (key, value) in values {
                match scalar_text(value) {
                    Some(text) => custom.push((key.clone(), text)),
                    None => return validation(key, "The value must be text"),
                }
            }
        }
        // An empty PHP array.
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(_) => return validation("custom_values", "custom_values must be an object"),
    }
    let outcome = store.update(contact_id, now, |c| {
        for (key, text) in standard {
            match key {
                "email" => c.email = text,
                "first_name" => c.first_name = text,
                "last_name" => c.last_name = text,
                _ => c.phone = text,
            }
        }
        c.fields.extend(custom);
    });
    match outcome {
        Some(Ok(_)) => {
            let Some(stored) = store.get(contact_id) else {
                return not_found();
            };
            Answer::json(
                StatusCode::OK,
                json!({
                    "message": "Subscriber successfully updated",
                    "subscriber": subscriber_json(store, stored, true),
                    "isDirty": true,
                }),
            )
            .typed(WP_JSON)
        }
        Some(Err(ContactError::EmailTaken { .. })) => validation(
            "email",
            "Provided email already assigned to another subscriber.",
        ),
        Some(Err(e)) => validation("email", &e.to_string()),
        None => not_found(),
    }
}

/// FluentCRM's validation errors: 422 with the messages by field.
fn validation(field: &str, message: &str) -> Answer {
    Answer::json(
        StatusCode::UNPROCESSABLE_ENTITY,
        json!({"message": message, "errors": {field: {"invalid": message}}}),
    )
    .typed(WP_JSON)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crm::sim::SimContact;

    #[test]
    fn slugs() {
        assert_eq!(slug("VIP"), "vip");
        assert_eq!(slug("Paying Customer!"), "paying-customer");
        assert_eq!(slug("  a__b "), "a-b");
    }

    #[test]
    fn subscriber_shape() {
        let mut store = Store::default();
        let contact = SimContact {
            id: "7".into(),
            email: "a@example.com".into(),
            first_name: "Ann".into(),
            tags: vec!["VIP".into()],
            ..Default::default()
        };
        store.replace(contact, SystemTime::now()).unwrap();
        let Some(s) = store.get(7) else {
            panic!("stored")
        };
        let v = subscriber_json(&store, s, true);
        assert_eq!(v["id"], json!(7));
        assert_eq!(
            v["tags"][0],
            json!({"id":1,"title":"VIP","slug":"vip","description":null,
            "created_at": v["tags"][0]["created_at"], "updated_at": v["tags"][0]["updated_at"],
            "pivot": v["tags"][0]["pivot"]})
        );
        assert_eq!(v["custom_values"], json!([]));
        assert!(subscriber_json(&store, s, false)
            .get("custom_values")
            .is_none());
    }
}
