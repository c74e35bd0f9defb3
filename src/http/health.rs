//! `GET /health`.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use serde_json::{Value, json};

use super::AppState;
use crate::db;

pub fn router() -> Router<AppState> {
    Router::new().route("/health", get(health))
}

/// The storage is asked at most this often; answers in between reuse the last result.
const STORAGE_CHECK_EVERY: Duration = Duration::from_secs(5);

/// The last storage check and when it ran.
#[derive(Default)]
pub struct StorageHealth {
    last: Mutex<Option<(Instant, bool)>>,
}

impl StorageHealth {
    async fn ok(&self, state: &AppState) -> bool {
        if let Some((at, ok)) = *self.last.lock().expect("not poisoned")
            && at.elapsed() < STORAGE_CHECK_EVERY
        {
            return ok;
        }
        // Reads only (no probe file): a busy health check must not write.
        let ok = match state.storage.probe().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "the export storage is unavailable");
                false
            }
        };
        *self.last.lock().expect("not poisoned") = Some((Instant::now(), ok));
        ok
    }
}

/// 200 when the database answers, the export storage answers and every export worker shows
/// life; 503 otherwise. The body names what is down, never why (that is in the server log).
async fn health(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let database = db::ping(&state.pool).await;
    let storage = state.storage_health.ok(&state).await;
    let stalled = state.liveness.stalled();
    let healthy = database && storage && stalled == 0;
    let body = json!({
        "status": if healthy { "ok" } else { "unavailable" },
        "database": if database { "ok" } else { "unavailable" },
        "storage": if storage { "ok" } else { "unavailable" },
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
