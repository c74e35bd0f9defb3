//! Writing resources: version numbers, server timestamps, stamped JSON and compartment
//! membership. Shared by the FHIR REST API, transaction Bundles and `load`.

pub mod text;

use chrono::{DateTime, TimeDelta, Utc};
use rustc_hash::FxHashMap;
use serde_json::{Map, Value};
use sqlx::PgConnection;

use crate::{
    db::resources::{self, CopyRow, CopyWriter, Head, NewVersion, ResourceKey},
    fhir::{
        compartment, instant,
        resource::Template,
        validate::{self, Invalid},
    },
};

/// What a write did.
#[derive(Debug)]
pub struct Written {
    pub version_id: i32,
    pub last_updated: DateTime<Utc>,
    /// No live version existed before (never written, or deleted).
    pub created: bool,
    /// The stored text (`None` for a delete).
    pub body: Option<String>,
}

/// A validated resource, rendered up to its version number and timestamp.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub resource_type: String,
    pub id: String,
    patient_ids: Vec<String>,
    template: Template,
}

impl Prepared {
    /// A resource of `resource_type` stored as `id`, once it is valid R4 (single values of
    /// repeating elements become arrays). `base` is this server's FHIR base: references under
    /// it are local.
    pub fn new(
        resource_type: &str,
        id: &str,
        mut resource: Map<String, Value>,
        base: &str,
    ) -> Result<Prepared, Invalid> {
        validate::resource(resource_type, &mut resource)?;
        Ok(Prepared {
            resource_type: resource_type.to_string(),
            id: id.to_string(),
            patient_ids: compartment::patient_ids(resource_type, id, &resource, base),
            template: Template::new(resource, id),
        })
    }

    fn key_ref(&self) -> (&str, &str) {
        (&self.resource_type, &self.id)
    }

    #[cfg(test)]
    pub fn stored_text(&self, version_id: i32, last_updated: &str) -> String {
        self.template.fill(version_id, last_updated)
    }

    #[cfg(test)]
    pub fn patient_ids(&self) -> &[String] {
        &self.patient_ids
    }
}

/// Why a single write was refused.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// `If-Match` named another version than the current one (`None`: there is none).
    #[error("If-Match expected version {expected}, the current version is {current:?}")]
    VersionMismatch { expected: i32, current: Option<i32> },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

fn check_version(if_match: Option<i32>, current: Option<&Head>) -> Result<(), WriteError> {
    match if_match {
        Some(expected) if current.map(|h| h.version_id) != Some(expected) => {
            Err(WriteError::VersionMismatch {
                expected,
                current: current.map(|h| h.version_id),
            })
        }
        _ => Ok(()),
    }
}

/// Creates or updates one resource inside a write transaction (`db::resources::begin_write`).
/// Concurrent writes of the resource queue behind each other and each becomes the next
/// version; with `if_match`, only if the current version is that one.
pub async fn put(
    tx: &mut PgConnection,
    prepared: &Prepared,
    if_match: Option<i32>,
) -> Result<Written, WriteError> {
    loop {
        let current = resources::lock_current(tx, &prepared.resource_type, &prepared.id).await?;
        let head = current.as_ref().map(|c| c.head);
        check_version(if_match, head.as_ref())?;
        let last_updated = resources::next_timestamp(tx, head.map(|h| h.last_updated)).await?;
        let seq = match head {
            Some(h) => h.seq,
            None => resources::next_seqs(tx, 1).await?[0],
        };
        let version_id = head.map_or(1, |h| h.version_id + 1);
        let body = prepared
            .template
            .fill(version_id, &instant::format(last_updated));
        let version = NewVersion {
            resource_type: prepared.resource_type.clone(),
            id: prepared.id.clone(),
            version_id,
            seq,
            last_updated,
            is_current: true,
            patient_ids: prepared.patient_ids.clone(),
            body: Some(body),
        };
        if !replace_current(tx, current.map(|c| c.address), &version).await? {
            continue; // created concurrently: it is an update now
        }
        return Ok(Written {
            version_id,
            last_updated,
            created: head.is_none_or(|h| h.deleted),
            body: version.body,
        });
    }
}

