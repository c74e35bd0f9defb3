//! The SMART Backend Services authorization server: `client_credentials` grants for clients
//! that authenticate with a signed JWT assertion (`private_key_jwt`), and the access tokens it
//! issues (HS256 with the configured secret).

use std::collections::HashMap;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::config::AuthConfig;
use super::{
    Principal,
    jwks::KeySource,
    scopes::{Scope, Scopes},
};
use crate::db;

pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Signing algorithms SMART Backend Services requires servers to accept.
pub const ASSERTION_ALGORITHMS: &[&str] = &["RS384", "ES384"];
/// How far ahead a client assertion may expire (SMART: at most five minutes).
const MAX_ASSERTION_SECS: u64 = 300;
/// Clock skew allowed between client and server.
const LEEWAY_SECS: u64 = 5;
/// The longest `jti` remembered: a unique id, not a document.
const MAX_JTI_BYTES: usize = 255;

struct Client {
    allowed: Scopes,
    keys: KeySource,
    /// The registered key-set URL, the only `jku` an assertion may name.
    jwks_url: Option<String>,
}

pub struct SmartServer {
    clients: HashMap<String, Client>,
    /// `{base}/auth/token`: the `aud` of every assertion.
    token_url: String,
    /// `iss` and `aud` of issued tokens.
    base_url: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    lifetime_secs: u64,
}

/// An RFC 6749 token error.
#[derive(Debug)]
pub enum TokenError {
    InvalidRequest(String),
    UnsupportedGrantType(String),
    InvalidClient(String),
    InvalidScope(String),
    Internal(anyhow::Error),
}

impl TokenError {
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::InvalidRequest(_) => "invalid_request",
            TokenError::UnsupportedGrantType(_) => "unsupported_grant_type",
            TokenError::InvalidClient(_) => "invalid_client",
            TokenError::InvalidScope(_) => "invalid_scope",
            TokenError::Internal(_) => "server_error",
        }
    }
}

impl From<sqlx::Error> for TokenError {
    fn from(e: sqlx::Error) -> Self {
        TokenError::Internal(e.into())
    }
}

#[derive(Debug, Serialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: u64,
    pub scope: String,
}

#[derive(Debug, Deserialize)]
struct AssertionClaims {
    iss: Option<String>,
    exp: u64,
    iat: Option<u64>,
    jti: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct AccessClaims {
    iss: String,
    sub: String,
    aud: String,
    exp: u64,
    iat: u64,
    jti: String,
    scope: String,
}

impl SmartServer {
    pub fn new(
        config: &AuthConfig,
        base_url: &str,
        http: &reqwest::Client,
    ) -> anyhow::Result<SmartServer> {
        let mut clients = HashMap::new();
        for c in &config.clients {
            let keys = if c.jwks.is_empty() {
                KeySource::remote(http, &c.jwks_url)
            } else {
                KeySource::inline(&c.jwks)
                    .map_err(|e| anyhow::anyhow!("auth client '{}': {e}", c.id))?
            };
            let allowed =
                Scopes::from_scopes(c.scopes.iter().filter_map(|s| Scope::parse(s)).collect());
            let jwks_url = (!c.jwks_url.is_empty()).then(|| c.jwks_url.clone());
            clients.insert(
                c.id.clone(),
                Client {
                    allowed,
                    keys,
                    jwks_url,
                },
            );
        }
        let secret = if config.token_secret.is_empty() {
            tracing::warn!(
                "auth.token_secret is empty: access tokens are valid on this process only"
            );
            format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            )
        } else {
            config.token_secret.clone()
        };
        Ok(SmartServer {
            clients,
            token_url: format!("{base_url}/auth/token"),
            base_url: base_url.to_string(),
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            lifetime_secs: config.token_lifetime_secs,
        })
    }

    pub fn token_url(&self) -> &str {
        &self.token_url
    }

