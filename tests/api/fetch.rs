//! `fhir-export fetch` against this server: exact files, gzip and POST, a de-identified
//! export, a rerun that resumes, Ctrl-C in the middle, `--cancel`, and SMART Backend Services
//! auth.

use std::{collections::BTreeSet, path::Path, process::Output, time::Duration};

use crate::common::{keys::Key, *};
use fhir_export::auth::config::{AuthMode, ClientConfig};
use serde_json::Value;

fn fetch_command(args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(binary());
    command
        .arg("fetch")
        .args(args)
        .env_remove("FHIR_EXPORT_CONFIG")
        .kill_on_drop(true);
    command
}

async fn fetch(args: &[&str]) -> Output {
    tokio::time::timeout(Duration::from_secs(120), fetch_command(args).output())
        .await
        .expect("fetch ends")
        .unwrap()
}

fn assert_ok(output: &Output) {
    assert!(
        output.status.success(),
        "fetch failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The ids in DIR's files of a type (gzipped or not), each once.
fn ids_in(dir: &Path, resource_type: &str) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    let mut lines = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if !name.starts_with(&format!("{resource_type}-")) {
            continue;
        }
        let text = if name.ends_with(".gz") {
            let mut out = String::new();
            std::io::Read::read_to_string(
                &mut flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap()),
                &mut out,
            )
            .unwrap();
            out
        } else {
            std::fs::read_to_string(&path).unwrap()
        };
        for line in text.lines() {
            let resource: Value = serde_json::from_str(line).unwrap();
            ids.insert(resource["id"].as_str().unwrap().to_string());
            lines += 1;
        }
    }
    assert_eq!(lines, ids.len(), "{resource_type}: no resource twice");
    ids
}

