//! `_typeFilter`: FHIR search queries (`Observation?code=…&date=ge2024`) that narrow the
//! resources of a type. Entries for one type are ORed; the parameters of one query are ANDed;
//! the comma-separated values of one parameter are ORed.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{
    ParamError::{self, Invalid, NotSupported},
    is_resource_type,
    search_param::{self, SearchParamDef, SearchParamType},
    search_value::{
        DateValue, NumberValue, Prefix, ReferenceValue, StringMatch, Token, UriMatch, fold,
        string_matches, uri_matches,
    },
};

/// Result parameters a bulk export cannot honour inside a filter.
const RESULT_PARAMETERS: &[&str] = &[
    "_include",
    "_revinclude",
    "_sort",
    "_count",
    "_elements",
    "_summary",
    "_total",
    "_contained",
    "_containedType",
];

/// Splits one `_typeFilter` value into its entries. Only a comma that starts a new
/// `Type?` entry separates; any other comma belongs to the query (`code=a,b`). One pass: after
/// each comma only the letters up to the next non-letter are looked at.
pub fn split_entries(value: &str) -> Vec<&str> {
    let value = value.trim().trim_end_matches(',');
    let bytes = value.as_bytes();
    let mut entries = Vec::new();
    let mut start = 0;
    for (i, _) in value.match_indices(',') {
        let rest = &bytes[i + 1..];
        let spaces = rest.iter().take_while(|b| **b == b' ').count();
        let name = rest[spaces..]
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric())
            .count();
        let starts_entry = rest.get(spaces + name) == Some(&b'?')
            && is_resource_type(&value[i + 1 + spaces..i + 1 + spaces + name]);
        if starts_entry {
            entries.push(value[start..i].trim());
            start = i + 1;
        }
    }
    entries.push(value[start..].trim());
    entries.retain(|e| !e.is_empty());
    entries
}

/// The type a `Type?query` entry filters (empty if it names none).
pub fn entry_type(entry: &str) -> &str {
    entry.split_once('?').map_or("", |(t, _)| t)
}

/// One `Type?query` entry.
#[derive(Debug, Clone)]
pub struct Query {
    pub resource_type: String,
    criteria: Vec<Criterion>,
}

#[derive(Debug, Clone)]
struct Criterion {
    param: &'static SearchParamDef,
    test: Test,
}

#[derive(Debug, Clone)]
enum Test {
    Missing(bool),
    /// Any value matches.
    Any(Vec<Matcher>),
    /// `:not`: no value matches.
    None(Vec<Matcher>),
}

#[derive(Debug, Clone)]
enum Matcher {
    Token(Token),
    String(StringMatch, String),
    Reference(ReferenceValue),
    Date(DateValue),
    Number(NumberValue),
    Uri(UriMatch, String),
}

impl Query {
    /// Parses `Type?name[:modifier]=value&…`. `base_url` makes our own absolute references
    /// local; `now` is the instant `ap` dates measure from.
    pub fn parse(entry: &str, base_url: &str, now: DateTime<Utc>) -> Result<Query, ParamError> {
        let (resource_type, query) = entry.split_once('?').ok_or_else(|| {
            Invalid(format!(
                "_typeFilter '{entry}' is not of the form Type?query"
            ))
        })?;
        if !is_resource_type(resource_type) {
            return Err(Invalid(format!(
                "_typeFilter '{entry}': '{resource_type}' is not an R4 resource type"
            )));
        }
        let mut criteria = Vec::new();
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            // Decoded here a second time: `%00` in the query is a NUL only now.
            if name.chars().chain(value.chars()).any(char::is_control) {
                return Err(Invalid(format!(
                    "_typeFilter '{entry}': a search parameter holds a control character"
                )));
            }
            let criterion =
                Criterion::parse(resource_type, &name, &value, base_url, now).map_err(|why| {
                    match why {
                        Invalid(why) => Invalid(format!("_typeFilter '{entry}': {why}")),
                        NotSupported(why) => NotSupported(format!("_typeFilter '{entry}': {why}")),
                    }
                })?;
            criteria.push(criterion);
        }
        if criteria.is_empty() {
            return Err(Invalid(format!(
                "_typeFilter '{entry}' has no search parameters"
            )));
        }
        Ok(Query {
            resource_type: resource_type.to_string(),
            criteria,
        })
    }

    pub fn matches(&self, resource: &Value, base_url: &str) -> bool {
        self.criteria.iter().all(|c| c.matches(resource, base_url))
    }

    /// What SQL can select on before the resource is read: `_id` values and `_lastUpdated`
    /// bounds. A superset of the matches; the query still decides.
    pub fn pushdown(&self) -> Pushdown {
        let mut pushdown = Pushdown::default();
        for criterion in &self.criteria {
            let Test::Any(matchers) = &criterion.test else {
                continue;
            };
            match criterion.param.code {
                "_id" if pushdown.ids.is_none() => {
                    let ids: Option<Vec<String>> = matchers
                        .iter()
                        .map(|m| match m {
                            Matcher::Token(Token {
                                system: None,
                                code: Some(id),
                            }) => Some(id.clone()),
                            _ => None,
                        })
                        .collect();
                    pushdown.ids = ids;
                }
                "_lastUpdated" if matchers.len() == 1 => {
                    if let Matcher::Date(d) = &matchers[0] {
                        pushdown.narrow(d);
                    }
                }
                _ => {}
            }
        }
        pushdown
    }
}

