//! SMART Backend Services and external tokens: the token flow with keys made here (RS384,
//! ES384), every rejection, 401/403/404 enforcement on every route, job ownership.

use crate::common::{keys::*, *};
use fhir_export::{
    auth::config::{AuthMode, ClientConfig},
    config::Config,
};
use serde_json::{Value, json};

const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";

fn client(id: &str, scopes: &[&str], keys: &[&Key]) -> ClientConfig {
    ClientConfig {
        id: id.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        jwks: jwks(keys),
        jwks_url: String::new(),
    }
}

async fn smart_app(clients: Vec<ClientConfig>) -> TestApp {
    TestApp::spawn_with(move |c: &mut Config| {
        c.auth.mode = AuthMode::Smart;
        c.auth.token_secret = SECRET.into();
        c.auth.clients = clients;
    })
    .await
}

async fn token_request(app: &TestApp, form: &[(&str, &str)]) -> reqwest::Response {
    app.client
        .post(app.url("/auth/token"))
        .form(form)
        .send()
        .await
        .unwrap()
}

/// A granted access token and the granted scope.
async fn access_token(app: &TestApp, key: &Key, client: &str, scope: &str) -> (String, String) {
    let assertion = key.sign(&assertion_claims(app, client), None);
    let response = token_request(app, &grant(&assertion, scope)).await;
    assert_eq!(response.headers()["cache-control"], "no-store");
    let status = response.status();
    let body = json(response).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "bearer");
    assert!(body["expires_in"].as_u64().unwrap() > 0);
    (
        body["access_token"].as_str().unwrap().to_string(),
        body["scope"].as_str().unwrap().to_string(),
    )
}

/// A refused token request: its status and OAuth error code; the body never echoes the
/// assertion.
async fn refused(app: &TestApp, form: &[(&str, &str)], status: u16, code: &str) -> String {
    let response = token_request(app, form).await;
    assert_eq!(response.status(), status);
    let text = response.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["error"], code, "{text}");
    if let Some((_, assertion)) = form.iter().find(|(k, _)| *k == "client_assertion") {
        assert!(!assertion.is_empty() && !text.contains(assertion));
    }
    assert!(!text.contains(SECRET));
    body["error_description"].as_str().unwrap().to_string()
}

/// An assertion refused as `invalid_client`; returns the description.
async fn refused_client(app: &TestApp, assertion: &str) -> String {
    refused(
        app,
        &grant(assertion, "system/*.read"),
        401,
        "invalid_client",
    )
    .await
}

