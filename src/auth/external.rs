//! Access tokens of an external OpenID Connect issuer (e.g. Entra ID): signature against the
//! issuer's keys, issuer, audience, expiry, not-before; roles or scopes mapped to SMART scopes.

use std::collections::BTreeMap;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use super::config::ExternalAuthConfig;
use super::{Principal, jwks::KeySource, scopes::Scope, scopes::Scopes};

/// Asymmetric algorithms only: a symmetric one would let a public key act as a secret.
const ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

pub struct ExternalIssuer {
    issuer: String,
    audience: String,
    /// From `jwks_url`, or the issuer's OpenID configuration (read on first use: the issuer
    /// may be down at startup).
    keys: KeySource,
    client_claim: String,
    scope_claims: Vec<String>,
    scope_map: BTreeMap<String, Vec<String>>,
}

impl ExternalIssuer {
    pub fn new(config: &ExternalAuthConfig, http: &reqwest::Client) -> ExternalIssuer {
        let keys = if config.jwks_url.is_empty() {
            KeySource::of_issuer(http, &config.issuer)
        } else {
            KeySource::remote(http, &config.jwks_url)
        };
        ExternalIssuer {
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            keys,
            client_claim: config.client_claim.clone(),
            scope_claims: config.scope_claims.clone(),
            scope_map: config.scope_map.clone(),
        }
    }

    /// The caller a token names, or why it is refused (for the 401's description).
    pub async fn verify(&self, token: &str) -> Result<Principal, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| "not a signed JWT")?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err("the token's signing algorithm is not accepted".into());
        }
        let kid = header.kid.ok_or("the token has no kid")?;
        let jwk = self
            .keys
            .find(&kid)
            .await
            .map_err(|e| {
                tracing::warn!(issuer = %self.issuer, error = %e, "issuer keys unavailable");
                "the issuer's keys could not be read".to_string()
            })?
            .ok_or("the token's key is not one of the issuer's")?;
        let key = DecodingKey::from_jwk(&jwk).map_err(|_| "the issuer's key is unusable")?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.validate_nbf = true;
        validation.leeway = 30;
        let data = jsonwebtoken::decode::<Value>(token, &key, &validation)
            .map_err(|e| format!("the token is invalid: {e}"))?;
        let claims = data.claims;
        let client_id = claims
            .get(&self.client_claim)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("the token has no {} claim", self.client_claim))?
            .to_string();
        // It owns jobs (stored): a client name, not arbitrary text.
        if client_id.is_empty() || client_id.len() > 255 || client_id.chars().any(char::is_control)
        {
            return Err(format!(
                "the token's {} claim is not a client name (1-255 bytes, no control characters)",
                self.client_claim
            ));
        }
        Ok(Principal {
            client_id: Some(client_id),
            scopes: self.scopes(&claims),
        })
    }

    /// SMART scopes from the configured claims: mapped roles/scopes, and SMART scopes as such.
    fn scopes(&self, claims: &Value) -> Scopes {
        let mut granted = Vec::new();
        for claim in &self.scope_claims {
            let values: Vec<&str> = match claims.get(claim) {
                Some(Value::String(s)) => s.split_whitespace().collect(),
                Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            };
            for value in values {
                if let Some(mapped) = self.scope_map.get(value) {
                    granted.extend(mapped.iter().filter_map(|s| Scope::parse(s)));
                }
                granted.extend(Scope::parse(value));
            }
        }
        Scopes::from_scopes(granted)
    }
}
