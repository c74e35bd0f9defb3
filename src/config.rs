//! Configuration, declared once: the types here (the `[auth]` and `[storage]` sections are their
//! modules' own), and `config/default.toml`, built in, which holds every key's default and names
//! its environment variable. A file (`--config` or `FHIR_EXPORT_CONFIG`) overrides the defaults
//! key by key, and the environment overrides both.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::{
    auth::config::AuthConfig,
    storage::config::{StorageConfig, StorageKind},
};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub database: DatabaseConfig,
    pub server: ServerConfig,
    pub log: LogConfig,
    pub export: ExportConfig,
    pub storage: StorageConfig,
    pub auth: AuthConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    pub url: String,
    /// Connections this process opens at most; 0 means `export.workers × 2 + 8`.
    pub max_connections: u32,
    /// A streaming-replication standby of `url` that export pages are read from; empty: the
    /// primary serves them.
    pub read_url: String,
    /// How long a plan waits for the standby to replay past the job's snapshot before the job
    /// reads from the primary instead.
    pub read_max_wait_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Base of every absolute URL the server returns; empty means `http://{listen}`.
    pub public_url: String,
    pub max_body_bytes: usize,
    /// Largest kick-off body (a POST `Parameters`).
    pub max_kickoff_bytes: usize,
    /// A client must send a request's headers within this (of connecting, or of its previous
    /// answer on a keep-alive connection).
    pub header_read_timeout_secs: u64,
    /// A request (other than a file download) must be answered within this.
    pub request_timeout_secs: u64,
    /// A client that takes none of an answer's bytes for this long is disconnected.
    pub write_timeout_secs: u64,
    /// Open connections at most; more wait to be accepted.
    pub max_connections: usize,
    /// A second address serving only `GET /metrics`, without auth (for Prometheus); `None`:
    /// no such listener.
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    pub workers: usize,
    pub part_size: u32,
    pub part_max_bytes: u64,
    pub stale_after_secs: u64,
    pub max_attempts: i32,
    /// Pause before a failed task's next attempt; doubles with each failure (at most 5 min).
    pub retry_backoff_secs: u64,
    pub max_active_jobs: i64,
    /// Queued + running jobs of one client (all callers are one client without auth).
    pub max_active_jobs_per_client: i64,
    /// Most patients a kick-off may name (`patient`).
    pub max_patients: usize,
    /// Most `_typeFilter` entries a kick-off may give.
    pub max_type_filters: usize,
    pub retention_secs: u64,
    pub range_size: i64,
    pub poll_interval_ms: u64,
    pub throttle_ms: u64,
    /// Files per manifest page (`allowPartialManifests=true`).
    pub manifest_page_size: i64,
    pub output_urls: OutputUrls,
    /// Lifetime of a signed file link (`output_urls = "signed"`).
    pub signed_url_lifetime_secs: u64,
}

/// What the manifest's file URLs point at.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OutputUrls {
    /// The server, which streams the file (same auth as the API).
    Server,
    /// The raw blob URL (the client needs its own access to the storage).
    Blob,
    /// A short-lived read-only SAS URL, expiring with the manifest.
    Sas,
    /// The server's URL with a short-lived signature: it opens without a token.
    Signed,
}

/// The built-in defaults, which also name each key's environment variable (`Env: NAME` in the
/// comment above the key).
const DEFAULTS: &str = include_str!("../config/default.toml");

impl Default for Config {
    fn default() -> Self {
        Config::from_sources(None, |_| None).expect("config/default.toml is a valid configuration")
    }
}

