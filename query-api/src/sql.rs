//! `POST /v1/sql`: read-only SQL for analysts, run by DataFusion over two tables.
//!
//! - `customers`: `customer_id`, one boolean column per tag and segment (from the membership
//!   index), one column per trait (typed by its rule type: number as float64, duration as
//!   int64 ms, bool, string), and one column per profile attribute named `profile.ATTR`
//!   (quote it: `"profile.city"`; float64 when every value is a number, boolean when every
//!   value is a bool, else text).
//! - `changes`: the change log: `seq`, `customer_id`, `kind` (`tag`/`segment`), `name`, `op`
//!   (`add`/`remove`), `at` (ms), `cause`.
//!
//! Tables are materialised per query from one pass over what the statement needs: tag and
//! segment columns come from the bitmaps alone; profile columns from the index's profile
//! columns when the statement mentions `profile.` or `*`; trait columns (and the profile,
//! when some attribute is too varied to be a column) from the store, one customer at a
//! time, only when the statement mentions a trait or `*`; `changes` only when it mentions
//! `changes`. Statements other than queries (DDL, DML,
//! `SET`...) are refused; results stop at `max_rows` (`truncated: true`), and a query that
//! runs past its `timeout_ms` is stopped with 408.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::builder::{BooleanBuilder, Int64Builder, StringBuilder, UInt64Builder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use datafusion::datasource::MemTable;
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::{SessionConfig, SessionContext};
use processor::ReadHandle;
use rules::{DefKind, Type, Value};
use serde::{Deserialize, Serialize};

use crate::access::{FieldPolicy, Masking};
use crate::export::{array_of, Numbers};
use crate::{ApiError, AppState, LimitedBody};

/// Rows returned at most unless the request asks for fewer; the hard cap is ten times it.
const DEFAULT_MAX_ROWS: usize = 10_000;
const MAX_ROWS_CAP: usize = 1_000_000;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const TIMEOUT_CAP: Duration = Duration::from_secs(60);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlBody {
    sql: String,
    /// `json` (default), `ndjson`, `csv` or `arrow`.
    format: Option<String>,
    max_rows: Option<usize>,
    timeout_ms: Option<u64>,
}

/// Whether the statement may read `word` (a column or table name): a case-insensitive
/// substring test, so it errs on the side of building a column.
fn mentions(sql_lower: &str, word: &str) -> bool {
    sql_lower.contains(&word.to_lowercase())
}

/// Whether the statement may read every column (`select *`, `t.*`): a `*` other than
/// `count(*)`'s, which reads none — so a count does not read every customer's traits.
fn asks_every_column(sql_lower: &str) -> bool {
    sql_lower
        .split_whitespace()
        .collect::<String>()
        .replace("count(*)", "")
        .contains('*')
}

fn check_deadline(deadline: Instant) -> Result<(), ApiError> {
    if Instant::now() > deadline {
        Err(ApiError::Timeout(
            "the query ran past its time limit while reading the store".into(),
        ))
    } else {
        Ok(())
    }
}

