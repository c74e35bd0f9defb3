//! `POST /` with a Bundle: `transaction` (all or nothing, one database transaction, `urn:uuid:`
//! references resolved) or `batch` (each entry on its own).

mod entry;

use std::collections::{HashMap, HashSet};

use axum::{
    Extension, Router, extract::State, http::StatusCode, response::Response, routing::post,
};
use serde_json::{error::Category, json, value::RawValue};
use sqlx::PgConnection;
use tokio::sync::{mpsc, oneshot};

use self::entry::{Entry, Method, Write, parse_entry};
use super::{ApiError, ApiResult, AppState, extract::FhirJsonText, fhir_response};
use crate::{
    auth::Principal,
    db::{self, resources},
    fhir::{
        self, instant,
        raw_json::{self, Members},
    },
    store::{self},
};

pub fn router() -> Router<AppState> {
    Router::new().route("/", post(bundle))
}

/// A Bundle read.
enum Read {
    Transaction {
        /// Its writes; only those applied one by one (deletions, `If-Match`) have their
        /// resources yet.
        writes: Vec<Write>,
        /// The order they are applied in (`write_order`).
        order: Vec<usize>,
        /// The resources of the plain creates and updates, in that order, a chunk at a time
        /// as they are prepared; or what is wrong with one of them.
        plain: Chunks,
    },
    /// Each entry on its own, prepared: what is wrong with one is that entry's answer.
    Batch(Vec<ApiResult<Write>>),
}

type Chunks = mpsc::Receiver<ApiResult<Vec<(usize, store::Prepared)>>>;

async fn bundle(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    FhirJsonText(body): FhirJsonText,
) -> ApiResult<Response> {
    // Reading and preparing a large Bundle is CPU work: off the threads that serve requests.
    // A transaction's resources go on being prepared there while it is written.
    let (hand_over, read) = oneshot::channel();
    let base = state.base_url.clone();
    let reading =
        tokio::task::spawn_blocking(move || read_bundle(&body, &principal, &base, hand_over));
    let Ok(read) = read.await else {
        // Nothing was handed over: the reading failed.
        reading.await.map_err(|e| ApiError::Internal(e.into()))??;
        return Err(ApiError::Internal(anyhow::anyhow!(
            "a Bundle was read but not handed over"
        )));
    };
    match read {
        Read::Transaction {
            writes,
            order,
            plain,
        } => transaction(&state, writes, order, plain).await,
        Read::Batch(writes) => batch(&state, writes).await,
    }
}

/// Reads the Bundle without a tree of all of it: the envelope and each entry's request are
/// parsed, each resource is prepared from its text (`store::text`).
fn read_bundle(
    body: &[u8],
    principal: &Principal,
    base: &str,
    hand_over: oneshot::Sender<Read>,
) -> ApiResult<()> {
    let not_json = |e: &dyn std::fmt::Display| {
        ApiError::bad_request(format!("the body is not valid JSON: {e}"))
    };
    let text = std::str::from_utf8(body).map_err(|e| not_json(&e))?;
    let bundle = Members::parse(text).map_err(|e| match e.classify() {
        Category::Data => ApiError::bad_request(format!("the body is not a Bundle: {e}")),
        _ => not_json(&e),
    })?;
    if bundle
        .get("resourceType")
        .and_then(raw_json::string)
        .as_deref()
        != Some("Bundle")
    {
        return Err(ApiError::bad_request("POST to the base URL needs a Bundle"));
    }
    let entries: Vec<&RawValue> = match bundle.get("entry") {
        None => Vec::new(),
        Some(raw) => serde_json::from_str(raw.get())
            .map_err(|_| ApiError::bad_request("Bundle.entry must be an array"))?,
    };
    match bundle.get("type").and_then(raw_json::string).as_deref() {
        Some("transaction") => read_transaction(&entries, principal, base, hand_over),
        Some("batch") => {
            let writes = entries
                .iter()
                .map(|raw| {
                    parse_entry(raw, principal)?
                        .0
                        .prepared_write(&HashMap::new(), base)
                })
                .collect();
            // A request given up on has nobody to hand over to.
            let _ = hand_over.send(Read::Batch(writes));
            Ok(())
        }
        other => Err(ApiError::bad_request(format!(
            "Bundle.type must be 'transaction' or 'batch', not {}",
            other.map_or("(missing)".to_string(), |t| format!("'{t}'"))
        ))),
    }
}

