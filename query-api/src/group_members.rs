//! A tag's or segment's members and exports (`GET /v1/segments/{name}/members`, every format)
//! answered for a whole group of several nodes (issue #21, `docs/design/cluster.md` §4).
//!
//! Each node's part is its members in the partitions it owns, in customer id order, after
//! a cursor naming the last id sent, with the requested fields' values as stored; the asked
//! node merges the parts by id, masks what the caller's role masks, and encodes the page —
//! or, for a whole export, asks page after page and streams them, so a member is written
//! once however partitions move meanwhile (each page is answered only once every partition
//! is answered exactly once, as for queries).

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::{Deserialize, Serialize};

use crate::access::{masking_of, AuditNote, FieldPolicy, Masking, Principal};
use crate::cluster::{self, Part};
use crate::error::ApiError;
use crate::export::Encoder;
use crate::routes::{export_columns, export_format, query_error, ExportColumns, MembersQuery, EXPORT_PAGE};
use crate::AppState;

/// How a members request reaching this node is to be answered.
pub(crate) enum Asked {
    /// As one node's whole answer: no group, or this node owns every partition.
    Alone,
    /// This node's part only, as the caller asked (`x-tagstream-scope: node`): its
    /// partitions are named on the answer.
    Scoped(Vec<u32>),
    /// Another node's question: this node's part, in the form the asker merges.
    Part,
    /// The group's answer, merged here.
    Group,
}

pub(crate) fn asked(app: &AppState, headers: &HeaderMap) -> Asked {
    if app.cluster.is_none() {
        return Asked::Alone;
    }
    if headers.contains_key(cluster::FORWARDED) {
        return Asked::Part;
    }
    let owned = cluster::answered_partitions(app);
    if owned.len() == app.engine.reader().partitions() as usize {
        Asked::Alone
    } else if cluster::scoped(headers) {
        Asked::Scoped(owned)
    } else {
        Asked::Group
    }
}

/// One node's members of one page: ids in order, each with its fields' values as stored
/// (JSON, as the contract prints values), and whether more follow.
#[derive(Serialize, Deserialize)]
struct MembersPart {
    customers: Vec<String>,
    fields: Vec<Vec<serde_json::Value>>,
    more: bool,
}

/// This node's part of another node's question: a page of its members in id order.
pub(crate) async fn part(app: &AppState, name: &str, q: MembersQuery) -> Result<Response, ApiError> {
    let limit = q
        .limit
        .filter(|l| *l > 0)
        .ok_or_else(|| ApiError::BadRequest("a node's part of a members page needs a limit".into()))?;
    let after = q.cursor.as_deref().map(cluster::decode_cursor).transpose()?;
    let local = local_part(app, name, q.fields, after, limit);
    Ok(cluster::answer_part(local).await?.into_response())
}

/// How this node answers for its partitions: its first `limit` members of `name` after id
/// `after`, with `fields`' values as stored (the asking node masks them for its caller).
fn local_part(
    app: &AppState,
    name: &str,
    fields: Option<String>,
    after: Option<String>,
    limit: usize,
) -> impl Fn() -> Result<Part<MembersPart>, ApiError> + Clone + Send + 'static {
    let reader = app.engine.reader().clone();
    let status = app.kafka.clone();
    let name = name.to_owned();
    move || {
        let ExportColumns { fields, .. } = export_columns(&reader, &Masking::default(), fields.as_deref())?;
        let set = reader
            .member_set(&name)
            .ok_or_else(|| ApiError::NotFound(format!("no tag or segment `{name}`")))?;
        cluster::part_of(status.as_deref(), |owned| {
            let (ids, more) = reader.members_in_partitions(&set, after.as_deref(), limit, owned);
            let values = reader
                .fields_of_mapped(&name, ids.numbers(), &fields, &mut [])
                .map_err(|e| query_error(e.into()))?;
            let wire = |row: &Vec<Option<rules::Value>>| {
                row.iter()
                    .map(|v| v.as_ref().map_or(serde_json::Value::Null, rules::Value::to_json))
                    .collect()
            };
            Ok(MembersPart {
                customers: ids.iter().map(str::to_owned).collect(),
                fields: values.iter().map(wire).collect(),
                more,
            })
        })
    }
}

