//! What the Slurm executor keeps in the cache, under `slurm/`, beside the
//! entries its jobs write:
//!
//! | path | what |
//! |---|---|
//! | `runs/RUN/plan.json` | what every job of one `swift run` needs to rebuild the run ([`JobPlan`]) |
//! | `runs/RUN/STAGE.sh` | the batch script of one stage's job |
//! | `logs/STAGE-RECIPE12-JOB.log` | a job's stdout and stderr |
//! | `results/JOB.json` | how a job ended ([`JobResult`]); the action entry stays the truth |
//! | `pipelines/MANIFEST.json` | the last submission of a manifest, for `swift status` ([`Submission`]) |
//! | `shared.json` | written once a probe job proved the compute nodes see this cache |
//! | `submit.lock` | held while a run looks for live jobs and submits, so two runs never submit one stage twice |
//!
//! Every file is written to a temporary name, fsynced and renamed.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use swift_cache::atomic::write_atomic;
use swift_cache::Store;

/// The `slurm/` folder of a cache.
#[derive(Clone, Debug)]
pub struct SlurmDir {
    root: PathBuf,
}

impl SlurmDir {
    /// The folder inside `store` (an absolute path: jobs start elsewhere).
    pub fn of(store: &Store) -> Self {
        let root = store.root().join("slurm");
        Self { root: std::path::absolute(&root).unwrap_or(root) }
    }

    /// Where every run's plan and batch scripts go.
    pub fn runs(&self) -> PathBuf {
        self.root.join("runs")
    }

    /// One run's folder.
    pub fn run_dir(&self, run: &str) -> PathBuf {
        self.runs().join(run)
    }

    /// The log path pattern of a stage's job (`%j` is the job id).
    pub fn log_pattern(&self, stage: &str, recipe12: &str) -> PathBuf {
        self.root.join("logs").join(format!("{stage}-{recipe12}-%j.log"))
    }

    /// Where a job records how it ended.
    pub fn result_path(&self, job: &str) -> PathBuf {
        self.root.join("results").join(format!("{job}.json"))
    }

    /// A job's recorded end, if it wrote one.
    pub fn result(&self, job: &str) -> Option<JobResult> {
        serde_json::from_slice(&std::fs::read(self.result_path(job)).ok()?).ok()
    }

    /// The last submission record of a manifest.
    pub fn submission_path(&self, manifest: &Path) -> PathBuf {
        let id = blake3::hash(manifest.to_string_lossy().as_bytes()).to_hex();
        self.root.join("pipelines").join(format!("{}.json", &id[..32]))
    }

    /// The last submission of a manifest, if any.
    pub fn submission(&self, manifest: &Path) -> Option<Submission> {
        serde_json::from_slice(&std::fs::read(self.submission_path(manifest)).ok()?).ok()
    }

    /// The marker a successful probe leaves.
    pub fn shared_marker(&self) -> PathBuf {
        self.root.join("shared.json")
    }

    /// Where probe jobs write.
    pub fn probe_dir(&self) -> PathBuf {
        self.root.join("probe")
    }

    /// Takes the cache-wide submission lock (released on drop).
    pub fn submit_lock(&self) -> std::io::Result<File> {
        std::fs::create_dir_all(&self.root)?;
        let file = File::options().create(true).truncate(false).write(true).open(self.root.join("submit.lock"))?;
        file.lock()?;
        Ok(file)
    }
}

/// Writes a value as pretty JSON, atomically, creating the folder.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// What a stage's job needs to rebuild the submitting run: the manifest as it
/// was loaded, the revisions it resolved, and the recipe each stage had, so a
/// job whose inputs changed after submission refuses to run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobPlan {
    /// The manifest's absolute path.
    pub manifest: PathBuf,
    /// Its `--set` overrides, in order.
    pub sets: Vec<String>,
    /// Its `--device`.
    pub device: Option<String>,
    /// `--offline`.
    pub offline: bool,
    /// Each stage's resolved upstream revision.
    pub revisions: BTreeMap<String, Option<String>>,
    /// Each submitted stage's recipe (hex).
    pub recipes: BTreeMap<String, String>,
    /// Stages run with `--force`.
    pub forced: Vec<String>,
}

/// How a job ended, as the job itself recorded it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobResult {
    /// The stage.
    pub stage: String,
    /// `ran`, `cached` (another job had stored it) or `failed`.
    pub status: String,
    /// The stage key, once known.
    pub key: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// Seconds the stage ran.
    pub seconds: f64,
}

/// One submitted (or adopted) job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SubmittedJob {
    /// The stage it computes.
    pub stage: String,
    /// Slurm's job id.
    pub job: String,
    /// The job name (`swift-STAGE-RECIPE12`).
    pub name: String,
    /// Its log file.
    pub log: PathBuf,
    /// Whether another `swift run` had submitted it and this run waited on it.
    pub adopted: bool,
}

/// A manifest's last submission.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Submission {
    /// The run's id (its folder under `runs/`).
    pub run: String,
    /// When it was submitted.
    pub submitted_unix_ms: u64,
    /// Its jobs, in run order.
    pub jobs: Vec<SubmittedJob>,
}
