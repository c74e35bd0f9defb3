//! `allowPartialManifests=true` (Bulk Data STU3 R7-R8): manifest pages of the files complete so
//! far while the export runs, each fixed once served, linked by `next`, kept in Postgres.

use std::{collections::BTreeMap, time::Duration};

use crate::common::*;
use fhir_export::server::Server;
use serde_json::Value;

/// A page as served: its status and body (None: no body).
async fn fetch_page(app: &TestApp, url: &str) -> (u16, Option<Value>) {
    let response = app.client.get(url).send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        (!text.is_empty()).then(|| serde_json::from_str(&text).unwrap()),
    )
}

/// A page without its `link` (the one change a served page may see).
fn without_link(page: &Value) -> Value {
    let mut page = page.clone();
    page.as_object_mut().unwrap().remove("link");
    page
}

fn next_link(page: &Value) -> Option<String> {
    let link = page.get("link")?.as_array().unwrap();
    assert_eq!(link.len(), 1, "{link:?}");
    assert_eq!(link[0]["relation"], "next");
    Some(link[0]["url"].as_str().unwrap().to_string())
}

/// Follows a paged manifest from the status URL, checking that every page served before is
/// served again unchanged (but for a `link` added) and that every file listed downloads at
/// once with the bytes it had when first listed. Returns whether the export had completed.
async fn crawl(
    app: &TestApp,
    status_url: &str,
    pages: &mut BTreeMap<String, Value>,
    files: &mut BTreeMap<String, String>,
) -> (bool, usize) {
    let mut url = status_url.to_string();
    let mut served_while_running = 0;
    loop {
        let (status, body) = fetch_page(app, &url).await;
        let Some(body) = body else {
            assert_eq!(
                (status, url.as_str()),
                (202, status_url),
                "only a first page has no body"
            );
            return (false, 0);
        };
        assert!(status == 200 || status == 202, "{url}: {status} {body}");
        if status == 202 {
            served_while_running += 1;
        }
        match pages.get(&url) {
            Some(first) => assert_eq!(without_link(first), without_link(&body), "{url} changed"),
            None => {
                pages.insert(url.clone(), body.clone());
            }
        }
        for item in body["output"].as_array().unwrap() {
            let file = item["url"].as_str().unwrap();
            let text = app.text_at(file).await;
            let first = files
                .entry(file.to_string())
                .or_insert_with(|| text.clone());
            assert_eq!(first, &text, "{file} changed after it was listed");
        }
        match next_link(&body) {
            Some(next) => url = next,
            None => return (status == 200, served_while_running),
        }
    }
}

#[tokio::test]
async fn partial_manifests_list_files_while_the_export_runs_and_pages_never_change() {
    let app = TestApp::spawn_with(|c| {
        c.export.part_size = 40;
        c.export.manifest_page_size = 3;
        c.export.workers = 1;
        // Slow enough that polls see it running with files done.
        c.export.throttle_ms = 150;
    })
    .await;
    load_generated(&app, 1).await;
    let plain = wait_manifest(&app, &kick_off(&app, "/$export").await).await;
    let plain = resources_by_key(&download_all(&app, &plain).await);

    let status_url = kick_off(&app, "/$export?allowPartialManifests=true").await;
    let (mut pages, mut files) = (BTreeMap::new(), BTreeMap::new());
    let mut partial_pages = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (done, while_running) = crawl(&app, &status_url, &mut pages, &mut files).await;
        partial_pages += while_running;
        if done {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the export never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        partial_pages > 1,
        "no manifest page was served while the export ran"
    );
    // The pages hold every file once, and the files the plain export's resources.
    let mut listed = BTreeMap::new();
    for page in pages.values() {
        assert!(page["output"].as_array().unwrap().len() <= 3);
        for item in page["output"].as_array().unwrap() {
            assert!(
                listed
                    .insert(item["url"].as_str().unwrap().to_string(), item.clone())
                    .is_none()
            );
        }
        assert_eq!(page["requiresAccessToken"], false);
        assert_eq!(
            page["request"],
            app.url("/$export?allowPartialManifests=true")
        );
    }
    assert_eq!(listed.len(), files.len());
    let mut got = BTreeMap::new();
    for (url, item) in &listed {
        let resource_type = item["type"].as_str().unwrap();
        for line in files[url].lines() {
            let resource: Value = serde_json::from_str(line).unwrap();
            assert_eq!(resource["resourceType"], resource_type);
            let key = format!("{resource_type}/{}", resource["id"].as_str().unwrap());
            assert!(got.insert(key, resource).is_none());
        }
    }
    assert_eq!(got, plain);

    // Pages are the database's: a server started anew serves them unchanged.
    let address = app.base.trim_start_matches("http://").to_string();
    app.stop_server();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut config = app.config.clone();
    config.server.listen = address.parse().unwrap();
    let again = Server::build(config).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(again.run(stop.clone()));
    for (url, first) in &pages {
        let (status, body) = fetch_page(&app, url).await;
        assert_eq!(status, 200, "{url}");
        assert_eq!(
            without_link(first),
            without_link(&body.unwrap()),
            "{url} after a restart"
        );
    }
    stop.cancel();
}