/// A page merged from the parts: the first `limit` members by id, with their values.
struct Merged {
    ids: Vec<String>,
    values: Vec<Vec<Option<rules::Value>>>,
    more: bool,
}

/// Asks every node for its first `limit` members after `after` and merges them.
async fn page(
    app: &AppState,
    headers: &HeaderMap,
    name: &str,
    fields: Option<&str>,
    types: &[rules::Type],
    after: Option<&str>,
    limit: usize,
) -> Result<Merged, ApiError> {
    let mut path = format!(
        "/v1/segments/{}/members?format=ndjson&limit={limit}",
        escape(name)
    );
    if let Some(fields) = fields {
        path.push_str(&format!("&fields={}", escape(fields)));
    }
    if let Some(after) = after {
        path.push_str(&format!("&cursor={}", cluster::encode_cursor(after)));
    }
    let local = local_part(
        app,
        name,
        fields.map(str::to_owned),
        after.map(str::to_owned),
        limit,
    );
    let parts = cluster::fan_out(app, headers, axum::http::Method::GET, &path, None, local).await?;
    let more = parts.iter().any(|p| p.more);
    let mut rows: Vec<(String, Vec<serde_json::Value>)> = Vec::new();
    for part in parts {
        let MembersPart {
            customers, fields, ..
        } = part;
        let mut fields = fields.into_iter();
        for id in customers {
            rows.push((id, fields.next().unwrap_or_default()));
        }
    }
    rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let more = more || rows.len() > limit;
    rows.truncate(limit);
    let mut merged = Merged {
        ids: Vec::with_capacity(rows.len()),
        values: Vec::new(),
        more,
    };
    for (id, values) in rows {
        if !types.is_empty() {
            merged.values.push(
                values
                    .iter()
                    .zip(types)
                    .map(|(v, ty)| from_wire(v, *ty))
                    .collect(),
            );
        }
        merged.ids.push(id);
    }
    Ok(merged)
}

/// A value as a part carries it, read back as the column's type.
fn from_wire(value: &serde_json::Value, ty: rules::Type) -> Option<rules::Value> {
    match rules::Value::from_json(value) {
        rules::Value::Null => None,
        rules::Value::Num(n) if ty == rules::Type::Dur => {
            use rust_decimal::prelude::ToPrimitive;
            n.to_i64().map(rules::Value::Dur)
        }
        other => Some(other),
    }
}

