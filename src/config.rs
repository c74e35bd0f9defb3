//! Configuration: built-in defaults (the same values as `config/default.toml`), then an optional
//! TOML file (`--config` or `FHIR_EXPORT_CONFIG`), then environment variables.

use std::{collections::BTreeMap, net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub database: DatabaseConfig,
    pub server: ServerConfig,
    pub log: LogConfig,
    pub export: ExportConfig,
    pub storage: StorageConfig,
    pub auth: AuthConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
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
#[serde(deny_unknown_fields, default)]
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
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
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
    pub output_urls: OutputUrls,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    Filesystem,
    Azure,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
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
#[serde(deny_unknown_fields, default)]
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
}

/// Who may call the API.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Open: local use only.
    None,
    /// The server is its own SMART Backend Services authorization server.
    Smart,
    /// Bearer tokens of an external OpenID Connect issuer (e.g. Entra ID).
    External,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// With mode = none, listen on an address other than loopback all the same.
    pub allow_anonymous: bool,
    pub token_lifetime_secs: u64,
    /// HMAC key of the access tokens the server issues (smart mode). Empty: a random key per
    /// process, so tokens work only on the replica that issued them.
    pub token_secret: String,
    pub clients: Vec<ClientConfig>,
    pub external: ExternalAuthConfig,
}

/// A registered SMART Backend Services client.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub id: String,
    /// The most it may be granted.
    pub scopes: Vec<String>,
    /// Its public keys: an inline JWK Set, or a URL serving one.
    #[serde(default)]
    pub jwks: String,
    #[serde(default)]
    pub jwks_url: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExternalAuthConfig {
    /// The token issuer (`iss`); its OpenID configuration names the keys.
    pub issuer: String,
    /// The `aud` tokens must carry.
    pub audience: String,
    /// Overrides the `jwks_uri` of the issuer's OpenID configuration.
    pub jwks_url: String,
    /// The claim that names the client (job ownership).
    pub client_claim: String,
    /// Claims holding roles or scopes (a space-separated string or a list).
    pub scope_claims: Vec<String>,
    /// Role or scope → SMART scopes it grants.
    pub scope_map: BTreeMap<String, Vec<String>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database: DatabaseConfig::default(),
            server: ServerConfig::default(),
            log: LogConfig {
                format: LogFormat::Text,
            },
            export: ExportConfig::default(),
            storage: StorageConfig::default(),
            auth: AuthConfig::default(),
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "postgres://postgres@127.0.0.1:5432/fhir_export".into(),
            max_connections: 0,
            read_url: String::new(),
            read_max_wait_secs: 30,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::None,
            allow_anonymous: false,
            token_lifetime_secs: 300,
            token_secret: String::new(),
            clients: Vec::new(),
            external: ExternalAuthConfig::default(),
        }
    }
}

impl Default for ExternalAuthConfig {
    fn default() -> Self {
        ExternalAuthConfig {
            issuer: String::new(),
            audience: String::new(),
            jwks_url: String::new(),
            client_claim: "sub".into(),
            scope_claims: vec!["scp".into(), "roles".into()],
            scope_map: BTreeMap::new(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".parse().expect("valid literal"),
            public_url: String::new(),
            max_body_bytes: 32 * 1024 * 1024,
            max_kickoff_bytes: 16 * 1024 * 1024,
            header_read_timeout_secs: 10,
            request_timeout_secs: 60,
            write_timeout_secs: 60,
            max_connections: 1024,
            metrics_listen: None,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
        }
    }
}

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig {
            workers: 4,
            part_size: 5000,
            part_max_bytes: 256 * 1024 * 1024,
            stale_after_secs: 600,
            max_attempts: 5,
            retry_backoff_secs: 5,
            max_active_jobs: 16,
            max_active_jobs_per_client: 4,
            max_patients: 100_000,
            max_type_filters: 200,
            retention_secs: 24 * 3600,
            range_size: 20_000,
            poll_interval_ms: 2000,
            throttle_ms: 0,
            output_urls: OutputUrls::Server,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            kind: StorageKind::Filesystem,
            dir: "./data/exports".into(),
            default_container: String::new(),
            allowed_containers: Vec::new(),
            azure: AzureConfig::default(),
        }
    }
}

impl Default for AzureConfig {
    fn default() -> Self {
        AzureConfig {
            connection_string: String::new(),
            account_url: String::new(),
            credential: AzureCredentialKind::ManagedIdentity,
            sas_token: String::new(),
            block_size: 4 * 1024 * 1024,
            sas_lifetime_secs: 3600,
        }
    }
}

