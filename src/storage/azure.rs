//! Azure Blob Storage with the official SDK (`azure_storage_blob`). A part is uploaded as staged
//! blocks and becomes visible with one block-list commit, which replaces any earlier blob of
//! that name: a retried part overwrites, never appends. The SDK's pipeline retries throttling
//! and transient errors with exponential backoff.

use std::{collections::HashSet, sync::Arc, sync::Mutex};

use anyhow::{Context, anyhow, bail};
use async_trait::async_trait;
use azure_core::{
    credentials::TokenCredential,
    http::{RequestContent, StatusCode, Url},
};
use azure_identity::{AzureCliCredential, ManagedIdentityCredential, WorkloadIdentityCredential};
use azure_storage_blob::{
    BlobContainerClient, BlobServiceClient,
    clients::BlockBlobClient,
    models::{BlobContainerClientListBlobsOptions, BlockLookupList, KeyInfo},
};
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};

use super::config::{AzureConfig, AzureCredentialKind};
use super::{AttemptTag, ByteStream, Error, Fence, PartWriter, REQUEST_LIMIT, Storage, sas};

/// How requests are authorized.
enum Auth {
    /// An account key: each client gets a freshly signed, short-lived account SAS.
    Key(sas::AccountKey),
    /// A SAS token from the configuration.
    Sas(String),
    /// An Entra ID credential (bearer tokens).
    Token(Arc<dyn TokenCredential>),
}

pub struct AzureStorage {
    /// The blob endpoint, e.g. `https://account.blob.core.windows.net` or Azurite's
    /// `http://127.0.0.1:10000/devstoreaccount1`.
    endpoint: Url,
    auth: Auth,
    block_size: usize,
    /// Containers known to exist, so a part does not pay for a create call.
    known_containers: Mutex<HashSet<String>>,
}

/// Azurite's documented development account.
const DEV_ACCOUNT: &str = "devstoreaccount1";
const DEV_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const DEV_ENDPOINT: &str = "http://127.0.0.1:10000/devstoreaccount1";

