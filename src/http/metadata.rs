//! `GET /metadata`: the CapabilityStatement.

use axum::{Router, extract::State, http::StatusCode, response::Response, routing::get};
use serde_json::{Value, json};

use super::{AppState, fhir_response};
use crate::{
    auth::Auth,
    auth::config::AuthMode,
    fhir::{
        r4::{PATIENT_COMPARTMENT, RESOURCE_TYPES},
        search_param,
    },
};

/// The canonical base of the Bulk Data Access IG.
const BULK_DATA: &str = "http://hl7.org/fhir/uv/bulkdata";

/// The IG's extension (STU3) that marks a type or search parameter REST offers and a bulk
/// operation does not; the published StructureDefinition's canonical, which validators resolve.
const OPERATION_NOT_SUPPORTED: &str =
    "http://hl7.org/fhir/uv/bulkdata/StructureDefinition/operation-not-supported";

pub fn router() -> Router<AppState> {
    Router::new().route("/metadata", get(metadata))
}

async fn metadata(State(state): State<AppState>) -> Response {
    fhir_response(
        StatusCode::OK,
        capability_statement(&state.base_url, &state.auth).to_string(),
    )
}

fn capability_statement(base_url: &str, auth: &Auth) -> Value {
    let interactions = json!([
        {"code": "read"}, {"code": "vread"}, {"code": "create"}, {"code": "update"},
        {"code": "delete"}
    ]);
    let operation = |name: &str, definition: &str| json!({"name": name, "definition": format!("{BULK_DATA}/OperationDefinition/{definition}")});
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
            // Readable here, but in no patient's compartment: Patient and Group export leave
            // the type out.
            if !in_compartment(t) {
                resource["extension"] = json!(["patient-export", "group-export"]
                    .map(|op| json!({"url": OPERATION_NOT_SUPPORTED, "valueCanonical": format!("{BULK_DATA}/OperationDefinition/{op}")})));
            }
            resource
        })
        .collect();
    let mut rest = json!({
        "mode": "server",
        "resource": resources,
        "interaction": [{"code": "transaction"}, {"code": "batch"}],
        "operation": [operation("export", "export")],
    });
    if auth.mode() != AuthMode::None {
        rest["security"] = security(auth);
    }
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": chrono::Utc::now().format("%Y-%m-%d").to_string(),
        "kind": "instance",
        "instantiates": [format!("{BULK_DATA}/CapabilityStatement/bulk-data")],
        "software": {"name": "fhir-export", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "fhir-export bulk data server", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [rest],
    })
}

fn in_compartment(resource_type: &str) -> bool {
    resource_type == "Patient" || PATIENT_COMPARTMENT.iter().any(|(t, _)| *t == resource_type)
}

fn search_params(resource_type: &str) -> Vec<Value> {
    search_param::for_type(resource_type)
        .map(|p| json!({"name": p.code, "type": p.kind.as_str()}))
        .collect()
}

/// SMART on FHIR security, with the token endpoint (oauth-uris extension) in smart mode.
fn security(auth: &Auth) -> Value {
    let mut security = json!({
        "service": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
            "code": "SMART-on-FHIR",
        }]}],
        "description": "Bearer tokens with SMART system scopes (SMART Backend Services)",
    });
    if let Some(smart) = auth.smart() {
        security["extension"] = json!([{
            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": [{"url": "token", "valueUri": smart.token_url()}],
        }]);
    }
    security
}
