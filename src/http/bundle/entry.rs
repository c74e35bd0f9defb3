//! A Bundle entry: its request read and checked against the caller's scopes, and the write it
//! becomes, its resource prepared.

use std::{borrow::Cow, collections::HashMap};

use serde_json::{Map, Value, value::RawValue};

use crate::{
    auth::{Principal, scopes::Access},
    fhir::{
        self,
        raw_json::{self, Members},
        resource,
    },
    http::{
        ApiError, ApiResult,
        auth::require,
        rest::{parse_version_tag, resource_of_type},
    },
    store::{self, text::Identity},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Method {
    // Declaration order is the order FHIR processes a transaction in.
    Delete,
    Post,
    Put,
}

/// One entry as sent, its resource still the JSON text it came as.
pub(super) struct Entry<'a> {
    pub(super) method: Method,
    pub(super) resource_type: String,
    pub(super) id: String,
    pub(super) resource: Option<&'a RawValue>,
    /// `request.ifMatch`: the version the entry expects to replace.
    pub(super) if_match: Option<i32>,
}

/// Reads one entry's request (the caller's scopes must allow it) and finds its resource;
/// returns it with its `fullUrl`.
pub(super) fn parse_entry<'a>(
    raw: &'a RawValue,
    principal: &Principal,
) -> ApiResult<(Entry<'a>, Option<String>)> {
    let entry = Members::parse(raw.get()).map_err(|e| {
        ApiError::bad_request(format!(
            "an entry must be a JSON object without repeated elements: {e}"
        ))
    })?;
    let full_url = entry
        .get("fullUrl")
        .and_then(raw_json::string)
        .map(Cow::into_owned);
    let request: Option<Map<String, Value>> = entry
        .get("request")
        .and_then(|r| serde_json::from_str(r.get()).ok());
    let text = |key: &str| {
        request
            .as_ref()
            .and_then(|r| r.get(key))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let (Some(method), Some(url)) = (text("method"), text("url")) else {
        return Err(ApiError::bad_request(
            "request.method and request.url are required",
        ));
    };
    let (method, resource_type, url_id) = target(&method, &url)?;
    let access = match method {
        Method::Post => Access::Create,
        Method::Put => Access::Update,
        Method::Delete => Access::Delete,
    };
    require(principal, access, resource_type)?;
    let id = match (method, url_id) {
        // A created resource gets a new server id, whatever the body says.
        (Method::Post, None) => uuid::Uuid::new_v4().to_string(),
        (Method::Put | Method::Delete, Some(id)) if resource::is_valid_id(id) => id.to_string(),
        _ => {
            return Err(ApiError::bad_request(format!(
                "request.url '{url}' does not fit method {method:?} (POST takes Type, PUT and DELETE Type/id)"
            )));
        }
    };
    let if_match = match text("ifMatch") {
        None => None,
        Some(tag) => Some(parse_version_tag(&tag).ok_or_else(|| {
            ApiError::bad_request(format!(
                "request.ifMatch '{tag}' is not a version ETag such as W/\"3\""
            ))
        })?),
    };
    if method == Method::Post && if_match.is_some() {
        return Err(ApiError::bad_request(
            "request.ifMatch applies to PUT and DELETE, not to POST",
        ));
    }
    let resource = match (method, entry.get("resource")) {
        (Method::Delete, _) => None,
        (_, Some(raw)) if raw.get().starts_with('{') => Some(raw),
        _ => {
            return Err(ApiError::bad_request(
                "POST and PUT entries need a resource object",
            ));
        }
    };
    let entry = Entry {
        method,
        resource_type: resource_type.to_string(),
        id,
        resource,
        if_match,
    };
    Ok((entry, full_url))
}

/// An entry's method, and the type and id its `request.url` names.
fn target<'u>(method: &str, url: &'u str) -> ApiResult<(Method, &'u str, Option<&'u str>)> {
    let method = match method {
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        other => {
            return Err(ApiError::not_supported(format!(
                "request.method {other} is not supported in a Bundle (POST, PUT, DELETE are)"
            )));
        }
    };
    if url.contains('?') {
        return Err(ApiError::not_supported(format!(
            "conditional request URLs are not supported: '{url}'"
        )));
    }
    let mut parts = url.trim_matches('/').split('/');
    let (resource_type, url_id) = (parts.next().unwrap_or(""), parts.next());
    if parts.next().is_some() || !fhir::is_resource_type(resource_type) {
        return Err(ApiError::bad_request(format!(
            "request.url '{url}' is not Type or Type/id"
        )));
    }
    Ok((method, resource_type, url_id))
}

/// An entry to be written; its resource once it is prepared (references resolved).
pub(super) struct Write {
    pub(super) method: Method,
    pub(super) resource_type: String,
    pub(super) id: String,
    pub(super) prepared: Option<store::Prepared>,
    pub(super) if_match: Option<i32>,
}

impl Entry<'_> {
    /// The entry's write, its resource not prepared yet.
    pub(super) fn write(&self) -> Write {
        Write {
            method: self.method,
            resource_type: self.resource_type.clone(),
            id: self.id.clone(),
            prepared: None,
            if_match: self.if_match,
        }
    }

    /// The entry's write with its resource prepared.
    pub(super) fn prepared_write(
        &self,
        targets: &HashMap<String, String>,
        base: &str,
    ) -> ApiResult<Write> {
        Ok(Write {
            prepared: self.prepare(targets, base)?,
            ..self.write()
        })
    }

    /// The entry's resource, prepared (`None`: it has none) the fast way (`store::text`), or
    /// the full way, which also says what is wrong.
    pub(super) fn prepare(
        &self,
        targets: &HashMap<String, String>,
        base: &str,
    ) -> ApiResult<Option<store::Prepared>> {
        let Some(raw) = self.resource else {
            return Ok(None);
        };
        let text = raw.get();
        let (resource_type, id) = (self.resource_type.as_str(), self.id.as_str());
        let identity = match self.method {
            Method::Post => Identity::Assigned { resource_type, id },
            _ => Identity::Given { resource_type, id },
        };
        if let Some(prepared) = store::text::prepare(text, identity, targets, base) {
            return Ok(Some(prepared));
        }
        let body = match serde_json::from_str(text) {
            Ok(Value::Object(body)) => resource_of_type(body, resource_type)?,
            Ok(_) => {
                return Err(ApiError::bad_request(
                    "POST and PUT entries need a resource object",
                ));
            }
            Err(e) => {
                return Err(ApiError::bad_request(format!(
                    "the resource is not valid JSON: {e}"
                )));
            }
        };
        if self.method == Method::Put
            && let Some(body_id) = resource::id(&body)
            && body_id != id
        {
            return Err(ApiError::bad_request(format!(
                "the resource's id '{body_id}' does not match request.url '{resource_type}/{id}'"
            )));
        }
        let mut value = Value::Object(body);
        resource::rewrite_references(&mut value, targets);
        let Value::Object(body) = value else {
            unreachable!("rewriting references keeps an object an object")
        };
        Ok(Some(store::Prepared::new(resource_type, id, body, base)?))
    }
}

impl Write {
    /// A create or update without `If-Match`: written with the others in one COPY.
    pub(super) fn is_plain(&self) -> bool {
        self.method != Method::Delete && self.if_match.is_none()
    }

    pub(super) fn sort_key(&self) -> (Method, &str, &str) {
        (self.method, &self.resource_type, &self.id)
    }
}
