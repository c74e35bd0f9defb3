//! `$export` end to end: kick-off rules, exact snapshot semantics, output layout, status,
//! cancel, retention, over real HTTP, Postgres and files.

use std::collections::{BTreeMap, BTreeSet};

use crate::common::*;
use serde_json::{Value, json};

async fn kick_off_with(app: &TestApp, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = app.client.get(app.url(path));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    request.send().await.unwrap()
}

const BULK: &[(&str, &str)] = &[
    ("accept", "application/fhir+json"),
    ("prefer", "respond-async"),
];

fn counts(files: &[OutputFile]) -> BTreeMap<String, usize> {
    let mut c = BTreeMap::new();
    for f in files {
        *c.entry(f.resource_type.clone()).or_default() += f.text.lines().count();
    }
    c
}

#[tokio::test]
async fn system_export_has_exact_counts_and_a_complete_manifest() {
    let app = TestApp::spawn().await;
    let loaded = load_generated(&app, 2).await;
    let status_url = kick_off(&app, "/$export").await;
    assert!(status_url.starts_with(&app.base));
    let manifest = wait_manifest(&app, &status_url).await;
    assert_eq!(manifest["request"], app.url("/$export"));
    assert_eq!(manifest["requiresAccessToken"], false);
    assert_eq!(manifest["error"], json!([]));
    assert!(manifest["transactionTime"].as_str().unwrap().ends_with('Z'));
    let files = download_all(&app, &manifest).await;
    let expected: BTreeMap<String, usize> =
        loaded.iter().map(|(t, l)| (t.clone(), l.len())).collect();
    assert_eq!(counts(&files), expected);
    let exported = resources_by_key(&files);
    for (t, lines) in &loaded {
        for original in lines {
            let key = format!("{t}/{}", original["id"].as_str().unwrap());
            let got = &exported[&key];
            assert_eq!(got["meta"]["versionId"], "1");
            // Everything but meta is exactly what was loaded.
            let (mut a, mut b) = (got.clone(), original.clone());
            a.as_object_mut().unwrap().remove("meta");
            b.as_object_mut().unwrap().remove("meta");
            assert_eq!(a, b, "{key}");
        }
    }
    for f in &files {
        assert_eq!(f.count as usize, f.text.lines().count());
    }
}

