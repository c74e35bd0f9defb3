//! Amazon S3 (and S3-compatible servers) through Apache Arrow's `object_store`. Everything lives in
//! one bucket: a container is the first folder of an object's key (`{container}/{folder}/
//! {Type}-{n}.ndjson`), so exports need no permission to create buckets.
//!
//! A part is buffered up to `part_size` bytes; a smaller one becomes visible with a single PUT,
//! a larger one is a multipart upload whose parts stream out as they fill and which becomes
//! visible with its complete call. Both happen only once the fence holds, and both replace an
//! object of that name: a retried part overwrites, never appends. An upload that is never
//! completed (a crash) stays invisible; the bucket's lifecycle rule for incomplete multipart
//! uploads removes its parts.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use object_store::{MultipartUpload, ObjectStore, PutPayload, path::Path, signer::Signer};

use super::{AttemptTag, ByteStream, Error, Fence, PartWriter, Storage};

/// A bucket of an object store.
pub struct CloudStorage {
    kind: &'static str,
    store: Arc<dyn ObjectStore>,
    signer: Arc<dyn Signer>,
    /// Plain object URLs are this, then the key (`https://s3.region.amazonaws.com/bucket`).
    object_base_url: String,
    /// What the errors name: `s3://bucket`.
    label: String,
    part_size: usize,
}

/// What `CloudStorage` is built from; the S3 module fills it from its configuration.
pub struct Bucket<S: ObjectStore + Signer> {
    pub kind: &'static str,
    pub store: S,
    pub object_base_url: String,
    pub label: String,
    pub part_size: usize,
}

impl CloudStorage {
    pub fn new<S: ObjectStore + Signer>(bucket: Bucket<S>) -> CloudStorage {
        let store = Arc::new(bucket.store);
        CloudStorage {
            kind: bucket.kind,
            store: store.clone(),
            signer: store,
            object_base_url: bucket.object_base_url.trim_end_matches('/').to_string(),
            label: bucket.label,
            part_size: bucket.part_size,
        }
    }

    fn key(&self, container: &str, name: &str) -> Result<Path, Error> {
        let key = checked_key(container, name)?;
        Path::parse(&key).map_err(|e| Error::Failed(anyhow!("invalid storage path {key}: {e}")))
    }

    /// Deletes every object under `prefix`, in batches where the service allows.
    async fn delete_under(&self, prefix: &Path) -> anyhow::Result<()> {
        let listed = self.store.list(Some(prefix)).map_ok(|meta| meta.location);
        let mut deleted = self.store.delete_stream(listed.boxed());
        while let Some(done) = deleted.next().await {
            match done {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    return Err(self.explain(e, &format!("deleting under {prefix}")).into());
                }
            }
        }
        Ok(())
    }

    /// An `object_store` error with what it means for the operator. `object_store` has already
    /// retried what it could (5xx, throttling, timeouts, a connection that failed) when its
    /// error is `Generic`: that is a fault the worker waits out, as for Azure.
    fn explain(&self, e: object_store::Error, doing: &str) -> Error {
        explain(&self.label, e, doing)
    }
}

/// The key of `name` in `container`, or of the container itself (a prefix) when `name` is
/// empty. Names are built by the server, but never let one climb or hide in an empty segment.
pub fn checked_key(container: &str, name: &str) -> Result<String, Error> {
    let safe = |s: &str| s.split('/').all(|p| !p.is_empty() && p != "." && p != "..");
    let key = if name.is_empty() {
        container.to_string()
    } else {
        format!("{container}/{name}")
    };
    if !safe(container) || container.contains('/') || !safe(&key) {
        return Err(Error::Failed(anyhow!("invalid storage path {key}")));
    }
    Ok(key)
}

fn explain(label: &str, e: object_store::Error, doing: &str) -> Error {
    use object_store::Error as E;
    let hint = match &e {
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
            " (authorization failed: check the credentials and that they may read, write, list \
             and delete objects in the bucket)"
        }
        E::NotFound { .. } => " (not found: check that the bucket exists)",
        _ => "",
    };
    let message = super::redact_secrets(&format!("{doing} in {label}: {e}{hint}"));
    match e {
        E::Generic { .. } => Error::Transient(message),
        _ => Error::Failed(anyhow!(message)),
    }
}

