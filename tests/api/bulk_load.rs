//! `load` into an empty store: one transaction that takes the store, writes frozen rows and
//! builds the indexes afterwards — and what happens around it.

use std::{io::Write, path::PathBuf, time::Duration};

use crate::common::{
    TestApp, TestDb, download_all, export_files, index_definitions, kick_off, resources_by_key,
    services::PgCluster, wait_manifest,
};
use chrono::{DateTime, Utc};
use fhir_export::cli::load::{self, LoadArgs, LoadReport};
use serde_json::json;
use sqlx::PgPool;

fn args() -> LoadArgs {
    LoadArgs {
        paths: vec![],
        skip_invalid: false,
        batch_size: 100,
        writers: 2,
        online: false,
        base_url: None,
    }
}

async fn load_into(app: &TestApp, files: Vec<PathBuf>) -> LoadReport {
    load::load_files(&app.pool, files, &args()).await.unwrap()
}

async fn scalar<T>(pool: &PgPool, sql: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// ndjson of Patients `p{i}`.
fn patient_lines(ids: std::ops::Range<u32>) -> String {
    ids.map(|i| {
        format!(
            "{}\n",
            json!({"resourceType": "Patient", "id": format!("p{i}")})
        )
    })
    .collect()
}

fn patients(dir: &std::path::Path, name: &str, ids: std::ops::Range<u32>) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, patient_lines(ids)).unwrap();
    path
}

