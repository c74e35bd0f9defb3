//! Bulk Data `$export` kick-off parameters (HL7 Bulk Data Access IG v2.0.0): parsing and
//! validation, whether they came from a query string or a `Parameters` body.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{instant, is_resource_type, type_filter};

/// Output formats the server writes (all are ndjson).
pub const OUTPUT_FORMATS: &[&str] = &["application/fhir+ndjson", "application/ndjson", "ndjson"];

/// The types `organizeOutputBy` may name.
pub const ORGANIZE_BY: &[&str] = &["Patient"];

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExportParams {
    /// Requested types, unique, in request order; empty means all.
    pub types: Vec<String>,
    pub since: Option<DateTime<Utc>>,
    pub till: Option<DateTime<Utc>>,
    /// `_until` (STU3): only versions last updated before it.
    pub until: Option<DateTime<Utc>>,
    pub container: Option<String>,
    /// `_elements` entries: `element` or `Type.element`.
    pub elements: Vec<String>,
    /// `patient`: the ids of the patients a Patient or Group export is limited to.
    pub patients: Vec<String>,
    /// `_typeFilter` entries (`Type?query`), each valid.
    pub type_filters: Vec<String>,
    /// `includeAssociatedData=_history`: older versions too.
    pub include_history: bool,
    /// `includeAssociatedData=_deleted`: the last state of deleted resources too.
    pub include_deleted: bool,
    /// `_anonymizationConfig`: the name of the de-identification configuration to apply.
    pub anonymization_config: Option<String>,
    /// `_anonymizationConfigEtag`: the ETag that configuration must have.
    pub anonymization_etag: Option<String>,
    /// `organizeOutputBy` (STU3): resource blocks per instance of this type.
    pub organize_by: Option<String>,
    /// `allowPartialManifests` (STU3): manifests of the files done while the export runs.
    pub allow_partial_manifests: bool,
    /// What a lenient kick-off ignored, one sentence each.
    pub ignored: Vec<String>,
}

use super::ParamError::{self, Invalid, NotSupported};

/// Reads the parameters of a kick-off at system level (`/$export`) or not (Patient, Group).
/// `now` bounds `_till`; `base_url` makes references to this server in `_typeFilter` local.
pub fn parse(
    params: &[(String, String)],
    system_level: bool,
    lenient: bool,
    now: DateTime<Utc>,
    base_url: &str,
) -> Result<ExportParams, ParamError> {
    let mut reader = Reader {
        out: ExportParams::default(),
        seen: Seen::default(),
        system_level,
        lenient,
        now,
        base_url,
    };
    for (name, value) in params {
        reader.parameter(name, value)?;
    }
    reader.finish()
}

/// A kick-off's parameters being read.
struct Reader<'a> {
    out: ExportParams,
    seen: Seen<'a>,
    system_level: bool,
    lenient: bool,
    now: DateTime<Utc>,
    base_url: &'a str,
}

/// Entries already taken: everything is de-duplicated through sets, in one pass whatever the
/// number of entries.
#[derive(Default)]
struct Seen<'a> {
    types: HashSet<&'a str>,
    elements: HashSet<&'a str>,
    patients: HashSet<&'a str>,
    filters: HashSet<&'a str>,
}

impl<'a> Reader<'a> {
    /// What cannot be honoured: refused, or noted and ignored when lenient.
    fn ignore(&mut self, why: ParamError) -> Result<(), ParamError> {
        if self.lenient {
            self.out.ignored.push(why.to_string());
            Ok(())
        } else {
            Err(why)
        }
    }

    fn parameter(&mut self, name: &'a str, value: &'a str) -> Result<(), ParamError> {
        // No parameter holds control characters; a NUL could not even be stored.
        if let Some(c) = name.chars().chain(value.chars()).find(|c| c.is_control()) {
            return Err(Invalid(format!(
                "parameter {} holds the control character U+{:04X}",
                name.escape_debug(),
                u32::from(c)
            )));
        }
        match name {
            "_outputFormat" if !OUTPUT_FORMATS.contains(&value) => Err(NotSupported(format!(
                "_outputFormat '{value}' is not supported; use one of {}",
                OUTPUT_FORMATS.join(", ")
            ))),
            "_outputFormat" => Ok(()),
            "_type" => self.types(value),
            "_since" => set_once(&mut self.out.since, name, parse_instant(name, value)?),
            "_till" => self.till(value),
            "_until" => set_once(&mut self.out.until, name, parse_instant(name, value)?),
            "_elements" => self.elements(value),
            "patient" => self.patients(value),
            "_typeFilter" => self.type_filters(value),
            "includeAssociatedData" => self.associated_data(value),
            "_anonymizationConfig" => {
                check_configuration_name(value)?;
                set_once(&mut self.out.anonymization_config, name, value.to_string())
            }
            "_anonymizationConfigEtag" => {
                set_once(&mut self.out.anonymization_etag, name, value.to_string())
            }
            // Its naming rules belong to the storage; the caller checks them.
            "_container" => set_once(&mut self.out.container, name, value.to_string()),
            "organizeOutputBy" => self.organize_by(value),
            "allowPartialManifests" => {
                self.out.allow_partial_manifests = match value {
                    "true" => true,
                    "false" => false,
                    _ => {
                        return Err(Invalid(format!(
                            "allowPartialManifests must be true or false, not '{value}'"
                        )));
                    }
                };
                Ok(())
            }
            n => self.ignore(Invalid(format!("unknown parameter '{n}'"))),
        }
    }

