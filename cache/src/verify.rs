//! `swift cache verify`: rehash every object, quarantine corrupt ones, check
//! that every entry's objects exist and that materialized files still hold the
//! right bytes, and drop the action entries (and materialized folders) that
//! relied on anything broken, so the affected stages simply run again.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use rayon::prelude::*;

use crate::artifact::Artifact;
use crate::digest::ContentDigest;
use crate::hash::hash_file;
use crate::store::{read_dir_sorted, remove_tree, Store};

/// What verification found.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    /// Objects rehashed.
    pub objects_checked: usize,
    /// Bytes rehashed.
    pub bytes_checked: u64,
    /// Objects whose bytes no longer match their digest (now in `quarantine/`).
    pub corrupt: Vec<String>,
    /// Objects that entries need but that are gone.
    pub missing: Vec<String>,
    /// Materialized files that differed from their object (their folders were removed
    /// and are rebuilt on next use).
    pub bad_materialized: Vec<String>,
    /// Files under `actions/` that are not readable entries (removed).
    pub unreadable_entries: Vec<String>,
    /// Stage keys whose entries were dropped because they needed a corrupt or missing object.
    pub dropped_actions: Vec<String>,
}

impl VerifyReport {
    /// Whether anything was wrong.
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty() && self.missing.is_empty() && self.bad_materialized.is_empty() && self.unreadable_entries.is_empty()
    }
}

/// Why verification could not run.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A `swift run` holds the cache.
    #[error("a swift run is using this cache ({0}); verify again when it has finished")]
    Busy(String),
    /// Reading or moving failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Verifies the whole store.
pub fn verify(store: &Store) -> Result<VerifyReport, VerifyError> {
    let Some(_guard) = store.maintenance_guard()? else {
        return Err(VerifyError::Busy(store.root().display().to_string()));
    };
    let mut objects: Vec<(ContentDigest, PathBuf)> = Vec::new();
    for shard in read_dir_sorted(&store.root().join("objects"))? {
        let prefix = shard.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        for path in read_dir_sorted(&shard)? {
            let rest = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            // Anything else is a stray temp name, which gc removes.
            if let Ok(digest) = format!("{prefix}{rest}").parse() {
                objects.push((digest, path));
            }
        }
    }
    let checked: Vec<(ContentDigest, PathBuf, u64, bool)> = objects
        .into_par_iter()
        .map(|(digest, path)| {
            let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let ok = hash_file(&path).is_ok_and(|actual| actual == digest);
            (digest, path, size, ok)
        })
        .collect();
    let mut report = VerifyReport { objects_checked: checked.len(), ..Default::default() };
    let quarantine = store.root().join("quarantine");
    let mut broken: HashSet<ContentDigest> = HashSet::new();
    for (digest, path, size, ok) in checked {
        report.bytes_checked += size;
        if !ok {
            fs::create_dir_all(&quarantine)?;
            fs::rename(&path, quarantine.join(digest.to_hex()))?;
            report.corrupt.push(digest.to_hex());
            broken.insert(digest);
        }
    }

    let scan = store.actions()?;
    for file in &scan.unreadable {
        report.unreadable_entries.push(file.display().to_string());
        fs::remove_file(file)?;
    }
    for (key, entry) in scan.entries {
        let mut drop_entry = false;
        for artifact in entry.outputs.values() {
            let needs = match store.objects_of(artifact) {
                Ok(needs) => needs,
                Err(_) => {
                    report.missing.push(artifact.digest().to_hex());
                    vec![artifact.digest()]
                }
            };
            for digest in &needs {
                if !store.has_object(digest) && !broken.contains(digest) {
                    report.missing.push(digest.to_hex());
                    broken.insert(*digest);
                }
            }
            let dir = store.root().join("m").join(artifact.digest().to_hex());
            if needs.iter().any(|d| broken.contains(d)) {
                drop_entry = true;
                remove_tree(&dir)?;
            } else if !materialized_intact(store, artifact)? {
                report.bad_materialized.push(dir.display().to_string());
                remove_tree(&dir)?;
            }
        }
        if drop_entry {
            store.remove_action(&key)?;
            report.dropped_actions.push(key.to_hex());
        }
    }
    report.missing.sort();
    report.missing.dedup();
    Ok(report)
}

/// Whether an artifact's materialized files (if materialized) are its objects'
/// bytes: the same inode as the object (a hard link), or equal content.
fn materialized_intact(store: &Store, artifact: &Artifact) -> io::Result<bool> {
    let path = store.materialized_path(artifact);
    if !path.exists() {
        return Ok(true); // rebuilt on next use
    }
    let files: Vec<(PathBuf, ContentDigest)> = match artifact {
        Artifact::File { digest, .. } => vec![(path, *digest)],
        Artifact::Tree { digest, .. } => {
            store.read_tree(digest)?.entries().iter().map(|e| (path.join(&e.path), e.digest)).collect()
        }
    };
    for (file, digest) in files {
        let (Ok(meta), Ok(object)) = (fs::metadata(&file), fs::metadata(store.object_path(&digest))) else {
            return Ok(false);
        };
        let same_inode = meta.ino() == object.ino() && meta.dev() == object.dev();
        if !same_inode && hash_file(&file).ok() != Some(digest) {
            return Ok(false);
        }
    }
    Ok(true)
}
