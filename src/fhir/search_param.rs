//! The generated R4 search-parameter table: lookup, and the element paths a parameter reads.

use serde_json::Value;

use super::r4::SEARCH_PARAMS;
pub use super::table_types::{SearchParamDef, SearchParamType, Step};

impl SearchParamDef {
    /// Can a `_typeFilter` use it?
    pub fn is_supported(&self) -> bool {
        !self.paths.is_empty()
    }
}

/// The parameter `code` of `resource_type` (its own, or one every resource has).
pub fn find(resource_type: &str, code: &str) -> Option<&'static SearchParamDef> {
    let lookup = |t: &str| {
        SEARCH_PARAMS
            .binary_search_by(|p| (p.resource_type, p.code).cmp(&(t, code)))
            .ok()
            .map(|i| &SEARCH_PARAMS[i])
    };
    lookup(resource_type).or_else(|| lookup("Resource"))
}

/// The evaluable parameters of `resource_type`, its own and the common ones.
pub fn for_type(resource_type: &str) -> impl Iterator<Item = &'static SearchParamDef> + '_ {
    SEARCH_PARAMS.iter().filter(move |p| {
        (p.resource_type == resource_type || p.resource_type == "Resource") && p.is_supported()
    })
}

/// FHIR data type names, the suffixes of choice elements (`valueQuantity`, `onsetPeriod`).
const CHOICE_TYPES: &[&str] = &[
    "Address",
    "Age",
    "Annotation",
    "Attachment",
    "Base64Binary",
    "Boolean",
    "Canonical",
    "Code",
    "CodeableConcept",
    "Coding",
    "ContactPoint",
    "Count",
    "Date",
    "DateTime",
    "Decimal",
    "Distance",
    "Duration",
    "HumanName",
    "Id",
    "Identifier",
    "Instant",
    "Integer",
    "Markdown",
    "Money",
    "Oid",
    "Period",
    "PositiveInt",
    "Quantity",
    "Range",
    "Ratio",
    "Reference",
    "SampledData",
    "Signature",
    "String",
    "Time",
    "Timing",
    "UnsignedInt",
    "Uri",
    "Url",
    "Uuid",
];

/// The values `path` reaches in `resource` (arrays flattened at every step).
pub fn values<'a>(resource: &'a Value, path: &[Step]) -> Vec<&'a Value> {
    let mut current = vec![resource];
    for step in path {
        let mut next = Vec::new();
        for value in current {
            match *step {
                Step::Field(name) => {
                    let Value::Object(object) = value else {
                        continue;
                    };
                    let found = object.get(name).or_else(|| {
                        object.iter().find_map(|(key, v)| {
                            let suffix = key.strip_prefix(name)?;
                            CHOICE_TYPES.contains(&suffix).then_some(v)
                        })
                    });
                    match found {
                        Some(Value::Array(items)) => next.extend(items),
                        Some(v) => next.push(v),
                        None => {}
                    }
                }
                Step::Where(key, expected) => {
                    if value.get(key).and_then(Value::as_str) == Some(expected) {
                        next.push(value);
                    }
                }
                Step::ResolvesTo(target) => {
                    let reference = value.get("reference").and_then(Value::as_str);
                    if reference.is_some_and(|r| reference_type(r) == Some(target)) {
                        next.push(value);
                    }
                }
            }
        }
        current = next;
    }
    current
}

/// The type a reference (`Type/id`, `http://…/Type/id`, `…/_history/n`) points to.
pub fn reference_type(reference: &str) -> Option<&str> {
    let (target, _) = reference_parts(reference)?;
    Some(target)
}

/// `(Type, id)` of a literal reference, relative or absolute, with or without `_history`.
pub fn reference_parts(reference: &str) -> Option<(&str, &str)> {
    let reference = match reference.find("/_history/") {
        Some(i) => &reference[..i],
        None => reference,
    };
    let mut segments = reference.rsplit('/');
    let id = segments.next().filter(|id| !id.is_empty())?;
    let target = segments.next()?;
    super::is_resource_type(target).then_some((target, id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lookup_own_and_common_parameters() {
        let code = find("Observation", "code").unwrap();
        assert_eq!(code.kind, SearchParamType::Token);
        assert_eq!(code.paths, &[&[Step::Field("code")][..]]);
        assert_eq!(
            find("Observation", "_lastUpdated").unwrap().resource_type,
            "Resource"
        );
        assert!(find("Observation", "nope").is_none());
        assert!(
            !find("Observation", "code-value-quantity")
                .unwrap()
                .is_supported()
        );
        assert!(for_type("Patient").any(|p| p.code == "birthdate"));
        assert!(for_type("Patient").all(|p| p.code != "_text"));
    }

    #[test]
    fn choice_elements_and_where_steps() {
        let obs = json!({"resourceType": "Observation",
            "effectivePeriod": {"start": "2020-01-01"},
            "valueQuantity": {"value": 5},
            "subject": {"reference": "Patient/p1"},
            "performer": [{"reference": "Practitioner/d"}, {"reference": "Patient/p1"}]});
        let date = find("Observation", "date").unwrap();
        let found: Vec<_> = date.paths.iter().flat_map(|p| values(&obs, p)).collect();
        assert_eq!(found, vec![&json!({"start": "2020-01-01"})]);
        let vq = find("Observation", "value-quantity").unwrap();
        assert_eq!(values(&obs, vq.paths[0]), vec![&json!({"value": 5})]);
        let patient = find("Observation", "patient").unwrap();
        assert_eq!(values(&obs, patient.paths[0]).len(), 1);
        // No false choice match: `code` must not read `codeFilter`.
        assert!(values(&json!({"codeFilter": 1}), &[Step::Field("code")]).is_empty());
        let email = find("OrganizationAffiliation", "email").unwrap();
        let aff = json!({"telecom": [{"system": "phone", "value": "1"}, {"system": "email", "value": "a@b"}]});
        assert_eq!(values(&aff, email.paths[0]).len(), 1);
    }

    #[test]
    fn reference_parts_of_every_form() {
        assert_eq!(reference_parts("Patient/1"), Some(("Patient", "1")));
        assert_eq!(
            reference_parts("http://x/fhir/Patient/1/_history/2"),
            Some(("Patient", "1"))
        );
        assert_eq!(reference_parts("urn:uuid:1"), None);
        assert_eq!(reference_parts("Patient/"), None);
        assert_eq!(reference_parts("#contained"), None);
    }
}
