//! A job's whole life over HTTP: the snapshot wait for writers open at kick-off, X-Progress of
//! each phase, cancel while planning and while running, a lease lost through the heartbeat,
//! failure after `max_attempts`, Expires, and the 429 slot freed when a job ends. "Nothing
//! happened" is checked on rows, after an event that proves the worker moved on.

use std::time::Duration;

use crate::common::*;
use fhir_export::{
    db::resources,
    store::{self, Prepared},
};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, Postgres, Transaction};

async fn put_patients(app: &TestApp, n: usize) {
    for i in 0..n {
        let body = json!({"resourceType": "Patient", "id": format!("p{i}")});
        assert_eq!(
            app.put_json(&format!("/Patient/p{i}"), &body)
                .await
                .status(),
            201
        );
    }
}

/// A write transaction of the store, left open: it wrote `Patient/{id}`.
async fn open_writer(app: &TestApp, id: &str) -> Transaction<'static, Postgres> {
    let mut tx = resources::begin_write(&app.pool).await.unwrap();
    let body = json!({"resourceType": "Patient", "id": id});
    let Value::Object(map) = body else {
        unreachable!()
    };
    store::put(
        &mut tx,
        &Prepared::new("Patient", id, map, "").unwrap(),
        None,
    )
    .await
    .unwrap();
    tx
}

