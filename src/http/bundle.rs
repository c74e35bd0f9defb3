//! `POST /` with a Bundle: `transaction` (all or nothing, one database transaction, `urn:uuid:`
//! references resolved) or `batch` (each entry on its own).

use std::{
    collections::{HashMap, HashSet},
    sync::atomic::{AtomicBool, Ordering},
};

use axum::{
    Extension, Router, extract::State, http::StatusCode, response::Response, routing::post,
};
use serde_json::{Map, Value, json};
use sqlx::PgConnection;

use super::{
    ApiError, ApiResult, AppState,
    auth::require,
    extract::FhirJson,
    fhir_response,
    rest::{parse_version_tag, resource_of_type},
};
use crate::{
    auth::{Principal, scopes::Access},
    db::{self, resources},
    fhir::{self, instant, resource},
    store,
};

pub fn router() -> Router<AppState> {
    Router::new().route("/", post(bundle))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Method {
    // Declaration order is the order FHIR processes a transaction in.
    Delete,
    Post,
    Put,
}

struct Entry {
    method: Method,
    resource_type: String,
    id: String,
    resource: Option<Map<String, Value>>,
    /// `request.ifMatch`: the version the entry expects to replace.
    if_match: Option<i32>,
}

async fn bundle(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    if body.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(ApiError::bad_request("POST to the base URL needs a Bundle"));
    }
    let entries = match body.get("entry") {
        None => Vec::new(),
        Some(Value::Array(entries)) => entries.clone(),
        Some(_) => return Err(ApiError::bad_request("Bundle.entry must be an array")),
    };
    match body.get("type").and_then(Value::as_str) {
        Some("transaction") => transaction(&state, &principal, entries).await,
        Some("batch") => batch(&state, &principal, entries).await,
        other => Err(ApiError::bad_request(format!(
            "Bundle.type must be 'transaction' or 'batch', not {}",
            other.map_or("(missing)".to_string(), |t| format!("'{t}'"))
        ))),
    }
}

async fn transaction(
    state: &AppState,
    principal: &Principal,
    raw: Vec<Value>,
) -> ApiResult<Response> {
    let mut entries = Vec::with_capacity(raw.len());
    let mut targets = HashMap::new();
    for (i, value) in raw.into_iter().enumerate() {
        let (entry, full_url) = parse_entry(value, principal).map_err(|e| at_entry(i, e))?;
        if let Some(url) = full_url.filter(|u| u.starts_with("urn:uuid:")) {
            targets.insert(url, format!("{}/{}", entry.resource_type, entry.id));
        }
        entries.push(entry);
    }
    let mut seen = HashSet::new();
    for (i, entry) in entries.iter_mut().enumerate() {
        if !seen.insert((entry.resource_type.clone(), entry.id.clone())) {
            return Err(at_entry(
                i,
                ApiError::bad_request(format!(
                    "{}/{} appears more than once in the transaction",
                    entry.resource_type, entry.id
                )),
            ));
        }
        if let Some(resource) = entry.resource.take() {
            let mut value = Value::Object(resource);
            resource::rewrite_references(&mut value, &targets);
            if let Value::Object(resource) = value {
                entry.resource = Some(resource);
            }
        }
    }

    let writes: Vec<Write> = entries.into_iter().map(Entry::into_write).collect();
    // FHIR's order (DELETE, POST, PUT); within it a fixed order of resources, so that two
    // transactions lock what they share in the same order.
    let mut order: Vec<usize> = (0..writes.len()).collect();
    order.sort_by(|&a, &b| writes[a].sort_key().cmp(&writes[b].sort_key()));
    let (mut tries, mut one_by_one) = (0, false);
    let responses = loop {
        tries += 1;
        match apply_all(state, &writes, &order, one_by_one).await {
            Ok(responses) => break responses,
            Err(Attempt::Conflicted(_)) if tries < 5 => continue,
            Err(Attempt::Collided(_)) if !one_by_one => one_by_one = true,
            Err(e) => return Err(e.into()),
        }
    };
    if writes.len() >= LARGE_BUNDLE {
        vacuum_in_background(state);
    }
    Ok(response_bundle("transaction-response", responses))
}

/// A transaction this large is a bulk load: the store is vacuumed after it, as after `load`.
const LARGE_BUNDLE: usize = 5_000;

/// One vacuum at a time per process, after the response (it may take a while).
fn vacuum_in_background(state: &AppState) {
    static RUNNING: AtomicBool = AtomicBool::new(false);
    if RUNNING.swap(true, Ordering::AcqRel) {
        return;
    }
    let pool = state.pool.clone();
    tokio::spawn(async move {
        if let Err(e) = resources::vacuum(&pool, false).await {
            tracing::warn!(error = %e, "vacuum after a large transaction failed");
        }
        RUNNING.store(false, Ordering::Release);
    });
}

