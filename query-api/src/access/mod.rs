//! Access control: API keys with roles, the permission each route needs, field masking, the
//! audit trail and per-key limits (docs/security.md).
//!
//! Every route of the API is in [`ROUTES`] with what it needs: open (`/healthz`, `/readyz`,
//! the OpenAPI document, `/metrics` unless configured otherwise) or one [`Permission`]. The
//! middleware ([`authorize`]) resolves the request's key to a [`Principal`] — its role's
//! permissions and [`Masking`] — refuses what the role may not do (401 without a valid key,
//! 403 without the permission, 429 past the key's rate), and writes the audit record of
//! every audited request once the handler has answered. A route missing from the table is
//! refused (500), never served open.

pub mod audit;
pub mod keys;
pub mod limits;
pub mod mask;
pub mod routes;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;

pub use audit::{AuditLog, AuditNote, AuditRecord};
pub use keys::{KeyError, KeyInfo, KeyStore, NewKey, Secret};
pub use limits::{LimitConfig, Limiter};
pub use mask::{FieldPolicy, Masking};

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    /// `POST /v1/events`.
    EventsWrite,
    /// `POST /v1/clock`.
    ClockWrite,
    /// Customer views, timelines, explain.
    CustomersRead,
    /// Segment lists, counts and ad-hoc queries.
    SegmentsRead,
    /// The rule set, its versions, the preview.
    RulesRead,
    /// Data quality and the observed schema.
    QualityRead,
    /// Replace the rule set, roll it back.
    RulesWrite,
    /// Save and delete segments.
    SegmentsWrite,
    /// Set and remove manual tags.
    TagsWrite,
    /// Merge and unmerge customers (identity resolution).
    CustomersMerge,
    /// Members in every format, delta and SSE streams.
    MembersExport,
    /// `POST /v1/sql`.
    SqlQuery,
    /// `GET /v1/changes`.
    ChangesRead,
    /// Webhooks and their dead letters.
    WebhooksManage,
    /// Ingest dead letters: read and purge.
    DeadLettersManage,
    /// `POST /v1/admin/backup`.
    BackupRun,
    /// API keys: create, list, revoke.
    KeysManage,
    /// `GET /v1/audit`.
    AuditRead,
    /// `GET /metrics`, when it is not open.
    MetricsRead,
}

impl Permission {
    pub const ALL: [Permission; 19] = [
        Permission::EventsWrite,
        Permission::ClockWrite,
        Permission::CustomersRead,
        Permission::SegmentsRead,
        Permission::RulesRead,
        Permission::QualityRead,
        Permission::RulesWrite,
        Permission::SegmentsWrite,
        Permission::TagsWrite,
        Permission::CustomersMerge,
        Permission::MembersExport,
        Permission::SqlQuery,
        Permission::ChangesRead,
        Permission::WebhooksManage,
        Permission::DeadLettersManage,
        Permission::BackupRun,
        Permission::KeysManage,
        Permission::AuditRead,
        Permission::MetricsRead,
    ];

    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

/// A role: what it may do and how its outputs are masked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    pub name: String,
    pub permissions: BTreeSet<Permission>,
    pub masking: Masking,
}

/// The built-in roles, each with the least its users need.
pub fn builtin_permissions(role: &str) -> Option<BTreeSet<Permission>> {
    use Permission::*;
    let reader = [CustomersRead, SegmentsRead, RulesRead, QualityRead];
    let set: BTreeSet<Permission> = match role {
        "ingest" => [EventsWrite, ClockWrite].into(),
        "reader" => reader.into(),
        "exporter" => [SegmentsRead, MembersExport, SqlQuery, ChangesRead, WebhooksManage].into(),
        "editor" => reader
            .into_iter()
            .chain([RulesWrite, SegmentsWrite, TagsWrite, CustomersMerge])
            .collect(),
        "monitor" => [MetricsRead, QualityRead].into(),
        "admin" => Permission::ALL.into(),
        _ => return None,
    };
    Some(set)
}

pub const BUILTIN_ROLES: [&str; 6] = ["ingest", "reader", "exporter", "editor", "monitor", "admin"];

