//! `fhir-export fetch`: a bulk-data client for this server and any server that follows the Bulk
//! Data Access IG. Kick-off, polling that honours `Retry-After` (seconds or an HTTP date) and
//! 429, parallel downloads with retries, each file's line count checked against the manifest.
//!
//! Resumable: the status URL and every finished file are recorded in `DIR/fetch-state.json`
//! as soon as they are known, and a file appears under its name only once it is complete. Run
//! the same command again after an interruption (Ctrl-C, a crash, a network outage) and it
//! picks up the job where it stood.

mod client;
mod download;
mod smart;
mod state;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use self::{
    client::{Client, outcome_text},
    download::download_all,
    state::{STATE_FILE, State},
};
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

/// Polling waits at least this long and at most `MAX_WAIT`, whatever the server says.
pub(super) const MIN_WAIT: Duration = Duration::from_millis(200);
pub(super) const MAX_WAIT: Duration = Duration::from_secs(120);
/// Tries of a request that fails to connect, and of a download, before giving up.
pub(super) const TRIES: u32 = 6;

/// Pauses between those tries: from 1 s, doubling up to 30 s (with jitter, so parallel
/// downloads hit by one outage do not retry in step).
pub(super) fn retry_backoff() -> Backoff {
    Backoff::starting(Duration::from_secs(1), Duration::from_secs(30))
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
pub(super) fn kickoff_url(args: &FetchArgs) -> (String, String) {
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
pub(super) struct Download {
    pub(super) url: String,
    pub(super) name: String,
    pub(super) count: Option<u64>,
    pub(super) is_error: bool,
}

/// The kick-off query as a FHIR `Parameters` resource.
pub(super) fn parameters_body(query: &str) -> Value {
    let parameter: Vec<Value> = form_urlencoded::parse(query.as_bytes())
        .map(|(name, value)| json!({"name": name, "valueString": value}))
        .collect();
    json!({"resourceType": "Parameters", "parameter": parameter})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_post_kick_off_carries_the_query_as_parameters() {
        let body =
            parameters_body("_type=Patient%2CObservation&_typeFilter=Patient%3Fgender%3Dmale");
        assert_eq!(body["parameter"][0]["valueString"], "Patient,Observation");
        assert_eq!(body["parameter"][1]["name"], "_typeFilter");
        assert_eq!(body["parameter"][1]["valueString"], "Patient?gender=male");
    }
}
