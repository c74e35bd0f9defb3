//! Export to Amazon S3 and Google Cloud Storage, against real servers each test starts for
//! itself: SeaweedFS's S3 gateway (which checks signatures) and fake-gcs-server. Objects are
//! listed through each server's own API (SeaweedFS's filer, GCS's JSON API), not the code under
//! test.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::common::services::{BUCKET, FakeGcs, S3_ACCESS_KEY, S3_SECRET_KEY, Seaweed};
use crate::common::*;
use fhir_export::{
    config::{Config, OutputUrls},
    storage::{AttemptTag, Storage, config::StorageKind},
};
use serde_json::{Value, json};

/// A test's own S3 or GCS server.
enum Cloud {
    S3(Seaweed),
    Gcs(FakeGcs),
}

impl Cloud {
    async fn s3() -> Cloud {
        // Every test SeaweedFS knows the same identity: the standard variables name it.
        // SAFETY: the same values in every test; nothing reads them concurrently with a change.
        unsafe {
            std::env::set_var("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY);
            std::env::set_var("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY);
        }
        Cloud::S3(Seaweed::start().await)
    }

    async fn gcs() -> Cloud {
        Cloud::Gcs(FakeGcs::start().await)
    }

    fn configure(&self, config: &mut Config) {
        match self {
            Cloud::S3(seaweed) => {
                config.storage.kind = StorageKind::S3;
                config.storage.s3.bucket = BUCKET.to_string();
                config.storage.s3.endpoint = seaweed.endpoint();
            }
            Cloud::Gcs(gcs) => {
                config.storage.kind = StorageKind::Gcs;
                config.storage.gcs.bucket = BUCKET.to_string();
                config.storage.gcs.endpoint = gcs.endpoint();
            }
        }
    }

    /// The environment that configures a `serve` process the same way.
    fn env(&self) -> Vec<(&'static str, String)> {
        match self {
            Cloud::S3(seaweed) => vec![
                ("FHIR_EXPORT_STORAGE", "s3".into()),
                ("FHIR_EXPORT_S3_BUCKET", BUCKET.into()),
                ("FHIR_EXPORT_S3_ENDPOINT", seaweed.endpoint()),
                ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY.into()),
                ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY.into()),
            ],
            Cloud::Gcs(gcs) => vec![
                ("FHIR_EXPORT_STORAGE", "gcs".into()),
                ("FHIR_EXPORT_GCS_BUCKET", BUCKET.into()),
                ("FHIR_EXPORT_GCS_ENDPOINT", gcs.endpoint()),
            ],
        }
    }

    async fn keys(&self, prefix: &str) -> BTreeSet<String> {
        match self {
            Cloud::S3(seaweed) => seaweed.keys(prefix).await,
            Cloud::Gcs(gcs) => gcs.keys(prefix).await,
        }
    }

    fn process(&self) -> &ChildProcess {
        match self {
            Cloud::S3(seaweed) => &seaweed.process,
            Cloud::Gcs(gcs) => &gcs.process,
        }
    }

    fn storage(&self) -> std::sync::Arc<dyn Storage> {
        let mut config = Config::default();
        self.configure(&mut config);
        fhir_export::storage::from_config(&config.storage).unwrap()
    }
}

fn unique_container() -> String {
    format!("t-{}", uuid::Uuid::new_v4().simple())
}

fn ids(
    loaded: &BTreeMap<String, Vec<Value>>,
    t: &str,
    keep: impl Fn(&Value) -> bool,
) -> Vec<String> {
    loaded[t]
        .iter()
        .filter(|r| keep(r))
        .map(|r| format!("{t}/{}", r["id"].as_str().unwrap()))
        .collect()
}

/// An export's resources' keys, each once (a duplicate panics), and the object keys of its
/// manifest's files: `{container}/{folder}/{file}`.
async fn exported(
    app: &TestApp,
    status_url: &str,
    container: &str,
) -> (Vec<String>, BTreeSet<String>) {
    let manifest = wait_manifest(app, status_url).await;
    let files = download_all(app, &manifest).await;
    let keys: Vec<String> = resources_by_key(&files).into_keys().collect();
    let folder = job_folder(app, status_url).await;
    let objects = files
        .iter()
        .map(|f| format!("{container}/{folder}/{}", f.name))
        .collect();
    (keys, objects)
}

