//! Search parameter values (FHIR R4 search, section 3.1.1.4) and how they match element values:
//! token, string, reference, date, number, quantity and uri.

use chrono::{DateTime, NaiveDate, TimeDelta, TimeZone, Utc};
use serde_json::Value;
use unicode_normalization::{UnicodeNormalization, char::is_combining_mark};

use super::search_param::reference_parts;

/// Comparison prefixes of ordered values (`ge2020`, `lt5.4`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

/// Splits a known prefix off an ordered value.
pub fn prefix(value: &str) -> (Prefix, &str) {
    const PREFIXES: &[(&str, Prefix)] = &[
        ("eq", Prefix::Eq),
        ("ne", Prefix::Ne),
        ("gt", Prefix::Gt),
        ("lt", Prefix::Lt),
        ("ge", Prefix::Ge),
        ("le", Prefix::Le),
        ("sa", Prefix::Sa),
        ("eb", Prefix::Eb),
        ("ap", Prefix::Ap),
    ];
    PREFIXES
        .iter()
        .find_map(|(p, prefix)| value.strip_prefix(p).map(|rest| (*prefix, rest)))
        .unwrap_or((Prefix::Eq, value))
}

/// Case- and accent-insensitive form of a string (`Élodie` → `elodie`).
pub fn fold(s: &str) -> String {
    s.nfd()
        .filter(|c| !is_combining_mark(*c))
        .flat_map(char::to_lowercase)
        .collect()
}

// ---- token ----

/// `[system]|[code]` or `code`.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    /// None: any system; Some(""): no system.
    pub system: Option<String>,
    /// None: any code (`system|`).
    pub code: Option<String>,
}

impl Token {
    pub fn parse(value: &str) -> Result<Token, String> {
        let token = match value.split_once('|') {
            Some((system, code)) => Token {
                system: Some(system.to_string()),
                code: (!code.is_empty()).then(|| code.to_string()),
            },
            None => Token {
                system: None,
                code: Some(value.to_string()),
            },
        };
        if token.code.is_none() && token.system.as_deref() == Some("") {
            return Err("a token needs a system or a code".into());
        }
        Ok(token)
    }

    /// CodeableConcept, Coding, Identifier, ContactPoint, code, string, id, boolean.
    pub fn matches(&self, value: &Value) -> bool {
        match value {
            Value::String(s) => self.code.as_deref() == Some(s) && self.system_free(),
            Value::Bool(b) => self.code.as_deref() == Some(if *b { "true" } else { "false" }),
            Value::Object(o) => {
                if let Some(Value::Array(codings)) = o.get("coding") {
                    return codings.iter().any(|c| self.matches(c));
                }
                // Identifier and ContactPoint carry `value`; Coding carries `code`.
                let code = o.get("code").or_else(|| o.get("value"));
                let code = code.and_then(Value::as_str);
                // A ContactPoint's `system` (phone, email) is not a code system.
                let system = if !o.contains_key("code") && is_contact_system(o.get("system")) {
                    None
                } else {
                    o.get("system").and_then(Value::as_str)
                };
                let code_ok = match &self.code {
                    None => true,
                    Some(expected) => code == Some(expected.as_str()),
                };
                let system_ok = match self.system.as_deref() {
                    None => true,
                    Some("") => system.is_none(),
                    Some(expected) => system == Some(expected),
                };
                code_ok && system_ok
            }
            _ => false,
        }
    }

    /// Plain codes have no system of their own: only `code` and `|code` forms can match.
    fn system_free(&self) -> bool {
        matches!(self.system.as_deref(), None | Some(""))
    }
}

fn is_contact_system(system: Option<&Value>) -> bool {
    matches!(
        system.and_then(Value::as_str),
        Some("phone" | "fax" | "email" | "pager" | "url" | "sms" | "other")
    )
}

// ---- string ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StringMatch {
    StartsWith,
    Exact,
    Contains,
}

