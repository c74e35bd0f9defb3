//! Amazon S3 and S3-compatible servers. Credentials come the way AWS's own tools find them:
//! `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, then a profile of the shared
//! credentials file (`AWS_PROFILE`, else `default`), then web identity (EKS), the ECS container
//! endpoint and the instance metadata service.

use std::collections::HashMap;

use anyhow::Context;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};

use super::cloud::{Bucket, CloudStorage, client_options};
use super::config::S3Config;

pub fn storage(config: &S3Config) -> anyhow::Result<CloudStorage> {
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
    let region = builder
        .get_config_value(&AmazonS3ConfigKey::Region)
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
        .with_client_options(client_options().with_allow_http(allow_http))
        .build()
        .with_context(|| format!("storage.s3 (bucket '{bucket}')"))?;
    Ok(CloudStorage::new(Bucket {
        kind: "s3",
        store,
        object_base_url,
        label: format!("s3://{bucket}"),
        part_size: config.part_size,
    }))
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
