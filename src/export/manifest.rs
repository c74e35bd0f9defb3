//! The manifest of a completed export: one model, written out per version of the Bulk Data
//! Access IG (`v2`; the base fields are the same in STU3).

use chrono::{DateTime, Utc};

/// The manifest extension of a de-identified export.
pub const DE_IDENTIFIED_EXTENSION: &str = "urn:fhir-export:de-identified";

#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub transaction_time: DateTime<Utc>,
    /// The kick-off URL.
    pub request: String,
    pub requires_access_token: bool,
    pub output: Vec<Item>,
    /// Transaction Bundles of deletions; `None` for an export without `_since`, whose manifest
    /// has no `deleted` list.
    pub deleted: Option<Vec<Item>>,
    /// What the export could not include (OperationOutcome files).
    pub error: Vec<Item>,
    /// The de-identification configuration the files were made with.
    pub de_identified_with: Option<String>,
    /// When the job and its files expire.
    pub expires: Option<DateTime<Utc>>,
    /// `organizeOutputBy`: the output files hold resource blocks of this type's instances
    /// (their items carry no `type`).
    pub organized_by: Option<String>,
    /// The next page of a paged manifest (`allowPartialManifests=true`).
    pub next: Option<String>,
}

/// One file of the manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub resource_type: String,
    pub url: String,
    /// Lines in the file (resources, block headers included).
    pub count: i64,
    /// The URL of the file its last block goes on in.
    pub continues_in: Option<String>,
}

/// The manifest of the IG v2.0.0 and STU3 (3.0.0), which adds `outputOrganizedBy`,
/// `continuesInFile` and `link` to the same fields (JSON).
pub mod v2 {
    use serde_json::{Value, json};

    use super::{DE_IDENTIFIED_EXTENSION, Item, Manifest};
    use crate::fhir::instant;

    pub fn json(manifest: &Manifest) -> Value {
        let items = |items: &[Item], typed: bool| -> Value {
            items
                .iter()
                .map(|i| {
                    let mut item = json!({"url": i.url, "count": i.count});
                    if typed {
                        item["type"] = json!(i.resource_type);
                    }
                    if let Some(next) = &i.continues_in {
                        item["continuesInFile"] = json!(next);
                    }
                    item
                })
                .collect()
        };
        // Organized output files hold blocks of many types: their items have no `type`.
        let organized = manifest.organized_by.is_some();
        let mut body = json!({
            "transactionTime": instant::format(manifest.transaction_time),
            "request": manifest.request,
            "requiresAccessToken": manifest.requires_access_token,
            "output": items(&manifest.output, !organized),
            "error": items(&manifest.error, true),
        });
        if let Some(by) = &manifest.organized_by {
            body["outputOrganizedBy"] = json!(by);
        }
        if let Some(deleted) = &manifest.deleted {
            body["deleted"] = items(deleted, true);
        }
        if let Some(next) = &manifest.next {
            body["link"] = json!([{"relation": "next", "url": next}]);
        }
        // The IG keeps `extension` for servers (a JSON object): this one says the files were
        // de-identified, and with which configuration.
        if let Some(name) = &manifest.de_identified_with {
            body["extension"] = json!({"url": DE_IDENTIFIED_EXTENSION, "valueString": name});
        }
        body
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde_json::json;

    use super::*;

    fn item(resource_type: &str, count: i64) -> Item {
        Item {
            resource_type: resource_type.into(),
            url: format!("https://x/{resource_type}-1.ndjson"),
            count,
            continues_in: None,
        }
    }

    #[test]
    fn the_v2_manifest_has_deleted_only_with_since_and_says_de_identification() {
        let mut manifest = Manifest {
            transaction_time: Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
            request: "https://x/$export".into(),
            requires_access_token: true,
            output: vec![item("Patient", 2)],
            deleted: None,
            error: vec![],
            de_identified_with: None,
            expires: None,
            organized_by: None,
            next: None,
        };
        assert_eq!(
            v2::json(&manifest),
            json!({
                "transactionTime": "2026-01-02T03:04:05.000000Z",
                "request": "https://x/$export",
                "requiresAccessToken": true,
                "output": [{"type": "Patient", "url": "https://x/Patient-1.ndjson", "count": 2}],
                "error": [],
            })
        );
        manifest.deleted = Some(vec![item("Bundle", 1)]);
        manifest.de_identified_with = Some("safe-harbor.json".into());
        let body = v2::json(&manifest);
        assert_eq!(body["deleted"][0]["type"], "Bundle");
        assert_eq!(
            body["extension"],
            json!({"url": DE_IDENTIFIED_EXTENSION, "valueString": "safe-harbor.json"})
        );
    }
}
