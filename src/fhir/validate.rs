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

use serde_json::{Map, Value};

use super::model::{self, ElementType};

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
    let mut checker = Checker::default();
    let root = Path::Root(resource_type);
    checker.object(resource_type, &root, resource, true);
    if checker.problems.is_empty() {
        Ok(())
    } else {
        Err(Invalid(checker.problems))
    }
}

/// Checks the text of one top-level element `key` of a `resource_type` resource, without
/// changing it. `Ok(false)`: valid only once a single value is made an array (the caller takes
/// the way that changes it).
pub fn element_text(resource_type: &str, key: &str, text: &str) -> Result<bool, Invalid> {
    let mut value: Value = serde_json::from_str(text).map_err(|e| {
        Invalid(vec![Problem {
            location: format!("{resource_type}.{key}"),
            message: format!("not JSON: {e}"),
        }])
    })?;
    let mut checker = Checker::default();
    let root = Path::Root(resource_type);
    checker.member(resource_type, &root, key, &mut value);
    match (checker.problems.is_empty(), checker.wrapped) {
        (true, wrapped) => Ok(!wrapped),
        (false, _) => Err(Invalid(checker.problems)),
    }
}

/// Do the top-level `keys` of a `resource_type` resource give each choice element (`value[x]`)
/// one type at most?
pub fn choices_unique<'k>(resource_type: &str, keys: impl Iterator<Item = &'k str>) -> bool {
    let mut choices: Vec<&'static str> = Vec::new();
    for key in keys {
        if let Some(element) = model::element(resource_type, key)
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
    /// A single value was wrapped in an array.
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

    /// An object of `type_key` (a type or a backbone element's path).
    fn object(&mut self, type_key: &str, path: &Path, map: &mut Map<String, Value>, top: bool) {
        if map.is_empty() {
            return self.problem(
                path,
                "an object must have content (FHIR JSON has no empty objects)",
            );
        }
        let mut choices: Vec<&'static str> = Vec::new();
        for (key, value) in map.iter_mut() {
            if top && key == "resourceType" {
                continue;
            }
            let child = Path::Key(path, key);
            let Some(element) = self.member(type_key, path, key, value) else {
                continue;
            };
            if element.key != element.name {
                if choices.contains(&element.name) {
                    self.problem(
                        &child,
                        format!("only one type of {}[x] may be given", element.name),
                    );
                }
                choices.push(element.name);
            }
        }
    }

    /// One member `key` of an object of `type_key`; returns its element when the key is known.
    fn member(
        &mut self,
        type_key: &str,
        path: &Path,
        key: &str,
        value: &mut Value,
    ) -> Option<&'static ElementType> {
        let child = Path::Key(path, key);
        let (name, companion) = match key.strip_prefix('_') {
            Some(name) => (name, true),
            None => (key, false),
        };
        let Some(element) = model::element(type_key, name) else {
            self.problem(&child, format!("'{key}' is not an element of {type_key}"));
            return None;
        };
        if companion && !element.primitive {
            self.problem(
                &child,
                format!("'{key}': only primitive elements have a '_' companion"),
            );
            return None;
        }
        self.cardinality(element, companion, &child, value);
        (!companion).then_some(element)
    }

    /// A value of `element`: an array when it repeats, a single value when it does not.
    fn cardinality(
        &mut self,
        element: &ElementType,
        companion: bool,
        path: &Path,
        value: &mut Value,
    ) {
        if !element.many {
            if value.is_array() {
                return self.problem(
                    path,
                    "this element does not repeat: give one value, not an array",
                );
            }
            return self.item(element, companion, path, value, false);
        }
        match value {
            Value::Array(items) if items.is_empty() => self.problem(
                path,
                "an array must have items (FHIR JSON has no empty arrays)",
            ),
            Value::Array(items) => {
                // Primitive arrays may hold null where only the companion has a value.
                let nulls = element.primitive;
                for (i, item) in items.iter_mut().enumerate() {
                    self.item(element, companion, &Path::Index(path, i), item, nulls);
                }
            }
            Value::Null => self.problem(path, "null is not a value"),
            single => {
                self.wrapped = true;
                let item = std::mem::take(single);
                *single = Value::Array(vec![item]);
                let Value::Array(items) = single else {
                    unreachable!("just made an array")
                };
                self.item(
                    element,
                    companion,
                    &Path::Index(path, 0),
                    &mut items[0],
                    false,
                );
            }
        }
    }

    fn item(
        &mut self,
        element: &ElementType,
        companion: bool,
        path: &Path,
        value: &mut Value,
        null_ok: bool,
    ) {
        if value.is_null() {
            if !null_ok {
                self.problem(path, "null is not a value");
            }
            return;
        }
        if companion {
            return match value {
                Value::Object(map) => self.object("Element", path, map, false),
                _ => self.problem(path, "a '_' companion must be an object (id, extension)"),
            };
        }
        if element.primitive {
            if let Err(why) = primitive(element.ty, value) {
                self.problem(path, why);
            }
            return;
        }
        let Value::Object(map) = value else {
            return self.problem(
                path,
                format!(
                    "must be an object ({}), not {}",
                    element.ty,
                    json_kind(value)
                ),
            );
        };
        if element.ty == "Resource" {
            return self.contained(path, map);
        }
        self.object(element.children, path, map, false);
    }

    /// A resource inside a resource (contained, a Bundle entry, a Parameters value).
    fn contained(&mut self, path: &Path, map: &mut Map<String, Value>) {
        let resource_type = match map.get("resourceType") {
            Some(Value::String(t)) if super::is_resource_type(t) => t.clone(),
            Some(Value::String(t)) => {
                return self.problem(path, format!("'{t}' is not an R4 resource type"));
            }
            _ => return self.problem(path, "a resource needs a resourceType"),
        };
        self.object(&resource_type, path, map, true);
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Checks a primitive value of R4 type `ty`.
fn primitive(ty: &str, value: &Value) -> Result<(), String> {
    match ty {
        "boolean" => value
            .is_boolean()
            .then_some(())
            .ok_or_else(|| format!("a boolean must be true or false, not {}", json_kind(value))),
        "integer" | "positiveInt" | "unsignedInt" => integer(ty, value),
        "decimal" => value
            .is_number()
            .then_some(())
            .ok_or_else(|| format!("a decimal must be a JSON number, not {}", json_kind(value))),
        _ => match value {
            Value::String(text) => text_format(ty, text),
            other => Err(format!(
                "a {ty} must be a JSON string, not {}",
                json_kind(other)
            )),
        },
    }
}

fn integer(ty: &str, value: &Value) -> Result<(), String> {
    let Value::Number(n) = value else {
        return Err(format!(
            "an {ty} must be a JSON number, not {}",
            json_kind(value)
        ));
    };
    let Some(i) = n.as_i64().filter(|i| i32::try_from(*i).is_ok()) else {
        return Err(format!(
            "{n} is not an {ty}: a whole number from -2147483648 to 2147483647"
        ));
    };
    match ty {
        "positiveInt" if i < 1 => Err(format!("{i} is not a positiveInt (1 or more)")),
        "unsignedInt" if i < 0 => Err(format!("{i} is not an unsignedInt (0 or more)")),
        _ => Ok(()),
    }
}

/// The string formats of R4 primitives.
fn text_format(ty: &str, text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err(format!("a {ty} must not be empty"));
    }
    if let Some(c) = text
        .chars()
        .find(|c| (*c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r'))
    {
        return Err(format!(
            "a {ty} must not hold the control character U+{:04X}",
            c as u32
        ));
    }
    let ok = match ty {
        "id" => super::resource::is_valid_id(text),
        "code" => {
            !text.starts_with(char::is_whitespace)
                && !text.ends_with(char::is_whitespace)
                && !text.contains(['\t', '\n', '\r'])
                && !text.contains("  ")
        }
        "uri" | "url" | "canonical" => !text.contains([' ', '\t', '\n', '\r']),
        "oid" => is_oid(text),
        "uuid" => is_uuid(text),
        "base64Binary" => is_base64(text),
        "date" => date_end(text.as_bytes()) == Some(text.len()),
        "dateTime" => is_date_time(text.as_bytes()),
        "instant" => is_instant(text.as_bytes()),
        "time" => time_end(text.as_bytes()) == Some(text.len()),
        _ => true, // string, markdown, xhtml
    };
    if ok {
        Ok(())
    } else {
        Err(format!("'{}' is not a valid {ty}", shorten(text)))
    }
}

/// At most 64 characters of `text`, for messages.
fn shorten(text: &str) -> String {
    let mut out: String = text.chars().take(64).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}

fn is_oid(text: &str) -> bool {
    let Some(rest) = text.strip_prefix("urn:oid:") else {
        return false;
    };
    let mut arcs = rest.split('.');
    let first_ok = matches!(arcs.next(), Some("0" | "1" | "2"));
    let mut count = 0;
    let rest_ok = arcs.all(|arc| {
        count += 1;
        !arc.is_empty()
            && arc.bytes().all(|b| b.is_ascii_digit())
            && (arc == "0" || !arc.starts_with('0'))
    });
    first_ok && rest_ok && count > 0
}

fn is_uuid(text: &str) -> bool {
    let Some(rest) = text.strip_prefix("urn:uuid:") else {
        return false;
    };
    let groups: Vec<&str> = rest.split('-').collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, n)| {
            g.len() == n
                && g.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

fn is_base64(text: &str) -> bool {
    let mut count = 0usize;
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=') {
            count += 1;
        } else if !b.is_ascii_whitespace() {
            return false;
        }
    }
    count > 0 && count % 4 == 0
}

/// `n` ASCII digits at `at`, as a number.
fn digits(s: &[u8], at: usize, n: usize) -> Option<u32> {
    let part = s.get(at..at + n)?;
    part.iter().try_fold(0u32, |acc, b| {
        b.is_ascii_digit().then(|| acc * 10 + u32::from(b - b'0'))
    })
}

/// The end of an R4 `date` at the start of `s`: `YYYY`, `YYYY-MM` or `YYYY-MM-DD`, a real
/// date, year 0001 or later.
fn date_end(s: &[u8]) -> Option<usize> {
    let year = digits(s, 0, 4).filter(|y| *y > 0)?;
    if s.get(4) != Some(&b'-') {
        return Some(4);
    }
    let month = digits(s, 5, 2).filter(|m| (1..=12).contains(m))?;
    if s.get(7) != Some(&b'-') {
        return Some(7);
    }
    let day = digits(s, 8, 2)?;
    (1..=days_in_month(year, month))
        .contains(&day)
        .then_some(10)
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// The end of `hh:mm:ss(.fraction)` at the start of `s`.
fn time_end(s: &[u8]) -> Option<usize> {
    digits(s, 0, 2).filter(|h| *h < 24)?;
    (s.get(2) == Some(&b':')).then_some(())?;
    digits(s, 3, 2).filter(|m| *m < 60)?;
    (s.get(5) == Some(&b':')).then_some(())?;
    digits(s, 6, 2).filter(|sec| *sec <= 60)?;
    if s.get(8) != Some(&b'.') {
        return Some(8);
    }
    let fraction = s[9..].iter().take_while(|b| b.is_ascii_digit()).count();
    (fraction > 0).then_some(9 + fraction)
}

/// `Z` or `±hh:mm` (at most 14:00) filling `s`.
fn is_zone(s: &[u8]) -> bool {
    match s {
        [b'Z'] => true,
        [b'+' | b'-', ..] if s.len() == 6 && s[3] == b':' => {
            matches!((digits(s, 1, 2), digits(s, 4, 2)), (Some(h), Some(m)) if (h < 14 && m < 60) || (h == 14 && m == 0))
        }
        _ => false,
    }
}

/// A full date, `T`, a time and a zone.
fn is_full(s: &[u8]) -> bool {
    date_end(s) == Some(10)
        && s.get(10) == Some(&b'T')
        && time_end(&s[11..]).is_some_and(|end| is_zone(&s[11 + end..]))
}

fn is_date_time(s: &[u8]) -> bool {
    date_end(s) == Some(s.len()) || is_full(s)
}

fn is_instant(s: &[u8]) -> bool {
    is_full(s)
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
                "Patient.name[0]",
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

    #[test]
    fn primitive_formats() {
        let ok = |ty: &str, v: Value| primitive(ty, &v).is_ok();
        assert!(
            ok("date", json!("2024"))
                && ok("date", json!("2024-02"))
                && ok("date", json!("2024-02-29"))
        );
        assert!(
            !ok("date", json!("2023-02-29"))
                && !ok("date", json!("0000"))
                && !ok("date", json!("2024-13"))
        );
        assert!(
            ok("dateTime", json!("2024-01-01T10:00:00Z"))
                && ok("dateTime", json!("2024-01-01T10:00:00.5-05:00"))
        );
        assert!(
            !ok("dateTime", json!("2024-01-01T10:00:00"))
                && !ok("dateTime", json!("2024-01-01T10:00Z"))
        );
        assert!(
            ok("instant", json!("2024-01-01T10:00:00+14:00"))
                && !ok("instant", json!("2024-01-01"))
        );
        assert!(ok("time", json!("23:59:60")) && !ok("time", json!("24:00:00")));
        assert!(ok("integer", json!(-2147483648_i64)) && !ok("integer", json!(2147483648_i64)));
        assert!(
            !ok("integer", json!(1.5))
                && !ok("positiveInt", json!(0))
                && ok("unsignedInt", json!(0))
        );
        assert!(ok("decimal", json!(0.1)) && !ok("decimal", json!("0.1")));
        assert!(ok("code", json!("a b")) && !ok("code", json!(" a")) && !ok("code", json!("a  b")));
        assert!(ok("oid", json!("urn:oid:1.2.3")) && !ok("oid", json!("urn:oid:1")));
        assert!(ok(
            "uuid",
            json!("urn:uuid:c757873d-ec9a-4326-a141-556f43239520")
        ));
        assert!(ok("base64Binary", json!("aGk=")) && !ok("base64Binary", json!("a!==")));
        assert!(
            !ok("string", json!(""))
                && !ok("string", json!("a\u{0}b"))
                && ok("string", json!("a\tb\n"))
        );
        assert!(!ok("uri", json!("a b")) && !ok("boolean", json!("true")));
    }
}
