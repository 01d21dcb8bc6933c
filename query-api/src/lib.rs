//! # The tagstream HTTP API
//!
//! The contract endpoints (`shared/spec/semantics.md` section 5) over the engine, plus
//! dead letters, metrics and health.
//!
//! The key types: the engine runs as a service in `processor` ([`EngineHandle`], one
//! bounded queue, group-committed ingest); [`router`] builds the axum router whose thin handlers
//! (`routes`) extract, call the engine once, and answer; [`ApiError`] is the one place that
//! maps errors to statuses (every error is JSON).
//!
//! ```no_run
//! # async fn run() {
//! use processor::{Engine, EngineConfig, EngineHandle, ServiceConfig};
//! use query_api::{router, ApiConfig, AppState};
//!
//! let engine = Engine::open("./data".as_ref(), Some("tag vip = profile.level == \"gold\""), EngineConfig::default()).unwrap();
//! let (handle, _thread) = EngineHandle::spawn(engine, ServiceConfig::default());
//! let app = router(AppState::new(handle, ApiConfig::default()));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await.unwrap();
//! axum::serve(listener, app).await.unwrap();
//! # }
//! ```

pub mod access;
pub mod cluster;
mod console;
mod error;
pub mod export;
mod group_members;
pub mod metrics;
mod routes;
pub mod sql;
pub mod streams;
pub mod targets;
pub mod webhooks;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::routing::{delete, get, post, put};
use axum::Router;

pub use error::ApiError;
pub use processor::EngineHandle;

/// Limits of the HTTP layer.
#[derive(Debug, Clone, Copy)]
pub struct ApiConfig {
    /// Largest request body accepted (413 beyond it).
    pub max_request_bytes: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            max_request_bytes: 16 * 1024 * 1024,
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub engine: EngineHandle,
    pub prometheus: metrics_exporter_prometheus::PrometheusHandle,
    pub config: ApiConfig,
    /// Set when events come from Kafka: `/readyz` is false until partitions are assigned.
    pub kafka: Option<std::sync::Arc<processor::kafka::KafkaStatus>>,
    pub webhooks: std::sync::Arc<webhooks::Webhooks>,
    /// Set when the server begins to shut down: long-lived responses (SSE streams) end, so
    /// a graceful shutdown does not wait for their clients to give up.
    pub shutdown: Shutdown,
    /// Keys, roles, the audit trail and per-key limits.
    pub access: std::sync::Arc<access::Access>,
    /// Set in a consumer group of several: who owns what, and how to reach them.
    pub cluster: Option<std::sync::Arc<cluster::Cluster>>,
    /// Set in a group whose rule set is shared: rule-set changes go through the control
    /// topic to every node.
    pub control: Option<std::sync::Arc<processor::kafka::control::Control>>,
}

/// The server's shutdown signal, shared by every clone of the state.
#[derive(Clone)]
pub struct Shutdown(std::sync::Arc<tokio::sync::watch::Sender<bool>>);

impl Shutdown {
    fn new() -> Shutdown {
        Shutdown(std::sync::Arc::new(tokio::sync::watch::channel(false).0))
    }

    /// Begins the shutdown: every stream ends at its next step.
    pub fn begin(&self) {
        self.0.send_replace(true);
    }

    /// Resolves once the shutdown has begun (at once if it has).
    pub async fn begun(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|stopping| *stopping).await;
    }
}

impl AppState {
    /// The state with the default access settings (open on loopback until a key exists).
    pub fn new(engine: EngineHandle, config: ApiConfig) -> AppState {
        let store = engine.reader().store().clone();
        let access = access::Access::open(store, access::AccessConfig::default())
            .expect("the default access settings are valid and the store is readable");
        AppState::with_access(engine, config, std::sync::Arc::new(access))
    }

    pub fn with_access(
        engine: EngineHandle,
        config: ApiConfig,
        access: std::sync::Arc<access::Access>,
    ) -> AppState {
        AppState {
            access,
            engine,
            prometheus: metrics::prometheus(),
            config,
            kafka: None,
            webhooks: std::sync::Arc::new(webhooks::Webhooks::new(webhooks::WebhookConfig::default())),
            shutdown: Shutdown::new(),
            cluster: None,
            control: None,
        }
    }
}

/// A request body read up to the configured limit; beyond it, 413 with a JSON error.
pub struct LimitedBody(pub Bytes);

