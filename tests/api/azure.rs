//! Export to Azure Blob Storage, against a real Azurite (scripts/test starts it).
//! Blobs are checked with Azurite's REST API directly, not through the code under test.

use std::collections::BTreeSet;

use crate::common::*;
use azure_core::{credentials::Secret, hmac::hmac_sha256};
use fhir_export::{
    auth::config::{AuthMode, ClientConfig},
    config::{Config, OutputUrls},
    storage::{AzureStorage, Storage, config::StorageKind},
};
use serde_json::json;

const ACCOUNT: &str = "devstoreaccount1";
const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

fn endpoint() -> String {
    std::env::var("AZURITE_BLOB_ENDPOINT")
        .unwrap_or_else(|_| format!("http://127.0.0.1:10000/{ACCOUNT}"))
}

/// An account SAS signed here, independently of the server's own signing code.
fn account_sas(permissions: &str) -> String {
    let now = chrono::Utc::now();
    let st = (now - chrono::TimeDelta::minutes(5))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let se = (now + chrono::TimeDelta::hours(1))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let to_sign =
        format!("{ACCOUNT}\n{permissions}\nb\nsco\n{st}\n{se}\n\nhttps,http\n2018-11-09\n");
    let sig = hmac_sha256(&to_sign, &Secret::new(KEY.to_string())).unwrap();
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs([
            ("sv", "2018-11-09"),
            ("ss", "b"),
            ("srt", "sco"),
            ("sp", permissions),
            ("st", &st),
            ("se", &se),
            ("spr", "https,http"),
            ("sig", &sig),
        ])
        .finish()
}

fn azure(config: &mut Config) {
    config.storage.kind = StorageKind::Azure;
    config.storage.azure.connection_string = format!(
        "DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={}",
        endpoint()
    );
}

fn unique_container() -> String {
    format!("t-{}", uuid::Uuid::new_v4().simple())
}

/// Blob names in a container (empty if the container does not exist).
async fn list_blobs(container: &str) -> BTreeSet<String> {
    let url = format!(
        "{}/{container}?restype=container&comp=list&{}",
        endpoint(),
        account_sas("rl")
    );
    let response = reqwest::get(&url).await.unwrap();
    if response.status() == 404 {
        return BTreeSet::new();
    }
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let xml = response.text().await.unwrap();
    xml.split("<Name>")
        .skip(1)
        .map(|s| s.split("</Name>").next().unwrap().to_string())
        .collect()
}

async fn container_exists(container: &str) -> bool {
    let url = format!(
        "{}/{container}?restype=container&{}",
        endpoint(),
        account_sas("rl")
    );
    reqwest::get(&url).await.unwrap().status() == 200
}

async fn populate(app: &TestApp) {
    for p in ["p1", "p2", "p3"] {
        app.put_json(
            &format!("/Patient/{p}"),
            &json!({"resourceType": "Patient", "id": p}),
        )
        .await;
        for i in 0..3 {
            let obs = json!({"resourceType": "Observation", "id": format!("{p}-o{i}"), "status": "final",
                "code": {"text": "x"}, "subject": {"reference": format!("Patient/{p}")}});
            app.put_json(&format!("/Observation/{p}-o{i}"), &obs).await;
        }
    }
}

#[tokio::test]
async fn export_lands_in_the_named_container_with_names_and_counts() {
    let app = TestApp::spawn_with(|c| {
        azure(c);
        c.export.part_size = 4;
    })
    .await;
    populate(&app).await;
    let container = unique_container();
    let manifest = wait_manifest(
        &app,
        &kick_off(&app, &format!("/$export?_container={container}")).await,
    )
    .await;
    let files = download_all(&app, &manifest).await;
    let got = resources_by_key(&files);
    assert_eq!(got.len(), 12);
    let blobs = list_blobs(&container).await;
    let folders: BTreeSet<&str> = blobs.iter().map(|b| b.split('/').next().unwrap()).collect();
    assert_eq!(folders.len(), 1, "{blobs:?}");
    let folder = folders.into_iter().next().unwrap().to_string();
    let names: BTreeSet<String> = blobs
        .iter()
        .map(|b| b.split_once('/').unwrap().1.to_string())
        .collect();
    let expected: BTreeSet<String> = [
        "Observation-1.ndjson",
        "Observation-2.ndjson",
        "Observation-3.ndjson",
        "Patient-1.ndjson",
    ]
    .map(String::from)
    .into();
    assert_eq!(names, expected);
    for f in &files {
        assert!(blobs.contains(&format!("{folder}/{}", f.name)));
    }

    // The same container again: a second, new folder; the first is untouched.
    let again = wait_manifest(
        &app,
        &kick_off(
            &app,
            &format!("/$export?_container={container}&_type=Patient"),
        )
        .await,
    )
    .await;
    assert_eq!(again["output"].as_array().unwrap().len(), 1);
    let blobs_after = list_blobs(&container).await;
    assert!(blobs.is_subset(&blobs_after));
    assert_eq!(blobs_after.len(), blobs.len() + 1);
}

