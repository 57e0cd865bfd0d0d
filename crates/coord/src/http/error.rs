//! Errors of the HTTP API: JSON `{"code", "message", "field"}` with a
//! stable `code` per kind of failure, mapped once from the `Control`
//! service's gRPC statuses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fleet_core::manifest::ManifestError;
use fleet_proto::ErrorCode;
use serde::Serialize;

/// Stable error codes (the `code` field); scripts may match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    /// A field of the request is wrong (`field` names it).
    InvalidArgument,
    /// The request body is larger than the API accepts.
    BodyTooLarge,
    /// No client certificate, or one that does not name a holder and role.
    Unauthenticated,
    /// The caller's role may not make this call.
    Forbidden,
    NotFound,
    /// Refused under the destination's `reject` queue policy.
    Rejected,
    /// The cluster's state does not allow it now (membership change ...).
    FailedPrecondition,
    /// No leader, or this coordinator cannot serve: retry, or use another.
    Unavailable,
    Timeout,
    Internal,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ApiError {
    #[serde(skip)]
    #[schema(ignore)]
    pub status: StatusCode,
    pub code: Code,
    pub message: String,
    /// The offending field of the request (dotted path), when one is at fault.
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: Code, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), field: None }
    }

    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, code: Code::InvalidArgument, message: message.into(), field: Some(field.into()) }
    }

    /// A manifest error, its field under `manifest.`.
    pub fn manifest(e: &ManifestError) -> Self {
        let field = if e.field == "." { "manifest".to_string() } else { format!("manifest.{}", e.field) };
        ApiError::field(field, e.to_string())
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, Code::NotFound, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, Code::Internal, message)
    }
}

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code as G;
        if fleet_net::wire::detail_of(&s) == Some(ErrorCode::Rejected) {
            return ApiError::new(StatusCode::CONFLICT, Code::Rejected, s.message());
        }
        let (status, code) = match s.code() {
            G::InvalidArgument | G::OutOfRange => (StatusCode::BAD_REQUEST, Code::InvalidArgument),
            G::NotFound => (StatusCode::NOT_FOUND, Code::NotFound),
            G::PermissionDenied => (StatusCode::FORBIDDEN, Code::Forbidden),
            G::Unauthenticated => (StatusCode::UNAUTHORIZED, Code::Unauthenticated),
            G::FailedPrecondition | G::AlreadyExists | G::Aborted => (StatusCode::CONFLICT, Code::FailedPrecondition),
            G::Unavailable | G::Cancelled => (StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable),
            G::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, Code::Timeout),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, Code::Internal),
        };
        ApiError::new(status, code, s.message())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(&self)).into_response()
    }
}

/// The error answers any API call may give, for the OpenAPI document.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // only described, never built
pub enum Errors {
    /// A field of the request is wrong; `field` names it.
    #[response(status = 400)]
    BadRequest(ApiError),
    /// No client certificate and no (valid) bearer token.
    #[response(status = 401)]
    Unauthenticated(ApiError),
    /// The caller's role may not make this call.
    #[response(status = 403)]
    Forbidden(ApiError),
    /// No such deployment, destination or route.
    #[response(status = 404)]
    NotFound(ApiError),
    /// Refused in the current state (`rejected`, `failed_precondition`).
    #[response(status = 409)]
    Conflict(ApiError),
    /// The request body is larger than the API accepts.
    #[response(status = 413)]
    TooLarge(ApiError),
    /// No leader right now, or this coordinator cannot serve: retry.
    #[response(status = 503)]
    Unavailable(ApiError),
    /// The cluster did not answer in time: retry.
    #[response(status = 504)]
    Timeout(ApiError),
}
