//! Webhook subscriptions: the change log of one tag or segment (or of everything) POSTed to a
//! URL in `seq` order, signed with HMAC-SHA256, retried with exponential backoff; a batch
//! that keeps failing goes to the subscription's dead-letter list and delivery moves on.
//!
//! Each subscription has one task and a durable cursor (the last `seq` it delivered or dead-
//! lettered), so deliveries are in order and survive restarts; after a crash the batch in
//! flight is sent again (at least once — receivers dedup by the `x-tagstream-delivery` id or
//! by `seq`). In a group of several that keeps the group's change log, a subscription of the
//! group is delivered by one node from that log instead, with a group cursor (`webhooks/group.rs`).
//!
//! Signature: `x-tagstream-signature: t=MS,v1=HEX`, HEX being HMAC-SHA256 with the
//! subscription's secret over `MS` + `.` + the body. Secrets are stored to sign, never shown
//! by the API and never logged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{Request, StatusCode, Uri};
use axum::Json;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use processor::store::CF_WEBHOOKS;
use processor::{Change, Log, ReadHandle};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json_};
use sha2::Sha256;

use crate::targets::{CheckedResolver, TargetPolicy};
use crate::{ApiError, AppState, LimitedBody};

mod group;

/// How deliveries are paced, and where they may go.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// The first retry waits this long; each next one twice as long, up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Attempts per batch before it is dead-lettered, unless the subscription says.
    pub max_attempts: u32,
    /// One attempt's time limit.
    pub timeout: Duration,
    /// Changes per delivery at most.
    pub batch: usize,
    /// Dead-lettered batches kept per subscription: the oldest go beyond this many, and
    /// once older than `dead_letters_max_age`.
    pub dead_letters_max: usize,
    pub dead_letters_max_age: Duration,
    /// Non-public addresses deliveries may reach ([`crate::targets`]).
    pub targets: Arc<TargetPolicy>,
    /// How `https://` receivers are verified: the Mozilla roots built in, and any CA
    /// added with `[webhooks] ca_file`.
    pub tls: Arc<rustls::ClientConfig>,
}

