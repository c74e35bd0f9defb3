//! Crashes and freezes: a worker killed mid-export, and one frozen past its lease and then
//! resumed. The output must stay exact either way.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use crate::common::*;
use sqlx::PgPool;

const SLOW_WORKER: &[(&str, &str)] = &[
    ("FHIR_EXPORT_WORKERS", "1"),
    ("FHIR_EXPORT_PART_SIZE", "20"),
    ("FHIR_EXPORT_THROTTLE_MS", "250"),
    ("FHIR_EXPORT_STALE_AFTER_SECS", "2"),
    ("FHIR_EXPORT_POLL_INTERVAL_MS", "200"),
    ("FHIR_EXPORT_RANGE_SIZE", "150"),
];

/// The API alone (the worker processes come separately), with a short stale period and small
/// parts, like the worker processes.
async fn api_only_app() -> TestApp {
    TestApp::spawn_with(|c| {
        c.export.workers = 0;
        c.export.stale_after_secs = 2;
        c.export.part_size = 20;
    })
    .await
}

async fn max_failures(pool: &PgPool) -> i32 {
    sqlx::query_scalar("SELECT max(failures) FROM export_tasks")
        .fetch_one(pool)
        .await
        .unwrap()
}

fn assert_exact(
    files: &[OutputFile],
    loaded: &BTreeMap<String, Vec<serde_json::Value>>,
    types: &[&str],
) {
    let got = resources_by_key(files); // panics on duplicates
    for t in types {
        let expected: Vec<String> = loaded[*t]
            .iter()
            .map(|r| format!("{t}/{}", r["id"].as_str().unwrap()))
            .collect();
        let exported: Vec<&String> = got
            .keys()
            .filter(|k| k.starts_with(&format!("{t}/")))
            .collect();
        assert_eq!(
            exported.len(),
            expected.len(),
            "{t}: missing or extra resources"
        );
        for key in &expected {
            assert!(got.contains_key(key), "{key} missing");
        }
        let mut numbers: Vec<u32> = files
            .iter()
            .filter(|f| f.resource_type == *t)
            .map(|f| {
                f.name
                    .trim_end_matches(".ndjson")
                    .rsplit_once('-')
                    .unwrap()
                    .1
                    .parse()
                    .unwrap()
            })
            .collect();
        numbers.sort();
        assert_eq!(
            numbers,
            (1..=numbers.len() as u32).collect::<Vec<_>>(),
            "{t} numbering"
        );
    }
}

#[tokio::test]
async fn a_worker_killed_mid_export_is_rescued_with_exact_output() {
    let app = api_only_app().await;
    let loaded = load_generated(&app, 2).await;
    let status_url = kick_off(&app, "/$export?_type=Observation,Patient").await;

    let mut doomed = spawn_process(&app, SLOW_WORKER);
    wait_for_parts(&app.pool, 3).await;
    doomed.kill();
    let before = committed_parts(&app.pool).await;

    let _rescuer = app.spawn_sibling(|_| {}).await;
    let manifest = wait_manifest(&app, &status_url).await;
    let files = download_all(&app, &manifest).await;
    assert_exact(&files, &loaded, &["Observation", "Patient"]);
    let rescued: i32 = max_failures(&app.pool).await;
    assert_eq!(rescued, 1, "the killed task was rescued once");
    assert!(committed_parts(&app.pool).await > before);
}