async fn send(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
) -> reqwest::Response {
    let mut request = app
        .client
        .request(method, app.url(path))
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async");
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn token_flow_with_rs384_and_es384_then_exports_owned_by_their_client() {
    let (rsa, ec) = (Key::rsa("rsa-1"), Key::ec("ec-1"));
    let app = smart_app(vec![
        client("analytics", &["system/*.read"], &[&rsa]),
        client(
            "registry",
            &["system/Patient.rs", "system/Observation.rs"],
            &[&ec],
        ),
    ])
    .await;
    let loaded = load_generated(&app, 1).await;

    // Discovery needs no token.
    let config = json(app.get("/.well-known/smart-configuration").await).await;
    assert_eq!(config["token_endpoint"], app.url("/auth/token"));
    assert_eq!(
        config["token_endpoint_auth_methods_supported"],
        json!(["private_key_jwt"])
    );
    assert_eq!(
        config["token_endpoint_auth_signing_alg_values_supported"],
        json!(["RS384", "ES384"])
    );
    assert_eq!(
        config["grant_types_supported"],
        json!(["client_credentials"])
    );
    let metadata = json(app.get("/metadata").await).await;
    assert_eq!(
        metadata["rest"][0]["security"]["extension"][0]["extension"][0]["valueUri"],
        app.url("/auth/token")
    );

    let (analytics, scope) = access_token(&app, &rsa, "analytics", "system/*.read").await;
    assert_eq!(scope, "system/*.read");
    // Asking for more than allowed grants only what is allowed.
    let (registry, scope) = access_token(
        &app,
        &ec,
        "registry",
        "system/Patient.rs system/Observation.rs system/Condition.rs",
    )
    .await;
    assert_eq!(scope, "system/Patient.rs system/Observation.rs");
    assert!(!analytics.contains(SECRET));

    // analytics exports everything.
    let kick = send(&app, reqwest::Method::GET, "/$export", Some(&analytics)).await;
    assert_eq!(kick.status(), 202);
    let status_url = content_location(&kick);
    let manifest = wait_manifest_as(&app, &status_url, Some(&analytics)).await;
    assert_eq!(manifest["requiresAccessToken"], true);
    let types: std::collections::BTreeSet<&str> = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["type"].as_str().unwrap())
        .collect();
    assert_eq!(types.len(), loaded.len());
    let file_url = manifest["output"][0]["url"].as_str().unwrap().to_string();
    let file_path = file_url.strip_prefix(&app.base).unwrap().to_string();
    let status_path = status_url.strip_prefix(&app.base).unwrap().to_string();
    assert_eq!(
        send(&app, reqwest::Method::GET, &file_path, Some(&analytics))
            .await
            .status(),
        200
    );
    let anonymous = send(&app, reqwest::Method::GET, &file_path, None).await;
    assert_eq!(anonymous.status(), 401);
    assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");

    // Another client sees nothing of it: status, files and cancel are 404.
    for (method, path) in [
        (reqwest::Method::GET, &status_path),
        (reqwest::Method::GET, &file_path),
        (reqwest::Method::DELETE, &status_path),
    ] {
        let response = send(&app, method, path, Some(&registry)).await;
        assert_outcome(response, 404).await;
    }
    // The owner still has it.
    assert_eq!(
        send(&app, reqwest::Method::GET, &status_path, Some(&analytics))
            .await
            .status(),
        200
    );

    // registry exports only its granted types, and may not ask for others.
    let kick = send(&app, reqwest::Method::GET, "/$export", Some(&registry)).await;
    assert_eq!(kick.status(), 202);
    let status_url = content_location(&kick);
    let manifest = wait_manifest_as(&app, &status_url, Some(&registry)).await;
    let types: std::collections::BTreeSet<&str> = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        std::collections::BTreeSet::from(["Observation", "Patient"])
    );
    let beyond = send(
        &app,
        reqwest::Method::GET,
        "/$export?_type=Patient,Condition",
        Some(&registry),
    )
    .await;
    let text = assert_outcome(beyond, 403).await;
    assert!(text.contains("Condition"), "{text}");
    let filtered = send(
        &app,
        reqwest::Method::GET,
        "/$export?_typeFilter=Condition%3Fclinical-status%3Dactive",
        Some(&registry),
    )
    .await;
    assert_outcome(filtered, 403).await;
}

#[tokio::test]
async fn every_protected_route_needs_a_token_and_public_ones_do_not() {
    let key = Key::ec("k");
    let app = smart_app(vec![client("c", &["system/*.read"], &[&key])]).await;
    for path in ["/metadata", "/health", "/.well-known/smart-configuration"] {
        assert_eq!(app.get(path).await.status(), 200, "{path}");
    }
    let job = uuid::Uuid::new_v4();
    let routes: Vec<(reqwest::Method, String)> = vec![
        (reqwest::Method::POST, "/Patient".into()),
        (reqwest::Method::GET, "/Patient/p".into()),
        (reqwest::Method::PUT, "/Patient/p".into()),
        (reqwest::Method::DELETE, "/Patient/p".into()),
        (reqwest::Method::GET, "/Patient/p/_history/1".into()),
        (reqwest::Method::POST, "/".into()),
        (reqwest::Method::GET, "/$export".into()),
        (reqwest::Method::POST, "/$export".into()),
        (reqwest::Method::GET, "/Patient/$export".into()),
        (reqwest::Method::GET, "/Group/g/$export".into()),
        (reqwest::Method::GET, format!("/export/{job}")),
        (reqwest::Method::DELETE, format!("/export/{job}")),
        (
            reqwest::Method::GET,
            format!("/export/{job}/Patient-1.ndjson"),
        ),
    ];
    for (method, path) in &routes {
        let response = send(&app, method.clone(), path, None).await;
        assert_eq!(
            response.headers()["www-authenticate"],
            "Bearer",
            "{method} {path}"
        );
        assert_outcome(response, 401).await;
        let forged = send(&app, method.clone(), path, Some("not.a.token")).await;
        assert_eq!(
            forged.headers()["www-authenticate"],
            "Bearer error=\"invalid_token\""
        );
        assert_outcome(forged, 401).await;
    }
    // A token whose signature was altered is not this server's.
    let (good, _) = access_token(&app, &key, "c", "system/*.read").await;
    assert_eq!(
        send(&app, reqwest::Method::GET, "/Patient/p", Some(&good))
            .await
            .status(),
        404
    );
    let mut bytes = good.into_bytes();
    let i = bytes.len() - 10;
    bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(bytes).unwrap();
    assert_outcome(
        send(&app, reqwest::Method::GET, "/Patient/p", Some(&tampered)).await,
        401,
    )
    .await;
}

