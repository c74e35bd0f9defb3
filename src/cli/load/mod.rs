//! `fhir-export load PATH…`: bulk loading of ndjson and Bundle/resource JSON files (optionally
//! gzipped). One thread reads and prepares resources; into an empty store they go to Postgres
//! in one transaction with one COPY (`db::bulk`), otherwise in batches with one COPY per
//! transaction. Ids in the files are kept, and `urn:uuid:` references are resolved across all
//! files of the run.

mod read;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use chrono::TimeDelta;
use indicatif::{ProgressBar, ProgressStyle};
use rustc_hash::FxHashSet;
use sqlx::PgPool;
use tokio::sync::mpsc;

use self::read::read_all;

use crate::{
    config::Config,
    db::{
        self,
        bulk::{self, BulkLoad, Refused},
    },
    fhir::r4::RESOURCE_TYPES,
    store::{self, Prepared},
};

#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Files (.ndjson, .json, each optionally .gz) and directories (searched recursively).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Report and skip invalid lines or resources instead of stopping at the first one.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Resources per database transaction.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// Database connections writing in parallel (a load into an empty store writes on one).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub writers: u32,
    /// Leave the store open to other readers and writers even when it is empty: write in
    /// batches, each its own transaction, as a load into a store with data always does.
    #[arg(long)]
    pub online: bool,
    /// The server's FHIR base: absolute references under it are to its own resources (for
    /// Patient compartments); others are to other servers. Default: the configured
    /// `server.public_url`.
    #[arg(long)]
    pub base_url: Option<String>,
}

/// What a load did.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub per_type: BTreeMap<String, u64>,
    pub files: usize,
    pub skipped: u64,
    /// Resources that were already in the store (they got a new version).
    pub updated: u64,
    pub elapsed: Duration,
    /// Written into the empty store in one transaction: frozen, indexed and analyzed already.
    pub bulk: bool,
}

impl LoadReport {
    pub fn total(&self) -> u64 {
        self.per_type.values().sum()
    }

    fn count(&mut self, batch: &[Prepared]) {
        for p in batch {
            // Counted per resource: allocate the type's name only the first time it is seen.
            match self.per_type.get_mut(&p.resource_type) {
                Some(n) => *n += 1,
                None => {
                    self.per_type.insert(p.resource_type.clone(), 1);
                }
            }
        }
    }
}

pub async fn run(config: &Config, mut args: LoadArgs) -> anyhow::Result<()> {
    args.base_url.get_or_insert_with(|| config.public_url());
    let files = collect_files(&args.paths)?;
    let pool = db::connect_for_load(&config.database.url, 4).await?;
    db::migrate(&pool).await?;
    let report = load_files(&pool, files, &args).await?;
    // Hint bits and the visibility map are set now rather than by the first export's reads
    // (a bulk load wrote its rows frozen and all-visible).
    let vacuum = Instant::now();
    if !report.bulk {
        db::resources::vacuum(&pool, true).await?;
    }
    let vacuumed_in = vacuum.elapsed();
    println!("{:<28} {:>10}", "resource type", "resources");
    for (resource_type, n) in &report.per_type {
        println!("{resource_type:<28} {n:>10}");
    }
    let secs = report.elapsed.as_secs_f64().max(1e-6);
    println!(
        "loaded {} resources from {} files in {:.1}s ({:.0} resources/s); {} were updates, {} skipped",
        report.total(),
        report.files,
        secs,
        report.total() as f64 / secs,
        report.updated,
        report.skipped
    );
    if report.bulk {
        println!(
            "the store was empty: written in one transaction, rows frozen, indexes built and \
             statistics gathered afterwards (so the first export reads as fast as the next)"
        );
    } else {
        println!(
            "vacuumed and analyzed the store in {:.1}s (so the first export reads as fast as the next)",
            vacuumed_in.as_secs_f64()
        );
    }
    Ok(())
}

