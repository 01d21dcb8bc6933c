//! Answering for the cluster (issue #21, `docs/design/cluster.md` §4): in a consumer group
//! of several, a request about one customer that reaches a node not owning the customer's
//! partition is sent on to the node that does — one hop over its own API, the caller's
//! headers (and so its key) forwarded — and its answer returned as it is. The members topic
//! ([`processor::kafka::members`]) says who owns what; `GET /v1/cluster` shows it.
//!
//! A forwarded request carries [`FORWARDED`] and is never sent on again: a node that gets
//! one for a partition it no longer owns (the partition moved meanwhile) answers 409 or 503
//! itself, as without routing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{RawPathParams, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use processor::kafka::members::{Members, Owner};
use serde_json::json;

use crate::webhooks::chain as error_chain;
use crate::{ApiError, AppState};

/// Marks a request one node sent on to another (its value: the sender's address).
pub const FORWARDED: &str = "x-tagstream-forwarded";

/// Names, on an answer, the node that gave it when it is not the one asked.
pub const ANSWERED_BY: &str = "x-tagstream-answered-by";

/// How long a hop may take before the caller gets 504.
const HOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a question about the whole cluster waits for every partition to have a node
/// answering for it (a restore, a move) before it answers 503 naming those without.
pub const CLUSTER_WAIT: Duration = Duration::from_secs(5);

type PeerClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// This node's view of its group and the client it reaches the others with.
pub struct Cluster {
    members: Arc<Members>,
    client: PeerClient,
}

impl Cluster {
    /// Peers behind `https://` are verified against `tls` (the built-in roots and
    /// `[tls] peer_ca_file`).
    pub fn new(members: Arc<Members>, tls: Arc<rustls::ClientConfig>) -> Cluster {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Cluster {
            members,
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    pub fn members(&self) -> &Arc<Members> {
        &self.members
    }

    /// Sends `request` (its body already read) to the node at `url` and returns its answer,
    /// streamed; 502 when it cannot be reached, 504 when it does not answer in time.
    pub(crate) async fn forward(
        &self,
        url: &str,
        parts: axum::http::request::Parts,
        body: Bytes,
    ) -> Result<Response, ApiError> {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let request = peer_request(
            url,
            parts.method.clone(),
            path,
            &parts.headers,
            body,
            false,
            self.members.url(),
        )
        .map_err(|e| ApiError::Internal(format!("a request to the owner at {url:?}: {e}")))?;
        let answer = match tokio::time::timeout(HOP_TIMEOUT, self.client.request(request)).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                return Err(ApiError::BadGateway(format!(
                    "the node that owns this customer ({url}) could not be reached: {}",
                    error_chain(&e)
                )))
            }
            Err(_) => {
                return Err(ApiError::GatewayTimeout(format!(
                    "the node that owns this customer ({url}) did not answer within {} s",
                    HOP_TIMEOUT.as_secs()
                )))
            }
        };
        let (mut parts, body) = answer.into_parts();
        for name in HOP_BY_HOP {
            parts.headers.remove(name);
        }
        if let Ok(value) = HeaderValue::from_str(url) {
            parts.headers.insert(ANSWERED_BY, value);
        }
        Ok(Response::from_parts(
            parts,
            Body::new(body.map_err(axum::Error::new)),
        ))
    }
}

/// Headers of one connection, not passed on either way.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
];

/// Whether a caller's header stays here: the connection's own, and the host and length
/// the request to the other node gets anew.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str()) || name == "host" || name == "content-length"
}

/// Whether the caller asked, with [`SCOPE`], for this node's part only.
pub fn scoped(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(SCOPE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"node"))
}

/// The answer of a node to another's question of the group: its part (`local`, run off the
/// async workers) with the partitions it covers.
pub async fn answer_part<T: serde::Serialize + Send + 'static>(
    local: impl FnOnce() -> Result<Part<T>, ApiError> + Send + 'static,
) -> Result<Json<serde_json::Value>, ApiError> {
    let part = tokio::task::spawn_blocking(local)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(Json(part.to_json()))
}

/// The middleware of the routes about one customer (`{id}` in the path): sent on to the
/// customer's owner when that is another node; answered here otherwise (the handler's own
/// check says 409 or 503 when this node cannot answer).
pub async fn to_owner(
    State(app): State<AppState>,
    params: RawPathParams,
    request: Request,
    next: Next,
) -> Response {
    let Some(cluster) = app.cluster.as_ref() else {
        return next.run(request).await;
    };
    if request.headers().contains_key(FORWARDED) {
        return next.run(request).await;
    }
    let Some((_, id)) = params.iter().find(|(name, _)| *name == "id") else {
        return next.run(request).await;
    };
    let partitions = app.engine.reader().partitions();
    let partition = processor::partition::partition_of(rules::normalize(id).as_bytes(), partitions);
    match cluster.members.owner_of(partition) {
        Owner::Here | Owner::Restoring => next.run(request).await,
        Owner::NodeRestoring(url) => ApiError::Unavailable(format!(
            "customer `{id}` is in partition {partition} of {partitions}, which {url} is restoring from the state topic: ask again shortly"
        ))
        .into_response(),
        Owner::Unknown => ApiError::Unavailable(format!(
            "customer `{id}` is in partition {partition} of {partitions}, which no live node owns now (it is moving between nodes, or its owner is gone and the group has not given it to another yet): ask again shortly"
        ))
        .into_response(),
        Owner::Node(url) => {
            let (parts, body) = request.into_parts();
            let body = match axum::body::to_bytes(body, app.config.max_request_bytes).await {
                Ok(body) => body,
                Err(_) => return ApiError::TooLarge(app.config.max_request_bytes).into_response(),
            };
            match cluster.forward(&url, parts, body).await {
                Ok(answer) => answer,
                Err(e) => e.into_response(),
            }
        }
    }
}

