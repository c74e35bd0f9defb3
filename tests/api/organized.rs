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

async fn put(app: &TestApp, resource: Value) {
    let path = format!(
        "/{}/{}",
        resource["resourceType"].as_str().unwrap(),
        resource["id"].as_str().unwrap()
    );
    let status = app.put_json(&path, &resource).await.status();
    assert!(status.is_success(), "{path}: {status}");
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
    }
}