#[tokio::test]
async fn scopes_decide_reads_writes_and_bundles() {
    let key = Key::rsa("k");
    let app = smart_app(vec![
        client("reader", &["system/*.read"], &[&key]),
        client("writer", &["system/Patient.cud"], &[&key]),
    ])
    .await;
    let (reader, _) = access_token(&app, &key, "reader", "system/*.read").await;
    let (writer, _) = access_token(&app, &key, "writer", "system/Patient.cud").await;
    let patient = json!({"resourceType": "Patient", "id": "p"});
    let put = |token: String| {
        let app = &app;
        let patient = patient.clone();
        async move {
            app.client
                .put(app.url("/Patient/p"))
                .bearer_auth(token)
                .header("content-type", "application/fhir+json")
                .body(patient.to_string())
                .send()
                .await
                .unwrap()
        }
    };
    assert_outcome(put(reader.clone()).await, 403).await;
    assert_eq!(put(writer.clone()).await.status(), 201);
    assert_eq!(
        send(&app, reqwest::Method::GET, "/Patient/p", Some(&reader))
            .await
            .status(),
        200
    );
    assert_outcome(
        send(&app, reqwest::Method::GET, "/Patient/p", Some(&writer)).await,
        403,
    )
    .await;
    assert_outcome(
        send(&app, reqwest::Method::GET, "/$export", Some(&writer)).await,
        403,
    )
    .await;
    // A transaction with one entry beyond the scopes is refused whole.
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Group", "type": "person", "actual": true},
         "request": {"method": "POST", "url": "Group"}}]});
    let response = app
        .client
        .post(app.url("/"))
        .bearer_auth(&writer)
        .header("content-type", "application/fhir+json")
        .body(bundle.to_string())
        .send()
        .await
        .unwrap();
    let text = assert_outcome(response, 403).await;
    assert!(text.contains("entry[1]"), "{text}");
    assert_outcome(
        send(&app, reqwest::Method::DELETE, "/Patient/p", Some(&reader)).await,
        403,
    )
    .await;
    assert_eq!(
        send(&app, reqwest::Method::DELETE, "/Patient/p", Some(&writer))
            .await
            .status(),
        204
    );
}

// ---- each rejection of the token endpoint ----

async fn one_client_app() -> (TestApp, Key) {
    let key = Key::rsa("k1");
    let app = smart_app(vec![client("c1", &["system/*.read"], &[&key])]).await;
    (app, key)
}

#[tokio::test]
async fn token_refuses_a_bad_grant_type() {
    let (app, key) = one_client_app().await;
    let assertion = key.sign(&assertion_claims(&app, "c1"), None);
    let mut form = grant(&assertion, "system/*.read");
    form[0].1 = "authorization_code";
    refused(&app, &form, 400, "unsupported_grant_type").await;
}

#[tokio::test]
async fn token_refuses_a_bad_assertion_type() {
    let (app, key) = one_client_app().await;
    let assertion = key.sign(&assertion_claims(&app, "c1"), None);
    let mut form = grant(&assertion, "system/*.read");
    form[1].1 = "urn:ietf:params:oauth:client-assertion-type:saml2-bearer";
    refused(&app, &form, 401, "invalid_client").await;
}

#[tokio::test]
async fn token_refuses_a_bad_signature() {
    let (app, _) = one_client_app().await;
    let impostor = Key::rsa("k1"); // same kid, other key
    let assertion = impostor.sign(&assertion_claims(&app, "c1"), None);
    let why = refused_client(&app, &assertion).await;
    assert!(why.contains("signature"), "{why}");
}

#[tokio::test]
async fn token_refuses_a_wrong_audience() {
    let (app, key) = one_client_app().await;
    let mut claims = assertion_claims(&app, "c1");
    claims["aud"] = json!("https://elsewhere.example/token");
    let assertion = key.sign(&claims, None);
    let why = refused_client(&app, &assertion).await;
    assert!(why.contains("aud"), "{why}");
}

#[tokio::test]
async fn token_refuses_an_expired_assertion() {
    let (app, key) = one_client_app().await;
    let mut claims = assertion_claims(&app, "c1");
    claims["exp"] = json!(now() - 60);
    let assertion = key.sign(&claims, None);
    let why = refused_client(&app, &assertion).await;
    assert!(why.contains("expired"), "{why}");
}

