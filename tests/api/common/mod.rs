//! Test harness: a fresh database per test and the real server on a free port.

pub mod keys;
mod r4_schema;
pub mod services;

pub use r4_schema::R4Schema;

use std::{path::PathBuf, time::Duration};

use fhir_export::{Server, config::Config};
use reqwest::{Client, Response};
use serde_json::Value;
use sqlx::{Connection, PgConnection, PgPool};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

/// The server that creates test databases: `DATABASE_URL`, else the local default.
pub fn admin_url() -> String {
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
    with_database(&base, "postgres")
}

/// `url` with its database name replaced.
pub fn with_database(url: &str, name: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = head.find("://").map_or(0, |i| i + 3);
    let host_part = match head[scheme_end..].find('/') {
        Some(i) => &head[..scheme_end + i],
        None => head,
    };
    format!("{host_part}/{name}{query}")
}

/// A database that exists for one test and is dropped after it.
pub struct TestDb {
    pub url: String,
    pub name: String,
    admin: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        TestDb::new_on(&admin_url()).await
    }

    /// On the server of `admin` (a URL of its `postgres` database).
    pub async fn new_on(admin: &str) -> TestDb {
        let name = format!("fhir_export_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(admin)
            .await
            .expect("Postgres must answer at DATABASE_URL (scripts/test starts one)");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        TestDb {
            url: with_database(admin, &name),
            name,
            admin: admin.to_string(),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (name, admin) = (self.name.clone(), self.admin.clone());
        // Drop runs inside the test's runtime: use a thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut admin) = PgConnection::connect(&admin).await {
                    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    let _ = sqlx::query(&sql).execute(&mut admin).await;
                }
            });
        })
        .join();
    }
}

/// A running server with its own database and storage folder.
pub struct TestApp {
    pub base: String,
    pub client: Client,
    pub pool: PgPool,
    pub config: Config,
    pub storage: TempDir,
    shutdown: CancellationToken,
    // Last: dropped after the server stopped.
    pub db: TestDb,
}

