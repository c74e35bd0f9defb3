//! Authorization over HTTP: the bearer-token layer of protected routes, scope checks, and in
//! smart mode the SMART discovery document and the token endpoint.

use std::collections::HashMap;

use axum::{
    Json, Router,
    body::Bytes,
    extract::DefaultBodyLimit,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::json;

use super::{ApiError, ApiResult, AppState};
use crate::auth::{
    Principal,
    scopes::Access,
    smart::{ASSERTION_ALGORITHMS, TokenError},
};

/// A token request is a small form.
pub(super) const TOKEN_BODY_LIMIT: usize = 64 * 1024;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/.well-known/smart-configuration", get(smart_configuration))
        .route("/auth/token", post(token))
        .layer(DefaultBodyLimit::max(TOKEN_BODY_LIMIT))
}

/// Puts the caller (`Principal`) into the request, or answers 401.
pub async fn require_token(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    match state.auth.authenticate(bearer).await {
        Ok(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(why) => {
            // RFC 6750: no token → a bare challenge; a bad one → invalid_token.
            let challenge = if bearer.is_some() {
                "Bearer error=\"invalid_token\""
            } else {
                "Bearer"
            };
            ApiError::new(StatusCode::UNAUTHORIZED, "login", why)
                .with_header(header::WWW_AUTHENTICATE, challenge)
                .into_response()
        }
    }
}

/// 403 unless the caller's scopes allow `access` to `resource_type`.
pub fn require(principal: &Principal, access: Access, resource_type: &str) -> ApiResult<()> {
    match principal.denied(access, resource_type) {
        None => Ok(()),
        Some(why) => Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", why)),
    }
}

async fn smart_configuration(State(state): State<AppState>) -> ApiResult<Response> {
    let Some(smart) = state.auth.smart() else {
        return Err(ApiError::not_found(
            "this server issues no tokens (auth.mode is not smart)",
        ));
    };
    Ok(Json(json!({
        "issuer": &*state.base_url,
        "token_endpoint": smart.token_url(),
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ASSERTION_ALGORITHMS,
        "grant_types_supported": ["client_credentials"],
        "scopes_supported": [
            "system/*.read", "system/*.rs", "system/*.write", "system/*.cud", "system/*.*",
            "system/*.cruds"
        ],
        "capabilities": ["client-confidential-asymmetric"],
    }))
    .into_response())
}

/// `POST /auth/token`: answers in OAuth's JSON, not OperationOutcomes (RFC 6749 section 5).
async fn token(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(smart) = state.auth.smart() else {
        return oauth_error(
            StatusCode::NOT_FOUND,
            "invalid_request",
            "this server issues no tokens (auth.mode is not smart)",
        );
    };
    let form_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form_type {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the body must be application/x-www-form-urlencoded",
        );
    }
    let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    match smart.token(&state.pool, &form).await {
        Ok(granted) => no_store(Json(granted).into_response()),
        Err(error) => {
            let status = match &error {
                TokenError::InvalidClient(_) => StatusCode::UNAUTHORIZED,
                TokenError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_REQUEST,
            };
            let code = error.code();
            let description = match error {
                TokenError::InvalidRequest(d)
                | TokenError::UnsupportedGrantType(d)
                | TokenError::InvalidClient(d)
                | TokenError::InvalidScope(d) => d,
                TokenError::Internal(e) => {
                    tracing::error!(error = %format!("{e:#}"), "token request failed");
                    "the token request could not be processed".into()
                }
            };
            oauth_error(status, code, &description)
        }
    }
}

fn oauth_error(status: StatusCode, code: &str, description: &str) -> Response {
    let body = Json(json!({"error": code, "error_description": description}));
    no_store((status, body).into_response())
}

/// Token responses must not be cached (RFC 6749 section 5.1).
fn no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}
