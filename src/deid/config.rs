//! An anonymization configuration in the format of FHIR Tools for Anonymization
//! (`fhirVersion`, `processingErrors`, `fhirPathRules`, `parameters`), read and validated
//! once at kick-off. Every problem is an `Invalid` naming the rule or setting, which the API
//! answers with 400.

use serde_json::{Map, Value};

use super::fhirpath::{self, Expr};
use crate::fhir::is_resource_type;

#[derive(Debug)]
pub struct Config {
    pub skip_processing_errors: bool,
    pub rules: Vec<Rule>,
    pub params: Params,
}

#[derive(Debug)]
pub struct Rule {
    pub path: String,
    /// The resource type the path starts with (`Patient.name`); `None` for every resource
    /// (no type, `Resource`, `DomainResource`).
    pub resource_type: Option<String>,
    pub target: Target,
    pub method: Method,
}

/// Which nodes of a resource a rule picks.
#[derive(Debug)]
pub enum Target {
    /// The resource itself (`"path": "Patient"`).
    Resource,
    /// `nodesByType('T')` / `nodesByName('n')`, then maybe one child name: the descendants
    /// of the resource with that type or name, nested resources included but not their
    /// insides.
    Lookup {
        by_type: bool,
        key: String,
        child: Option<String>,
    },
    Expr(Expr),
}

#[derive(Debug)]
pub enum Method {
    Keep,
    Redact,
    DateShift,
    CryptoHash,
    Encrypt,
    Substitute(Value),
    Perturb(Perturbation),
    Generalize {
        cases: Vec<(Expr, Expr)>,
        redact_others: bool,
    },
}

/// How `perturb` adds noise.
#[derive(Debug)]
pub struct Perturbation {
    pub span: f64,
    /// The span is a share of the value (`rangeType: proportional`), not a fixed amount.
    pub proportional: bool,
    pub round_to: u32,
}

#[derive(Debug, Default)]
pub struct Params {
    pub date_shift_key: String,
    pub date_shift_scope: DateShiftScope,
    pub date_shift_fixed_offset: Option<i64>,
    pub crypto_hash_key: String,
    pub encrypt_key: String,
    pub partial_ages: bool,
    pub partial_dates: bool,
    pub partial_zip_codes: bool,
    pub restricted_zip_codes: Vec<String>,
    /// `toolCompatibleOutput`: write what FHIR Tools for Anonymization writes, byte for byte,
    /// even where that is not valid R4 (an emptied required element dropped, an Extension
    /// left without its `url`). Off: the output stays valid R4.
    pub tool_compatible_output: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub enum DateShiftScope {
    #[default]
    Resource,
    File,
    Folder,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid<T>(message: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid(message.into()))
}

impl Config {
    pub fn parse(text: &str) -> Result<Config, Invalid> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Invalid(format!("the configuration is not valid JSON: {e}")))?;
        let Value::Object(root) = value else {
            return invalid("the configuration must be a JSON object");
        };
        match root.get("fhirVersion") {
            None | Some(Value::Null) => {}
            Some(Value::String(v)) if v.is_empty() || v.eq_ignore_ascii_case("R4") => {}
            Some(other) => {
                return invalid(format!("fhirVersion {other} is not supported; expected R4"));
            }
        }
        let skip_processing_errors = either(
            root.get("processingErrors"),
            "processingErrors",
            ("raise", "skip"),
        )?
        .unwrap_or(false);
        let Some(Value::Array(rules)) = root.get("fhirPathRules") else {
            return invalid("the configuration has no fhirPathRules array");
        };
        let rules = rules
            .iter()
            .enumerate()
            .map(|(i, rule)| Rule::parse(i, rule))
            .collect::<Result<Vec<_>, _>>()?;
        let params = match root.get("parameters") {
            None | Some(Value::Null) => Params::default(),
            Some(Value::Object(p)) => Params::parse(p)?,
            Some(_) => return invalid("parameters must be a JSON object"),
        };
        Ok(Config {
            skip_processing_errors,
            rules,
            params,
        })
    }
}

