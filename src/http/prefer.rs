//! The `Prefer` request header (RFC 7240): preferences separated by commas, in one header or
//! several; each a token, optionally `=` a token or a quoted string, then `;` parameters. Names
//! are case-insensitive, spaces around the separators are allowed, and a preference given twice
//! counts the first time.

use axum::http::HeaderMap;

/// What a kick-off asked for.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Preferences {
    /// `respond-async`: required by the Bulk Data IG.
    pub respond_async: bool,
    /// `handling=lenient`: what cannot be honoured is ignored, with a note.
    pub lenient: bool,
    /// `separate-export-status` (IG STU3): status answers are about the status request itself
    /// (200), the job's status in `X-Export-Status`.
    pub separate_export_status: bool,
}

impl Preferences {
    pub fn of(headers: &HeaderMap) -> Preferences {
        let mut preferences = Preferences::default();
        let mut handling_seen = false;
        let values = headers
            .get_all("prefer")
            .iter()
            .filter_map(|v| v.to_str().ok());
        for preference in values.flat_map(|v| split_outside_quotes(v, ',')) {
            let first = split_outside_quotes(preference, ';')
                .next()
                .unwrap_or_default();
            let (name, value) = match first.split_once('=') {
                Some((name, value)) => (name.trim(), Some(unquoted(value.trim()))),
                None => (first.trim(), None),
            };
            match name.to_ascii_lowercase().as_str() {
                "respond-async" => preferences.respond_async = true,
                "separate-export-status" => preferences.separate_export_status = true,
                "handling" if !handling_seen => {
                    handling_seen = true;
                    preferences.lenient = value.is_some_and(|v| v.eq_ignore_ascii_case("lenient"));
                }
                _ => {}
            }
        }
        preferences
    }
}

/// The pieces of `text` between `separator`s that are not inside a quoted string.
fn split_outside_quotes(text: &str, separator: char) -> impl Iterator<Item = &str> {
    let (mut quoted, mut escaped, mut start) = (false, false, 0);
    let mut pieces = Vec::new();
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == separator && !quoted => {
                pieces.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    pieces.push(&text[start..]);
    pieces.into_iter().filter(|piece| !piece.trim().is_empty())
}

/// A token as it is, or a quoted string without its quotes and escapes.
fn unquoted(value: &str) -> String {
    let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
        return value.to_string();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        out.push(if c == '\\' {
            chars.next().unwrap_or(c)
        } else {
            c
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn of(values: &[&str]) -> Preferences {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append("prefer", HeaderValue::from_str(value).unwrap());
        }
        Preferences::of(&headers)
    }

    #[test]
    fn preferences_are_read_as_rfc_7240_writes_them() {
        let all = Preferences {
            respond_async: true,
            lenient: true,
            separate_export_status: true,
        };
        assert_eq!(
            of(&["respond-async, handling=lenient, separate-export-status"]),
            all
        );
        assert_eq!(
            of(&[
                "Respond-Async; wait=10",
                "HANDLING = \"lenient\"",
                "separate-export-status"
            ]),
            all
        );
        assert_eq!(
            of(&["respond-async,separate-export-status,handling=\"le\\nient\""]),
            all
        );
        let plain = of(&["respond-async"]);
        assert!(plain.respond_async && !plain.lenient && !plain.separate_export_status);
        // The first of a repeated preference counts; a comma inside quotes separates nothing.
        assert!(!of(&["respond-async, handling=strict, handling=lenient"]).lenient);
        let quoted = of(&["foo=\"a, separate-export-status\", respond-async"]);
        assert!(quoted.respond_async && !quoted.separate_export_status);
        assert_eq!(of(&[]), Preferences::default());
        assert!(!of(&["respond-asynchronous, separate-export-status-x"]).respond_async);
    }
}
