//! Membership streams for messaging platforms: a Server-Sent Events stream per tag or
//! segment, resumable from any change `seq`, and the delta export (who entered and who exited
//! since a `seq`). Both read the change log, so they see exactly what `GET /v1/changes` says.

use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use processor::{Change, Op, ReadHandle};
use serde::Deserialize;
use serde_json::{json, Value as Json_};

use crate::{ApiError, AppState};

/// Changes read from the log per step of a stream.
const STREAM_READ: usize = 1000;
/// A comment line this often keeps proxies from closing an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

fn known(reader: &ReadHandle, name: &str) -> Result<(), ApiError> {
    match reader.member_set(name) {
        Some(_) => Ok(()),
        None => Err(ApiError::NotFound(format!("no tag or segment `{name}`"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaQuery {
    after: Option<u64>,
}

/// `GET /v1/segments/{name}/delta?after=SEQ`: the net change of membership from change
/// `after` to the last committed one.
pub async fn delta(
    State(app): State<AppState>,
    principal: Option<axum::Extension<crate::access::Principal>>,
    Path(name): Path<String>,
    q: Result<Query<DeltaQuery>, QueryRejection>,
) -> Result<Json<Json_>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let after = q.after.ok_or_else(|| {
        ApiError::BadRequest(
            "`after` is required: the `until` of the previous delta, or 0 for everything".into(),
        )
    })?;
    let reader = app.engine.reader().clone();
    known(&reader, &name)?;
    let until = reader.last_seq();
    if after > until {
        return Err(ApiError::BadRequest(format!(
            "`after` is {after}, beyond the last change ({until})"
        )));
    }
    let lookup = name.clone();
    let delta = tokio::task::spawn_blocking(move || reader.delta(&lookup, after, until))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    let masking = crate::access::masking_of(&principal);
    Ok(Json(json!({
        "name": name,
        "after": after,
        "until": delta.until,
        "entered": delta.entered.iter().map(|id| masking.id(id)).collect::<Vec<_>>(),
        "exited": delta.exited.iter().map(|id| masking.id(id)).collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    after: Option<u64>,
}

/// The `seq` a stream starts after: `Last-Event-ID` (a reconnect), else `?after=`, else the
/// last committed change (only what happens from now on).
fn stream_start(headers: &HeaderMap, after: Option<u64>, reader: &ReadHandle) -> Result<u64, ApiError> {
    let start = match headers.get("last-event-id") {
        Some(id) => {
            let text = id.to_str().unwrap_or("");
            text.trim()
                .parse()
                .map_err(|_| ApiError::BadRequest(format!("Last-Event-ID `{text}` is not a change seq")))?
        }
        None => after.unwrap_or_else(|| reader.last_seq()),
    };
    // A client that fell behind retention learns it now, with the oldest seq left.
    reader.check_changes_cursor(start)?;
    Ok(start)
}

/// One change as an SSE event: `id` is its `seq`, `event` is `enter` or `exit`, `data` the
/// change as `GET /v1/changes` shows it.
fn sse_event(out: &mut Vec<u8>, change: &Change, masking: &crate::access::Masking) {
    let event = match change.op {
        Op::Add => "enter",
        // A segment's stream carries only its memberships.
        _ => "exit",
    };
    out.extend_from_slice(format!("id: {}\nevent: {event}\ndata: ", change.seq).as_bytes());
    if masking.policy(crate::access::mask::CUSTOMER_ID) == crate::access::FieldPolicy::Show {
        out.extend_from_slice(&change.to_json());
    } else {
        let mut value = serde_json::to_value(change).expect("a change serialises");
        masking.id_field(&mut value);
        serde_json::to_writer(&mut *out, &value).expect("writing to a Vec");
    }
    out.extend_from_slice(b"\n\n");
}

/// `GET /v1/segments/{name}/stream`: Server-Sent Events of every enter and exit, in `seq`
/// order, without gaps or duplicates across reconnects (`Last-Event-ID`).
pub async fn stream(
    State(app): State<AppState>,
    principal: Option<axum::Extension<crate::access::Principal>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    q: Result<Query<StreamQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let reader = app.engine.reader().clone();
    known(&reader, &name)?;
    let mut cursor = stream_start(&headers, q.after, &reader)?;
    let masking = crate::access::masking_of(&principal);
    let mut committed = app.engine.committed();
    let shutdown = app.shutdown.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(8);
    let feed = async move {
        if tx.send(Ok(b"retry: 1000\n\n".to_vec())).await.is_err() {
            return;
        }
        loop {
            committed.borrow_and_update();
            let (step, of) = (reader.clone(), name.clone());
            let read = tokio::task::spawn_blocking(move || step.changes_of(&of, cursor, STREAM_READ)).await;
            let changes = match read {
                Ok(Ok(changes)) => changes,
                Ok(Err(e)) => return drop(tx.send(Err(std::io::Error::other(e.to_string()))).await),
                Err(e) => return drop(tx.send(Err(std::io::Error::other(e.to_string()))).await),
            };
            let Some(last) = changes.last() else {
                match tokio::time::timeout(KEEP_ALIVE, committed.changed()).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(_)) => return,
                    Err(_) => {
                        if tx.send(Ok(b": keep-alive\n\n".to_vec())).await.is_err() {
                            return;
                        }
                        continue;
                    }
                }
            };
            cursor = last.seq;
            let mut out = Vec::new();
            for change in &changes {
                sse_event(&mut out, change, &masking);
            }
            if !out.is_empty() && tx.send(Ok(out)).await.is_err() {
                return;
            }
        }
    };
    // At shutdown the stream ends (its client reconnects elsewhere with Last-Event-ID).
    tokio::spawn(async move {
        tokio::select! {
            () = feed => {},
            () = shutdown.begun() => {},
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response())
}