/// Checks a transaction's entries and hands its writes over, then prepares the resources of
/// its plain creates and updates a chunk at a time, in the order they are written, each sent
/// as soon as it is ready: the COPY takes them while the rest are prepared.
fn read_transaction(
    raw: &[&RawValue],
    principal: &Principal,
    base: &str,
    hand_over: oneshot::Sender<Read>,
) -> ApiResult<()> {
    let parsed = in_parallel(raw, |i, value| {
        parse_entry(value, principal).map_err(|e| at_entry(i, e))
    })?;
    let mut entries = Vec::with_capacity(parsed.len());
    let mut targets = HashMap::new();
    for (entry, full_url) in parsed {
        if let Some(url) = full_url.filter(|u| u.starts_with("urn:uuid:")) {
            targets.insert(url, format!("{}/{}", entry.resource_type, entry.id));
        }
        entries.push(entry);
    }
    let mut seen = HashSet::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        if !seen.insert((entry.resource_type.as_str(), entry.id.as_str())) {
            return Err(at_entry(
                i,
                ApiError::bad_request(format!(
                    "{}/{} appears more than once in the transaction",
                    entry.resource_type, entry.id
                )),
            ));
        }
    }
    let prepare = |&i: &usize| -> ApiResult<(usize, store::Prepared)> {
        let prepared = entries[i]
            .prepare(&targets, base)
            .map_err(|e| at_entry(i, e))?;
        Ok((i, prepared.expect("creates and updates have a resource")))
    };
    let mut writes: Vec<Write> = entries.iter().map(Entry::write).collect();
    let one_by_one: Vec<usize> = (0..writes.len())
        .filter(|&i| !writes[i].is_plain() && entries[i].resource.is_some())
        .collect();
    for (i, prepared) in in_parallel(&one_by_one, |_, i| prepare(i))? {
        writes[i].prepared = Some(prepared);
    }
    let order = write_order(&writes);
    let plain: Vec<usize> = order
        .iter()
        .copied()
        .filter(|&i| writes[i].is_plain())
        .collect();
    let (chunks, receiver) = mpsc::channel(2);
    let read = Read::Transaction {
        writes,
        order,
        plain: receiver,
    };
    if hand_over.send(read).is_err() {
        return Ok(()); // the request was given up on
    }
    for chunk in plain.chunks(CHUNK) {
        let prepared = in_parallel(chunk, |_, i| prepare(i));
        let failed = prepared.is_err();
        // Stop when the writer has stopped listening or been told what is wrong.
        if chunks.blocking_send(prepared).is_err() || failed {
            break;
        }
    }
    Ok(())
}

/// Resources prepared and sent to the COPY at a time.
const CHUNK: usize = 1_000;

/// FHIR's order (DELETE, POST, PUT); within it a fixed order of resources, so that two
/// transactions lock what they share in the same order.
fn write_order(writes: &[Write]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..writes.len()).collect();
    order.sort_by(|&a, &b| writes[a].sort_key().cmp(&writes[b].sort_key()));
    order
}

/// Fewer items than this are not worth a thread of their own.
const PARALLEL_MIN: usize = 512;

/// `f` over `items` on every core, the results in order (the first error by position wins):
/// preparing the resources is most of a large transaction's own work.
fn in_parallel<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(usize, &T) -> ApiResult<R> + Sync,
) -> ApiResult<Vec<R>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = items.len().div_ceil(threads).max(PARALLEL_MIN);
    if items.len() <= chunk {
        return items
            .iter()
            .enumerate()
            .map(|(i, item)| f(i, item))
            .collect();
    }
    let f = &f;
    let parts: ApiResult<Vec<Vec<R>>> = std::thread::scope(|scope| {
        let running: Vec<_> = items
            .chunks(chunk)
            .enumerate()
            .map(|(c, part)| {
                scope.spawn(move || {
                    part.iter()
                        .enumerate()
                        .map(|(j, item)| f(c * chunk + j, item))
                        .collect::<ApiResult<Vec<R>>>()
                })
            })
            .collect();
        running
            .into_iter()
            .map(|thread| {
                thread
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            })
            .collect()
    });
    Ok(parts?.into_iter().flatten().collect())
}

