//! The `[auth]` section: who may call the API.

use std::collections::BTreeMap;

use anyhow::bail;
use serde::{Deserialize, Serialize};

use super::scopes::Scope;

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
#[serde(deny_unknown_fields)]
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
#[serde(deny_unknown_fields)]
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

impl AuthConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        let auth = self;
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
                        if Scope::parse(scope).is_none() {
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
                        if Scope::parse(scope).is_none() {
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
}