/// The `customers` table of the customers numbered `within`.
fn customers_table(
    reader: &ReadHandle,
    sql_lower: &str,
    deadline: Instant,
    masking: &Masking,
    within: &[u32],
) -> Result<RecordBatch, ApiError> {
    let rules = reader.rules();
    let everyone = reader.ids_of(within.iter().copied());
    let mut fields = vec![Field::new("customer_id", DataType::Utf8, false)];
    let mut arrays: Vec<ArrayRef> = Vec::new();
    let mut ids = StringBuilder::with_capacity(everyone.len(), everyone.len() * 12);
    everyone.iter().for_each(|id| ids.append_value(masking.id(id)));
    arrays.push(Arc::new(ids.finish()));

    // Tags and segments: the bitmaps.
    let mut names: Vec<Arc<str>> = rules
        .defs()
        .iter()
        .filter(|d| d.kind.has_members())
        .map(|d| d.name.clone())
        .collect();
    for name in reader.index().read().names() {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    for name in &names {
        let set = reader.member_set(name).unwrap_or_default();
        let mut column = BooleanBuilder::with_capacity(everyone.len());
        everyone
            .numbers()
            .iter()
            .for_each(|n| column.append_value(set.contains(*n)));
        fields.push(Field::new(name.as_ref(), DataType::Boolean, false));
        arrays.push(Arc::new(column.finish()));
    }

    // Traits and profile attributes: the store, only when the statement may read them.
    let star = asks_every_column(sql_lower);
    let traits: Vec<_> = rules
        .defs()
        .iter()
        .filter(|d| d.kind == DefKind::Trait && (star || mentions(sql_lower, &d.name)))
        .collect();
    let with_profile = star || sql_lower.contains("profile.");
    if traits.is_empty() && !with_profile {
        return Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)?);
    }
    let mut trait_values: Vec<Vec<Option<Value>>> = vec![Vec::with_capacity(everyone.len()); traits.len()];
    let mut profile: BTreeMap<Arc<str>, Vec<Option<Value>>> = BTreeMap::new();
    let profile_from_columns = with_profile && !reader.index().read().columns().any_spilled();
    if profile_from_columns {
        let index = reader.index().read();
        for name in index.columns().names() {
            let column = index.columns().column(&name).expect("a listed column");
            let values: Vec<Option<Value>> = everyone.numbers().iter().map(|n| column.get(*n)).collect();
            if values.iter().any(Option::is_some) {
                profile.insert(name, values);
            }
        }
    }
    let with_profile = with_profile && !profile_from_columns;
    for (row, id) in everyone
        .iter()
        .enumerate()
        .filter(|_| with_profile || !traits.is_empty())
    {
        if row % 1024 == 0 {
            check_deadline(deadline)?;
        }
        let view = reader.customer(id)?;
        for (column, def) in trait_values.iter_mut().zip(&traits) {
            column.push(
                view.as_ref()
                    .and_then(|v| v.traits.get(&def.name).cloned())
                    .filter(|v| *v != Value::Null),
            );
        }
        if with_profile {
            for (attr, value) in view.iter().flat_map(|v| &v.profile) {
                let column = profile.entry(attr.clone()).or_default();
                column.resize(row, None);
                column.push(Some(value.clone()));
            }
        }
    }
    for (def, values) in traits.iter().zip(&trait_values) {
        fields.push(Field::new(
            def.name.as_ref(),
            crate::export::arrow_type(def.ty, Numbers::Float),
            true,
        ));
        arrays.push(array_of(
            def.ty,
            Numbers::Float,
            values.iter().map(Option::as_ref),
        ));
    }
    for (attr, mut values) in profile {
        // Masked here, before DataFusion sees the table: no statement can read around it.
        match masking.policy(&attr) {
            FieldPolicy::Show => {}
            FieldPolicy::Hide => continue,
            FieldPolicy::Mask => {
                for v in values.iter_mut().flatten() {
                    *v = masking.stored(&attr, v).unwrap_or_default();
                }
            }
        }
        values.resize(everyone.len(), None);
        let present = || values.iter().flatten();
        let ty = if present().all(|v| matches!(v, Value::Num(_))) {
            Type::Num
        } else if present().all(|v| matches!(v, Value::Bool(_))) {
            Type::Bool
        } else {
            Type::Str
        };
        fields.push(Field::new(
            format!("profile.{attr}"),
            crate::export::arrow_type(ty, Numbers::Float),
            true,
        ));
        arrays.push(array_of(ty, Numbers::Float, values.iter().map(Option::as_ref)));
    }
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)?)
}

/// The columns of a `changes` table being filled (a group's with `partition` and `pseq`).
struct ChangeColumns {
    seq: UInt64Builder,
    numbered: Option<(UInt64Builder, UInt64Builder, UInt64Builder)>,
    customer: StringBuilder,
    kind: StringBuilder,
    name: StringBuilder,
    op: StringBuilder,
    at: Int64Builder,
    cause: StringBuilder,
}

/// One row of a `changes` table: `seq`, `partition`, `pseq` and `rules_version` (a
/// group's; the version `None` for a change of a node that did not record it), the customer
/// (as shown), kind, name, op, `at` and cause.
type ChangeRow<'a> = (
    u64,
    Option<(u64, u64, Option<u64>)>,
    &'a str,
    &'a str,
    &'a str,
    &'a str,
    i64,
    &'a str,
);

