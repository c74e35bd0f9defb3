//! `organizeOutputBy=Patient` (Bulk Data STU3): resource blocks — a header, the Patient, the
//! resources of its compartment — exact against the plain export at every level.

use std::collections::{BTreeMap, BTreeSet};

use crate::common::*;
use serde_json::{Value, json};

/// One organized output file as downloaded.
struct BlockFile {
    url: String,
    continues_in: Option<String>,
    count: u64,
    lines: Vec<Value>,
}

async fn organized_files(app: &TestApp, manifest: &Value) -> Vec<BlockFile> {
    let mut files = Vec::new();
    for item in manifest["output"].as_array().unwrap() {
        assert!(
            item.get("type").is_none(),
            "an organized item has a type: {item}"
        );
        let url = item["url"].as_str().unwrap().to_string();
        let lines = app
            .text_at(&url)
            .await
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        files.push(BlockFile {
            continues_in: item["continuesInFile"].as_str().map(str::to_string),
            count: item["count"].as_u64().unwrap(),
            url,
            lines,
        });
    }
    files
}

/// The patient a header line names.
fn header_patient(line: &Value) -> Option<String> {
    if line["resourceType"] != "Parameters" {
        return None;
    }
    assert_eq!(line["parameter"][0]["name"], "header", "{line}");
    let reference = line["parameter"][0]["valueReference"]["reference"]
        .as_str()
        .unwrap();
    Some(reference.strip_prefix("Patient/").unwrap().to_string())
}

fn key(resource: &Value) -> String {
    format!(
        "{}/{}",
        resource["resourceType"].as_str().unwrap(),
        resource["id"].as_str().unwrap()
    )
}

/// Checks the block layout of organized files and returns their resources by key (no header),
/// each once. Blocks are in patient order within a file, each file starts with a header, a
/// block's Patient comes right after its header, its other resources reference the patient,
/// and a block spans files only through `continuesInFile`, when it alone exceeds `part_size`.
fn check_blocks(files: &[BlockFile], part_size: usize) -> BTreeMap<String, Value> {
    let mut all = BTreeMap::new();
    let by_url: BTreeMap<&str, &BlockFile> = files.iter().map(|f| (f.url.as_str(), f)).collect();
    let mut seen_blocks = BTreeSet::new();
    let mut continued_from: BTreeMap<String, String> = BTreeMap::new();
    for file in files {
        assert_eq!(file.count as usize, file.lines.len(), "{}", file.url);
        assert!(
            file.lines.len() <= part_size,
            "{} is over the part size",
            file.url
        );
        let mut block: Option<String> = None;
        let mut previous: Option<String> = None;
        let mut first_after_header = false;
        let mut last_block = None;
        for (n, line) in file.lines.iter().enumerate() {
            if let Some(patient) = header_patient(line) {
                if let Some(previous) = &previous {
                    assert!(previous < &patient, "blocks out of order in {}", file.url);
                }
                let continuation = n == 0 && continued_from.get(&file.url) == Some(&patient);
                assert!(
                    seen_blocks.insert(patient.clone()) || continuation,
                    "block {patient} is split without continuesInFile"
                );
                previous = Some(patient.clone());
                block = Some(patient.clone());
                last_block = Some(patient);
                first_after_header = true;
                continue;
            }
            let block = block.as_ref().expect("every file starts with a header");
            if line["resourceType"] == "Patient" {
                assert_eq!(line["id"], block.as_str(), "a Patient outside its block");
                assert!(
                    first_after_header,
                    "Patient/{block} is not right after its header"
                );
            } else {
                let mut refs = Vec::new();
                references(line, &mut refs);
                assert!(
                    refs.contains(&format!("Patient/{block}")),
                    "{} is in the block of {block}",
                    key(line)
                );
            }
            first_after_header = false;
            assert!(
                all.insert(key(line), line.clone()).is_none(),
                "{} twice",
                key(line)
            );
        }
        if let Some(next) = &file.continues_in {
            let next_file = by_url
                .get(next.as_str())
                .expect("continuesInFile is in output");
            let block = last_block.clone().unwrap();
            assert_eq!(header_patient(&next_file.lines[0]), Some(block.clone()));
            assert_eq!(
                file.lines.len(),
                part_size,
                "a block is split before the part is full"
            );
            continued_from.insert(next.clone(), block);
        }
    }
    all
}