impl Config {
    /// Defaults, then `file` (if any), then the process environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        let text = match file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?,
            ),
            None => None,
        };
        Config::from_sources(text.as_deref(), |name| std::env::var(name).ok()).with_context(|| {
            match file {
                Some(path) => format!("configuration (file {})", path.display()),
                None => "configuration".to_string(),
            }
        })
    }

    /// The defaults, overridden by a file's text, then by `env` (a variable's value by name).
    pub fn from_sources(
        file: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Config> {
        let defaults: toml::Table = toml::from_str(DEFAULTS)?;
        let mut table = defaults.clone();
        if let Some(text) = file {
            merge(&mut table, toml::from_str(text)?);
        }
        let mut config = Config::deserialize(table.clone())?;
        for (name, key) in environment_names() {
            if let Some(value) = env(name) {
                let optional = lookup(&defaults, &key).is_none();
                set(&mut table, &key, &value, optional)
                    .and_then(|()| Ok(Config::deserialize(table.clone())?))
                    .map(|overridden| config = overridden)
                    .with_context(|| format!("invalid {name}={value:?}"))?;
            }
        }
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let e = &self.export;
        if !(1..=1_000_000).contains(&e.part_size) {
            bail!("export.part_size must be between 1 and 1000000");
        }
        if e.part_max_bytes < 1024 {
            bail!("export.part_max_bytes must be at least 1024");
        }
        if e.stale_after_secs < 2 {
            bail!("export.stale_after_secs must be at least 2");
        }
        if e.max_attempts < 1 {
            bail!("export.max_attempts must be at least 1");
        }
        if e.signed_url_lifetime_secs < 1 {
            bail!("export.signed_url_lifetime_secs must be at least 1");
        }
        if e.manifest_page_size < 1 {
            bail!("export.manifest_page_size must be at least 1");
        }
        if e.range_size < 1 {
            bail!("export.range_size must be at least 1");
        }
        let needed = u32::try_from(self.export.workers)
            .unwrap_or(u32::MAX)
            .saturating_add(2);
        if self.database.max_connections != 0 && self.database.max_connections < needed {
            bail!(
                "database.max_connections must be at least export.workers + 2 ({needed}): one \
                 page connection per worker, and two for the queue and the API"
            );
        }
        self.storage.validate()?;
        if self.storage.kind == StorageKind::Filesystem
            && matches!(self.export.output_urls, OutputUrls::Blob | OutputUrls::Sas)
        {
            bail!("export.output_urls = blob or sas needs storage.kind = azure, s3 or gcs");
        }
        let server = &self.server;
        if server.header_read_timeout_secs == 0
            || server.request_timeout_secs == 0
            || server.write_timeout_secs == 0
        {
            bail!("server timeouts must be at least 1 second");
        }
        if server.max_connections == 0 {
            bail!("server.max_connections must be at least 1");
        }
        if e.max_active_jobs < 1 || e.max_active_jobs_per_client < 1 {
            bail!(
                "export.max_active_jobs and export.max_active_jobs_per_client must be at least 1"
            );
        }
        self.auth.validate()
    }

    /// The base of every absolute URL, without a trailing slash.
    pub fn public_url(&self) -> String {
        if self.server.public_url.is_empty() {
            format!("http://{}", self.server.listen)
        } else {
            self.server.public_url.trim_end_matches('/').to_string()
        }
    }

    /// Connections this process opens at most (see `database.max_connections`).
    pub fn max_connections(&self) -> u32 {
        match self.database.max_connections {
            0 => u32::try_from(self.export.workers)
                .unwrap_or(u32::MAX)
                .saturating_mul(2)
                .saturating_add(8),
            n => n,
        }
    }

    pub fn stale_after(&self) -> Duration {
        Duration::from_secs(self.export.stale_after_secs)
    }
}

/// Every environment variable the server reads, with the dotted key it sets: the `Env: NAME`
/// notes of `config/default.toml`, each belonging to the next key (set, or shown commented out).
pub fn environment_names() -> Vec<(&'static str, String)> {
    let mut names = Vec::new();
    let (mut section, mut pending) = ("", Vec::new());
    for line in DEFAULTS.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name;
            continue;
        }
        let mut notes = line.split("Env: ").skip(1);
        pending.extend(notes.by_ref().filter_map(|after| {
            let end = after
                .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(after.len());
            (end > 0).then(|| &after[..end])
        }));
        if let Some(key) = key_of(line) {
            names.extend(
                pending
                    .drain(..)
                    .map(|name| (name, format!("{section}.{key}"))),
            );
        }
    }
    names
}

/// The key a line of `config/default.toml` sets or shows commented out.
fn key_of(line: &str) -> Option<&str> {
    let line = line.strip_prefix("# ").unwrap_or(line);
    let (key, _) = line.split_once(" = ")?;
    key.chars()
        .all(|c| c.is_ascii_lowercase() || c == '_')
        .then_some(key)
}

/// `over`'s keys replace `base`'s, table by table.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(inner)), toml::Value::Table(value)) => merge(inner, value),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// The value of a dotted key.
fn lookup<'t>(table: &'t toml::Table, dotted: &str) -> Option<&'t toml::Value> {
    let mut parts = dotted.split('.');
    let first = table.get(parts.next()?)?;
    parts.try_fold(first, |value, part| value.as_table()?.get(part))
}

