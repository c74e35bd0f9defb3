//! Generated hostile input, 10,000 cases per target: kick-off query strings and `Parameters`
//! bodies, `_typeFilter` expressions, search values (dates, numbers with extreme exponents,
//! unicode), Bundles, and ndjson load lines. No panic, no 5xx, every answer a clear
//! OperationOutcome, and every answer within a bound.
//!
//! The parsers are driven directly; kick-offs and Bundles also go through a real server.

use std::time::{Duration, Instant};

use crate::common::*;
use chrono::{DateTime, Utc};
use fhir_export::fhir::{
    bulk,
    search_value::{DateValue, NumberValue, ReferenceValue, Token},
    type_filter::{self, Query, TypeFilter},
};
use proptest::{prelude::*, strategy::ValueTree, test_runner::TestRunner};
use serde_json::{Value, json};

const CASES: u32 = 10_000;
/// Far above what any single answer should take, even in a debug build on a busy machine.
const BOUND: Duration = Duration::from_secs(5);
const BASE: &str = "http://fhir.example";

fn runner() -> TestRunner {
    TestRunner::new(ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    })
}

fn now() -> DateTime<Utc> {
    "2026-06-01T00:00:00Z".parse().unwrap()
}

/// Fragments that hostile values are built from: real syntax, edge numbers, unicode, escapes.
fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just(",".to_string()),
        Just("|".to_string()),
        Just("?".to_string()),
        Just("&".to_string()),
        Just("=".to_string()),
        Just("%2C".to_string()),
        Just("%".to_string()),
        Just("Patient".to_string()),
        Just("Observation?".to_string()),
        Just("code=".to_string()),
        Just("date=ge".to_string()),
        Just("value-quantity=".to_string()),
        Just("subject=Patient/".to_string()),
        Just(":missing".to_string()),
        Just(":not".to_string()),
        Just("e-2147483648".to_string()),
        Just("e99999999999999999999".to_string()),
        Just("1.5".to_string()),
        Just("-0".to_string()),
        Just("NaN".to_string()),
        Just("inf".to_string()),
        Just("2024-02-30T25:61:61+99:99".to_string()),
        Just("9999-12-31".to_string()),
        Just("0000-01-01".to_string()),
        Just("T".to_string()),
        Just("é".to_string()),
        Just("ﬃ".to_string()),
        Just("\u{0301}".to_string()),
        Just("💥".to_string()),
        Just("\u{0}".to_string()),
        Just("\n".to_string()),
        Just("%00".to_string()),
        Just("%FF%FE".to_string()),
        Just("%C0%80".to_string()),
        Just("x".repeat(3000)),
        Just("Patient/a,Patient/b".to_string()),
        Just("http://loinc.org|8867-4".to_string()),
        "[ -~]{0,12}",
        "\\PC{0,6}",
        (0u64..u64::MAX).prop_map(|n| n.to_string()),
    ]
}

fn hostile() -> impl Strategy<Value = String> {
    prop::collection::vec(fragment(), 0..8).prop_map(|parts| parts.concat())
}

fn parameter_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("_type".to_string()),
        Just("_since".to_string()),
        Just("_till".to_string()),
        Just("_outputFormat".to_string()),
        Just("_elements".to_string()),
        Just("_typeFilter".to_string()),
        Just("_container".to_string()),
        Just("includeAssociatedData".to_string()),
        Just("patient".to_string()),
        Just("organizeOutputBy".to_string()),
        Just("_anonymizationConfig".to_string()),
        Just("_anonymizationConfigEtag".to_string()),
        Just("_ty\u{0}pe".to_string()),
        "[a-zA-Z_]{0,10}",
    ]
}

fn within_bound(started: Instant, what: &str) -> Result<(), TestCaseError> {
    prop_assert!(
        started.elapsed() < BOUND,
        "{what} took {:?}",
        started.elapsed()
    );
    Ok(())
}

#[test]
fn kick_off_parameters_never_panic() {
    let pairs = prop::collection::vec((parameter_name(), hostile()), 0..12);
    runner()
        .run(
            &(pairs, any::<bool>(), any::<bool>()),
            |(pairs, system, lenient)| {
                let started = Instant::now();
                let _ = bulk::parse(&pairs, system, lenient, now(), BASE);
                within_bound(started, "bulk::parse")
            },
        )
        .unwrap();
}