#[tokio::test]
async fn a_frozen_worker_that_resumes_changes_nothing() {
    let app = api_only_app().await;
    let loaded = load_generated(&app, 2).await;
    let status_url = kick_off(&app, "/$export?_type=Observation").await;

    let mut frozen = spawn_process(&app, SLOW_WORKER);
    wait_for_parts(&app.pool, 2).await;
    frozen.signal("-STOP");

    let rescuer = app.spawn_sibling(|_| {}).await;
    let manifest = wait_manifest(&app, &status_url).await;
    rescuer.cancel();
    let files = download_all(&app, &manifest).await;
    assert_exact(&files, &loaded, &["Observation"]);
    let snapshot = || async {
        let mut on_disk = BTreeMap::new();
        for entry in walk(app.storage.path()) {
            let meta = std::fs::metadata(&entry).unwrap();
            on_disk.insert(
                entry.clone(),
                (std::fs::read(&entry).unwrap(), meta.modified().unwrap()),
            );
        }
        let rows: Vec<(String, i32, Option<i32>)> = sqlx::query_as(
            "SELECT resource_type, part_no, resources FROM export_parts ORDER BY 1, 2",
        )
        .fetch_all(&app.pool)
        .await
        .unwrap();
        let tasks: Vec<(i64, String, i32, i64)> = sqlx::query_as(
            "SELECT id, status::text, parts_done, checkpoint_seq FROM export_tasks ORDER BY id",
        )
        .fetch_all(&app.pool)
        .await
        .unwrap();
        (on_disk, rows, tasks)
    };
    let before = snapshot().await;
    let rescued: i32 = max_failures(&app.pool).await;
    assert_eq!(rescued, 1, "the frozen worker's task was rescued");

    frozen.signal("-CONT");
    // Long enough for its heartbeat, its next part and its next claim.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = snapshot().await;
    frozen.kill();

    assert_eq!(before.1, after.1, "export_parts changed");
    assert_eq!(before.2, after.2, "export_tasks changed");
    let final_files = |s: &BTreeMap<std::path::PathBuf, _>| -> Vec<std::path::PathBuf> {
        s.keys()
            .filter(|p| p.extension().is_some_and(|e| e == "ndjson"))
            .cloned()
            .collect()
    };
    assert_eq!(
        final_files(&before.0),
        final_files(&after.0),
        "files appeared or vanished"
    );
    for path in final_files(&after.0) {
        assert!(
            before.0[&path] == after.0[&path],
            "{} was rewritten",
            path.display()
        );
    }
    let job_status: String = sqlx::query_scalar("SELECT status::text FROM export_jobs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(job_status, "completed");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test]
async fn sigterm_stops_gracefully_and_gives_the_task_back() {
    let app = TestApp::spawn_with(|c| {
        c.export.workers = 0;
        c.export.part_size = 20;
    })
    .await;
    let loaded = load_generated(&app, 1).await;
    let status_url = kick_off(&app, "/$export?_type=Observation").await;
    let mut server = spawn_process(&app, SLOW_WORKER);
    wait_for_parts(&app.pool, 2).await;
    server.signal("-TERM");
    let started = std::time::Instant::now();
    let status = server.wait();
    assert!(status.success(), "serve exits cleanly on SIGTERM: {status}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // Released, not failed: back in the queue with no failure counted.
    let tasks: Vec<(String, i32)> =
        sqlx::query_as("SELECT status::text, failures FROM export_tasks WHERE kind = 'export'")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert!(
        tasks.iter().all(|(_, failures)| *failures == 0),
        "{tasks:?}"
    );
    assert!(
        tasks
            .iter()
            .all(|(state, _)| state == "queued" || state == "done"),
        "{tasks:?}"
    );
    assert!(
        tasks.iter().any(|(state, _)| state == "queued"),
        "{tasks:?}"
    );

    let _workers = app.spawn_sibling(|_| {}).await;
    let files = download_all(&app, &wait_manifest(&app, &status_url).await).await;
    assert_exact(&files, &loaded, &["Observation"]);
}

#[tokio::test]
async fn a_killed_worker_resumes_filtered_and_history_tasks_exactly() {
    let app = api_only_app().await;
    let loaded = load_generated(&app, 2).await;
    // The same ids again: every resource gets a version 2, version 1 becomes history.
    load_generated(&app, 2).await;
    let codes = ["2093-3", "8867-4", "9279-1"];
    let status_url = kick_off(
        &app,
        "/$export?_type=Observation&includeAssociatedData=_history\
         &_typeFilter=Observation%3Fcode%3D2093-3%2C8867-4%2C9279-1",
    )
    .await;
    let mut doomed = spawn_process(&app, SLOW_WORKER);
    // Killed inside a history task: its first part is written, more are to come.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let history_parts = "SELECT count(*) FROM export_parts
                         WHERE resource_type = 'Observation-history' AND resources IS NOT NULL";
    while sqlx::query_scalar::<_, i64>(history_parts)
        .fetch_one(&app.pool)
        .await
        .unwrap()
        == 0
    {
        assert!(std::time::Instant::now() < deadline, "no history part");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    doomed.kill();
    let resumed_at: (i64, i32) = sqlx::query_as(
        "SELECT checkpoint_seq, checkpoint_version FROM export_tasks
         WHERE kind = 'history' AND parts_done > 0 ORDER BY id LIMIT 1",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(resumed_at.1, 1, "a history checkpoint names the version");

    let _rescuer = app.spawn_sibling(|_| {}).await;
    let manifest = wait_manifest(&app, &status_url).await;
    let files = download_all(&app, &manifest).await;
    let expected: std::collections::BTreeSet<String> = loaded["Observation"]
        .iter()
        .filter(|o| codes.contains(&o["code"]["coding"][0]["code"].as_str().unwrap()))
        .map(|o| o["id"].as_str().unwrap().to_string())
        .collect();
    assert!(expected.len() > 60);
    for (kind, version) in [("Observation", "2"), ("Observation-history", "1")] {
        let mine: Vec<&OutputFile> = files
            .iter()
            .filter(|f| f.name.rsplit_once('-').unwrap().0 == kind)
            .collect();
        let mut ids = Vec::new();
        for f in &mine {
            for line in f.text.lines() {
                let r: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(r["meta"]["versionId"], version, "{kind}");
                ids.push(r["id"].as_str().unwrap().to_string());
            }
        }
        assert_eq!(
            ids.len(),
            expected.len(),
            "{kind}: missing or duplicate lines"
        );
        assert_eq!(
            ids.into_iter().collect::<std::collections::BTreeSet<_>>(),
            expected
        );
        let mut numbers: Vec<usize> = mine
            .iter()
            .map(|f| {
                let stem = f.name.trim_end_matches(".ndjson");
                stem.rsplit_once('-').unwrap().1.parse().unwrap()
            })
            .collect();
        numbers.sort();
        assert_eq!(
            numbers,
            (1..=mine.len()).collect::<Vec<_>>(),
            "{kind} numbering"
        );
    }
    assert_eq!(
        max_failures(&app.pool).await,
        1,
        "the killed task was rescued once"
    );
}

/// The temporary files (parts being written) under `root`.
fn temporaries(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.to_string_lossy().ends_with(".tmp") {
                found.push(path);
            }
        }
    }
    found
}

#[tokio::test]
async fn a_worker_killed_inside_a_part_leaves_no_temporary_file_behind() {
    let app = TestApp::spawn_with(|c| {
        c.export.workers = 0;
        c.export.stale_after_secs = 2;
        c.export.part_size = 1500;
    })
    .await;
    let loaded = load_generated(&app, 4).await;
    let status_url = kick_off(&app, "/$export?_type=Observation").await;
    let mut doomed = spawn_process(&app, SLOW_WORKER);
    // Freeze the worker while a part is half-written (its temporary file exists), then kill it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let orphan = loop {
        assert!(
            Instant::now() < deadline,
            "never caught a part being written"
        );
        if temporaries(app.storage.path()).is_empty() {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        doomed.signal("-STOP");
        match temporaries(app.storage.path()).pop() {
            Some(orphan) => break orphan,
            None => doomed.signal("-CONT"), // renamed in the meantime: try again
        }
    };
    doomed.kill();
    assert!(
        orphan.exists(),
        "the killed attempt left {}",
        orphan.display()
    );

    let _rescuer = app.spawn_sibling(|_| {}).await;
    let manifest = wait_manifest(&app, &status_url).await;
    let files = download_all(&app, &manifest).await;
    assert_exact(&files, &loaded, &["Observation"]);
    assert_eq!(
        temporaries(app.storage.path()),
        Vec::<std::path::PathBuf>::new()
    );
    assert_eq!(
        max_failures(&app.pool).await,
        1,
        "the killed task was rescued once"
    );
}