/// The export's folder, from the job row.
async fn job_folder(app: &TestApp, status_url: &str) -> String {
    let job: uuid::Uuid = status_url.rsplit('/').next().unwrap().parse().unwrap();
    sqlx::query_scalar("SELECT folder FROM export_jobs WHERE id = $1")
        .bind(job)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

async fn exact_at_every_level(cloud: Cloud) {
    let app = TestApp::spawn_with(|c| {
        cloud.configure(c);
        c.export.part_size = 40;
    })
    .await;
    let loaded = load_generated(&app, 3).await;
    let member = loaded["Patient"][0]["id"].as_str().unwrap().to_string();
    put(
        &app,
        json!({"resourceType": "Group", "id": "g", "type": "person", "actual": true,
               "member": [{"entity": {"reference": format!("Patient/{member}")}}]}),
    )
    .await;
    let container = unique_container();
    let mut all_objects = BTreeSet::new();

    // System level: every type, in parts of at most 40.
    let system = kick_off(&app, &format!("/$export?_container={container}")).await;
    let (got, objects) = exported(&app, &system, &container).await;
    let mut expected: Vec<String> = loaded
        .keys()
        .flat_map(|t| ids(&loaded, t, |_| true))
        .collect();
    expected.push("Group/g".into());
    expected.sort();
    assert_eq!(got, expected);
    assert!(objects.len() > loaded.len(), "several parts of a type");
    all_objects.extend(objects);

    // Patient and Group level.
    let of_member = |r: &Value| {
        let mut refs = Vec::new();
        references(r, &mut refs);
        r["id"] == member.as_str() || refs.contains(&format!("Patient/{member}"))
    };
    for (path, keep) in [
        (
            "/Patient/$export",
            &(|_: &Value| true) as &dyn Fn(&Value) -> bool,
        ),
        ("/Group/g/$export", &of_member as &dyn Fn(&Value) -> bool),
    ] {
        let query = format!("{path}?_type=Patient,Observation&_container={container}");
        let status_url = kick_off(&app, &query).await;
        let (got, objects) = exported(&app, &status_url, &container).await;
        let mut expected = ids(&loaded, "Patient", keep);
        expected.extend(ids(&loaded, "Observation", keep));
        expected.sort();
        assert_eq!(got, expected, "{path}");
        all_objects.extend(objects);
    }
    // The bucket holds the manifests' files and nothing else: no partial or stray object.
    assert_eq!(cloud.keys(&format!("{container}/")).await, all_objects);

    // Cancelling (DELETE) an export removes its objects, and only them.
    let status_url = kick_off(
        &app,
        &format!("/$export?_type=Patient&_container={container}"),
    )
    .await;
    wait_manifest(&app, &status_url).await;
    assert_eq!(
        cloud.keys(&format!("{container}/")).await.len(),
        all_objects.len() + 1
    );
    assert_eq!(
        app.client
            .delete(&status_url)
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    assert_eq!(cloud.keys(&format!("{container}/")).await, all_objects);
}

#[tokio::test]
async fn s3_exports_are_exact_at_every_level() {
    exact_at_every_level(Cloud::s3().await).await;
}

#[tokio::test]
async fn gcs_exports_are_exact_at_every_level() {
    exact_at_every_level(Cloud::gcs().await).await;
}

/// Whose files the storage tests write.
const TAG: AttemptTag = AttemptTag {
    task: 1,
    attempt: 1,
};

async fn read_all(storage: &dyn Storage, container: &str, name: &str) -> Option<Vec<u8>> {
    use futures::TryStreamExt;
    let stream = storage.read(container, name).await.unwrap()?;
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
    Some(chunks.concat())
}

/// Multipart uploads: a crashed or fenced-out writer leaves nothing visible; a retry replaces
/// the object entirely; a small part is one PUT.
async fn parts_are_crash_safe_and_fenced(cloud: Cloud) {
    let storage = cloud.storage();
    let container = unique_container();
    let name = "folder/Observation-1.ndjson";
    // Three multipart parts of 8 MiB (the default part size) and a tail.
    let line = format!("{}\n", "x".repeat(1023));
    let big: Vec<u8> = line.repeat(8 * 1024 * 3 + 10).into_bytes();

    let mut first = storage.create(&container, name, TAG).await.unwrap();
    for chunk in big.chunks(64 * 1024) {
        first.write(chunk).await.unwrap();
    }
    assert!(first.commit(Box::pin(async { true })).await.unwrap());
    assert_eq!(read_all(&*storage, &container, name).await.unwrap(), big);

    // A crashed attempt: a part uploaded, never completed.
    let mut crashed = storage.create(&container, name, TAG).await.unwrap();
    crashed.write(&big[..9 * 1024 * 1024]).await.unwrap();
    drop(crashed);
    // A fenced-out attempt, large and small: nothing changes.
    for size in [9 * 1024 * 1024, 100] {
        let mut fenced = storage.create(&container, name, TAG).await.unwrap();
        fenced.write(&vec![b'y'; size]).await.unwrap();
        assert!(!fenced.commit(Box::pin(async { false })).await.unwrap());
    }
    assert_eq!(read_all(&*storage, &container, name).await.unwrap(), big);

    // The retry: same name, a small part, replaces the object.
    let mut retry = storage.create(&container, name, TAG).await.unwrap();
    retry
        .write(b"{\"resourceType\":\"Observation\"}\n")
        .await
        .unwrap();
    assert!(retry.commit(Box::pin(async { true })).await.unwrap());
    assert_eq!(
        read_all(&*storage, &container, name).await.unwrap(),
        b"{\"resourceType\":\"Observation\"}\n"
    );
    assert_eq!(
        cloud.keys(&format!("{container}/")).await,
        BTreeSet::from([format!("{container}/{name}")])
    );
    assert!(
        read_all(&*storage, &container, "folder/none.ndjson")
            .await
            .is_none()
    );
    storage.delete_container(&container).await.unwrap();
    assert!(cloud.keys(&format!("{container}/")).await.is_empty());
}

#[tokio::test]
async fn s3_parts_are_crash_safe_and_fenced() {
    parts_are_crash_safe_and_fenced(Cloud::s3().await).await;
}

#[tokio::test]
async fn gcs_parts_are_crash_safe_and_fenced() {
    parts_are_crash_safe_and_fenced(Cloud::gcs().await).await;
}

/// The storage stops answering for 30 s mid-export (SIGSTOP): the writers wait it out, the
/// output is exact and no attempt is spent.
async fn an_outage_is_ridden_out(cloud: Cloud) {
    let app = TestApp::spawn_with(|c| {
        cloud.configure(c);
        c.export.workers = 2;
        c.export.part_size = 20;
        c.export.throttle_ms = 100;
        c.export.max_attempts = 1;
        c.export.stale_after_secs = 3;
    })
    .await;
    let loaded = load_generated(&app, 1).await;
    let status_url = kick_off(&app, "/$export?_type=Observation").await;
    wait_for_parts(&app.pool, 2).await;
    cloud.process().signal("-STOP");
    tokio::time::sleep(Duration::from_secs(30)).await;
    cloud.process().signal("-CONT");

    let manifest = wait_manifest(&app, &status_url).await;
    let files = download_all(&app, &manifest).await;
    let got: Vec<String> = resources_by_key(&files).into_keys().collect();
    let mut expected = ids(&loaded, "Observation", |_| true);
    expected.sort();
    assert_eq!(got, expected);
    assert_eq!(
        task_failures(&app.pool).await,
        0,
        "the outage spent an attempt"
    );
}

#[tokio::test]
async fn s3_outage_of_30_s_is_ridden_out() {
    an_outage_is_ridden_out(Cloud::s3().await).await;
}

#[tokio::test]
async fn gcs_outage_of_30_s_is_ridden_out() {
    an_outage_is_ridden_out(Cloud::gcs().await).await;
}

/// A replica killed (-9) while it uploads is rescued by another: every resource once, part
/// numbers without gaps, no object but the manifest's in the bucket.
async fn a_killed_replica_is_rescued_exactly(cloud: Cloud) {
    let app = TestApp::spawn_with(|c| {
        cloud.configure(c);
        c.export.workers = 0;
        c.export.stale_after_secs = 2;
        c.export.part_size = 20;
    })
    .await;
    let loaded = load_generated(&app, 2).await;
    let container = unique_container();
    let status_url = kick_off(
        &app,
        &format!("/$export?_type=Observation,Patient&_container={container}"),
    )
    .await;
    let env = cloud.env();
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.extend([
        ("FHIR_EXPORT_WORKERS", "1"),
        ("FHIR_EXPORT_PART_SIZE", "20"),
        ("FHIR_EXPORT_THROTTLE_MS", "250"),
        ("FHIR_EXPORT_STALE_AFTER_SECS", "2"),
        ("FHIR_EXPORT_POLL_INTERVAL_MS", "200"),
    ]);
    let mut doomed = spawn_process(&app, &env);
    wait_for_parts(&app.pool, 3).await;
    doomed.kill();

    let _rescuer = app.spawn_sibling(|c| cloud.configure(c)).await;
    let (got, objects) = exported(&app, &status_url, &container).await;
    let mut expected = ids(&loaded, "Observation", |_| true);
    expected.extend(ids(&loaded, "Patient", |_| true));
    expected.sort();
    assert_eq!(got, expected);
    let failures: i32 = sqlx::query_scalar("SELECT max(failures) FROM export_tasks")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(failures, 1, "the killed task was rescued once");
    for t in ["Observation", "Patient"] {
        let mut numbers: Vec<u32> = objects
            .iter()
            .filter_map(|o| o.rsplit('/').next()?.strip_prefix(&format!("{t}-")))
            .map(|n| n.trim_end_matches(".ndjson").parse().unwrap())
            .collect();
        numbers.sort();
        assert_eq!(
            numbers,
            (1..=numbers.len() as u32).collect::<Vec<_>>(),
            "{t}"
        );
    }
    assert_eq!(cloud.keys(&format!("{container}/")).await, objects);
}

#[tokio::test]
async fn s3_replica_killed_mid_upload_is_rescued_exactly() {
    a_killed_replica_is_rescued_exactly(Cloud::s3().await).await;
}

#[tokio::test]
async fn gcs_replica_killed_mid_upload_is_rescued_exactly() {
    a_killed_replica_is_rescued_exactly(Cloud::gcs().await).await;
}

/// A service-account key file with a fresh RSA key (signing is local; the emulator takes any
/// token).
fn service_account_file(dir: &std::path::Path) -> std::path::PathBuf {
    use aws_lc_rs::encoding::AsDer;
    use base64::Engine;
    let key = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let der: aws_lc_rs::encoding::Pkcs8V1Der = key.as_der().unwrap();
    let body = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        lines.join("\n")
    );
    let path = dir.join("key.json");
    let file = json!({"type": "service_account", "private_key": pem, "private_key_id": "k1",
                      "client_email": "fhir-export@test.iam.gserviceaccount.com"});
    std::fs::write(&path, file.to_string()).unwrap();
    path
}

/// A Patient export's manifest and folder.
async fn patient_export(app: &TestApp, container: &str) -> (Value, String) {
    let query = format!("/$export?_type=Patient&_container={container}");
    let status_url = kick_off(app, &query).await;
    let manifest = wait_manifest(app, &status_url).await;
    (manifest, job_folder(app, &status_url).await)
}

#[tokio::test]
async fn s3_presigned_urls_download_without_credentials_and_refuse_tampering() {
    let cloud = Cloud::s3().await;
    let app = TestApp::spawn_with(|c| {
        cloud.configure(c);
        c.export.output_urls = OutputUrls::Sas;
        c.storage.s3.presigned_url_lifetime_secs = 600;
    })
    .await;
    populate(&app).await;
    let (manifest, _) = patient_export(&app, &unique_container()).await;
    assert_eq!(manifest["requiresAccessToken"], false);
    let url = manifest["output"][0]["url"].as_str().unwrap();
    let Cloud::S3(seaweed) = &cloud else {
        unreachable!()
    };
    assert!(
        url.starts_with(&format!("{}/{BUCKET}/", seaweed.endpoint())),
        "{url}"
    );
    assert!(url.contains("X-Amz-Signature="), "{url}");
    let expires: u64 = url
        .split("X-Amz-Expires=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (590..=600).contains(&expires),
        "the configured lifetime: {url}"
    );
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
    // The storage checks the signature: another object, or another signature, is refused.
    let other = url.replace("Patient-1.ndjson", "Patient-2.ndjson");
    assert_eq!(reqwest::get(&other).await.unwrap().status(), 403);
    let unsigned = url.split('?').next().unwrap();
    assert_eq!(reqwest::get(unsigned).await.unwrap().status(), 403);
}

#[tokio::test]
async fn s3_blob_urls_are_plain_object_urls_that_need_credentials() {
    let cloud = Cloud::s3().await;
    let app = TestApp::spawn_with(|c| {
        cloud.configure(c);
        c.export.output_urls = OutputUrls::Blob;
    })
    .await;
    populate(&app).await;
    let container = unique_container();
    let (manifest, folder) = patient_export(&app, &container).await;
    assert_eq!(manifest["requiresAccessToken"], true);
    let url = manifest["output"][0]["url"].as_str().unwrap();
    let Cloud::S3(seaweed) = &cloud else {
        unreachable!()
    };
    assert_eq!(
        url,
        format!(
            "{}/{BUCKET}/{container}/{folder}/Patient-1.ndjson",
            seaweed.endpoint()
        )
    );
    assert_eq!(reqwest::get(url).await.unwrap().status(), 403);
}

#[tokio::test]
async fn gcs_signed_and_object_urls_name_the_object() {
    let cloud = Cloud::gcs().await;
    let keys = tempfile::tempdir().unwrap();
    let key_file = service_account_file(keys.path());
    let app = TestApp::spawn_with(|c| {
        cloud.configure(c);
        c.storage.gcs.service_account_path = key_file.to_str().unwrap().to_string();
        c.export.output_urls = OutputUrls::Sas;
    })
    .await;
    populate(&app).await;
    let container = unique_container();
    let (manifest, folder) = patient_export(&app, &container).await;
    assert_eq!(manifest["requiresAccessToken"], false);
    let url = manifest["output"][0]["url"].as_str().unwrap();
    let Cloud::Gcs(gcs) = &cloud else {
        unreachable!()
    };
    let object = format!(
        "{}/{BUCKET}/{container}/{folder}/Patient-1.ndjson",
        gcs.endpoint()
    );
    assert!(url.starts_with(&format!("{object}?")), "{url}");
    for field in [
        "X-Goog-Algorithm=GOOG4-RSA-SHA256",
        "X-Goog-Credential=fhir-export%40test",
        "X-Goog-Expires=",
        "X-Goog-Signature=",
    ] {
        assert!(url.contains(field), "{field} in {url}");
    }
    // The emulator does not check signatures; the object is there under that name.
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");

    // Without a key that can sign, sas URLs are refused at startup with a clear message.
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&app.db.url, dir.path());
    cloud.configure(&mut config);
    config.export.output_urls = OutputUrls::Sas;
    let refused = fhir_export::Server::build(config)
        .await
        .err()
        .expect("refused");
    assert!(
        format!("{refused:#}").contains("output_urls = sas"),
        "{refused:#}"
    );
}

