//! `GET /health`.

use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use serde_json::{Value, json};

use super::AppState;
use crate::db;

pub fn router() -> Router<AppState> {
    Router::new().route("/health", get(health))
}

/// 200 when the database answers, the export storage takes files and every export worker
/// shows life; 503 otherwise. The body says which part is wrong.
async fn health(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let database = db::ping(&state.pool).await;
    let storage = state.storage.check().await;
    let stalled = state.liveness.stalled();
    let healthy = database && storage.is_ok() && stalled == 0;
    let body = json!({
        "status": if healthy { "ok" } else { "unavailable" },
        "database": if database { "ok" } else { "not answering" },
        "storage": match &storage {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("{e:#}"),
        },
        "workers": if stalled == 0 {
            format!("{} running", state.liveness.workers())
        } else {
            format!("{stalled} of {} stalled", state.liveness.workers())
        },
    });
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}
