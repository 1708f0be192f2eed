//! Stage kinds: the `Stage` contract between the engine and `swift-stages`.
//!
//! A [`StageKind`] types its parameters and declares its inputs while the
//! pipeline compiles ([`CompileCtx`]), giving a [`StagePlan`]; the executor later
//! calls [`StagePlan::run`] with a [`RunCtx`] when the plan's key misses the cache.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Context;
use indexmap::IndexMap;
use serde::de::DeserializeOwned;
use swift_cache::{ActionEntry, Artifact, StageKey, Store};

use crate::error::ManifestError;
use crate::manifest::Manifest;

/// What an output holds, so references can be checked ("`model` expects a stage
/// that yields a model").
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputType {
    /// A Hugging Face model folder.
    Model,
    /// A data file or folder.
    Dataset,
    /// Packed token shards.
    Tokens,
    /// A PEFT adapter folder.
    Adapter,
    /// A report, log, chart or statistics file.
    Report,
    /// An exported folder.
    Export,
}

impl OutputType {
    /// How the type reads in messages.
    pub fn noun(self) -> &'static str {
        match self {
            OutputType::Model => "a model",
            OutputType::Dataset => "a dataset",
            OutputType::Tokens => "tokens",
            OutputType::Adapter => "an adapter",
            OutputType::Report => "a report",
            OutputType::Export => "an export",
        }
    }
}

/// A named, typed output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutputDecl {
    /// The output's name (`model`, `adapter`, `tokens`).
    pub name: &'static str,
    /// What it holds.
    pub ty: OutputType,
}

/// What a stage occupies while it runs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Resource {
    /// A CPU slot (bounded by `--jobs`).
    Cpu,
    /// A GPU device: at most one stage per device at a time.
    Gpu(String),
}

impl Resource {
    /// The device name recorded in provenance.
    pub fn device(&self) -> &str {
        match self {
            Resource::Cpu => "cpu",
            Resource::Gpu(device) => device,
        }
    }
}

/// A kind of stage, registered once in the registry.
pub trait StageKind: Send + Sync {
    /// The `kind = "…"` name.
    fn name(&self) -> &'static str;
    /// Bumped whenever the kind's outputs for the same inputs change; part of every key.
    fn version(&self) -> u32;
    /// Every output the kind can produce.
    fn outputs(&self) -> &'static [OutputDecl];
    /// Whether its stages compute on a device (`device`, `[pipeline] device`
    /// and `--device` apply to them; other kinds refuse a `device` key).
    fn uses_device(&self) -> bool {
        false
    }
    /// Whether a stage of this kind can run as several data-parallel
    /// processes (a Slurm job of several tasks, see [`crate::world`]).
    fn data_parallel(&self) -> bool {
        false
    }
    /// Whether the kind's outputs are the same bits on every machine, given
    /// the same inputs. Kinds that compute in floating point through
    /// vectorized, threaded or device kernels (training, calibration,
    /// scoring, merging weights) are not: their last bits follow the CPU and
    /// the device. Lock files record keys and output digests only where a
    /// stage and everything upstream of it are portable, so a run on another
    /// machine leaves a committed lock unchanged (see `swift_cache::lockfile`).
    fn portable(&self) -> bool {
        true
    }
    /// Types the stage's parameters, declares its inputs, and returns its plan.
    fn compile(&self, ctx: &mut CompileCtx<'_>, params: &toml::Table) -> Result<Box<dyn StagePlan>, ManifestError>;
}

/// A compiled stage: resolved parameters and the work to do.
pub trait StagePlan: Send + Sync {
    /// Fully resolved parameters, defaults included: they enter the key.
    fn params(&self) -> serde_json::Value;
    /// The outputs this stage produces (a subset of its kind's).
    fn outputs(&self) -> Vec<OutputDecl>;
    /// What the stage occupies while running.
    fn resource(&self) -> Resource {
        Resource::Cpu
    }
    /// Resolves an upstream revision (a Hub branch or tag to a commit sha)
    /// before keys are computed; the result enters the key and the lock file.
    /// Most stages have none.
    fn resolve(&self, _ctx: &ResolveCtx) -> anyhow::Result<Option<String>> {
        Ok(None)
    }
    /// Does the work. Outputs are returned already stored or as paths under
    /// [`RunCtx::out_dir`] for the engine to move into the store.
    fn run(&self, ctx: &RunCtx<'_>) -> anyhow::Result<StageResult>;
    /// Runs after the stage is done in a run, whether it ran or was cached,
    /// with its outputs' paths in the store: for stages that keep a copy
    /// outside the cache up to date (export's `to`). Returns a line for the
    /// log when it changed something. Most stages have none.
    fn publish(&self, _outputs: &IndexMap<String, (Artifact, PathBuf)>) -> anyhow::Result<Option<String>> {
        Ok(None)
    }
}

/// What a stage may use to resolve its upstream revision.
#[derive(Clone, Debug, Default)]
pub struct ResolveCtx {
    /// No network: resolve from local caches only.
    pub offline: bool,
    /// `--locked`: the revision the lock file pins (use it, ask nothing).
    pub locked: Option<String>,
}

/// Where an input comes from.
#[derive(Clone, Debug)]
pub enum InputSource {
    /// An output of another stage (resolved by name after every stage compiled).
    Stage {
        /// The referenced stage's name.
        stage: String,
        /// The output type expected.
        expects: OutputType,
    },
    /// A local file or folder.
    Local {
        /// Absolute path.
        path: PathBuf,
        /// The path as the manifest wrote it.
        shown: String,
    },
}

/// An input a stage declared while compiling.
#[derive(Clone, Debug)]
pub struct InputDecl {
    /// The input's name within the stage (`source`, `model`, `data.0`).
    pub name: String,
    /// The manifest key it came from, for errors.
    pub field: Vec<String>,
    /// Where it comes from.
    pub source: InputSource,
}

/// What a kind sees while compiling one stage.
pub struct CompileCtx<'a> {
    manifest: &'a Manifest,
    stage: &'a str,
    inputs: Vec<InputDecl>,
}

impl<'a> CompileCtx<'a> {
    pub(crate) fn new(manifest: &'a Manifest, stage: &'a str) -> Self {
        Self { manifest, stage, inputs: Vec::new() }
    }

