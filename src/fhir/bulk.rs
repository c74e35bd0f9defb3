//! Bulk Data `$export` kick-off parameters (HL7 Bulk Data Access IG v2.0.0): parsing and
//! validation, whether they came from a query string or a `Parameters` body.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{instant, is_resource_type, type_filter};

/// Output formats the server writes (all are ndjson).
pub const OUTPUT_FORMATS: &[&str] = &["application/fhir+ndjson", "application/ndjson", "ndjson"];

/// IG parameters this server does not implement (yet): refused, or ignored when lenient.
const UNSUPPORTED: &[&str] = &["organizeOutputBy", "allowPartialManifests", "_until"];

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExportParams {
    /// Requested types, unique, in request order; empty means all.
    pub types: Vec<String>,
    pub since: Option<DateTime<Utc>>,
    pub till: Option<DateTime<Utc>>,
    pub container: Option<String>,
    /// `_elements` entries: `element` or `Type.element`.
    pub elements: Vec<String>,
    /// `patient`: the ids of the patients a Patient or Group export is limited to.
    pub patients: Vec<String>,
    /// `_typeFilter` entries (`Type?query`), each valid.
    pub type_filters: Vec<String>,
    /// `includeAssociatedData=_history`: older versions too.
    pub include_history: bool,
    /// `includeAssociatedData=_deleted`: the last state of deleted resources too.
    pub include_deleted: bool,
    /// `_anonymizationConfig`: the name of the de-identification configuration to apply.
    pub anonymization_config: Option<String>,
    /// `_anonymizationConfigEtag`: the ETag that configuration must have.
    pub anonymization_etag: Option<String>,
    /// What a lenient kick-off ignored, one sentence each.
    pub ignored: Vec<String>,
}

/// Reads the parameters of a kick-off at system level (`/$export`) or not (Patient, Group).
/// `now` bounds `_till`; `base_url` makes references to this server in `_typeFilter` local.
pub fn parse(
    params: &[(String, String)],
    system_level: bool,
    lenient: bool,
    now: DateTime<Utc>,
    base_url: &str,
) -> Result<ExportParams, String> {
    let mut out = ExportParams::default();
    let ignore = |out: &mut ExportParams, why: String| -> Result<(), String> {
        if lenient {
            out.ignored.push(why);
            Ok(())
        } else {
            Err(why)
        }
    };
    // Everything is de-duplicated through sets: one pass, whatever the number of entries.
    let (mut types, mut elements, mut patients, mut filters) = (
        HashSet::new(),
        HashSet::new(),
        HashSet::new(),
        HashSet::new(),
    );
    for (name, value) in params {
        // No parameter holds control characters; a NUL could not even be stored.
        if let Some(c) = name.chars().chain(value.chars()).find(|c| c.is_control()) {
            return Err(format!(
                "parameter {} holds the control character U+{:04X}",
                name.escape_debug(),
                c as u32
            ));
        }
        match name.as_str() {
            "_outputFormat" => {
                if !OUTPUT_FORMATS.contains(&value.as_str()) {
                    return Err(format!(
                        "_outputFormat '{value}' is not supported; use one of {}",
                        OUTPUT_FORMATS.join(", ")
                    ));
                }
            }
            "_type" => {
                for t in value.split(',').map(str::trim) {
                    if !is_resource_type(t) {
                        ignore(&mut out, format!("_type '{t}' is not an R4 resource type"))?;
                    } else if types.insert(t) {
                        out.types.push(t.to_string());
                    }
                }
            }
            "_since" => set_once(&mut out.since, name, instant::parse(value)?)?,
            "_till" => {
                if !system_level {
                    return Err("_till is only supported for system-level export (/$export)".into());
                }
                let till = instant::parse(value)?;
                if till > now {
                    return Err(format!("_till {value} is in the future"));
                }
                set_once(&mut out.till, name, till)?;
            }
            "_elements" => {
                for entry in value.split(',').map(str::trim) {
                    super::elements::validate(entry)?;
                    if elements.insert(entry) {
                        out.elements.push(entry.to_string());
                    }
                }
            }
            "patient" => {
                if system_level {
                    return Err("patient is only supported for Patient and Group export".into());
                }
                for reference in value.split(',').map(str::trim) {
                    let id = super::compartment::patient_id(reference, base_url).ok_or_else(|| {
                        format!("patient '{reference}' is not a reference to a Patient of this server")
                    })?;
                    if patients.insert(id) {
                        out.patients.push(id.to_string());
                    }
                }
            }
            "_typeFilter" => {
                for entry in type_filter::split_entries(value) {
                    if !filters.insert(entry) {
                        continue; // the same entry twice filters the same
                    }
                    match type_filter::Query::parse(entry, base_url, now) {
                        Ok(_) => out.type_filters.push(entry.to_string()),
                        Err(why) => ignore(&mut out, why)?,
                    }
                }
            }
            "includeAssociatedData" => {
                if !system_level {
                    return Err(
                        "includeAssociatedData is only supported for system-level export".into(),
                    );
                }
                for v in value.split(',').map(str::trim) {
                    match v {
                        "_history" => out.include_history = true,
                        "_deleted" => out.include_deleted = true,
                        other => ignore(
                            &mut out,
                            format!(
                                "includeAssociatedData '{other}' is not supported (use _history, _deleted)"
                            ),
                        )?,
                    }
                }
            }
            "_anonymizationConfig" => {
                // A blob name whose every segment is also a file name (at most 255 bytes).
                let valid = !value.is_empty()
                    && value.len() <= 255
                    && value
                        .split('/')
                        .all(|p| !p.is_empty() && p != "." && p != "..")
                    && !value.contains('\\');
                if !valid {
                    return Err(format!(
                        "_anonymizationConfig '{value}' is not a configuration name"
                    ));
                }
                set_once(&mut out.anonymization_config, name, value.clone())?
            }
            "_anonymizationConfigEtag" => {
                set_once(&mut out.anonymization_etag, name, value.clone())?
            }
            // Its naming rules belong to the storage; the caller checks them.
            "_container" => set_once(&mut out.container, name, value.clone())?,
            n if UNSUPPORTED.contains(&n) => {
                ignore(
                    &mut out,
                    format!("parameter {n} is not supported by this server"),
                )?;
            }
            n => ignore(&mut out, format!("unknown parameter '{n}'"))?,
        }
    }
    // A filter on a type the export leaves out is a contradiction, not a no-op.
    if !out.types.is_empty() {
        let mut kept = Vec::new();
        for entry in std::mem::take(&mut out.type_filters) {
            let filtered = type_filter::entry_type(&entry);
            if out.types.iter().any(|t| t == filtered) {
                kept.push(entry);
            } else {
                ignore(
                    &mut out,
                    format!("_typeFilter '{entry}' names {filtered}, which _type leaves out"),
                )?;
            }
        }
        out.type_filters = kept;
    }
    if out.anonymization_etag.is_some() && out.anonymization_config.is_none() {
        return Err("_anonymizationConfigEtag needs _anonymizationConfig".into());
    }
    if let (Some(since), Some(till)) = (out.since, out.till)
        && since >= till
    {
        return Err("_since must be before _till".into());
    }
    Ok(out)
}

