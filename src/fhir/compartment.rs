//! Patient compartment membership (R4 CompartmentDefinition `patient`), computed from a
//! resource's JSON at write time.

use serde_json::{Map, Value};

use super::r4::PATIENT_COMPARTMENT;

/// The ids of the patients whose compartment holds this resource, sorted and unique.
/// A Patient is in its own compartment. Only references to this server (relative, or under
/// `base`) count: `http://other.example/fhir/Patient/X` is another server's patient.
pub fn patient_ids(
    resource_type: &str,
    id: &str,
    resource: &Map<String, Value>,
    base: &str,
) -> Vec<String> {
    let mut ids = Vec::new();
    if resource_type == "Patient" {
        ids.push(id.to_string());
    }
    if let Ok(i) = PATIENT_COMPARTMENT.binary_search_by(|(t, _)| t.cmp(&resource_type)) {
        for path in PATIENT_COMPARTMENT[i].1 {
            collect_references(resource, Some(path), base, &mut ids);
        }
    }
    ids.sort();
    ids.dedup();
    ids
}

/// The top-level elements of `resource_type` that compartment membership reads.
pub fn top_level_elements(resource_type: &str) -> impl Iterator<Item = &'static str> {
    let paths = PATIENT_COMPARTMENT
        .binary_search_by(|(t, _)| t.cmp(&resource_type))
        .map_or(&[][..], |i| PATIENT_COMPARTMENT[i].1);
    paths.iter().map(|p| p.split('.').next().unwrap_or(p))
}

/// Walks a dotted `path` through objects and arrays; at its end, reads Reference elements.
fn collect_references(
    object: &Map<String, Value>,
    path: Option<&str>,
    base: &str,
    out: &mut Vec<String>,
) {
    let Some(path) = path else {
        if let Some(Value::String(reference)) = object.get("reference")
            && let Some(id) = patient_id(reference, base)
        {
            out.push(id.to_string());
        }
        return;
    };
    let (first, rest) = match path.split_once('.') {
        Some((first, rest)) => (first, Some(rest)),
        None => (path, None),
    };
    let mut visit = |value: &Value| {
        if let Value::Object(inner) = value {
            collect_references(inner, rest, base, out);
        }
    };
    match object.get(first) {
        Some(Value::Array(items)) => items.iter().for_each(&mut visit),
        Some(value) => visit(value),
        None => {}
    }
}

/// `Patient/123`, `Patient/123/_history/2` or `{base}/Patient/123` → `123`.
pub fn patient_id<'r>(reference: &'r str, base: &str) -> Option<&'r str> {
    match super::resource::local_reference(reference, base)? {
        ("Patient", id) => Some(id),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const BASE: &str = "http://example.org/fhir";

    fn ids(t: &str, id: &str, v: Value) -> Vec<String> {
        patient_ids(t, id, v.as_object().unwrap(), BASE)
    }

    #[test]
    fn observation_subject_and_performer() {
        let obs = json!({"resourceType": "Observation",
            "subject": {"reference": "Patient/p1"},
            "performer": [{"reference": "Practitioner/x"}, {"reference": "Patient/p2"}]});
        assert_eq!(ids("Observation", "o", obs), vec!["p1", "p2"]);
    }

    #[test]
    fn nested_paths_and_history_and_absolute_references() {
        let ap = json!({"participant": [
            {"actor": {"reference": "http://example.org/fhir/Patient/a/_history/3"}},
            {"actor": {"reference": "Patient/b"}},
            {"actor": {"reference": "http://other.example/fhir/Patient/c"}},
            {"actor": {"reference": "http://example.org/fhirx/Patient/d"}},
            {"actor": {"reference": "Location/l"}}]});
        assert_eq!(ids("Appointment", "x", ap), vec!["a", "b"]);
    }

    #[test]
    fn patient_is_in_its_own_compartment_and_groups_via_member() {
        assert_eq!(ids("Patient", "me", json!({})), vec!["me"]);
        let g = json!({"member": [{"entity": {"reference": "Patient/a"}},
                                  {"entity": {"reference": "Patient/a"}}]});
        assert_eq!(ids("Group", "g", g), vec!["a"]);
        assert!(
            ids(
                "Organization",
                "o",
                json!({"partOf": {"reference": "Patient/a"}})
            )
            .is_empty()
        );
    }

    #[test]
    fn unresolved_and_odd_references_are_ignored() {
        assert_eq!(patient_id("urn:uuid:1234", BASE), None);
        assert_eq!(patient_id("Patient/", BASE), None);
        assert_eq!(patient_id("Patient/a b", BASE), None);
        assert_eq!(patient_id("Patient/a", BASE), Some("a"));
        assert_eq!(patient_id("x/Patient/a", BASE), None);
        assert_eq!(patient_id("https://other.example/Patient/a", BASE), None);
    }
}
