//! Transaction and batch Bundles.

mod common;

use common::{TestApp, assert_outcome, json};
use serde_json::{Value, json};

fn entry(method: &str, url: &str, full_url: Option<&str>, resource: Option<Value>) -> Value {
    let mut e = json!({"request": {"method": method, "url": url}});
    if let Some(f) = full_url {
        e["fullUrl"] = json!(f);
    }
    if let Some(r) = resource {
        e["resource"] = r;
    }
    e
}

fn bundle(kind: &str, entries: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": kind, "entry": entries})
}

async fn count(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM resources")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn transaction_resolves_urn_uuid_references() {
    let app = TestApp::spawn().await;
    let b = bundle(
        "transaction",
        vec![
            entry(
                "POST",
                "Observation",
                Some("urn:uuid:obs"),
                Some(json!({
            "resourceType": "Observation", "status": "final", "code": {"text": "hr"},
            "subject": {"reference": "urn:uuid:pat"}})),
            ),
            entry(
                "POST",
                "Patient",
                Some("urn:uuid:pat"),
                Some(json!({"resourceType": "Patient"})),
            ),
            entry(
                "PUT",
                "Organization/org1",
                Some("urn:uuid:org"),
                Some(json!({
            "resourceType": "Organization", "id": "org1"})),
            ),
        ],
    );
    let response = app.post_json("/", &b).await;
    assert_eq!(response.status(), 200);
    let body = json(response).await;
    assert_eq!(body["type"], "transaction-response");
    let entries = body["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[0]["response"]["status"], "201 Created");
    let patient_location = entries[1]["response"]["location"].as_str().unwrap();
    let patient_ref = patient_location.split("/_history").next().unwrap();
    let obs_location = entries[0]["response"]["location"].as_str().unwrap();
    let obs_path = obs_location.split("/_history").next().unwrap();
    let obs = json(app.get(&format!("/{obs_path}")).await).await;
    assert_eq!(obs["subject"]["reference"], patient_ref);
    assert_eq!(app.get("/Organization/org1").await.status(), 200);
}

#[tokio::test]
async fn a_failing_transaction_leaves_nothing_behind() {
    let app = TestApp::spawn().await;
    app.put_json(
        "/Patient/keep",
        &json!({"resourceType": "Patient", "id": "keep"}),
    )
    .await;
    let before = count(&app).await;
    let b = bundle(
        "transaction",
        vec![
            entry(
                "PUT",
                "Patient/a",
                None,
                Some(json!({"resourceType": "Patient", "id": "a"})),
            ),
            entry("DELETE", "Patient/keep", None, None),
            entry(
                "POST",
                "Patient",
                None,
                Some(json!({"resourceType": "Observation"})),
            ),
        ],
    );
    let message = assert_outcome(app.post_json("/", &b).await, 400).await;
    assert!(message.contains("entry[2]"), "{message}");
    assert_eq!(count(&app).await, before);
    assert_eq!(app.get("/Patient/keep").await.status(), 200);
    assert_outcome(app.get("/Patient/a").await, 404).await;

    let twice = bundle(
        "transaction",
        vec![
            entry(
                "PUT",
                "Patient/a",
                None,
                Some(json!({"resourceType": "Patient", "id": "a"})),
            ),
            entry(
                "PUT",
                "Patient/a",
                None,
                Some(json!({"resourceType": "Patient", "id": "a"})),
            ),
        ],
    );
    assert!(
        assert_outcome(app.post_json("/", &twice).await, 400)
            .await
            .contains("more than once")
    );
    let get = bundle(
        "transaction",
        vec![entry("GET", "Patient/keep", None, None)],
    );
    assert_outcome(app.post_json("/", &get).await, 400).await;
    assert_eq!(count(&app).await, before);
}

#[tokio::test]
async fn batch_entries_succeed_or_fail_on_their_own() {
    let app = TestApp::spawn().await;
    let b = bundle(
        "batch",
        vec![
            entry(
                "PUT",
                "Patient/a",
                None,
                Some(json!({"resourceType": "Patient", "id": "a"})),
            ),
            entry(
                "PUT",
                "Patient/b",
                None,
                Some(json!({"resourceType": "Patient", "id": "zzz"})),
            ),
            entry("DELETE", "Patient/a", None, None),
        ],
    );
    let response = app.post_json("/", &b).await;
    assert_eq!(response.status(), 200);
    let body = json(response).await;
    assert_eq!(body["type"], "batch-response");
    assert_eq!(body["entry"][0]["response"]["status"], "201 Created");
    assert_eq!(body["entry"][1]["response"]["status"], "400 Bad Request");
    assert_eq!(
        body["entry"][1]["response"]["outcome"]["resourceType"],
        "OperationOutcome"
    );
    assert_eq!(body["entry"][2]["response"]["status"], "204 No Content");
    assert_eq!(app.get("/Patient/a").await.status(), 410);
    assert_eq!(app.get("/Patient/b").await.status(), 404);
}

#[tokio::test]
async fn only_transaction_and_batch_bundles_are_accepted() {
    let app = TestApp::spawn().await;
    assert_outcome(app.post_json("/", &bundle("collection", vec![])).await, 400).await;
    assert_outcome(
        app.post_json("/", &json!({"resourceType": "Patient"}))
            .await,
        400,
    )
    .await;
    let bad_entries = json!({"resourceType": "Bundle", "type": "batch", "entry": 5});
    assert_outcome(app.post_json("/", &bad_entries).await, 400).await;
}