/// A path segment with every byte but the unreserved ones percent-encoded.
pub fn path_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `GET /v1/customers/{customer}` as its owner answers it: here, or sent on to the node that
/// owns the customer's partition (503 while it has none or is restoring it).
pub async fn customer_from_owner(
    app: &AppState,
    principal: &Option<axum::Extension<crate::access::Principal>>,
    headers: &axum::http::HeaderMap,
    customer: &str,
) -> Result<Response, ApiError> {
    let cluster = app.cluster.as_ref().expect("in a group");
    let partitions = app.engine.reader().partitions();
    let partition = processor::partition::partition_of(customer.as_bytes(), partitions);
    match cluster.members.owner_of(partition) {
        Owner::Here => {
            let reader = app.engine.reader();
            match reader.customer(customer)? {
                Some(view) => crate::routes::group_customer_response(app, principal, headers, view).await,
                None => Err(ApiError::NotFound(format!("no customer `{customer}`"))),
            }
        }
        Owner::Node(url) => {
            let path = format!("/v1/customers/{}", path_segment(customer));
            get_from(cluster, &url, &path, headers).await
        }
        Owner::Restoring | Owner::NodeRestoring(_) | Owner::Unknown => Err(ApiError::Unavailable(format!(
            "customer `{customer}` is in partition {partition} of {partitions}, which is moving between nodes or being restored: ask again shortly"
        ))),
    }
}

/// `GET path` of the node at `url`, with the caller's `headers`.
async fn get_from(
    cluster: &Cluster,
    url: &str,
    path: &str,
    headers: &axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let mut request = axum::http::Request::builder()
        .method(axum::http::Method::GET)
        .uri(path);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let (parts, _) = request
        .body(())
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .into_parts();
    cluster.forward(url, parts, Bytes::new()).await
}

/// The identifiers `customer` owns, as partition 0's owner answers them
/// (`GET /v1/identities/customers/{customer}`, with the caller's headers: masked for the
/// caller there) — `None` where this node answers from its own graph: outside a group, in
/// a group whose graph is not partition 0's, or on partition 0's owner. Also asked where
/// the request was sent here by another node (a customer's, to its owner): the question
/// is a request of its own, marked [`FORWARDED`], which partition 0's owner answers
/// itself — never sent on.
pub async fn identifiers_from_resolver(
    app: &AppState,
    headers: &axum::http::HeaderMap,
    customer: &str,
) -> Result<Option<std::collections::BTreeMap<String, Vec<String>>>, ApiError> {
    let Some(cluster) = app.cluster.as_ref() else {
        return Ok(None);
    };
    if !app.engine.reader().resolver() {
        return Ok(None);
    }
    let url = match cluster.members.owner_of(0) {
        Owner::Here => return Ok(None),
        Owner::Node(url) => url,
        Owner::Restoring | Owner::NodeRestoring(_) | Owner::Unknown => {
            return Err(ApiError::Unavailable(
                "the group's identity graph (partition 0) is moving between nodes or being restored: ask again shortly".into(),
            ))
        }
    };
    let path = format!("/v1/identities/customers/{}", path_segment(customer));
    let answer = get_from(cluster, &url, &path, headers).await?;
    let status = answer.status();
    let body = axum::body::to_bytes(answer.into_body(), 16 << 20)
        .await
        .map_err(|e| ApiError::BadGateway(format!("reading the identifiers from {url}: {e}")))?;
    if !status.is_success() {
        return Err(ApiError::BadGateway(format!(
            "{url} answered the identifiers of `{customer}` with {status}: {}",
            String::from_utf8_lossy(&body)
        )));
    }
    let answer: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadGateway(format!(
            "{url} answered the identifiers with what is not JSON: {e}"
        ))
    })?;
    serde_json::from_value(answer["identifiers"].clone())
        .map(Some)
        .map_err(|e| ApiError::BadGateway(format!("{url} answered identifiers of an unknown shape: {e}")))
}

