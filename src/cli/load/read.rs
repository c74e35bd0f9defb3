//! The reading side of a load: files opened (gzipped or not), ndjson lines and JSON
//! Bundles or resources prepared, and full batches handed to the writers. `urn:uuid:`
//! references are collected across every file first.

use std::{
    collections::HashMap,
    fs::File,
    hash::BuildHasher,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use flate2::read::MultiGzDecoder;
use indicatif::ProgressBar;
use serde_json::Value;
use tokio::sync::mpsc;

use super::{Kind, LoadArgs, kind};
use crate::{
    fhir::resource,
    store::{self, Prepared, text::Identity},
};

/// Reads every file, sending full batches to the writers. An invalid resource ends the run
/// (unless `skip_invalid`): the batches it belongs to are never sent. Returns how many were
/// skipped and the error that ended the run, if any.
pub(super) fn read_all(
    files: &[PathBuf],
    args: &LoadArgs,
    progress: &ProgressBar,
    senders: Vec<mpsc::Sender<Vec<Prepared>>>,
) -> (u64, Option<anyhow::Error>) {
    let targets = collect_urn_targets(files);
    let size = args.batch_size as usize;
    let mut batcher = Batcher {
        batches: senders.iter().map(|_| Vec::with_capacity(size)).collect(),
        senders,
        size,
        skip_invalid: args.skip_invalid,
        skipped: 0,
        targets: &targets,
        base: args.base_url.as_deref().unwrap_or_default(),
    };
    for file in files {
        let result = match kind(file) {
            Some(Kind::Ndjson) => read_ndjson(file, progress, &mut batcher),
            _ => read_json(file, progress, &mut batcher),
        };
        match result {
            Ok(true) => {}
            // A writer stopped: the load failed on the database side, which reports it.
            Ok(false) => return (batcher.skipped, None),
            Err(e) => return (batcher.skipped, Some(e)),
        }
    }
    batcher.flush_all();
    (batcher.skipped, None)
}

struct Batcher<'a> {
    batches: Vec<Vec<Prepared>>,
    senders: Vec<mpsc::Sender<Vec<Prepared>>>,
    size: usize,
    skip_invalid: bool,
    skipped: u64,
    targets: &'a HashMap<String, String>,
    /// This server's FHIR base (see `LoadArgs::base_url`).
    base: &'a str,
}

impl Batcher<'_> {
    /// Adds one resource (as parsed JSON, with its `fullUrl` if any). `Ok(false)` means stop.
    fn push(&mut self, value: Value, full_url: Option<&str>, place: &str) -> anyhow::Result<bool> {
        match prepare(value, full_url, self.targets, self.base) {
            Ok(prepared) => Ok(self.add(prepared)),
            Err(why) => self.skip_or_fail(place, &why).map(|()| true),
        }
    }

    /// Adds a prepared resource to its writer's batch. `false` means stop.
    fn add(&mut self, prepared: Prepared) -> bool {
        let hash = rustc_hash::FxBuildHasher.hash_one((&prepared.resource_type, &prepared.id));
        let writers = u64::try_from(self.senders.len()).expect("a length fits 64 bits");
        let writer = usize::try_from(hash % writers).expect("below a length");
        self.batches[writer].push(prepared);
        self.batches[writer].len() < self.size || self.flush(writer)
    }

    fn flush(&mut self, writer: usize) -> bool {
        let batch = std::mem::replace(&mut self.batches[writer], Vec::with_capacity(self.size));
        batch.is_empty() || self.senders[writer].blocking_send(batch).is_ok()
    }

    fn flush_all(&mut self) {
        for writer in 0..self.senders.len() {
            self.flush(writer);
        }
    }

    fn skip_or_fail(&mut self, place: &str, why: &str) -> anyhow::Result<()> {
        if self.skip_invalid {
            tracing::warn!("{place}: skipped: {why}");
            self.skipped += 1;
            Ok(())
        } else {
            bail!("{place}: {why}")
        }
    }
}

/// Validates a resource, settles its id and resolves `urn:uuid:` references.
fn prepare(
    value: Value,
    full_url: Option<&str>,
    targets: &HashMap<String, String>,
    base: &str,
) -> Result<Prepared, String> {
    let mut value = value;
    if !targets.is_empty() {
        resource::rewrite_references(&mut value, targets);
    }
    let resource = resource::into_resource(value)?;
    let id = match resource::id(&resource) {
        Some(id) => id.to_string(),
        None => id_from_full_url(full_url).unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
    };
    let resource_type = resource::resource_type(&resource).to_string();
    Prepared::new(&resource_type, &id, resource, base).map_err(|invalid| invalid.to_string())
}

