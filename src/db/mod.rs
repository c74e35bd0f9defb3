//! Everything that speaks SQL: the resource store and the export job queue.

pub mod admin;
pub mod assertions;
pub mod availability;
pub mod blocks;
pub mod bulk;
pub mod copy_out;
pub mod deferred_vacuum;
pub mod jobs;
pub mod notify;
pub mod pages;
pub mod parts;
pub mod resources;
pub mod secrets;
pub mod snapshot;
pub mod tasks;

use std::{str::FromStr, time::Duration};

use anyhow::Context;
use sqlx::{
    ConnectOptions, Connection, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How this server's connections show in `pg_stat_activity`.
const APPLICATION_NAME: &str = "fhir-export";

/// The connections of a server process.
#[derive(Clone)]
pub struct Pools {
    /// The queue, writes, and the API.
    pub primary: PgPool,
    /// Export page reads: one connection per worker, which a worker holds while it streams a
    /// part. Separate, so that a worker holding one never waits for another from the pool it
    /// holds it from (the queue statements it makes meanwhile come from `primary`).
    pub pages: PgPool,
    /// Page reads from a streaming-replication standby (`database.read_url`), when there is one.
    pub standby: Option<PgPool>,
}

impl Pools {
    /// `max_connections` in all on the primary: `workers` page connections, the rest for
    /// `primary`; and `workers` on the standby, if `read_url` names one.
    pub async fn connect(
        url: &str,
        read_url: &str,
        max_connections: u32,
        workers: u32,
    ) -> anyhow::Result<Pools> {
        let primary = connect(url, max_connections - workers).await?;
        let options = page_options(url).context("DATABASE_URL is not a Postgres URL")?;
        let pages = pool_options(workers.max(1)).connect_lazy_with(options);
        let standby = if read_url.is_empty() {
            None
        } else {
            let options = page_options(read_url)
                .context("FHIR_EXPORT_READ_DATABASE_URL is not a Postgres URL")?;
            // Lazily, and quick to give up: a standby that is down must not hold a task long
            // before it reads from the primary instead.
            let pool = pool_options(workers.max(1))
                .acquire_timeout(Duration::from_secs(5))
                .connect_lazy_with(options);
            Some(pool)
        };
        Ok(Pools {
            primary,
            pages,
            standby,
        })
    }
}

/// Options for connections of this server's own to the database at `url`.
pub fn connect_options(url: &str) -> Result<PgConnectOptions, sqlx::Error> {
    Ok(PgConnectOptions::from_str(url)?.application_name(APPLICATION_NAME))
}

/// Page reads: no JIT. A filtered page's cost estimate crosses `jit_above_cost`, and compiling
/// costs more than the whole page takes to read. A page's rows are filtered or de-identified
/// while they stream, so its statement lasts as long as that work: not a slow statement worth
/// a warning (debug level still shows it).
fn page_options(url: &str) -> Result<PgConnectOptions, sqlx::Error> {
    Ok(PgConnectOptions::from_str(url)?
        .application_name(APPLICATION_NAME)
        .options([("jit", "off")])
        .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(1)))
}

fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(30))
}

/// Connects a pool of `max_connections`, creating the database first if it does not exist.
pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    connect_with(url, max_connections, log::LevelFilter::Warn).await
}

/// `connect` for `load`: a bulk load's statements (one COPY of everything, index builds) take
/// minutes by design, so they are not warned about as slow.
pub async fn connect_for_load(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    connect_with(url, max_connections, log::LevelFilter::Debug).await
}

async fn connect_with(
    url: &str,
    max_connections: u32,
    slow_statements: log::LevelFilter,
) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(url)
        .context("DATABASE_URL is not a Postgres URL")?
        .application_name(APPLICATION_NAME)
        .log_slow_statements(slow_statements, Duration::from_secs(1));
    create_database_if_missing(&options).await?;
    pool_options(max_connections)
        .connect_with(options)
        .await
        .with_context(|| format!("connecting to {}", redact(url)))
}

/// A write transaction that lost a deadlock or a serialization conflict: it wrote nothing and
/// can run again.
pub fn is_write_conflict(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "40P01" || code == "40001")
}

/// Errors that go away by themselves: a dropped or refused connection (a restart, a failover),
/// a pool that was briefly exhausted, a serialization failure or deadlock. Worth retrying.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Protocol(_) | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(e) => e.code().is_some_and(|code| {
            code.starts_with("08") // connection exception
                || matches!(
                    code.as_ref(),
                    "57P01" | "57P02" | "57P03" // shutdown, crash, starting up
                        | "40001" | "40P01" // serialization failure, deadlock
                        | "53300" // too many connections
                        | "25006" // read-only: a failover in progress
                )
        }),
        _ => false,
    }
}

async fn create_database_if_missing(options: &PgConnectOptions) -> anyhow::Result<()> {
    let name = options.get_database().unwrap_or("postgres").to_string();
    let admin = options.clone().database("postgres");
    let mut conn = admin
        .connect()
        .await
        .context("connecting to Postgres (is it running? see DATABASE_URL)")?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        // Another process may create it at the same moment; that is fine.
        if let Err(e) = sqlx::query(&format!("CREATE DATABASE {quoted}"))
            .execute(&mut conn)
            .await
        {
            let duplicate = e
                .as_database_error()
                .and_then(|d| d.code())
                .is_some_and(|c| c == "42P04" || c == "23505");
            if !duplicate {
                return Err(e).context(format!("creating database {name}"));
            }
        }
        tracing::info!(database = %name, "created database");
    }
    conn.close().await.ok();
    Ok(())
}

/// Applies pending migrations (idempotent; safe with several replicas starting at once).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR
        .run(pool)
        .await
        .context("running database migrations")
}

/// `text` as Postgres can store it: a NUL (which no `text` value may hold) written as `\0`.
/// For the server's own messages, which may quote what a resource or a client sent.
pub fn storable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        text.replace('\0', "\\0").into()
    } else {
        text.into()
    }
}

/// The URL without its secrets (a password in the user part or in the query), for messages.
pub fn redact(url: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (url, None),
    };
    let mut out = match (head.find("://"), head.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &head[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &head[..scheme + 3], &head[at..]),
                None => head.to_string(),
            }
        }
        _ => head.to_string(),
    };
    if let Some(query) = query {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if is_secret_key(key) => format!("{key}=***"),
                _ => pair.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
    }
    out
}

fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "passfile",
        "sslpassword",
        "sig",
        "secret",
        "key",
        "token",
    ]
    .iter()
    .any(|s| key.contains(s))
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            super::redact("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(super::redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            super::redact("postgres://u@h/db?sslmode=disable&password=hunter2"),
            "postgres://u@h/db?sslmode=disable&password=***"
        );
    }
}