/// `GET /v1/cluster`: the nodes of this node's group as their cards say, and each
/// partition's owner and the nodes that keep a standby copy of it.
pub async fn cluster(State(app): State<AppState>) -> Result<Response, ApiError> {
    let Some(cluster) = app.cluster.as_ref() else {
        return Err(ApiError::NotFound(
            "this node is not a member of a group of several ([kafka] state_topic is not set)".into(),
        ));
    };
    let partitions = app.engine.reader().partitions();
    let cards = cluster.members.cards();
    let owners: Vec<_> = (0..partitions)
        .map(|p| {
            // The nodes that keep a standby copy of it (`standby_replicas`).
            let standby: Vec<&str> = cards
                .iter()
                .filter(|card| card.standby.contains(&p))
                .map(|card| card.url.as_str())
                .collect();
            let (owner, restoring) = match cluster.members.owner_of(p) {
                Owner::Here => (Some(cluster.members.url().to_owned()), false),
                Owner::Restoring => (Some(cluster.members.url().to_owned()), true),
                Owner::Node(url) => (Some(url), false),
                Owner::NodeRestoring(url) => (Some(url), true),
                Owner::Unknown => (None, false),
            };
            json!({ "partition": p, "owner": owner, "restoring": restoring, "standby": standby })
        })
        .collect();
    let unowned: Vec<u32> = (0..partitions)
        .filter(|&p| cluster.members.owner_of(p) == Owner::Unknown)
        .collect();
    Ok((
        StatusCode::OK,
        Json(json!({
            "node": cluster.members.url(),
            "nodes": cards,
            "partitions": owners,
            "unowned_partitions": unowned,
            "settings_differ": cluster.members.settings_differ(),
        })),
    )
        .into_response())
}

/// A cursor of a query answered by the cluster: the last customer id of the page.
pub fn encode_cursor(last_id: &str) -> String {
    use base64::Engine as _;
    format!(
        "id:{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(last_id)
    )
}

/// The customer id a cluster cursor names.
pub fn decode_cursor(cursor: &str) -> Result<String, ApiError> {
    use base64::Engine as _;
    cursor
        .strip_prefix("id:")
        .and_then(|c| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(c).ok())
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "`cursor` {cursor:?} is not one this endpoint gave (in a group of several, a cursor names a customer id: \"id:...\")"
            ))
        })
}

/// One node's part of a question asked of the whole group: the partitions it answered for
/// and its answer for them.
#[derive(Debug, serde::Deserialize)]
pub struct Part<T> {
    pub partitions: Vec<u32>,
    #[serde(flatten)]
    pub answer: T,
}

impl<T: serde::Serialize> Part<T> {
    /// The part as a node answers it to the node that asked.
    pub fn to_json(&self) -> serde_json::Value {
        let mut answer = serde_json::to_value(&self.answer).expect("a part serialises");
        if let Some(object) = answer.as_object_mut() {
            object.insert("partitions".into(), serde_json::json!(self.partitions));
        }
        answer
    }
}

/// The partitions this node answers for in a question of the whole group: those it owns
/// and has restored.
pub fn answered_partitions(app: &AppState) -> Vec<u32> {
    owned(app.kafka.as_deref())
}

fn owned(status: Option<&processor::kafka::KafkaStatus>) -> Vec<u32> {
    status.map(|k| k.owned_partitions()).unwrap_or_default()
}

/// This node's part of a question of the whole group: `answer` over the partitions it owns
/// and has restored now. When those change while it answers (a partition released or
/// restored meanwhile), the part could count a partition another node counts too: it is
/// `Unavailable`, and [`fan_out`] asks again.
pub fn part_of<T>(
    status: Option<&processor::kafka::KafkaStatus>,
    answer: impl FnOnce(&[u32]) -> Result<T, ApiError>,
) -> Result<Part<T>, ApiError> {
    let partitions = owned(status);
    let answer = answer(&partitions)?;
    if owned(status) != partitions {
        return Err(ApiError::Unavailable(
            "the partitions this node owns changed while it answered; ask again".into(),
        ));
    }
    Ok(Part { partitions, answer })
}