impl Rule {
    fn parse(index: usize, rule: &Value) -> Result<Rule, Invalid> {
        let Value::Object(rule) = rule else {
            return invalid(format!("fhirPathRules[{index}] must be a JSON object"));
        };
        let (Some(Value::String(path)), Some(Value::String(method))) =
            (rule.get("path"), rule.get("method"))
        else {
            return invalid(format!(
                "fhirPathRules[{index}] needs a path and a method (strings)"
            ));
        };
        let at = format!("the rule {{\"path\": {path:?}, \"method\": {method:?}}}");
        let method = Method::parse(&method.to_ascii_lowercase(), rule)
            .map_err(|Invalid(why)| Invalid(format!("{at}: {why}")))?;
        let (resource_type, target) =
            compile_path(path).map_err(|why| Invalid(format!("{at}: {why}")))?;
        Ok(Rule {
            path: path.clone(),
            resource_type,
            target,
            method,
        })
    }

    pub fn applies_to(&self, resource_type: &str) -> bool {
        self.resource_type
            .as_deref()
            .is_none_or(|t| t == resource_type)
    }
}

/// Splits `Patient.address.state` into its resource type and the expression evaluated on
/// each resource of that type (`address.state`), as the tool does.
fn compile_path(path: &str) -> Result<(Option<String>, Target), String> {
    let prefix_len = path
        .char_indices()
        .take_while(|&(i, c)| {
            if i == 0 {
                c.is_ascii_uppercase()
            } else {
                c.is_ascii_alphabetic()
            }
        })
        .count();
    let prefix = &path[..prefix_len];
    let rest = path[prefix_len..]
        .strip_prefix('.')
        .unwrap_or(&path[prefix_len..]);
    if !prefix.is_empty()
        && !is_resource_type(prefix)
        && prefix != "Resource"
        && prefix != "DomainResource"
    {
        return Err(format!("'{prefix}' is not an R4 resource type"));
    }
    let resource_type = match prefix {
        "" | "Resource" | "DomainResource" => None,
        t => Some(t.to_string()),
    };
    if path == prefix {
        fhirpath::parse(path)?; // still a valid expression
        return Ok((resource_type, Target::Resource));
    }
    if let Some(lookup) = lookup(path) {
        fhirpath::parse(path)?; // checks the type name
        return Ok((resource_type, lookup));
    }
    let expr = if rest.is_empty() { path } else { rest };
    Ok((resource_type, Target::Expr(fhirpath::parse(expr)?)))
}

/// `nodesByType('T')` or `nodesByName('n')`, optionally followed by `.child`.
fn lookup(path: &str) -> Option<Target> {
    let (by_type, rest) = match path.strip_prefix("nodesByType(") {
        Some(rest) => (true, rest),
        None => (false, path.strip_prefix("nodesByName(")?),
    };
    let quote = rest.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let rest = &rest[1..];
    let end = rest.find(quote)?;
    let key = &rest[..end];
    let rest = rest[end + 1..].strip_prefix(')')?;
    let word = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric());
    if !word(key) {
        return None;
    }
    let child = match rest {
        "" => None,
        r => Some(r.strip_prefix('.').filter(|c| word(c))?.to_string()),
    };
    Some(Target::Lookup {
        by_type,
        key: key.to_string(),
        child,
    })
}