    /// Answers a token request (its form fields).
    pub async fn token(
        &self,
        pool: &PgPool,
        form: &HashMap<String, String>,
    ) -> Result<TokenResponse, TokenError> {
        let field = |name: &str| form.get(name).map(String::as_str).filter(|v| !v.is_empty());
        match field("grant_type") {
            Some("client_credentials") => {}
            Some(other) => {
                return Err(TokenError::UnsupportedGrantType(format!(
                    "grant_type '{other}' is not supported; use client_credentials"
                )));
            }
            None => return Err(TokenError::InvalidRequest("grant_type is required".into())),
        }
        if field("client_assertion_type") != Some(JWT_BEARER) {
            return Err(TokenError::InvalidClient(format!(
                "client authentication must be a JWT assertion (client_assertion_type {JWT_BEARER})"
            )));
        }
        let assertion = field("client_assertion")
            .ok_or_else(|| TokenError::InvalidClient("client_assertion is required".into()))?;
        // RFC 6749 section 3.3: a missing or empty scope is an invalid scope.
        let requested = field("scope")
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| TokenError::InvalidScope("scope is required".into()))?;
        let (client_id, client, expires) = self.authenticate(assertion).await?;

        // Each assertion works once: its jti is remembered as long as the assertion could be
        // accepted (its expiry plus the leeway).
        let remembered_until = expires.exp.saturating_add(LEEWAY_SECS);
        if !db::assertions::record(pool, &client_id, &expires.jti, remembered_until).await? {
            return Err(TokenError::InvalidClient(
                "this client assertion (jti) was used before".into(),
            ));
        }
        let requested: Vec<Scope> = requested
            .split_whitespace()
            .filter_map(Scope::parse)
            .collect();
        let granted = client.allowed.grant(&requested);
        if granted.is_empty() {
            return Err(TokenError::InvalidScope(
                "none of the requested scopes is a system scope this client may have".into(),
            ));
        }
        let now = now_secs();
        let claims = AccessClaims {
            iss: self.base_url.clone(),
            sub: client_id,
            aud: self.base_url.clone(),
            exp: now + self.lifetime_secs,
            iat: now,
            jti: uuid::Uuid::new_v4().to_string(),
            scope: granted.to_string(),
        };
        let access_token =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
                .map_err(|e| TokenError::Internal(e.into()))?;
        Ok(TokenResponse {
            access_token,
            token_type: "bearer",
            expires_in: self.lifetime_secs,
            scope: claims.scope,
        })
    }

    /// Checks a client assertion: a known client, a key of its set, the signature, `iss` = `sub`
    /// = client id, `aud` = the token URL, an `exp` at most five minutes ahead, a `jti`.
    async fn authenticate(&self, assertion: &str) -> Result<(String, &Client, Expiry), TokenError> {
        let (algorithm, kid, jku) = assertion_header(assertion)?;
        // The issuer picks the key set; the signature is checked right after.
        let unverified = jsonwebtoken::dangerous::insecure_decode::<AssertionClaims>(assertion)
            .map_err(|_| invalid("client_assertion has unreadable claims"))?;
        let client_id = unverified
            .claims
            .iss
            .ok_or_else(|| invalid("client_assertion has no iss"))?;
        let client = self
            .clients
            .get(&client_id)
            .ok_or_else(|| invalid("unknown client"))?;
        // Keys come from the registration only: a `jku` may name nothing else.
        if let Some(jku) = jku
            && client.jwks_url.as_deref() != Some(jku.as_str())
        {
            return Err(invalid(
                "client_assertion jku is not the key-set URL registered for this client",
            ));
        }
        let jwk = client
            .keys
            .find(&kid)
            .await
            .map_err(|e| {
                tracing::warn!(client = %client_id, error = %e, "client key set unavailable");
                invalid("the client's key set could not be read")
            })?
            .ok_or_else(|| invalid("no key of this client has that kid"))?;
        let key =
            DecodingKey::from_jwk(&jwk).map_err(|_| invalid("the client's key is unusable"))?;
        let claims = self.verified_claims(assertion, &key, algorithm, &client_id)?;
        Ok((client_id, client, expiry(claims)?))
    }

    /// The assertion's claims once its signature, `aud`, `iss`, `sub` and times verify.
    fn verified_claims(
        &self,
        assertion: &str,
        key: &DecodingKey,
        algorithm: Algorithm,
        client_id: &str,
    ) -> Result<AssertionClaims, TokenError> {
        let mut validation = Validation::new(algorithm);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_audience(&[&self.token_url]);
        validation.set_issuer(&[client_id]);
        validation.sub = Some(client_id.to_string());
        validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        let data =
            jsonwebtoken::decode::<AssertionClaims>(assertion, key, &validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::InvalidSignature => {
                        invalid("client_assertion signature does not verify")
                    }
                    ErrorKind::ExpiredSignature => invalid("client_assertion has expired"),
                    ErrorKind::ImmatureSignature => {
                        invalid("client_assertion nbf is in the future")
                    }
                    ErrorKind::InvalidAudience => TokenError::InvalidClient(format!(
                        "client_assertion aud must be {}",
                        self.token_url
                    )),
                    ErrorKind::InvalidSubject => invalid("client_assertion sub must equal iss"),
                    ErrorKind::MissingRequiredClaim(c) => {
                        TokenError::InvalidClient(format!("client_assertion has no {c}"))
                    }
                    _ => invalid("client_assertion is invalid"),
                }
            })?;
        Ok(data.claims)
    }

    /// The caller an access token of this server names, if it is valid.
    pub fn verify(&self, token: &str) -> Option<Principal> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[&self.base_url]);
        validation.set_issuer(&[&self.base_url]);
        let data = jsonwebtoken::decode::<AccessClaims>(token, &self.decoding, &validation).ok()?;
        Some(Principal {
            client_id: Some(data.claims.sub),
            scopes: Scopes::parse_list(&data.claims.scope),
        })
    }
}

