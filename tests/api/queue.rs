//! The queue's rules, checked directly on a real database: a stale attempt changes nothing, a
//! retried part keeps its file number, running out of attempts fails the job with an
//! OperationOutcome, a claim is one step, and kinds and states the code does not know are
//! refused by the database.

use std::time::Duration;

use crate::common::*;
use fhir_export::db::tasks::{self, Checkpoint, Fenced, HeldTask, PartDone, PlannedTask, TaskKind};

const LEASE: Duration = Duration::from_secs(60);
const RETENTION: Duration = Duration::from_secs(3600);
/// Failed attempts are claimable again at once.
const RETRY: tasks::Retry = tasks::Retry {
    backoff: Duration::ZERO,
    retention: RETENTION,
};

/// The API alone: the test is the only worker.
async fn api_only(max_attempts: i32) -> TestApp {
    TestApp::spawn_with(|c| {
        c.export.workers = 0;
        c.export.max_attempts = max_attempts;
    })
    .await
}

async fn claim(app: &TestApp) -> HeldTask {
    tasks::claim(&app.pool, "test-worker", LEASE)
        .await
        .unwrap()
        .expect("a queued task")
}

/// The lease of `held` runs out, and a rescuer finds it.
async fn expire_and_rescue(app: &TestApp, held: &HeldTask, max_attempts: i32) {
    sqlx::query("UPDATE export_tasks SET leased_until = now() - interval '1 second' WHERE id = $1")
        .bind(held.task.id)
        .execute(&app.pool)
        .await
        .unwrap();
    let rescued = tasks::rescue_expired(&app.pool, max_attempts, RETRY)
        .await
        .unwrap();
    assert_eq!(rescued.tasks.len(), 1);
}

/// Every row of the queue, as text.
async fn queue_rows(app: &TestApp) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT row_to_json(t)::text FROM export_tasks t
         UNION ALL SELECT row_to_json(p)::text FROM export_parts p
         UNION ALL SELECT row_to_json(j)::text FROM export_jobs j
         ORDER BY 1",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

fn is_lease_lost<T: std::fmt::Debug>(result: Result<T, Fenced>) -> bool {
    matches!(result, Err(Fenced::LeaseLost))
}

fn planned(kind: TaskKind, start: i64, end: i64) -> PlannedTask {
    PlannedTask {
        kind,
        resource_type: "Patient".into(),
        range_start: start,
        range_end: end,
        block_after: None,
        block_last: None,
        estimate: end - start,
    }
}

/// A checkpoint after the row with this seq.
fn at(seq: i64) -> Checkpoint {
    Checkpoint {
        seq,
        version: 1,
        ..Checkpoint::default()
    }
}

fn done(resources: i32, bytes: i64) -> PartDone {
    PartDone {
        resources,
        bytes,
        continues: false,
    }
}

#[tokio::test]
async fn a_stale_attempt_changes_nothing() {
    let app = api_only(5).await;
    kick_off(&app, "/$export?_type=Patient").await;
    let mut stale = claim(&app).await;
    assert_eq!(stale.reserve_part("Patient", 0).await.unwrap(), 1);
    expire_and_rescue(&app, &stale, 5).await;
    let fresh = claim(&app).await;
    assert_eq!(fresh.task.id, stale.task.id);
    assert_eq!(fresh.task.attempt, stale.task.attempt + 1);

    let before = queue_rows(&app).await;
    assert!(is_lease_lost(stale.heartbeat().await));
    assert!(is_lease_lost(stale.holds().await));
    assert!(is_lease_lost(stale.reserve_part("Patient", 1).await));
    assert!(is_lease_lost(
        stale.checkpoint(0, at(7), done(3, 300)).await
    ));
    assert!(is_lease_lost(stale.set_waiting_writers(2).await));
    let follow_ups = [planned(TaskKind::Export, 0, 10)];
    assert!(is_lease_lost(stale.finish(&follow_ups, RETENTION).await));
    assert!(is_lease_lost(stale.release().await));
    assert!(is_lease_lost(stale.fail("boom", 5, RETRY).await));
    assert!(is_lease_lost(stale.resume().await));
    assert_eq!(
        before,
        queue_rows(&app).await,
        "a stale attempt changed rows"
    );

    // The current holder is unaffected.
    fresh.heartbeat().await.unwrap();
    fresh.holds().await.unwrap();
}

#[tokio::test]
async fn a_retried_part_reserves_the_same_number() {
    let app = api_only(5).await;
    kick_off(&app, "/$export?_type=Patient").await;
    let plan = claim(&app).await;
    let follow_ups = [
        planned(TaskKind::Export, 0, 10),
        planned(TaskKind::Export, 10, 20),
    ];
    plan.finish(&follow_ups, RETENTION).await.unwrap();

    let first = claim(&app).await;
    let mut second = claim(&app).await;
    assert_eq!(first.reserve_part("Patient", 0).await.unwrap(), 1);
    assert_eq!(second.reserve_part("Patient", 0).await.unwrap(), 2);
    assert_eq!(first.reserve_part("Patient", 1).await.unwrap(), 3);
    second.checkpoint(0, at(15), done(5, 500)).await.unwrap();

    // The first task's worker dies; its retry rewrites the same files, then goes on.
    expire_and_rescue(&app, &first, 5).await;
    let mut retry = claim(&app).await;
    assert_eq!(retry.task.id, first.task.id);
    assert_eq!(retry.task.parts_done, 0);
    assert_eq!(retry.reserve_part("Patient", 0).await.unwrap(), 1);
    assert_eq!(retry.reserve_part("Patient", 1).await.unwrap(), 3);
    assert_eq!(retry.reserve_part("Patient", 2).await.unwrap(), 4);
    assert!(is_lease_lost(first.reserve_part("Patient", 2).await));

    // A checkpoint moves on exactly once per part: a replayed one is refused.
    retry.checkpoint(0, at(5), done(5, 500)).await.unwrap();
    assert_eq!(retry.task.parts_done, 1);
    let mut replay = retry.clone();
    replay.task.parts_done = 0;
    assert!(is_lease_lost(
        replay.checkpoint(0, at(5), done(5, 500)).await
    ));
    let counted: i64 = sqlx::query_scalar("SELECT sum(resources_done)::bigint FROM export_tasks")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(counted, 10);
}