    pub(crate) fn into_inputs(self) -> Vec<InputDecl> {
        self.inputs
    }

    /// The project root.
    pub fn root(&self) -> &Path {
        &self.manifest.root
    }

    /// The name of the stage being compiled.
    pub fn stage_name(&self) -> &str {
        self.stage
    }

    /// The pipeline's name (`[pipeline] name`, else the manifest's file stem).
    pub fn pipeline_name(&self) -> &str {
        &self.manifest.name
    }

    /// The device this stage computes on (see [`Manifest::device_of`]); only
    /// for kinds whose [`StageKind::uses_device`] is true.
    pub fn device(&self) -> crate::placement::DeviceSpec {
        self.manifest.device_of(self.stage).0
    }

    /// An error about the stage's device, located where the device was chosen.
    pub fn device_error(&self, message: impl Into<String>) -> ManifestError {
        let (_, at) = self.manifest.device_of(self.stage);
        if at.is_empty() {
            ManifestError::new("--device", 1, 1, message.into())
        } else {
            self.manifest.locator().error(&at, false, message)
        }
    }

    /// The pipeline seed. A kind that uses it puts it in its resolved
    /// parameters, so that it enters the key.
    pub fn seed(&self) -> u64 {
        self.manifest.pipeline.seed
    }

    fn path(&self, field: &[&str]) -> Vec<String> {
        ["stages", self.stage].iter().chain(field).map(|s| s.to_string()).collect()
    }

    /// Types the stage's parameters (use `#[serde(deny_unknown_fields)]`).
    pub fn parse<T: DeserializeOwned>(&self, params: &toml::Table) -> Result<T, ManifestError> {
        self.manifest.locator().parse(&self.path(&[]), toml::Value::Table(params.clone()))
    }

    /// Whether the manifest has a stage called `name` (for keys that take a
    /// stage or a local path).
    pub fn is_stage(&self, name: &str) -> bool {
        self.manifest.stages.contains_key(name)
    }

    /// The kind of the stage called `name`, if the manifest has one (lets a
    /// kind follow a chain of stages, e.g. a fine-tune of a fine-tune).
    pub fn stage_kind(&self, name: &str) -> Option<&str> {
        self.manifest.stages.get(name).map(|s| s.kind.as_str())
    }

    /// The raw parameters of the stage called `name` (its own kind checks them
    /// when it compiles).
    pub fn stage_params(&self, name: &str) -> Option<&toml::Table> {
        self.manifest.stages.get(name).map(|s| &s.params)
    }

    /// An error located at one of the stage's keys.
    pub fn error(&self, field: &[&str], message: impl Into<String>) -> ManifestError {
        self.manifest.locator().error(&self.path(field), false, message)
    }

