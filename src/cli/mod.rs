//! The `fhir-export` commands, one file each: `serve`, `migrate`, `health`, `load`, `generate`,
//! `fetch`.

pub mod fetch;
pub mod generate;
pub mod health;
pub mod load;
pub mod migrate;
pub mod serve;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::{config::Config, telemetry};

#[derive(Parser)]
#[command(name = "fhir-export", version, about = "FHIR R4 bulk-export server")]
pub struct Cli {
    /// TOML configuration file (defaults: config/default.toml documents every key).
    #[arg(long, global = true, env = "FHIR_EXPORT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply pending migrations, then run the API and the export workers.
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Ask a running server's `/health`; exit 0 only when it answers 200 (a container's
    /// health check).
    Health(health::HealthArgs),
    /// Load FHIR resources from .ndjson / .json files (optionally .gz) and directories.
    Load(load::LoadArgs),
    /// Write a deterministic synthetic R4 data set as ndjson.
    Generate(generate::GenerateArgs),
    /// Run a bulk export on a server and download its files (resumable).
    Fetch(Box<fetch::FetchArgs>),
}

impl Cli {
    pub async fn run(self) -> anyhow::Result<()> {
        let config = Config::load(self.config.as_deref())?;
        telemetry::init(config.log.format);
        match self.command {
            Command::Serve => serve::run(config).await,
            Command::Migrate => migrate::run(&config).await,
            Command::Health(args) => health::run(&config, &args).await,
            Command::Load(args) => load::run(&config, args).await,
            Command::Generate(args) => generate::run(args),
            Command::Fetch(args) => fetch::run(*args).await,
        }
    }
}
