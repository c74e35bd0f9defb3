//! FHIR REST interactions, validation and error responses, over real HTTP and Postgres.

use crate::common::{TestApp, assert_outcome, json};
use reqwest::Method;
use serde_json::{Value, json};

fn patient(id: Option<&str>) -> Value {
    let mut p = json!({"resourceType": "Patient", "name": [{"family": "Test"}], "active": true});
    if let Some(id) = id {
        p["id"] = json!(id);
    }
    p
}

#[tokio::test]
async fn create_assigns_id_version_and_location() {
    let app = TestApp::spawn().await;
    let response = app.post_json("/Patient", &patient(Some("ignored"))).await;
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["etag"], "W/\"1\"");
    assert!(response.headers().contains_key("last-modified"));
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let body = json(response).await;
    let id = body["id"].as_str().unwrap().to_string();
    assert_ne!(id, "ignored");
    assert_eq!(location, app.url(&format!("/Patient/{id}/_history/1")));
    assert_eq!(body["meta"]["versionId"], "1");
    assert!(body["meta"]["lastUpdated"].as_str().unwrap().ends_with('Z'));

    let read = app.get(&format!("/Patient/{id}")).await;
    assert_eq!(read.status(), 200);
    assert_eq!(read.headers()["content-type"], "application/fhir+json");
    assert_eq!(json(read).await, body);
}

#[tokio::test]
async fn update_creates_then_versions_with_increasing_timestamps() {
    let app = TestApp::spawn().await;
    let first = app.put_json("/Patient/p1", &patient(Some("p1"))).await;
    assert_eq!(first.status(), 201);
    let first = json(first).await;
    let second = app.put_json("/Patient/p1", &patient(Some("p1"))).await;
    assert_eq!(second.status(), 200);
    assert_eq!(second.headers()["etag"], "W/\"2\"");
    let second = json(second).await;
    assert_eq!(second["meta"]["versionId"], "2");
    let t1 = first["meta"]["lastUpdated"].as_str().unwrap();
    let t2 = second["meta"]["lastUpdated"].as_str().unwrap();
    assert!(t2 > t1, "{t2} must be after {t1}");

    let v1 = json(app.get("/Patient/p1/_history/1").await).await;
    assert_eq!(v1, first);
    assert_eq!(json(app.get("/Patient/p1").await).await, second);
}

#[tokio::test]
async fn delete_leaves_a_tombstone_and_history() {
    let app = TestApp::spawn().await;
    app.put_json("/Patient/p1", &patient(Some("p1"))).await;
    let deleted = app.delete("/Patient/p1").await;
    assert_eq!(deleted.status(), 204);
    assert_eq!(deleted.headers()["etag"], "W/\"2\"");
    assert_outcome(app.get("/Patient/p1").await, 410).await;
    assert_outcome(app.get("/Patient/p1/_history/2").await, 410).await;
    assert_eq!(app.get("/Patient/p1/_history/1").await.status(), 200);

    // Deleting again, or deleting what never existed, deletes nothing.
    assert_outcome(app.delete("/Patient/p1").await, 200).await;
    assert_outcome(app.delete("/Patient/never").await, 200).await;

    // Re-creating after a delete is a create, with the next version number.
    let again = app.put_json("/Patient/p1", &patient(Some("p1"))).await;
    assert_eq!(again.status(), 201);
    assert_eq!(json(again).await["meta"]["versionId"], "3");
}

#[tokio::test]
async fn reads_of_unknown_things_are_404_or_400() {
    let app = TestApp::spawn().await;
    assert_outcome(app.get("/Patient/nope").await, 404).await;
    assert_outcome(app.get("/Patient/nope/_history/1").await, 404).await;
    app.put_json("/Patient/p1", &patient(Some("p1"))).await;
    assert_outcome(app.get("/Patient/p1/_history/9").await, 404).await;
    assert_outcome(app.get("/Patient/p1/_history/abc").await, 400).await;
    assert_outcome(app.get("/Patient/p1/_history/0").await, 400).await;
    assert_outcome(app.get("/Patient/bad_id!").await, 400).await;
    assert_outcome(app.get("/Unicorn/1").await, 404).await;
    assert_outcome(app.get("/no/such/route/here").await, 404).await;
}