async fn transaction(
    state: &AppState,
    mut writes: Vec<Write>,
    order: Vec<usize>,
    mut plain: Chunks,
) -> ApiResult<Response> {
    let mut arrived = Vec::with_capacity(writes.len());
    let mut tries = 0;
    let responses = loop {
        tries += 1;
        let failed = match apply_streamed(state, &writes, &order, &mut plain, &mut arrived).await {
            Ok(responses) => break responses,
            Err(Attempt::Refused(e)) => return Err(e),
            Err(failed) => failed,
        };
        // Another attempt needs every resource at hand.
        while let Some(chunk) = plain.recv().await {
            arrived.extend(chunk?);
        }
        match failed {
            Attempt::Conflicted(_) if tries < 5 => plain = resend(std::mem::take(&mut arrived)),
            Attempt::Collided(_) => {
                for (i, prepared) in arrived {
                    writes[i].prepared = Some(prepared);
                }
                break apply_one_by_one(state, &writes, &order).await?;
            }
            e => return Err(e.into()),
        }
    };
    if writes.len() >= LARGE_BUNDLE {
        state.vacuum.request();
    }
    Ok(response_bundle("transaction-response", responses))
}

/// The resources of the plain writes again, as one chunk, for another attempt.
fn resend(arrived: Vec<(usize, store::Prepared)>) -> Chunks {
    let (sender, receiver) = mpsc::channel(1);
    sender
        .try_send(Ok(arrived))
        .expect("a new channel takes one chunk");
    receiver
}

/// An attempt at a transaction: deletions and `If-Match` writes one by one, then the plain
/// creates and updates with one COPY that takes each chunk of their resources as it comes (on
/// the first attempt, while the rest are still being prepared). What came is kept in
/// `arrived`, for another attempt.
async fn apply_streamed(
    state: &AppState,
    writes: &[Write],
    order: &[usize],
    plain: &mut Chunks,
    arrived: &mut Vec<(usize, store::Prepared)>,
) -> Result<Vec<String>, Attempt> {
    let mut responses = vec![String::new(); writes.len()];
    let mut tx = resources::begin_write(&state.pool).await?;
    for &i in order.iter().filter(|&&i| !writes[i].is_plain()) {
        responses[i] = apply(&mut tx, &writes[i])
            .await
            .map_err(|e| e.at_entry(i))?;
    }
    let keys: Vec<(&str, &str)> = order
        .iter()
        .filter(|&&i| writes[i].is_plain())
        .map(|&i| (writes[i].resource_type.as_str(), writes[i].id.as_str()))
        .collect();
    if !keys.is_empty() {
        let expected = keys.len();
        let mut puts = store::PutMany::start(&mut tx, keys, false).await?;
        let copied = copy_arriving(&mut puts, writes, plain, arrived, &mut responses).await;
        match copied {
            Ok(()) if arrived.len() == expected => puts.finish().await?,
            outcome => {
                // Ended explicitly: a COPY merely dropped would keep the transaction and its
                // locks open on the connection.
                if let Err(e) = puts.abort("the transaction was refused").await {
                    tracing::warn!(error = %e, "ending an unfinished COPY failed");
                }
                return Err(outcome.err().unwrap_or_else(|| {
                    Attempt::Refused(ApiError::Internal(anyhow::anyhow!(
                        "the resources of a transaction stopped coming"
                    )))
                }));
            }
        }
    }
    tx.commit().await?;
    Ok(responses)
}

/// Writes the resources of the plain writes into the COPY as they come, until they stop.
async fn copy_arriving(
    puts: &mut store::PutMany<'_, '_>,
    writes: &[Write],
    plain: &mut Chunks,
    arrived: &mut Vec<(usize, store::Prepared)>,
    responses: &mut [String],
) -> Result<(), Attempt> {
    while let Some(chunk) = plain.recv().await {
        for (i, prepared) in chunk.map_err(Attempt::Refused)? {
            let stamp = puts.put(&prepared).await?;
            responses[i] = put_response(
                &writes[i],
                stamp.version_id,
                stamp.last_updated,
                stamp.created,
            );
            arrived.push((i, prepared));
        }
    }
    Ok(())
}

