//! The executor: runs what is missing, in dependency order, concurrently.
//!
//! 1. Select stages (`--only`, `--until`), hash local inputs (stat cache first).
//! 2. With `--locked`, compare parameters and local inputs with the lock file.
//! 3. Walk the DAG on a tokio runtime. A stage whose inputs are known gets its
//!    key; a hit in the action cache makes it `cached`, a miss spawns it on a
//!    blocking thread once it holds a slot (`--jobs` CPU slots, one per GPU).
//! 4. A spawned stage takes the cross-process lock of its key, checks the cache
//!    again (another `swift run` may have just finished it), runs in its scratch
//!    folder, moves its outputs into the store and writes the action entry last.
//! 5. The lock file is rewritten if its text changed; a run record is appended.
//!
//! With the Slurm executor (`--executor slurm`), steps 3 and 4 happen in
//! [`crate::slurm`]: hits settle here, misses become jobs that run step 4 on a
//! compute node; steps 1, 2 and 5 are the same.
//!
//! Ctrl-C (or SIGTERM) stops launching stages and asks running ones to stop; a
//! second Ctrl-C exits at once. Either way nothing half-done is ever recorded:
//! an entry exists only once all of a stage's outputs are stored, so an
//! interrupted six-hour fine-tune is never mistaken for a finished one.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use indexmap::IndexMap;
use swift_cache::store::remove_tree;
use swift_cache::{ActionEntry, Artifact, LockFile, LockedStage, Provenance, RunRecord, RunStageRecord, StageKey, Store};
use tokio::sync::{mpsc, Semaphore};

use crate::kind::{Cancelled, OutputValue, Resource, RunCtx, Upstream};
use crate::placement::Executor;
use crate::pipeline::{InputRef, Pipeline};
use crate::report::{Reporter, RunReport, StageReport, StageStatus};
use crate::resolve::{
    hash_locals, input_artifacts, input_values, key_of, lookup, params_of, resolve_revisions, user_names, with_user_names, Locals,
};

/// How to run.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// `--only`: these stages and what they need.
    pub only: Vec<String>,
    /// `--until`: stop after this stage (its descendants are skipped).
    pub until: Option<String>,
    /// `--force`: run these even if cached.
    pub force: Vec<String>,
    /// `--dry-run`: report what would run.
    pub dry_run: bool,
    /// `--locked`: require the lock file to match; never write it.
    pub locked: bool,
    /// `--rehash`: ignore the stat cache.
    pub rehash: bool,
    /// `--jobs`: concurrent CPU stages.
    pub jobs: usize,
    /// `--offline`: no network; upstream revisions and files come from local caches.
    pub offline: bool,
    /// Where missed stages run (`--executor`, else `[pipeline] executor`).
    pub executor: Executor,
    /// `--detach` (Slurm): return once every job is submitted.
    pub detach: bool,
    /// The `--set` overrides the manifest was loaded with (Slurm jobs load it the same way).
    pub sets: Vec<String>,
}

/// Why a run could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A bad stage name on the command line (exit 2).
    #[error("{0}")]
    Usage(String),
    /// `--locked` and the lock file disagree (exit 3).
    #[error("the run does not match the lock file:\n  {}", .0.join("\n  "))]
    Locked(Vec<String>),
    /// Anything else (exit 1).
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

// A handful of these exist per run; boxing the entry would buy nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum State {
    Pending,
    Running,
    /// Submitted to Slurm and left there (`--detach`).
    Submitted { job: String, running: bool },
    Done { status: StageStatus, entry: ActionEntry, paths: IndexMap<String, PathBuf>, seconds: f64 },
    Failed { key: Option<StageKey>, error: String, seconds: f64 },
    Skipped(String),
    WouldRun(Option<StageKey>),
}

#[allow(clippy::large_enum_variant)]
pub(crate) enum Outcome {
    Done { reused: bool, entry: ActionEntry, paths: IndexMap<String, PathBuf>, seconds: f64 },
    Failed { key: Option<StageKey>, error: String, seconds: f64 },
}

