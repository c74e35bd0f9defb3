//! `fhir-export fetch` against this server: exact files, gzip and POST, a rerun that resumes,
//! Ctrl-C in the middle, `--cancel`, and SMART Backend Services auth.

mod common;

use std::{collections::BTreeSet, path::Path, process::Output, time::Duration};

use common::{keys::Key, *};
use fhir_export::config::{AuthMode, ClientConfig};
use serde_json::Value;

fn fetch_command(args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(binary());
    command
        .arg("fetch")
        .args(args)
        .env_remove("FHIR_EXPORT_CONFIG")
        .kill_on_drop(true);
    command
}

async fn fetch(args: &[&str]) -> Output {
    tokio::time::timeout(Duration::from_secs(120), fetch_command(args).output())
        .await
        .expect("fetch ends")
        .unwrap()
}

fn assert_ok(output: &Output) {
    assert!(
        output.status.success(),
        "fetch failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The ids in DIR's files of a type (gzipped or not), each once.
fn ids_in(dir: &Path, resource_type: &str) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    let mut lines = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if !name.starts_with(&format!("{resource_type}-")) {
            continue;
        }
        let text = if name.ends_with(".gz") {
            let mut out = String::new();
            std::io::Read::read_to_string(
                &mut flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap()),
                &mut out,
            )
            .unwrap();
            out
        } else {
            std::fs::read_to_string(&path).unwrap()
        };
        for line in text.lines() {
            let resource: Value = serde_json::from_str(line).unwrap();
            ids.insert(resource["id"].as_str().unwrap().to_string());
            lines += 1;
        }
    }
    assert_eq!(lines, ids.len(), "{resource_type}: no resource twice");
    ids
}

fn written_ids(
    written: &std::collections::BTreeMap<String, Vec<Value>>,
    t: &str,
) -> BTreeSet<String> {
    written[t]
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

async fn jobs(app: &TestApp) -> Vec<String> {
    sqlx::query_scalar("SELECT status::text FROM export_jobs ORDER BY created_at")
        .fetch_all(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn fetch_downloads_exact_files_gzip_and_post_and_a_rerun_resumes() {
    let app = TestApp::spawn_with(|c| c.export.part_size = 50).await;
    let written = load_generated(&app, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("plain");
    let args = [
        app.base.as_str(),
        "--type",
        "Patient,Observation",
        "--out",
        out.to_str().unwrap(),
        "--parallel",
        "3",
    ];
    let output = fetch(&args).await;
    assert_ok(&output);
    for t in ["Patient", "Observation"] {
        assert_eq!(ids_in(&out, t), written_ids(&written, t), "{t}");
    }
    assert!(
        std::fs::read_dir(&out).unwrap().count() > 3,
        "several parts"
    );
    // The same command again: the job is picked up from the state file, nothing is fetched twice.
    let again = fetch(&args).await;
    assert_ok(&again);
    assert!(String::from_utf8_lossy(&again.stderr).contains("resuming"));
    assert_eq!(jobs(&app).await, ["completed"]);

    let zipped = dir.path().join("zipped");
    let output = fetch(&[
        app.base.as_str(),
        "--patient-level",
        "--type",
        "Observation",
        "--post",
        "--gzip",
        "--out",
        zipped.to_str().unwrap(),
    ])
    .await;
    assert_ok(&output);
    assert_eq!(
        ids_in(&zipped, "Observation"),
        written_ids(&written, "Observation")
    );
    assert_eq!(jobs(&app).await, ["completed", "completed"]);
}

#[tokio::test]
async fn an_interrupted_fetch_resumes_and_cancel_cancels() {
    // Small parts with a pause between them: the export takes a few seconds.
    let app = TestApp::spawn_with(|c| {
        c.export.part_size = 10;
        c.export.throttle_ms = 100;
    })
    .await;
    let written = load_generated(&app, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let state_of = |out: &Path| out.join("fetch-state.json");
    // Started, interrupted with Ctrl-C (SIGINT) once the job is known.
    let interrupt = |out: std::path::PathBuf| {
        let base = app.base.clone();
        async move {
            let child =
                fetch_command(&[&base, "--type", "Patient", "--out", out.to_str().unwrap()])
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
            for _ in 0..200 {
                if state_of(&out).exists() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            assert!(state_of(&out).exists());
            let pid = child.id().unwrap().to_string();
            std::process::Command::new("kill")
                .args(["-INT", &pid])
                .status()
                .unwrap();
            let output = child.wait_with_output().await.unwrap();
            assert!(!output.status.success());
            let stderr = String::from_utf8_lossy(&output.stderr).to_string();
            assert!(stderr.contains("run the same command again"), "{stderr}");
        }
    };

    let resumed = dir.path().join("resumed");
    interrupt(resumed.clone()).await;
    let output = fetch(&[
        &app.base,
        "--type",
        "Patient",
        "--out",
        resumed.to_str().unwrap(),
    ])
    .await;
    assert_ok(&output);
    assert_eq!(
        ids_in(&resumed, "Patient"),
        written_ids(&written, "Patient")
    );
    assert_eq!(jobs(&app).await, ["completed"]);

    let cancelled = dir.path().join("cancelled");
    interrupt(cancelled.clone()).await;
    let output = fetch(&[
        &app.base,
        "--type",
        "Patient",
        "--out",
        cancelled.to_str().unwrap(),
        "--cancel",
    ])
    .await;
    assert_ok(&output);
    assert_eq!(jobs(&app).await, ["completed", "cancelled"]);
    assert!(
        !state_of(&cancelled).exists(),
        "the cancelled job is forgotten"
    );
}

#[tokio::test]
async fn fetch_signs_in_with_smart_backend_services() {
    let key = Key::rsa("k1");
    let app = TestApp::spawn_with(|c| {
        c.auth.mode = AuthMode::Smart;
        c.auth.token_secret = "a secret of at least thirty-two bytes!!".into();
        c.auth.clients = vec![ClientConfig {
            id: "analytics".into(),
            scopes: vec!["system/*.read".into()],
            jwks: keys::jwks(&[&key]),
            jwks_url: String::new(),
        }];
    })
    .await;
    let written = load_generated(&app, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("key.pem");
    std::fs::write(&pem, key.private_pem()).unwrap();
    let out = dir.path().join("out");
    let output = fetch(&[
        &app.base,
        "--type",
        "Patient",
        "--client-id",
        "analytics",
        "--key",
        pem.to_str().unwrap(),
        "--kid",
        "k1",
        "--out",
        out.to_str().unwrap(),
    ])
    .await;
    assert_ok(&output);
    assert_eq!(ids_in(&out, "Patient"), written_ids(&written, "Patient"));
    // Without credentials the same server refuses.
    let refused = fetch(&[
        &app.base,
        "--type",
        "Patient",
        "--out",
        dir.path().join("x").to_str().unwrap(),
    ])
    .await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"));
}
