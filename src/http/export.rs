//! `$export` kick-off at system, Patient and Group level (GET with a query string, POST with a
//! `Parameters` body), per the HL7 Bulk Data Access IG v2.0.0.

use std::collections::HashSet;

use axum::{
    Extension, Router,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::Response,
    routing::get,
};
use chrono::Utc;
use serde_json::Value;
use uuid::Uuid;

use super::{
    ApiError, ApiResult, AppState,
    auth::require,
    extract::{Path, require_json_content_type},
    fhir_response,
};
use crate::{
    auth::{Principal, scopes::Access},
    db::{
        jobs::{self, JobSpec, Level},
        resources,
    },
    fhir::{
        bulk, group,
        outcome::{self, Issue, Severity},
        r4::RESOURCE_TYPES,
        type_filter,
    },
    storage,
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/$export", get(system).post(system))
        .route("/Patient/$export", get(patient).post(patient))
        .route("/Group/{id}/$export", get(group_export).post(group_export))
}

/// How long a client is asked to wait before polling again, or retrying after a 429.
pub const RETRY_AFTER_SECS: u64 = 2;
const BUSY_RETRY_AFTER_SECS: u64 = 30;

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
    let body = axum::body::to_bytes(body, state.config.server.max_body_bytes)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-costly",
                "the request body is too large",
            )
        })?;
    let lenient = check_headers(&headers)?;
    let mut pairs: Vec<(String, String)> = uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    if pairs.iter().any(|(name, _)| name == "patient") {
        return Err(ApiError::bad_request(
            "the patient parameter is only supported in a POST kick-off",
        ));
    }
    if method == Method::POST && !body.is_empty() {
        require_json_content_type(&headers)?;
        let value: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
        pairs.extend(bulk::parameters_pairs(&value).map_err(ApiError::bad_request)?);
    }
    let params = bulk::parse(
        &pairs,
        level == Level::System,
        lenient,
        Utc::now(),
        &state.base_url,
    )
    .map_err(ApiError::bad_request)?;
    if let Some(container) = &params.container {
        storage::validate_container_name(container).map_err(ApiError::bad_request)?;
    }
    let types = exported_types(principal, &params)?;

    if jobs::count_active(&state.pool).await? >= state.config.export.max_active_jobs {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "throttled",
            "too many exports are queued or running; try again later",
        )
        .with_header(header::RETRY_AFTER, &BUSY_RETRY_AFTER_SECS.to_string()));
    }

    let (mut patient_ids, excluded_groups) = match &group_id {
        Some(id) => {
            let (patients, groups) = group_members(state, id).await?;
            (Some(patients), groups)
        }
        None => (None, Vec::new()),
    };
    let mut ignored = params.ignored;
    if !params.patients.is_empty() {
        let chosen = chosen_patients(
            state,
            &params.patients,
            patient_ids.as_deref(),
            lenient,
            &mut ignored,
        )
        .await?;
        patient_ids = Some(chosen);
    }
    let kicked_off = jobs::now(&state.pool).await?;
    let transaction_time = params.till.unwrap_or(kicked_off);
    let id = Uuid::new_v4();
    let default_container = &state.config.storage.default_container;
    let (container, own_container) = match (&params.container, default_container.is_empty()) {
        (Some(c), _) => (c.clone(), false),
        (None, false) => (default_container.clone(), false),
        (None, true) => (format!("export-{}", id.simple()), true),
    };
    let settings = &state.config.export;
    let spec = JobSpec {
        level,
        request_url: format!(
            "{}{}",
            state.base_url,
            uri.path_and_query().map_or("", |p| p.as_str())
        ),
        transaction_time,
        since: params.since,
        types,
        patient_ids,
        excluded_groups,
        elements: params.elements,
        type_filters: params.type_filters,
        include_history: params.include_history,
        include_deleted: params.include_deleted,
        notes: ignored.clone(),
        owner: principal.client_id.clone(),
        container,
        own_container,
        folder: format!(
            "{}-{}",
            transaction_time.format("%Y%m%dT%H%M%S"),
            id.simple()
        ),
        part_size: settings.part_size as i32,
        part_max_bytes: settings.part_max_bytes as i64,
        range_size: settings.range_size,
        created_at: kicked_off,
    };
    jobs::create(&state.pool, id, &spec).await?;
    tracing::info!(job = %id, level = level.as_str(), "export accepted");

    let mut issues = vec![Issue::new(
        Severity::Information,
        "informational",
        "export accepted",
    )];
    issues.extend(ignored.into_iter().map(|why| {
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
    let location = format!("{}/export/{id}", state.base_url);
    response.headers_mut().insert(
        header::CONTENT_LOCATION,
        HeaderValue::from_str(&location).map_err(|e| ApiError::Internal(e.into()))?,
    );
    Ok(response)
}

/// The types to export, within the caller's scopes: a `_type` or `_typeFilter` beyond them is a
/// 403; without `_type`, a caller limited to some types exports those.
fn exported_types(principal: &Principal, params: &bulk::ExportParams) -> ApiResult<Vec<String>> {
    let filtered = params
        .type_filters
        .iter()
        .map(|entry| type_filter::entry_type(entry));
    for t in params.types.iter().map(String::as_str).chain(filtered) {
        require(principal, Access::Export, t)?;
    }
    if !params.types.is_empty() || principal.scopes.exports_every_type() {
        return Ok(params.types.clone());
    }
    let granted: Vec<String> = RESOURCE_TYPES
        .iter()
        .filter(|t| principal.scopes.allows(Access::Export, t))
        .map(|t| t.to_string())
        .collect();
    if granted.is_empty() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the granted scopes allow exporting no resource type",
        ));
    }
    Ok(granted)
}