/// SQL-side narrowing of a filtered type.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pushdown {
    pub ids: Option<Vec<String>>,
    /// `last_updated >= from`.
    pub updated_from: Option<DateTime<Utc>>,
    /// `last_updated < before`.
    pub updated_before: Option<DateTime<Utc>>,
}

impl Pushdown {
    /// Narrowing that holds for rows matching either side: a bound only where both have one.
    fn union(self, other: Pushdown) -> Pushdown {
        let both = |a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>, pick: fn(_, _) -> _| {
            Some(pick(a?, b?))
        };
        Pushdown {
            ids: match (self.ids, other.ids) {
                (Some(mut a), Some(b)) => {
                    a.extend(b);
                    Some(a)
                }
                _ => None,
            },
            updated_from: both(self.updated_from, other.updated_from, DateTime::min),
            updated_before: both(self.updated_before, other.updated_before, DateTime::max),
        }
    }

    fn narrow(&mut self, d: &DateValue) {
        let (from, before) = match d.prefix {
            Prefix::Eq => (Some(d.start), Some(d.end)),
            Prefix::Gt | Prefix::Sa => (Some(d.end), None),
            Prefix::Ge => (Some(d.start), None),
            Prefix::Lt | Prefix::Eb => (None, Some(d.start)),
            Prefix::Le => (None, Some(d.end)),
            Prefix::Ne | Prefix::Ap => (None, None),
        };
        if let Some(from) = from {
            self.updated_from = Some(self.updated_from.map_or(from, |f| f.max(from)));
        }
        if let Some(before) = before {
            self.updated_before = Some(self.updated_before.map_or(before, |b| b.min(before)));
        }
    }
}

impl Criterion {
    fn parse(
        resource_type: &str,
        name: &str,
        value: &str,
        base_url: &str,
        now: DateTime<Utc>,
    ) -> Result<Self, ParamError> {
        let (code, modifier) = match name.split_once(':') {
            Some((code, modifier)) => (code, Some(modifier)),
            None => (name, None),
        };
        if RESULT_PARAMETERS.contains(&code) {
            return Err(NotSupported(format!(
                "{code} is not supported in a _typeFilter"
            )));
        }
        if code.contains('.') || code == "_has" {
            return Err(NotSupported(format!(
                "chained parameter '{name}' is not supported"
            )));
        }
        let param = search_param::find(resource_type, code).ok_or_else(|| {
            Invalid(format!(
                "'{code}' is not a search parameter of {resource_type}"
            ))
        })?;
        if !param.is_supported() {
            return Err(NotSupported(format!(
                "search parameter '{code}' ({}) is not supported",
                param.kind.as_str()
            )));
        }
        if value.is_empty() {
            return Err(Invalid(format!("parameter '{name}' has no value")));
        }
        let test = Test::parse(param, name, modifier, value, base_url, now)?;
        Ok(Criterion { param, test })
    }

    fn matches(&self, resource: &Value, base_url: &str) -> bool {
        let found = || {
            self.param
                .paths
                .iter()
                .flat_map(|path| search_param::values(resource, path))
        };
        let any = |matchers: &[Matcher]| {
            found().any(|value| matchers.iter().any(|m| m.matches(value, base_url)))
        };
        match &self.test {
            Test::Missing(missing) => found().next().is_none() == *missing,
            Test::Any(matchers) => any(matchers),
            Test::None(matchers) => !any(matchers),
        }
    }
}

