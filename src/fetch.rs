//! `fhir-export fetch`: a bulk-data client for this server and any server that follows the Bulk
//! Data Access IG. Kick-off, polling that honours `Retry-After` (seconds or an HTTP date) and
//! 429, parallel downloads with retries, each file's line count checked against the manifest.
//!
//! Resumable: the status URL and every finished file are recorded in `DIR/fetch-state.json`
//! as soon as they are known, and a file appears under its name only once it is complete. Run
//! the same command again after an interruption (Ctrl-C, a crash, a network outage) and it
//! picks up the job where it stood.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::{StatusCode, header};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::{io::AsyncWriteExt, sync::Mutex};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;

#[derive(clap::Args, Debug, Clone)]
pub struct FetchArgs {
    /// The server's FHIR base URL (e.g. http://127.0.0.1:8080).
    pub url: String,
    /// Export a Group's members (`/Group/{id}/$export`).
    #[arg(long, conflicts_with = "patient_level")]
    pub group: Option<String>,
    /// Export every patient's compartment (`/Patient/$export`).
    #[arg(long)]
    pub patient_level: bool,
    /// `_type`: resource types, comma-separated.
    #[arg(long = "type", value_delimiter = ',')]
    pub types: Vec<String>,
    /// `_since`: an instant.
    #[arg(long)]
    pub since: Option<String>,
    /// `_typeFilter`: one query (`Type?search`); repeat for more.
    #[arg(long = "type-filter")]
    pub type_filters: Vec<String>,
    /// `_elements`, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub elements: Vec<String>,
    /// `_anonymizationConfig`: a de-identified export with the server's configuration NAME.
    #[arg(long)]
    pub anonymization_config: Option<String>,
    /// `_anonymizationConfigEtag`: the ETag that configuration must have.
    #[arg(long, requires = "anonymization_config")]
    pub anonymization_config_etag: Option<String>,
    /// Kick off with POST and a `Parameters` body instead of GET.
    #[arg(long)]
    pub post: bool,
    /// Where the files go.
    #[arg(long, default_value = "export")]
    pub out: PathBuf,
    /// Files downloaded at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub parallel: u32,
    /// Store the files gzipped (`.ndjson.gz`).
    #[arg(long)]
    pub gzip: bool,
    /// A file holding a bearer token to send as it is.
    #[arg(long, conflicts_with = "client_id")]
    pub bearer_token: Option<PathBuf>,
    /// SMART Backend Services: the client id (with --key and --kid).
    #[arg(long, requires = "key")]
    pub client_id: Option<String>,
    /// SMART Backend Services: the client's private key, PEM or a JWK Set holding it (RSA signs
    /// RS384, EC P-384 ES384).
    #[arg(long, requires = "client_id")]
    pub key: Option<PathBuf>,
    /// The `kid` of that key in the client's registered key set (default: the JWK's `kid`).
    #[arg(long, requires = "key")]
    pub kid: Option<String>,
    /// The token endpoint; default: from `{url}/.well-known/smart-configuration`.
    #[arg(long)]
    pub token_url: Option<String>,
    /// Scopes to ask for.
    #[arg(long, default_value = "system/*.read")]
    pub scope: String,
    /// Cancel the job that DIR's state names, and forget it.
    #[arg(long)]
    pub cancel: bool,
}

const STATE_FILE: &str = "fetch-state.json";
/// Polling waits at least this long and at most `MAX_WAIT`, whatever the server says.
const MIN_WAIT: Duration = Duration::from_millis(200);
const MAX_WAIT: Duration = Duration::from_secs(120);
/// Tries of a request that fails to connect, and of a download, before giving up.
const TRIES: u32 = 6;

/// Pauses between those tries: from 1 s, doubling up to 30 s (with jitter, so parallel
/// downloads hit by one outage do not retry in step).
fn retry_backoff() -> Backoff {
    Backoff::starting(Duration::from_secs(1), Duration::from_secs(30))
}

/// What DIR remembers between runs.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// The kick-off this state belongs to (method and URL).
    request: String,
    status_url: Option<String>,
    /// Finished files: name → lines.
    done: BTreeMap<String, u64>,
}

