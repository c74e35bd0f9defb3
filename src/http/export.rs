//! `$export` kick-off at system, Patient and Group level (GET with a query string, POST with a
//! `Parameters` body), per the HL7 Bulk Data Access IG v2.0.0: the request's headers and body
//! extracted, the export service's answer written.

use axum::{
    Extension, Router,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::Response,
    routing::get,
};

use super::{
    ApiError, ApiResult, AppState,
    extract::{Path, require_json_content_type},
    fhir_response,
    prefer::Preferences,
};
use crate::{
    auth::Principal,
    db::jobs::Level,
    export::kick_off::KickOff,
    fhir::outcome::{self, Issue, Severity},
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/$export", get(system).post(system))
        .route("/Patient/$export", get(patient).post(patient))
        .route("/Group/{id}/$export", get(group_export).post(group_export))
}

/// How long a client is asked to wait before polling again, or retrying after a 429.
pub const RETRY_AFTER_SECS: u64 = 2;

async fn system(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    request: Request,
) -> ApiResult<Response> {
    kick_off(&s, &p, Level::System, None, request).await
}

async fn patient(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    request: Request,
) -> ApiResult<Response> {
    kick_off(&s, &p, Level::Patient, None, request).await
}

async fn group_export(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    request: Request,
) -> ApiResult<Response> {
    kick_off(&s, &p, Level::Group, Some(id), request).await
}

async fn kick_off(
    state: &AppState,
    principal: &Principal,
    level: Level,
    group_id: Option<String>,
    request: Request,
) -> ApiResult<Response> {
    let (parts, body) = request.into_parts();
    let (method, uri, headers) = (parts.method, parts.uri, parts.headers);
    let limit = state.config.server.max_kickoff_bytes;
    let body = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-costly",
            format!("a kick-off body may have at most {limit} bytes (server.max_kickoff_bytes)"),
        )
    })?;
    let preferences = check_headers(&headers)?;
    if method == Method::POST && !body.is_empty() {
        require_json_content_type(&headers)?;
    }
    let request = KickOff {
        level,
        group_id,
        query: uri.query().unwrap_or_default().to_string(),
        body,
        lenient: preferences.lenient,
        separate_status: preferences.separate_export_status,
        request_url: format!(
            "{}{}",
            state.base_url,
            uri.path_and_query().map_or("", |p| p.as_str())
        ),
    };
    let accepted = state.exports.kick_off(principal, request).await?;
    let mut issues = vec![Issue::new(
        Severity::Information,
        "informational",
        "export accepted",
    )];
    issues.extend(accepted.ignored.into_iter().map(|why| {
        Issue::new(
            Severity::Warning,
            "not-supported",
            format!("ignored: {why}"),
        )
    }));
    let mut response = fhir_response(
        StatusCode::ACCEPTED,
        outcome::operation_outcome(&issues).to_string(),
    );
    let location = format!("{}/export/{}", state.base_url, accepted.id);
    response.headers_mut().insert(
        header::CONTENT_LOCATION,
        HeaderValue::from_str(&location).map_err(|e| ApiError::Internal(e.into()))?,
    );
    if preferences.separate_export_status {
        response.headers_mut().insert(
            "preference-applied",
            HeaderValue::from_static("respond-async, separate-export-status"),
        );
    }
    Ok(response)
}

/// `Accept: application/fhir+json` and `Prefer: respond-async` are required. Returns what the
/// client prefers.
fn check_headers(headers: &HeaderMap) -> ApiResult<Preferences> {
    let accepts_fhir_json = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/fhir+json")
        });
    if !accepts_fhir_json {
        return Err(ApiError::bad_request(
            "the Accept header must be application/fhir+json",
        ));
    }
    let preferences = Preferences::of(headers);
    if !preferences.respond_async {
        return Err(ApiError::bad_request(
            "the Prefer header must include respond-async",
        ));
    }
    Ok(preferences)
}
