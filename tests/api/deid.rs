//! De-identified export (`_anonymizationConfig`) over HTTP: generated data goes out through a
//! Safe-Harbor-like configuration and is checked field by field against what was loaded;
//! every configuration mistake is a 400; a rescued task writes the same bytes.

use std::collections::{BTreeMap, BTreeSet};

use crate::common::*;
use aws_lc_rs::hmac;
use chrono::NaiveDate;
use serde_json::{Value, json};

const HASH_KEY: &str = "test-hash-key";

fn config() -> Value {
    json!({
        "fhirVersion": "R4",
        "processingErrors": "raise",
        "fhirPathRules": [
            {"path": "nodesByType('Extension')", "method": "redact"},
            {"path": "Organization.address", "method": "keep"},
            {"path": "nodesByType('Address').state", "method": "keep"},
            {"path": "nodesByType('Address').country", "method": "keep"},
            {"path": "nodesByType('HumanName').use", "method": "keep"},
            {"path": "Resource.id", "method": "cryptoHash"},
            {"path": "nodesByType('Reference').reference", "method": "cryptoHash"},
            {"path": "nodesByType('Reference').display", "method": "redact"},
            {"path": "nodesByType('Identifier').value", "method": "redact"},
            {"path": "nodesByType('Address').city", "method": "encrypt"},
            {"path": "Observation.value as Quantity", "method": "perturb",
             "span": 0.1, "rangeType": "proportional", "roundTo": 1},
            {"path": "nodesByType('date')", "method": "dateShift"},
            {"path": "nodesByType('dateTime')", "method": "dateShift"},
            {"path": "nodesByType('instant')", "method": "dateShift"},
            {"path": "nodesByType('Address')", "method": "redact"},
            {"path": "nodesByType('HumanName')", "method": "redact"},
            {"path": "nodesByType('ContactPoint')", "method": "redact"},
            {"path": "nodesByType('Narrative')", "method": "redact"}
        ],
        "parameters": {
            "dateShiftKey": "test-date-key",
            "cryptoHashKey": HASH_KEY,
            "encryptKey": "0123456789abcdef0123456789abcdef",
            "enablePartialDatesForRedact": true,
            "enablePartialZipCodesForRedact": true,
            "restrictedZipCodeTabulationAreas": ["036"]
        }
    })
}

fn hash(id: &str) -> String {
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, HASH_KEY.as_bytes()),
        id.as_bytes(),
    );
    tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Puts a configuration where a filesystem-storage server looks for it.
fn put_config(app: &TestApp, name: &str, text: &str) {
    let dir = app.storage.path().join("anonymization");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), text).unwrap();
}

/// Days from `before` to `after` (dates or dateTimes, by their date part).
fn shift(before: &str, after: &str) -> i64 {
    let day = |s: &str| NaiveDate::parse_from_str(&s[..10], "%Y-%m-%d").unwrap();
    (day(after) - day(before)).num_days()
}