/// The strings a string parameter compares: the value itself, or the text parts of a
/// HumanName or Address.
pub fn strings(value: &Value) -> Vec<&str> {
    match value {
        Value::String(s) => vec![s],
        Value::Object(o) => o
            .iter()
            .filter(|(k, _)| k.as_str() != "use" && k.as_str() != "type")
            .flat_map(|(_, v)| match v {
                Value::String(s) => vec![s.as_str()],
                Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// `wanted` is folded already unless the match is exact.
pub fn string_matches(how: StringMatch, wanted: &str, value: &Value) -> bool {
    strings(value).into_iter().any(|s| match how {
        StringMatch::Exact => s == wanted,
        StringMatch::StartsWith => fold(s).starts_with(wanted),
        StringMatch::Contains => fold(s).contains(wanted),
    })
}

// ---- reference ----

/// A reference parameter value, normalised against the server's base URL.
#[derive(Debug, Clone, PartialEq)]
pub enum ReferenceValue {
    /// `Type/id` (also from our own absolute URLs, or `:Type` with an id).
    Local(String, String),
    /// A bare `id`: any type.
    Id(String),
    /// Another server's absolute URL.
    Absolute(String),
}

impl ReferenceValue {
    pub fn parse(value: &str, base_url: &str, type_modifier: Option<&str>) -> Result<Self, String> {
        if value.is_empty() {
            return Err("an empty reference".into());
        }
        let local = value
            .strip_prefix(base_url)
            .and_then(|rest| rest.strip_prefix('/'))
            .unwrap_or(value);
        if local.contains("://") {
            return Ok(ReferenceValue::Absolute(value.to_string()));
        }
        let parsed = match (local.split_once('/'), type_modifier) {
            (None, Some(t)) => ReferenceValue::Local(t.to_string(), local.to_string()),
            (None, None) => ReferenceValue::Id(local.to_string()),
            (Some(_), _) => {
                let (t, id) = reference_parts(local)
                    .ok_or_else(|| format!("'{value}' is not a reference (Type/id)"))?;
                if type_modifier.is_some_and(|m| m != t) {
                    return Err(format!("'{value}' is not a {}", type_modifier.unwrap()));
                }
                ReferenceValue::Local(t.to_string(), id.to_string())
            }
        };
        Ok(parsed)
    }

    /// A Reference element, or a canonical/uri string.
    pub fn matches(&self, value: &Value, base_url: &str) -> bool {
        let reference = match value {
            Value::Object(o) => o.get("reference").and_then(Value::as_str),
            Value::String(s) => Some(s.as_str()),
            _ => None,
        };
        let Some(reference) = reference else {
            return false;
        };
        let local = reference
            .strip_prefix(base_url)
            .and_then(|rest| rest.strip_prefix('/'))
            .unwrap_or(reference);
        match self {
            ReferenceValue::Absolute(url) => reference == url,
            _ if local.contains("://") => false,
            ReferenceValue::Local(t, id) => reference_parts(local) == Some((t, id)),
            ReferenceValue::Id(id) => reference_parts(local).is_some_and(|(_, i)| i == id),
        }
    }
}

// ---- date ----

/// A date parameter: a prefix and the instants its value covers, `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DateValue {
    pub prefix: Prefix,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl DateValue {
    /// `now` is the instant `ap` measures its distance from (an export's kick-off).
    pub fn parse(value: &str, now: DateTime<Utc>) -> Result<DateValue, String> {
        let (prefix, text) = prefix(value);
        let (mut start, mut end) = date_range(text).ok_or_else(|| {
            format!("'{text}' is not a date (YYYY, YYYY-MM, YYYY-MM-DD or a dateTime)")
        })?;
        if prefix == Prefix::Ap {
            // "Approximately": R4 suggests 10 % of the distance from now, on either side.
            let middle = start + (end - start) / 2;
            let margin = (now - middle).abs() / 10;
            (start, end) = (start - margin, end + margin);
        }
        Ok(DateValue { prefix, start, end })
    }

    /// date, dateTime, instant, Period.
    pub fn matches(&self, value: &Value) -> bool {
        let Some((start, end)) = element_range(value) else {
            return false;
        };
        let eq = self.start <= start && end <= self.end;
        match self.prefix {
            Prefix::Eq => eq,
            Prefix::Ne => !eq,
            Prefix::Gt => end > self.end,
            Prefix::Lt => start < self.start,
            Prefix::Ge => end > self.end || eq,
            Prefix::Le => start < self.start || eq,
            Prefix::Sa => start >= self.end,
            Prefix::Eb => end <= self.start,
            Prefix::Ap => start < self.end && end > self.start,
        }
    }
}

/// The range of a search date: like an element's, and a time without zone is UTC (the server's
/// zone), and minutes may end it (`2020-01-01T10:00`).
fn date_range(text: &str) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    if !text.is_ascii() {
        return None; // and the byte offsets below are safe
    }
    if text.len() <= 10 {
        return super::instant::range(text);
    }
    let has_zone = text.ends_with('Z') || text[10..].contains(['+', '-']);
    let zoned = if has_zone {
        text.to_string()
    } else {
        format!("{text}Z")
    };
    if zoned.len() == 17 || (zoned.len() == 22 && !zoned.ends_with('Z')) {
        // Minutes only: widen to the minute.
        let (time, zone) = zoned.split_at(16);
        let (start, _) = super::instant::range(&format!("{time}:00{zone}"))?;
        return Some((start, start + TimeDelta::minutes(1)));
    }
    super::instant::range(&zoned)
}

/// The instants an element covers: a date/dateTime/instant string, or a Period (open ends
/// reach to the end of time).
fn element_range(value: &Value) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    match value {
        Value::String(s) => date_range(s),
        Value::Object(o) if o.contains_key("start") || o.contains_key("end") => {
            let bound = |key: &str| o.get(key).and_then(Value::as_str).and_then(date_range);
            let start = match o.get("start") {
                Some(_) => bound("start")?.0,
                None => far(1),
            };
            let end = match o.get("end") {
                Some(_) => bound("end")?.1,
                None => far(9999),
            };
            Some((start, end))
        }
        _ => None,
    }
}

fn far(year: i32) -> DateTime<Utc> {
    let day = NaiveDate::from_ymd_opt(year, 1, 1).expect("valid date");
    Utc.from_utc_datetime(&day.and_hms_opt(0, 0, 0).expect("valid time"))
}

// ---- number and quantity ----

/// A number or quantity parameter: `[prefix]number[|system|code]`.
#[derive(Debug, Clone, PartialEq)]
pub struct NumberValue {
    pub prefix: Prefix,
    pub number: f64,
    /// Half the unit of the last digit written: `100` means [99.5, 100.5).
    pub half_step: f64,
    pub system: Option<String>,
    pub code: Option<String>,
}

impl NumberValue {
    pub fn parse(value: &str, quantity: bool) -> Result<NumberValue, String> {
        let (prefix, text) = prefix(value);
        let (number, system, code) = match (quantity, text.split_once('|')) {
            (true, Some((number, unit))) => {
                let (system, code) = unit
                    .split_once('|')
                    .ok_or_else(|| format!("'{value}' is not a quantity (number|system|code)"))?;
                let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
                (number, some(system), some(code))
            }
            _ => (text, None, None),
        };
        let mantissa = number.split(['e', 'E']).next().unwrap_or(number);
        let parsed: f64 = number
            .parse()
            .ok()
            .filter(|n: &f64| n.is_finite())
            .ok_or_else(|| format!("'{number}' is not a number"))?;
        // An f64 spans about 10^±308: beyond ±400 a step is 0 or infinite whatever the exact
        // exponent, so clamping keeps huge exponents (`1e-2147483648`) from overflowing.
        let exponent: i64 = match number.split_once(['e', 'E']) {
            Some((_, e)) => e.parse::<i64>().map(|e| e.clamp(-400, 400)).or_else(|_| {
                // More digits than an i64: only the sign matters.
                let digits = e.trim_start_matches(['+', '-']);
                if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                    Ok(if e.starts_with('-') { -400 } else { 400 })
                } else {
                    Err(format!("'{number}' is not a number"))
                }
            })?,
            None => 0,
        };
        let decimals = mantissa.split_once('.').map_or(0, |(_, d)| d.len()) as i64;
        let step_exponent =
            i32::try_from((exponent - decimals).clamp(-400, 400)).expect("clamped to ±400");
        Ok(NumberValue {
            prefix,
            number: parsed,
            half_step: 0.5 * 10f64.powi(step_exponent),
            system,
            code,
        })
    }

    /// A number, a Quantity, or a Range (its low and high).
    pub fn matches(&self, value: &Value) -> bool {
        match value {
            Value::Number(n) => n.as_f64().is_some_and(|n| self.compare(n, n)),
            Value::Object(o) if o.contains_key("low") || o.contains_key("high") => {
                let bound = |key: &str| o.get(key).filter(|q| self.unit_matches(q));
                let low = bound("low").and_then(|q| q.get("value")?.as_f64());
                let high = bound("high").and_then(|q| q.get("value")?.as_f64());
                if low.is_none() && high.is_none() {
                    return false;
                }
                self.compare(low.unwrap_or(f64::MIN), high.unwrap_or(f64::MAX))
            }
            Value::Object(o) => {
                let number = o.get("value").and_then(Value::as_f64);
                number.is_some_and(|n| self.unit_matches(value) && self.compare(n, n))
            }
            _ => false,
        }
    }

    fn unit_matches(&self, quantity: &Value) -> bool {
        let field = |key: &str| quantity.get(key).and_then(Value::as_str);
        let code_ok = match &self.code {
            None => true,
            // Without a system the code may be the human unit too.
            Some(code) if self.system.is_none() => {
                field("code") == Some(code) || field("unit") == Some(code)
            }
            Some(code) => field("code") == Some(code),
        };
        code_ok
            && self
                .system
                .as_deref()
                .is_none_or(|s| field("system") == Some(s))
    }

    /// Compares the element's interval `[low, high]` (one point for a plain value).
    fn compare(&self, low: f64, high: f64) -> bool {
        let n = self.number;
        let eq = low >= n - self.half_step && high < n + self.half_step;
        match self.prefix {
            Prefix::Eq => eq,
            Prefix::Ne => !eq,
            Prefix::Gt | Prefix::Sa => high > n,
            Prefix::Lt | Prefix::Eb => low < n,
            Prefix::Ge => high >= n,
            Prefix::Le => low <= n,
            Prefix::Ap => {
                let margin = (n * 0.1).abs().max(self.half_step);
                low <= n + margin && high >= n - margin
            }
        }
    }
}

// ---- uri ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UriMatch {
    Exact,
    /// `:below`: the element starts with the value.
    Below,
    /// `:above`: the value starts with the element.
    Above,
}

pub fn uri_matches(how: UriMatch, wanted: &str, value: &Value) -> bool {
    let Some(uri) = value.as_str() else {
        return false;
    };
    match how {
        UriMatch::Exact => uri == wanted,
        UriMatch::Below => uri.starts_with(wanted),
        UriMatch::Above => wanted.starts_with(uri),
    }
}

#[cfg(test)]
mod tests;