/// The stages a run covers.
pub fn select(pipeline: &Pipeline, only: &[String], until: Option<&str>) -> Result<BTreeSet<usize>, String> {
    let mut selected: BTreeSet<usize> = if only.is_empty() {
        (0..pipeline.nodes.len()).collect()
    } else {
        let mut set = BTreeSet::new();
        for name in only {
            set.extend(pipeline.with_ancestors(pipeline.require(name)?));
        }
        set
    };
    if let Some(name) = until {
        let stop = pipeline.require(name)?;
        for after in pipeline.with_descendants(stop) {
            if after != stop {
                selected.remove(&after);
            }
        }
    }
    Ok(selected)
}

/// Runs a pipeline (or part of it) against a store.
pub fn run(pipeline: Arc<Pipeline>, store: Store, options: &RunOptions, reporter: Arc<dyn Reporter>) -> Result<RunReport, RunError> {
    let clock = Instant::now();
    let started_unix_ms = unix_ms();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)?;
    // Catch Ctrl-C and SIGTERM from the start: one arriving while inputs are
    // hashed is seen as soon as the scheduler starts, and nothing is launched.
    let signals = {
        let _context = runtime.enter();
        Signals::new().map_err(anyhow::Error::from)?
    };
    let _guard = store.run_guard().map_err(anyhow::Error::from)?;
    // Best effort: a read-only cache still runs what is cached.
    let _ = store.remove_orphans();
    let selected = select(&pipeline, &options.only, options.until.as_deref()).map_err(RunError::Usage)?;
    let mut forced = HashSet::new();
    for name in &options.force {
        forced.insert(pipeline.require(name).map_err(RunError::Usage)?);
    }
    let lock_path = pipeline.manifest.lock_path();
    let old_lock = LockFile::read(&lock_path).map_err(anyhow::Error::from)?;
    if options.locked {
        // Checked before anything is resolved: --locked never asks the Hub about a
        // stage the lock does not pin.
        let Some(lock) = &old_lock else {
            return Err(RunError::Locked(vec![format!(
                "there is no lock file at {}; run once without --locked to create it",
                lock_path.display()
            )]));
        };
        let missing: Vec<String> = selected
            .iter()
            .filter(|&&i| !lock.stages.contains_key(&pipeline.nodes[i].name))
            .map(|&i| format!("stage `{}` is not in the lock file", pipeline.nodes[i].name))
            .collect();
        if !missing.is_empty() {
            return Err(RunError::Locked(missing));
        }
    }
    let revisions = resolve_revisions(&pipeline, selected.iter().copied(), old_lock.as_ref(), options.offline, options.locked)?;
    let stats = store.stat_cache();
    let (locals, hash_stats) = hash_locals(&pipeline, selected.iter().copied(), &stats, options.rehash)?;
    if hash_stats.bytes_hashed > 0 {
        reporter.note(&format!("hashed {} of inputs", human_bytes(hash_stats.bytes_hashed)));
    }
    if let (true, Some(lock)) = (options.locked, &old_lock) {
        check_locked(&pipeline, lock, &selected, &locals).map_err(RunError::Locked)?;
    }

    let journal = Journal::new(&store, &pipeline, started_unix_ms);
    let (states, interrupted) = if options.executor == Executor::Slurm && !options.dry_run {
        let run = crate::slurm::SlurmRun {
            pipeline: pipeline.clone(),
            store: store.clone(),
            reporter: reporter.clone(),
            locals: &locals,
            revisions: &revisions,
            selected: &selected,
            forced: &forced,
            options,
        };
        runtime.block_on(run.drive(signals, &journal))?
    } else {
        let scheduler = Scheduler {
            pipeline: pipeline.clone(),
            store: store.clone(),
            reporter: reporter.clone(),
            locals: Arc::new(locals),
            revisions: Arc::new(revisions),
            offline: options.offline,
            selected,
            forced,
            dry_run: options.dry_run,
            jobs: options.jobs.max(1),
        };
        runtime.block_on(scheduler.drive(signals, &journal))?
    };
    runtime.shutdown_background();

    let mut report = RunReport {
        pipeline: pipeline.manifest.name.clone(),
        ok: !interrupted,
        stages: Vec::new(),
        interrupted,
        lock_written: false,
        seconds: 0.0,
        problems: Vec::new(),
    };
    for &i in &pipeline.order {
        let node = &pipeline.nodes[i];
        let mut stage = StageReport {
            name: node.name.clone(),
            kind: node.kind.clone(),
            status: StageStatus::Skipped,
            key: None,
            seconds: 0.0,
            outputs: IndexMap::new(),
            metrics: Default::default(),
            error: None,
            job: None,
        };
        match &states[i] {
            State::Done { status, entry, paths, seconds } => {
                stage.status = *status;
                stage.key = Some(entry.key);
                stage.seconds = *seconds;
                stage.outputs = paths.clone();
                stage.metrics = entry.metrics.clone();
            }
            State::Failed { key, error, seconds } => {
                stage.status = StageStatus::Failed;
                stage.key = *key;
                stage.seconds = *seconds;
                stage.error = Some(error.clone());
                report.ok = false;
            }
            State::Skipped(why) => {
                stage.error = Some(why.clone());
                if why != NOT_SELECTED {
                    report.ok = false;
                }
            }
            State::WouldRun(key) => {
                stage.status = StageStatus::WouldRun;
                stage.key = *key;
            }
            State::Submitted { job, running } => {
                stage.status = if *running { StageStatus::Running } else { StageStatus::Queued };
                stage.job = Some(job.clone());
            }
            State::Pending => {
                stage.error = Some("interrupted before it could run".to_string());
                report.ok = false;
            }
            State::Running => {
                stage.error = Some("interrupted while it ran (nothing of it is recorded)".to_string());
                report.ok = false;
            }
        }
        report.stages.push(stage);
    }

    if !options.dry_run {
        // Bookkeeping that fails (on a full disk, say) fails the run, but the
        // summary is still printed and every stage's outcome kept.
        let mut problems = Vec::new();
        if !options.locked {
            match write_lock(&pipeline, &store, &lock_path, &states) {
                Ok(written) => report.lock_written = written,
                Err(e) => problems.push(format!("could not write the lock file {}: {e}", lock_path.display())),
            }
        }
        if let Err(e) = store.register_root(&lock_path).and_then(|()| write_machine_keys(&pipeline, &store, &lock_path, &states)) {
            problems.push(format!("could not register {} as a gc root: {e}", lock_path.display()));
        }
        report.seconds = clock.elapsed().as_secs_f64();
        if let Err(e) = journal.finish(&report) {
            problems.push(format!("could not record the run in {}: {e}", store.root().join("runs").display()));
        }
        if let Err(e) = stats.save() {
            reporter.note(&format!("could not save the stat cache (inputs will be rehashed next time): {e}"));
        }
        for problem in &problems {
            reporter.note(problem);
        }
        report.ok &= problems.is_empty();
        report.problems = problems;
    }
    report.seconds = clock.elapsed().as_secs_f64();
    Ok(report)
}

