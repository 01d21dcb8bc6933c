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
    /// In a group: the group's change log from this cursor (`0`: its start).
    cursor: Option<String>,
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
    if let Some(cursor) = q.cursor {
        if q.after.is_some() {
            return Err(ApiError::BadRequest(
                "give `after` (this node's log) or `cursor` (the group's), not both".into(),
            ));
        }
        return group_delta(&app, &principal, name, &cursor).await;
    }
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

/// A group change-log cursor from the API (`0`: the start; `now`: the end), once this node
/// keeps the group log.
fn group_cursor(app: &AppState, reader: &ReadHandle, text: &str) -> Result<Vec<u64>, ApiError> {
    let status = app.kafka.as_ref().ok_or_else(|| {
        ApiError::Conflict(
            "`cursor` follows the change log of a group of nodes, and this node is not in one: use `after`"
                .into(),
        )
    })?;
    status.group_log().map_err(ApiError::Conflict)?;
    match text {
        "0" => Ok(reader.group_log_start()?),
        "now" => Ok(reader.group_log_end()?),
        _ => processor::decode_group_cursor(text, reader.partitions()).map_err(ApiError::BadRequest),
    }
}

fn gone(page: processor::GroupPage) -> ApiError {
    match page {
        processor::GroupPage::Gone { partition, oldest } => ApiError::GoneCursor {
            message: format!(
                "the group's change log no longer holds the changes of partition {partition} after this cursor (retention): start again from `oldest_cursor`"
            ),
            oldest_cursor: processor::encode_group_cursor(&oldest),
        },
        page => ApiError::Internal(format!("not a gone cursor: {page:?}")),
    }
}

/// [`delta`] over the group's change log: who entered and who exited `name` since
/// `cursor`, on any node of the group.
async fn group_delta(
    app: &AppState,
    principal: &Option<axum::Extension<crate::access::Principal>>,
    name: String,
    cursor: &str,
) -> Result<Json<Json_>, ApiError> {
    let reader = app.engine.reader().clone();
    known(&reader, &name)?;
    let from = group_cursor(app, &reader, cursor)?;
    let lookup = name.clone();
    let start = from.clone();
    let delta = tokio::task::spawn_blocking(move || reader.group_log_delta(&lookup, &start))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??
        .map_err(gone)?;
    let masking = crate::access::masking_of(principal);
    Ok(Json(json!({
        "name": name,
        "cursor": processor::encode_group_cursor(&from),
        "until": processor::encode_group_cursor(&delta.until),
        "entered": delta.entered.iter().map(|id| masking.id(id)).collect::<Vec<_>>(),
        "exited": delta.exited.iter().map(|id| masking.id(id)).collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    after: Option<u64>,
    /// In a group: the group's change log from this cursor (`0`: its start, `now`: from
    /// now on).
    cursor: Option<String>,
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
    let resumed = headers
        .get("last-event-id")
        .and_then(|id| id.to_str().ok())
        .map(str::trim)
        .filter(|id| id.starts_with("p1."));
    if let Some(cursor) = resumed.or(q.cursor.as_deref()) {
        if q.after.is_some() {
            return Err(ApiError::BadRequest(
                "give `after` (this node's log) or `cursor` (the group's), not both".into(),
            ));
        }
        let from = group_cursor(&app, &reader, cursor)?;
        return group_stream(&app, &principal, name, from);
    }
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
    Ok(sse_response(feed, shutdown, rx))
}

/// An SSE answer whose events `feed` sends into `rx`'s channel; at shutdown the stream ends
/// (its client reconnects, elsewhere too, with `Last-Event-ID`).
fn sse_response(
    feed: impl std::future::Future<Output = ()> + Send + 'static,
    shutdown: crate::Shutdown,
    rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> Response {
    tokio::spawn(async move {
        tokio::select! {
            () = feed => {},
            () = shutdown.begun() => {},
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// [`stream`] over the group's change log: every enter and exit of `name` on any node,
/// each partition's in order, from cursor `from`; each event's `id` is the cursor just
/// after it, so a reconnect with `Last-Event-ID` goes on with no gap and no duplicate.
fn group_stream(
    app: &AppState,
    principal: &Option<axum::Extension<crate::access::Principal>>,
    name: String,
    from: Vec<u64>,
) -> Result<Response, ApiError> {
    let reader = app.engine.reader().clone();
    // A cursor past retention is answered now, with the oldest.
    if let Err(page) = reader.group_log_of(&name, &from, 0)? {
        return Err(gone(page));
    }
    let masking = crate::access::masking_of(principal);
    let shutdown = app.shutdown.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(8);
    let feed = async move {
        if tx.send(Ok(b"retry: 1000\n\n".to_vec())).await.is_err() {
            return;
        }
        let mut cursor = from;
        let mut quiet = tokio::time::Instant::now();
        loop {
            let (step, of, at) = (reader.clone(), name.clone(), cursor.clone());
            let read =
                tokio::task::spawn_blocking(move || step.group_log_of(&of, &at, 10 * STREAM_READ)).await;
            let (matches, next) = match read {
                Ok(Ok(Ok(found))) => found,
                Ok(Ok(Err(page))) => {
                    return drop(tx.send(Err(std::io::Error::other(gone(page).to_string()))).await)
                }
                Ok(Err(e)) => return drop(tx.send(Err(std::io::Error::other(e.to_string()))).await),
                Err(e) => return drop(tx.send(Err(std::io::Error::other(e.to_string()))).await),
            };
            if next == cursor {
                // The group log is read from the changes topic as it comes: look again soon.
                if quiet.elapsed() >= KEEP_ALIVE {
                    quiet = tokio::time::Instant::now();
                    if tx.send(Ok(b": keep-alive\n\n".to_vec())).await.is_err() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            cursor = next;
            let mut out = Vec::new();
            for (json, after) in &matches {
                group_event(&mut out, json, after, &masking);
            }
            if !out.is_empty() {
                quiet = tokio::time::Instant::now();
                if tx.send(Ok(out)).await.is_err() {
                    return;
                }
            }
        }
    };
    Ok(sse_response(feed, shutdown, rx))
}

/// One change of the group log as an SSE event: `id` is the cursor just after it.
fn group_event(out: &mut Vec<u8>, json: &[u8], after: &[u64], masking: &crate::access::Masking) {
    let Ok(mut change) = serde_json::from_slice::<Json_>(json) else {
        return;
    };
    let event = if change["op"] == "add" { "enter" } else { "exit" };
    if masking.policy(crate::access::mask::CUSTOMER_ID) != crate::access::FieldPolicy::Show {
        masking.id_field(&mut change);
    }
    out.extend_from_slice(
        format!(
            "id: {}\nevent: {event}\ndata: ",
            processor::encode_group_cursor(after)
        )
        .as_bytes(),
    );
    serde_json::to_writer(&mut *out, &change).expect("writing to a Vec");
    out.extend_from_slice(b"\n\n");
}