impl ChangeColumns {
    fn new(numbered: bool) -> ChangeColumns {
        ChangeColumns {
            seq: UInt64Builder::new(),
            numbered: numbered.then(|| (UInt64Builder::new(), UInt64Builder::new(), UInt64Builder::new())),
            customer: StringBuilder::new(),
            kind: StringBuilder::new(),
            name: StringBuilder::new(),
            op: StringBuilder::new(),
            at: Int64Builder::new(),
            cause: StringBuilder::new(),
        }
    }

    fn push(&mut self, (seq, number, customer, kind, name, op, at, cause): ChangeRow<'_>) {
        self.seq.append_value(seq);
        if let Some((partitions, pseqs, versions)) = &mut self.numbered {
            let (partition, pseq, version) = number.unwrap_or_default();
            partitions.append_value(partition);
            pseqs.append_value(pseq);
            versions.append_option(version);
        }
        self.customer.append_value(customer);
        self.kind.append_value(kind);
        self.name.append_value(name);
        self.op.append_value(op);
        self.at.append_value(at);
        self.cause.append_value(cause);
    }

    fn finish(mut self) -> Result<RecordBatch, ApiError> {
        let mut fields = vec![Field::new("seq", DataType::UInt64, false)];
        let mut arrays: Vec<ArrayRef> = vec![Arc::new(self.seq.finish())];
        if let Some((mut partitions, mut pseqs, mut versions)) = self.numbered.take() {
            fields.push(Field::new("partition", DataType::UInt64, false));
            fields.push(Field::new("pseq", DataType::UInt64, false));
            fields.push(Field::new("rules_version", DataType::UInt64, true));
            arrays.push(Arc::new(partitions.finish()));
            arrays.push(Arc::new(pseqs.finish()));
            arrays.push(Arc::new(versions.finish()));
        }
        for (field, column) in [
            ("customer_id", &mut self.customer),
            ("kind", &mut self.kind),
            ("name", &mut self.name),
            ("op", &mut self.op),
        ] {
            fields.push(Field::new(field, DataType::Utf8, false));
            arrays.push(Arc::new(column.finish()));
        }
        fields.push(Field::new("at", DataType::Int64, false));
        arrays.push(Arc::new(self.at.finish()));
        fields.push(Field::new("cause", DataType::Utf8, false));
        arrays.push(Arc::new(self.cause.finish()));
        Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)?)
    }
}

/// The `changes` table.
fn changes_table(reader: &ReadHandle, deadline: Instant, masking: &Masking) -> Result<RecordBatch, ApiError> {
    let mut columns = ChangeColumns::new(false);
    // The table is what retention left of the log.
    let mut after = reader.log_floor(processor::Log::Changes)?.saturating_sub(1);
    loop {
        check_deadline(deadline)?;
        let page = reader.changes(after, 10_000)?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for c in &page {
            let cause = c.cause.as_string();
            columns.push((
                c.seq,
                None,
                &masking.id(&c.customer_id),
                c.kind.label(),
                &c.name,
                c.op.label(),
                c.at,
                &cause,
            ));
        }
    }
    columns.finish()
}

/// Which customers and changes a statement reads.
#[derive(Clone)]
enum Scope {
    /// A node outside a group: its store.
    Store,
    /// A node of a group, asked for its part (`x-tagstream-scope: node`): the customers of
    /// the partitions it owns, its own change log.
    Node(Vec<u32>),
    /// A node of a group: every node's customers (fanned out), the group's change log.
    Group,
}

/// The tables a statement reads, in `scope` (the group's customers come from
/// [`group_customers`] instead).
fn local_tables(
    reader: &ReadHandle,
    lower: &str,
    deadline: Instant,
    masking: &Masking,
    scope: &Scope,
) -> Result<(Option<RecordBatch>, Option<RecordBatch>), ApiError> {
    let customers = match scope {
        _ if !mentions(lower, "customers") => None,
        Scope::Store => {
            let within: Vec<u32> = reader.live_numbers().iter().collect();
            Some(customers_table(reader, lower, deadline, masking, &within)?)
        }
        Scope::Node(owned) => {
            let within: Vec<u32> = reader.numbers_of_partitions(owned).iter().collect();
            Some(customers_table(reader, lower, deadline, masking, &within)?)
        }
        Scope::Group => None,
    };
    let changes = match scope {
        _ if !mentions(lower, "changes") => None,
        Scope::Group => Some(group_changes_table(reader, deadline, masking)?),
        _ => Some(changes_table(reader, deadline, masking)?),
    };
    Ok((customers, changes))
}

