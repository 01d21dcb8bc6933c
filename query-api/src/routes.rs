//! Thin handlers: extract, call the engine once, answer with a DTO.

use std::collections::BTreeMap;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use processor::columns::ValueMap;
use processor::{Change, CustomerView, Explained, QueryError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json_};

use crate::access::mask::mask_stored;
use crate::access::{if_match, masking_of, AuditNote, FieldPolicy, Masking, Principal};
use crate::error::ApiError;
use crate::export::{Column, EncodeError, Encoder, Format};
use crate::{AppState, LimitedBody};

/// Parses a JSON body, naming the position of a syntax error and rejecting unknown fields.
fn json_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("malformed JSON body: {e}")))
}

/// Splits an ingest body into events: a JSON array, or NDJSON (blank lines skipped).
fn split_events(body: &Bytes) -> Result<Vec<Vec<u8>>, ApiError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        let items: Vec<Box<serde_json::value::RawValue>> = serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("malformed JSON array body: {e}")))?;
        return Ok(items
            .into_iter()
            .map(|raw| raw.get().as_bytes().to_vec())
            .collect());
    }
    Ok(body
        .split(|b| *b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
        .map(<[u8]>::to_vec)
        .collect())
}

pub async fn ingest(
    State(app): State<AppState>,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let events = split_events(&body)?;
    if events.is_empty() {
        return Err(ApiError::BadRequest(
            "the body holds no events (send NDJSON or a JSON array)".into(),
        ));
    }
    if let Some(kafka) = app.kafka.as_ref().filter(|k| k.group_member()) {
        return ingest_routed(&app, events, kafka).await;
    }
    let outcome = app.engine.ingest(events).await?;
    Ok(Json(json!({
        "accepted": outcome.accepted,
        "duplicates": outcome.duplicates,
        "rejected": outcome.rejected,
        "errors": outcome.errors,
    }))
    .into_response())
}

/// `POST /v1/events` on a member of a group: the events of customers of partitions this
/// node owns and holds are applied here and answered as on one node; the others are
/// produced to the events topic, each to its customer's partition, and answered once the
/// broker has them, as `forwarded` — their owners apply them (and count duplicates and
/// rejections there). Rejected events are rejected here; `errors` index the body.
///
/// What this node owns is read before the engine applies the events, and a rebalance may
/// take a partition in between: the engine applies only the events of partitions it still
/// holds and hands the others back, which are then sent on like the rest (or, if that
/// fails, answered as errors to send again).
async fn ingest_routed(
    app: &AppState,
    events: Vec<Vec<u8>>,
    kafka: &processor::kafka::KafkaStatus,
) -> Result<Response, ApiError> {
    let owned: std::collections::BTreeSet<u32> = kafka.owned_partitions().into_iter().collect();
    let router = kafka.router();
    if router.is_none() && owned.len() < app.engine.reader().partitions() as usize {
        return Err(ApiError::Unavailable(
            "this node's Kafka producer for other nodes' events has not started".into(),
        ));
    }
    let engine = app.engine.clone();
    let sender = router.clone();
    let split = tokio::task::spawn_blocking(move || {
        let intake = engine.intake();
        let (parsed, sightings) = intake.parse_unrecorded(&events);
        let here = match &sender {
            Some(router) => {
                let posted = processor::kafka::route::Where::Posted(&owned);
                router.forward(&events, &parsed, posted, intake.identity.as_deref())?
            }
            None => vec![true; events.len()],
        };
        // (An event handed back by the engine below is counted here and by its owner.)
        intake.record("http", &parsed, sightings, |i| here[i]);
        let (mut raw, mut kept, mut body_index) = (Vec::new(), Vec::new(), Vec::new());
        for (i, (event, parsed)) in events.into_iter().zip(parsed).enumerate() {
            if here[i] {
                raw.push(event);
                kept.push(parsed);
                body_index.push(i);
            }
        }
        let forwarded = here.len() - body_index.len();
        let request = processor::IngestRequest {
            raw,
            parsed: kept,
            positions: Vec::new(),
            source: "http",
            owned_only: true,
        };
        Ok::<_, String>((request, body_index, forwarded))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("sending events to their owners: {e}")))?;
    let (request, body_index, mut forwarded) = split.map_err(ApiError::Unavailable)?;
    let mut outcome = match request.raw.is_empty() {
        true => processor::IngestOutcome::default(),
        false => app.engine.ingest_request(request).await?,
    };
    for error in &mut outcome.errors {
        error.index = body_index[error.index];
    }
    let moved = std::mem::take(&mut outcome.moved);
    if !moved.is_empty() {
        let indices: Vec<usize> = moved.iter().map(|m| body_index[m.index]).collect();
        match send_moved(app, moved, router).await {
            Ok(()) => forwarded += indices.len(),
            Err(e) => {
                outcome.rejected += indices.len();
                outcome
                    .errors
                    .extend(indices.into_iter().map(|index| processor::IngestError {
                        index,
                        reason: format!(
                            "its customer's partition moved to another node while this request was \
                         applied, and sending the event there failed ({e}): send it again"
                        ),
                        code: "partition_moved",
                    }));
                outcome.errors.sort_by_key(|error| error.index);
            }
        }
    }
    if outcome.accepted > 0 {
        confirmed_in_group(app).await?;
    }
    Ok(Json(json!({
        "accepted": outcome.accepted,
        "duplicates": outcome.duplicates,
        "rejected": outcome.rejected,
        "errors": outcome.errors,
        "forwarded": forwarded,
    }))
    .into_response())
}

/// Sends the events the engine handed back ([`processor::IngestOutcome::moved`]) to their
/// customers' partitions.
async fn send_moved(
    app: &AppState,
    moved: Vec<processor::MovedEvent>,
    router: Option<std::sync::Arc<processor::kafka::route::Router>>,
) -> Result<(), String> {
    let router = router.ok_or("this node's Kafka producer for other nodes' events has not started")?;
    let engine = app.engine.clone();
    tokio::task::spawn_blocking(move || router.forward_moved(&moved, engine.intake().identity.as_deref()))
        .await
        .map_err(|e| e.to_string())?
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClockBody {
    now: i64,
}

pub async fn set_clock(
    State(app): State<AppState>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<Json<Json_>, ApiError> {
    let ClockBody { now } = json_body(&body)?;
    let changes = app
        .engine
        .call(move |engine| {
            let changes = engine.advance_clock(now);
            processor::telemetry::record_timers(&engine.take_fired_timers(), None);
            changes
        })
        .await??;
    let mine = json!({ "now": now, "changes": changes.len() });
    // In a group each node moves the clocks of the partitions it owns: this one asks the
    // others, and answers with every node's.
    let Some(me) = crate::cluster::my_url(&app).filter(|_| !headers.contains_key(crate::cluster::FORWARDED))
    else {
        return Ok(Json(mine));
    };
    let mut total = changes.len() as u64;
    let mut nodes = vec![json!({ "node": me, "changes": changes.len() })];
    let asked =
        crate::cluster::every_other_node(&app, &headers, axum::http::Method::POST, "/v1/clock", body).await;
    for (url, answer) in asked {
        let error = match answer {
            Ok((status, bytes)) => match serde_json::from_slice::<Json_>(&bytes) {
                Ok(answer) if status.is_success() => {
                    let theirs = answer["changes"].as_u64().unwrap_or_default();
                    total += theirs;
                    nodes.push(json!({ "node": url, "changes": theirs }));
                    continue;
                }
                Ok(answer) => format!("{status}: {}", answer["error"].as_str().unwrap_or_default()),
                Err(_) => format!("{status}: {}", String::from_utf8_lossy(&bytes)),
            },
            Err(e) => e,
        };
        nodes.push(json!({ "node": url, "error": error }));
    }
    Ok(Json(json!({ "now": now, "changes": total, "nodes": nodes })))
}

/// `GET /v1/rules`: the rule-set text, its version in `ETag`.
pub async fn get_rules(State(app): State<AppState>) -> Result<Response, ApiError> {
    let (text, version) = app
        .engine
        .call(|engine| (engine.rules().source().to_owned(), engine.rules_version()))
        .await?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8".to_owned()),
            (header::ETAG, format!("\"{version}\"")),
        ],
        text,
    )
        .into_response())
}

/// Who edits the rule set (the request's key) and which version they read (`If-Match`).
fn rule_edit(principal: Option<&Principal>, headers: &HeaderMap) -> Result<processor::RuleEdit, ApiError> {
    let expect = if_match(headers).map_err(ApiError::BadRequest)?;
    let author = principal.map_or("anonymous", |p| p.name.as_str());
    Ok(processor::RuleEdit::by(author).expecting(expect))
}

/// What a committed rule-set version answers and tells the audit trail.
fn versioned_answer(
    version: &processor::RuleVersion,
    note: Option<&AuditNote>,
    mut answer: Json_,
) -> Response {
    if let Some(note) = note {
        note.set("version", version.version);
        note.set("diff", &version.diff);
    }
    answer["version"] = version.version.into();
    answer["diff"] = serde_json::to_value(&version.diff).expect("a diff serialises");
    ([(header::ETAG, format!("\"{}\"", version.version))], Json(answer)).into_response()
}

/// How long a node waits for a rule-set change it sent to the control topic to come back.
const CONTROL_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Times a change made without `If-Match` is proposed again after another node's change,
/// made from the same version, came first.
const CONTROL_RETRIES: usize = 5;

/// Makes a rule-set change `propose` checks: on this node alone, or — in a group sharing its
/// rule set — through the control topic, applied by every node, this one answering once it
/// has applied it. A change refused because another one from the same version came first
/// is proposed again on the new version unless the caller named a version (`If-Match`: 409
/// with the current version).
async fn change_rules<F>(
    app: &AppState,
    edit: processor::RuleEdit,
    propose: F,
) -> Result<(processor::SegmentUpdate, processor::RuleVersion), ApiError>
where
    F: Fn(&processor::Engine, &processor::RuleEdit) -> Result<processor::Proposal, QueryError>
        + Clone
        + Send
        + 'static,
{
    let Some(control) = app.control.clone() else {
        return app
            .engine
            .call(move |engine| propose(engine, &edit).and_then(|p| engine.apply_proposal(p)))
            .await?
            .map_err(query_error);
    };
    for _ in 0..=CONTROL_RETRIES {
        let (check, asked) = (propose.clone(), edit.clone());
        let proposal = app
            .engine
            .call(move |engine| check(engine, &asked))
            .await?
            .map_err(query_error)?;
        let expected = proposal.version.version - 1;
        let control = control.clone();
        let outcome = tokio::task::spawn_blocking(move || control.propose(proposal, CONTROL_WAIT))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        use processor::kafka::control::{ControlError, Outcome};
        match outcome {
            Ok(Outcome::Applied(update, version)) => return Ok((update, version)),
            Ok(Outcome::Refused { .. }) if edit.expect.is_none() => continue,
            Ok(Outcome::Refused { current }) => {
                return Err(processor::EngineError::Stale { expected, current }.into());
            }
            Ok(Outcome::Failed(e)) => {
                return Err(ApiError::Internal(format!(
                    "the group accepted the change but this node could not apply it: {e}"
                )))
            }
            Err(e @ ControlError::Timeout(_)) => return Err(ApiError::GatewayTimeout(e.to_string())),
            Err(e) => return Err(ApiError::Unavailable(e.to_string())),
        }
    }
    Err(ApiError::Conflict(format!(
        "other nodes kept changing the rule set ({} attempts); try again",
        CONTROL_RETRIES + 1
    )))
}