impl State {
    async fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let temp = dir.join(format!("{STATE_FILE}.tmp"));
        tokio::fs::write(&temp, serde_json::to_vec_pretty(self)?).await?;
        tokio::fs::rename(&temp, dir.join(STATE_FILE)).await?;
        Ok(())
    }
}

pub async fn run(args: FetchArgs) -> anyhow::Result<()> {
    tokio::fs::create_dir_all(&args.out)
        .await
        .with_context(|| format!("creating {}", args.out.display()))?;
    let client = Arc::new(Client::new(&args).await?);
    let request = kickoff_description(&args);
    let state_path = args.out.join(STATE_FILE);
    let mut state: State = match tokio::fs::read(&state_path).await {
        Ok(bytes) => serde_json::from_slice(&bytes).context("reading the state file")?,
        Err(_) => State::default(),
    };
    if !state.request.is_empty() && state.request != request {
        bail!(
            "{} holds another export ({}); use another --out",
            args.out.display(),
            state.request
        );
    }
    state.request = request;

    if args.cancel {
        let Some(status_url) = &state.status_url else {
            bail!("{} names no export to cancel", args.out.display());
        };
        let response = client.send(|http| http.delete(status_url)).await?;
        match response.status() {
            s if s.is_success() => eprintln!("cancelled {status_url}"),
            StatusCode::NOT_FOUND => eprintln!("the server no longer knows {status_url}"),
            s => bail!("cancelling answered {s}: {}", outcome_text(response).await),
        }
        tokio::fs::remove_file(&state_path).await.ok();
        return Ok(());
    }

    // Ctrl-C is listened for before the kick-off: one that came between it and the first wait would
    // otherwise end the process without saying how to resume.
    let interrupted = CancellationToken::new();
    tokio::spawn({
        let interrupted = interrupted.clone();
        async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupted.cancel();
            }
        }
    });
    let status_url = match state.status_url.clone() {
        Some(url) => {
            eprintln!("resuming {url}");
            url
        }
        None => {
            let url = client.kick_off(&args).await?;
            state.status_url = Some(url.clone());
            state.save(&args.out).await?;
            url
        }
    };
    let manifest = tokio::select! {
        manifest = client.poll(&status_url) => manifest?,
        _ = interrupted.cancelled() => bail!(interrupted_message(&args)),
    };
    let state = Arc::new(Mutex::new(state));
    let summary = tokio::select! {
        summary = download_all(&client, &args, &manifest, state.clone()) => summary?,
        _ = interrupted.cancelled() => bail!(interrupted_message(&args)),
    };
    eprintln!(
        "{} files, {} resources in {}",
        summary.files,
        summary.resources,
        args.out.display()
    );
    for line in summary.errors {
        eprintln!("server error file: {line}");
    }
    Ok(())
}

fn interrupted_message(args: &FetchArgs) -> String {
    format!(
        "interrupted; run the same command again to resume (the state is in {})",
        args.out.join(STATE_FILE).display()
    )
}

/// The kick-off's path and query, and whether it is a POST: what the state file is for.
fn kickoff_description(args: &FetchArgs) -> String {
    let (path, query) = kickoff_url(args);
    let method = if args.post { "POST" } else { "GET" };
    format!("{method} {path}?{query}")
}

/// The kick-off URL and its query (the query also makes the POST body).
fn kickoff_url(args: &FetchArgs) -> (String, String) {
    let base = args.url.trim_end_matches('/');
    let path = match (&args.group, args.patient_level) {
        (Some(group), _) => format!("{base}/Group/{group}/$export"),
        (None, true) => format!("{base}/Patient/$export"),
        (None, false) => format!("{base}/$export"),
    };
    let mut query = form_urlencoded::Serializer::new(String::new());
    if !args.types.is_empty() {
        query.append_pair("_type", &args.types.join(","));
    }
    if let Some(since) = &args.since {
        query.append_pair("_since", since);
    }
    for filter in &args.type_filters {
        query.append_pair("_typeFilter", filter);
    }
    if !args.elements.is_empty() {
        query.append_pair("_elements", &args.elements.join(","));
    }
    if let Some(name) = &args.anonymization_config {
        query.append_pair("_anonymizationConfig", name);
    }
    if let Some(etag) = &args.anonymization_config_etag {
        query.append_pair("_anonymizationConfigEtag", etag);
    }
    (path, query.finish())
}