    /// Declares an input taken from another stage's output of type `expects`.
    pub fn stage_input(&mut self, input: &str, field: &[&str], stage: &str, expects: OutputType) {
        self.inputs.push(InputDecl {
            name: input.to_string(),
            field: self.path(field),
            source: InputSource::Stage { stage: stage.to_string(), expects },
        });
    }

    /// Declares a local file or folder input, resolved against the project root;
    /// it must exist.
    pub fn local_input(&mut self, input: &str, field: &[&str], shown: &str) -> Result<PathBuf, ManifestError> {
        let path = self.manifest.root.join(shown);
        match std::fs::metadata(&path) {
            Ok(meta) => {
                if let Some(what) = swift_cache::hash::special_file(&meta) {
                    return Err(self
                        .error(field, format!("input `{shown}` is {what}, not a file or a folder"))
                        .with_help("give a regular file or a folder; to read a stream, save it to a file first"));
                }
            }
            Err(_) if std::fs::symlink_metadata(&path).is_ok() => {
                return Err(self
                    .error(field, format!("input `{shown}` is a symbolic link that leads nowhere (a loop, or its target is missing)"))
                    .with_help(format!("check where {} points", path.display())));
            }
            Err(_) => {
                return Err(self
                    .error(field, format!("input `{shown}` does not exist (looked for {})", path.display()))
                    .with_help("relative paths resolve against the project root (the folder holding .git)"));
            }
        }
        self.inputs.push(InputDecl {
            name: input.to_string(),
            field: self.path(field),
            source: InputSource::Local { path: path.clone(), shown: shown.to_string() },
        });
        Ok(path)
    }
}

/// One resolved input, as a running stage sees it.
#[derive(Clone, Debug)]
pub struct InputValue {
    /// The artifact (its digest entered the key).
    pub artifact: Artifact,
    /// Where to read it: the materialized path in the cache, or the local path.
    pub path: PathBuf,
    /// For local inputs, what hashing found (lets a stage ingest without rehashing).
    pub hashed: Option<swift_cache::Hashed>,
    /// For a stage's output that is a verbatim copy of a file or folder the
    /// manifest names (what a `download` stage makes of a local path): that
    /// name, for messages and reports to show instead of the store's copy.
    pub shown: Option<String>,
}

impl InputValue {
    /// `file` (the input itself or a file inside it) as the user knows it:
    /// under the original's name where the input is a copy, else as it is.
    pub fn shown_path(&self, file: &Path) -> PathBuf {
        let Some(shown) = &self.shown else { return file.to_path_buf() };
        match file.strip_prefix(&self.path) {
            Ok(rel) if rel.as_os_str().is_empty() => PathBuf::from(shown),
            Ok(rel) => Path::new(shown).join(rel),
            Err(_) => file.to_path_buf(),
        }
    }
}

/// An output a stage returns.
#[derive(Clone, Debug)]
pub enum OutputValue {
    /// Already in the store.
    Stored(Artifact),
    /// A file or folder under `out_dir` to move into the store.
    Path(PathBuf),
}

/// What a finished stage hands back.
#[derive(Clone, Debug, Default)]
pub struct StageResult {
    /// Outputs by name; every output the plan declared must be present.
    pub outputs: IndexMap<String, OutputValue>,
    /// Numbers for the run summary and `swift report`.
    pub metrics: serde_json::Map<String, serde_json::Value>,
}

/// A stage upstream of a running one, as this run settled it: for stages
/// that record lineage (export's model card).
#[derive(Clone, Debug)]
pub struct Upstream {
    /// Stage name.
    pub name: String,
    /// Kind name.
    pub kind: String,
    /// Its key (hex).
    pub key: String,
    /// Its resolved parameters, as they entered the key.
    pub params: serde_json::Value,
    /// The upstream revision it resolved (a Hub commit), if any.
    pub revision: Option<String>,
    /// Its outputs' digests, by output name.
    pub outputs: IndexMap<String, String>,
    /// Its metrics.
    pub metrics: serde_json::Map<String, serde_json::Value>,
}

/// What a running stage sees.
pub struct RunCtx<'a> {
    /// The stage's name.
    pub stage: &'a str,
    /// Inputs by name.
    pub inputs: IndexMap<String, InputValue>,
    /// An empty folder for outputs.
    pub out_dir: PathBuf,
    /// The stage key's scratch folder (kept across crashes, cleaned on success).
    pub scratch_dir: PathBuf,
    /// The store, for stages that ingest directly.
    pub store: &'a Store,
    /// The upstream revision resolved before the run (see [`StagePlan::resolve`]).
    pub revision: Option<String>,
    /// No network.
    pub offline: bool,
    /// Every stage this one depends on, directly or not, in run order.
    pub upstream: Vec<Upstream>,
    /// This process's place among the stage's data-parallel processes (a
    /// world of one unless a Slurm job started several). Only rank 0's
    /// outputs are stored; other ranks write theirs to a private folder.
    pub world: crate::world::World,
    pub(crate) cancel: &'a AtomicBool,
    pub(crate) progress: &'a (dyn Fn(u64, u64, &str) + Sync),
    pub(crate) parts: &'a Mutex<Vec<StageKey>>,
    /// `--force` named this stage: its parts are recomputed too.
    pub(crate) force: bool,
    /// The device the stage runs on, and the run's manifest (parts' provenance).
    pub(crate) device: &'a str,
    pub(crate) manifest: &'a Path,
}