#[tokio::test]
async fn invalid_bodies_are_rejected_with_operation_outcomes() {
    let app = TestApp::spawn().await;
    let wrong_type = app
        .post_json("/Patient", &json!({"resourceType": "Observation"}))
        .await;
    assert!(
        assert_outcome(wrong_type, 400)
            .await
            .contains("does not match")
    );
    let unknown_type = app
        .post_json("/Patient", &json!({"resourceType": "Unicorn"}))
        .await;
    assert!(
        assert_outcome(unknown_type, 400)
            .await
            .contains("not an R4 resource type")
    );
    let missing = app.post_json("/Patient", &json!({"name": []})).await;
    assert!(assert_outcome(missing, 400).await.contains("resourceType"));
    assert_outcome(app.post_json("/Patient", &json!([1, 2])).await, 400).await;
    assert_outcome(
        app.post_json("/Unicorn", &json!({"resourceType": "Unicorn"}))
            .await,
        404,
    )
    .await;
    let bad_id = app.put_json("/Patient/a", &patient(Some("a b"))).await;
    assert!(assert_outcome(bad_id, 400).await.contains("id"));
    let long_id = "x".repeat(65);
    let long = app
        .put_json(&format!("/Patient/{long_id}"), &patient(Some(&long_id)))
        .await;
    assert_outcome(long, 400).await;
    let mismatch = app.put_json("/Patient/a", &patient(Some("b"))).await;
    assert!(
        assert_outcome(mismatch, 400)
            .await
            .contains("does not match")
    );
    let no_id = app.put_json("/Patient/a", &patient(None)).await;
    assert_outcome(no_id, 400).await;

    let malformed = app
        .client
        .post(app.url("/Patient"))
        .header("content-type", "application/fhir+json")
        .body("{\"resourceType\": ")
        .send()
        .await
        .unwrap();
    assert!(
        assert_outcome(malformed, 400)
            .await
            .contains("not valid JSON")
    );

    let xml = app
        .client
        .post(app.url("/Patient"))
        .header("content-type", "application/fhir+xml")
        .body("<Patient/>")
        .send()
        .await
        .unwrap();
    assert_outcome(xml, 415).await;
    let none = app
        .client
        .post(app.url("/Patient"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_outcome(none, 415).await;

    // Nothing of the above was stored.
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM resources")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0);
}

#[tokio::test]
async fn oversize_bodies_get_413() {
    let app = TestApp::spawn_with(|c| c.server.max_body_bytes = 2048).await;
    let mut big = patient(Some("big"));
    big["text"] = json!({"status": "generated", "div": "x".repeat(4096)});
    assert_outcome(app.put_json("/Patient/big", &big).await, 413).await;
    assert_eq!(
        app.put_json("/Patient/small", &patient(Some("small")))
            .await
            .status(),
        201
    );
}

#[tokio::test]
async fn wrong_methods_get_405() {
    let app = TestApp::spawn().await;
    let patch = app
        .send_json(Method::PATCH, "/Patient/a", &patient(Some("a")))
        .await;
    assert_outcome(patch, 405).await;
    assert_outcome(app.delete("/metadata").await, 405).await;
}

#[tokio::test]
async fn metadata_is_an_r4_capability_statement() {
    let app = TestApp::spawn().await;
    let response = app.get("/metadata").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/fhir+json");
    let cs = json(response).await;
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    assert_eq!(cs["fhirVersion"], "4.0.1");
    let resources = cs["rest"][0]["resource"].as_array().unwrap();
    let patient = resources.iter().find(|r| r["type"] == "Patient").unwrap();
    let codes: Vec<&str> = patient["interaction"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["code"].as_str().unwrap())
        .collect();
    for code in ["read", "vread", "create", "update", "delete"] {
        assert!(codes.contains(&code), "{code} missing");
    }
    // The search parameters `_typeFilter` can use, with their types.
    let params = |t: &str| -> Vec<(String, String)> {
        let r = resources.iter().find(|r| r["type"] == t).unwrap();
        r["searchParam"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().into(),
                    p["type"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    let observation = params("Observation");
    for (name, kind) in [
        ("code", "token"),
        ("date", "date"),
        ("value-quantity", "quantity"),
        ("subject", "reference"),
        ("_lastUpdated", "date"),
        ("_id", "token"),
    ] {
        assert!(
            observation.contains(&(name.into(), kind.into())),
            "{name} missing"
        );
    }
    // Composite parameters cannot be evaluated, so they are not offered.
    assert!(!observation.iter().any(|(n, _)| n == "code-value-quantity"));
    assert!(params("Patient").contains(&("birthdate".into(), "date".into())));
}

#[tokio::test]
async fn health_follows_the_database() {
    let app = TestApp::spawn().await;
    let healthy = app.get("/health").await;
    assert_eq!(healthy.status(), 200);
    assert_eq!(json(healthy).await["workers"], "2 running");
    // Take the database away under the running server.
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&crate::common::admin_url())
        .await
        .unwrap();
    app.pool.close().await;
    let name = app.db.url.rsplit('/').next().unwrap().to_string();
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
    // The database is watched every second: health says so within two, each answer at once.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let asked = std::time::Instant::now();
        let status = app.get("/health").await.status();
        assert!(
            asked.elapsed() < std::time::Duration::from_secs(2),
            "health took {:?}",
            asked.elapsed()
        );
        if status == 503 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "health never noticed");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn health_reports_a_storage_that_takes_no_files() {
    let app = TestApp::spawn().await;
    let root = app.storage.path().to_path_buf();
    std::fs::remove_dir_all(&root).unwrap();
    std::fs::write(&root, "a file where the storage folder should be").unwrap();
    let response = app.get("/health").await;
    assert_eq!(response.status(), 503);
    let body = json(response).await;
    assert_eq!(body["database"], "ok");
    // What is down, not why: the cause (a path here) stays in the log.
    assert_eq!(body["storage"], "unavailable", "{body}");
    assert!(!body.to_string().contains(root.to_str().unwrap()));
    std::fs::remove_file(&root).unwrap();
    std::fs::create_dir(&root).unwrap();
    // Checked again once the last result is a few seconds old.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while app.get("/health").await.status() != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "health never recovered"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(
        std::fs::read_dir(&root).unwrap().next().is_none(),
        "health checks wrote into the storage"
    );
}

#[tokio::test]
async fn compartment_membership_is_stored_with_each_version() {
    let app = TestApp::spawn().await;
    let obs = json!({"resourceType": "Observation", "id": "o1", "status": "final",
        "code": {"text": "x"}, "subject": {"reference": "Patient/p1"},
        "performer": [{"reference": "Patient/p2"}, {"reference": "Practitioner/d"}]});
    assert_eq!(app.put_json("/Observation/o1", &obs).await.status(), 201);
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT patient_ids FROM resources WHERE resource_type = 'Observation' AND id = 'o1'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(ids, vec!["p1", "p2"]);
}

/// The issues of an OperationOutcome: (expression, diagnostics).
async fn issues(response: reqwest::Response, status: u16) -> Vec<(String, String)> {
    assert_eq!(response.status(), status);
    let body = json(response).await;
    assert_eq!(body["resourceType"], "OperationOutcome");
    body["issue"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["expression"][0].as_str().unwrap_or("").to_string(),
                i["diagnostics"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn only_valid_r4_is_stored_and_each_problem_is_named() {
    let app = TestApp::spawn().await;
    let cases = [
        (
            json!({"resourceType": "Patient", "id": "x", "gender": {"code": "female"}}),
            "Patient.gender",
        ),
        (
            json!({"resourceType": "Patient", "id": "x", "name": "Smith"}),
            "Patient.name",
        ),
        (
            json!({"resourceType": "Patient", "id": "x", "birthDate": "x"}),
            "Patient.birthDate",
        ),
        (
            json!({"resourceType": "Patient", "id": "x", "birthDate": "2023-02-30"}),
            "Patient.birthDate",
        ),
        (
            json!({"resourceType": "Patient", "id": "x", "unknownElement": true}),
            "Patient.unknownElement",
        ),
        (
            json!({"resourceType": "Patient", "id": "x", "gen\u{0}der": "female"}),
            "Patient.gen\u{0}der",
        ),
        (
            json!({"resourceType": "Patient", "id": "x", "active": "true"}),
            "Patient.active",
        ),
        (
            json!({"resourceType": "Patient", "id": "x", "gender": "fe\u{0}male"}),
            "Patient.gender",
        ),
        (
            json!({"resourceType": "Patient", "id": "x", "contained": [{"resourceType": "Patient", "gender": 7}]}),
            "Patient.contained[0].gender",
        ),
        (
            json!({"resourceType": "Observation", "id": "x", "status": "final", "code": {"text": "t"},
                "valueInteger": 123456789012345678901234567890_u128}),
            "Observation.valueInteger",
        ),
        (
            json!({"resourceType": "Observation", "id": "x", "status": "final", "code": {"text": "t"},
                "valueString": "a", "valueBoolean": true}),
            "Observation.valueBoolean",
        ),
        (
            json!({"resourceType": "Observation", "id": "x", "effectiveDateTime": "2020-01-01T10:00"}),
            "Observation.effectiveDateTime",
        ),
        (
            json!({"resourceType": "Patient", "id": "x", "identifier": []}),
            "Patient.identifier",
        ),
    ];
    for (resource, location) in cases {
        let path = format!("/{}/x", resource["resourceType"].as_str().unwrap());
        let found = issues(app.put_json(&path, &resource).await, 400).await;
        assert!(
            found.iter().any(|(at, _)| at == location),
            "{resource}: {found:?}"
        );
        assert!(
            found
                .iter()
                .all(|(_, text)| text.contains(&found[0].0) || !text.is_empty())
        );
        // POST refuses it the same way.
        let found = issues(app.post_json(&path[..path.len() - 2], &resource).await, 400).await;
        assert!(
            found.iter().any(|(at, _)| at == location),
            "POST {resource}: {found:?}"
        );
    }
    // Every problem of one resource, each with its location.
    let many =
        json!({"resourceType": "Patient", "id": "x", "gender": 1, "birthDate": "soon", "nope": 2});
    let found = issues(app.put_json("/Patient/x", &many).await, 400).await;
    let locations: Vec<&str> = found.iter().map(|(at, _)| at.as_str()).collect();
    assert_eq!(
        locations,
        ["Patient.gender", "Patient.birthDate", "Patient.nope"]
    );
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM resources")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0, "an invalid resource was stored");
}

#[tokio::test]
async fn a_repeating_element_sent_as_one_value_is_stored_as_an_array() {
    let app = TestApp::spawn().await;
    let single = json!({"resourceType": "Patient", "id": "p1",
        "name": {"family": "Smith", "given": "Ann"}, "identifier": {"value": "1"}});
    assert_eq!(app.put_json("/Patient/p1", &single).await.status(), 201);
    let stored = json(app.get("/Patient/p1").await).await;
    assert_eq!(
        stored["name"],
        json!([{"family": "Smith", "given": ["Ann"]}])
    );
    assert_eq!(stored["identifier"], json!([{"value": "1"}]));
}
