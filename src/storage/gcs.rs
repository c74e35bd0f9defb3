//! Google Cloud Storage through its JSON API. Everything lives in one bucket: a container is the
//! first folder of an object's name. Credentials are Application Default Credentials (a
//! service-account key file in `GOOGLE_APPLICATION_CREDENTIALS`, gcloud's user credentials, the
//! metadata server for workload identity) or the key file the configuration names, through
//! `object_store`'s providers, which also sign V4 URLs. `endpoint`, else `STORAGE_EMULATOR_HOST`
//! as Google's own client libraries read it, points everything at an emulator.
//!
//! A part smaller than `part_size` is one upload; a larger one is a resumable upload whose chunks
//! stream out as they fill. The object appears only with the last request (the single upload,
//! or the chunk that states the total size), sent once the fence holds; a fenced-out session is
//! cancelled, and one a crash abandons expires by itself after a week without ever becoming
//! visible. Either way an object of that name is replaced, never appended to.

use std::time::Duration;

use anyhow::{Context, anyhow};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use object_store::{
    gcp::{GoogleCloudStorage, GoogleCloudStorageBuilder},
    signer::Signer,
};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::{Value, json};

use super::config::GcsConfig;
use super::{
    AttemptTag, ByteStream, Error, Fence, PartWriter, REQUEST_LIMIT, Storage, object_key,
    object_store_options,
};

const GOOGLE: &str = "https://storage.googleapis.com";

/// Resumable upload chunks are multiples of this (but for the last).
pub const CHUNK_GRANULE: usize = 256 * 1024;

#[derive(Clone)]
pub struct GcsStorage {
    http: reqwest::Client,
    /// `https://storage.googleapis.com` or the emulator's URL.
    base: String,
    bucket: String,
    /// Tokens and URL signatures.
    google: GoogleCloudStorage,
    part_size: usize,
}

impl GcsStorage {
    pub fn from_config(config: &GcsConfig) -> anyhow::Result<GcsStorage> {
        let bucket = &config.bucket;
        let mut builder = GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket);
        let emulator = Some(config.endpoint.clone())
            .filter(|e| !e.is_empty())
            .or_else(|| std::env::var("STORAGE_EMULATOR_HOST").ok())
            .filter(|h| !h.is_empty())
            .map(|host| match host.contains("://") {
                true => host.trim_end_matches('/').to_string(),
                false => format!("http://{host}"),
            });
        let base = match &emulator {
            Some(emulator) => {
                // The emulator's address travels in the key, the one place the builder reads it.
                let mut key = match config.service_account_path.as_str() {
                    "" => json!({"private_key": "", "private_key_id": "", "client_email": "",
                                 "disable_oauth": true}),
                    path => serde_json::from_str::<Value>(
                        &std::fs::read_to_string(path)
                            .with_context(|| format!("reading the key file {path}"))?,
                    )
                    .with_context(|| format!("the key file {path} is not JSON"))?,
                };
                key.as_object_mut()
                    .ok_or_else(|| anyhow!("the key file is not a JSON object"))?
                    .insert("gcs_base_url".into(), json!(emulator));
                builder = builder.with_service_account_key(key.to_string());
                emulator.clone()
            }
            None => {
                if !config.service_account_path.is_empty() {
                    builder = builder.with_service_account_path(&config.service_account_path);
                }
                GOOGLE.to_string()
            }
        };
        let google = builder
            .with_client_options(object_store_options().with_allow_http(emulator.is_some()))
            .build()
            .with_context(|| format!("storage.gcs (bucket '{bucket}')"))?;
        let http = reqwest::Client::builder()
            // A chunk's answer is 308 (resume incomplete), never a redirect to follow.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(REQUEST_LIMIT)
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(GcsStorage {
            http,
            base,
            bucket: bucket.clone(),
            google,
            part_size: config.part_size,
        })
    }

    fn object_url(&self, key: &str) -> String {
        format!(
            "{}/storage/v1/b/{}/o/{}",
            self.base,
            self.bucket,
            escaped(key)
        )
    }

    fn label(&self) -> String {
        format!("gs://{}", self.bucket)
    }

    /// A request with the current access token.
    async fn request(&self, method: Method, url: &str) -> Result<RequestBuilder, Error> {
        let request = self.http.request(method, url);
        let credential = self
            .google
            .credentials()
            .get_credential()
            .await
            .map_err(|e| Error::Transient(format!("getting a Google access token: {e}")))?;
        Ok(match credential.bearer.as_str() {
            "" => request,
            token => request.bearer_auth(token),
        })
    }

    /// Sends a request; an answer that is not a success is an error that says what it means.
    async fn send(&self, request: RequestBuilder, doing: &str) -> Result<Response, Error> {
        self.send_found(request, doing).await?.ok_or_else(|| {
            Error::Failed(anyhow!(
                "{doing} in {}: 404 Not Found (not found: check that the bucket exists)",
                self.label()
            ))
        })
    }

    /// Like `send`, but `None` when what the request names is not there (a 404).
    async fn send_found(
        &self,
        request: RequestBuilder,
        doing: &str,
    ) -> Result<Option<Response>, Error> {
        send(request, &self.label(), doing).await
    }

    async fn names_under(&self, prefix: &str) -> Result<Vec<String>, Error> {
        let mut names = Vec::new();
        let mut page: Option<String> = None;
        loop {
            let url = format!("{}/storage/v1/b/{}/o", self.base, self.bucket);
            let mut query = vec![
                ("prefix", prefix.to_string()),
                ("fields", "items(name),nextPageToken".to_string()),
            ];
            query.extend(page.take().map(|p| ("pageToken", p)));
            let request = self.request(Method::GET, &url).await?.query(&query);
            let listing: Value = self
                .send(request, &format!("listing {prefix}"))
                .await?
                .json()
                .await
                .map_err(|e| Error::Transient(format!("listing {prefix}: {e}")))?;
            names.extend(
                listing["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|o| o["name"].as_str().map(String::from)),
            );
            match listing["nextPageToken"].as_str() {
                Some(token) => page = Some(token.to_string()),
                None => return Ok(names),
            }
        }
    }

    async fn delete_under(&self, prefix: &str) -> anyhow::Result<()> {
        for name in self.names_under(prefix).await? {
            let request = self
                .request(Method::DELETE, &self.object_url(&name))
                .await?;
            // Gone already is as good as deleted.
            self.send_found(request, &format!("deleting {name}"))
                .await?;
        }
        Ok(())
    }

    async fn simple_upload(&self, key: &str, data: Vec<u8>, doing: &str) -> Result<(), Error> {
        let url = format!("{}/upload/storage/v1/b/{}/o", self.base, self.bucket);
        let request = self
            .request(Method::POST, &url)
            .await?
            .query(&[("uploadType", "media"), ("name", key)])
            .header("Content-Type", NDJSON)
            .body(data);
        self.send(request, doing).await.map(drop)
    }
}