/// The version `put_many` gave one appearance of a resource.
#[derive(Debug, Clone, Copy)]
pub struct Stamped {
    pub version_id: i32,
    pub last_updated: DateTime<Utc>,
    /// No live version existed before this one.
    pub created: bool,
}

/// Creates or updates many resources in one write transaction with a single COPY. A resource
/// that appears several times gets one version per appearance; the last one is current.
/// `assume_new` skips looking up current versions: a resource that has one then collides on
/// the primary key, and the transaction must be rolled back. The current rows are locked in
/// the order of their keys, so that two such writes lock what they share in the same order.
/// A resource created or retired by a concurrent writer meanwhile collides on the primary key
/// too (`resources::is_version_collision`): nothing was written, and the batch can run again.
/// Returns the version of each appearance, in the batch's order.
pub async fn put_many(
    tx: &mut PgConnection,
    batch: &[Prepared],
    assume_new: bool,
) -> sqlx::Result<Vec<Stamped>> {
    let keys = batch.iter().map(Prepared::key_ref).collect();
    let mut puts = PutMany::start(tx, keys, assume_new).await?;
    let mut stamps = Vec::with_capacity(batch.len());
    for prepared in batch {
        stamps.push(puts.put(prepared).await?);
    }
    puts.finish().await?;
    Ok(stamps)
}

/// `put_many` for a batch whose resources are still being prepared: its keys first (the
/// current rows are locked then), its resources as they come, in the keys' order.
pub struct PutMany<'c, 'k> {
    /// The batch's keys in its order; they borrow the caller's, not each resource.
    keys: Vec<(&'k str, &'k str)>,
    /// Per resource: its last appearance in the batch.
    last_index: FxHashMap<(&'k str, &'k str), usize>,
    /// Per resource: the last version given out so far, or its head before the batch.
    latest: FxHashMap<(&'k str, &'k str), Head>,
    fresh_seqs: std::vec::IntoIter<i64>,
    base: DateTime<Utc>,
    copy: CopyWriter<'c>,
    next: usize,
}

impl<'c, 'k> PutMany<'c, 'k> {
    pub async fn start(
        tx: &'c mut PgConnection,
        keys: Vec<(&'k str, &'k str)>,
        assume_new: bool,
    ) -> sqlx::Result<PutMany<'c, 'k>> {
        let mut last_index: FxHashMap<(&str, &str), usize> =
            FxHashMap::with_capacity_and_hasher(keys.len(), Default::default());
        for (i, key) in keys.iter().enumerate() {
            last_index.insert(*key, i);
        }
        let heads = if assume_new {
            Default::default()
        } else {
            let mut owned: Vec<ResourceKey> = last_index
                .keys()
                .map(|(t, id)| (t.to_string(), id.to_string()))
                .collect();
            owned.sort_unstable();
            resources::lock_current_many(tx, &owned).await?
        };
        let fresh_seqs = resources::next_seqs(tx, last_index.len() - heads.len())
            .await?
            .into_iter();
        let base = resources::next_timestamp(tx, None).await?;
        // Every resource of the batch ends up here, so it is sized for all of them at once.
        let mut latest: FxHashMap<(&str, &str), Head> =
            FxHashMap::with_capacity_and_hasher(last_index.len(), Default::default());
        let mut rows = Vec::with_capacity(heads.len());
        for ((resource_type, id), (head, row)) in heads {
            if let Some(&i) = last_index.get(&(resource_type.as_str(), id.as_str())) {
                latest.insert(keys[i], head);
            }
            rows.push(row);
        }
        resources::retire_rows(tx, &rows).await?;
        Ok(PutMany {
            keys,
            last_index,
            latest,
            fresh_seqs,
            base,
            copy: CopyWriter::start(tx, false).await?,
            next: 0,
        })
    }