/// The plain export's resources by key.
async fn plain_resources(app: &TestApp, path: &str) -> BTreeMap<String, Value> {
    let manifest = wait_manifest(app, &kick_off(app, path).await).await;
    resources_by_key(&download_all(app, &manifest).await)
}

#[tokio::test]
async fn organized_export_holds_the_plain_export_in_blocks_at_every_level() {
    // The generated patients have 280 to 500 resources each: some blocks are split.
    const PART_SIZE: usize = 350;
    let app = TestApp::spawn_with(|c| {
        c.export.part_size = PART_SIZE as u32;
        c.export.range_size = 700;
    })
    .await;
    let loaded = load_generated(&app, 6).await;
    let patients: Vec<String> = loaded["Patient"]
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    // In no compartment: an Observation without a subject (system level: a file of its own).
    put(
        &app,
        json!({"resourceType": "Observation", "id": "loose", "status": "final",
                     "code": {"text": "x"}}),
    )
    .await;
    // In two compartments: written once, in the block of the lower id.
    let (low, high) = (
        patients.iter().min().unwrap(),
        patients.iter().max().unwrap(),
    );
    put(
        &app,
        json!({"resourceType": "Observation", "id": "shared", "status": "final",
                     "code": {"text": "x"}, "subject": {"reference": format!("Patient/{high}")},
                     "performer": [{"reference": format!("Patient/{low}")}]}),
    )
    .await;
    let members: Vec<Value> = patients[..3]
        .iter()
        .map(|p| json!({"entity": {"reference": format!("Patient/{p}")}}))
        .collect();
    put(
        &app,
        json!({"resourceType": "Group", "id": "g", "type": "person", "actual": true,
                     "member": members}),
    )
    .await;

    for path in ["/$export", "/Patient/$export", "/Group/g/$export"] {
        let plain = plain_resources(&app, path).await;
        let status_url = kick_off(&app, &format!("{path}?organizeOutputBy=Patient")).await;
        let manifest = wait_manifest(&app, &status_url).await;
        assert_eq!(manifest["outputOrganizedBy"], "Patient", "{path}");
        let files = organized_files(&app, &manifest).await;
        let (blocks, single_type): (Vec<_>, Vec<_>) = files
            .into_iter()
            .partition(|f| f.url.contains("/Patient-blocks-"));
        let mut got = check_blocks(&blocks, PART_SIZE);
        // What is in no compartment comes in files of one type (system level only).
        for file in single_type {
            for line in file.lines {
                assert!(got.insert(key(&line), line).is_none());
            }
        }
        assert_eq!(got, plain, "{path}: not the plain export's resources");
        if path != "/Group/g/$export" {
            assert!(
                blocks.iter().any(|f| f.continues_in.is_some()),
                "{path}: none split"
            );
        }
        assert_eq!(
            got.contains_key("Observation/loose"),
            path == "/$export",
            "{path}"
        );
        // Types in no compartment: at system level in files of their own, elsewhere none.
        let query = format!("{path}?_type=Practitioner,Organization");
        let plain = plain_resources(&app, &query).await;
        let organized = format!("{query}&organizeOutputBy=Patient");
        let manifest = wait_manifest(&app, &kick_off(&app, &organized).await).await;
        let mut got = BTreeMap::new();
        for file in organized_files(&app, &manifest).await {
            for line in file.lines {
                got.insert(key(&line), line);
            }
        }
        assert_eq!(got, plain, "{query}");
        assert_eq!(got.is_empty(), path != "/$export", "{query}");
    }
}