    fn types(&mut self, value: &'a str) -> Result<(), ParamError> {
        for t in value.split(',').map(str::trim) {
            if !is_resource_type(t) {
                self.ignore(Invalid(format!("_type '{t}' is not an R4 resource type")))?;
            } else if self.seen.types.insert(t) {
                self.out.types.push(t.to_string());
            }
        }
        Ok(())
    }

    fn till(&mut self, value: &str) -> Result<(), ParamError> {
        if !self.system_level {
            return Err(NotSupported(
                "_till is only supported for system-level export (/$export)".into(),
            ));
        }
        let till = parse_instant("_till", value)?;
        if till > self.now {
            return Err(Invalid(format!("_till {value} is in the future")));
        }
        set_once(&mut self.out.till, "_till", till)
    }

    fn elements(&mut self, value: &'a str) -> Result<(), ParamError> {
        for entry in value.split(',').map(str::trim) {
            super::elements::validate(entry).map_err(Invalid)?;
            if self.seen.elements.insert(entry) {
                self.out.elements.push(entry.to_string());
            }
        }
        Ok(())
    }

    fn patients(&mut self, value: &'a str) -> Result<(), ParamError> {
        if self.system_level {
            return Err(NotSupported(
                "patient is only supported for Patient and Group export".into(),
            ));
        }
        for reference in value.split(',').map(str::trim) {
            let id = super::compartment::patient_id(reference, self.base_url).ok_or_else(|| {
                Invalid(format!(
                    "patient '{reference}' is not a reference to a Patient of this server"
                ))
            })?;
            if self.seen.patients.insert(id) {
                self.out.patients.push(id.to_string());
            }
        }
        Ok(())
    }

    fn type_filters(&mut self, value: &'a str) -> Result<(), ParamError> {
        for entry in type_filter::split_entries(value) {
            if !self.seen.filters.insert(entry) {
                continue; // the same entry twice filters the same
            }
            match type_filter::Query::parse(entry, self.base_url, self.now) {
                Ok(_) => self.out.type_filters.push(entry.to_string()),
                Err(why) => self.ignore(why)?,
            }
        }
        Ok(())
    }

    fn organize_by(&mut self, value: &str) -> Result<(), ParamError> {
        if !ORGANIZE_BY.contains(&value) {
            return self.ignore(NotSupported(format!(
                "organizeOutputBy '{value}' is not supported (use {})",
                ORGANIZE_BY.join(", ")
            )));
        }
        set_once(
            &mut self.out.organize_by,
            "organizeOutputBy",
            value.to_string(),
        )
    }

    fn associated_data(&mut self, value: &str) -> Result<(), ParamError> {
        // Lenient handling ignores it (noted in the error file), as any parameter not offered.
        if !self.system_level {
            return self.ignore(NotSupported(
                "includeAssociatedData is only supported for system-level export".into(),
            ));
        }
        for v in value.split(',').map(str::trim) {
            match v {
                "_history" => self.out.include_history = true,
                "_deleted" => self.out.include_deleted = true,
                other => self.ignore(NotSupported(format!(
                    "includeAssociatedData '{other}' is not supported (use _history, _deleted)"
                )))?,
            }
        }
        Ok(())
    }