#[tokio::test]
async fn page_urls_that_name_no_page_are_404_and_unpaged_jobs_have_no_pages() {
    let app = TestApp::spawn_with(|c| c.export.manifest_page_size = 2).await;
    load_generated(&app, 1).await;
    let paged = kick_off(
        &app,
        "/$export?allowPartialManifests=true&_type=Patient,Encounter,Observation,Condition",
    )
    .await;
    // Polls while it runs would make pages of what is done by then: wait without polling.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status: String = sqlx::query_scalar("SELECT status::text FROM export_jobs")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        if status == "completed" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the export never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let manifest = wait_manifest(&app, &paged).await;
    assert_eq!(manifest["output"].as_array().unwrap().len(), 2);
    let second = next_link(&manifest).expect("a second page");
    assert_eq!(second, format!("{paged}?page=2"));
    let (status, page) = fetch_page(&app, &second).await;
    assert_eq!(status, 200);
    assert!(
        next_link(page.as_ref().unwrap()).is_none(),
        "four files: two pages"
    );
    for bad in [
        "?page=3",
        "?page=0",
        "?page=-1",
        "?page=x",
        "?page=1&page=2",
        "?page=99999999999",
    ] {
        let response = app
            .client
            .get(format!("{paged}{bad}"))
            .send()
            .await
            .unwrap();
        assert_outcome(response, 404).await;
    }
    // A NUL is refused before any route sees it.
    let response = app
        .client
        .get(format!("{paged}?page=%00"))
        .send()
        .await
        .unwrap();
    assert_outcome(response, 400).await;
    let plain = kick_off(&app, "/$export?_type=Patient").await;
    wait_manifest(&app, &plain).await;
    let response = app
        .client
        .get(format!("{plain}?page=1"))
        .send()
        .await
        .unwrap();
    assert!(
        assert_outcome(response, 404)
            .await
            .contains("allowPartialManifests")
    );
}

#[tokio::test]
async fn with_separate_export_status_a_partial_page_is_a_200_saying_202_accepted() {
    let app = TestApp::spawn_with(|c| {
        c.export.part_size = 40;
        c.export.workers = 1;
        c.export.throttle_ms = 300;
    })
    .await;
    load_generated(&app, 1).await;
    let response = kick_off_request(
        &app,
        "/$export?allowPartialManifests=true",
        "respond-async, separate-export-status",
        None,
    )
    .await;
    assert_eq!(response.status(), 202);
    let status_url = content_location(&response);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let response = app.client.get(&status_url).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let job_status = response.headers()["x-export-status"]
            .to_str()
            .unwrap()
            .to_string();
        let body = response.text().await.unwrap();
        if job_status == "202 Accepted" && !body.is_empty() {
            let page: Value = serde_json::from_str(&body).unwrap();
            assert!(!page["output"].as_array().unwrap().is_empty());
            break;
        }
        assert_ne!(
            job_status, "200 OK",
            "the export ended before a partial page was seen"
        );
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_block_split_over_files_is_published_with_all_its_files_on_one_page() {
    let app = TestApp::spawn_with(|c| {
        c.export.part_size = 60;
        c.export.manifest_page_size = 2;
        c.export.workers = 1;
        c.export.throttle_ms = 50;
    })
    .await;
    load_generated(&app, 2).await;
    let status_url = kick_off(
        &app,
        "/Patient/$export?organizeOutputBy=Patient&allowPartialManifests=true",
    )
    .await;
    let (mut pages, mut files) = (BTreeMap::new(), BTreeMap::new());
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !crawl(&app, &status_url, &mut pages, &mut files).await.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the export never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut continued = 0;
    for page in pages.values() {
        assert_eq!(page["outputOrganizedBy"], "Patient");
        let urls: Vec<&str> = page["output"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["url"].as_str().unwrap())
            .collect();
        for item in page["output"].as_array().unwrap() {
            if let Some(next) = item["continuesInFile"].as_str() {
                assert!(
                    urls.contains(&next),
                    "{next} is not on the page that continues into it"
                );
                continued += 1;
            }
        }
    }
    assert!(continued > 0, "no block was split");
    assert_eq!(
        files.len(),
        pages
            .values()
            .map(|p| p["output"].as_array().unwrap().len())
            .sum::<usize>()
    );
}
