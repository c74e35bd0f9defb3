//! `FHIR_EXPORT_LOG_FORMAT=json`: every line one JSON object; a kick-off logs its client, level
//! and parameters (not its patients), a task's lines carry the task, and a failed job logs one
//! line with its cause under the correlation id its OperationOutcome shows.

use std::time::Duration;

use crate::common::*;
use serde_json::Value;

/// A server process of its own on `app`'s database and storage, logging in `format` to a file
/// (`RUST_LOG` unset: info); returns it, its base URL and the log file.
async fn logging_server(app: &TestApp, format: &str) -> (ChildProcess, String, std::path::PathBuf) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log_path = app.storage.path().join(format!("server-{format}.log"));
    let mut command = std::process::Command::new(binary());
    command
        .arg("serve")
        .env("DATABASE_URL", &app.db.url)
        .env("FHIR_EXPORT_LISTEN", format!("127.0.0.1:{port}"))
        .env("FHIR_EXPORT_STORAGE_DIR", app.storage.path())
        .env("FHIR_EXPORT_LOG_FORMAT", format)
        .env("FHIR_EXPORT_MAX_ATTEMPTS", "1")
        .env("FHIR_EXPORT_POLL_INTERVAL_MS", "100")
        .env_remove("FHIR_EXPORT_CONFIG")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap());
    let server = ChildProcess::spawn(&mut command);
    let base = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        if app
            .client
            .get(format!("{base}/health"))
            .send()
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (server, base, log_path)
}

#[tokio::test]
async fn json_logs_explain_a_job_and_its_failure() {
    // This process only loads; the logging server is a child process.
    let app = TestApp::spawn_with(|c| c.export.workers = 0).await;
    let written = load_generated(&app, 2).await;
    // A container that cannot be created: a file stands where its folder would be.
    std::fs::write(app.storage.path().join("blocked"), "not a folder").unwrap();
    let (mut server, base, log_path) = logging_server(&app, "json").await;
    let kick_off = |query: &'static str| {
        let request = app
            .client
            .get(format!("{base}/$export{query}"))
            .header("accept", "application/fhir+json")
            .header("prefer", "respond-async");
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 202);
            content_location(&response)
        }
    };
    let exported = kick_off("?_type=Patient&_since=2000-01-01T00:00:00Z").await;
    let manifest = wait_manifest(&app, &exported).await;
    assert_eq!(manifest["output"][0]["count"], written["Patient"].len());
    let doomed = kick_off("?_type=Patient&_container=blocked").await;
    let message = loop {
        let response = app.client.get(&doomed).send().await.unwrap();
        if response.status() == 500 {
            break assert_outcome(response, 500).await;
        }
        assert_eq!(response.status(), 202);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let cancelled = kick_off("?_type=Patient").await;
    assert_eq!(
        app.client.delete(&cancelled).send().await.unwrap().status(),
        202
    );
    server.signal("-TERM");
    server.wait();

    let text = std::fs::read_to_string(&log_path).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let job_of = |url: &str| url.rsplit('/').next().unwrap().to_string();
    let (exported, doomed, cancelled) = (job_of(&exported), job_of(&doomed), job_of(&cancelled));

    // One line at each job's end: how it ended, what it wrote, how long it took.
    let ended = |job: &str| -> Vec<&Value> {
        lines
            .iter()
            .filter(|l| l["fields"]["message"] == "export ended" && l["fields"]["job"] == job)
            .collect()
    };
    let done = ended(&exported);
    assert_eq!(done.len(), 1, "{done:?}");
    let fields = &done[0]["fields"];
    assert_eq!(fields["outcome"], "completed");
    assert_eq!(fields["files"], 1);
    assert_eq!(fields["resources"], written["Patient"].len());
    assert!(fields["bytes"].as_i64().unwrap() > 0 && fields["seconds"].as_f64().unwrap() >= 0.0);
    assert_eq!(ended(&doomed)[0]["fields"]["outcome"], "failed");
    assert_eq!(ended(&doomed).len(), 1);
    assert_eq!(ended(&cancelled)[0]["fields"]["outcome"], "cancelled");

    let accepted = lines
        .iter()
        .find(|l| l["fields"]["message"] == "export accepted" && l["fields"]["job"] == exported)
        .expect("the kick-off is logged");
    let fields = &accepted["fields"];
    assert_eq!(fields["level"], "system");
    assert_eq!(fields["client"], "-");
    assert_eq!(fields["types"], "Patient");
    assert_eq!(fields["since"], "2000-01-01T00:00:00.000000Z");
    assert_eq!(fields["patients"], 0);

    // The failing task's line names its job, task, attempt and type.
    let attempt = lines
        .iter()
        .find(|l| l["fields"]["message"] == "task attempt failed" && l["span"]["job"] == doomed)
        .expect("the failed attempt is logged");
    assert_eq!(attempt["span"]["resource_type"], "Patient");
    assert_eq!(attempt["span"]["attempt"], 1);
    assert!(attempt["span"]["task"].as_i64().unwrap() > 0);

    // One line for the failed job: the cause, under the id the client was shown.
    let failed: Vec<&Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "export failed")
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["fields"]["job"], doomed);
    assert_eq!(failed[0]["level"], "ERROR");
    let correlation_id = failed[0]["fields"]["correlation_id"].as_str().unwrap();
    assert!(message.contains(correlation_id), "{message}");
    assert!(
        failed[0]["fields"]["cause"]
            .as_str()
            .unwrap()
            .contains("blocked"),
        "{}",
        failed[0]
    );
}

