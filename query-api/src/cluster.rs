//! Answering for the cluster (issue #21, `docs/design/cluster.md` §4): in a consumer group
//! of several, a request about one customer that reaches a node not owning the customer's
//! partition is sent on to the node that does — one hop over its own API, the caller's
//! headers (and so its key) forwarded — and its answer returned as it is. The members topic
//! ([`processor::kafka::members`]) says who owns what; `GET /v1/cluster` shows it.
//!
//! A forwarded request carries [`FORWARDED`] and is never sent on again: a node that gets
//! one for a partition it no longer owns (the partition moved meanwhile) answers 409 or 503
//! itself, as without routing.

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

use crate::{ApiError, AppState};

/// Marks a request one node sent on to another (its value: the sender's address).
pub const FORWARDED: &str = "x-tagstream-forwarded";

/// Names, on an answer, the node that gave it when it is not the one asked.
pub const ANSWERED_BY: &str = "x-tagstream-answered-by";

/// How long a hop may take before the caller gets 504.
const HOP_TIMEOUT: Duration = Duration::from_secs(30);

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
    async fn forward(
        &self,
        url: &str,
        parts: axum::http::request::Parts,
        body: Bytes,
    ) -> Result<Response, ApiError> {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri: axum::http::Uri = format!("{}{path}", url.trim_end_matches('/'))
            .parse()
            .map_err(|e| ApiError::Internal(format!("the owner's address {url:?} is not a URL: {e}")))?;
        let mut request = axum::http::Request::builder().method(parts.method).uri(uri);
        for (name, value) in &parts.headers {
            // Hop-by-hop headers stay here; the connection to the owner is ours.
            if !is_hop_by_hop(name) {
                request = request.header(name, value);
            }
        }
        let me = HeaderValue::from_str(self.members.url()).unwrap_or(HeaderValue::from_static("1"));
        let request = request
            .header(FORWARDED, me)
            .body(Full::new(body))
            .map_err(|e| ApiError::Internal(e.to_string()))?;
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
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "transfer-encoding",
            "te",
            "trailer",
            "upgrade",
        ] {
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

fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "te" | "trailer" | "upgrade" | "host"
            // The owner frames the body it is sent again.
            | "content-length"
    )
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
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

/// `GET /v1/cluster`: the nodes of this node's group as their cards say, and each
/// partition's owner.
pub async fn cluster(State(app): State<AppState>) -> Result<Response, ApiError> {
    let Some(cluster) = app.cluster.as_ref() else {
        return Err(ApiError::NotFound(
            "this node is not a member of a group of several ([kafka] state_topic is not set)".into(),
        ));
    };
    let partitions = app.engine.reader().partitions();
    let owners: Vec<_> = (0..partitions)
        .map(|p| {
            let (owner, restoring) = match cluster.members.owner_of(p) {
                Owner::Here => (Some(cluster.members.url().to_owned()), false),
                Owner::Restoring => (Some(cluster.members.url().to_owned()), true),
                Owner::Node(url) => (Some(url), false),
                Owner::NodeRestoring(url) => (Some(url), true),
                Owner::Unknown => (None, false),
            };
            json!({ "partition": p, "owner": owner, "restoring": restoring })
        })
        .collect();
    let unowned: Vec<u32> = (0..partitions)
        .filter(|&p| cluster.members.owner_of(p) == Owner::Unknown)
        .collect();
    Ok((
        StatusCode::OK,
        Json(json!({
            "node": cluster.members.url(),
            "nodes": cluster.members.cards(),
            "partitions": owners,
            "unowned_partitions": unowned,
        })),
    )
        .into_response())
}
