//! The single-pass engine against the tree engine: the same bytes for every resource it takes,
//! and the resources it must leave to the tree engine left to it.

use serde_json::{Value, json};

use super::{Deidentifier, Scope, stream};

const SCOPE: Scope = Scope {
    file: "Observation-1.ndjson",
    folder: "export-1",
};

fn engine(config: &str) -> Deidentifier {
    let engine = Deidentifier::new(config, b"job seed").unwrap();
    assert!(engine.plan.is_some(), "the configuration has a plan");
    engine
}

/// Both engines on `line`: the single pass's output (None when it leaves the line to the
/// tree), checked against the tree's.
fn both(engine: &Deidentifier, line: &str) -> Option<String> {
    let tree = engine.run_tree(line, &SCOPE).map_err(|e| e.to_string());
    let streamed = stream::run(engine, engine.plan.as_ref().unwrap(), line, &SCOPE).ok()?;
    assert_eq!(Ok(streamed.clone()), tree, "the engines differ on {line}");
    Some(streamed)
}

fn bench_config() -> String {
    include_str!("../../bench/deid-config.json").to_string()
}

fn sample_config() -> String {
    include_str!("../../bench/deid-sample-config.json").to_string()
}

/// Every rule kind the plan takes, in orders that make the first match matter.
fn mixed_config(tool_compatible: bool) -> String {
    json!({"fhirPathRules": [
        {"path": "Observation.value as Quantity", "method": "perturb", "span": 2, "roundTo": 2},
        {"path": "nodesByType('Quantity').unit", "method": "keep"},
        {"path": "nodesByName('system')", "method": "cryptoHash"},
        {"path": "nodesByType('date')", "method": "dateShift"},
        {"path": "Resource.id", "method": "cryptoHash"},
        {"path": "nodesByType('dateTime')", "method": "dateShift"},
        {"path": "nodesByType('Reference').reference", "method": "cryptoHash"},
        {"path": "Patient.address.postalCode", "method": "redact"},
        {"path": "nodesByType('Age')", "method": "redact"},
        {"path": "Claim.insurance", "method": "redact"},
        {"path": "nodesByType('Extension')", "method": "redact"},
        {"path": "nodesByType('instant')", "method": "redact"},
        {"path": "Group", "method": "redact"},
        {"path": "nodesByType('integer')", "method": "perturb", "span": 10}
    ], "parameters": {"dateShiftKey": "k", "cryptoHashKey": "h",
        "enablePartialDatesForRedact": true, "enablePartialAgesForRedact": true,
        "enablePartialZipCodesForRedact": true, "restrictedZipCodeTabulationAreas": ["036"],
        "toolCompatibleOutput": tool_compatible}})
    .to_string()
}

#[test]
fn generated_data_streams_with_the_trees_bytes() {
    let dir = tempfile::tempdir().unwrap();
    crate::cli::generate::generate(&crate::cli::generate::GenerateArgs {
        patients: 12,
        seed: 7,
        out: dir.path().to_path_buf(),
    })
    .unwrap();
    let configs = [
        bench_config(),
        sample_config(),
        mixed_config(false),
        mixed_config(true),
    ];
    for config in &configs {
        let engine = engine(config);
        let (mut lines, mut streamed) = (0, 0);
        for file in std::fs::read_dir(dir.path()).unwrap() {
            let text = std::fs::read_to_string(file.unwrap().path()).unwrap();
            for line in text.lines() {
                lines += 1;
                streamed += usize::from(streams_unless_con4(&engine, line));
            }
        }
        // Some resolved Conditions lose their abatement under `Coding.code` rules.
        assert!(streamed > lines * 9 / 10, "{streamed} of {lines}");
    }
}

/// Both engines on `line`, which the single pass must take unless it is a Condition whose
/// abatement would outlive its clinical status (con-4, kept by the tree engine in valid
/// output). Whether the pass took it.
fn streams_unless_con4(engine: &Deidentifier, line: &str) -> bool {
    if both(engine, line).is_some() {
        return true;
    }
    let out = engine.run_tree(line, &SCOPE).unwrap();
    assert!(!engine.config.params.tool_compatible_output, "{line}");
    assert!(
        line.contains("abatement") && !out.contains("abatement"),
        "left to the tree: {line}"
    );
    false
}