const NDJSON: &str = "application/fhir+ndjson";

/// An object name as one URL path segment (`/` escaped too, as the JSON API wants).
fn escaped(key: &str) -> String {
    form_urlencoded::byte_serialize(key.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// Sends a request: its answer, `None` for a 404, or an error that says what the answer means.
async fn send(
    request: RequestBuilder,
    label: &str,
    doing: &str,
) -> Result<Option<Response>, Error> {
    let response = match request.send().await {
        Ok(response) => response,
        // No answer, a timeout, a connection cut: gone by itself later.
        Err(e) => return Err(Error::Transient(format!("{doing} in {label}: {e}"))),
    };
    let status = response.status();
    if status.is_success() || status == StatusCode::PERMANENT_REDIRECT {
        return Ok(Some(response));
    }
    if status == StatusCode::NOT_FOUND {
        return Ok(None);
    }
    let body = response.text().await.unwrap_or_default();
    let body: String = body.chars().take(300).collect();
    let message = format!("{doing} in {label}: {status} {body}");
    let code = status.as_u16();
    if code >= 500 || code == 408 || code == 429 {
        return Err(Error::Transient(message));
    }
    let hint = match code {
        401 | 403 => {
            " (authorization failed: the credential needs storage.objects.create, get, list and \
             delete on the bucket)"
        }
        _ => "",
    };
    Err(Error::Failed(anyhow!("{message}{hint}")))
}

#[async_trait]
impl Storage for GcsStorage {
    fn kind(&self) -> &'static str {
        "gcs"
    }

    async fn create(
        &self,
        container: &str,
        name: &str,
        _owner: AttemptTag,
    ) -> Result<Box<dyn PartWriter>, Error> {
        Ok(Box::new(GcsWriter {
            storage: self.clone(),
            key: object_key(container, name)?,
            buffer: Vec::new(),
            session: None,
            sent: 0,
        }))
    }

    async fn read(&self, container: &str, name: &str) -> anyhow::Result<Option<ByteStream>> {
        let key = object_key(container, name)?;
        let request = self
            .request(Method::GET, &self.object_url(&key))
            .await?
            .query(&[("alt", "media")]);
        let found = self.send_found(request, &format!("reading {key}")).await?;
        Ok(found.map(|response| {
            response
                .bytes_stream()
                .map_err(std::io::Error::other)
                .boxed()
        }))
    }

    async fn delete_folder(&self, container: &str, folder: &str) -> anyhow::Result<()> {
        self.delete_under(&format!("{}/", object_key(container, folder)?))
            .await
    }

    async fn delete_container(&self, container: &str) -> anyhow::Result<()> {
        self.delete_under(&format!("{}/", object_key(container, "")?))
            .await
    }

    async fn check(&self) -> anyhow::Result<()> {
        // Write and delete a small object: the credentials must allow both.
        let key = format!(".fhir-export-check-{}", uuid::Uuid::new_v4().simple());
        self.simple_upload(&key, b"ok".to_vec(), "writing a probe object")
            .await?;
        let request = self.request(Method::DELETE, &self.object_url(&key)).await?;
        self.send(request, "deleting a probe object").await?;
        Ok(())
    }

    async fn probe(&self) -> anyhow::Result<()> {
        let url = format!("{}/storage/v1/b/{}/o", self.base, self.bucket);
        let request = self
            .request(Method::GET, &url)
            .await?
            .query(&[("prefix", ".fhir-export-probe"), ("maxResults", "1")]);
        self.send(request, "listing").await?;
        Ok(())
    }

    async fn direct_urls(
        &self,
        container: &str,
        names: &[String],
        signed: bool,
        expires: DateTime<Utc>,
    ) -> anyhow::Result<Option<Vec<String>>> {
        let lifetime = super::lifetime_until(expires);
        let mut urls = Vec::with_capacity(names.len());
        for name in names {
            let key = object_key(container, name)?;
            let url = if signed {
                let path = object_store::path::Path::parse(&key)?;
                self.google
                    .signed_url(axum::http::Method::GET, &path, lifetime)
                    .await
                    .with_context(|| format!("signing a URL of {}", self.label()))?
                    .to_string()
            } else {
                format!("{}/{}/{}", self.base, self.bucket, super::url_path(&key))
            };
            urls.push(url);
        }
        Ok(Some(urls))
    }
}

/// A part being written: bytes gather up to `part_size`; the first full buffer starts a
/// resumable session, and each after goes out as one chunk of it.
struct GcsWriter {
    storage: GcsStorage,
    key: String,
    buffer: Vec<u8>,
    /// The resumable session's URL, once started.
    session: Option<String>,
    /// Bytes the session has taken.
    sent: u64,
}

impl GcsWriter {
    async fn start_session(&self) -> Result<String, Error> {
        let storage = &self.storage;
        let url = format!("{}/upload/storage/v1/b/{}/o", storage.base, storage.bucket);
        let request = storage
            .request(Method::POST, &url)
            .await?
            .query(&[("uploadType", "resumable"), ("name", &self.key)])
            .header("X-Upload-Content-Type", NDJSON)
            .json(&json!({"name": self.key, "contentType": NDJSON}));
        let response = storage.send(request, "starting an upload").await?;
        response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .map(String::from)
            .ok_or_else(|| Error::Failed(anyhow!("starting an upload: no session URL")))
    }

    /// Sends `len` bytes of the buffer as the next chunk; with `total`, the last one.
    async fn send_chunk(&mut self, len: usize, total: Option<u64>) -> Result<(), Error> {
        let session = match &self.session {
            Some(session) => session.clone(),
            None => self.session.insert(self.start_session().await?).clone(),
        };
        let chunk: Vec<u8> = self.buffer.drain(..len).collect();
        let range = match (chunk.len() as u64, total) {
            (0, Some(total)) => format!("bytes */{total}"),
            (n, total) => format!(
                "bytes {}-{}/{}",
                self.sent,
                self.sent + n - 1,
                total.map_or("*".to_string(), |t| t.to_string())
            ),
        };
        self.sent += chunk.len() as u64;
        let request = self
            .storage
            .request(Method::PUT, &session)
            .await?
            .header("Content-Range", range)
            .body(chunk);
        self.storage
            .send(request, "uploading a chunk")
            .await
            .map(drop)
    }

    /// Cancels the session; the service forgets its chunks.
    fn cancel(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        let storage = self.storage.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Ok(request) = storage.request(Method::DELETE, &session).await {
                    let _ = request.send().await;
                }
            });
        }
    }
}