const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl AzureStorage {
    pub fn from_config(config: &AzureConfig) -> anyhow::Result<AzureStorage> {
        let (endpoint, auth) = if !config.connection_string.is_empty() {
            from_connection_string(&config.connection_string)?
        } else {
            let endpoint =
                Url::parse(config.account_url.trim_end_matches('/')).with_context(|| {
                    format!(
                        "FHIR_EXPORT_AZURE_ACCOUNT_URL '{}' is not a URL",
                        config.account_url
                    )
                })?;
            let auth = if !config.sas_token.is_empty() {
                Auth::Sas(config.sas_token.trim_start_matches('?').to_string())
            } else {
                Auth::Token(credential(config.credential)?)
            };
            (endpoint, auth)
        };
        Ok(AzureStorage {
            endpoint,
            auth,
            block_size: config.block_size,
            known_containers: Mutex::new(HashSet::new()),
        })
    }

    /// `endpoint/{path}` with the query the auth needs, and the credential for the client.
    fn url(&self, path: &[&str]) -> anyhow::Result<(Url, Option<Arc<dyn TokenCredential>>)> {
        let mut url = self.endpoint.clone();
        if !path.is_empty() {
            url.path_segments_mut()
                .map_err(|()| anyhow!("the storage URL {} cannot take a path", self.endpoint))?
                .pop_if_empty()
                .extend(path);
        }
        match &self.auth {
            Auth::Key(key) => url.set_query(Some(&key.account_sas(Utc::now())?)),
            Auth::Sas(token) => url.set_query(Some(token)),
            Auth::Token(credential) => return Ok((url, Some(credential.clone()))),
        }
        Ok((url, None))
    }

    fn container(&self, container: &str) -> anyhow::Result<BlobContainerClient> {
        let (url, credential) = self.url(&[container])?;
        Ok(BlobContainerClient::new(url, credential, None)?)
    }

    async fn ensure_container(&self, container: &str) -> Result<(), Error> {
        if self
            .known_containers
            .lock()
            .expect("not poisoned")
            .contains(container)
        {
            return Ok(());
        }
        match self.container(container)?.create(None).await {
            Ok(_) => {}
            Err(e) if e.http_status() == Some(StatusCode::Conflict) => {} // it exists
            Err(e) => return Err(explain(e, &format!("creating container {container}"))),
        }
        self.known_containers
            .lock()
            .expect("not poisoned")
            .insert(container.to_string());
        Ok(())
    }

    /// The plain URL of one blob.
    fn blob_url(&self, container: &str, name: &str) -> anyhow::Result<Url> {
        let mut url = self.endpoint.clone();
        let segments: Vec<&str> = std::iter::once(container).chain(name.split('/')).collect();
        url.path_segments_mut()
            .map_err(|()| anyhow!("the storage URL {} cannot take a path", self.endpoint))?
            .pop_if_empty()
            .extend(&segments);
        Ok(url)
    }

    /// A user delegation key from Entra ID, valid until a little after `expires` (at most the
    /// seven days the service allows).
    async fn delegation_key(&self, expires: DateTime<Utc>) -> anyhow::Result<sas::DelegationKey> {
        use azure_core::time::OffsetDateTime;
        let now = Utc::now();
        let expiry = expires.min(now + chrono::TimeDelta::days(7));
        let at = |t: DateTime<Utc>| {
            OffsetDateTime::from_unix_timestamp(t.timestamp()).map_err(|e| anyhow!("{e}"))
        };
        let info = KeyInfo {
            start: Some(at(now - chrono::TimeDelta::minutes(5))?),
            expiry: Some(at(expiry)?),
            ..Default::default()
        };
        let (url, credential) = self.url(&[])?;
        let service = BlobServiceClient::new(url, credential, None)?;
        let key = service
            .get_user_delegation_key(info.try_into()?, None)
            .await
            .map_err(|e| explain(e, "getting a user delegation key"))?
            .into_model()?;
        let time = |t: Option<OffsetDateTime>| {
            t.map(|t| azure_core::time::to_rfc3339(&t))
                .unwrap_or_default()
        };
        Ok(sas::DelegationKey {
            object_id: key.signed_oid.unwrap_or_default(),
            tenant_id: key.signed_tid.unwrap_or_default(),
            start: time(key.signed_start),
            expiry: time(key.signed_expiry),
            service: key.signed_service.unwrap_or_default(),
            version: key.signed_version.unwrap_or_default(),
            value: azure_core::base64::encode(key.value.unwrap_or_default()),
        })
    }

    fn account_name(&self) -> String {
        // Azurite-style endpoints carry the account as the first path segment.
        match self.endpoint.host_str() {
            Some(host) if host.contains(".blob.") => {
                host.split('.').next().unwrap_or(host).to_string()
            }
            _ => self
                .endpoint
                .path_segments()
                .and_then(|mut s| s.next())
                .unwrap_or_default()
                .to_string(),
        }
    }
}

fn credential(kind: AzureCredentialKind) -> anyhow::Result<Arc<dyn TokenCredential>> {
    Ok(match kind {
        AzureCredentialKind::ManagedIdentity => ManagedIdentityCredential::new(None)?,
        AzureCredentialKind::WorkloadIdentity => WorkloadIdentityCredential::new(None)?,
        AzureCredentialKind::AzureCli => AzureCliCredential::new(None)?,
    })
}

