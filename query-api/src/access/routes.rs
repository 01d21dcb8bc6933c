//! `/v1/admin/keys` and `/v1/audit`.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use processor::kafka::control::{Control, Shared};

use super::keys::KeyRecord;
use super::{Access, AuditNote, KeyError, Principal};
use crate::error::ApiError;
use crate::{AppState, LimitedBody};

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::Invalid(m) => ApiError::BadRequest(m),
            KeyError::NotFound(_) => ApiError::NotFound(e.to_string()),
            KeyError::NameTaken(_) => ApiError::Conflict(e.to_string()),
            KeyError::Store(m) => ApiError::Internal(m),
            KeyError::Unshared(m) => ApiError::Unavailable(m),
        }
    }
}

/// What the control topic's `key` records carry.
const SHARED_KIND: &str = "key";

/// Sends a key's record (its hash, never the key) to the group's other nodes; blocking,
/// until the broker has it. Outside a group, nothing to do.
fn share(control: Option<&Control>, record: &KeyRecord) -> Result<(), KeyError> {
    let Some(control) = control else {
        return Ok(());
    };
    control
        .share(&Shared {
            kind: SHARED_KIND.into(),
            id: record.id.clone(),
            body: serde_json::to_value(record).expect("a key record serialises"),
            latest: false,
        })
        .map_err(|e| KeyError::Unshared(format!("the group could not be told, so nothing changed: {e}")))
}

/// In a group of several: this node's API keys become the group's. Every key record the
/// group has (read from the control topic, those before this node started first) is merged
/// here, and each as it comes; then the keys of this store the group lacks or knows
/// otherwise (made with `tagstream keys` or a bootstrap file, revoked while the node was
/// alone) are shared. A key made or revoked on any node thus holds on every node; a
/// revocation wins over any record of the key, in any order. Returns how many were shared.
pub fn join_group(access: &Arc<Access>, control: &Arc<Control>) -> Result<usize, String> {
    let group: Arc<Mutex<HashMap<String, KeyRecord>>> = Arc::default();
    let (into, seen) = (access.clone(), group.clone());
    control.on_shared(
        SHARED_KIND,
        Box::new(move |shared: &Shared| {
            let record: KeyRecord = match serde_json::from_value(shared.body.clone()) {
                Ok(record) => record,
                // Where, not what: an error may quote the record.
                Err(e) => return tracing::warn!(id = %shared.id, line = e.line(), column = e.column(), "a key record from the group does not parse; ignored"),
            };
            if let Err(e) = into.keys.merge(&record) {
                return tracing::warn!(id = %shared.id, error = %e, "a key record from the group was not taken in");
            }
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            match seen.get_mut(&record.id) {
                Some(known) => {
                    known.join(&record);
                }
                None => {
                    seen.insert(record.id.clone(), record);
                }
            }
        }),
    );
    let group = group.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut shared = 0;
    for record in access.keys.records() {
        if group.get(&record.id) != Some(&record) {
            share(Some(control), &record).map_err(|e| e.to_string())?;
            shared += 1;
        }
    }
    Ok(shared)
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
    let (access, control) = (app.access.clone(), app.control.clone());
    let new = tokio::task::spawn_blocking(move || {
        access
            .keys
            .create_then(&name, &role, &by, super::audit::wall_ms(), |record| {
                share(control.as_deref(), record)
            })
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
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
    let (access, control) = (app.access.clone(), app.control.clone());
    let info = tokio::task::spawn_blocking(move || {
        access.keys.revoke_then(&id, super::audit::wall_ms(), |record| {
            share(control.as_deref(), record)
        })
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
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
    /// In a group of several: where a reader of the group's trail stands.
    cursor: Option<String>,
}

/// How the audit trail is listed in an answer.
const AUDIT: crate::cluster::ListShape = crate::cluster::ListShape {
    field: "records",
    id: "seq",
    time: "at",
};

/// `GET /v1/audit?after=SEQ&limit=N`: this node's records after `after`, oldest first; in a
/// group of several, unless `after` asks for this node's own, every node's, merged by their
/// time, each naming its `node`, paged with a group `cursor`.
pub async fn audit(
    State(app): State<AppState>,
    headers: axum::http::HeaderMap,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let local = |after: u64| -> Result<Vec<serde_json::Value>, ApiError> {
        let records = app
            .access
            .audit
            .read(after, limit)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(records
            .iter()
            .map(|r| serde_json::to_value(r).expect("an audit record serialises"))
            .collect())
    };
    let ask = crate::cluster::NodeListAsk::of(&app, &headers, q.cursor.as_deref(), q.after, "audit trail")?;
    let (me, from) = match ask {
        crate::cluster::NodeListAsk::Own(after) => {
            let records = local(after.unwrap_or(0))?;
            let next = records.last().and_then(|r| r["seq"].as_u64());
            return Ok(Json(json!({ "records": records, "next_after": next })));
        }
        crate::cluster::NodeListAsk::Group { me, from } => (me, from),
    };
    let path = match &q.cursor {
        Some(cursor) => format!(
            "/v1/audit?cursor={}&limit={limit}",
            crate::cluster::path_segment(cursor)
        ),
        None => format!("/v1/audit?limit={limit}"),
    };
    let merged = crate::cluster::every_node_list(
        &app,
        &headers,
        &path,
        &AUDIT,
        local(from.of(&me))?,
        (&from, limit),
        false,
    )
    .await;
    Ok(Json(json!({
        "records": merged.items,
        "cursor": merged.cursor.encode(),
        "unanswered": merged.unanswered,
    })))
}
