//! `GET /metrics`: the Prometheus text. On the API's listener behind the API's auth; on
//! `server.metrics_listen` alone and open (see `scrape_router`).

use axum::{
    Router,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

use super::AppState;
use crate::metrics::Gauges;

pub fn router() -> Router<AppState> {
    Router::new().route(
        "/metrics",
        get(|State(state): State<AppState>| scrape(state.gauges)),
    )
}

/// The router of the metrics-only listener.
pub fn scrape_router(gauges: Gauges) -> Router {
    Router::new().route("/metrics", get(move || scrape(gauges.clone())))
}

async fn scrape(gauges: Gauges) -> Response {
    match gauges.render().await {
        Ok(text) => {
            let mut response = text.into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "reading the metrics' gauges failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the database is unavailable\n",
            )
                .into_response()
        }
    }
}
