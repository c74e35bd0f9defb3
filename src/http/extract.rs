//! Extractors whose rejections are OperationOutcomes.

use axum::{
    extract::{FromRequest, FromRequestParts, Request},
    http::{HeaderMap, StatusCode, header},
};
use bytes::Bytes;
use serde_json::{Map, Value};

use super::ApiError;

/// `axum::extract::Path` with OperationOutcome rejections.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

/// A FHIR JSON request body that is a JSON object (not yet checked to be a resource).
pub struct FhirJson(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for FhirJson {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let FhirJsonText(bytes) = FhirJsonText::from_request(req, state).await?;
        match serde_json::from_slice(&bytes) {
            Ok(Value::Object(map)) => Ok(FhirJson(map)),
            Ok(_) => Err(ApiError::bad_request("the body must be a JSON object")),
            Err(e) => Err(ApiError::bad_request(format!(
                "the body is not valid JSON: {e}"
            ))),
        }
    }
}

/// A FHIR JSON request body as it came, for handlers that read it without a tree of all of it.
pub struct FhirJsonText(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for FhirJsonText {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        require_json_content_type(req.headers())?;
        Ok(FhirJsonText(Bytes::from_request(req, state).await?))
    }
}

/// FHIR JSON bodies come as `application/fhir+json` (or plain `application/json`).
pub fn require_json_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if matches!(
        mime.as_str(),
        "application/fhir+json" | "application/json" | "application/json+fhir"
    ) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not-supported",
            format!(
                "Content-Type must be application/fhir+json, not '{}'",
                if content_type.is_empty() {
                    "(none)"
                } else {
                    content_type
                }
            ),
        ))
    }
}