/// The `changes` table of a group: its change log as the changes topic holds it, each
/// numbered change once, with its `partition` and `pseq`.
fn group_changes_table(
    reader: &ReadHandle,
    deadline: Instant,
    masking: &Masking,
) -> Result<RecordBatch, ApiError> {
    let mut columns = ChangeColumns::new(true);
    let mut cursor = reader.group_log_start()?;
    loop {
        check_deadline(deadline)?;
        let (changes, next) = match reader.group_log_page(&cursor, 10_000)? {
            processor::GroupPage::Changes { changes, cursor } => (changes, cursor),
            // Trimmed between the start and the page: read what is left.
            processor::GroupPage::Gone { oldest, .. } => {
                cursor = oldest;
                continue;
            }
        };
        if changes.is_empty() {
            break;
        }
        cursor = next;
        for json in &changes {
            let c: serde_json::Value = serde_json::from_slice(json)
                .map_err(|e| ApiError::Internal(format!("a change of the group log: {e}")))?;
            let text = |field: &str| c[field].as_str().unwrap_or_default();
            let (field, kind) = [
                ("tag", "tag"),
                ("segment", "segment"),
                ("absorbed", "customer"),
                ("split", "customer"),
            ]
            .into_iter()
            .find(|(field, _)| c.get(*field).is_some())
            .unwrap_or(("", ""));
            let number = (
                c["partition"].as_u64().unwrap_or_default(),
                c["pseq"].as_u64().unwrap_or_default(),
                c["rules_version"].as_u64(),
            );
            columns.push((
                c["seq"].as_u64().unwrap_or_default(),
                Some(number),
                &masking.id(text("customer_id")),
                kind,
                text(field),
                text("op"),
                c["at"].as_i64().unwrap_or_default(),
                text("cause"),
            ));
        }
    }
    columns.finish()
}

/// A node's part of a group's `customers` table: its partitions' rows, as an Arrow IPC
/// stream in base64.
#[derive(Serialize, Deserialize)]
struct CustomersPart {
    customers: String,
    /// The asked node's own part, as built (never encoded).
    #[serde(skip)]
    local: Option<RecordBatch>,
}

fn to_ipc(batch: &RecordBatch) -> Result<String, ApiError> {
    let internal = |e: arrow_schema::ArrowError| ApiError::Internal(e.to_string());
    let mut out = Vec::new();
    let mut writer = arrow_ipc::writer::StreamWriter::try_new(&mut out, &batch.schema()).map_err(internal)?;
    writer.write(batch).map_err(internal)?;
    writer.finish().map_err(internal)?;
    drop(writer);
    Ok(base64::engine::general_purpose::STANDARD.encode(out))
}

fn from_ipc(text: &str) -> Result<Vec<RecordBatch>, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| e.to_string())?;
    let reader = arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
        .map_err(|e| e.to_string())?;
    reader.collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())
}

