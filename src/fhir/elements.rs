//! `_elements`: export only some top-level elements of a resource (plus `resourceType`, `id`,
//! `meta` and every element R4 requires of its type, as the IG has the server return mandatory
//! elements whether listed or not), tagged SUBSETTED as FHIR requires of a partial resource.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

/// Elements every subsetted resource keeps.
const MANDATORY: &[&str] = &["resourceType", "id", "meta"];

/// Checks one `_elements` entry: `element` or `Type.element`, top level only.
pub fn validate(entry: &str) -> Result<(), String> {
    let (resource_type, element) = match entry.split_once('.') {
        Some((t, e)) => (Some(t), e),
        None => (None, entry),
    };
    if let Some(t) = resource_type
        && !super::is_resource_type(t)
    {
        return Err(format!(
            "_elements '{entry}': '{t}' is not an R4 resource type"
        ));
    }
    let mut chars = element.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!(
            "_elements '{entry}' is not an element name (only top-level elements: 'status' or 'Observation.status')"
        ));
    }
    Ok(())
}

/// The elements to keep for `resource_type`, or `None` to export it whole (no entry of
/// `_elements` applies to it).
pub fn for_type(entries: &[String], resource_type: &str) -> Option<BTreeSet<String>> {
    let keep: BTreeSet<String> = entries
        .iter()
        .filter_map(|e| match e.split_once('.') {
            Some((t, element)) => (t == resource_type).then(|| element.to_string()),
            None => Some(e.clone()),
        })
        .collect();
    (!keep.is_empty()).then_some(keep)
}

/// The subset of a stored `resource_type` resource: mandatory, required (minimum cardinality 1,
/// whichever type of a required choice it has) and kept elements, in their order, with the
/// SUBSETTED tag added to `meta.tag`.
pub fn subset(
    body: &str,
    resource_type: &str,
    keep: &BTreeSet<String>,
) -> Result<String, serde_json::Error> {
    let resource: Map<String, Value> = serde_json::from_str(body)?;
    let elements = super::model::elements_of(resource_type).unwrap_or_default();
    let required = |key: &str| super::model::find(elements, key).is_some_and(|e| e.required);
    let mut out: Map<String, Value> = resource
        .into_iter()
        .filter(|(key, _)| MANDATORY.contains(&key.as_str()) || keep.contains(key) || required(key))
        .collect();
    if let Value::Object(meta) = out.entry("meta").or_insert_with(|| json!({}))
        && let Value::Array(tags) = meta.entry("tag").or_insert_with(|| json!([]))
    {
        // System and code only, as the IG's examples write it: clients match it exactly.
        tags.push(json!({
            "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
            "code": "SUBSETTED",
        }));
    }
    serde_json::to_string(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_top_level_names_optionally_typed() {
        assert!(validate("status").is_ok());
        assert!(validate("Observation.status").is_ok());
        assert!(validate("Unicorn.status").unwrap_err().contains("Unicorn"));
        assert!(validate("Patient.name.family").is_err());
        assert!(validate("").is_err());
        assert!(validate("1abc").is_err());
    }

    #[test]
    fn types_without_an_applicable_entry_are_whole() {
        let entries = vec![
            "id".to_string(),
            "Patient.gender".to_string(),
            "Observation.status".to_string(),
        ];
        assert_eq!(
            for_type(&entries, "Patient").unwrap(),
            BTreeSet::from(["gender".to_string(), "id".to_string()])
        );
        let only_typed = vec!["Patient.gender".to_string()];
        assert!(for_type(&only_typed, "Observation").is_none());
    }

    #[test]
    fn subset_keeps_mandatory_and_listed_and_tags() {
        let body = r#"{"resourceType":"Patient","id":"p","meta":{"versionId":"1","tag":[{"code":"x"}]},"name":[{"family":"F"}],"gender":"male"}"#;
        let keep = BTreeSet::from(["gender".to_string()]);
        let out: Value = serde_json::from_str(&subset(body, "Patient", &keep).unwrap()).unwrap();
        assert_eq!(out["gender"], "male");
        assert!(out.get("name").is_none());
        assert_eq!(out["meta"]["versionId"], "1");
        assert_eq!(out["meta"]["tag"][0]["code"], "x");
        assert_eq!(out["meta"]["tag"][1]["code"], "SUBSETTED");
        let no_meta: Value = serde_json::from_str(
            &subset(
                r#"{"resourceType":"Basic","id":"b","text":{}}"#,
                "Basic",
                &keep,
            )
            .unwrap(),
        )
        .unwrap();
        assert!(no_meta.get("text").is_none());
        assert_eq!(
            no_meta["meta"]["tag"][0],
            json!({"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"})
        );
    }

    #[test]
    fn required_elements_stay_whether_listed_or_not() {
        let body = r#"{"resourceType":"Observation","id":"o","status":"final","category":[{"text":"c"}],"code":{"text":"t"},"valueString":"v","subject":{"reference":"Patient/p"}}"#;
        let keep = BTreeSet::from(["subject".to_string()]);
        let out: Value =
            serde_json::from_str(&subset(body, "Observation", &keep).unwrap()).unwrap();
        let kept: Vec<&String> = out.as_object().unwrap().keys().collect();
        assert_eq!(
            kept,
            ["resourceType", "id", "status", "code", "subject", "meta"]
        );
        let request = r#"{"resourceType":"MedicationRequest","id":"m","status":"active","intent":"order","medicationReference":{"reference":"Medication/x"},"subject":{"reference":"Patient/p"},"note":[{"text":"n"}]}"#;
        let out: Value =
            serde_json::from_str(&subset(request, "MedicationRequest", &BTreeSet::new()).unwrap())
                .unwrap();
        assert!(out.get("medicationReference").is_some() && out.get("subject").is_some());
        assert!(out.get("note").is_none());
    }
}
