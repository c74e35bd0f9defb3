//! The status URL of an export (`GET` polls, `DELETE` cancels) and its output files.

use axum::{
    Extension, Router,
    body::Body,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use chrono::Utc;
use serde_json::json;
use uuid::Uuid;

use super::{
    ApiError, ApiResult, AppState, auth::require, export::RETRY_AFTER_SECS, extract::Path,
    fhir_response,
};
use crate::{
    auth::config::AuthMode,
    auth::{Principal, scopes::Access},
    config::OutputUrls,
    db::{
        jobs::{self, Job, JobState},
        tasks,
    },
    fhir::{instant, outcome},
    storage,
};

/// The manifest extension of a de-identified export.
pub const DE_IDENTIFIED_EXTENSION: &str = "urn:fhir-export:de-identified";

/// Status and cancel.
pub fn router() -> Router<AppState> {
    Router::new().route("/export/{id}", get(status).delete(cancel))
}

/// Output files: they stream for as long as they need (no request timeout).
pub fn downloads() -> Router<AppState> {
    Router::new().route("/export/{id}/{file}", get(download))
}

fn job_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "no export job {id} (it may have been cancelled or expired)"
    ))
}

/// The job, if the caller owns it (another client's job is as good as unknown: 404) and the
/// caller's token still covers what it exports (403 otherwise: the IG has status and files
/// need a token that allows the exported resources).
async fn visible_job(state: &AppState, principal: &Principal, id: &str) -> ApiResult<Job> {
    let uuid = Uuid::parse_str(id).map_err(|_| job_not_found(id))?;
    let job = jobs::visible(&state.pool, uuid, principal.client_id.as_deref())
        .await?
        .ok_or_else(|| job_not_found(id))?;
    if job.spec.types.is_empty() && !principal.scopes.exports_every_type() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this export is of every resource type; the granted scopes do not cover them all",
        ));
    }
    for resource_type in &job.spec.types {
        require(principal, Access::Export, resource_type)?;
    }
    Ok(job)
}

async fn status(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let job = visible_job(&state, &principal, &id).await?;
    match job.status {
        JobState::Completed => manifest(&state, &job).await,
        // The cause stays in the server log, under the id the client can quote.
        JobState::Failed => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "exception",
            format!(
                "the export failed; correlation id {} (the server log has the cause)",
                job.error_id.map(|id| id.to_string()).unwrap_or_default()
            ),
        )),
        JobState::Queued | JobState::Running | JobState::Cancelled => {
            let progress = jobs::progress(&state.pool, job.id).await?;
            let mut response = StatusCode::ACCEPTED.into_response();
            let headers = response.headers_mut();
            headers.insert(
                "x-progress",
                HeaderValue::from_str(&progress_text(&job, &progress))
                    .map_err(|e| ApiError::Internal(e.into()))?,
            );
            headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            Ok(response)
        }
    }
}

