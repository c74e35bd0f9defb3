//! Reads from a streaming-replication standby (`database.read_url`): pages come from the standby
//! only once it has replayed past the job's snapshot; a lagging, paused or dead standby holds
//! the plan for at most `read_max_wait_secs`, then the job reads from the primary. Each test runs
//! a private primary and a `pg_basebackup -R` standby of it, and checks every byte of output
//! against the primary's current rows.

use std::{collections::BTreeMap, time::Duration};

use crate::common::{services::*, *};
use serde_json::{Value, json};
use sqlx::PgPool;

/// Every current resource on the primary, by `Type/id`.
async fn primary_contents(pool: &PgPool) -> BTreeMap<String, Value> {
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT resource_type, id, body FROM resources WHERE is_current AND body IS NOT NULL",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(t, id, body)| (format!("{t}/{id}"), serde_json::from_str(&body).unwrap()))
        .collect()
}

/// Where the job's export tasks read from.
async fn read_sources(app: &TestApp) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT DISTINCT read_source::text FROM export_tasks
         WHERE kind <> 'plan' AND read_source IS NOT NULL ORDER BY 1",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

/// A cluster and its standby, with the test database on both.
async fn primary_and_standby() -> (PgCluster, PgCluster, TestDb) {
    let primary = PgCluster::start(&[]);
    let db = TestDb::new_on(&primary.url("postgres")).await;
    let standby = tokio::task::block_in_place(|| PgCluster::standby_of(&primary, &[]));
    (primary, standby, db)
}

/// Stops the standby's replay; returns a connection pool to it.
async fn pause_replay(standby_url: &str) -> PgPool {
    let pool = PgPool::connect(standby_url).await.unwrap();
    sqlx::query("SELECT pg_wal_replay_pause()")
        .execute(&pool)
        .await
        .unwrap();
    pool
}

async fn create_patient(app: &TestApp, id: &str) {
    let response = app
        .put_json(
            &format!("/Patient/{id}"),
            &json!({"resourceType": "Patient", "id": id, "gender": "other"}),
        )
        .await;
    assert!(response.status().is_success(), "{}", response.status());
}

/// Status responses until the manifest, collecting every X-Progress seen.
async fn manifest_and_progress(app: &TestApp, status_url: &str) -> (Value, Vec<String>) {
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let response = app.client.get(status_url).send().await.unwrap();
        match response.status().as_u16() {
            200 => return (json(response).await, seen),
            202 => {
                if let Some(p) = response.headers().get("x-progress") {
                    seen.push(p.to_str().unwrap().to_string());
                }
            }
            other => panic!("status {other}: {}", response.text().await.unwrap()),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no manifest: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_read_from_the_standby_once_it_has_replayed_the_snapshot() {
    let (_primary, standby, db) = primary_and_standby().await;
    let name = db.name.clone();
    let standby_url = standby.url(&name);
    let app = TestApp::spawn_on(db, |c| {
        c.database.read_url = standby_url.clone();
        c.database.read_max_wait_secs = 120;
        c.export.part_size = 40;
    })
    .await;
    load_generated(&app, 2).await;

    // Replay stops: a patient written now exists on the primary only.
    let standby_pool = pause_replay(&standby_url).await;
    create_patient(&app, "written-while-replay-paused").await;

    let status_url = kick_off(&app, "/$export").await;
    // The plan waits for the standby and says so.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let response = app.client.get(&status_url).send().await.unwrap();
        assert_eq!(
            response.status(),
            202,
            "finished while the standby was behind"
        );
        let progress = response.headers()["x-progress"]
            .to_str()
            .unwrap()
            .to_string();
        if progress.starts_with("planning: waiting for the read standby to replay") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "last: {progress}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let response = app.client.get(&status_url).send().await.unwrap();
    assert_eq!(
        response.status(),
        202,
        "finished while the standby was behind"
    );
    sqlx::query("SELECT pg_wal_replay_resume()")
        .execute(&standby_pool)
        .await
        .unwrap();

    let (manifest, _) = manifest_and_progress(&app, &status_url).await;
    let got = resources_by_key(&download_all(&app, &manifest).await);
    let expected = primary_contents(&app.pool).await;
    assert!(got.contains_key("Patient/written-while-replay-paused"));
    assert_eq!(got, expected);
    assert_eq!(read_sources(&app).await, ["standby"]);
    // The pages really came through connections to the standby.
    let standby_backends: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'fhir-export'",
    )
    .bind(&name)
    .fetch_one(&standby_pool)
    .await
    .unwrap();
    assert!(standby_backends > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_that_stays_behind_is_waited_for_only_within_the_bound() {
    let (_primary, standby, db) = primary_and_standby().await;
    let standby_url = standby.url(&db.name);
    let app = TestApp::spawn_on(db, |c| {
        c.database.read_url = standby_url.clone();
        c.database.read_max_wait_secs = 1;
    })
    .await;
    load_generated(&app, 1).await;
    pause_replay(&standby_url).await;
    create_patient(&app, "only-on-the-primary").await;

    let status_url = kick_off(&app, "/$export").await;
    let (manifest, progress) = manifest_and_progress(&app, &status_url).await;
    let got = resources_by_key(&download_all(&app, &manifest).await);
    assert!(got.contains_key("Patient/only-on-the-primary"));
    assert_eq!(got, primary_contents(&app.pool).await);
    assert_eq!(read_sources(&app).await, ["primary"]);
    assert!(
        progress
            .iter()
            .any(|p| p.contains("waiting for the read standby")),
        "{progress:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_that_dies_mid_export_hands_over_to_the_primary() {
    let (_primary, standby, db) = primary_and_standby().await;
    let standby_url = standby.url(&db.name);
    let app = TestApp::spawn_on(db, |c| {
        c.database.read_url = standby_url.clone();
        c.database.read_max_wait_secs = 30;
        c.export.workers = 2;
        c.export.part_size = 20;
        c.export.throttle_ms = 150;
        c.export.max_attempts = 1;
    })
    .await;
    load_generated(&app, 2).await;
    let status_url = kick_off(&app, "/$export?_type=Observation,Patient").await;
    wait_for_parts(&app.pool, 2).await;
    drop(standby); // stopped with -m immediate: its connections break mid-page

    let (manifest, progress) = manifest_and_progress(&app, &status_url).await;
    let got = resources_by_key(&download_all(&app, &manifest).await);
    let expected: BTreeMap<String, Value> = primary_contents(&app.pool)
        .await
        .into_iter()
        .filter(|(k, _)| k.starts_with("Observation/") || k.starts_with("Patient/"))
        .collect();
    assert_eq!(got, expected);
    assert!(read_sources(&app).await.contains(&"primary".to_string()));
    assert!(
        progress
            .iter()
            .any(|p| p.contains("reading from the primary")),
        "{progress:?}"
    );
    assert_eq!(
        task_failures(&app.pool).await,
        0,
        "a dead standby spent an attempt"
    );
}
