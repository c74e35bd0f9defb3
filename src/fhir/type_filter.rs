//! `_typeFilter`: FHIR search queries (`Observation?code=…&date=ge2024`) that narrow the
//! resources of a type. Entries for one type are ORed; the parameters of one query are ANDed;
//! the comma-separated values of one parameter are ORed.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{
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
    pub fn parse(entry: &str, base_url: &str, now: DateTime<Utc>) -> Result<Query, String> {
        let (resource_type, query) = entry
            .split_once('?')
            .ok_or_else(|| format!("_typeFilter '{entry}' is not of the form Type?query"))?;
        if !is_resource_type(resource_type) {
            return Err(format!(
                "_typeFilter '{entry}': '{resource_type}' is not an R4 resource type"
            ));
        }
        let mut criteria = Vec::new();
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            // Decoded here a second time: `%00` in the query is a NUL only now.
            if name.chars().chain(value.chars()).any(char::is_control) {
                return Err(format!(
                    "_typeFilter '{entry}': a search parameter holds a control character"
                ));
            }
            let criterion = Criterion::parse(resource_type, &name, &value, base_url, now)
                .map_err(|why| format!("_typeFilter '{entry}': {why}"))?;
            criteria.push(criterion);
        }
        if criteria.is_empty() {
            return Err(format!("_typeFilter '{entry}' has no search parameters"));
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
    ) -> Result<Self, String> {
        let (code, modifier) = match name.split_once(':') {
            Some((code, modifier)) => (code, Some(modifier)),
            None => (name, None),
        };
        if RESULT_PARAMETERS.contains(&code) {
            return Err(format!("{code} is not supported in a _typeFilter"));
        }
        if code.contains('.') || code == "_has" {
            return Err(format!("chained parameter '{name}' is not supported"));
        }
        let param = search_param::find(resource_type, code)
            .ok_or_else(|| format!("'{code}' is not a search parameter of {resource_type}"))?;
        if !param.is_supported() {
            return Err(format!(
                "search parameter '{code}' ({}) is not supported",
                param.kind.as_str()
            ));
        }
        if value.is_empty() {
            return Err(format!("parameter '{name}' has no value"));
        }
        let unsupported = || {
            format!(
                "modifier ':{}' is not supported for {} parameter '{code}'",
                modifier.unwrap_or_default(),
                param.kind.as_str()
            )
        };
        let values = || value.split(',');
        let kind = param.kind;
        let test = match modifier {
            Some("missing") => match value {
                "true" => Test::Missing(true),
                "false" => Test::Missing(false),
                _ => return Err(format!("'{name}' takes true or false, not '{value}'")),
            },
            Some("not") if kind == SearchParamType::Token => {
                Test::None(values().map(token).collect::<Result<_, _>>()?)
            }
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
                Test::Any(reference_matchers(value, base_url, Some(t))?)
            }
            None => Test::Any(match kind {
                SearchParamType::Token => values().map(token).collect::<Result<_, _>>()?,
                SearchParamType::Reference => reference_matchers(value, base_url, None)?,
                SearchParamType::Date => values()
                    .map(|v| DateValue::parse(v, now).map(Matcher::Date))
                    .collect::<Result<_, _>>()?,
                SearchParamType::Number | SearchParamType::Quantity => values()
                    .map(|v| {
                        NumberValue::parse(v, kind == SearchParamType::Quantity)
                            .map(Matcher::Number)
                    })
                    .collect::<Result<_, _>>()?,
                _ => return Err(unsupported()),
            }),
            Some(_) => return Err(unsupported()),
        };
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
    ) -> Result<Option<TypeFilter>, String> {
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
mod tests {
    use super::*;
    use serde_json::json;

    const BASE: &str = "http://fhir.example";

    fn q(entry: &str) -> Query {
        Query::parse(entry, BASE, Utc::now()).unwrap()
    }

    fn err(entry: &str) -> String {
        Query::parse(entry, BASE, Utc::now()).unwrap_err()
    }

    #[test]
    fn entries_split_only_between_types() {
        assert_eq!(
            split_entries("Observation?code=a,b,MedicationRequest?status=active"),
            vec!["Observation?code=a,b", "MedicationRequest?status=active"]
        );
        assert_eq!(
            split_entries("Observation?code=http://loinc.org|1,http://loinc.org|2"),
            vec!["Observation?code=http://loinc.org|1,http://loinc.org|2"]
        );
        assert_eq!(
            split_entries("Patient?active=true,"),
            vec!["Patient?active=true"]
        );
    }

    #[test]
    fn values_are_ored_and_parameters_anded() {
        let obs = json!({"resourceType": "Observation", "id": "o1", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "2"}]},
            "effectiveDateTime": "2024-05-01T10:00:00Z"});
        assert!(q("Observation?code=1,2").matches(&obs, BASE));
        assert!(q("Observation?code=1%2C2").matches(&obs, BASE));
        assert!(!q("Observation?code=1").matches(&obs, BASE));
        assert!(q("Observation?code=2&status=final").matches(&obs, BASE));
        assert!(!q("Observation?code=2&status=amended").matches(&obs, BASE));
        assert!(q("Observation?date=ge2024-01-01&date=lt2025").matches(&obs, BASE));
        assert!(!q("Observation?date=ge2024-06").matches(&obs, BASE));
        assert!(q("Observation?_id=o1,o2").matches(&obs, BASE));
    }

    #[test]
    fn missing_and_not() {
        let obs = json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"code": "2"}]}});
        assert!(q("Observation?value-quantity:missing=true").matches(&obs, BASE));
        assert!(!q("Observation?value-quantity:missing=false").matches(&obs, BASE));
        assert!(q("Observation?code:missing=false").matches(&obs, BASE));
        assert!(q("Observation?status:not=amended").matches(&obs, BASE));
        assert!(!q("Observation?status:not=final,amended").matches(&obs, BASE));
        assert!(q("Observation?category:not=laboratory").matches(&obs, BASE));
    }

    #[test]
    fn strings_references_and_quantities() {
        let patient = json!({"resourceType": "Patient", "name": [{"family": "Núñez", "given": ["Ana"]}],
            "gender": "female", "generalPractitioner": [{"reference": "Practitioner/d1"}]});
        assert!(q("Patient?name=nunez").matches(&patient, BASE));
        assert!(q("Patient?family:exact=Núñez").matches(&patient, BASE));
        assert!(!q("Patient?family:exact=nunez").matches(&patient, BASE));
        assert!(q("Patient?name:contains=UÑ").matches(&patient, BASE));
        assert!(q("Patient?general-practitioner=Practitioner/d1").matches(&patient, BASE));
        assert!(q("Patient?general-practitioner:Practitioner=d1").matches(&patient, BASE));
        assert!(
            q("Patient?general-practitioner=http://fhir.example/Practitioner/d1")
                .matches(&patient, BASE)
        );
        let obs = json!({"resourceType": "Observation", "subject": {"reference": "Patient/p"},
            "valueQuantity": {"value": 7.2, "system": "http://unitsofmeasure.org", "code": "mmol/L"}});
        assert!(
            q("Observation?value-quantity=gt7|http://unitsofmeasure.org|mmol/L")
                .matches(&obs, BASE)
        );
        assert!(!q("Observation?value-quantity=lt7").matches(&obs, BASE));
        assert!(q("Observation?patient=p").matches(&obs, BASE));
        assert!(q("Observation?subject:Patient=p").matches(&obs, BASE));
    }

    #[test]
    fn every_unsupported_form_is_named() {
        assert!(err("Observation?nope=1").contains("'nope' is not a search parameter"));
        assert!(err("Observation?subject.name=x").contains("chained"));
        assert!(err("Observation?code-value-quantity=x").contains("composite"));
        assert!(err("Observation?_include=Observation:subject").contains("_include"));
        assert!(err("Observation?_sort=date").contains("_sort"));
        assert!(err("Observation?code:below=x").contains(":below"));
        assert!(err("Observation?code:text=x").contains(":text"));
        assert!(err("Observation?date=soon").contains("not a date"));
        assert!(err("Observation?value-quantity=abc").contains("not a number"));
        assert!(err("Observation?code:missing=maybe").contains("true or false"));
        assert!(err("Observation?code=").contains("no value"));
        assert!(err("Observation").contains("Type?query"));
        assert!(err("Nope?x=1").contains("not an R4 resource type"));
        assert!(err("Observation?").contains("no search parameters"));
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        let resource = json!({"resourceType": "Observation", "effectiveDateTime": "2020é",
            "valueQuantity": {"value": 1e300}, "code": {"coding": "not a list"}});
        for entry in [
            "Observation?code=%FF%FE",
            "Observation?date=gé2020",
            "Observation?date=ge",
            "Observation?value-quantity=1e99999999999",
            "Observation?value-quantity=1e400",
            "Observation?value-quantity=ap",
            "Observation?value-quantity=5|x",
            "Observation?subject=Patient/",
            "Observation?subject=/",
            "Observation?code=|",
            "Observation?:missing=true",
            "Observation?=x",
            "Observation?code:=x",
            "?code=x",
        ] {
            if let Ok(query) = Query::parse(entry, BASE, Utc::now()) {
                query.matches(&resource, BASE); // evaluates without panicking
            }
        }
        assert!(q("Observation?date=ge2020").matches(&json!({"effectiveDateTime": "2021"}), BASE));
    }

    #[test]
    fn pushdown_of_id_and_last_updated() {
        let p =
            q("Observation?_id=a,b&_lastUpdated=ge2024-01-01&_lastUpdated=lt2024-02").pushdown();
        assert_eq!(p.ids, Some(vec!["a".into(), "b".into()]));
        assert_eq!(
            p.updated_from,
            Some(crate::fhir::instant::parse("2024-01-01T00:00:00Z").unwrap())
        );
        assert_eq!(
            p.updated_before,
            Some(crate::fhir::instant::parse("2024-02-01T00:00:00Z").unwrap())
        );
        assert_eq!(q("Observation?_id:not=a").pushdown(), Pushdown::default());
        // ORed queries narrow to what covers them all.
        let filter = |entries: &[&str]| {
            let entries: Vec<String> = entries.iter().map(|e| e.to_string()).collect();
            TypeFilter::for_type(&entries, "Observation", BASE, Utc::now())
                .unwrap()
                .unwrap()
        };
        let two = filter(&["Observation?_id=a", "Observation?_id=b&status=final"]);
        assert_eq!(two.pushdown().ids, Some(vec!["a".into(), "b".into()]));
        let open = filter(&["Observation?_id=a", "Observation?status=final"]);
        assert_eq!(open.pushdown(), Pushdown::default());
        let dates = filter(&[
            "Observation?_lastUpdated=ge2024-01-01&_lastUpdated=lt2024-02",
            "Observation?_lastUpdated=ge2023-06-01",
        ]);
        let p = dates.pushdown();
        assert_eq!(
            p.updated_from,
            Some(crate::fhir::instant::parse("2023-06-01T00:00:00Z").unwrap())
        );
        assert_eq!(p.updated_before, None);
    }
}