/// Asks a question of the whole group: this node's part (`local`, run off the async
/// workers) and every other live node's (`method` `path` with `body`, the caller's headers
/// forwarded, marked [`FORWARDED`] so that node answers its part only). The parts are
/// returned once every partition is answered for exactly once; while some are not
/// (restoring, moving, their node unreachable or busy) it asks again every 200 ms up to
/// [`CLUSTER_WAIT`], then answers 503 naming them — never a partial answer.
pub async fn fan_out<T>(
    app: &AppState,
    headers: &axum::http::HeaderMap,
    method: axum::http::Method,
    path: &str,
    body: Option<&serde_json::Value>,
    local: impl Fn() -> Result<Part<T>, ApiError> + Clone + Send + 'static,
) -> Result<Vec<T>, ApiError>
where
    T: serde::de::DeserializeOwned + Send + 'static,
{
    let cluster = app.cluster.as_ref().expect("a fan-out happens in a group only");
    let partitions = app.engine.reader().partitions();
    let deadline = tokio::time::Instant::now() + CLUSTER_WAIT;
    loop {
        let mut parts: Vec<Part<T>> = Vec::new();
        let mut unreachable = Vec::new();
        let others: Vec<_> = cluster
            .members
            .cards()
            .into_iter()
            .filter(|card| card.url != cluster.members.url() && !card.owned.is_empty())
            .collect();
        let mut asked = tokio::task::JoinSet::new();
        for card in others {
            let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
            let request = peer_request(
                &card.url,
                method.clone(),
                path,
                headers,
                body,
                true,
                cluster.members.url(),
            );
            let client = cluster.client.clone();
            asked.spawn(async move { (card, ask(&client, request).await) });
        }
        let mine = tokio::task::spawn_blocking(local.clone())
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        match mine {
            Ok(part) => parts.push(part),
            // What this node owns moved while it answered: this round misses its part.
            Err(ApiError::Unavailable(why)) => unreachable.push(format!("this node: {why}")),
            Err(e) => return Err(e),
        }
        while let Some(done) = asked.join_next().await {
            let (card, result) = done.map_err(|e| ApiError::Internal(e.to_string()))?;
            match result {
                Ok((status, bytes)) if status.is_success() => {
                    let part: Part<T> = serde_json::from_slice(&bytes).map_err(|e| {
                        ApiError::BadGateway(format!(
                            "{} answered its part with what is not one: {e}",
                            card.url
                        ))
                    })?;
                    parts.push(part);
                }
                // The node cannot answer for its partitions now (restoring, busy): they
                // are unavailable for this round.
                Ok((status, _)) if status == StatusCode::SERVICE_UNAVAILABLE => {
                    unreachable.push(format!("{}: busy or restoring", card.url));
                }
                // The question itself is refused there (a key unknown to that node, an
                // expression its rules do not accept): the caller's to see.
                Ok((status, bytes)) => {
                    let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                        .ok()
                        .and_then(|v| v["error"].as_str().map(str::to_owned))
                        .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
                    return Err(ApiError::BadGateway(format!(
                        "{} refused its part ({status}): {message}",
                        card.url
                    )));
                }
                Err(e) => unreachable.push(format!("{}: {e}", card.url)),
            }
        }
        let mut answered = vec![0u32; partitions as usize];
        for part in &parts {
            for &p in &part.partitions {
                if let Some(n) = answered.get_mut(p as usize) {
                    *n += 1;
                }
            }
        }
        let missing: Vec<u32> = (0..partitions).filter(|&p| answered[p as usize] != 1).collect();
        if missing.is_empty() {
            return Ok(parts.into_iter().map(|p| p.answer).collect());
        }
        if tokio::time::Instant::now() >= deadline {
            let why = if unreachable.is_empty() {
                String::new()
            } else {
                format!(" ({})", unreachable.join("; "))
            };
            return Err(ApiError::PartitionsUnavailable {
                message: format!(
                    "no node answered for partitions {missing:?} of {partitions} within {} s (being restored, moving between nodes, or their node unreachable{why}): the answer would be partial, so there is none; ask again shortly",
                    CLUSTER_WAIT.as_secs()
                ),
                partitions: missing,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sends `request` (as [`peer_request`] made it) to a peer and reads its whole answer;
/// the reason when there is none.
async fn ask(
    client: &PeerClient,
    request: Result<axum::http::Request<Full<Bytes>>, String>,
) -> Result<(StatusCode, Bytes), String> {
    match tokio::time::timeout(HOP_TIMEOUT, client.request(request?)).await {
        Err(_) => Err(format!("did not answer within {} s", HOP_TIMEOUT.as_secs())),
        Ok(Err(e)) => Err(error_chain(&e)),
        Ok(Ok(answer)) => {
            let status = answer.status();
            match answer.into_body().collect().await {
                Err(e) => Err(error_chain(&e)),
                Ok(bytes) => Ok((status, bytes.to_bytes())),
            }
        }
    }
}

/// Asks every other live node of the group the same (`method` `path` with the caller's
/// `body` and headers, marked [`FORWARDED`] so that each answers for itself): for what each
/// node keeps or does of its own rather than per partition (a webhook's dead letters, its
/// partitions' clocks). Returns each node's URL with its answer, or why there is none.
pub async fn every_other_node(
    app: &AppState,
    headers: &axum::http::HeaderMap,
    method: axum::http::Method,
    path: &str,
    body: Bytes,
) -> Vec<(String, Result<(StatusCode, Bytes), String>)> {
    let Some(cluster) = app.cluster.as_ref() else {
        return Vec::new();
    };
    let mut asked = tokio::task::JoinSet::new();
    for card in cluster.members.cards() {
        if card.url == cluster.members.url() {
            continue;
        }
        let request = peer_request(
            &card.url,
            method.clone(),
            path,
            headers,
            body.clone(),
            false,
            cluster.members.url(),
        );
        let client = cluster.client.clone();
        asked.spawn(async move { (card.url, ask(&client, request).await) });
    }
    let mut answers = Vec::new();
    while let Some(done) = asked.join_next().await {
        if let Ok(answer) = done {
            answers.push(answer);
        }
    }
    answers.sort_by(|a, b| a.0.cmp(&b.0));
    answers
}

/// Every other live node's JSON answer to the same request ([`every_other_node`]).
pub struct OtherAnswers {
    /// Each node that answered, with its answer.
    pub answers: Vec<(String, serde_json::Value)>,
    /// Each node that did not (`{"node", "error"}`): an answer of every node's but theirs.
    pub unanswered: Vec<serde_json::Value>,
}

/// [`every_other_node`], each success read as JSON; with `not_found_is_nothing`, a node
/// answering 404 (it does not know the thing asked about yet) has nothing of it.
pub async fn other_nodes_json(
    app: &AppState,
    headers: &axum::http::HeaderMap,
    method: axum::http::Method,
    path: &str,
    not_found_is_nothing: bool,
) -> OtherAnswers {
    let mut other = OtherAnswers {
        answers: Vec::new(),
        unanswered: Vec::new(),
    };
    for (url, answer) in every_other_node(app, headers, method, path, Bytes::new()).await {
        let why = match answer {
            Ok((status, body)) if status.is_success() => match serde_json::from_slice(&body) {
                Ok(answer) => {
                    other.answers.push((url, answer));
                    continue;
                }
                Err(e) => format!("answered what is not JSON: {e}"),
            },
            Ok((StatusCode::NOT_FOUND, _)) if not_found_is_nothing => continue,
            Ok((status, body)) => format!("answered {status}: {}", String::from_utf8_lossy(&body)),
            Err(e) => e,
        };
        other.unanswered.push(json!({ "node": url, "error": why }));
    }
    other
}

/// The first half of a merge by hand across partitions: asks the node owning `absorbed`'s
/// partition to hand it over to `survivor` (`POST /v1/customers/{absorbed}/handover`, the
/// caller's headers and so its key), and returns its answer — or its error, as the caller
/// would have had it.
pub async fn hand_over_at_owner(
    app: &AppState,
    headers: &axum::http::HeaderMap,
    absorbed: &str,
    survivor: &str,
) -> Result<serde_json::Value, ApiError> {
    let cluster = app.cluster.as_ref().expect("in a group");
    let partitions = app.engine.reader().partitions();
    let partition = processor::partition::partition_of(rules::normalize(absorbed).as_bytes(), partitions);
    let url = match cluster.members.owner_of(partition) {
        Owner::Node(url) => url,
        Owner::Here | Owner::Restoring => {
            return Err(ApiError::Conflict(format!(
                "customer `{absorbed}` is in partition {partition} of {partitions}, which this node owns: merge it here"
            )))
        }
        Owner::NodeRestoring(url) => {
            return Err(ApiError::Unavailable(format!(
                "customer `{absorbed}` is in partition {partition} of {partitions}, which {url} is restoring from the state topic: ask again shortly"
            )))
        }
        Owner::Unknown => {
            return Err(ApiError::Unavailable(format!(
                "customer `{absorbed}` is in partition {partition} of {partitions}, which no live node owns now: ask again shortly"
            )))
        }
    };
    let body = Bytes::from(json!({ "survivor": survivor }).to_string());
    let path = format!("/v1/customers/{}/handover", path_segment(absorbed));
    let request = peer_request(
        &url,
        axum::http::Method::POST,
        &path,
        headers,
        body,
        true,
        cluster.members.url(),
    );
    let (status, body) = ask(&cluster.client, request).await.map_err(|e| {
        ApiError::BadGateway(format!(
            "the node that owns customer `{absorbed}` ({url}) could not hand it over: {e}"
        ))
    })?;
    if status.is_success() {
        return serde_json::from_slice(&body).map_err(|e| {
            ApiError::BadGateway(format!("{url} answered a handover with what is not JSON: {e}"))
        });
    }
    let message = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    let message = format!("{url}, handing `{absorbed}` over: {message}");
    Err(match status {
        StatusCode::NOT_FOUND => ApiError::NotFound(message),
        StatusCode::CONFLICT => ApiError::Conflict(message),
        StatusCode::BAD_REQUEST => ApiError::BadRequest(message),
        StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => ApiError::Forbidden(message),
        StatusCode::SERVICE_UNAVAILABLE => ApiError::Unavailable(message),
        _ => ApiError::BadGateway(message),
    })
}

/// This node's URL among the group's, outside a group `None`.
pub fn my_url(app: &AppState) -> Option<String> {
    app.cluster.as_ref().map(|c| c.members.url().to_owned())
}

/// An ad-hoc query's pages of every node merged: counts summed, the first `limit` ids in
/// order, and whether more follow.
pub fn merge_pages(pages: Vec<processor::PartitionsPage>, limit: usize) -> (usize, Vec<String>, bool) {
    let count = pages.iter().map(|p| p.count).sum();
    let more = pages.iter().any(|p| p.more);
    let mut customers: Vec<String> = pages.into_iter().flat_map(|p| p.customers).collect();
    customers.sort_unstable();
    let more = more || customers.len() > limit;
    customers.truncate(limit);
    (count, customers, more)
}

/// A request to the node at `url`: `method` `path` with `body`, the caller's headers (its
/// key) but those of its connection, marked as sent on by `me`; `json`: the body is JSON
/// this node wrote (its own content type).
fn peer_request(
    url: &str,
    method: axum::http::Method,
    path: &str,
    headers: &axum::http::HeaderMap,
    body: Bytes,
    json: bool,
    me: &str,
) -> Result<axum::http::Request<Full<Bytes>>, String> {
    let mut request = axum::http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", url.trim_end_matches('/')));
    for (name, value) in headers {
        let replaced = json && name == "content-type";
        if !(is_hop_by_hop(name) || replaced) {
            request = request.header(name, value);
        }
    }
    if json {
        request = request.header("content-type", "application/json");
    }
    request
        .header(
            FORWARDED,
            HeaderValue::from_str(me).unwrap_or(HeaderValue::from_static("1")),
        )
        .body(Full::new(body))
        .map_err(|e| e.to_string())
}

/// Asks a route not yet merged across nodes for this node's part knowingly.
pub const SCOPE: &str = "x-tagstream-scope";

/// Names, on an answer of this node's part, the partitions it covers.
pub const PARTITIONS: &str = "x-tagstream-partitions";

/// Names, on an answer of this node's part, the partitions it covers.
pub fn name_partitions(answer: &mut Response, partitions: &[u32]) {
    let list: Vec<String> = partitions.iter().map(u32::to_string).collect();
    if let Ok(value) = HeaderValue::from_str(&list.join(",")) {
        answer.headers_mut().insert(PARTITIONS, value);
    }
}

/// `GET /v1/changes?cursor=`, a segment's `delta?cursor=` or `stream?cursor=` (or a stream
/// resumed with a group cursor as `Last-Event-ID`): the group's change log, whole on every
/// node.
fn asks_group_log(request: &Request) -> bool {
    let path = request.uri().path();
    let reads_log = path == "/v1/changes"
        || (path.starts_with("/v1/segments/") && (path.ends_with("/delta") || path.ends_with("/stream")));
    let by_cursor = request
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|pair| pair.starts_with("cursor=")));
    let resumed = request
        .headers()
        .get("last-event-id")
        .and_then(|id| id.to_str().ok())
        .is_some_and(|id| id.trim().starts_with("p1."));
    reads_log && (by_cursor || resumed)
}

/// The middleware of the routes a group of several does not merge yet (a segment's delta
/// and stream, a node's own change log by `after`, lookups by identifier): on a node that answers for fewer than every partition, such an answer
/// would silently be part of the group's. So it is refused — 409 when other nodes own the
/// rest, 503 while this node, alone, is still restoring some — unless the caller asks for
/// this node's part with `x-tagstream-scope: node`; that answer names the partitions it
/// covers in `x-tagstream-partitions`.
pub async fn whole_or_scoped(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let Some(cluster) = app.cluster.as_ref() else {
        return next.run(request).await;
    };
    let partitions = app.engine.reader().partitions();
    let owned = answered_partitions(&app);
    if owned.len() == partitions as usize || asks_group_log(&request) {
        return next.run(request).await;
    }
    if scoped(request.headers()) {
        let mut answer = next.run(request).await;
        name_partitions(&mut answer, &owned);
        return answer;
    }
    let path = request.uri().path().to_owned();
    let others = cluster
        .members
        .cards()
        .iter()
        .any(|card| card.url != cluster.members.url() && !card.owned.is_empty());
    if others {
        let instead = if path == "/v1/changes" {
            "; the group's change log is paged with `cursor` (start with `cursor=0`)"
        } else if path.ends_with("/delta") || path.ends_with("/stream") {
            "; the group's is read with `cursor` (`cursor=0` for the start, or `now` for a stream)"
        } else {
            ""
        };
        ApiError::Conflict(format!(
            "{path} is not yet answered for the whole group of nodes: this node owns partitions {owned:?} of {partitions}, so its answer would be part of the group's. Ask each node with `{SCOPE}: node` for its part (docs/cluster.md){instead}"
        ))
        .into_response()
    } else {
        ApiError::PartitionsUnavailable {
            message: format!(
                "this node answers for partitions {owned:?} of {partitions} (the others are being restored or have no owner yet): ask again shortly, or with `{SCOPE}: node` for this node's part"
            ),
            partitions: (0..partitions).filter(|p| !owned.contains(p)).collect(),
        }
        .into_response()
    }
}

/// Where a reader of lists each node keeps of its own (the dead letters, the audit trail)
/// stands in the group: per node (its advertised URL), the last id it listed.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NodeCursor(pub BTreeMap<String, u64>);

impl NodeCursor {
    /// `0`: from the start; otherwise a cursor an answer gave (`n:...`).
    pub fn parse(text: &str) -> Result<NodeCursor, ApiError> {
        use base64::Engine as _;
        if text == "0" {
            return Ok(NodeCursor::default());
        }
        text.strip_prefix("n:")
            .and_then(|c| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(c).ok())
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "`cursor` {text:?} is not one this endpoint gave (`0` for the start, or the `cursor` of an answer: \"n:...\")"
                ))
            })
    }

    pub fn encode(&self) -> String {
        use base64::Engine as _;
        let json = serde_json::to_vec(&self.0).expect("a cursor serialises");
        format!(
            "n:{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
        )
    }

    /// Where `node` stands (0: nothing of it listed yet).
    pub fn of(&self, node: &str) -> u64 {
        self.0.get(node).copied().unwrap_or(0)
    }
}