/// One environment override: its name and how it sets the config.
type EnvSetter = fn(&mut Config, &str) -> anyhow::Result<()>;

/// Every environment variable the server reads (the README's config table lists the same).
pub const ENV_OVERRIDES: &[(&str, EnvSetter)] = &[
    ("DATABASE_URL", |c, v| {
        c.database.url = v.into();
        Ok(())
    }),
    ("FHIR_EXPORT_DATABASE_MAX_CONNECTIONS", |c, v| {
        c.database.max_connections = v.parse()?;
        Ok(())
    }),
    ("FHIR_EXPORT_READ_DATABASE_URL", |c, v| {
        c.database.read_url = v.into();
        Ok(())
    }),
    ("FHIR_EXPORT_READ_MAX_WAIT_SECS", |c, v| {
        c.database.read_max_wait_secs = v.parse()?;
        Ok(())
    }),
    ("FHIR_EXPORT_LISTEN", |c, v| {
        c.server.listen = v.parse().context("not a socket address")?;
        Ok(())
    }),
    ("FHIR_EXPORT_METRICS_LISTEN", |c, v| {
        c.server.metrics_listen = if v.is_empty() {
            None
        } else {
            Some(v.parse().context("not a socket address")?)
        };
        Ok(())
    }),
    ("FHIR_EXPORT_PUBLIC_URL", |c, v| {
        c.server.public_url = v.into();
        Ok(())
    }),
    ("FHIR_EXPORT_MAX_BODY_BYTES", |c, v| {
        c.server.max_body_bytes = v.parse()?;
        Ok(())
    }),
    ("FHIR_EXPORT_MAX_KICKOFF_BYTES", |c, v| {
        c.server.max_kickoff_bytes = v.parse()?;
        Ok(())
    }),
    ("FHIR_EXPORT_HEADER_READ_TIMEOUT_SECS", |c, v| {
        c.server.header_read_timeout_secs = v.parse()?;
        Ok(())
    }),
    ("FHIR_EXPORT_REQUEST_TIMEOUT_SECS", |c, v| {
        c.server.request_timeout_secs = v.parse()?;
        Ok(())
    }),
    ("FHIR_EXPORT_WRITE_TIMEOUT_SECS", |c, v| {
        c.server.write_timeout_secs = v.parse()?;
        Ok(())
    }),
    ("FHIR_EXPORT_MAX_CONNECTIONS", |c, v| {
        c.server.max_connections = v.parse()?;
        Ok(())
    }),
    ("FHIR_EXPORT_LOG_FORMAT", |c, v| {
        c.log.format = parse_enum(v)?;
        Ok(())
    }),
    ("FHIR_EXPORT_WORKERS", |c, v| {
        c.export.workers = v.parse()?;
        Ok(())
    }),
    ("FHIR_EXPORT_PART_SIZE", |c, v| {
        c.export.part_size = v.parse()?;
        Ok(())
    }),
    ("FHIR_EXPORT_PART_MAX_BYTES", |c, v| {
        c.export.part_max_bytes = v.parse()?;
        Ok(())
    }),
    ("FHIR_EXPORT_STALE_AFTER_SECS", |c, v| {
        c.export.stale_after_secs = v.parse()?;
        Ok(())
    }),
    ("FHIR_EXPORT_MAX_ATTEMPTS", |c, v| {
        c.export.max_attempts = v.parse()?;
        Ok(())
    }),
    ("FHIR_EXPORT_RETRY_BACKOFF_SECS", |c, v| {
        c.export.retry_backoff_secs = v.parse()?;
        Ok(())
    }),
    ("FHIR_EXPORT_MAX_ACTIVE_JOBS", |c, v| {
        c.export.max_active_jobs = v.parse()?;
        Ok(())
    }),
    ("FHIR_EXPORT_MAX_ACTIVE_JOBS_PER_CLIENT", |c, v| {
        c.export.max_active_jobs_per_client = v.parse()?;
        Ok(())
    }),
    ("FHIR_EXPORT_MAX_PATIENTS", |c, v| {
        c.export.max_patients = v.parse()?;
        Ok(())
    }),
    ("FHIR_EXPORT_MAX_TYPE_FILTERS", |c, v| {
        c.export.max_type_filters = v.parse()?;
        Ok(())
    }),
    ("FHIR_EXPORT_RETENTION_SECS", |c, v| {
        c.export.retention_secs = v.parse()?;
        Ok(())
    }),
    ("FHIR_EXPORT_RANGE_SIZE", |c, v| {
        c.export.range_size = v.parse()?;
        Ok(())
    }),
    ("FHIR_EXPORT_POLL_INTERVAL_MS", |c, v| {
        c.export.poll_interval_ms = v.parse()?;
        Ok(())
    }),
    ("FHIR_EXPORT_THROTTLE_MS", |c, v| {
        c.export.throttle_ms = v.parse()?;
        Ok(())
    }),
    ("FHIR_EXPORT_STORAGE", |c, v| {
        c.storage.kind = parse_enum(v)?;
        Ok(())
    }),
    ("FHIR_EXPORT_STORAGE_DIR", |c, v| {
        c.storage.dir = v.into();
        Ok(())
    }),
    ("FHIR_EXPORT_DEFAULT_CONTAINER", |c, v| {
        c.storage.default_container = v.into();
        Ok(())
    }),
    ("FHIR_EXPORT_ALLOWED_CONTAINERS", |c, v| {
        c.storage.allowed_containers = v
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(String::from)
            .collect();
        Ok(())
    }),
    ("FHIR_EXPORT_OUTPUT_URLS", |c, v| {
        c.export.output_urls = parse_enum(v)?;
        Ok(())
    }),
    ("AZURE_STORAGE_CONNECTION_STRING", |c, v| {
        c.storage.azure.connection_string = v.into();
        Ok(())
    }),
    ("FHIR_EXPORT_AZURE_ACCOUNT_URL", |c, v| {
        c.storage.azure.account_url = v.into();
        Ok(())
    }),
    ("FHIR_EXPORT_AZURE_CREDENTIAL", |c, v| {
        c.storage.azure.credential = parse_enum(v)?;
        Ok(())
    }),
    ("FHIR_EXPORT_AZURE_SAS_TOKEN", |c, v| {
        c.storage.azure.sas_token = v.into();
        Ok(())
    }),
    ("FHIR_EXPORT_AZURE_BLOCK_SIZE", |c, v| {
        c.storage.azure.block_size = v.parse()?;
        Ok(())
    }),
    ("FHIR_EXPORT_AZURE_SAS_LIFETIME_SECS", |c, v| {
        c.storage.azure.sas_lifetime_secs = v.parse()?;
        Ok(())
    }),
    ("FHIR_EXPORT_AUTH_MODE", |c, v| {
        c.auth.mode = parse_enum(v)?;
        Ok(())
    }),
    ("FHIR_EXPORT_ALLOW_ANONYMOUS", |c, v| {
        c.auth.allow_anonymous = v.parse().context("true or false")?;
        Ok(())
    }),
    ("FHIR_EXPORT_AUTH_TOKEN_LIFETIME_SECS", |c, v| {
        c.auth.token_lifetime_secs = v.parse()?;
        Ok(())
    }),
    ("FHIR_EXPORT_AUTH_TOKEN_SECRET", |c, v| {
        c.auth.token_secret = v.into();
        Ok(())
    }),
    ("FHIR_EXPORT_AUTH_ISSUER", |c, v| {
        c.auth.external.issuer = v.into();
        Ok(())
    }),
    ("FHIR_EXPORT_AUTH_AUDIENCE", |c, v| {
        c.auth.external.audience = v.into();
        Ok(())
    }),
    ("FHIR_EXPORT_AUTH_JWKS_URL", |c, v| {
        c.auth.external.jwks_url = v.into();
        Ok(())
    }),
];

