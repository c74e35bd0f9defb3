//! Where export files go: the `Storage` trait and its backends. Layout everywhere:
//! `{container}/{folder}/{Type}-{n}.ndjson`.

mod azure;
pub mod config;
mod direct_file;
mod filesystem;
mod gcs;
mod s3;
mod sas;
pub mod spare;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{future::BoxFuture, stream::BoxStream};

pub use azure::AzureStorage;
pub use filesystem::FilesystemStorage;

use config::{StorageConfig, StorageKind};

/// Why writing a file failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A fault that goes away by itself (a 5xx, throttling, a timeout, no answer): the worker
    /// retries it inside its attempt instead of spending one.
    #[error("{0}")]
    Transient(String),
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::Failed(e.into())
    }
}

/// The task attempt that writes a file: a file it left unfinished (a crash before its commit)
/// can be found and removed by whoever rescues that attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptTag {
    pub task: i64,
    pub attempt: i32,
}

impl std::fmt::Display for AttemptTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "t{}a{}", self.task, self.attempt)
    }
}

/// Checked just before a written file becomes visible; `false` drops the file instead. (Why it
/// said no is the caller's to keep: the storage only obeys.)
pub type Fence<'a> = BoxFuture<'a, bool>;

/// The bytes of a stored file.
pub type ByteStream = BoxStream<'static, std::io::Result<Bytes>>;

#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// `filesystem`, `azure`, `s3` or `gcs` (a label of the metrics).
    fn kind(&self) -> &'static str;

    /// Starts a file `name` (may contain `/`) in `container` for `owner`, creating the container
    /// if needed. Nothing is visible until `commit`.
    async fn create(
        &self,
        container: &str,
        name: &str,
        owner: AttemptTag,
    ) -> Result<Box<dyn PartWriter>, Error>;

    /// Removes what `owner` left unfinished under `folder` (files it created and never
    /// committed). Backends whose unfinished files are never visible (Azure's uncommitted
    /// blocks, which the service discards itself) have nothing to do.
    async fn discard_unfinished(
        &self,
        _container: &str,
        _folder: &str,
        _owner: AttemptTag,
    ) -> Result<(), Error> {
        Ok(())
    }

    /// Streams a committed file; `None` if there is no such file.
    async fn read(&self, container: &str, name: &str) -> anyhow::Result<Option<ByteStream>>;

    /// A small file (an anonymization configuration) with its ETag, read up to `limit + 1`
    /// bytes; `None` if there is no such file. The ETag here is a digest of the content; Azure
    /// answers with the blob's own.
    async fn read_small(
        &self,
        container: &str,
        name: &str,
        limit: usize,
    ) -> anyhow::Result<Option<SmallFile>> {
        let Some(stream) = self.read(container, name).await? else {
            return Ok(None);
        };
        let bytes = collect_up_to(stream, limit).await?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes);
        let hex: String = digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Some(SmallFile {
            bytes,
            etag: format!("\"{hex}\""),
        }))
    }

    /// Deletes every file under `folder` in `container`.
    async fn delete_folder(&self, container: &str, folder: &str) -> anyhow::Result<()>;

    /// Deletes a container and everything in it.
    async fn delete_container(&self, container: &str) -> anyhow::Result<()>;

    /// Checks that files can be written, with a message that says what is wrong if not.
    async fn check(&self) -> anyhow::Result<()>;

    /// Checks that the storage answers, without writing anything (health checks).
    async fn probe(&self) -> anyhow::Result<()> {
        self.check().await
    }

    /// URLs clients can fetch these files from without this server: signed (valid until
    /// `expires`) or plain. `None` when the backend has no such URLs.
    async fn direct_urls(
        &self,
        _container: &str,
        _names: &[String],
        _signed: bool,
        _expires: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<Option<Vec<String>>> {
        Ok(None)
    }
}

/// A small file's content and its ETag (quoted, as HTTP writes it).
pub struct SmallFile {
    pub bytes: Vec<u8>,
    pub etag: String,
}

