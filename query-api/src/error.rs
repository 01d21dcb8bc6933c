//! The one place that maps errors to HTTP statuses. Every error is JSON
//! `{"error": "...", ...}`; internals are logged, not shown, on 5xx.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use processor::{EngineError, ServiceError};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the rule set has {} error(s)", .0.len())]
    InvalidRules(Vec<rules::LocatedDiagnostic>),
    #[error("the engine is busy; retry shortly")]
    Busy,
    #[error("the request body is larger than the limit of {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Timeout(String),
    /// A cursor before what retention left of a log: `410 Gone` with the oldest entry.
    #[error("{message}")]
    Gone {
        message: String,
        log: &'static str,
        oldest: u64,
    },
    /// A group change-log cursor before what retention left of a partition: `410 Gone`
    /// with the cursor of the oldest changes held.
    #[error("{message}")]
    GoneCursor { message: String, oldest_cursor: String },
    /// A rule-set edit of a version that is no longer the current one.
    #[error("{message}")]
    Stale { message: String, current: u64 },
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    TooMany(String),
    /// Not answerable here for now (a partition being restored): retry shortly.
    #[error("{0}")]
    Unavailable(String),
    /// A question about the whole cluster while some partitions have no node answering for
    /// them (being restored, between owners, their owner unreachable): 503 naming them,
    /// never a partial answer.
    #[error("{message}")]
    PartitionsUnavailable { message: String, partitions: Vec<u32> },
    /// Another node of the cluster, whose answer this one needed, could not be reached.
    #[error("{0}")]
    BadGateway(String),
    /// Another node of the cluster did not answer in time.
    #[error("{0}")]
    GatewayTimeout(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<datafusion::error::DataFusionError> for ApiError {
    /// Planning and execution errors come from the statement (unknown column, syntax, a
    /// refused statement kind, a bad cast): the client's to fix.
    fn from(e: datafusion::error::DataFusionError) -> Self {
        match e {
            datafusion::error::DataFusionError::ResourcesExhausted(m) => ApiError::Timeout(m),
            other => ApiError::BadRequest(format!("SQL: {}", other.strip_backtrace())),
        }
    }
}

impl From<arrow_schema::ArrowError> for ApiError {
    fn from(e: arrow_schema::ArrowError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Clock(m) | EngineError::Conflict(m) => ApiError::Conflict(m),
            EngineError::NotFound(m) => ApiError::NotFound(m),
            EngineError::Rules(d) => ApiError::InvalidRules(d.iter().map(|d| d.located("")).collect()),
            stale @ EngineError::Stale { current, .. } => ApiError::Stale {
                message: stale.to_string(),
                current,
            },
            gone @ EngineError::Gone { log, oldest } => ApiError::Gone {
                message: gone.to_string(),
                log,
                oldest,
            },
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Busy => ApiError::Busy,
            ServiceError::Stopped => ApiError::Internal("the engine has stopped".into()),
            ServiceError::Engine(e) => e.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match &self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, json!({ "error": m })),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, json!({ "error": m })),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, json!({ "error": m })),
            ApiError::InvalidRules(diagnostics) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({ "error": self.to_string(), "diagnostics": diagnostics }),
            ),
            ApiError::Busy => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({ "error": self.to_string() }),
            ),
            ApiError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, json!({ "error": m })),
            ApiError::PartitionsUnavailable { message, partitions } => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({ "error": message, "unavailable_partitions": partitions }),
            ),
            ApiError::BadGateway(m) => (StatusCode::BAD_GATEWAY, json!({ "error": m })),
            ApiError::GatewayTimeout(m) => (StatusCode::GATEWAY_TIMEOUT, json!({ "error": m })),
            ApiError::TooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({ "error": self.to_string(), "limit_bytes": limit }),
            ),
            ApiError::MethodNotAllowed(m) => (StatusCode::METHOD_NOT_ALLOWED, json!({ "error": m })),
            ApiError::Timeout(m) => (StatusCode::REQUEST_TIMEOUT, json!({ "error": m })),
            ApiError::Gone { message, log, oldest } => {
                // The oldest entry left, under the name the log's cursor goes by.
                let field = if *log == "changes" {
                    "oldest_seq"
                } else {
                    "oldest_id"
                };
                (
                    StatusCode::GONE,
                    json!({ "error": message, "log": log, field: oldest }),
                )
            }
            ApiError::GoneCursor {
                message,
                oldest_cursor,
            } => (
                StatusCode::GONE,
                json!({ "error": message, "log": "changes", "oldest_cursor": oldest_cursor }),
            ),
            ApiError::Stale { message, current } => (
                StatusCode::CONFLICT,
                json!({ "error": message, "current_version": current }),
            ),
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, json!({ "error": m })),
            ApiError::TooMany(m) => (StatusCode::TOO_MANY_REQUESTS, json!({ "error": m })),
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({ "error": "internal error; see the server log" }),
                )
            }
        };
        (status, Json(body)).into_response()
    }
}