/// The nodes' parts of the `customers` table as one: columns by name in the order first
/// met; a column some part lacks is `false` there for a tag or segment (no member there),
/// null otherwise; a column whose type differs between parts (a profile attribute typed
/// by the values each node holds) becomes text in all.
fn merge_customers(parts: Vec<RecordBatch>) -> Result<RecordBatch, ApiError> {
    use datafusion::arrow::array::new_null_array;
    use datafusion::arrow::compute::{cast, concat_batches};
    let mut columns: Vec<(String, DataType)> = Vec::new();
    for part in &parts {
        for field in part.schema().fields() {
            match columns.iter_mut().find(|(name, _)| name == field.name()) {
                Some((_, ty)) if ty != field.data_type() => *ty = DataType::Utf8,
                Some(_) => {}
                None => columns.push((field.name().clone(), field.data_type().clone())),
            }
        }
    }
    let schema = Arc::new(Schema::new(
        columns
            .iter()
            .map(|(name, ty)| Field::new(name, ty.clone(), name != "customer_id"))
            .collect::<Vec<_>>(),
    ));
    let mut batches = Vec::with_capacity(parts.len());
    for part in &parts {
        let rows = part.num_rows();
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(columns.len());
        for (name, ty) in &columns {
            let array = match part.column_by_name(name) {
                Some(array) if array.data_type() == ty => array.clone(),
                Some(array) => match array.as_any().downcast_ref::<arrow_array::Float64Array>() {
                    // As one node writes a number in a text column (`200`, not `200.0`).
                    Some(numbers) if *ty == DataType::Utf8 => Arc::new(
                        numbers
                            .iter()
                            .map(|n| n.map(|n| n.to_string()))
                            .collect::<arrow_array::StringArray>(),
                    ),
                    _ => cast(array, ty)?,
                },
                None if *ty == DataType::Boolean => {
                    Arc::new(arrow_array::BooleanArray::from(vec![false; rows]))
                }
                None => new_null_array(ty, rows),
            };
            arrays.push(array);
        }
        batches.push(RecordBatch::try_new(schema.clone(), arrays)?);
    }
    Ok(concat_batches(&schema, &batches)?)
}

/// Runs one statement over `tables` (`customers`, `changes`) with DataFusion, read-only.
async fn run(
    tables: (Option<RecordBatch>, Option<RecordBatch>),
    sql: String,
    max_rows: usize,
) -> Result<Vec<RecordBatch>, ApiError> {
    let config = SessionConfig::new()
        .with_target_partitions(2)
        .with_information_schema(false);
    let ctx = SessionContext::new_with_config(config);
    for (name, batch) in [("customers", tables.0), ("changes", tables.1)] {
        if let Some(batch) = batch {
            let table = MemTable::try_new(batch.schema(), vec![vec![batch]])?;
            ctx.register_table(name, Arc::new(table))?;
        }
    }
    let options = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let frame = ctx.sql_with_options(&sql, options).await?;
    Ok(frame.limit(0, Some(max_rows + 1))?.collect().await?)
}

