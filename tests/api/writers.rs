//! Writers of one resource serialize: concurrent PUTs, DELETEs and transaction Bundles each
//! become the next version (no 409, no gap); `If-Match` gives optimistic locking; a transaction
//! that fails while writing leaves nothing behind.

use std::collections::BTreeMap;

use crate::common::*;
use serde_json::{Value, json};

const RESOURCES: usize = 10;
const WRITERS: usize = 16;
const ROUNDS: usize = 30;

fn patient(id: &str, family: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "name": [{"family": family}]})
}

fn put_entry(resource: Value, if_match: Option<&str>) -> Value {
    let url = format!("Patient/{}", resource["id"].as_str().unwrap());
    let mut request = json!({"method": "PUT", "url": url});
    if let Some(tag) = if_match {
        request["ifMatch"] = json!(tag);
    }
    json!({"resource": resource, "request": request})
}

fn transaction(entries: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

/// Version ids of a resource, in order.
async fn versions(app: &TestApp, id: &str) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT version_id FROM resources WHERE resource_type = 'Patient' AND id = $1
         ORDER BY version_id",
    )
    .bind(id)
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_of_one_resource_each_become_the_next_version() {
    let app = TestApp::spawn_with(|c| c.export.workers = 0).await;
    let ids: Vec<String> = (0..RESOURCES).map(|i| format!("w{i}")).collect();
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let (client, base, ids) = (app.client.clone(), app.base.clone(), ids.clone());
        writers.spawn(async move {
            // Versions this writer added, per resource.
            let mut added: BTreeMap<String, usize> = BTreeMap::new();
            for round in 0..ROUNDS {
                let id = &ids[(w * 7 + round * 3) % RESOURCES];
                let family = format!("W{w}R{round}");
                let (status, body, versions) = match round % 5 {
                    3 => {
                        let r = client
                            .delete(format!("{base}/Patient/{id}"))
                            .send()
                            .await
                            .unwrap();
                        // 204: a tombstone version; 200: already deleted, nothing written.
                        let n = usize::from(r.status() == 204);
                        (r.status().as_u16(), r.text().await.unwrap(), vec![(id, n)])
                    }
                    4 => {
                        let other = &ids[(w + round) % RESOURCES];
                        let mut entries = vec![put_entry(patient(id, &family), None)];
                        if other != id {
                            entries.push(put_entry(patient(other, &family), None));
                        }
                        let n = entries.len();
                        let r = client
                            .post(format!("{base}/"))
                            .header("content-type", "application/fhir+json")
                            .body(transaction(entries).to_string())
                            .send()
                            .await
                            .unwrap();
                        let added = if n == 2 {
                            vec![(id, 1), (other, 1)]
                        } else {
                            vec![(id, 1)]
                        };
                        (r.status().as_u16(), r.text().await.unwrap(), added)
                    }
                    _ => {
                        let r = client
                            .put(format!("{base}/Patient/{id}"))
                            .header("content-type", "application/fhir+json")
                            .body(patient(id, &family).to_string())
                            .send()
                            .await
                            .unwrap();
                        (r.status().as_u16(), r.text().await.unwrap(), vec![(id, 1)])
                    }
                };
                assert!(
                    matches!(status, 200 | 201 | 204),
                    "writer {w} round {round}: {status} {body}"
                );
                for (id, n) in versions {
                    *added.entry(id.clone()).or_default() += n;
                }
            }
            added
        });
    }
    let mut expected: BTreeMap<String, usize> = BTreeMap::new();
    while let Some(added) = writers.join_next().await {
        for (id, n) in added.unwrap() {
            *expected.entry(id).or_default() += n;
        }
    }
    let mut total = 0;
    for id in &ids {
        let versions = versions(&app, id).await;
        let n = expected[id];
        assert_eq!(
            versions,
            (1..=n as i32).collect::<Vec<_>>(),
            "{id}: gapless versions"
        );
        total += n;
        let current: i64 =
            sqlx::query_scalar("SELECT count(*) FROM resources WHERE id = $1 AND is_current")
                .bind(id)
                .fetch_one(&app.pool)
                .await
                .unwrap();
        assert_eq!(current, 1, "{id}: exactly one current version");
    }
    assert!(total >= WRITERS * ROUNDS, "{total} versions written");
}