/// Why an attempt at a transaction wrote nothing.
enum Attempt {
    /// Lost a deadlock or a serialization conflict to another transaction: run it again.
    Conflicted(sqlx::Error),
    /// A concurrent writer created or updated one of the resources while the one COPY was
    /// being prepared (the primary key refused a version): the one-by-one way waits such
    /// writers out.
    Collided(sqlx::Error),
    Refused(ApiError),
}

impl Attempt {
    fn at_entry(self, index: usize) -> Attempt {
        match self {
            Attempt::Refused(e) => Attempt::Refused(at_entry(index, e)),
            other => other,
        }
    }
}

impl From<sqlx::Error> for Attempt {
    fn from(e: sqlx::Error) -> Attempt {
        if db::is_write_conflict(&e) {
            Attempt::Conflicted(e)
        } else if resources::is_version_collision(&e) {
            Attempt::Collided(e)
        } else {
            Attempt::Refused(e.into())
        }
    }
}

impl From<store::WriteError> for Attempt {
    fn from(e: store::WriteError) -> Attempt {
        match e {
            store::WriteError::Database(e) => e.into(),
            refused => Attempt::Refused(refused.into()),
        }
    }
}

impl From<Attempt> for ApiError {
    fn from(attempt: Attempt) -> ApiError {
        match attempt {
            Attempt::Conflicted(e) | Attempt::Collided(e) => e.into(),
            Attempt::Refused(e) => e,
        }
    }
}

/// Applies a transaction's writes in `order`, all or nothing: deletions and `If-Match` writes
/// one by one, then the plain creates and updates together with one COPY (`store::put_many`) —
/// or, `one_by_one`, every write on its own.
async fn apply_all(
    state: &AppState,
    writes: &[Write],
    order: &[usize],
    one_by_one: bool,
) -> Result<Vec<Value>, Attempt> {
    let mut responses = vec![Value::Null; writes.len()];
    let mut tx = resources::begin_write(&state.pool).await?;
    let mut plain = Vec::new();
    for &i in order {
        match &writes[i] {
            Write {
                method: Method::Post | Method::Put,
                prepared: Some(prepared),
                if_match: None,
                ..
            } if !one_by_one => plain.push((i, prepared)),
            write => responses[i] = apply(&mut tx, write).await.map_err(|e| e.at_entry(i))?,
        }
    }
    if !plain.is_empty() {
        let batch: Vec<&store::Prepared> = plain.iter().map(|&(_, p)| p).collect();
        let stamps = store::put_many(&mut tx, &batch, false).await?;
        for (&(i, _), stamp) in plain.iter().zip(stamps) {
            responses[i] = put_response(
                &writes[i],
                stamp.version_id,
                stamp.last_updated,
                stamp.created,
            );
        }
    }
    tx.commit().await?;
    Ok(responses)
}

async fn batch(state: &AppState, principal: &Principal, raw: Vec<Value>) -> ApiResult<Response> {
    let mut responses = Vec::with_capacity(raw.len());
    for value in raw {
        let result = async {
            let (entry, _) = parse_entry(value, principal)?;
            let write = entry.into_write();
            let mut tx = resources::begin_write(&state.pool).await?;
            let response = apply(&mut tx, &write).await.map_err(ApiError::from)?;
            tx.commit().await?;
            Ok::<_, ApiError>(response)
        }
        .await;
        responses.push(result.unwrap_or_else(|e| {
            let (status, issue) = e.report();
            json!({"response": {
                "status": status_line(status),
                "outcome": fhir::outcome::operation_outcome(&[issue]),
            }})
        }));
    }
    Ok(response_bundle("batch-response", responses))
}

fn at_entry(index: usize, e: ApiError) -> ApiError {
    match e {
        ApiError::Outcome {
            status,
            code,
            message,
            headers,
        } => ApiError::Outcome {
            status,
            code,
            message: format!("Bundle.entry[{index}]: {message}"),
            headers,
        },
        internal => internal,
    }
}