/// `Accept: application/fhir+json` and `Prefer: respond-async` are required. Returns whether
/// the client asked for `handling=lenient`.
fn check_headers(headers: &HeaderMap) -> ApiResult<bool> {
    let values = |name: header::HeaderName| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .collect()
    };
    if !values(header::ACCEPT)
        .iter()
        .any(|a| a == "application/fhir+json")
    {
        return Err(ApiError::bad_request(
            "the Accept header must be application/fhir+json",
        ));
    }
    let prefer = values(header::HeaderName::from_static("prefer"));
    if !prefer.iter().any(|p| p == "respond-async") {
        return Err(ApiError::bad_request(
            "the Prefer header must include respond-async",
        ));
    }
    Ok(prefer
        .iter()
        .any(|p| p.replace(' ', "") == "handling=lenient"))
}

/// The patients named by `patient`: each must exist and, for a Group export, be a member.
/// Lenient handling drops the others with a note.
async fn chosen_patients(
    state: &AppState,
    requested: &[String],
    members: Option<&[String]>,
    lenient: bool,
    ignored: &mut Vec<String>,
) -> ApiResult<Vec<String>> {
    let mut chosen = Vec::with_capacity(requested.len());
    for id in requested {
        let exists = resources::read_current(&state.pool, "Patient", id)
            .await?
            .is_some_and(|v| v.body.is_some());
        let problem = if !exists {
            Some(format!("patient Patient/{id} does not exist"))
        } else if members.is_some_and(|m| m.binary_search(id).is_err()) {
            Some(format!("patient Patient/{id} is not a member of the Group"))
        } else {
            None
        };
        match problem {
            None => chosen.push(id.clone()),
            Some(why) if lenient => ignored.push(why),
            Some(why) => return Err(ApiError::bad_request(why)),
        }
    }
    chosen.sort();
    Ok(chosen)
}

/// The active member patients of a Group, following nested Groups (each once), and the Groups
/// walked. An unknown Group is a 404.
async fn group_members(state: &AppState, id: &str) -> ApiResult<(Vec<String>, Vec<String>)> {
    let now = Utc::now();
    let mut patients = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut pending = vec![id.to_string()];
    let mut walked = Vec::new();
    while let Some(group_id) = pending.pop() {
        if !seen.insert(group_id.clone()) {
            continue; // a cycle, or a Group reached twice
        }
        let body = resources::read_current(&state.pool, "Group", &group_id)
            .await?
            .and_then(|v| v.body);
        let Some(body) = body else {
            if group_id == id {
                return Err(ApiError::not_found(format!("Group/{id} is not known")));
            }
            continue; // a nested Group that does not exist has no members
        };
        let value: Value = serde_json::from_str(&body).map_err(|e| ApiError::Internal(e.into()))?;
        let members = group::active_members(&value, now);
        patients.extend(members.patients);
        pending.extend(members.groups);
        walked.push(group_id);
    }
    patients.sort();
    patients.dedup();
    Ok((patients, walked))
}
