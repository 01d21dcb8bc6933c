//! `/v1/admin/keys` and `/v1/audit`.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;

use super::{AuditNote, KeyError, Principal};
use crate::error::ApiError;
use crate::{AppState, LimitedBody};

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::Invalid(m) => ApiError::BadRequest(m),
            KeyError::NotFound(_) => ApiError::NotFound(e.to_string()),
            KeyError::NameTaken(_) => ApiError::Conflict(e.to_string()),
            KeyError::Store(m) => ApiError::Internal(m),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: String,
    role: String,
}

/// `POST /v1/admin/keys {"name", "role"}`: the key is in this answer and nowhere else.
pub async fn create_key(
    State(app): State<AppState>,
    principal: Option<Extension<Principal>>,
    note: Option<Extension<AuditNote>>,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let CreateKey { name, role } = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("malformed JSON body: {e}")))?;
    if let Some(Extension(note)) = &note {
        note.set("name", &name);
        note.set("role", &role);
    }
    if app.access.role(&role).is_none() {
        return Err(ApiError::BadRequest(format!(
            "no role `{role}`; roles: {}",
            app.access.roles.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    let by = principal.map_or("anonymous".to_owned(), |Extension(p)| p.name);
    let new = app
        .access
        .keys
        .create(&name, &role, &by, super::audit::wall_ms())?;
    if let Some(Extension(note)) = &note {
        note.set("key_id", &new.info.id);
    }
    let mut answer = json!(new.info);
    answer["key"] = new.key.expose().into();
    answer["note"] = "store the key now: it is not kept and cannot be shown again".into();
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

pub async fn list_keys(State(app): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({ "keys": app.access.keys.list() }))
}

/// `DELETE /v1/admin/keys/{id}` (the id, or the name of a live key).
pub async fn revoke_key(
    State(app): State<AppState>,
    Path(id): Path<String>,
    note: Option<Extension<AuditNote>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let info = app.access.keys.revoke(&id, super::audit::wall_ms())?;
    if let Some(Extension(note)) = note {
        note.set("name", &info.name);
        note.set("role", &info.role);
    }
    Ok(Json(json!(info)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

/// `GET /v1/audit?after=SEQ&limit=N`: records after `after`, oldest first.
pub async fn audit(
    State(app): State<AppState>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let records = app
        .access
        .audit
        .read(q.after.unwrap_or(0), limit)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let next = records.last().map(|r| r.seq);
    Ok(Json(json!({ "records": records, "next_after": next })))
}