async fn populate(app: &TestApp) {
    for p in ["p1", "p2", "p3"] {
        put(app, json!({"resourceType": "Patient", "id": p})).await;
    }
}

/// What `serve` says when the storage cannot be used.
async fn refused_at_startup(cloud: &Cloud, adjust: impl FnOnce(&mut Config)) -> String {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&db.url, dir.path());
    cloud.configure(&mut config);
    adjust(&mut config);
    let refused = fhir_export::Server::build(config)
        .await
        .err()
        .expect("refused");
    format!("{refused:#}")
}

#[tokio::test]
async fn startup_refuses_a_missing_gcs_bucket_and_a_wrong_s3_secret_and_takes_keys_from_an_aws_profile()
 {
    let gcs = Cloud::gcs().await;
    let message =
        refused_at_startup(&gcs, |c| c.storage.gcs.bucket = "no-such-bucket".into()).await;
    assert!(
        message.contains("gs://no-such-bucket") && message.contains("check that the bucket exists"),
        "{message}"
    );
    // A wrong secret: SeaweedFS refuses the signature. (A missing S3 bucket is not tried:
    // SeaweedFS makes one on the first write.)
    let s3 = Cloud::s3().await;
    let Cloud::S3(seaweed) = &s3 else {
        unreachable!()
    };
    let db = TestDb::new().await;
    let serve = |port: u16| {
        let mut command = std::process::Command::new(binary());
        command
            .args(["serve"])
            .env("DATABASE_URL", &db.url)
            .env("FHIR_EXPORT_LISTEN", format!("127.0.0.1:{port}"))
            .env("FHIR_EXPORT_STORAGE", "s3")
            .env("FHIR_EXPORT_S3_BUCKET", BUCKET)
            .env("FHIR_EXPORT_S3_ENDPOINT", seaweed.endpoint())
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("FHIR_EXPORT_CONFIG");
        command
    };
    let output = serve(0)
        .env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("the export storage is not usable")
            && stderr.contains("authorization failed"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("not-the-secret"),
        "the secret leaked: {stderr}"
    );

    // The keys of a named profile in the shared credentials file (the default one is wrong).
    let aws = tempfile::tempdir().unwrap();
    let credentials = aws.path().join("credentials");
    std::fs::write(
        &credentials,
        format!(
            "[default]\naws_access_key_id = {S3_ACCESS_KEY}\naws_secret_access_key = wrong\n\n\
             [exporter]\naws_access_key_id = {S3_ACCESS_KEY}\n\
             aws_secret_access_key = {S3_SECRET_KEY}\n"
        ),
    )
    .unwrap();
    let port = crate::common::services::free_port();
    let mut server = ChildProcess::spawn(
        serve(port)
            .env("AWS_SHARED_CREDENTIALS_FILE", &credentials)
            .env("AWS_CONFIG_FILE", aws.path().join("config"))
            .env("AWS_PROFILE", "exporter")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    );
    let health = format!("http://127.0.0.1:{port}/health");
    let mut up = false;
    for _ in 0..300 {
        if reqwest::get(&health).await.is_ok_and(|r| r.status() == 200) {
            up = true;
            break;
        }
        assert!(
            !server.exited(),
            "serve stopped: the profile's keys were not used"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "serve with the profile's keys never answered");
}

/// The configuration of `_anonymizationConfig` is read from the `anonymization` folder of the
/// bucket, as from Azure's container of that name.
async fn de_identified_from_the_buckets_configuration(cloud: Cloud) {
    let app = TestApp::spawn_with(|c| cloud.configure(c)).await;
    populate(&app).await;
    let name = format!("{}.json", unique_container());
    let config = json!({"fhirPathRules": [{"path": "Resource.id", "method": "cryptoHash"}],
        "parameters": {"cryptoHashKey": "k"}});
    let storage = cloud.storage();
    let mut file = storage.create("anonymization", &name, TAG).await.unwrap();
    file.write(config.to_string().as_bytes()).await.unwrap();
    assert!(file.commit(Box::pin(async { true })).await.unwrap());

    let missing = kick_off_request(
        &app,
        "/$export?_anonymizationConfig=none.json",
        "respond-async",
        None,
    )
    .await;
    assert_outcome(missing, 400).await;
    let query = format!("/$export?_type=Patient&_anonymizationConfig={name}");
    let manifest = wait_manifest(&app, &kick_off(&app, &query).await).await;
    assert_eq!(manifest["extension"]["valueString"], name.as_str());
    let got: BTreeSet<String> = resources_by_key(&download_all(&app, &manifest).await)
        .into_keys()
        .collect();
    let hash = |id: &str| {
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, b"k");
        let tag = aws_lc_rs::hmac::sign(&key, id.as_bytes());
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("Patient/{hex}")
    };
    assert_eq!(got, ["p1", "p2", "p3"].map(hash).into());
}

#[tokio::test]
async fn s3_de_identified_export_reads_its_configuration_from_the_bucket() {
    de_identified_from_the_buckets_configuration(Cloud::s3().await).await;
}

#[tokio::test]
async fn gcs_de_identified_export_reads_its_configuration_from_the_bucket() {
    de_identified_from_the_buckets_configuration(Cloud::gcs().await).await;
}

#[tokio::test]
async fn a_gcs_key_file_that_is_not_a_key_is_refused_with_a_message() {
    let gcs = Cloud::gcs().await;
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [("array.json", "[1, 2]"), ("text.json", "not json")] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let message = refused_at_startup(&gcs, |c| {
            c.storage.gcs.service_account_path = path.to_str().unwrap().to_string();
        })
        .await;
        assert!(message.contains("key file"), "{message}");
    }
}