pub(crate) const NOT_SELECTED: &str = "not selected";

struct Scheduler {
    pipeline: Arc<Pipeline>,
    store: Store,
    reporter: Arc<dyn Reporter>,
    locals: Arc<Locals>,
    revisions: Arc<Vec<Option<String>>>,
    offline: bool,
    selected: BTreeSet<usize>,
    forced: HashSet<usize>,
    dry_run: bool,
    jobs: usize,
}

impl Scheduler {
    async fn drive(self, mut signals: Signals, journal: &Journal) -> anyhow::Result<(Vec<State>, bool)> {
        let n = self.pipeline.nodes.len();
        let mut states: Vec<State> = (0..n)
            .map(|i| if self.selected.contains(&i) { State::Pending } else { State::Skipped(NOT_SELECTED.to_string()) })
            .collect();
        let mut outputs: Vec<Option<IndexMap<String, Artifact>>> = vec![None; n];
        let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Outcome)>();
        let cpu = Arc::new(Semaphore::new(self.jobs));
        let mut gpus: HashMap<String, Arc<Semaphore>> = HashMap::new();
        let cancel = Arc::new(AtomicBool::new(false));
        let mut running = 0usize;
        loop {
            while signals.pending() {
                if self.interrupt(&cancel, running) {
                    return Ok((states, true));
                }
            }
            if !cancel.load(Ordering::Relaxed) {
                for &i in &self.pipeline.order {
                    if !matches!(states[i], State::Pending) {
                        continue;
                    }
                    let Some(next) = self.advance(i, &states, &outputs) else { continue };
                    match next {
                        Step::Launch(key, inputs) => {
                            let resource = self.pipeline.nodes[i].plan.resource();
                            let slot = match &resource {
                                Resource::Cpu => cpu.clone(),
                                Resource::Gpu(device) => gpus.entry(device.clone()).or_insert_with(|| Arc::new(Semaphore::new(1))).clone(),
                            };
                            let task = StageTask {
                                pipeline: self.pipeline.clone(),
                                store: self.store.clone(),
                                reporter: self.reporter.clone(),
                                locals: self.locals.clone(),
                                revision: self.revisions[i].clone(),
                                offline: self.offline,
                                index: i,
                                key,
                                inputs,
                                force: self.forced.contains(&i),
                                device: resource.device().to_string(),
                                upstream: upstream(&self.pipeline, i, &states),
                                world: crate::world::World::single(),
                                cancel: cancel.clone(),
                            };
                            let tx = tx.clone();
                            tokio::spawn(async move {
                                let permit = slot.acquire_owned().await;
                                let started = Instant::now();
                                let outcome = tokio::task::spawn_blocking(move || task.execute()).await.unwrap_or_else(|e| {
                                    Outcome::Failed { key: None, error: format!("the stage panicked: {e}"), seconds: started.elapsed().as_secs_f64() }
                                });
                                drop(permit);
                                let _ = tx.send((i, outcome));
                            });
                            states[i] = State::Running;
                            running += 1;
                        }
                        Step::Settle(state) => {
                            if let State::Done { entry, .. } = &state {
                                outputs[i] = Some(entry.outputs.clone());
                            }
                            let state = if self.dry_run { state } else { publish(&self.pipeline, &*self.reporter, i, state) };
                            announce(&self.pipeline, &*self.reporter, i, &state);
                            states[i] = state;
                        }
                    }
                }
            }
            if running == 0 {
                break;
            }
            tokio::select! {
                Some((i, outcome)) = rx.recv() => {
                    running -= 1;
                    let state = match outcome {
                        Outcome::Done { reused, entry, paths, seconds } => {
                            outputs[i] = Some(entry.outputs.clone());
                            let status = if reused { StageStatus::Cached } else { StageStatus::Ran };
                            if status == StageStatus::Ran {
                                // Keep the result a GC root even if this run is killed later.
                                if let Err(e) = journal.stage_ran(&self.pipeline.nodes[i], &entry, seconds) {
                                    self.reporter.note(&format!("could not update the run record: {e}"));
                                }
                            }
                            State::Done { status, entry, paths, seconds }
                        }
                        Outcome::Failed { key, error, seconds } => State::Failed { key, error, seconds },
                    };
                    let state = publish(&self.pipeline, &*self.reporter, i, state);
                    announce(&self.pipeline, &*self.reporter, i, &state);
                    states[i] = state;
                }
                _ = signals.interrupt.recv() => if self.interrupt(&cancel, running) { return Ok((states, true)) },
                _ = signals.terminate.recv() => if self.interrupt(&cancel, running) { return Ok((states, true)) },
            }
        }
        Ok((states, cancel.load(Ordering::Relaxed)))
    }

    /// Handles Ctrl-C or SIGTERM: the first stops launching and tells running
    /// stages to stop; a second means leave now (returns true): the run is
    /// recorded without waiting for them, and the process exits from `main`
    /// with 130, ending their threads (nothing half-done is ever recorded).
    fn interrupt(&self, cancel: &AtomicBool, running: usize) -> bool {
        if cancel.swap(true, Ordering::Relaxed) {
            self.reporter.note("interrupted again: exiting now");
            return true;
        }
        self.reporter.note(&format!(
            "interrupted: waiting for {running} running stage(s) to stop (Ctrl-C again to exit at once; nothing half-done is recorded)"
        ));
        false
    }

    /// What to do with a pending stage now, or `None` to wait for its inputs.
    fn advance(&self, i: usize, states: &[State], outputs: &[Option<IndexMap<String, Artifact>>]) -> Option<Step> {
        let node = &self.pipeline.nodes[i];
        for dep in node.deps() {
            match &states[dep] {
                State::Pending | State::Running | State::Submitted { .. } => return None,
                State::Failed { .. } | State::Skipped(_) => {
                    return Some(Step::Settle(State::Skipped(format!("upstream stage `{}` did not complete", self.pipeline.nodes[dep].name))))
                }
                State::WouldRun(_) => return Some(Step::Settle(State::WouldRun(None))),
                State::Done { .. } => {}
            }
        }
        let Some(inputs) = input_artifacts(&self.pipeline, i, &self.locals, outputs) else {
            let error = "internal error: an input is missing".to_string();
            return Some(Step::Settle(State::Failed { key: None, error, seconds: 0.0 }));
        };
        let key = key_of(&self.pipeline, i, self.revisions[i].as_deref(), &inputs);
        if !self.forced.contains(&i) {
            if let Some((entry, paths)) = lookup(&self.store, &key) {
                return Some(Step::Settle(State::Done { status: StageStatus::Cached, entry, paths, seconds: 0.0 }));
            }
        }
        if self.dry_run {
            return Some(Step::Settle(State::WouldRun(Some(key))));
        }
        Some(Step::Launch(key, inputs))
    }
}

