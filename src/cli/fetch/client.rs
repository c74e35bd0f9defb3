//! HTTP with the caller's credentials: kick-off, polling, downloads, each retried as a
//! bulk-data server expects.

use std::{path::Path, time::Duration};

use indicatif::{ProgressBar, ProgressStyle};

use tokio::sync::Mutex;

use anyhow::{Context, bail};
use futures::StreamExt;
use reqwest::{StatusCode, header};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use super::{
    Download, FetchArgs, MAX_WAIT, MIN_WAIT, TRIES, kickoff_url, parameters_body, retry_backoff,
    smart::{Smart, signing_key},
};

/// HTTP with the caller's credentials.
pub(super) struct Client {
    pub(super) http: reqwest::Client,
    pub(super) auth: Auth,
    pub(super) base: reqwest::Url,
}

pub(super) enum Auth {
    None,
    Bearer(String),
    Smart(Box<Smart>),
}

impl Client {
    pub(super) async fn new(args: &FetchArgs) -> anyhow::Result<Client> {
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

    pub(super) async fn token(&self) -> anyhow::Result<Option<String>> {
        match &self.auth {
            Auth::None => Ok(None),
            Auth::Bearer(token) => Ok(Some(token.clone())),
            Auth::Smart(smart) => smart.token(&self.http).await.map(Some),
        }
    }

    /// Sends a request built by `build` with the credentials; connection failures are retried.
    pub(super) async fn send(
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

    pub(super) async fn kick_off(&self, args: &FetchArgs) -> anyhow::Result<String> {
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
    pub(super) async fn poll(&self, status_url: &str) -> anyhow::Result<Value> {
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
    pub(super) async fn download(
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

    pub(super) async fn try_download(
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

pub(super) async fn discover_token_url(
    http: &reqwest::Client,
    base: &str,
) -> anyhow::Result<String> {
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

/// `Retry-After` as seconds or as an HTTP date.
pub(super) fn retry_after(headers: &header::HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let secs = (at.timestamp() - chrono::Utc::now().timestamp()).max(0);
    Some(Duration::from_secs(secs as u64))
}

/// 502, 503 and 504 are a gateway's or a restart's: polled through.
pub(super) fn is_gateway_hiccup(status: StatusCode) -> bool {
    matches!(status.as_u16(), 502..=504)
}

/// An OperationOutcome's diagnostics, or the body as it is.
pub(super) async fn outcome_text(response: reqwest::Response) -> String {
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
}
