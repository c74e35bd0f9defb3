//! `FHIR_EXPORT_LOG_FORMAT=json`: every line one JSON object; a kick-off logs its client, level
//! and parameters (not its patients), a task's lines carry the task, and a failed job logs one
//! line with its cause under the correlation id its OperationOutcome shows.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

#[tokio::test]
async fn json_logs_explain_a_job_and_its_failure() {
    // This process only loads; the logging server is a child process.
    let app = TestApp::spawn_with(|c| c.export.workers = 0).await;
    let written = load_generated(&app, 2).await;
    // A container that cannot be created: a file stands where its folder would be.
    std::fs::write(app.storage.path().join("blocked"), "not a folder").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log_path = app.storage.path().join("server.log");
    let mut command = std::process::Command::new(binary());
    command
        .arg("serve")
        .env("DATABASE_URL", &app.db.url)
        .env("FHIR_EXPORT_LISTEN", format!("127.0.0.1:{port}"))
        .env("FHIR_EXPORT_STORAGE_DIR", app.storage.path())
        .env("FHIR_EXPORT_LOG_FORMAT", "json")
        .env("FHIR_EXPORT_MAX_ATTEMPTS", "1")
        .env("FHIR_EXPORT_POLL_INTERVAL_MS", "100")
        .env_remove("FHIR_EXPORT_CONFIG")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap());
    let mut server = ChildProcess::spawn(&mut command);
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
    server.signal("-TERM");
    server.wait();

    let text = std::fs::read_to_string(&log_path).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let job_of = |url: &str| url.rsplit('/').next().unwrap().to_string();
    let (exported, doomed) = (job_of(&exported), job_of(&doomed));

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