/// `urn:uuid:X` → `X`, the id a resource without one takes.
fn id_from_full_url(full_url: Option<&str>) -> Option<String> {
    let uuid = full_url?.strip_prefix("urn:uuid:")?;
    resource::is_valid_id(uuid).then(|| uuid.to_string())
}

fn open(file: &Path, progress: &ProgressBar) -> anyhow::Result<Box<dyn Read>> {
    let raw = File::open(file).with_context(|| format!("{}", file.display()))?;
    let counted = progress.wrap_read(raw);
    let gz = file.extension().is_some_and(|e| e == "gz");
    Ok(if gz {
        Box::new(MultiGzDecoder::new(counted))
    } else {
        Box::new(counted)
    })
}

fn read_ndjson(file: &Path, progress: &ProgressBar, out: &mut Batcher) -> anyhow::Result<bool> {
    let mut reader = BufReader::with_capacity(1 << 20, open(file, progress)?);
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .with_context(|| format!("{}: reading line {}", file.display(), number + 1))?;
        if n == 0 {
            return Ok(true);
        }
        number += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let fast = std::str::from_utf8(&line)
            .ok()
            .and_then(|text| store::text::prepare(text, Identity::Own, out.targets, out.base));
        if let Some(prepared) = fast {
            if !out.add(prepared) {
                return Ok(false);
            }
            continue;
        }
        let place = format!("{}:{number}", file.display());
        match serde_json::from_slice::<Value>(&line) {
            Ok(value) => {
                if !out.push(value, None, &place)? {
                    return Ok(false);
                }
            }
            Err(e) => out.skip_or_fail(&place, &format!("not valid JSON: {e}"))?,
        }
    }
}

fn read_json_value(file: &Path, progress: &ProgressBar) -> anyhow::Result<Value> {
    let mut text = Vec::new();
    open(file, progress)?
        .read_to_end(&mut text)
        .with_context(|| format!("{}", file.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{}: not valid JSON", file.display()))
}

/// A `.json` file: a Bundle (its entries' resources) or a single resource.
fn read_json(file: &Path, progress: &ProgressBar, out: &mut Batcher) -> anyhow::Result<bool> {
    let place = file.display().to_string();
    let value = match read_json_value(file, progress) {
        Ok(v) => v,
        Err(e) => {
            out.skip_or_fail(&place, &format!("{:#}", e.root_cause()))?;
            return Ok(true);
        }
    };
    if value.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return out.push(value, None, &place);
    }
    let Some(Value::Array(entries)) = value.get("entry") else {
        return Ok(true);
    };
    for (i, entry) in entries.iter().enumerate() {
        let place = format!("{place}: entry[{i}]");
        let Some(resource) = entry.get("resource") else {
            out.skip_or_fail(&place, "entry has no resource")?;
            continue;
        };
        let full_url = entry.get("fullUrl").and_then(Value::as_str);
        if !out.push(resource.clone(), full_url, &place)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// First pass over the Bundles: every `urn:uuid:` fullUrl and the `Type/id` it stands for, so
/// references resolve whatever order the files come in.
fn collect_urn_targets(files: &[PathBuf]) -> HashMap<String, String> {
    let mut targets = HashMap::new();
    let hidden = ProgressBar::hidden();
    for file in files.iter().filter(|f| kind(f) == Some(Kind::Json)) {
        let Ok(value) = read_json_value(file, &hidden) else {
            continue; // reported by the second pass
        };
        let Some(Value::Array(entries)) = value.get("entry") else {
            continue;
        };
        for entry in entries {
            let full_url = entry.get("fullUrl").and_then(Value::as_str);
            let Some(url) = full_url.filter(|u| u.starts_with("urn:uuid:")) else {
                continue;
            };
            let Some(Value::Object(r)) = entry.get("resource") else {
                continue;
            };
            let id = resource::id(r)
                .map(str::to_string)
                .or_else(|| id_from_full_url(full_url));
            if let (Some(t), Some(id)) = (r.get("resourceType").and_then(Value::as_str), id) {
                targets.insert(url.to_string(), format!("{t}/{id}"));
            }
        }
    }
    targets
}
