//! FHIR `instant` values: parsing client input and formatting server timestamps.

use chrono::{DateTime, SecondsFormat, Utc};

/// Formats a server timestamp with microsecond precision, e.g. `2026-11-26T03:35:56.123456Z`.
pub fn format(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Parses a FHIR instant: date, time to the second, optional fraction and a required zone.
pub fn parse(s: &str) -> Result<DateTime<Utc>, String> {
    // RFC 3339 is the FHIR instant syntax, except that RFC 3339 also accepts a space or a
    // lowercase `t` as separator, which FHIR does not.
    if s.len() < 20 || s.as_bytes()[10] != b'T' {
        return Err(format!(
            "'{s}' is not a FHIR instant (expected e.g. 2024-01-31T12:00:00Z, with seconds and a time zone)"
        ));
    }
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("'{s}' is not a FHIR instant: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_instants_and_rejects_dates() {
        let t = parse("2024-01-31T12:00:00.5+01:00").unwrap();
        assert_eq!(format(t), "2024-01-31T11:00:00.500000Z");
        assert!(parse("2024-01-31").is_err());
        assert!(parse("2024-01-31T12:00:00").is_err());
        assert!(parse("2024-01-31 12:00:00Z").is_err());
        assert!(parse("yesterday").is_err());
    }
}
