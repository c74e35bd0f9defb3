//! The R4 formats of primitive values: JSON types, `integer` ranges, and the regular
//! expressions of `date`, `dateTime`, `instant`, `time`, `id`, `code`, `uri`, `oid`, `uuid`,
//! `base64Binary`, written out as byte checks; strings without control characters.

/// A scalar JSON value as the checks see it.
#[derive(Debug, Clone, Copy)]
pub(super) enum Scalar<'a> {
    Null,
    Bool,
    /// A number: its value when it is a whole number that fits an i64.
    Number(Option<i64>),
    Str(&'a str),
}

pub(super) fn kind(value: &Scalar) -> &'static str {
    match value {
        Scalar::Null => "null",
        Scalar::Bool => "a boolean",
        Scalar::Number(_) => "a number",
        Scalar::Str(_) => "a string",
    }
}

/// Checks a primitive value of R4 type `ty`.
pub(super) fn primitive(ty: &str, value: &Scalar) -> Result<(), String> {
    match (ty, value) {
        ("boolean", Scalar::Bool) | ("decimal", Scalar::Number(_)) => Ok(()),
        ("boolean", other) => Err(format!(
            "a boolean must be true or false, not {}",
            kind(other)
        )),
        ("decimal", other) => Err(format!(
            "a decimal must be a JSON number, not {}",
            kind(other)
        )),
        ("integer" | "positiveInt" | "unsignedInt", value) => integer(ty, value),
        (_, Scalar::Str(text)) => text_format(ty, text),
        (_, other) => Err(format!("a {ty} must be a JSON string, not {}", kind(other))),
    }
}

fn integer(ty: &str, value: &Scalar) -> Result<(), String> {
    let Scalar::Number(n) = value else {
        return Err(format!(
            "an {ty} must be a JSON number, not {}",
            kind(value)
        ));
    };
    let Some(i) = n.filter(|i| i32::try_from(*i).is_ok()) else {
        return Err(format!(
            "this number is not an {ty}: a whole number from -2147483648 to 2147483647"
        ));
    };
    match ty {
        "positiveInt" if i < 1 => Err(format!("{i} is not a positiveInt (1 or more)")),
        "unsignedInt" if i < 0 => Err(format!("{i} is not an unsignedInt (0 or more)")),
        _ => Ok(()),
    }
}

/// The string formats of R4 primitives.
pub(super) fn text_format(ty: &str, text: &str) -> Result<(), String> {
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
        "id" => crate::fhir::resource::is_valid_id(text),
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

    #[test]
    fn primitive_formats() {
        let ok = |ty: &str, v: Scalar| primitive(ty, &v).is_ok();
        let s = Scalar::Str;
        assert!(ok("date", s("2024")) && ok("date", s("2024-02")) && ok("date", s("2024-02-29")));
        assert!(
            !ok("date", s("2023-02-29")) && !ok("date", s("0000")) && !ok("date", s("2024-13"))
        );
        assert!(
            ok("dateTime", s("2024-01-01T10:00:00Z"))
                && ok("dateTime", s("2024-01-01T10:00:00.5-05:00"))
        );
        assert!(
            !ok("dateTime", s("2024-01-01T10:00:00")) && !ok("dateTime", s("2024-01-01T10:00Z"))
        );
        assert!(ok("instant", s("2024-01-01T10:00:00+14:00")) && !ok("instant", s("2024-01-01")));
        assert!(ok("time", s("23:59:60")) && !ok("time", s("24:00:00")));
        let n = |i: i64| Scalar::Number(Some(i));
        assert!(ok("integer", n(-2147483648)) && !ok("integer", n(2147483648)));
        assert!(
            !ok("integer", Scalar::Number(None))
                && !ok("positiveInt", n(0))
                && ok("unsignedInt", n(0))
        );
        assert!(ok("decimal", Scalar::Number(None)) && !ok("decimal", s("0.1")));
        assert!(ok("code", s("a b")) && !ok("code", s(" a")) && !ok("code", s("a  b")));
        assert!(ok("oid", s("urn:oid:1.2.3")) && !ok("oid", s("urn:oid:1")));
        assert!(ok(
            "uuid",
            s("urn:uuid:c757873d-ec9a-4326-a141-556f43239520")
        ));
        assert!(ok("base64Binary", s("aGk=")) && !ok("base64Binary", s("a!==")));
        assert!(!ok("string", s("")) && !ok("string", s("a\u{0}b")) && ok("string", s("a\tb\n")));
        assert!(!ok("uri", s("a b")) && !ok("boolean", s("true")) && ok("boolean", Scalar::Bool));
    }
}
