//! `fhir-export generate` and `fhir-export load`, end to end through the binary.

use std::{
    collections::{BTreeMap, HashSet},
    io::Write,
    path::Path,
    process::Output,
};

use crate::common::{TestDb, binary, index_definitions};
use serde_json::{Value, json};
use sqlx::PgPool;

fn run(db: &TestDb, args: &[&str]) -> Output {
    std::process::Command::new(binary())
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env_remove("FHIR_EXPORT_CONFIG")
        .output()
        .unwrap()
}

fn ok(output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn gzip(path: &Path, text: &str) {
    let file = std::fs::File::create(path).unwrap();
    let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    gz.write_all(text.as_bytes()).unwrap();
    gz.finish().unwrap();
}

async fn current_counts(pool: &PgPool) -> BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT resource_type, count(*) FROM resources WHERE is_current GROUP BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

async fn current_body(pool: &PgPool, t: &str, id: &str) -> Option<Value> {
    let body: Option<String> = sqlx::query_scalar(
        "SELECT body FROM resources WHERE resource_type = $1 AND id = $2 AND is_current",
    )
    .bind(t)
    .bind(id)
    .fetch_optional(pool)
    .await
    .unwrap()
    .flatten();
    body.map(|b| serde_json::from_str(&b).unwrap())
}

#[tokio::test]
async fn generated_data_is_deterministic_realistic_and_consistent() {
    let db = TestDb::new().await;
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for dir in [&a, &b] {
        let out = dir.path().to_str().unwrap();
        ok(run(
            &db,
            &["generate", "--patients", "4", "--seed", "42", "--out", out],
        ));
    }
    let mut ids = HashSet::new();
    let mut references = Vec::new();
    let mut total = 0;
    for entry in std::fs::read_dir(a.path()).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let twin = std::fs::read_to_string(b.path().join(path.file_name().unwrap())).unwrap();
        assert_eq!(text, twin, "{} differs between runs", path.display());
        for line in text.lines() {
            let r: Value = serde_json::from_str(line).unwrap();
            total += 1;
            ids.insert(format!(
                "{}/{}",
                r["resourceType"].as_str().unwrap(),
                r["id"].as_str().unwrap()
            ));
            crate::common::references(&r, &mut references);
        }
    }
    for t in [
        "Patient",
        "Encounter",
        "Observation",
        "Condition",
        "MedicationRequest",
        "Procedure",
        "Immunization",
        "DiagnosticReport",
        "AllergyIntolerance",
        "Organization",
        "Practitioner",
        "Group",
    ] {
        assert!(a.path().join(format!("{t}.ndjson")).exists(), "{t} missing");
    }
    assert!(
        (4 * 300..=4 * 520).contains(&total),
        "{total} resources for 4 patients"
    );
    for r in &references {
        assert!(ids.contains(r), "dangling reference {r}");
    }
    let other = tempfile::tempdir().unwrap();
    ok(run(
        &db,
        &[
            "generate",
            "--patients",
            "4",
            "--seed",
            "43",
            "--out",
            other.path().to_str().unwrap(),
        ],
    ));
    assert_ne!(
        std::fs::read(a.path().join("Patient.ndjson")).unwrap(),
        std::fs::read(other.path().join("Patient.ndjson")).unwrap()
    );
}

#[tokio::test]
async fn loads_generated_ndjson_with_exact_counts() {
    let db = TestDb::new().await;
    let data = tempfile::tempdir().unwrap();
    let out = data.path().to_str().unwrap();
    ok(run(&db, &["generate", "--patients", "3", "--out", out]));
    // Gzip one file to cover .ndjson.gz.
    let obs = data.path().join("Observation.ndjson");
    gzip(
        &data.path().join("Observation.ndjson.gz"),
        &std::fs::read_to_string(&obs).unwrap(),
    );
    std::fs::remove_file(&obs).unwrap();

    let stdout = ok(run(&db, &["load", "--batch-size", "100", out]));
    assert!(stdout.contains("resources/s"), "{stdout}");
    let pool = PgPool::connect(&db.url).await.unwrap();
    let counts = current_counts(&pool).await;
    let mut expected = BTreeMap::new();
    for entry in std::fs::read_dir(data.path()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let t = name.split('.').next().unwrap().to_string();
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut flate2::read::MultiGzDecoder::new(std::fs::File::open(&path).unwrap()),
            &mut text,
        )
        .ok();
        if text.is_empty() {
            text = std::fs::read_to_string(&path).unwrap();
        }
        expected.insert(t, text.lines().count() as i64);
    }
    assert_eq!(counts, expected);

    // Loading again makes every resource a second version of itself.
    ok(run(&db, &["load", out]));
    assert_eq!(current_counts(&pool).await, expected);
    let versions: i32 = sqlx::query_scalar("SELECT max(version_id) FROM resources")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(versions, 2);
}

