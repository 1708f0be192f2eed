//! Lock files: `NAME.lock` beside `NAME.toml`, TOML with stages sorted by name so
//! diffs stay small. Records every stage's kind, a digest of its parameters,
//! its resolved upstream revision and its local inputs' digests — what
//! `swift run --locked` enforces — and, where they are the same on every
//! machine, its key and its stage inputs' and outputs' digests.
//!
//! Training, calibration, scoring and weight merging compute in floating
//! point through vectorized, threaded or device kernels, so their outputs
//! differ in the last bits from one CPU or GPU to another, and so do the keys
//! of everything downstream. A lock that recorded those would be rewritten by
//! the first run on another machine (a nightly job committing its lock would
//! see churn every time the machine changed). So the rule is:
//!
//! | recorded for a stage | when |
//! |---|---|
//! | `kind`, `params`, `revision`, local inputs' digests | always (enforced by `--locked`) |
//! | `key`, outputs' digests | the stage and everything upstream of it are portable |
//! | a stage input's digest | its producer and everything upstream of it are portable |
//!
//! Which kinds are portable is each kind's to say (`StageKind::portable`);
//! `download` and `preprocess` are, `finetune`, `quantize`, `eval` and
//! `export` are not. Output digests are recorded, never enforced.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::atomic::write_atomic;
use crate::digest::{ContentDigest, StageKey};

/// The lock file format version.
pub const LOCK_VERSION: u32 = 1;

const HEADER: &str = "# Written by swift. Commit it beside the manifest: `swift run --locked` reproduces this run.\n\
# Stages whose results depend on the machine's floating point (training, calibration, scoring) and\n\
# those downstream of them record no key or output digests, so runs on other machines leave it unchanged.\n\n";

/// A lock file's content.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockFile {
    /// Format version.
    pub version: u32,
    /// The pipeline's name.
    pub pipeline: String,
    /// Stages by name.
    #[serde(default)]
    pub stages: BTreeMap<String, LockedStage>,
}

/// One stage as locked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedStage {
    /// Stage kind.
    pub kind: String,
    /// The stage key, where it is the same on every machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<StageKey>,
    /// Digest of the kind, its version and the resolved parameters.
    pub params: StageKey,
    /// A resolved upstream revision (a Hub commit sha), if the stage has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Input digests by input name (those the same on every machine).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, ContentDigest>,
    /// Output digests by output name (recorded, not enforced; where the same
    /// on every machine).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outputs: BTreeMap<String, ContentDigest>,
}

impl LockFile {
    /// Reads a lock file; `Ok(None)` when there is none.
    pub fn read(path: &Path) -> io::Result<Option<Self>> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        };
        toml::from_str(&text)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: not a valid swift lock file: {e}", path.display())))
    }

    /// The canonical text.
    pub fn render(&self) -> String {
        let body = toml::to_string(self).expect("lock files always serialize");
        format!("{HEADER}{body}")
    }

    /// Writes the lock file only if its text changed; returns whether it did.
    pub fn write_if_changed(&self, path: &Path) -> io::Result<bool> {
        let text = self.render();
        if fs::read_to_string(path).ok().as_deref() == Some(text.as_str()) {
            return Ok(false);
        }
        write_atomic(path, text.as_bytes())?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rewrites_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.lock");
        let mut lock = LockFile { version: LOCK_VERSION, pipeline: "p".into(), stages: BTreeMap::new() };
        lock.stages.insert(
            "data".into(),
            LockedStage {
                kind: "download".into(),
                key: Some(StageKey::of(b"k")),
                params: StageKey::of(b"p"),
                revision: None,
                inputs: [("source".to_string(), ContentDigest::of(b"i"))].into(),
                outputs: [("dataset".to_string(), ContentDigest::of(b"i"))].into(),
            },
        );
        assert!(lock.write_if_changed(&path).unwrap());
        assert!(!lock.write_if_changed(&path).unwrap());
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("[stages.data]"), "{text}");
        assert_eq!(LockFile::read(&path).unwrap(), Some(lock));
    }
}