impl RunCtx<'_> {
    /// Whether the run was interrupted (Ctrl-C): long stages check this and
    /// return [`Cancelled`] after saving what they can.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Reports progress (`done` of `total` units, with a short message).
    pub fn progress(&self, done: u64, total: u64, message: &str) {
        (self.progress)(done, total, message)
    }

    /// A piece of the stage's work cached under its own key, so that a stage
    /// whose key changed reuses the pieces whose own inputs did not (an eval
    /// stage scores each model × suite this way: adding a model rescores
    /// nothing else). The key covers `kind` (name the stage kind and the
    /// piece, e.g. `eval/score`), `version`, `params` and `inputs`; `compute`
    /// fills an empty folder, which is stored like an output; the part's
    /// materialized (read-only) folder is returned. The parts a run used are
    /// recorded in its action entry, so `gc` keeps them with it (and keeps
    /// parts no entry lists for a week, so that a failed run's finished parts
    /// survive until it is rerun); a stage run with `--force` recomputes its
    /// parts. Name the part kind `{stage kind}/{piece}`: the `/` tells `gc`
    /// it is a part.
    pub fn cached_part(
        &self,
        kind: &str,
        version: u32,
        params: &serde_json::Value,
        inputs: &[(String, Artifact)],
        compute: impl FnOnce(&Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<PathBuf> {
        let key = crate::key::stage_key(kind, version, params, None, inputs);
        let _lock = self.store.lock_key(&key)?;
        let record = |key| self.parts.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(key);
        if let Some((_, paths)) = (!self.force).then(|| crate::resolve::lookup(self.store, &key)).flatten() {
            if let Some(path) = paths.get("part") {
                record(key);
                return Ok(path.clone());
            }
        }
        let clock = Instant::now();
        let started_unix_ms = crate::exec::unix_ms();
        let dir = self.scratch_dir.join(format!("part-{}", &key.to_hex()[..16]));
        swift_cache::store::remove_tree(&dir)?;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        compute(&dir)?;
        let artifact = self.store.ingest_output(&dir)?;
        let path = self.store.materialize(&artifact)?;
        let entry = ActionEntry {
            key,
            kind: kind.to_string(),
            kind_version: version,
            params: params.clone(),
            revision: None,
            inputs: inputs.iter().cloned().collect(),
            outputs: [("part".to_string(), artifact)].into_iter().collect(),
            metrics: serde_json::Map::new(),
            parts: Vec::new(),
            provenance: crate::exec::provenance(self.device, self.manifest, started_unix_ms, clock.elapsed().as_secs_f64()),
        };
        self.store.write_action(&entry)?;
        record(key);
        Ok(path)
    }

    /// The input named `name` (declared while compiling, so always present).
    pub fn input(&self, name: &str) -> anyhow::Result<&InputValue> {
        self.inputs.get(name).ok_or_else(|| anyhow::anyhow!("internal error: stage has no input `{name}`"))
    }
}

/// The error a stage returns when it stopped because of Ctrl-C.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Cancelled;

/// Every stage kind this build knows, in one table.
pub struct Registry {
    kinds: Vec<Box<dyn StageKind>>,
}

impl Registry {
    /// A registry of the given kinds (plus the test-only kinds when the
    /// `test-kinds` feature is on).
    #[cfg_attr(not(feature = "test-kinds"), allow(unused_mut))]
    pub fn new(mut kinds: Vec<Box<dyn StageKind>>) -> Self {
        #[cfg(feature = "test-kinds")]
        kinds.extend(crate::testkinds::kinds());
        Self { kinds }
    }

    /// The kind called `name`.
    pub fn get(&self, name: &str) -> Option<&dyn StageKind> {
        self.kinds.iter().find(|k| k.name() == name).map(|k| k.as_ref())
    }

    /// Every kind's name.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.iter().map(|k| k.name())
    }
}