/// Reads one entry's request and resource, which the caller's scopes must allow; returns it
/// with its `fullUrl`.
fn parse_entry(value: Value, principal: &Principal) -> ApiResult<(Entry, Option<String>)> {
    let Value::Object(mut entry) = value else {
        return Err(ApiError::bad_request("an entry must be an object"));
    };
    let full_url = entry
        .get("fullUrl")
        .and_then(Value::as_str)
        .map(str::to_string);
    let request = entry.get("request").and_then(Value::as_object);
    let text = |key: &str| {
        request
            .and_then(|r| r.get(key))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let (Some(method), Some(url)) = (text("method"), text("url")) else {
        return Err(ApiError::bad_request(
            "request.method and request.url are required",
        ));
    };
    let url = url.as_str();
    let method = match method.as_str() {
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        other => {
            return Err(ApiError::not_supported(format!(
                "request.method {other} is not supported in a Bundle (POST, PUT, DELETE are)"
            )));
        }
    };
    if url.contains('?') {
        return Err(ApiError::not_supported(format!(
            "conditional request URLs are not supported: '{url}'"
        )));
    }
    let mut parts = url.trim_matches('/').split('/');
    let (resource_type, url_id) = (parts.next().unwrap_or(""), parts.next());
    if parts.next().is_some() || !fhir::is_resource_type(resource_type) {
        return Err(ApiError::bad_request(format!(
            "request.url '{url}' is not Type or Type/id"
        )));
    }
    let access = match method {
        Method::Post => Access::Create,
        Method::Put => Access::Update,
        Method::Delete => Access::Delete,
    };
    require(principal, access, resource_type)?;
    let id = match (method, url_id) {
        // A created resource gets a new server id, whatever the body says.
        (Method::Post, None) => uuid::Uuid::new_v4().to_string(),
        (Method::Put | Method::Delete, Some(id)) if resource::is_valid_id(id) => id.to_string(),
        _ => {
            return Err(ApiError::bad_request(format!(
                "request.url '{url}' does not fit method {method:?} (POST takes Type, PUT and DELETE Type/id)"
            )));
        }
    };
    let if_match = match text("ifMatch") {
        None => None,
        Some(tag) => Some(parse_version_tag(&tag).ok_or_else(|| {
            ApiError::bad_request(format!(
                "request.ifMatch '{tag}' is not a version ETag such as W/\"3\""
            ))
        })?),
    };
    if method == Method::Post && if_match.is_some() {
        return Err(ApiError::bad_request(
            "request.ifMatch applies to PUT and DELETE, not to POST",
        ));
    }
    let resource = match (method, entry.remove("resource")) {
        (Method::Delete, _) => None,
        (_, Some(Value::Object(body))) => {
            let body = resource_of_type(body, resource_type)?;
            if method == Method::Put
                && let Some(body_id) = resource::id(&body)
                && body_id != id
            {
                return Err(ApiError::bad_request(format!(
                    "the resource's id '{body_id}' does not match request.url '{url}'"
                )));
            }
            Some(body)
        }
        _ => {
            return Err(ApiError::bad_request(
                "POST and PUT entries need a resource object",
            ));
        }
    };
    let resource_type = resource_type.to_string();
    Ok((
        Entry {
            method,
            resource_type,
            id,
            resource,
            if_match,
        },
        full_url,
    ))
}

/// An entry ready to be written (references resolved, the resource prepared).
struct Write {
    method: Method,
    resource_type: String,
    id: String,
    prepared: Option<store::Prepared>,
    if_match: Option<i32>,
}

impl Entry {
    fn into_write(self) -> Write {
        let prepared = self
            .resource
            .map(|r| store::Prepared::new(&self.resource_type, &self.id, r));
        Write {
            method: self.method,
            resource_type: self.resource_type,
            id: self.id,
            prepared,
            if_match: self.if_match,
        }
    }
}

impl Write {
    fn sort_key(&self) -> (Method, &str, &str) {
        (self.method, &self.resource_type, &self.id)
    }
}

async fn apply(tx: &mut PgConnection, write: &Write) -> Result<Value, Attempt> {
    let Write {
        method,
        resource_type,
        id,
        prepared,
        if_match,
    } = write;
    let (method, if_match) = (*method, *if_match);
    match (method, prepared) {
        (Method::Delete, _) => Ok(
            match store::delete(tx, resource_type, id, if_match).await? {
                Some(w) => json!({"response": {
                    "status": "204 No Content",
                    "etag": format!("W/\"{}\"", w.version_id),
                    "lastModified": instant::format(w.last_updated),
                }}),
                None => json!({"response": {"status": "200 OK"}}),
            },
        ),
        (_, Some(prepared)) => {
            let w = store::put(tx, prepared, if_match).await?;
            Ok(put_response(write, w.version_id, w.last_updated, w.created))
        }
        (_, None) => Err(Attempt::Refused(ApiError::bad_request(
            "entry has no resource",
        ))),
    }
}

/// The response entry of a create or update.
fn put_response(
    write: &Write,
    version_id: i32,
    last_updated: chrono::DateTime<chrono::Utc>,
    created: bool,
) -> Value {
    let (resource_type, id) = (&write.resource_type, &write.id);
    let status = if created { "201 Created" } else { "200 OK" };
    json!({
        "fullUrl": format!("{resource_type}/{id}"),
        "response": {
            "status": status,
            "location": format!("{resource_type}/{id}/_history/{version_id}"),
            "etag": format!("W/\"{version_id}\""),
            "lastModified": instant::format(last_updated),
        }
    })
}

fn status_line(status: StatusCode) -> String {
    format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
}

fn response_bundle(bundle_type: &str, entries: Vec<Value>) -> Response {
    let body = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": bundle_type,
        "entry": entries,
    });
    fhir_response(StatusCode::OK, body.to_string())
}