#[tokio::test]
async fn token_refuses_an_assertion_valid_too_long() {
    let (app, key) = one_client_app().await;
    let mut claims = assertion_claims(&app, "c1");
    claims["exp"] = json!(now() + 3600);
    let assertion = key.sign(&claims, None);
    let why = refused_client(&app, &assertion).await;
    assert!(why.contains("five minutes"), "{why}");
}

#[tokio::test]
async fn token_refuses_a_replayed_jti() {
    let (app, key) = one_client_app().await;
    let assertion = key.sign(&assertion_claims(&app, "c1"), None);
    let form = grant(&assertion, "system/*.read");
    assert_eq!(token_request(&app, &form).await.status(), 200);
    let why = refused(&app, &form, 401, "invalid_client").await;
    assert!(why.contains("jti"), "{why}");
}

#[tokio::test]
async fn token_refuses_an_unknown_client() {
    let (app, key) = one_client_app().await;
    let assertion = key.sign(&assertion_claims(&app, "nobody"), None);
    let why = refused_client(&app, &assertion).await;
    assert!(why.contains("unknown client"), "{why}");
}

#[tokio::test]
async fn token_refuses_an_unknown_kid() {
    let (app, key) = one_client_app().await;
    let header = json!({"alg": "RS384", "kid": "k9", "typ": "JWT"});
    let assertion = key.sign(&assertion_claims(&app, "c1"), Some(header));
    let why = refused_client(&app, &assertion).await;
    assert!(why.contains("kid"), "{why}");
}

#[tokio::test]
async fn token_refuses_a_scope_not_allowed() {
    let (app, key) = one_client_app().await;
    let assertion = key.sign(&assertion_claims(&app, "c1"), None);
    refused(
        &app,
        &grant(&assertion, "system/*.write"),
        400,
        "invalid_scope",
    )
    .await;
}

#[tokio::test]
async fn token_refuses_other_algorithms_and_missing_fields() {
    let (app, key) = one_client_app().await;
    let header = json!({"alg": "RS256", "kid": "k1", "typ": "JWT"});
    let assertion = key.sign(&assertion_claims(&app, "c1"), Some(header));
    let why = refused_client(&app, &assertion).await;
    assert!(why.contains("RS384 or ES384"), "{why}");
    let assertion = key.sign(&assertion_claims(&app, "c1"), None);
    // RFC 6749 section 3.3: no scope, or an empty one, is an invalid scope.
    let mut no_scope = grant(&assertion, "system/*.read");
    no_scope.pop();
    refused(&app, &no_scope, 400, "invalid_scope").await;
    let assertion = key.sign(&assertion_claims(&app, "c1"), None);
    refused(&app, &grant(&assertion, " "), 400, "invalid_scope").await;
    let mut claims = assertion_claims(&app, "c1");
    claims.as_object_mut().unwrap().remove("jti");
    let assertion = key.sign(&claims, None);
    let why = refused_client(&app, &assertion).await;
    assert!(why.contains("jti"), "{why}");
}

// ---- external mode ----

