//! Error answers: a status code and a JSON body `{"error": "<code>", "message": "…"}`,
//! logged once; and the one-line form of an error chain for the log.

use super::BoxError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use plane_db::types::BackendName;
use serde::{Deserialize, Serialize};
use std::error::Error as StdError;

/// Parses a backend id from the path.
pub fn backend_id(id: String) -> Result<BackendName, ApiError> {
    BackendName::try_from(id)
        .map_err(|e| ApiError::bad_request("invalid_backend_id", e.to_string()))
}

pub fn unknown_backend(id: &BackendName) -> ApiError {
    ApiError::not_found("unknown_backend", format!("no backend {id}"))
}

/// An error answer: a status code and a JSON body. It is logged once, when turned into the
/// response (client errors at debug level, failures at error level with their causes).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// The failure behind a 500, for the log only.
    source: Option<BoxError>,
}

/// The body of an error answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable, machine-readable code (`unknown_backend`, `no_drone`, …).
    pub error: String,
    /// What went wrong, for people.
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            source: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn internal(source: impl Into<BoxError>) -> Self {
        Self {
            source: Some(source.into()),
            ..Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; see the controller's log",
            )
        }
    }
}

impl From<plane_db::Error> for ApiError {
    fn from(error: plane_db::Error) -> Self {
        match error {
            plane_db::Error::NotFound { what, id } => {
                ApiError::not_found("not_found", format!("{what} {id} not found"))
            }
            plane_db::Error::InvalidArgument { .. } => {
                ApiError::bad_request("invalid_argument", error.to_string())
            }
            other => ApiError::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self.source {
            Some(source) => tracing::error!(
                status = self.status.as_u16(),
                error = %error_chain(source.as_ref()),
                "request failed"
            ),
            None if self.status.is_server_error() => tracing::warn!(
                status = self.status.as_u16(),
                code = self.code,
                detail = %self.message,
                "request refused"
            ),
            None => tracing::debug!(
                status = self.status.as_u16(),
                code = self.code,
                detail = %self.message,
                "bad request"
            ),
        }
        let body = ErrorBody {
            error: self.code.to_string(),
            message: self.message,
        };
        (self.status, Json(body)).into_response()
    }
}

/// An error and its causes on one line, skipping a cause whose text the line already has
/// (plane-db's errors name their cause in their own message).
pub fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
