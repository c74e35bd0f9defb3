//! Resource validation, server stamping (id, meta) and reference rewriting.

use std::collections::HashMap;

use serde_json::{Map, Value};

/// R4 `id`: 1–64 of `A-Z a-z 0-9 - .`.
pub fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// The type and id a reference names when it is to a resource of this server: relative
/// (`Patient/123`, `Patient/123/_history/2`) or absolute under this server's `base`.
/// A reference to another server, a `urn:`, a fragment or anything else is not local.
pub fn local_reference<'r>(reference: &'r str, base: &str) -> Option<(&'r str, &'r str)> {
    let relative = match reference.strip_prefix(base) {
        Some(rest) if !base.is_empty() => rest.strip_prefix('/')?,
        _ if reference.contains(':') => return None,
        _ => reference,
    };
    let mut parts = relative.split('/');
    let (resource_type, id) = (parts.next()?, parts.next()?);
    match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => {}
        (Some("_history"), Some(version), None) if !version.is_empty() => {}
        _ => return None,
    }
    (super::is_resource_type(resource_type) && is_valid_id(id)).then_some((resource_type, id))
}

/// Parses JSON text that must be a resource: an object with a known `resourceType` and, if
/// present, a valid `id`.
pub fn parse(text: &[u8]) -> Result<Map<String, Value>, String> {
    let value: Value =
        serde_json::from_slice(text).map_err(|e| format!("body is not valid JSON: {e}"))?;
    into_resource(value)
}

/// Checks that `value` is a resource (see [`parse`]).
pub fn into_resource(value: Value) -> Result<Map<String, Value>, String> {
    let Value::Object(map) = value else {
        return Err("a resource must be a JSON object".into());
    };
    let resource_type = match map.get("resourceType") {
        Some(Value::String(t)) => t,
        Some(_) => return Err("resourceType must be a string".into()),
        None => return Err("resourceType is missing".into()),
    };
    if !super::is_resource_type(resource_type) {
        return Err(format!("'{resource_type}' is not an R4 resource type"));
    }
    match map.get("id") {
        None => {}
        Some(Value::String(id)) if is_valid_id(id) => {}
        Some(other) => {
            return Err(format!(
                "id {other} is invalid: it must be 1-64 characters of A-Z, a-z, 0-9, '-' and '.'"
            ));
        }
    }
    Ok(map)
}

pub fn resource_type(resource: &Map<String, Value>) -> &str {
    resource
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

pub fn id(resource: &Map<String, Value>) -> Option<&str> {
    resource.get("id").and_then(Value::as_str)
}

/// A resource serialized as stored (and exported), with a hole for the server's
/// `meta.versionId` and `meta.lastUpdated`: `resourceType`, `id` and `meta` come first,
/// everything else follows as given. Rendering once and filling the hole later keeps the
/// JSON work out of the database transaction.
#[derive(Debug, Clone)]
pub struct Template {
    head: String,
    tail: String,
}

impl Template {
    pub fn new(resource: Map<String, Value>, id: &str) -> Template {
        let mut resource_type = Value::Null;
        let mut meta = Map::new();
        let mut rest = Vec::with_capacity(resource.len());
        for (key, value) in resource {
            match key.as_str() {
                "resourceType" => resource_type = value,
                "id" => {}
                "meta" => {
                    if let Value::Object(m) = value {
                        meta = m;
                    }
                }
                _ => rest.push((key, to_json(&value))),
            }
        }
        Template::from_parts(
            &to_json(&resource_type),
            id,
            &meta,
            rest.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )
    }

    /// From already serialized parts: the `resourceType` JSON, the id, the client's `meta` and
    /// the other top-level elements as (name, JSON text), in order.
    pub fn from_parts<'a>(
        resource_type_json: &str,
        id: &str,
        meta: &Map<String, Value>,
        rest: impl Iterator<Item = (&'a str, &'a str)> + Clone,
    ) -> Template {
        let mut head = String::with_capacity(64 + id.len());
        head.push_str("{\"resourceType\":");
        head.push_str(resource_type_json);
        head.push_str(",\"id\":");
        push_json_string(&mut head, id);
        head.push_str(",\"meta\":{");
        for (k, v) in meta
            .iter()
            .filter(|(k, _)| *k != "versionId" && *k != "lastUpdated")
        {
            push_json_string(&mut head, k);
            head.push(':');
            head.push_str(&to_json(v));
            head.push(',');
        }
        head.push_str("\"versionId\":\"");
        // Sized once: the tail is most of a resource's text.
        let size: usize = rest.clone().map(|(k, v)| k.len() + v.len() + 8).sum();
        let mut tail = String::with_capacity(size + 4);
        tail.push_str("\"}");
        for (k, v) in rest {
            tail.push(',');
            push_json_string(&mut tail, k);
            tail.push(':');
            tail.push_str(v);
        }
        tail.push('}');
        Template { head, tail }
    }

    /// The stored text of a version, in pieces to be written one after the other.
    pub fn pieces<'a>(&'a self, version_id: &'a str, last_updated: &'a str) -> [&'a str; 5] {
        [
            &self.head,
            version_id,
            "\",\"lastUpdated\":\"",
            last_updated,
            &self.tail,
        ]
    }

    /// The stored text of a version.
    pub fn fill(&self, version_id: i32, last_updated: &str) -> String {
        self.pieces(&version_id.to_string(), last_updated).concat()
    }
}

