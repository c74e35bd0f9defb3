//! `GET /metrics`: the values move as an export runs, on the metrics-only listener (open) and
//! on the API's listener (behind the API's auth). The recorder is the process's: each test
//! asserts only on series that no other test here moves.

use std::collections::BTreeMap;

use crate::common::*;
use fhir_export::auth::config::AuthMode;

/// `name{label="v",…}` (labels sorted) → value.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut metrics = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("a sample line");
        let key = match series.split_once('{') {
            Some((name, labels)) => {
                let mut labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                labels.sort();
                format!("{name}{{{}}}", labels.join(","))
            }
            None => series.to_string(),
        };
        metrics.insert(key, value.parse().expect("a number"));
    }
    metrics
}

async fn scrape(client: &reqwest::Client, url: &str) -> BTreeMap<String, f64> {
    let response = client.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    parse(&response.text().await.unwrap())
}

fn value(metrics: &BTreeMap<String, f64>, key: &str) -> f64 {
    metrics.get(key).copied().unwrap_or(0.0)
}

fn free_port() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn metrics_move_as_an_export_runs_and_both_listeners_serve_them() {
    let scrape_addr = free_port();
    let app = TestApp::spawn_with(|c| c.server.metrics_listen = Some(scrape_addr)).await;
    let scrape_url = format!("http://{scrape_addr}/metrics");
    let written = load_generated(&app, 3).await;

    let before = scrape(&app.client, &scrape_url).await;
    assert_eq!(
        value(&before, "fhir_export_kickoffs_total{status=\"202\"}"),
        0.0
    );
    assert_eq!(
        value(
            &before,
            "fhir_export_jobs{level=\"system\",state=\"completed\"}"
        ),
        0.0
    );
    assert!(before.contains_key("fhir_export_queue_tasks"));
    assert!(before.contains_key("fhir_export_db_connections{pool=\"primary\",state=\"idle\"}"));

    let refused = kick_off_request(&app, "/$export?_type=NoSuchType", "respond-async", None).await;
    assert_eq!(refused.status(), 400);
    let status = kick_off(&app, "/$export").await;
    let manifest = wait_manifest(&app, &status).await;
    let files = download_all(&app, &manifest).await;

    // On the API's listener too (auth.mode = none on loopback: open like the API).
    let after = scrape(&app.client, &app.url("/metrics")).await;
    assert_eq!(
        value(&after, "fhir_export_kickoffs_total{status=\"202\"}"),
        1.0
    );
    assert_eq!(
        value(&after, "fhir_export_kickoffs_total{status=\"400\"}"),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "fhir_export_jobs{level=\"system\",state=\"completed\"}"
        ),
        1.0
    );
    assert_eq!(value(&after, "fhir_export_queue_tasks"), 0.0);
    // Every resource and byte written, by type.
    for (resource_type, resources) in &written {
        let labels = format!("{{storage=\"filesystem\",type=\"{resource_type}\"}}");
        assert_eq!(
            value(
                &after,
                &format!("fhir_export_resources_written_total{labels}")
            ),
            resources.len() as f64,
            "{resource_type}"
        );
        let bytes: usize = files
            .iter()
            .filter(|f| &f.resource_type == resource_type)
            .map(|f| f.text.len())
            .sum();
        assert_eq!(
            value(&after, &format!("fhir_export_bytes_written_total{labels}")),
            bytes as f64,
            "{resource_type}"
        );
    }
    // Every part read its rows on a page connection.
    assert!(
        value(
            &after,
            "fhir_export_db_acquire_seconds_count{pool=\"pages\"}"
        ) >= files.len() as f64
    );
    let parts = files.len() as f64;
    assert_eq!(
        value(
            &after,
            "fhir_export_part_write_seconds_count{storage=\"filesystem\"}"
        ),
        parts
    );
    assert_eq!(
        value(&after, "fhir_export_tasks_claimed_total{kind=\"plan\"}"),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "fhir_export_tasks_ended_total{kind=\"plan\",outcome=\"done\"}"
        ),
        1.0
    );
    let exports_done = value(
        &after,
        "fhir_export_tasks_ended_total{kind=\"export\",outcome=\"done\"}",
    );
    assert_eq!(
        exports_done,
        value(&after, "fhir_export_tasks_claimed_total{kind=\"export\"}")
    );
    assert!(exports_done >= written.len() as f64);
    let kickoff_timings = value(
        &after,
        "fhir_export_http_request_duration_seconds_count{method=\"GET\",route=\"/$export\",status=\"202\"}",
    );
    assert_eq!(kickoff_timings, 1.0);
}

#[tokio::test]
async fn with_auth_the_api_listener_asks_for_a_token_and_the_metrics_listener_does_not() {
    let scrape_addr = free_port();
    let app = TestApp::spawn_with(|c| {
        c.server.metrics_listen = Some(scrape_addr);
        c.auth.mode = AuthMode::Smart;
        c.auth.token_secret = "a secret of at least thirty-two bytes!!".into();
    })
    .await;
    let refused = app.get("/metrics").await;
    assert_eq!(refused.status(), 401);
    let open = scrape(&app.client, &format!("http://{scrape_addr}/metrics")).await;
    // The refused scrape is itself counted, under its route.
    assert_eq!(
        value(
            &open,
            "fhir_export_http_request_duration_seconds_count{method=\"GET\",route=\"/metrics\",status=\"401\"}"
        ),
        1.0
    );
}
