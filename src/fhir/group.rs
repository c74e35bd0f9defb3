//! Group membership as bulk export reads it.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{instant, resource::is_valid_id};

/// The active members of a Group that export follows.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Members {
    pub patients: Vec<String>,
    /// Nested Groups, to be followed.
    pub groups: Vec<String>,
}

/// Members that are not `inactive` and whose `period` (if any) includes `now`.
pub fn active_members(group: &Value, now: DateTime<Utc>) -> Members {
    let mut members = Members::default();
    let Some(Value::Array(list)) = group.get("member") else {
        return members;
    };
    for member in list {
        if member.get("inactive").and_then(Value::as_bool) == Some(true)
            || !period_includes(member.get("period"), now)
        {
            continue;
        }
        let Some(reference) = member.pointer("/entity/reference").and_then(Value::as_str) else {
            continue;
        };
        let mut parts = reference.trim_end_matches('/').rsplit('/');
        let (Some(id), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        if !is_valid_id(id) {
            continue;
        }
        match kind {
            "Patient" => members.patients.push(id.to_string()),
            "Group" => members.groups.push(id.to_string()),
            _ => {}
        }
    }
    members
}

fn period_includes(period: Option<&Value>, now: DateTime<Utc>) -> bool {
    let Some(period) = period else {
        return true;
    };
    let bound = |key: &str| {
        period
            .get(key)
            .and_then(Value::as_str)
            .and_then(instant::range)
    };
    let started = bound("start").is_none_or(|(start, _)| start <= now);
    let not_ended = bound("end").is_none_or(|(_, end)| now < end);
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
        ]});
        let m = active_members(&g, now);
        assert_eq!(m.patients, vec!["a", "e", "f"]);
        assert_eq!(m.groups, vec!["g2"]);
        assert_eq!(active_members(&json!({}), now), Members::default());
    }
}
