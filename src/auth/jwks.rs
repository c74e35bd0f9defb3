//! JSON Web Key Sets: inline, or fetched from a URL and cached (refetched when a token names a
//! key the cache does not hold, at most every `REFETCH_AFTER`).

use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use tokio::sync::Mutex;

/// Keys rotate: a cached set is refreshed after this long anyway.
const MAX_AGE: Duration = Duration::from_secs(3600);
/// An unknown `kid` refetches the set, but not more often than this.
const REFETCH_AFTER: Duration = Duration::from_secs(10);

pub enum KeySource {
    Inline(JwkSet),
    Remote {
        url: String,
        cache: Mutex<Option<(Instant, JwkSet)>>,
    },
}

impl KeySource {
    pub fn inline(jwks: &str) -> anyhow::Result<KeySource> {
        let set: JwkSet = serde_json::from_str(jwks)
            .map_err(|e| anyhow::anyhow!("not a JWK Set ({{\"keys\": [...]}}): {e}"))?;
        Ok(KeySource::Inline(set))
    }

    pub fn remote(url: &str) -> KeySource {
        KeySource::Remote {
            url: url.to_string(),
            cache: Mutex::new(None),
        }
    }

    /// The key named `kid`. Errors are for the server log (an unreachable JWKS URL); a missing
    /// key is `Ok(None)`.
    pub async fn find(&self, http: &reqwest::Client, kid: &str) -> anyhow::Result<Option<Jwk>> {
        match self {
            KeySource::Inline(set) => Ok(set.find(kid).cloned()),
            KeySource::Remote { url, cache } => {
                let mut cache = cache.lock().await;
                let fresh = cache.as_ref().is_some_and(|(at, _)| at.elapsed() < MAX_AGE);
                if fresh
                    && let Some((at, set)) = cache.as_ref()
                    && (set.find(kid).is_some() || at.elapsed() < REFETCH_AFTER)
                {
                    return Ok(set.find(kid).cloned());
                }
                let set = fetch(http, url).await?;
                let key = set.find(kid).cloned();
                *cache = Some((Instant::now(), set));
                Ok(key)
            }
        }
    }
}

async fn fetch(http: &reqwest::Client, url: &str) -> anyhow::Result<JwkSet> {
    let response = http.get(url).send().await?.error_for_status()?;
    Ok(response.json().await?)
}
