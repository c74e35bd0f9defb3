//! Amazon S3 and S3-compatible servers, through Apache Arrow's `object_store`. Everything lives
//! in one bucket: a container is the first folder of an object's key (`{container}/{folder}/
//! {Type}-{n}.ndjson`), so exports need no permission to create buckets. Credentials come the
//! way AWS's own tools find them: `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/
//! `AWS_SESSION_TOKEN`, then a profile of the shared credentials file (`AWS_PROFILE`, else
//! `default`), then web identity (EKS), the ECS container endpoint and the instance metadata
//! service.
//!
//! A part is buffered up to `part_size` bytes; a smaller one becomes visible with a single PUT,
//! a larger one is a multipart upload whose parts stream out as they fill and which becomes
//! visible with its complete call. Both happen only once the fence holds, and both replace an
//! object of that name: a retried part overwrites, never appends. An upload that is never
//! completed (a crash) stays invisible; the bucket's lifecycle rule for incomplete multipart
//! uploads removes its parts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::{MultipartUpload, ObjectStore, PutPayload, path::Path, signer::Signer};

use super::config::S3Config;
use super::{
    AttemptTag, ByteStream, Error, Fence, PartWriter, Storage, object_key, object_store_options,
};

/// A bucket of S3.
pub struct S3Storage {
    store: Arc<AmazonS3>,
    /// Plain object URLs are this, then the key (`https://s3.region.amazonaws.com/bucket`).
    object_base_url: String,
    /// What the errors name: `s3://bucket`.
    label: String,
    part_size: usize,
}

impl S3Storage {
    pub fn from_config(config: &S3Config) -> anyhow::Result<S3Storage> {
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(&config.bucket);
        if !config.endpoint.is_empty() {
            builder = builder.with_endpoint(&config.endpoint);
        }
        if !config.region.is_empty() {
            builder = builder.with_region(&config.region);
        }
        let has = |key| {
            builder
                .get_config_value(&key)
                .is_some_and(|v| !v.is_empty())
        };
        let (has_keys, has_region) = (
            has(AmazonS3ConfigKey::AccessKeyId),
            has(AmazonS3ConfigKey::Region) || has(AmazonS3ConfigKey::DefaultRegion),
        );
        let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".to_string());
        if !has_keys && let Some(keys) = profile_section(&credentials_file(), &profile)? {
            for (name, key) in [
                ("aws_access_key_id", AmazonS3ConfigKey::AccessKeyId),
                ("aws_secret_access_key", AmazonS3ConfigKey::SecretAccessKey),
                ("aws_session_token", AmazonS3ConfigKey::Token),
            ] {
                if let Some(value) = keys.get(name) {
                    builder = builder.with_config(key, value);
                }
            }
        }
        if !has_region {
            // The config file names its sections `profile NAME`, but for `default`.
            let section = match profile.as_str() {
                "default" => profile.clone(),
                name => format!("profile {name}"),
            };
            if let Some(region) = profile_section(&config_file(), &section)?
                .and_then(|settings| settings.get("region").cloned())
            {
                builder = builder.with_region(region);
            }
        }
        let endpoint = builder
            .get_config_value(&AmazonS3ConfigKey::Endpoint)
            .filter(|e| !e.is_empty());
        let region = [AmazonS3ConfigKey::Region, AmazonS3ConfigKey::DefaultRegion]
            .iter()
            .find_map(|key| builder.get_config_value(key).filter(|r| !r.is_empty()))
            .unwrap_or_else(|| "us-east-1".to_string());
        let bucket = &config.bucket;
        let object_base_url = match &endpoint {
            Some(endpoint) => format!("{}/{bucket}", endpoint.trim_end_matches('/')),
            None => format!("https://s3.{region}.amazonaws.com/{bucket}"),
        };
        let allow_http = endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"));
        let store = builder
            .with_client_options(object_store_options().with_allow_http(allow_http))
            .build()
            .with_context(|| format!("storage.s3 (bucket '{bucket}')"))?;
        Ok(S3Storage {
            store: Arc::new(store),
            object_base_url,
            label: format!("s3://{bucket}"),
            part_size: config.part_size,
        })
    }

    fn key(&self, container: &str, name: &str) -> Result<Path, Error> {
        let key = object_key(container, name)?;
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

/// How long a startup check may wait for an answer: a bucket that never answers must not hang
/// `serve`.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

#[async_trait]
impl Storage for S3Storage {
    fn kind(&self) -> &'static str {
        "s3"
    }

    async fn create(
        &self,
        container: &str,
        name: &str,
        _owner: AttemptTag,
    ) -> Result<Box<dyn PartWriter>, Error> {
        Ok(Box::new(S3Writer {
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
        let lifetime = super::lifetime_until(expires);
        let mut urls = Vec::with_capacity(names.len());
        for name in names {
            let key = self.key(container, name)?;
            let url = if signed {
                self.store
                    .signed_url(axum::http::Method::GET, &key, lifetime)
                    .await
                    .with_context(|| format!("signing a URL of {}", self.label))?
                    .to_string()
            } else {
                format!("{}/{}", self.object_base_url, super::url_path(key.as_ref()))
            };
            urls.push(url);
        }
        Ok(Some(urls))
    }
}

/// A part being written: bytes gather up to `part_size`, then go out as one part of a
/// multipart upload started with the first full one.
struct S3Writer {
    store: Arc<AmazonS3>,
    label: String,
    key: Path,
    part_size: usize,
    buffer: Vec<u8>,
    upload: Option<Box<dyn MultipartUpload>>,
}

impl S3Writer {
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
impl PartWriter for S3Writer {
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

impl Drop for S3Writer {
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

fn credentials_file() -> std::path::PathBuf {
    aws_file("AWS_SHARED_CREDENTIALS_FILE", "credentials")
}

fn config_file() -> std::path::PathBuf {
    aws_file("AWS_CONFIG_FILE", "config")
}

fn aws_file(variable: &str, name: &str) -> std::path::PathBuf {
    match std::env::var_os(variable) {
        Some(path) => path.into(),
        None => std::path::Path::new(&std::env::var_os("HOME").unwrap_or_default())
            .join(".aws")
            .join(name),
    }
}

/// The `key = value` settings of `[section]` in an AWS INI file; `None` if the file or the
/// section is missing.
fn profile_section(
    path: &std::path::Path,
    section: &str,
) -> anyhow::Result<Option<HashMap<String, String>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    Ok(ini_section(&text, section))
}

fn ini_section(text: &str, section: &str) -> Option<HashMap<String, String>> {
    let mut found: Option<HashMap<String, String>> = None;
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == section;
            if inside {
                found.get_or_insert_with(HashMap::new);
            }
        } else if inside && let Some((key, value)) = line.split_once('=') {
            found
                .get_or_insert_with(HashMap::new)
                .insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    #[test]
    fn profiles_are_read_from_ini_sections() {
        let text = "[default]\naws_access_key_id = A\n# c\n[profile ci]\nregion=eu-west-1\n\
                    [ci]\nAWS_SECRET_ACCESS_KEY = s=x\n";
        let default = super::ini_section(text, "default").unwrap();
        assert_eq!(default["aws_access_key_id"], "A");
        assert_eq!(default.len(), 1);
        assert_eq!(
            super::ini_section(text, "profile ci").unwrap()["region"],
            "eu-west-1"
        );
        assert_eq!(
            super::ini_section(text, "ci").unwrap()["aws_secret_access_key"],
            "s=x"
        );
        assert!(super::ini_section(text, "other").is_none());
    }
}