fn labels(resource: &Value) -> BTreeSet<String> {
    resource["meta"]["security"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["code"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_safe_harbor_export_keeps_nothing_identifying_and_every_reference_resolves() {
    let app = TestApp::spawn().await;
    let loaded = load_generated(&app, 3).await;
    put_config(&app, "safe-harbor.json", &config().to_string());
    let status_url = kick_off(&app, "/$export?_anonymizationConfig=safe-harbor.json").await;
    let manifest = wait_manifest(&app, &status_url).await;
    assert_eq!(
        manifest["extension"],
        json!({"url": "urn:fhir-export:de-identified", "valueString": "safe-harbor.json"})
    );
    let files = download_all(&app, &manifest).await;
    // Organizations keep their addresses (the configuration says so); nothing else may.
    let text: String = files
        .iter()
        .filter(|f| f.resource_type != "Organization")
        .map(|f| f.text.as_str())
        .collect();
    let out = resources_by_key(&files);
    let loaded_count: usize = loaded.values().map(Vec::len).sum();
    assert_eq!(out.len(), loaded_count, "every resource once");

    // What must not survive, anywhere in the output.
    for patient in &loaded["Patient"] {
        let mut secrets = vec![patient["id"].as_str().unwrap().to_string()];
        for name in patient["name"].as_array().unwrap() {
            secrets.push(name["family"].as_str().unwrap().to_string());
            for given in name["given"].as_array().unwrap() {
                secrets.push(given.as_str().unwrap().to_string());
            }
        }
        for field in ["identifier", "telecom"] {
            for item in patient[field].as_array().unwrap() {
                secrets.push(item["value"].as_str().unwrap().to_string());
            }
        }
        for address in patient["address"].as_array().unwrap() {
            secrets.push(address["line"][0].as_str().unwrap().to_string());
            secrets.push(address["city"].as_str().unwrap().to_string());
        }
        for secret in secrets {
            assert!(!text.contains(&format!("\"{secret}")), "{secret} survived");
        }
    }

    // Patients, field by field.
    for original in &loaded["Patient"] {
        let id = hash(original["id"].as_str().unwrap());
        let p = &out[&format!("Patient/{id}")];
        assert_eq!(p["name"], json!([{"use": "official"}]));
        assert!(p.get("telecom").is_none());
        let address = &p["address"][0];
        let postal = original["address"][0]["postalCode"].as_str().unwrap();
        assert_eq!(
            address["postalCode"],
            format!("{}00", &postal[..3]).as_str()
        );
        assert_eq!(address["state"], original["address"][0]["state"]);
        assert_eq!(address["country"], "US");
        let city = address["city"].as_str().unwrap();
        assert!(
            city.len() >= 44 && city != original["address"][0]["city"],
            "{city}"
        );
        assert!(
            p["identifier"]
                .as_array()
                .unwrap()
                .iter()
                .all(|i| i.get("value").is_none())
        );
        assert_eq!(p["gender"], original["gender"]);
        if let Some(birth) = p["birthDate"].as_str() {
            let days = shift(original["birthDate"].as_str().unwrap(), birth);
            assert!(days.abs() <= 50, "{days}");
        }
        let labels = labels(p);
        for label in ["REDACTED", "ABSTRED", "CRYTOHASH", "ENCRYPT", "PERTURBED"] {
            assert!(labels.contains(label), "{label} in {labels:?}");
        }
    }

    // Observations: one shift per resource, perturbed values, hashed references.
    for original in &loaded["Observation"] {
        let o = &out[&format!("Observation/{}", hash(original["id"].as_str().unwrap()))];
        let effective = o["effectiveDateTime"].as_str().unwrap();
        let days = shift(original["effectiveDateTime"].as_str().unwrap(), effective);
        assert!(days.abs() <= 50, "{days}");
        assert_eq!(
            shift(
                original["issued"].as_str().unwrap(),
                o["issued"].as_str().unwrap()
            ),
            days
        );
        assert!(effective.ends_with("T00:00:00+00:00"), "{effective}");
        if let Some(value) = original["valueQuantity"]["value"].as_f64() {
            let got = o["valueQuantity"]["value"].as_f64().unwrap();
            assert!(
                (got - value).abs() <= value.abs() * 0.05 + 0.05,
                "{value} → {got}"
            );
        }
        assert_eq!(o["code"], original["code"], "codes stay");
        assert_eq!(
            o["subject"]["reference"],
            format!(
                "Patient/{}",
                hash(&original["subject"]["reference"].as_str().unwrap()[8..])
            )
            .as_str()
        );
    }

    // At Group level too: the members' compartments, de-identified the same way.
    let group = loaded["Group"][0]["id"].as_str().unwrap();
    let members = resources_by_key(
        &export_files(
            &app,
            &format!("/Group/{group}/$export?_type=Patient&_anonymizationConfig=safe-harbor.json"),
        )
        .await,
    );
    let expected: BTreeSet<String> = loaded["Patient"]
        .iter()
        .map(|p| format!("Patient/{}", hash(p["id"].as_str().unwrap())))
        .collect();
    assert_eq!(members.keys().cloned().collect::<BTreeSet<_>>(), expected);

    // Every reference in the output resolves to an output resource.
    let mut all = Vec::new();
    for resource in out.values() {
        references(resource, &mut all);
    }
    assert!(all.len() > 100);
    for reference in all {
        assert!(out.contains_key(&reference), "{reference} does not resolve");
    }
}

#[tokio::test]
async fn the_filter_sees_the_stored_resource_and_elements_the_de_identified_one() {
    let app = TestApp::spawn().await;
    let loaded = load_generated(&app, 2).await;
    // Codes are redacted: a filter on the de-identified resource would match nothing.
    let mut config = config();
    config["fhirPathRules"].as_array_mut().unwrap().insert(
        0,
        json!({"path": "nodesByType('Coding').code", "method": "redact"}),
    );
    put_config(&app, "codes.json", &config.to_string());
    let files = export_files(
        &app,
        "/$export?_type=Observation&_anonymizationConfig=codes.json\
         &_typeFilter=Observation%3Fcode%3D2339-0&_elements=valueQuantity,subject",
    )
    .await;
    let expected: BTreeSet<String> = loaded["Observation"]
        .iter()
        .filter(|o| o["code"]["coding"][0]["code"] == "2339-0")
        .map(|o| hash(o["id"].as_str().unwrap()))
        .collect();
    assert!(!expected.is_empty());
    let out = resources_by_key(&files);
    let got: BTreeSet<String> = out
        .keys()
        .map(|k| k["Observation/".len()..].to_string())
        .collect();
    assert_eq!(got, expected);
    for o in out.values() {
        let keys: BTreeSet<&str> = o.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            // status and code are required of an Observation: kept whether listed or not.
            BTreeSet::from([
                "resourceType",
                "id",
                "meta",
                "status",
                "code",
                "subject",
                "valueQuantity"
            ])
        );
        assert!(labels(o).contains("CRYTOHASH"));
        assert_eq!(o["meta"]["tag"][0]["code"], "SUBSETTED");
    }
}

#[tokio::test]
async fn every_configuration_mistake_is_a_400_naming_it() {
    let app = TestApp::spawn().await;
    let rules = |rules: Value| json!({"fhirPathRules": rules}).to_string();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "malformed.json",
            "{\"fhirPathRules\": [".into(),
            "not valid JSON",
        ),
        (
            "method.json",
            rules(json!([{"path": "Patient.name", "method": "scramble"}])),
            "scramble",
        ),
        (
            "path.json",
            rules(json!([{"path": "Patient.name.aggregate(1)", "method": "redact"}])),
            "aggregate",
        ),
        (
            "type.json",
            rules(json!([{"path": "nodesByType('Adress')", "method": "redact"}])),
            "Adress",
        ),
        (
            "substitute.json",
            rules(json!([{"path": "Patient.gender", "method": "substitute"}])),
            "replaceWith",
        ),
        (
            "perturb.json",
            rules(json!([{"path": "Observation.value", "method": "perturb"}])),
            "span",
        ),
        (
            "generalize.json",
            rules(json!([{"path": "Patient.birthDate", "method": "generalize",
            "cases": {"$this >": "1"}}])),
            "$this >",
        ),
        (
            "key.json",
            json!({"fhirPathRules": [], "parameters": {"encryptKey": "too-short"}}).to_string(),
            "72 bits",
        ),
        (
            "errors.json",
            json!({"fhirPathRules": [], "processingErrors": "ignore"}).to_string(),
            "processingErrors",
        ),
        (
            "version.json",
            json!({"fhirVersion": "Stu3", "fhirPathRules": []}).to_string(),
            "Stu3",
        ),
        (
            "nul.json",
            "{\"fhirPathRules\": [], \"fhirVersion\": \"R4\u{0}\"}".into(),
            "NUL",
        ),
        // Hostile: nesting that would take the parser's stack, a chain that would take the
        // evaluator's.
        (
            "nested.json",
            rules(
                json!([{"path": format!("{}1{}", "(".repeat(100), ")".repeat(100)),
                "method": "redact"}]),
            ),
            "nest",
        ),
        (
            "long.json",
            rules(json!([{"path": format!("1{}", "+1".repeat(50_000)), "method": "redact"}])),
            "tokens",
        ),
    ];
    for (name, text, says) in &cases {
        put_config(&app, name, text);
        let response = kick_off_request(
            &app,
            &format!("/$export?_anonymizationConfig={name}"),
            "respond-async",
            None,
        )
        .await;
        let message = assert_outcome(response, 400).await;
        assert!(
            message.contains(name) && message.contains(says),
            "{name}: {message}"
        );
    }
    let missing = kick_off_request(
        &app,
        "/$export?_anonymizationConfig=nope.json",
        "respond-async",
        None,
    )
    .await;
    assert!(assert_outcome(missing, 400).await.contains("nope.json"));
    let climbing = kick_off_request(
        &app,
        "/$export?_anonymizationConfig=../x",
        "respond-async",
        None,
    )
    .await;
    assert_outcome(climbing, 400).await;
    let lone_etag = kick_off_request(
        &app,
        "/$export?_anonymizationConfigEtag=%22x%22",
        "respond-async",
        None,
    )
    .await;
    assert_outcome(lone_etag, 400).await;

    put_config(&app, "ok.json", &config().to_string());
    let stale = kick_off_request(
        &app,
        "/$export?_anonymizationConfig=ok.json&_anonymizationConfigEtag=%220x8D0000%22",
        "respond-async",
        None,
    )
    .await;
    assert!(assert_outcome(stale, 400).await.contains("does not match"));
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM export_jobs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(jobs, 0, "no job for a refused kick-off");

    // The right ETag (here a digest of the file) is accepted, quoted or not, and in a POST.
    let digest =
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, config().to_string().as_bytes());
    let etag: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    kick_off(
        &app,
        &format!("/$export?_anonymizationConfig=ok.json&_anonymizationConfigEtag={etag}"),
    )
    .await;
    let body = json!({"resourceType": "Parameters", "parameter": [
        {"name": "_anonymizationConfig", "valueString": "ok.json"},
        {"name": "_anonymizationConfigEtag", "valueString": format!("\"{etag}\"")}]});
    let response = post_kick_off(&app, "/Patient/$export", &body, "respond-async").await;
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
}