/// Every loadable file under `paths`, sorted. Named files must be loadable; directories are
/// searched recursively and files of other kinds in them are passed over.
pub fn collect_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
        if meta.is_dir() {
            walk(path, &mut files)?;
        } else if kind(path).is_some() {
            files.push(path.clone());
        } else {
            bail!(
                "{}: not a .ndjson or .json file (optionally .gz)",
                path.display()
            );
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if kind(&path).is_some() {
            out.push(path);
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ndjson,
    Json,
}

fn kind(path: &Path) -> Option<Kind> {
    let name = path.file_name()?.to_str()?;
    let name = name.strip_suffix(".gz").unwrap_or(name);
    if name.ends_with(".ndjson") {
        Some(Kind::Ndjson)
    } else if name.ends_with(".json") {
        Some(Kind::Json)
    } else {
        None
    }
}

/// Loads `files` into the store.
///
/// One thread reads and prepares resources while the database writes them. Into an empty
/// store (unless `online`), one transaction takes the store, writes every row with one COPY
/// and builds the indexes afterwards (`db::bulk`); if the input holds a resource more than
/// once, that transaction is rolled back and the load starts again the other way. Otherwise
/// `writers` tasks write batches, each on its own connection; a resource always goes to the
/// same writer (by a hash of its type and id), so its versions are written in input order.
pub async fn load_files(
    pool: &PgPool,
    files: Vec<PathBuf>,
    args: &LoadArgs,
) -> anyhow::Result<LoadReport> {
    let started = Instant::now();
    if !args.online {
        match BulkLoad::open(pool).await? {
            Ok(bulk) => match load_bulk(bulk, &files, args).await? {
                Some(report) => {
                    return Ok(LoadReport {
                        elapsed: started.elapsed(),
                        ..report
                    });
                }
                None => tracing::warn!(
                    "a resource comes more than once in the input: loading again, in batches \
                     that give each appearance its own version"
                ),
            },
            Err(Refused::Busy) => tracing::warn!(
                "the store is in use: loading in batches instead of taking it for the load"
            ),
            Err(Refused::NotEmpty) => {}
        }
    }
    let report = load_batched(pool, &files, args).await?;
    Ok(LoadReport {
        elapsed: started.elapsed(),
        ..report
    })
}

/// How a failed bulk load ends: its transaction rolled back.
const LEFT_EMPTY: &str = "load stopped; the store was empty and is left empty";

/// The bulk path (see `load_files`). `None`: a resource came more than once and nothing was
/// written.
async fn load_bulk(
    mut bulk: BulkLoad,
    files: &[PathBuf],
    args: &LoadArgs,
) -> anyhow::Result<Option<LoadReport>> {
    let progress = progress_bar(files);
    let (sender, mut batches) = mpsc::channel::<Vec<Prepared>>(2);
    let writer = {
        let progress = progress.clone();
        async move {
            let mut report = LoadReport::default();
            let (mut next_seq, started_at, started) =
                (bulk.first_seq, bulk.started_at, Instant::now());
            let mut last_updated = started_at - TimeDelta::microseconds(1);
            let mut copy = bulk.copy().await?;
            while let Some(batch) = batches.recv().await {
                // Timestamps follow the database clock as this run's clock advances.
                let clock = (started_at + TimeDelta::from_std(started.elapsed())?)
                    .max(last_updated + TimeDelta::microseconds(1));
                last_updated =
                    store::copy_first_versions(&mut copy, &batch, &mut next_seq, clock).await?;
                report.count(&batch);
                progress.set_message(format!("{} resources", report.total()));
            }
            copy.finish().await?;
            Ok::<_, anyhow::Error>((bulk, report))
        }
    };
    let mut writers = tokio::task::JoinSet::new();
    writers.spawn(writer);
    let (mut written, skipped) = read_into(files, args, &progress, vec![sender], writers)
        .await
        .context(LEFT_EMPTY)?;
    let (bulk, report) = written.pop().expect("one writer");
    match bulk.commit(report.total()).await {
        Ok(()) => Ok(Some(LoadReport {
            files: files.len(),
            skipped,
            bulk: true,
            ..report
        })),
        Err(bulk::Failed::Duplicate) => Ok(None),
        Err(bulk::Failed::Database(e)) => Err(anyhow::Error::new(e).context(LEFT_EMPTY)),
    }
}

/// The batched path (see `load_files`).
async fn load_batched(
    pool: &PgPool,
    files: &[PathBuf],
    args: &LoadArgs,
) -> anyhow::Result<LoadReport> {
    let progress = progress_bar(files);
    let loaded = Arc::new(AtomicU64::new(0));
    // Types with no rows yet: their resources are new unless a concurrent writer or an earlier
    // line of this load created them, which the primary key tells (see `write_batch`).
    let existing = db::resources::types_with_data(pool, RESOURCE_TYPES).await?;
    let empty_types: Arc<FxHashSet<&'static str>> = Arc::new(
        RESOURCE_TYPES
            .iter()
            .copied()
            .filter(|t| !existing.iter().any(|e| e == t))
            .collect(),
    );
    let mut senders = Vec::new();
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..args.writers {
        let (sender, receiver) = mpsc::channel::<Vec<Prepared>>(2);
        senders.push(sender);
        writers.spawn(write_batches(
            pool.clone(),
            empty_types.clone(),
            receiver,
            loaded.clone(),
            progress.clone(),
        ));
    }
    let (parts, skipped) = read_into(files, args, &progress, senders, writers)
        .await
        .with_context(|| {
            format!(
                "load stopped after {} resources",
                loaded.load(Ordering::Relaxed)
            )
        })?;
    let mut report = LoadReport {
        files: files.len(),
        skipped,
        ..LoadReport::default()
    };
    for part in parts {
        report.updated += part.updated;
        for (t, n) in part.per_type {
            *report.per_type.entry(t).or_default() += n;
        }
    }
    Ok(report)
}