/// The TLS client settings of webhook deliveries: certificates verified against the roots
/// compiled in (webpki-roots) and the PEM certificates in `extra_ca`.
pub fn tls_client(
    extra_ca: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra_ca {
        roots
            .add(cert.clone())
            .map_err(|e| format!("[webhooks] ca_file: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            max_attempts: 8,
            timeout: Duration::from_secs(10),
            batch: 100,
            dead_letters_max: 10_000,
            dead_letters_max_age: Duration::from_secs(30 * 86_400),
            targets: Arc::default(),
            tls: tls_client(&[]).expect("the built-in roots are valid"),
        }
    }
}

/// A subscription as stored.
#[derive(Clone, Serialize, Deserialize)]
struct Subscription {
    id: u64,
    url: String,
    /// The tag or segment whose changes are sent; `None`: every change.
    name: Option<String>,
    secret: String,
    max_attempts: u32,
    created_at: i64,
    /// The role of the key that created it: deliveries are masked as that role sees data.
    #[serde(default)]
    role: Option<String>,
    /// Made in a group with `x-tagstream-scope: node`: this node's alone, never shared.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    node_only: bool,
    /// In a group that delivers from the group's change log: the group cursor deliveries
    /// start after (the group log's end on the node that made it, or the `cursor` asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group_start: Option<Vec<u64>>,
    /// In a group, this node's store among the senders (`x-tagstream-delivery` names it):
    /// set when its task starts.
    #[serde(skip)]
    sender: Option<String>,
}

impl std::fmt::Debug for Subscription {
    /// Without the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .field("url", &self.url)
            .field("name", &self.name)
            .field("secret", &"***")
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// What the API shows: everything but the secret.
    fn public(&self) -> Json_ {
        json!({
            "id": self.id,
            "url": self.url,
            "name": self.name,
            "max_attempts": self.max_attempts,
            "created_at": self.created_at,
            "role": self.role,
            "node_only": self.node_only,
        })
    }

    /// The `x-tagstream-delivery` id of a batch whose first change is `first`.
    fn delivery_id(&self, first: u64) -> String {
        match &self.sender {
            Some(sender) => format!("{}-{sender}-{first}", self.id),
            None => format!("{}-{first}", self.id),
        }
    }
}

/// How a subscription travels between the nodes of a group (the control topic's
/// `webhook` records): made, or deleted. A deletion wins over the making, in any order.
#[derive(Serialize, Deserialize)]
struct SharedSubscription {
    subscription: Subscription,
    #[serde(default)]
    deleted: bool,
}

const SHARED_KIND: &str = "webhook";

/// A subscription's record from the group. An error names where it is malformed, not what
/// is there: the record holds a signing secret, which serde's messages may quote.
fn parse_shared(body: &Json_) -> Result<SharedSubscription, ApiError> {
    serde_json::from_value(body.clone()).map_err(|e| {
        ApiError::BadRequest(format!(
            "a shared webhook subscription does not parse ({:?} error)",
            e.classify()
        ))
    })
}

/// Sends a subscription's making or deletion to the group; blocking, until the broker has it.
fn share(
    control: &processor::kafka::control::Control,
    sub: &Subscription,
    deleted: bool,
) -> Result<(), ApiError> {
    let body = serde_json::to_value(SharedSubscription {
        subscription: sub.clone(),
        deleted,
    })
    .expect("a subscription serialises");
    control
        .share(&processor::kafka::control::Shared {
            kind: SHARED_KIND.into(),
            id: sub.id.to_string(),
            body,
            latest: false,
        })
        .map_err(|e| ApiError::Unavailable(format!("the group could not be told, so nothing changed: {e}")))
}

/// `sub` as this node sends it: in a group, several nodes send batches to the same
/// receiver, each numbered by its own log, so the delivery ids name the sender.
fn sending(app: &AppState, mut sub: Subscription) -> Subscription {
    if app.control.is_some() {
        match sender_name(app.engine.reader()) {
            Ok(sender) => sub.sender = Some(sender),
            Err(e) => tracing::error!(webhook = sub.id, error = %e, "this store's sender name is unreadable"),
        }
    }
    sub
}

/// This store's name among a group's webhook senders: drawn once, kept in the store.
fn sender_name(reader: &ReadHandle) -> Result<String, processor::EngineError> {
    const SENDER: &str = "webhook_sender";
    let mut sender = reader.cursor(SENDER)?;
    if sender == 0 {
        let mut bytes = [0u8; 4];
        getrandom::fill(&mut bytes).expect("the operating system's random source");
        sender = u64::from(u32::from_be_bytes(bytes)).max(1);
        reader.set_cursor(SENDER, sender)?;
    }
    Ok(format!("{sender:08x}"))
}

fn sub_key(id: u64) -> Vec<u8> {
    [b"sub:".as_slice(), &id.to_be_bytes()].concat()
}

fn dlq_prefix(id: u64) -> Vec<u8> {
    [b"dlq:".as_slice(), &id.to_be_bytes()].concat()
}

fn cursor_name(id: u64) -> String {
    format!("webhook:{id}")
}

const NEXT_ID: &str = "webhook_next_id";

/// The running subscriptions.
pub struct Webhooks {
    config: WebhookConfig,
    tasks: Mutex<HashMap<u64, tokio::task::JoinHandle<()>>>,
    /// Serialises creation (the id counter).
    create: Mutex<()>,
    /// Set at shutdown, once no request can commit anything more: each task delivers what
    /// is committed and ends.
    draining: tokio::sync::watch::Sender<bool>,
    /// Where the group's deliveries of each subscription stand, from every node's cursor
    /// records (subscriptions delivered from the group log).
    group_cursors: group::GroupCursors,
}

impl Webhooks {
    pub fn new(config: WebhookConfig) -> Webhooks {
        Webhooks {
            config,
            tasks: Mutex::default(),
            create: Mutex::default(),
            draining: tokio::sync::watch::channel(false).0,
            group_cursors: group::GroupCursors::default(),
        }
    }

    /// At shutdown: every subscription delivers (or dead-letters) what is committed, then
    /// stops; whatever has not finished within `grace` is stopped where it is (its cursor
    /// is durable: it resumes there after a restart). Returns how many had to be stopped.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.draining.send_replace(true);
        let tasks: Vec<_> = self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, t)| t)
            .collect();
        let deadline = tokio::time::Instant::now() + grace;
        let mut cut = 0;
        for mut task in tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
                cut += 1;
            }
        }
        cut
    }

    /// Starts a delivery task for every stored subscription (at server start).
    pub fn resume(self: &Arc<Self>, app: &AppState) -> Result<usize, ApiError> {
        let subs = stored(app.engine.reader())?;
        let n = subs.len();
        for sub in subs {
            self.start(app, sub);
        }
        Ok(n)
    }

    fn start(self: &Arc<Self>, app: &AppState, sub: Subscription) {
        let id = sub.id;
        // Retention keeps what the subscription has not delivered, from before its task
        // first runs.
        let reader = app.engine.reader();
        let task = match group::delivered_by_group(app, &sub) {
            Some(members) => {
                if let Some(at) = group::group_position(self, &sub) {
                    reader.hold_group_log(&cursor_name(id), &at);
                }
                tokio::spawn(group::deliver(
                    app.clone(),
                    self.config.clone(),
                    sub,
                    members,
                    self.draining.subscribe(),
                ))
            }
            None => {
                match reader.cursor(&cursor_name(id)) {
                    Ok(cursor) => reader.hold(&cursor_name(id), Log::Changes, cursor + 1),
                    Err(e) => tracing::error!(webhook = id, error = %e, "webhook cursor unreadable"),
                }
                tokio::spawn(deliver(
                    app.clone(),
                    self.config.clone(),
                    sending(app, sub),
                    self.draining.subscribe(),
                ))
            }
        };
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = tasks.insert(id, task) {
            old.abort();
        }
    }

    /// Stores `sub`, delivering from `after` on, and starts it.
    fn add(self: &Arc<Self>, app: &AppState, sub: Subscription, after: u64) -> Result<(), ApiError> {
        let reader = app.engine.reader();
        reader.set_cursor(&cursor_name(sub.id), after)?;
        let value = serde_json::to_vec(&sub).expect("a subscription serialises");
        reader
            .store()
            .put_now(CF_WEBHOOKS, &sub_key(sub.id), &value)
            .map_err(processor::EngineError::from)?;
        self.start(app, sub);
        Ok(())
    }

    /// Takes in a subscription's making or deletion from the group (the control topic): a
    /// subscription made elsewhere delivers this node's changes from its last one on.
    /// Returns the subscription's id and whether it is deleted.
    fn merge_shared(self: &Arc<Self>, app: &AppState, body: &Json_) -> Result<(u64, bool), ApiError> {
        let shared = parse_shared(body)?;
        let sub = shared.subscription;
        let id = sub.id;
        let _one_at_a_time = self.create.lock().unwrap_or_else(|e| e.into_inner());
        let stored = match find(app.engine.reader(), id) {
            Ok(_) => true,
            Err(ApiError::NotFound(_)) => false,
            Err(e) => return Err(e),
        };
        if shared.deleted && stored {
            remove(app, id)?;
        } else if !shared.deleted && !stored {
            self.add(app, sub, app.engine.reader().last_seq())?;
        }
        Ok((id, shared.deleted))
    }

    /// In a group of several: this node's subscriptions become the group's. Every
    /// subscription the group made or deleted (read from the control topic, those before
    /// this node started first) is taken in here, and as they come; then this store's own
    /// that the group does not know (made before the node joined) are shared. Call once
    /// the stored ones run ([`Webhooks::resume`]), within the runtime.
    pub fn join_group(
        self: &Arc<Self>,
        app: &AppState,
        control: &Arc<processor::kafka::control::Control>,
    ) -> Result<usize, ApiError> {
        let known = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let (hooks, state, seen) = (self.clone(), app.clone(), known.clone());
        let runtime = tokio::runtime::Handle::current();
        control.on_shared(
            SHARED_KIND,
            Box::new(move |shared: &processor::kafka::control::Shared| {
                let _in_runtime = runtime.enter();
                match hooks.merge_shared(&state, &shared.body) {
                    Ok((id, _)) => {
                        seen.lock().unwrap_or_else(|e| e.into_inner()).insert(id);
                    }
                    Err(e) => tracing::warn!(id = %shared.id, error = %e, "a webhook subscription from the group was not taken in"),
                }
            }),
        );
        let known = known.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut shared = 0;
        for sub in stored(app.engine.reader())? {
            if !sub.node_only && !known.contains(&sub.id) {
                share(control, &sub, false)?;
                shared += 1;
            }
        }
        Ok(shared)
    }

    fn stop(&self, app: &AppState, id: u64) {
        if let Some(task) = self.tasks.lock().unwrap_or_else(|e| e.into_inner()).remove(&id) {
            task.abort();
        }
        app.engine.reader().release(&cursor_name(id));
        app.engine.reader().release_group_log(&cursor_name(id));
        self.group_cursors.forget(id);
    }
}

