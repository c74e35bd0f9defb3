//! The `[storage]` section: where export files go.

use anyhow::bail;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    Filesystem,
    Azure,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub kind: StorageKind,
    pub dir: String,
    pub default_container: String,
    /// Glob patterns (`*`, `?`) a `_container` must match; empty allows any.
    pub allowed_containers: Vec<String>,
    pub azure: AzureConfig,
}

/// Which Entra ID credential authenticates to an account URL.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum AzureCredentialKind {
    ManagedIdentity,
    WorkloadIdentity,
    AzureCli,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    /// Standard connection string (account key, SAS, or `UseDevelopmentStorage=true`).
    pub connection_string: String,
    /// Blob endpoint, e.g. `https://myaccount.blob.core.windows.net`, with `credential` or
    /// `sas_token`.
    pub account_url: String,
    pub credential: AzureCredentialKind,
    pub sas_token: String,
    pub block_size: usize,
    /// Lifetime of the SAS URLs a manifest hands out (at most; less if the job expires first).
    pub sas_lifetime_secs: u64,
}

impl StorageConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        let azure = &self.azure;
        if self.kind == StorageKind::Azure {
            if azure.connection_string.is_empty() && azure.account_url.is_empty() {
                bail!(
                    "storage.kind = azure needs AZURE_STORAGE_CONNECTION_STRING or \
                     FHIR_EXPORT_AZURE_ACCOUNT_URL"
                );
            }
            if !(64 * 1024..=100 * 1024 * 1024).contains(&azure.block_size) {
                bail!("storage.azure.block_size must be between 64 KiB and 100 MiB");
            }
        }
        if !(60..=7 * 24 * 3600).contains(&azure.sas_lifetime_secs) {
            bail!("storage.azure.sas_lifetime_secs must be between 60 and 604800");
        }
        if !self.default_container.is_empty() {
            crate::containers::validate(&self.default_container)
                .map_err(|why| anyhow::anyhow!("storage.default_container: {why}"))?;
            if self.default_container == crate::containers::ANONYMIZATION {
                bail!(
                    "storage.default_container cannot be '{}': de-identification configurations \
                     are read from there",
                    crate::containers::ANONYMIZATION
                );
            }
        }
        Ok(())
    }
}