fn written_ids(
    written: &std::collections::BTreeMap<String, Vec<Value>>,
    t: &str,
) -> BTreeSet<String> {
    written[t]
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

async fn jobs(app: &TestApp) -> Vec<String> {
    sqlx::query_scalar("SELECT status::text FROM export_jobs ORDER BY created_at")
        .fetch_all(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn fetch_downloads_exact_files_gzip_and_post_and_a_rerun_resumes() {
    let app = TestApp::spawn_with(|c| c.export.part_size = 50).await;
    let written = load_generated(&app, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("plain");
    let args = [
        app.base.as_str(),
        "--type",
        "Patient,Observation",
        "--out",
        out.to_str().unwrap(),
        "--parallel",
        "3",
    ];
    let output = fetch(&args).await;
    assert_ok(&output);
    for t in ["Patient", "Observation"] {
        assert_eq!(ids_in(&out, t), written_ids(&written, t), "{t}");
    }
    assert!(
        std::fs::read_dir(&out).unwrap().count() > 3,
        "several parts"
    );
    // The same command again: the job is picked up from the state file, nothing is fetched twice.
    let again = fetch(&args).await;
    assert_ok(&again);
    assert!(String::from_utf8_lossy(&again.stderr).contains("resuming"));
    assert_eq!(jobs(&app).await, ["completed"]);

    let zipped = dir.path().join("zipped");
    let output = fetch(&[
        app.base.as_str(),
        "--patient-level",
        "--type",
        "Observation",
        "--post",
        "--gzip",
        "--out",
        zipped.to_str().unwrap(),
    ])
    .await;
    assert_ok(&output);
    assert_eq!(
        ids_in(&zipped, "Observation"),
        written_ids(&written, "Observation")
    );
    assert_eq!(jobs(&app).await, ["completed", "completed"]);
}

#[tokio::test]
async fn fetch_asks_for_a_de_identified_export() {
    let app = TestApp::spawn().await;
    let written = load_generated(&app, 1).await;
    let configs = app.storage.path().join("anonymization");
    std::fs::create_dir_all(&configs).unwrap();
    let config = r#"{"fhirPathRules": [{"path": "Resource.id", "method": "cryptoHash"}],
        "parameters": {"cryptoHashKey": "k"}}"#;
    std::fs::write(configs.join("ids.json"), config).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let output = fetch(&[
        app.base.as_str(),
        "--type",
        "Patient",
        "--post",
        "--anonymization-config",
        "ids.json",
        "--out",
        dir.path().to_str().unwrap(),
    ])
    .await;
    assert_ok(&output);
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, b"k");
    let hashed: BTreeSet<String> = written_ids(&written, "Patient")
        .iter()
        .map(|id| {
            let tag = aws_lc_rs::hmac::sign(&key, id.as_bytes());
            tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
        })
        .collect();
    assert_eq!(ids_in(dir.path(), "Patient"), hashed);
}

#[tokio::test]
async fn an_interrupted_fetch_resumes_and_cancel_cancels() {
    // Small parts with a pause between them: the export takes a few seconds.
    let app = TestApp::spawn_with(|c| {
        c.export.part_size = 10;
        c.export.throttle_ms = 100;
    })
    .await;
    let written = load_generated(&app, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let state_of = |out: &Path| out.join("fetch-state.json");
    // Started, interrupted with Ctrl-C (SIGINT) once the job is known.
    let interrupt = |out: std::path::PathBuf| {
        let base = app.base.clone();
        async move {
            let child =
                fetch_command(&[&base, "--type", "Patient", "--out", out.to_str().unwrap()])
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
            for _ in 0..200 {
                if state_of(&out).exists() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            assert!(state_of(&out).exists());
            let pid = child.id().unwrap().to_string();
            std::process::Command::new("kill")
                .args(["-INT", &pid])
                .status()
                .unwrap();
            let output = child.wait_with_output().await.unwrap();
            assert!(!output.status.success());
            let stderr = String::from_utf8_lossy(&output.stderr).to_string();
            assert!(stderr.contains("run the same command again"), "{stderr}");
        }
    };

    let resumed = dir.path().join("resumed");
    interrupt(resumed.clone()).await;
    let output = fetch(&[
        &app.base,
        "--type",
        "Patient",
        "--out",
        resumed.to_str().unwrap(),
    ])
    .await;
    assert_ok(&output);
    assert_eq!(
        ids_in(&resumed, "Patient"),
        written_ids(&written, "Patient")
    );
    assert_eq!(jobs(&app).await, ["completed"]);

    let cancelled = dir.path().join("cancelled");
    interrupt(cancelled.clone()).await;
    let output = fetch(&[
        &app.base,
        "--type",
        "Patient",
        "--out",
        cancelled.to_str().unwrap(),
        "--cancel",
    ])
    .await;
    assert_ok(&output);
    assert_eq!(jobs(&app).await, ["completed", "cancelled"]);
    assert!(
        !state_of(&cancelled).exists(),
        "the cancelled job is forgotten"
    );
}

#[tokio::test]
async fn fetch_signs_in_with_smart_backend_services() {
    let key = Key::rsa("k1");
    let app = TestApp::spawn_with(|c| {
        c.auth.mode = AuthMode::Smart;
        c.auth.token_secret = "a secret of at least thirty-two bytes!!".into();
        c.auth.clients = vec![ClientConfig {
            id: "analytics".into(),
            scopes: vec!["system/*.read".into()],
            jwks: keys::jwks(&[&key]),
            jwks_url: String::new(),
        }];
    })
    .await;
    let written = load_generated(&app, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("key.pem");
    std::fs::write(&pem, key.private_pem()).unwrap();
    let out = dir.path().join("out");
    let output = fetch(&[
        &app.base,
        "--type",
        "Patient",
        "--client-id",
        "analytics",
        "--key",
        pem.to_str().unwrap(),
        "--kid",
        "k1",
        "--out",
        out.to_str().unwrap(),
    ])
    .await;
    assert_ok(&output);
    assert_eq!(ids_in(&out, "Patient"), written_ids(&written, "Patient"));
    // Without credentials the same server refuses.
    let refused = fetch(&[
        &app.base,
        "--type",
        "Patient",
        "--out",
        dir.path().join("x").to_str().unwrap(),
    ])
    .await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"));
}

/// A stand-in server with the quirks real ones have: every answer gzipped whether asked or not,
/// a relative `Content-Location`, 429 on the first poll with `Retry-After` as an HTTP date, and
/// files behind signed URLs that refuse a bearer token (`requiresAccessToken: false`).
mod quirky {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use axum::{
        Router,
        extract::{Query, State},
        http::{HeaderMap, StatusCode, header},
        response::{IntoResponse, Response},
        routing::get,
    };
    use serde_json::json;

    pub const TOKEN: &str = "the-token";
    pub const PATIENTS: [&str; 3] = ["q1", "q2", "q3"];

    #[derive(Clone, Default)]
    struct Polls(Arc<AtomicUsize>);

    fn gzipped(
        status: StatusCode,
        headers: &[(header::HeaderName, String)],
        body: &str,
    ) -> Response {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut encoder, body.as_bytes()).unwrap();
        let mut response = (status, encoder.finish().unwrap()).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_ENCODING, "gzip".parse().unwrap());
        for (name, value) in headers {
            response.headers_mut().insert(name, value.parse().unwrap());
        }
        response
    }

    fn authorized(headers: &HeaderMap) -> bool {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            == Some(&format!("Bearer {TOKEN}"))
    }

    async fn kick_off(headers: HeaderMap) -> Response {
        if !authorized(&headers) {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        gzipped(
            StatusCode::ACCEPTED,
            &[(header::CONTENT_LOCATION, "/fhir/bulkstatus/7".into())],
            "",
        )
    }

    async fn status(State(polls): State<Polls>, headers: HeaderMap) -> Response {
        if !authorized(&headers) {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        match polls.0.fetch_add(1, Ordering::SeqCst) {
            0 => {
                let at = chrono::Utc::now() + chrono::TimeDelta::seconds(1);
                let date = at.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
                gzipped(
                    StatusCode::TOO_MANY_REQUESTS,
                    &[(header::RETRY_AFTER, date)],
                    "",
                )
            }
            1 => gzipped(
                StatusCode::ACCEPTED,
                &[
                    (header::RETRY_AFTER, "1".into()),
                    (header::HeaderName::from_static("x-progress"), "50%".into()),
                ],
                "",
            ),
            _ => {
                let host = headers[header::HOST].to_str().unwrap();
                let manifest = json!({
                    "transactionTime": "2026-01-01T00:00:00Z",
                    "request": format!("http://{host}/fhir/$export"),
                    "requiresAccessToken": false,
                    "output": [{"type": "Patient", "count": 3,
                                "url": format!("http://{host}/blob/patients.ndjson?sig=s3cr3t")}],
                    "error": []
                });
                gzipped(StatusCode::OK, &[], &manifest.to_string())
            }
        }
    }

    async fn blob(headers: HeaderMap, Query(query): Query<Vec<(String, String)>>) -> Response {
        // Signed storage refuses a request that also carries a bearer token.
        let signed = query == [("sig".to_string(), "s3cr3t".to_string())];
        if !signed || headers.contains_key(header::AUTHORIZATION) {
            return StatusCode::FORBIDDEN.into_response();
        }
        let lines: Vec<String> = PATIENTS
            .iter()
            .map(|id| json!({"resourceType": "Patient", "id": id}).to_string())
            .collect();
        gzipped(StatusCode::OK, &[], &(lines.join("\n") + "\n"))
    }

    pub async fn start() -> (String, Arc<AtomicUsize>) {
        let polls = Polls::default();
        let counter = polls.0.clone();
        let app = Router::new()
            .route("/fhir/$export", get(kick_off))
            .route("/fhir/bulkstatus/7", get(status))
            .route("/blob/patients.ndjson", get(blob))
            .with_state(polls);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}/fhir"), counter)
    }
}

#[tokio::test]
async fn fetch_copes_with_the_quirks_of_other_servers() {
    let (base, polls) = quirky::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{}\n", quirky::TOKEN)).unwrap();
    let out = dir.path().join("out");
    let started = std::time::Instant::now();
    let output = fetch(&[
        &base,
        "--bearer-token",
        token.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
    .await;
    assert_ok(&output);
    let expected: BTreeSet<String> = quirky::PATIENTS.iter().map(|s| s.to_string()).collect();
    assert_eq!(ids_in(&out, "Patient"), expected);
    // The 429's date and the 202's seconds were both waited for.
    assert_eq!(polls.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

/// A private key made by `openssl`, as a JWK with its private parts (read off `openssl pkey
/// -text`), and the public JWK a server registers.
fn openssl_jwk(kind: &str, kid: &str, dir: &Path) -> (Value, Value) {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    let pem = dir.join(format!("{kid}.pem"));
    let options: &[&str] = match kind {
        "RSA" => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        _ => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
    };
    let made = std::process::Command::new("openssl")
        .arg("genpkey")
        .args(options)
        .arg("-out")
        .arg(&pem)
        .status()
        .unwrap();
    assert!(made.success());
    let text = std::process::Command::new("openssl")
        .args(["pkey", "-text", "-noout", "-in"])
        .arg(&pem)
        .output()
        .unwrap()
        .stdout;
    let mut fields: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
    let mut current = None;
    for line in String::from_utf8(text).unwrap().lines() {
        if let Some(hex) = line.strip_prefix("publicExponent: ").and_then(|l| {
            l.split_once("(0x")
                .map(|(_, h)| h.trim_end_matches(')').to_string())
        }) {
            let hex = if hex.len() % 2 == 1 {
                format!("0{hex}")
            } else {
                hex
            };
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap());
            fields.insert("publicExponent".into(), bytes.collect());
        } else if !line.starts_with(' ') && line.ends_with(':') {
            current = Some(line.trim_end_matches(':').to_string());
        } else if line.starts_with(' ')
            && let Some(name) = &current
        {
            let bytes = line.trim().split(':').filter(|h| !h.is_empty());
            fields
                .entry(name.clone())
                .or_default()
                .extend(bytes.map(|h| u8::from_str_radix(h, 16).unwrap()));
        } else {
            current = None;
        }
    }
    let b64 = |name: &str| {
        let bytes = &fields[name];
        let start = bytes.iter().position(|b| *b != 0).unwrap_or(0);
        URL_SAFE_NO_PAD.encode(&bytes[start..])
    };
    match kind {
        "RSA" => {
            let public = serde_json::json!({"kty": "RSA", "kid": kid, "alg": "RS384",
                "n": b64("modulus"), "e": b64("publicExponent")});
            let mut private = public.clone();
            for (jwk, openssl) in [
                ("d", "privateExponent"),
                ("p", "prime1"),
                ("q", "prime2"),
                ("dp", "exponent1"),
                ("dq", "exponent2"),
                ("qi", "coefficient"),
            ] {
                private[jwk] = b64(openssl).into();
            }
            (private, public)
        }
        _ => {
            let point = &fields["pub"];
            let public = serde_json::json!({"kty": "EC", "kid": kid, "crv": "P-384", "alg": "ES384",
                "x": URL_SAFE_NO_PAD.encode(&point[1..49]), "y": URL_SAFE_NO_PAD.encode(&point[49..97])});
            let mut private = public.clone();
            let d = &fields["priv"];
            // 48 bytes exactly: openssl may print a leading zero or drop one.
            let d: Vec<u8> = std::iter::repeat_n(0u8, 48usize.saturating_sub(d.len()))
                .chain(d.iter().copied().skip(d.len().saturating_sub(48)))
                .collect();
            private["d"] = URL_SAFE_NO_PAD.encode(d).into();
            (private, public)
        }
    }
}

#[tokio::test]
async fn fetch_signs_in_with_a_jwk_set_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let (rsa_private, rsa_public) = openssl_jwk("RSA", "rsa-1", dir.path());
    let (ec_private, ec_public) = openssl_jwk("EC", "ec-1", dir.path());
    let registered = serde_json::json!({"keys": [rsa_public, ec_public]}).to_string();
    let app = TestApp::spawn_with(move |c| {
        c.auth.mode = AuthMode::Smart;
        c.auth.token_secret = "a secret of at least thirty-two bytes!!".into();
        c.auth.clients = vec![ClientConfig {
            id: "registry".into(),
            scopes: vec!["system/*.read".into()],
            jwks: registered,
            jwks_url: String::new(),
        }];
    })
    .await;
    let written = load_generated(&app, 1).await;
    for (name, private) in [("rsa", rsa_private), ("ec", ec_private)] {
        let key_file = dir.path().join(format!("{name}.jwks"));
        std::fs::write(
            &key_file,
            serde_json::json!({"keys": [private]}).to_string(),
        )
        .unwrap();
        let out = dir.path().join(name);
        // No --kid: it comes from the JWK.
        let output = fetch(&[
            &app.base,
            "--type",
            "Patient",
            "--client-id",
            "registry",
            "--key",
            key_file.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .await;
        assert_ok(&output);
        assert_eq!(
            ids_in(&out, "Patient"),
            written_ids(&written, "Patient"),
            "{name}"
        );
    }
}
