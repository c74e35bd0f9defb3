//! R4 invariants that de-identification can break between elements, and how valid output
//! keeps them. One is known to break: con-4, "if a condition is abated, its clinical status is
//! inactive, resolved or remission" (`abatement.empty() or clinicalStatus.coding.where(
//! system='…condition-clinical' and (code='resolved' or code='remission' or
//! code='inactive')).exists()`). Redacting `Coding.code` empties the status, while a partly
//! redacted or shifted abatement (its year) stays. In valid output the abatement then goes too,
//! and the resource is labelled REDACTED: a research copy loses a date, never its validity.

use serde_json::Value;

use super::tree::{NodeId, Tree};

const CLINICAL_STATUS: &str = "http://terminology.hl7.org/CodeSystem/condition-clinical";
const ABATED_STATUSES: [&str; 3] = ["resolved", "remission", "inactive"];

/// Does a `clinicalStatus` coding with this system and code allow an abatement?
fn allows_abatement(system: Option<&str>, code: Option<&str>) -> bool {
    system == Some(CLINICAL_STATUS) && code.is_some_and(|c| ABATED_STATUSES.contains(&c))
}

/// Keeps con-4 on `resource` of `tree`, before emptied nodes are pruned: when it is a
/// Condition with an abatement that would be written and a clinical status that does not
/// allow one, the abatement goes. Returns whether it went.
pub fn keep_on_tree(tree: &mut Tree, resource: NodeId) -> bool {
    if tree.nodes[resource].ty != "Condition" {
        return false;
    }
    let abatements: Vec<NodeId> = tree
        .children(resource)
        .filter(|&c| tree.nodes[c].name == "abatement" && has_content(tree, c))
        .collect();
    if abatements.is_empty() || status_allows_abatement(tree, resource) {
        return false;
    }
    for abatement in abatements {
        tree.remove(abatement);
    }
    true
}

/// Will `id` be written: does it or anything under it hold a value?
fn has_content(tree: &Tree, id: NodeId) -> bool {
    tree.nodes[id].value.is_some() || tree.children(id).any(|c| has_content(tree, c))
}

fn status_allows_abatement(tree: &Tree, condition: NodeId) -> bool {
    let text = |coding: NodeId, name: &str| {
        tree.children(coding)
            .find(|&c| tree.nodes[c].name == name)
            .and_then(|c| tree.nodes[c].value.as_ref())
            .and_then(Value::as_str)
    };
    tree.children(condition)
        .filter(|&c| tree.nodes[c].name == "clinicalStatus")
        .flat_map(|status| tree.children(status))
        .filter(|&c| tree.nodes[c].name == "coding")
        .any(|coding| allows_abatement(text(coding, "system"), text(coding, "code")))
}

/// Does a resource written as `json` (or one inside it) break con-4? Cheap for the many lines
/// with no abatement at all.
pub fn broken_in_json(json: &str) -> bool {
    if !json.contains("abatement") {
        return false;
    }
    serde_json::from_str::<Value>(json).map_or(true, |v| broken_in(&v))
}

fn broken_in(value: &Value) -> bool {
    match value {
        Value::Object(map) => {
            let abated = map.get("resourceType").and_then(Value::as_str) == Some("Condition")
                && map
                    .keys()
                    .any(|k| k.trim_start_matches('_').starts_with("abatement"));
            let allowed = || {
                codings(map.get("clinicalStatus")).any(|coding| {
                    let text = |name: &str| coding.get(name).and_then(Value::as_str);
                    allows_abatement(text("system"), text("code"))
                })
            };
            (abated && !allowed()) || map.values().any(broken_in)
        }
        Value::Array(items) => items.iter().any(broken_in),
        _ => false,
    }
}

/// The codings of a CodeableConcept written as one object or (as some writers do) an array.
fn codings(concept: Option<&Value>) -> impl Iterator<Item = &Value> {
    one_or_many(concept).flat_map(|c| one_or_many(c.get("coding")))
}

fn one_or_many(value: Option<&Value>) -> impl Iterator<Item = &Value> {
    let (one, many) = match value {
        Some(Value::Array(items)) => (None, items.as_slice()),
        one => (one, &[][..]),
    };
    one.into_iter().chain(many)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn condition(status: Option<&str>, abatement: bool) -> Value {
        let mut c = json!({"resourceType": "Condition", "id": "c"});
        if let Some(code) = status {
            c["clinicalStatus"] = json!({"coding": [{"system": CLINICAL_STATUS, "code": code}]});
        }
        if abatement {
            c["abatementDateTime"] = json!("2015");
        }
        c
    }

    #[test]
    fn con4_in_json() {
        let broken = |v: &Value| broken_in_json(&v.to_string());
        assert!(!broken(&condition(Some("resolved"), true)));
        assert!(!broken(&condition(Some("inactive"), true)));
        assert!(!broken(&condition(Some("active"), false)));
        assert!(!broken(&condition(None, false)));
        assert!(broken(&condition(Some("active"), true)));
        assert!(broken(&condition(None, true)));
        // A status coding that lost its code, and one of another system.
        let mut c = condition(Some("resolved"), true);
        c["clinicalStatus"]["coding"][0]
            .as_object_mut()
            .unwrap()
            .remove("code");
        assert!(broken(&c));
        c["clinicalStatus"]["coding"] = json!([{"system": "http://other", "code": "resolved"}]);
        assert!(broken(&c));
        // An abatement that is only an extension of the primitive is still an abatement.
        let mut c = condition(None, false);
        c["_abatementDateTime"] = json!({"extension": [{"url": "u", "valueCode": "masked"}]});
        assert!(broken(&c));
        // Inside a Bundle, and a resource that is not a Condition.
        let bundle =
            json!({"resourceType": "Bundle", "entry": [{"resource": condition(None, true)}]});
        assert!(broken(&bundle));
        assert!(!broken(
            &json!({"resourceType": "Observation", "abatementDateTime": "2015"})
        ));
    }

    #[test]
    fn con4_on_the_tree() {
        let kept = |v: Value| {
            let mut tree = Tree::parse(&v.to_string()).unwrap();
            let removed = keep_on_tree(&mut tree, 0);
            (removed, tree.write())
        };
        let fine = condition(Some("remission"), true);
        assert_eq!(kept(fine.clone()), (false, fine.to_string()));
        let (removed, out) = kept(condition(Some("active"), true));
        assert!(removed);
        assert_eq!(out, condition(Some("active"), false).to_string());
        // An abatement that redaction already emptied is no abatement.
        let mut tree = Tree::parse(&condition(None, true).to_string()).unwrap();
        let abatement = tree
            .children(0)
            .find(|&c| tree.nodes[c].name == "abatement")
            .unwrap();
        tree.nodes[abatement].value = None;
        assert!(!keep_on_tree(&mut tree, 0));
    }
}
