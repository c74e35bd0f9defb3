use std::path::PathBuf;

use clap::{Parser, Subcommand};
use fhir_export::{config::Config, fetch, generate, load, telemetry};

#[derive(Parser)]
#[command(name = "fhir-export", version, about = "FHIR R4 bulk-export server")]
struct Cli {
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
    /// Load FHIR resources from .ndjson / .json files (optionally .gz) and directories.
    Load(load::LoadArgs),
    /// Write a deterministic synthetic R4 data set as ndjson.
    Generate(generate::GenerateArgs),
    /// Run a bulk export on a server and download its files (resumable).
    Fetch(Box<fetch::FetchArgs>),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(cli.config.as_deref())?;
    telemetry::init(config.log.format);
    match cli.command {
        Command::Serve => fhir_export::serve(config).await,
        Command::Migrate => fhir_export::migrate(&config).await,
        Command::Load(args) => load::run(&config, args).await,
        Command::Generate(args) => generate::run(args),
        Command::Fetch(args) => fetch::run(*args).await,
    }
}