/// Reads a standard Azure Storage connection string.
fn from_connection_string(text: &str) -> anyhow::Result<(Url, Auth)> {
    let mut fields = std::collections::HashMap::new();
    for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            anyhow!(
                "AZURE_STORAGE_CONNECTION_STRING: '{}' is not key=value",
                k_only(part)
            )
        })?;
        fields.insert(k.to_ascii_lowercase(), v.to_string());
    }
    if fields
        .get("usedevelopmentstorage")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    {
        let endpoint = fields
            .get("developmentstorageproxyuri")
            .map_or(DEV_ENDPOINT.to_string(), |p| {
                format!("{}/{DEV_ACCOUNT}", p.trim_end_matches('/'))
            });
        let endpoint = Url::parse(&endpoint)?;
        let key = sas::AccountKey::new(DEV_ACCOUNT, DEV_KEY, endpoint.scheme() == "https")?;
        return Ok((endpoint, Auth::Key(key)));
    }
    let account = fields.get("accountname").cloned();
    let endpoint = match (fields.get("blobendpoint"), &account) {
        (Some(e), _) => e.trim_end_matches('/').to_string(),
        (None, Some(account)) => {
            let protocol = fields
                .get("defaultendpointsprotocol")
                .map_or("https", String::as_str);
            let suffix = fields
                .get("endpointsuffix")
                .map_or("core.windows.net", String::as_str);
            format!("{protocol}://{account}.blob.{suffix}")
        }
        (None, None) => {
            bail!("AZURE_STORAGE_CONNECTION_STRING names neither AccountName nor BlobEndpoint")
        }
    };
    let endpoint = Url::parse(&endpoint)
        .with_context(|| format!("blob endpoint '{endpoint}' is not a URL"))?;
    let auth = match (
        fields.get("accountkey"),
        fields.get("sharedaccesssignature"),
        account,
    ) {
        (Some(key), _, Some(account)) => Auth::Key(sas::AccountKey::new(
            &account,
            key,
            endpoint.scheme() == "https",
        )?),
        (_, Some(token), _) => Auth::Sas(token.trim_start_matches('?').to_string()),
        _ => bail!(
            "AZURE_STORAGE_CONNECTION_STRING needs AccountName and AccountKey, or SharedAccessSignature"
        ),
    };
    Ok((endpoint, auth))
}

/// The key of a `key=value` pair, for messages that must not echo secrets.
fn k_only(part: &str) -> &str {
    part.split('=').next().unwrap_or("")
}

/// `request`'s answer, or a transient error if it had none within `REQUEST_LIMIT`.
async fn answered<T>(
    request: impl Future<Output = azure_core::Result<T>>,
    doing: &str,
) -> Result<T, Error> {
    match tokio::time::timeout(REQUEST_LIMIT, request).await {
        Ok(answer) => answer.map_err(|e| explain(e, doing)),
        Err(_) => Err(Error::Transient(format!(
            "{doing}: no answer within {} s",
            REQUEST_LIMIT.as_secs()
        ))),
    }
}

/// An SDK error with what it means for the operator; never includes credentials. A fault that
/// goes away by itself (5xx, throttling, a timeout, no answer) is `Transient`.
fn explain(e: azure_core::Error, doing: &str) -> Error {
    let status = e.http_status();
    let transient = match status {
        None => true,
        Some(s) => {
            let code = u16::from(s);
            code >= 500 || code == 408 || code == 429
        }
    };
    let hint = match status {
        Some(StatusCode::Forbidden) => {
            " (authorization failed: wrong account key or SAS, an expired SAS, or a credential without write permission)"
        }
        Some(StatusCode::NotFound) => " (not found: check the account URL)",
        None => " (no answer: check the account URL and the network)",
        _ => "",
    };
    let message = super::redact_secrets(&format!("{doing}: {e}{hint}"));
    if transient {
        Error::Transient(message)
    } else {
        Error::Failed(anyhow!(message))
    }
}