#[tokio::test]
async fn output_files_respect_count_and_byte_limits_and_are_numbered_without_gaps() {
    let app = TestApp::spawn_with(|c| {
        c.export.part_size = 7;
        c.export.part_max_bytes = 4096;
        c.export.range_size = 50; // several tasks per large type, numbered together
    })
    .await;
    let loaded = load_generated(&app, 1).await;
    let manifest = wait_manifest(
        &app,
        &kick_off(&app, "/$export?_type=Observation,Patient,Condition").await,
    )
    .await;
    let files = download_all(&app, &manifest).await;
    let mut numbers: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for f in &files {
        let (t, n) = f
            .name
            .strip_suffix(".ndjson")
            .unwrap()
            .rsplit_once('-')
            .unwrap();
        assert_eq!(t, f.resource_type);
        assert!(
            numbers
                .entry(t.to_string())
                .or_default()
                .insert(n.parse().unwrap()),
            "{} twice",
            f.name
        );
        let lines = f.text.lines().count();
        assert!((1..=7).contains(&lines), "{} has {lines} lines", f.name);
        assert!(
            f.text.len() <= 4096 || lines == 1,
            "{} has {} bytes",
            f.name,
            f.text.len()
        );
        assert!(f.text.ends_with('\n'));
        assert!(!f.text.contains("\n\n"));
    }
    for (t, ns) in &numbers {
        assert_eq!(
            ns.iter().copied().collect::<Vec<_>>(),
            (1..=ns.len() as u32).collect::<Vec<_>>(),
            "{t}"
        );
    }
    let c = counts(&files);
    assert_eq!(c["Observation"], loaded["Observation"].len());
    assert_eq!(c["Patient"], 1);
    assert_eq!(c.len(), 3);
    resources_by_key(&files);
    // The files are in the configured layout: {container}/{folder}/{Type}-{n}.ndjson.
    let containers: Vec<_> = std::fs::read_dir(app.storage.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(containers.len(), 1);
    assert!(containers[0].to_str().unwrap().starts_with("export-"));
}

#[tokio::test]
async fn writes_after_kick_off_never_leak_into_the_export() {
    let app = TestApp::spawn_with(|c| c.export.workers = 0).await;
    for id in ["a", "b", "c"] {
        app.put_json(
            &format!("/Patient/{id}"),
            &json!({"resourceType": "Patient", "id": id, "active": true}),
        )
        .await;
    }
    let status_url = kick_off(&app, "/$export?_type=Patient").await;
    let queued = app.client.get(&status_url).send().await.unwrap();
    assert_eq!(queued.status(), 202);
    assert_eq!(queued.headers()["x-progress"], "queued");
    // After kick-off: update a, delete b, create d.
    app.put_json(
        "/Patient/a",
        &json!({"resourceType": "Patient", "id": "a", "active": false}),
    )
    .await;
    assert_eq!(app.delete("/Patient/b").await.status(), 204);
    app.put_json("/Patient/d", &json!({"resourceType": "Patient", "id": "d"}))
        .await;

    let _workers = app.spawn_sibling(|_| {}).await;
    let files = download_all(&app, &wait_manifest(&app, &status_url).await).await;
    let got = resources_by_key(&files);
    assert_eq!(
        got.keys().cloned().collect::<Vec<_>>(),
        vec!["Patient/a", "Patient/b", "Patient/c"]
    );
    assert_eq!(got["Patient/a"]["active"], true);
    assert_eq!(got["Patient/a"]["meta"]["versionId"], "1");
}

#[tokio::test]
async fn till_exports_the_state_at_that_instant() {
    let app = TestApp::spawn().await;
    for id in ["a", "b", "c"] {
        app.put_json(
            &format!("/Patient/{id}"),
            &json!({"resourceType": "Patient", "id": id, "gender": "female"}),
        )
        .await;
    }
    let c = json(app.get("/Patient/c").await).await;
    let till = c["meta"]["lastUpdated"].as_str().unwrap().to_string();
    app.put_json(
        "/Patient/a",
        &json!({"resourceType": "Patient", "id": "a", "gender": "male"}),
    )
    .await;
    app.delete("/Patient/b").await;
    app.delete("/Patient/c").await;
    app.put_json(
        "/Patient/c",
        &json!({"resourceType": "Patient", "id": "c", "gender": "other"}),
    )
    .await;
    app.put_json("/Patient/d", &json!({"resourceType": "Patient", "id": "d"}))
        .await;

    let url = kick_off(
        &app,
        &format!("/$export?_till={}", till.replace('+', "%2B")),
    )
    .await;
    let manifest = wait_manifest(&app, &url).await;
    assert_eq!(manifest["transactionTime"], till.as_str());
    let got = resources_by_key(&download_all(&app, &manifest).await);
    assert_eq!(
        got.keys().cloned().collect::<Vec<_>>(),
        vec!["Patient/a", "Patient/b", "Patient/c"]
    );
    for (_, r) in got {
        assert_eq!(r["gender"], "female");
        assert_eq!(r["meta"]["versionId"], "1");
    }
}

#[tokio::test]
async fn since_is_strictly_after_and_chains_with_transaction_time() {
    let app = TestApp::spawn().await;
    app.put_json("/Patient/a", &json!({"resourceType": "Patient", "id": "a"}))
        .await;
    let a = json(app.get("/Patient/a").await).await;
    app.put_json("/Patient/b", &json!({"resourceType": "Patient", "id": "b"}))
        .await;
    let since = a["meta"]["lastUpdated"].as_str().unwrap();
    let manifest = wait_manifest(
        &app,
        &kick_off(&app, &format!("/$export?_since={since}")).await,
    )
    .await;
    let got = resources_by_key(&download_all(&app, &manifest).await);
    assert_eq!(got.keys().cloned().collect::<Vec<_>>(), vec!["Patient/b"]);

    // The manifest's transactionTime is the next _since: nothing twice, nothing lost.
    let next_since = manifest["transactionTime"].as_str().unwrap().to_string();
    app.put_json("/Patient/c", &json!({"resourceType": "Patient", "id": "c"}))
        .await;
    let manifest = wait_manifest(
        &app,
        &kick_off(&app, &format!("/$export?_since={next_since}")).await,
    )
    .await;
    let got = resources_by_key(&download_all(&app, &manifest).await);
    assert_eq!(got.keys().cloned().collect::<Vec<_>>(), vec!["Patient/c"]);
}

fn observation(id: &str, subject: &str, performer: Option<&str>) -> Value {
    let mut o = json!({"resourceType": "Observation", "id": id, "status": "final", "code": {"text": "x"},
        "subject": {"reference": format!("Patient/{subject}")}});
    if let Some(p) = performer {
        o["performer"] = json!([{"reference": format!("Patient/{p}")}]);
    }
    o
}

/// p1..p5 with observations; o12 sits in two compartments; an Organization in none.
async fn small_population(app: &TestApp) {
    for p in ["p1", "p2", "p3", "p4", "p5"] {
        put(app, json!({"resourceType": "Patient", "id": p})).await;
        put(app, observation(&format!("o-{p}"), p, None)).await;
    }
    put(app, observation("o12", "p1", Some("p2"))).await;
    put(app, json!({"resourceType": "Organization", "id": "org"})).await;
}

fn group(id: &str, members: &[Value]) -> Value {
    let mut group = json!({"resourceType": "Group", "id": id, "type": "person", "actual": true});
    // FHIR JSON has no empty arrays: a Group without members has no `member`.
    if !members.is_empty() {
        group["member"] = json!(members);
    }
    group
}

fn member(reference: &str) -> Value {
    json!({"entity": {"reference": reference}})
}

#[tokio::test]
async fn patient_export_covers_every_compartment_once() {
    let app = TestApp::spawn().await;
    small_population(&app).await;
    let manifest = wait_manifest(&app, &kick_off(&app, "/Patient/$export").await).await;
    let got = resources_by_key(&download_all(&app, &manifest).await);
    let keys: BTreeSet<String> = got.keys().cloned().collect();
    let expected: BTreeSet<String> = ["p1", "p2", "p3", "p4", "p5"]
        .iter()
        .flat_map(|p| [format!("Patient/{p}"), format!("Observation/o-{p}")])
        .chain(["Observation/o12".to_string()])
        .collect();
    assert_eq!(keys, expected);
}

#[tokio::test]
async fn group_export_follows_nested_groups_skips_inactive_and_exports_once() {
    let app = TestApp::spawn().await;
    small_population(&app).await;
    let mut inactive = member("Patient/p3");
    inactive["inactive"] = json!(true);
    let mut ended = member("Patient/p4");
    ended["period"] = json!({"start": "2001-01-01", "end": "2002-01-01"});
    put(
        &app,
        group(
            "outer",
            &[member("Patient/p1"), member("Group/inner"), inactive, ended],
        ),
    )
    .await;
    // inner points back at outer: a cycle that must not loop.
    put(
        &app,
        group(
            "inner",
            &[
                member("Patient/p2"),
                member("Group/outer"),
                member("Group/missing"),
            ],
        ),
    )
    .await;
    let manifest = wait_manifest(&app, &kick_off(&app, "/Group/outer/$export").await).await;
    let got = resources_by_key(&download_all(&app, &manifest).await);
    let keys: Vec<String> = got.keys().cloned().collect();
    assert_eq!(
        keys,
        vec![
            "Observation/o-p1",
            "Observation/o-p2",
            "Observation/o12",
            "Patient/p1",
            "Patient/p2"
        ]
    );

    // _since filters the exported resources, not the membership.
    let since = json(app.get("/Observation/o12").await).await["meta"]["lastUpdated"]
        .as_str()
        .unwrap()
        .to_string();
    put(
        &app,
        json!({"resourceType": "Patient", "id": "p2", "active": true}),
    )
    .await;
    put(&app, observation("o-p5", "p5", None)).await;
    let manifest = wait_manifest(
        &app,
        &kick_off(&app, &format!("/Group/outer/$export?_since={since}")).await,
    )
    .await;
    let got = resources_by_key(&download_all(&app, &manifest).await);
    assert_eq!(got.keys().cloned().collect::<Vec<_>>(), vec!["Patient/p2"]);
}

#[tokio::test]
async fn empty_and_unknown_groups() {
    let app = TestApp::spawn().await;
    small_population(&app).await;
    put(&app, group("empty", &[])).await;
    let manifest = wait_manifest(&app, &kick_off(&app, "/Group/empty/$export").await).await;
    assert_eq!(manifest["output"], json!([]));
    assert_outcome(kick_off_with(&app, "/Group/nope/$export", BULK).await, 404).await;
    app.delete("/Group/empty").await;
    assert_outcome(kick_off_with(&app, "/Group/empty/$export", BULK).await, 404).await;
}

#[tokio::test]
async fn post_kick_off_takes_a_parameters_body() {
    let app = TestApp::spawn().await;
    small_population(&app).await;
    let body = json!({"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Patient"},
        {"name": "_outputFormat", "valueString": "application/fhir+ndjson"}]});
    let response = post_kick_off(&app, "/$export", &body, "respond-async").await;
    assert_eq!(response.status(), 202);
    let url = response.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    let files = download_all(&app, &wait_manifest(&app, &url).await).await;
    assert_eq!(counts(&files), BTreeMap::from([("Patient".to_string(), 5)]));

    let not_parameters = post_kick_off(
        &app,
        "/$export",
        &json!({"resourceType": "Patient"}),
        "respond-async",
    )
    .await;
    assert_outcome(not_parameters, 400).await;
}