/// `POST /v1/sql` `{"sql": "...", "format": "json", "max_rows": n, "timeout_ms": n}`.
///
/// In a group of nodes the `customers` table is every node's partitions' rows (each node
/// builds its part, masked for the caller's role there, and the asked node runs the
/// statement over them all: any SQL, exact), and `changes` is the group's change log. A
/// node asked by another answers its part only; `x-tagstream-scope: node` asks a node for
/// the answer over its own partitions and change log.
pub async fn sql(
    State(app): State<AppState>,
    principal: Option<axum::Extension<crate::access::Principal>>,
    note: Option<axum::Extension<crate::access::AuditNote>>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let b: SqlBody =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("bad SQL request: {e}")))?;
    if let Some(note) = &note {
        note.set("sql", &b.sql);
    }
    let format = b.format.as_deref().unwrap_or("json").to_owned();
    if !["json", "ndjson", "csv", "arrow"].contains(&format.as_str()) {
        return Err(ApiError::BadRequest(format!(
            "unknown format `{format}`: use json, ndjson, csv or arrow"
        )));
    }
    let max_rows = b.max_rows.unwrap_or(DEFAULT_MAX_ROWS);
    if !(1..=MAX_ROWS_CAP).contains(&max_rows) {
        return Err(ApiError::BadRequest(format!(
            "`max_rows` must be between 1 and {MAX_ROWS_CAP}"
        )));
    }
    let timeout = b.timeout_ms.map_or(DEFAULT_TIMEOUT, Duration::from_millis);
    if timeout.is_zero() || timeout > TIMEOUT_CAP {
        return Err(ApiError::BadRequest(format!(
            "`timeout_ms` must be between 1 and {}",
            TIMEOUT_CAP.as_millis()
        )));
    }
    let deadline = Instant::now() + timeout;
    let _slot = crate::access::export_slot(&app.access, &principal)?;
    let reader = app.engine.reader().clone();
    let masking = crate::access::masking_of(&principal);
    let lower = b.sql.to_lowercase();
    let scope = match app.cluster {
        None => Scope::Store,
        Some(_) if headers.contains_key(crate::cluster::FORWARDED) => {
            // Another node's question: this node's part of the `customers` table.
            let status = app.kafka.clone();
            return Ok(crate::cluster::answer_part(move || {
                crate::cluster::part_of(status.as_deref(), |owned| {
                    let within: Vec<u32> = reader.numbers_of_partitions(owned).iter().collect();
                    let batch = customers_table(&reader, &lower, deadline, &masking, &within)?;
                    Ok(CustomersPart {
                        customers: to_ipc(&batch)?,
                        local: None,
                    })
                })
            })
            .await?
            .into_response());
        }
        Some(_) if crate::cluster::scoped(&headers) => Scope::Node(crate::cluster::answered_partitions(&app)),
        Some(_) => Scope::Group,
    };
    if matches!(scope, Scope::Group) && mentions(&lower, "changes") {
        if let Some(status) = &app.kafka {
            status.group_log().map_err(ApiError::Conflict)?;
        }
    }
    let work = async {
        let (mut customers, changes) = {
            let (reader, lower, scope, masking) =
                (reader.clone(), lower.clone(), scope.clone(), masking.clone());
            tokio::task::spawn_blocking(move || local_tables(&reader, &lower, deadline, &masking, &scope))
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))??
        };
        if matches!(scope, Scope::Group) && mentions(&lower, "customers") {
            customers = Some(group_customers(&app, &headers, &b, &lower, deadline, &masking).await?);
        }
        run((customers, changes), b.sql.clone(), max_rows).await
    };
    let batches = tokio::time::timeout(timeout, work).await.map_err(|_| {
        ApiError::Timeout(format!(
            "the query ran past its limit of {} ms",
            timeout.as_millis()
        ))
    })??;
    let total: usize = batches.iter().map(RecordBatch::num_rows).sum();
    let truncated = total > max_rows;
    let batches = keep_rows(batches, max_rows);
    if let Some(note) = &note {
        note.set("rows", total.min(max_rows));
        note.set("format", &format);
    }
    let mut answer = encode(&format, &batches, truncated)?;
    if let Scope::Node(owned) = &scope {
        crate::cluster::name_partitions(&mut answer, owned);
    }
    Ok(answer)
}

/// The group's `customers` table: every node's part (this node's built here), merged.
async fn group_customers(
    app: &AppState,
    headers: &HeaderMap,
    b: &SqlBody,
    lower: &str,
    deadline: Instant,
    masking: &Masking,
) -> Result<RecordBatch, ApiError> {
    let (reader, status) = (app.engine.reader().clone(), app.kafka.clone());
    let (lower, masking) = (lower.to_owned(), masking.clone());
    let local = move || {
        crate::cluster::part_of(status.as_deref(), |owned| {
            let within: Vec<u32> = reader.numbers_of_partitions(owned).iter().collect();
            let batch = customers_table(&reader, &lower, deadline, &masking, &within)?;
            Ok(CustomersPart {
                customers: String::new(),
                local: Some(batch),
            })
        })
    };
    let body = serde_json::json!({ "sql": b.sql, "timeout_ms": b.timeout_ms });
    let parts = crate::cluster::fan_out(
        app,
        headers,
        axum::http::Method::POST,
        "/v1/sql",
        Some(&body),
        local,
    )
    .await?;
    let mut batches = Vec::new();
    for part in parts {
        match part.local {
            Some(batch) => batches.push(batch),
            None => {
                batches.extend(from_ipc(&part.customers).map_err(|e| {
                    ApiError::BadGateway(format!("a node's part of the customers table: {e}"))
                })?)
            }
        }
    }
    merge_customers(batches)
}

/// The first `n` rows of `batches`.
fn keep_rows(batches: Vec<RecordBatch>, mut n: usize) -> Vec<RecordBatch> {
    let mut out = Vec::new();
    for batch in batches {
        if n == 0 {
            break;
        }
        let take = batch.num_rows().min(n);
        out.push(batch.slice(0, take));
        n -= take;
    }
    out
}