fn set_once<T>(slot: &mut Option<T>, name: &str, value: T) -> Result<(), String> {
    if slot.is_some() {
        return Err(format!("{name} may be given only once"));
    }
    *slot = Some(value);
    Ok(())
}

/// One line of a `deleted` file: a transaction Bundle that deletes `Type/id`.
pub fn deletion_bundle(resource_type: &str, id: &str) -> String {
    serde_json::json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"request": {"method": "DELETE", "url": format!("{resource_type}/{id}")}}],
    })
    .to_string()
}

/// Marks a resource's last state, exported for `includeAssociatedData=_deleted`, as deleted:
/// a `meta` extension (the one Azure's FHIR service uses).
pub fn mark_deleted(body: &str) -> Result<String, serde_json::Error> {
    let mut resource: serde_json::Map<String, Value> = serde_json::from_str(body)?;
    let meta = resource
        .entry("meta")
        .or_insert_with(|| Value::Object(Default::default()));
    if let Value::Object(meta) = meta {
        let extensions = meta
            .entry("extension")
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(list) = extensions {
            list.push(serde_json::json!({"url": DELETED_STATE_URL, "valueString": "soft-deleted"}));
        }
    }
    serde_json::to_string(&resource)
}

/// The `meta.extension` that marks a deleted resource's last state.
pub const DELETED_STATE_URL: &str = "http://azurehealthcareapis.com/data-extensions/deleted-state";

/// The (name, value) pairs of a `Parameters` resource, values as their string form.
pub fn parameters_pairs(body: &Value) -> Result<Vec<(String, String)>, String> {
    if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err("a POST kick-off body must be a Parameters resource".into());
    }
    let Some(list) = body.get("parameter") else {
        return Ok(Vec::new());
    };
    let Value::Array(list) = list else {
        return Err("Parameters.parameter must be an array".into());
    };
    let mut pairs = Vec::with_capacity(list.len());
    for p in list {
        let name = p
            .get("name")
            .and_then(Value::as_str)
            .ok_or("every parameter needs a name")?;
        let value = p
            .as_object()
            .into_iter()
            .flatten()
            .find(|(k, _)| k.starts_with("value"))
            .map(|(_, v)| v);
        let text = match value {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Bool(b)) => b.to_string(),
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::Object(o)) => match o.get("reference").and_then(Value::as_str) {
                Some(r) => r.to_string(),
                None => {
                    return Err(format!(
                        "parameter {name} has a value this server cannot read"
                    ));
                }
            },
            _ => return Err(format!("parameter {name} has no value")),
        };
        pairs.push((name.to_string(), text));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;
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
                .contains("foo")
        );
        assert!(
            parse(
                &p(&[("organizeOutputBy", "Patient")]),
                true,
                false,
                now(),
                BASE,
            )
            .unwrap_err()
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
            mark_deleted(r#"{"resourceType":"Patient","id":"p","meta":{"versionId":"2"}}"#)
                .unwrap();
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
}
