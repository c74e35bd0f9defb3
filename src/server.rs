//! The composition root: the database pools, the storage, auth and the API's state built from
//! the configuration, then the API and the export workers run until shutdown.

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    auth,
    config::{self, Config},
    db::{self, Pools},
    export,
    http::{self, AppState},
    liveness::Liveness,
    metrics, storage, worker,
};

/// A server bound to its address, ready to run.
pub struct Server {
    listener: TcpListener,
    /// `server.metrics_listen`, bound.
    metrics_listener: Option<TcpListener>,
    state: AppState,
    pools: Pools,
}

impl Server {
    /// Connects to the database (creating it if missing), applies migrations and binds.
    pub async fn build(config: Config) -> anyhow::Result<Server> {
        refuse_open_api(&config)?;
        let workers = u32::try_from(config.export.workers).unwrap_or(u32::MAX);
        let pools = Pools::connect(
            &config.database.url,
            &config.database.read_url,
            config.max_connections(),
            workers,
        )
        .await?;
        db::migrate(&pools.primary).await?;
        let listener = TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("binding {}", config.server.listen))?;
        let metrics_listener = match config.server.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr} (server.metrics_listen)"))?,
            ),
            None => None,
        };
        let local_addr = listener.local_addr()?;
        let base_url = if config.server.public_url.is_empty() {
            format!("http://{local_addr}")
        } else {
            config.public_url()
        };
        let storage = storage::from_config(&config.storage)?;
        storage
            .check()
            .await
            .context("the export storage is not usable")?;
        if config.export.output_urls == config::OutputUrls::Sas {
            // Signing needs an account key or Entra ID: find out now, not at the first manifest.
            let probe = ["probe".to_string()];
            storage
                .direct_urls("probe", &probe, true, chrono::Utc::now())
                .await
                .context("export.output_urls = sas")?;
        }
        let auth = auth::Auth::new(&config.auth, &base_url).context("auth")?;
        let liveness = Liveness::new(
            config.export.workers,
            config.stale_after(),
            std::time::Duration::from_millis(config.export.poll_interval_ms),
        );
        let (config, base_url): (Arc<Config>, Arc<str>) = (Arc::new(config), base_url.into());
        let exports = export::Exporter {
            pool: pools.primary.clone(),
            storage: storage.clone(),
            config: config.clone(),
            base_url: base_url.clone(),
            auth_mode: auth.mode(),
            url_signer: Arc::new(export::signed_urls::UrlSigner::shared(&pools.primary).await?),
        };
        let state = AppState {
            pool: pools.primary.clone(),
            config,
            storage,
            base_url,
            auth: Arc::new(auth),
            liveness: Arc::new(liveness),
            storage_health: Arc::default(),
            gauges: metrics::Gauges::new(&pools),
            vacuum: Arc::new(db::deferred_vacuum::DeferredVacuum::start(
                pools.primary.clone(),
            )),
            database: Arc::default(),
            exports,
        };
        Ok(Server {
            listener,
            metrics_listener,
            state,
            pools,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.state.base_url
    }

    /// Serves and runs the export workers until `shutdown` is cancelled, then finishes
    /// in-flight requests and gives running tasks back to the queue.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Server {
            listener,
            metrics_listener,
            state,
            pools,
        } = self;
        metrics::handle();
        tokio::spawn(metrics::upkeep(shutdown.clone()));
        let watched = db::connect_options(&state.config.database.url)?;
        let (database, stop) = (state.database.clone(), shutdown.clone());
        tokio::spawn(async move { database.watch(watched, stop).await });
        if let Some(listener) = metrics_listener {
            let router = http::metrics::scrape_router(state.gauges.clone());
            let (config, shutdown) = (state.config.server.clone(), shutdown.clone());
            tokio::spawn(
                async move { http::serve::serve(listener, router, &config, shutdown).await },
            );
        }
        tracing::info!(base_url = %state.base_url, workers = state.config.export.workers, "serving");
        let context = worker::Context::new(
            pools,
            state.storage.clone(),
            state.config.clone(),
            state.base_url.to_string(),
            state.liveness.clone(),
        );
        let mut workers = worker::spawn(context, shutdown.clone());
        let server_config = state.config.server.clone();
        let router = http::router(state);
        http::serve::serve(listener, router, &server_config, shutdown.clone()).await;
        shutdown.cancel();
        while workers.join_next().await.is_some() {}
        Ok(())
    }
}

/// Without auth, the API lets anyone who reaches it read and write everything: only on a
/// loopback address, unless the operator says that is intended.
fn refuse_open_api(config: &Config) -> anyhow::Result<()> {
    let open = config.auth.mode == auth::config::AuthMode::None && !config.auth.allow_anonymous;
    if open && !config.server.listen.ip().is_loopback() {
        anyhow::bail!(
            "refusing to listen on {} with auth.mode = none: anyone who can reach it could read \
             and write every resource. Listen on a loopback address, set auth.mode to smart or \
             external, or set auth.allow_anonymous = true (FHIR_EXPORT_ALLOW_ANONYMOUS=true) if an \
             open API is intended",
            config.server.listen
        );
    }
    Ok(())
}
