//! The operators' pages: `GET /admin/jobs` (recent jobs, refreshing while any runs),
//! `GET /admin/jobs/{id}` (one job and its tasks) and `POST /admin/jobs/{id}/cancel` (the
//! Cancel button: cancels like `DELETE` on the status URL). Server-rendered HTML, no scripts.
//! Behind the API's auth with the admin scope; without auth, from loopback only.

use std::{collections::BTreeMap, net::SocketAddr};

use axum::{
    Extension, Router,
    extract::{ConnectInfo, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use uuid::Uuid;

use super::{ApiError, ApiResult, AppState, extract::Path};
use crate::{
    auth::config::AuthMode,
    auth::{Principal, scopes::ADMIN_SCOPE},
    db::{
        admin::{self, JobRow, TaskRow, TypeProgress},
        jobs::{self, JobState},
    },
};

/// Jobs listed on the page.
const LISTED: i64 = 100;
/// Seconds between refreshes while a job runs.
const REFRESH_SECS: u32 = 2;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/jobs", get(jobs_page))
        .route("/admin/jobs/{id}", get(job_page))
        .route("/admin/jobs/{id}/cancel", post(cancel))
}

/// The admin scope; without auth, a caller on this machine.
fn require_admin(state: &AppState, principal: &Principal, peer: SocketAddr) -> ApiResult<()> {
    let allowed = match state.auth.mode() {
        AuthMode::None => peer.ip().is_loopback(),
        AuthMode::Smart | AuthMode::External => principal.scopes.admin(),
    };
    if allowed {
        return Ok(());
    }
    let why = match state.auth.mode() {
        AuthMode::None => {
            "the admin pages answer only on this machine when auth.mode = none".into()
        }
        _ => format!("the admin pages need the scope {ADMIN_SCOPE}"),
    };
    Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", why))
}

fn html_response(markup: Markup) -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        markup.into_string(),
    )
        .into_response()
}

async fn jobs_page(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> ApiResult<Response> {
    require_admin(&state, &principal, peer)?;
    let jobs = admin::recent_jobs(&state.pool, LISTED).await?;
    let ids: Vec<Uuid> = jobs.iter().map(|j| j.id).collect();
    let mut types: BTreeMap<Uuid, Vec<TypeProgress>> = BTreeMap::new();
    for t in admin::type_progress(&state.pool, &ids).await? {
        types.entry(t.job_id).or_default().push(t);
    }
    let now = Utc::now();
    let running = jobs.iter().any(|j| is_active(j.status));
    let body = html! {
        @if jobs.is_empty() {
            p { "No export jobs yet." }
        } @else {
            table {
                (job_head())
                tbody {
                    @for job in &jobs {
                        (job_row(&state, job, types.get(&job.id).map_or(&[][..], |t| t), now))
                    }
                }
            }
        }
    };
    Ok(html_response(page("Export jobs", running, body)))
}

async fn job_page(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    require_admin(&state, &principal, peer)?;
    let not_found = || ApiError::not_found(format!("no export job {id}"));
    let uuid = Uuid::parse_str(&id).map_err(|_| not_found())?;
    let job = admin::job(&state.pool, uuid).await?.ok_or_else(not_found)?;
    let types = admin::type_progress(&state.pool, &[uuid]).await?;
    let tasks = admin::tasks(&state.pool, uuid).await?;
    let now = Utc::now();
    let body = html! {
        p { a href="/admin/jobs" { "All jobs" } }
        table {
            (job_head())
            tbody { (job_row(&state, &job, &types, now)) }
        }
        h2 { "Tasks" }
        table {
            thead { tr {
                th { "Task" } th { "Kind" } th { "Type" } th { "Seq range" } th { "State" }
                th { "Attempt" } th { "Failures" } th { "Worker" } th { "Lease until" }
                th { "Files" } th { "Resources" } th { "Last error" } th { "Updated" }
            } }
            tbody { @for task in &tasks { (task_row(task)) } }
        }
    };
    Ok(html_response(page(
        &format!("Export job {}", job.id),
        is_active(job.status),
        body,
    )))
}

/// The Cancel button. A form from another site must not cancel jobs: when the browser says
/// where the form came from, it must be this server.
async fn cancel(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    require_admin(&state, &principal, peer)?;
    if let Some(origin) = headers.get(header::ORIGIN) {
        let own = state
            .base_url
            .split('/')
            .take(3)
            .collect::<Vec<_>>()
            .join("/");
        if origin.to_str().ok() != Some(own.as_str()) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "a cancel from another site's page is refused",
            ));
        }
    }
    let uuid =
        Uuid::parse_str(&id).map_err(|_| ApiError::not_found(format!("no export job {id}")))?;
    state.exports.cancel(uuid, jobs::Canceller::Admin).await?;
    Ok(Redirect::to("/admin/jobs").into_response())
}

fn is_active(state: JobState) -> bool {
    matches!(state, JobState::Queued | JobState::Running)
}

/// The header of a table of `job_row`s.
fn job_head() -> Markup {
    html! {
        thead { tr {
            th { "Job" } th { "Level" } th { "Client" } th { "Parameters" } th { "State" }
            th { "Progress" } th { "Rate" } th { "Elapsed" } th { "Left" }
            th { "Attempts" } th { "Error" } th { "Manifest" } th {}
        } }
    }
}

