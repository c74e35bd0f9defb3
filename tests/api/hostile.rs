//! Hostile requests, over real HTTP: huge kick-offs answered at once, half-sent requests and
//! idle connections closed, the connection cap, request timeouts that spare downloads, atomic
//! per-client quotas, per-route body limits, the open default refused, unknown paths, container
//! allow-lists, and internal errors that show only a correlation id.

use std::time::{Duration, Instant};

use crate::common::{keys::*, *};
use fhir_export::auth::config::{AuthMode, ClientConfig};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// `n` Patients `p0`…, loaded through `load`.
async fn load_patients(app: &TestApp, n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("Patient.ndjson");
    let lines: Vec<String> = (0..n)
        .map(|i| json!({"resourceType": "Patient", "id": format!("p{i}")}).to_string())
        .collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let args = fhir_export::cli::load::LoadArgs {
        paths: vec![],
        skip_invalid: false,
        batch_size: 5000,
        writers: 2,
        online: false,
        base_url: None,
    };
    fhir_export::cli::load::load_files(&app.pool, vec![file], &args)
        .await
        .unwrap();
}

fn patient_parameters(ids: impl Iterator<Item = String>) -> Value {
    let parameter: Vec<Value> = ids
        .map(|id| json!({"name": "patient", "valueReference": {"reference": format!("Patient/{id}")}}))
        .collect();
    json!({"resourceType": "Parameters", "parameter": parameter})
}

#[tokio::test]
async fn a_hundred_thousand_patients_and_members_are_answered_at_once() {
    let app = TestApp::spawn_with(|c| c.export.workers = 1).await;
    load_patients(&app, 100_000).await;

    let all = patient_parameters((0..100_000).map(|i| format!("p{i}")));
    let started = Instant::now();
    let response = post_kick_off(&app, "/Patient/$export", &all, "respond-async").await;
    eprintln!("100,000 patient references: {:?}", started.elapsed());
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    let status_url = content_location(&response);

    let too_many = patient_parameters((0..100_001).map(|i| format!("p{i}")));
    let message = assert_outcome(
        post_kick_off(&app, "/Patient/$export", &too_many, "respond-async").await,
        400,
    )
    .await;
    assert!(message.contains("export.max_patients"), "{message}");

    // A Group of all of them, resolved in one query per level and stored once with the job.
    let member: Vec<Value> = (0..100_000)
        .map(|i| json!({"entity": {"reference": format!("Patient/p{i}")}}))
        .collect();
    let group = json!({"resourceType": "Group", "id": "everyone", "type": "person",
        "actual": true, "member": member});
    assert_eq!(app.put_json("/Group/everyone", &group).await.status(), 201);
    let started = Instant::now();
    let group_url = kick_off(&app, "/Group/everyone/$export?_type=Patient").await;
    eprintln!("Group of 100,000 members: {:?}", started.elapsed());

    for url in [status_url, group_url] {
        let manifest = wait_manifest(&app, &url).await;
        let count: u64 = manifest["output"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o["type"] == "Patient")
            .map(|o| o["count"].as_u64().unwrap())
            .sum();
        assert_eq!(count, 100_000, "{url}");
    }
}

/// Reads until the server closes the connection; `Err` if it is still open after `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Result<(), ()> {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(()),
            Ok(Ok(_)) => continue, // a 408 or the like, then the close
            Err(_) => return Err(()),
        }
    }
}

fn address(app: &TestApp) -> String {
    app.base.trim_start_matches("http://").to_string()
}