    /// Checks that need every parameter.
    fn finish(mut self) -> Result<ExportParams, ParamError> {
        // A filter on a type the export leaves out is a contradiction, not a no-op.
        if !self.out.types.is_empty() {
            let mut kept = Vec::new();
            for entry in std::mem::take(&mut self.out.type_filters) {
                let filtered = type_filter::entry_type(&entry);
                if self.out.types.iter().any(|t| t == filtered) {
                    kept.push(entry);
                } else {
                    self.ignore(Invalid(format!(
                        "_typeFilter '{entry}' names {filtered}, which _type leaves out"
                    )))?;
                }
            }
            self.out.type_filters = kept;
        }
        // Older versions and last states are files of one type; blocks hold current resources.
        if self.out.organize_by.is_some() && (self.out.include_history || self.out.include_deleted)
        {
            self.ignore(NotSupported(
                "includeAssociatedData cannot be combined with organizeOutputBy".into(),
            ))?;
            self.out.include_history = false;
            self.out.include_deleted = false;
        }
        let out = self.out;
        if out.anonymization_etag.is_some() && out.anonymization_config.is_none() {
            return Err(Invalid(
                "_anonymizationConfigEtag needs _anonymizationConfig".into(),
            ));
        }
        if let (Some(since), Some(till)) = (out.since, out.till)
            && since >= till
        {
            return Err(Invalid("_since must be before _till".into()));
        }
        if out.till.is_some() && out.until.is_some() {
            return Err(Invalid(
                "give _till (the snapshot instant) or _until, not both".into(),
            ));
        }
        if let (Some(since), Some(until)) = (out.since, out.until)
            && since >= until
        {
            return Err(Invalid("_until must be after _since".into()));
        }
        Ok(out)
    }
}

/// A blob name whose every segment is also a file name (at most 255 bytes).
fn check_configuration_name(value: &str) -> Result<(), ParamError> {
    let valid = !value.is_empty()
        && value.len() <= 255
        && value
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != "..")
        && !value.contains('\\');
    if valid {
        Ok(())
    } else {
        Err(Invalid(format!(
            "_anonymizationConfig '{value}' is not a configuration name"
        )))
    }
}

/// An instant parameter, the error naming it.
fn parse_instant(name: &str, value: &str) -> Result<DateTime<Utc>, ParamError> {
    instant::parse(value).map_err(|why| Invalid(format!("{name}: {why}")))
}

fn set_once<T>(slot: &mut Option<T>, name: &str, value: T) -> Result<(), ParamError> {
    if slot.is_some() {
        return Err(Invalid(format!("{name} may be given only once")));
    }
    *slot = Some(value);
    Ok(())
}

/// One line of a `deleted` file: a transaction Bundle that deletes `Type/id`.
pub fn deletion_bundle(resource_type: &str, id: &str) -> String {
    serde_json::json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"request": {"method": "DELETE", "url": format!("{resource_type}/{id}")}}],
    })
    .to_string()
}

/// Marks a resource's last state, exported for `includeAssociatedData=_deleted`, as deleted:
/// a `meta` extension (the one Azure's FHIR service uses).
pub fn mark_deleted(body: &str) -> Result<String, serde_json::Error> {
    let mut resource: serde_json::Map<String, Value> = serde_json::from_str(body)?;
    let meta = resource
        .entry("meta")
        .or_insert_with(|| Value::Object(Default::default()));
    if let Value::Object(meta) = meta {
        let extensions = meta
            .entry("extension")
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(list) = extensions {
            list.push(serde_json::json!({"url": DELETED_STATE_URL, "valueString": "soft-deleted"}));
        }
    }
    serde_json::to_string(&resource)
}

/// The `meta.extension` that marks a deleted resource's last state.
pub const DELETED_STATE_URL: &str = "http://azurehealthcareapis.com/data-extensions/deleted-state";

/// The (name, value) pairs of a `Parameters` resource, values as their string form.
pub fn parameters_pairs(body: &Value) -> Result<Vec<(String, String)>, String> {
    if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err("a POST kick-off body must be a Parameters resource".into());
    }
    let Some(list) = body.get("parameter") else {
        return Ok(Vec::new());
    };
    let Value::Array(list) = list else {
        return Err("Parameters.parameter must be an array".into());
    };
    let mut pairs = Vec::with_capacity(list.len());
    for p in list {
        let name = p
            .get("name")
            .and_then(Value::as_str)
            .ok_or("every parameter needs a name")?;
        let value = p
            .as_object()
            .into_iter()
            .flatten()
            .find(|(k, _)| k.starts_with("value"))
            .map(|(_, v)| v);
        let text = match value {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Bool(b)) => b.to_string(),
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::Object(o)) => match o.get("reference").and_then(Value::as_str) {
                Some(r) => r.to_string(),
                None => {
                    return Err(format!(
                        "parameter {name} has a value this server cannot read"
                    ));
                }
            },
            _ => return Err(format!("parameter {name} has no value")),
        };
        pairs.push((name.to_string(), text));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests;
