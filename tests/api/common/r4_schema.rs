//! The official R4 JSON schema as a test oracle for exported lines.

use serde_json::{Value, json};

/// Validators of each resource type against the official R4 JSON schema (`fhir.schema.json`,
/// which `scripts/test` fetches; its path in `FHIR_R4_SCHEMA`).
pub struct R4Schema {
    document: Value,
    by_type: std::collections::HashMap<String, jsonschema::Validator>,
}

impl R4Schema {
    pub fn load() -> R4Schema {
        let path = std::env::var("FHIR_R4_SCHEMA").unwrap_or_else(|_| {
            format!(
                "{}/target/tools/fhir-r4/fhir.schema.json",
                env!("CARGO_MANIFEST_DIR")
            )
        });
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{path}: {e} (scripts/test fetches the R4 JSON schema)"));
        R4Schema {
            document: serde_json::from_str(&text).unwrap(),
            by_type: Default::default(),
        }
    }

    /// The problems of one exported line (empty: valid R4).
    pub fn problems(&mut self, line: &str) -> Vec<String> {
        let resource: Value = serde_json::from_str(line).unwrap();
        let resource_type = resource["resourceType"].as_str().unwrap().to_string();
        let document = &self.document;
        let validator = self
            .by_type
            .entry(resource_type.clone())
            .or_insert_with(|| {
                // The document's own definitions, entered at this type's (not the oneOf of all).
                let mut schema = document.clone();
                let root = schema.as_object_mut().unwrap();
                root.remove("oneOf");
                root.remove("discriminator");
                root.insert(
                    "$ref".into(),
                    json!(format!("#/definitions/{resource_type}")),
                );
                jsonschema::options()
                    .with_draft(jsonschema::Draft::Draft6)
                    .build(&schema)
                    .unwrap()
            });
        validator
            .iter_errors(&resource)
            .map(|e| format!("{resource_type} {}: {e}", e.instance_path()))
            .collect()
    }
}