impl Test {
    /// How a parameter's value is tested, by its modifier and kind.
    fn parse(
        param: &SearchParamDef,
        name: &str,
        modifier: Option<&str>,
        value: &str,
        base_url: &str,
        now: DateTime<Utc>,
    ) -> Result<Test, ParamError> {
        let code = param.code;
        let unsupported = || {
            NotSupported(format!(
                "modifier ':{}' is not supported for {} parameter '{code}'",
                modifier.unwrap_or_default(),
                param.kind.as_str()
            ))
        };
        let values = || value.split(',');
        let kind = param.kind;
        Ok(match modifier {
            Some("missing") => match value {
                "true" => Test::Missing(true),
                "false" => Test::Missing(false),
                _ => {
                    return Err(Invalid(format!(
                        "'{name}' takes true or false, not '{value}'"
                    )));
                }
            },
            Some("not") if kind == SearchParamType::Token => Test::None(
                values()
                    .map(token)
                    .collect::<Result<_, _>>()
                    .map_err(Invalid)?,
            ),
            None | Some("exact" | "contains") if kind == SearchParamType::String => {
                let how = match modifier {
                    Some("exact") => StringMatch::Exact,
                    Some("contains") => StringMatch::Contains,
                    _ => StringMatch::StartsWith,
                };
                let text = |v: &str| match how {
                    StringMatch::Exact => v.to_string(),
                    _ => fold(v),
                };
                Test::Any(values().map(|v| Matcher::String(how, text(v))).collect())
            }
            None | Some("below" | "above") if kind == SearchParamType::Uri => {
                let how = match modifier {
                    Some("below") => UriMatch::Below,
                    Some("above") => UriMatch::Above,
                    _ => UriMatch::Exact,
                };
                Test::Any(values().map(|v| Matcher::Uri(how, v.to_string())).collect())
            }
            Some(t) if kind == SearchParamType::Reference && is_resource_type(t) => {
                Test::Any(reference_matchers(value, base_url, Some(t)).map_err(Invalid)?)
            }
            None => match plain_matchers(kind, value, base_url, now).map_err(Invalid)? {
                Some(matchers) => Test::Any(matchers),
                None => return Err(unsupported()),
            },
            Some(_) => return Err(unsupported()),
        })
    }
}

/// The matchers of a parameter without a modifier; `None`: its kind is not supported.
fn plain_matchers(
    kind: SearchParamType,
    value: &str,
    base_url: &str,
    now: DateTime<Utc>,
) -> Result<Option<Vec<Matcher>>, String> {
    let values = || value.split(',');
    Ok(Some(match kind {
        SearchParamType::Token => values().map(token).collect::<Result<_, _>>()?,
        SearchParamType::Reference => reference_matchers(value, base_url, None)?,
        SearchParamType::Date => values()
            .map(|v| DateValue::parse(v, now).map(Matcher::Date))
            .collect::<Result<_, _>>()?,
        SearchParamType::Number | SearchParamType::Quantity => values()
            .map(|v| NumberValue::parse(v, kind == SearchParamType::Quantity).map(Matcher::Number))
            .collect::<Result<_, _>>()?,
        _ => return Ok(None),
    }))
}

fn token(value: &str) -> Result<Matcher, String> {
    Token::parse(value).map(Matcher::Token)
}

fn reference_matchers(
    value: &str,
    base_url: &str,
    type_modifier: Option<&str>,
) -> Result<Vec<Matcher>, String> {
    value
        .split(',')
        .map(|v| ReferenceValue::parse(v, base_url, type_modifier).map(Matcher::Reference))
        .collect()
}

impl Matcher {
    fn matches(&self, value: &Value, base_url: &str) -> bool {
        match self {
            Matcher::Token(t) => t.matches(value),
            Matcher::String(how, wanted) => string_matches(*how, wanted, value),
            Matcher::Reference(r) => r.matches(value, base_url),
            Matcher::Date(d) => d.matches(value),
            Matcher::Number(n) => n.matches(value),
            Matcher::Uri(how, wanted) => uri_matches(*how, wanted, value),
        }
    }
}

/// The filters of one type: a resource passes when any query matches it.
#[derive(Debug, Clone)]
pub struct TypeFilter {
    queries: Vec<Query>,
    base_url: String,
}

impl TypeFilter {
    /// The filter `entries` (already validated at kick-off) put on `resource_type`; None when
    /// they leave it unfiltered. `now` is the job's clock for `ap` dates.
    pub fn for_type(
        entries: &[String],
        resource_type: &str,
        base_url: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<TypeFilter>, ParamError> {
        let mut queries = Vec::new();
        for entry in entries {
            if entry_type(entry) == resource_type {
                queries.push(Query::parse(entry, base_url, now)?);
            }
        }
        Ok((!queries.is_empty()).then(|| TypeFilter {
            queries,
            base_url: base_url.to_string(),
        }))
    }

    pub fn matches(&self, resource: &Value) -> bool {
        self.queries
            .iter()
            .any(|q| q.matches(resource, &self.base_url))
    }

    /// SQL narrowing: what covers every query (they are ORed).
    pub fn pushdown(&self) -> Pushdown {
        let mut each = self.queries.iter().map(Query::pushdown);
        let first = each.next().unwrap_or_default();
        each.fold(first, Pushdown::union)
    }
}

#[cfg(test)]
mod tests;
