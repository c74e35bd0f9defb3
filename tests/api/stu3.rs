//! The kick-off inputs Bulk Data STU3 adds (R1), at every level, by GET and by POST: accepted
//! when good, a 400 OperationOutcome when not, and what lenient handling may ignore ignored.

use crate::common::*;
use serde_json::{Value, json};

const LEVELS: [&str; 3] = ["/$export", "/Patient/$export", "/Group/g/$export"];

/// (name, a good POST value, its query form, a bad POST value, its query form, whether
/// lenient handling ignores the bad one).
fn inputs(until: &str) -> Vec<(&'static str, Value, String, Value, &'static str, bool)> {
    vec![
        (
            "_until",
            json!({"valueInstant": until}),
            until.replace('+', "%2B"),
            json!({"valueInstant": "yesterday"}),
            "yesterday",
            false,
        ),
        (
            "_typeFilter",
            json!({"valueString": "Observation?status=final,amended"}),
            "Observation%3Fstatus%3Dfinal%2Camended".into(),
            json!({"valueString": "Observation?_sort=date"}),
            "Observation%3F_sort%3Ddate",
            true,
        ),
        (
            "organizeOutputBy",
            json!({"valueString": "Patient"}),
            "Patient".into(),
            json!({"valueString": "Encounter"}),
            "Encounter",
            true,
        ),
        (
            "allowPartialManifests",
            json!({"valueBoolean": true}),
            "true".into(),
            json!({"valueString": "maybe"}),
            "maybe",
            false,
        ),
    ]
}

fn body(name: &str, value: &Value) -> Value {
    let mut parameter = json!({"name": name});
    for (k, v) in value.as_object().unwrap() {
        parameter[k] = v.clone();
    }
    json!({"resourceType": "Parameters", "parameter": [parameter]})
}

async fn get_status(app: &TestApp, path: &str, prefer: &str) -> u16 {
    kick_off_request(app, path, prefer, None)
        .await
        .status()
        .as_u16()
}

#[tokio::test]
async fn each_new_input_is_taken_or_refused_at_every_level_by_get_and_post() {
    let app = TestApp::spawn_with(|c| {
        c.export.max_active_jobs = 1000;
        c.export.max_active_jobs_per_client = 1000;
    })
    .await;
    let put = app
        .put_json(
            "/Group/g",
            &json!({"resourceType": "Group", "id": "g", "type": "person", "actual": true}),
        )
        .await;
    assert!(put.status().is_success());
    let until = fhir_export::fhir::instant::format(chrono::Utc::now());
    for level in LEVELS {
        for (name, good, good_query, bad, bad_query, lenient_ignores) in inputs(&until) {
            let what = format!("{level} {name}");
            assert_eq!(
                get_status(
                    &app,
                    &format!("{level}?{name}={good_query}"),
                    "respond-async"
                )
                .await,
                202,
                "{what}"
            );
            let post = post_kick_off(&app, level, &body(name, &good), "respond-async").await;
            assert_eq!(post.status(), 202, "{what}");
            let refused = kick_off_request(
                &app,
                &format!("{level}?{name}={bad_query}"),
                "respond-async",
                None,
            )
            .await;
            assert_outcome(refused, 400).await;
            assert_outcome(
                post_kick_off(&app, level, &body(name, &bad), "respond-async").await,
                400,
            )
            .await;
            let lenient = "respond-async, handling=lenient";
            let expected = if lenient_ignores { 202 } else { 400 };
            assert_eq!(
                get_status(&app, &format!("{level}?{name}={bad_query}"), lenient).await,
                expected,
                "{what}"
            );
            let post = post_kick_off(&app, level, &body(name, &bad), lenient).await;
            assert_eq!(post.status().as_u16(), expected, "{what}");
        }
    }
}