#[tokio::test]
async fn no_container_means_a_new_one_which_cancel_deletes() {
    let app = TestApp::spawn_with(azure).await;
    populate(&app).await;
    let url = kick_off(&app, "/$export").await;
    wait_manifest(&app, &url).await;
    let job = url.rsplit('/').next().unwrap().replace('-', "");
    let container = format!("export-{job}");
    assert_eq!(list_blobs(&container).await.len(), 2);
    assert_eq!(app.client.delete(&url).send().await.unwrap().status(), 202);
    assert!(
        !container_exists(&container).await,
        "its own container goes with the export"
    );
}

#[tokio::test]
async fn cancel_in_a_shared_container_deletes_only_that_exports_blobs() {
    let app = TestApp::spawn_with(azure).await;
    populate(&app).await;
    let container = unique_container();
    let keep = kick_off(
        &app,
        &format!("/$export?_container={container}&_type=Patient"),
    )
    .await;
    wait_manifest(&app, &keep).await;
    let drop = kick_off(&app, &format!("/$export?_container={container}")).await;
    wait_manifest(&app, &drop).await;
    assert_eq!(list_blobs(&container).await.len(), 3);
    assert_eq!(app.client.delete(&drop).send().await.unwrap().status(), 202);
    let left = list_blobs(&container).await;
    assert_eq!(left.len(), 1);
    assert!(left.iter().next().unwrap().ends_with("/Patient-1.ndjson"));
    assert_eq!(app.client.get(&keep).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn sas_urls_download_with_plain_http_until_the_manifest_expires() {
    let app = TestApp::spawn_with(|c| {
        azure(c);
        c.export.output_urls = OutputUrls::Sas;
    })
    .await;
    populate(&app).await;
    let manifest = wait_manifest(&app, &kick_off(&app, "/$export?_type=Patient").await).await;
    assert_eq!(manifest["requiresAccessToken"], false);
    let url = manifest["output"][0]["url"].as_str().unwrap();
    assert!(
        url.starts_with(&endpoint()) && url.contains("sig="),
        "{url}"
    );
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    assert_eq!(text.lines().count(), 3);
    // Tampering with the signature is refused by the storage.
    let forged = url.replace("sp=r", "sp=rw");
    assert_eq!(reqwest::get(&forged).await.unwrap().status(), 403);
}

#[tokio::test]
async fn blob_urls_are_raw_and_need_storage_access() {
    let app = TestApp::spawn_with(|c| {
        azure(c);
        c.export.output_urls = OutputUrls::Blob;
    })
    .await;
    populate(&app).await;
    let container = unique_container();
    let manifest = wait_manifest(
        &app,
        &kick_off(
            &app,
            &format!("/$export?_type=Patient&_container={container}"),
        )
        .await,
    )
    .await;
    assert_eq!(manifest["requiresAccessToken"], true);
    let url = manifest["output"][0]["url"].as_str().unwrap();
    assert!(
        url.starts_with(&format!("{}/{container}/", endpoint())) && !url.contains('?'),
        "{url}"
    );
    assert_eq!(reqwest::get(url).await.unwrap().status(), 403);
    let with_access = format!("{url}?{}", account_sas("r"));
    assert_eq!(
        reqwest::get(&with_access)
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .lines()
            .count(),
        3
    );
}

/// Whose files the storage tests write.
const TAG: fhir_export::storage::AttemptTag = fhir_export::storage::AttemptTag {
    task: 1,
    attempt: 1,
};

#[tokio::test]
async fn a_part_rewritten_after_a_crash_replaces_the_blob() {
    let mut config = Config::default();
    azure(&mut config);
    config.storage.azure.block_size = 64 * 1024;
    let storage = AzureStorage::from_config(&config.storage.azure).unwrap();
    let container = unique_container();
    let name = "folder/Observation-1.ndjson";
    let big: String = "x".repeat(100 * 1024) + "\n"; // two blocks

    // First attempt: committed.
    let mut first = storage.create(&container, name, TAG).await.unwrap();
    first.write(big.as_bytes()).await.unwrap();
    assert!(first.commit(Box::pin(async { true })).await.unwrap());
    // A crashed attempt: blocks staged, never committed.
    let mut crashed = storage.create(&container, name, TAG).await.unwrap();
    crashed
        .write(b"garbage that must never show\n")
        .await
        .unwrap();
    drop(crashed);
    // A fenced-out attempt: staged, fence fails, nothing changes.
    let mut fenced = storage.create(&container, name, TAG).await.unwrap();
    fenced
        .write(b"from a worker that lost its lease\n")
        .await
        .unwrap();
    assert!(!fenced.commit(Box::pin(async { false })).await.unwrap());
    assert_eq!(read_all(&storage, &container, name).await, big);
    // The retry: same name, replaces the blob entirely.
    let mut retry = storage.create(&container, name, TAG).await.unwrap();
    retry
        .write(b"{\"resourceType\":\"Observation\"}\n")
        .await
        .unwrap();
    assert!(retry.commit(Box::pin(async { true })).await.unwrap());
    assert_eq!(
        read_all(&storage, &container, name).await,
        "{\"resourceType\":\"Observation\"}\n"
    );
    assert_eq!(list_blobs(&container).await.len(), 1);
    storage.delete_container(&container).await.unwrap();
}

async fn read_all(storage: &AzureStorage, container: &str, name: &str) -> String {
    use futures::TryStreamExt;
    let stream = storage
        .read(container, name)
        .await
        .unwrap()
        .expect("the blob exists");
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
    String::from_utf8(chunks.concat()).unwrap()
}

#[tokio::test]
async fn a_wrong_key_is_refused_at_startup_with_a_clear_message() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&db.url, dir.path());
    azure(&mut config);
    let wrong = "d3Jvbmcga2V5IHdyb25nIGtleSB3cm9uZyBrZXk=";
    config.storage.azure.connection_string =
        config.storage.azure.connection_string.replace(KEY, wrong);
    let message = match fhir_export::Server::build(config).await {
        Ok(_) => panic!("a wrong key must not start"),
        Err(e) => format!("{e:#}"),
    };
    assert!(message.contains("authorization failed"), "{message}");
    assert!(!message.contains(wrong), "the key leaked: {message}");

    let mut unreachable = test_config(&db.url, dir.path());
    azure(&mut unreachable);
    unreachable.storage.azure.connection_string = format!(
        "DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint=http://127.0.0.1:9/{ACCOUNT}"
    );
    let message = format!(
        "{:#}",
        fhir_export::Server::build(unreachable).await.err().unwrap()
    );
    assert!(message.contains("127.0.0.1:9"), "{message}");
}