#[tokio::test]
async fn filters_elements_since_and_deletions_apply_in_blocks_as_in_a_plain_export() {
    let app = TestApp::spawn_with(|c| c.export.part_size = 200).await;
    let loaded = load_generated(&app, 3).await;
    // Changes after `_since`: a Patient, one of its Observations, and a deleted Observation.
    let patient = &loaded["Patient"][1];
    let mark = sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>("SELECT now()")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let mut changed = patient.clone();
    changed["active"] = json!(true);
    put(&app, changed).await;
    let observation = loaded["Observation"]
        .iter()
        .find(|o| {
            o["subject"]["reference"] == format!("Patient/{}", patient["id"].as_str().unwrap())
        })
        .unwrap();
    let mut changed = observation.clone();
    changed["status"] = json!("amended");
    put(&app, changed).await;
    let gone = &loaded["Observation"][0];
    let deleted = app
        .delete(&format!("/Observation/{}", gone["id"].as_str().unwrap()))
        .await;
    assert_eq!(deleted.status(), 204);
    let since = fhir_export::fhir::instant::format(mark).replace('+', "%2B");

    for query in [
        // A filter on Patient leaves the block's header and its other resources.
        "_type=Patient,Observation,Encounter&_typeFilter=Patient%3Fgender%3Dfemale\
         &_elements=Observation.subject,Observation.status"
            .to_string(),
        format!("_since={since}"),
    ] {
        for path in ["/$export", "/Patient/$export"] {
            let plain_manifest =
                wait_manifest(&app, &kick_off(&app, &format!("{path}?{query}")).await).await;
            let plain = resources_by_key(&download_all(&app, &plain_manifest).await);
            let status_url =
                kick_off(&app, &format!("{path}?{query}&organizeOutputBy=Patient")).await;
            let manifest = wait_manifest(&app, &status_url).await;
            let files = organized_files(&app, &manifest).await;
            let (blocks, single): (Vec<_>, Vec<_>) = files
                .into_iter()
                .partition(|f| f.url.contains("/Patient-blocks-"));
            let mut got = check_blocks(&blocks, 200);
            for file in single {
                for line in file.lines {
                    got.insert(key(&line), line);
                }
            }
            assert_eq!(got, plain, "{path}?{query}");
            // Deletions keep their typed items.
            let deletions = |m: &Value| -> Option<Vec<(Value, Value)>> {
                let items = m.get("deleted")?.as_array()?;
                Some(
                    items
                        .iter()
                        .map(|d| (d["type"].clone(), d["count"].clone()))
                        .collect(),
                )
            };
            assert_eq!(
                deletions(&manifest),
                deletions(&plain_manifest),
                "{path}?{query}"
            );
        }
    }
}

#[tokio::test]
async fn an_unsupported_organizing_type_is_refused_or_ignored_when_lenient() {
    let app = TestApp::spawn().await;
    load_generated(&app, 1).await;
    for path in ["/$export", "/Patient/$export"] {
        let refused = kick_off_request(
            &app,
            &format!("{path}?organizeOutputBy=Encounter"),
            "respond-async",
            None,
        )
        .await;
        let text = assert_outcome(refused, 400).await;
        assert!(text.contains("Encounter"), "{text}");
        let post = json!({"resourceType": "Parameters", "parameter": [
            {"name": "organizeOutputBy", "valueString": "Encounter"}]});
        assert_outcome(post_kick_off(&app, path, &post, "respond-async").await, 400).await;
        let lenient = post_kick_off(&app, path, &post, "respond-async, handling=lenient").await;
        assert_eq!(lenient.status(), 202);
        let manifest = wait_manifest(&app, &content_location(&lenient)).await;
        // Ignored: files of one type each, no outputOrganizedBy, and the error file says so.
        assert!(manifest.get("outputOrganizedBy").is_none());
        assert!(
            manifest["output"]
                .as_array()
                .unwrap()
                .iter()
                .all(|o| o["type"].is_string())
        );
        let error = app
            .text_at(manifest["error"][0]["url"].as_str().unwrap())
            .await;
        assert!(error.contains("organizeOutputBy"), "{error}");
    }
}