#[tokio::test]
async fn every_bad_kick_off_is_a_400_operation_outcome() {
    let app = TestApp::spawn().await;
    let accept_only = &[("accept", "application/fhir+json")];
    let prefer_only = &[("prefer", "respond-async")];
    assert!(
        assert_outcome(kick_off_with(&app, "/$export", prefer_only).await, 400)
            .await
            .contains("Accept")
    );
    assert!(
        assert_outcome(kick_off_with(&app, "/$export", accept_only).await, 400)
            .await
            .contains("Prefer")
    );
    let wrong_accept = &[("accept", "application/xml"), ("prefer", "respond-async")];
    assert_outcome(kick_off_with(&app, "/$export", wrong_accept).await, 400).await;
    for (query, needle) in [
        ("_outputFormat=text/csv", "_outputFormat"),
        ("_type=Patient,Unicorn", "Unicorn"),
        ("_since=yesterday", "instant"),
        ("_since=2024-01-01", "instant"),
        ("_till=2999-01-01T00:00:00Z", "future"),
        ("_container=Not_Valid", "container"),
        ("_container=ab", "container"),
        (
            "_typeFilter=Patient%3Fnope%3D1",
            "not a search parameter of Patient",
        ),
        ("_typeFilter=Observation%3Fsubject.name%3Dx", "chained"),
        ("_typeFilter=Observation%3Fdate%3Dsoon", "not a date"),
        (
            "_typeFilter=Observation%3Fcode-value-quantity%3Dx",
            "composite",
        ),
        (
            "_typeFilter=Observation%3F_include%3DObservation%3Asubject",
            "_include",
        ),
        ("_typeFilter=Observation%3F_sort%3Ddate", "_sort"),
        (
            "_typeFilter=Observation%3Fcode%3Atext%3Dx",
            "modifier ':text'",
        ),
        (
            "_typeFilter=Observation%3Fvalue-quantity%3Dlots",
            "not a number",
        ),
        ("_typeFilter=Observation", "Type?query"),
        (
            "_type=Patient&_typeFilter=Observation%3Fstatus%3Dfinal",
            "_type leaves out",
        ),
        ("includeAssociatedData=_everything", "_everything"),
        ("_elements=Patient.name.family", "top-level"),
        ("_elements=Unicorn.status", "Unicorn"),
        ("bogus=1", "bogus"),
        (
            "_since=2024-01-01T00:00:00Z&_since=2024-01-02T00:00:00Z",
            "once",
        ),
    ] {
        let message = assert_outcome(
            kick_off_with(&app, &format!("/$export?{query}"), BULK).await,
            400,
        )
        .await;
        assert!(message.contains(needle), "{query}: {message}");
    }
    let patient_till =
        kick_off_with(&app, "/Patient/$export?_till=2020-01-01T00:00:00Z", BULK).await;
    assert!(assert_outcome(patient_till, 400).await.contains("system"));
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM export_jobs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(count, 0);
}