/// `[access.roles.NAME]` in the settings: a custom role, or the field policy of a built-in
/// one (whose permissions are then kept unless given).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RoleSettings {
    pub permissions: Option<Vec<Permission>>,
    /// Profile attributes (and `customer_id`) to mask or hide for this role.
    pub fields: BTreeMap<String, FieldPolicy>,
}

/// How a node authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Keys required once one exists. Before the first key, a node on a loopback address
    /// serves open (and says so at start); on any other address it refuses to start.
    #[default]
    Auto,
    /// Keys always required (only the open routes answer until a key is created).
    Required,
    /// No keys: every request is served as `anonymous`. Refused on a non-loopback address
    /// unless `allow_open`.
    Off,
}

/// `[access]` in the settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessConfig {
    pub auth: AuthMode,
    /// Let an open node (auth off, or auto without keys) listen beyond loopback.
    pub allow_open: bool,
    /// `/metrics` without a key.
    pub metrics_open: bool,
    pub roles: BTreeMap<String, RoleSettings>,
    /// Field policies of every role that does not set the field itself.
    pub fields: BTreeMap<String, FieldPolicy>,
    pub limits: LimitConfig,
    /// A file holding one key (`tagstream keys generate`) made an `admin` key named
    /// `bootstrap` at start, once: the first key of a node whose store cannot be reached
    /// by `tagstream keys create` (a container with a mounted secret).
    pub bootstrap_key_file: Option<std::path::PathBuf>,
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            auth: AuthMode::Auto,
            allow_open: false,
            metrics_open: true,
            roles: BTreeMap::new(),
            fields: BTreeMap::new(),
            limits: LimitConfig::default(),
            bootstrap_key_file: None,
        }
    }
}

impl AccessConfig {
    /// Every role: the built-in ones with their configured field policies, and the custom
    /// ones. A custom role must list its permissions.
    pub fn resolve_roles(&self) -> Result<BTreeMap<String, Arc<Role>>, String> {
        let mut roles = BTreeMap::new();
        let names = BUILTIN_ROLES
            .iter()
            .map(|s| s.to_string())
            .chain(self.roles.keys().cloned())
            .collect::<BTreeSet<_>>();
        for name in names {
            let settings = self.roles.get(&name).cloned().unwrap_or_default();
            let permissions = match (&settings.permissions, builtin_permissions(&name)) {
                (Some(list), _) => list.iter().copied().collect(),
                (None, Some(builtin)) => builtin,
                (None, None) => {
                    return Err(format!(
                        "[access.roles.{name}] is not a built-in role ({}): list its permissions",
                        BUILTIN_ROLES.join(", ")
                    ))
                }
            };
            keys::check_name(&name).map_err(|e| format!("role name: {e}"))?;
            let mut fields = self.fields.clone();
            fields.extend(settings.fields);
            roles.insert(
                name.clone(),
                Arc::new(Role {
                    name,
                    permissions,
                    masking: Masking::new(fields),
                }),
            );
        }
        Ok(roles)
    }
}

/// Who a request is.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The key's name, or `anonymous` on an open node.
    pub name: String,
    pub key_id: Option<String>,
    pub role: Arc<Role>,
}

impl Principal {
    pub fn masking(&self) -> &Masking {
        &self.role.masking
    }

    pub fn may(&self, permission: Permission) -> bool {
        self.role.permissions.contains(&permission)
    }
}

/// What a route needs, and whether its requests are audited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Open,
    /// `/metrics`: open unless `metrics_open = false`.
    Metrics,
    Key(Permission),
}

#[derive(Debug, Clone, Copy)]
pub struct RouteAccess {
    pub method: &'static str,
    pub path: &'static str,
    pub need: Need,
    pub audited: bool,
}

const fn route(method: &'static str, path: &'static str, need: Permission, audited: bool) -> RouteAccess {
    RouteAccess {
        method,
        path,
        need: Need::Key(need),
        audited,
    }
}

