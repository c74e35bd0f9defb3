//! What each method does to one node, as FHIR Tools for Anonymization does it: redaction
//! (with partial dates, ages and zip codes), the date shift, HMAC-SHA256 hashes (a literal
//! reference keeps all but its id), AES-CBC encryption, perturbation, generalization and
//! substitution. Where the tool draws random numbers (IVs, noise) these draw them from the
//! job's seed and the resource, so a retried part is the same bytes. Error messages name where
//! (`Patient.birthDate[0]`), never the value: they are logged.

mod dates;
mod substitute;

use std::sync::OnceLock;

use aws_lc_rs::{cipher, hmac};
use base64::Engine as _;
use chrono::{Datelike, Duration, NaiveDate};
use regex::Regex;
use serde_json::Value;

use super::{
    Operation, Operations, ProcessingError,
    config::Perturbation,
    fhirpath::{self, Expr, Item},
    tree::{NodeId, Tree},
};
use crate::fhir::r4::RESOURCE_TYPES;

pub use dates::{DateShifter, time_prefix};
pub use substitute::substitute;

const AGE_THRESHOLD: i32 = 89;
const DATE_SHIFT_RANGE: i32 = 50;

/// A primitive's value as the text the tool works on.
pub fn text(tree: &Tree, id: NodeId) -> Option<String> {
    match tree.nodes[id].value.as_ref()? {
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(bool_text(*b).into()),
        other => Some(other.to_string()),
    }
}

/// A boolean as the tool's text of it.
pub fn bool_text(b: bool) -> &'static str {
    if b { "True" } else { "False" }
}

fn set(tree: &mut Tree, id: NodeId, value: Option<String>) {
    tree.nodes[id].value = value.map(Value::String);
}

/// `YYYY-MM-DD` (chrono's formatter costs more than the rest of a date shift).
fn iso_date(date: NaiveDate) -> String {
    let (year, month, day) = (date.year(), date.month(), date.day());
    if !(0..=9999).contains(&year) {
        return date.format("%Y-%m-%d").to_string();
    }
    let digit = |n: u32| char::from_digit(n % 10, 10).unwrap_or('0');
    let year = year.unsigned_abs();
    let mut out = String::with_capacity(32);
    out.extend([year / 1000, year / 100, year / 10, year].map(digit));
    for part in [month, day] {
        out.push('-');
        out.extend([part / 10, part].map(digit));
    }
    out
}

/// Every digit as `0` (times of day and zip codes keep their shape).
fn zero_digits(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    push_zeroed_digits(&mut out, s);
    out
}

/// `s` onto `out` with every ASCII digit a `0`.
fn push_zeroed_digits(out: &mut String, s: &str) {
    for c in s.chars() {
        out.push(if c.is_ascii_digit() { '0' } else { c });
    }
}

// ---------------------------------------------------------------------------------------
// Dates

/// A date, dateTime or instant split as the tool's regular expression splits it.
struct DateParts {
    year: i32,
    month: Option<u32>,
    day: Option<u32>,
    /// `T12:30:00.5+01:00`: the time and its zone, when both are there.
    time: Option<String>,
}

