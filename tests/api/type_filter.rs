//! Fine-grained export: `_typeFilter`, the manifest's error file, `includeAssociatedData`.
//! Expected sets are computed from the generated input, not by the server's evaluator.

use std::collections::BTreeSet;

use crate::common::*;
use serde_json::{Value, json};

fn ids<'a>(resources: impl IntoIterator<Item = &'a Value>) -> BTreeSet<String> {
    resources
        .into_iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

fn exported_ids(files: &[OutputFile], resource_type: &str) -> BTreeSet<String> {
    let all = resources_by_key(files);
    all.values()
        .filter(|r| r["resourceType"] == resource_type)
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

fn loinc(observation: &Value) -> &str {
    observation["code"]["coding"][0]["code"].as_str().unwrap()
}

/// The effective year of a generated Observation (`2001-05-28T15:28:00+00:00`).
fn year(observation: &Value) -> i32 {
    observation["effectiveDateTime"].as_str().unwrap()[..4]
        .parse()
        .unwrap()
}

async fn lenient_kick_off(app: &TestApp, path: &str) -> (String, Value) {
    let response = kick_off_request(app, path, "respond-async, handling=lenient", None).await;
    assert_eq!(response.status(), 202);
    let location = content_location(&response);
    (location, json(response).await)
}

#[tokio::test]
async fn type_filters_export_exactly_the_matching_resources() {
    let app = TestApp::spawn().await;
    let loaded = load_generated(&app, 3).await;
    // Two ORed entries for Observation (the second one with an ORed value list, its comma
    // sent as %2C), one for MedicationRequest; Patient has none and comes out whole.
    let files = export_files(
        &app,
        "/$export?_type=Observation,MedicationRequest,Patient\
         &_typeFilter=Observation%3Fcode%3Dhttp%3A%2F%2Floinc.org%7C2093-3%26date%3Dge2010-01-01,\
         Observation%3Fcode%3D8867-4%252C9279-1%26date%3Dlt2000\
         &_typeFilter=MedicationRequest%3Fstatus%3Dactive",
    )
    .await;

    let observations = &loaded["Observation"];
    let expected = ids(observations.iter().filter(|o| {
        (loinc(o) == "2093-3" && year(o) >= 2010)
            || (["8867-4", "9279-1"].contains(&loinc(o)) && year(o) < 2000)
    }));
    assert!(expected.len() > 5 && expected.len() < observations.len() / 2);
    assert_eq!(exported_ids(&files, "Observation"), expected);
    let active = ids(loaded["MedicationRequest"]
        .iter()
        .filter(|m| m["status"] == "active"));
    assert!(!active.is_empty() && active.len() < loaded["MedicationRequest"].len());
    assert_eq!(exported_ids(&files, "MedicationRequest"), active);
    assert_eq!(exported_ids(&files, "Patient"), ids(&loaded["Patient"]));
    // Counts in the manifest are the lines written.
    for f in &files {
        assert_eq!(f.count as usize, f.text.lines().count());
    }
}

#[tokio::test]
async fn filtered_parts_are_full_and_numbered_without_gaps() {
    // A selective filter must not leave a trail of tiny or empty files.
    let app = TestApp::spawn_with(|c| c.export.part_size = 10).await;
    let loaded = load_generated(&app, 2).await;
    let files = export_files(
        &app,
        "/$export?_type=Observation&_typeFilter=Observation%3Fcode%3D2093-3",
    )
    .await;
    let expected = ids(loaded["Observation"]
        .iter()
        .filter(|o| loinc(o) == "2093-3"));
    assert_eq!(exported_ids(&files, "Observation"), expected);
    let mut names: Vec<String> = files.iter().map(|f| f.name.clone()).collect();
    names.sort_by_key(|n| n[12..n.len() - 7].parse::<u32>().unwrap());
    let want: Vec<String> = (1..=expected.len().div_ceil(10))
        .map(|n| format!("Observation-{n}.ndjson"))
        .collect();
    assert_eq!(names, want);
    let mut sizes: Vec<u64> = files.iter().map(|f| f.count).collect();
    sizes.sort();
    assert!(sizes[1..].iter().all(|s| *s == 10), "{sizes:?}");
}

#[tokio::test]
async fn id_and_last_updated_filters_are_exact() {
    let app = TestApp::spawn().await;
    let loaded = load_generated(&app, 3).await;
    let patients: Vec<&str> = loaded["Patient"]
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    // One Observation changes after `mark`: only it is newer than that.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let mark = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let mut changed = loaded["Observation"][5].clone();
    changed["status"] = json!("amended");
    let id = changed["id"].as_str().unwrap().to_string();
    let put = app.put_json(&format!("/Observation/{id}"), &changed).await;
    assert_eq!(put.status(), 200);
    let filter = format!(
        "Patient?_id={}&gender=male,female,other,unknown,Patient?_id={},Observation?_lastUpdated=gt{mark}",
        patients[0], patients[2]
    );
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("_type", "Patient,Observation")
        .append_pair("_typeFilter", &filter)
        .finish();
    let files = export_files(&app, &format!("/$export?{query}")).await;
    assert_eq!(
        exported_ids(&files, "Patient"),
        BTreeSet::from([patients[0].to_string(), patients[2].to_string()])
    );
    assert_eq!(exported_ids(&files, "Observation"), BTreeSet::from([id]));
}

#[tokio::test]
async fn lenient_kick_off_reports_what_it_ignored_in_the_error_file() {
    let app = TestApp::spawn().await;
    let loaded = load_generated(&app, 2).await;
    let (status, outcome) = lenient_kick_off(
        &app,
        "/$export?_type=Observation,Patient\
         &_typeFilter=Observation%3Fnope%3D1,Patient%3Fgender%3Dfemale\
         &includeAssociatedData=_everything",
    )
    .await;
    assert!(outcome.to_string().contains("nope"));
    let manifest = wait_manifest(&app, &status).await;
    // The bad Observation filter is dropped: every Observation comes out.
    let files = download_all(&app, &manifest).await;
    assert_eq!(
        exported_ids(&files, "Observation"),
        ids(&loaded["Observation"])
    );
    let female = ids(loaded["Patient"].iter().filter(|p| p["gender"] == "female"));
    assert_eq!(exported_ids(&files, "Patient"), female);
    let errors = manifest["error"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{manifest}");
    assert_eq!(errors[0]["type"], "OperationOutcome");
    let text = app.text_at(errors[0]["url"].as_str().unwrap()).await;
    let outcomes: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(outcomes.len(), 2);
    assert!(
        outcomes
            .iter()
            .all(|o| o["resourceType"] == "OperationOutcome")
    );
    assert!(
        outcomes[0]["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("'nope' is not a search parameter of Observation")
    );
    assert!(outcomes[1].to_string().contains("_everything"));
}

/// `(file kind, id, versionId)` of every line of the output files.
fn versions(files: &[OutputFile]) -> BTreeSet<(String, String, String)> {
    let mut all = BTreeSet::new();
    for f in files {
        let kind = f.name.rsplit_once('-').unwrap().0.to_string();
        for line in f.text.lines() {
            let r: Value = serde_json::from_str(line).unwrap();
            let key = (
                kind.clone(),
                r["id"].as_str().unwrap().to_string(),
                r["meta"]["versionId"].as_str().unwrap().to_string(),
            );
            assert!(all.insert(key.clone()), "{key:?} twice");
        }
    }
    all
}

fn set(items: &[(&str, &str, &str)]) -> BTreeSet<(String, String, String)> {
    items
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect()
}

#[tokio::test]
async fn associated_data_adds_history_and_last_states() {
    // One line per part, so history pages must resume inside a resource's versions.
    let app = TestApp::spawn_with(|c| c.export.part_size = 1).await;
    let patient = |id: &str, family: &str| json!({"resourceType": "Patient", "id": id, "name": [{"family": family}]});
    for (id, family) in [
        ("a", "A1"),
        ("a", "A2"),
        ("a", "A3"),
        ("b", "B1"),
        ("c", "C1"),
        ("c", "C2"),
    ] {
        let put = app
            .put_json(&format!("/Patient/{id}"), &patient(id, family))
            .await;
        assert!(put.status().is_success());
    }
    assert_eq!(app.delete("/Patient/b").await.status(), 204);

    let files = export_files(
        &app,
        "/$export?_type=Patient&includeAssociatedData=_history,_deleted",
    )
    .await;
    assert!(files.iter().all(|f| f.resource_type == "Patient"));
    assert_eq!(
        versions(&files),
        set(&[
            ("Patient", "a", "3"),
            ("Patient", "c", "2"),
            ("Patient-history", "a", "1"),
            ("Patient-history", "a", "2"),
            ("Patient-history", "c", "1"),
            ("Patient-softdeleted", "b", "1"),
        ])
    );
    let last_state = files
        .iter()
        .find(|f| f.name.starts_with("Patient-softdeleted"))
        .unwrap();
    let b: Value = serde_json::from_str(last_state.text.trim()).unwrap();
    assert_eq!(b["name"][0]["family"], "B1");
    assert_eq!(b["meta"]["extension"][0]["valueString"], "soft-deleted");

    // History alone lists the deleted resource's last version as history, unmarked.
    let files = export_files(
        &app,
        "/$export?_type=Patient&includeAssociatedData=_history",
    )
    .await;
    assert_eq!(
        versions(&files),
        set(&[
            ("Patient", "a", "3"),
            ("Patient", "c", "2"),
            ("Patient-history", "a", "1"),
            ("Patient-history", "a", "2"),
            ("Patient-history", "b", "1"),
            ("Patient-history", "c", "1"),
        ])
    );
    // A filter applies to older versions too.
    let files = export_files(
        &app,
        "/$export?_type=Patient&includeAssociatedData=_history&_typeFilter=Patient%3Ffamily%3Da",
    )
    .await;
    assert_eq!(
        versions(&files),
        set(&[
            ("Patient", "a", "3"),
            ("Patient-history", "a", "1"),
            ("Patient-history", "a", "2"),
        ])
    );
}

#[tokio::test]
async fn associated_data_is_system_level_only_and_lenient_handling_ignores_it_below() {
    let app = TestApp::spawn().await;
    let patient = json!({"resourceType": "Patient", "id": "p1"});
    assert_eq!(app.put_json("/Patient/p1", &patient).await.status(), 201);
    let group = json!({"resourceType": "Group", "id": "g1", "type": "person", "actual": true,
        "member": [{"entity": {"reference": "Patient/p1"}}]});
    assert_eq!(app.put_json("/Group/g1", &group).await.status(), 201);
    for path in ["/Patient/$export", "/Group/g1/$export"] {
        let query = format!("{path}?includeAssociatedData=_history&_type=Patient");
        let strict = kick_off_request(&app, &query, "respond-async", None).await;
        let text = assert_outcome(strict, 400).await;
        assert!(text.contains("system-level"), "{path}: {text}");

        let lenient = kick_off_request(&app, &query, "respond-async, handling=lenient", None).await;
        assert_eq!(lenient.status(), 202, "{path}");
        let status = lenient.headers()["content-location"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            json(lenient)
                .await
                .to_string()
                .contains("includeAssociatedData")
        );
        let manifest = wait_manifest(&app, &status).await;
        let files = download_all(&app, &manifest).await;
        assert!(
            exported_ids(&files, "Patient").contains("p1"),
            "{path}: the export ran as if the parameter were absent"
        );
        let error_url = manifest["error"][0]["url"].as_str().unwrap();
        let outcome = app.text_at(error_url).await;
        assert_eq!(outcome.lines().count(), 1, "{path}: {outcome}");
        assert!(
            outcome.contains("includeAssociatedData"),
            "{path}: {outcome}"
        );
    }
}
