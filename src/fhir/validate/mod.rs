//! R4 structure checks of a resource on its way in, against the generated type tables
//! (`r4_types`): every element known for its type, each value of the JSON type its element
//! needs (object, string, number, boolean), primitives in their R4 formats (date, dateTime,
//! instant, time, id, code, uri, oid, uuid, base64Binary, integer ranges; strings without
//! control characters), arrays where an element repeats and single values where it does not,
//! at most one type of each choice element, `_element` companions only for primitives, and
//! contained resources checked as resources of their own type. Every problem is collected with
//! its FHIRPath location.
//!
//! One leniency, as HAPI's and Firely's parsers have it: a repeating element given as a single
//! value is taken as a one-item array (the resource is changed to say so). Minimum cardinality
//! is not required on the way in.

mod formats;
mod walk;

use serde_json::{Map, Value};

use super::model;

/// One thing wrong with a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// FHIRPath of the element, e.g. `Patient.name[0].given[1]`.
    pub location: String,
    pub message: String,
}

/// Why a resource is not valid R4: its problems, in document order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub Vec<Problem>);

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", p.location, p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for Invalid {}

/// More problems than this are not listed (the first ones say enough).
const MAX_PROBLEMS: usize = 50;

/// Checks `resource` (of `resource_type`, already known to be a resource type) and wraps
/// single values of repeating elements in arrays.
pub fn resource(resource_type: &str, resource: &mut Map<String, Value>) -> Result<(), Invalid> {
    let text = serde_json::to_string(&*resource).expect("a JSON object serializes");
    let mut checker = Checker::default();
    checker.resource_text(resource_type, &text);
    if checker.into_result()?.wrapped {
        wrap_singles(resource_type, resource);
    }
    Ok(())
}

/// Checks the text of one top-level element `key` of a `resource_type` resource, without
/// changing it. `Ok(false)`: valid only once a single value is made an array (the caller takes
/// the way that changes it).
pub fn element_text(resource_type: &str, key: &str, text: &str) -> Result<bool, Invalid> {
    let mut checker = Checker::default();
    checker.member_text(resource_type, &Path::Root(resource_type), key, text);
    checker.into_result().map(|checker| !checker.wrapped)
}

/// Do the top-level `keys` of a `resource_type` resource give each choice element (`value[x]`)
/// one type at most?
pub fn choices_unique<'k>(resource_type: &str, keys: impl Iterator<Item = &'k str>) -> bool {
    let elements = model::elements_of(resource_type).unwrap_or_default();
    let mut choices: Vec<&'static str> = Vec::new();
    for key in keys {
        if let Some(element) = model::find(elements, key)
            && element.key != element.name
        {
            if choices.contains(&element.name) {
                return false;
            }
            choices.push(element.name);
        }
    }
    true
}

/// Where a value is, rendered only when a problem is found.
enum Path<'a> {
    Root(&'a str),
    Key(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl Path<'_> {
    fn render(&self) -> String {
        match self {
            Path::Root(t) => t.to_string(),
            Path::Key(parent, key) => format!("{}.{key}", parent.render()),
            Path::Index(parent, i) => format!("{}[{i}]", parent.render()),
        }
    }
}

#[derive(Default)]
struct Checker {
    problems: Vec<Problem>,
    /// A single value of a repeating element was taken as a one-item array.
    wrapped: bool,
}

impl Checker {
    fn problem(&mut self, path: &Path, message: impl Into<String>) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(Problem {
                location: path.render(),
                message: message.into(),
            });
        }
    }

    fn into_result(self) -> Result<Checker, Invalid> {
        if self.problems.is_empty() {
            Ok(self)
        } else {
            Err(Invalid(self.problems))
        }
    }
}