/// Lets a done stage publish its outputs outside the cache
/// ([`crate::kind::StagePlan::publish`]); a failure fails the stage (its cache
/// entry stays: a rerun only publishes again). Not called in dry runs.
pub(crate) fn publish(pipeline: &Pipeline, reporter: &dyn Reporter, i: usize, state: State) -> State {
    let State::Done { entry, paths, seconds, .. } = &state else { return state };
    let outputs = paths.iter().filter_map(|(name, path)| Some((name.clone(), (entry.outputs.get(name)?.clone(), path.clone())))).collect();
    match pipeline.nodes[i].plan.publish(&outputs) {
        Ok(None) => state,
        Ok(Some(line)) => {
            reporter.note(&format!("{}: {line}", pipeline.nodes[i].name));
            state
        }
        Err(error) => State::Failed { key: Some(entry.key), error: format!("{error:#}"), seconds: *seconds },
    }
}

/// Tells the reporter how a stage settled.
pub(crate) fn announce(pipeline: &Pipeline, reporter: &dyn Reporter, i: usize, state: &State) {
    let node = &pipeline.nodes[i];
    let (status, key, seconds, error) = match state {
        State::Done { status, entry, seconds, .. } => (*status, Some(entry.key), *seconds, None),
        State::Failed { key, error, seconds } => (StageStatus::Failed, *key, *seconds, Some(error.clone())),
        State::Skipped(why) => (StageStatus::Skipped, None, 0.0, Some(why.clone())),
        State::WouldRun(key) => (StageStatus::WouldRun, *key, 0.0, None),
        State::Pending | State::Running | State::Submitted { .. } => return,
    };
    let metrics = match state {
        State::Done { entry, .. } => entry.metrics.clone(),
        _ => Default::default(),
    };
    reporter.stage_finished(&StageReport {
        name: node.name.clone(),
        kind: node.kind.clone(),
        status,
        key,
        seconds,
        outputs: IndexMap::new(),
        metrics,
        error,
        job: None,
    });
}