fn stored(reader: &ReadHandle) -> Result<Vec<Subscription>, ApiError> {
    let mut out = Vec::new();
    for item in reader.store().scan_from(CF_WEBHOOKS, b"sub:") {
        let (key, value) = item.map_err(processor::EngineError::from)?;
        if !key.starts_with(b"sub:") {
            break;
        }
        let sub: Subscription =
            serde_json::from_slice(&value).map_err(|e| ApiError::Internal(format!("stored webhook: {e}")))?;
        out.push(sub);
    }
    Ok(out)
}

fn find(reader: &ReadHandle, id: u64) -> Result<Subscription, ApiError> {
    let value = reader
        .store()
        .get(CF_WEBHOOKS, &sub_key(id))
        .map_err(processor::EngineError::from)?
        .ok_or_else(|| ApiError::NotFound(format!("no webhook subscription {id}")))?;
    serde_json::from_slice(&value).map_err(|e| ApiError::Internal(format!("stored webhook: {e}")))
}

fn parse_id(text: &str) -> Result<u64, ApiError> {
    text.parse()
        .map_err(|_| ApiError::BadRequest(format!("`{text}` is not a webhook subscription id")))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    url: String,
    /// A tag or segment; absent for every change.
    name: Option<String>,
    secret: String,
    max_attempts: Option<u32>,
    /// Deliver changes after this `seq` (default: from the last committed change on).
    after: Option<u64>,
    /// In a group that delivers from the group's change log: deliver the changes after
    /// this group cursor (`0`: everything the group log holds; default: from its end).
    cursor: Option<String>,
}

