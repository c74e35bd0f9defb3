//! `GET /health`.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use serde_json::{Value, json};

use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/health", get(health))
}

/// The storage is asked at most this often; answers in between reuse the last result.
const STORAGE_CHECK_EVERY: Duration = Duration::from_secs(5);
/// A storage that has not answered within this is unavailable: a load balancer's probe
/// (commonly two seconds) must get its answer in time.
const STORAGE_CHECK_LIMIT: Duration = Duration::from_millis(1500);

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
        let ok = match tokio::time::timeout(STORAGE_CHECK_LIMIT, state.storage.probe()).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "the export storage is unavailable");
                false
            }
            Err(_) => {
                tracing::warn!("the export storage did not answer within 1.5 s");
                false
            }
        };
        *self.last.lock().expect("not poisoned") = Some((Instant::now(), ok));
        ok
    }
}

/// 200 when the database answers, the export storage answers and every export worker shows
/// life and moves its work on; 503 otherwise. The body names what is down, never why (that is
/// in the server log). Answers within two seconds whatever is down: the database's state is
/// watched in the background, the storage's is asked with a limit.
async fn health(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let database = state.database.is_up();
    let storage = state.storage_health.ok(&state).await;
    let (stalled, stuck) = (state.liveness.stalled(), state.liveness.stuck());
    let healthy = database && storage && stalled == 0 && stuck == 0;
    let workers = state.liveness.workers();
    let body = json!({
        "status": if healthy { "ok" } else { "unavailable" },
        "database": if database { "ok" } else { "unavailable" },
        "storage": if storage { "ok" } else { "unavailable" },
        "workers": match (stalled, stuck) {
            (0, 0) => format!("{workers} running"),
            (0, n) => format!("{n} of {workers} hold a task that has not moved on for a stale period"),
            (n, _) => format!("{n} of {workers} stalled"),
        },
    });
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}