#[allow(clippy::large_enum_variant)]
enum Step {
    Launch(StageKey, Vec<(String, Artifact)>),
    Settle(State),
}

/// One stage to compute in this process: the local executor spawns these, a
/// Slurm job runs one.
pub(crate) struct StageTask {
    pub(crate) pipeline: Arc<Pipeline>,
    pub(crate) store: Store,
    pub(crate) reporter: Arc<dyn Reporter>,
    pub(crate) locals: Arc<Locals>,
    pub(crate) revision: Option<String>,
    pub(crate) offline: bool,
    pub(crate) index: usize,
    pub(crate) key: StageKey,
    pub(crate) inputs: Vec<(String, Artifact)>,
    pub(crate) force: bool,
    pub(crate) device: String,
    pub(crate) upstream: Vec<Upstream>,
    pub(crate) world: crate::world::World,
    pub(crate) cancel: Arc<AtomicBool>,
}

/// The stages `index` depends on, directly or not, in run order, with what
/// this run settled for each (they are all done when it launches).
pub(crate) fn upstream(pipeline: &Pipeline, index: usize, states: &[State]) -> Vec<Upstream> {
    let mut needed = vec![false; pipeline.nodes.len()];
    let mut stack: Vec<usize> = pipeline.nodes[index].deps().collect();
    while let Some(i) = stack.pop() {
        if !std::mem::replace(&mut needed[i], true) {
            stack.extend(pipeline.nodes[i].deps());
        }
    }
    pipeline
        .order
        .iter()
        .filter(|&&i| needed[i])
        .filter_map(|&i| match &states[i] {
            State::Done { entry, .. } => Some(Upstream {
                name: pipeline.nodes[i].name.clone(),
                kind: entry.kind.clone(),
                key: entry.key.to_hex(),
                params: entry.params.clone(),
                revision: entry.revision.clone(),
                outputs: entry.outputs.iter().map(|(name, a)| (name.clone(), a.digest().to_hex())).collect(),
                metrics: entry.metrics.clone(),
            }),
            _ => None,
        })
        .collect()
}