impl FromRequest<AppState> for LimitedBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let limit = state.config.max_request_bytes;
        let body: Body = req.into_body();
        match axum::body::to_bytes(body, limit).await {
            Ok(bytes) => Ok(LimitedBody(bytes)),
            Err(e) => {
                let too_large = std::error::Error::source(&e)
                    .is_some_and(|s| s.to_string().contains("length limit exceeded"))
                    || e.to_string().contains("length limit exceeded");
                if too_large {
                    Err(ApiError::TooLarge(limit))
                } else {
                    Err(ApiError::BadRequest(format!(
                        "could not read the request body: {e}"
                    )))
                }
            }
        }
    }
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/events", post(routes::ingest))
        .route("/v1/clock", post(routes::set_clock))
        .route("/v1/rules", get(routes::get_rules).put(routes::put_rules))
        .route("/v1/rules/preview", post(routes::preview_rules))
        .route("/v1/rules/versions", get(routes::rule_versions))
        .route("/v1/rules/versions/{version}", get(routes::rule_version))
        .route("/v1/rules/rollback", post(routes::rollback_rules))
        .route("/v1/definitions", get(routes::definitions))
        .route("/v1/segments", get(routes::list_segments))
        .route("/v1/segments/query", post(routes::segment_query))
        .route(
            "/v1/segments/{name}",
            get(routes::get_segment)
                .put(routes::put_segment)
                .delete(routes::delete_segment),
        )
        .route("/v1/webhooks", post(webhooks::create).get(webhooks::list))
        .route("/v1/webhooks/{id}", delete(webhooks::delete))
        .route(
            "/v1/webhooks/{id}/dead_letters",
            get(webhooks::dead_letters).delete(webhooks::purge_dead_letters),
        )
        .route(
            "/v1/webhooks/{id}/dead_letters/redeliver",
            post(webhooks::redeliver),
        )
        .route(
            "/v1/dlq",
            get(routes::dead_letters).delete(routes::purge_dead_letters),
        )
        .route("/v1/admin/backup", post(routes::backup))
        .route(
            "/v1/admin/keys",
            post(access::routes::create_key).get(access::routes::list_keys),
        )
        .route("/v1/admin/keys/{id}", delete(access::routes::revoke_key))
        .route("/v1/audit", get(access::routes::audit))
        .route("/v1/quality", get(routes::quality))
        .route("/v1/schema/observed", get(routes::schema_observed))
        .route("/openapi.json", get(routes::openapi))
        .route("/v1/cluster", get(cluster::cluster))
        // Merged across a group of several in the handler.
        .route("/v1/segments/{name}/members", get(routes::segment_members))
        .route("/v1/sql", post(sql::sql))
        .route(
            "/v1/customers/by/{id_type}/{value}",
            get(routes::customer_by_identifier),
        )
        .route("/v1/identities/stats", get(routes::identity_stats))
        .route(
            "/v1/identities/customers/{customer}",
            get(routes::customer_identifiers),
        )
        .route("/metrics", get(routes::metrics))
        .route("/healthz", get(routes::healthz))
        .route("/", get(console::index))
        .route("/console/", get(console::index))
        .route("/console/assets/{file}", get(console::file))
        .route("/readyz", get(routes::readyz))
        .merge(
            // Not yet merged across a group of several: this node's part only when asked.
            Router::new()
                .route("/v1/segments/{name}/delta", get(streams::delta))
                .route("/v1/segments/{name}/stream", get(streams::stream))
                .route("/v1/changes", get(routes::changes))
                .route_layer(axum::middleware::from_fn_with_state(
                    state.clone(),
                    cluster::whole_or_scoped,
                )),
        )
        .merge(
            // About one customer: in a group of several, answered by the customer's owner.
            Router::new()
                .route("/v1/customers/{id}", get(routes::get_customer))
                .route("/v1/customers/{id}/merge", post(routes::merge_customers))
                .route("/v1/customers/{id}/handover", post(routes::hand_over))
                .route("/v1/customers/{id}/unmerge", post(routes::unmerge_customers))
                .route("/v1/customers/{id}/events", get(routes::customer_events))
                .route("/v1/customers/{id}/explain/{name}", get(routes::explain))
                .route(
                    "/v1/customers/{id}/tags/{tag}",
                    put(routes::put_manual_tag).delete(routes::delete_manual_tag),
                )
                .route_layer(axum::middleware::from_fn_with_state(
                    state.clone(),
                    cluster::to_owner,
                )),
        )
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.access.clone(),
            access::authorize,
        ))
        .layer(axum::middleware::from_fn(metrics::track_http))
        .with_state(state)
}