#[async_trait]
impl PartWriter for GcsWriter {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.buffer.extend_from_slice(bytes);
        let part_size = self.storage.part_size;
        if self.buffer.len() >= part_size {
            // Chunks but the last are whole granules: the rest waits for the next.
            let len = self.buffer.len() / CHUNK_GRANULE * CHUNK_GRANULE;
            self.send_chunk(len, None).await?;
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>, fence: Fence<'_>) -> Result<bool, Error> {
        if self.session.is_some() && self.buffer.len() >= CHUNK_GRANULE {
            // All but the last granule goes out before the fence, so the request that makes
            // the object visible is a short one.
            let len = (self.buffer.len() - 1) / CHUNK_GRANULE * CHUNK_GRANULE;
            self.send_chunk(len, None).await?;
        }
        if !fence.await {
            self.cancel();
            return Ok(false);
        }
        if self.session.is_none() {
            let data = std::mem::take(&mut self.buffer);
            let doing = format!("writing {}", self.key);
            self.storage.simple_upload(&self.key, data, &doing).await?;
            return Ok(true);
        }
        let total = self.sent + self.buffer.len() as u64;
        let len = self.buffer.len();
        self.send_chunk(len, Some(total)).await?;
        self.session = None;
        Ok(true)
    }
}

impl Drop for GcsWriter {
    /// A part given up (an error, a lost lease) leaves no session behind.
    fn drop(&mut self) {
        self.cancel();
    }
}