impl StageTask {
    /// Computes the stage (or finds another process finished it meanwhile).
    pub(crate) fn execute(self) -> Outcome {
        let started = Instant::now();
        let free_before = self.store.free_bytes();
        match self.try_execute() {
            Ok((entry, paths, reused)) => Outcome::Done { reused, entry, paths, seconds: started.elapsed().as_secs_f64() },
            Err(error) => {
                let names = user_names(&self.pipeline, &self.store, self.index, &self.inputs, &self.locals);
                let mut message = with_user_names(&format!("{error:#}"), &names);
                if crate::full_disk::is_full_disk(&error) {
                    message.push_str(&crate::full_disk::free_and_explain(&self.store, &self.key, free_before));
                }
                Outcome::Failed { key: Some(self.key), error: message, seconds: started.elapsed().as_secs_f64() }
            }
        }
    }

    fn try_execute(&self) -> anyhow::Result<(ActionEntry, IndexMap<String, PathBuf>, bool)> {
        let node = &self.pipeline.nodes[self.index];
        let _lock = self.store.lock_key(&self.key)?;
        if !self.force {
            if let Some((entry, paths)) = lookup(&self.store, &self.key) {
                return Ok((entry, paths, true)); // another swift run finished it while we waited
            }
        }
        if self.cancel.load(Ordering::Relaxed) {
            return Err(Cancelled.into());
        }
        self.reporter.stage_started(&node.name, &node.kind);
        let clock = Instant::now();
        let started_unix_ms = unix_ms();
        let scratch_dir = self.store.scratch_dir(&self.key);
        let out_dir = scratch_dir.join("out");
        let (result, parts) = self.run_plan(&out_dir, &scratch_dir)?;
        let mut outputs = IndexMap::new();
        let mut paths = IndexMap::new();
        for decl in node.plan.outputs() {
            let artifact = match result.outputs.get(decl.name) {
                Some(OutputValue::Stored(artifact)) => artifact.clone(),
                Some(OutputValue::Path(path)) => self.store.ingest_output(path)?,
                None => anyhow::bail!("internal error: the stage did not produce its `{}` output", decl.name),
            };
            paths.insert(decl.name.to_string(), self.store.materialize(&artifact)?);
            outputs.insert(decl.name.to_string(), artifact);
        }
        let entry = ActionEntry {
            key: self.key,
            kind: node.kind.clone(),
            kind_version: node.kind_version,
            params: node.plan.params(),
            revision: self.revision.clone(),
            inputs: self.inputs.iter().cloned().collect(),
            outputs,
            metrics: result.metrics,
            parts,
            provenance: provenance(&self.device, &self.pipeline.manifest.path, started_unix_ms, clock.elapsed().as_secs_f64()),
        };
        // The entry is written last: only now does the stage count as done.
        self.store.write_action(&entry)?;
        remove_tree(&scratch_dir)?;
        Ok((entry, paths, false))
    }