#[tokio::test]
async fn half_sent_requests_and_idle_connections_are_closed() {
    let app = TestApp::spawn_with(|c| c.server.header_read_timeout_secs = 1).await;
    let mut half_sent = Vec::new();
    for _ in 0..300 {
        let mut stream = TcpStream::connect(address(&app)).await.unwrap();
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            .await
            .unwrap();
        half_sent.push(stream);
    }
    for stream in &mut half_sent {
        assert!(
            closed_within(stream, Duration::from_secs(10)).await.is_ok(),
            "a half-sent request kept its connection"
        );
    }
    // A finished request's keep-alive connection, left idle, is closed too.
    let mut idle = TcpStream::connect(address(&app)).await.unwrap();
    idle.write_all(b"GET /metadata HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    assert!(
        closed_within(&mut idle, Duration::from_secs(10))
            .await
            .is_ok()
    );
    // The server still answers.
    assert_eq!(app.get("/health").await.status(), 200);
}

#[tokio::test]
async fn beyond_the_connection_cap_clients_wait_their_turn() {
    let app = TestApp::spawn_with(|c| {
        c.server.max_connections = 5;
        c.server.header_read_timeout_secs = 3;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(TcpStream::connect(address(&app)).await.unwrap());
    }
    let mut waiting = TcpStream::connect(address(&app)).await.unwrap();
    waiting
        .write_all(b"GET /metadata HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let early =
        tokio::time::timeout(Duration::from_secs(1), waiting.read_to_end(&mut answer)).await;
    assert!(early.is_err(), "answered while five connections were open");
    // The header timeout closes the five idle ones; then the sixth is served.
    tokio::time::timeout(Duration::from_secs(20), waiting.read_to_end(&mut answer))
        .await
        .expect("served once the others closed")
        .unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    drop(held);
}

#[tokio::test]
async fn a_slow_request_times_out_but_a_slow_download_does_not() {
    let app = TestApp::spawn_with(|c| {
        c.server.request_timeout_secs = 1;
        c.export.part_size = 100_000;
    })
    .await;
    load_generated(&app, 3).await;
    let id: String = sqlx::query_scalar(
        "SELECT id FROM resources WHERE resource_type = 'Patient' AND is_current LIMIT 1",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    // Another transaction holds the resource: the PUT waits past the request timeout.
    let mut holder = app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM resources WHERE id = $1 AND is_current FOR UPDATE")
        .bind(&id)
        .execute(&mut *holder)
        .await
        .unwrap();
    let body = json!({"resourceType": "Patient", "id": id});
    let message = assert_outcome(app.put_json(&format!("/Patient/{id}"), &body).await, 503).await;
    assert!(message.contains("server.request_timeout_secs"), "{message}");
    holder.rollback().await.unwrap();
    let versions: i64 = sqlx::query_scalar("SELECT count(*) FROM resources WHERE id = $1")
        .bind(&id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(versions, 1, "the timed-out write left nothing");

    let manifest = wait_manifest(&app, &kick_off(&app, "/$export?_type=Observation").await).await;
    let url = manifest["output"][0]["url"].as_str().unwrap();
    let expected = manifest["output"][0]["count"].as_u64().unwrap();
    let mut response = app.client.get(url).send().await.unwrap();
    let (mut lines, started) = (0, Instant::now());
    while let Some(chunk) = response.chunk().await.unwrap() {
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
        // Slow well past the request timeout, then at full speed.
        if started.elapsed() < Duration::from_secs(2) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(
        started.elapsed() > Duration::from_secs(1),
        "the download was not slow enough"
    );
    assert_eq!(lines, expected, "the download was cut");
}

const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_kick_offs_never_pass_either_quota() {
    let (a, b) = (Key::rsa("a-key"), Key::ec("b-key"));
    let client = |id: &str, key: &Key| ClientConfig {
        id: id.into(),
        scopes: vec!["system/*.read".into()],
        jwks: jwks(&[key]),
        jwks_url: String::new(),
    };
    let clients = vec![client("a", &a), client("b", &b)];
    let app = TestApp::spawn_with(move |c| {
        c.export.workers = 0;
        c.export.max_active_jobs = 6;
        c.export.max_active_jobs_per_client = 4;
        c.auth.mode = AuthMode::Smart;
        c.auth.token_secret = SECRET.into();
        c.auth.clients = clients;
    })
    .await;
    let burst = |token: String| {
        let app = &app;
        futures::future::join_all((0..50).map(move |_| {
            let token = token.clone();
            async move {
                let response =
                    kick_off_request(app, "/$export", "respond-async", Some(&token)).await;
                let status = response.status().as_u16();
                (status, response.text().await.unwrap())
            }
        }))
    };
    let token_a = smart_token(&app, &a, "a", "system/*.read").await;
    let answers = burst(token_a).await;
    let accepted = answers.iter().filter(|(s, _)| *s == 202).count();
    assert_eq!(accepted, 4, "client a's quota");
    for (status, body) in answers.iter().filter(|(s, _)| *s != 202) {
        assert_eq!(*status, 429, "{body}");
        assert!(body.contains("export.max_active_jobs_per_client"), "{body}");
    }
    // Another client still gets in, up to what is left overall.
    let token_b = smart_token(&app, &b, "b", "system/*.read").await;
    let answers = burst(token_b).await;
    assert_eq!(
        answers.iter().filter(|(s, _)| *s == 202).count(),
        2,
        "the total quota"
    );
    assert!(
        answers
            .iter()
            .filter(|(s, _)| *s == 429)
            .all(|(_, body)| body.contains("export.max_active_jobs)"))
    );
    let per_owner: Vec<(String, i64)> =
        sqlx::query_as("SELECT owner, count(*) FROM export_jobs GROUP BY owner ORDER BY owner")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(per_owner, vec![("a".to_string(), 4), ("b".to_string(), 2)]);
}

#[tokio::test]
async fn without_auth_all_callers_are_one_client() {
    let app = TestApp::spawn_with(|c| c.export.workers = 0).await;
    let answers = futures::future::join_all(
        (0..10).map(|_| kick_off_request(&app, "/$export", "respond-async", None)),
    )
    .await;
    let accepted = answers.iter().filter(|r| r.status() == 202).count();
    assert_eq!(accepted, 4, "export.max_active_jobs_per_client = 4");
}

#[tokio::test]
async fn limits_and_body_sizes_are_named_in_their_answers() {
    let app = TestApp::spawn_with(|c| {
        c.server.max_kickoff_bytes = 4096;
        c.export.max_type_filters = 3;
    })
    .await;
    let big = patient_parameters((0..200).map(|i| format!("p{i}")));
    let message = assert_outcome(
        post_kick_off(&app, "/Patient/$export", &big, "respond-async").await,
        413,
    )
    .await;
    assert!(message.contains("server.max_kickoff_bytes"), "{message}");

    let filters: Vec<String> = (0..4).map(|i| format!("Patient?_id=p{i}")).collect();
    let path = format!("/$export?_typeFilter={}", filters.join(","));
    let response = kick_off_request(&app, &path, "respond-async", None).await;
    let message = assert_outcome(response, 400).await;
    assert!(message.contains("export.max_type_filters"), "{message}");
    // The same entry many times is one entry.
    let same = vec!["Patient?_id=p1"; 50].join(",");
    kick_off(&app, &format!("/$export?_typeFilter={same}")).await;

    // The token endpoint reads 64 KiB at most, whatever the write limit.
    let form = format!("grant_type=client_credentials&scope={}", "x".repeat(70_000));
    let response = app
        .client
        .post(app.url("/auth/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
}

#[tokio::test]
async fn containers_outside_the_allowed_patterns_are_refused() {
    let app =
        TestApp::spawn_with(|c| c.storage.allowed_containers = vec!["exports-*".into()]).await;
    let response =
        kick_off_request(&app, "/$export?_container=public", "respond-async", None).await;
    let message = assert_outcome(response, 403).await;
    assert!(message.contains("storage.allowed_containers"), "{message}");
    kick_off(&app, "/$export?_container=exports-team-a").await;
}

#[tokio::test]
async fn unknown_paths_are_404_and_wrong_methods_405() {
    let app = TestApp::spawn().await;
    for (method, path, status) in [
        (reqwest::Method::GET, "/_anything", 404),
        (reqwest::Method::POST, "/_anything", 404),
        (reqwest::Method::DELETE, "/NotAType/1", 404),
        (reqwest::Method::GET, "/a/b/c/d/e", 404),
        (reqwest::Method::GET, "/Patient", 405),
        (reqwest::Method::DELETE, "/metadata", 405),
        (reqwest::Method::PUT, "/export/x", 405),
        (reqwest::Method::GET, "/", 405),
    ] {
        let response = app
            .client
            .request(method.clone(), app.url(path))
            .send()
            .await
            .unwrap();
        assert_outcome(response, status).await;
        let _ = (method, path);
    }
}

#[tokio::test]
async fn an_internal_error_shows_only_a_correlation_id() {
    let app = TestApp::spawn().await;
    sqlx::query("ALTER TABLE resources RENAME TO resources_elsewhere")
        .execute(&app.pool)
        .await
        .unwrap();
    let response = app.get("/Patient/p1").await;
    let message = assert_outcome(response, 500).await;
    assert!(message.contains("correlation id"), "{message}");
    for leak in ["resources", "does not exist", "SQL", "postgres"] {
        assert!(!message.contains(leak), "{leak} in: {message}");
    }
    sqlx::query("ALTER TABLE resources_elsewhere RENAME TO resources")
        .execute(&app.pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn serve_refuses_an_open_api_off_loopback() {
    let db = TestDb::new().await;
    let port = crate::common::services::free_port();
    let serve = |allow: Option<&str>| {
        let mut command = std::process::Command::new(binary());
        command
            .arg("serve")
            .env("DATABASE_URL", &db.url)
            .env("FHIR_EXPORT_LISTEN", format!("0.0.0.0:{port}"))
            .env("FHIR_EXPORT_STORAGE_DIR", std::env::temp_dir())
            .env_remove("FHIR_EXPORT_CONFIG")
            .env_remove("FHIR_EXPORT_AUTH_MODE")
            .env_remove("FHIR_EXPORT_ALLOW_ANONYMOUS");
        if let Some(allow) = allow {
            command.env("FHIR_EXPORT_ALLOW_ANONYMOUS", allow);
        }
        command
    };
    let refused = serve(None).output().unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("auth.allow_anonymous"), "{stderr}");
    assert!(stderr.contains("FHIR_EXPORT_ALLOW_ANONYMOUS"), "{stderr}");

    let _server = ChildProcess::spawn(
        serve(Some("true"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    );
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{port}/metadata"))
            .send()
            .await
        {
            assert_eq!(r.status(), 200);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the allowed open server did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `request` on a new connection and reads what comes back until the server closes it
/// or `limit` passes.
async fn exchange(app: &TestApp, request: &[u8], limit: Duration) -> (Vec<u8>, bool) {
    let mut stream = TcpStream::connect(address(app)).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (answer, true),
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => return (answer, false),
        }
    }
}

#[tokio::test]
async fn an_http2_preface_is_closed_at_once_and_cannot_hold_the_connections() {
    let app = TestApp::spawn_with(|c| {
        c.server.max_connections = 4;
        c.server.header_read_timeout_secs = 30;
    })
    .await;
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    // Prior knowledge: the preface alone, then nothing. Each is closed at once (HTTP/1.1 only).
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut stream = TcpStream::connect(address(&app)).await.unwrap();
        stream.write_all(PREFACE).await.unwrap();
        held.push(stream);
    }
    for stream in &mut held {
        let started = Instant::now();
        assert!(
            closed_within(stream, Duration::from_secs(3)).await.is_ok(),
            "an HTTP/2 preface held its connection"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    // With a SETTINGS frame after it, too; and the server answers everyone else meanwhile.
    let settings = [PREFACE, &[0, 0, 0, 4, 0, 0, 0, 0, 0][..]].concat();
    let (answer, closed) = exchange(&app, &settings, Duration::from_secs(3)).await;
    assert!(closed, "closed");
    assert!(!answer.windows(8).any(|w| w == b"HTTP/2.0"), "{answer:?}");
    assert_eq!(app.get("/health").await.status(), 200);
}

#[tokio::test]
async fn a_stalled_download_is_disconnected_and_frees_its_connection() {
    let app = TestApp::spawn_with(|c| {
        c.server.write_timeout_secs = 2;
        c.server.header_read_timeout_secs = 2;
        c.server.max_connections = 1;
        c.export.part_size = 1_000_000;
    })
    .await;
    load_generated(&app, 25).await;
    let manifest = wait_manifest(&app, &kick_off(&app, "/$export?_type=Observation").await).await;
    let url = manifest["output"][0]["url"].as_str().unwrap().to_string();
    let path = url.trim_start_matches(&app.base).to_string();
    // A reader with a tiny window that stops after the headers.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket
        .connect(address(&app).parse().unwrap())
        .await
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    stalled.write_all(request.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    stalled.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    // The only connection is held: another client waits, then is served once the stalled
    // one is cut off (after write_timeout_secs without progress).
    let started = Instant::now();
    let health = tokio::time::timeout(Duration::from_secs(30), app.get("/health"))
        .await
        .expect("a stalled download held the only connection");
    assert_eq!(health.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "served while the download held the connection"
    );
    // The stalled reader finds its connection closed before the whole file came.
    let mut got = 12usize;
    let mut buf = vec![0u8; 65536];
    loop {
        match stalled.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    let expected: u64 = app
        .client
        .get(&url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .len() as u64;
    assert!(
        (got as u64) < expected,
        "the whole file came ({got} of {expected} bytes)"
    );
}

#[tokio::test]
async fn an_oversized_content_length_is_refused_before_the_body() {
    let app = TestApp::spawn().await;
    for (path, method) in [
        ("/Patient/p1", "PUT"),
        ("/$export", "POST"),
        ("/", "POST"),
        ("/auth/token", "POST"),
    ] {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/fhir+json\r\n\
             Accept: application/fhir+json\r\nPrefer: respond-async\r\n\
             Content-Length: 1073741824\r\nExpect: 100-continue\r\n\r\n"
        );
        let started = Instant::now();
        let (answer, _) = exchange(&app, request.as_bytes(), Duration::from_secs(2)).await;
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 413"), "{method} {path}: {text}");
        assert!(
            !text.contains("100 Continue"),
            "{method} {path} invited the upload: {text}"
        );
        assert!(text.contains("OperationOutcome"), "{text}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}

#[tokio::test]
async fn without_auth_only_this_servers_own_names_are_served() {
    let app = TestApp::spawn().await;
    let port = app.base.rsplit(':').next().unwrap().to_string();
    let with_host = |host: String| {
        let request = app.client.get(app.url("/Patient/p1")).header("host", host);
        async move { request.send().await.unwrap() }
    };
    // A page of rebound.example resolved to 127.0.0.1 sends its own name.
    for host in [
        "rebound.example".to_string(),
        format!("attacker.example:{port}"),
        format!("127.0.0.1.nip.io:{port}"),
    ] {
        let message = assert_outcome(with_host(host.clone()).await, 421).await;
        assert!(message.contains("Host"), "{host}: {message}");
    }
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        "[::1]".to_string(),
        format!("app.localhost:{port}"),
    ] {
        assert_eq!(with_host(host.clone()).await.status(), 404, "{host}");
    }
}

#[tokio::test]
async fn the_configured_public_host_is_served_and_auth_lifts_the_check() {
    let port = crate::common::services::free_port();
    let app = TestApp::spawn_with(|c| {
        c.server.listen = format!("127.0.0.1:{port}").parse().unwrap();
        c.server.public_url = "https://fhir.example.org/base".into();
    })
    .await;
    let metadata = format!("http://127.0.0.1:{port}/metadata");
    let request = |host: &'static str| app.client.get(&metadata).header("host", host).send();
    assert_eq!(request("fhir.example.org").await.unwrap().status(), 200);
    assert_eq!(request("other.example.org").await.unwrap().status(), 421);
    let key = Key::rsa("k1");
    let app = TestApp::spawn_with(|c| {
        c.auth.mode = AuthMode::Smart;
        c.auth.clients = vec![ClientConfig {
            id: "c1".into(),
            scopes: vec!["system/*.read".into()],
            jwks: jwks(&[&key]),
            jwks_url: String::new(),
        }];
    })
    .await;
    let response = app
        .client
        .get(app.url("/metadata"))
        .header("host", "any.example")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn export_output_never_goes_to_the_configuration_container() {
    let app = TestApp::spawn().await;
    let response = kick_off_request(
        &app,
        "/$export?_container=anonymization",
        "respond-async",
        None,
    )
    .await;
    let message = assert_outcome(response, 403).await;
    assert!(message.contains("de-identification"), "{message}");
    let body = json!({"resourceType": "Parameters", "parameter": [
        {"name": "_container", "valueString": "anonymization"}]});
    assert_outcome(
        post_kick_off(&app, "/$export", &body, "respond-async").await,
        403,
    )
    .await;
    let mut config = fhir_export::config::Config::default();
    config.storage.default_container = "anonymization".into();
    assert!(config.validate().is_err());
}

#[tokio::test]
async fn page_and_signed_link_urls_refuse_hostile_values_with_4xx() {
    let app = TestApp::spawn_with(|c| {
        c.export.output_urls = fhir_export::config::OutputUrls::Signed;
    })
    .await;
    put(&app, json!({"resourceType": "Patient", "id": "p"})).await;
    let status_url = kick_off(&app, "/$export?_type=Patient&allowPartialManifests=true").await;
    let manifest = wait_manifest(&app, &status_url).await;
    let link = manifest["output"][0]["url"].as_str().unwrap().to_string();
    let long = "9".repeat(10_000);
    let job = status_url.rsplit('/').next().unwrap().to_string();
    let hostile = [
        format!("{status_url}?page=%00"),
        format!("{status_url}?page=%FF"),
        format!("{status_url}?page={long}"),
        format!("{status_url}?page=1%0A"),
        link.replace("expires=", "expires=%00"),
        link.replace("signature=", "signature=%FF"),
        link.replace("expires=", &format!("expires={long}")),
        format!(
            "{}&signature={long}",
            link.split("&signature").next().unwrap()
        ),
        app.url(&format!(
            "/export-files/{job}/..%2F..%2Fetc%2Fpasswd?expires=1&signature=x"
        )),
        app.url(&format!("/export-files/{job}/Patient-1.ndjson")),
        app.url(&format!(
            "/export-files/not-a-job/Patient-1.ndjson?expires={long}&signature=x"
        )),
    ];
    for url in hostile {
        let response = app.client.get(&url).send().await.unwrap();
        let status = response.status().as_u16();
        assert!(
            (400..500).contains(&status),
            "{status} for {}",
            &url[..url.len().min(120)]
        );
    }
    // The real link still opens.
    assert_eq!(app.client.get(&link).send().await.unwrap().status(), 200);
    for (name, value) in [
        ("organizeOutputBy", "Patient%00"),
        ("allowPartialManifests", "true%00"),
    ] {
        let response = kick_off_request(
            &app,
            &format!("/$export?{name}={value}"),
            "respond-async",
            None,
        )
        .await;
        assert_outcome(response, 400).await;
    }
}