fn encode(format: &str, batches: &[RecordBatch], truncated: bool) -> Result<Response, ApiError> {
    let internal = |e: arrow_schema::ArrowError| ApiError::Internal(e.to_string());
    let (content_type, body) = match format {
        "json" | "ndjson" => {
            let mut rows = Vec::new();
            {
                let mut writer = arrow_json::LineDelimitedWriter::new(&mut rows);
                for batch in batches {
                    writer.write(batch).map_err(internal)?;
                }
                writer.finish().map_err(internal)?;
            }
            if format == "ndjson" {
                ("application/x-ndjson", rows)
            } else {
                let rows: Vec<serde_json::Value> = rows
                    .split(|b| *b == b'\n')
                    .filter(|l| !l.is_empty())
                    .map(|l| serde_json::from_slice(l).map_err(|e| ApiError::Internal(e.to_string())))
                    .collect::<Result<_, _>>()?;
                let body =
                    serde_json::json!({ "rows": rows, "row_count": rows.len(), "truncated": truncated });
                ("application/json", serde_json::to_vec(&body).expect("JSON"))
            }
        }
        "csv" => {
            let mut out = Vec::new();
            {
                let mut writer = arrow_csv::WriterBuilder::new().with_header(true).build(&mut out);
                for batch in batches {
                    writer.write(batch).map_err(internal)?;
                }
            }
            ("text/csv; charset=utf-8", out)
        }
        _ => {
            let mut out = Vec::new();
            if let Some(first) = batches.first() {
                let mut writer =
                    arrow_ipc::writer::StreamWriter::try_new(&mut out, &first.schema()).map_err(internal)?;
                for batch in batches {
                    writer.write(batch).map_err(internal)?;
                }
                writer.finish().map_err(internal)?;
            }
            ("application/vnd.apache.arrow.stream", out)
        }
    };
    let mut response = ([(header::CONTENT_TYPE, content_type)], Body::from(body)).into_response();
    response.headers_mut().insert(
        "x-truncated",
        header::HeaderValue::from_static(if truncated { "true" } else { "false" }),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Array, BooleanArray, Float64Array, StringArray};

    fn part(columns: Vec<(&str, ArrayRef)>) -> RecordBatch {
        RecordBatch::try_from_iter(columns).unwrap()
    }

    #[test]
    fn only_a_star_other_than_counts_reads_every_column() {
        assert!(!asks_every_column(
            "select count(*) as n from customers where vip"
        ));
        assert!(!asks_every_column("select count( * ) from customers"));
        assert!(asks_every_column("select * from customers"));
        assert!(asks_every_column("select count(*), c.* from customers c"));
        assert!(asks_every_column("select ltv_90d * 2 from customers"));
    }

    #[test]
    fn parts_of_the_customers_table_merge_by_column_name() {
        let ids = |v: &[&str]| -> ArrayRef { Arc::new(StringArray::from(v.to_vec())) };
        let a = part(vec![
            ("customer_id", ids(&["a1", "a2"])),
            ("vip", Arc::new(BooleanArray::from(vec![true, false]))),
            (
                "profile.zip",
                Arc::new(Float64Array::from(vec![Some(200.0), None])),
            ),
        ]);
        // Another node: no member of `vip` it knows of, zip codes it holds as text, and an
        // attribute the first lacks.
        let b = part(vec![
            ("customer_id", ids(&["b1"])),
            ("profile.zip", Arc::new(StringArray::from(vec!["0200"]))),
            ("profile.city", Arc::new(StringArray::from(vec!["上海"]))),
        ]);
        let merged = merge_customers(vec![a, b]).unwrap();
        let schema = merged.schema();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["customer_id", "vip", "profile.zip", "profile.city"]);
        assert_eq!(merged.num_rows(), 3);
        let column = |name: &str| merged.column_by_name(name).unwrap().clone();
        let vip = column("vip");
        let vip = vip.as_any().downcast_ref::<BooleanArray>().unwrap();
        assert_eq!(
            vip.iter().collect::<Vec<_>>(),
            [Some(true), Some(false), Some(false)]
        );
        let zip = column("profile.zip");
        let zip = zip.as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!(zip.iter().collect::<Vec<_>>(), [Some("200"), None, Some("0200")]);
        let city = column("profile.city");
        assert_eq!(city.null_count(), 2);
    }
}