pub fn test_config(db_url: &str, storage: &std::path::Path) -> Config {
    let mut config = Config::default();
    config.database.url = db_url.to_string();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.export.workers = 2;
    config.export.poll_interval_ms = 200;
    config.storage.dir = storage.display().to_string();
    config
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        TestApp::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(adjust: impl FnOnce(&mut Config)) -> TestApp {
        TestApp::spawn_on(TestDb::new().await, adjust).await
    }

    /// An app on a database of the caller's (e.g. on a private cluster).
    pub async fn spawn_on(db: TestDb, adjust: impl FnOnce(&mut Config)) -> TestApp {
        let storage = tempfile::tempdir().unwrap();
        let mut config = test_config(&db.url, storage.path());
        adjust(&mut config);
        let server = Server::build(config.clone()).await.expect("server builds");
        let base = server.base_url().to_string();
        let shutdown = CancellationToken::new();
        tokio::spawn(server.run(shutdown.clone()));
        let pool = PgPool::connect(&db.url).await.unwrap();
        let client = Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        TestApp {
            base,
            client,
            pool,
            config,
            storage,
            shutdown,
            db,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    pub async fn delete(&self, path: &str) -> Response {
        self.client.delete(self.url(path)).send().await.unwrap()
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.send_json(reqwest::Method::POST, path, body).await
    }

    /// The body of a file by its absolute URL (a manifest's), as text.
    pub async fn text_at(&self, url: &str) -> String {
        self.client
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> Response {
        self.send_json(reqwest::Method::PUT, path, body).await
    }

    pub async fn send_json(&self, method: reqwest::Method, path: &str, body: &Value) -> Response {
        self.client
            .request(method, self.url(path))
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }
}

impl TestApp {
    /// Stops the app's server (API and workers); the database and storage stay.
    pub fn stop_server(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Writes `resource` with PUT at its own type and id; panics unless that succeeds.
pub async fn put(app: &TestApp, resource: Value) {
    let path = format!(
        "/{}/{}",
        resource["resourceType"].as_str().unwrap(),
        resource["id"].as_str().unwrap()
    );
    let status = app.put_json(&path, &resource).await.status();
    assert!(status.is_success(), "{path}: {status}");
}

/// Asserts an OperationOutcome with `status`, returning its first diagnostics text.
pub async fn assert_outcome(response: Response, status: u16) -> String {
    let got = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let text = response.text().await.unwrap();
    assert_eq!(got, status, "unexpected status; body: {text}");
    assert!(
        content_type.starts_with("application/fhir+json"),
        "content-type {content_type}"
    );
    let body: Value = serde_json::from_str(&text).expect("an OperationOutcome is JSON");
    assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
    body["issue"][0]["diagnostics"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Output files committed so far, over all jobs. (0 while the database does not answer.)
pub async fn committed_parts(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM export_parts WHERE resources IS NOT NULL")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

/// Waits until `n` output files are committed.
pub async fn wait_for_parts(pool: &PgPool, n: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while committed_parts(pool).await < n {
        assert!(
            std::time::Instant::now() < deadline,
            "no worker wrote {n} parts"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Attempts spent by failures, over all tasks.
pub async fn task_failures(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT coalesce(sum(failures), 0)::bigint FROM export_tasks")
        .fetch_one(pool)
        .await
        .unwrap()
}

pub async fn json(response: Response) -> Value {
    let text = response.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The path of the built `fhir-export` binary.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fhir-export"))
}

/// A GET kick-off with the bulk headers, `prefer` and, if given, a bearer token.
pub async fn kick_off_request(
    app: &TestApp,
    path_and_query: &str,
    prefer: &str,
    token: Option<&str>,
) -> Response {
    let mut request = app
        .client
        .get(app.url(path_and_query))
        .header("accept", "application/fhir+json")
        .header("prefer", prefer);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

/// A POST kick-off with a `Parameters` body, the bulk headers and `prefer`.
pub async fn post_kick_off(app: &TestApp, path: &str, body: &Value, prefer: &str) -> Response {
    app.client
        .post(app.url(path))
        .header("accept", "application/fhir+json")
        .header("prefer", prefer)
        .header("content-type", "application/fhir+json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

/// Every `reference` string anywhere in a JSON value.
pub fn references(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                match (key.as_str(), inner) {
                    ("reference", Value::String(r)) => out.push(r.clone()),
                    _ => references(inner, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| references(i, out)),
        _ => {}
    }
}

/// The status URL a kick-off answered with.
pub fn content_location(response: &Response) -> String {
    response.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string()
}

/// Kicks off an export (GET) and returns the status URL.
pub async fn kick_off(app: &TestApp, path_and_query: &str) -> String {
    let response = kick_off_request(app, path_and_query, "respond-async", None).await;
    let status = response.status();
    let location = response
        .headers()
        .get("content-location")
        .map(|v| v.to_str().unwrap().to_string());
    let body = response.text().await.unwrap();
    assert_eq!(status, 202, "kick-off {path_and_query} failed: {body}");
    location.expect("a kick-off answers with Content-Location")
}

/// Polls a status URL until the manifest is there (or the export failed).
pub async fn wait_manifest(app: &TestApp, status_url: &str) -> Value {
    wait_manifest_as(app, status_url, None).await
}

/// `wait_manifest` with a bearer token.
pub async fn wait_manifest_as(app: &TestApp, status_url: &str, token: Option<&str>) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let mut request = app.client.get(status_url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        match response.status().as_u16() {
            202 => {
                let progress = response
                    .headers()
                    .get("x-progress")
                    .unwrap()
                    .to_str()
                    .unwrap();
                assert!(progress.len() < 100, "X-Progress too long: {progress}");
                assert!(response.headers().contains_key("retry-after"));
            }
            200 => {
                assert_eq!(response.headers()["content-type"], "application/json");
                assert!(response.headers().contains_key("expires"));
                return json(response).await;
            }
            other => panic!("status {other}: {}", response.text().await.unwrap()),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "export did not finish in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls a status URL until the job is no longer running (a manifest, or the failed job's
/// OperationOutcome) and returns that answer.
pub async fn wait_finished(app: &TestApp, status_url: &str) -> Response {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let response = app.client.get(status_url).send().await.unwrap();
        if response.status() != 202 {
            return response;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the job never finished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Kicks off an export, waits for it and downloads its output files.
pub async fn export_files(app: &TestApp, path_and_query: &str) -> Vec<OutputFile> {
    let status_url = kick_off(app, path_and_query).await;
    download_all(app, &wait_manifest(app, &status_url).await).await
}

/// One downloaded output file.
#[derive(Debug, Clone)]
pub struct OutputFile {
    pub resource_type: String,
    pub name: String,
    pub count: u64,
    pub text: String,
}

/// Downloads every output file of a manifest through the server.
pub async fn download_all(app: &TestApp, manifest: &Value) -> Vec<OutputFile> {
    let mut files = Vec::new();
    for entry in manifest["output"].as_array().unwrap() {
        let url = entry["url"].as_str().unwrap();
        assert!(
            url.starts_with(&app.base),
            "{url} is not absolute on this server"
        );
        let response = app.client.get(url).send().await.unwrap();
        assert_eq!(response.status(), 200, "{url}");
        assert_eq!(
            response.headers()["content-type"],
            "application/fhir+ndjson"
        );
        files.push(OutputFile {
            resource_type: entry["type"].as_str().unwrap().to_string(),
            name: url.rsplit('/').next().unwrap().to_string(),
            count: entry["count"].as_u64().unwrap(),
            text: response.text().await.unwrap(),
        });
    }
    files
}

/// `Type/id` → resource, over all files; panics on a duplicate.
pub fn resources_by_key(files: &[OutputFile]) -> std::collections::BTreeMap<String, Value> {
    let mut all = std::collections::BTreeMap::new();
    for f in files {
        for line in f.text.lines() {
            let r: Value = serde_json::from_str(line).unwrap();
            assert_eq!(
                r["resourceType"],
                f.resource_type.as_str(),
                "{} holds another type",
                f.name
            );
            let key = format!(
                "{}/{}",
                r["resourceType"].as_str().unwrap(),
                r["id"].as_str().unwrap()
            );
            assert!(all.insert(key.clone(), r).is_none(), "{key} exported twice");
        }
    }
    all
}

/// Generates `patients` patients and loads them into the app's database; returns the lines of
/// each generated file by type.
pub async fn load_generated(
    app: &TestApp,
    patients: u32,
) -> std::collections::BTreeMap<String, Vec<Value>> {
    use fhir_export::cli::{generate, load};
    let dir = tempfile::tempdir().unwrap();
    generate::generate(&generate::GenerateArgs {
        patients,
        seed: 7,
        out: dir.path().to_path_buf(),
    })
    .unwrap();
    let files = load::collect_files(&[dir.path().to_path_buf()]).unwrap();
    let args = load::LoadArgs {
        paths: vec![],
        skip_invalid: false,
        batch_size: 1000,
        writers: 2,
        online: false,
        base_url: Some(app.base.clone()),
    };
    load::load_files(&app.pool, files.clone(), &args)
        .await
        .unwrap();
    let mut by_type = std::collections::BTreeMap::new();
    for f in files {
        let t = f
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .split('.')
            .next()
            .unwrap()
            .to_string();
        let lines: Vec<Value> = std::fs::read_to_string(&f)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        by_type.insert(t, lines);
    }
    by_type
}

/// Runs `fhir-export serve` as a separate process on the same database and storage.
pub fn spawn_process(app: &TestApp, env: &[(&str, &str)]) -> ChildProcess {
    let mut command = std::process::Command::new(binary());
    command
        .arg("serve")
        .env("DATABASE_URL", &app.db.url)
        .env("FHIR_EXPORT_LISTEN", "127.0.0.1:0")
        .env("FHIR_EXPORT_STORAGE_DIR", app.storage.path())
        .env_remove("FHIR_EXPORT_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    ChildProcess::spawn(&mut command)
}

/// A child process that cannot outlive its test: dropped (an assertion failed, the test ended),
/// it is woken if stopped and killed.
pub struct ChildProcess {
    child: std::process::Child,
}

impl ChildProcess {
    pub fn spawn(command: &mut std::process::Command) -> ChildProcess {
        ChildProcess {
            child: command.spawn().expect("the child process starts"),
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`-STOP`, `-CONT`, `-TERM`, `-KILL`).
    pub fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {sig} failed");
    }

    /// kill -9, and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Has it ended?
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &self.child.id().to_string()])
                .status();
            self.kill();
        }
    }
}

impl TestApp {
    /// Starts another server (in this process) on the same database and storage, e.g. to add
    /// workers to an API-only app. It stops when the returned token is cancelled.
    pub async fn spawn_sibling(&self, adjust: impl FnOnce(&mut Config)) -> CancellationToken {
        let mut config = self.config.clone();
        config.export.workers = 2;
        adjust(&mut config);
        let server = Server::build(config).await.expect("sibling builds");
        let token = CancellationToken::new();
        tokio::spawn(server.run(token.clone()));
        token
    }
}

pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Claims of a valid SMART client assertion by `client` for `app`.
pub fn assertion_claims(app: &TestApp, client: &str) -> Value {
    serde_json::json!({
        "iss": client,
        "sub": client,
        "aud": app.url("/auth/token"),
        "exp": keys::now() + 240,
        "jti": uuid::Uuid::new_v4().to_string(),
    })
}

/// The form of a `client_credentials` token request.
pub fn grant<'a>(assertion: &'a str, scope: &'a str) -> Vec<(&'static str, &'a str)> {
    vec![
        ("grant_type", "client_credentials"),
        ("client_assertion_type", ASSERTION_TYPE),
        ("client_assertion", assertion),
        ("scope", scope),
    ]
}

/// A SMART access token for `client`, signing its assertion with `key`.
pub async fn smart_token(app: &TestApp, key: &keys::Key, client: &str, scope: &str) -> String {
    let assertion = key.sign(&assertion_claims(app, client), None);
    let response = app
        .client
        .post(app.url("/auth/token"))
        .form(&grant(&assertion, scope))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    json(response).await["access_token"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The indexes and constraints of `resources`, as SQL.
pub async fn index_definitions(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT indexdef FROM pg_indexes WHERE tablename = 'resources'
         UNION ALL
         SELECT conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint
         WHERE conrelid = 'resources'::regclass
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}
