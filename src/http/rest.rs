//! FHIR REST interactions on single resources: create, update, read, vread, delete.

use axum::{
    Extension, Router,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::{
    ApiError, ApiResult, AppState,
    auth::require,
    extract::{FhirJson, Path},
    fhir_response,
};
use crate::{
    auth::{Principal, scopes::Access},
    db::resources::{self, Version},
    fhir::{
        self,
        outcome::{self, Severity},
        resource,
    },
    store,
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/{type}", post(create))
        .route("/{type}/{id}", get(read).put(update).delete(delete))
        .route("/{type}/{id}/_history/{vid}", get(vread))
}

/// A resource type from the URL: unknown types are unknown routes.
pub fn known_type(resource_type: &str) -> ApiResult<()> {
    if fhir::is_resource_type(resource_type) {
        Ok(())
    } else {
        Err(ApiError::not_found(format!(
            "'{resource_type}' is not an R4 resource type"
        )))
    }
}

fn valid_id(id: &str) -> ApiResult<()> {
    if resource::is_valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "id '{id}' is invalid: it must be 1-64 characters of A-Z, a-z, 0-9, '-' and '.'"
        )))
    }
}

/// Checks a request body is a resource of the URL's type.
pub fn resource_of_type(body: Map<String, Value>, url_type: &str) -> ApiResult<Map<String, Value>> {
    let body = resource::into_resource(Value::Object(body)).map_err(ApiError::bad_request)?;
    let body_type = resource::resource_type(&body);
    if body_type != url_type {
        return Err(ApiError::bad_request(format!(
            "resourceType '{body_type}' does not match the URL's type '{url_type}'"
        )));
    }
    Ok(body)
}

async fn create(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(resource_type): Path<String>,
    body: Result<FhirJson, ApiError>,
) -> ApiResult<Response> {
    // An unknown type is an unknown path, whatever the body.
    known_type(&resource_type)?;
    let FhirJson(body) = body?;
    require(&principal, Access::Create, &resource_type)?;
    let body = resource_of_type(body, &resource_type)?;
    // The server assigns the id of a created resource; an id in the body is ignored.
    let id = uuid::Uuid::new_v4().to_string();
    let prepared = store::Prepared::new(&resource_type, &id, body, &state.base_url)?;
    let mut tx = resources::begin_write(&state.pool).await?;
    let written = store::put(&mut tx, &prepared, None).await?;
    tx.commit().await?;
    Ok(written_response(
        &state,
        StatusCode::CREATED,
        &resource_type,
        &id,
        written,
    ))
}

async fn update(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((resource_type, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<FhirJson, ApiError>,
) -> ApiResult<Response> {
    known_type(&resource_type)?;
    let FhirJson(body) = body?;
    require(&principal, Access::Update, &resource_type)?;
    valid_id(&id)?;
    let body = resource_of_type(body, &resource_type)?;
    match resource::id(&body) {
        Some(body_id) if body_id == id => {}
        Some(body_id) => {
            return Err(ApiError::bad_request(format!(
                "the body's id '{body_id}' does not match the URL's id '{id}'"
            )));
        }
        None => {
            return Err(ApiError::bad_request(
                "an update needs the resource's id in the body",
            ));
        }
    }
    let if_match = if_match(&headers)?;
    let prepared = store::Prepared::new(&resource_type, &id, body, &state.base_url)?;
    let mut tx = resources::begin_write(&state.pool).await?;
    let written = store::put(&mut tx, &prepared, if_match).await?;
    tx.commit().await?;
    let status = if written.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(written_response(
        &state,
        status,
        &resource_type,
        &id,
        written,
    ))
}

/// The version an `If-Match` header names (`W/"3"`), for optimistic locking.
fn if_match(headers: &HeaderMap) -> ApiResult<Option<i32>> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or_default();
    parse_version_tag(text).map(Some).ok_or_else(|| {
        ApiError::bad_request(format!(
            "If-Match '{text}' is not a version ETag such as W/\"3\""
        ))
    })
}

/// `W/"3"` (or `"3"`) → 3.
pub fn parse_version_tag(text: &str) -> Option<i32> {
    let text = text.trim();
    let quoted = text.strip_prefix("W/").unwrap_or(text);
    let number = quoted.strip_prefix('"')?.strip_suffix('"')?;
    number.parse().ok().filter(|v| *v > 0)
}

fn written_response(
    state: &AppState,
    status: StatusCode,
    resource_type: &str,
    id: &str,
    written: store::Written,
) -> Response {
    let mut response = fhir_response(status, written.body.unwrap_or_default());
    let location = format!(
        "{}/{resource_type}/{id}/_history/{}",
        state.base_url, written.version_id
    );
    set_version_headers(
        response.headers_mut(),
        written.version_id,
        written.last_updated,
    );
    if let Ok(v) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    response
}

fn set_version_headers(headers: &mut HeaderMap, version_id: i32, last_updated: DateTime<Utc>) {
    let etag = format!("W/\"{version_id}\"");
    let modified = super::http_date(last_updated);
    for (name, value) in [(header::ETAG, etag), (header::LAST_MODIFIED, modified)] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
}

async fn read(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((resource_type, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    known_type(&resource_type)?;
    require(&principal, Access::Read, &resource_type)?;
    valid_id(&id)?;
    let version = resources::read_current(&state.pool, &resource_type, &id).await?;
    version_response(version, &format!("{resource_type}/{id}"))
}

async fn vread(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((resource_type, id, vid)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    known_type(&resource_type)?;
    require(&principal, Access::Read, &resource_type)?;
    valid_id(&id)?;
    let vid: i32 = vid.parse().ok().filter(|v| *v > 0).ok_or_else(|| {
        ApiError::bad_request(format!("version id '{vid}' is not a positive integer"))
    })?;
    let version = resources::read_version(&state.pool, &resource_type, &id, vid).await?;
    version_response(version, &format!("{resource_type}/{id}/_history/{vid}"))
}

fn version_response(version: Option<Version>, what: &str) -> ApiResult<Response> {
    let Some(version) = version else {
        return Err(ApiError::not_found(format!("{what} is not known")));
    };
    let Some(body) = version.body else {
        let mut response = ApiError::gone(format!("{what} has been deleted")).into_response();
        set_version_headers(
            response.headers_mut(),
            version.version_id,
            version.last_updated,
        );
        return Ok(response);
    };
    let mut response = fhir_response(StatusCode::OK, body);
    set_version_headers(
        response.headers_mut(),
        version.version_id,
        version.last_updated,
    );
    Ok(response)
}

async fn delete(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((resource_type, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    known_type(&resource_type)?;
    require(&principal, Access::Delete, &resource_type)?;
    valid_id(&id)?;
    let if_match = if_match(&headers)?;
    let mut tx = resources::begin_write(&state.pool).await?;
    let deleted = store::delete(&mut tx, &resource_type, &id, if_match).await?;
    tx.commit().await?;
    Ok(match deleted {
        Some(written) => {
            let mut response = StatusCode::NO_CONTENT.into_response();
            set_version_headers(
                response.headers_mut(),
                written.version_id,
                written.last_updated,
            );
            response
        }
        None => fhir_response(
            StatusCode::OK,
            outcome::single(
                Severity::Information,
                "not-found",
                format!(
                    "{resource_type}/{id} does not exist (or is already deleted): nothing to delete"
                ),
            )
            .to_string(),
        ),
    })
}