#[tokio::test]
async fn running_out_of_attempts_fails_the_job_with_an_operation_outcome() {
    let app = api_only(2).await;
    let status_url = kick_off(&app, "/$export?_type=Patient").await;
    let failed = claim(&app)
        .await
        .fail("the first cause", 2, RETRY)
        .await
        .unwrap();
    assert!(failed.is_none(), "one failure of two");
    let polled = app.client.get(&status_url).send().await.unwrap();
    assert_eq!(polled.status(), 202, "one failure of two: still running");
    let failed = claim(&app)
        .await
        .fail("the second cause", 2, RETRY)
        .await
        .unwrap()
        .expect("the job failed");
    assert!(
        failed.error.contains("the second cause"),
        "{}",
        failed.error
    );
    // The client sees the correlation id, not the cause.
    let message = assert_outcome(app.client.get(&status_url).send().await.unwrap(), 500).await;
    assert!(message.contains("export failed"), "{message}");
    assert!(message.contains(&failed.error_id.to_string()), "{message}");
    assert!(!message.contains("the second cause"), "{message}");
    let (state, error): (String, String) =
        sqlx::query_as("SELECT status::text, error FROM export_jobs")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(state, "failed");
    assert!(
        error.contains("the plan failed after 2 attempts: the second cause"),
        "{error}"
    );
    assert!(
        tasks::claim(&app.pool, "test-worker", LEASE)
            .await
            .unwrap()
            .is_none(),
        "nothing of a failed job is claimed again"
    );

    // A rescue counts as a failed attempt too.
    let status_url = kick_off(&app, "/$export?_type=Observation").await;
    let held = claim(&app).await;
    expire_and_rescue(&app, &held, 1).await;
    let message = assert_outcome(app.client.get(&status_url).send().await.unwrap(), 500).await;
    assert!(message.contains("export failed"), "{message}");
}

#[tokio::test]
async fn a_claim_is_one_step_and_skips_cancelled_jobs() {
    let app = api_only(5).await;
    let first = kick_off(&app, "/$export?_type=Patient").await;
    kick_off(&app, "/$export?_type=Observation").await;
    let cancelled = app.client.delete(&first).send().await.unwrap();
    assert_eq!(cancelled.status(), 202);

    let held = claim(&app).await;
    let job_state: String =
        sqlx::query_scalar("SELECT status::text FROM export_jobs WHERE id = $1")
            .bind(held.task.job_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(job_state, "running", "the claim marked its job running");
    assert!(!first.ends_with(&held.task.job_id.to_string()));
    assert_eq!(held.task.kind, TaskKind::Plan);
    assert!(
        tasks::claim(&app.pool, "test-worker", LEASE)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn the_database_refuses_kinds_and_states_the_code_does_not_know() {
    let app = api_only(5).await;
    kick_off(&app, "/$export?_type=Patient").await;
    for sql in [
        "UPDATE export_tasks SET kind = 'bogus'",
        "UPDATE export_tasks SET status = 'paused'",
        "UPDATE export_jobs SET status = 'half-done'",
        "UPDATE export_jobs SET level = 'planet'",
    ] {
        let error = sqlx::query(sql).execute(&app.pool).await.unwrap_err();
        let code = error.as_database_error().and_then(|e| e.code());
        assert_eq!(code.as_deref(), Some("22P02"), "{sql}: {error}");
    }
}

/// Claims the task, fails it under `retry` and returns how long until it may be claimed again.
async fn fail_and_measure_backoff(app: &TestApp, retry: tasks::Retry) -> f64 {
    let failed = claim(app)
        .await
        .fail("a full disk", 5, retry)
        .await
        .unwrap();
    assert!(failed.is_none(), "one failure of five");
    sqlx::query_scalar("SELECT extract(epoch FROM run_after - now())::float8 FROM export_tasks")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_failed_attempt_waits_its_backoff_before_the_next_claim() {
    let app = api_only(5).await;
    kick_off(&app, "/$export?_type=Patient").await;
    let retry = tasks::Retry {
        backoff: Duration::from_secs(60),
        retention: RETENTION,
    };
    let waits = fail_and_measure_backoff(&app, retry).await;
    assert!((50.0..=60.0).contains(&waits), "first backoff {waits} s");
    let early = tasks::claim(&app.pool, "test-worker", LEASE).await.unwrap();
    assert!(early.is_none(), "claimed during its backoff");

    // Its time has come: claimable, and the second failure waits twice as long.
    sqlx::query("UPDATE export_tasks SET run_after = now() - interval '1 second'")
        .execute(&app.pool)
        .await
        .unwrap();
    let waits = fail_and_measure_backoff(&app, retry).await;
    assert!((110.0..=120.0).contains(&waits), "second backoff {waits} s");
}