#[tokio::test]
async fn lenient_handling_ignores_and_names_unknown_parameters() {
    let app = TestApp::spawn().await;
    let lenient = &[
        ("accept", "application/fhir+json"),
        ("prefer", "respond-async, handling=lenient"),
    ];
    let response = kick_off_with(&app, "/$export?bogus=1&_type=Patient", lenient).await;
    assert_eq!(response.status(), 202);
    let body = json(response).await;
    let text = body.to_string();
    assert!(text.contains("bogus"), "{text}");
}

#[tokio::test]
async fn too_many_active_jobs_get_429_with_retry_after() {
    let app = TestApp::spawn_with(|c| {
        c.export.workers = 0;
        c.export.max_active_jobs = 1;
    })
    .await;
    kick_off(&app, "/$export").await;
    let busy = kick_off_with(&app, "/$export", BULK).await;
    assert!(busy.headers().contains_key("retry-after"));
    assert_outcome(busy, 429).await;
}

#[tokio::test]
async fn cancel_stops_the_job_and_deletes_its_files() {
    let app = TestApp::spawn().await;
    small_population(&app).await;
    let url = kick_off(&app, "/$export?_container=shared-exports").await;
    let manifest = wait_manifest(&app, &url).await;
    let container = app.storage.path().join("shared-exports");
    assert_eq!(std::fs::read_dir(&container).unwrap().count(), 1);
    let file_url = manifest["output"][0]["url"].as_str().unwrap().to_string();

    let cancelled = app.client.delete(&url).send().await.unwrap();
    assert_eq!(cancelled.status(), 202);
    assert_eq!(
        std::fs::read_dir(&container).unwrap().count(),
        0,
        "files must be deleted"
    );
    assert_outcome(app.client.get(&url).send().await.unwrap(), 404).await;
    assert_outcome(app.client.delete(&url).send().await.unwrap(), 404).await;
    assert_outcome(app.client.get(&file_url).send().await.unwrap(), 404).await;
    assert_outcome(
        app.get("/export/00000000-0000-0000-0000-000000000000")
            .await,
        404,
    )
    .await;
    assert_outcome(app.get("/export/not-a-uuid").await, 404).await;
}

#[tokio::test]
async fn cancelling_a_queued_job_means_it_never_runs() {
    let app = TestApp::spawn_with(|c| c.export.workers = 0).await;
    small_population(&app).await;
    let url = kick_off(&app, "/$export").await;
    assert_eq!(app.client.delete(&url).send().await.unwrap().status(), 202);
    let _workers = app.spawn_sibling(|_| {}).await;
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let parts: i64 = sqlx::query_scalar("SELECT count(*) FROM export_parts")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(parts, 0);
    assert_outcome(app.client.get(&url).send().await.unwrap(), 404).await;
}