#[test]
fn parameters_bodies_never_panic() {
    let value = prop_oneof![
        hostile().prop_map(|s| json!({"valueString": s})),
        any::<i64>().prop_map(|n| json!({"valueInteger": n})),
        any::<bool>().prop_map(|b| json!({"valueBoolean": b})),
        hostile().prop_map(|s| json!({"valueReference": {"reference": s}})),
        Just(json!({"valueReference": {"display": "x"}})),
        Just(json!({"valueCoding": {"code": "x"}})),
        Just(json!({})),
        Just(json!({"valueString": null})),
        Just(json!({"part": []})),
    ];
    let parameter = (prop::option::of(parameter_name()), value).prop_map(|(name, mut v)| {
        if let Some(name) = name {
            v["name"] = json!(name);
        }
        v
    });
    let body = prop_oneof![
        prop::collection::vec(parameter, 0..10)
            .prop_map(|p| json!({"resourceType": "Parameters", "parameter": p})),
        Just(json!({"resourceType": "Parameters", "parameter": "x"})),
        Just(json!({"resourceType": "Patient"})),
        Just(json!([])),
    ];
    runner()
        .run(&body, |body| {
            let started = Instant::now();
            if let Ok(pairs) = bulk::parameters_pairs(&body) {
                let _ = bulk::parse(&pairs, false, false, now(), BASE);
            }
            within_bound(started, "Parameters")
        })
        .unwrap();
}

/// A resource for filters to test against: choice elements, periods, quantities, references.
fn resource() -> impl Strategy<Value = Value> {
    (hostile(), hostile(), hostile(), any::<f64>()).prop_map(|(a, b, c, n)| {
        json!({"resourceType": "Observation", "id": "o", "status": a,
            "code": {"coding": [{"system": b, "code": c}], "text": a},
            "subject": {"reference": b},
            "effectivePeriod": {"start": c, "end": a},
            "valueQuantity": {"value": if n.is_finite() { json!(n) } else { json!(null) },
                              "system": a, "code": c},
            "component": [{"valueRange": {"low": {"value": 1}, "high": {"value": c}}}]})
    })
}

#[test]
fn type_filters_never_panic() {
    let entry = (
        prop_oneof![
            Just("Observation".to_string()),
            Just("Patient".to_string()),
            "[A-Za-z]{0,12}"
        ],
        prop::collection::vec((hostile(), hostile()), 0..5),
    )
        .prop_map(|(t, params)| {
            let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{t}?{}", query.join("&"))
        });
    let filters = prop::collection::vec(entry, 1..4);
    runner()
        .run(&(filters, resource()), |(entries, resource)| {
            let started = Instant::now();
            let joined = entries.join(",");
            let split = type_filter::split_entries(&joined);
            prop_assert!(split.len() <= joined.matches(',').count() + 1);
            let valid: Vec<String> = entries
                .iter()
                .filter(|e| Query::parse(e, BASE, now()).is_ok())
                .cloned()
                .collect();
            if let Ok(Some(filter)) = TypeFilter::for_type(&valid, "Observation", BASE, now()) {
                let _ = filter.matches(&resource);
                let _ = filter.pushdown();
            }
            within_bound(started, "_typeFilter")
        })
        .unwrap();
}

#[test]
fn search_values_never_panic() {
    let prefix = prop_oneof![
        Just(""),
        Just("eq"),
        Just("ne"),
        Just("gt"),
        Just("lt"),
        Just("ge"),
        Just("le"),
        Just("sa"),
        Just("eb"),
        Just("ap")
    ];
    // Exponents where arithmetic breaks: near the edges of i32 and i64, and beyond.
    let exponent = prop_oneof![
        (-20i64..20).prop_map(|e| e.to_string()),
        (-60i64..60).prop_map(|d| (i32::MIN as i64 + d.abs()).to_string()),
        (-60i64..60).prop_map(|d| (i32::MAX as i64 - d.abs()).to_string()),
        any::<i64>().prop_map(|e| e.to_string()),
        "[+-]?[0-9]{19,30}",
    ];
    let number = (
        any::<i64>(),
        prop::option::of(0u32..40),
        prop::option::of(exponent),
    )
        .prop_map(|(m, decimals, exponent)| {
            let mut text = m.to_string();
            if let Some(d) = decimals {
                text.push('.');
                text.push_str(&"7".repeat(d as usize));
            }
            if let Some(e) = exponent {
                text.push_str(&format!("e{e}"));
            }
            text
        });
    let value = prop_oneof![number, hostile()];
    runner()
        .run(&(prefix, value, resource()), |(prefix, value, resource)| {
            let started = Instant::now();
            let text = format!("{prefix}{value}");
            for quantity in [false, true] {
                if let Ok(n) = NumberValue::parse(&text, quantity) {
                    let _ = n.matches(&resource["valueQuantity"]);
                    let _ = n.matches(&resource["component"][0]["valueRange"]);
                    let _ = n.matches(&json!(0));
                }
            }
            if let Ok(d) = DateValue::parse(&text, now()) {
                let _ = d.matches(&resource["effectivePeriod"]);
                let _ = d.matches(&json!(value));
            }
            if let Ok(t) = Token::parse(&text) {
                let _ = t.matches(&resource["code"]);
            }
            if let Ok(r) = ReferenceValue::parse(&text, BASE, Some("Patient")) {
                let _ = r.matches(&resource["subject"], BASE);
            }
            within_bound(started, "search values")
        })
        .unwrap();
}