/// How a list each node keeps of its own (the dead letters, the audit trail) is asked for.
pub enum NodeListAsk {
    /// This node's own, after this id (none: from the start): outside a group, with
    /// `after`, with `x-tagstream-scope: node`, or by a node asking for its part of the
    /// group's (its cursor's entry for this node).
    Own(Option<u64>),
    /// Every live node's, from `from` (this node is `me` in it).
    Group { me: String, from: NodeCursor },
}

impl NodeListAsk {
    /// The ask a request makes of `what` (named in errors) by its `cursor` and `after`.
    pub fn of(
        app: &AppState,
        headers: &axum::http::HeaderMap,
        cursor: Option<&str>,
        after: Option<u64>,
        what: &str,
    ) -> Result<NodeListAsk, ApiError> {
        if cursor.is_some() && after.is_some() {
            return Err(ApiError::BadRequest(format!(
                "`after` pages this node's own {what} and `cursor` the group's: give one"
            )));
        }
        let Some(me) = my_url(app) else {
            if cursor.is_some() {
                return Err(ApiError::BadRequest(format!(
                    "`cursor` pages a group's {what}, and this node is in none: page with `after`"
                )));
            }
            return Ok(NodeListAsk::Own(after));
        };
        let from = cursor.map(NodeCursor::parse).transpose()?.unwrap_or_default();
        if after.is_some() || scoped(headers) || headers.contains_key(FORWARDED) {
            return Ok(NodeListAsk::Own(after.or_else(|| from.0.get(&me).copied())));
        }
        Ok(NodeListAsk::Group { me, from })
    }
}