fn date_parts(value: &str, with_time: bool) -> Option<DateParts> {
    let two = |s: &str, lo: u32, hi: u32| -> Option<u32> {
        (s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
            .filter(|n| (lo..=hi).contains(n))
    };
    let year_text = value.get(..4)?;
    if !year_text.bytes().all(|b| b.is_ascii_digit()) || year_text == "0000" {
        return None;
    }
    let year = year_text.parse().ok()?;
    let mut parts = DateParts {
        year,
        month: None,
        day: None,
        time: None,
    };
    let rest = &value[4..];
    let Some(rest) = rest.strip_prefix('-') else {
        return Some(parts);
    };
    let Some(month) = rest.get(..2).and_then(|m| two(m, 1, 12)) else {
        return Some(parts);
    };
    parts.month = Some(month);
    let Some(rest) = rest[2..].strip_prefix('-') else {
        return Some(parts);
    };
    let Some(day) = rest.get(..2).and_then(|d| two(d, 1, 31)) else {
        return Some(parts);
    };
    parts.day = Some(day);
    let rest = &rest[2..];
    if with_time {
        parts.time = time_prefix(rest).map(str::to_string);
    }
    Some(parts)
}

/// Would a person born on this date be over 89 today (HIPAA Safe Harbor)?
fn over_age_threshold(parts: &DateParts) -> bool {
    let born = (parts.year, parts.month.unwrap_or(1), parts.day.unwrap_or(1));
    born <= dates::ninety_years_ago()
}

pub fn redact_date(tree: &mut Tree, id: NodeId, partial: bool, with_time: bool) -> Operations {
    let Some(value) = text(tree, id) else {
        return Operations::default();
    };
    let redacted = redacted_date(&value, partial, with_time);
    set(tree, id, redacted);
    Operations::of(Operation::Redact)
}

/// A redacted date: its year with `partial` (none for someone over 89), else nothing; with
/// `partial`, a value that is not a date stays as it is.
pub fn redacted_date(value: &str, partial: bool, with_time: bool) -> Option<String> {
    if !partial {
        return None;
    }
    match date_parts(value, with_time) {
        Some(parts) => (!over_age_threshold(&parts)).then(|| value[..4].to_string()),
        None => Some(value.to_string()),
    }
}

pub fn shift_date(
    tree: &mut Tree,
    id: NodeId,
    days: i64,
    partial: bool,
    with_time: bool,
) -> Result<Operations, ProcessingError> {
    let Some(value) = text(tree, id) else {
        return Ok(Operations::default());
    };
    let (shifted, done) =
        shifted_date(&value, days, partial, with_time).map_err(|NotCalendar| {
            ProcessingError(format!("{} is not a calendar date", tree.location(id)))
        })?;
    set(tree, id, shifted);
    Ok(done)
}

/// A date that names no day of the calendar (`2021-02-30`).
pub struct NotCalendar;

/// A date moved by `days`: its time of day zeroed, its zone kept. A date without a day, or
/// of someone over 89, is redacted instead.
pub fn shifted_date(
    value: &str,
    days: i64,
    partial: bool,
    with_time: bool,
) -> Result<(Option<String>, Operations), NotCalendar> {
    let parts = match date_parts(value, with_time) {
        Some(parts) if parts.day.is_some() && !over_age_threshold(&parts) => parts,
        _ => {
            let redacted = redacted_date(value, partial, with_time);
            return Ok((redacted, Operations::of(Operation::Redact)));
        }
    };
    let date =
        NaiveDate::from_ymd_opt(parts.year, parts.month.unwrap_or(1), parts.day.unwrap_or(1))
            .ok_or(NotCalendar)?;
    let mut new = iso_date(date + Duration::days(days));
    // The time of day goes (every digit of it becomes 0); the zone stays.
    if let Some(time) = parts.time {
        let clock_end = time
            .find(['Z', '+'])
            .or_else(|| time[1..].find('-').map(|i| i + 1));
        let (clock, zone) = time.split_at(clock_end.unwrap_or(time.len()));
        new.reserve(time.len());
        push_zeroed_digits(&mut new, clock);
        new.push_str(zone);
    }
    Ok((Some(new), Operations::of(Operation::Perturb)))
}

pub fn redact_age(
    tree: &mut Tree,
    id: NodeId,
    partial: bool,
) -> Result<Operations, ProcessingError> {
    let Some(value) = text(tree, id) else {
        return Ok(Operations::default());
    };
    let redacted = redacted_age(&value, partial).map_err(|NotWhole| {
        ProcessingError(format!(
            "the age {} is not a whole number",
            tree.location(id)
        ))
    })?;
    set(tree, id, redacted);
    Ok(Operations::of(Operation::Redact))
}

/// An age that is not a whole number of years.
pub struct NotWhole;

/// A redacted age: with `partial`, ages up to 89 stay.
pub fn redacted_age(value: &str, partial: bool) -> Result<Option<String>, NotWhole> {
    if !partial {
        return Ok(None);
    }
    let age: i64 = value.parse().map_err(|_| NotWhole)?;
    Ok((age <= i64::from(AGE_THRESHOLD)).then(|| value.to_string()))
}

pub fn redact_postal_code(
    tree: &mut Tree,
    id: NodeId,
    partial: bool,
    restricted: &[String],
) -> Operations {
    let Some(value) = text(tree, id) else {
        return Operations::default();
    };
    let (redacted, done) = redacted_postal_code(&value, partial, restricted);
    set(tree, id, redacted);
    done
}

/// A redacted zip code: with `partial`, its first 3 digits stay (none for a restricted area).
pub fn redacted_postal_code(
    value: &str,
    partial: bool,
    restricted: &[String],
) -> (Option<String>, Operations) {
    if !partial {
        return (None, Operations::of(Operation::Redact));
    }
    let redacted = if restricted.iter().any(|r| value.starts_with(r.as_str())) {
        zero_digits(value)
    } else if value.chars().count() >= 3 {
        let split = value.char_indices().nth(3).map_or(value.len(), |(i, _)| i);
        format!("{}{}", &value[..split], zero_digits(&value[split..]))
    } else {
        value.to_string()
    };
    (Some(redacted), Operations::of(Operation::Abstract))
}

// ---------------------------------------------------------------------------------------
// Hashing and encryption

/// HMAC-SHA256 of `input` in lowercase hex.
pub fn hmac_hex(key: &hmac::Key, input: &str) -> String {
    hex(hmac::sign(key, input.as_bytes()).as_ref())
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

/// `hash(value, remember)`: see `hashed`.
pub fn crypto_hash(tree: &mut Tree, id: NodeId, hash: impl Fn(&str, bool) -> String) -> Operations {
    let Some(value) = text(tree, id) else {
        return Operations::default();
    };
    let is_reference = tree.nodes[id].name == "reference"
        && tree.nodes[id]
            .parent
            .is_some_and(|p| tree.nodes[p].ty == "Reference");
    set(tree, id, Some(hashed(&value, is_reference, hash)));
    Operations::of(Operation::CryptoHash)
}

/// The hash of a value; of a literal reference (`Reference.reference`), only its id's.
/// `hash(value, remember)`: a reference's id is worth remembering (others name it too).
pub fn hashed(value: &str, is_reference: bool, hash: impl Fn(&str, bool) -> String) -> String {
    if is_reference {
        transform_reference_id(value, |id| hash(id, true))
    } else {
        hash(value, false)
    }
}

/// Applies `transform` to the id part of a literal reference (`Patient/123`,
/// `http://x/fhir/Patient/123/_history/2`, `#contained`, `urn:uuid:…`, `urn:oid:…`); anything
/// else is transformed whole.
pub fn transform_reference_id(reference: &str, transform: impl Fn(&str) -> String) -> String {
    if let Some(internal) = reference.strip_prefix('#') {
        return format!("#{}", transform(internal));
    }
    // Most references are `Type/id`: what the first pattern below makes of them, without it.
    if let Some((resource_type, id)) = reference.split_once('/')
        && crate::fhir::is_resource_type(resource_type)
        && (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        let id = transform(id);
        let mut out = String::with_capacity(resource_type.len() + 1 + id.len());
        out.push_str(resource_type);
        out.push('/');
        out.push_str(&id);
        return out;
    }
    static PATTERNS: OnceLock<Vec<Regex>> = OnceLock::new();
    let patterns = PATTERNS.get_or_init(|| {
        [
            format!(
                r"^(?<prefix>((http|https)://([A-Za-z0-9\\/\.:%\$])*)?({})/)(?<id>[A-Za-z0-9\-\.]{{1,64}})(?<suffix>/_history/[A-Za-z0-9\-\.]{{1,64}})?$",
                RESOURCE_TYPES.join("|")
            ),
            r"^(?<prefix>urn:oid:)(?<id>[0-2](\.(0|[1-9][0-9]*))+)(?<suffix>)$".to_string(),
            r"^(?<prefix>urn:uuid:)(?<id>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})(?<suffix>)$".to_string(),
        ]
        .iter()
        .map(|p| Regex::new(p).expect("a valid pattern"))
        .collect()
    });
    for pattern in patterns {
        if let Some(m) = pattern.captures(reference) {
            let group = |name| m.name(name).map_or("", |g| g.as_str());
            return format!(
                "{}{}{}",
                group("prefix"),
                transform(group("id")),
                group("suffix")
            );
        }
    }
    transform(reference)
}

/// AES-CBC with PKCS#7 padding; the result is base64 of the IV followed by the ciphertext.
/// `iv` draws the IV, only for a node with a value.
pub fn encrypt(
    tree: &mut Tree,
    id: NodeId,
    key: &[u8],
    iv: impl FnOnce(&Tree) -> [u8; 16],
) -> Result<Operations, ProcessingError> {
    let Some(value) = text(tree, id) else {
        return Ok(Operations::default());
    };
    let iv = iv(tree);
    let algorithm = match key.len() {
        16 => &cipher::AES_128,
        24 => &cipher::AES_192,
        _ => &cipher::AES_256,
    };
    let failed = |_| ProcessingError("the encryption failed".into());
    let key = cipher::UnboundCipherKey::new(algorithm, key).map_err(failed)?;
    let encrypting = cipher::PaddedBlockEncryptingKey::cbc_pkcs7(key).map_err(failed)?;
    let mut data = value.into_bytes();
    encrypting
        .less_safe_encrypt(&mut data, cipher::EncryptionContext::Iv128(iv.into()))
        .map_err(failed)?;
    let mut out = iv.to_vec();
    out.extend_from_slice(&data);
    set(
        tree,
        id,
        Some(base64::engine::general_purpose::STANDARD.encode(out)),
    );
    Ok(Operations::of(Operation::Encrypt))
}

// ---------------------------------------------------------------------------------------
// Perturbation

pub const QUANTITY_TYPES: &[&str] = &[
    "Quantity",
    "Age",
    "Count",
    "Duration",
    "Distance",
    "Money",
    "MoneyQuantity",
    "SimpleQuantity",
];

/// Adds noise drawn uniformly from [-span/2, span/2] (times the value when proportional),
/// rounded to `round_to` places (0 for integers), to a number or a quantity's value.
/// `uniform` draws a number in [0, 1), only when there is a value to perturb.
pub fn perturb(
    tree: &mut Tree,
    id: NodeId,
    visited: &mut Vec<bool>,
    how: &Perturbation,
    uniform: impl FnOnce(&Tree) -> f64,
) -> Result<Operations, ProcessingError> {
    let ty = tree.nodes[id].ty;
    let value_node = if matches!(ty, "decimal" | "integer" | "positiveInt" | "unsignedInt") {
        Some(id)
    } else if QUANTITY_TYPES.contains(&ty) {
        tree.children(id).find(|&c| tree.nodes[c].name == "value")
    } else {
        None
    };
    let Some(value_node) = value_node.filter(|&v| tree.nodes[v].value.is_some()) else {
        return Ok(Operations::default());
    };
    if visited.get(value_node).copied().unwrap_or(false) {
        return Ok(Operations::default());
    }
    let value_ty = tree.nodes[value_node].ty;
    let text = text(tree, value_node).unwrap_or_default();
    let formatted = perturbed(value_ty, text, how, || uniform(tree)).map_err(|NotNumber| {
        ProcessingError(format!(
            "{} is not a number to perturb",
            tree.location(value_node)
        ))
    })?;
    set(tree, value_node, Some(formatted));
    mark_subtree(tree, id, visited);
    Ok(Operations::of(Operation::Perturb))
}

/// A value to perturb that is not a number.
pub struct NotNumber;

/// `text` (a number of type `value_ty`) with noise: `uniform` draws in [0, 1).
pub fn perturbed(
    value_ty: &str,
    text: String,
    how: &Perturbation,
    uniform: impl FnOnce() -> f64,
) -> Result<String, NotNumber> {
    let origin: f64 = text.parse().map_err(|_| NotNumber)?;
    let integer = matches!(value_ty, "integer" | "positiveInt" | "unsignedInt");
    let places = if integer { 0 } else { how.round_to };
    let span = if how.proportional {
        origin * how.span
    } else {
        how.span
    };
    let noise = -span / 2.0 + uniform() * span;
    let scale = 10f64.powi(places as i32);
    let mut perturbed = ((origin + noise) * scale).round_ties_even() / scale;
    if value_ty == "positiveInt" && perturbed <= 0.0 {
        perturbed = 1.0;
    }
    if value_ty == "unsignedInt" && perturbed < 0.0 {
        perturbed = 0.0;
    }
    Ok(if span == 0.0 {
        text // no noise: the value as it was
    } else {
        format!("{perturbed:.prec$}", prec = places as usize)
    })
}

/// Marks a node as reached by a rule (`visited` grows with nodes added since it was made).
pub fn mark(tree: &Tree, id: NodeId, visited: &mut Vec<bool>) {
    if visited.len() < tree.nodes.len() {
        visited.resize(tree.nodes.len(), false);
    }
    visited[id] = true;
}

pub fn mark_subtree(tree: &Tree, id: NodeId, visited: &mut Vec<bool>) {
    mark(tree, id, visited);
    let children = tree.children_now(id);
    for child in children {
        mark_subtree(tree, child, visited);
    }
}

// ---------------------------------------------------------------------------------------
// Generalization

/// The first case whose condition holds on the value sets it to the case's value; with none,
/// the value goes (`otherValues: redact`) or stays.
pub fn generalize(
    tree: &mut Tree,
    id: NodeId,
    cases: &[(Expr, Expr)],
    redact_others: bool,
) -> Result<Operations, ProcessingError> {
    if !tree.is_primitive(id) {
        return Err(ProcessingError(format!(
            "generalize applies to primitive values, not to {} ({})",
            tree.nodes[id].ty,
            tree.location(id)
        )));
    }
    if tree.nodes[id].value.is_none() {
        return Ok(Operations::default());
    }
    let focus = [Item::Node(id)];
    for (condition, value) in cases {
        let failed = |e: fhirpath::EvalError| ProcessingError(format!("generalize failed: {e}"));
        let holds = fhirpath::evaluate(tree, condition, &focus).map_err(failed)?;
        let holds = matches!(holds.as_slice(), [item] if matches!(fhirpath::value_of(tree, item), Some(Item::Bool(true))));
        if holds {
            let result = fhirpath::evaluate(tree, value, &focus).map_err(failed)?;
            let new = match result.as_slice() {
                [item] => fhirpath::value_of(tree, item).map(|v| fhirpath::text_of(&v)),
                _ => None,
            };
            set(tree, id, new);
            return Ok(Operations::of(Operation::Generalize));
        }
    }
    if redact_others {
        set(tree, id, None);
    }
    Ok(Operations::of(Operation::Generalize))
}
