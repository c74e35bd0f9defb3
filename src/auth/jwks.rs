//! JSON Web Key Sets: inline, or fetched from a URL (given, or found through the issuer's OpenID
//! configuration) and cached.
//!
//! The cache never makes a request wait for another's fetch when it holds keys: a stale set
//! keeps serving while one refresh runs in the background (single flight, outside any lock).
//! A `kid` the cache lacks triggers a refresh at most every `REFETCH_AFTER`; failed fetches back
//! off (up to `MAX_BACKOFF`), so an issuer that is down costs one request now and then, not one
//! per token.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use serde_json::Value;

/// Keys rotate: a cached set is refreshed after this long.
const MAX_AGE: Duration = Duration::from_secs(3600);
/// An unknown `kid` refetches the set, but not more often than this.
const REFETCH_AFTER: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

pub enum KeySource {
    Inline(JwkSet),
    Remote(Arc<RemoteKeys>),
}

/// Where a remote set comes from.
enum Locator {
    Url(String),
    /// `{issuer}/.well-known/openid-configuration` names the `jwks_uri`.
    Issuer(String),
}

type Refresh = Shared<BoxFuture<'static, Result<Arc<JwkSet>, String>>>;

pub struct RemoteKeys {
    locator: Locator,
    http: reqwest::Client,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    keys: Option<(Instant, Arc<JwkSet>)>,
    /// The refresh in flight, if any.
    refreshing: Option<Refresh>,
    /// When the last refresh for an unknown `kid` started.
    unknown_kid_refresh: Option<Instant>,
    /// After a failed fetch: no new one before this, and the pause after the next failure.
    retry_at: Option<Instant>,
    backoff: Duration,
}

impl KeySource {
    pub fn inline(jwks: &str) -> anyhow::Result<KeySource> {
        let set: JwkSet = serde_json::from_str(jwks)
            .map_err(|e| anyhow::anyhow!("not a JWK Set ({{\"keys\": [...]}}): {e}"))?;
        Ok(KeySource::Inline(set))
    }

    /// Keys served at `url`.
    pub fn remote(http: &reqwest::Client, url: &str) -> KeySource {
        KeySource::remote_from(http, Locator::Url(url.to_string()))
    }

    /// The keys an OpenID Connect issuer names in its configuration.
    pub fn of_issuer(http: &reqwest::Client, issuer: &str) -> KeySource {
        KeySource::remote_from(http, Locator::Issuer(issuer.to_string()))
    }

    fn remote_from(http: &reqwest::Client, locator: Locator) -> KeySource {
        KeySource::Remote(Arc::new(RemoteKeys {
            locator,
            http: http.clone(),
            state: Mutex::new(CacheState {
                backoff: FIRST_BACKOFF,
                ..CacheState::default()
            }),
        }))
    }

    /// The key named `kid`. Errors are for the server log (keys that cannot be fetched and none
    /// cached); a key the set does not hold is `Ok(None)`.
    pub async fn find(&self, kid: &str) -> anyhow::Result<Option<Jwk>> {
        match self {
            KeySource::Inline(set) => Ok(set.find(kid).cloned()),
            KeySource::Remote(remote) => remote.find(kid).await,
        }
    }
}

impl RemoteKeys {
    async fn find(self: &Arc<Self>, kid: &str) -> anyhow::Result<Option<Jwk>> {
        let (cached, wait) = {
            let mut state = self.state.lock().expect("not poisoned");
            let now = Instant::now();
            let cached = state.keys.as_ref().map(|(_, set)| set.clone());
            let stale = state
                .keys
                .as_ref()
                .is_none_or(|(at, _)| at.elapsed() >= MAX_AGE);
            let unknown = cached.as_ref().is_some_and(|set| set.find(kid).is_none());
            let may_retry = state.retry_at.is_none_or(|at| now >= at);
            let kid_refresh_due = unknown
                && state
                    .unknown_kid_refresh
                    .is_none_or(|at| at.elapsed() >= REFETCH_AFTER);
            if (stale || kid_refresh_due) && may_retry && state.refreshing.is_none() {
                if kid_refresh_due {
                    state.unknown_kid_refresh = Some(now);
                }
                state.refreshing = Some(self.start_refresh());
            }
            // Wait only when there is nothing to answer from, or for the refresh this unknown
            // kid started; everyone else answers from the cache at once.
            let wait = match (&cached, &state.refreshing) {
                (None, Some(refresh)) => Some(refresh.clone()),
                (Some(_), Some(refresh)) if unknown && kid_refresh_due => Some(refresh.clone()),
                _ => None,
            };
            (cached, wait)
        };
        let set = match (wait, cached) {
            (Some(refresh), cached) => match refresh.await {
                Ok(set) => set,
                Err(e) => match cached {
                    Some(set) => set,
                    None => anyhow::bail!("{e}"),
                },
            },
            (None, Some(set)) => set,
            (None, None) => anyhow::bail!("the keys could not be fetched recently; retrying later"),
        };
        Ok(set.find(kid).cloned())
    }

    /// Fetches in a task of its own (it finishes even if no request waits for it) and records
    /// the outcome in the cache.
    fn start_refresh(self: &Arc<Self>) -> Refresh {
        let this = self.clone();
        let task = tokio::spawn(async move {
            let fetched = this.fetch().await;
            let mut state = this.state.lock().expect("not poisoned");
            state.refreshing = None;
            match fetched {
                Ok(set) => {
                    let set = Arc::new(set);
                    state.keys = Some((Instant::now(), set.clone()));
                    state.retry_at = None;
                    state.backoff = FIRST_BACKOFF;
                    Ok(set)
                }
                Err(e) => {
                    let message = format!("{e:#}");
                    tracing::warn!(error = %message, retry_in = ?state.backoff, "fetching signing keys failed");
                    state.retry_at = Some(Instant::now() + state.backoff);
                    state.backoff = (state.backoff * 2).min(MAX_BACKOFF);
                    Err(message)
                }
            }
        });
        task.map(|joined| joined.unwrap_or_else(|e| Err(e.to_string())))
            .boxed()
            .shared()
    }

    async fn fetch(&self) -> anyhow::Result<JwkSet> {
        let url = match &self.locator {
            Locator::Url(url) => url.clone(),
            Locator::Issuer(issuer) => discover_jwks_uri(&self.http, issuer).await?,
        };
        let response = self.http.get(&url).send().await?.error_for_status()?;
        bounded_json(response, &url).await
    }
}

/// The most a key set or an OpenID configuration may weigh: a few keys are a few KB.
const MAX_DOCUMENT_BYTES: usize = 256 * 1024;

/// A JSON answer read up to `MAX_DOCUMENT_BYTES` (the client's timeout bounds the time): a
/// larger one is refused as it arrives, never held whole.
async fn bounded_json<T: serde::de::DeserializeOwned>(
    mut response: reqwest::Response,
    url: &str,
) -> anyhow::Result<T> {
    let too_large = || anyhow::anyhow!("{url} answered more than {MAX_DOCUMENT_BYTES} bytes");
    if response
        .content_length()
        .is_some_and(|n| n > MAX_DOCUMENT_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(serde_json::from_slice(&body)?)
}

async fn discover_jwks_uri(http: &reqwest::Client, issuer: &str) -> anyhow::Result<String> {
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let response = http.get(&url).send().await?.error_for_status()?;
    let document: Value = bounded_json(response, &url).await?;
    document
        .get("jwks_uri")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("{url} names no jwks_uri"))
}
