//! The simulator's control API, under `/_sim/`: no auth, never rate-limited, delayed or
//! logged. It is a rehearsal and test tool: keep the simulator on loopback.
//!
//! ```text
//! GET    /_sim/contacts             {"contacts":[CONTACT..]}
//! POST   /_sim/contacts             CONTACT (id optional) -> 201 {"id","contact"} | 409 taken
//! GET    /_sim/contacts/{id}        {"contact":CONTACT} | 404
//! PUT    /_sim/contacts/{id}        CONTACT -> {"contact"}   (add or replace)
//! DELETE /_sim/contacts/{id}        {"deleted":ID} | 404
//! POST   /_sim/fail                 {"status":503,"count":2,"retry_after":1}
//! GET    /_sim/requests             {"requests":[{"method","path","route","status","at_ms"}]}
//! DELETE /_sim/requests             clears the log and the stats
//! GET    /_sim/stats                {"requests":N,"by_status":{"200":N},"by_route":{..}}
//! ```
//!
//! CONTACT is the neutral model of the seed file (`SimContact`). Errors are
//! `{"error":CODE,"message":TEXT}` with 400 (bad JSON), 404, 405 (+ `Allow`), 409, 413, 422.

use std::time::SystemTime;

use http::header::ALLOW;
use http::request::Parts;
use http::{Method, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{json, Value};

use super::http::{segments, Answer};
use super::model::{json_error, ContactError};
use super::{read_body, Failure, Sim, SimContact};

fn refuse(status: StatusCode, code: &str, message: impl AsRef<str>) -> Answer {
    Answer::json(status, json!({"error": code, "message": message.as_ref()}))
}

fn contact_error(e: ContactError) -> Answer {
    let (status, code) = match &e {
        ContactError::BadId(_) => (StatusCode::BAD_REQUEST, "bad_id"),
        ContactError::NoEmail => (StatusCode::UNPROCESSABLE_ENTITY, "missing_email"),
        ContactError::EmailTaken { .. } => (StatusCode::CONFLICT, "email_taken"),
        ContactError::Exists(_) => (StatusCode::CONFLICT, "id_taken"),
    };
    refuse(status, code, e.to_string())
}

fn method_not_allowed(allowed: &'static str) -> Answer {
    refuse(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("this path takes {allowed}"),
    )
    .header(ALLOW, allowed)
}

fn contact_json(contact: &SimContact) -> Value {
    // A struct of strings, lists and a string map: serializing it cannot fail.
    serde_json::to_value(contact).unwrap_or(Value::Null)
}

/// The JSON body as `T`, or a 400/413 naming the problem (with line and column).
async fn json_body<T: for<'de> Deserialize<'de>>(body: Incoming) -> Result<T, Answer> {
    let bytes = read_body(body).await.map_err(|status| {
        refuse(
            status,
            "unreadable_body",
            "the request body could not be read",
        )
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, "malformed_body", json_error(&e)))
}

/// Answer one control request.
pub(super) async fn handle(sim: &Sim, parts: &Parts, body: Incoming) -> Answer {
    let path = segments(parts.uri.path(), "/_sim").unwrap_or_default();
    let method = &parts.method;
    let outcome = match path.as_slice() {
        ["contacts"] => match *method {
            Method::GET => Ok(Answer::json(
                StatusCode::OK,
                json!({"contacts": sim.contacts().iter().map(contact_json).collect::<Vec<_>>()}),
            )),
            Method::POST => create(sim, body).await,
            _ => Err(method_not_allowed("GET, POST")),
        },
        ["contacts", id] => match *method {
            Method::GET => match sim.contact(id) {
                Some(c) => Ok(Answer::json(
                    StatusCode::OK,
                    json!({"contact": contact_json(&c)}),
                )),
                None => Err(no_contact(id)),
            },
            Method::PUT => put(sim, id, body).await,
            Method::DELETE => match sim.remove_contact(id) {
                Some(c) => Ok(Answer::json(StatusCode::OK, json!({"deleted": c.id}))),
                None => Err(no_contact(id)),
            },
            _ => Err(method_not_allowed("GET, PUT, DELETE")),
        },
        ["fail"] => match *method {
            Method::POST => fail(sim, body).await,
            _ => Err(method_not_allowed("POST")),
        },
        ["requests"] => match *method {
            Method::GET => Ok(requests(sim)),
            Method::DELETE => {
                sim.clear_requests();
                Ok(Answer::json(StatusCode::OK, json!({"cleared": true})))
            }
            _ => Err(method_not_allowed("GET, DELETE")),
        },
        ["stats"] => match *method {
            Method::GET => Ok(stats(sim)),
            _ => Err(method_not_allowed("GET")),
        },
        _ => Err(refuse(
            StatusCode::NOT_FOUND,
            "not_found",
            "control paths: /_sim/contacts[/{id}], /_sim/fail, /_sim/requests, /_sim/stats",
        )),
    };
    outcome.unwrap_or_else(|refusal| refusal)
}

fn no_contact(id: &str) -> Answer {
    refuse(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no contact {id}"),
    )
}

async fn create(sim: &Sim, body: Incoming) -> Result<Answer, Answer> {
    let contact: SimContact = json_body(body).await?;
    let stored = sim.create_contact(contact).map_err(contact_error)?;
    Ok(Answer::json(
        StatusCode::CREATED,
        json!({"id": stored.id, "contact": contact_json(&stored)}),
    ))
}

async fn put(sim: &Sim, id: &str, body: Incoming) -> Result<Answer, Answer> {
    let mut contact: SimContact = json_body(body).await?;
    if !contact.id.is_empty() && contact.id != id {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "id_mismatch",
            format!("the body's id {:?} is not the path's {id:?}", contact.id),
        ));
    }
    contact.id = id.to_owned();
    let stored = sim.put_contact(contact).map_err(contact_error)?;
    Ok(Answer::json(
        StatusCode::OK,
        json!({"contact": contact_json(&stored)}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailRequest {
    status: u16,
    #[serde(default = "one")]
    count: u32,
    /// Seconds.
    retry_after: Option<u64>,
}

fn one() -> u32 {
    1
}

async fn fail(sim: &Sim, body: Incoming) -> Result<Answer, Answer> {
    let request: FailRequest = json_body(body).await?;
    let status = StatusCode::from_u16(request.status)
        .ok()
        .filter(|s| s.is_client_error() || s.is_server_error())
        .ok_or_else(|| {
            refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                "bad_status",
                format!("status {} is not a 4xx or 5xx status", request.status),
            )
        })?;
    sim.inject(Failure {
        status,
        count: request.count,
        retry_after: request.retry_after.map(std::time::Duration::from_secs),
    });
    Ok(Answer::json(
        StatusCode::OK,
        json!({
            "status": request.status,
            "count": request.count,
            "retry_after": request.retry_after,
        }),
    ))
}

fn requests(sim: &Sim) -> Answer {
    let list: Vec<Value> = sim
        .requests()
        .iter()
        .map(|r| {
            let at_ms =
                r.at.duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
            json!({
                "method": r.method,
                "path": r.path,
                "route": r.route,
                "status": r.status,
                "at_ms": at_ms,
            })
        })
        .collect();
    Answer::json(StatusCode::OK, json!({"requests": list}))
}

fn stats(sim: &Sim) -> Answer {
    let stats = sim.stats();
    let by_status: serde_json::Map<String, Value> = stats
        .by_status
        .iter()
        .map(|(status, n)| (status.to_string(), json!(n)))
        .collect();
    let by_route: serde_json::Map<String, Value> = stats
        .by_route
        .iter()
        .map(|(route, n)| ((*route).to_owned(), json!(n)))
        .collect();
    Answer::json(
        StatusCode::OK,
        json!({"requests": stats.requests, "by_status": by_status, "by_route": by_route}),
    )
}