/// Appends `text` as a JSON string.
pub fn push_json_string(out: &mut String, text: &str) {
    if text.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        out.push_str(&serde_json::to_string(text).expect("a string always serializes"));
    } else {
        // Nothing to escape (element names, ids and most values): copied as it is.
        out.push('"');
        out.push_str(text);
        out.push('"');
    }
}

fn to_json(v: &Value) -> String {
    serde_json::to_string(v).expect("a JSON value always serializes")
}

/// Replaces every `reference` whose value is a key of `targets` (e.g. `urn:uuid:…`) with the
/// mapped `Type/id`. Returns how many were replaced.
pub fn rewrite_references(value: &mut Value, targets: &HashMap<String, String>) -> usize {
    match value {
        Value::Object(map) => {
            let mut n = 0;
            for (key, inner) in map.iter_mut() {
                if key == "reference"
                    && let Value::String(s) = inner
                {
                    if let Some(target) = targets.get(s.as_str()) {
                        *s = target.clone();
                        n += 1;
                    }
                } else {
                    n += rewrite_references(inner, targets);
                }
            }
            n
        }
        Value::Array(items) => items
            .iter_mut()
            .map(|v| rewrite_references(v, targets))
            .sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids() {
        assert!(is_valid_id("a-B.9"));
        assert!(is_valid_id(&"x".repeat(64)));
        assert!(!is_valid_id(&"x".repeat(65)));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a_b"));
        assert!(!is_valid_id("a/b"));
    }

    #[test]
    fn parse_rejects_non_resources() {
        assert!(parse(b"[1]").unwrap_err().contains("object"));
        assert!(parse(b"{").unwrap_err().contains("not valid JSON"));
        assert!(parse(br#"{"id":"x"}"#).unwrap_err().contains("missing"));
        assert!(
            parse(br#"{"resourceType":"Pat"}"#)
                .unwrap_err()
                .contains("not an R4")
        );
        assert!(
            parse(br#"{"resourceType":"Patient","id":"a b"}"#)
                .unwrap_err()
                .contains("id")
        );
        assert!(parse(br#"{"resourceType":"Patient","id":7}"#).is_err());
        assert!(parse(br#"{"resourceType":"Patient","id":"ok"}"#).is_ok());
    }

    #[test]
    fn template_puts_server_fields_first_and_keeps_the_rest() {
        let r = json!({"active": true, "id": "old", "resourceType": "Patient",
                       "meta": {"versionId": "9", "source": "s"}, "name": [{"family": "X"}]});
        let template = Template::new(r.as_object().unwrap().clone(), "p1");
        let text = template.fill(2, "2024-01-01T00:00:00.000001Z");
        assert_eq!(
            text,
            r#"{"resourceType":"Patient","id":"p1","meta":{"source":"s","versionId":"2","lastUpdated":"2024-01-01T00:00:00.000001Z"},"active":true,"name":[{"family":"X"}]}"#
        );
        let parsed: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["meta"]["versionId"], "2");
        let bare = Template::new(
            json!({"resourceType": "Basic"})
                .as_object()
                .unwrap()
                .clone(),
            "b",
        );
        assert_eq!(
            bare.fill(1, "t"),
            r#"{"resourceType":"Basic","id":"b","meta":{"versionId":"1","lastUpdated":"t"}}"#
        );
    }

    #[test]
    fn rewrites_only_mapped_references() {
        let mut v = json!({"subject": {"reference": "urn:uuid:1"},
            "x": [{"reference": "urn:uuid:2"}, {"reference": "Patient/k"}], "reference": 3});
        let map = HashMap::from([("urn:uuid:1".to_string(), "Patient/a".to_string())]);
        assert_eq!(rewrite_references(&mut v, &map), 1);
        assert_eq!(v["subject"]["reference"], "Patient/a");
        assert_eq!(v["x"][0]["reference"], "urn:uuid:2");
    }
}
