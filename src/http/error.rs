//! The one error type of the HTTP API. Every error leaves as a FHIR OperationOutcome with a
//! fitting status; internal errors are logged once and never shown to the client.

use axum::{
    extract::rejection::{BytesRejection, PathRejection},
    http::{HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

use crate::fhir::{
    outcome::{self, Issue, Severity},
    validate::Invalid,
};

use super::fhir_response;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    Outcome {
        status: StatusCode,
        /// R4 IssueType code.
        code: &'static str,
        message: String,
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    /// A resource that is not valid R4: a 400 with an issue per problem.
    #[error("{invalid}")]
    Invalid {
        /// Where the resource is in the request (`Bundle.entry[3]`), if not the body itself.
        within: Option<String>,
        invalid: Invalid,
    },
    #[error("internal error: {0:#}")]
    Internal(#[from] anyhow::Error),
}

impl From<Invalid> for ApiError {
    fn from(invalid: Invalid) -> ApiError {
        ApiError::Invalid {
            within: None,
            invalid,
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::Outcome {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid", message)
    }

    pub fn not_supported(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "not-supported", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not-found", message)
    }

    pub fn gone(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::GONE, "deleted", message)
    }

    pub fn with_header(mut self, name: HeaderName, value: &str) -> ApiError {
        if let ApiError::Outcome { headers, .. } = &mut self
            && let Ok(value) = HeaderValue::from_str(value)
        {
            headers.push((name, value));
        }
        self
    }

    pub fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Outcome { status, .. } => *status,
            ApiError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Logs an internal error (once, here, with its details under a new correlation id) and
    /// returns the client-facing status and issues: for an internal error, a generic message
    /// naming only that id.
    pub fn report(&self) -> (StatusCode, Vec<Issue>) {
        let issue = match self {
            ApiError::Outcome { code, message, .. } => {
                Issue::new(Severity::Error, code, message.clone())
            }
            ApiError::Invalid { within, invalid } => {
                let issues = invalid.0.iter().map(|problem| {
                    let diagnostics = match within {
                        Some(within) => {
                            format!("{within}: {}: {}", problem.location, problem.message)
                        }
                        None => format!("{}: {}", problem.location, problem.message),
                    };
                    Issue::new(Severity::Error, "structure", diagnostics).at(&problem.location)
                });
                return (self.status_code(), issues.collect());
            }
            ApiError::Internal(e) => {
                let correlation_id = uuid::Uuid::new_v4();
                tracing::error!(%correlation_id, error = %format!("{e:#}"), "internal error");
                Issue::new(
                    Severity::Fatal,
                    "exception",
                    format!(
                        "internal server error; correlation id {correlation_id} (the server log \
                         has details)"
                    ),
                )
            }
        };
        (self.status_code(), vec![issue])
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> ApiError {
        // A restart, a failover, a full pool: the client may simply try again.
        if crate::db::is_transient(&e) {
            tracing::warn!(error = %e, "database unavailable");
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "transient",
                "the database is briefly unavailable; try again",
            )
            .with_header(header::RETRY_AFTER, "5");
        }
        // Two requests creating the same new resource at once both try version 1.
        if e.as_database_error().and_then(|d| d.constraint()) == Some("resources_pkey") {
            return ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                "another request wrote this resource at the same moment; retry",
            );
        }
        ApiError::Internal(e.into())
    }
}

impl From<crate::store::WriteError> for ApiError {
    fn from(e: crate::store::WriteError) -> ApiError {
        match e {
            crate::store::WriteError::VersionMismatch { expected, current } => ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "conflict",
                match current {
                    Some(v) => {
                        format!("If-Match names version {expected}, but the current version is {v}")
                    }
                    None => format!(
                        "If-Match names version {expected}, but the resource does not exist"
                    ),
                },
            ),
            crate::store::WriteError::Database(e) => e.into(),
        }
    }
}

/// A client turned away for want of a job slot comes back after this long.
const BUSY_RETRY_AFTER_SECS: &str = "30";

impl From<crate::export::Error> for ApiError {
    fn from(e: crate::export::Error) -> ApiError {
        use crate::export::Error;
        let message = e.to_string();
        match e {
            Error::Invalid(_) => ApiError::bad_request(message),
            Error::NotSupported(_) => ApiError::not_supported(message),
            Error::TooCostly(_) => ApiError::new(StatusCode::BAD_REQUEST, "too-costly", message),
            Error::Forbidden(_) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", message),
            Error::NotFound(_) => ApiError::not_found(message),
            Error::Unprocessable(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
            }
            Error::Busy { .. } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "throttled", message)
                    .with_header(header::RETRY_AFTER, BUSY_RETRY_AFTER_SECS)
            }
            Error::Database(e) => e.into(),
            Error::Internal(e) => ApiError::Internal(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, issues) = self.report();
        let body = outcome::operation_outcome(&issues);
        let mut response = fhir_response(status, body.to_string());
        if let ApiError::Outcome { headers, .. } = self {
            response.headers_mut().extend(headers);
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .entry(header::WWW_AUTHENTICATE)
                .or_insert(HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Axum's own rejections keep their status but speak OperationOutcome.
macro_rules! from_rejection {
    ($($rejection:ty),*) => {$(
        impl From<$rejection> for ApiError {
            fn from(r: $rejection) -> ApiError {
                let status = r.status();
                let code = match status {
                    StatusCode::PAYLOAD_TOO_LARGE => "too-costly",
                    _ => "invalid",
                };
                ApiError::new(status, code, r.body_text())
            }
        }
    )*};
}
from_rejection!(BytesRejection, PathRejection);