#[tokio::test]
async fn a_load_into_the_empty_store_writes_frozen_numbered_rows_and_rebuilds_its_indexes() {
    let app = TestApp::spawn().await;
    let indexes = index_definitions(&app.pool).await;
    let data = tempfile::tempdir().unwrap();
    fhir_export::cli::generate::generate(&fhir_export::cli::generate::GenerateArgs {
        patients: 5,
        seed: 3,
        out: data.path().to_path_buf(),
    })
    .unwrap();
    let files = load::collect_files(&[data.path().to_path_buf()]).unwrap();
    let report = load_into(&app, files).await;
    assert!(report.bulk);
    let total = report.total() as i64;
    assert!(total > 1000, "{total}");

    // The same indexes and constraints as the migrations made.
    assert_eq!(index_definitions(&app.pool).await, indexes);
    // Every page all-visible with no vacuum, and statistics gathered.
    let (pages, visible): (i32, i32) =
        sqlx::query_as("SELECT relpages, relallvisible FROM pg_class WHERE relname = 'resources'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(pages > 0 && visible == pages, "{visible} of {pages}");
    // Numbers 1..n in the table's physical order; timestamps rising with them, and in the
    // stored JSON as in the columns; every row a current first version.
    let (min, max, distinct): (i64, i64, i64) =
        sqlx::query_as("SELECT min(seq), max(seq), count(DISTINCT seq) FROM resources")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((min, max, distinct), (1, total, total));
    let out_of_order: i64 = scalar(
        &app.pool,
        "SELECT count(*) FROM (
             SELECT seq, lag(seq) OVER (ORDER BY ctid) AS before_seq,
                    last_updated, lag(last_updated) OVER (ORDER BY ctid) AS before_time
             FROM resources) r
         WHERE before_seq >= seq OR before_time >= last_updated",
    )
    .await;
    assert_eq!(out_of_order, 0);
    let unstamped: i64 = scalar(
        &app.pool,
        "SELECT count(*) FROM resources
         WHERE NOT is_current OR version_id <> 1 OR body::jsonb #>> '{meta,versionId}' <> '1'
            OR (body::jsonb #>> '{meta,lastUpdated}')::timestamptz <> last_updated
            OR last_updated > now()",
    )
    .await;
    assert_eq!(unstamped, 0);

    // Later writes number on from there.
    let created = app
        .put_json(
            "/Patient/after",
            &json!({"resourceType": "Patient", "id": "after"}),
        )
        .await;
    assert_eq!(created.status(), 201);
    let seq: i64 = scalar(&app.pool, "SELECT seq FROM resources WHERE id = 'after'").await;
    assert_eq!(seq, total + 1);

    // A second load finds data: batches, and new versions of what is there.
    let again = load::load_files(
        &app.pool,
        vec![patients(data.path(), "more.ndjson", 0..3)],
        &args(),
    )
    .await
    .unwrap();
    assert!(!again.bulk);

    let exported = resources_by_key(&export_files(&app, "/$export").await);
    assert_eq!(exported.len() as i64, total + 1 + 3);
}

#[tokio::test]
async fn a_store_in_use_is_loaded_in_batches() {
    let app = TestApp::spawn().await;
    let data = tempfile::tempdir().unwrap();
    // A reader in the middle of a transaction keeps the store from being taken.
    let mut reader = app.pool.begin().await.unwrap();
    sqlx::query("SELECT count(*) FROM resources")
        .execute(&mut *reader)
        .await
        .unwrap();
    let report = load_into(&app, vec![patients(data.path(), "p.ndjson", 0..250)]).await;
    assert!(!report.bulk);
    assert_eq!(report.total(), 250);
    reader.commit().await.unwrap();
    let current: i64 = scalar(&app.pool, "SELECT count(*) FROM resources WHERE is_current").await;
    assert_eq!(current, 250);
}

#[tokio::test]
async fn writes_and_exports_meanwhile_wait_for_the_bulk_load_and_lose_nothing() {
    let app = TestApp::spawn().await;
    let data = tempfile::tempdir().unwrap();
    let (mut writer, loading) = start_piped_load(&app, data.path()).await;
    let first = patient_lines(0..300);
    writer.write_all(first.as_bytes()).unwrap();
    writer.flush().unwrap();
    // The first lines are read and stamped; then a write and an export arrive.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let put = {
        let (client, url) = (app.client.clone(), app.url("/Patient/meanwhile"));
        tokio::spawn(async move {
            client
                .put(url)
                .header("content-type", "application/fhir+json")
                .body(json!({"resourceType": "Patient", "id": "meanwhile"}).to_string())
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    let status_url = kick_off(&app, "/$export?_type=Patient").await;
    // The write waits for the store.
    wait_for_lock(&app.pool, "RowExclusiveLock", false).await;
    let rest = patient_lines(300..500);
    writer.write_all(rest.as_bytes()).unwrap();
    drop(writer);

    let report = loading.await.unwrap().unwrap();
    assert!(report.bulk);
    assert_eq!(report.total(), 500);
    assert_eq!(put.await.unwrap(), 201);
    let seq: i64 = scalar(
        &app.pool,
        "SELECT seq FROM resources WHERE id = 'meanwhile'",
    )
    .await;
    assert_eq!(seq, 501);

    // The export holds exactly what was stamped at or before its transaction time.
    let manifest = wait_manifest(&app, &status_url).await;
    let time: DateTime<Utc> = manifest["transactionTime"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut expected: Vec<String> = sqlx::query_scalar(
        "SELECT 'Patient/' || id FROM resources WHERE last_updated <= $1 ORDER BY 1",
    )
    .bind(time)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let exported: Vec<String> = resources_by_key(&download_all(&app, &manifest).await)
        .into_keys()
        .collect();
    expected.sort();
    assert_eq!(exported, expected);
    assert!(
        !exported.is_empty() && exported.len() < 500,
        "the export's time falls inside the load: {}",
        exported.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_load_leaves_the_store_empty_and_a_new_load_fills_it() {
    let cluster = PgCluster::start(&[]);
    let app = TestApp::spawn_on(TestDb::new_on(&cluster.url("postgres")).await, |_| {}).await;
    let indexes = index_definitions(&app.pool).await;
    let data = tempfile::tempdir().unwrap();
    let (mut writer, loading) = start_piped_load(&app, data.path()).await;
    writer.write_all(patient_lines(0..300).as_bytes()).unwrap();
    tokio::task::block_in_place(|| cluster.restart());
    writer
        .write_all(patient_lines(300..500).as_bytes())
        .unwrap();
    drop(writer);

    let error = loading
        .await
        .unwrap()
        .expect_err("the restart cut the load");
    assert!(format!("{error:#}").contains("left empty"), "{error:#}");
    let rows: i64 = scalar(&app.pool, "SELECT count(*) FROM resources").await;
    assert_eq!(rows, 0);
    assert_eq!(index_definitions(&app.pool).await, indexes);

    let report = load_into(&app, vec![patients(data.path(), "again.ndjson", 0..500)]).await;
    assert!(report.bulk);
    let (current, distinct_seqs): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT seq) FROM resources WHERE is_current")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((current, distinct_seqs), (500, 500));
    assert_eq!(index_definitions(&app.pool).await, indexes);
}

/// Starts a load whose input is a pipe, so the test decides when its lines arrive; returns
/// once the load holds the store, with the pipe's writing end.
async fn start_piped_load(
    app: &TestApp,
    dir: &std::path::Path,
) -> (
    std::fs::File,
    tokio::task::JoinHandle<anyhow::Result<LoadReport>>,
) {
    let pipe = dir.join("patients.ndjson");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&pipe)
            .status()
            .unwrap()
            .success()
    );
    let loading = {
        let (pool, files) = (app.pool.clone(), vec![pipe.clone()]);
        tokio::spawn(async move { load::load_files(&pool, files, &args()).await })
    };
    wait_for_lock(&app.pool, "AccessExclusiveLock", true).await;
    let writer =
        tokio::task::spawn_blocking(move || std::fs::OpenOptions::new().write(true).open(pipe))
            .await
            .unwrap()
            .unwrap();
    (writer, loading)
}

/// Waits until some connection holds (`granted`) or waits for a lock of `mode` on `resources`.
async fn wait_for_lock(pool: &PgPool, mode: &str, granted: bool) {
    for _ in 0..600 {
        let found: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks
                 WHERE relation = 'resources'::regclass AND mode = $1 AND granted = $2)",
        )
        .bind(mode)
        .bind(granted)
        .fetch_one(pool)
        .await
        .unwrap();
        if found {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no {mode} (granted: {granted}) on resources");
}