/// Every route and what it needs. Mutating requests are audited (event ingest excepted: the
/// events are their own record), and so is everything that takes data out in bulk.
pub const ROUTES: &[RouteAccess] = {
    use Permission::*;
    &[
        route("POST", "/v1/events", EventsWrite, false),
        route("POST", "/v1/clock", ClockWrite, true),
        route("GET", "/v1/rules", RulesRead, false),
        route("PUT", "/v1/rules", RulesWrite, true),
        route("POST", "/v1/rules/preview", RulesRead, true),
        route("GET", "/v1/rules/versions", RulesRead, false),
        route("GET", "/v1/rules/versions/{version}", RulesRead, false),
        route("POST", "/v1/rules/rollback", RulesWrite, true),
        route("GET", "/v1/customers/{id}", CustomersRead, false),
        route("GET", "/v1/customers/by/{id_type}/{value}", CustomersRead, false),
        route("POST", "/v1/customers/{id}/merge", CustomersMerge, true),
        route("POST", "/v1/customers/{id}/handover", CustomersMerge, true),
        route("POST", "/v1/customers/{id}/unmerge", CustomersMerge, true),
        route("GET", "/v1/identities/stats", CustomersRead, false),
        route("GET", "/v1/identities/customers/{customer}", CustomersRead, false),
        route("GET", "/v1/customers/{id}/events", CustomersRead, false),
        route("GET", "/v1/customers/{id}/explain/{name}", CustomersRead, false),
        route("PUT", "/v1/customers/{id}/tags/{tag}", TagsWrite, true),
        route("DELETE", "/v1/customers/{id}/tags/{tag}", TagsWrite, true),
        route("GET", "/v1/definitions", SegmentsRead, false),
        route("GET", "/v1/segments", SegmentsRead, false),
        route("POST", "/v1/segments/query", SegmentsRead, true),
        route("GET", "/v1/segments/{name}", SegmentsRead, false),
        route("PUT", "/v1/segments/{name}", SegmentsWrite, true),
        route("DELETE", "/v1/segments/{name}", SegmentsWrite, true),
        route("GET", "/v1/segments/{name}/members", MembersExport, true),
        route("GET", "/v1/segments/{name}/delta", MembersExport, true),
        route("GET", "/v1/segments/{name}/stream", MembersExport, true),
        route("POST", "/v1/webhooks", WebhooksManage, true),
        route("GET", "/v1/webhooks", WebhooksManage, false),
        route("DELETE", "/v1/webhooks/{id}", WebhooksManage, true),
        route("GET", "/v1/webhooks/{id}/dead_letters", WebhooksManage, false),
        route("DELETE", "/v1/webhooks/{id}/dead_letters", WebhooksManage, true),
        route(
            "POST",
            "/v1/webhooks/{id}/dead_letters/redeliver",
            WebhooksManage,
            true,
        ),
        route("POST", "/v1/sql", SqlQuery, true),
        route("GET", "/v1/changes", ChangesRead, false),
        route("GET", "/v1/dlq", DeadLettersManage, false),
        route("DELETE", "/v1/dlq", DeadLettersManage, true),
        route("POST", "/v1/admin/backup", BackupRun, true),
        route("POST", "/v1/admin/keys", KeysManage, true),
        route("GET", "/v1/admin/keys", KeysManage, false),
        route("DELETE", "/v1/admin/keys/{id}", KeysManage, true),
        route("GET", "/v1/audit", AuditRead, false),
        route("GET", "/v1/quality", QualityRead, false),
        route("GET", "/v1/schema/observed", QualityRead, false),
        RouteAccess {
            method: "GET",
            path: "/metrics",
            need: Need::Metrics,
            audited: false,
        },
        // Who owns what in a group of several: an operator's view, as the metrics.
        RouteAccess {
            method: "GET",
            path: "/v1/cluster",
            need: Need::Metrics,
            audited: false,
        },
        RouteAccess {
            method: "GET",
            path: "/openapi.json",
            need: Need::Open,
            audited: false,
        },
        RouteAccess {
            method: "GET",
            path: "/healthz",
            need: Need::Open,
            audited: false,
        },
        // The console's static files: no data in them (the console logs in with a key).
        RouteAccess {
            method: "GET",
            path: "/",
            need: Need::Open,
            audited: false,
        },
        RouteAccess {
            method: "GET",
            path: "/console/",
            need: Need::Open,
            audited: false,
        },
        RouteAccess {
            method: "GET",
            path: "/console/assets/{file}",
            need: Need::Open,
            audited: false,
        },
        RouteAccess {
            method: "GET",
            path: "/readyz",
            need: Need::Open,
            audited: false,
        },
    ]
};