#[tokio::test]
async fn a_resource_that_fails_de_identification_fails_its_job_without_stopping_the_server() {
    let app = TestApp::spawn_with(|c| c.export.workers = 0).await;
    // Stored before writes were checked: an element named with a NUL and a newline that
    // would forge a log line. No write path takes it today, so it goes in by SQL.
    let poison = r#"{"resourceType":"Patient","id":"poison","meta":{"versionId":"1","lastUpdated":"2024-01-01T00:00:00Z"},"gen\u0000\n2026-01-01T00:00:00Z ERROR forged":"x"}"#;
    sqlx::query(
        "INSERT INTO resources (resource_type, id, version_id, seq, last_updated, is_current, patient_ids, body)
         VALUES ('Patient', 'poison', 1, nextval('resource_seq'), '2024-01-01', true, '{poison}', $1)",
    )
    .bind(poison)
    .execute(&app.pool)
    .await
    .unwrap();
    let dir = app.storage.path().join("anonymization");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("strict.json"),
        r#"{"fhirVersion": "R4", "processingErrors": "raise", "fhirPathRules": [{"path": "Patient.name", "method": "redact"}]}"#,
    )
    .unwrap();
    let (mut server, base, log_path) = logging_server(&app, "text").await;
    let kick_off = || {
        app.client
            .get(format!(
                "{base}/$export?_type=Patient&_anonymizationConfig=strict.json"
            ))
            .header("accept", "application/fhir+json")
            .header("prefer", "respond-async")
            .send()
    };
    // Two such jobs (the server has its default four workers): each fails once, for good.
    let mut jobs = Vec::new();
    for _ in 0..2 {
        let response = kick_off().await.unwrap();
        assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
        jobs.push(content_location(&response));
    }
    for url in &jobs {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let response = app.client.get(url).send().await.unwrap();
            if response.status() == 500 {
                break;
            }
            assert_eq!(response.status(), 202);
            assert!(
                std::time::Instant::now() < deadline,
                "the poisoned job never failed"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let failures: Vec<i32> =
        sqlx::query_scalar("SELECT failures FROM export_tasks WHERE kind = 'export'")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(failures, vec![1, 1], "each task failed once and for all");
    let error: String =
        sqlx::query_scalar("SELECT last_error FROM export_tasks WHERE kind = 'export' LIMIT 1")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(
        error.contains("gen\\0"),
        "the failure is recorded with its NUL written out: {error}"
    );
    // Other exports go on, and health says ok: nothing is stuck.
    let health = app
        .client
        .get(format!("{base}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let fine = app
        .client
        .get(format!("{base}/$export?_type=Observation"))
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .send()
        .await
        .unwrap();
    wait_manifest(&app, &content_location(&fine)).await;
    server.signal("-TERM");
    server.wait();

    // Every text line is one event: the newline in the element's name is written as \n.
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(text.contains("gen\\u{0}\\n2026"), "{text}");
    for line in text.lines() {
        assert!(line.starts_with("20"), "a line that is no event: {line:?}");
        assert!(!line.contains("\u{0}"), "a raw NUL in the log: {line:?}");
    }
}