#[tokio::test]
async fn sas_urls_without_a_signing_key_are_refused_at_startup() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&db.url, dir.path());
    config.storage.kind = StorageKind::Azure;
    config.storage.azure.account_url = endpoint();
    config.storage.azure.sas_token = account_sas("racwdl");
    config.export.output_urls = OutputUrls::Sas;
    let message = format!(
        "{:#}",
        fhir_export::Server::build(config)
            .await
            .err()
            .expect("refused")
    );
    assert!(
        message.contains("output_urls = sas") && message.contains("account key"),
        "{message}"
    );
}

#[tokio::test]
async fn storage_that_refuses_writes_fails_the_job_instead_of_leaving_it_stuck() {
    let app = TestApp::spawn_with(|c| {
        c.storage.kind = StorageKind::Azure;
        c.storage.azure.account_url = endpoint();
        c.storage.azure.sas_token = account_sas("rl"); // can read and list, not write
        c.export.max_attempts = 2;
    })
    .await;
    populate(&app).await;
    assert_eq!(app.get("/health").await.status(), 200);
    let url = kick_off(&app, "/$export").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let response = app.client.get(&url).send().await.unwrap();
        if response.status() == 500 {
            // The client gets a correlation id; the cause is for the operator.
            let message = assert_outcome(response, 500).await;
            assert!(message.contains("correlation id"), "{message}");
            assert!(!message.contains("authorization"), "{message}");
            let (error, error_id): (String, uuid::Uuid) =
                sqlx::query_as("SELECT error, error_id FROM export_jobs")
                    .fetch_one(&app.pool)
                    .await
                    .unwrap();
            assert!(message.contains(&error_id.to_string()), "{message}");
            assert!(error.contains("authorization failed"), "{error}");
            assert!(error.contains("2 attempts"), "{error}");
            break;
        }
        assert_eq!(response.status(), 202);
        assert!(std::time::Instant::now() < deadline, "the job is stuck");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn with_auth_server_urls_need_the_token_and_sas_urls_do_not() {
    let key = keys::Key::ec("k");
    let jwks = keys::jwks(&[&key]);
    for urls in [OutputUrls::Server, OutputUrls::Sas] {
        let jwks = jwks.clone();
        let app = TestApp::spawn_with(move |c| {
            azure(c);
            c.export.output_urls = urls;
            c.auth.mode = AuthMode::Smart;
            c.auth.clients = vec![ClientConfig {
                id: "c".into(),
                scopes: vec!["system/*.read".into()],
                jwks,
                jwks_url: String::new(),
            }];
        })
        .await;
        // Data goes in through the database: the client may only read.
        load_generated(&app, 1).await;
        let token = smart_token(&app, &key, "c", "system/*.read").await;
        let kick = kick_off_request(
            &app,
            "/$export?_type=Patient",
            "respond-async",
            Some(&token),
        )
        .await;
        assert_eq!(kick.status(), 202);
        let status_url = content_location(&kick);
        assert_eq!(
            app.client.get(&status_url).send().await.unwrap().status(),
            401
        );
        let manifest = wait_manifest_as(&app, &status_url, Some(&token)).await;
        let url = manifest["output"][0]["url"].as_str().unwrap();
        let anonymous = reqwest::get(url).await.unwrap();
        match urls {
            OutputUrls::Server => {
                assert_eq!(manifest["requiresAccessToken"], true);
                assert_eq!(anonymous.status(), 401);
                let with_token = app
                    .client
                    .get(url)
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(with_token.text().await.unwrap().lines().count(), 1);
            }
            _ => {
                assert_eq!(manifest["requiresAccessToken"], false);
                assert_eq!(anonymous.text().await.unwrap().lines().count(), 1);
            }
        }
    }
}

/// Uploads a blob with Azurite's REST API (creating its container if needed); its ETag.
async fn upload(container: &str, name: &str, body: &str) -> String {
    let client = reqwest::Client::new();
    let sas = account_sas("rwc");
    let created = client
        .put(format!(
            "{}/{container}?restype=container&{sas}",
            endpoint()
        ))
        .send()
        .await
        .unwrap();
    assert!([201, 409].contains(&created.status().as_u16()));
    let put = client
        .put(format!("{}/{container}/{name}?{sas}", endpoint()))
        .header("x-ms-blob-type", "BlockBlob")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    put.headers()["etag"].to_str().unwrap().to_string()
}

#[tokio::test]
async fn a_de_identified_export_reads_its_configuration_from_the_anonymization_container() {
    let app = TestApp::spawn_with(azure).await;
    populate(&app).await;
    let name = format!("{}.json", unique_container());
    let config = json!({"fhirPathRules": [{"path": "Resource.id", "method": "cryptoHash"},
        {"path": "nodesByType('Reference').reference", "method": "cryptoHash"}],
        "parameters": {"cryptoHashKey": "k"}});
    let etag = upload("anonymization", &name, &config.to_string()).await;

    let stale = kick_off_request(
        &app,
        &format!("/$export?_anonymizationConfig={name}&_anonymizationConfigEtag=%220x1%22"),
        "respond-async",
        None,
    )
    .await;
    assert!(assert_outcome(stale, 400).await.contains(&etag));
    let missing = kick_off_request(
        &app,
        "/$export?_anonymizationConfig=none.json",
        "respond-async",
        None,
    )
    .await;
    assert_outcome(missing, 400).await;

    let query = format!(
        "/$export?_anonymizationConfig={name}&_anonymizationConfigEtag={}",
        form_urlencoded::byte_serialize(etag.as_bytes()).collect::<String>()
    );
    let manifest = wait_manifest(&app, &kick_off(&app, &query).await).await;
    assert_eq!(manifest["extension"]["valueString"], name.as_str());
    let got = resources_by_key(&download_all(&app, &manifest).await);
    assert_eq!(got.len(), 12);
    let hash = |id: &str| {
        let tag = aws_lc_rs::hmac::sign(
            &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, b"k"),
            id.as_bytes(),
        );
        tag.as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    for p in ["p1", "p2", "p3"] {
        assert!(got.contains_key(&format!("Patient/{}", hash(p))));
        let o = &got[&format!("Observation/{}", hash(&format!("{p}-o0")))];
        assert_eq!(
            o["subject"]["reference"],
            format!("Patient/{}", hash(p)).as_str()
        );
    }
}