#[tokio::test]
async fn default_container_and_downloads_with_gzip() {
    let app = TestApp::spawn_with(|c| c.storage.default_container = "everything".into()).await;
    small_population(&app).await;
    let manifest = wait_manifest(&app, &kick_off(&app, "/$export?_type=Patient").await).await;
    let folders: Vec<_> = std::fs::read_dir(app.storage.path().join("everything"))
        .unwrap()
        .collect();
    assert_eq!(folders.len(), 1);
    let url = manifest["output"][0]["url"].as_str().unwrap();
    let raw = reqwest::Client::builder().no_gzip().build().unwrap();
    let gz = raw
        .get(url)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(gz.headers()["content-encoding"], "gzip");
    assert_eq!(gz.headers()["content-type"], "application/fhir+ndjson");
    let bytes = gz.bytes().await.unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut text)
        .unwrap();
    assert_eq!(text.lines().count(), 5);
    // STU3 R12: an encoding only when the client listed it, and the type stays ndjson.
    for accepted in ["identity", "br, deflate", "gzip;q=0"] {
        let plain = raw
            .get(url)
            .header("accept-encoding", accepted)
            .send()
            .await
            .unwrap();
        assert!(
            !plain.headers().contains_key("content-encoding"),
            "{accepted}"
        );
        assert_eq!(plain.headers()["content-type"], "application/fhir+ndjson");
        assert_eq!(plain.text().await.unwrap().lines().count(), 5, "{accepted}");
    }
    let missing = url.replace("Patient-1", "Patient-9");
    assert_outcome(app.client.get(&missing).send().await.unwrap(), 404).await;
}

#[tokio::test]
async fn finished_jobs_expire_with_their_files() {
    let app = TestApp::spawn_with(|c| {
        c.export.retention_secs = 1;
        c.export.stale_after_secs = 2;
    })
    .await;
    small_population(&app).await;
    let url = kick_off(&app, "/$export").await;
    wait_manifest(&app, &url).await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_outcome(app.client.get(&url).send().await.unwrap(), 404).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_dir(app.storage.path()).unwrap().count() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "expired files were not deleted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn metadata_declares_the_bulk_operations() {
    let app = TestApp::spawn().await;
    let cs = json(app.get("/metadata").await).await;
    assert_eq!(
        cs["instantiates"][0],
        "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"
    );
    assert_eq!(cs["rest"][0]["operation"][0]["name"], "export");
    let resources = cs["rest"][0]["resource"].as_array().unwrap();
    for (t, def) in [("Patient", "patient-export"), ("Group", "group-export")] {
        let r = resources.iter().find(|r| r["type"] == t).unwrap();
        assert!(
            r["operation"][0]["definition"]
                .as_str()
                .unwrap()
                .ends_with(def)
        );
    }
    // Every R4 type is exportable (system level) and listed.
    assert_eq!(resources.len(), fhir_export::fhir::r4::RESOURCE_TYPES.len());
    // Types in no patient's compartment are marked as not in Patient and Group export.
    let marks = |t: &str| -> Vec<String> {
        let r = resources.iter().find(|r| r["type"] == t).unwrap();
        r.get("extension")
            .map(|e| e.as_array().unwrap().clone())
            .unwrap_or_default()
            .iter()
            .map(|e| {
                assert_eq!(
                    e["url"],
                    "http://hl7.org/fhir/uv/bulkdata/StructureDefinition/operation-not-supported"
                );
                e["valueCanonical"].as_str().unwrap().to_string()
            })
            .collect()
    };
    let definitions = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition";
    for t in ["Practitioner", "Organization", "Medication"] {
        assert_eq!(
            marks(t),
            [
                format!("{definitions}/patient-export"),
                format!("{definitions}/group-export")
            ],
            "{t}"
        );
    }
    for t in ["Patient", "Observation", "Group", "Encounter"] {
        assert!(marks(t).is_empty(), "{t}");
    }
}

#[tokio::test]
async fn elements_subset_resources_and_tag_them() {
    let app = TestApp::spawn().await;
    small_population(&app).await;
    put(
        &app,
        json!({"resourceType": "Patient", "id": "p1", "gender": "female", "active": true}),
    )
    .await;
    let url = kick_off(
        &app,
        "/$export?_type=Patient,Observation,Organization&_elements=gender,Observation.status",
    )
    .await;
    let got = resources_by_key(&download_all(&app, &wait_manifest(&app, &url).await).await);
    let subsetted = |r: &Value| {
        r["meta"]["tag"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["code"] == "SUBSETTED"))
    };
    let p1 = &got["Patient/p1"];
    assert_eq!(p1["gender"], "female");
    assert!(p1.get("active").is_none());
    assert!(subsetted(p1));
    assert_eq!(p1["meta"]["versionId"], "2");
    // Elements R4 requires stay whether listed or not (Observation.status and .code).
    let obs = &got["Observation/o12"];
    assert_eq!(obs["status"], "final");
    assert!(obs.get("subject").is_none() && obs.get("code").is_some());
    let keys: BTreeSet<&str> = obs
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from(["resourceType", "id", "meta", "status", "code"])
    );
    // `gender` applies to every type; Organizations simply have none.
    let org = &got["Organization/org"];
    assert!(subsetted(org));
    assert_eq!(org.as_object().unwrap().len(), 3);
}

async fn post_parameters(
    app: &TestApp,
    path: &str,
    parameters: Value,
    prefer: &str,
) -> reqwest::Response {
    let body = json!({"resourceType": "Parameters", "parameter": parameters});
    post_kick_off(app, path, &body, prefer).await
}