/// Every node's list (this node's first, then each other node's answer to the same request)
/// of something each node keeps of its own, merged: each item names its `node`; each node's
/// items stay in its own order (by `id`) and the lists are interleaved by `time` — oldest
/// first, or with `newest_first` newest first — up to `limit` items. The cursor names, per
/// node, the last id listed (oldest first) or its newest (newest first; a node that listed
/// nothing keeps where `from` had it). `unanswered`: the nodes that did not answer, and why.
pub struct NodeLists {
    pub items: Vec<serde_json::Value>,
    pub cursor: NodeCursor,
    pub unanswered: Vec<serde_json::Value>,
}

/// The shape of a list each node keeps of its own: the answer's field holding it, and each
/// item's id (rising in the node's order) and time (ms).
pub struct ListShape {
    pub field: &'static str,
    pub id: &'static str,
    pub time: &'static str,
}

/// Asks every other live node of the group `path` (which answers `{field: [...]}`, the
/// caller's `from` and `limit` applied by each node to its own) and merges their lists with
/// `local` ([`NodeLists`]).
pub async fn every_node_list(
    app: &AppState,
    headers: &axum::http::HeaderMap,
    path: &str,
    shape: &ListShape,
    local: Vec<serde_json::Value>,
    (from, limit): (&NodeCursor, usize),
    newest_first: bool,
) -> NodeLists {
    let me = my_url(app).unwrap_or_default();
    let mut lists = vec![(me, local)];
    let OtherAnswers {
        answers,
        mut unanswered,
    } = other_nodes_json(app, headers, axum::http::Method::GET, path, false).await;
    for (url, mut answer) in answers {
        match answer[shape.field].take() {
            serde_json::Value::Array(items) => lists.push((url, items)),
            _ => unanswered.push(
                serde_json::json!({ "node": url, "error": format!("answered without `{}`", shape.field) }),
            ),
        }
    }
    unanswered.extend(not_heard(from, &lists, &unanswered));
    let mut merged = merge_node_lists(lists, shape, from, limit, newest_first);
    merged.unanswered = unanswered;
    merged
}

