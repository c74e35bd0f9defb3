//! SMART Backend Services: a signed assertion exchanged for an access token, renewed before it
//! expires.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::sync::Mutex;

pub(super) struct Smart {
    pub(super) client_id: String,
    pub(super) kid: Option<String>,
    pub(super) key: jsonwebtoken::EncodingKey,
    pub(super) algorithm: jsonwebtoken::Algorithm,
    pub(super) token_url: String,
    pub(super) scope: String,
    /// The current token and when to get a new one.
    pub(super) token: Mutex<Option<(String, Instant)>>,
}

impl Smart {
    /// The current token, or a new one when it is about to expire.
    pub(super) async fn token(&self, http: &reqwest::Client) -> anyhow::Result<String> {
        let mut token = self.token.lock().await;
        if let Some((value, renew_at)) = token.as_ref()
            && Instant::now() < *renew_at
        {
            return Ok(value.clone());
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let mut jwt_header = jsonwebtoken::Header::new(self.algorithm);
        jwt_header.kid = self.kid.clone();
        let claims = json!({
            "iss": self.client_id, "sub": self.client_id, "aud": self.token_url,
            "exp": now + 240, "jti": uuid::Uuid::new_v4().to_string(),
        });
        let assertion = jsonwebtoken::encode(&jwt_header, &claims, &self.key)?;
        let response = http
            .post(&self.token_url)
            .form(&[
                ("grant_type", "client_credentials"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", &assertion),
                ("scope", &self.scope),
            ])
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("the token endpoint answered {status}: {body}");
        }
        let value = body["access_token"]
            .as_str()
            .context("the token endpoint gave no access_token")?
            .to_string();
        let lifetime = body["expires_in"].as_u64().unwrap_or(300);
        // Renewed a minute early (or halfway, for short tokens).
        let renew_in = lifetime.saturating_sub(60).max(lifetime / 2);
        *token = Some((
            value.clone(),
            Instant::now() + Duration::from_secs(renew_in),
        ));
        Ok(value)
    }
}

/// A signing key from PEM, or from a JWK Set (or one JWK) with a private key; the JWK's kid.
pub(super) fn signing_key(
    bytes: &[u8],
) -> anyhow::Result<(
    jsonwebtoken::EncodingKey,
    jsonwebtoken::Algorithm,
    Option<String>,
)> {
    use jsonwebtoken::{Algorithm, EncodingKey};
    if let Ok(json) = serde_json::from_slice::<Value>(bytes) {
        let jwk = match json["keys"].as_array() {
            Some(keys) => keys
                .iter()
                .find(|k| k["d"].is_string())
                .context("the key set holds no private key")?,
            None => &json,
        };
        let kid = jwk["kid"].as_str().map(str::to_string);
        let (key, algorithm) = private_jwk(jwk)?;
        return Ok((key, algorithm, kid));
    }
    if let Ok(key) = EncodingKey::from_rsa_pem(bytes) {
        return Ok((key, Algorithm::RS384, None));
    }
    let key = EncodingKey::from_ec_pem(bytes)
        .context("neither a JWK Set nor an RSA or EC private key in PEM")?;
    Ok((key, Algorithm::ES384, None))
}

/// A private JWK as a key `jsonwebtoken` signs with. aws-lc checks that the parts make one key
/// and encodes it: PKCS#8 for both (RSA's is handed over as PEM, which `jsonwebtoken` unwraps to
/// the PKCS#1 form its signer reads).
pub(super) fn private_jwk(
    jwk: &Value,
) -> anyhow::Result<(jsonwebtoken::EncodingKey, jsonwebtoken::Algorithm)> {
    use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    use jsonwebtoken::{Algorithm, EncodingKey};
    let part = |name: &str| -> anyhow::Result<Vec<u8>> {
        let text = jwk[name]
            .as_str()
            .with_context(|| format!("the JWK has no '{name}'"))?;
        Ok(URL_SAFE_NO_PAD.decode(text.trim_end_matches('='))?)
    };
    match (jwk["kty"].as_str(), jwk["crv"].as_str()) {
        (Some("RSA"), _) => {
            use aws_lc_rs::rsa::{KeyPair, KeyPairComponents, PublicKeyComponents};
            let components = KeyPairComponents {
                public_key: PublicKeyComponents {
                    n: part("n")?,
                    e: part("e")?,
                },
                d: part("d")?,
                p: part("p")?,
                q: part("q")?,
                dP: part("dp")?,
                dQ: part("dq")?,
                qInv: part("qi")?,
            };
            let pair = KeyPair::from_components(&components)
                .map_err(|e| anyhow::anyhow!("not an RSA private key: {e}"))?;
            let der: Pkcs8V1Der = pair
                .as_der()
                .map_err(|_| anyhow::anyhow!("the RSA key cannot be encoded"))?;
            let pem = format!(
                "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
                base64::engine::general_purpose::STANDARD.encode(der.as_ref())
            );
            Ok((EncodingKey::from_rsa_pem(pem.as_bytes())?, Algorithm::RS384))
        }
        (Some("EC"), Some("P-384")) => {
            use aws_lc_rs::signature::{ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair};
            let point = [&[4u8][..], &part("x")?, &part("y")?].concat();
            let pair = EcdsaKeyPair::from_private_key_and_public_key(
                &ECDSA_P384_SHA384_FIXED_SIGNING,
                &part("d")?,
                &point,
            )
            .map_err(|e| anyhow::anyhow!("not a P-384 private key: {e}"))?;
            let pkcs8 = pair
                .to_pkcs8v1()
                .map_err(|_| anyhow::anyhow!("the EC key cannot be encoded"))?;
            Ok((EncodingKey::from_ec_der(pkcs8.as_ref()), Algorithm::ES384))
        }
        (kty, crv) => bail!("a {kty:?} key on {crv:?} cannot sign RS384 or ES384"),
    }
}
