//! Faults that go away by themselves spend no attempt: with `max_attempts = 1`, an export rides
//! out a Postgres restart and a storage pause longer than its stale period, and its output stays
//! exact. Each test breaks services of its own (a private cluster, a private Azurite).

use std::time::Duration;

use crate::common::{services::*, *};
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
        c.storage.kind = fhir_export::storage::config::StorageKind::Azure;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgres_down_every_request_is_answered_503_at_once() {
    let cluster = PgCluster::start(&[]);
    let db = TestDb::new_on(&cluster.url("postgres")).await;
    let app = TestApp::spawn_on(db, |c| c.export.workers = 1).await;
    let patient = serde_json::json!({"resourceType": "Patient", "id": "p1"});
    assert_eq!(app.put_json("/Patient/p1", &patient).await.status(), 201);
    tokio::task::block_in_place(|| cluster.stop());

    // Within two seconds the server knows; from then on each answer comes at once.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while app.get("/health").await.status() != 503 {
        assert!(std::time::Instant::now() < deadline, "health never noticed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..3 {
        for (method, path) in [
            ("GET", "/health"),
            ("GET", "/Patient/p1"),
            ("GET", "/$export"),
            ("PUT", "/Patient/p1"),
        ] {
            let started = std::time::Instant::now();
            let request = app
                .client
                .request(method.parse().unwrap(), app.url(path))
                .header("accept", "application/fhir+json")
                .header("prefer", "respond-async")
                .header("content-type", "application/fhir+json")
                .body(patient.to_string());
            let response = request.send().await.unwrap();
            let took = started.elapsed();
            assert_eq!(response.status(), 503, "{method} {path}");
            assert!(
                took < Duration::from_secs(2),
                "{method} {path} took {took:?}"
            );
            if path != "/health" {
                assert!(response.headers().contains_key("retry-after"));
                assert_outcome(response, 503).await;
            }
        }
    }
    // Metadata needs no database.
    assert_eq!(app.get("/metadata").await.status(), 200);
    // The image's health check says so too.
    let (healthy, said) = health_command(&app.base).await;
    assert!(!healthy && said.contains("503"), "{said}");

    tokio::task::block_in_place(|| cluster.start_again(&[]));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while app.get("/Patient/p1").await.status() != 200 {
        assert!(std::time::Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(app.get("/health").await.status(), 200);
    let (healthy, said) = health_command(&app.base).await;
    assert!(healthy, "{said}");
}

/// `fhir-export health --url BASE`: whether it exited 0, and what it printed.
async fn health_command(base_url: &str) -> (bool, String) {
    let output = tokio::process::Command::new(binary())
        .args(["health", "--url", base_url])
        .env_remove("FHIR_EXPORT_CONFIG")
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), said)
}

#[tokio::test]
async fn a_fault_that_never_goes_away_is_reported_and_spends_the_attempt_in_the_end() {
    let azurite = Azurite::start().await;
    let app = TestApp::spawn_with(|c| {
        c.export.workers = 1;
        c.export.part_size = 20;
        c.export.throttle_ms = 100;
        c.export.max_attempts = 1;
        c.export.stale_after_secs = 2;
        c.storage.kind = fhir_export::storage::config::StorageKind::Azure;
        c.storage.azure.connection_string = azurite.connection_string();
    })
    .await;
    load_generated(&app, 1).await;
    let status_url = kick_off(&app, "/$export?_type=Observation").await;
    wait_for_parts(&app.pool, 2).await;
    azurite.process.signal("-STOP");
    // The worker's task stops moving on: health says so (beside the storage) after a stale period.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let body = json(app.get("/health").await).await;
        if body["workers"].as_str().unwrap().contains("not moved on") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "health never said the work stopped: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A write with no answer fails (transiently) after 30 s; ten stale periods of such faults
    // spend the attempt: the job fails instead of waiting for ever, though its heartbeats kept
    // the lease.
    let deadline = std::time::Instant::now() + Duration::from_secs(150);
    let failed = loop {
        let response = app.client.get(&status_url).send().await.unwrap();
        if response.status() == 500 {
            break response;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a lasting fault was retried for ever"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_outcome(failed, 500).await;
    let error: String = sqlx::query_scalar("SELECT error FROM export_jobs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(error.contains("stale periods"), "{error}");
    azurite.process.signal("-CONT");
}