    /// Runs the stage's plan with its outputs going to `out_dir` (emptied
    /// first); returns its result and the parts it used.
    fn run_plan(&self, out_dir: &Path, scratch_dir: &Path) -> anyhow::Result<(crate::kind::StageResult, Vec<StageKey>)> {
        let node = &self.pipeline.nodes[self.index];
        remove_tree(out_dir)?;
        std::fs::create_dir_all(out_dir)?;
        let inputs = input_values(&self.pipeline, &self.store, self.index, &self.inputs, &self.locals)?;
        let reporter = self.reporter.clone();
        let name = node.name.clone();
        let progress = move |done: u64, total: u64, message: &str| reporter.stage_progress(&name, done, total, message);
        let parts = Mutex::new(Vec::new());
        let ctx = RunCtx {
            stage: &node.name,
            inputs,
            out_dir: out_dir.to_path_buf(),
            scratch_dir: scratch_dir.to_path_buf(),
            store: &self.store,
            revision: self.revision.clone(),
            offline: self.offline,
            upstream: self.upstream.clone(),
            world: self.world.clone(),
            cancel: &self.cancel,
            progress: &progress,
            parts: &parts,
            force: self.force,
            device: &self.device,
            manifest: &self.pipeline.manifest.path,
        };
        let result = node.plan.run(&ctx)?;
        drop(ctx);
        Ok((result, parts.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner())))
    }

    /// A data-parallel rank other than 0: computes alongside rank 0 (reading
    /// the key's scratch folder, where rank 0 keeps checkpoints) and stores
    /// nothing; its outputs go to a private folder that is removed after.
    /// Should the stage's entry appear meanwhile (rank 0 found it cached and
    /// will never train), the rank is stopped and counts as done.
    pub(crate) fn follow(&self) -> anyhow::Result<()> {
        let private = self.store.scratch_dir(&self.key).with_extension(format!("rank{}", self.world.rank));
        // Under `--force` an entry exists already: only a newer one means rank 0 is done.
        let started = |store: &Store, key: &StageKey| store.read_action(key).ok().flatten().map(|e| e.provenance.started_unix_ms);
        let before = started(&self.store, &self.key);
        let stored = move |store: &Store, key: &StageKey| started(store, key).is_some_and(|t| before.is_none_or(|b| t > b));
        let finished = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (store, key, cancel, finished) = (self.store.clone(), self.key, self.cancel.clone(), finished.clone());
            std::thread::spawn(move || {
                while !finished.load(Ordering::Relaxed) {
                    if stored(&store, &key) {
                        cancel.store(true, Ordering::Relaxed);
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
            })
        };
        let result = self.run_plan(&private.join("out"), &self.store.scratch_dir(&self.key));
        finished.store(true, Ordering::Relaxed);
        let _ = watcher.join();
        remove_tree(&private)?;
        match result {
            Err(_) if stored(&self.store, &self.key) => Ok(()),
            other => other.map(|_| ()),
        }
    }
}

fn check_locked(
    pipeline: &Pipeline,
    lock: &LockFile,
    selected: &BTreeSet<usize>,
    locals: &Locals,
) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    for &i in selected {
        let node = &pipeline.nodes[i];
        // Stages missing from the lock were reported before anything was resolved.
        let Some(locked) = lock.stages.get(&node.name) else { continue };
        if locked.kind != node.kind {
            problems.push(format!("stage `{}` is a {} stage, the lock has {}", node.name, node.kind, locked.kind));
        } else if locked.params != params_of(pipeline, i) {
            problems.push(format!("stage `{}`: its parameters differ from the locked run (see `swift status`)", node.name));
        }
        for (j, input) in node.inputs.iter().enumerate() {
            if let InputRef::Local { shown, .. } = &input.source {
                let now = locals[&(i, j)].artifact.digest();
                match locked.inputs.get(&input.name) {
                    Some(pinned) if *pinned == now => {}
                    Some(pinned) => problems.push(format!(
                        "stage `{}`: input `{}` ({shown}) is {}…, the lock has {}…",
                        node.name,
                        input.name,
                        &now.to_hex()[..12],
                        &pinned.to_hex()[..12]
                    )),
                    None => problems.push(format!("stage `{}`: input `{}` is not in the lock file", node.name, input.name)),
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Rewrites the lock file with this run's stages; returns whether it changed.
/// Re-read under a lock: a concurrent run of the same manifest may have
/// updated other stages since this run started.
fn write_lock(pipeline: &Pipeline, store: &Store, lock_path: &Path, states: &[State]) -> std::io::Result<bool> {
    let _lock_guard = store.lock_file_guard(lock_path)?;
    let current = LockFile::read(lock_path)?;
    updated_lock(pipeline, current, states).write_if_changed(lock_path)
}

/// Records in the cache the key of every stage this run settled, with those
/// it left alone as they were: the machine's own pins of the keys a lock
/// file leaves out (see `swift_cache::roots`).
fn write_machine_keys(pipeline: &Pipeline, store: &Store, lock_path: &Path, states: &[State]) -> std::io::Result<()> {
    let mut keys = store.machine_keys(lock_path)?;
    keys.retain(|name, _| pipeline.index(name).is_some());
    for (node, state) in pipeline.nodes.iter().zip(states) {
        if let State::Done { entry, .. } = state {
            keys.insert(node.name.clone(), entry.key);
        }
    }
    store.write_machine_keys(lock_path, &keys)
}

fn updated_lock(pipeline: &Pipeline, old: Option<LockFile>, states: &[State]) -> LockFile {
    let old = old.unwrap_or_default();
    let mut lock = LockFile { version: swift_cache::lockfile::LOCK_VERSION, pipeline: pipeline.manifest.name.clone(), stages: Default::default() };
    let portable = pipeline.portable_outputs();
    for (i, node) in pipeline.nodes.iter().enumerate() {
        if let State::Done { entry, .. } = &states[i] {
            // What differs from machine to machine stays out (see swift_cache::lockfile).
            let same_everywhere = |input: &str| match node.inputs.iter().find(|n| n.name == input).map(|n| &n.source) {
                Some(InputRef::Stage { stage, .. }) => portable[*stage],
                _ => true,
            };
            lock.stages.insert(
                node.name.clone(),
                LockedStage {
                    kind: node.kind.clone(),
                    key: portable[i].then_some(entry.key),
                    params: params_of(pipeline, i),
                    revision: entry.revision.clone(),
                    inputs: entry.inputs.iter().filter(|(k, _)| same_everywhere(k)).map(|(k, a)| (k.clone(), a.digest())).collect(),
                    outputs: if portable[i] { entry.outputs.iter().map(|(k, a)| (k.clone(), a.digest())).collect() } else { Default::default() },
                },
            );
        } else if let Some(previous) = old.stages.get(&node.name) {
            lock.stages.insert(node.name.clone(), previous.clone());
        }
    }
    lock
}

/// Ctrl-C and SIGTERM, registered when a run starts.
pub(crate) struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    pub(crate) fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self { interrupt: signal(SignalKind::interrupt())?, terminate: signal(SignalKind::terminate())? })
    }

    /// Waits for the next signal.
    pub(crate) async fn next(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }

    /// Takes one signal that already arrived, without waiting.
    pub(crate) fn pending(&mut self) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        self.interrupt.poll_recv(&mut cx).is_ready() || self.terminate.poll_recv(&mut cx).is_ready()
    }
}

