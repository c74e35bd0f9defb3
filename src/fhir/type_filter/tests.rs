use super::*;
use serde_json::json;

const BASE: &str = "http://fhir.example";

fn q(entry: &str) -> Query {
    Query::parse(entry, BASE, Utc::now()).unwrap()
}

fn err(entry: &str) -> String {
    Query::parse(entry, BASE, Utc::now())
        .unwrap_err()
        .to_string()
}

#[test]
fn what_a_filter_cannot_do_is_told_apart_from_a_wrong_value() {
    let refused = |entry| Query::parse(entry, BASE, Utc::now()).unwrap_err();
    for entry in [
        "Observation?_sort=date",
        "Observation?subject.name=x",
        "Observation?code:below=1",
    ] {
        assert!(matches!(refused(entry), NotSupported(_)), "{entry}");
    }
    for entry in [
        "Observation",
        "Nope?code=1",
        "Observation?nope=1",
        "Observation?date=someday",
    ] {
        assert!(matches!(refused(entry), Invalid(_)), "{entry}");
    }
}

#[test]
fn entries_split_only_between_types() {
    assert_eq!(
        split_entries("Observation?code=a,b,MedicationRequest?status=active"),
        vec!["Observation?code=a,b", "MedicationRequest?status=active"]
    );
    assert_eq!(
        split_entries("Observation?code=http://loinc.org|1,http://loinc.org|2"),
        vec!["Observation?code=http://loinc.org|1,http://loinc.org|2"]
    );
    assert_eq!(
        split_entries("Patient?active=true,"),
        vec!["Patient?active=true"]
    );
}

#[test]
fn values_are_ored_and_parameters_anded() {
    let obs = json!({"resourceType": "Observation", "id": "o1", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2"}]},
        "effectiveDateTime": "2024-05-01T10:00:00Z"});
    assert!(q("Observation?code=1,2").matches(&obs, BASE));
    assert!(q("Observation?code=1%2C2").matches(&obs, BASE));
    assert!(!q("Observation?code=1").matches(&obs, BASE));
    assert!(q("Observation?code=2&status=final").matches(&obs, BASE));
    assert!(!q("Observation?code=2&status=amended").matches(&obs, BASE));
    assert!(q("Observation?date=ge2024-01-01&date=lt2025").matches(&obs, BASE));
    assert!(!q("Observation?date=ge2024-06").matches(&obs, BASE));
    assert!(q("Observation?_id=o1,o2").matches(&obs, BASE));
}

#[test]
fn missing_and_not() {
    let obs = json!({"resourceType": "Observation", "status": "final",
        "code": {"coding": [{"code": "2"}]}});
    assert!(q("Observation?value-quantity:missing=true").matches(&obs, BASE));
    assert!(!q("Observation?value-quantity:missing=false").matches(&obs, BASE));
    assert!(q("Observation?code:missing=false").matches(&obs, BASE));
    assert!(q("Observation?status:not=amended").matches(&obs, BASE));
    assert!(!q("Observation?status:not=final,amended").matches(&obs, BASE));
    assert!(q("Observation?category:not=laboratory").matches(&obs, BASE));
}

#[test]
fn strings_references_and_quantities() {
    let patient = json!({"resourceType": "Patient", "name": [{"family": "Núñez", "given": ["Ana"]}],
        "gender": "female", "generalPractitioner": [{"reference": "Practitioner/d1"}]});
    assert!(q("Patient?name=nunez").matches(&patient, BASE));
    assert!(q("Patient?family:exact=Núñez").matches(&patient, BASE));
    assert!(!q("Patient?family:exact=nunez").matches(&patient, BASE));
    assert!(q("Patient?name:contains=UÑ").matches(&patient, BASE));
    assert!(q("Patient?general-practitioner=Practitioner/d1").matches(&patient, BASE));
    assert!(q("Patient?general-practitioner:Practitioner=d1").matches(&patient, BASE));
    assert!(
        q("Patient?general-practitioner=http://fhir.example/Practitioner/d1")
            .matches(&patient, BASE)
    );
    let obs = json!({"resourceType": "Observation", "subject": {"reference": "Patient/p"},
        "valueQuantity": {"value": 7.2, "system": "http://unitsofmeasure.org", "code": "mmol/L"}});
    assert!(
        q("Observation?value-quantity=gt7|http://unitsofmeasure.org|mmol/L").matches(&obs, BASE)
    );
    assert!(!q("Observation?value-quantity=lt7").matches(&obs, BASE));
    assert!(q("Observation?patient=p").matches(&obs, BASE));
    assert!(q("Observation?subject:Patient=p").matches(&obs, BASE));
}

