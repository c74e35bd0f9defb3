//! Group membership as bulk export reads it.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::{instant, resource::local_reference};

/// The active members of a Group that export follows.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Members {
    pub patients: Vec<String>,
    /// Nested Groups, to be followed.
    pub groups: Vec<String>,
}

/// What membership reads of a Group; everything else in it is skipped unparsed, so a Group of a
/// million members costs one pass and one string per member.
#[derive(Deserialize)]
struct GroupMembers<'a> {
    #[serde(borrow, default)]
    member: Vec<Member<'a>>,
}

#[derive(Deserialize)]
struct Member<'a> {
    #[serde(borrow)]
    entity: Option<Reference<'a>>,
    inactive: Option<bool>,
    #[serde(borrow)]
    period: Option<Period<'a>>,
}

#[derive(Deserialize)]
struct Reference<'a> {
    #[serde(borrow)]
    reference: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Period<'a> {
    #[serde(borrow)]
    start: Option<Cow<'a, str>>,
    #[serde(borrow)]
    end: Option<Cow<'a, str>>,
}

/// The members of a Group (its JSON text) that are not `inactive` and whose `period` (if any)
/// includes `now`, and are resources of this server (relative references, or under `base`).
pub fn active_members(group: &str, now: DateTime<Utc>, base: &str) -> serde_json::Result<Members> {
    let parsed: GroupMembers = serde_json::from_str(group)?;
    let mut members = Members::default();
    for member in parsed.member {
        if member.inactive == Some(true) || !period_includes(member.period.as_ref(), now) {
            continue;
        }
        let Some(reference) = member.entity.and_then(|e| e.reference) else {
            continue;
        };
        let Some((kind, id)) = local_reference(&reference, base) else {
            continue;
        };
        match kind {
            "Patient" => members.patients.push(id.to_string()),
            "Group" => members.groups.push(id.to_string()),
            _ => {}
        }
    }
    Ok(members)
}

fn period_includes(period: Option<&Period>, now: DateTime<Utc>) -> bool {
    let Some(period) = period else {
        return true;
    };
    let bound = |value: &Option<Cow<str>>| value.as_deref().and_then(instant::range);
    let started = bound(&period.start).is_none_or(|(start, _)| start <= now);
    let not_ended = bound(&period.end).is_none_or(|(_, end)| now < end);
    started && not_ended
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn skips_inactive_and_out_of_period_members() {
        let now = instant::parse("2024-06-01T00:00:00Z").unwrap();
        let g = json!({"member": [
            {"entity": {"reference": "Patient/a"}},
            {"entity": {"reference": "Patient/b"}, "inactive": true},
            {"entity": {"reference": "Patient/c"}, "period": {"end": "2023"}},
            {"entity": {"reference": "Patient/d"}, "period": {"start": "2025-01-01"}},
            {"entity": {"reference": "Patient/e"}, "period": {"start": "2020", "end": "2024-06"}},
            {"entity": {"reference": "Group/g2"}},
            {"entity": {"reference": "Practitioner/x"}},
            {"entity": {"reference": "https://other.example/fhir/Patient/f"}},
            {"entity": {"reference": "https://this.example/fhir/Patient/g"}},
        ]});
        let base = "https://this.example/fhir";
        let m = active_members(&g.to_string(), now, base).unwrap();
        assert_eq!(m.patients, vec!["a", "e", "g"]);
        assert_eq!(m.groups, vec!["g2"]);
        assert_eq!(active_members("{}", now, base).unwrap(), Members::default());
        let escaped = r#"{"member": [{"entity": {"reference": "Patient\/x"}}]}"#;
        assert_eq!(
            active_members(escaped, now, base).unwrap().patients,
            vec!["x"]
        );
        assert!(active_members(r#"{"member": 5}"#, now, base).is_err());
    }
}