#[async_trait]
impl Storage for AzureStorage {
    fn kind(&self) -> &'static str {
        "azure"
    }

    async fn create(
        &self,
        container: &str,
        name: &str,
        _owner: AttemptTag,
    ) -> Result<Box<dyn PartWriter>, Error> {
        self.ensure_container(container).await?;
        let blob = self
            .container(container)?
            .blob_client(name)
            .block_blob_client();
        Ok(Box::new(AzureWriter {
            blob,
            buffer: Vec::with_capacity(self.block_size),
            block_size: self.block_size,
            // Unique per writer: blocks staged by a crashed attempt are never committed.
            prefix: uuid::Uuid::new_v4().simple().to_string(),
            blocks: Vec::new(),
        }))
    }

    async fn read(&self, container: &str, name: &str) -> anyhow::Result<Option<ByteStream>> {
        match self
            .container(container)?
            .blob_client(name)
            .download(None)
            .await
        {
            Ok(response) => Ok(Some(
                response
                    .body
                    .map_err(|e| std::io::Error::other(e.to_string()))
                    .boxed(),
            )),
            Err(e) if e.http_status() == Some(StatusCode::NotFound) => Ok(None),
            Err(e) => Err(explain(e, &format!("reading {container}/{name}")).into()),
        }
    }

    async fn read_small(
        &self,
        container: &str,
        name: &str,
        limit: usize,
    ) -> anyhow::Result<Option<super::SmallFile>> {
        let response = match self
            .container(container)?
            .blob_client(name)
            .download(None)
            .await
        {
            Ok(response) => response,
            Err(e) if e.http_status() == Some(StatusCode::NotFound) => return Ok(None),
            Err(e) => return Err(explain(e, &format!("reading {container}/{name}")).into()),
        };
        let etag = response
            .headers
            .get_optional_string(&azure_core::http::headers::ETAG)
            .unwrap_or_default();
        let body = response
            .body
            .map_err(|e| std::io::Error::other(e.to_string()))
            .boxed();
        Ok(Some(super::SmallFile {
            bytes: super::collect_up_to(body, limit).await?,
            etag,
        }))
    }

    async fn delete_folder(&self, container: &str, folder: &str) -> anyhow::Result<()> {
        let client = self.container(container)?;
        let options = BlobContainerClientListBlobsOptions {
            prefix: Some(format!("{folder}/")),
            ..Default::default()
        };
        let mut names = Vec::new();
        let mut blobs = client.list_blobs(Some(options))?;
        loop {
            match blobs.try_next().await {
                Ok(Some(blob)) => names.extend(blob.name),
                Ok(None) => break,
                Err(e) if e.http_status() == Some(StatusCode::NotFound) => return Ok(()),
                Err(e) => return Err(explain(e, &format!("listing {container}/{folder}")).into()),
            }
        }
        for name in names {
            match client.blob_client(&name).delete(None).await {
                Ok(_) => {}
                Err(e) if e.http_status() == Some(StatusCode::NotFound) => {}
                Err(e) => return Err(explain(e, &format!("deleting {container}/{name}")).into()),
            }
        }
        Ok(())
    }

    async fn delete_container(&self, container: &str) -> anyhow::Result<()> {
        self.known_containers
            .lock()
            .expect("not poisoned")
            .remove(container);
        match self.container(container)?.delete(None).await {
            Ok(_) => Ok(()),
            Err(e) if e.http_status() == Some(StatusCode::NotFound) => Ok(()),
            Err(e) => Err(explain(e, &format!("deleting container {container}")).into()),
        }
    }

    async fn check(&self) -> anyhow::Result<()> {
        let (url, credential) = self.url(&[])?;
        let service = BlobServiceClient::new(url, credential, None)?;
        // The SDK retries an endpoint that does not answer for a long time; startup should not.
        let answer = tokio::time::timeout(CHECK_TIMEOUT, service.get_properties(None)).await;
        let Ok(answer) = answer else {
            bail!(
                "Azure Blob Storage at {}: no answer within {} s (check the account URL and the network)",
                self.endpoint,
                CHECK_TIMEOUT.as_secs()
            );
        };
        match answer {
            Ok(_) => Ok(()),
            // A container-scoped SAS may not read account properties; it still can write.
            Err(e)
                if matches!(&self.auth, Auth::Sas(_))
                    && e.http_status() == Some(StatusCode::Forbidden) =>
            {
                Ok(())
            }
            Err(e) => Err(explain(e, &format!("Azure Blob Storage at {}", self.endpoint)).into()),
        }
    }

    async fn direct_urls(
        &self,
        container: &str,
        names: &[String],
        signed: bool,
        expires: DateTime<Utc>,
    ) -> anyhow::Result<Option<Vec<String>>> {
        let now = Utc::now();
        // With Entra ID, one delegation key signs every URL of the manifest.
        let delegation = match (&self.auth, signed) {
            (Auth::Token(_), true) => Some(self.delegation_key(expires).await?),
            _ => None,
        };
        let mut urls = Vec::with_capacity(names.len());
        for name in names {
            let mut url = self.blob_url(container, name)?;
            if signed {
                let query = match (&self.auth, &delegation) {
                    (Auth::Key(key), _) => key.blob_read_sas(container, name, now, expires)?,
                    (_, Some(key)) => {
                        let account = self.account_name();
                        sas::blob_read_delegation_sas(key, &account, container, name, now, expires)?
                    }
                    _ => bail!(
                        "SAS file URLs need an account key or an Entra ID credential, not a SAS token"
                    ),
                };
                url.set_query(Some(&query));
            }
            urls.push(url.to_string());
        }
        Ok(Some(urls))
    }
}