/// A file of the manifest and where it goes.
#[derive(Clone)]
struct Download {
    url: String,
    name: String,
    count: Option<u64>,
    is_error: bool,
}

struct Summary {
    files: usize,
    resources: u64,
    /// The first lines of the server's error files, summarised.
    errors: Vec<String>,
}

/// Names follow the manifest's order per type: `Patient-1.ndjson`, …; deletions under
/// `deleted/`, the server's error files under `error/`.
fn downloads(manifest: &Value, gzip: bool) -> anyhow::Result<(Vec<Download>, bool)> {
    let requires_token = manifest["requiresAccessToken"].as_bool().unwrap_or(false);
    let mut list = Vec::new();
    let mut numbers: BTreeMap<String, u32> = BTreeMap::new();
    let extension = if gzip { "ndjson.gz" } else { "ndjson" };
    for (key, folder) in [("output", ""), ("deleted", "deleted/"), ("error", "error/")] {
        for entry in manifest[key].as_array().into_iter().flatten() {
            let url = entry["url"]
                .as_str()
                .context("a manifest entry without url")?;
            let kind = entry["type"].as_str().unwrap_or("Resource");
            // Letters only: a name from the server never leaves DIR.
            if !kind.chars().all(|c| c.is_ascii_alphanumeric()) {
                bail!("the manifest names a file type '{kind}'");
            }
            let n = numbers.entry(format!("{folder}{kind}")).or_default();
            *n += 1;
            list.push(Download {
                url: url.to_string(),
                name: format!("{folder}{kind}-{n}.{extension}"),
                count: entry["count"].as_u64(),
                is_error: key == "error",
            });
        }
    }
    Ok((list, requires_token))
}

async fn download_all(
    client: &Arc<Client>,
    args: &FetchArgs,
    manifest: &Value,
    state: Arc<Mutex<State>>,
) -> anyhow::Result<Summary> {
    let (files, requires_token) = downloads(manifest, args.gzip)?;
    let total = files.len();
    let overall = ProgressBar::new(total as u64).with_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} files")
            .expect("valid template"),
    );
    // One task per file (at most `parallel` at once): each download's copying and line
    // counting runs on its own thread, not all on one.
    let (client, out) = (client.clone(), Arc::new(args.out.clone()));
    let permits = Arc::new(tokio::sync::Semaphore::new(args.parallel as usize));
    let mut running = tokio::task::JoinSet::new();
    for (index, file) in files.iter().enumerate() {
        let (state, overall, client, out, permits) = (
            state.clone(),
            overall.clone(),
            client.clone(),
            out.clone(),
            permits.clone(),
        );
        let (file, gzip) = (file.clone(), args.gzip);
        running.spawn(async move {
            let _permit = permits.acquire_owned().await?;
            let already = state.lock().await.done.get(&file.name).copied();
            let lines = match already {
                Some(lines) => lines,
                None => {
                    let lines = client
                        .download(&file, &out, gzip, requires_token)
                        .await
                        .with_context(|| format!("downloading {}", file.url))?;
                    let mut state = state.lock().await;
                    state.done.insert(file.name.clone(), lines);
                    state.save(&out).await?;
                    lines
                }
            };
            overall.inc(1);
            anyhow::Ok((index, lines))
        });
    }
    let mut downloaded = Vec::with_capacity(files.len());
    while let Some(result) = running.join_next().await {
        let (index, lines) = result.context("a download task failed")??;
        downloaded.push((&files[index], lines));
    }
    overall.finish_and_clear();
    let mut summary = Summary {
        files: total,
        resources: 0,
        errors: Vec::new(),
    };
    for (file, lines) in downloaded {
        if file.is_error {
            summary
                .errors
                .extend(error_lines(&args.out.join(&file.name), args.gzip).await?);
        } else {
            summary.resources += lines;
        }
    }
    Ok(summary)
}

/// The diagnostics of an error file's OperationOutcomes (the first ten).
async fn error_lines(path: &Path, gzip: bool) -> anyhow::Result<Vec<String>> {
    let bytes = tokio::fs::read(path).await?;
    let text = if gzip {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut out)?;
        out
    } else {
        String::from_utf8_lossy(&bytes).into_owned()
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .flat_map(|o| {
            o["issue"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i["diagnostics"].as_str().map(str::to_string))
                .collect::<Vec<_>>()
        })
        .take(10)
        .collect())
}

