//! The status URL of an export (`GET` polls, `DELETE` cancels) and its output files.

use axum::{
    Extension, Router,
    body::Body,
    extract::{RawQuery, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

use super::{
    ApiError, ApiResult, AppState, export::RETRY_AFTER_SECS, extract::Path, fhir_response,
};
use crate::{
    auth::Principal,
    db::jobs::Canceller,
    export::{
        files::FileLink,
        manifest::{Manifest, v2},
        status::{Status, job_id},
    },
    fhir::outcome,
};

/// Status and cancel.
pub fn router() -> Router<AppState> {
    Router::new().route("/export/{id}", get(status).delete(cancel))
}

/// Output files: they stream for as long as they need (no request timeout).
pub fn downloads() -> Router<AppState> {
    Router::new().route("/export/{id}/{file}", get(download))
}

/// Output files through signed links (`export.output_urls = "signed"`): no token needed.
pub fn linked_downloads() -> Router<AppState> {
    Router::new().route("/export-files/{id}/{file}", get(linked_download))
}

async fn status(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<Response> {
    let page = manifest_page(&id, query.as_deref())?;
    let report = state.exports.status(&principal, &id, page).await?;
    let answer = match report.status {
        Status::Completed(manifest) => manifest_response(&manifest, StatusCode::OK),
        // The cause stays in the server log, under the id the client can quote.
        Status::Failed { correlation } => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "exception",
            format!(
                "the export failed; correlation id {} (the server log has the cause)",
                correlation.map(|id| id.to_string()).unwrap_or_default()
            ),
        )
        .into_response(),
        Status::InProgress { progress, manifest } => {
            // A page of the files complete so far (`allowPartialManifests=true`), if any.
            let mut response = match manifest {
                Some(manifest) => manifest_response(&manifest, StatusCode::ACCEPTED),
                None => StatusCode::ACCEPTED.into_response(),
            };
            let headers = response.headers_mut();
            if let Ok(progress) = HeaderValue::from_str(&progress) {
                headers.insert("x-progress", progress);
            }
            headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            response
        }
    };
    Ok(if report.separate_status {
        separate_export_status(answer)
    } else {
        answer
    })
}

/// `separate-export-status`: the answer is about the status request itself (200, it worked);
/// the job's status and reason phrase go in `X-Export-Status`, the rest of the answer as it is.
fn separate_export_status(mut answer: Response) -> Response {
    let job = answer.status();
    let text = format!(
        "{} {}",
        job.as_u16(),
        job.canonical_reason().unwrap_or_default()
    );
    if let Ok(value) = HeaderValue::from_str(&text) {
        answer.headers_mut().insert("x-export-status", value);
    }
    *answer.status_mut() = StatusCode::OK;
    answer
}

/// `?page=n` of a status URL: a page of a paged manifest. Anything but a page number names
/// no page.
fn manifest_page(id: &str, query: Option<&str>) -> Result<Option<i32>, ApiError> {
    let Some(query) = query else {
        return Ok(None);
    };
    let mut page = None;
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if name != "page" {
            continue;
        }
        let number = value.parse::<i32>().ok().filter(|n| *n > 0);
        match (number, page) {
            (Some(n), None) => page = Some(n),
            _ => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not-found",
                    format!("export {id} has no manifest page '{value}'"),
                ));
            }
        }
    }
    Ok(page)
}

fn manifest_response(manifest: &Manifest, status: StatusCode) -> Response {
    let mut response = (status, v2::json(manifest).to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(expires) = manifest.expires
        && let Ok(v) = HeaderValue::from_str(&super::http_date(expires))
    {
        headers.insert(header::EXPIRES, v);
    }
    response
}

async fn cancel(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let owner = Canceller::Owner(principal.client_id.as_deref());
    state.exports.cancel(job_id(&id)?, owner).await?;
    let body = outcome::single(
        outcome::Severity::Information,
        "informational",
        "export cancelled; its files are deleted",
    );
    Ok(fhir_response(StatusCode::ACCEPTED, body.to_string()))
}

/// The query of a signed file link.
#[derive(serde::Deserialize)]
struct LinkQuery {
    expires: i64,
    signature: String,
}

async fn linked_download(
    State(state): State<AppState>,
    Path((id, file)): Path<(String, String)>,
    query: Result<axum::extract::Query<LinkQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Ok(axum::extract::Query(link)) = query else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "a file link needs its expires and signature",
        ));
    };
    let link = FileLink {
        expires: link.expires,
        signature: &link.signature,
    };
    let stream = state.exports.linked_file(&id, &file, link).await?;
    Ok(ndjson_response(stream))
}

async fn download(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((id, file)): Path<(String, String)>,
) -> ApiResult<Response> {
    let stream = state.exports.file(&principal, &id, &file).await?;
    Ok(ndjson_response(stream))
}

fn ndjson_response(stream: crate::storage::ByteStream) -> Response {
    let mut response = Body::from_stream(stream).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/fhir+ndjson"),
    );
    response
}
