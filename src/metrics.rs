//! Prometheus metrics (`GET /metrics`). Counters and histograms are recorded where things
//! happen (through the `metrics` facade); the queue's and the pools' gauges are read from the
//! database and the pools when scraped.

use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};

use axum::{
    extract::{MatchedPath, Request},
    http::Method,
    middleware::Next,
    response::Response,
};
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;

use crate::db::Pools;

/// Latency buckets (seconds) of every `*_seconds` histogram.
const BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed at the first call. A process runs one server, so the
/// counters are the process's.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
            .expect("the buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Only fails when a recorder is already installed (an embedding program's own).
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Keeps histograms bounded between scrapes.
pub async fn upkeep(shutdown: tokio_util::sync::CancellationToken) {
    let handle = handle();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => handle.run_upkeep(),
        }
    }
}

/// What a scrape reads besides the recorded metrics.
#[derive(Clone)]
pub struct Gauges {
    primary: PgPool,
    pages: PgPool,
    standby: Option<PgPool>,
}

impl Gauges {
    pub fn new(pools: &Pools) -> Gauges {
        Gauges {
            primary: pools.primary.clone(),
            pages: pools.pages.clone(),
            standby: pools.standby.clone(),
        }
    }

    /// The Prometheus text of every metric, with the gauges read now.
    pub async fn render(&self) -> anyhow::Result<String> {
        self.read_queue().await?;
        let pools = [
            ("primary", Some(&self.primary)),
            ("pages", Some(&self.pages)),
        ];
        for (name, pool) in pools
            .into_iter()
            .chain([("standby", self.standby.as_ref())])
        {
            let Some(pool) = pool else { continue };
            let (size, idle) = (pool.size() as f64, pool.num_idle() as f64);
            gauge!("fhir_export_db_connections", "pool" => name, "state" => "in_use")
                .set(size - idle);
            gauge!("fhir_export_db_connections", "pool" => name, "state" => "idle").set(idle);
            gauge!("fhir_export_db_connections_max", "pool" => name)
                .set(f64::from(pool.options().get_max_connections()));
        }
        Ok(handle().render())
    }

    async fn read_queue(&self) -> sqlx::Result<()> {
        // Every state and level is set, so that a count that fell to zero shows zero.
        let jobs: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT s::text, l::text, count(j.id)
             FROM unnest(enum_range(NULL::job_state)) s
             CROSS JOIN unnest(enum_range(NULL::export_level)) l
             LEFT JOIN export_jobs j ON j.status = s AND j.level = l
             GROUP BY 1, 2",
        )
        .fetch_all(&self.primary)
        .await?;
        for (state, level, n) in jobs {
            gauge!("fhir_export_jobs", "state" => state, "level" => level).set(n as f64);
        }
        let (queued, oldest): (i64, Option<f64>) = sqlx::query_as(
            "SELECT count(*), extract(epoch FROM now() - min(updated_at))::float8
             FROM export_tasks WHERE status = 'queued'",
        )
        .fetch_one(&self.primary)
        .await?;
        gauge!("fhir_export_queue_tasks").set(queued as f64);
        gauge!("fhir_export_queue_oldest_task_seconds").set(oldest.unwrap_or(0.0));
        Ok(())
    }
}

/// Middleware on every matched route: request duration by route, method and status; a
/// kick-off's outcome too.
pub async fn track_http(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let method = request.method().clone();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    if route.ends_with("$export") && (method == Method::GET || method == Method::POST) {
        counter!("fhir_export_kickoffs_total", "status" => status.clone()).increment(1);
    }
    histogram!("fhir_export_http_request_duration_seconds",
        "route" => route, "method" => method.to_string(), "status" => status)
    .record(started.elapsed().as_secs_f64());
    response
}

/// A task was claimed by a worker of this process.
pub fn task_claimed(kind: &'static str) {
    counter!("fhir_export_tasks_claimed_total", "kind" => kind).increment(1);
}

/// How a task attempt of this process ended.
pub fn task_ended(kind: &'static str, outcome: &'static str) {
    counter!("fhir_export_tasks_ended_total", "kind" => kind, "outcome" => outcome).increment(1);
}

/// Tasks whose lease ran out, put back in the queue by this process's rescuer.
pub fn tasks_rescued(n: u64) {
    counter!("fhir_export_tasks_rescued_total").increment(n);
}

/// A transient fault (`database` or `storage`) a task resumed after.
pub fn transient_retry(cause: &'static str) {
    counter!("fhir_export_transient_retries_total", "cause" => cause).increment(1);
}

/// How long a worker waited for a page connection (a wait means the `pages` pool ran out).
pub fn page_connection_acquired(waited: Duration) {
    histogram!("fhir_export_db_acquire_seconds", "pool" => "pages").record(waited.as_secs_f64());
}

/// A committed part: its resources, bytes, and the time from its first line to its commit.
pub fn part_written(
    file_kind: &str,
    storage: &'static str,
    lines: u64,
    bytes: u64,
    took: Duration,
) {
    let kind = file_kind.to_string();
    counter!("fhir_export_resources_written_total", "type" => kind.clone(), "storage" => storage)
        .increment(lines);
    counter!("fhir_export_bytes_written_total", "type" => kind, "storage" => storage)
        .increment(bytes);
    histogram!("fhir_export_part_write_seconds", "storage" => storage).record(took.as_secs_f64());
}