fn parse_enum<T: for<'de> Deserialize<'de>>(v: &str) -> anyhow::Result<T> {
    T::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(v))
        .map_err(|e| anyhow::anyhow!("{e}"))
}

impl Config {
    /// Defaults, then `file` (if any), then the process environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => Config::default(),
        };
        config.apply_env(|name| std::env::var(name).ok())?;
        config.validate()?;
        Ok(config)
    }

    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
        for (name, set) in ENV_OVERRIDES {
            if let Some(value) = get(name) {
                set(self, &value).with_context(|| format!("invalid {name}={value:?}"))?;
            }
        }
        Ok(())
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
        if e.range_size < 1 {
            bail!("export.range_size must be at least 1");
        }
        let needed = self.export.workers as u32 + 2;
        if self.database.max_connections != 0 && self.database.max_connections < needed {
            bail!(
                "database.max_connections must be at least export.workers + 2 ({needed}): one \
                 page connection per worker, and two for the queue and the API"
            );
        }
        let azure = &self.storage.azure;
        if self.storage.kind == StorageKind::Azure {
            if azure.connection_string.is_empty() && azure.account_url.is_empty() {
                bail!(
                    "storage.kind = azure needs AZURE_STORAGE_CONNECTION_STRING or \
                     FHIR_EXPORT_AZURE_ACCOUNT_URL"
                );
            }
            if !(64 * 1024..=100 * 1024 * 1024).contains(&azure.block_size) {
                bail!("storage.azure.block_size must be between 64 KiB and 100 MiB");
            }
        } else if self.export.output_urls != OutputUrls::Server {
            bail!("export.output_urls = blob or sas needs storage.kind = azure");
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
        if !(60..=7 * 24 * 3600).contains(&self.storage.azure.sas_lifetime_secs) {
            bail!("storage.azure.sas_lifetime_secs must be between 60 and 604800");
        }
        self.validate_auth()?;
        if !self.storage.default_container.is_empty() {
            crate::containers::validate(&self.storage.default_container)
                .map_err(|why| anyhow::anyhow!("storage.default_container: {why}"))?;
            if self.storage.default_container == crate::containers::ANONYMIZATION {
                bail!(
                    "storage.default_container cannot be '{}': de-identification configurations \
                     are read from there",
                    crate::containers::ANONYMIZATION
                );
            }
        }
        Ok(())
    }

    fn validate_auth(&self) -> anyhow::Result<()> {
        let auth = &self.auth;
        if !(10..=3600).contains(&auth.token_lifetime_secs) {
            bail!("auth.token_lifetime_secs must be between 10 and 3600");
        }
        match auth.mode {
            AuthMode::None => {}
            AuthMode::Smart => {
                if auth.clients.is_empty() {
                    bail!("auth.mode = smart needs at least one [[auth.clients]] entry");
                }
                for client in &auth.clients {
                    if client.id.is_empty() {
                        bail!("every auth.clients entry needs an id");
                    }
                    if client.jwks.is_empty() == client.jwks_url.is_empty() {
                        bail!(
                            "auth client '{}' needs exactly one of jwks, jwks_url",
                            client.id
                        );
                    }
                    for scope in &client.scopes {
                        if crate::auth::scopes::Scope::parse(scope).is_none() {
                            bail!(
                                "auth client '{}': '{scope}' is not a SMART system scope",
                                client.id
                            );
                        }
                    }
                }
                if !auth.token_secret.is_empty() && auth.token_secret.len() < 32 {
                    bail!("auth.token_secret must be at least 32 characters");
                }
            }
            AuthMode::External => {
                let external = &auth.external;
                if external.issuer.is_empty() || external.audience.is_empty() {
                    bail!(
                        "auth.mode = external needs auth.external.issuer and auth.external.audience"
                    );
                }
                for (role, scopes) in &external.scope_map {
                    for scope in scopes {
                        if crate::auth::scopes::Scope::parse(scope).is_none() {
                            bail!(
                                "auth.external.scope_map.{role}: '{scope}' is not a SMART system scope"
                            );
                        }
                    }
                }
            }
        }
        Ok(())
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
            0 => self.export.workers as u32 * 2 + 8,
            n => n,
        }
    }

    pub fn stale_after(&self) -> Duration {
        Duration::from_secs(self.export.stale_after_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_matches_builtin_defaults() {
        let text = include_str!("../config/default.toml");
        let from_file: Config = toml::from_str(text).expect("config/default.toml parses");
        let builtin = Config::default();
        assert_eq!(format!("{from_file:?}"), format!("{builtin:?}"));
    }

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
        for (name, _) in ENV_OVERRIDES {
            assert!(
                table.contains(&format!("`{name}`")),
                "{name} is not in the README's table"
            );
            assert!(
                text.contains(&format!("Env: {name}")),
                "{name} is not in config/default.toml"
            );
        }
    }

    #[test]
    fn env_overrides_apply_and_bad_values_are_named() {
        let mut c = Config::default();
        c.apply_env(|n| match n {
            "FHIR_EXPORT_WORKERS" => Some("0".into()),
            "FHIR_EXPORT_LOG_FORMAT" => Some("json".into()),
            "FHIR_EXPORT_LISTEN" => Some("0.0.0.0:9000".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.export.workers, 0);
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.public_url(), "http://0.0.0.0:9000");

        let err = Config::default()
            .apply_env(|n| (n == "FHIR_EXPORT_PART_SIZE").then(|| "many".into()))
            .unwrap_err();
        assert!(format!("{err:#}").contains("FHIR_EXPORT_PART_SIZE"));
    }
}