/// What replay protection remembers of an assertion.
struct Expiry {
    jti: String,
    exp: u64,
}

fn now_secs() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn invalid(why: &str) -> TokenError {
    TokenError::InvalidClient(why.to_string())
}

/// The assertion's algorithm (RS384 or ES384), `kid` and `jku`.
fn assertion_header(assertion: &str) -> Result<(Algorithm, String, Option<String>), TokenError> {
    let header = jsonwebtoken::decode_header(assertion)
        .map_err(|_| invalid("client_assertion is not a signed JWT"))?;
    let algorithm = match header.alg {
        Algorithm::RS384 => Algorithm::RS384,
        Algorithm::ES384 => Algorithm::ES384,
        _ => {
            return Err(invalid(
                "client_assertion must be signed with RS384 or ES384",
            ));
        }
    };
    let kid = header
        .kid
        .ok_or_else(|| invalid("client_assertion has no kid header"))?;
    Ok((algorithm, kid, header.jku))
}

/// What replay protection keeps of a verified assertion: an `exp` at most five minutes ahead,
/// an `iat` not in the future, a usable `jti`.
fn expiry(claims: AssertionClaims) -> Result<Expiry, TokenError> {
    if claims.exp > now_secs() + MAX_ASSERTION_SECS + LEEWAY_SECS {
        return Err(invalid(
            "client_assertion exp is more than five minutes ahead",
        ));
    }
    if claims.iat.is_some_and(|iat| iat > now_secs() + LEEWAY_SECS) {
        return Err(invalid("client_assertion iat is in the future"));
    }
    let jti = claims
        .jti
        .filter(|j| !j.is_empty())
        .ok_or_else(|| invalid("client_assertion has no jti"))?;
    if jti.len() > MAX_JTI_BYTES || jti.chars().any(char::is_control) {
        return Err(invalid(
            "client_assertion jti must be at most 255 bytes without control characters",
        ));
    }
    Ok(Expiry {
        jti,
        exp: claims.exp,
    })
}
