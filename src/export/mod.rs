//! The export service, between the HTTP API and the job queue: a kick-off checked and turned
//! into a job, a job's status (its manifest when done), cancel, and the output files. Plain
//! functions over typed inputs and outputs; `http::export` and `http::jobs` only extract
//! requests and write answers, and the workers only run the tasks these jobs are made of.

mod anonymization;
mod error;
pub mod files;
pub mod kick_off;
pub mod manifest;
mod members;
mod pages;
pub mod signed_urls;
pub mod status;

use std::sync::Arc;

use sqlx::PgPool;

pub use error::Error;

use crate::{
    auth::{Principal, config::AuthMode, scopes::Access},
    config::Config,
    storage::Storage,
};

/// What the service works with: the queue's database, the export storage and the settings.
#[derive(Clone)]
pub struct Exporter {
    pub pool: PgPool,
    pub storage: Arc<dyn Storage>,
    pub config: Arc<Config>,
    /// Base of every absolute URL, without a trailing slash.
    pub base_url: Arc<str>,
    /// Whether the API asks for tokens (the manifest's `requiresAccessToken`).
    pub auth_mode: AuthMode,
    /// Signs the short-lived file links of `export.output_urls = "signed"`.
    pub url_signer: Arc<signed_urls::UrlSigner>,
}

/// A 403 unless the caller's scopes allow exporting `resource_type`.
fn require_export(principal: &Principal, resource_type: &str) -> Result<(), Error> {
    match principal.denied(Access::Export, resource_type) {
        None => Ok(()),
        Some(why) => Err(Error::Forbidden(why)),
    }
}