/// `PUT /v1/rules`: the next version of the rule set; the answer lists what it added,
/// removed and changed, so no removal goes unseen.
pub async fn put_rules(
    State(app): State<AppState>,
    principal: Option<Extension<Principal>>,
    note: Option<Extension<AuditNote>>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let edit = rule_edit(principal.as_deref(), &headers)?;
    let text = String::from_utf8(body.to_vec())
        .map_err(|_| ApiError::BadRequest("the rule set is not valid UTF-8".into()))?;
    // Checked here, with the text at hand, so every diagnostic carries its source line.
    let compiled = rules::CompiledRules::compile(&text)
        .map_err(|diags| ApiError::InvalidRules(diags.iter().map(|d| d.located(&text)).collect()))?;
    let warnings = check_reads(&app, &text)?;
    let definitions = compiled.defs().len();
    let (_, version) = change_rules(&app, edit, move |engine, edit| {
        Ok(engine.propose_rules(&text, edit, "put_rules".to_owned())?)
    })
    .await?;
    let answer = json!({ "definitions": definitions, "backfill": "running", "warnings": warnings });
    Ok(versioned_answer(&version, note.as_deref(), answer))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionsQuery {
    before: Option<u64>,
    limit: Option<usize>,
}

/// `GET /v1/rules/versions?before=N&limit=M`: versions newest first, without their text.
pub async fn rule_versions(
    State(app): State<AppState>,
    query: Result<Query<VersionsQuery>, QueryRejection>,
) -> Result<Json<Json_>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let reader = app.engine.reader();
    let versions = processor::ReadVersions(reader.store()).list(q.before, limit)?;
    let next = versions.last().map(|v| v.version).filter(|v| *v > 1);
    Ok(Json(json!({ "versions": versions, "next_before": next })))
}