struct AzureWriter {
    blob: BlockBlobClient,
    buffer: Vec<u8>,
    block_size: usize,
    prefix: String,
    blocks: Vec<Vec<u8>>,
}

impl AzureWriter {
    async fn stage(&mut self) -> Result<(), Error> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        // Block ids must all have the same length within a blob.
        let id = format!("{}-{:06}", self.prefix, self.blocks.len()).into_bytes();
        let data = std::mem::replace(&mut self.buffer, Vec::with_capacity(self.block_size));
        let length = data.len() as u64;
        let staging = self
            .blob
            .stage_block(&id, length, RequestContent::from(data), None);
        answered(staging, "staging a block").await?;
        self.blocks.push(id);
        Ok(())
    }
}

#[async_trait]
impl PartWriter for AzureWriter {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= self.block_size {
            self.stage().await?;
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>, fence: Fence<'_>) -> Result<bool, Error> {
        self.stage().await?;
        if !fence.await {
            return Ok(false); // staged blocks are never committed; Azure drops them
        }
        let list = BlockLookupList {
            committed: None,
            latest: Some(self.blocks),
            uncommitted: None,
        };
        let list = list
            .try_into()
            .map_err(|e| explain(e, "listing a part's blocks"))?;
        let committing = self.blob.commit_block_list(list, None);
        answered(committing, "committing a part").await?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings() {
        let (url, auth) = from_connection_string("UseDevelopmentStorage=true").unwrap();
        assert_eq!(url.as_str(), DEV_ENDPOINT);
        assert!(matches!(auth, Auth::Key(_)));
        let (url, _) = from_connection_string(
            "DefaultEndpointsProtocol=https;AccountName=acme;AccountKey=a2V5;EndpointSuffix=core.windows.net",
        )
        .unwrap();
        assert_eq!(url.as_str(), "https://acme.blob.core.windows.net/");
        let (url, auth) = from_connection_string(
            "BlobEndpoint=https://x.example/;SharedAccessSignature=sv=1&sig=2",
        )
        .unwrap();
        assert_eq!(url.as_str(), "https://x.example/");
        assert!(matches!(auth, Auth::Sas(ref t) if t == "sv=1&sig=2"));
        let missing = from_connection_string("AccountName=acme")
            .err()
            .unwrap()
            .to_string();
        assert!(missing.contains("AccountKey"), "{missing}");
        let garbage = from_connection_string("AccountKey")
            .err()
            .unwrap()
            .to_string();
        assert!(!garbage.contains("secret"));
    }
}
