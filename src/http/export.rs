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
    containers::{self, ANONYMIZATION as ANONYMIZATION_CONTAINER},
    db::{
        jobs::{self, Admission, JobSpec, Level},
        resources,
    },
    deid::Deidentifier,
    fhir::{
        bulk, group, instant,
        outcome::{self, Issue, Severity},
        r4::RESOURCE_TYPES,
        type_filter,
    },
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
    let limit = state.config.server.max_kickoff_bytes;
    let body = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-costly",
            format!("a kick-off body may have at most {limit} bytes (server.max_kickoff_bytes)"),
        )
    })?;
    let lenient = check_headers(&headers)?;
    if method == Method::POST && !body.is_empty() {
        require_json_content_type(&headers)?;
    }
    let query = uri.query().unwrap_or_default().to_string();
    let (system_level, base_url) = (level == Level::System, state.base_url.to_string());
    // Parsing is linear but may be long (a 16 MiB body): off the threads that serve requests.
    let params = tokio::task::spawn_blocking(move || {
        let mut pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        if pairs.iter().any(|(name, _)| name == "patient") {
            return Err("the patient parameter is only supported in a POST kick-off".to_string());
        }
        if !body.is_empty() {
            let value: Value = serde_json::from_slice(&body)
                .map_err(|e| format!("the body is not valid JSON: {e}"))?;
            pairs.extend(bulk::parameters_pairs(&value)?);
        }
        bulk::parse(&pairs, system_level, lenient, Utc::now(), &base_url)
    })
    .await
    .map_err(|e| ApiError::Internal(e.into()))?
    .map_err(ApiError::bad_request)?;
    let limits = &state.config.export;
    if params.patients.len() > limits.max_patients {
        return Err(too_costly(format!(
            "a kick-off may name at most {} patients (export.max_patients); this one names {}",
            limits.max_patients,
            params.patients.len()
        )));
    }
    if params.type_filters.len() > limits.max_type_filters {
        return Err(too_costly(format!(
            "a kick-off may give at most {} _typeFilter entries (export.max_type_filters); \
             this one gives {}",
            limits.max_type_filters,
            params.type_filters.len()
        )));
    }
    if let Some(container) = &params.container {
        containers::validate(container).map_err(ApiError::bad_request)?;
        // Output there could be read back as a de-identification configuration.
        if container == ANONYMIZATION_CONTAINER {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "_container '{ANONYMIZATION_CONTAINER}' holds de-identification configurations; \
                     export output never goes there"
                ),
            ));
        }
        let allowed = &state.config.storage.allowed_containers;
        if !containers::allowed(allowed, container) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "_container '{container}' is not one this server may write to \
                     (storage.allowed_containers)"
                ),
            ));
        }
    }
    let types = exported_types(principal, &params)?;
    let anonymization = match &params.anonymization_config {
        Some(name) => {
            Some(anonymization_config(state, name, params.anonymization_etag.as_deref()).await?)
        }
        None => None,
    };
    let quota = jobs::Quota {
        total: limits.max_active_jobs,
        per_client: limits.max_active_jobs_per_client,
    };
    // Shed a busy server's load before resolving anything; `create` decides for good.
    let (total, own) = jobs::active_counts(&state.pool, principal.client_id.as_deref()).await?;
    if total >= quota.total || own >= quota.per_client {
        return Err(busy(total >= quota.total));
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
        named_patients: patient_ids.is_some(),
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
        anonymization_name: params.anonymization_config.clone(),
        anonymization_config: anonymization,
        anonymization_seed: params.anonymization_config.as_ref().map(|_| {
            let mut seed = vec![0u8; 32];
            aws_lc_rs::rand::fill(&mut seed).expect("the system's random source");
            seed
        }),
    };
    let patients = patient_ids.unwrap_or_default();
    match jobs::create(&state.pool, id, &spec, &patients, quota).await? {
        Admission::Accepted => {}
        Admission::Busy => return Err(busy(true)),
        Admission::ClientBusy => return Err(busy(false)),
    }
    // The parameters as the job holds them; patients only counted (their ids are data).
    tracing::info!(
        job = %id,
        client = spec.owner.as_deref().unwrap_or("-"),
        level = level.as_str(),
        types = %spec.types.join(","),
        since = %spec.since.map(instant::format).unwrap_or_else(|| "-".into()),
        till = %instant::format(spec.transaction_time),
        type_filters = ?spec.type_filters,
        elements = %spec.elements.join(","),
        include_history = spec.include_history,
        include_deleted = spec.include_deleted,
        anonymization = spec.anonymization_name.as_deref().unwrap_or("-"),
        patients = patients.len(),
        container = %spec.container,
        "export accepted"
    );

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

/// The largest anonymization configuration read (the Safe Harbor sample is 14 KB).
const MAX_ANONYMIZATION_CONFIG_BYTES: usize = 1 << 20;

