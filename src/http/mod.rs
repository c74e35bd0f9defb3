//! The HTTP API. Each module exposes `router()`; this one merges them, adds the shared layers and
//! turns unknown routes, wrong methods and panics into OperationOutcomes.

mod admin;
pub mod auth;
mod bundle;
pub mod error;
mod export;
mod extract;
mod guard;
pub mod health;
mod jobs;
mod metadata;
pub mod metrics;
mod prefer;
mod rest;
pub mod serve;

use std::{any::Any, sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    extract::{DefaultBodyLimit, Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use sqlx::PgPool;
use tower_http::{catch_panic::CatchPanicLayer, compression::CompressionLayer, trace::TraceLayer};

use crate::{auth::Auth, config::Config, liveness::Liveness, storage::Storage};
pub use error::{ApiError, ApiResult};

pub const FHIR_JSON: &str = "application/fhir+json";

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub config: Arc<Config>,
    pub storage: Arc<dyn Storage>,
    /// Base of every absolute URL, without a trailing slash.
    pub base_url: Arc<str>,
    pub auth: Arc<Auth>,
    /// The export workers of this process.
    pub liveness: Arc<Liveness>,
    pub storage_health: Arc<health::StorageHealth>,
    pub gauges: crate::metrics::Gauges,
    /// The store's vacuum after large transactions.
    pub vacuum: Arc<crate::db::deferred_vacuum::DeferredVacuum>,
    /// Whether the database answers (watched every second).
    pub database: Arc<crate::db::availability::Availability>,
    /// Kick-off, status, cancel and files of exports.
    pub exports: crate::export::Exporter,
}

pub fn router(state: AppState) -> Router {
    let max_body = state.config.server.max_body_bytes;
    let timeout = Duration::from_secs(state.config.server.request_timeout_secs);
    let timed = middleware::from_fn_with_state(timeout, request_timeout);
    let needs_database = middleware::from_fn_with_state(state.clone(), database_available);
    // Everything but discovery, health and the token endpoint needs a caller.
    let protected = Router::new()
        .merge(bundle::router())
        .merge(export::router())
        .merge(jobs::router())
        .merge(rest::router())
        .merge(metrics::router())
        .merge(admin::router())
        .route_layer(timed.clone())
        .merge(jobs::downloads())
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .route_layer(needs_database.clone());
    Router::new()
        .merge(auth::router())
        .route_layer(needs_database.clone())
        .merge(health::router())
        .merge(metadata::router())
        .route_layer(timed)
        // A signed link is its own leave; files stream without a request timeout.
        .merge(jobs::linked_downloads().route_layer(needs_database))
        .merge(protected)
        // Outside auth: refused requests are counted too.
        .route_layer(middleware::from_fn(crate::metrics::track_http))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(state.clone(), guard::check))
        .layer(CompressionLayer::new())
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// A response with a FHIR JSON body.
pub fn fhir_response(status: StatusCode, body: impl Into<Body>) -> Response {
    let mut response = (status, body.into()).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    response
}

/// An HTTP date (RFC 7231), e.g. for `Last-Modified` and `Expires`.
pub fn http_date(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

/// A request (not a download) must be answered within `server.request_timeout_secs`; one that
/// is not is dropped (a write rolls back) and answered 503.
async fn request_timeout(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!(
                "the request took longer than {} s (server.request_timeout_secs)",
                limit.as_secs()
            ),
        )
        .into_response(),
    }
}

/// While the database is known to be down, a request that needs it is answered 503 at once; one
/// in flight when it goes down is answered 503 then (a write rolls back), not after the pool's
/// acquire timeout.
async fn database_available(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let unavailable = || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "transient",
            "the database does not answer; try again",
        )
        .with_header(header::RETRY_AFTER, "5")
        .into_response()
    };
    if !state.database.is_up() {
        return unavailable();
    }
    tokio::select! {
        response = next.run(request) => response,
        _ = state.database.went_down() => unavailable(),
    }
}

async fn unknown_route() -> ApiError {
    ApiError::not_found("no such route on this FHIR server")
}

/// First path segments of the routes that are not `/{type}…`.
const FIXED_ROOTS: &[&str] = &[
    "$export",
    "export",
    "metadata",
    "health",
    "metrics",
    "admin",
    "auth",
    ".well-known",
];

/// 405 for a known route; the `/{type}…` routes match any first segment, so there an unknown
/// type is an unknown path: 404.
async fn method_not_allowed(uri: axum::http::Uri) -> ApiError {
    let first = uri
        .path()
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or("");
    if first.is_empty() || FIXED_ROOTS.contains(&first) || crate::fhir::is_resource_type(first) {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "not-supported",
            "this method is not supported on this URL",
        )
    } else {
        ApiError::not_found(format!(
            "no such route on this FHIR server: '{first}' is not a resource type"
        ))
    }
}

fn panic_response(_: Box<dyn Any + Send + 'static>) -> Response {
    ApiError::Internal(anyhow::anyhow!("a request handler panicked")).into_response()
}
