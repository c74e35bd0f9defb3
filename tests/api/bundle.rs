//! Transaction and batch Bundles.

use crate::common::{TestApp, assert_outcome, json};
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

/// A transaction refused while its COPY is open leaves nothing holding on: the next write of
/// the resource it had locked goes through at once.
#[tokio::test]
async fn a_transaction_refused_mid_copy_lets_go_of_what_it_locked() {
    let app = TestApp::spawn().await;
    let patient = json!({"resourceType": "Patient", "id": "p1"});
    assert_eq!(app.put_json("/Patient/p1", &patient).await.status(), 201);
    let refused = bundle(
        "transaction",
        vec![
            entry("PUT", "Patient/p1", None, Some(patient.clone())),
            entry(
                "POST",
                "Observation",
                None,
                Some(json!({"resourceType": "Nope"})),
            ),
        ],
    );
    let delete = bundle("batch", vec![entry("DELETE", "Patient/p1", None, None)]);
    for _ in 0..10 {
        assert_outcome(app.post_json("/", &refused).await, 400).await;
        let started = std::time::Instant::now();
        assert_eq!(app.post_json("/", &delete).await.status(), 200);
        assert_eq!(app.put_json("/Patient/p1", &patient).await.status(), 201);
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }
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

/// A transaction of thousands of entries: new resources, updates, re-creations of deleted ones,
/// server-assigned ids, an `If-Match` update and a deletion, each answered with its own version
/// and a timestamp of its own, and stored as exactly that version.
#[tokio::test]
async fn a_large_transaction_gives_each_entry_its_next_version() {
    let app = TestApp::spawn().await;
    let patient = |id: &str, family: &str| json!({"resourceType": "Patient", "id": id, "name": [{"family": family}]});
    let put = |r: Value| {
        let url = format!("Patient/{}", r["id"].as_str().unwrap());
        entry("PUT", &url, None, Some(r))
    };
    let before: Vec<Value> = (0..200)
        .map(|i| put(patient(&format!("p{i}"), "Before")))
        .collect();
    assert_eq!(
        app.post_json("/", &bundle("transaction", before))
            .await
            .status(),
        200
    );
    for i in 0..10 {
        assert_eq!(app.delete(&format!("/Patient/p{i}")).await.status(), 204);
    }

    let mut entries: Vec<Value> = (0..200)
        .map(|i| put(patient(&format!("p{i}"), "After")))
        .collect();
    entries.extend((0..2_700).map(|i| put(patient(&format!("q{i}"), "New"))));
    entries.extend((0..100).map(|i| {
        let observation = json!({"resourceType": "Observation", "status": "final",
            "code": {"text": format!("o{i}")}, "subject": {"reference": "Patient/p150"}});
        entry("POST", "Observation", None, Some(observation))
    }));
    let mut guarded = put(patient("p199", "Guarded"));
    guarded["request"]["ifMatch"] = json!("W/\"1\"");
    entries[199] = guarded;
    entries.push(entry("DELETE", "Patient/p198", None, None));
    entries.remove(198);
    let response = app
        .post_json("/", &bundle("transaction", entries.clone()))
        .await;
    assert_eq!(response.status(), 200);
    let answered = json(response).await["entry"].as_array().unwrap().clone();
    assert_eq!(answered.len(), entries.len());

    let mut stamps = std::collections::HashSet::new();
    for (sent, got) in entries.iter().zip(&answered) {
        let url = sent["request"]["url"].as_str().unwrap();
        let response = &got["response"];
        if sent["request"]["method"] == "DELETE" {
            assert_eq!(response["status"], "204 No Content", "{url}");
            continue;
        }
        let id = url.strip_prefix("Patient/").unwrap_or("");
        let (status, version) = match id.strip_prefix('p').map(|n| n.parse::<u32>().unwrap()) {
            Some(n) if n < 10 => ("201 Created", 3), // deleted before: created again
            Some(_) => ("200 OK", 2),
            None => ("201 Created", 1),
        };
        assert_eq!(response["status"], status, "{url}");
        assert_eq!(response["etag"], format!("W/\"{version}\""), "{url}");
        let location = response["location"].as_str().unwrap();
        assert!(
            location.ends_with(&format!("/_history/{version}")),
            "{location}"
        );
        let last_modified = response["lastModified"].as_str().unwrap().to_string();
        assert!(
            stamps.insert(last_modified.clone()),
            "{url}: a timestamp of its own"
        );
        // Stored as answered.
        let path = location.split("/_history").next().unwrap();
        let stored = json(app.get(&format!("/{path}")).await).await;
        assert_eq!(stored["meta"]["versionId"], version.to_string(), "{url}");
        assert_eq!(stored["meta"]["lastUpdated"], last_modified, "{url}");
        if let Some(resource) = sent.get("resource").filter(|_| !id.is_empty()) {
            assert_eq!(stored["name"], resource["name"], "{url}");
        }
    }
    assert_eq!(app.get("/Patient/p198").await.status(), 410);

    // One current row per resource, versions without gaps.
    let (resources, broken): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE versions <> last OR currents <> 1)
         FROM (SELECT count(*) AS versions, max(version_id) AS last,
                      count(*) FILTER (WHERE is_current) AS currents
               FROM resources GROUP BY resource_type, id) r",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((resources, broken), (200 + 2_700 + 100, 0));
}