/// Reads and checks the configuration `name` from the storage's `anonymization` container:
/// every problem with it (missing, another ETag, not valid) is a 400 naming it.
async fn anonymization_config(
    state: &AppState,
    name: &str,
    etag: Option<&str>,
) -> ApiResult<String> {
    let file = state
        .storage
        .read_small(
            ANONYMIZATION_CONTAINER,
            name,
            MAX_ANONYMIZATION_CONFIG_BYTES,
        )
        .await
        .map_err(ApiError::Internal)?
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "_anonymizationConfig: there is no configuration '{name}' in the \
                 '{ANONYMIZATION_CONTAINER}' container of the export storage"
            ))
        })?;
    // ETags are compared without their quotes (clients pass them either way).
    let bare = |e: &str| {
        e.trim()
            .trim_start_matches("W/")
            .trim_matches('"')
            .to_string()
    };
    if let Some(wanted) = etag
        && bare(wanted) != bare(&file.etag)
    {
        return Err(ApiError::bad_request(format!(
            "_anonymizationConfigEtag {wanted} does not match the configuration '{name}', \
             whose ETag is {}",
            file.etag
        )));
    }
    if file.bytes.len() > MAX_ANONYMIZATION_CONFIG_BYTES {
        return Err(ApiError::bad_request(format!(
            "_anonymizationConfig '{name}' is larger than {MAX_ANONYMIZATION_CONFIG_BYTES} bytes"
        )));
    }
    let text = String::from_utf8(file.bytes)
        .ok()
        .filter(|text| !text.contains('\0'))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "_anonymizationConfig '{name}' is not UTF-8 text without NUL characters"
            ))
        })?;
    Deidentifier::validate(&text)
        .map_err(|why| ApiError::bad_request(format!("_anonymizationConfig '{name}': {why}")))?;
    Ok(text)
}

fn too_costly(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "too-costly", message)
}

/// 429: all jobs, or this client's, are taken.
fn busy(everyone: bool) -> ApiError {
    let message = if everyone {
        "too many exports are queued or running (export.max_active_jobs); try again later"
    } else {
        "this client has too many exports queued or running \
         (export.max_active_jobs_per_client); try again later"
    };
    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "throttled", message)
        .with_header(header::RETRY_AFTER, &BUSY_RETRY_AFTER_SECS.to_string())
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
/// Lenient handling drops the others with a note. One query for all of them.
async fn chosen_patients(
    state: &AppState,
    requested: &[String],
    members: Option<&[String]>,
    lenient: bool,
    ignored: &mut Vec<String>,
) -> ApiResult<Vec<String>> {
    let existing: HashSet<String> = resources::existing_patients(&state.pool, requested)
        .await?
        .into_iter()
        .collect();
    let members: Option<HashSet<&str>> = members.map(|m| m.iter().map(String::as_str).collect());
    let mut chosen = Vec::with_capacity(requested.len());
    for id in requested {
        let problem = if !existing.contains(id) {
            Some(format!("patient Patient/{id} does not exist"))
        } else if members.as_ref().is_some_and(|m| !m.contains(id.as_str())) {
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
/// walked. One query per level of nesting; the JSON is read off the request threads. An unknown
/// Group is a 404.
async fn group_members(state: &AppState, id: &str) -> ApiResult<(Vec<String>, Vec<String>)> {
    let now = Utc::now();
    let mut seen: HashSet<String> = HashSet::from([id.to_string()]);
    let mut level = vec![id.to_string()];
    let (mut patients, mut walked) = (Vec::new(), Vec::new());
    while !level.is_empty() {
        let bodies = resources::read_current_many(&state.pool, "Group", &level).await?;
        if walked.is_empty() && bodies.is_empty() {
            return Err(ApiError::not_found(format!("Group/{id} is not known")));
        }
        // A nested Group that does not exist has no members.
        walked.extend(bodies.iter().map(|(group, _)| group.clone()));
        let base = state.base_url.clone();
        let found = tokio::task::spawn_blocking(move || {
            let mut found = group::Members::default();
            for (group_id, body) in bodies {
                let members = group::active_members(&body, now, &base).map_err(|e| {
                    ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "invalid",
                        format!("Group/{group_id} has members this server cannot read: {e}"),
                    )
                })?;
                found.patients.extend(members.patients);
                found.groups.extend(members.groups);
            }
            Ok::<_, ApiError>(found)
        })
        .await
        .map_err(|e| ApiError::Internal(e.into()))??;
        patients.extend(found.patients);
        level = found
            .groups
            .into_iter()
            .filter(|g| seen.insert(g.clone()))
            .collect();
    }
    patients.sort_unstable();
    patients.dedup();
    Ok((patients, walked))
}
