//! Garbage collection: keep what a registered lock file or one of the most recent
//! runs references, drop the rest.
//!
//! Roots are the lock files registered under `roots/` (every manifest run
//! against a cache registers its lock file, so a cache shared by several
//! checkouts is collected safely) and the keys of the `keep_runs` newest run
//! records (a run records each stage as it finishes, so the results of a run
//! that was killed half-way are roots too). From each live key, its action
//! entry, its input and output artifacts, their objects and materialized folders
//! stay. `gc` holds the cache's `gc.lock` exclusively, so it never runs beside a
//! `swift run`.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::action::ActionEntry;
use crate::digest::{ContentDigest, StageKey};
use crate::lockfile::LockFile;
use crate::store::{read_dir_sorted, remove_tree, Store};

/// Scratch areas of stages not kept are removed once untouched this long (they
/// may hold an interrupted stage's checkpoints); parts no kept entry lists are
/// kept this long too.
const SCRATCH_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);

/// What a collection removed and kept.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GcReport {
    /// Action entries kept.
    pub kept_actions: usize,
    /// Action entries removed (unreadable ones included).
    pub removed_actions: usize,
    /// Objects removed.
    pub removed_objects: usize,
    /// Bytes those objects held.
    pub freed_bytes: u64,
    /// Lock-file roots dropped because the lock file no longer exists.
    pub dropped_roots: usize,
}

/// Why a collection could not run.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// A `swift run` holds the cache.
    #[error("a swift run is using this cache ({0}); run gc again when it has finished")]
    Busy(String),
    /// A registered lock file exists but cannot be read: collecting now could
    /// delete what it pins.
    #[error("{0}; fix or delete that lock file, then run gc again")]
    UnreadableRoot(String),
    /// Reading or deleting failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Collects the cache.
pub fn collect(store: &Store, keep_runs: usize) -> Result<GcReport, GcError> {
    let Some(_guard) = store.maintenance_guard()? else {
        return Err(GcError::Busy(store.root().display().to_string()));
    };
    let mut report = GcReport::default();
    let mut live_keys: HashSet<StageKey> = HashSet::new();
    for root in read_dir_sorted(&store.root().join("roots"))? {
        if is_temp(&root) {
            fs::remove_file(&root)?;
            continue;
        }
        if root.extension().is_some_and(|e| e == "keys") {
            continue; // read with its lock file's root below
        }
        let lock_path = fs::read_to_string(&root)?;
        let machine_keys = root.with_extension("keys");
        match LockFile::read(Path::new(&lock_path)) {
            Ok(Some(lock)) => {
                live_keys.extend(lock.stages.values().filter_map(|s| s.key));
                live_keys.extend(crate::roots::read_keys(&machine_keys)?.into_values());
            }
            Ok(None) => {
                fs::remove_file(&root)?;
                let _ = fs::remove_file(&machine_keys);
                report.dropped_roots += 1;
            }
            Err(e) => return Err(GcError::UnreadableRoot(e.to_string())),
        }
    }
    let runs = store.runs()?;
    for run in runs.iter().rev().take(keep_runs) {
        live_keys.extend(run.stages.iter().filter_map(|s| s.key));
    }

    let scan = store.actions()?;
    // Parts cached inside a kept stage live as long as it does.
    let mut pending: Vec<StageKey> = live_keys.iter().copied().collect();
    while let Some(key) = pending.pop() {
        for part in scan.entries.get(&key).map(|e| e.parts.as_slice()).unwrap_or_default() {
            if live_keys.insert(*part) {
                pending.push(*part);
            }
        }
    }
    for file in &scan.unreadable {
        fs::remove_file(file)?;
        report.removed_actions += 1;
    }
    let mut live_objects: HashSet<ContentDigest> = HashSet::new();
    let mut live_materialized: HashSet<String> = HashSet::new();
    let now = SystemTime::now();
    for (key, entry) in scan.entries {
        if !live_keys.contains(&key) && !is_recent_part(&entry, now) {
            store.remove_action(&key)?;
            report.removed_actions += 1;
            continue;
        }
        report.kept_actions += 1;
        for artifact in entry.inputs.values().chain(entry.outputs.values()) {
            live_materialized.insert(artifact.digest().to_hex());
            // An input that was a local folder never had its listing stored:
            // nothing to keep for it beyond its files, which a download stage's
            // output (the same artifact) keeps.
            if let Ok(objects) = store.objects_of(artifact) {
                live_objects.extend(objects);
            }
        }
    }

    for dir in read_dir_sorted(&store.root().join("m"))? {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        if !live_materialized.contains(&name) {
            remove_tree(&dir)?;
        }
    }
    for shard in read_dir_sorted(&store.root().join("objects"))? {
        let prefix = shard.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        for object in read_dir_sorted(&shard)? {
            let rest = object.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let live = format!("{prefix}{rest}").parse::<ContentDigest>().is_ok_and(|d| live_objects.contains(&d));
            if !live {
                report.freed_bytes += fs::metadata(&object).map(|m| m.len()).unwrap_or(0);
                fs::remove_file(&object)?;
                report.removed_objects += 1;
            }
        }
    }
    for scratch in read_dir_sorted(&store.root().join("scratch"))? {
        let hex = scratch.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let kept = hex.parse::<StageKey>().is_ok_and(|k| live_keys.contains(&k));
        let idle = newest_mtime(&scratch).and_then(|t| now.duration_since(t).ok()).is_some_and(|age| age > SCRATCH_GRACE);
        if !kept && idle {
            remove_tree(&scratch)?;
        }
    }
    // The Slurm executor's run folders, job logs and job results, once idle
    // as long as scratch folders may be.
    for folder in ["runs", "logs", "results"] {
        for item in read_dir_sorted(&store.root().join("slurm").join(folder))? {
            if newest_mtime(&item).and_then(|t| now.duration_since(t).ok()).is_some_and(|age| age > SCRATCH_GRACE) {
                remove_tree(&item)?;
            }
        }
    }
    // No run holds the cache now, so every temporary file is an orphan.
    for tmp in read_dir_sorted(&store.root().join("tmp"))? {
        remove_tree(&tmp)?;
    }
    for stray in read_dir_sorted(&store.root().join("runs"))?.into_iter().filter(|p| is_temp(p)) {
        fs::remove_file(stray)?;
    }
    Ok(report)
}

/// A part (kind `{stage kind}/{piece}`, see `RunCtx::cached_part`) computed
/// within the grace period: a run that failed after finishing some parts
/// wrote no entry listing them, and its rerun should still find them.
fn is_recent_part(entry: &ActionEntry, now: SystemTime) -> bool {
    let started = UNIX_EPOCH + Duration::from_millis(entry.provenance.started_unix_ms);
    entry.kind.contains('/') && now.duration_since(started).is_ok_and(|age| age < SCRATCH_GRACE)
}

fn is_temp(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(".tmp-"))
}

/// The newest modification time of anything under `path`.
fn newest_mtime(path: &Path) -> Option<SystemTime> {
    let meta = fs::symlink_metadata(path).ok()?;
    let mut newest = meta.modified().ok()?;
    if meta.is_dir() {
        for entry in fs::read_dir(path).ok()?.flatten() {
            if let Some(t) = newest_mtime(&entry.path()) {
                newest = newest.max(t);
            }
        }
    }
    Some(newest)
}