/// A short progress line (IG: under 100 characters).
fn progress_text(job: &Job, p: &jobs::Progress) -> String {
    if job.status == JobState::Queued {
        return "queued".into();
    }
    if p.tasks == 0 {
        return match (p.waiting_writers, p.standby_behind_bytes) {
            (0, None) => "planning".into(),
            (0, Some(tasks::STANDBY_NOT_ANSWERING)) => {
                "planning: waiting for the read standby, which does not answer".into()
            }
            (0, Some(bytes)) => format!(
                "planning: waiting for the read standby to replay the snapshot ({} kB behind)",
                (bytes + 1023) / 1024
            ),
            (1, _) => "planning: waiting for 1 write transaction open since kick-off".into(),
            (n, _) => format!("planning: waiting for {n} write transactions open since kick-off"),
        };
    }
    let percent = if p.estimate > 0 {
        (p.resources_done * 100 / p.estimate).min(99)
    } else {
        0
    };
    let mut text = format!("{percent}%, {} files written", p.parts);
    if p.primary_fallbacks > 0 {
        text.push_str("; read standby behind or down: reading from the primary");
    }
    if !p.running_types.is_empty() {
        text.push_str(&format!("; exporting {}", p.running_types.join(", ")));
    }
    if text.len() > 99 {
        let cut = (0..=96)
            .rev()
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0);
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

async fn manifest(state: &AppState, job: &Job) -> ApiResult<Response> {
    let parts = jobs::parts(&state.pool, job.id).await?;
    // Signed URLs are minted for each manifest request and live at most sas_lifetime_secs.
    let lifetime = chrono::TimeDelta::seconds(state.config.storage.azure.sas_lifetime_secs as i64);
    let expires = job
        .expires_at
        .unwrap_or_else(Utc::now)
        .min(Utc::now() + lifetime);
    let mode = state.config.export.output_urls;
    let files: Vec<String> = parts
        .iter()
        .map(|p| format!("{}-{}.ndjson", p.resource_type, p.part_no))
        .collect();
    let urls = match mode {
        OutputUrls::Server => files
            .iter()
            .map(|f| format!("{}/export/{}/{f}", state.base_url, job.id))
            .collect(),
        OutputUrls::Blob | OutputUrls::Sas => {
            let names: Vec<String> = files
                .iter()
                .map(|f| format!("{}/{f}", job.spec.folder))
                .collect();
            state
                .storage
                .direct_urls(
                    &job.spec.container,
                    &names,
                    mode == OutputUrls::Sas,
                    expires,
                )
                .await?
                .ok_or_else(|| {
                    ApiError::Internal(anyhow::anyhow!("the storage gives no direct file URLs"))
                })?
        }
    };
    let (mut output, mut deleted, mut error) = (Vec::new(), Vec::new(), Vec::new());
    for (p, url) in parts.iter().zip(urls) {
        // File kinds: `Type`, `Type-history`, `Type-softdeleted` (resources), `Type-deleted`
        // (transaction Bundles of deletions), `OperationOutcome-error` (what was ignored).
        let (list, entry_type) = match p.resource_type.split_once('-') {
            Some((_, "deleted")) => (&mut deleted, "Bundle"),
            Some((t, "error")) => (&mut error, t),
            Some((t, _)) => (&mut output, t),
            None => (&mut output, p.resource_type.as_str()),
        };
        list.push(json!({"type": entry_type, "url": url, "count": p.resources}));
    }
    // Server URLs need the API's token when auth is on; raw blob URLs the client's own storage
    // access; SAS URLs carry their own signature.
    let requires_access_token = match mode {
        OutputUrls::Server => state.auth.mode() != AuthMode::None,
        OutputUrls::Blob => true,
        OutputUrls::Sas => false,
    };
    let mut body = json!({
        "transactionTime": instant::format(job.spec.transaction_time),
        "request": job.spec.request_url,
        "requiresAccessToken": requires_access_token,
        "output": output,
        "error": error,
    });
    if job.spec.since.is_some() {
        body["deleted"] = json!(deleted);
    }
    // The IG keeps `extension` for servers (a JSON object): this one says the files were
    // de-identified, and with which configuration.
    if let Some(name) = &job.spec.anonymization_name {
        body["extension"] = json!({"url": DE_IDENTIFIED_EXTENSION, "valueString": name});
    }
    let mut response = (StatusCode::OK, body.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(expires) = job.expires_at
        && let Ok(v) = HeaderValue::from_str(&super::http_date(expires))
    {
        headers.insert(header::EXPIRES, v);
    }
    Ok(response)
}

async fn cancel(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let uuid = Uuid::parse_str(&id).map_err(|_| job_not_found(&id))?;
    let owner = jobs::Canceller::Owner(principal.client_id.as_deref());
    cancel_job(&state, uuid, owner).await?;
    let body = outcome::single(
        outcome::Severity::Information,
        "informational",
        "export cancelled; its files are deleted",
    );
    Ok(fhir_response(StatusCode::ACCEPTED, body.to_string()))
}

/// Cancels a job and deletes its files.
pub(super) async fn cancel_job(
    state: &AppState,
    id: Uuid,
    by: jobs::Canceller<'_>,
) -> ApiResult<()> {
    // Files are swept once more after a stale period, for a worker cut off mid-write.
    let files = jobs::cancel(&state.pool, id, by, state.config.stale_after())
        .await?
        .ok_or_else(|| job_not_found(&id.to_string()))?;
    storage::delete_export(
        &*state.storage,
        &files.container,
        &files.folder,
        files.own_container,
    )
    .await?;
    tracing::info!(job = %id, by = ?by, "export cancelled");
    match jobs::summary(&state.pool, id).await {
        Ok(Some(summary)) => crate::telemetry::job_ended(&summary, "cancelled"),
        Ok(None) => {}
        Err(e) => tracing::warn!(job = %id, error = %e, "reading a cancelled job's summary failed"),
    }
    Ok(())
}

async fn download(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((id, file)): Path<(String, String)>,
) -> ApiResult<Response> {
    let job = visible_job(&state, &principal, &id).await?;
    let no_file = || ApiError::not_found(format!("export {id} has no file '{file}'"));
    let (resource_type, part_no) = file
        .strip_suffix(".ndjson")
        .and_then(|stem| stem.rsplit_once('-'))
        .and_then(|(t, n)| Some((t, n.parse::<i32>().ok()?)))
        .ok_or_else(no_file)?;
    if job.status != JobState::Completed
        || !jobs::has_part(&state.pool, job.id, resource_type, part_no).await?
    {
        return Err(no_file());
    }
    let name = format!("{}/{file}", job.spec.folder);
    let stream = state
        .storage
        .read(&job.spec.container, &name)
        .await?
        .ok_or_else(no_file)?;
    let mut response = Body::from_stream(stream).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/fhir+ndjson"),
    );
    Ok(response)
}
