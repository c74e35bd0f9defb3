//! The fast way to prepare a resource, straight from its JSON text: its top-level elements
//! are kept as the text they came as (made compact) instead of being parsed and written again;
//! only `resourceType`, `id`, `meta`, the elements compartment membership reads and elements
//! holding a `urn:uuid:` reference to resolve are parsed. Bulk writes (`load`, transaction
//! Bundles) take it; what it does not handle goes the full way (`Prepared::new`), which also
//! says what is wrong.

use std::{borrow::Cow, collections::HashMap};

use serde_json::{Map, Value};

use super::Prepared;
use crate::fhir::{
    self, compartment,
    raw_json::{self, Members},
    resource::{self, Template},
    validate,
};

/// Whose type and id a resource is stored under.
#[derive(Debug, Clone, Copy)]
pub enum Identity<'a> {
    /// Its own: the body's id, or a new one (`load`).
    Own,
    /// A request's: the body must be of this type, and its id, if it has one, this one (PUT).
    Given { resource_type: &'a str, id: &'a str },
    /// A create's: the body must be of this type and gets this id, whatever it has (POST).
    Assigned { resource_type: &'a str, id: &'a str },
}

impl<'a> Identity<'a> {
    /// The id a resource of `resource_type` whose body has `body_id` gets; `None` when the
    /// body does not fit the request.
    fn id_for<'t>(self, resource_type: &str, body_id: Option<Cow<'t, str>>) -> Option<Cow<'t, str>>
    where
        'a: 't,
    {
        match self {
            Identity::Own => {
                Some(body_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string().into()))
            }
            Identity::Given {
                resource_type: expected,
                id,
            } => (expected == resource_type && body_id.is_none_or(|b| b == id)).then(|| id.into()),
            Identity::Assigned {
                resource_type: expected,
                id,
            } => (expected == resource_type).then(|| id.into()),
        }
    }
}

/// `None`: the text needs the full way (it is not a valid resource of the expected identity,
/// repeats an element, writes its type with escapes, or gives a repeating element a single
/// value). Every element is checked against R4 (`validate`) as it is kept.
pub fn prepare(
    text: &str,
    identity: Identity,
    targets: &HashMap<String, String>,
    base: &str,
) -> Option<Prepared> {
    let members = Members::parse(text).ok()?;
    let resource_type_json = members.get("resourceType")?.get();
    let resource_type: &str = serde_json::from_str(resource_type_json).ok()?;
    if !fhir::is_resource_type(resource_type) {
        return None;
    }
    let body_id = match members.get("id") {
        None => None,
        Some(raw) => Some(raw_json::string(raw).filter(|id| resource::is_valid_id(id))?),
    };
    let id = identity.id_for(resource_type, body_id)?;
    let resolve = |raw| resolved(raw, targets);
    let meta = match members.get("meta") {
        None => Map::new(),
        Some(raw) => {
            let text = resolve(raw.get())?;
            validate::element_text(resource_type, "meta", &text)
                .ok()?
                .then_some(())?;
            match serde_json::from_str(&text).ok()? {
                Value::Object(meta) => meta,
                _ => return None,
            }
        }
    };
    let mut rest: Vec<(&str, Cow<str>)> = Vec::with_capacity(members.0.len());
    for (name, raw) in &members.0 {
        match name.as_ref() {
            "resourceType" | "id" | "meta" => {}
            // A reference at the top would be resolved on the full way only.
            "reference" => return None,
            name => {
                let text = resolve(raw.get())?;
                validate::element_text(resource_type, name, &text)
                    .ok()?
                    .then_some(())?;
                rest.push((name, text));
            }
        }
    }
    if !validate::choices_unique(resource_type, rest.iter().map(|(k, _)| *k)) {
        return None;
    }
    let mut members_read = Map::new();
    for element in compartment::top_level_elements(resource_type) {
        if let Some((_, text)) = rest.iter().find(|(k, _)| *k == element) {
            members_read.insert(element.to_string(), serde_json::from_str(text).ok()?);
        }
    }
    let patient_ids = compartment::patient_ids(resource_type, &id, &members_read, base);
    let template = Template::from_parts(
        resource_type_json,
        &id,
        &meta,
        rest.iter().map(|(k, v)| (*k, v.as_ref())),
    );
    Some(Prepared {
        resource_type: resource_type.to_string(),
        id: id.into_owned(),
        patient_ids,
        template,
    })
}

