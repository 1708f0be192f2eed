//! Run records: one JSON file per `swift run` under `runs/`, the history that
//! `swift report` prints and that `swift gc --keep-runs` treats as roots.

use std::fs;
use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::atomic::write_atomic;
use crate::digest::StageKey;
use crate::store::{read_dir_sorted, Store};

/// What one run did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    /// Absolute path of the manifest.
    pub manifest: PathBuf,
    /// Pipeline name.
    pub pipeline: String,
    /// Start, milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    /// Wall time.
    pub seconds: f64,
    /// Whether every selected stage succeeded.
    pub ok: bool,
    /// Stages in topological order.
    pub stages: Vec<RunStageRecord>,
}

/// One stage in a run record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunStageRecord {
    /// Stage name.
    pub name: String,
    /// Stage kind.
    pub kind: String,
    /// `cached`, `ran`, `failed`, `skipped`.
    pub status: String,
    /// Key, when known.
    pub key: Option<StageKey>,
    /// Seconds spent.
    pub seconds: f64,
    /// Metrics the stage reported.
    #[serde(default)]
    pub metrics: serde_json::Map<String, serde_json::Value>,
}

impl Store {
    /// Appends a run record.
    pub fn write_run(&self, record: &RunRecord) -> io::Result<PathBuf> {
        let path = self.root().join("runs").join(format!("{:013}-{}.json", record.started_unix_ms, std::process::id()));
        write_atomic(&path, &serde_json::to_vec_pretty(record).map_err(io::Error::other)?)?;
        Ok(path)
    }

    /// Every run record, oldest first (unreadable ones are skipped).
    pub fn runs(&self) -> io::Result<Vec<RunRecord>> {
        Ok(read_dir_sorted(&self.root().join("runs"))?
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .filter_map(|p| fs::read(&p).ok().and_then(|b| serde_json::from_slice(&b).ok()))
            .collect())
    }
}