pub fn route_access(method: &Method, path: &str) -> Option<&'static RouteAccess> {
    ROUTES.iter().find(|r| {
        r.path == path && (r.method == method.as_str() || (method == Method::HEAD && r.method == "GET"))
    })
}

/// The access state of a running node.
pub struct Access {
    pub config: AccessConfig,
    pub roles: BTreeMap<String, Arc<Role>>,
    pub keys: KeyStore,
    pub audit: AuditLog,
    pub limiter: Limiter,
    /// Failed authentications per client address.
    pub failures: limits::FailureBudget,
    /// Served open (auth off, or auto before the first key on loopback).
    anonymous: Arc<Role>,
    /// Customer ids masked once, for exports by roles that mask them.
    pub masked_ids: mask::MaskedIds,
}

impl Access {
    pub fn open(store: Arc<processor::store::Store>, config: AccessConfig) -> Result<Access, String> {
        let roles = config.resolve_roles()?;
        let keys = KeyStore::open(store.clone()).map_err(|e| e.to_string())?;
        let audit = AuditLog::open(store).map_err(|e| e.to_string())?;
        if let Some(path) = &config.bootstrap_key_file {
            let key = std::fs::read_to_string(path)
                .map_err(|e| format!("[access] bootstrap_key_file {}: {e}", path.display()))?;
            let added = keys
                .import(key.trim(), "bootstrap", "admin", audit::wall_ms())
                .map_err(|e| format!("[access] bootstrap_key_file {}: {e}", path.display()))?;
            if added {
                let detail =
                    json!({"name": "bootstrap", "role": "admin", "from": path.display().to_string()});
                audit
                    .append(AuditRecord::command(
                        "keys bootstrap",
                        detail.as_object().cloned().unwrap_or_default(),
                    ))
                    .map_err(|e| e.to_string())?;
            }
        }
        let anonymous = Arc::new(Role {
            name: "anonymous".to_owned(),
            permissions: Permission::ALL.into(),
            masking: Masking::new(config.fields.clone()),
        });
        Ok(Access {
            limiter: Limiter::new(config.limits),
            failures: limits::FailureBudget::new(config.limits.failed_auth_per_minute),
            config,
            roles,
            keys,
            audit,
            anonymous,
            masked_ids: mask::MaskedIds::default(),
        })
    }

    /// Whether requests need a key now.
    pub fn enforced(&self) -> bool {
        match self.config.auth {
            AuthMode::Off => false,
            AuthMode::Required => true,
            AuthMode::Auto => self.keys.any_active(),
        }
    }

    /// Refuses to serve open beyond loopback unless told to; says loudly when open.
    pub fn check_listen(&self, addr: std::net::SocketAddr) -> Result<(), String> {
        if self.enforced() || self.config.auth == AuthMode::Required {
            return Ok(());
        }
        if !addr.ip().is_loopback() && !self.config.allow_open {
            return Err(format!(
                "refusing to serve {addr} open: no API key exists{}. Create one with \
                 `tagstream keys create --role admin --name NAME --data-dir DIR`, or set \
                 [access] allow_open = true to serve without keys (not recommended)",
                if self.config.auth == AuthMode::Off {
                    " and [access] auth = \"off\""
                } else {
                    ""
                }
            ));
        }
        if self.config.auth == AuthMode::Off {
            tracing::warn!(
                "ACCESS IS OPEN: [access] auth = \"off\", so no key is checked: anyone who reaches {addr} \
                 can read and change everything"
            );
        } else {
            tracing::warn!(
                "ACCESS IS OPEN: no API key exists, anyone who reaches {addr} can read and change \
                 everything. Create a key with `tagstream keys create --role admin --name NAME` to \
                 turn authentication on"
            );
        }
        Ok(())
    }

    pub fn role(&self, name: &str) -> Option<&Arc<Role>> {
        self.roles.get(name)
    }

    fn principal(&self, key: &KeyInfo) -> Option<Principal> {
        Some(Principal {
            name: key.name.clone(),
            key_id: Some(key.id.clone()),
            role: self.roles.get(&key.role)?.clone(),
        })
    }

    pub fn anonymous(&self) -> Principal {
        Principal {
            name: "anonymous".to_owned(),
            key_id: None,
            role: self.anonymous.clone(),
        }
    }