fn patient_param(id: &str) -> Value {
    json!({"name": "patient", "valueReference": {"reference": format!("Patient/{id}")}})
}

async fn manifest_of(app: &TestApp, response: reqwest::Response) -> Value {
    assert_eq!(response.status(), 202);
    let url = response.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    wait_manifest(app, &url).await
}

#[tokio::test]
async fn patient_parameter_limits_patient_and_group_exports() {
    let app = TestApp::spawn().await;
    small_population(&app).await;
    put(
        &app,
        group(
            "g",
            &[
                member("Patient/p1"),
                member("Patient/p2"),
                member("Patient/p3"),
            ],
        ),
    )
    .await;

    let response = post_parameters(
        &app,
        "/Patient/$export",
        json!([patient_param("p1"), patient_param("p2")]),
        "respond-async",
    )
    .await;
    let got = resources_by_key(&download_all(&app, &manifest_of(&app, response).await).await);
    let keys: Vec<String> = got.keys().cloned().collect();
    // The Group is in p1's and p2's compartments (Group.member), so Patient export has it.
    let expected = [
        "Group/g",
        "Observation/o-p1",
        "Observation/o-p2",
        "Observation/o12",
        "Patient/p1",
        "Patient/p2",
    ];
    assert_eq!(keys, expected);

    let response = post_parameters(
        &app,
        "/Group/g/$export",
        json!([patient_param("p3")]),
        "respond-async",
    )
    .await;
    let got = resources_by_key(&download_all(&app, &manifest_of(&app, response).await).await);
    assert_eq!(
        got.keys().cloned().collect::<Vec<_>>(),
        vec!["Observation/o-p3", "Patient/p3"]
    );

    // Not a member, not a patient, not in a POST, not at system level: 400.
    let outsider = post_parameters(
        &app,
        "/Group/g/$export",
        json!([patient_param("p4")]),
        "respond-async",
    )
    .await;
    assert!(assert_outcome(outsider, 400).await.contains("not a member"));
    let unknown = post_parameters(
        &app,
        "/Patient/$export",
        json!([patient_param("nobody")]),
        "respond-async",
    )
    .await;
    assert!(
        assert_outcome(unknown, 400)
            .await
            .contains("does not exist")
    );
    let system = post_parameters(
        &app,
        "/$export",
        json!([patient_param("p1")]),
        "respond-async",
    )
    .await;
    assert_outcome(system, 400).await;
    let get = kick_off_with(&app, "/Patient/$export?patient=Patient/p1", BULK).await;
    assert!(assert_outcome(get, 400).await.contains("POST"));

    // Lenient: the unknown patient is named and left out; the others are exported.
    let lenient = post_parameters(
        &app,
        "/Patient/$export",
        json!([patient_param("p5"), patient_param("nobody")]),
        "respond-async, handling=lenient",
    )
    .await;
    let location = lenient.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(json(lenient).await.to_string().contains("Patient/nobody"));
    let manifest = wait_manifest(&app, &location).await;
    let got = resources_by_key(&download_all(&app, &manifest).await);
    assert_eq!(
        got.keys().cloned().collect::<Vec<_>>(),
        vec!["Observation/o-p5", "Patient/p5"]
    );
    // The manifest's error file names it too.
    let error_url = manifest["error"][0]["url"].as_str().unwrap();
    let errors = app.client.get(error_url).send().await.unwrap();
    assert!(
        errors
            .text()
            .await
            .unwrap()
            .contains("Patient/nobody does not exist")
    );
}

#[tokio::test]
async fn since_exports_list_deletions_as_transaction_bundles() {
    let app = TestApp::spawn().await;
    small_population(&app).await;
    put(
        &app,
        group("g", &[member("Patient/p1"), member("Patient/p2")]),
    )
    .await;
    let since = json(app.get("/Group/g").await).await["meta"]["lastUpdated"]
        .as_str()
        .unwrap()
        .to_string();
    app.delete("/Patient/p2").await;
    app.delete("/Observation/o-p2").await;
    app.delete("/Observation/o-p4").await;
    // Deleted and created again: live at the snapshot, so in the output, not a deletion.
    app.delete("/Patient/p3").await;
    put(&app, json!({"resourceType": "Patient", "id": "p3"})).await;

    let manifest = wait_manifest(
        &app,
        &kick_off(&app, &format!("/$export?_since={since}")).await,
    )
    .await;
    let expected: BTreeSet<String> = ["Observation/o-p2", "Observation/o-p4", "Patient/p2"]
        .map(String::from)
        .into();
    assert_eq!(deleted_entries(&app, &manifest).await, expected);
    let output = resources_by_key(&download_all(&app, &manifest).await);
    assert_eq!(
        output.keys().cloned().collect::<Vec<_>>(),
        vec!["Patient/p3"]
    );

    // _type applies; Group export lists only its members' deletions.
    let manifest = wait_manifest(
        &app,
        &kick_off(&app, &format!("/$export?_since={since}&_type=Patient")).await,
    )
    .await;
    assert_eq!(manifest["deleted"].as_array().unwrap().len(), 1);
    let manifest = wait_manifest(
        &app,
        &kick_off(&app, &format!("/Group/g/$export?_since={since}")).await,
    )
    .await;
    let group_deleted = deleted_entries(&app, &manifest).await;
    let expected: BTreeSet<String> = ["Observation/o-p2", "Patient/p2"].map(String::from).into();
    assert_eq!(group_deleted, expected);
    // Without _since there is no deleted list.
    let manifest = wait_manifest(&app, &kick_off(&app, "/$export?_type=Patient").await).await;
    assert!(manifest.get("deleted").is_none());
}