/// The nodes `from` names that neither answered (`lists`) nor failed to (`unanswered`): no
/// longer live members, whose part is missing too (read on from the cursor once back).
fn not_heard(
    from: &NodeCursor,
    lists: &[(String, Vec<serde_json::Value>)],
    unanswered: &[serde_json::Value],
) -> Vec<serde_json::Value> {
    from.0
        .keys()
        .filter(|node| {
            !lists.iter().any(|(url, _)| url == *node)
                && !unanswered.iter().any(|u| u["node"] == node.as_str())
        })
        .map(|node| {
            serde_json::json!({
                "node": node,
                "error": "not a live member of the group now: read on from the cursor once it is back",
            })
        })
        .collect()
}

/// [`every_node_list`]'s merge of each node's list.
pub fn merge_node_lists(
    lists: Vec<(String, Vec<serde_json::Value>)>,
    shape: &ListShape,
    from: &NodeCursor,
    limit: usize,
    newest_first: bool,
) -> NodeLists {
    let mut cursor = from.clone();
    if newest_first {
        // Each node's newest, listed or not: a reader follows on from there.
        for (node, items) in &lists {
            if let Some(newest) = items.iter().filter_map(|i| i[shape.id].as_u64()).max() {
                let at = cursor.0.entry(node.clone()).or_default();
                *at = (*at).max(newest);
            }
        }
    }
    let mut heads: Vec<(String, std::collections::VecDeque<serde_json::Value>)> = lists
        .into_iter()
        .map(|(node, items)| (node, items.into()))
        .collect();
    let mut items = Vec::new();
    while items.len() < limit {
        // The node whose next item is the oldest (newest), ties to the first listed.
        let next = heads
            .iter()
            .enumerate()
            .filter_map(|(i, (_, list))| Some((i, list.front()?[shape.time].as_i64().unwrap_or(0))))
            .reduce(|best, this| {
                let better = if newest_first {
                    this.1 > best.1
                } else {
                    this.1 < best.1
                };
                if better {
                    this
                } else {
                    best
                }
            });
        let Some((i, _)) = next else {
            break;
        };
        let (node, list) = &mut heads[i];
        let mut item = list.pop_front().expect("a head");
        if !newest_first {
            if let Some(id) = item[shape.id].as_u64() {
                cursor.0.insert(node.clone(), id);
            }
        }
        item["node"] = node.as_str().into();
        items.push(item);
    }
    NodeLists {
        items,
        cursor,
        unanswered: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: ListShape = ListShape {
        field: "items",
        id: "id",
        time: "at",
    };

    fn items(list: &[(u64, i64)]) -> Vec<serde_json::Value> {
        list.iter()
            .map(|(id, at)| json!({ "id": id, "at": at }))
            .collect()
    }

    fn listed(merged: &NodeLists) -> Vec<(String, u64)> {
        merged
            .items
            .iter()
            .map(|i| (i["node"].as_str().unwrap().to_owned(), i["id"].as_u64().unwrap()))
            .collect()
    }

    #[test]
    fn node_lists_interleave_by_time_and_keep_each_nodes_order() {
        let from = NodeCursor::parse("0").unwrap();
        // b's clock went back between its 7 and 8: its 8 still follows its 7.
        let lists = vec![
            ("a".to_owned(), items(&[(3, 10), (4, 30), (5, 50)])),
            ("b".to_owned(), items(&[(7, 20), (8, 5), (9, 60)])),
        ];
        let merged = merge_node_lists(lists.clone(), &SHAPE, &from, 4, false);
        let expected: Vec<(String, u64)> = [("a", 3), ("b", 7), ("b", 8), ("a", 4)]
            .iter()
            .map(|(n, id)| (n.to_string(), *id))
            .collect();
        assert_eq!(listed(&merged), expected);
        assert_eq!(merged.cursor.of("a"), 4);
        assert_eq!(merged.cursor.of("b"), 8);
        // The cursor goes through its text and on from there.
        let again = NodeCursor::parse(&merged.cursor.encode()).unwrap();
        assert_eq!(again, merged.cursor);
        let rest = vec![
            ("a".to_owned(), items(&[(5, 50)])),
            ("b".to_owned(), items(&[(9, 60)])),
        ];
        let merged = merge_node_lists(rest, &SHAPE, &again, 4, false);
        assert_eq!(listed(&merged), [("a".to_owned(), 5), ("b".to_owned(), 9)]);
        // A node with nothing new keeps where it was.
        let merged = merge_node_lists(vec![("a".to_owned(), Vec::new())], &SHAPE, &again, 4, false);
        assert_eq!(merged.cursor.of("b"), 8);

        // Newest first: each node's newest is where a reader follows on from.
        let newest = vec![
            ("a".to_owned(), items(&[(5, 50), (4, 30)])),
            ("b".to_owned(), items(&[(9, 60), (8, 5)])),
        ];
        let merged = merge_node_lists(newest, &SHAPE, &from, 2, true);
        assert_eq!(listed(&merged), [("b".to_owned(), 9), ("a".to_owned(), 5)]);
        assert_eq!((merged.cursor.of("a"), merged.cursor.of("b")), (5, 9));
    }

    #[test]
    fn a_node_the_cursor_names_that_is_gone_is_named_as_unanswered() {
        let from = NodeCursor(
            [("a", 3), ("b", 7), ("c", 1)]
                .iter()
                .map(|(n, i)| (n.to_string(), *i))
                .collect(),
        );
        let lists = vec![("a".to_owned(), items(&[(4, 10)]))];
        let unanswered = vec![json!({ "node": "b", "error": "did not answer" })];
        let gone = not_heard(&from, &lists, &unanswered);
        assert_eq!(gone.len(), 1, "{gone:?}");
        assert_eq!(gone[0]["node"], "c");
    }

    #[test]
    fn a_node_cursor_that_is_not_one_is_refused() {
        for bad in ["", "1", "n:", "n:!!", "id:YQ"] {
            assert!(NodeCursor::parse(bad).is_err(), "{bad}");
        }
    }
}