fn job_row(state: &AppState, job: &JobRow, types: &[TypeProgress], now: DateTime<Utc>) -> Markup {
    let done: i64 = types.iter().map(|t| t.resources_done).sum();
    let estimate: i64 = types.iter().map(|t| t.estimate).sum();
    let files: i64 = types.iter().map(|t| t.parts).sum();
    let elapsed = (job.finished_at.unwrap_or(now) - job.created_at)
        .num_milliseconds()
        .max(1) as f64
        / 1000.0;
    let rate = done as f64 / elapsed;
    let left = (job.status == JobState::Running && rate > 0.0 && estimate > done)
        .then(|| (estimate - done) as f64 / rate);
    let state_name = job.status.as_str();
    html! {
        tr class=(state_name) {
            td { a href={ "/admin/jobs/" (job.id) } { code { (job.id) } } }
            td { (job.level.as_str()) }
            td { (job.owner.as_deref().unwrap_or("-")) }
            td class="request" { (parameters(job)) }
            td class="state" { (state_name) }
            td class="progress" {
                (count(done)) " of ~" (count(estimate)) " resources, " (plural(files, "file"))
                @if !types.is_empty() {
                    ul { @for t in types {
                        li { (t.label) ": " (count(t.resources_done)) " of ~" (count(t.estimate))
                             ", " (plural(t.parts, "file")) ", " (t.tasks_done) "/" (t.tasks) " tasks" }
                    } }
                }
            }
            td { (count(rounded(rate))) "/s" }
            td { (duration(elapsed)) }
            td { @if let Some(left) = left { (duration(left)) } @else { "-" } }
            td { (job.attempts) @if job.failures > 0 { " (" (job.failures) " failed or rescued)" } }
            td class="error" {
                @if let Some(error) = &job.error {
                    (error)
                    @if let Some(id) = job.error_id { br; "correlation id " code { (id) } }
                }
            }
            td { @if job.status == JobState::Completed {
                a href={ (state.base_url) "/export/" (job.id) } { "manifest" }
            } }
            td { @if is_active(job.status) {
                form method="post" action={ "/admin/jobs/" (job.id) "/cancel" } {
                    button type="submit" { "Cancel" }
                }
            } }
        }
    }
}

/// The job's parameters as it holds them (decoded: every value is escaped here).
fn parameters(job: &JobRow) -> Markup {
    let types = if job.types.is_empty() {
        "all".to_string()
    } else {
        job.types.join(", ")
    };
    html! {
        ul {
            li { "_type: " (types) }
            @if let Some(since) = job.since { li { "_since: " (since.to_rfc3339()) } }
            @for filter in &job.type_filters { li { "_typeFilter: " code { (filter) } } }
            @if !job.elements.is_empty() { li { "_elements: " (job.elements.join(", ")) } }
            @if job.named_patients { li { "named patients only" } }
            @if job.include_history { li { "with history" } }
            @if job.include_deleted { li { "with deleted" } }
        }
    }
}

fn task_row(task: &TaskRow) -> Markup {
    html! {
        tr {
            td { (task.id) }
            td { (task.kind.as_str()) }
            td { (task.resource_type.as_deref().unwrap_or("-")) }
            td { (task.range_start) "–" (task.range_end) }
            td { (task.status.as_str()) }
            td { (task.attempt) }
            td { (task.failures) }
            td { (task.worker.as_deref().unwrap_or("-")) }
            td { @if let Some(t) = task.leased_until { (t.format("%H:%M:%S")) } }
            td { (task.parts_done) }
            td { (count(task.resources_done)) " of ~" (count(task.estimate)) }
            td class="error" { (task.last_error.as_deref().unwrap_or("")) }
            td { (task.updated_at.format("%H:%M:%S")) }
        }
    }
}

/// 1234567 → "1,234,567".
fn count(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// "1 file", "2,000 files".
fn plural(n: i64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{} {noun}s", count(n))
    }
}

/// The nearest whole number, for display (Rust's conversion saturates out of range).
#[allow(clippy::cast_possible_truncation)]
fn rounded(x: f64) -> i64 {
    x.round() as i64
}

/// Seconds as "4.2 s", "3 min 5 s" or "2 h 10 min".
fn duration(secs: f64) -> String {
    let whole = rounded(secs);
    match whole {
        _ if secs < 60.0 => format!("{secs:.1} s"),
        _ if whole < 3600 => format!("{} min {} s", whole / 60, whole % 60),
        _ => format!("{} h {} min", whole / 3600, whole % 3600 / 60),
    }
}

fn page(title: &str, refresh: bool, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                @if refresh { meta http-equiv="refresh" content=(REFRESH_SECS); }
                title { (title) }
                style { (PreEscaped(STYLE)) }
            }
            body { h1 { (title) } (body) }
        }
    }
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1.5em}\
    table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:4px 8px;\
    vertical-align:top;text-align:left}th{background:#f3f3f3}ul{margin:4px 0;padding-left:1.2em}\
    .request{max-width:28em;word-break:break-all}.error{color:#a00;max-width:24em}\
    tr.running .state{color:#06c;font-weight:bold}tr.failed .state{color:#a00}\
    tr.completed .state{color:#070}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_durations_read_well() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(1234567), "1,234,567");
        assert_eq!(plural(1, "file"), "1 file");
        assert_eq!(plural(2000, "file"), "2,000 files");
        assert_eq!(duration(4.24), "4.2 s");
        assert_eq!(duration(185.0), "3 min 5 s");
        assert_eq!(duration(7800.0), "2 h 10 min");
    }
}
