//! `GET /metadata`: the CapabilityStatement.

use axum::{Router, extract::State, http::StatusCode, response::Response, routing::get};
use serde_json::{Value, json};

use super::{AppState, fhir_response};
use crate::fhir::{r4::RESOURCE_TYPES, search_param};

pub fn router() -> Router<AppState> {
    Router::new().route("/metadata", get(metadata))
}

async fn metadata(State(state): State<AppState>) -> Response {
    fhir_response(
        StatusCode::OK,
        capability_statement(&state.base_url).to_string(),
    )
}

fn capability_statement(base_url: &str) -> Value {
    let interactions = json!([
        {"code": "read"}, {"code": "vread"}, {"code": "create"}, {"code": "update"},
        {"code": "delete"}
    ]);
    let operation = |name: &str, definition: &str| json!({"name": name, "definition": format!("http://hl7.org/fhir/uv/bulkdata/OperationDefinition/{definition}")});
    let resources: Vec<Value> = RESOURCE_TYPES
        .iter()
        .map(|t| {
            let mut resource = json!({
                "type": t,
                "interaction": interactions,
                "versioning": "versioned",
                "readHistory": true,
                "updateCreate": true,
                // What `_typeFilter` can use.
                "searchParam": search_params(t),
            });
            match *t {
                "Patient" => resource["operation"] = json!([operation("export", "patient-export")]),
                "Group" => resource["operation"] = json!([operation("export", "group-export")]),
                _ => {}
            }
            resource
        })
        .collect();
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": chrono::Utc::now().format("%Y-%m-%d").to_string(),
        "kind": "instance",
        "instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"],
        "software": {"name": "fhir-export", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "fhir-export bulk data server", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
            "operation": [operation("export", "export")],
        }],
    })
}

fn search_params(resource_type: &str) -> Vec<Value> {
    search_param::for_type(resource_type)
        .map(|p| json!({"name": p.code, "type": p.kind.as_str()}))
        .collect()
}