#[test]
fn con4_is_kept_by_the_tree_engine() {
    let line = json!({"resourceType": "Condition", "id": "c", "clinicalStatus": {"coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "resolved"}]},
        "abatementDateTime": "2015-03-04"})
    .to_string();
    let hash_system =
        json!({"fhirPathRules": [{"path": "nodesByName('system')", "method": "cryptoHash"}],
        "parameters": {"cryptoHashKey": "h", "toolCompatibleOutput": false}})
        .to_string();
    let valid = engine(&hash_system);
    assert!(!streams_unless_con4(&valid, &line));
    let out: Value = serde_json::from_str(&valid.apply(&line, &SCOPE).unwrap()).unwrap();
    assert!(out.get("abatementDateTime").is_none(), "{out}");
    let labels = &out["meta"]["security"];
    assert!(
        labels
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["code"] == "REDACTED"),
        "{out}"
    );
    // The tool's output keeps it; a rule that leaves the status alone keeps it too.
    let tool = hash_system.replace(
        "\"toolCompatibleOutput\":false",
        "\"toolCompatibleOutput\":true",
    );
    let tool = engine(&tool);
    assert!(streams_unless_con4(&tool, &line));
    assert!(
        tool.apply(&line, &SCOPE)
            .unwrap()
            .contains("abatementDateTime")
    );
    let keep = engine(&bench_config());
    assert!(streams_unless_con4(&keep, &line));
}

/// Resources that make every part of the single pass work: nested resources, masking, labels
/// into an existing, emptied or missing `meta`, escapes, numbers, perturbed quantities.
fn edge_cases() -> Vec<Value> {
    vec![
        json!({"resourceType": "Patient", "id": "p1", "meta": {"versionId": "3", "lastUpdated": "2020-01-02T03:04:05Z", "tag": [{"system": "s", "code": "c"}]},
            "extension": [{"url": "http://x", "valueString": "y"}], "birthDate": "1950-02-03",
            "address": [{"line": ["1 A St"], "postalCode": "03641", "state": "MA"}, {"postalCode": "12345"}, {"postalCode": "12"}],
            "name": [{"family": "Esc\"aped \\ \u{e9}\n", "given": ["A", "B"]}], "active": true, "multipleBirthInteger": 2}),
        json!({"resourceType": "Patient", "id": "p2", "meta": {"extension": [{"url": "u", "valueDate": "2020-01-01"}]}, "birthDate": "1920"}),
        json!({"resourceType": "Patient", "meta": {"versionId": "1"}, "id": "p4", "gender": "male"}),
        json!({"resourceType": "Patient", "id": "p3", "meta": {"tag": [{"code": "x"}]}}),
        json!({"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "t"},
            "valueQuantity": {"value": 12.345, "unit": "mg", "system": "http://unitsofmeasure.org"},
            "component": [{"code": {"text": "c"}, "valueQuantity": {"value": 1e2}}, {"code": {"text": "d"}, "valueInteger": 7}],
            "effectiveDateTime": "2021-03-04T05:06:07.123+02:00", "issued": "2021-03-04T05:06:07Z"}),
        json!({"resourceType": "Observation", "id": "o2", "status": "final", "code": {"text": "t"}, "valueQuantity": {"unit": "mg"}}),
        json!({"resourceType": "Observation", "id": "o3", "status": "final", "code": {"text": "t"}, "valueString": "1.5", "effectiveDateTime": "2021-02"}),
        json!({"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1", "display": "P"}, "onsetAge": {"value": 95, "unit": "a"},
            "abatementAge": {"value": 40}, "recordedDate": "2000-01-01"}),
        json!({"resourceType": "Claim", "id": "cl1", "status": "active", "type": {"text": "t"}, "use": "claim",
            "patient": {"reference": "Patient/p1"}, "created": "2020-01-01", "provider": {"display": "x"}, "priority": {"text": "p"},
            "insurance": [{"sequence": 1, "focal": true, "coverage": {"reference": "Coverage/x"}}],
            "contained": [{"resourceType": "Coverage", "id": "cov", "status": "active", "beneficiary": {"reference": "Patient/p1"}, "payor": [{"display": "P"}]}]}),
        json!({"resourceType": "Bundle", "id": "b1", "type": "collection", "entry": [
            {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Patient", "id": "e1", "birthDate": "1990-05-06"}},
            {"resource": {"resourceType": "Observation", "id": "e2", "meta": {"versionId": "1"}, "status": "final", "code": {"text": "x"}, "valueQuantity": {"value": 3}}},
            {"resource": {"resourceType": "Group", "id": "g", "type": "person", "actual": true, "name": "n"}}]}),
        json!({"resourceType": "Group", "id": "g1", "type": "person", "actual": true, "quantity": 3, "name": "x"}),
        // required elements in the other JSON shape (an array for one, one for many)
        json!({"resourceType": "Group", "id": "g2", "type": ["person"], "actual": [true]}),
        json!({"resourceType": "Claim", "id": "cl2", "status": "active", "type": {"text": "t"}, "use": "claim",
            "patient": {"reference": "Patient/p1"}, "created": "2020-01-01", "provider": {"display": "x"}, "priority": {"text": "p"},
            "insurance": {"sequence": 1, "focal": true, "coverage": [{"display": "x"}]}}),
        json!({"resourceType": "Encounter", "id": "e", "status": "finished", "class": {"system": "s", "code": "c"},
            "period": {"start": "2020-01-01T00:00:00Z"}, "length": {"value": 3, "unit": "d"}}),
    ]
}