/// Runs `cases` generated cases of `strategy` against a real server.
fn against_server<S: Strategy>(
    cases: u32,
    strategy: S,
    check: impl Fn(&TestApp, S::Value) -> futures::future::BoxFuture<'_, Result<(), TestCaseError>>,
) where
    S::Value: std::fmt::Debug,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = runtime.block_on(TestApp::spawn_with(|c| {
        c.export.workers = 0;
        c.export.max_active_jobs = i64::MAX;
        c.export.max_active_jobs_per_client = i64::MAX;
    }));
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&strategy, |value| runtime.block_on(check(&app, value)))
        .unwrap();
    runtime.block_on(async { drop(app) });
}

/// A 2xx, or a 4xx whose body is an OperationOutcome; never a 5xx; within the bound.
async fn answered_well(response: reqwest::Response, started: Instant) -> Result<(), TestCaseError> {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    within_bound(started, "a request")?;
    prop_assert!(status < 500, "{status}: {text}");
    if status >= 400 {
        let body: Value = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(&body["resourceType"], "OperationOutcome", "{}", text);
    }
    Ok(())
}

#[test]
fn kick_offs_over_http_are_answered_with_4xx_or_202() {
    let pairs = prop::collection::vec((parameter_name(), hostile()), 0..8);
    let path = prop_oneof![
        Just("/$export"),
        Just("/Patient/$export"),
        Just("/Group/g/$export")
    ];
    against_server(
        CASES,
        (path, pairs, any::<bool>(), any::<bool>()),
        |app, (path, pairs, post, lenient)| {
            Box::pin(async move {
                let query = form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(&pairs)
                    .finish();
                let started = Instant::now();
                let request = if post {
                    let parameter: Vec<Value> = pairs
                        .iter()
                        .map(|(k, v)| json!({"name": k, "valueString": v}))
                        .collect();
                    app.client
                        .post(app.url(path))
                        .header("content-type", "application/fhir+json")
                        .body(
                            json!({"resourceType": "Parameters", "parameter": parameter})
                                .to_string(),
                        )
                } else {
                    app.client.get(format!("{}{path}?{query}", app.base))
                };
                let prefer = if lenient {
                    "respond-async, handling=lenient"
                } else {
                    "respond-async"
                };
                let response = request
                    .header("accept", "application/fhir+json")
                    .header("prefer", prefer)
                    .send()
                    .await
                    .unwrap();
                answered_well(response, started).await
            })
        },
    );
}