fn progress_bar(files: &[PathBuf]) -> ProgressBar {
    let total_bytes = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    ProgressBar::new(total_bytes).with_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}",
        )
        .expect("valid template"),
    )
}

/// Runs the reader thread (`read_all`) into `senders` while `writers` write what it sends;
/// returns what each writer returned and how many resources were skipped, or the error that
/// stopped the load (the reader's before the writers').
async fn read_into<T: Send + 'static>(
    files: &[PathBuf],
    args: &LoadArgs,
    progress: &ProgressBar,
    senders: Vec<mpsc::Sender<Vec<Prepared>>>,
    mut writers: tokio::task::JoinSet<anyhow::Result<T>>,
) -> anyhow::Result<(Vec<T>, u64)> {
    let reader = {
        let (files, args, progress) = (files.to_vec(), args.clone(), progress.clone());
        tokio::task::spawn_blocking(move || read_all(&files, &args, &progress, senders))
    };
    let mut written = Vec::new();
    let mut failure = None;
    while let Some(result) = writers.join_next().await {
        match result.context("a writer task failed")? {
            Ok(output) => written.push(output),
            // The first failure wins; the other writers stop as their channels close.
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    let (skipped, read_error) = reader.await.context("reader thread failed")?;
    progress.finish_and_clear();
    match read_error.or(failure) {
        Some(e) => Err(e),
        None => Ok((written, skipped)),
    }
}

/// One writer: each batch in one transaction with one COPY.
async fn write_batches(
    pool: PgPool,
    empty_types: Arc<FxHashSet<&'static str>>,
    mut batches: mpsc::Receiver<Vec<Prepared>>,
    loaded: Arc<AtomicU64>,
    progress: ProgressBar,
) -> anyhow::Result<LoadReport> {
    let mut report = LoadReport::default();
    let mut assume_new = true;
    while let Some(batch) = batches.recv().await {
        let all_new = assume_new
            && batch
                .iter()
                .all(|p| empty_types.contains(p.resource_type.as_str()));
        let written = write_batch(&pool, &batch, all_new).await?;
        // Once guessing wrong, stop guessing: a file that updates what it created would
        // otherwise pay for every batch twice.
        assume_new &= !written.guessed_wrong;
        report.updated += written.updates as u64;
        report.count(&batch);
        let total = loaded.fetch_add(batch.len() as u64, Ordering::Relaxed) + batch.len() as u64;
        progress.set_message(format!("{total} resources"));
    }
    Ok(report)
}

/// What `write_batch` did.
struct Written {
    updates: usize,
    /// The batch was taken for all new, and was not.
    guessed_wrong: bool,
}

/// Writes one batch in one transaction. `all_new`: the batch's types had no rows when the load
/// began, so it is written without looking up current versions; if one exists after all, the
/// primary key refuses the batch and it is written again the careful way. A batch that collides
/// with a concurrent writer of the same resource (it created the resource first, or retired
/// the row this batch waited for), or that a database blip interrupted, wrote nothing and is
/// tried again.
async fn write_batch(pool: &PgPool, batch: &[Prepared], all_new: bool) -> anyhow::Result<Written> {
    const TRIES: u32 = 10;
    let mut pause = Duration::from_millis(50);
    let mut guessed_wrong = false;
    for attempt in 1.. {
        let assume_new = all_new && !guessed_wrong;
        let result = async {
            let mut tx = db::resources::begin_write(pool).await?;
            let stamps = store::put_many(&mut tx, batch, assume_new).await?;
            let updates = stamps.iter().filter(|s| s.version_id > 1).count();
            tx.commit().await?;
            Ok::<_, sqlx::Error>(updates)
        }
        .await;
        match result {
            Ok(updates) => {
                return Ok(Written {
                    updates,
                    guessed_wrong,
                });
            }
            Err(e) if assume_new && db::resources::is_version_collision(&e) => {
                guessed_wrong = true;
            }
            Err(e)
                if attempt < TRIES
                    && (db::is_transient(&e) || db::resources::is_version_collision(&e)) =>
            {
                tracing::debug!(error = %e, attempt, "batch collided or was interrupted; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!("the loop returns")
}