/// Checks a webhook URL: absolute `https://` (certificate verified) or `http://`, with a
/// host.
fn check_url(url: &str) -> Result<Uri, ApiError> {
    let uri: Uri = url
        .parse()
        .map_err(|e| ApiError::BadRequest(format!("`url` is not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some() => Ok(uri),
        _ => Err(ApiError::BadRequest(format!(
            "`url` must be an absolute https:// or http:// URL, got `{url}`"
        ))),
    }
}

/// `POST /v1/webhooks`: subscribe; answers the subscription (without its secret).
pub async fn create(
    State(app): State<AppState>,
    principal: Option<axum::Extension<crate::access::Principal>>,
    headers: axum::http::HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<(StatusCode, Json<Json_>), ApiError> {
    // In a group of several a subscription is the group's: every node delivers the changes
    // it makes. `x-tagstream-scope: node` makes one of this node's alone.
    let node_only = app.control.is_some() && crate::cluster::scoped(&headers);
    let group = app.control.clone().filter(|_| !node_only);
    let b: CreateBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("bad webhook subscription: {e}")))?;
    let uri = check_url(&b.url)?;
    if b.secret.len() < 16 {
        return Err(ApiError::BadRequest(
            "`secret` must be at least 16 bytes (it keys the HMAC-SHA256 signature)".into(),
        ));
    }
    let max_attempts = b.max_attempts.unwrap_or(app.webhooks.config.max_attempts);
    if !(1..=100).contains(&max_attempts) {
        return Err(ApiError::BadRequest(
            "`max_attempts` must be between 1 and 100".into(),
        ));
    }
    let reader = app.engine.reader().clone();
    if let Some(name) = &b.name {
        if reader.member_set(name).is_none() {
            return Err(ApiError::NotFound(format!("no tag or segment `{name}`")));
        }
    }
    // Last, since it may ask DNS: where the URL points must be a public address, or allowed.
    let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    });
    app.webhooks
        .config
        .targets
        .check_host(uri.host().unwrap_or_default(), port)
        .await
        .map_err(|m| ApiError::BadRequest(format!("`url`: {m}")))?;
    // A subscription of a group that keeps the group log starts at a group cursor.
    let from_group_log = group.is_some() && group::group_log_kept(&app).is_some();
    if group.is_some() && b.after.is_some() {
        let instead = if from_group_log {
            "; it starts at a group cursor instead (`cursor`: `0` for everything the group's change log holds)"
        } else {
            ""
        };
        return Err(ApiError::BadRequest(format!(
            "`after` is a `seq` of one node's change log, and this subscription is the group's{instead} (or make one node's alone with `{}: node`)",
            crate::cluster::SCOPE
        )));
    }
    if b.cursor.is_some() && !from_group_log {
        return Err(ApiError::BadRequest(
            "`cursor` is a position in a group's change log, and this subscription is not delivered from one: start it with `after` (a `seq`)".into(),
        ));
    }
    let group_start = if from_group_log {
        let reader = reader.clone();
        let asked = b.cursor.clone();
        let start = tokio::task::spawn_blocking(move || match asked.as_deref() {
            None => Ok(reader.group_log_end()?),
            Some("0") => Ok(reader.group_log_start()?),
            Some(text) => {
                processor::decode_group_cursor(text, reader.partitions()).map_err(ApiError::BadRequest)
            }
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
        Some(start)
    } else {
        None
    };
    let last = reader.last_seq();
    let after = b.after.unwrap_or(last);
    if after > last {
        return Err(ApiError::BadRequest(format!(
            "`after` is {after}, beyond the last change ({last})"
        )));
    }
    reader.check_changes_cursor(after)?;
    let hooks = app.webhooks.clone();
    let state = app.clone();
    let role = principal.as_ref().map(|p| p.role.name.clone());
    let sub = tokio::task::spawn_blocking(move || {
        let reader = state.engine.reader();
        let _one_at_a_time = hooks.create.lock().unwrap_or_else(|e| e.into_inner());
        let id = match &group {
            // Drawn at random, so that nodes need not agree on a counter: above the
            // counter's range, below 2^53 (exact in every JSON reader).
            Some(_) => {
                let mut bytes = [0u8; 8];
                getrandom::fill(&mut bytes).expect("the operating system's random source");
                (u64::from_be_bytes(bytes) >> 11).max(1 << 32)
            }
            None => reader.cursor(NEXT_ID)? + 1,
        };
        let sub = Subscription {
            id,
            url: b.url,
            name: b.name,
            secret: b.secret,
            max_attempts,
            created_at: now_ms(),
            role,
            node_only,
            group_start,
            sender: None,
        };
        if let Some(control) = &group {
            share(control, &sub, false)?;
        }
        hooks.add(&state, sub.clone(), after)?;
        if group.is_none() {
            reader.set_cursor(NEXT_ID, id)?;
        }
        Ok::<_, ApiError>(sub)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok((StatusCode::CREATED, Json(sub.public())))
}

/// `GET /v1/webhooks`: every subscription with its delivery position.
pub async fn list(State(app): State<AppState>) -> Result<Json<Json_>, ApiError> {
    let reader = app.engine.reader();
    let mut out = Vec::new();
    for sub in stored(reader)? {
        let mut shown = sub.public();
        match group::delivered_by_group(&app, &sub) {
            Some(members) => {
                shown["delivered_cursor"] = group::group_position(&app.webhooks, &sub)
                    .map(|c| processor::encode_group_cursor(&c))
                    .into();
                shown["delivered_by"] = group::deliverer(&members, sub.id).into();
            }
            None => shown["delivered_through"] = reader.cursor(&cursor_name(sub.id))?.into(),
        }
        out.push(shown);
    }
    Ok(Json(json!({ "webhooks": out, "last_seq": reader.last_seq() })))
}

/// `DELETE /v1/webhooks/{id}`: stop delivering and forget the subscription and its dead
/// letters (in a group, on every node).
pub async fn delete(State(app): State<AppState>, Path(id): Path<String>) -> Result<Json<Json_>, ApiError> {
    let id = parse_id(&id)?;
    let sub = find(app.engine.reader(), id)?;
    tokio::task::spawn_blocking(move || forget(&app, &sub))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(Json(json!({ "deleted": id })))
}

/// Deletes `sub` here, and in a group on every node (told first: when the group cannot
/// be told, nothing is deleted). Blocking.
fn forget(app: &AppState, sub: &Subscription) -> Result<(), ApiError> {
    if let Some(control) = app.control.as_ref().filter(|_| !sub.node_only) {
        share(control, sub, true)?;
    }
    remove(app, sub.id)
}

fn remove(app: &AppState, id: u64) -> Result<(), ApiError> {
    app.webhooks.stop(app, id);
    let store = app.engine.reader().store();
    store
        .delete_prefix_now(CF_WEBHOOKS, &sub_key(id))
        .and_then(|_| store.delete_prefix_now(CF_WEBHOOKS, &dlq_prefix(id)))
        .map_err(processor::EngineError::from)?;
    group::delete_cursor(app.engine.reader(), id)
}

/// Deletes the subscriptions to the definition `name` (a segment just deleted: its
/// webhooks stop, and do not come back if a segment of that name is made again), in a
/// group on every node. Returns their ids.
pub async fn delete_for_definition(app: &AppState, name: &str) -> Result<Vec<u64>, ApiError> {
    let (app, name) = (app.clone(), name.to_owned());
    tokio::task::spawn_blocking(move || {
        let mut deleted = Vec::new();
        for sub in stored(app.engine.reader())? {
            if sub.name.as_deref() == Some(name.as_str()) {
                forget(&app, &sub)?;
                deleted.push(sub.id);
            }
        }
        Ok(deleted)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
}

/// `GET /v1/webhooks/{id}/dead_letters`: batches that kept failing, oldest first; in a
/// group, every node's (each letter names its `node`).
pub async fn dead_letters(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
) -> Result<Json<Json_>, ApiError> {
    let id = parse_id(&id)?;
    let reader = app.engine.reader();
    find(reader, id)?;
    let prefix = dlq_prefix(id);
    let mut out = Vec::new();
    for item in reader.store().scan_from(CF_WEBHOOKS, &prefix) {
        let (key, value) = item.map_err(processor::EngineError::from)?;
        if !key.starts_with(&prefix) {
            break;
        }
        out.push(serde_json::from_slice::<Json_>(&value).map_err(|e| ApiError::Internal(e.to_string()))?);
    }
    let path = format!("/v1/webhooks/{id}/dead_letters");
    let Some(group) = group_parts(&app, &headers, axum::http::Method::GET, &path).await else {
        return Ok(Json(json!({ "dead_letters": out })));
    };
    let mut letters: Vec<Json_> = out.into_iter().map(|l| with_node(l, &group.me)).collect();
    for (url, answer) in group.answers {
        let theirs = answer["dead_letters"].as_array().cloned().unwrap_or_default();
        letters.extend(theirs.into_iter().map(|l| with_node(l, &url)));
    }
    Ok(Json(
        json!({ "dead_letters": letters, "unanswered": group.unanswered }),
    ))
}

/// `DELETE /v1/webhooks/{id}/dead_letters` (in a group, on every node).
pub async fn purge_dead_letters(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
) -> Result<Json<Json_>, ApiError> {
    let id = parse_id(&id)?;
    let reader = app.engine.reader();
    find(reader, id)?;
    let mut purged = reader
        .store()
        .delete_prefix_now(CF_WEBHOOKS, &dlq_prefix(id))
        .map_err(processor::EngineError::from)? as u64;
    let path = format!("/v1/webhooks/{id}/dead_letters");
    let Some(group) = group_parts(&app, &headers, axum::http::Method::DELETE, &path).await else {
        return Ok(Json(json!({ "purged": purged })));
    };
    purged += group
        .answers
        .iter()
        .filter_map(|(_, a)| a["purged"].as_u64())
        .sum::<u64>();
    Ok(Json(json!({ "purged": purged, "unanswered": group.unanswered })))
}

/// The other nodes' answers to a question about a subscription's dead letters, which each
/// node keeps of its own.
struct GroupParts {
    me: String,
    /// Each node that answered, with its answer.
    answers: Vec<(String, Json_)>,
    /// Each node that did not, and why: the answer is every node's but theirs.
    unanswered: Vec<Json_>,
}

/// In a group, and unless this request was sent on by another node, asks every other node
/// the same; `None` otherwise (answer for this node alone). A node that does not know the
/// subscription (yet) has nothing of it.
async fn group_parts(
    app: &AppState,
    headers: &axum::http::HeaderMap,
    method: axum::http::Method,
    path: &str,
) -> Option<GroupParts> {
    let me = crate::cluster::my_url(app)?;
    if headers.contains_key(crate::cluster::FORWARDED) {
        return None;
    }
    let other = crate::cluster::other_nodes_json(app, headers, method, path, true).await;
    Some(GroupParts {
        me,
        answers: other.answers,
        unanswered: other.unanswered,
    })
}

fn with_node(mut letter: Json_, node: &str) -> Json_ {
    letter["node"] = node.into();
    letter
}

/// The signature header's value for `body` sent at `at_ms`.
pub fn signature(secret: &[u8], at_ms: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(at_ms.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={at_ms},v1={hex}")
}

/// The next batch for `sub` after `cursor`: its changes (at most `batch`) and the `seq` the
/// cursor moves to once they are delivered (past changes of other names, too).
fn next_batch(
    reader: &ReadHandle,
    sub: &Subscription,
    cursor: u64,
    batch: usize,
) -> Result<(Vec<Change>, u64), ApiError> {
    let Some(name) = sub.name.as_deref() else {
        let picked = reader.changes(cursor, batch)?;
        let through = picked.last().map_or(cursor, |c| c.seq);
        return Ok((picked, through));
    };
    // Read before the index: every change up to it is in the store (a commit writes the
    // store before it publishes its last seq), so a batch short of `batch` means the
    // subscription has everything of its name up to there.
    let last = reader.last_seq();
    let picked = reader.changes_of(name, cursor, batch)?;
    let through = match picked.last() {
        Some(c) if picked.len() == batch => c.seq,
        Some(c) => c.seq.max(last),
        None => cursor.max(last),
    };
    Ok((picked, through))
}

/// How a subscription's deliveries are masked: as its creator's role sees data; a role
/// since removed from the settings gets the default field policies (`[access.fields]`).
fn masking_for(app: &AppState, sub: &Subscription) -> crate::access::Masking {
    match &sub.role {
        Some(role) => app
            .access
            .role(role)
            .map_or_else(|| app.access.anonymous().masking().clone(), |r| r.masking.clone()),
        None => app.access.anonymous().masking().clone(),
    }
}

type WebhookClient = Client<hyper_rustls::HttpsConnector<HttpConnector<CheckedResolver>>, Full<Bytes>>;

/// The delivery client: every connection resolves through the target policy; `https://`
/// receivers are verified against [`WebhookConfig::tls`].
fn client(config: &WebhookConfig) -> WebhookClient {
    let mut http = HttpConnector::new_with_resolver(CheckedResolver(config.targets.clone()));
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*config.tls).clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// One subscription's delivery loop; runs until aborted.
async fn deliver(
    app: AppState,
    config: WebhookConfig,
    sub: Subscription,
    mut draining: tokio::sync::watch::Receiver<bool>,
) {
    let client = client(&config);
    let reader = app.engine.reader().clone();
    let mut committed = app.engine.committed();
    let label = sub.id.to_string();
    let mut cursor = match reader.cursor(&cursor_name(sub.id)) {
        Ok(c) => c,
        Err(e) => {
            return tracing::error!(webhook = sub.id, error = %e, "webhook cursor unreadable; not delivering")
        }
    };
    loop {
        committed.borrow_and_update();
        let step = reader.clone();
        let s = sub.clone();
        let read = tokio::task::spawn_blocking(move || next_batch(&step, &s, cursor, config.batch)).await;
        let (changes, through) = match read {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                tracing::error!(webhook = sub.id, error = %e, "reading the change log failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(_) => return,
        };
        metrics::gauge!("tagstream_webhook_lag_changes", "subscription" => label.clone())
            .set(reader.last_seq().saturating_sub(through) as f64);
        if through == cursor {
            if *draining.borrow() {
                // Shutting down and everything committed is delivered.
                return;
            }
            // Nothing new: wait for the next commit (or look again in a while).
            tokio::select! {
                _ = tokio::time::timeout(Duration::from_secs(5), committed.changed()) => {}
                _ = draining.changed() => {}
            }
            continue;
        }
        if let (Some(first), Some(last)) = (changes.first(), changes.last()) {
            let masking = masking_for(&app, &sub);
            let batch = Batch {
                changes: &changes,
                delivery: sub.delivery_id(first.seq),
                letter_key: first.seq,
                numbers: json!({ "first_seq": first.seq, "last_seq": last.seq }),
            };
            send_with_retries(&client, &reader, &config, &sub, &batch, &masking).await;
        }
        cursor = through;
        if let Err(e) = reader.set_cursor(&cursor_name(sub.id), cursor) {
            tracing::error!(webhook = sub.id, error = %e, "saving the webhook cursor failed");
        }
        reader.hold(&cursor_name(sub.id), Log::Changes, cursor + 1);
    }
}

/// One attempt at delivering `body` (a batch of changes), counted and logged. The delivery
/// id (`x-tagstream-delivery`) is the same on every attempt and redelivery, so a receiver
/// can drop what it already has.
async fn attempt_delivery(
    client: &WebhookClient,
    config: &WebhookConfig,
    sub: &Subscription,
    body: &Bytes,
    delivery: &str,
    attempt: u32,
) -> Result<(), String> {
    let started = Instant::now();
    let at = now_ms();
    if let Some(ip) = sub
        .url
        .parse::<Uri>()
        .ok()
        .and_then(|u| {
            u.host()
                .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
        })
        .and_then(|h| h.parse::<std::net::IpAddr>().ok())
    {
        // Addresses written as such never reach the resolver: checked here, every attempt.
        if let Err(refused) = config.targets.check(ip) {
            tracing::warn!(webhook = sub.id, error = %refused, "webhook target refused");
            metrics::counter!("tagstream_webhook_deliveries_total", "result" => "failed_attempt")
                .increment(1);
            return Err(refused);
        }
    }
    let request = Request::post(&sub.url)
        .header("content-type", "application/json")
        .header(
            "x-tagstream-signature",
            signature(sub.secret.as_bytes(), at, body),
        )
        .header("x-tagstream-delivery", delivery)
        .header("x-tagstream-attempt", attempt.to_string())
        .body(Full::new(body.clone()));
    let outcome = match request {
        Ok(request) => match tokio::time::timeout(config.timeout, client.request(request)).await {
            Ok(Ok(response)) if response.status().is_success() => Ok(()),
            Ok(Ok(response)) => Err(format!("the receiver answered {}", response.status())),
            Ok(Err(e)) => Err(format!("request failed: {}", chain(&e))),
            Err(_) => Err(format!("no answer within {:?}", config.timeout)),
        },
        Err(e) => Err(format!("bad request: {e}")),
    };
    metrics::histogram!("tagstream_webhook_delivery_seconds").record(started.elapsed().as_secs_f64());
    match &outcome {
        Ok(()) => {
            metrics::counter!("tagstream_webhook_deliveries_total", "result" => "delivered").increment(1)
        }
        Err(e) => {
            metrics::counter!("tagstream_webhook_deliveries_total", "result" => "failed_attempt")
                .increment(1);
            tracing::warn!(webhook = sub.id, attempt, delivery, error = %e, "webhook delivery failed");
        }
    }
    outcome
}

/// An error with its causes (`client error (Connect): invalid peer certificate: ...`).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `POST /v1/webhooks/{id}/dead_letters/redeliver`: sends the dead-lettered batches again,
/// oldest first, one attempt each; each one accepted leaves the dead letters. Stops at the
/// first that fails again (later ones keep their order behind it). In a group every node
/// sends its own: the counts are summed and `nodes` has each node's.
pub async fn redeliver(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
) -> Result<Json<Json_>, ApiError> {
    let id = parse_id(&id)?;
    let mine = redeliver_here(&app, id).await?;
    let path = format!("/v1/webhooks/{id}/dead_letters/redeliver");
    let Some(group) = group_parts(&app, &headers, axum::http::Method::POST, &path).await else {
        return Ok(Json(mine));
    };
    let mut nodes = vec![with_node(mine, &group.me)];
    nodes.extend(group.answers.into_iter().map(|(url, a)| with_node(a, &url)));
    let sum = |field: &str| nodes.iter().filter_map(|n| n[field].as_u64()).sum::<u64>();
    let error = nodes.iter().find_map(|n| n["error"].as_str().map(str::to_owned));
    Ok(Json(json!({
        "redelivered": sum("redelivered"),
        "remaining": sum("remaining"),
        "error": error,
        "nodes": nodes,
        "unanswered": group.unanswered,
    })))
}

/// This node's dead letters of subscription `id` sent again.
async fn redeliver_here(app: &AppState, id: u64) -> Result<Json_, ApiError> {
    let reader = app.engine.reader().clone();
    let sub = sending(app, find(&reader, id)?);
    let prefix = dlq_prefix(id);
    let mut letters = Vec::new();
    for item in reader.store().scan_from(CF_WEBHOOKS, &prefix) {
        let (key, value) = item.map_err(processor::EngineError::from)?;
        if !key.starts_with(&prefix) {
            break;
        }
        let letter: Json_ = serde_json::from_slice(&value).map_err(|e| ApiError::Internal(e.to_string()))?;
        letters.push((key, letter));
    }
    let config = app.webhooks.config.clone();
    let client = client(&config);
    let total = letters.len();
    let mut redelivered = 0;
    let mut error = None;
    for (key, letter) in letters {
        let delivery = match letter["delivery"].as_str() {
            Some(id) => id.to_owned(),
            None => sub.delivery_id(letter["first_seq"].as_u64().unwrap_or_default()),
        };
        let attempt = letter["attempts"].as_u64().unwrap_or_default() as u32 + 1;
        let body = Bytes::from(
            serde_json::to_vec(
                &json!({ "subscription": sub.id, "name": sub.name, "changes": letter["changes"] }),
            )
            .expect("changes serialise"),
        );
        match attempt_delivery(&client, &config, &sub, &body, &delivery, attempt).await {
            Ok(()) => {
                // The key is the whole prefix: one dead letter.
                reader
                    .store()
                    .delete_prefix_now(CF_WEBHOOKS, &key)
                    .map_err(processor::EngineError::from)?;
                redelivered += 1;
            }
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    Ok(json!({
        "redelivered": redelivered,
        "remaining": total - redelivered,
        "error": error,
    }))
}

/// A batch of changes to deliver, and how it is named.
struct Batch<'a> {
    changes: &'a [Change],
    /// `x-tagstream-delivery`.
    delivery: String,
    /// Where its dead letter goes among the subscription's (they are listed in its order).
    letter_key: u64,
    /// The fields its dead letter names its first and last change by.
    numbers: Json_,
}

/// Sends one batch until it is accepted (2xx) or `max_attempts` fail; then dead-letters it.
async fn send_with_retries(
    client: &WebhookClient,
    reader: &ReadHandle,
    config: &WebhookConfig,
    sub: &Subscription,
    batch: &Batch<'_>,
    masking: &crate::access::Masking,
) {
    let changes = batch.changes;
    let body = Bytes::from(
        serde_json::to_vec(&json!({
            "subscription": sub.id,
            "name": sub.name,
            "changes": crate::routes::masked_changes(changes, masking),
        }))
        .expect("changes serialise"),
    );
    let mut delay = config.backoff_base;
    let mut last_error = String::new();
    for attempt in 1..=sub.max_attempts {
        match attempt_delivery(client, config, sub, &body, &batch.delivery, attempt).await {
            Ok(()) => return,
            Err(e) => last_error = e,
        }
        if attempt < sub.max_attempts {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(config.backoff_max);
        }
    }
    metrics::counter!("tagstream_webhook_deliveries_total", "result" => "dead_lettered").increment(1);
    let mut letter = json!({
        "subscription": sub.id,
        "delivery": batch.delivery,
        "attempts": sub.max_attempts,
        "last_error": last_error,
        "failed_at": now_ms(),
        // As delivered: masked for the subscription's role, so a redelivery (or a reader of
        // the dead letters) sees no more than the receiver would have.
        "changes": crate::routes::masked_changes(changes, masking),
    });
    if let (Some(letter), Some(numbers)) = (letter.as_object_mut(), batch.numbers.as_object()) {
        letter.extend(numbers.clone());
    }
    let key = [dlq_prefix(sub.id), batch.letter_key.to_be_bytes().to_vec()].concat();
    let value = serde_json::to_vec(&letter).expect("a dead letter serialises");
    if let Err(e) = reader.store().put_now(CF_WEBHOOKS, &key, &value) {
        tracing::error!(webhook = sub.id, error = %e, "storing a webhook dead letter failed");
    }
    let max_age_ms = config.dead_letters_max_age.as_millis() as i64;
    match trim_dead_letters(
        reader.store(),
        sub.id,
        config.dead_letters_max,
        now_ms() - max_age_ms,
    ) {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            webhook = sub.id,
            deleted = n,
            "oldest webhook dead letters past retention deleted"
        ),
        Err(e) => {
            tracing::error!(webhook = sub.id, error = %e, "deleting webhook dead letters past retention failed")
        }
    }
}

/// Keeps subscription `id`'s dead letters within retention: at most `max` (the newest),
/// none that failed at or before `too_old_ms`. Returns how many it deleted.
fn trim_dead_letters(
    store: &processor::store::Store,
    id: u64,
    max: usize,
    too_old_ms: i64,
) -> Result<usize, processor::store::StoreError> {
    let prefix = dlq_prefix(id);
    let mut letters = Vec::new();
    for item in store.scan_from(CF_WEBHOOKS, &prefix) {
        let (key, value) = item?;
        if !key.starts_with(&prefix) {
            break;
        }
        let failed_at = serde_json::from_slice::<Json_>(&value)
            .ok()
            .and_then(|v| v["failed_at"].as_i64())
            .unwrap_or(i64::MAX);
        letters.push((key, failed_at));
    }
    // Oldest first (keys go by first seq): drop the excess, then the old ones in front.
    let excess = letters.len().saturating_sub(max);
    let old = letters[excess..]
        .iter()
        .take_while(|(_, at)| *at <= too_old_ms)
        .count();
    let doomed = &letters[..excess + old];
    if doomed.is_empty() {
        return Ok(0);
    }
    store.delete_now(CF_WEBHOOKS, doomed.iter().map(|(key, _)| key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_of_time_dot_body() {
        let hex = |mac: Hmac<Sha256>| -> String {
            mac.finalize()
                .into_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        // The HMAC itself: RFC 4231, test case 2.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // What is signed: the time, a dot, the body.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"12.{\"changes\":[]}");
        assert_eq!(
            signature(b"Jefe", 12, b"{\"changes\":[]}"),
            format!("t=12,v1={}", hex(mac))
        );
        assert_ne!(signature(b"Jefe", 1, b"x"), signature(b"Jefe", 2, b"x"));
    }

    /// A subscription's dead letters keep within retention: the newest `max`, none failed
    /// before the age limit; other subscriptions' are untouched.
    #[test]
    fn dead_letters_past_retention_go_oldest_first() {
        let dir = ::tests::TempDir::new("webhook-dlq");
        let store = processor::store::Store::open(
            dir.path(),
            false,
            processor::store::Retention {
                dedup_horizon_ms: 1,
                history_ms: 1,
                block_cache_bytes: 1 << 20,
                memtable_bytes: 8 << 20,
            },
        )
        .unwrap();
        for (id, first, failed_at) in [
            (1u64, 10u64, 100i64),
            (1, 20, 200),
            (1, 30, 300),
            (1, 40, 400),
            (2, 5, 50),
        ] {
            let key = [dlq_prefix(id), first.to_be_bytes().to_vec()].concat();
            let value = json!({ "first_seq": first, "failed_at": failed_at }).to_string();
            store.put_now(CF_WEBHOOKS, &key, value.as_bytes()).unwrap();
        }
        let firsts = |id| -> Vec<u64> {
            let prefix = dlq_prefix(id);
            store
                .scan_from(CF_WEBHOOKS, &prefix)
                .map(|kv| kv.unwrap())
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(_, v)| {
                    serde_json::from_slice::<Json_>(&v).unwrap()["first_seq"]
                        .as_u64()
                        .unwrap()
                })
                .collect()
        };
        assert_eq!(
            trim_dead_letters(&store, 1, 10, 0).unwrap(),
            0,
            "within retention"
        );
        assert_eq!(trim_dead_letters(&store, 1, 3, 0).unwrap(), 1, "one too many");
        assert_eq!(firsts(1), [20, 30, 40]);
        assert_eq!(
            trim_dead_letters(&store, 1, 3, 300).unwrap(),
            2,
            "failed at or before 300"
        );
        assert_eq!(firsts(1), [40]);
        assert_eq!(firsts(2), [5], "another subscription's stay");
    }

    #[test]
    fn only_absolute_http_and_https_urls_are_taken() {
        assert!(check_url("http://127.0.0.1:9000/hook").is_ok());
        assert!(check_url("https://example.com/hook").is_ok());
        assert!(check_url("ftp://example.com/hook").is_err());
        assert!(check_url("/hook").is_err());
        assert!(check_url("not a url").is_err());
    }

    #[test]
    fn a_malformed_shared_subscription_is_refused_without_quoting_it() {
        let body = json!({ "subscription": { "id": "never-shown-secret-1234", "secret": 7 } });
        let ApiError::BadRequest(message) = parse_shared(&body).err().unwrap() else {
            panic!("a bad request");
        };
        assert!(!message.contains("never-shown"), "{message}");
        assert!(message.contains("does not parse"), "{message}");
    }
}