#[tokio::test]
async fn a_worker_killed_mid_organized_export_is_rescued_with_exact_blocks() {
    const PART_SIZE: usize = 60;
    let app = TestApp::spawn_with(|c| {
        c.export.workers = 0;
        c.export.stale_after_secs = 2;
        c.export.part_size = PART_SIZE as u32;
        c.export.range_size = 300;
    })
    .await;
    load_generated(&app, 2).await;
    let status_url = kick_off(&app, "/$export?organizeOutputBy=Patient").await;
    let mut doomed = spawn_process(
        &app,
        &[
            ("FHIR_EXPORT_WORKERS", "1"),
            ("FHIR_EXPORT_THROTTLE_MS", "250"),
            ("FHIR_EXPORT_STALE_AFTER_SECS", "2"),
            ("FHIR_EXPORT_POLL_INTERVAL_MS", "200"),
        ],
    );
    wait_for_parts(&app.pool, 4).await;
    doomed.kill();
    let _rescuer = app.spawn_sibling(|_| {}).await;
    let manifest = wait_manifest(&app, &status_url).await;
    let files = organized_files(&app, &manifest).await;
    let (blocks, single): (Vec<_>, Vec<_>) = files
        .into_iter()
        .partition(|f| f.url.contains("/Patient-blocks-"));
    let mut got = check_blocks(&blocks, PART_SIZE);
    for file in single {
        for line in file.lines {
            assert!(got.insert(key(&line), line).is_none());
        }
    }
    assert_eq!(got, plain_resources(&app, "/$export").await);
    let failures: i32 = sqlx::query_scalar("SELECT max(failures) FROM export_tasks")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(failures, 1, "the killed task was rescued once");
    // Numbers run from 1 without gaps.
    let mut numbers: Vec<u32> = blocks
        .iter()
        .map(|f| {
            f.url
                .rsplit('-')
                .next()
                .unwrap()
                .trim_end_matches(".ndjson")
                .parse()
                .unwrap()
        })
        .collect();
    numbers.sort();
    assert_eq!(numbers, (1..=numbers.len() as u32).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_de_identified_organized_export_names_each_block_as_its_patient_line() {
    let app = TestApp::spawn_with(|c| c.export.part_size = 300).await;
    let loaded = load_generated(&app, 2).await;
    let config = json!({"fhirVersion": "R4", "fhirPathRules": [
        {"path": "Resource.id", "method": "cryptoHash"},
        {"path": "nodesByType('Reference').reference", "method": "cryptoHash"}],
        "parameters": {"cryptoHashKey": "organized-test-key"}});
    let dir = app.storage.path().join("anonymization");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("hash.json"), config.to_string()).unwrap();
    let status_url = kick_off(
        &app,
        "/Patient/$export?organizeOutputBy=Patient&_anonymizationConfig=hash.json",
    )
    .await;
    let manifest = wait_manifest(&app, &status_url).await;
    let files = organized_files(&app, &manifest).await;
    let real: Vec<&str> = loaded["Patient"]
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    let mut blocks = 0;
    for file in &files {
        let mut block = None;
        for line in &file.lines {
            if let Some(patient) = header_patient(line) {
                assert!(
                    !real.contains(&patient.as_str()),
                    "a header names a real id"
                );
                block = Some(patient);
                blocks += 1;
            } else if line["resourceType"] == "Patient" {
                assert_eq!(line["id"].as_str(), block.as_deref());
            } else {
                let mut refs = Vec::new();
                references(line, &mut refs);
                assert!(refs.contains(&format!("Patient/{}", block.as_ref().unwrap())));
            }
        }
    }
    assert!(blocks >= 2);
}
