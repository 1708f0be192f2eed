//! What a run reports as it goes ([`Reporter`], implemented by the binary) and
//! when it ends ([`RunReport`], printed as the summary table or `--json`).

use std::path::PathBuf;

use indexmap::IndexMap;
use serde::Serialize;
use swift_cache::StageKey;

/// What became of a stage in a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StageStatus {
    /// Its key was in the cache.
    Cached,
    /// It ran and its outputs are stored.
    Ran,
    /// It ran and failed (or was interrupted).
    Failed,
    /// Not selected, or an upstream stage failed.
    Skipped,
    /// A dry run: it would run.
    WouldRun,
    /// `--detach`: its Slurm job waits in the queue.
    Queued,
    /// `--detach`: its Slurm job is running.
    Running,
}

impl StageStatus {
    /// The word used in tables and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            StageStatus::Cached => "cached",
            StageStatus::Ran => "ran",
            StageStatus::Failed => "failed",
            StageStatus::Skipped => "skipped",
            StageStatus::WouldRun => "would-run",
            StageStatus::Queued => "queued",
            StageStatus::Running => "running",
        }
    }
}

/// One stage's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct StageReport {
    /// Stage name.
    pub name: String,
    /// Stage kind.
    pub kind: String,
    /// What happened.
    pub status: StageStatus,
    /// The key, when it could be computed.
    pub key: Option<StageKey>,
    /// Seconds spent running (0 for cached stages).
    pub seconds: f64,
    /// Output name → materialized path in the cache.
    pub outputs: IndexMap<String, PathBuf>,
    /// Metrics the stage reported.
    pub metrics: serde_json::Map<String, serde_json::Value>,
    /// Why it failed or was skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The Slurm job that computes it (Slurm executor, `--detach`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
}

/// A whole run's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// Pipeline name.
    pub pipeline: String,
    /// Whether every selected stage is cached or ran.
    pub ok: bool,
    /// Stages in topological order.
    pub stages: Vec<StageReport>,
    /// Whether Ctrl-C stopped the run.
    #[serde(skip)]
    pub interrupted: bool,
    /// Whether the lock file was rewritten.
    #[serde(skip)]
    pub lock_written: bool,
    /// Wall time of the run.
    #[serde(skip)]
    pub seconds: f64,
    /// What went wrong after the stages settled (the lock file or the run
    /// record could not be written); any makes the run fail.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// Receives events while a pipeline runs. Called from worker threads.
pub trait Reporter: Send + Sync {
    /// A stage started running.
    fn stage_started(&self, stage: &str, kind: &str);
    /// A running stage reported progress.
    fn stage_progress(&self, stage: &str, done: u64, total: u64, message: &str);
    /// A stage finished, was found in the cache, failed or was skipped.
    fn stage_finished(&self, report: &StageReport);
    /// A note about the run as a whole.
    fn note(&self, message: &str);
}

/// A reporter that says nothing (tests, `--json` without logs).
pub struct SilentReporter;

impl Reporter for SilentReporter {
    fn stage_started(&self, _: &str, _: &str) {}
    fn stage_progress(&self, _: &str, _: u64, _: u64, _: &str) {}
    fn stage_finished(&self, _: &StageReport) {}
    fn note(&self, _: &str) {}
}
