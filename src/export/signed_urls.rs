//! Short-lived file links (`export.output_urls = "signed"`): the server's own download URLs
//! with an expiry and an HMAC-SHA256 signature over the job, the file and the expiry, which
//! open without a token (the manifest says `requiresAccessToken: false`, Bulk Data STU3). The
//! key is shared by every replica through the database.

use aws_lc_rs::hmac;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use uuid::Uuid;

use crate::db::secrets;

/// Signs and checks file links.
pub struct UrlSigner {
    key: hmac::Key,
}

impl UrlSigner {
    /// The signer with the replicas' shared key (made on first use).
    pub async fn shared(pool: &sqlx::PgPool) -> anyhow::Result<UrlSigner> {
        let mut fresh = [0u8; 32];
        aws_lc_rs::rand::fill(&mut fresh)
            .map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
        let secret = secrets::get_or_create(pool, "file-urls", &fresh).await?;
        Ok(UrlSigner::new(&secret))
    }

    pub fn new(secret: &[u8]) -> UrlSigner {
        UrlSigner {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    fn message(job: Uuid, file: &str, expires: i64) -> String {
        format!("{job}/{file}\n{expires}")
    }

    /// The signature of the link to `file` of `job` that expires at `expires` (Unix seconds).
    pub fn sign(&self, job: Uuid, file: &str, expires: i64) -> String {
        let tag = hmac::sign(&self.key, Self::message(job, file, expires).as_bytes());
        URL_SAFE_NO_PAD.encode(tag.as_ref())
    }

    /// Whether `signature` is this server's for the link (in constant time).
    pub fn verify(&self, job: Uuid, file: &str, expires: i64, signature: &str) -> bool {
        let Ok(tag) = URL_SAFE_NO_PAD.decode(signature) else {
            return false;
        };
        hmac::verify(
            &self.key,
            Self::message(job, file, expires).as_bytes(),
            &tag,
        )
        .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_holds_for_its_job_file_and_expiry_only() {
        let signer = UrlSigner::new(&[7; 32]);
        let job = Uuid::new_v4();
        let signature = signer.sign(job, "Patient-1.ndjson", 1_000);
        assert!(signer.verify(job, "Patient-1.ndjson", 1_000, &signature));
        assert!(!signer.verify(job, "Patient-2.ndjson", 1_000, &signature));
        assert!(!signer.verify(job, "Patient-1.ndjson", 1_001, &signature));
        assert!(!signer.verify(Uuid::new_v4(), "Patient-1.ndjson", 1_000, &signature));
        assert!(!UrlSigner::new(&[8; 32]).verify(job, "Patient-1.ndjson", 1_000, &signature));
        assert!(!signer.verify(job, "Patient-1.ndjson", 1_000, "not base64!"));
    }
}
