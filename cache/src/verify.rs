//! `swift cache verify`: rehash every object, quarantine corrupt ones, and drop
//! the action entries and materialized folders that relied on them so the
//! affected stages simply run again.

use std::fs;
use std::io;
use std::path::PathBuf;

use rayon::prelude::*;

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
    /// Stage keys whose entries were dropped because they needed a corrupt object.
    pub dropped_actions: Vec<String>,
}

/// Rehashes the whole store.
pub fn verify(store: &Store) -> io::Result<VerifyReport> {
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
    let mut corrupt = std::collections::HashSet::new();
    for (digest, path, size, ok) in checked {
        report.bytes_checked += size;
        if !ok {
            fs::create_dir_all(&quarantine)?;
            fs::rename(&path, quarantine.join(digest.to_hex()))?;
            report.corrupt.push(digest.to_hex());
            corrupt.insert(digest);
        }
    }
    if corrupt.is_empty() {
        return Ok(report);
    }
    for (key, entry) in store.actions()? {
        let mut broken = false;
        for artifact in entry.outputs.values() {
            let needs = store.objects_of(artifact).unwrap_or_default();
            if needs.iter().any(|d| corrupt.contains(d)) || needs.is_empty() {
                broken = true;
                remove_tree(&store.root().join("m").join(artifact.digest().to_hex()))?;
            }
        }
        if broken {
            store.remove_action(&key)?;
            report.dropped_actions.push(key.to_hex());
        }
    }
    Ok(report)
}