/// The `Type/id` of every deletion a manifest lists, checking the files' shape.
async fn deleted_entries(app: &TestApp, manifest: &Value) -> BTreeSet<String> {
    let mut deleted = BTreeSet::new();
    for file in manifest["deleted"].as_array().unwrap() {
        assert_eq!(file["type"], "Bundle");
        let url = file["url"].as_str().unwrap();
        assert!(url.contains("-deleted-"), "{url}");
        let text = app.text_at(url).await;
        assert_eq!(text.lines().count() as u64, file["count"].as_u64().unwrap());
        for line in text.lines() {
            let bundle: Value = serde_json::from_str(line).unwrap();
            assert_eq!(bundle["resourceType"], "Bundle");
            assert_eq!(bundle["type"], "transaction");
            assert_eq!(bundle["entry"][0]["request"]["method"], "DELETE");
            deleted.insert(
                bundle["entry"][0]["request"]["url"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
    }
    deleted
}

#[tokio::test]
async fn references_to_another_server_are_not_local_patients() {
    let app = TestApp::spawn().await;
    small_population(&app).await;
    // Another server's Patient p1 and p2, and this server's p3 written absolute.
    put(
        &app,
        group(
            "foreign",
            &[
                member("http://other.example/fhir/Patient/p1"),
                member(&format!("{}/Patient/p3", app.base)),
            ],
        ),
    )
    .await;
    put(
        &app,
        json!({"resourceType": "Observation", "id": "elsewhere", "status": "final",
        "code": {"text": "x"}, "subject": {"reference": "http://other.example/fhir/Patient/p2"}}),
    )
    .await;
    put(
        &app,
        json!({"resourceType": "Observation", "id": "here", "status": "final",
        "code": {"text": "x"}, "subject": {"reference": format!("{}/Patient/p4", app.base)}}),
    )
    .await;

    let url = kick_off(&app, "/Group/foreign/$export?_type=Patient,Observation").await;
    let got = resources_by_key(&download_all(&app, &wait_manifest(&app, &url).await).await);
    assert_eq!(
        got.keys().cloned().collect::<Vec<_>>(),
        ["Observation/o-p3", "Patient/p3"],
        "the foreign p1 counted as this server's p1"
    );
    let url = kick_off(&app, "/Patient/$export?_type=Observation").await;
    let got = resources_by_key(&download_all(&app, &wait_manifest(&app, &url).await).await);
    assert!(
        !got.contains_key("Observation/elsewhere"),
        "in no local patient's compartment"
    );
    assert!(
        got.contains_key("Observation/here"),
        "this server's own base is local"
    );
    // A `patient` parameter naming another server's patient is refused.
    let body = json!({"resourceType": "Parameters", "parameter": [{"name": "patient",
        "valueReference": {"reference": "http://other.example/fhir/Patient/p1"}}]});
    let message = assert_outcome(
        post_kick_off(&app, "/Patient/$export", &body, "respond-async").await,
        400,
    )
    .await;
    assert!(message.contains("this server"), "{message}");
}

#[tokio::test]
async fn exported_lines_of_every_mode_are_valid_r4() {
    let app = TestApp::spawn().await;
    let loaded = load_generated(&app, 3).await;
    let before_changes = {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    };
    // Older versions and deletions, for history, deleted and soft-deleted files.
    for observation in loaded["Observation"].iter().take(5) {
        let id = observation["id"].as_str().unwrap();
        let mut changed = observation.clone();
        changed["status"] = json!("amended");
        assert!(
            app.put_json(&format!("/Observation/{id}"), &changed)
                .await
                .status()
                .is_success()
        );
    }
    for observation in loaded["Observation"].iter().skip(5).take(3) {
        let id = observation["id"].as_str().unwrap();
        assert!(
            app.delete(&format!("/Observation/{id}"))
                .await
                .status()
                .is_success()
        );
    }
    let group = loaded["Group"][0]["id"].as_str().unwrap().to_string();
    let since = before_changes.replace('+', "%2B");
    let modes = [
        "/$export".to_string(),
        "/$export?_elements=subject,Patient.name".to_string(),
        "/$export?_type=Observation&_typeFilter=Observation%3Fcategory%3Dlaboratory".to_string(),
        "/Patient/$export".to_string(),
        format!("/Group/{group}/$export?_elements=subject"),
        format!("/$export?_since={since}&includeAssociatedData=_history,_deleted"),
    ];
    let mut schema = R4Schema::load();
    for mode in modes {
        let manifest = wait_manifest(&app, &kick_off(&app, &mode).await).await;
        let mut files = download_all(&app, &manifest).await;
        let deleted = json!({"output": manifest.get("deleted").cloned().unwrap_or(json!([]))});
        files.extend(download_all(&app, &deleted).await);
        let lines: Vec<&str> = files.iter().flat_map(|f| f.text.lines()).collect();
        assert!(!lines.is_empty(), "{mode} exported nothing");
        let problems: Vec<String> = lines.iter().flat_map(|l| schema.problems(l)).collect();
        assert!(
            problems.is_empty(),
            "{mode}: {} of {} lines are not valid R4, e.g. {:?}",
            problems.len(),
            lines.len(),
            &problems[..problems.len().min(5)]
        );
    }
}

/// `meta.lastUpdated` of a resource's current version, as the server stamped it.
async fn last_updated(app: &TestApp, path: &str) -> String {
    let resource = json(app.get(path).await).await;
    resource["meta"]["lastUpdated"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn until_exports_the_window_between_since_and_until_at_every_level() {
    let app = TestApp::spawn().await;
    let patient = |id: &str| json!({"resourceType": "Patient", "id": id});
    let members: Vec<Value> = ["a", "b", "c", "d"]
        .iter()
        .map(|p| member(&format!("Patient/{p}")))
        .collect();
    put(&app, group("g", &members)).await;
    put(&app, patient("d")).await;
    put(&app, patient("a")).await;
    let since = last_updated(&app, "/Patient/a").await;
    put(&app, patient("b")).await;
    assert_eq!(
        app.client
            .delete(app.url("/Patient/d"))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    put(&app, patient("c")).await;
    let until = last_updated(&app, "/Patient/c").await;
    // After the window: a second version of a, and b deleted.
    put(
        &app,
        json!({"resourceType": "Patient", "id": "a", "active": true}),
    )
    .await;
    assert_eq!(
        app.client
            .delete(app.url("/Patient/b"))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );

    let parameters = json!({"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Patient"},
        {"name": "_since", "valueInstant": since},
        {"name": "_until", "valueInstant": until},
    ]});
    let query = format!("_type=Patient&_since={since}&_until={until}").replace('+', "%2B");
    for path in ["/$export", "/Patient/$export", "/Group/g/$export"] {
        let get = kick_off(&app, &format!("{path}?{query}")).await;
        let post = post_kick_off(&app, path, &parameters, "respond-async").await;
        assert_eq!(post.status(), 202, "{path}");
        let post = post.headers()["content-location"]
            .to_str()
            .unwrap()
            .to_string();
        for status_url in [get, post] {
            let manifest = wait_manifest(&app, &status_url).await;
            let got = resources_by_key(&download_all(&app, &manifest).await);
            // b as it was before _until; a changed before the window and after it; c at _until.
            assert_eq!(
                got.keys().cloned().collect::<Vec<_>>(),
                ["Patient/b"],
                "{path}"
            );
            assert_eq!(got["Patient/b"]["meta"]["versionId"], "1");
            assert!(
                manifest["transactionTime"].as_str().unwrap() > until.as_str(),
                "transactionTime stays the kick-off's: {manifest}"
            );
            if path == "/$export" {
                let deleted = &manifest["deleted"];
                assert_eq!(deleted.as_array().unwrap().len(), 1, "{manifest}");
                let url = deleted[0]["url"].as_str().unwrap();
                let text = app.text_at(url).await;
                // d's deletion fell in the window; b's came after it.
                assert_eq!(text.lines().count(), 1, "{text}");
                assert!(text.contains("Patient/d"), "{text}");
            }
        }
    }
    for (query, why) in [
        ("_until=yesterday".to_string(), "_until"),
        (
            format!("_since={since}&_until={since}"),
            "_until must be after _since",
        ),
        (format!("_till={since}&_until={until}"), "not both"),
        (format!("_until={until}&_until={until}"), "only once"),
        ("_until=2024-01-01T00:00:00Z%00".to_string(), "NUL"),
        (
            format!("_until=2024-01-01T00:00:00{}Z", "9".repeat(10_000)),
            "_until",
        ),
        ("_until=%FF%FE".to_string(), "UTF-8"),
    ] {
        let response = kick_off_request(
            &app,
            &format!("/$export?{}", query.replace('+', "%2B")),
            "respond-async",
            None,
        )
        .await;
        let text = assert_outcome(response, 400).await;
        assert!(text.contains(why), "{query}: {text}");
    }
    // A POST value of the wrong JSON shape.
    for value in [
        json!({"valueInstant": {"at": until}}),
        json!({"valueInteger": 1}),
    ] {
        let mut parameter = json!({"name": "_until"});
        parameter
            .as_object_mut()
            .unwrap()
            .extend(value.as_object().unwrap().clone());
        let body = json!({"resourceType": "Parameters", "parameter": [parameter]});
        let response = post_kick_off(&app, "/$export", &body, "respond-async").await;
        assert_outcome(response, 400).await;
    }
}