/// A transaction this large is a bulk load: the store is vacuumed after it (once such
/// transactions pause), as after `load`.
const LARGE_BUNDLE: usize = 5_000;

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

/// Applies a transaction's writes in `order`, all or nothing, each on its own: after a
/// collision with a concurrent writer, whom each write then waits out. A lost deadlock is
/// tried again.
async fn apply_one_by_one(
    state: &AppState,
    writes: &[Write],
    order: &[usize],
) -> ApiResult<Vec<String>> {
    let mut tries = 0;
    loop {
        tries += 1;
        let attempt = async {
            let mut responses = vec![String::new(); writes.len()];
            let mut tx = resources::begin_write(&state.pool).await?;
            for &i in order {
                responses[i] = apply(&mut tx, &writes[i])
                    .await
                    .map_err(|e| e.at_entry(i))?;
            }
            tx.commit().await?;
            Ok(responses)
        };
        match attempt.await {
            Ok(responses) => return Ok(responses),
            Err(Attempt::Conflicted(_)) if tries < 5 => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

async fn batch(state: &AppState, writes: Vec<ApiResult<Write>>) -> ApiResult<Response> {
    let mut responses = Vec::with_capacity(writes.len());
    for write in writes {
        let result = async {
            let write = write?;
            let mut tx = resources::begin_write(&state.pool).await?;
            let response = apply(&mut tx, &write).await.map_err(ApiError::from)?;
            tx.commit().await?;
            Ok::<_, ApiError>(response)
        }
        .await;
        responses.push(result.unwrap_or_else(|e| {
            let (status, issues) = e.report();
            json!({"response": {
                "status": status_line(status),
                "outcome": fhir::outcome::operation_outcome(&issues),
            }})
            .to_string()
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
        ApiError::Invalid { invalid, .. } => ApiError::Invalid {
            within: Some(format!("Bundle.entry[{index}]")),
            invalid,
        },
        internal => internal,
    }
}

/// Applies one write; returns its response entry (JSON text).
async fn apply(tx: &mut PgConnection, write: &Write) -> Result<String, Attempt> {
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
                Some(w) => format!(
                    r#"{{"response":{{"status":"204 No Content","etag":"W/\"{}\"","lastModified":"{}"}}}}"#,
                    w.version_id,
                    instant::format(w.last_updated)
                ),
                None => r#"{"response":{"status":"200 OK"}}"#.to_string(),
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

/// The response entry of a create or update, written out directly (a large transaction has
/// one per entry; types and ids need no escaping).
fn put_response(
    write: &Write,
    version_id: i32,
    last_updated: chrono::DateTime<chrono::Utc>,
    created: bool,
) -> String {
    let (resource_type, id) = (&write.resource_type, &write.id);
    let status = if created { "201 Created" } else { "200 OK" };
    let last_updated = instant::format(last_updated);
    format!(
        r#"{{"fullUrl":"{resource_type}/{id}","response":{{"status":"{status}","location":"{resource_type}/{id}/_history/{version_id}","etag":"W/\"{version_id}\"","lastModified":"{last_updated}"}}}}"#
    )
}

fn status_line(status: StatusCode) -> String {
    format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
}

/// The response Bundle around its entries' JSON texts.
fn response_bundle(bundle_type: &str, entries: Vec<String>) -> Response {
    let size: usize = entries.iter().map(|e| e.len() + 1).sum();
    let mut body = String::with_capacity(size + 128);
    body.push_str(r#"{"resourceType":"Bundle","id":""#);
    body.push_str(&uuid::Uuid::new_v4().to_string());
    body.push_str(r#"","type":""#);
    body.push_str(bundle_type);
    body.push_str(r#"","entry":["#);
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(entry);
    }
    body.push_str("]}");
    fhir_response(StatusCode::OK, body)
}