#[test]
fn edge_cases_stream_with_the_trees_bytes() {
    for config in [
        mixed_config(false),
        mixed_config(true),
        bench_config(),
        sample_config(),
    ] {
        let engine = engine(&config);
        for resource in edge_cases() {
            let line = resource.to_string();
            let streamed = streams_unless_con4(&engine, &line);
            // Whitespace and key order within objects change nothing.
            let spaced = serde_json::to_string_pretty(&resource).unwrap();
            assert_eq!(streams_unless_con4(&engine, &spaced), streamed, "{spaced}");
        }
    }
}

#[test]
fn what_the_single_pass_does_not_take_goes_to_the_tree() {
    let engine = engine(&mixed_config(false));
    for line in [
        // `_element` companions, nulls, empty arrays, escaped keys, repeated keys
        r#"{"resourceType":"Patient","id":"a","birthDate":"1970-01-01","_birthDate":{"id":"x"}}"#,
        r#"{"resourceType":"Patient","id":"a","gender":null}"#,
        r#"{"resourceType":"Patient","id":"a","name":[]}"#,
        r#"{"resourceType":"Patient","id":"a","gend\u0065r":"male"}"#,
        r#"{"resourceType":"Patient","id":"a","gender":"male","gender":"female"}"#,
        // resourceType not first, not an element, unknown
        r#"{"id":"a","resourceType":"Patient"}"#,
        r#"{"resourceType":"Patient","id":"a","nickname":"x"}"#,
        r#"{"resourceType":"Patientx","id":"a"}"#,
        // a date shift before the id it is keyed by, an id that is not a string
        r#"{"resourceType":"Patient","birthDate":"1970-01-01","id":"a"}"#,
        r#"{"resourceType":"Patient","id":7}"#,
        // labels into a meta that has some, a meta that is not an object
        r#"{"resourceType":"Patient","id":"a","meta":{"security":[{"code":"x"}]},"birthDate":"1970-01-01"}"#,
        // a failing method (not a calendar date; a number that is not one)
        r#"{"resourceType":"Patient","id":"a","birthDate":"2021-02-30"}"#,
        r#"{"resourceType":"Observation","id":"a","status":"final","code":{},"valueQuantity":{"value":""}}"#,
        // not JSON, trailing bytes
        r#"{"resourceType":"Patient","id":"a""#,
        r#"{"resourceType":"Patient","id":"a"} x"#,
        r#"{"resourceType":"Patient","id":"a","multipleBirthInteger":01}"#,
        // nested deeper than any parser here reads
        &*format!(
            r#"{{"resourceType":"Patient","id":"a","extension":{}{{"url":"u"}}{}}}"#,
            r#"[{"url":"u","extension":"#.repeat(5000),
            "}]".repeat(5000)
        ),
    ] {
        let streamed = stream::run(&engine, engine.plan.as_ref().unwrap(), line, &SCOPE);
        assert!(streamed.is_err(), "streamed: {line}");
        // The tree engine still answers as it always did (a value, or the resource's error).
        let _ = engine.apply(line, &SCOPE);
    }
}

#[test]
fn a_rule_reaching_into_a_nested_resource_leaves_it_to_the_tree() {
    let resource = json!({"resourceType": "Bundle", "id": "b", "type": "collection",
        "entry": [{"resource": {"resourceType": "Patient", "id": "p", "gender": "male"}}]})
    .to_string();
    for path in [
        "Bundle.entry.resource",
        "Bundle.entry.resource.gender",
        "nodesByType('Patient')",
        "nodesByType('Patient').gender",
        "nodesByName('resource')",
        "nodesByName('resource').gender",
    ] {
        let config = json!({"fhirPathRules": [{"path": path, "method": "redact"}]}).to_string();
        let engine = engine(&config);
        assert!(both(&engine, &resource).is_none(), "{path} streamed");
        let out: Value = serde_json::from_str(&engine.apply(&resource, &SCOPE).unwrap()).unwrap();
        assert!(
            out["entry"][0]["resource"]["gender"].is_null(),
            "{path}: {out}"
        );
    }
}

#[test]
fn configurations_with_other_methods_or_expressions_have_no_plan() {
    for rule in [
        json!({"path": "Patient.name", "method": "encrypt"}),
        json!({"path": "Patient.gender", "method": "substitute", "replaceWith": "other"}),
        json!({"path": "Patient.name.where(use = 'official')", "method": "redact"}),
        json!({"path": "Patient.name.first()", "method": "redact"}),
    ] {
        let config =
            json!({"fhirPathRules": [rule], "parameters": {"encryptKey": "0123456789abcdef"}});
        let engine = Deidentifier::new(&config.to_string(), b"s").unwrap();
        assert!(engine.plan.is_none(), "{rule}");
    }
}