    /// Records one audit entry; a failure to write it is logged and answered as an error by
    /// the caller (an action that cannot be audited is not done silently).
    pub fn record(&self, record: AuditRecord) -> Result<u64, String> {
        self.audit.append(record).map_err(|e| {
            tracing::error!(error = %e, "the audit record could not be written");
            e.to_string()
        })
    }
}

/// Why a presented `Authorization` header is not a usable key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderProblem {
    Missing,
    NotBearer,
    Malformed,
}

impl HeaderProblem {
    fn message(&self) -> &'static str {
        match self {
            HeaderProblem::Missing => "this endpoint needs an API key: send `Authorization: Bearer <key>`",
            HeaderProblem::NotBearer => "the Authorization header is not `Bearer <key>`",
            HeaderProblem::Malformed => "the Authorization header holds no usable key",
        }
    }
}

/// The key in `Authorization: Bearer <key>` (scheme case-insensitive, one space or more).
pub fn bearer(value: Option<&[u8]>) -> Result<&str, HeaderProblem> {
    let value = value.ok_or(HeaderProblem::Missing)?;
    let text = std::str::from_utf8(value).map_err(|_| HeaderProblem::Malformed)?;
    let (scheme, rest) = text.trim().split_once(' ').ok_or(HeaderProblem::NotBearer)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(HeaderProblem::NotBearer);
    }
    let key = rest.trim();
    if key.is_empty() || key.len() > 256 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(HeaderProblem::Malformed);
    }
    Ok(key)
}

