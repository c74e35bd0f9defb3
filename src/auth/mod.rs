//! Who is calling: bearer tokens (issued by this server in `smart` mode, by an external issuer
//! in `external` mode) turned into a `Principal` with SMART scopes.

pub mod config;
mod external;
mod jwks;
pub mod scopes;
pub mod smart;

use std::time::Duration;

use config::{AuthConfig, AuthMode};
use scopes::{Access, Scopes};

/// The caller of a request.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The client; None when auth is off. Jobs belong to it.
    pub client_id: Option<String>,
    pub scopes: Scopes,
}

impl Principal {
    /// Why the caller may not do `access` to `resource_type` resources; `None`: it may.
    pub fn denied(&self, access: Access, resource_type: &str) -> Option<String> {
        if self.scopes.allows(access, resource_type) {
            return None;
        }
        let what = match access {
            Access::Read => "reading",
            Access::Export => "exporting",
            Access::Create => "creating",
            Access::Update => "updating",
            Access::Delete => "deleting",
        };
        Some(format!(
            "the granted scopes do not allow {what} {resource_type} resources"
        ))
    }

    /// Auth mode `none`: anyone may do anything.
    pub fn unrestricted() -> Principal {
        Principal {
            client_id: None,
            scopes: Scopes::all(),
        }
    }
}

pub struct Auth {
    mode: AuthMode,
    smart: Option<smart::SmartServer>,
    external: Option<external::ExternalIssuer>,
}

impl Auth {
    pub fn new(config: &AuthConfig, base_url: &str) -> anyhow::Result<Auth> {
        // Fetches key sets and OpenID configurations. Short: a refresh runs in the background,
        // but a first fetch keeps its caller waiting.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        Ok(Auth {
            mode: config.mode,
            smart: match config.mode {
                AuthMode::Smart => Some(smart::SmartServer::new(config, base_url, &http)?),
                _ => None,
            },
            external: match config.mode {
                AuthMode::External => Some(external::ExternalIssuer::new(&config.external, &http)),
                _ => None,
            },
        })
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// This server's authorization server, in smart mode.
    pub fn smart(&self) -> Option<&smart::SmartServer> {
        self.smart.as_ref()
    }

    /// The caller a request's bearer token names; `Err` says why there is none.
    pub async fn authenticate(&self, bearer: Option<&str>) -> Result<Principal, String> {
        if self.mode == AuthMode::None {
            return Ok(Principal::unrestricted());
        }
        let token = bearer.ok_or("this server requires a bearer token")?;
        if let Some(smart) = &self.smart {
            return smart
                .verify(token)
                .ok_or_else(|| "the access token is invalid or expired".to_string());
        }
        match &self.external {
            Some(external) => external.verify(token).await,
            None => Err("no token issuer is configured".into()),
        }
    }
}