#[test]
fn every_unsupported_form_is_named() {
    assert!(err("Observation?nope=1").contains("'nope' is not a search parameter"));
    assert!(err("Observation?subject.name=x").contains("chained"));
    assert!(err("Observation?code-value-quantity=x").contains("composite"));
    assert!(err("Observation?_include=Observation:subject").contains("_include"));
    assert!(err("Observation?_sort=date").contains("_sort"));
    assert!(err("Observation?code:below=x").contains(":below"));
    assert!(err("Observation?code:text=x").contains(":text"));
    assert!(err("Observation?date=soon").contains("not a date"));
    assert!(err("Observation?value-quantity=abc").contains("not a number"));
    assert!(err("Observation?code:missing=maybe").contains("true or false"));
    assert!(err("Observation?code=").contains("no value"));
    assert!(err("Observation").contains("Type?query"));
    assert!(err("Nope?x=1").contains("not an R4 resource type"));
    assert!(err("Observation?").contains("no search parameters"));
}

#[test]
fn garbage_is_refused_without_panicking() {
    let resource = json!({"resourceType": "Observation", "effectiveDateTime": "2020é",
        "valueQuantity": {"value": 1e300}, "code": {"coding": "not a list"}});
    for entry in [
        "Observation?code=%FF%FE",
        "Observation?date=gé2020",
        "Observation?date=ge",
        "Observation?value-quantity=1e99999999999",
        "Observation?value-quantity=1e400",
        "Observation?value-quantity=ap",
        "Observation?value-quantity=5|x",
        "Observation?subject=Patient/",
        "Observation?subject=/",
        "Observation?code=|",
        "Observation?:missing=true",
        "Observation?=x",
        "Observation?code:=x",
        "?code=x",
    ] {
        if let Ok(query) = Query::parse(entry, BASE, Utc::now()) {
            query.matches(&resource, BASE); // evaluates without panicking
        }
    }
    assert!(q("Observation?date=ge2020").matches(&json!({"effectiveDateTime": "2021"}), BASE));
}

#[test]
fn pushdown_of_id_and_last_updated() {
    let p = q("Observation?_id=a,b&_lastUpdated=ge2024-01-01&_lastUpdated=lt2024-02").pushdown();
    assert_eq!(p.ids, Some(vec!["a".into(), "b".into()]));
    assert_eq!(
        p.updated_from,
        Some(crate::fhir::instant::parse("2024-01-01T00:00:00Z").unwrap())
    );
    assert_eq!(
        p.updated_before,
        Some(crate::fhir::instant::parse("2024-02-01T00:00:00Z").unwrap())
    );
    assert_eq!(q("Observation?_id:not=a").pushdown(), Pushdown::default());
    // ORed queries narrow to what covers them all.
    let filter = |entries: &[&str]| {
        let entries: Vec<String> = entries.iter().map(|e| e.to_string()).collect();
        TypeFilter::for_type(&entries, "Observation", BASE, Utc::now())
            .unwrap()
            .unwrap()
    };
    let two = filter(&["Observation?_id=a", "Observation?_id=b&status=final"]);
    assert_eq!(two.pushdown().ids, Some(vec!["a".into(), "b".into()]));
    let open = filter(&["Observation?_id=a", "Observation?status=final"]);
    assert_eq!(open.pushdown(), Pushdown::default());
    let dates = filter(&[
        "Observation?_lastUpdated=ge2024-01-01&_lastUpdated=lt2024-02",
        "Observation?_lastUpdated=ge2023-06-01",
    ]);
    let p = dates.pushdown();
    assert_eq!(
        p.updated_from,
        Some(crate::fhir::instant::parse("2023-06-01T00:00:00Z").unwrap())
    );
    assert_eq!(p.updated_before, None);
}