#[tokio::test]
async fn resolves_urn_uuid_references_across_files_in_any_order() {
    let db = TestDb::new().await;
    let data = tempfile::tempdir().unwrap();
    // The Group's file sorts (and loads) before the Bundle that defines its members.
    let group = json!({"resourceType": "Group", "id": "g", "type": "person", "actual": true,
        "member": [{"entity": {"reference": "urn:uuid:5e2a1c6e-0000-4000-8000-000000000001"}}]});
    std::fs::write(
        data.path().join("a-group.json"),
        serde_json::to_string_pretty(&group).unwrap(),
    )
    .unwrap();
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:5e2a1c6e-0000-4000-8000-000000000001",
         "resource": {"resourceType": "Patient", "name": [{"family": "NoId"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:5e2a1c6e-0000-4000-8000-000000000002",
         "resource": {"resourceType": "Observation", "id": "obs-1", "status": "final",
                      "code": {"text": "x"},
                      "subject": {"reference": "urn:uuid:5e2a1c6e-0000-4000-8000-000000000001"}},
         "request": {"method": "POST", "url": "Observation"}}]});
    gzip(
        &data.path().join("b-bundle.json.gz"),
        &serde_json::to_string_pretty(&bundle).unwrap(),
    );
    std::fs::write(data.path().join("README.txt"), "not data").unwrap();

    ok(run(&db, &["load", data.path().to_str().unwrap()]));
    let pool = PgPool::connect(&db.url).await.unwrap();
    let patient_id = "5e2a1c6e-0000-4000-8000-000000000001";
    let g = current_body(&pool, "Group", "g").await.unwrap();
    assert_eq!(
        g["member"][0]["entity"]["reference"],
        format!("Patient/{patient_id}")
    );
    let obs = current_body(&pool, "Observation", "obs-1").await.unwrap();
    assert_eq!(obs["subject"]["reference"], format!("Patient/{patient_id}"));
    assert!(current_body(&pool, "Patient", patient_id).await.is_some());
    // Stored text is one line, so it can be exported as ndjson untouched.
    let raw: String = sqlx::query_scalar("SELECT body FROM resources WHERE id = 'g'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(!raw.contains('\n'));
}

#[tokio::test]
async fn duplicate_ids_become_versions_and_the_last_wins() {
    // In one batch; and one resource per batch, where the store's types start empty and the
    // second version collides with what the first batch created.
    for batch_size in ["2000", "1"] {
        duplicate_ids_become_versions(batch_size).await;
    }
}

