//! Why the service refused or failed: each refusal carries what the client is told, and its
//! kind decides the HTTP status and the OperationOutcome's issue code (`http::error`).

/// The service's error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A parameter or a value the request gave is wrong (400 `invalid`).
    #[error("{0}")]
    Invalid(String),
    /// Something the IG allows that this server does not offer (400 `not-supported`).
    #[error("{0}")]
    NotSupported(String),
    /// The request asks for more than the server's limits allow (400 `too-costly`).
    #[error("{0}")]
    TooCostly(String),
    /// The caller may not do this (403 `forbidden`).
    #[error("{0}")]
    Forbidden(String),
    /// No such job, file or Group for this caller (404 `not-found`).
    #[error("{0}")]
    NotFound(String),
    /// What the request names exists but cannot be used (422 `invalid`).
    #[error("{0}")]
    Unprocessable(String),
    /// Every job slot, or this client's, is taken (429 `throttled`, Retry-After).
    #[error("{}", busy_message(*.everyone))]
    Busy { everyone: bool },
    /// The database failed (a transient fault becomes a 503).
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<crate::fhir::ParamError> for Error {
    fn from(e: crate::fhir::ParamError) -> Error {
        use crate::fhir::ParamError;
        match e {
            ParamError::Invalid(message) => Error::Invalid(message),
            ParamError::NotSupported(message) => Error::NotSupported(message),
        }
    }
}

fn busy_message(everyone: bool) -> &'static str {
    if everyone {
        "too many exports are queued or running (export.max_active_jobs); try again later"
    } else {
        "this client has too many exports queued or running \
         (export.max_active_jobs_per_client); try again later"
    }
}