#[tokio::test]
async fn if_match_gives_optimistic_locking() {
    let app = TestApp::spawn_with(|c| c.export.workers = 0).await;
    let put = |tag: Option<&'static str>, family: &'static str| {
        let mut request = app
            .client
            .put(app.url("/Patient/p"))
            .header("content-type", "application/fhir+json")
            .body(patient("p", family).to_string());
        if let Some(tag) = tag {
            request = request.header("if-match", tag);
        }
        request.send()
    };
    // No current version: any If-Match fails.
    let message = assert_outcome(put(Some("W/\"1\""), "A").await.unwrap(), 412).await;
    assert!(message.contains("does not exist"), "{message}");
    assert_eq!(put(None, "A").await.unwrap().status(), 201);
    assert_eq!(put(Some("W/\"1\""), "B").await.unwrap().status(), 200);
    let message = assert_outcome(put(Some("W/\"1\""), "C").await.unwrap(), 412).await;
    assert!(message.contains("current version is 2"), "{message}");
    assert_eq!(put(Some("\"2\""), "D").await.unwrap().status(), 200);
    assert_outcome(put(Some("yesterday"), "E").await.unwrap(), 400).await;
    assert_eq!(versions(&app, "p").await, vec![1, 2, 3]);

    let delete = |tag: &'static str| {
        app.client
            .delete(app.url("/Patient/p"))
            .header("if-match", tag)
            .send()
    };
    assert_outcome(delete("W/\"2\"").await.unwrap(), 412).await;
    assert_eq!(delete("W/\"3\"").await.unwrap().status(), 204);
    assert_eq!(versions(&app, "p").await, vec![1, 2, 3, 4]);

    // In a batch, each entry stands alone.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        put_entry(patient("p", "F"), Some("W/\"3\"")),
        put_entry(patient("q", "G"), None),
    ]});
    let response = json(app.post_json("/", &batch).await).await;
    assert_eq!(
        response["entry"][0]["response"]["status"],
        "412 Precondition Failed"
    );
    assert_eq!(response["entry"][1]["response"]["status"], "201 Created");
    assert_eq!(versions(&app, "p").await, vec![1, 2, 3, 4]);
}

#[tokio::test]
async fn a_transaction_that_fails_while_writing_leaves_nothing_behind() {
    let app = TestApp::spawn_with(|c| c.export.workers = 0).await;
    assert_eq!(
        app.put_json("/Patient/kept", &patient("kept", "Old"))
            .await
            .status(),
        201
    );
    assert_eq!(
        app.put_json("/Patient/gone", &patient("gone", "Old"))
            .await
            .status(),
        201
    );
    let rows_before: Vec<String> =
        sqlx::query_scalar("SELECT row_to_json(r)::text FROM resources r ORDER BY 1")
            .fetch_all(&app.pool)
            .await
            .unwrap();

    // Valid in every entry; the second write is refused only once the first one is written
    // (the version check needs the lock on the current row).
    let bundle = transaction(vec![
        put_entry(patient("fresh", "New"), None),
        put_entry(patient("kept", "Newer"), Some("W/\"7\"")),
        json!({"request": {"method": "DELETE", "url": "Patient/gone"}}),
    ]);
    let message = assert_outcome(app.post_json("/", &bundle).await, 412).await;
    assert!(message.contains("Bundle.entry[1]"), "{message}");

    let rows_after: Vec<String> =
        sqlx::query_scalar("SELECT row_to_json(r)::text FROM resources r ORDER BY 1")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        rows_before, rows_after,
        "a failed transaction changed the store"
    );
    assert_eq!(app.get("/Patient/fresh").await.status(), 404);
    assert_eq!(app.get("/Patient/gone").await.status(), 200);
}

/// A transaction that waits for the lock of a resource that another writer then updates: the
/// row it waited for is no longer current when it gets it. It must become the version after
/// that writer's, not fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_queued_behind_another_writer_becomes_the_version_after_it() {
    let app = TestApp::spawn_with(|c| c.export.workers = 0).await;
    let mut entries: Vec<Value> = (0..50)
        .map(|i| put_entry(patient(&format!("t{i}"), "First"), None))
        .collect();
    assert_eq!(
        app.post_json("/", &transaction(entries.clone()))
            .await
            .status(),
        200
    );

    // Hold the current row of t7 so that both writers below queue for it, the PUT first.
    let mut holder = app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM resources WHERE id = 't7' AND is_current FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let waiting = async |n: i64| {
        for _ in 0..200 {
            let waiters: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&app.pool)
            .await
            .unwrap();
            if waiters >= n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("{n} writers never queued");
    };
    let put = tokio::spawn({
        let (client, url) = (app.client.clone(), app.url("/Patient/t7"));
        async move {
            client
                .put(url)
                .header("content-type", "application/fhir+json")
                .body(patient("t7", "Single").to_string())
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    waiting(1).await;
    for e in &mut entries {
        e["resource"]["name"][0]["family"] = json!("Second");
    }
    let bundle = tokio::spawn({
        let (client, url, body) = (app.client.clone(), app.url("/"), transaction(entries));
        async move {
            let r = client
                .post(url)
                .header("content-type", "application/fhir+json")
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    });
    waiting(2).await;
    holder.commit().await.unwrap();

    assert_eq!(put.await.unwrap(), 200);
    let (status, body) = bundle.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entry"][7]["response"]["etag"], "W/\"3\"");
    assert_eq!(versions(&app, "t7").await, vec![1, 2, 3]);
    let current = json(app.get("/Patient/t7").await).await;
    assert_eq!(current["name"][0]["family"], "Second");
    assert_eq!(versions(&app, "t8").await, vec![1, 2]);
}