/// The run record, rewritten whenever a stage finishes running (so a run killed
/// half-way still protects what it computed from `gc`) and once at the end.
pub(crate) struct Journal {
    store: Store,
    record: std::sync::Mutex<RunRecord>,
}

impl Journal {
    fn new(store: &Store, pipeline: &Pipeline, started_unix_ms: u64) -> Self {
        let record = RunRecord {
            manifest: pipeline.manifest.path.clone(),
            pipeline: pipeline.manifest.name.clone(),
            started_unix_ms,
            seconds: 0.0,
            ok: false,
            stages: Vec::new(),
        };
        Self { store: store.clone(), record: std::sync::Mutex::new(record) }
    }

    pub(crate) fn stage_ran(&self, node: &crate::pipeline::StageNode, entry: &ActionEntry, seconds: f64) -> std::io::Result<()> {
        let mut record = self.record.lock().expect("journal lock");
        record.stages.push(RunStageRecord {
            name: node.name.clone(),
            kind: node.kind.clone(),
            status: StageStatus::Ran.as_str().to_string(),
            key: Some(entry.key),
            seconds,
            metrics: entry.metrics.clone(),
        });
        self.store.write_run(&record).map(|_| ())
    }

    fn finish(&self, report: &RunReport) -> std::io::Result<()> {
        let mut record = self.record.lock().expect("journal lock");
        record.seconds = report.seconds;
        record.ok = report.ok;
        record.stages = report
            .stages
            .iter()
            .map(|s| RunStageRecord {
                name: s.name.clone(),
                kind: s.kind.clone(),
                status: s.status.as_str().to_string(),
                key: s.key,
                seconds: s.seconds,
                metrics: s.metrics.clone(),
            })
            .collect();
        self.store.write_run(&record).map(|_| ())
    }
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Where and when an entry was computed: this host and swift version, the
/// stage's device, the manifest of the run.
pub(crate) fn provenance(device: &str, manifest: &Path, started_unix_ms: u64, seconds: f64) -> Provenance {
    Provenance {
        host: hostname(),
        device: device.to_string(),
        started_unix_ms,
        seconds,
        swift_version: env!("CARGO_PKG_VERSION").to_string(),
        manifest: manifest.display().to_string(),
    }
}

/// This machine's host name (`unknown` if it cannot be read).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

/// `1.5 GiB`, `12.0 MiB`, `300 B`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
