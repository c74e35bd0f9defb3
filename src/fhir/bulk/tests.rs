use super::*;
use crate::fhir::ParamError;
use serde_json::json;

fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

const BASE: &str = "http://fhir.example";

fn now() -> DateTime<Utc> {
    instant::parse("2026-01-01T00:00:00Z").unwrap()
}

#[test]
fn types_from_repeats_and_comma_lists() {
    let r = parse(
        &p(&[
            ("_type", "Patient,Observation"),
            ("_type", "Patient"),
            ("_type", "Condition"),
        ]),
        true,
        false,
        now(),
        BASE,
    )
    .unwrap();
    assert_eq!(r.types, vec!["Patient", "Observation", "Condition"]);
    assert!(
        parse(&p(&[("_type", "Patient,Nope")]), true, false, now(), BASE,)
            .unwrap_err()
            .to_string()
            .contains("Nope")
    );
    let lenient = parse(&p(&[("_type", "Patient,Nope")]), true, true, now(), BASE).unwrap();
    assert_eq!(lenient.types, vec!["Patient"]);
    assert_eq!(lenient.ignored.len(), 1);
}

#[test]
fn output_formats() {
    for f in OUTPUT_FORMATS {
        assert!(parse(&p(&[("_outputFormat", f)]), true, false, now(), BASE).is_ok());
    }
    assert!(
        parse(
            &p(&[("_outputFormat", "text/csv")]),
            true,
            true,
            now(),
            BASE,
        )
        .is_err()
    );
}

#[test]
fn since_till_and_container() {
    let r = parse(
        &p(&[
            ("_since", "2025-01-01T00:00:00Z"),
            ("_till", "2025-06-01T00:00:00Z"),
            ("_container", "my-exports"),
        ]),
        true,
        false,
        now(),
        BASE,
    )
    .unwrap();
    assert_eq!(r.container.as_deref(), Some("my-exports"));
    assert!(r.since.unwrap() < r.till.unwrap());
    assert!(parse(&p(&[("_since", "2025-01-01")]), true, false, now(), BASE).is_err());
    assert!(
        parse(
            &p(&[
                ("_since", "2025-01-01T00:00:00Z"),
                ("_since", "2025-01-01T00:00:00Z")
            ]),
            true,
            false,
            now(),
            BASE,
        )
        .is_err()
    );
    assert!(
        parse(
            &p(&[("_till", "2025-01-01T00:00:00Z")]),
            false,
            false,
            now(),
            BASE,
        )
        .unwrap_err()
        .to_string()
        .contains("system")
    );
    assert!(
        parse(
            &p(&[("_till", "2027-01-01T00:00:00Z")]),
            true,
            false,
            now(),
            BASE,
        )
        .unwrap_err()
        .to_string()
        .contains("future")
    );
    assert!(
        parse(
            &p(&[
                ("_since", "2025-06-01T00:00:00Z"),
                ("_till", "2025-01-01T00:00:00Z")
            ]),
            true,
            false,
            now(),
            BASE,
        )
        .is_err()
    );
}

#[test]
fn unknown_and_unsupported_parameters() {
    assert!(
        parse(&p(&[("foo", "1")]), true, false, now(), BASE)
            .unwrap_err()
            .to_string()
            .contains("foo")
    );
    assert!(
        parse(
            &p(&[("organizeOutputBy", "Encounter")]),
            true,
            false,
            now(),
            BASE,
        )
        .unwrap_err()
        .to_string()
        .contains("not supported")
    );
    let r = parse(
        &p(&[("foo", "1"), ("_typeFilter", "x")]),
        true,
        true,
        now(),
        BASE,
    )
    .unwrap();
    assert_eq!(r.ignored.len(), 2);
}

#[test]
fn type_filters() {
    let r = parse(
        &p(&[
            (
                "_typeFilter",
                "Observation?code=a,b,MedicationRequest?status=active",
            ),
            ("_typeFilter", "Observation?status=final"),
        ]),
        true,
        false,
        now(),
        BASE,
    )
    .unwrap();
    assert_eq!(
        r.type_filters,
        vec![
            "Observation?code=a,b",
            "MedicationRequest?status=active",
            "Observation?status=final"
        ]
    );
    let bad = p(&[("_typeFilter", "Observation?nope=1,Patient?active=true")]);
    assert!(
        parse(&bad, true, false, now(), BASE)
            .unwrap_err()
            .to_string()
            .contains("nope")
    );
    let lenient = parse(&bad, true, true, now(), BASE).unwrap();
    assert_eq!(lenient.type_filters, vec!["Patient?active=true"]);
    assert!(lenient.ignored[0].contains("nope"));
    let outside = p(&[
        ("_type", "Patient"),
        ("_typeFilter", "Observation?status=final"),
    ]);
    assert!(
        parse(&outside, true, false, now(), BASE)
            .unwrap_err()
            .to_string()
            .contains("_type leaves out")
    );
    assert!(
        parse(&outside, true, true, now(), BASE)
            .unwrap()
            .type_filters
            .is_empty()
    );
}

#[test]
fn associated_data() {
    let r = parse(
        &p(&[("includeAssociatedData", "_history,_deleted")]),
        true,
        false,
        now(),
        BASE,
    )
    .unwrap();
    assert!(r.include_history && r.include_deleted);
    let other = p(&[(
        "includeAssociatedData",
        "_history,LatestProvenanceResources",
    )]);
    assert!(
        parse(&other, true, false, now(), BASE)
            .unwrap_err()
            .to_string()
            .contains("LatestProvenanceResources")
    );
    let lenient = parse(&other, true, true, now(), BASE).unwrap();
    assert!(lenient.include_history && !lenient.include_deleted);
    assert_eq!(lenient.ignored.len(), 1);
    assert!(
        parse(
            &p(&[("includeAssociatedData", "_history")]),
            false,
            false,
            now(),
            BASE
        )
        .is_err()
    );
}

