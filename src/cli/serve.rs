//! `fhir-export serve`: applies migrations, then runs the API and the export workers.

use tokio_util::sync::CancellationToken;

use crate::{Server, config::Config};

/// Runs until SIGTERM or ctrl-c.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let server = Server::build(config).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    server.run(shutdown).await
}

async fn cancel_on_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down");
    token.cancel();
}
