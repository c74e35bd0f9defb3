//! FHIR `instant` values: parsing client input and formatting server timestamps.

use chrono::{DateTime, Utc};

/// Formats a server timestamp with microsecond precision, e.g. `2026-11-26T03:35:56.123456Z`.
/// (Postgres reads the same text as a timestamptz.)
pub fn format(t: DateTime<Utc>) -> String {
    use chrono::{Datelike, Timelike};
    // Digits written by hand: it runs for every loaded resource, where `format!`'s machinery
    // (and chrono's formatter even more) showed in the profile of `load`.
    let mut text = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut n: u32| {
        for i in (at..at + width).rev() {
            text[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, t.year().clamp(0, 9999) as u32);
    put(5, 2, t.month());
    put(8, 2, t.day());
    put(11, 2, t.hour());
    put(14, 2, t.minute());
    put(17, 2, t.second());
    put(20, 6, t.timestamp_subsec_micros().min(999_999));
    String::from_utf8(text.to_vec()).expect("ASCII digits")
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

/// The instants a FHIR `date`/`dateTime`/`instant` value covers, as `[start, end)`: `2020`
/// is all of 2020, `2020-03-04T10:00:00Z` is that second (or finer, as written).
pub fn range(s: &str) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    use chrono::{Datelike, Months, NaiveDate, TimeDelta, TimeZone};
    let midnight = |d: NaiveDate| Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).expect("valid"));
    let date = |y: i32, m: u32, d: u32| NaiveDate::from_ymd_opt(y, m, d);
    // Byte offsets below assume ASCII; anything else is not a date anyway.
    if !s.is_ascii() {
        return None;
    }
    match s.len() {
        4 => {
            let start = date(s.parse().ok()?, 1, 1)?;
            Some((
                midnight(start),
                midnight(start.with_year(start.year() + 1)?),
            ))
        }
        7 => {
            let start = date(s[..4].parse().ok()?, s[5..].parse().ok()?, 1)?;
            (s.as_bytes()[4] == b'-').then_some(())?;
            Some((
                midnight(start),
                midnight(start.checked_add_months(Months::new(1))?),
            ))
        }
        10 => {
            let start = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
            Some((midnight(start), midnight(start.succ_opt()?)))
        }
        _ => {
            let t = parse(s).ok()?;
            // The precision written decides the width: seconds, or the fraction's digits.
            let fraction = s[19..]
                .strip_prefix('.')
                .map_or(0, |f| f.bytes().take_while(u8::is_ascii_digit).count());
            let width = TimeDelta::nanoseconds(
                10i64.pow(9 - u32::try_from(fraction.min(9)).expect("at most 9")),
            );
            Some((t, t + width))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_the_written_precision() {
        let (s, e) = range("2020").unwrap();
        assert_eq!(
            (format(s), format(e)),
            (
                "2020-01-01T00:00:00.000000Z".into(),
                "2021-01-01T00:00:00.000000Z".into()
            )
        );
        let (s, e) = range("2020-12").unwrap();
        assert_eq!(
            (format(s), format(e)),
            (
                "2020-12-01T00:00:00.000000Z".into(),
                "2021-01-01T00:00:00.000000Z".into()
            )
        );
        let (s, e) = range("2020-02-29").unwrap();
        assert_eq!(
            (format(s), format(e)),
            (
                "2020-02-29T00:00:00.000000Z".into(),
                "2020-03-01T00:00:00.000000Z".into()
            )
        );
        let (s, e) = range("2020-02-29T10:00:00+02:00").unwrap();
        assert_eq!(
            (format(s), format(e)),
            (
                "2020-02-29T08:00:00.000000Z".into(),
                "2020-02-29T08:00:01.000000Z".into()
            )
        );
        let (_, e) = range("2020-02-29T10:00:00.25Z").unwrap();
        assert_eq!(format(e), "2020-02-29T10:00:00.260000Z");
        assert!(range("2020-13").is_none());
        assert!(range("20x0").is_none());
        assert!(range("2020-02-30").is_none());
    }

    #[test]
    fn parses_instants_and_rejects_dates() {
        let t = parse("2024-01-31T12:00:00.5+01:00").unwrap();
        assert_eq!(format(t), "2024-01-31T11:00:00.500000Z");
        assert!(parse("2024-01-31").is_err());
        assert!(parse("2024-01-31T12:00:00").is_err());
        assert!(parse("2024-01-31 12:00:00Z").is_err());
        assert!(parse("yesterday").is_err());
    }

    #[test]
    fn formats_as_chrono_does_with_microseconds() {
        use chrono::{SecondsFormat, TimeZone};
        // Spread over four centuries, with and without fractions, leap days included.
        for step in 0..20_000i64 {
            let micros = -2_000_000_000_000_000 + step * 631_234_567_891;
            let t = Utc.timestamp_micros(micros).unwrap();
            assert_eq!(format(t), t.to_rfc3339_opts(SecondsFormat::Micros, true));
        }
    }
}