#[test]
fn patient_references() {
    let r = parse(
        &p(&[("patient", "Patient/a"), ("patient", "Patient/b,Patient/a")]),
        false,
        false,
        now(),
        BASE,
    )
    .unwrap();
    assert_eq!(r.patients, vec!["a", "b"]);
    assert!(parse(&p(&[("patient", "Patient/a")]), true, false, now(), BASE).is_err());
    assert!(
        parse(
            &p(&[("patient", "Observation/a")]),
            false,
            false,
            now(),
            BASE,
        )
        .unwrap_err()
        .to_string()
        .contains("reference to a Patient of this server")
    );
    let foreign = p(&[("patient", "http://other.example/fhir/Patient/a")]);
    assert!(parse(&foreign, false, false, now(), BASE).is_err());
    let own = format!("{BASE}/Patient/c");
    let r = parse(&p(&[("patient", &own)]), false, false, now(), BASE).unwrap();
    assert_eq!(r.patients, vec!["c"]);
}

#[test]
fn last_states_are_marked_deleted() {
    let marked =
        mark_deleted(r#"{"resourceType":"Patient","id":"p","meta":{"versionId":"2"}}"#).unwrap();
    let v: Value = serde_json::from_str(&marked).unwrap();
    assert_eq!(v["meta"]["versionId"], "2");
    assert_eq!(v["meta"]["extension"][0]["url"], DELETED_STATE_URL);
    assert_eq!(v["meta"]["extension"][0]["valueString"], "soft-deleted");
}

#[test]
fn parameters_resource() {
    let body = json!({"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Patient"},
        {"name": "_since", "valueInstant": "2025-01-01T00:00:00Z"},
        {"name": "patient", "valueReference": {"reference": "Patient/a"}}]});
    assert_eq!(
        parameters_pairs(&body).unwrap(),
        p(&[
            ("_type", "Patient"),
            ("_since", "2025-01-01T00:00:00Z"),
            ("patient", "Patient/a")
        ])
    );
    assert!(parameters_pairs(&json!({"resourceType": "Patient"})).is_err());
    assert!(
        parameters_pairs(&json!({"resourceType": "Parameters", "parameter": [{"name": "x"}]}))
            .is_err()
    );
}

#[test]
fn organize_output_by_and_partial_manifests() {
    let read = |pairs: &[(&str, &str)], lenient| parse(&p(pairs), true, lenient, now(), BASE);
    let organized = read(&[("organizeOutputBy", "Patient")], false).unwrap();
    assert_eq!(organized.organize_by.as_deref(), Some("Patient"));
    assert!(
        read(
            &[
                ("organizeOutputBy", "Patient"),
                ("organizeOutputBy", "Patient")
            ],
            false
        )
        .is_err()
    );
    // Lenient: an unsupported type is ignored, and said.
    let lenient = read(&[("organizeOutputBy", "Encounter")], true).unwrap();
    assert_eq!(lenient.organize_by, None);
    assert!(
        lenient.ignored[0].contains("Encounter"),
        "{:?}",
        lenient.ignored
    );
    // Older versions are not organized: refused together, dropped (and said) when lenient.
    let both = [
        ("organizeOutputBy", "Patient"),
        ("includeAssociatedData", "_history"),
    ];
    assert!(matches!(
        read(&both, false),
        Err(ParamError::NotSupported(_))
    ));
    let dropped = read(&both, true).unwrap();
    assert!(!dropped.include_history && dropped.organize_by.is_some());
    assert_eq!(dropped.ignored.len(), 1);
    assert!(
        read(&[("allowPartialManifests", "true")], false)
            .unwrap()
            .allow_partial_manifests
    );
    assert!(
        !read(&[("allowPartialManifests", "false")], false)
            .unwrap()
            .allow_partial_manifests
    );
    for bad in ["yes", "TRUE", "1", ""] {
        assert!(matches!(
            read(&[("allowPartialManifests", bad)], true),
            Err(ParamError::Invalid(_))
        ));
    }
}

#[test]
fn what_the_server_does_not_offer_is_told_apart_from_a_wrong_value() {
    let refused = |pairs: &[(&str, &str)], system_level| {
        parse(&p(pairs), system_level, false, now(), BASE).unwrap_err()
    };
    for unsupported in [
        refused(&[("_outputFormat", "text/csv")], true),
        refused(&[("_till", "2025-01-01T00:00:00Z")], false),
        refused(&[("patient", "Patient/p1")], true),
        refused(&[("includeAssociatedData", "_relevant")], true),
        refused(&[("organizeOutputBy", "Encounter")], true),
    ] {
        assert!(
            matches!(unsupported, ParamError::NotSupported(_)),
            "{unsupported:?}"
        );
    }
    for invalid in [
        refused(&[("_since", "yesterday")], true),
        refused(&[("_type", "Nope")], true),
        refused(&[("foo", "1")], true),
        refused(
            &[
                ("_since", "2024-01-01T00:00:00Z"),
                ("_since", "2024-01-02T00:00:00Z"),
            ],
            true,
        ),
    ] {
        assert!(matches!(invalid, ParamError::Invalid(_)), "{invalid:?}");
    }
}