async fn duplicate_ids_become_versions(batch_size: &str) {
    let db = TestDb::new().await;
    let data = tempfile::tempdir().unwrap();
    let lines = [
        json!({"resourceType": "Organization", "id": "o", "name": "first"}),
        json!({"resourceType": "Organization", "id": "o", "name": "second"}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(data.path().join("a.ndjson"), &text).unwrap();
    std::fs::write(
        data.path().join("b.ndjson"),
        format!(
            "{}\n",
            json!({"resourceType": "Organization", "id": "o", "name": "third"})
        ),
    )
    .unwrap();
    let out = ok(run(
        &db,
        &[
            "load",
            "--batch-size",
            batch_size,
            data.path().to_str().unwrap(),
        ],
    ));
    assert!(out.contains("2 were updates"), "{out}");
    let pool = PgPool::connect(&db.url).await.unwrap();
    let current = current_body(&pool, "Organization", "o").await.unwrap();
    assert_eq!(current["name"], "third");
    assert_eq!(current["meta"]["versionId"], "3");
    let times: Vec<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT last_updated FROM resources WHERE id = 'o' ORDER BY version_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
}

#[tokio::test]
async fn a_bad_line_names_file_and_line_and_stops_the_load() {
    let db = TestDb::new().await;
    let data = tempfile::tempdir().unwrap();
    let good = |i: u32| {
        format!(
            "{}\n",
            json!({"resourceType": "Patient", "id": format!("p{i}")})
        )
    };
    let text = format!(
        "{}{}{}{{\"resourceType\": \"Patient\", \"id\": \n{}",
        good(1),
        good(2),
        good(3),
        good(5)
    );
    let file = data.path().join("patients.ndjson");
    std::fs::write(&file, text).unwrap();

    // Into the empty store, the load is one transaction: nothing lands, and the store keeps
    // its indexes.
    ok(run(&db, &["migrate"]));
    let pool = PgPool::connect(&db.url).await.unwrap();
    let indexes_before = index_definitions(&pool).await;
    let output = run(&db, &["load", "--batch-size", "2", file.to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("patients.ndjson:4"), "{stderr}");
    assert!(stderr.contains("left empty"), "{stderr}");
    assert_eq!(current_counts(&pool).await.get("Patient"), None);
    assert_eq!(index_definitions(&pool).await, indexes_before);

    // Online, batch by batch: the first full batch (lines 1-2) landed; line 3's batch did not,
    // nor anything after.
    let output = run(
        &db,
        &[
            "load",
            "--online",
            "--batch-size",
            "2",
            file.to_str().unwrap(),
        ],
    );
    assert!(!output.status.success());
    assert_eq!(current_counts(&pool).await.get("Patient"), Some(&2));

    let wrong_type = data.path().join("wrong.ndjson");
    std::fs::write(
        &wrong_type,
        format!("{}{}", good(7), "{\"resourceType\": \"Nope\"}\n"),
    )
    .unwrap();
    let output = run(&db, &["load", wrong_type.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("wrong.ndjson:2"));
    assert_eq!(current_counts(&pool).await.get("Patient"), Some(&2));

    let output = run(
        &db,
        &[
            "load",
            "--skip-invalid",
            file.to_str().unwrap(),
            wrong_type.to_str().unwrap(),
        ],
    );
    let stdout = ok(output);
    assert!(stdout.contains("2 skipped"), "{stdout}");
    assert_eq!(current_counts(&pool).await.get("Patient"), Some(&5));

    let missing = run(&db, &["load", "/definitely/not/here.ndjson"]);
    assert!(!missing.status.success());
    let txt = data.path().join("notes.txt");
    std::fs::write(&txt, "x").unwrap();
    assert!(!run(&db, &["load", txt.to_str().unwrap()]).status.success());
}

#[tokio::test]
async fn resources_that_are_not_valid_r4_are_reported_by_line_and_the_rest_loaded() {
    let db = TestDb::new().await;
    let data = tempfile::tempdir().unwrap();
    let lines = [
        json!({"resourceType": "Patient", "id": "ok1", "gender": "female"}),
        json!({"resourceType": "Patient", "id": "bad1", "gender": {"code": "female"}}),
        json!({"resourceType": "Patient", "id": "ok2", "name": {"family": "Single"}}),
        json!({"resourceType": "Patient", "id": "bad2", "birthDate": "x", "unknown": 1}),
        json!({"resourceType": "Observation", "id": "bad3", "valueInteger": 99999999999_i64}),
        json!({"resourceType": "Patient", "id": "ok3"}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let file = data.path().join("mixed.ndjson");
    std::fs::write(&file, text).unwrap();

    // Without --skip-invalid the first bad line stops the load, named by file and line.
    let output = run(&db, &["load", file.to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("mixed.ndjson:2") && stderr.contains("Patient.gender"),
        "{stderr}"
    );

    let output = run(&db, &["load", "--skip-invalid", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    let stdout = ok(output);
    assert!(stdout.contains("3 skipped"), "{stdout}");
    for (line, what) in [
        (2, "Patient.gender"),
        (4, "Patient.birthDate"),
        (4, "Patient.unknown"),
        (5, "Observation.valueInteger"),
    ] {
        let place = format!("mixed.ndjson:{line}");
        assert!(
            stderr
                .lines()
                .any(|l| l.contains(&place) && l.contains(what)),
            "{place} {what} not reported: {stderr}"
        );
    }
    let pool = PgPool::connect(&db.url).await.unwrap();
    assert_eq!(
        current_counts(&pool).await,
        BTreeMap::from([("Patient".to_string(), 3)])
    );
    let ok2 = current_body(&pool, "Patient", "ok2").await.unwrap();
    assert_eq!(ok2["name"], json!([{"family": "Single"}]));
}