#[tokio::test]
async fn a_resource_the_rules_fail_on_fails_the_job_or_goes_out_empty() {
    let app = TestApp::spawn().await;
    load_generated(&app, 1).await;
    // Generalization applies to primitives only: on a HumanName it fails for every Patient.
    let failing = |errors: &str| {
        json!({"processingErrors": errors, "fhirPathRules": [
            {"path": "nodesByType('HumanName')", "method": "generalize", "cases": {"true": "'x'"}}]})
        .to_string()
    };
    put_config(&app, "raise.json", &failing("raise"));
    put_config(&app, "skip.json", &failing("skip"));
    let status_url = kick_off(
        &app,
        "/$export?_type=Patient&_anonymizationConfig=raise.json",
    )
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let response = loop {
        let response = app.client.get(&status_url).send().await.unwrap();
        if response.status() != 202 {
            break response;
        }
        assert!(std::time::Instant::now() < deadline, "the job did not fail");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_outcome(response, 500).await;
    let failures: i32 = sqlx::query_scalar("SELECT max(failures) FROM export_tasks")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(failures, 1, "failed at once, not retried");

    let files = export_files(
        &app,
        "/$export?_type=Patient&_anonymizationConfig=skip.json",
    )
    .await;
    for line in files[0].text.lines() {
        let r: Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            r,
            json!({"resourceType": "Patient", "meta": {"security": [{"system":
                "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                "code": "REDACTED", "display": "redacted"}]}})
        );
    }
}

/// Files of a manifest by name.
async fn files_by_name(app: &TestApp, status_url: &str) -> BTreeMap<String, String> {
    let manifest = wait_manifest(app, status_url).await;
    download_all(app, &manifest)
        .await
        .into_iter()
        .map(|f| (f.name, f.text))
        .collect()
}

#[tokio::test]
async fn a_rescued_task_writes_the_same_bytes_and_other_jobs_differ() {
    // The API alone; workers come as a process that is killed, then a rescuer.
    let app = TestApp::spawn_with(|c| {
        c.export.workers = 0;
        c.export.stale_after_secs = 2;
        c.export.part_size = 20;
    })
    .await;
    load_generated(&app, 2).await;
    // Random draws everywhere (IVs, noise) and keys from the job's seed.
    let mut config = config();
    config["parameters"] = json!({"dateShiftKey": "k"});
    put_config(&app, "random.json", &config.to_string());
    let query = "/$export?_type=Observation,Patient&_anonymizationConfig=random.json";
    let first = kick_off(&app, query).await;
    let second = kick_off(&app, query).await;
    let other = kick_off(&app, query).await;
    // The second job is the first one again, seed and all: what a retry of it must write.
    let ids: Vec<uuid::Uuid> = [&first, &second]
        .iter()
        .map(|u| u.rsplit('/').next().unwrap().parse().unwrap())
        .collect();
    sqlx::query(
        "UPDATE export_jobs SET anonymization_seed = (SELECT anonymization_seed FROM export_jobs
         WHERE id = $1) WHERE id = $2",
    )
    .bind(ids[0])
    .bind(ids[1])
    .execute(&app.pool)
    .await
    .unwrap();

    let mut doomed = spawn_process(
        &app,
        &[
            ("FHIR_EXPORT_WORKERS", "1"),
            ("FHIR_EXPORT_PART_SIZE", "20"),
            ("FHIR_EXPORT_THROTTLE_MS", "250"),
            ("FHIR_EXPORT_STALE_AFTER_SECS", "2"),
            ("FHIR_EXPORT_POLL_INTERVAL_MS", "200"),
        ],
    );
    wait_for_parts(&app.pool, 3).await;
    doomed.kill();
    let _rescuer = app.spawn_sibling(|_| {}).await;

    let a = files_by_name(&app, &first).await;
    let b = files_by_name(&app, &second).await;
    let c = files_by_name(&app, &other).await;
    let rescued: i32 = sqlx::query_scalar("SELECT max(failures) FROM export_tasks")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(rescued, 1, "a task was rescued");
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let all: String = a.values().map(String::as_str).collect();
    assert!(all.contains("ENCRYPT") && all.contains("PERTURBED"));
    for (name, text) in &a {
        assert_eq!(text, &b[name], "{name} differs between the same job's runs");
    }
    assert_ne!(a, c, "another job draws other keys");
    let ids_of = |files: &BTreeMap<String, String>| -> BTreeSet<String> {
        files
            .values()
            .flat_map(|t| t.lines())
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    assert!(
        ids_of(&a).is_disjoint(&ids_of(&c)),
        "hash keys differ per job"
    );
}

#[tokio::test]
async fn an_incremental_de_identified_export_lists_deletions_by_their_de_identified_ids() {
    let app = TestApp::spawn().await;
    put_config(&app, "ids.json", &config().to_string());
    for id in ["a", "b"] {
        put(
            &app,
            json!({"resourceType": "Patient", "id": id, "gender": "female"}),
        )
        .await;
    }
    let mark: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let since = fhir_export::fhir::instant::format(mark).replace('+', "%2B");
    put(
        &app,
        json!({"resourceType": "Patient", "id": "a", "active": true}),
    )
    .await;
    assert_eq!(app.delete("/Patient/b").await.status(), 204);

    let deletion = |id: &str| {
        json!({"resourceType": "Bundle", "type": "transaction",
               "entry": [{"request": {"method": "DELETE", "url": format!("Patient/{id}")}}]})
    };
    // De-identified: the deletion names b as its exported copy was named.
    let path = format!("/$export?_type=Patient&_since={since}&_anonymizationConfig=ids.json");
    let manifest = wait_manifest(&app, &kick_off(&app, &path).await).await;
    let output = app
        .text_at(manifest["output"][0]["url"].as_str().unwrap())
        .await;
    let exported: Value = serde_json::from_str(output.trim()).unwrap();
    assert_eq!(exported["id"], hash("a"));
    assert_eq!(manifest["deleted"][0]["type"], "Bundle");
    let deleted = app
        .text_at(manifest["deleted"][0]["url"].as_str().unwrap())
        .await;
    let line: Value = serde_json::from_str(deleted.trim()).unwrap();
    assert_eq!(line, deletion(&hash("b")));
    // `_elements` subsets resources, never the deletion Bundles.
    let path = format!("/$export?_type=Patient&_since={since}&_elements=active");
    let manifest = wait_manifest(&app, &kick_off(&app, &path).await).await;
    let deleted = app
        .text_at(manifest["deleted"][0]["url"].as_str().unwrap())
        .await;
    assert_eq!(
        serde_json::from_str::<Value>(deleted.trim()).unwrap(),
        deletion("b")
    );
}

/// R4's con-4 on a Condition line: an abatement needs a clinical status of resolved,
/// remission or inactive (from the condition-clinical system).
fn breaks_con4(line: &str) -> Option<String> {
    let r: Value = serde_json::from_str(line).ok()?;
    let abated = r.as_object()?.keys().any(|k| k.starts_with("abatement"));
    let system = "http://terminology.hl7.org/CodeSystem/condition-clinical";
    let allowed = r["clinicalStatus"]["coding"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| {
            c["system"] == system
                && ["resolved", "remission", "inactive"]
                    .iter()
                    .any(|s| c["code"] == *s)
        });
    (r["resourceType"] == "Condition" && abated && !allowed).then(|| format!("con-4: {line}"))
}

/// A configuration written after the kinds of rules of the tool's published sample that empty
/// required elements: codes and texts of codings redacted, reference displays redacted and
/// references hashed, values and dates of events redacted, extensions redacted.
fn emptying_config(tool_output: bool) -> Value {
    json!({
        "fhirVersion": "R4",
        "processingErrors": "raise",
        "fhirPathRules": [
            {"path": "nodesByType('Extension').url", "method": "redact"},
            {"path": "nodesByType('HumanName').use", "method": "keep"},
            {"path": "Resource.id", "method": "cryptoHash"},
            {"path": "Observation.value", "method": "redact"},
            {"path": "Immunization.occurrence", "method": "redact"},
            {"path": "Condition.onset", "method": "redact"},
            {"path": "Claim.insurance.coverage", "method": "redact"},
            {"path": "nodesByType('CodeableConcept').text", "method": "redact"},
            {"path": "nodesByType('Coding').display", "method": "redact"},
            {"path": "nodesByType('Coding').code", "method": "redact"},
            {"path": "nodesByType('Identifier').value", "method": "redact"},
            {"path": "nodesByType('Reference').display", "method": "redact"},
            {"path": "nodesByType('Reference').reference", "method": "cryptoHash"},
            {"path": "nodesByType('dateTime')", "method": "dateShift"},
            {"path": "nodesByType('HumanName')", "method": "redact"},
            {"path": "nodesByType('Address')", "method": "redact"}
        ],
        "parameters": {"dateShiftKey": "k", "cryptoHashKey": HASH_KEY,
                       "toolCompatibleOutput": tool_output}
    })
}

#[tokio::test]
async fn de_identified_lines_are_valid_r4_unless_the_tools_output_is_asked_for() {
    let app = TestApp::spawn().await;
    load_generated(&app, 3).await;
    // Resources whose required elements the rules empty.
    put(
        &app,
        json!({"resourceType": "Observation", "id": "text-only", "status": "final",
                     "code": {"text": "a finding"}, "subject": {"reference": "Patient/x"},
                     "extension": [{"url": "http://example.org/e", "valueString": "v"}]}),
    )
    .await;
    put(&app, json!({"resourceType": "Claim", "id": "c", "status": "active",
                     "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "oral"}]},
                     "use": "claim", "patient": {"reference": "Patient/x"},
                     "created": "2024-01-01", "provider": {"reference": "Organization/o"},
                     "priority": {"coding": [{"code": "normal"}]},
                     "insurance": [{"sequence": 1, "focal": true, "coverage": {"display": "a plan"}}]}))
    .await;
    put_config(&app, "valid.json", &emptying_config(false).to_string());
    put_config(&app, "tool.json", &emptying_config(true).to_string());
    put_config(
        &app,
        "bench.json",
        include_str!("../../bench/deid-config.json"),
    );
    put_config(
        &app,
        "sample.json",
        include_str!("../../bench/deid-sample-config.json"),
    );
    let mut schema = R4Schema::load();
    for (name, valid) in [
        ("valid.json", true),
        ("bench.json", true),
        ("sample.json", true),
        ("tool.json", false),
    ] {
        let path = format!("/$export?_anonymizationConfig={name}");
        let manifest = wait_manifest(&app, &kick_off(&app, &path).await).await;
        let files = download_all(&app, &manifest).await;
        let lines: Vec<&str> = files.iter().flat_map(|f| f.text.lines()).collect();
        assert!(lines.len() > 1000, "{name}");
        let mut problems: Vec<String> = lines.iter().flat_map(|l| schema.problems(l)).collect();
        // The schema cannot check invariants between elements; con-4 is the one the rules break.
        problems.extend(lines.iter().filter_map(|l| breaks_con4(l)));
        if name == "valid.json" {
            let text_only = files
                .iter()
                .flat_map(|f| f.text.lines())
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .find(|r| r["id"] == hash("text-only"))
                .unwrap();
            let absent = "http://hl7.org/fhir/StructureDefinition/data-absent-reason";
            assert_eq!(
                text_only["code"],
                json!({"extension": [{"url": absent, "valueCode": "masked"}]})
            );
            assert!(
                text_only.get("extension").is_none(),
                "an extension without its url stayed"
            );
        }
        if valid {
            assert!(
                problems.is_empty(),
                "{name}: {} problems, e.g. {:?}",
                problems.len(),
                &problems[..problems.len().min(5)]
            );
        } else {
            // The tool's output drops the emptied Claim.insurance.coverage, and keeps the
            // abatements of Conditions whose status lost its code.
            assert!(
                problems.iter().any(|p| p.contains("coverage")),
                "{name}: {problems:?}"
            );
            assert!(
                problems.iter().any(|p| p.starts_with("con-4")),
                "{name}: {problems:?}"
            );
        }
    }
}