/// An element's text with its `urn:uuid:` references resolved (`None`: not JSON).
fn resolved<'a>(raw: &'a str, targets: &HashMap<String, String>) -> Option<Cow<'a, str>> {
    if targets.is_empty() || !raw.contains("urn:uuid:") {
        return Some(raw_json::compact(raw));
    }
    let mut value: Value = serde_json::from_str(raw).ok()?;
    resource::rewrite_references(&mut value, targets);
    Some(serde_json::to_string(&value).ok()?.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "http://127.0.0.1:8080";

    fn full_way(text: &str, id: Option<&str>, targets: &HashMap<String, String>) -> Prepared {
        let mut value: Value = serde_json::from_str(text).unwrap();
        resource::rewrite_references(&mut value, targets);
        let resource = resource::into_resource(value).unwrap();
        let id = id.or(resource::id(&resource)).unwrap().to_string();
        let resource_type = resource::resource_type(&resource).to_string();
        Prepared::new(&resource_type, &id, resource, BASE).unwrap()
    }

    fn assert_same(fast: &Prepared, full: &Prepared, text: &str) {
        assert_eq!(fast.stored_text(3, "t"), full.stored_text(3, "t"), "{text}");
        assert_eq!(fast.patient_ids(), full.patient_ids(), "{text}");
    }

    #[test]
    fn the_fast_way_stores_what_the_full_way_stores() {
        let texts = [
            r#"{"resourceType":"Observation","id":"o1","meta":{"profile":["p"],"versionId":"9"},"status":"final","subject":{"reference":"Patient/p1"},"valueString":"a \"quoted\" \\ line"}"#,
            r#"{"id":"p1","resourceType":"Patient","name":[{"family":"Ünïcode"}]}"#,
            r#"{"resourceType":"Encounter","id":"e1","subject":{"reference":"Patient/p2"},"participant":[{"individual":{"reference":"Practitioner/d"}}]}"#,
            // Laid out by a client: stored as one compact line all the same.
            "{\n  \"resourceType\": \"Observation\",\n  \"id\": \"o2\",\n  \"subject\": {\n    \"reference\": \"Patient/p3\"\n  },\n  \"valueString\": \"two  spaces\"\n}",
        ];
        let none = HashMap::new();
        for text in texts {
            let fast = prepare(text, Identity::Own, &none, BASE).expect("fast way");
            assert_same(&fast, &full_way(text, None, &none), text);
            assert!(!fast.stored_text(1, "t").contains('\n'));
        }
    }

    #[test]
    fn urn_uuid_references_are_resolved_as_on_the_full_way() {
        let targets = HashMap::from([
            ("urn:uuid:1".to_string(), "Patient/p1".to_string()),
            ("urn:uuid:2".to_string(), "Encounter/e1".to_string()),
        ]);
        let text = r#"{"resourceType":"Observation","id":"o1","subject":{"reference":"urn:uuid:1"},"encounter":{"reference":"urn:uuid:2"},"note":[{"text":"urn:uuid:1"}],"focus":[{"reference":"urn:uuid:9"}]}"#;
        let fast = prepare(text, Identity::Own, &targets, BASE).expect("fast way");
        assert_same(&fast, &full_way(text, None, &targets), text);
        assert_eq!(fast.patient_ids(), ["p1"]);
        let stored = fast.stored_text(1, "t");
        assert!(stored.contains(r#""text":"urn:uuid:1""#), "{stored}");
        assert!(stored.contains("urn:uuid:9"), "{stored}");
    }

    #[test]
    fn a_given_identity_must_match_and_an_assigned_one_replaces_the_body_id() {
        let none = HashMap::new();
        let text = r#"{"resourceType":"Patient","id":"p1","gender":"male"}"#;
        let given = |resource_type, id| Identity::Given { resource_type, id };
        assert!(prepare(text, given("Patient", "p1"), &none, BASE).is_some());
        assert!(prepare(text, given("Patient", "p2"), &none, BASE).is_none());
        assert!(prepare(text, given("Observation", "p1"), &none, BASE).is_none());
        let assigned = Identity::Assigned {
            resource_type: "Patient",
            id: "new",
        };
        let fast = prepare(text, assigned, &none, BASE).unwrap();
        assert_same(&fast, &full_way(text, Some("new"), &none), text);
        assert_eq!(fast.id, "new");
    }

    #[test]
    fn what_the_fast_way_does_not_handle_goes_the_full_way() {
        let none = HashMap::new();
        for text in [
            r#"{"resourceType":"Patient","id":"p1","gender":"male","gender":"female"}"#,
            r#"{"resourceType":"Nope","id":"p1"}"#,
            r#"{"resourceType":"Patient","id":"not valid!"}"#,
            r#"{"resourceType":"Patient","id":7}"#,
            r#"{"resourceType":"Patient","meta":[]}"#,
            r#"{"resourceType":"Pat\u0069ent"}"#,
            r#"{"id":"p1"}"#,
            r#"["resourceType"]"#,
        ] {
            assert!(
                prepare(text, Identity::Own, &none, BASE).is_none(),
                "{text}"
            );
        }
    }
}