    /// Writes the batch's next appearance, whose key is the next of `start`'s keys.
    pub async fn put(&mut self, prepared: &Prepared) -> sqlx::Result<Stamped> {
        let i = self.next;
        let key = self.keys[i];
        debug_assert_eq!(key, prepared.key_ref(), "resources come in the keys' order");
        self.next += 1;
        let own_clock = self.base + TimeDelta::microseconds(i as i64);
        let (seq, version_id, last_updated, created) = match self.latest.get(&key) {
            Some(head) => (
                head.seq,
                head.version_id + 1,
                own_clock.max(head.last_updated + TimeDelta::microseconds(1)),
                head.deleted,
            ),
            None => (
                self.fresh_seqs.next().expect("one seq per new resource"),
                1,
                own_clock,
                true,
            ),
        };
        let (version_text, time_text) = (version_id.to_string(), instant::format(last_updated));
        self.copy
            .row(&CopyRow {
                resource_type: &prepared.resource_type,
                id: &prepared.id,
                version_id,
                seq,
                last_updated,
                is_current: self.last_index[&key] == i,
                patient_ids: &prepared.patient_ids,
                body: Some(prepared.template.pieces(&version_text, &time_text)),
            })
            .await?;
        let given = Head {
            version_id,
            seq,
            last_updated,
            deleted: false,
        };
        self.latest.insert(key, given);
        Ok(Stamped {
            version_id,
            last_updated,
            created,
        })
    }

    pub async fn finish(self) -> sqlx::Result<()> {
        debug_assert_eq!(self.next, self.keys.len(), "every key was written");
        self.copy.finish().await
    }

    /// Gives up: nothing of the batch is written (see `CopyWriter::abort`).
    pub async fn abort(self, why: &str) -> sqlx::Result<()> {
        self.copy.abort(why).await
    }
}

/// Writes a batch as first versions into the COPY of a bulk load (`db::bulk`): each resource
/// takes the next number from `next_seq` and a timestamp from `clock` on, a microsecond apart.
/// Whether each is new indeed is settled when the bulk load builds its primary key. Returns
/// the last timestamp given out.
pub async fn copy_first_versions(
    copy: &mut CopyWriter<'_>,
    batch: &[Prepared],
    next_seq: &mut i64,
    clock: DateTime<Utc>,
) -> sqlx::Result<DateTime<Utc>> {
    let mut last_updated = clock;
    for (i, prepared) in batch.iter().enumerate() {
        last_updated = clock + TimeDelta::microseconds(i as i64);
        let time_text = instant::format(last_updated);
        copy.row(&CopyRow {
            resource_type: &prepared.resource_type,
            id: &prepared.id,
            version_id: 1,
            seq: *next_seq,
            last_updated,
            is_current: true,
            patient_ids: &prepared.patient_ids,
            body: Some(prepared.template.pieces("1", &time_text)),
        })
        .await?;
        *next_seq += 1;
    }
    Ok(last_updated)
}

/// Deletes a resource (adds a tombstone version). `None` when there was nothing live to
/// delete. With `if_match`, only if the current version is that one.
pub async fn delete(
    tx: &mut PgConnection,
    resource_type: &str,
    id: &str,
    if_match: Option<i32>,
) -> Result<Option<Written>, WriteError> {
    loop {
        let current = resources::lock_current(tx, resource_type, id).await?;
        check_version(if_match, current.as_ref().map(|c| &c.head))?;
        let Some(current) = current else {
            return Ok(None);
        };
        let head = current.head;
        if head.deleted {
            return Ok(None);
        }
        let last_updated = resources::next_timestamp(tx, Some(head.last_updated)).await?;
        // The tombstone keeps the compartments of what it deletes, so Patient and Group exports
        // can list the deletion.
        let tombstone = NewVersion {
            resource_type: resource_type.to_string(),
            id: id.to_string(),
            version_id: head.version_id + 1,
            seq: head.seq,
            last_updated,
            is_current: true,
            patient_ids: current.patient_ids,
            body: None,
        };
        if !replace_current(tx, Some(current.address), &tombstone).await? {
            continue;
        }
        return Ok(Some(Written {
            version_id: tombstone.version_id,
            last_updated,
            created: false,
            body: None,
        }));
    }
}

/// Inserts the successor of the locked current row (if any), then retires that row. `false`:
/// the version exists already (a concurrent first write); nothing was changed.
async fn replace_current(
    tx: &mut PgConnection,
    current: Option<String>,
    version: &NewVersion,
) -> sqlx::Result<bool> {
    if !resources::insert_version(tx, version).await? {
        return Ok(false);
    }
    if let Some(address) = current {
        resources::retire_rows(tx, &[address]).await?;
    }
    Ok(true)
}