/// HTTP with the caller's credentials.
struct Client {
    http: reqwest::Client,
    auth: Auth,
    base: reqwest::Url,
}

enum Auth {
    None,
    Bearer(String),
    Smart(Box<Smart>),
}

struct Smart {
    client_id: String,
    kid: Option<String>,
    key: jsonwebtoken::EncodingKey,
    algorithm: jsonwebtoken::Algorithm,
    token_url: String,
    scope: String,
    /// The current token and when to get a new one.
    token: Mutex<Option<(String, Instant)>>,
}

impl Client {
    async fn new(args: &FetchArgs) -> anyhow::Result<Client> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .build()?;
        let base = reqwest::Url::parse(args.url.trim_end_matches('/'))
            .with_context(|| format!("'{}' is not a URL", args.url))?;
        let auth = match (&args.bearer_token, &args.client_id, &args.key) {
            (Some(file), _, _) => {
                let token = tokio::fs::read_to_string(file)
                    .await
                    .with_context(|| format!("reading {}", file.display()))?;
                Auth::Bearer(token.trim().to_string())
            }
            (None, Some(client_id), Some(key_file)) => {
                let bytes = tokio::fs::read(key_file)
                    .await
                    .with_context(|| format!("reading {}", key_file.display()))?;
                let (key, algorithm, jwk_kid) = signing_key(&bytes)
                    .with_context(|| format!("the key in {}", key_file.display()))?;
                let token_url = match &args.token_url {
                    Some(url) => url.clone(),
                    None => discover_token_url(&http, &args.url).await?,
                };
                Auth::Smart(Box::new(Smart {
                    client_id: client_id.clone(),
                    kid: args.kid.clone().or(jwk_kid),
                    key,
                    algorithm,
                    token_url,
                    scope: args.scope.clone(),
                    token: Mutex::new(None),
                }))
            }
            _ => Auth::None,
        };
        Ok(Client { http, auth, base })
    }

    async fn token(&self) -> anyhow::Result<Option<String>> {
        match &self.auth {
            Auth::None => Ok(None),
            Auth::Bearer(token) => Ok(Some(token.clone())),
            Auth::Smart(smart) => smart.token(&self.http).await.map(Some),
        }
    }

    /// Sends a request built by `build` with the credentials; connection failures are retried.
    async fn send(
        &self,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> anyhow::Result<reqwest::Response> {
        let mut backoff = retry_backoff();
        for attempt in 1.. {
            let mut request = build(&self.http);
            if let Some(token) = self.token().await? {
                request = request.bearer_auth(token);
            }
            match request.send().await {
                Ok(response) => return Ok(response),
                Err(e) if attempt < TRIES && (e.is_connect() || e.is_timeout()) => {
                    let pause = backoff.pause();
                    eprintln!("{e}; retrying in {:.1} s", pause.as_secs_f64());
                    tokio::time::sleep(pause).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        unreachable!("the loop returns")
    }

    async fn kick_off(&self, args: &FetchArgs) -> anyhow::Result<String> {
        let (path, query) = kickoff_url(args);
        let response = self
            .send(|http| {
                let request = if args.post {
                    http.post(&path)
                        .header(header::CONTENT_TYPE, "application/fhir+json")
                        .body(parameters_body(&query).to_string())
                } else if query.is_empty() {
                    http.get(&path)
                } else {
                    http.get(format!("{path}?{query}"))
                };
                request
                    .header(header::ACCEPT, "application/fhir+json")
                    .header("prefer", "respond-async")
            })
            .await?;
        if response.status() != StatusCode::ACCEPTED {
            bail!(
                "the kick-off answered {}: {}",
                response.status(),
                outcome_text(response).await
            );
        }
        let location = response
            .headers()
            .get(header::CONTENT_LOCATION)
            .and_then(|v| v.to_str().ok())
            .context("the kick-off answered without Content-Location")?;
        // Relative locations are resolved against the base URL.
        Ok(self.base.join(location)?.to_string())
    }

    /// Polls the status URL until the manifest is there.
    async fn poll(&self, status_url: &str) -> anyhow::Result<Value> {
        let spinner = ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .expect("valid template"),
        );
        spinner.enable_steady_tick(Duration::from_millis(120));
        let mut wait = Duration::from_secs(1);
        loop {
            let response = self.send(|http| http.get(status_url)).await?;
            let status = response.status();
            match status {
                StatusCode::OK => {
                    spinner.finish_and_clear();
                    return response.json().await.context("the manifest is not JSON");
                }
                StatusCode::ACCEPTED | StatusCode::TOO_MANY_REQUESTS => {
                    let progress = response
                        .headers()
                        .get("x-progress")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or(if status == StatusCode::ACCEPTED {
                            "in progress"
                        } else {
                            "the server asks to poll less often"
                        });
                    spinner.set_message(progress.to_string());
                    wait = retry_after(response.headers()).unwrap_or(if status.as_u16() == 429 {
                        wait * 2
                    } else {
                        wait
                    });
                    tokio::time::sleep(wait.clamp(MIN_WAIT, MAX_WAIT)).await;
                }
                s if is_gateway_hiccup(s) => {
                    spinner.set_message(format!("the server answered {s}; polling again"));
                    tokio::time::sleep(wait.clamp(MIN_WAIT, MAX_WAIT)).await;
                }
                s => {
                    spinner.finish_and_clear();
                    bail!("the export failed ({s}): {}", outcome_text(response).await)
                }
            }
        }
    }

    /// Downloads one file to `{dir}/{name}` (through `.part`), checking its line count; returns
    /// the lines.
    async fn download(
        &self,
        file: &Download,
        dir: &Path,
        gzip: bool,
        requires_token: bool,
    ) -> anyhow::Result<u64> {
        let target = dir.join(&file.name);
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let partial = target.with_extension("part");
        let mut backoff = retry_backoff();
        for attempt in 1..=TRIES {
            match self
                .try_download(file, &partial, gzip, requires_token)
                .await
            {
                Ok(lines) => {
                    if let Some(expected) = file.count
                        && expected != lines
                    {
                        bail!("the manifest counts {expected} resources, the file holds {lines}");
                    }
                    tokio::fs::rename(&partial, &target).await?;
                    return Ok(lines);
                }
                Err(e) if attempt < TRIES => {
                    let pause = backoff.pause();
                    eprintln!(
                        "{}: {e:#}; retrying in {:.1} s",
                        file.name,
                        pause.as_secs_f64()
                    );
                    tokio::time::sleep(pause).await;
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the loop returns")
    }

    async fn try_download(
        &self,
        file: &Download,
        partial: &Path,
        gzip: bool,
        requires_token: bool,
    ) -> anyhow::Result<u64> {
        let mut request = self.http.get(&file.url);
        // A signed URL needs no token (and some storage refuses one).
        if requires_token && let Some(token) = self.token().await? {
            request = request.bearer_auth(token);
        }
        // Uncompressed, as stored: compressing a large file costs the server more CPU than the
        // transfer saves on a fast network. (A server that compresses anyway is decoded.)
        let response = request
            .header(header::ACCEPT, "application/fhir+ndjson")
            .header(header::ACCEPT_ENCODING, "identity")
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("answered {}", response.status());
        }
        let out = tokio::fs::File::create(partial).await?;
        let mut sink: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = if gzip {
            Box::new(async_compression::tokio::write::GzipEncoder::new(
                tokio::io::BufWriter::with_capacity(1 << 20, out),
            ))
        } else {
            Box::new(tokio::io::BufWriter::with_capacity(1 << 20, out))
        };
        let (mut lines, mut last) = (0u64, b'\n');
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
            if let Some(&b) = chunk.last() {
                last = b;
            }
            sink.write_all(&chunk).await?;
        }
        if last != b'\n' {
            // A last line without its newline is still a resource.
            lines += 1;
            sink.write_all(b"\n").await?;
        }
        sink.shutdown().await?;
        Ok(lines)
    }
}

impl Smart {
    /// The current token, or a new one when it is about to expire.
    async fn token(&self, http: &reqwest::Client) -> anyhow::Result<String> {
        let mut token = self.token.lock().await;
        if let Some((value, renew_at)) = token.as_ref()
            && Instant::now() < *renew_at
        {
            return Ok(value.clone());
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let mut jwt_header = jsonwebtoken::Header::new(self.algorithm);
        jwt_header.kid = self.kid.clone();
        let claims = json!({
            "iss": self.client_id, "sub": self.client_id, "aud": self.token_url,
            "exp": now + 240, "jti": uuid::Uuid::new_v4().to_string(),
        });
        let assertion = jsonwebtoken::encode(&jwt_header, &claims, &self.key)?;
        let response = http
            .post(&self.token_url)
            .form(&[
                ("grant_type", "client_credentials"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", &assertion),
                ("scope", &self.scope),
            ])
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("the token endpoint answered {status}: {body}");
        }
        let value = body["access_token"]
            .as_str()
            .context("the token endpoint gave no access_token")?
            .to_string();
        let lifetime = body["expires_in"].as_u64().unwrap_or(300);
        // Renewed a minute early (or halfway, for short tokens).
        let renew_in = lifetime.saturating_sub(60).max(lifetime / 2);
        *token = Some((
            value.clone(),
            Instant::now() + Duration::from_secs(renew_in),
        ));
        Ok(value)
    }
}

/// A signing key from PEM, or from a JWK Set (or one JWK) with a private key; the JWK's kid.
fn signing_key(
    bytes: &[u8],
) -> anyhow::Result<(
    jsonwebtoken::EncodingKey,
    jsonwebtoken::Algorithm,
    Option<String>,
)> {
    use jsonwebtoken::{Algorithm, EncodingKey};
    if let Ok(json) = serde_json::from_slice::<Value>(bytes) {
        let jwk = match json["keys"].as_array() {
            Some(keys) => keys
                .iter()
                .find(|k| k["d"].is_string())
                .context("the key set holds no private key")?,
            None => &json,
        };
        let kid = jwk["kid"].as_str().map(str::to_string);
        let (key, algorithm) = private_jwk(jwk)?;
        return Ok((key, algorithm, kid));
    }
    if let Ok(key) = EncodingKey::from_rsa_pem(bytes) {
        return Ok((key, Algorithm::RS384, None));
    }
    let key = EncodingKey::from_ec_pem(bytes)
        .context("neither a JWK Set nor an RSA or EC private key in PEM")?;
    Ok((key, Algorithm::ES384, None))
}

/// A private JWK as DER: PKCS#1 for RSA, PKCS#8 (SEC 1 inside) for EC P-384.
fn private_jwk(
    jwk: &Value,
) -> anyhow::Result<(jsonwebtoken::EncodingKey, jsonwebtoken::Algorithm)> {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    use jsonwebtoken::{Algorithm, EncodingKey};
    let part = |name: &str| -> anyhow::Result<Vec<u8>> {
        let text = jwk[name]
            .as_str()
            .with_context(|| format!("the JWK has no '{name}'"))?;
        Ok(URL_SAFE_NO_PAD.decode(text.trim_end_matches('='))?)
    };
    match (jwk["kty"].as_str(), jwk["crv"].as_str()) {
        (Some("RSA"), _) => {
            let mut fields = vec![der::integer(&[0])];
            for name in ["n", "e", "d", "p", "q", "dp", "dq", "qi"] {
                fields.push(der::integer(&part(name)?));
            }
            Ok((
                EncodingKey::from_rsa_der(&der::sequence(&fields)),
                Algorithm::RS384,
            ))
        }
        (Some("EC"), Some("P-384")) => {
            let mut point = vec![4];
            point.extend(part("x")?);
            point.extend(part("y")?);
            let sec1 = der::sequence(&[
                der::integer(&[1]),
                der::tlv(0x04, &part("d")?),
                der::tlv(0xa0, der::SECP384R1),
                der::tlv(0xa1, &der::tlv(0x03, &[&[0u8][..], &point].concat())),
            ]);
            let pkcs8 = der::sequence(&[
                der::integer(&[0]),
                der::sequence(&[der::EC_PUBLIC_KEY.to_vec(), der::SECP384R1.to_vec()]),
                der::tlv(0x04, &sec1),
            ]);
            Ok((EncodingKey::from_ec_der(&pkcs8), Algorithm::ES384))
        }
        (kty, crv) => bail!("a {kty:?} key on {crv:?} cannot sign RS384 or ES384"),
    }
}

/// The few DER forms a private key needs.
mod der {
    /// OID 1.2.840.10045.2.1 (an EC public key).
    pub const EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    /// OID 1.3.132.0.34 (P-384).
    pub const SECP384R1: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

    pub fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = content.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes: Vec<u8> = len
                .to_be_bytes()
                .into_iter()
                .skip_while(|b| *b == 0)
                .collect();
            out.push(0x80 | bytes.len() as u8);
            out.extend(bytes);
        }
        out.extend_from_slice(content);
        out
    }

    /// An unsigned big-endian integer.
    pub fn integer(value: &[u8]) -> Vec<u8> {
        let trimmed: Vec<u8> = value.iter().copied().skip_while(|b| *b == 0).collect();
        let mut content = if trimmed.is_empty() { vec![0] } else { trimmed };
        if content[0] & 0x80 != 0 {
            content.insert(0, 0);
        }
        tlv(0x02, &content)
    }

    pub fn sequence(items: &[Vec<u8>]) -> Vec<u8> {
        tlv(0x30, &items.concat())
    }
}

async fn discover_token_url(http: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let url = format!(
        "{}/.well-known/smart-configuration",
        base.trim_end_matches('/')
    );
    let config: Value = http
        .get(&url)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await
        .with_context(|| format!("{url} is not JSON"))?;
    config["token_endpoint"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("{url} names no token_endpoint; give --token-url"))
}

/// The kick-off query as a FHIR `Parameters` resource.
fn parameters_body(query: &str) -> Value {
    let parameter: Vec<Value> = form_urlencoded::parse(query.as_bytes())
        .map(|(name, value)| json!({"name": name, "valueString": value}))
        .collect();
    json!({"resourceType": "Parameters", "parameter": parameter})
}

/// `Retry-After` as seconds or as an HTTP date.
fn retry_after(headers: &header::HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let secs = (at.timestamp() - chrono::Utc::now().timestamp()).max(0);
    Some(Duration::from_secs(secs as u64))
}

/// 502, 503 and 504 are a gateway's or a restart's: polled through.
fn is_gateway_hiccup(status: StatusCode) -> bool {
    matches!(status.as_u16(), 502..=504)
}

/// An OperationOutcome's diagnostics, or the body as it is.
async fn outcome_text(response: reqwest::Response) -> String {
    let text = response.text().await.unwrap_or_default();
    match serde_json::from_str::<Value>(&text) {
        Ok(outcome) => outcome["issue"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["diagnostics"].as_str())
            .collect::<Vec<_>>()
            .join("; "),
        Err(_) => text.chars().take(500).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut headers = header::HeaderMap::new();
        headers.insert(header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        let later = chrono::Utc::now() + chrono::TimeDelta::seconds(30);
        let date = later.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
        headers.insert(header::RETRY_AFTER, date.parse().unwrap());
        let wait = retry_after(&headers).unwrap().as_secs();
        assert!((28..=30).contains(&wait), "{wait}");
        headers.insert(header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn manifest_files_get_names_that_stay_in_the_folder() {
        let manifest = json!({
            "requiresAccessToken": true,
            "output": [
                {"type": "Patient", "url": "https://x/a", "count": 2},
                {"type": "Patient", "url": "https://x/b", "count": 1},
                {"type": "Observation", "url": "https://x/c"}
            ],
            "deleted": [{"type": "Bundle", "url": "https://x/d"}],
            "error": [{"type": "OperationOutcome", "url": "https://x/e"}]
        });
        let (files, token) = downloads(&manifest, false).unwrap();
        assert!(token);
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "Patient-1.ndjson",
                "Patient-2.ndjson",
                "Observation-1.ndjson",
                "deleted/Bundle-1.ndjson",
                "error/OperationOutcome-1.ndjson"
            ]
        );
        let hostile = json!({"output": [{"type": "../../etc", "url": "https://x/a"}]});
        assert!(downloads(&hostile, false).is_err());
    }

    #[test]
    fn a_post_kick_off_carries_the_query_as_parameters() {
        let body =
            parameters_body("_type=Patient%2CObservation&_typeFilter=Patient%3Fgender%3Dmale");
        assert_eq!(body["parameter"][0]["valueString"], "Patient,Observation");
        assert_eq!(body["parameter"][1]["name"], "_typeFilter");
        assert_eq!(body["parameter"][1]["valueString"], "Patient?gender=male");
    }
}
