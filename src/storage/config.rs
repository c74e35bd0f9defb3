//! The `[storage]` section: where export files go.

use anyhow::bail;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    Filesystem,
    Azure,
    S3,
    Gcs,
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
    pub s3: S3Config,
    pub gcs: GcsConfig,
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

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    /// An S3-compatible server's URL; empty: AWS (`AWS_ENDPOINT_URL` decides when set).
    pub endpoint: String,
    pub region: String,
    pub part_size: usize,
    pub presigned_url_lifetime_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GcsConfig {
    pub bucket: String,
    /// An emulator's URL; empty: Google (or `STORAGE_EMULATOR_HOST`).
    pub endpoint: String,
    /// A service-account key file; empty: Application Default Credentials.
    pub service_account_path: String,
    pub part_size: usize,
    pub signed_url_lifetime_secs: u64,
}

/// S3's bounds for a multipart upload's parts (also applied to GCS's upload chunks).
const PART_SIZES: std::ops::RangeInclusive<usize> = 5 * 1024 * 1024..=5 * 1024 * 1024 * 1024;
/// The longest an S3 presigned or GCS V4 signed URL may live.
const SIGNED_LIFETIMES: std::ops::RangeInclusive<u64> = 60..=7 * 24 * 3600;

impl StorageConfig {
    /// How long a signed URL of the storage (SAS, presigned, V4 signed) lives at most.
    pub fn signed_url_lifetime_secs(&self) -> u64 {
        match self.kind {
            StorageKind::S3 => self.s3.presigned_url_lifetime_secs,
            StorageKind::Gcs => self.gcs.signed_url_lifetime_secs,
            StorageKind::Azure | StorageKind::Filesystem => self.azure.sas_lifetime_secs,
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.validate_clouds()?;
        self.validate_lifetimes()?;
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
        if !SIGNED_LIFETIMES.contains(&azure.sas_lifetime_secs) {
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

    fn validate_clouds(&self) -> anyhow::Result<()> {
        let (s3, gcs) = (&self.s3, &self.gcs);
        let (bucket, part_size, section) = match self.kind {
            StorageKind::S3 => (&s3.bucket, s3.part_size, "s3"),
            StorageKind::Gcs => (&gcs.bucket, gcs.part_size, "gcs"),
            StorageKind::Azure | StorageKind::Filesystem => return Ok(()),
        };
        if let Err(why) = bucket_name(bucket) {
            bail!("storage.{section}.bucket: {why}");
        }
        if !PART_SIZES.contains(&part_size) {
            bail!("storage.{section}.part_size must be between 5 MiB and 5 GiB");
        }
        if self.kind == StorageKind::Gcs && part_size % super::gcs::CHUNK_GRANULE != 0 {
            bail!("storage.gcs.part_size must be a multiple of 256 KiB");
        }
        Ok(())
    }

    fn validate_lifetimes(&self) -> anyhow::Result<()> {
        if !SIGNED_LIFETIMES.contains(&self.s3.presigned_url_lifetime_secs)
            || !SIGNED_LIFETIMES.contains(&self.gcs.signed_url_lifetime_secs)
        {
            bail!(
                "storage.s3.presigned_url_lifetime_secs and storage.gcs.signed_url_lifetime_secs \
                 must be between 60 and 604800"
            );
        }
        Ok(())
    }
}

/// The bucket naming rules S3 and GCS share (GCS also allows `_` and dotted names up to 222
/// characters; those are refused here too, for names that work in both).
fn bucket_name(name: &str) -> Result<(), String> {
    let fine = (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && !name.contains("..")
        && name.parse::<std::net::Ipv4Addr>().is_err();
    if fine {
        Ok(())
    } else if name.is_empty() {
        Err("no bucket is named".to_string())
    } else {
        Err(format!(
            "'{name}' is not a valid bucket name: 3-63 lowercase letters, digits, hyphens and \
             dots, starting and ending with a letter or digit"
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bucket_names_follow_the_shared_rules() {
        for good in ["abc", "exports-2026", "my.bucket.1"] {
            assert!(super::bucket_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "ab",
            "Exports",
            "-abc",
            "abc-",
            "a..b",
            "a_b",
            "192.168.1.1",
            &"a".repeat(64),
        ] {
            assert!(super::bucket_name(bad).is_err(), "{bad}");
        }
    }
}