/// A transaction of 5,000 entries or more is a bulk load: the store is vacuumed after it (with
/// autovacuum off here), so the first export reads its pages as fast as the next. Two sent
/// back to back are both covered: the second ends while the vacuum for the first is due.
#[tokio::test]
async fn large_transactions_leave_their_pages_all_visible() {
    let app = TestApp::spawn().await;
    sqlx::query("ALTER TABLE resources SET (autovacuum_enabled = false)")
        .execute(&app.pool)
        .await
        .unwrap();
    for round in 0..2 {
        let entries: Vec<Value> = (0..5_000)
            .map(|i| {
                let id = format!("v{round}-{i}");
                let patient = json!({"resourceType": "Patient", "id": id});
                entry("PUT", &format!("Patient/{id}"), None, Some(patient))
            })
            .collect();
        let response = app.post_json("/", &bundle("transaction", entries)).await;
        assert_eq!(response.status(), 200);
    }
    for _ in 0..300 {
        let (pages, visible): (i32, i32) = sqlx::query_as(
            "SELECT relpages, relallvisible FROM pg_class WHERE relname = 'resources'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if pages > 0 && visible == pages {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the store was not vacuumed after the transaction");
}

/// Resources are stored as one compact line however the client laid the Bundle out, with
/// what escapes they hold intact; entries the fast way leaves (a repeated element) are stored
/// the full way, and one bad resource among many fails the transaction by its position.
#[tokio::test]
async fn a_laid_out_transaction_is_stored_compact_and_checked_entry_by_entry() {
    let app = TestApp::spawn().await;
    let mut entries: Vec<Value> = (0..1_500)
        .map(|i| {
            let observation = json!({
                "resourceType": "Observation", "id": format!("o{i}"), "status": "final",
                "code": {"text": "a \"quoted\" \\ line\nand é"},
                "subject": {"reference": "urn:uuid:pat"},
            });
            entry("PUT", &format!("Observation/o{i}"), None, Some(observation))
        })
        .collect();
    entries.push(entry(
        "POST",
        "Patient",
        Some("urn:uuid:pat"),
        Some(json!({"resourceType": "Patient", "gender": "male"})),
    ));
    let laid_out = serde_json::to_string_pretty(&bundle("transaction", entries.clone())).unwrap();
    // A repeated element, which only the full way takes (the last one wins).
    let repeated = laid_out.replacen(
        "\"status\": \"final\"",
        "\"status\": \"preliminary\", \"status\": \"final\"",
        1,
    );
    assert_ne!(repeated, laid_out);
    let post = |body: String| {
        app.client
            .post(app.url("/"))
            .header("content-type", "application/fhir+json")
            .body(body)
            .send()
    };
    let response = post(repeated).await.unwrap();
    assert_eq!(response.status(), 200);
    let patient: String = sqlx::query_scalar(
        "SELECT id FROM resources WHERE resource_type = 'Patient' AND is_current",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let bodies: Vec<(String, Vec<String>, String)> = sqlx::query_as(
        "SELECT id, patient_ids, body FROM resources WHERE resource_type = 'Observation'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(bodies.len(), 1_500);
    for (id, patient_ids, body) in &bodies {
        assert!(!body.contains('\n') && !body.contains(": "), "{body}");
        let stored: Value = serde_json::from_str(body).unwrap();
        assert_eq!(stored["id"], json!(id));
        assert_eq!(stored["status"], "final");
        assert_eq!(stored["code"]["text"], "a \"quoted\" \\ line\nand é");
        assert_eq!(stored["subject"]["reference"], format!("Patient/{patient}"));
        assert_eq!(patient_ids, std::slice::from_ref(&patient));
    }

    // One resource of another type than its URL says, written last (its id sorts last), so
    // that the COPY has taken the others when it is found: nothing is written.
    entries[999]["resource"]["resourceType"] = json!("Patient");
    let before = count(&app).await;
    let response =
        post(serde_json::to_string_pretty(&bundle("transaction", entries.clone())).unwrap())
            .await
            .unwrap();
    let message = assert_outcome(response, 400).await;
    assert!(message.contains("Bundle.entry[999]"), "{message}");
    assert_eq!(count(&app).await, before);
    let response = app
        .put_json("/Observation/o0", &entries[0]["resource"])
        .await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn an_invalid_entry_refuses_the_transaction_by_its_position() {
    let app = TestApp::spawn().await;
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "id": "a"},
         "request": {"method": "PUT", "url": "Patient/a"}},
        {"resource": {"resourceType": "Patient", "id": "b", "birthDate": "yesterday"},
         "request": {"method": "PUT", "url": "Patient/b"}},
        {"resource": {"resourceType": "Patient", "name": {"family": "Single"}},
         "request": {"method": "POST", "url": "Patient"}}]});
    let response = app.post_json("/", &bundle).await;
    assert_eq!(response.status(), 400);
    let body = json(response).await;
    let issue = &body["issue"][0];
    assert_eq!(issue["expression"][0], "Patient.birthDate");
    assert!(
        issue["diagnostics"]
            .as_str()
            .unwrap()
            .starts_with("Bundle.entry[1]"),
        "{body}"
    );
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM resources")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0);
    // Without the bad entry it goes through; the single `name` is stored as an array.
    let mut fixed = bundle.clone();
    fixed["entry"].as_array_mut().unwrap().remove(1);
    let response = app.post_json("/", &fixed).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let names: Vec<Value> = sqlx::query_scalar(
        "SELECT (body::jsonb)->'name' FROM resources WHERE resource_type = 'Patient' AND id <> 'a'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(names, vec![json!([{"family": "Single"}])]);
}