/// `GET /v1/rules/versions/{version}`: one version with its text and diff.
pub async fn rule_version(
    State(app): State<AppState>,
    Path(version): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    let number: u64 = version
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("`{version}` is not a version number")))?;
    let reader = app.engine.reader();
    let found = processor::ReadVersions(reader.store())
        .get(number)?
        .ok_or_else(|| ApiError::NotFound(format!("no rule-set version {number}")))?;
    Ok(Json(json!(found)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    version: u64,
}

/// `POST /v1/rules/rollback {"version": N}`: the rule set as it was at version N, as a new
/// version.
pub async fn rollback_rules(
    State(app): State<AppState>,
    principal: Option<Extension<Principal>>,
    note: Option<Extension<AuditNote>>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let edit = rule_edit(principal.as_deref(), &headers)?;
    let RollbackBody { version } = json_body(&body)?;
    let (_, committed) = change_rules(&app, edit, move |engine, edit| {
        Ok(engine.propose_rollback(version, edit)?)
    })
    .await?;
    let answer = json!({ "rolled_back_to": version, "backfill": "running" });
    Ok(versioned_answer(&committed, note.as_deref(), answer))
}

/// What a rule set reads, judged against the tracking plan (its errors refuse the rule
/// set with 422) or, without one, against the event types, properties and attributes
/// received so far (warnings, returned to the caller).
fn check_reads(app: &AppState, text: &str) -> Result<Vec<rules::LocatedDiagnostic>, ApiError> {
    check_reads_with(app, text, rules::check_rules_against)
}

/// [`check_reads`] for a segment expression.
fn check_expr_reads(app: &AppState, expr: &str) -> Result<Vec<rules::LocatedDiagnostic>, ApiError> {
    check_reads_with(app, expr, rules::check_expr_against)
}

fn check_reads_with(
    app: &AppState,
    text: &str,
    check: fn(&str, &rules::Catalog<'_>) -> Vec<rules::Diagnostic>,
) -> Result<Vec<rules::LocatedDiagnostic>, ApiError> {
    let intake = app.engine.reader().intake();
    let diagnostics = match &intake.plan {
        Some(plan) => check(text, &rules::Catalog::Plan(plan)),
        None => {
            let seen = intake.quality.seen();
            check(
                text,
                &rules::Catalog::Observed {
                    events: &seen.0,
                    profile: &seen.1,
                },
            )
        }
    };
    let located: Vec<rules::LocatedDiagnostic> = diagnostics.iter().map(|d| d.located(text)).collect();
    if diagnostics.iter().any(|d| !d.code.is_warning()) {
        return Err(ApiError::InvalidRules(located));
    }
    Ok(located)
}

/// Customers one preview call evaluates before giving the engine back to other requests.
const PREVIEW_STEP: usize = 2_000;

/// `POST /v1/rules/preview`: what a draft rule set would do, without applying it.
pub async fn preview_rules(
    State(app): State<AppState>,
    LimitedBody(body): LimitedBody,
) -> Result<Json<Json_>, ApiError> {
    let text = String::from_utf8(body.to_vec())
        .map_err(|_| ApiError::BadRequest("the rule set is not valid UTF-8".into()))?;
    let draft = rules::CompiledRules::compile(&text)
        .map_err(|diags| ApiError::InvalidRules(diags.iter().map(|d| d.located(&text)).collect()))?;
    let warnings = check_reads(&app, &text)?;
    let draft = std::sync::Arc::new(draft);
    let mut preview = processor::Preview::default();
    let mut cursor: Option<String> = None;
    loop {
        let (d, after) = (draft.clone(), cursor.take());
        let (p, next) = app
            .engine
            .call(move |engine| {
                let mut preview = preview;
                let next = engine.preview_step(&d, after.as_deref(), PREVIEW_STEP, &mut preview);
                next.map(|n| (preview, n))
            })
            .await??;
        preview = p;
        match next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    let mut answer = serde_json::to_value(&preview).expect("a preview serialises");
    answer["warnings"] = serde_json::to_value(&warnings).expect("diagnostics serialise");
    Ok(Json(answer))
}

#[derive(serde::Serialize)]
struct MembershipDto {
    since: i64,
    expires_at: Option<i64>,
}

/// `GET /v1/customers/{id}`, serialised straight to the body so exact decimals keep their
/// digits (a detour through `serde_json::Value` would turn them into floats).
#[derive(serde::Serialize)]
struct CustomerDto<'a> {
    customer_id: &'a str,
    tags: BTreeMap<&'a str, MembershipDto>,
    traits: BTreeMap<&'a str, &'a rules::Value>,
    profile: BTreeMap<&'a str, &'a rules::Value>,
    /// The identifiers the customer owns, by type (identity resolution), as the caller's
    /// role may see them.
    identifiers: BTreeMap<String, Vec<String>>,
}

fn customer_dto(view: &CustomerView) -> CustomerDto<'_> {
    CustomerDto {
        identifiers: BTreeMap::new(),
        customer_id: &view.customer_id,
        tags: view
            .tags
            .iter()
            .map(|(name, m)| {
                (
                    &**name,
                    MembershipDto {
                        since: m.since,
                        expires_at: m.expires_at,
                    },
                )
            })
            .collect(),
        traits: view.traits.iter().map(|(k, v)| (&**k, v)).collect(),
        profile: view.profile.iter().map(|(k, v)| (&**k, v)).collect(),
    }
}

pub async fn get_customer(
    State(app): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_owner(&app, &id)?;
    // A point read served here, not on the engine thread: lookups never wait for a batch.
    // An id a merge absorbed answers the survivor (the answer's `customer_id` says who).
    let reader = app.engine.reader();
    match reader.customer(&id)? {
        Some(view) if app.cluster.is_some() => {
            group_customer_response(&app, &principal, &headers, view).await
        }
        Some(view) => customer_response(reader, view, &masking_of(&principal)),
        // Handed over to a survivor of another partition (a merge across a group's
        // nodes): the survivor's owner answers.
        None if app.cluster.is_some() => match reader.moved_to(&rules::normalize(&id)) {
            Some(survivor) => {
                crate::cluster::customer_from_owner(&app, &principal, &headers, &survivor).await
            }
            None => Err(ApiError::NotFound(format!("no customer `{id}`"))),
        },
        None => Err(ApiError::NotFound(format!("no customer `{id}`"))),
    }
}

/// `GET /v1/customers/by/{type}/{value}`: the customer an identifier belongs to (the value
/// normalised as events' are: `+86 138-0000-0001` finds `13800000001`).
pub async fn customer_by_identifier(
    State(app): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    Path((id_type, value)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let scoped = crate::cluster::scoped(&headers);
    if app.cluster.is_some() && !scoped {
        return group_customer_by_identifier(&app, &principal, &headers, &id_type, &value).await;
    }
    let reader = app.engine.reader();
    let view = match reader.identify(&id_type, &value)? {
        Some(customer) => reader.customer(&customer)?,
        None => None,
    };
    let mut answer = match view {
        Some(view) => customer_response(reader, view, &masking_of(&principal))?,
        None => return Err(ApiError::NotFound(format!("no customer has {id_type} `{value}`"))),
    };
    if app.cluster.is_some() {
        // This node's part, asked for knowingly.
        crate::cluster::name_partitions(&mut answer, &crate::cluster::answered_partitions(&app));
    }
    Ok(answer)
}

/// Who holds an identifier in this node's partitions (a part of [`group_customer_by_identifier`]).
#[derive(Debug, Serialize, Deserialize)]
struct Holder {
    customer: Option<String>,
}

/// [`customer_by_identifier`] in a group: every node looks the identifier up among the
/// customers of the partitions it owns; the customer found is then answered by their
/// owner, as `GET /v1/customers/{id}` is.
async fn group_customer_by_identifier(
    app: &AppState,
    principal: &Option<Extension<Principal>>,
    headers: &HeaderMap,
    id_type: &str,
    value: &str,
) -> Result<Response, ApiError> {
    let reader = app.engine.reader().clone();
    let status = app.kafka.clone();
    let (lookup_type, lookup_value) = (id_type.to_owned(), value.to_owned());
    let local = move || {
        crate::cluster::part_of(status.as_deref(), |owned| {
            let customer = reader.identify_in(&lookup_type, &lookup_value, owned)?;
            Ok(Holder {
                customer: customer.map(|c| c.to_string()),
            })
        })
    };
    if headers.contains_key(crate::cluster::FORWARDED) {
        return Ok(crate::cluster::answer_part(local).await?.into_response());
    }
    let path = format!(
        "/v1/customers/by/{}/{}",
        crate::cluster::path_segment(id_type),
        crate::cluster::path_segment(value)
    );
    let parts = crate::cluster::fan_out(app, headers, axum::http::Method::GET, &path, None, local).await?;
    let mut found: Vec<String> = parts.into_iter().filter_map(|h| h.customer).collect();
    found.sort();
    found.dedup();
    let customer = match found.as_slice() {
        [] => return Err(ApiError::NotFound(format!("no customer has {id_type} `{value}`"))),
        [one] => one.clone(),
        several => {
            let masking = masking_of(principal);
            let shown: Vec<String> = several.iter().map(|c| masking.id(c).into_owned()).collect();
            return Err(ApiError::Conflict(format!(
                "{id_type} `{value}` is held by customers of different partitions ({}): identity across partitions is not resolved in a group yet",
                shown.join(", ")
            )));
        }
    };
    crate::cluster::customer_from_owner(app, principal, headers, &customer).await
}

/// A customer with their identifiers, masked for the caller's role: profile attributes and
/// identifiers by their name or type (`phone = "mask"`), ids by `customer_id`'s policy.
pub(crate) fn customer_response(
    reader: &processor::ReadHandle,
    v: CustomerView,
    masking: &crate::access::Masking,
) -> Result<Response, ApiError> {
    let identifiers = masked_identifiers(reader, &v.customer_id, masking)?;
    Ok(customer_with(v, identifiers, masking))
}

/// [`customer_response`] on a member of a group: the identifiers are the graph's, which is
/// partition 0's (`GET /v1/identities/customers/{customer}` of its owner, with the
/// caller's headers) when this node does not own it.
pub(crate) async fn group_customer_response(
    app: &AppState,
    principal: &Option<Extension<Principal>>,
    headers: &HeaderMap,
    v: CustomerView,
) -> Result<Response, ApiError> {
    let masking = masking_of(principal);
    let identifiers = match crate::cluster::identifiers_from_resolver(app, headers, &v.customer_id).await? {
        Some(identifiers) => identifiers,
        None => masked_identifiers(app.engine.reader(), &v.customer_id, &masking)?,
    };
    Ok(customer_with(v, identifiers, &masking))
}

/// The identifiers `customer` owns in this store's graph, by type, as `masking` shows them.
fn masked_identifiers(
    reader: &processor::ReadHandle,
    customer: &str,
    masking: &crate::access::Masking,
) -> Result<BTreeMap<String, Vec<String>>, ApiError> {
    let mut identifiers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (id_type, value) in reader.identifiers(customer)? {
        let shown = if &*id_type == processor::identity::CUSTOMER_ID {
            Some(masking.id(&value).into_owned())
        } else {
            match masking.stored(&id_type, &rules::Value::Str(value.into())) {
                Some(rules::Value::Str(s)) => Some(s.to_string()),
                Some(other) => Some(other.to_string()),
                None => None,
            }
        };
        if let Some(shown) = shown {
            identifiers.entry(id_type.to_string()).or_default().push(shown);
        }
    }
    Ok(identifiers)
}

/// A customer's answer: the view with `identifiers`, masked for the caller.
fn customer_with(
    mut v: CustomerView,
    identifiers: BTreeMap<String, Vec<String>>,
    masking: &crate::access::Masking,
) -> Response {
    if masking.is_open() {
        let mut dto = customer_dto(&v);
        dto.identifiers = identifiers;
        return Json(dto).into_response();
    }
    v.profile = v
        .profile
        .iter()
        .filter_map(|(k, value)| Some((k.clone(), masking.stored(k, value)?)))
        .collect();
    let id = masking.id(&v.customer_id).into_owned();
    let mut dto = customer_dto(&v);
    dto.customer_id = &id;
    dto.identifiers = identifiers;
    Json(dto).into_response()
}

/// `GET /v1/identities/customers/{customer}`: the identifiers a customer owns, by type, as
/// the caller's role shows them — from the identity graph, which in a group is partition
/// 0's: another node sends the request on to its owner.
pub async fn customer_identifiers(
    State(app): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    Path(customer): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    let customer = rules::normalize(&customer).into_owned();
    let masking = masking_of(&principal);
    // Asked by another node (it took this one for partition 0's owner): answered here,
    // never sent on again.
    let asked_here = headers.contains_key(crate::cluster::FORWARDED);
    let from_resolver = match asked_here {
        true => None,
        false => crate::cluster::identifiers_from_resolver(&app, &headers, &customer).await?,
    };
    let identifiers = match from_resolver {
        Some(identifiers) => identifiers,
        None => masked_identifiers(app.engine.reader(), &customer, &masking)?,
    };
    Ok(Json(json!({
        "customer_id": masking.id(&customer).into_owned(),
        "identifiers": identifiers,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeBody {
    ids: Vec<String>,
}

/// `POST /v1/customers/{id}/merge {"ids": [...]}`: the customers named join `{id}`, which
/// survives; the change log records the merge with the key's name.
///
/// In a consumer group of several, a customer of a partition another node owns is handed
/// over by that node (`POST /v1/customers/{it}/handover`) and taken here; the answer lists
/// it in `handed_over`, with the changes its node made (it leaves its tags), once this
/// node has taken it (its side of the merge is in the change log), or in `pending` when
/// that took longer than [`HANDOVER_WAIT`] (it is taken as soon as it arrives).
pub async fn merge_customers(
    State(app): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let ids = customer_ids(&body, "merge into this one")?;
    check_owner(&app, &id)?;
    if app.engine.reader().resolver() {
        return merge_by_resolver(&app, &principal, &headers, &id, ids).await;
    }
    // Customers of partitions another node owns are handed over by it.
    let (here, away): (Vec<String>, Vec<String>) = ids.into_iter().partition(|other| {
        !matches!(check_owner(&app, other), Err(ApiError::Conflict(_))) || app.cluster.is_none()
    });
    check_owners(&app, &id, &here)?;
    let mut away = away;
    let mut seen = std::collections::HashSet::new();
    away.retain(|other| seen.insert(rules::normalize(other).into_owned()));
    let by = key_name(&principal);
    let masking = masking_of(&principal);
    let (mut survivor, mut absorbed, mut changes) = (None, Vec::new(), Vec::new());
    if !here.is_empty() || away.is_empty() {
        let (to, by) = (id.clone(), by.clone());
        let merged = app
            .engine
            .call(move |engine| engine.merge_customers(&to, &here, by.as_deref()))
            .await??;
        changes = masked_changes(&merged.changes, &masking)
            .as_array()
            .cloned()
            .unwrap_or_default();
        absorbed.extend(merged.absorbed.iter().map(|a| masking.id(a).into_owned()));
        survivor = Some(merged.survivor);
        confirmed_in_group(&app).await?;
    }
    let survivor = match survivor {
        Some(survivor) => survivor,
        None => {
            let named: std::sync::Arc<str> = std::sync::Arc::from(rules::normalize(&id).as_ref());
            let survivor = app
                .engine
                .reader()
                .identify("customer_id", &named)?
                .unwrap_or(named);
            if app.engine.reader().customer(&survivor)?.is_none() {
                return Err(ApiError::NotFound(format!("no customer `{survivor}`")));
            }
            survivor
        }
    };
    let (mut handed_over, mut pending) = (Vec::new(), Vec::new());
    for other in away {
        let answer = crate::cluster::hand_over_at_owner(&app, &headers, &other, &survivor).await?;
        let gone = answer["customer_id"].as_str().unwrap_or(&other).to_owned();
        changes.extend(answer["changes"].as_array().cloned().unwrap_or_default());
        match taken_here(&app, &rules::normalize(&other), &survivor).await {
            true => handed_over.push(gone),
            false => pending.push(gone),
        }
    }
    let mut out = json!({ "changes": changes });
    out["customer_id"] = masking.id(&survivor).into_owned().into();
    absorbed.extend(handed_over.iter().cloned());
    out["absorbed"] = absorbed.into();
    if !handed_over.is_empty() {
        out["handed_over"] = handed_over.into();
    }
    if pending.is_empty() {
        return Ok(Json(out).into_response());
    }
    out["pending"] = pending.into();
    Ok((StatusCode::ACCEPTED, Json(out)).into_response())
}

/// [`merge_customers`] in a group whose identity graph is partition 0's
/// ([`processor::EngineConfig::resolver`]): the customers are looked for where they are
/// held, the merge is sent to partition 0, whose owner merges them in the graph and asks
/// the owner of each absorbed customer to hand it over to `{id}`, here. Answers once this
/// node took them (`handed_over`), or `202` naming those it had not yet taken after
/// [`HANDOVER_WAIT`] (`pending`); the changes are in the change log (the absorbed
/// customers' on their nodes), not in the answer.
async fn merge_by_resolver(
    app: &AppState,
    principal: &Option<Extension<Principal>>,
    headers: &HeaderMap,
    id: &str,
    ids: Vec<String>,
) -> Result<Response, ApiError> {
    let survivor = held_here(app, id, "merge into")?;
    let mut absorbed: Vec<String> = Vec::new();
    for other in ids {
        let other = rules::normalize(&other).into_owned();
        if other == survivor {
            return Err(ApiError::Conflict(format!(
                "`{other}` is already customer `{survivor}`"
            )));
        }
        if absorbed.contains(&other) {
            continue;
        }
        // Held, here or by its partition's owner (an id merged into another answers that
        // one: it is merged already, then).
        let view = match app.cluster.as_ref() {
            Some(_) => crate::cluster::customer_from_owner(app, principal, headers, &other).await,
            None => Err(ApiError::NotFound(String::new())),
        };
        let held = match view {
            Ok(response) if response.status().is_success() => {
                let body = axum::body::to_bytes(response.into_body(), 16 << 20)
                    .await
                    .map_err(|e| ApiError::BadGateway(format!("reading `{other}` from its owner: {e}")))?;
                serde_json::from_slice::<Json_>(&body)
                    .ok()
                    .and_then(|v| v["customer_id"].as_str().map(str::to_owned))
            }
            Ok(_) | Err(ApiError::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        match held {
            None => return Err(ApiError::NotFound(format!("no customer `{other}`"))),
            Some(now) if now == survivor => {
                return Err(ApiError::Conflict(format!(
                    "`{other}` is already customer `{survivor}`"
                )))
            }
            Some(_) => absorbed.push(other),
        }
    }
    let router = group_router(app)?;
    let cause = manual_cause(principal);
    let (to, named) = (survivor.clone(), absorbed.clone());
    tokio::task::spawn_blocking(move || router.send_merge(&to, &named, &cause))
        .await
        .map_err(|e| ApiError::Internal(format!("sending the merge: {e}")))?
        .map_err(ApiError::Unavailable)?;
    let pending = wait_for_each(app, absorbed.clone(), |reader, other| {
        reader.has_taken(&survivor, other)
    })
    .await?;
    let masking = masking_of(principal);
    let names = |which: &mut dyn Iterator<Item = &String>| -> Vec<String> {
        which.map(|a| masking.id(a).into_owned()).collect()
    };
    let out = json!({
        "customer_id": masking.id(&survivor).into_owned(),
        "absorbed": names(&mut absorbed.iter()),
        "changes": [],
        "handed_over": names(&mut absorbed.iter().filter(|a| !pending.contains(a))),
    });
    Ok(waited(out, names(&mut pending.iter())))
}

/// Waits up to [`HANDOVER_WAIT`] until `done` holds for each of `pending` on this node's
/// store; returns those for which it still does not.
async fn wait_for_each<T>(
    app: &AppState,
    mut pending: Vec<T>,
    done: impl Fn(&processor::ReadHandle, &T) -> Result<bool, processor::EngineError>,
) -> Result<Vec<T>, ApiError> {
    let deadline = std::time::Instant::now() + HANDOVER_WAIT;
    loop {
        let reader = app.engine.reader();
        let mut waiting = Vec::new();
        for item in pending {
            if !done(reader, &item)? {
                waiting.push(item);
            }
        }
        pending = waiting;
        if pending.is_empty() || std::time::Instant::now() >= deadline {
            return Ok(pending);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A merge's or unmerge's answer in a group: `200`, or `202` naming in `pending` what the
/// other nodes had not done yet.
fn waited(mut out: Json_, pending: Vec<String>) -> Response {
    if pending.is_empty() {
        return Json(out).into_response();
    }
    out["pending"] = pending.into();
    (StatusCode::ACCEPTED, Json(out)).into_response()
}

/// The customer `id` names, held by this node's store (the survivor of a merge or unmerge
/// by hand in a group): 409 for one merged into another (`what` that one), 404 for one
/// not held.
fn held_here(app: &AppState, id: &str, what: &str) -> Result<String, ApiError> {
    let reader = app.engine.reader();
    let survivor = rules::normalize(id).into_owned();
    if let Some(to) = reader.moved_to(&survivor) {
        return Err(ApiError::Conflict(format!(
            "`{survivor}` was merged into `{to}`: {what} that one"
        )));
    }
    if reader.customer(&survivor)?.is_none() {
        return Err(ApiError::NotFound(format!("no customer `{survivor}`")));
    }
    Ok(survivor)
}

/// This node's producer to the events topic, for a request to another partition's owner.
fn group_router(app: &AppState) -> Result<std::sync::Arc<processor::kafka::route::Router>, ApiError> {
    app.kafka
        .as_ref()
        .and_then(|k| k.router())
        .ok_or_else(|| ApiError::Unavailable("this node's Kafka producer has not started".into()))
}

/// The cause a change made by hand is recorded with: the caller's API key by name.
fn manual_cause(principal: &Option<Extension<Principal>>) -> String {
    match key_name(principal) {
        Some(key) => processor::Cause::ManualBy(key),
        None => processor::Cause::Manual,
    }
    .as_string()
}

/// How long a merge by hand across partitions waits for this node to take a customer
/// another node handed over, before it answers `202` naming it pending.
pub const HANDOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether this node's store took the handover of `absorbed` into `survivor` within
/// [`HANDOVER_WAIT`] (the absorbed id then names the survivor here).
async fn taken_here(app: &AppState, absorbed: &str, survivor: &str) -> bool {
    let deadline = std::time::Instant::now() + HANDOVER_WAIT;
    loop {
        if app
            .engine
            .reader()
            .identify("customer_id", absorbed)
            .ok()
            .flatten()
            .as_deref()
            == Some(survivor)
        {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoverBody {
    survivor: String,
}

/// `POST /v1/customers/{id}/handover {"survivor": "..."}`: the first half of a merge by hand
/// across partitions (in a consumer group of several; what a node asks of the owner of a
/// customer it merges into one of its own): `{id}` leaves every tag and segment, is
/// deleted here and handed to `survivor`'s partition through the events topic, where its
/// owner takes it as a merge. Answers the changes made here.
pub async fn hand_over(
    State(app): State<AppState>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<String>,
    LimitedBody(body): LimitedBody,
) -> Result<Json<Json_>, ApiError> {
    let body: HandoverBody = json_body(&body)?;
    if app.kafka.as_ref().is_none_or(|k| !k.group_member()) {
        return Err(ApiError::Conflict(
            "a handover is a step of a merge across the partitions of a consumer group's nodes; this node is not in one: merge with `POST /v1/customers/{id}/merge`".into(),
        ));
    }
    check_owner(&app, &id)?;
    let by = key_name(&principal);
    let survivor = body.survivor;
    let handed = app
        .engine
        .call(move |engine| engine.hand_over(&id, &survivor, by.as_deref()))
        .await??;
    // The frame waits in this node's state until sent: in the state topic first, so that
    // whoever owns the partition next sends it if this node cannot.
    confirmed_in_group(&app).await?;
    let masking = masking_of(&principal);
    let mut out = json!({ "changes": masked_changes(&handed.changes, &masking) });
    out["customer_id"] = masking.id(&handed.absorbed).into_owned().into();
    out["survivor"] = masking.id(&handed.survivor).into_owned().into();
    Ok(Json(out))
}

/// The customers a merge or unmerge names (1 to 100), for `what` they are to do.
fn customer_ids(body: &Bytes, what: &str) -> Result<Vec<String>, ApiError> {
    let body: MergeBody = json_body(body)?;
    if body.ids.is_empty() || body.ids.len() > 100 {
        return Err(ApiError::BadRequest(format!(
            "`ids` names 1 to 100 customers to {what}"
        )));
    }
    Ok(body.ids)
}

/// The key's name, recorded as who merged or unmerged (none on an open node).
fn key_name(principal: &Option<Extension<Principal>>) -> Option<String> {
    principal
        .as_ref()
        .and_then(|p| p.key_id.as_ref().map(|_| p.name.clone()))
}

/// What a merge or an unmerge answers: the customer, the others (`absorbed` or `split`)
/// and the changes, ids masked for the caller.
fn identity_answer(
    masking: &crate::access::Masking,
    customer: &str,
    (field, others): (&str, &[std::sync::Arc<str>]),
    changes: &[Change],
) -> Json_ {
    let mut out = json!({ "changes": masked_changes(changes, masking) });
    out["customer_id"] = masking.id(customer).into_owned().into();
    out[field] = others.iter().map(|a| masking.id(a).into_owned()).collect();
    out
}

/// `POST /v1/customers/{id}/unmerge {"ids": [...]}`: customers merged into `{id}` split
/// off again, both recomputed from their histories; kept apart from then on.
pub async fn unmerge_customers(
    State(app): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let ids = customer_ids(&body, "split off this one")?;
    if app.engine.reader().resolver() {
        check_owner(&app, &id)?;
        return unmerge_by_resolver(&app, &principal, &headers, &id, ids).await;
    }
    check_owners(&app, &id, &ids)?;
    let by = key_name(&principal);
    let split = app
        .engine
        .call(move |engine| engine.unmerge_customers(&id, &ids, by.as_deref()))
        .await??;
    confirmed_in_group(&app).await?;
    let masking = masking_of(&principal);
    Ok(Json(identity_answer(
        &masking,
        &split.customer,
        ("split", &split.split),
        &split.changes,
    ))
    .into_response())
}

/// An unmerge in a group whose identity graph is partition 0's: checked against the graph
/// (each customer named must have been merged into `id`), sent to partition 0, whose owner
/// splits the graph and sends each split on to where the customer's events are — here,
/// the survivor's store — and answered once this node split them off (`split_off`; their
/// own nodes take them back as the frames arrive), or `202` naming those not split off yet
/// after [`HANDOVER_WAIT`] in `pending` (they are, as the requests arrive).
async fn unmerge_by_resolver(
    app: &AppState,
    principal: &Option<Extension<Principal>>,
    headers: &HeaderMap,
    id: &str,
    ids: Vec<String>,
) -> Result<Response, ApiError> {
    let reader = app.engine.reader();
    let survivor = held_here(app, id, "unmerge from")?;
    // Customers merged into it are named among its `customer_id`s in the graph: partition
    // 0's owner answers them as the caller's role shows them, so each name is compared as
    // shown (a masked or hidden `customer_id` may let a wrong name through, never refuse a
    // right one: the resolver leaves a wrong one out, and it stays `pending`).
    let masking = masking_of(principal);
    let (merged, shown) = match crate::cluster::identifiers_from_resolver(app, headers, &survivor).await? {
        Some(mut by_type) => (by_type.remove("customer_id").unwrap_or_default(), true),
        None => (
            reader
                .identifiers(&survivor)?
                .into_iter()
                .filter(|(id_type, _)| &**id_type == "customer_id")
                .map(|(_, value)| value)
                .collect(),
            false,
        ),
    };
    let mut split: Vec<String> = Vec::new();
    for other in ids {
        let other = rules::normalize(&other).into_owned();
        let named = match shown {
            true => masking.id(&other).into_owned(),
            false => other.clone(),
        };
        if other == survivor || !merged.contains(&named) {
            return Err(ApiError::Conflict(format!(
                "`{other}` was not merged into `{survivor}`: there is nothing to split off"
            )));
        }
        if !split.contains(&other) {
            split.push(other);
        }
    }
    let router = group_router(app)?;
    let cause = manual_cause(principal);
    let mut nonce = [0u8; 4];
    getrandom::fill(&mut nonce).expect("the operating system's random source");
    let unmerge = format!(
        "{:x}-{:x}",
        crate::access::audit::wall_ms(),
        u32::from_be_bytes(nonce)
    );
    let (from, named, request) = (survivor.clone(), split.clone(), unmerge.clone());
    tokio::task::spawn_blocking(move || router.send_unmerge(&from, &named, &cause, &request))
        .await
        .map_err(|e| ApiError::Internal(format!("sending the unmerge: {e}")))?
        .map_err(ApiError::Unavailable)?;
    // The resolver names each customer's split `split-{unmerge}-{n}`, in the order sent.
    let pending = wait_for_each(app, (0..split.len()).collect(), |reader, n| {
        reader.has_acted_on(&survivor, &format!("split-{unmerge}-{n}"))
    })
    .await?;
    let names = |which: &mut dyn Iterator<Item = &String>| -> Vec<String> {
        which.map(|a| masking.id(a).into_owned()).collect()
    };
    let done = split.iter().enumerate().filter(|(n, _)| !pending.contains(n));
    let out = json!({
        "customer_id": masking.id(&survivor).into_owned(),
        "split": names(&mut split.iter()),
        "changes": [],
        "split_off": names(&mut done.map(|(_, a)| a)),
    });
    Ok(waited(out, names(&mut pending.iter().map(|n| &split[*n]))))
}

/// `GET /v1/identities/stats`: merges, absorbed customers, identifiers per type, limit hits.
/// `GET /v1/identities/stats`; in a group, every live node's counts summed (each node
/// counts what it resolved).
pub async fn identity_stats(State(app): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let reader = app.engine.reader().clone();
    if app.cluster.is_none() {
        return Ok(Json(reader.identity_stats()).into_response());
    }
    if crate::cluster::scoped(&headers) {
        let mut answer = Json(reader.identity_stats()).into_response();
        crate::cluster::name_partitions(&mut answer, &crate::cluster::answered_partitions(&app));
        return Ok(answer);
    }
    let status = app.kafka.clone();
    let local = move || crate::cluster::part_of(status.as_deref(), |_| Ok(reader.identity_stats()));
    if headers.contains_key(crate::cluster::FORWARDED) {
        return Ok(crate::cluster::answer_part(local).await?.into_response());
    }
    let parts = crate::cluster::fan_out(
        &app,
        &headers,
        axum::http::Method::GET,
        "/v1/identities/stats",
        None,
        local,
    )
    .await?;
    let mut total = processor::identity::IdentityStats::default();
    for part in parts {
        total.merges += part.merges;
        total.customers_absorbed += part.customers_absorbed;
        total.unmerges += part.unmerges;
        total.blocked += part.blocked;
        for (into, from) in [
            (&mut total.identifiers, part.identifiers),
            (&mut total.limit_hits, part.limit_hits),
            (&mut total.unusable, part.unusable),
        ] {
            for (id_type, n) in from {
                *into.entry(id_type).or_default() += n;
            }
        }
    }
    Ok(Json(total).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimelineQuery {
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `GET /v1/customers/{id}/events`: the retained events, newest first, paged.
pub async fn customer_events(
    State(app): State<AppState>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<String>,
    q: Result<Query<TimelineQuery>, QueryRejection>,
) -> Result<Json<Json_>, ApiError> {
    check_owner(&app, &id)?;
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 10_000 {
        return Err(ApiError::BadRequest("`limit` must be between 1 and 10000".into()));
    }
    let before = match q.cursor.as_deref() {
        None => None,
        Some(c) => Some(
            c.split_once('.')
                .and_then(|(ts, arrival)| Some((ts.parse::<i64>().ok()?, arrival.parse::<u64>().ok()?)))
                .ok_or_else(|| {
                    ApiError::BadRequest(format!("`cursor` {c:?} is not one this endpoint gave"))
                })?,
        ),
    };
    let lookup = id.clone();
    let events = app
        .engine
        .call(move |engine| engine.timeline(&lookup, before, limit + 1))
        .await??
        .ok_or_else(|| ApiError::NotFound(format!("no customer `{id}`")))?;
    let more = events.len() > limit;
    let page = &events[..events.len().min(limit)];
    let next_cursor = more
        .then(|| page.last())
        .flatten()
        .map(|e| format!("{}.{}", e.event.ts, e.event.arrival));
    let items: Vec<Json_> = page
        .iter()
        .map(|e| {
            let props: serde_json::Map<String, Json_> = e
                .event
                .props
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_json()))
                .collect();
            json!({ "event_id": e.event_id, "type": &*e.event.event_type, "ts": e.event.ts, "props": props })
        })
        .collect();
    Ok(Json(json!({
        "customer_id": masking_of(&principal).id(&rules::normalize(&id)),
        "events": items,
        "next_cursor": next_cursor,
    })))
}

/// `GET /v1/customers/{id}/explain/{name}`: the value of a tag, segment or trait for one
/// customer, every sub-expression's value and window, and when time alone changes it.
pub async fn explain(
    State(app): State<AppState>,
    principal: Option<Extension<Principal>>,
    Path((id, name)): Path<(String, String)>,
) -> Result<Json<Json_>, ApiError> {
    check_owner(&app, &id)?;
    let (lookup, wanted) = (id.clone(), name.clone());
    let explained = app
        .engine
        .call(move |engine| engine.explain(&lookup, &wanted))
        .await??;
    let e = match explained {
        Explained::Yes(e) => e,
        Explained::UnknownCustomer => return Err(ApiError::NotFound(format!("no customer `{id}`"))),
        Explained::UnknownName => {
            return Err(ApiError::NotFound(format!(
                "`{name}` is not defined by the rules and is not a tag set by hand on customer `{id}`"
            )))
        }
    };
    let masking = masking_of(&principal);
    let mut tree = serde_json::to_value(&e.tree).expect("an explain tree serialises");
    masking.explain_tree(&mut tree);
    Ok(Json(json!({
        "customer_id": masking.id(&e.customer_id),
        "name": &*e.name,
        "kind": e.kind,
        "now": e.now,
        "value": e.value,
        "membership": e.membership.map(|m| json!({ "since": m.since, "expires_at": m.expires_at })),
        "manual": e.manual.map(|expires_at| json!({ "expires_at": expires_at })),
        "explain": tree,
        "next_change": e.next_change.map(|n| json!({ "at": n.at, "value": n.value })),
    })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ManualTagBody {
    /// `"7d"`, or milliseconds.
    ttl: Option<Json_>,
}

fn parse_ttl(ttl: &Json_) -> Result<i64, ApiError> {
    let bad = || {
        ApiError::BadRequest(format!(
            "`ttl` must be a duration like \"7d\" or milliseconds, not {ttl}"
        ))
    };
    let ms = match ttl {
        Json_::Number(n) => n.as_i64().ok_or_else(bad)?,
        Json_::String(s) => rules::lexer::parse_duration(s).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    if ms <= 0 {
        return Err(ApiError::BadRequest("`ttl` must be longer than zero".into()));
    }
    Ok(ms)
}

/// In a consumer group of several, a customer is answered for and written only by the node
/// that owns its partition (its state moves with the partition; a write elsewhere would
/// stay behind, a read elsewhere would be stale): `409` naming the partition when another
/// node owns it, `503` while it is being restored here.
fn check_owner(app: &AppState, id: &str) -> Result<(), ApiError> {
    let Some(kafka) = app.kafka.as_ref().filter(|k| k.group_member()) else {
        return Ok(());
    };
    let partitions = app.engine.reader().partitions();
    let partition = processor::partition::partition_of(rules::normalize(id).as_bytes(), partitions);
    if kafka.owns(partition) {
        return Ok(());
    }
    if kafka.restoring(partition) {
        return Err(ApiError::Unavailable(format!(
            "customer `{id}` is in partition {partition} of {partitions}, which this node is restoring from the state topic: ask again shortly"
        )));
    }
    Err(ApiError::Conflict(format!(
        "customer `{id}` is in partition {partition} of {partitions}, which this node does not own (it owns {:?}): send this to the node that does",
        kafka.owned_partitions()
    )))
}

/// [`check_owner`] for every customer a merge or unmerge names: in a consumer group of
/// several, only a node owning all their partitions changes them together.
fn check_owners(app: &AppState, id: &str, ids: &[String]) -> Result<(), ApiError> {
    std::iter::once(id)
        .chain(ids.iter().map(String::as_str))
        .try_for_each(|customer| check_owner(app, customer))
}

/// How long a write over HTTP on a member of a group waits for the broker to confirm its
/// state ([`confirmed_in_group`]) before it answers 503.
pub const GROUP_CONFIRM_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// On a member of a consumer group (the state topic on): waits until the broker confirmed
/// the state of everything this node committed of its partitions, so a write acknowledged
/// over HTTP is in the state topic — a node that takes the partition over has it, even if
/// this one never comes back. Events read from Kafka need no such wait (a node taking over
/// consumes them again); events, merges and manual tags sent over HTTP have no other copy.
async fn confirmed_in_group(app: &AppState) -> Result<(), ApiError> {
    let Some(kafka) = app.kafka.as_ref().filter(|k| k.group_member()) else {
        return Ok(());
    };
    let owned = kafka.owned_partitions();
    let reader = app.engine.reader().clone();
    let confirmed =
        tokio::task::spawn_blocking(move || reader.wait_changelog_confirmed(&owned, GROUP_CONFIRM_WAIT))
            .await
            .map_err(|e| ApiError::Internal(format!("waiting for the state topic: {e}")))??;
    if confirmed {
        return Ok(());
    }
    Err(ApiError::Unavailable(format!(
        "written here, but the broker has not confirmed this node's state within {} s (is it still a member of its group? see /readyz and tagstream_kafka_lease_held): it is kept here and published when it can, but a node taking its partitions over before then would not have it; send it again (events are deduplicated by event_id)",
        GROUP_CONFIRM_WAIT.as_secs()
    )))
}

fn changes_json(changes: &[Change]) -> Json_ {
    json!({ "changes": changes })
}

pub async fn put_manual_tag(
    State(app): State<AppState>,
    Path((id, tag)): Path<(String, String)>,
    LimitedBody(body): LimitedBody,
) -> Result<Json<Json_>, ApiError> {
    let body: ManualTagBody = if body.iter().all(u8::is_ascii_whitespace) {
        ManualTagBody::default()
    } else {
        json_body(&body)?
    };
    let ttl = body.ttl.as_ref().map(parse_ttl).transpose()?;
    check_owner(&app, &id)?;
    let changes = app
        .engine
        .call(move |engine| engine.set_manual_tag(&id, &tag, ttl))
        .await??;
    confirmed_in_group(&app).await?;
    Ok(Json(changes_json(&changes)))
}

pub async fn delete_manual_tag(
    State(app): State<AppState>,
    Path((id, tag)): Path<(String, String)>,
) -> Result<Json<Json_>, ApiError> {
    check_owner(&app, &id)?;
    let changes = app
        .engine
        .call(move |engine| engine.remove_manual_tag(&id, &tag))
        .await??;
    confirmed_in_group(&app).await?;
    Ok(Json(changes_json(&changes)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryBody {
    expr: String,
    limit: Option<usize>,
    cursor: Option<String>,
}

pub const MAX_QUERY_LIMIT: usize = 10_000;

pub async fn segment_query(
    State(app): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<Json<Json_>, ApiError> {
    let QueryBody { expr, limit, cursor } = json_body(&body)?;
    let warnings = check_expr_reads(&app, &expr)?;
    let limit = limit.unwrap_or(100);
    if limit > MAX_QUERY_LIMIT {
        return Err(ApiError::BadRequest(format!(
            "`limit` is at most {MAX_QUERY_LIMIT}"
        )));
    }
    if app.cluster.is_some() {
        return cluster_query(&app, &principal, &headers, expr, limit, cursor, warnings).await;
    }
    // Bitmaps answer most queries at once; a trait or profile condition reads its
    // candidates from the store, so it runs off the async workers.
    let reader = app.engine.reader().clone();
    let page = tokio::task::spawn_blocking(move || reader.query(&expr, limit, cursor.as_deref()))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(query_error)?;
    let masking = masking_of(&principal);
    let customers: Vec<_> = page.customers.iter().map(|id| masking.id(id)).collect();
    Ok(Json(
        json!({ "count": page.count, "customers": customers, "next_cursor": page.next_cursor, "warnings": warnings }),
    ))
}

/// [`segment_query`] in a consumer group of several: every node answers for the
/// partitions it owns, in customer id order, and the node asked merges them (a request sent
/// on by another node is answered with this node's part only). Pages name customer ids in
/// their cursors, so a role that masks customer ids gets the count only.
async fn cluster_query(
    app: &AppState,
    principal: &Option<Extension<Principal>>,
    headers: &HeaderMap,
    expr: String,
    limit: usize,
    cursor: Option<String>,
    warnings: Vec<rules::LocatedDiagnostic>,
) -> Result<Json<Json_>, ApiError> {
    let masking = masking_of(principal);
    if limit > 0 && masking.policy(crate::access::mask::CUSTOMER_ID) != FieldPolicy::Show {
        return Err(ApiError::Forbidden(
            "in a group of several nodes, pages of a query name customer ids in their cursors, which this key's role masks: ask for the count (`\"limit\": 0`), or use a role that sees customer ids".into(),
        ));
    }
    let after = cursor.as_deref().map(crate::cluster::decode_cursor).transpose()?;
    let reader = app.engine.reader().clone();
    let status = app.kafka.clone();
    let local_expr = expr.clone();
    let local_after = after.clone();
    let local = move || {
        crate::cluster::part_of(status.as_deref(), |owned| {
            reader
                .query_partitions(&local_expr, limit, local_after.as_deref(), owned)
                .map_err(query_error)
        })
    };
    if headers.contains_key(crate::cluster::FORWARDED) {
        // This node's part of another node's question.
        return crate::cluster::answer_part(local).await;
    }
    let body = json!({
        "expr": expr,
        "limit": limit,
        "cursor": after.as_deref().map(crate::cluster::encode_cursor),
    });
    let pages = crate::cluster::fan_out(
        app,
        headers,
        axum::http::Method::POST,
        "/v1/segments/query",
        Some(&body),
        local,
    )
    .await?;
    let (count, customers, more) = crate::cluster::merge_pages(pages, limit);
    let next_cursor = more
        .then(|| customers.last().map(|id| crate::cluster::encode_cursor(id)))
        .flatten();
    Ok(Json(
        json!({ "count": count, "customers": customers, "next_cursor": next_cursor, "warnings": warnings }),
    ))
}

pub(crate) fn query_error(e: QueryError) -> ApiError {
    match e {
        QueryError::Invalid(diagnostics) => ApiError::InvalidRules(diagnostics),
        QueryError::Cursor(m) => ApiError::BadRequest(m),
        QueryError::Engine(e) => e.into(),
    }
}

/// `GET /v1/segments`: every saved segment with its expression and member count.
pub async fn list_segments(State(app): State<AppState>, headers: HeaderMap) -> Result<Json<Json_>, ApiError> {
    if app.cluster.is_some() && headers.contains_key(crate::cluster::FORWARDED) {
        // This node's part of another node's question.
        return crate::cluster::answer_part(local_segments(&app)).await;
    }
    let segments = saved_segments(&app, &headers).await?;
    Ok(Json(json!({ "segments": segments })))
}

/// One node's part of the saved segments' counts.
#[derive(serde::Serialize, Deserialize)]
struct SegmentsPart {
    segments: Vec<processor::SavedSegment>,
}

/// This node's part: its saved segments counted in the partitions it owns.
fn local_segments(
    app: &AppState,
) -> impl Fn() -> Result<crate::cluster::Part<SegmentsPart>, ApiError> + Clone + Send + 'static {
    let reader = app.engine.reader().clone();
    let status = app.kafka.clone();
    move || {
        crate::cluster::part_of(status.as_deref(), |owned| {
            Ok(SegmentsPart {
                segments: reader.saved_segments_in(Some(owned)),
            })
        })
    }
}

/// The saved segments with their member counts: in a group of several, of the whole group
/// (each node counts the partitions it owns; the counts are summed by name, for the
/// segments this node's rule set names).
async fn saved_segments(
    app: &AppState,
    headers: &HeaderMap,
) -> Result<Vec<processor::SavedSegment>, ApiError> {
    if app.cluster.is_none() {
        return Ok(app.engine.reader().saved_segments());
    }
    let local = local_segments(app);
    let parts =
        crate::cluster::fan_out(app, headers, axum::http::Method::GET, "/v1/segments", None, local).await?;
    let mut parts = parts.into_iter();
    let mut segments = parts.next().map(|p| p.segments).unwrap_or_default();
    for part in parts {
        // Until rules are cluster-wide, a segment some node lacks (or defines otherwise)
        // has no count for the group.
        let mut theirs: Vec<(&str, &str)> = part
            .segments
            .iter()
            .map(|s| (s.name.as_str(), s.expr.as_str()))
            .collect();
        let mut ours: Vec<(&str, &str)> = segments
            .iter()
            .map(|s| (s.name.as_str(), s.expr.as_str()))
            .collect();
        theirs.sort_unstable();
        ours.sort_unstable();
        if theirs != ours {
            return Err(ApiError::Conflict(
                "the nodes of the group run different saved segments (one of them has not applied the group's last rule-set change yet: GET /v1/cluster shows each node's version): the group's counts would be wrong, so there are none; ask again in a moment".into(),
            ));
        }
        for theirs in part.segments {
            if let Some(ours) = segments.iter_mut().find(|s| s.name == theirs.name) {
                ours.members += theirs.members;
            }
        }
    }
    Ok(segments)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefinitionsQuery {
    hours: Option<i64>,
}

/// `GET /v1/definitions?hours=`: every definition of the loaded rule set with its members
/// now and its enters and exits per hour over the last `hours` (default 48).
pub async fn definitions(
    State(app): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<DefinitionsQuery>, QueryRejection>,
) -> Result<Json<Json_>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let hours = q.hours.unwrap_or(48);
    let most = processor::index::ACTIVITY_HOURS;
    if !(1..=most).contains(&hours) {
        return Err(ApiError::BadRequest(format!(
            "`hours` must be between 1 and {most}"
        )));
    }
    let reader = app.engine.reader().clone();
    if app.cluster.is_none() {
        let definitions = reader.definitions(hours);
        return Ok(Json(
            json!({ "hours": hours, "now": reader.now(), "definitions": definitions }),
        ));
    }
    // In a group of several: each node counts the members of the partitions it owns and
    // the changes it made; the counts are summed by name and hour.
    let status = app.kafka.clone();
    let local_reader = reader.clone();
    let local = move || {
        crate::cluster::part_of(status.as_deref(), |owned| {
            let definitions = local_reader.definitions_in(hours, Some(owned));
            let definitions =
                serde_json::to_value(definitions).map_err(|e| ApiError::Internal(e.to_string()))?;
            Ok(json!({ "definitions": definitions }))
        })
    };
    if headers.contains_key(crate::cluster::FORWARDED) {
        return crate::cluster::answer_part(local).await;
    }
    let path = format!("/v1/definitions?hours={hours}");
    let parts = crate::cluster::fan_out(&app, &headers, axum::http::Method::GET, &path, None, local).await?;
    let definitions = merge_definitions(parts)?;
    Ok(Json(
        json!({ "hours": hours, "now": reader.now(), "definitions": definitions }),
    ))
}

/// The definitions of every node's part, this node's first: members and each hour's
/// enters and exits summed by name; 409 when the nodes run different definitions.
fn merge_definitions(parts: Vec<Json_>) -> Result<Json_, ApiError> {
    let mut parts = parts.into_iter().map(|mut p| p["definitions"].take());
    let mut ours = parts.next().unwrap_or_else(|| json!([]));
    let shape = |defs: &Json_| -> Vec<(String, String)> {
        defs.as_array()
            .into_iter()
            .flatten()
            .map(|d| (d["name"].to_string(), d["source"].to_string()))
            .collect()
    };
    for theirs in parts {
        if shape(&theirs) != shape(&ours) {
            return Err(ApiError::Conflict(
                "the nodes of the group run different rule sets (one of them has not applied the group's last rule-set change yet: GET /v1/cluster shows each node's version): the group's counts would be wrong, so there are none; ask again in a moment".into(),
            ));
        }
        let (Some(ours), Some(theirs)) = (ours.as_array_mut(), theirs.as_array()) else {
            continue;
        };
        for (mine, other) in ours.iter_mut().zip(theirs) {
            if let (Some(a), Some(b)) = (mine["members"].as_u64(), other["members"].as_u64()) {
                mine["members"] = json!(a + b);
            }
            let mut hours: BTreeMap<i64, (u64, u64)> = BTreeMap::new();
            for h in mine["activity"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(other["activity"].as_array().into_iter().flatten())
            {
                let entry = hours.entry(h["hour"].as_i64().unwrap_or(0)).or_default();
                entry.0 += h["entered"].as_u64().unwrap_or(0);
                entry.1 += h["left"].as_u64().unwrap_or(0);
            }
            mine["activity"] = hours
                .into_iter()
                .map(|(hour, (entered, left))| json!({ "hour": hour, "entered": entered, "left": left }))
                .collect();
        }
    }
    Ok(ours)
}

/// `GET /v1/segments/{name}`.
pub async fn get_segment(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    let segments = saved_segments(&app, &headers).await?;
    let found = segments
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| ApiError::NotFound(format!("no segment `{name}`")))?;
    Ok(Json(json!(found)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SegmentBody {
    expr: String,
}

/// `PUT /v1/segments/{name}` `{"expr": "..."}`: creates or replaces one saved segment; the
/// rest of the rule set stays as it is. The rule set's next version.
pub async fn put_segment(
    State(app): State<AppState>,
    principal: Option<Extension<Principal>>,
    note: Option<Extension<AuditNote>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let edit = rule_edit(principal.as_deref(), &headers)?;
    let SegmentBody { expr } = json_body(&body)?;
    let warnings = check_expr_reads(&app, &expr)?;
    let lookup = name.clone();
    let (update, version) = change_rules(&app, edit, move |engine, edit| {
        engine.propose_put_segment(&lookup, &expr, edit)
    })
    .await?;
    let mut answer = json!(update);
    answer["name"] = name.into();
    answer["warnings"] = serde_json::to_value(&warnings).expect("diagnostics serialise");
    Ok(versioned_answer(&version, note.as_deref(), answer))
}

/// `DELETE /v1/segments/{name}`: every member exits; the rule set's next version. The
/// segment's webhooks are deleted with it.
pub async fn delete_segment(
    State(app): State<AppState>,
    principal: Option<Extension<Principal>>,
    note: Option<Extension<AuditNote>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let edit = rule_edit(principal.as_deref(), &headers)?;
    let lookup = name.clone();
    let (update, version) = change_rules(&app, edit, move |engine, edit| {
        Ok(engine.propose_delete_segment(&lookup, edit)?)
    })
    .await?;
    let mut answer = json!(update);
    answer["webhooks_deleted"] = json!(crate::webhooks::delete_for_definition(&app, &name).await?);
    answer["name"] = name.into();
    Ok(versioned_answer(&version, note.as_deref(), answer))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembersQuery {
    pub(crate) format: Option<String>,
    /// Comma-separated `since`, `expires_at`, traits and `profile.ATTR`s to add as columns.
    pub(crate) fields: Option<String>,
    /// At most this many members, with the next page's cursor in `x-next-cursor`.
    pub(crate) limit: Option<usize>,
    pub(crate) cursor: Option<String>,
}

/// Members per page while exporting; also the Arrow/Parquet batch size.
pub(crate) const EXPORT_PAGE: usize = 8192;

/// The format a members request asks for (told to the audit trail), its limit checked.
pub(crate) fn export_format(
    q: &MembersQuery,
    name: &str,
    note: Option<&AuditNote>,
) -> Result<Format, ApiError> {
    let format_name = q.format.as_deref().unwrap_or("ndjson");
    if let Some(note) = note {
        note.set("segment", name);
        note.set("format", format_name);
    }
    let format = Format::parse(format_name).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "unknown format `{format_name}`: use ndjson, csv, parquet or arrow"
        ))
    })?;
    if q.limit == Some(0) {
        return Err(ApiError::BadRequest("limit must be at least 1".into()));
    }
    Ok(format)
}

/// The columns an export asked for (`fields`: comma-separated), as this key's role may see
/// them.
pub(crate) struct ExportColumns {
    pub fields: Vec<processor::ExportField>,
    pub columns: Vec<Column>,
    /// Per column, the masking of its values when they are masked; kept across pages, so
    /// each distinct value of a column is masked once per export.
    pub maskers: Vec<Option<ValueMap>>,
}

pub(crate) fn export_columns(
    reader: &processor::ReadHandle,
    masking: &Masking,
    fields: Option<&str>,
) -> Result<ExportColumns, ApiError> {
    let mut out = ExportColumns {
        fields: Vec::new(),
        columns: Vec::new(),
        maskers: Vec::new(),
    };
    for f in fields.unwrap_or("").split(',').map(str::trim) {
        if f.is_empty() {
            continue;
        }
        let (field, mut ty) = reader.export_field(f).map_err(ApiError::BadRequest)?;
        // Identifiers are masked by their type's name (`phone = "mask"`), as on the
        // customer view; customer ids by `customer_id`'s policy.
        let attr = f.strip_prefix("profile.").or_else(|| f.strip_prefix("ids."));
        let policy = attr.map(|a| masking.policy(a));
        match policy {
            Some(FieldPolicy::Hide) => {
                return Err(ApiError::Forbidden(format!(
                    "the field `{f}` is hidden from this key's role"
                )))
            }
            Some(FieldPolicy::Mask) => ty = rules::Type::Str,
            _ => {}
        }
        out.maskers
            .push((policy == Some(FieldPolicy::Mask)).then(|| ValueMap::new(mask_stored)));
        out.columns.push(Column {
            name: f.to_owned(),
            ty,
        });
        out.fields.push(field);
    }
    Ok(out)
}

/// Streams the members of a tag or segment, in the index's customer-number order, from a
/// copy of its bitmap taken when the request arrived (one consistent membership). Without
/// `limit`, every member; with it, one page and `x-next-cursor` (absent at the end).
pub async fn segment_members(
    State(app): State<AppState>,
    Path(name): Path<String>,
    principal: Option<Extension<Principal>>,
    note: Option<Extension<AuditNote>>,
    headers: HeaderMap,
    q: Result<Query<MembersQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    use crate::group_members::{self as group, Asked};
    match group::asked(&app, &headers) {
        Asked::Alone => local_members(app, name, principal, note, q).await,
        Asked::Scoped(partitions) => {
            let mut answer = local_members(app, name, principal, note, q).await?;
            crate::cluster::name_partitions(&mut answer, &partitions);
            Ok(answer)
        }
        Asked::Part => group::part(&app, &name, q).await,
        Asked::Group => group::members(&app, &headers, &name, &principal, note.as_deref(), q).await,
    }
}

/// [`segment_members`] as one node answers it.
async fn local_members(
    app: AppState,
    name: String,
    principal: Option<Extension<Principal>>,
    note: Option<Extension<AuditNote>>,
    q: MembersQuery,
) -> Result<Response, ApiError> {
    let format = export_format(&q, &name, note.as_deref())?;
    let after = q
        .cursor
        .as_deref()
        .map(processor::parse_cursor)
        .transpose()
        .map_err(ApiError::BadRequest)?;
    let reader = app.engine.reader().clone();
    let masking = masking_of(&principal);
    let ExportColumns {
        fields,
        columns,
        mut maskers,
    } = export_columns(&reader, &masking, q.fields.as_deref())?;
    // Ids are masked as the encoder writes them.
    let id_policy = masking.policy(crate::access::mask::CUSTOMER_ID);
    let set = reader
        .member_set(&name)
        .ok_or_else(|| ApiError::NotFound(format!("no tag or segment `{name}`")))?;
    if let Some(note) = &note {
        let rows = q.limit.map_or(set.len(), |l| set.len().min(l as u64));
        note.set("rows", rows);
    }
    // Held until the last byte is encoded.
    let slot = crate::access::export_slot(&app.access, &principal)?;
    let mut encoder = Encoder::new(format, columns).map_err(|e| ApiError::Internal(e.to_string()))?;
    let preamble = encoder.header();

    if let Some(limit) = q.limit {
        let (body, next) = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let page = reader.members_page(&name, &set, after, limit, &fields, &mut maskers)?;
            let encode = |e: EncodeError| ApiError::Internal(e.to_string());
            let mut body = preamble;
            body.extend(
                encoder
                    .page_with(page.ids, id_policy, &page.fields)
                    .map_err(encode)?,
            );
            body.extend(encoder.finish().map_err(encode)?);
            Ok::<_, ApiError>((body, page.next_cursor))
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
        let mut response =
            ([(header::CONTENT_TYPE, format.content_type())], Body::from(body)).into_response();
        if let Some(next) = next {
            let value = header::HeaderValue::from_str(&next).expect("a number is ASCII");
            response.headers_mut().insert("x-next-cursor", value);
        }
        return Ok(response);
    }

    // A whole export's masked ids come from the ids masked once per customer.
    let masked_ids = (id_policy == FieldPolicy::Mask).then(|| app.access.clone());
    let id_policy = if masked_ids.is_some() {
        FieldPolicy::Show
    } else {
        id_policy
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let fail = |what: String| Err(std::io::Error::other(what));
        if tx.blocking_send(Ok(preamble)).is_err() {
            return;
        }
        let mut numbers = set.iter().skip_while(|n| after.is_some_and(|a| *n <= a));
        loop {
            let page: Vec<u32> = numbers.by_ref().take(EXPORT_PAGE).collect();
            if page.is_empty() {
                break;
            }
            let values = match reader.fields_of_mapped(&name, &page, &fields, &mut maskers) {
                Ok(v) => v,
                Err(e) => return drop(tx.blocking_send(fail(e.to_string()))),
            };
            let ids = match &masked_ids {
                Some(access) => access.masked_ids.page(&reader, &page),
                None => reader.ids_of(page),
            };
            match encoder.page_with(ids, id_policy, &values) {
                Ok(bytes) if bytes.is_empty() => {}
                Ok(bytes) => {
                    if tx.blocking_send(Ok(bytes)).is_err() {
                        return;
                    }
                }
                Err(e) => return drop(tx.blocking_send(fail(e.to_string()))),
            }
        }
        let end = encoder.finish().map_err(|e| std::io::Error::other(e.to_string()));
        let _ = tx.blocking_send(end);
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok((
        [(header::CONTENT_TYPE, format.content_type())],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Changes as JSON with their customer ids as `masking` lets them be seen.
pub(crate) fn masked_changes(changes: &[Change], masking: &Masking) -> Json_ {
    let mut value = json!(changes);
    if masking.policy(crate::access::mask::CUSTOMER_ID) != FieldPolicy::Show {
        value
            .as_array_mut()
            .into_iter()
            .flatten()
            .for_each(|c| masking.id_field(c));
    }
    value
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangesQuery {
    after: Option<u64>,
    /// The group's change log from this cursor (`0`: its start).
    cursor: Option<String>,
    limit: Option<usize>,
}

pub async fn changes(
    State(app): State<AppState>,
    principal: Option<Extension<Principal>>,
    q: Result<Query<ChangesQuery>, QueryRejection>,
) -> Result<Json<Json_>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let after = q.after.unwrap_or(0);
    let limit = q.limit.unwrap_or(1000);
    if limit == 0 || limit > 100_000 {
        return Err(ApiError::BadRequest(
            "`limit` must be between 1 and 100000".into(),
        ));
    }
    if let Some(cursor) = q.cursor {
        if q.after.is_some() {
            return Err(ApiError::BadRequest(
                "give `after` (this node's log) or `cursor` (the group's), not both".into(),
            ));
        }
        return group_changes(&app, &cursor, limit, &masking_of(&principal)).await;
    }
    let changes = app
        .engine
        .call(move |engine| engine.changes(after, limit))
        .await??;
    let next_after = changes.last().map_or(after, |c| c.seq);
    let changes = masked_changes(&changes, &masking_of(&principal));
    Ok(Json(json!({ "changes": changes, "next_after": next_after })))
}

/// `GET /v1/changes?cursor=`: a page of the group's change log (every node's changes as the
/// changes topic holds them, each once), from any node of the group.
async fn group_changes(
    app: &AppState,
    cursor: &str,
    limit: usize,
    masking: &Masking,
) -> Result<Json<Json_>, ApiError> {
    let status = app.kafka.as_ref().ok_or_else(|| {
        ApiError::Conflict(
            "`cursor` pages the change log of a group of nodes, and this node is not in one: page with `after`".into(),
        )
    })?;
    status.group_log().map_err(ApiError::Conflict)?;
    let reader = app.engine.reader().clone();
    let partitions = reader.partitions();
    let cursor = cursor.to_owned();
    let page = tokio::task::spawn_blocking(move || {
        let from = if cursor == "0" {
            reader.group_log_start()?
        } else {
            processor::decode_group_cursor(&cursor, partitions).map_err(ApiError::BadRequest)?
        };
        Ok::<_, ApiError>(reader.group_log_page(&from, limit)?)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    match page {
        processor::GroupPage::Gone { partition, oldest } => Err(ApiError::GoneCursor {
            message: format!(
                "the group's change log no longer holds the changes of partition {partition} after this cursor (retention): start again from `oldest_cursor`"
            ),
            oldest_cursor: processor::encode_group_cursor(&oldest),
        }),
        processor::GroupPage::Changes { changes, cursor } => {
            let mut list = Vec::with_capacity(changes.len());
            for json in &changes {
                let mut change: Json_ = serde_json::from_slice(json)
                    .map_err(|e| ApiError::Internal(format!("a change of the group log: {e}")))?;
                if masking.policy(crate::access::mask::CUSTOMER_ID) != FieldPolicy::Show {
                    masking.id_field(&mut change);
                }
                list.push(change);
            }
            Ok(Json(json!({
                "changes": list,
                "cursor": processor::encode_group_cursor(&cursor),
            })))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QualityQuery {
    /// Only violations seen at or after this instant (wall clock ms); counts are those
    /// since then, per minute.
    since: Option<i64>,
    source: Option<String>,
    class: Option<String>,
    event_type: Option<String>,
}

/// `GET /v1/quality`: violations of the tracking plan (and of the event format's
/// top-level fields and the retention, with or without a plan) by source, class, event
/// type and field, per minute for the last day, with sample lines.
pub async fn quality(
    State(app): State<AppState>,
    q: Result<Query<QualityQuery>, QueryRejection>,
) -> Result<Json<Json_>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    if let Some(class) = &q.class {
        if rules::ViolationClass::from_code(class).is_none() {
            let codes: Vec<&str> = rules::ViolationClass::ALL.iter().map(|c| c.code()).collect();
            return Err(ApiError::BadRequest(format!(
                "unknown violation class `{class}`; one of {}",
                codes.join(", ")
            )));
        }
    }
    let intake = app.engine.reader().intake().clone();
    let filter = processor::quality::ViolationFilter {
        source: q.source,
        class: q.class,
        event_type: q.event_type,
    };
    let report = intake.quality.violations(q.since.unwrap_or(i64::MIN), &filter);
    let plan = intake.plan.as_ref().map(|p| {
        json!({
            "event_types": p.events.len(),
            "mode": p.mode.name(),
            "unplanned_events": p.unplanned_events.name(),
            "unknown_top_level": p.unknown_top_level.name(),
            "out_of_retention": p.out_of_retention.name(),
        })
    });
    let mut answer = serde_json::to_value(&report).expect("a report serialises");
    answer["plan"] = plan.unwrap_or(Json_::Null);
    Ok(Json(answer))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObservedQuery {
    /// `json` (default) or `plan`: a tracking plan (TOML) accepting what was received.
    format: Option<String>,
}

/// `GET /v1/schema/observed`: the event types, properties, profile attributes and
/// identifiers received, with the types seen, examples, counts and first/last seen.
pub async fn schema_observed(
    State(app): State<AppState>,
    q: Result<Query<ObservedQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let observed = app.engine.reader().intake().quality.observed();
    match q.format.as_deref() {
        None | Some("json") => Ok(Json(observed).into_response()),
        Some("plan") => Ok((
            [(header::CONTENT_TYPE, "application/toml; charset=utf-8")],
            observed.infer_plan(),
        )
            .into_response()),
        Some(other) => Err(ApiError::BadRequest(format!(
            "unknown format `{other}`; `json` or `plan`"
        ))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlqQuery {
    after: Option<u64>,
    limit: Option<usize>,
    /// The newest this many instead, newest first.
    last: Option<usize>,
    /// In a group of several: where a reader of the group's dead letters stands.
    cursor: Option<String>,
}

/// How the dead letters are listed in an answer.
const DEAD_LETTERS: crate::cluster::ListShape = crate::cluster::ListShape {
    field: "dead_letters",
    id: "id",
    time: "received_at",
};

/// `GET /v1/dlq`: this node's dead letters by `after` (or its newest, `last`); in a group
/// of several, unless `after` asks for this node's own, every node's, merged by when they
/// were received, each naming its `node`, paged with a group `cursor`.
pub async fn dead_letters(
    State(app): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<DlqQuery>, QueryRejection>,
) -> Result<Json<Json_>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    if q.last.is_some() && (q.after.is_some() || q.limit.is_some() || q.cursor.is_some()) {
        return Err(ApiError::BadRequest(
            "`last` lists the newest dead letters: it takes no `after`, `limit` or `cursor`".into(),
        ));
    }
    if q.last.is_some_and(|last| !(1..=1000).contains(&last)) {
        return Err(ApiError::BadRequest("`last` must be between 1 and 1000".into()));
    }
    let ask = crate::cluster::NodeListAsk::of(&app, &headers, q.cursor.as_deref(), q.after, "dead letters")?;
    let (me, from) = match ask {
        crate::cluster::NodeListAsk::Own(after) => {
            let (items, next_after) = local_dead_letters(&app, after, q.limit, q.last).await?;
            return Ok(Json(json!({ "dead_letters": items, "next_after": next_after })));
        }
        crate::cluster::NodeListAsk::Group { me, from } => (me, from),
    };
    let limit = q.limit.unwrap_or(100).min(10_000);
    let (local, mut unanswered) =
        match local_dead_letters(&app, from.0.get(&me).copied(), Some(limit), q.last).await {
            Ok((items, _)) => (items, Vec::new()),
            // Retention deleted what the cursor had not read yet: said, not skipped.
            Err(e) => (Vec::new(), vec![json!({ "node": me, "error": e.to_string() })]),
        };
    let path = match (q.last, &q.cursor) {
        (Some(last), _) => format!("/v1/dlq?last={last}"),
        (None, Some(cursor)) => format!(
            "/v1/dlq?cursor={}&limit={limit}",
            crate::cluster::path_segment(cursor)
        ),
        (None, None) => format!("/v1/dlq?limit={limit}"),
    };
    let newest_first = q.last.is_some();
    let merged = crate::cluster::every_node_list(
        &app,
        &headers,
        &path,
        &DEAD_LETTERS,
        local,
        (&from, q.last.unwrap_or(limit)),
        newest_first,
    )
    .await;
    unanswered.extend(merged.unanswered);
    Ok(Json(json!({
        "dead_letters": merged.items,
        "cursor": merged.cursor.encode(),
        "unanswered": unanswered,
    })))
}

/// This node's dead letters after `after` (at most `limit`), or its `last` newest (newest
/// first), with the id to page on from.
async fn local_dead_letters(
    app: &AppState,
    after: Option<u64>,
    limit: Option<usize>,
    last: Option<usize>,
) -> Result<(Vec<Json_>, Option<u64>), ApiError> {
    let letters = match last {
        Some(last) => {
            let reader = app.engine.reader().clone();
            tokio::task::spawn_blocking(move || reader.newest_dead_letters(last))
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))??
        }
        None => {
            let limit = limit.unwrap_or(100).min(10_000);
            app.engine
                .call(move |engine| engine.dead_letters(after, limit))
                .await??
        }
    };
    let items: Vec<Json_> = letters
        .iter()
        .map(|d| {
            json!({
                "id": d.id,
                "received_at": d.received_at,
                "reason": d.reason,
                "code": d.code,
                "raw": String::from_utf8_lossy(&d.raw),
            })
        })
        .collect();
    // Newest first with `last`: the next page starts after the newest.
    let next_after = letters.iter().map(|d| d.id).max();
    Ok((items, next_after))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupBody {
    /// A directory on the server's machine that does not exist yet.
    to: String,
}

/// `POST /v1/admin/backup {"to": DIR}`: a consistent backup of the store, taken between two
/// commits while the server keeps serving; answers the backup's manifest.
pub async fn backup(
    State(app): State<AppState>,
    LimitedBody(body): LimitedBody,
) -> Result<Json<Json_>, ApiError> {
    let BackupBody { to } = json_body(&body)?;
    if to.trim().is_empty() {
        return Err(ApiError::BadRequest("`to` names no directory".into()));
    }
    let dir = std::path::PathBuf::from(to);
    let manifest = app.engine.call(move |engine| engine.backup(&dir)).await??;
    Ok(Json(
        serde_json::to_value(manifest).expect("a manifest serializes"),
    ))
}

/// `DELETE /v1/dlq`: purges the dead letters; in a group of several, every node's (the
/// counts summed; `unanswered` names the nodes that did not, and why).
pub async fn purge_dead_letters(
    State(app): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Json_>, ApiError> {
    let mut purged = app.engine.call(|engine| engine.purge_dead_letters()).await??;
    if app.cluster.is_none() || headers.contains_key(crate::cluster::FORWARDED) {
        return Ok(Json(json!({ "purged": purged })));
    }
    let crate::cluster::OtherAnswers {
        answers,
        mut unanswered,
    } = crate::cluster::other_nodes_json(&app, &headers, axum::http::Method::DELETE, "/v1/dlq", false).await;
    for (url, answer) in answers {
        match answer["purged"].as_u64() {
            Some(n) => purged += n as usize,
            None => unanswered.push(json!({ "node": url, "error": "answered without `purged`" })),
        }
    }
    Ok(Json(json!({ "purged": purged, "unanswered": unanswered })))
}

pub async fn metrics(State(app): State<AppState>) -> Result<Response, ApiError> {
    // Read beside the engine: a scrape answers while the engine works off a long round,
    // which is when the metrics are needed.
    let reader = app.engine.reader().clone();
    tokio::task::spawn_blocking(move || processor::telemetry::store_gauges(&reader))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    processor::telemetry::process_gauges();
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.prometheus.render(),
    )
        .into_response())
}

/// The OpenAPI 3.1 document of this API (kept in `openapi.json`, checked by the e2e tests).
pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

pub async fn healthz() -> Json<Json_> {
    Json(json!({ "status": "ok" }))
}

pub async fn readyz(State(app): State<AppState>) -> Response {
    if let Some(Err(reason)) = app.kafka.as_ref().map(|k| k.ready()) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "error": reason })),
        )
            .into_response();
    }
    // Answered beside the engine: a long round (a backlog of timers, a compaction stall)
    // does not make the node look unready.
    if !app.engine.running() {
        let error = processor::ServiceError::Stopped.to_string();
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "error": error })),
        )
            .into_response();
    }
    let progress = app.engine.reader().backfill_progress();
    Json(json!({
        "ready": true,
        "backfill_running": progress.is_some(),
        "backfill": progress,
    }))
    .into_response()
}

pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {}", uri.path()))
}

pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    /// The definitions of a group: members summed, each hour's enters and exits summed by
    /// hour (hours only one node saw kept), and no sum of nodes that run different rules.
    #[test]
    fn definitions_of_several_nodes_are_summed_by_name_and_hour() {
        let def = |members: u64, activity: serde_json::Value| {
            serde_json::json!({ "definitions": [
                { "name": "vip", "kind": "tag", "source": "tag vip = x", "members": members, "activity": activity },
                { "name": "ltv", "kind": "trait", "source": "trait ltv = y", "members": null, "activity": [] },
            ]})
        };
        let a = def(
            3,
            serde_json::json!([{ "hour": 0, "entered": 2, "left": 1 }, { "hour": 3600000, "entered": 1, "left": 0 }]),
        );
        let b = def(
            4,
            serde_json::json!([{ "hour": 3600000, "entered": 5, "left": 2 }, { "hour": 7200000, "entered": 1, "left": 1 }]),
        );
        let merged = super::merge_definitions(vec![a.clone(), b]).unwrap();
        assert_eq!(merged[0]["members"], 7);
        assert_eq!(
            merged[0]["activity"],
            serde_json::json!([
                { "hour": 0, "entered": 2, "left": 1 },
                { "hour": 3600000, "entered": 6, "left": 2 },
                { "hour": 7200000, "entered": 1, "left": 1 },
            ])
        );
        assert_eq!(merged[1]["members"], serde_json::Value::Null);
        let mut other = def(1, serde_json::json!([]));
        other["definitions"][0]["source"] = "tag vip = z".into();
        assert!(matches!(
            super::merge_definitions(vec![a, other]),
            Err(crate::ApiError::Conflict(_))
        ));
    }

    use crate::{router, ApiConfig, AppState};

    /// `/metrics` and `/readyz` are answered beside the engine: while it is held by a long
    /// job (a backlog of timers, a stalled write), a scrape and a readiness probe still
    /// answer at once — they had timed out at the first retention crossing of a soak.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metrics_and_readiness_answer_while_the_engine_is_busy() {
        let dir = ::tests::TempDir::new("busy-engine");
        let config = processor::EngineConfig {
            sync_writes: false,
            ..Default::default()
        };
        let rules = "tag buyer = count(payment, 30d) >= 1";
        let engine = processor::Engine::open(dir.path(), Some(rules), config).unwrap();
        let (handle, thread) = processor::EngineHandle::spawn(engine, processor::ServiceConfig::default());
        let app = router(AppState::new(handle.clone(), ApiConfig::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });

        let (started_tx, started) = std::sync::mpsc::channel();
        let busy = handle.clone();
        let held = tokio::spawn(async move {
            busy.call(move |_| {
                started_tx.send(()).unwrap();
                std::thread::sleep(Duration::from_secs(3));
            })
            .await
        });
        tokio::task::spawn_blocking(move || started.recv().unwrap())
            .await
            .unwrap();
        let asked = Instant::now();
        for path in ["/metrics", "/readyz"] {
            let addr = addr.clone();
            let r = tokio::task::spawn_blocking(move || ::tests::http::request(&addr, "GET", path, b""))
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{path}: {}", r.text());
            if path == "/metrics" {
                assert!(r.text().contains("tagstream_rocksdb_sst_bytes"), "{}", r.text());
            } else {
                assert_eq!(r.json()["ready"], true);
            }
        }
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "answered beside the busy engine, not after it: {:?}",
            asked.elapsed()
        );
        held.await.unwrap().unwrap();
        // Stopped before the test returns: an engine thread still closing the store while
        // the process exits aborts it ("pthread lock: Invalid argument").
        server.abort();
        let _ = server.await;
        drop(handle);
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
    }
}