/// Makes every single value of a repeating element (and of its `_` companion) a one-item
/// array, in an object of `type_key` and everything inside it.
fn wrap_singles(type_key: &str, object: &mut Map<String, Value>) {
    for (key, value) in object.iter_mut() {
        let Some(element) = model::element(type_key, key.strip_prefix('_').unwrap_or(key)) else {
            continue;
        };
        if element.many && !value.is_array() {
            *value = Value::Array(vec![std::mem::take(value)]);
        }
        let items: &mut [Value] = match value {
            Value::Array(items) => items,
            single => std::slice::from_mut(single),
        };
        for item in items {
            let Value::Object(inner) = item else { continue };
            if key.starts_with('_') {
                wrap_singles("Element", inner);
            } else if element.ty == "Resource" {
                let inner_type = super::resource::resource_type(inner).to_string();
                wrap_singles(&inner_type, inner);
            } else if !element.primitive {
                wrap_singles(element.children, inner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(value: Value) -> Result<Value, Vec<String>> {
        let mut map = value.as_object().unwrap().clone();
        let resource_type = map["resourceType"].as_str().unwrap().to_string();
        resource(&resource_type, &mut map)
            .map(|()| Value::Object(map))
            .map_err(|e| {
                e.0.into_iter()
                    .map(|p| format!("{}: {}", p.location, p.message))
                    .collect()
            })
    }

    #[test]
    fn valid_resources_pass_unchanged() {
        let patient = json!({"resourceType": "Patient", "id": "p1",
            "meta": {"lastUpdated": "2024-01-02T03:04:05.123+01:00", "tag": [{"code": "x"}]},
            "name": [{"family": "Smith", "given": ["A", "B"], "_given": [null, {"extension": [
                {"url": "http://e.org/x", "valueString": "y"}]}]}],
            "gender": "female", "birthDate": "1970-02-28", "active": true,
            "multipleBirthInteger": 2,
            "contained": [{"resourceType": "Organization", "id": "o", "name": "Org"}],
            "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">x</div>"}});
        assert_eq!(check(patient.clone()), Ok(patient));
        let obs = json!({"resourceType": "Observation", "status": "final",
            "code": {"text": "t"}, "valueQuantity": {"value": 1.5e3, "unit": "mg"},
            "effectiveDateTime": "2020", "component": [{"code": {"text": "c"},
            "valueSampledData": {"origin": {"value": 0}, "period": 1, "dimensions": 1}}]});
        assert_eq!(check(obs.clone()), Ok(obs));
    }

    #[test]
    fn each_problem_is_named_by_its_location() {
        let bad = json!({"resourceType": "Patient", "gender": {"code": "x"}, "name": "Smith",
            "birthDate": "x", "multipleBirthInteger": 123456789012345678901234567890_u128,
            "gen\u{0}der": "f", "unknown": 1, "_active": true});
        let problems = check(bad).unwrap_err();
        let locations: Vec<&str> = problems
            .iter()
            .map(|p| p.split(':').next().unwrap())
            .collect();
        assert_eq!(
            locations,
            [
                "Patient.gender",
                "Patient.name",
                "Patient.birthDate",
                "Patient.multipleBirthInteger",
                "Patient.gen\u{0}der",
                "Patient.unknown",
                "Patient._active"
            ],
            "{problems:?}"
        );
    }

    #[test]
    fn a_single_value_of_a_repeating_element_becomes_an_array() {
        let nested = check(
            json!({"resourceType": "Patient", "contained": {"resourceType": "Patient",
            "name": {"given": "B", "_given": {"id": "x"}}}}),
        );
        assert_eq!(
            nested,
            Ok(
                json!({"resourceType": "Patient", "contained": [{"resourceType": "Patient",
            "name": [{"given": ["B"], "_given": [{"id": "x"}]}]}]})
            )
        );
        let fixed =
            check(json!({"resourceType": "Patient", "name": {"family": "S", "given": "A"}}));
        assert_eq!(
            fixed,
            Ok(json!({"resourceType": "Patient", "name": [{"family": "S", "given": ["A"]}]}))
        );
        assert_eq!(
            element_text("Patient", "name", r#"{"family":"S"}"#),
            Ok(false)
        );
        assert_eq!(
            element_text("Patient", "name", r#"[{"family":"S"}]"#),
            Ok(true)
        );
        assert!(element_text("Patient", "gender", "1").is_err());
    }

    #[test]
    fn choices_companions_and_contained_resources() {
        let two = json!({"resourceType": "Observation", "valueString": "a", "valueBoolean": true});
        assert!(check(two).unwrap_err()[0].contains("only one type of value[x]"));
        let companion = json!({"resourceType": "Patient", "_name": [{"id": "x"}]});
        assert!(check(companion).unwrap_err()[0].contains("'_' companion"));
        let contained = json!({"resourceType": "Patient", "contained": [{"resourceType": "Nope"}]});
        assert!(check(contained).unwrap_err()[0].starts_with("Patient.contained[0]"));
        let inner = json!({"resourceType": "Patient", "contained": [{"resourceType": "Patient", "gender": 1}]});
        assert!(check(inner).unwrap_err()[0].starts_with("Patient.contained[0].gender"));
        let empty = json!({"resourceType": "Patient", "name": [], "contact": [{}]});
        assert_eq!(check(empty).unwrap_err().len(), 2);
    }
}