/// Polls until X-Progress satisfies `wanted`; returns it.
async fn progress_until(app: &TestApp, status_url: &str, wanted: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let response = app.client.get(status_url).send().await.unwrap();
        assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
        let progress = response.headers()["x-progress"]
            .to_str()
            .unwrap()
            .to_string();
        if wanted(&progress) {
            return progress;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "X-Progress stuck at '{progress}'"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls until the SQL scalar query returns true.
async fn rows_until(app: &TestApp, sql: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !sqlx::query_scalar::<_, bool>(sql)
        .fetch_one(&app.pool)
        .await
        .unwrap()
    {
        assert!(std::time::Instant::now() < deadline, "never true: {sql}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn job_id(status_url: &str) -> uuid::Uuid {
    status_url.rsplit('/').next().unwrap().parse().unwrap()
}

async fn job_rows(app: &TestApp, status_url: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT row_to_json(t)::text FROM export_tasks t WHERE job_id = $1
         UNION ALL SELECT row_to_json(p)::text FROM export_parts p WHERE job_id = $1 ORDER BY 1",
    )
    .bind(job_id(status_url))
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_write_transaction_open_across_a_kick_off_holds_the_plan_until_it_ends() {
    let app = TestApp::spawn().await;
    put_patients(&app, 3).await;
    // A transaction holding a write lock in another database of the same server must not
    // hold anything up.
    let elsewhere = TestDb::new().await;
    let mut other = PgConnection::connect(&elsewhere.url).await.unwrap();
    sqlx::query("CREATE TABLE resources (x int)")
        .execute(&mut other)
        .await
        .unwrap();
    let mut other_tx = other.begin().await.unwrap();
    sqlx::query("INSERT INTO resources VALUES (1)")
        .execute(&mut *other_tx)
        .await
        .unwrap();

    let writer = open_writer(&app, "late").await;
    let status_url = kick_off(&app, "/$export?_type=Patient").await;
    progress_until(&app, &status_url, |p| {
        p == "planning: waiting for 1 write transaction open since kick-off"
    })
    .await;
    let exported: i64 =
        sqlx::query_scalar("SELECT count(*) FROM export_tasks WHERE kind <> 'plan'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(exported, 0, "nothing is planned while a writer is open");

    writer.commit().await.unwrap();
    let manifest = wait_manifest(&app, &status_url).await;
    let files = download_all(&app, &manifest).await;
    let got = resources_by_key(&files);
    let late = &got["Patient/late"];
    assert!(
        late["meta"]["lastUpdated"].as_str().unwrap()
            <= manifest["transactionTime"].as_str().unwrap()
    );
    assert_eq!(got.len(), 4, "{:?}", got.keys());

    // The next export starting at that transaction time does not list it again.
    let since = manifest["transactionTime"].as_str().unwrap();
    let next = export_files(&app, &format!("/$export?_type=Patient&_since={since}")).await;
    assert!(resources_by_key(&next).is_empty());
    other_tx.rollback().await.unwrap();
}

#[tokio::test]
async fn x_progress_names_each_phase() {
    let app = TestApp::spawn_with(|c| {
        c.export.workers = 0;
        c.export.part_size = 20;
    })
    .await;
    load_generated(&app, 1).await;
    let status_url = kick_off(&app, "/$export?_type=Observation").await;
    let response = app.client.get(&status_url).send().await.unwrap();
    assert_eq!(response.headers()["x-progress"], "queued");

    let _workers = app
        .spawn_sibling(|c| {
            c.export.workers = 1;
            c.export.throttle_ms = 100;
        })
        .await;
    let running = progress_until(&app, &status_url, |p| p.ends_with("exporting Observation")).await;
    let (percent, rest) = running.split_once("%, ").unwrap();
    assert!(percent.parse::<u32>().unwrap() < 100, "{running}");
    assert!(
        rest.ends_with(" files written; exporting Observation"),
        "{running}"
    );
    wait_manifest(&app, &status_url).await;
}

#[tokio::test]
async fn cancelling_a_planning_job_fences_its_worker_and_answers_404() {
    let app = TestApp::spawn_with(|c| c.export.workers = 1).await;
    put_patients(&app, 2).await;
    let writer = open_writer(&app, "held").await;
    let status_url = kick_off(&app, "/$export?_type=Patient").await;
    progress_until(&app, &status_url, |p| p.contains("waiting for 1 write")).await;

    assert_eq!(
        app.client
            .delete(&status_url)
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    assert_outcome(app.client.get(&status_url).send().await.unwrap(), 404).await;
    let cancelled = job_rows(&app, &status_url).await;
    writer.commit().await.unwrap();

    // The only worker has let go of the cancelled plan once it runs another job.
    export_files(&app, "/$export?_type=Patient").await;
    assert_eq!(
        cancelled,
        job_rows(&app, &status_url).await,
        "the cancelled job changed"
    );
    assert!(
        cancelled
            .iter()
            .all(|row| row.contains(r#""status":"cancelled""#))
    );
    assert_outcome(app.client.delete(&status_url).send().await.unwrap(), 404).await;
}

#[tokio::test]
async fn cancelling_a_running_job_stops_its_worker_at_once_and_sweeps_its_files() {
    // Ten minutes between parts: only the cancel notification can free the worker in time.
    let app = TestApp::spawn_with(|c| {
        c.export.workers = 1;
        c.export.part_size = 20;
        c.export.throttle_ms = 600_000;
    })
    .await;
    load_generated(&app, 1).await;
    let status_url = kick_off(&app, "/$export?_type=Observation").await;
    rows_until(
        &app,
        "SELECT count(*) > 0 FROM export_parts WHERE resources IS NOT NULL",
    )
    .await;
    let folder: String = sqlx::query_scalar("SELECT container || '/' || folder FROM export_jobs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(app.storage.path().join(&folder).exists());

    assert_eq!(
        app.client
            .delete(&status_url)
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    assert!(!app.storage.path().join(&folder).exists(), "files swept");
    assert_outcome(app.client.get(&status_url).send().await.unwrap(), 404).await;
    let cancelled = job_rows(&app, &status_url).await;

    // A job that needs no throttled second part: its plan is done once the worker is free.
    let next = kick_off(&app, "/$export?_type=Patient").await;
    rows_until(
        &app,
        &format!(
            "SELECT bool_or(status = 'done') FROM export_tasks
             WHERE kind = 'plan' AND job_id = '{}'",
            job_id(&next)
        ),
    )
    .await;
    assert_eq!(
        cancelled,
        job_rows(&app, &status_url).await,
        "the cancelled job changed"
    );
    assert!(
        !app.storage.path().join(&folder).exists(),
        "nothing written after the cancel"
    );
}

#[tokio::test]
async fn a_lease_lost_through_the_heartbeat_stops_the_worker() {
    // Heartbeats every second; ten minutes between parts.
    let app = TestApp::spawn_with(|c| {
        c.export.workers = 1;
        c.export.part_size = 20;
        c.export.throttle_ms = 600_000;
        c.export.stale_after_secs = 4;
    })
    .await;
    load_generated(&app, 1).await;
    kick_off(&app, "/$export?_type=Observation").await;
    rows_until(
        &app,
        "SELECT count(*) > 0 FROM export_parts WHERE resources IS NOT NULL",
    )
    .await;
    // Another worker takes the task over (and holds it for an hour).
    let taken: i64 = sqlx::query_scalar(
        "UPDATE export_tasks SET attempt = attempt + 1, leased_until = now() + interval '1 hour'
         WHERE status = 'running' AND kind = 'export' RETURNING id",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let before: String =
        sqlx::query_scalar("SELECT row_to_json(t)::text FROM export_tasks t WHERE id = $1")
            .bind(taken)
            .fetch_one(&app.pool)
            .await
            .unwrap();

    let next = kick_off(&app, "/$export?_type=Patient").await;
    rows_until(
        &app,
        &format!(
            "SELECT bool_or(status = 'done') FROM export_tasks
             WHERE kind = 'plan' AND job_id = '{}'",
            job_id(&next)
        ),
    )
    .await;
    let after: String =
        sqlx::query_scalar("SELECT row_to_json(t)::text FROM export_tasks t WHERE id = $1")
            .bind(taken)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(before, after, "the worker wrote after losing its lease");
    let committed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM export_parts WHERE task_id = $1 AND resources IS NOT NULL",
    )
    .bind(taken)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(committed, 1);
}

#[tokio::test]
async fn a_storage_that_fails_every_attempt_fails_the_job() {
    let app = TestApp::spawn_with(|c| c.export.max_attempts = 2).await;
    put_patients(&app, 2).await;
    // A file where the container's folder should be: every part fails to be created.
    std::fs::write(app.storage.path().join("blocked"), b"not a folder").unwrap();
    let status_url = kick_off(&app, "/$export?_type=Patient&_container=blocked").await;
    let response = wait_finished(&app, &status_url).await;
    let message = assert_outcome(response, 500).await;
    assert!(message.contains("export failed"), "{message}");
    let failures: i32 = sqlx::query_scalar("SELECT max(failures) FROM export_tasks")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(failures, 2);
}

#[tokio::test]
async fn expires_is_the_finish_plus_the_retention() {
    let app = TestApp::spawn_with(|c| c.export.retention_secs = 7200).await;
    put_patients(&app, 1).await;
    let status_url = kick_off(&app, "/$export").await;
    wait_manifest(&app, &status_url).await;
    let response = app.client.get(&status_url).send().await.unwrap();
    let expires = response.headers()["expires"].to_str().unwrap().to_string();
    let expected: String = sqlx::query_scalar(
        "SELECT to_char((finished_at + interval '7200 seconds') AT TIME ZONE 'UTC',
                        'Dy, DD Mon YYYY HH24:MI:SS \"GMT\"')
         FROM export_jobs",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(expires, expected);
}

#[tokio::test]
async fn a_429_slot_is_freed_when_a_job_ends() {
    let app = TestApp::spawn_with(|c| {
        c.export.max_active_jobs = 1;
        c.export.workers = 0;
    })
    .await;
    put_patients(&app, 1).await;
    let first = kick_off(&app, "/$export").await;
    let busy = kick_off_request(&app, "/$export", "respond-async", None).await;
    assert_eq!(busy.status(), 429);
    assert!(busy.headers().contains_key("retry-after"));

    let workers = app.spawn_sibling(|_| {}).await;
    wait_manifest(&app, &first).await;
    let second = kick_off(&app, "/$export").await;
    workers.cancel();
    // Cancelling frees it too.
    assert_eq!(
        app.client.delete(&second).send().await.unwrap().status(),
        202
    );
    kick_off(&app, "/$export").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_right_after_kick_off_never_deadlocks_with_a_claim() {
    let app = TestApp::spawn_with(|c| {
        c.export.workers = 2;
        c.export.poll_interval_ms = 50;
    })
    .await;
    put_patients(&app, 3).await;
    // The workers claim on the kick-off's NOTIFY while the DELETE takes the job: thousands of
    // times, every cancel is answered 202 at once.
    for round in 0..2000 {
        let status_url = kick_off(&app, "/$export?_type=Patient").await;
        let started = std::time::Instant::now();
        let response = app.client.delete(&status_url).send().await.unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        assert_eq!(status, 202, "round {round}: {body}");
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "round {round}: a cancel waited {:?}",
            started.elapsed()
        );
    }
    let unfinished: i64 =
        sqlx::query_scalar("SELECT count(*) FROM export_jobs WHERE status <> 'cancelled'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(unfinished, 0, "a cancelled job went on");
    rows_until(
        &app,
        "SELECT count(*) = 0 FROM export_tasks WHERE status IN ('queued', 'running')",
    )
    .await;

    // Ten cancels of one job at once: each 202 or 404, none waiting for a deadlock to be found.
    let status_url = kick_off(&app, "/$export?_type=Patient").await;
    let cancels = (0..10).map(|_| {
        let request = app.client.delete(&status_url);
        async move {
            let started = std::time::Instant::now();
            let status = request.send().await.unwrap().status().as_u16();
            (status, started.elapsed())
        }
    });
    let answers = futures::future::join_all(cancels).await;
    assert!(answers.iter().any(|(s, _)| *s == 202), "{answers:?}");
    for (status, took) in answers {
        assert!(status == 202 || status == 404, "{status}");
        assert!(
            took < Duration::from_millis(900),
            "a concurrent cancel took {took:?}"
        );
    }
}

/// A small filesystem of its own (tmpfs), unmounted when dropped.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(bytes: usize) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount (the tests run as root)");
        assert!(status.success(), "mounting a tmpfs needs root");
        SmallDisk(dir)
    }

    fn files(&self) -> usize {
        let mut count = 0;
        let mut dirs = vec![self.0.path().to_path_buf()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                if entry.path().is_dir() {
                    dirs.push(entry.path());
                } else {
                    count += 1;
                }
            }
        }
        count
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

#[tokio::test]
async fn a_failed_export_removes_its_files_after_attempts_that_back_off() {
    let disk = SmallDisk::mount(256 * 1024);
    let app = TestApp::spawn_with(|c| {
        c.storage.dir = disk.0.path().display().to_string();
        c.export.max_attempts = 3;
        c.export.retry_backoff_secs = 1;
        c.export.part_size = 100_000;
    })
    .await;
    load_generated(&app, 3).await;
    let started = std::time::Instant::now();
    // The Patients fit; the Observations fill the disk, every attempt.
    let status_url = kick_off(&app, "/$export?_type=Patient,Observation").await;
    let response = wait_finished(&app, &status_url).await;
    assert_outcome(response, 500).await;
    // Three attempts, 1 s then 2 s apart.
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "attempts did not back off: {:?}",
        started.elapsed()
    );
    let failures: i32 = sqlx::query_scalar("SELECT max(failures) FROM export_tasks")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(failures, 3);
    let committed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM export_parts WHERE resources IS NOT NULL")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(committed >= 1, "no file was written before the failure");
    // Its files are gone: the disk is free for the next export.
    assert_eq!(disk.files(), 0, "a failed export kept its files");
    let again = kick_off(&app, "/$export?_type=Patient").await;
    wait_manifest(&app, &again).await;
}

/// A status poll with the bulk headers: its status, `X-Export-Status`, and its body.
async fn poll(app: &TestApp, status_url: &str) -> (u16, Option<String>, reqwest::Response) {
    let response = app.client.get(status_url).send().await.unwrap();
    let export_status = response
        .headers()
        .get("x-export-status")
        .map(|v| v.to_str().unwrap().to_string());
    (response.status().as_u16(), export_status, response)
}

/// A kick-off whose `Prefer` asks for separate export status, in two headers as RFC 7240 allows.
async fn kick_off_separate(app: &TestApp, path: &str) -> String {
    let response = app
        .client
        .get(app.url(path))
        .header("accept", "application/fhir+json")
        .header("prefer", "Respond-Async")
        .header("prefer", "separate-export-status")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let applied: Vec<String> = response
        .headers()
        .get_all("preference-applied")
        .iter()
        .flat_map(|v| v.to_str().unwrap().split(',').map(|t| t.trim().to_string()))
        .collect();
    assert_eq!(applied, ["respond-async", "separate-export-status"]);
    response.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn separate_export_status_answers_200_and_puts_the_jobs_status_in_a_header() {
    let app = TestApp::spawn().await;
    load_generated(&app, 2).await;
    let status_url = kick_off_separate(&app, "/$export?_type=Patient").await;
    let manifest = loop {
        let (status, export_status, response) = poll(&app, &status_url).await;
        assert_eq!(status, 200, "the status request itself worked");
        match export_status.as_deref() {
            Some("202 Accepted") => {
                assert!(response.headers().contains_key("x-progress"));
                assert!(response.headers().contains_key("retry-after"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Some("200 OK") => {
                assert!(response.headers().contains_key("expires"));
                break json(response).await;
            }
            other => panic!("X-Export-Status {other:?}"),
        }
    };
    let files = download_all(&app, &manifest).await;
    assert_eq!(
        files.iter().map(|f| f.text.lines().count()).sum::<usize>(),
        2
    );
    // What fails is the poll itself: its own code.
    let unknown = app.url(&format!("/export/{}", uuid::Uuid::new_v4()));
    assert_outcome(app.client.get(&unknown).send().await.unwrap(), 404).await;
}

#[tokio::test]
async fn separate_export_status_reports_a_failed_job_as_200_with_its_outcome() {
    let app = TestApp::spawn_with(|c| c.export.workers = 0).await;
    let separate = kick_off_separate(&app, "/$export").await;
    let plain = kick_off(&app, "/$export").await;
    let (status, export_status, response) = poll(&app, &separate).await;
    assert_eq!(
        (status, export_status.as_deref()),
        (200, Some("202 Accepted"))
    );
    assert_eq!(response.headers()["x-progress"], "queued");
    // A v2 client's job answers as before.
    let (status, export_status, _) = poll(&app, &plain).await;
    assert_eq!((status, export_status), (202, None));

    let correlation = uuid::Uuid::new_v4();
    sqlx::query(
        "UPDATE export_jobs SET status = 'failed', error = 'a test failure', error_id = $1,
                finished_at = now(), expires_at = now() + interval '1 hour'",
    )
    .bind(correlation)
    .execute(&app.pool)
    .await
    .unwrap();
    let (status, export_status, response) = poll(&app, &separate).await;
    assert_eq!(status, 200);
    assert_eq!(export_status.as_deref(), Some("500 Internal Server Error"));
    let text = assert_outcome(response, 200).await;
    assert!(text.contains(&correlation.to_string()), "{text}");
    let (status, export_status, _) = poll(&app, &plain).await;
    assert_eq!((status, export_status), (500, None));
}
