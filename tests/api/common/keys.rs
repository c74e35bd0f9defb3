//! Signing keys made in the test (RSA, EC P-384) and compact JWS, independent of the server's
//! JWT library.

use aws_lc_rs::{
    rand::SystemRandom,
    rsa::{KeyPair as RsaKeyPair, KeySize, PublicKeyComponents},
    signature::{
        ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair, RSA_PKCS1_SHA256, RSA_PKCS1_SHA384,
    },
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde_json::{Value, json};

pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A client's signing key, made for the test.
pub enum Signer {
    /// RS384 for SMART, RS256 as an external issuer would.
    Rsa(RsaKeyPair, &'static str),
    Ec(EcdsaKeyPair),
}

pub struct Key {
    signer: Signer,
    pub kid: String,
}

impl Key {
    pub fn rsa(kid: &str) -> Key {
        Key::rsa_with(kid, "RS384")
    }

    pub fn rsa_with(kid: &str, alg: &'static str) -> Key {
        let pair = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
        Key {
            signer: Signer::Rsa(pair, alg),
            kid: kid.into(),
        }
    }

    pub fn ec(kid: &str) -> Key {
        let pair = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING).unwrap();
        Key {
            signer: Signer::Ec(pair),
            kid: kid.into(),
        }
    }

    pub fn alg(&self) -> &'static str {
        match &self.signer {
            Signer::Rsa(_, alg) => alg,
            Signer::Ec(_) => "ES384",
        }
    }

    pub fn jwk(&self) -> Value {
        match &self.signer {
            Signer::Rsa(pair, alg) => {
                let c = PublicKeyComponents::<Vec<u8>>::from(pair.public_key());
                json!({"kty": "RSA", "kid": self.kid, "alg": alg, "use": "sig",
                       "n": b64(&c.n), "e": b64(&c.e)})
            }
            Signer::Ec(pair) => {
                // Uncompressed point: 0x04 || x || y.
                let point = pair.public_key().as_ref();
                json!({"kty": "EC", "kid": self.kid, "crv": "P-384", "alg": "ES384", "use": "sig",
                       "x": b64(&point[1..49]), "y": b64(&point[49..97])})
            }
        }
    }

    /// The private key as PKCS#8 PEM (what a client keeps in its key file).
    pub fn private_pem(&self) -> String {
        use aws_lc_rs::encoding::AsDer;
        use base64::engine::general_purpose::STANDARD;
        let der: Vec<u8> = match &self.signer {
            Signer::Rsa(pair, _) => {
                let der: aws_lc_rs::encoding::Pkcs8V1Der = pair.as_der().unwrap();
                der.as_ref().to_vec()
            }
            Signer::Ec(pair) => pair.to_pkcs8v1().unwrap().as_ref().to_vec(),
        };
        let body = STANDARD.encode(der);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            lines.join("\n")
        )
    }

    /// A compact JWS of `claims`, with this key's alg and kid unless `header` says otherwise.
    pub fn sign(&self, claims: &Value, header: Option<Value>) -> String {
        let header =
            header.unwrap_or_else(|| json!({"alg": self.alg(), "kid": self.kid, "typ": "JWT"}));
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let rng = SystemRandom::new();
        let signature = match &self.signer {
            Signer::Rsa(pair, alg) => {
                let padding = if *alg == "RS256" {
                    &RSA_PKCS1_SHA256
                } else {
                    &RSA_PKCS1_SHA384
                };
                let mut sig = vec![0; pair.public_modulus_len()];
                pair.sign(padding, &rng, input.as_bytes(), &mut sig)
                    .unwrap();
                sig
            }
            Signer::Ec(pair) => pair.sign(&rng, input.as_bytes()).unwrap().as_ref().to_vec(),
        };
        format!("{input}.{}", b64(&signature))
    }
}

pub fn jwks(keys: &[&Key]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}).to_string()
}
