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
    /// The route does not take the request's method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The body is larger than the server accepts.
    #[error("{0}")]
    TooLarge(String),
    #[error("internal error")]
    Internal(String),
    #[error("the database is unavailable")]
    Unavailable(String),
}

/// RFC 9457 problem details: the body of every error answer.
#[derive(Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Problem {
    /// Always `about:blank`: the status says what kind of problem it is.
    pub r#type: String,
    /// The status's name (`Bad request`, `Not found`, ...).
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong, for a person to read.
    pub detail: String,
}

impl From<vitalwatch_store::StoreError> for ApiError {
    fn from(e: vitalwatch_store::StoreError) -> Self {
        // A value the database cannot take (class 22: out of range, bad
        // encoding) came from the request: the checks before the query
        // should have refused it, and this keeps it a 4xx if one did not.
        if let vitalwatch_store::StoreError::Db(db) = &e
            && db.code().is_some_and(|c| c.code().starts_with("22"))
        {
            tracing::warn!(error = %e, "a request value the database refused; answered 400");
            return ApiError::BadRequest("a value in the request is out of range".into());
        }
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
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "Method not allowed"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "Content too large"),
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
            r#type: "about:blank".into(),
            title: title.into(),
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

/// A request body, or the problem with it (too large: 413).
pub fn body(
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<axum::body::Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(format!("the body is too large: {}", e.body_text()))
        } else {
            ApiError::BadRequest(e.body_text())
        }
    })
}

/// A JSON request body of type `T`, or a clear problem with it.
pub fn json<T: serde::de::DeserializeOwned>(
    raw: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<T, ApiError> {
    let raw = body(raw)?;
    serde_json::from_slice(&raw)
        .map_err(|e| ApiError::BadRequest(format!("the body is not what this route takes: {e}")))
}

/// Gives a 4xx answer made outside the handlers (axum's own rejections: a
/// path that is not UTF-8, a missing body) the problem-details body every
/// other error has.
pub async fn as_problem(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().windows(4).any(|w| w == b"json"));
    if !status.is_client_error() || is_json {
        return resp;
    }
    let detail = match axum::body::to_bytes(resp.into_body(), 4096).await {
        Ok(b) if !b.is_empty() => String::from_utf8_lossy(&b).into_owned(),
        _ => status
            .canonical_reason()
            .unwrap_or("bad request")
            .to_owned(),
    };
    let body = Problem {
        r#type: "about:blank".into(),
        title: status.canonical_reason().unwrap_or("Client error").into(),
        status: status.as_u16(),
        detail,
    };
    let mut out = (status, Json(body)).into_response();
    out.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/problem+json"),
    );
    out
}