impl Method {
    fn parse(method: &str, rule: &Map<String, Value>) -> Result<Method, Invalid> {
        Ok(match method {
            "keep" => Method::Keep,
            "redact" => Method::Redact,
            "dateshift" => Method::DateShift,
            "cryptohash" => Method::CryptoHash,
            "encrypt" => Method::Encrypt,
            "substitute" => match rule.get("replaceWith") {
                Some(with) => Method::Substitute(with.clone()),
                None => return invalid("substitute needs replaceWith"),
            },
            "perturb" => {
                let span = match rule.get("span") {
                    None => return invalid("perturb needs span"),
                    Some(span) => number(span)
                        .filter(|s| *s >= 0.0)
                        .ok_or_else(|| Invalid(format!("span must be a number ≥ 0, not {span}")))?,
                };
                let proportional = either(
                    rule.get("rangeType"),
                    "rangeType",
                    ("fixed", "proportional"),
                )?
                .unwrap_or(false);
                let round_to = match rule.get("roundTo") {
                    None => 2,
                    Some(r) => whole_number(r, 0..=28)
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| {
                            Invalid(format!("roundTo must be an integer from 0 to 28, not {r}"))
                        })?,
                };
                Method::Perturb(Perturbation {
                    span,
                    proportional,
                    round_to,
                })
            }
            "generalize" => {
                let Some(Value::Object(cases)) = rule.get("cases") else {
                    return invalid("generalize needs cases (a JSON object)");
                };
                let cases = cases
                    .iter()
                    .map(|(when, then)| {
                        let then_text = match then {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        let compile = |e: &str| {
                            fhirpath::parse(e)
                                .map_err(|why| Invalid(format!("the case {when:?}: {why}")))
                        };
                        Ok((compile(when)?, compile(&then_text)?))
                    })
                    .collect::<Result<Vec<_>, Invalid>>()?;
                let redact_others =
                    either(rule.get("otherValues"), "otherValues", ("keep", "redact"))?
                        .unwrap_or(true);
                Method::Generalize {
                    cases,
                    redact_others,
                }
            }
            other => return invalid(format!("the method '{other}' is not supported")),
        })
    }
}

/// A setting with two values, in any case: whether it is the second one; `None` when absent.
fn either(
    value: Option<&Value>,
    setting: &str,
    (no, yes): (&str, &str),
) -> Result<Option<bool>, Invalid> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.eq_ignore_ascii_case(no) => Ok(Some(false)),
        Some(Value::String(s)) if s.eq_ignore_ascii_case(yes) => Ok(Some(true)),
        Some(other) => invalid(format!(
            "{setting} must be \"{no}\" or \"{yes}\", not {other}"
        )),
    }
}

/// A number, or a string holding one (the tool reads settings either way).
/// A number (or numeric string) that is whole and within `range`.
fn whole_number(value: &Value, range: std::ops::RangeInclusive<i64>) -> Option<i64> {
    let n = number(value).filter(|n| n.fract() == 0.0)?;
    // Whole, and compared as a float before the conversion, so nothing is cut off.
    let in_range = n >= *range.start() as f64 && n <= *range.end() as f64;
    #[allow(clippy::cast_possible_truncation)]
    in_range.then_some(n as i64)
}

fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