/// Every parameter, header and path segment with a NUL, bytes that are not UTF-8 and an
/// over-long value, strict and lenient, GET and POST: never a 5xx.
#[tokio::test]
async fn every_parameter_header_and_path_takes_nul_broken_utf8_and_overlong_values() {
    let app = TestApp::spawn_with(|c| {
        c.export.workers = 0;
        c.export.max_active_jobs = i64::MAX;
        c.export.max_active_jobs_per_client = i64::MAX;
    })
    .await;
    let group = json!({"resourceType": "Group", "id": "g", "type": "person", "actual": true});
    assert_eq!(app.put_json("/Group/g", &group).await.status(), 201);
    // Over-long: as long as a URL may be (the http crate takes 64 KiB), and longer in a body.
    let long = "a".repeat(70_000);
    let long_in_url = "a".repeat(60_000);
    // As they appear in a URL (already percent-encoded) and as JSON strings.
    let encoded = [
        "%00",
        "a%00b",
        "%FF%FE",
        "%C0%80",
        "a%0Ab",
        "..",
        "x".repeat(300).as_str(),
        long_in_url.as_str(),
    ]
    .map(str::to_string);
    let raw = ["\u{0}", "a\u{0}b", "a\nb", "..", "\u{7f}"].map(str::to_string);
    let names = [
        "_type",
        "_since",
        "_till",
        "_until",
        "_outputFormat",
        "_elements",
        "_typeFilter",
        "_container",
        "includeAssociatedData",
        "patient",
        "organizeOutputBy",
        "allowPartialManifests",
        "_anonymizationConfig",
        "_anonymizationConfigEtag",
        "unknown",
    ];
    let paths = ["/$export", "/Patient/$export", "/Group/g/$export"];
    for path in paths {
        for lenient in [false, true] {
            let prefer = if lenient {
                "respond-async, handling=lenient"
            } else {
                "respond-async"
            };
            for name in names {
                // Each value under the name, and a hostile name, too.
                let queries = encoded
                    .iter()
                    .map(|v| format!("{name}={v}"))
                    .chain([format!("{name}%00=1")]);
                for query in queries {
                    let started = Instant::now();
                    let response =
                        kick_off_request(&app, &format!("{path}?{query}"), prefer, None).await;
                    answered_well(response, started).await.unwrap_or_else(|e| {
                        panic!("GET {path}?{}: {e}", &query[..query.len().min(40)])
                    });
                }
                for value in raw.iter().chain([&long]) {
                    let body = json!({"resourceType": "Parameters", "parameter": [
                        {"name": name, "valueString": value},
                        {"name": format!("{name}{value}"), "valueString": "1"}]});
                    let started = Instant::now();
                    let response = post_kick_off(&app, path, &body, prefer).await;
                    answered_well(response, started)
                        .await
                        .unwrap_or_else(|e| panic!("POST {path} {name}={value:?}: {e}"));
                }
            }
        }
    }
    // A NUL that only the second decoding of a `_typeFilter` query makes (`%2500`), strict and
    // lenient, GET and POST.
    for prefer in ["respond-async", "respond-async, handling=lenient"] {
        for filter in [
            "Observation%3F%2500",
            "Observation%3Fcode%3D%2500",
            "Observation%3F%2500%3Dx",
        ] {
            let query = format!("/$export?_typeFilter={filter}");
            let response = kick_off_request(&app, &query, prefer, None).await;
            answered_well(response, Instant::now())
                .await
                .unwrap_or_else(|e| panic!("{filter} {prefer}: {e}"));
            let decoded: String = form_urlencoded::parse(format!("v={filter}").as_bytes())
                .next()
                .unwrap()
                .1
                .into();
            let body = json!({"resourceType": "Parameters", "parameter": [{"name": "_typeFilter", "valueString": decoded}]});
            let response = post_kick_off(&app, "/$export", &body, prefer).await;
            answered_well(response, Instant::now())
                .await
                .unwrap_or_else(|e| panic!("POST {filter} {prefer}: {e}"));
        }
    }
    // Configuration names that are no configuration: a folder, a name too long for a file.
    std::fs::create_dir_all(app.storage.path().join("anonymization/folder")).unwrap();
    for name in [
        "folder".to_string(),
        "a".repeat(256),
        "x/".repeat(100) + "y",
        "a%00b".to_string(),
    ] {
        let query = format!("/$export?_anonymizationConfig={name}");
        let response = kick_off_request(&app, &query, "respond-async", None).await;
        assert_outcome(response, 400).await;
    }
    // Path segments: ids, job ids, file names.
    for value in &encoded {
        let value = &value[..value.len().min(30_000)]; // a path may hold it twice
        for path in [
            format!("/Group/{value}/$export"),
            format!("/Patient/{value}"),
            format!("/Patient/{value}/_history/{value}"),
            format!("/export/{value}"),
            format!("/export/{}/{value}", uuid::Uuid::new_v4()),
            format!("/{value}"),
        ] {
            let started = Instant::now();
            let response = app
                .client
                .get(format!("{}{path}", app.base))
                .header("accept", "application/fhir+json")
                .header("prefer", "respond-async")
                .send()
                .await
                .unwrap();
            answered_well(response, started)
                .await
                .unwrap_or_else(|e| panic!("GET {}: {e}", &path[..path.len().min(60)]));
            let response = app
                .client
                .delete(format!("{}{path}", app.base))
                .send()
                .await
                .unwrap();
            answered_well(response, Instant::now()).await.unwrap();
        }
    }
    // Headers: bytes that are not UTF-8 and over-long values (HTTP allows no NUL in a header).
    let header_values: Vec<Vec<u8>> = vec![
        vec![0xff, 0xfe, b'a'],
        vec![b'a'; 30_000],
        b"W/\"\xff\"".to_vec(),
    ];
    for name in [
        "accept",
        "prefer",
        "content-type",
        "authorization",
        "if-match",
        "accept-encoding",
        "content-encoding",
        "x-forwarded-for",
    ] {
        for value in &header_values {
            let value = reqwest::header::HeaderValue::from_bytes(value).unwrap();
            for (method, path) in [
                ("GET", "/$export"),
                ("PUT", "/Patient/p1"),
                ("POST", "/"),
                ("GET", "/Patient/p1"),
                ("POST", "/auth/token"),
            ] {
                let started = Instant::now();
                let response = app
                    .client
                    .request(method.parse().unwrap(), app.url(path))
                    .header(name, value.clone())
                    .body(json!({"resourceType": "Patient", "id": "p1"}).to_string())
                    .send()
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                let text = response.text().await.unwrap();
                assert!(status < 500, "{method} {path} with {name}: {status} {text}");
                assert!(started.elapsed() < BOUND);
            }
        }
    }
}