/// Each URL-unsafe byte of a key segment escaped, `/` kept between segments.
fn escaped_key(key: &Path) -> String {
    key.parts()
        .map(|part| {
            form_urlencoded::byte_serialize(part.as_ref().as_bytes())
                .collect::<String>()
                .replace('+', "%20")
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// A request that has had no answer for this long has failed (and is retried): a storage that
/// hangs (paused, cut off) must not hold a writing worker for ever.
pub const REQUEST_LIMIT: Duration = Duration::from_secs(30);

/// HTTP settings of every cloud client.
pub fn client_options() -> object_store::ClientOptions {
    object_store::ClientOptions::new()
        .with_timeout(REQUEST_LIMIT)
        .with_connect_timeout(Duration::from_secs(5))
}

/// How long a startup check may wait for an answer: a bucket that never answers must not hang
/// `serve`.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

#[async_trait]
impl Storage for CloudStorage {
    fn kind(&self) -> &'static str {
        self.kind
    }

    async fn create(
        &self,
        container: &str,
        name: &str,
        _owner: AttemptTag,
    ) -> Result<Box<dyn PartWriter>, Error> {
        Ok(Box::new(CloudWriter {
            store: self.store.clone(),
            label: self.label.clone(),
            key: self.key(container, name)?,
            part_size: self.part_size,
            buffer: Vec::new(),
            upload: None,
        }))
    }

    async fn read(&self, container: &str, name: &str) -> anyhow::Result<Option<ByteStream>> {
        let key = self.key(container, name)?;
        match self.store.get(&key).await {
            Ok(found) => Ok(Some(
                found.into_stream().map_err(std::io::Error::other).boxed(),
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.explain(e, &format!("reading {key}")).into()),
        }
    }

    async fn delete_folder(&self, container: &str, folder: &str) -> anyhow::Result<()> {
        self.delete_under(&self.key(container, folder)?).await
    }

    async fn delete_container(&self, container: &str) -> anyhow::Result<()> {
        self.delete_under(&self.key(container, "")?).await
    }

    async fn check(&self) -> anyhow::Result<()> {
        // Write and delete a small object: the credentials must allow both.
        let key = Path::from(format!(
            ".fhir-export-check-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let checking = async {
            self.store
                .put(&key, PutPayload::from_static(b"ok"))
                .await
                .map_err(|e| self.explain(e, "writing a probe object"))?;
            self.store
                .delete(&key)
                .await
                .map_err(|e| self.explain(e, "deleting a probe object"))
        };
        tokio::time::timeout(CHECK_TIMEOUT, checking)
            .await
            .map_err(|_| {
                anyhow!(
                    "{}: no answer within {} s (check the endpoint and the network)",
                    self.label,
                    CHECK_TIMEOUT.as_secs()
                )
            })??;
        Ok(())
    }

    async fn probe(&self) -> anyhow::Result<()> {
        let mut listing = self.store.list(Some(&Path::from(".fhir-export-probe")));
        match tokio::time::timeout(CHECK_TIMEOUT, listing.next()).await {
            Err(_) => Err(anyhow!("{}: no answer", self.label)),
            Ok(Some(Err(e))) => Err(self.explain(e, "listing").into()),
            Ok(_) => Ok(()),
        }
    }

    async fn direct_urls(
        &self,
        container: &str,
        names: &[String],
        signed: bool,
        expires: DateTime<Utc>,
    ) -> anyhow::Result<Option<Vec<String>>> {
        let lifetime = (expires - Utc::now())
            .to_std()
            .unwrap_or(Duration::from_secs(1))
            .max(Duration::from_secs(1));
        let mut urls = Vec::with_capacity(names.len());
        for name in names {
            let key = self.key(container, name)?;
            let url = if signed {
                self.signer
                    .signed_url(axum::http::Method::GET, &key, lifetime)
                    .await
                    .with_context(|| format!("signing a URL of {}", self.label))?
                    .to_string()
            } else {
                format!("{}/{}", self.object_base_url, escaped_key(&key))
            };
            urls.push(url);
        }
        Ok(Some(urls))
    }
}

/// A part being written: bytes gather up to `part_size`, then go out as one part of a
/// multipart upload started with the first full one.
struct CloudWriter {
    store: Arc<dyn ObjectStore>,
    label: String,
    key: Path,
    part_size: usize,
    buffer: Vec<u8>,
    upload: Option<Box<dyn MultipartUpload>>,
}

impl CloudWriter {
    async fn send_part(&mut self) -> Result<(), Error> {
        let data = PutPayload::from(std::mem::take(&mut self.buffer));
        let upload = match &mut self.upload {
            Some(upload) => upload,
            None => self.upload.insert(
                self.store
                    .put_multipart(&self.key)
                    .await
                    .map_err(|e| explain(&self.label, e, "starting an upload"))?,
            ),
        };
        upload
            .put_part(data)
            .await
            .map_err(|e| explain(&self.label, e, "uploading a part"))
    }
}

#[async_trait]
impl PartWriter for CloudWriter {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= self.part_size {
            self.send_part().await?;
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>, fence: Fence<'_>) -> Result<bool, Error> {
        if self.upload.is_none() {
            if !fence.await {
                return Ok(false);
            }
            let data = PutPayload::from(std::mem::take(&mut self.buffer));
            self.store
                .put(&self.key, data)
                .await
                .map_err(|e| explain(&self.label, e, "writing a part"))?;
            return Ok(true);
        }
        if !self.buffer.is_empty() {
            self.send_part().await?;
        }
        let mut upload = self.upload.take().expect("started above");
        if !fence.await {
            abort_later(upload);
            return Ok(false);
        }
        upload
            .complete()
            .await
            .map_err(|e| explain(&self.label, e, "completing an upload"))?;
        Ok(true)
    }
}

impl Drop for CloudWriter {
    /// A part given up (an error, a lost lease) leaves no parts behind to pay for.
    fn drop(&mut self) {
        if let Some(upload) = self.upload.take() {
            abort_later(upload);
        }
    }
}

fn abort_later(mut upload: Box<dyn MultipartUpload>) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            let _ = upload.abort().await;
        });
    }
}
