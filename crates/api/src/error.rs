//! The API's one error type.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An error as the client sees it: an RFC 9457 problem-details body with a
/// clear message. Internal details go to the log, never to the client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    /// No valid bearer token; the message says why.
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// The request does not fit the resource's state (acknowledging an
    /// alert already acknowledged).
    #[error("{0}")]
    Conflict(String),
    #[error("internal error")]
    Internal(String),
    #[error("the database is unavailable")]
    Unavailable(String),
}

#[derive(Serialize)]
struct Problem<'a> {
    r#type: &'a str,
    title: &'a str,
    status: u16,
    detail: String,
}

impl From<vitalwatch_store::StoreError> for ApiError {
    fn from(e: vitalwatch_store::StoreError) -> Self {
        if e.is_transient() {
            ApiError::Unavailable(e.to_string())
        } else {
            ApiError::Internal(e.to_string())
        }
    }
}

impl From<vitalwatch_store::PoolError> for ApiError {
    fn from(e: vitalwatch_store::PoolError) -> Self {
        vitalwatch_store::StoreError::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, title) = match &self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "Bad request"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "Unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "Forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "Not found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "Conflict"),
            ApiError::Internal(detail) => {
                tracing::error!(detail, "request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "Internal error")
            }
            ApiError::Unavailable(detail) => {
                tracing::warn!(detail, "request failed: database unavailable");
                (StatusCode::SERVICE_UNAVAILABLE, "Service unavailable")
            }
        };
        let body = Problem {
            r#type: "about:blank",
            title,
            status: status.as_u16(),
            detail: self.to_string(),
        };
        let mut resp = (status, Json(body)).into_response();
        resp.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}
