//! Faults that go away by themselves spend no attempt: with `max_attempts = 1`, an export rides
//! out a Postgres restart and a storage pause longer than its stale period, and its output stays
//! exact. Each test breaks services of its own (a private cluster, a private Azurite).

mod common;

use std::time::Duration;

use common::{services::*, *};
use serde_json::Value;

/// Polls a status URL through 503s (the database restarting) until the manifest is there.
async fn manifest_through_outages(app: &TestApp, status_url: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(response) = app.client.get(status_url).send().await {
            match response.status().as_u16() {
                200 => return json(response).await,
                202 | 503 => {}
                other => panic!("status {other}: {}", response.text().await.unwrap()),
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the export never finished"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn expected_ids(loaded: &std::collections::BTreeMap<String, Vec<Value>>, t: &str) -> Vec<String> {
    let mut ids: Vec<String> = loaded[t]
        .iter()
        .map(|r| format!("{t}/{}", r["id"].as_str().unwrap()))
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_export_spends_no_attempt() {
    let cluster = PgCluster::start(&[]);
    let db = TestDb::new_on(&cluster.url("postgres")).await;
    let app = TestApp::spawn_on(db, |c| {
        c.export.workers = 2;
        c.export.part_size = 20;
        c.export.throttle_ms = 150;
        c.export.max_attempts = 1;
    })
    .await;
    let loaded = load_generated(&app, 1).await;
    let status_url = kick_off(&app, "/$export?_type=Observation").await;
    wait_for_parts(&app.pool, 2).await;
    tokio::task::block_in_place(|| cluster.restart());

    let manifest = manifest_through_outages(&app, &status_url).await;
    let files = download_all(&app, &manifest).await;
    let got: Vec<String> = resources_by_key(&files).into_keys().collect();
    assert_eq!(got, expected_ids(&loaded, "Observation"));
    assert_eq!(
        task_failures(&app.pool).await,
        0,
        "a restart spent an attempt"
    );
    // The API answered through it: a new export right after works too.
    let again = kick_off(&app, "/$export?_type=Patient").await;
    manifest_through_outages(&app, &again).await;
}

#[tokio::test]
async fn a_storage_paused_past_the_stale_period_spends_no_attempt() {
    let azurite = Azurite::start().await;
    let app = TestApp::spawn_with(|c| {
        c.export.workers = 2;
        c.export.part_size = 20;
        c.export.throttle_ms = 100;
        c.export.max_attempts = 1;
        c.export.stale_after_secs = 3;
        c.storage.kind = fhir_export::config::StorageKind::Azure;
        c.storage.azure.connection_string = azurite.connection_string();
    })
    .await;
    let loaded = load_generated(&app, 1).await;
    let status_url = kick_off(&app, "/$export?_type=Observation").await;
    wait_for_parts(&app.pool, 2).await;
    azurite.process.signal("-STOP");
    // Writers are stuck on the storage meanwhile; their heartbeats keep their leases.
    tokio::time::sleep(Duration::from_secs(8)).await;
    azurite.process.signal("-CONT");

    let manifest = manifest_through_outages(&app, &status_url).await;
    let files = download_all(&app, &manifest).await;
    let got: Vec<String> = resources_by_key(&files).into_keys().collect();
    assert_eq!(got, expected_ids(&loaded, "Observation"));
    assert_eq!(
        task_failures(&app.pool).await,
        0,
        "a storage pause spent an attempt"
    );
}