/// The first `limit + 1` bytes of a stream (one more than allowed shows it was too long).
async fn collect_up_to(mut stream: ByteStream, limit: usize) -> anyhow::Result<Vec<u8>> {
    use futures::TryStreamExt;
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.try_next().await? {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > limit {
            bytes.truncate(limit + 1);
            break;
        }
    }
    Ok(bytes)
}

/// A file being written. Memory stays bounded: bytes go out as they come.
#[async_trait]
pub trait PartWriter: Send {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), Error>;

    /// Makes the file visible in one step, replacing a file of the same name, if `fence` still
    /// holds. Returns whether it did.
    async fn commit(self: Box<Self>, fence: Fence<'_>) -> Result<bool, Error>;
}

/// The key of `name` in `container`, or of the container itself (a prefix) when `name` is
/// empty. Names are built by the server, but never let one climb or hide in an empty segment.
pub fn object_key(container: &str, name: &str) -> Result<String, Error> {
    let safe = |s: &str| s.split('/').all(|p| !p.is_empty() && p != "." && p != "..");
    let key = if name.is_empty() {
        container.to_string()
    } else {
        format!("{container}/{name}")
    };
    if !safe(container) || container.contains('/') || !safe(&key) {
        return Err(Error::Failed(anyhow::anyhow!("invalid storage path {key}")));
    }
    Ok(key)
}

/// A request that has had no answer for this long has failed (and is retried): a storage that
/// hangs (paused, cut off) must not hold a writing worker for ever.
pub const REQUEST_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// HTTP settings of the `object_store` clients (S3; GCS's credentials).
pub fn object_store_options() -> object_store::ClientOptions {
    object_store::ClientOptions::new()
        .with_timeout(REQUEST_LIMIT)
        .with_connect_timeout(std::time::Duration::from_secs(5))
}

/// The lifetime of a signed URL that must expire at `expires` (a second at least).
pub fn lifetime_until(expires: chrono::DateTime<chrono::Utc>) -> std::time::Duration {
    (expires - chrono::Utc::now())
        .to_std()
        .unwrap_or_default()
        .max(std::time::Duration::from_secs(1))
}

/// An object key as a URL path: each segment percent-encoded, `/` kept between them.
pub fn url_path(key: &str) -> String {
    key.split('/')
        .map(|segment| {
            form_urlencoded::byte_serialize(segment.as_bytes())
                .collect::<String>()
                .replace('+', "%20")
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Deletes an export's files: its container when it had one of its own, else its folder.
pub async fn delete_export(
    storage: &dyn Storage,
    container: &str,
    folder: &str,
    own_container: bool,
) -> anyhow::Result<()> {
    if own_container {
        storage.delete_container(container).await
    } else {
        storage.delete_folder(container, folder).await
    }
}

/// The configured backend.
pub fn from_config(config: &StorageConfig) -> anyhow::Result<Arc<dyn Storage>> {
    match config.kind {
        StorageKind::Filesystem => Ok(Arc::new(FilesystemStorage::new(&config.dir))),
        StorageKind::Azure => Ok(Arc::new(AzureStorage::from_config(&config.azure)?)),
        StorageKind::S3 => Ok(Arc::new(s3::S3Storage::from_config(&config.s3)?)),
        StorageKind::Gcs => Ok(Arc::new(gcs::GcsStorage::from_config(&config.gcs)?)),
    }
}

/// `text` with the signatures of SAS URLs it quotes (`sig=…`) replaced: storage errors may
/// quote request URLs, and logs must not carry credentials.
pub fn redact_secrets(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("sig=") {
        out.push_str(&rest[..at + 4]);
        out.push_str("***");
        rest = &rest[at + 4..];
        let end = rest
            .find(|c: char| c == '&' || c.is_whitespace() || "\"')>".contains(c))
            .unwrap_or(rest.len());
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn signatures_are_redacted() {
        assert_eq!(
            super::redact_secrets("GET https://a.blob/c/b?sv=1&sig=abc%2Bdef&se=2 failed (sig=x)"),
            "GET https://a.blob/c/b?sv=1&sig=***&se=2 failed (sig=***)"
        );
        assert_eq!(super::redact_secrets("no secrets"), "no secrets");
    }
}