impl Params {
    fn parse(p: &Map<String, Value>) -> Result<Params, Invalid> {
        let string = |key: &str| -> Result<String, Invalid> {
            match p.get(key) {
                None | Some(Value::Null) => Ok(String::new()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => invalid(format!("parameters.{key} must be a string, not {other}")),
            }
        };
        let flag = |key: &str| -> Result<bool, Invalid> {
            match p.get(key) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => invalid(format!(
                    "parameters.{key} must be true or false, not {other}"
                )),
            }
        };
        let date_shift_scope = match string("dateShiftScope")?.to_ascii_lowercase().as_str() {
            "" | "resource" => DateShiftScope::Resource,
            "file" => DateShiftScope::File,
            "folder" => DateShiftScope::Folder,
            other => {
                return invalid(format!(
                    "parameters.dateShiftScope must be resource, file or folder, not {other:?}"
                ));
            }
        };
        let date_shift_fixed_offset = match p.get("dateShiftFixedOffsetInDays") {
            None | Some(Value::Null) => None,
            Some(v) => Some(whole_number(v, -36_500..=36_500).ok_or_else(|| {
                Invalid(format!(
                    "parameters.dateShiftFixedOffsetInDays must be a whole number of days, not {v}"
                ))
            })?),
        };
        let encrypt_key = string("encryptKey")?;
        if !encrypt_key.is_empty() && ![16, 24, 32].contains(&encrypt_key.len()) {
            return invalid(format!(
                "parameters.encryptKey is {} bits; AES takes keys of 128, 192 or 256 bits",
                encrypt_key.len() * 8
            ));
        }
        let restricted_zip_codes = match p.get("restrictedZipCodeTabulationAreas") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(codes)) => codes
                .iter()
                .map(|c| match c {
                    Value::String(s) => Ok(s.clone()),
                    other => invalid(format!(
                        "parameters.restrictedZipCodeTabulationAreas holds strings, not {other}"
                    )),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return invalid("parameters.restrictedZipCodeTabulationAreas must be an array");
            }
        };
        Ok(Params {
            tool_compatible_output: flag("toolCompatibleOutput")?,
            date_shift_key: string("dateShiftKey")?,
            date_shift_scope,
            date_shift_fixed_offset,
            crypto_hash_key: string("cryptoHashKey")?,
            encrypt_key,
            partial_ages: flag("enablePartialAgesForRedact")?,
            partial_dates: flag("enablePartialDatesForRedact")?,
            partial_zip_codes: flag("enablePartialZipCodesForRedact")?,
            restricted_zip_codes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(json: &str) -> String {
        Config::parse(json).unwrap_err().0
    }

    #[test]
    fn paths_split_like_the_tool() {
        let (t, target) = compile_path("Patient.address.state").unwrap();
        assert_eq!(t.as_deref(), Some("Patient"));
        assert!(matches!(target, Target::Expr(_)));
        assert!(matches!(
            compile_path("Resource.id").unwrap(),
            (None, Target::Expr(_))
        ));
        assert!(matches!(
            compile_path("Patient").unwrap(),
            (Some(_), Target::Resource)
        ));
        match compile_path("nodesByType('Address').country").unwrap() {
            (
                None,
                Target::Lookup {
                    by_type: true,
                    key,
                    child,
                },
            ) => {
                assert_eq!(
                    (key.as_str(), child.as_deref()),
                    ("Address", Some("country"))
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            compile_path("nodesByType('ContactPoint').where(use='home')").unwrap(),
            (None, Target::Expr(_))
        ));
        assert!(compile_path("Patinet.name").is_err());
    }

    #[test]
    fn every_mistake_names_its_rule() {
        let rules = |r: &str| format!(r#"{{"fhirPathRules":[{r}]}}"#);
        assert!(
            error(&rules(r#"{"path":"Patient.name","method":"scramble"}"#))
                .contains("'scramble' is not supported")
        );
        assert!(
            error(&rules(r#"{"path":"Patient.name","method":"substitute"}"#))
                .contains("Patient.name")
        );
        assert!(
            error(&rules(r#"{"path":"Patient.name.foo(","method":"redact"}"#))
                .contains("Patient.name.foo(")
        );
        assert!(error(&rules(r#"{"path":"x","method":"perturb","span":-1}"#)).contains("span"));
        assert!(error(&rules(r#"{"path":"x","method":"perturb"}"#)).contains("span"));
        assert!(
            error(&rules(
                r#"{"path":"x","method":"generalize","cases":{"$this >":"1"}}"#
            ))
            .contains("$this >")
        );
        assert!(
            error(r#"{"fhirPathRules":[],"parameters":{"encryptKey":"short"}}"#)
                .contains("40 bits")
        );
        assert!(error(r#"{"fhirVersion":"Stu3","fhirPathRules":[]}"#).contains("Stu3"));
        assert!(error(r#"{"fhirPathRules":[],"processingErrors":"ignore"}"#).contains("ignore"));
        assert!(error("{").contains("not valid JSON"));
        assert!(error("{}").contains("fhirPathRules"));
    }
}