/// Percent-encodes what is not unreserved in a query or path segment.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~,".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The group's members of `name`: one page in id order (`limit`, the next cursor naming the
/// last id in `x-next-cursor`), or every member, streamed in the asked format.
pub(crate) async fn members(
    app: &AppState,
    headers: &HeaderMap,
    name: &str,
    principal: &Option<Extension<Principal>>,
    note: Option<&AuditNote>,
    q: MembersQuery,
) -> Result<Response, ApiError> {
    let format = export_format(&q, name, note)?;
    let masking = masking_of(principal);
    let id_policy = masking.policy(crate::access::mask::CUSTOMER_ID);
    if q.limit.is_some() && id_policy != FieldPolicy::Show {
        return Err(ApiError::Forbidden(
            "in a group of several nodes, pages of members name customer ids in their cursors, which this key's role masks: export them whole (without `limit`), or use a role that sees customer ids".into(),
        ));
    }
    let after = q.cursor.as_deref().map(cluster::decode_cursor).transpose()?;
    let reader = app.engine.reader().clone();
    let ExportColumns {
        columns, mut maskers, ..
    } = export_columns(&reader, &masking, q.fields.as_deref())?;
    // The stored values' types (a masked column is text once masked).
    let stored: Vec<rules::Type> = export_columns(&reader, &Masking::default(), q.fields.as_deref())?
        .columns
        .into_iter()
        .map(|c| c.ty)
        .collect();
    if reader.member_set(name).is_none() {
        return Err(ApiError::NotFound(format!("no tag or segment `{name}`")));
    }
    let slot = crate::access::export_slot(&app.access, principal)?;
    let mut encoder = Encoder::new(format, columns).map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut body = encoder.header();
    let encode = |e: crate::export::EncodeError| ApiError::Internal(e.to_string());
    let mask = move |merged: &mut Merged, maskers: &mut [Option<processor::columns::ValueMap>]| {
        for row in &mut merged.values {
            for (value, masker) in row.iter_mut().zip(maskers.iter()) {
                if let (Some(v), Some(m)) = (value.as_mut(), masker) {
                    *v = m.apply(v);
                }
            }
        }
    };
    if let Some(limit) = q.limit {
        let mut merged = page(
            app,
            headers,
            name,
            q.fields.as_deref(),
            &stored,
            after.as_deref(),
            limit,
        )
        .await?;
        mask(&mut merged, &mut maskers);
        let ids = processor::index::IdPage::from_ids(merged.ids.iter().map(|id| (0, id.as_str())));
        body.extend(
            encoder
                .page_with(ids, id_policy, &merged.values)
                .map_err(encode)?,
        );
        body.extend(encoder.finish().map_err(encode)?);
        drop(slot);
        if let Some(note) = note {
            note.set("rows", merged.ids.len());
        }
        let mut response =
            ([(header::CONTENT_TYPE, format.content_type())], Body::from(body)).into_response();
        if let Some(last) = merged.ids.last().filter(|_| merged.more) {
            let value = HeaderValue::from_str(&cluster::encode_cursor(last)).expect("base64 is ASCII");
            response.headers_mut().insert("x-next-cursor", value);
        }
        return Ok(response);
    }
    // Every member, page after page.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let (app, headers, name) = (app.clone(), headers.clone(), name.to_owned());
    let fields = q.fields.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let fail = |what: String| Err(std::io::Error::other(what));
        if tx.send(Ok(body)).await.is_err() {
            return;
        }
        let mut after = after;
        loop {
            let mut merged = match page(
                &app,
                &headers,
                &name,
                fields.as_deref(),
                &stored,
                after.as_deref(),
                EXPORT_PAGE,
            )
            .await
            {
                Ok(merged) => merged,
                Err(e) => return drop(tx.send(fail(e.to_string())).await),
            };
            mask(&mut merged, &mut maskers);
            after = merged.ids.last().cloned();
            let ids = processor::index::IdPage::from_ids(merged.ids.iter().map(|id| (0, id.as_str())));
            match encoder.page_with(ids, id_policy, &merged.values) {
                Ok(bytes) if bytes.is_empty() => {}
                Ok(bytes) => {
                    if tx.send(Ok(bytes)).await.is_err() {
                        return;
                    }
                }
                Err(e) => return drop(tx.send(fail(e.to_string())).await),
            }
            if !merged.more || after.is_none() {
                break;
            }
        }
        let end = encoder.finish().map_err(|e| std::io::Error::other(e.to_string()));
        let _ = tx.send(end).await;
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok((
        [(header::CONTENT_TYPE, format.content_type())],
        Body::from_stream(stream),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value as a part carries it reads back as its column's type: a duration stays a
    /// duration (JSON prints it as milliseconds), a missing value is no value.
    #[test]
    fn values_read_back_as_their_columns_type() {
        let duration = rules::Value::Dur(90_000);
        let wire = duration.to_json();
        assert_eq!(from_wire(&wire, rules::Type::Dur), Some(duration));
        assert_eq!(
            from_wire(&wire, rules::Type::Num),
            Some(rules::Value::from_json(&serde_json::json!(90_000)))
        );
        let exact = rules::Value::from_json(&serde_json::from_str("1234.5600001").unwrap());
        assert_eq!(from_wire(&exact.to_json(), rules::Type::Num), Some(exact));
        let text = rules::Value::str("上海");
        assert_eq!(from_wire(&text.to_json(), rules::Type::Str), Some(text));
        assert_eq!(from_wire(&serde_json::Value::Null, rules::Type::Str), None);
    }

    #[test]
    fn names_and_fields_are_escaped_in_a_part_request() {
        assert_eq!(escape("since,profile.city"), "since,profile.city");
        assert_eq!(escape("城市 a&b=c"), "%E5%9F%8E%E5%B8%82%20a%26b%3Dc");
    }
}