/// Serves an OpenID configuration and a JWKS, as an external issuer does.
async fn issuer(keys: &[&Key]) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let jwks: Value = serde_json::from_str(&jwks(keys)).unwrap();
    let discovery = json!({"issuer": base, "jwks_uri": format!("{base}/keys")});
    let app = axum::Router::new()
        .route(
            "/.well-known/openid-configuration",
            axum::routing::get(move || async move { axum::Json(discovery) }),
        )
        .route(
            "/keys",
            axum::routing::get(move || async move { axum::Json(jwks) }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

fn external_claims(issuer: &str, roles: &[&str]) -> Value {
    json!({
        "iss": issuer,
        "aud": "api://fhir-export",
        "azp": "entra-app-1",
        "roles": roles,
        "iat": now(),
        "nbf": now() - 10,
        "exp": now() + 600,
    })
}

#[tokio::test]
async fn external_tokens_are_checked_against_the_issuers_keys() {
    let key = Key::rsa_with("entra-1", "RS256");
    let stranger = Key::rsa_with("entra-1", "RS256");
    let issuer_url = issuer(&[&key]).await;
    let issuer_for_config = issuer_url.clone();
    let app = TestApp::spawn_with(move |c: &mut Config| {
        c.auth.mode = AuthMode::External;
        c.auth.external.issuer = issuer_for_config;
        c.auth.external.audience = "api://fhir-export".into();
        c.auth.external.client_claim = "azp".into();
        c.auth.external.scope_map =
            [("Export.Read".to_string(), vec!["system/*.read".to_string()])].into();
    })
    .await;
    load_generated(&app, 1).await;
    let metadata = json(app.get("/metadata").await).await;
    assert_eq!(
        metadata["rest"][0]["security"]["service"][0]["coding"][0]["code"],
        "SMART-on-FHIR"
    );

    let good = key.sign(&external_claims(&issuer_url, &["Export.Read"]), None);
    let kick = send(
        &app,
        reqwest::Method::GET,
        "/$export?_type=Patient",
        Some(&good),
    )
    .await;
    assert_eq!(kick.status(), 202);
    let status_url = content_location(&kick);
    let manifest = wait_manifest_as(&app, &status_url, Some(&good)).await;
    assert_eq!(manifest["output"][0]["type"], "Patient");

    let mut refusals = Vec::new();
    let mut claims = external_claims(&issuer_url, &["Export.Read"]);
    claims["aud"] = json!("api://other");
    refusals.push(("wrong audience", key.sign(&claims, None)));
    let mut claims = external_claims(&issuer_url, &["Export.Read"]);
    claims["iss"] = json!("https://elsewhere.example");
    refusals.push(("wrong issuer", key.sign(&claims, None)));
    let mut claims = external_claims(&issuer_url, &["Export.Read"]);
    claims["exp"] = json!(now() - 120);
    refusals.push(("expired", key.sign(&claims, None)));
    let mut claims = external_claims(&issuer_url, &["Export.Read"]);
    claims["nbf"] = json!(now() + 600);
    refusals.push(("not yet valid", key.sign(&claims, None)));
    // The client claim names the owner of jobs: no NUL, nothing a document long.
    for client in ["entra\u{0}app".to_string(), "x".repeat(3000)] {
        let mut claims = external_claims(&issuer_url, &["Export.Read"]);
        claims["azp"] = json!(client);
        refusals.push(("a client claim that is no name", key.sign(&claims, None)));
    }
    refusals.push((
        "another key",
        stranger.sign(&external_claims(&issuer_url, &["Export.Read"]), None),
    ));
    let header = json!({"alg": "RS256", "kid": "unknown", "typ": "JWT"});
    refusals.push((
        "unknown kid",
        key.sign(
            &external_claims(&issuer_url, &["Export.Read"]),
            Some(header),
        ),
    ));
    for (case, token) in refusals {
        let response = send(&app, reqwest::Method::GET, "/$export", Some(&token)).await;
        assert_eq!(response.status(), 401, "{case}");
        assert_outcome(response, 401).await;
    }
    // A valid token whose roles map to no scope may not export.
    let unmapped = key.sign(&external_claims(&issuer_url, &["Something.Else"]), None);
    assert_outcome(
        send(&app, reqwest::Method::GET, "/$export", Some(&unmapped)).await,
        403,
    )
    .await;
}

#[tokio::test]
async fn client_keys_can_come_from_a_jwks_url() {
    let key = Key::ec("remote-1");
    let keys_url = format!("{}/keys", issuer(&[&key]).await);
    let app = smart_app(vec![ClientConfig {
        id: "remote".into(),
        scopes: vec!["system/*.rs".into()],
        jwks: String::new(),
        jwks_url: keys_url.clone(),
    }])
    .await;
    let (token, scope) = access_token(&app, &key, "remote", "system/*.rs").await;
    // An assertion may name the registered key-set URL as its `jku`.
    let header = json!({"alg": "ES384", "kid": "remote-1", "typ": "JWT", "jku": keys_url});
    let assertion = key.sign(&assertion_claims(&app, "remote"), Some(header));
    let response = token_request(&app, &grant(&assertion, "system/*.rs")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(scope, "system/*.rs");
    assert_eq!(
        send(&app, reqwest::Method::GET, "/$export", Some(&token))
            .await
            .status(),
        202
    );
    let other = Key::ec("remote-2");
    let assertion = other.sign(&assertion_claims(&app, "remote"), None);
    refused(
        &app,
        &grant(&assertion, "system/*.rs"),
        401,
        "invalid_client",
    )
    .await;
}

#[tokio::test]
async fn a_replayed_assertion_inside_the_leeway_is_refused() {
    let (app, key) = one_client_app().await;
    // Expired two seconds ago: still accepted (5 s leeway), so it must stay remembered.
    let mut claims = assertion_claims(&app, "c1");
    claims["exp"] = json!(now() - 2);
    let assertion = key.sign(&claims, None);
    let form = grant(&assertion, "system/*.read");
    assert_eq!(token_request(&app, &form).await.status(), 200);
    // Another client's fresh assertion in between sweeps expired entries.
    let other = key.sign(&assertion_claims(&app, "c1"), None);
    assert_eq!(
        token_request(&app, &grant(&other, "system/*.read"))
            .await
            .status(),
        200
    );
    let why = refused(&app, &form, 401, "invalid_client").await;
    assert!(why.contains("jti"), "{why}");
}

/// An issuer that can be switched off (it answers 503), counting the requests it gets.
struct SwitchableIssuer {
    base: String,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

async fn switchable_issuer(keys: &[&Key], up: bool) -> SwitchableIssuer {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let jwks: Value = serde_json::from_str(&jwks(keys)).unwrap();
    let discovery = json!({"issuer": base, "jwks_uri": format!("{base}/keys")});
    let (is_up, requests) = (Arc::new(AtomicBool::new(up)), Arc::new(AtomicUsize::new(0)));
    let answer = {
        let (is_up, requests) = (is_up.clone(), requests.clone());
        move |body: Value| {
            let (is_up, requests) = (is_up.clone(), requests.clone());
            move || async move {
                requests.fetch_add(1, Ordering::SeqCst);
                if is_up.load(Ordering::SeqCst) {
                    Ok(axum::Json(body))
                } else {
                    Err(axum::http::StatusCode::SERVICE_UNAVAILABLE)
                }
            }
        }
    };
    let app = axum::Router::new()
        .route(
            "/.well-known/openid-configuration",
            axum::routing::get(answer(discovery)),
        )
        .route("/keys", axum::routing::get(answer(jwks)));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    SwitchableIssuer {
        base,
        up: is_up,
        requests,
    }
}

async fn external_app(issuer: &str) -> TestApp {
    let issuer = issuer.to_string();
    TestApp::spawn_with(move |c: &mut Config| {
        c.auth.mode = AuthMode::External;
        c.auth.external.issuer = issuer;
        c.auth.external.audience = "api://fhir-export".into();
        c.auth.external.client_claim = "azp".into();
        c.auth.external.scope_map =
            [("Export.Read".to_string(), vec!["system/*.read".to_string()])].into();
    })
    .await
}

#[tokio::test]
async fn authentication_goes_on_while_the_issuers_keys_are_down() {
    use std::sync::atomic::Ordering;
    let key = Key::rsa_with("entra-1", "RS256");
    let issuer = switchable_issuer(&[&key], true).await;
    let app = external_app(&issuer.base).await;
    let good = key.sign(&external_claims(&issuer.base, &["Export.Read"]), None);
    let header = json!({"alg": "RS256", "kid": "rotated", "typ": "JWT"});
    let unknown = key.sign(
        &external_claims(&issuer.base, &["Export.Read"]),
        Some(header),
    );
    let read = |token: String| {
        let app = &app;
        async move {
            send(app, reqwest::Method::GET, "/Patient/x", Some(&token))
                .await
                .status()
                .as_u16()
        }
    };
    assert_eq!(
        read(good.clone()).await,
        404,
        "authenticated (no such patient)"
    );

    issuer.up.store(false, Ordering::SeqCst);
    // Known keys keep working; an unknown kid costs one refetch, which fails.
    assert_eq!(read(good.clone()).await, 404);
    let before = issuer.requests.load(Ordering::SeqCst);
    assert_eq!(read(unknown.clone()).await, 401);
    let burst: Vec<u16> = futures::future::join_all((0..20).map(|i| {
        read(if i % 2 == 0 {
            good.clone()
        } else {
            unknown.clone()
        })
    }))
    .await;
    for (i, status) in burst.iter().enumerate() {
        assert_eq!(*status, if i % 2 == 0 { 404 } else { 401 }, "request {i}");
    }
    let fetched = issuer.requests.load(Ordering::SeqCst) - before;
    assert!(fetched <= 1, "{fetched} refetches for one unknown kid");
}

#[tokio::test]
async fn an_issuer_down_at_the_first_token_is_tried_again_after_a_pause() {
    use std::sync::atomic::Ordering;
    let key = Key::rsa_with("entra-1", "RS256");
    let issuer = switchable_issuer(&[&key], false).await;
    let app = external_app(&issuer.base).await;
    let good = key.sign(&external_claims(&issuer.base, &["Export.Read"]), None);
    let status = send(&app, reqwest::Method::GET, "/Patient/x", Some(&good)).await;
    assert_outcome(status, 401).await;
    // Backing off: more tokens meanwhile do not each hit the issuer.
    let before = issuer.requests.load(Ordering::SeqCst);
    for _ in 0..10 {
        send(&app, reqwest::Method::GET, "/Patient/x", Some(&good)).await;
    }
    assert!(issuer.requests.load(Ordering::SeqCst) - before <= 1);
    issuer.up.store(true, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while send(&app, reqwest::Method::GET, "/Patient/x", Some(&good))
        .await
        .status()
        != 404
    {
        assert!(std::time::Instant::now() < deadline, "never recovered");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn token_refuses_assertions_from_the_future() {
    let (app, key) = one_client_app().await;
    let mut claims = assertion_claims(&app, "c1");
    claims["nbf"] = json!(now() + 3600);
    let why = refused_client(&app, &key.sign(&claims, None)).await;
    assert!(why.contains("nbf"), "{why}");
    let mut claims = assertion_claims(&app, "c1");
    claims["iat"] = json!(now() + 86_400);
    let why = refused_client(&app, &key.sign(&claims, None)).await;
    assert!(why.contains("iat"), "{why}");
    // Within the small clock skew allowed, both are fine.
    let mut claims = assertion_claims(&app, "c1");
    claims["nbf"] = json!(now() + 2);
    claims["iat"] = json!(now() + 2);
    let assertion = key.sign(&claims, None);
    let response = token_request(&app, &grant(&assertion, "system/*.read")).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn token_refuses_a_jku_that_is_not_the_registered_key_set() {
    let (app, key) = one_client_app().await;
    let attacker = Key::rsa("k1");
    let keys_url = format!("{}/keys", issuer(&[&attacker]).await);
    let header = json!({"alg": "RS384", "kid": "k1", "typ": "JWT", "jku": keys_url});
    let why = refused_client(
        &app,
        &attacker.sign(&assertion_claims(&app, "c1"), Some(header)),
    )
    .await;
    assert!(why.contains("jku"), "{why}");
    // Not even the right key with a foreign jku.
    let header =
        json!({"alg": "RS384", "kid": "k1", "typ": "JWT", "jku": "https://elsewhere.example/jwks"});
    let why = refused_client(&app, &key.sign(&assertion_claims(&app, "c1"), Some(header))).await;
    assert!(why.contains("jku"), "{why}");
}

#[tokio::test]
async fn token_refuses_a_jti_that_is_no_id() {
    let (app, key) = one_client_app().await;
    for jti in ["a\u{0}b".to_string(), "x".repeat(2_800)] {
        let mut claims = assertion_claims(&app, "c1");
        claims["jti"] = json!(jti);
        let why = refused_client(&app, &key.sign(&claims, None)).await;
        assert!(why.contains("jti"), "{why}");
    }
}

#[tokio::test]
async fn status_and_files_need_a_token_that_covers_the_exported_types() {
    let key = Key::rsa("k1");
    let app = smart_app(vec![client(
        "c1",
        &["system/Patient.*", "system/Observation.read"],
        &[&key],
    )])
    .await;
    let (both, _) =
        access_token(&app, &key, "c1", "system/Patient.* system/Observation.read").await;
    let (narrow, _) = access_token(&app, &key, "c1", "system/Observation.read").await;
    let put = app
        .client
        .put(app.url("/Patient/p1"))
        .bearer_auth(&both)
        .header("content-type", "application/fhir+json")
        .body(json!({"resourceType": "Patient", "id": "p1"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    let response =
        kick_off_request(&app, "/$export?_type=Patient", "respond-async", Some(&both)).await;
    assert_eq!(response.status(), 202);
    let status_url = content_location(&response);
    let manifest = wait_manifest_as(&app, &status_url, Some(&both)).await;
    let file = manifest["output"][0]["url"].as_str().unwrap().to_string();

    // The same client, a token that does not allow Patient: neither status nor file.
    for url in [&status_url, &file] {
        let response = app
            .client
            .get(url)
            .bearer_auth(&narrow)
            .send()
            .await
            .unwrap();
        let message = assert_outcome(response, 403).await;
        assert!(message.contains("Patient"), "{message}");
        let response = app.client.get(url).bearer_auth(&both).send().await.unwrap();
        assert_eq!(response.status(), 200, "{url}");
    }
}

/// Serves a key set that never ends: 1 MB chunks of a JSON array, for as long as it is read.
async fn endless_key_set() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/keys", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"keys\":[";
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = "{\"kty\":\"oct\"},".repeat(1 << 16);
                // 1.5 GB at most: the test must end even if the server read it all.
                for _ in 0..1_500 {
                    if stream.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[tokio::test]
async fn a_key_set_that_never_ends_is_cut_off_without_memory() {
    let key = Key::ec("k1");
    let app = smart_app(vec![ClientConfig {
        id: "greedy".into(),
        scopes: vec!["system/*.rs".into()],
        jwks: String::new(),
        jwks_url: endless_key_set().await,
    }])
    .await;
    let before = resident_bytes();
    let started = std::time::Instant::now();
    let assertion = key.sign(&assertion_claims(&app, "greedy"), None);
    let why = refused(
        &app,
        &grant(&assertion, "system/*.rs"),
        401,
        "invalid_client",
    )
    .await;
    assert!(why.contains("key set"), "{why}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let grown = resident_bytes().saturating_sub(before);
    assert!(
        grown < 64 << 20,
        "reading the key set took {} MB",
        grown >> 20
    );
}

#[tokio::test]
async fn a_group_export_needs_leave_to_read_the_group() {
    let key = Key::ec("k");
    let scopes = &[
        "system/Patient.rs",
        "system/Observation.rs",
        "system/Group.cruds",
    ];
    let app = smart_app(vec![client("c", scopes, &[&key])]).await;
    let group = json!({"resourceType": "Group", "id": "g", "type": "person", "actual": true,
                       "member": [{"entity": {"reference": "Patient/p"}}]});
    let (writer, _) = access_token(&app, &key, "c", "system/Group.cruds").await;
    let put = app
        .client
        .put(app.url("/Group/g"))
        .bearer_auth(&writer)
        .json(&group)
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success());
    let path = "/Group/g/$export?_type=Patient,Observation";
    let (without, _) =
        access_token(&app, &key, "c", "system/Patient.rs system/Observation.rs").await;
    let refused = send(&app, reqwest::Method::GET, path, Some(&without)).await;
    let text = assert_outcome(refused, 403).await;
    assert!(text.contains("Group"), "{text}");
    let (with, _) = access_token(
        &app,
        &key,
        "c",
        "system/Patient.rs system/Observation.rs system/Group.rs",
    )
    .await;
    let accepted = kick_off_request(&app, path, "respond-async", Some(&with)).await;
    assert_eq!(accepted.status(), 202);
}

#[tokio::test]
async fn signed_file_links_open_without_a_token_until_they_expire() {
    let key = Key::ec("k");
    let app = TestApp::spawn_with(|c: &mut Config| {
        c.auth.mode = AuthMode::Smart;
        c.auth.token_secret = SECRET.into();
        c.auth.clients = vec![client("c", &["system/*.cruds"], &[&key])];
        c.export.output_urls = fhir_export::config::OutputUrls::Signed;
        c.export.signed_url_lifetime_secs = 2;
    })
    .await;
    let (token, _) = access_token(&app, &key, "c", "system/*.cruds").await;
    let patient = json!({"resourceType": "Patient", "id": "p"});
    let put = app
        .client
        .put(app.url("/Patient/p"))
        .bearer_auth(&token)
        .json(&patient);
    assert!(put.send().await.unwrap().status().is_success());
    let kicked = kick_off_request(
        &app,
        "/$export?_type=Patient",
        "respond-async",
        Some(&token),
    )
    .await;
    assert_eq!(kicked.status(), 202);
    let manifest = wait_manifest_as(&app, &content_location(&kicked), Some(&token)).await;
    assert_eq!(manifest["requiresAccessToken"], false);
    let url = manifest["output"][0]["url"].as_str().unwrap().to_string();
    // No Authorization header: the link is the leave.
    let file = app.client.get(&url).send().await.unwrap();
    assert_eq!(file.status(), 200);
    assert_eq!(file.headers()["content-type"], "application/fhir+ndjson");
    assert!(file.text().await.unwrap().contains("\"id\":\"p\""));
    // Another file, expiry or signature: refused.
    let tampered = [
        url.replace("Patient-1", "Patient-2"),
        url.replace("signature=", "signature=A"),
        url.split("&signature").next().unwrap().to_string(),
        {
            let expires: i64 = url
                .split("expires=")
                .nth(1)
                .unwrap()
                .split('&')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            url.replace(
                &format!("expires={expires}"),
                &format!("expires={}", expires + 1000),
            )
        },
    ];
    for bad in tampered {
        assert_outcome(app.client.get(&bad).send().await.unwrap(), 403).await;
    }
    // Expired: refused; the manifest fetched again has new links.
    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
    let text = assert_outcome(app.client.get(&url).send().await.unwrap(), 403).await;
    assert!(text.contains("expired"), "{text}");
    let again = wait_manifest_as(&app, &content_location(&kicked), Some(&token)).await;
    let fresh = again["output"][0]["url"].as_str().unwrap();
    assert_ne!(fresh, url);
    assert_eq!(app.client.get(fresh).send().await.unwrap().status(), 200);
}