#[test]
fn bundles_over_http_are_answered_without_5xx() {
    let method = prop_oneof![
        Just("POST"),
        Just("PUT"),
        Just("DELETE"),
        Just("GET"),
        Just("PATCH"),
        Just("")
    ];
    let url = prop_oneof![
        Just("Patient".to_string()),
        Just("Patient/p1".to_string()),
        Just("Observation/o1".to_string()),
        hostile()
    ];
    let body = prop_oneof![
        Just(Value::Null),
        Just(json!({"resourceType": "Patient", "id": "p1"})),
        Just(
            json!({"resourceType": "Observation", "id": "o1", "status": "final",
                    "code": {"text": "x"}, "subject": {"reference": "urn:uuid:1"}})
        ),
        hostile().prop_map(|s| json!({"resourceType": s, "id": s})),
        hostile().prop_map(Value::String),
    ];
    let entry = (
        method,
        url,
        body,
        prop::option::of(hostile()),
        prop::option::of(hostile()),
    )
        .prop_map(|(method, url, resource, if_match, full_url)| {
            let mut entry = json!({"request": {"method": method, "url": url}});
            if !resource.is_null() {
                entry["resource"] = resource;
            }
            if let Some(tag) = if_match {
                entry["request"]["ifMatch"] = json!(tag);
            }
            if let Some(full_url) = full_url {
                entry["fullUrl"] = json!(full_url);
            }
            entry
        });
    let kind = prop_oneof![Just("transaction"), Just("batch"), Just("searchset")];
    let bundle = (kind, prop::collection::vec(entry, 0..6)).prop_map(
        |(kind, entries)| json!({"resourceType": "Bundle", "type": kind, "entry": entries}),
    );
    against_server(CASES, bundle, |app, bundle| {
        Box::pin(async move {
            let started = Instant::now();
            let response = app.post_json("/", &bundle).await;
            answered_well(response, started).await
        })
    });
}

#[tokio::test]
async fn ndjson_load_lines_are_loaded_or_named() {
    let app = TestApp::spawn_with(|c| c.export.workers = 0).await;
    let line = prop_oneof![
        hostile(),
        hostile().prop_map(|s| json!({"resourceType": "Patient", "id": s}).to_string()),
        hostile().prop_map(|s| json!({"resourceType": s}).to_string()),
        hostile().prop_map(|s| {
            json!({"resourceType": "Observation", "status": "final", "code": {"text": s},
                   "subject": {"reference": format!("Patient/{s}")}, "meta": s})
            .to_string()
        }),
        Just("{".to_string()),
        Just("[]".to_string()),
    ];
    let mut runner = runner();
    let tree = prop::collection::vec(line, CASES as usize)
        .new_tree(&mut runner)
        .unwrap();
    let lines: Vec<String> = tree
        .current()
        .into_iter()
        .map(|l| l.replace('\n', " "))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fuzz.ndjson");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let load = |skip_invalid| fhir_export::cli::load::LoadArgs {
        paths: vec![],
        skip_invalid,
        batch_size: 500,
        writers: 2,
        online: false,
        base_url: None,
    };
    // Stopping at the first bad line names it.
    let error = fhir_export::cli::load::load_files(&app.pool, vec![file.clone()], &load(false))
        .await
        .expect_err("generated lines include invalid ones");
    assert!(format!("{error:#}").contains("fuzz.ndjson:"), "{error:#}");
    // Skipping: every line is loaded or skipped, none lost.
    let report = fhir_export::cli::load::load_files(&app.pool, vec![file], &load(true))
        .await
        .unwrap();
    let blank = lines.iter().filter(|l| l.trim().is_empty()).count() as u64;
    assert_eq!(report.total() + report.skipped + blank, CASES as u64);
}