/// Sets a dotted key from an environment value, read as the type the key has: a number, a
/// boolean, a comma-separated list, or text. An empty value unsets an optional key.
fn set(table: &mut toml::Table, dotted: &str, value: &str, optional: bool) -> anyhow::Result<()> {
    let (path, key) = dotted
        .rsplit_once('.')
        .context("a key outside any section")?;
    let mut section = table;
    for name in path.split('.') {
        section = section
            .get_mut(name)
            .and_then(toml::Value::as_table_mut)
            .with_context(|| format!("no section {name}"))?;
    }
    let typed = match section.get(key) {
        Some(toml::Value::Integer(_)) => toml::Value::Integer(value.trim().parse()?),
        Some(toml::Value::Boolean(_)) => {
            toml::Value::Boolean(value.trim().parse().context("true or false")?)
        }
        Some(toml::Value::Array(_)) => toml::Value::Array(
            value
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(|item| toml::Value::String(item.to_string()))
                .collect(),
        ),
        _ if optional && value.is_empty() => {
            section.remove(key);
            return Ok(());
        }
        _ => toml::Value::String(value.to_string()),
    };
    section.insert(key.to_string(), typed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dotted keys of a TOML table: its values, and its empty tables (open maps).
    fn keys(prefix: &str, table: &toml::Table, out: &mut std::collections::BTreeSet<String>) {
        for (key, value) in table {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            match value {
                toml::Value::Table(inner) if !inner.is_empty() => keys(&path, inner, out),
                _ => {
                    out.insert(path);
                }
            }
        }
    }

    /// Every key the code has is in `config/default.toml` (set, or shown commented out) and in
    /// the README's configuration table, and neither lists a key the code does not have.
    #[test]
    fn the_defaults_file_and_the_readme_list_exactly_the_keys_the_code_has() {
        let mut every = Config::default();
        every.server.metrics_listen = Some("127.0.0.1:9464".parse().unwrap()); // unset by default
        let mut code = std::collections::BTreeSet::new();
        keys("", &toml::Table::try_from(&every).unwrap(), &mut code);

        let text = include_str!("../config/default.toml");
        let mut file = std::collections::BTreeSet::new();
        keys("", &toml::from_str(text).unwrap(), &mut file);
        let mut section = String::new();
        for line in text.lines() {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_string();
            } else if let Some((key, _)) = line.strip_prefix("# ").and_then(|l| l.split_once(" = "))
                && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            {
                file.insert(format!("{section}.{key}"));
            }
        }
        assert_eq!(file, code, "config/default.toml");

        let readme = include_str!("../README.md");
        let table = &readme[readme.find("## Configuration").unwrap()..];
        let table = &table[..table.find("\n### ").unwrap()];
        let listed: std::collections::BTreeSet<String> = table
            .lines()
            .filter_map(|l| l.strip_prefix("| `")?.split('`').next().map(str::to_string))
            .collect();
        assert_eq!(listed, code, "the README's configuration table");
        let names = environment_names();
        assert!(names.len() >= 46, "{names:?}");
        for (name, key) in names {
            assert!(
                code.contains(&key),
                "{name} sets {key}, which the code does not have"
            );
            let row = table
                .lines()
                .find(|l| l.starts_with(&format!("| `{key}`")))
                .unwrap();
            assert!(
                row.contains(&format!("`{name}`")),
                "the README's row of {key} lacks {name}"
            );
        }
    }

    #[test]
    fn a_file_overrides_key_by_key_and_the_environment_overrides_the_file() {
        let file = "[export]\nworkers = 2\n[storage.azure]\nblock_size = 65536\n";
        let env = |n: &str| match n {
            "FHIR_EXPORT_LOG_FORMAT" => Some("json".to_string()),
            "FHIR_EXPORT_LISTEN" => Some("0.0.0.0:9000".to_string()),
            "FHIR_EXPORT_ALLOWED_CONTAINERS" => Some(" exports-*, ,audit ".to_string()),
            "FHIR_EXPORT_ALLOW_ANONYMOUS" => Some("true".to_string()),
            "FHIR_EXPORT_METRICS_LISTEN" => Some("127.0.0.1:9464".to_string()),
            "FHIR_EXPORT_WORKERS" => Some("3".to_string()),
            _ => None,
        };
        let c = Config::from_sources(Some(file), env).unwrap();
        assert_eq!(c.export.workers, 3);
        assert_eq!(c.export.part_size, 5000, "a default the file does not name");
        assert_eq!(c.storage.azure.block_size, 65536);
        assert_eq!(c.storage.azure.sas_lifetime_secs, 3600);
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.public_url(), "http://0.0.0.0:9000");
        assert_eq!(c.storage.allowed_containers, ["exports-*", "audit"]);
        assert!(c.auth.allow_anonymous);
        assert_eq!(
            c.server.metrics_listen,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        let unset =
            Config::from_sources(Some("[server]\nmetrics_listen = \"127.0.0.1:1\"\n"), |n| {
                (n == "FHIR_EXPORT_METRICS_LISTEN").then(String::new)
            })
            .unwrap();
        assert_eq!(unset.server.metrics_listen, None);
    }

    #[test]
    fn bad_values_and_unknown_keys_are_named() {
        for (name, value) in [
            ("FHIR_EXPORT_PART_SIZE", "many"),
            ("FHIR_EXPORT_LOG_FORMAT", "xml"),
            ("FHIR_EXPORT_ALLOW_ANONYMOUS", "yes"),
            ("FHIR_EXPORT_LISTEN", "localhost"),
        ] {
            let err =
                Config::from_sources(None, |n| (n == name).then(|| value.to_string())).unwrap_err();
            assert!(format!("{err:#}").contains(name), "{err:#}");
        }
        let err = Config::from_sources(Some("[export]\nworkerz = 2\n"), |_| None).unwrap_err();
        assert!(format!("{err:#}").contains("workerz"), "{err:#}");
        let err = Config::from_sources(Some("[export]\npart_size = 0\n"), |_| None).unwrap_err();
        assert!(format!("{err:#}").contains("part_size"), "{err:#}");
    }
}
