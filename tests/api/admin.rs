//! The jobs page, rendered by a real headless browser (Debian's `chromium`) on a running
//! export: rows, parameters (escaped), progress, the Cancel button; who may see it.

use std::time::Duration;

use crate::common::*;
use fhir_export::auth::config::AuthMode;

/// The DOM after the browser has parsed and laid out the page. (Asynchronous: the server
/// answers from this test's runtime.)
async fn browser_dom(url: &str) -> String {
    let run = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--dump-dom",
            url,
        ])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("chromium answers within a minute")
        .expect("chromium runs (scripts/test installs it)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

const HOSTILE: &str = "Patient?name=<img src=x onerror=alert(1)>";

#[tokio::test]
async fn the_jobs_page_shows_a_running_export_escapes_parameters_and_cancels() {
    // Small parts and a pause between them: the export runs for a while.
    let app = TestApp::spawn_with(|c| {
        c.export.part_size = 5;
        c.export.throttle_ms = 300;
    })
    .await;
    load_generated(&app, 3).await;
    let encoded: String = form_urlencoded::byte_serialize(HOSTILE.as_bytes()).collect();
    let hostile = kick_off(
        &app,
        &format!("/$export?_type=Patient&_typeFilter={encoded}"),
    )
    .await;
    let running = kick_off(&app, "/$export").await;
    let job_of = |url: &str| url.rsplit('/').next().unwrap().to_string();
    let (hostile, running) = (job_of(&hostile), job_of(&running));
    // Wait until the long export has written something.
    for _ in 0..100 {
        if committed_parts(&app.pool).await > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let dom = browser_dom(&app.url("/admin/jobs")).await;
    assert!(dom.contains(&running), "{dom}");
    assert!(dom.contains(&hostile), "{dom}");
    assert!(
        dom.contains("<meta http-equiv=\"refresh\""),
        "refreshes while jobs run"
    );
    // The hostile filter is text on the page, not markup.
    assert!(dom.contains("&lt;img src=x onerror=alert(1)&gt;"), "{dom}");
    assert!(!dom.contains("<img"), "{dom}");
    // The running job's row: its state, progress per type, and its Cancel form.
    let row_start = dom
        .find(&format!("<a href=\"/admin/jobs/{running}\">"))
        .unwrap();
    let row = &dom[row_start..dom[row_start..].find("</tr>").unwrap() + row_start];
    assert!(row.contains("running"), "{row}");
    assert!(row.contains("Patient: "), "{row}");
    assert!(row.contains(" files"), "{row}");
    let action = format!("/admin/jobs/{running}/cancel");
    assert!(row.contains(&format!("action=\"{action}\"")), "{row}");
    assert!(row.contains("method=\"post\""), "{row}");

    // The job page lists its tasks.
    let job_dom = browser_dom(&app.url(&format!("/admin/jobs/{running}"))).await;
    assert!(job_dom.contains("Tasks"), "{job_dom}");
    assert!(job_dom.contains("<td>plan</td>"), "{job_dom}");
    assert!(job_dom.contains("<td>export</td>"), "{job_dom}");

    // A form posted from another site is refused; the page's own form cancels.
    let forged = app
        .client
        .post(app.url(&action))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    let cancelled = app
        .client
        .post(app.url(&action))
        .header("origin", app.url(""))
        .send()
        .await
        .unwrap();
    // Redirected back to the list.
    assert_eq!(cancelled.status(), 200);
    assert!(cancelled.url().path().ends_with("/admin/jobs"));
    let state: String =
        sqlx::query_scalar("SELECT status::text FROM export_jobs WHERE id = $1::uuid")
            .bind(&running)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(state, "cancelled");
    let dom = browser_dom(&app.url("/admin/jobs")).await;
    let row_start = dom
        .find(&format!("<a href=\"/admin/jobs/{running}\">"))
        .unwrap();
    let row = &dom[row_start..dom[row_start..].find("</tr>").unwrap() + row_start];
    assert!(row.contains("cancelled"), "{row}");
    assert!(!row.contains("Cancel</button>"), "{row}");
}

#[tokio::test]
async fn with_auth_the_jobs_page_needs_a_token() {
    let app = TestApp::spawn_with(|c| {
        c.auth.mode = AuthMode::Smart;
        c.auth.token_secret = "a secret of at least thirty-two bytes!!".into();
    })
    .await;
    for path in [
        "/admin/jobs",
        "/admin/jobs/00000000-0000-0000-0000-000000000000",
    ] {
        assert_eq!(app.get(path).await.status(), 401, "{path}");
    }
    let forged = app
        .client
        .get(app.url("/admin/jobs"))
        .bearer_auth("not.a.token")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
}

#[tokio::test]
async fn without_auth_the_jobs_page_answers_only_this_machine() {
    let app = TestApp::spawn_with(|c| {
        c.server.listen = "0.0.0.0:0".parse().unwrap();
        c.auth.allow_anonymous = true;
    })
    .await;
    let port = app.base.rsplit(':').next().unwrap().to_string();
    // This machine's own address that is not loopback: the request arrives from it.
    let output = std::process::Command::new("hostname")
        .arg("-I")
        .output()
        .unwrap();
    let addresses = String::from_utf8(output.stdout).unwrap();
    let ip = addresses
        .split_whitespace()
        .find(|a| {
            a.parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| !ip.is_loopback())
        })
        .expect("a non-loopback IPv4 address");
    let remote = app
        .client
        .get(format!("http://{ip}:{port}/admin/jobs"))
        .send()
        .await
        .unwrap();
    assert_eq!(remote.status(), 403);
    let local = app
        .client
        .get(format!("http://127.0.0.1:{port}/admin/jobs"))
        .send()
        .await
        .unwrap();
    assert_eq!(local.status(), 200);
}