fn refusal(status: StatusCode, message: &str) -> Response {
    let mut response = (status, Json(json!({ "error": message }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

fn outcome(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=399 => "ok",
        401 | 403 | 429 => "denied",
        _ => "failed",
    }
}

/// The middleware: authenticates, authorises, limits and audits every request.
pub async fn authorize(State(access): State<Arc<Access>>, mut request: Request, next: Next) -> Response {
    let Some(path) = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
    else {
        // Unmatched: the fallback answers 404 / 405 without reading anything.
        return next.run(request).await;
    };
    let method = request.method().clone();
    let Some(route) = route_access(&method, &path) else {
        if ROUTES.iter().any(|r| r.path == path) {
            // A method the route does not have: the router answers 405.
            return next.run(request).await;
        }
        tracing::error!(%method, %path, "a route has no access rule; refused");
        return refusal(StatusCode::INTERNAL_SERVER_ERROR, "this route has no access rule");
    };
    let permission = match route.need {
        Need::Open => return next.run(request).await,
        Need::Metrics if access.config.metrics_open => return next.run(request).await,
        Need::Metrics => Permission::MetricsRead,
        Need::Key(p) => p,
    };
    let action = format!("{} {}", route.method, route.path);
    let target = request.uri().path().to_owned();
    let mut record = AuditRecord {
        seq: 0,
        at: 0,
        actor: "anonymous".to_owned(),
        key_id: None,
        role: None,
        action,
        target: Some(target),
        status: 0,
        outcome: String::new(),
        detail: Default::default(),
    };
    let principal = if access.enforced() {
        let presented = bearer(
            request
                .headers()
                .get(header::AUTHORIZATION)
                .map(HeaderValue::as_bytes),
        );
        let verified = presented
            .as_ref()
            .ok()
            .and_then(|key| access.keys.verify(key))
            .and_then(|info| access.principal(&info));
        match (presented, verified) {
            (_, Some(principal)) => principal,
            (Err(problem), None) => return unauthenticated(&access, &request, record, problem.message()),
            (Ok(_), None) => {
                let message = "the API key is not valid (unknown or revoked)";
                return unauthenticated(&access, &request, record, message);
            }
        }
    } else {
        access.anonymous()
    };
    record.actor = principal.name.clone();
    record.key_id = principal.key_id.clone();
    record.role = Some(principal.role.name.clone());
    // Before the permission check: refusals are audited, so a key's rate bounds them too.
    if let Some(id) = &principal.key_id {
        if let Err(wait) = access.limiter.admit(id) {
            let message = format!("key `{}` is over its request rate; retry later", principal.name);
            return deny(
                &access,
                record,
                StatusCode::TOO_MANY_REQUESTS,
                &message,
                Some(wait),
            );
        }
    }
    if !principal.may(permission) {
        let message = format!(
            "the role `{}` may not do this: it needs the permission `{}`",
            principal.role.name,
            permission.name()
        );
        return deny(&access, record, StatusCode::FORBIDDEN, &message, None);
    }
    let note = AuditNote::default();
    request.extensions_mut().insert(principal);
    request.extensions_mut().insert(note.clone());
    let response = next.run(request).await;
    if !route.audited {
        return response;
    }
    record.status = response.status().as_u16();
    record.outcome = outcome(response.status()).to_owned();
    record.detail = note.take();
    match access.record(record) {
        Ok(_) => response,
        Err(_) => refusal(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the request was done but its audit record could not be written; see the server log",
        ),
    }
}

/// A refused request, audited (every refusal is: failed authentication, a forbidden action,
/// a key over its rate).
/// A request without a valid key: 401 and an audit record naming the client address, while
/// that address is within its failure budget; past it, 429 and no record of its own (the
/// count goes into the address's next record), so a flood of bad keys costs no disk syncs.
fn unauthenticated(access: &Access, request: &Request, mut record: AuditRecord, message: &str) -> Response {
    let client = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    metrics::counter!("tagstream_auth_failures_total").increment(1);
    match access.failures.fail_at(client, std::time::Instant::now()) {
        limits::FailureVerdict::Record { unrecorded_before } => {
            if let Some(ip) = client {
                record.detail.insert("client".into(), ip.to_string().into());
            }
            if unrecorded_before > 0 {
                record
                    .detail
                    .insert("unrecorded_failures_before".into(), unrecorded_before.into());
            }
            deny(access, record, StatusCode::UNAUTHORIZED, message, None)
        }
        limits::FailureVerdict::Throttled { retry_after } => {
            metrics::counter!("tagstream_auth_failures_unaudited_total").increment(1);
            let mut response = refusal(
                StatusCode::TOO_MANY_REQUESTS,
                "too many failed authentications from this address; retry later with a valid key",
            );
            let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            response
        }
    }
}

fn deny(
    access: &Access,
    mut record: AuditRecord,
    status: StatusCode,
    message: &str,
    retry_after: Option<std::time::Duration>,
) -> Response {
    record.status = status.as_u16();
    record.outcome = outcome(status).to_owned();
    record.detail.insert("reason".into(), message.into());
    let _ = access.record(record);
    let mut response = refusal(status, message);
    if let Some(wait) = retry_after {
        let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// A slot for one export or SQL statement of the request's key, held until dropped (keys
/// only: an open node has no key to bound); 429 when the key runs as many as it may.
pub fn export_slot(
    access: &Access,
    principal: &Option<axum::Extension<Principal>>,
) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, crate::ApiError> {
    let Some(id) = principal.as_ref().and_then(|p| p.key_id.clone()) else {
        return Ok(None);
    };
    access.limiter.export_slot(&id).map(Some).ok_or_else(|| {
        crate::ApiError::TooMany(format!(
            "this key already runs {} exports or SQL statements; wait for one to finish",
            access.config.limits.concurrent_exports
        ))
    })
}

/// The masking of a request's principal (none where no access layer runs).
pub fn masking_of(principal: &Option<axum::Extension<Principal>>) -> Masking {
    principal
        .as_ref()
        .map_or_else(Masking::default, |p| p.masking().clone())
}

/// `If-Match: "N"` (or `N`, `W/"N"`; `*` matches any): the version a writer read.
pub fn if_match(headers: &HeaderMap) -> Result<Option<u64>, String> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| "If-Match is not ASCII".to_owned())?
        .trim();
    if text == "*" {
        return Ok(None);
    }
    let bare = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
    bare.parse()
        .map(Some)
        .map_err(|_| format!("If-Match `{text}` is not a rule-set version (send the ETag of GET /v1/rules)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_bearer_parser_takes_one_key() {
        assert_eq!(bearer(Some(b"Bearer tsk_a_b")), Ok("tsk_a_b"));
        assert_eq!(bearer(Some(b"bearer   tsk_a_b  ")), Ok("tsk_a_b"));
        assert_eq!(bearer(None), Err(HeaderProblem::Missing));
        assert_eq!(bearer(Some(b"Basic dXNlcjpwdw==")), Err(HeaderProblem::NotBearer));
        assert_eq!(bearer(Some(b"Bearer")), Err(HeaderProblem::NotBearer));
        assert_eq!(bearer(Some(b"Bearer a b")), Err(HeaderProblem::Malformed));
        assert_eq!(bearer(Some(b"Bearer \xff\xfe")), Err(HeaderProblem::Malformed));
    }

    proptest! {
        /// Whatever the header holds, the parser answers without panicking, and what it
        /// accepts is one printable token that the header contains.
        #[test]
        fn the_bearer_parser_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(key) = bearer(Some(&raw)) {
                prop_assert!(!key.is_empty() && key.len() <= 256);
                prop_assert!(key.bytes().all(|b| b.is_ascii_graphic()));
                prop_assert!(String::from_utf8_lossy(&raw).contains(key));
            }
        }

        #[test]
        fn bearer_round_trips(key in "[!-~]{1,256}", spaces in 1usize..4) {
            let header = format!("Bearer{}{key}", " ".repeat(spaces));
            prop_assert_eq!(bearer(Some(header.as_bytes())), Ok(key.as_str()));
        }
    }

    #[test]
    fn builtin_roles_hold_the_least_they_need() {
        let roles = AccessConfig::default().resolve_roles().unwrap();
        let may = |role: &str, p| roles[role].permissions.contains(&p);
        assert!(may("ingest", Permission::EventsWrite) && !may("ingest", Permission::CustomersRead));
        assert!(may("reader", Permission::CustomersRead) && !may("reader", Permission::MembersExport));
        assert!(may("exporter", Permission::MembersExport) && !may("exporter", Permission::RulesWrite));
        assert!(may("editor", Permission::CustomersMerge) && !may("editor", Permission::SqlQuery));
        assert!(!may("editor", Permission::MembersExport));
        assert!(Permission::ALL.iter().all(|p| may("admin", *p)));
    }

    #[test]
    fn custom_roles_need_permissions_and_may_mask() {
        let mut config = AccessConfig::default();
        config.roles.insert(
            "support".into(),
            RoleSettings {
                permissions: Some(vec![Permission::CustomersRead]),
                fields: [("phone".to_owned(), FieldPolicy::Show)].into(),
            },
        );
        config.fields.insert("phone".into(), FieldPolicy::Mask);
        let roles = config.resolve_roles().unwrap();
        assert_eq!(roles["support"].masking.policy("phone"), FieldPolicy::Show);
        assert_eq!(roles["reader"].masking.policy("phone"), FieldPolicy::Mask);
        config.roles.insert("nameless".into(), RoleSettings::default());
        assert!(config
            .resolve_roles()
            .unwrap_err()
            .contains("list its permissions"));
    }

    /// The OpenAPI document names what every route needs, as the middleware enforces it.
    #[test]
    fn the_openapi_document_states_each_routes_permission() {
        let doc: serde_json::Value = serde_json::from_str(include_str!("../openapi.json")).unwrap();
        for route in ROUTES {
            let op = &doc["paths"][route.path][route.method.to_ascii_lowercase()];
            assert!(
                op.is_object(),
                "{} {} is not documented",
                route.method,
                route.path
            );
            let expected = match route.need {
                Need::Open => serde_json::Value::Null,
                Need::Metrics => "metrics_read".into(),
                Need::Key(p) => p.name().into(),
            };
            assert_eq!(op["x-permission"], expected, "{} {}", route.method, route.path);
        }
        let documented: usize = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|ops| ops.as_object().unwrap().len())
            .sum();
        assert_eq!(
            documented,
            ROUTES.len(),
            "every documented operation is in ROUTES"
        );
    }

    #[test]
    fn if_match_reads_versions() {
        let mut headers = HeaderMap::new();
        assert_eq!(if_match(&headers), Ok(None));
        headers.insert(header::IF_MATCH, HeaderValue::from_static("\"7\""));
        assert_eq!(if_match(&headers), Ok(Some(7)));
        headers.insert(header::IF_MATCH, HeaderValue::from_static("W/\"8\""));
        assert_eq!(if_match(&headers), Ok(Some(8)));
        headers.insert(header::IF_MATCH, HeaderValue::from_static("*"));
        assert_eq!(if_match(&headers), Ok(None));
        headers.insert(header::IF_MATCH, HeaderValue::from_static("abc"));
        assert!(if_match(&headers).is_err());
    }
}
