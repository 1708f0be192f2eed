//! The Slurm executor: every stage that misses the cache becomes one Slurm job,
//! over a cache every node sees on a shared filesystem.
//!
//! 1. Cache hits are settled first, exactly as a local run would; only misses
//!    (and what depends on them) are submitted.
//! 2. Before anything is submitted: `sbatch` must be on `PATH`, `sbatch
//!    --test-only` must accept every job's resources, and (once per cache) a
//!    probe job must prove that the compute nodes see the cache.
//! 3. Under the cache's submission lock, each stage is submitted in run order
//!    as `sbatch --parsable --kill-on-invalid-dep=yes
//!    --dependency=afterok:PARENTS`, running `swift exec-stage` on that one
//!    stage ([`job::run_job`]). A live job already computing the same recipe
//!    (another `swift run`, or one killed earlier) is waited on instead of
//!    submitted again. Job names are `swift-STAGE-RECIPE12`; logs go to
//!    `slurm/logs/` in the cache (see [`files`]).
//! 4. `swift run` then polls: the cache's action entry is the truth for a
//!    finished stage; `squeue` says which jobs run, and a job that ended
//!    without an entry failed (its own record and log tail are shown).
//!    A failure or Ctrl-C cancels every job this run submitted that has not
//!    finished. `--detach` returns after submission.

pub mod cli;
pub mod files;
pub mod job;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use swift_cache::{Artifact, StageKey, Store};

use crate::exec::{announce, publish, unix_ms, Journal, RunOptions, Signals, State, NOT_SELECTED};
use crate::pipeline::Pipeline;
use crate::placement::{kind_defaults, DeviceSpec};
use crate::report::{Reporter, StageStatus};
use crate::resolve::{input_artifacts, key_of, lookup, recipes, Locals};
pub use cli::{JobState, Slurm};
pub use files::{JobPlan, JobResult, SlurmDir, Submission, SubmittedJob};

const DEFAULT_POLL: Duration = Duration::from_secs(2);
const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(600);
/// Lines of a failed job's log shown in the error.
const LOG_TAIL_LINES: usize = 15;
/// How long a file a job says it wrote may take to show on a shared
/// filesystem (NFS caches directory listings for up to a minute).
const VISIBILITY_GRACE: Duration = Duration::from_secs(60);
/// How long a completed probe's marker may take to show here.
const PROBE_VISIBILITY_GRACE: Duration = Duration::from_secs(5);
/// `squeue` failures in a row before the run gives up.
const MAX_SQUEUE_FAILURES: usize = 30;

/// One `swift run` under the Slurm executor.
pub(crate) struct SlurmRun<'a> {
    pub(crate) pipeline: Arc<Pipeline>,
    pub(crate) store: Store,
    pub(crate) reporter: Arc<dyn Reporter>,
    pub(crate) locals: &'a Locals,
    pub(crate) revisions: &'a [Option<String>],
    pub(crate) selected: &'a BTreeSet<usize>,
    pub(crate) forced: &'a HashSet<usize>,
    pub(crate) options: &'a RunOptions,
}

/// A job this run waits on.
struct Job {
    id: String,
    log: PathBuf,
    adopted: bool,
    seen_running: bool,
    /// When the waiter first saw it ended without an entry.
    ended: Option<Instant>,
}

impl SlurmRun<'_> {
    /// Settles hits, submits misses, waits (unless `--detach`). Returns each
    /// stage's state and whether Ctrl-C stopped the run.
    pub(crate) async fn drive(self, mut signals: Signals, journal: &Journal) -> anyhow::Result<(Vec<State>, bool)> {
        let pipeline = self.pipeline.clone();
        let n = pipeline.nodes.len();
        let mut states: Vec<State> = (0..n)
            .map(|i| if self.selected.contains(&i) { State::Pending } else { State::Skipped(NOT_SELECTED.to_string()) })
            .collect();
        let mut outputs: Vec<Option<indexmap::IndexMap<String, Artifact>>> = vec![None; n];

        let mut misses = BTreeSet::new();
        for &i in pipeline.order.iter().filter(|i| self.selected.contains(i)) {
            if pipeline.nodes[i].deps().any(|d| misses.contains(&d)) {
                misses.insert(i);
                continue;
            }
            if let Some(dep) = pipeline.nodes[i].deps().find(|&d| !matches!(states[d], State::Done { .. })) {
                let why = format!("upstream stage `{}` did not complete", pipeline.nodes[dep].name);
                self.settle(i, State::Skipped(why), &mut states, &mut outputs);
                continue;
            }
            let key = self.key(i, &outputs);
            match (self.forced.contains(&i), lookup(&self.store, &key)) {
                (false, Some((entry, paths))) => {
                    self.settle(i, State::Done { status: StageStatus::Cached, entry, paths, seconds: 0.0 }, &mut states, &mut outputs)
                }
                _ => {
                    misses.insert(i);
                }
            }
        }
        if misses.is_empty() {
            return Ok((states, false));
        }

        let slurm = Slurm::find()?;
        let dir = SlurmDir::of(&self.store);
        let mut partition_cpus = HashMap::new();
        let mut resource_args = HashMap::new();
        for &i in &misses {
            let args = self.resource_args(&slurm, i, &mut partition_cpus)?;
            if !resource_args.values().any(|seen| seen == &args) {
                slurm.test_only(&args).map_err(|e| {
                    anyhow::anyhow!(
                        "stage `{}`: Slurm would not accept its job ({}): {e:#}\n  set the stage's `resources` (or `[pipeline.resources]`) to what the cluster offers",
                        pipeline.nodes[i].name,
                        args.join(" ")
                    )
                })?;
            }
            resource_args.insert(i, args);
        }
        let first_miss = pipeline.order.iter().find(|i| misses.contains(i)).expect("misses is not empty");
        let first = &pipeline.nodes[*first_miss].resources;
        let probe_args: Vec<String> = first.partition.iter().map(|p| format!("--partition={p}")).chain(first.sbatch.iter().cloned()).collect();
        if !self.check_shared(&slurm, &dir, &probe_args, &mut signals).await? || signals.pending() {
            self.reporter.note("interrupted before anything was submitted");
            return Ok((states, true));
        }

        let recipes = recipes(&pipeline, self.selected, self.revisions, self.locals);
        let run_id = format!("{}-{}", unix_ms(), std::process::id());
        let run_dir = dir.run_dir(&run_id);
        let plan = JobPlan {
            manifest: pipeline.manifest.path.clone(),
            sets: self.options.sets.clone(),
            device: pipeline.manifest.device_override.clone(),
            offline: self.options.offline,
            revisions: self.selected.iter().map(|&i| (pipeline.nodes[i].name.clone(), self.revisions[i].clone())).collect(),
            recipes: misses.iter().map(|&i| (pipeline.nodes[i].name.clone(), recipes[&i].to_hex())).collect(),
            forced: self.forced.iter().map(|&i| pipeline.nodes[i].name.clone()).collect(),
        };
        let plan_path = run_dir.join("plan.json");
        files::write_json(&plan_path, &plan).context("cannot write the Slurm run plan")?;

        let submitted_unix_ms = unix_ms();
        let sub = Submitter {
            slurm: &slurm,
            dir: &dir,
            recipes: &recipes,
            resource_args: &resource_args,
            plan: &plan_path,
            exe: std::env::current_exe().context("cannot find swift's own executable")?,
            stage_names: pipeline.nodes.iter().map(|n| n.name.clone()).collect(),
        };
        let Some(jobs) = self.submit(&sub, &misses, &mut || signals.pending())? else {
            self.reporter.note("interrupted: the jobs submitted so far are cancelled");
            return Ok((states, true));
        };
        let submission = Submission {
            run: run_id,
            submitted_unix_ms,
            jobs: pipeline
                .order
                .iter()
                .filter_map(|i| jobs.get(i).map(|job| (i, job)))
                .map(|(&i, job)| SubmittedJob {
                    stage: pipeline.nodes[i].name.clone(),
                    job: job.id.clone(),
                    name: sub.name(i),
                    log: job.log.clone(),
                    adopted: job.adopted,
                })
                .collect(),
        };
        if let Err(e) = files::write_json(&dir.submission_path(&pipeline.manifest.path), &submission) {
            self.reporter.note(&format!("could not record the submission for `swift status` (the jobs run regardless): {e}"));
        }

        if self.options.detach {
            let queued = slurm.states(&jobs.values().map(|j| j.id.clone()).collect::<Vec<_>>()).unwrap_or_default();
            for (&i, job) in &jobs {
                let running = queued.get(&job.id).is_some_and(JobState::is_running);
                states[i] = State::Submitted { job: job.id.clone(), running };
            }
            return Ok((states, false));
        }
        let interrupted = self.wait(&sub, jobs, submitted_unix_ms, &mut states, &mut outputs, &mut signals, journal).await?;
        Ok((states, interrupted))
    }

    /// A stage's key once its producers are done.
    fn key(&self, i: usize, outputs: &[Option<indexmap::IndexMap<String, Artifact>>]) -> StageKey {
        let inputs = input_artifacts(&self.pipeline, i, self.locals, outputs).expect("producers are done");
        key_of(&self.pipeline, i, self.revisions[i].as_deref(), &inputs)
    }

    fn settle(&self, i: usize, state: State, states: &mut [State], outputs: &mut [Option<indexmap::IndexMap<String, Artifact>>]) {
        if let State::Done { entry, .. } = &state {
            outputs[i] = Some(entry.outputs.clone());
        }
        let state = publish(&self.pipeline, &*self.reporter, i, state);
        announce(&self.pipeline, &*self.reporter, i, &state);
        states[i] = state;
    }

    /// The `sbatch` options for a stage's resources: the manifest's, then the
    /// kind's defaults (CPUs lowered to what the partition's nodes have).
    fn resource_args(&self, slurm: &Slurm, i: usize, partition_cpus: &mut HashMap<Option<String>, Option<u32>>) -> anyhow::Result<Vec<String>> {
        let node = &self.pipeline.nodes[i];
        let mut resources = node.resources.clone();
        let defaults = kind_defaults(&node.kind);
        if let (None, Some(DeviceSpec::Cuda(ids))) = (resources.gpus, &node.device) {
            resources.gpus = Some(ids.len() as u32);
        }
        if resources.cpus.is_none() {
            // The kind's default, shared by the tasks of a node, within what the partition's nodes have.
            let cap = *partition_cpus.entry(resources.partition.clone()).or_insert_with(|| slurm.node_cpus(resources.partition.as_deref()));
            let per_node = resources.tasks_per_node(node.data_parallel);
            resources.cpus = defaults.cpus.map(|c| cap.map_or(c, |cap| c.min((cap / per_node).max(1))));
        }
        let resources = resources.over(&defaults);
        let processes = resources.world_size(node.data_parallel);
        if processes > 1 && !node.data_parallel {
            bail!(
                "stage `{}` asks for {processes} processes (nodes × tasks_per_node), but a `{}` stage runs as one; \
                 only finetune stages train data-parallel",
                node.name,
                node.kind
            );
        }
        let mut args = Vec::new();
        if let Some(cpus) = resources.cpus {
            args.push(format!("--cpus-per-task={cpus}"));
        }
        if let Some(mem) = &resources.mem {
            args.push(format!("--mem={mem}"));
        }
        if let Some(time) = &resources.time {
            args.push(format!("--time={time}"));
        }
        if let Some(gpus) = resources.gpus.filter(|&g| g > 0) {
            args.push(format!("--gpus-per-node={gpus}"));
        }
        if let Some(nodes) = resources.nodes {
            args.push(format!("--nodes={nodes}"));
        }
        if processes > 1 {
            args.push(format!("--ntasks-per-node={}", resources.tasks_per_node(node.data_parallel)));
        }
        if let Some(partition) = &resources.partition {
            args.push(format!("--partition={partition}"));
        }
        args.extend(resources.sbatch.iter().cloned());
        Ok(args)
    }

    /// Proves once per cache that a job on a compute node can write into it
    /// and this machine can read that back. `extra` are the first stage's
    /// partition and `sbatch` arguments (an account the cluster requires).
    /// `false` if interrupted (the probe job is cancelled).
    async fn check_shared(&self, slurm: &Slurm, dir: &SlurmDir, extra: &[String], signals: &mut Signals) -> anyhow::Result<bool> {
        if dir.shared_marker().exists() {
            return Ok(true);
        }
        let root = self.store.root().display().to_string();
        self.reporter.note("checking that the compute nodes see this cache (one short probe job, once per cache)");
        std::fs::create_dir_all(dir.probe_dir())?;
        let marker = dir.probe_dir().join(format!("{}-{}", unix_ms(), std::process::id()));
        let quoted = shell_quote(&marker.display().to_string());
        let command = format!("hostname > {quoted}.tmp && mv {quoted}.tmp {quoted}");
        let mut args = vec!["--job-name=swift-probe".to_string(), "--output=/dev/null".into(), "--time=5".into(), "--cpus-per-task=1".into(), "--chdir=/".into()];
        args.extend_from_slice(extra);
        let id = slurm.submit_wrap(&args, &command).context("cannot submit the shared-cache probe job")?;
        let timeout = self.pipeline.manifest.pipeline.slurm.probe_timeout.unwrap_or(DEFAULT_PROBE_TIMEOUT);
        let started = Instant::now();
        let mut ended: Option<(Instant, String)> = None;
        while !marker.exists() {
            if ended.is_none() && !slurm.states(std::slice::from_ref(&id))?.get(&id).is_some_and(JobState::is_live) {
                let how = slurm.describe(&id).unwrap_or_else(|| "Slurm no longer knows it".to_string());
                if !how.starts_with("COMPLETED") {
                    bail!("the shared-cache probe job {id} did not complete: {how}\n  the first stage's partition and `sbatch` arguments were used; check them with `sbatch --wrap true`");
                }
                ended = Some((Instant::now(), how));
            }
            match &ended {
                // A completed probe's file may show late on a shared filesystem.
                Some((when, how)) if when.elapsed() >= PROBE_VISIBILITY_GRACE => bail!(
                    "the cache at {root} is not shared with the compute nodes: probe job {id} ended ({how}), but what it wrote into the cache \
                     cannot be seen from this machine\n  put the cache on a filesystem every node mounts at the same path (`--cache DIR` or SWIFT_CACHE)"
                ),
                None if started.elapsed() > timeout => {
                    slurm.cancel(std::slice::from_ref(&id));
                    bail!(
                        "the shared-cache probe job {id} did not run within {}: the queue is busy\n  run again later, or raise `[pipeline.slurm] probe_timeout`",
                        humantime::format_duration(timeout)
                    );
                }
                _ => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                _ = signals.next() => {
                    slurm.cancel(std::slice::from_ref(&id));
                    return Ok(false);
                }
            }
        }
        let node = std::fs::read_to_string(&marker).unwrap_or_default().trim().to_string();
        let _ = std::fs::remove_file(&marker);
        files::write_json(&dir.shared_marker(), &serde_json::json!({"checked_unix_ms": unix_ms(), "job": id, "node": node}))?;
        Ok(true)
    }

    /// Submits every miss in run order (or adopts a live job computing the
    /// same recipe), holding the cache's submission lock. `None` if
    /// `interrupted` said so on the way (what was submitted is cancelled).
    fn submit(&self, sub: &Submitter<'_>, misses: &BTreeSet<usize>, interrupted: &mut dyn FnMut() -> bool) -> anyhow::Result<Option<HashMap<usize, Job>>> {
        let pipeline = &self.pipeline;
        let _lock = sub.dir.submit_lock().context("cannot take the cache's Slurm submission lock")?;
        let live = sub.slurm.live_jobs("swift-", &sub.dir.runs())?;
        let mut jobs: HashMap<usize, Job> = HashMap::new();
        for &i in pipeline.order.iter().filter(|i| misses.contains(i)) {
            if interrupted() {
                sub.slurm.cancel(&own_ids(&jobs));
                return Ok(None);
            }
            let node = &pipeline.nodes[i];
            // A live job is adopted only if it waits on nothing this run submits anew.
            let parents_adopted = node.deps().all(|d| jobs.get(&d).is_none_or(|j| j.adopted));
            if let (Some(id), false, true) = (live.get(&sub.name(i)), self.forced.contains(&i), parents_adopted) {
                self.reporter.note(&format!("{}: waiting on job {id}, which another `swift run` submitted", node.name));
                jobs.insert(i, Job { id: id.clone(), log: sub.log(i, id), adopted: true, seen_running: false, ended: None });
                continue;
            }
            let parents: Vec<String> = node.deps().filter_map(|d| jobs.get(&d)).map(|j| j.id.clone()).collect();
            match self.submit_one(sub, i, &parents) {
                Ok(job) => {
                    jobs.insert(i, job);
                }
                Err(error) => {
                    sub.slurm.cancel(&own_ids(&jobs));
                    return Err(error.context(format!("cannot submit stage `{}` (jobs this run had submitted are cancelled)", node.name)));
                }
            }
        }
        Ok(Some(jobs))
    }

    /// Writes a stage's batch script and submits it after `parents` (job ids).
    fn submit_one(&self, sub: &Submitter<'_>, i: usize, parents: &[String]) -> anyhow::Result<Job> {
        let node = &self.pipeline.nodes[i];
        let script = sub.plan.with_file_name(format!("{}.sh", node.name));
        let processes = sub.resource_args[&i].iter().any(|a| a.starts_with("--ntasks-per-node="));
        let swift = Invocation { exe: &sub.exe, cache: &std::path::absolute(self.store.root())?, offline: self.options.offline, plan: sub.plan };
        std::fs::write(&script, batch_script(&swift, &node.name, &self.pipeline.manifest.name, processes))
            .with_context(|| format!("cannot write {}", script.display()))?;
        let pattern = sub.log(i, "%j");
        let mut args = sub.resource_args[&i].clone();
        args.push(format!("--job-name={}", sub.name(i)));
        args.push(format!("--output={}", pattern.display()));
        args.push(format!("--chdir={}", self.pipeline.manifest.root.display()));
        args.push("--kill-on-invalid-dep=yes".to_string());
        let parents: BTreeSet<&String> = parents.iter().collect();
        if !parents.is_empty() {
            args.push(format!("--dependency=afterok:{}", parents.into_iter().cloned().collect::<Vec<_>>().join(":")));
        }
        std::fs::create_dir_all(pattern.parent().expect("logs folder"))?;
        let id = sub.slurm.submit(&args, &script)?;
        self.reporter.note(&format!("{}: submitted job {id}", node.name));
        Ok(Job { log: sub.log(i, &id), id, adopted: false, seen_running: false, ended: None })
    }

    /// An adopted job ended without the stage (its own run cancelled it):
    /// submit the stage again as this run's own, after its parents' pending
    /// jobs, unless another run already did (then wait on that one).
    fn take_over(&self, sub: &Submitter<'_>, i: usize, jobs: &HashMap<usize, Job>, states: &[State]) -> anyhow::Result<Job> {
        let _lock = sub.dir.submit_lock().context("cannot take the cache's Slurm submission lock")?;
        if let Some(id) = sub.slurm.live_jobs("swift-", &sub.dir.runs())?.get(&sub.name(i)) {
            return Ok(Job { id: id.clone(), log: sub.log(i, id), adopted: true, seen_running: false, ended: None });
        }
        let node = &self.pipeline.nodes[i];
        let parents: Vec<String> = node.deps().filter(|&d| matches!(states[d], State::Pending)).filter_map(|d| jobs.get(&d)).map(|j| j.id.clone()).collect();
        self.reporter.note(&format!("{}: the job this run waited on ended without it; submitting it again", node.name));
        self.submit_one(sub, i, &parents)
    }

    /// Polls the cache and the queue until every job settled; `true` if Ctrl-C stopped it.
    #[allow(clippy::too_many_arguments)]
    async fn wait(
        &self,
        sub: &Submitter<'_>,
        mut jobs: HashMap<usize, Job>,
        submitted_unix_ms: u64,
        states: &mut [State],
        outputs: &mut [Option<indexmap::IndexMap<String, Artifact>>],
        signals: &mut Signals,
        journal: &Journal,
    ) -> anyhow::Result<bool> {
        let pipeline = self.pipeline.clone();
        let (slurm, dir) = (sub.slurm, sub.dir);
        let poll = pipeline.manifest.pipeline.slurm.poll.unwrap_or(DEFAULT_POLL);
        let mut squeue_failures = 0;
        loop {
            let pending: Vec<usize> = pipeline.order.iter().copied().filter(|i| jobs.contains_key(i) && matches!(states[*i], State::Pending)).collect();
            if pending.is_empty() {
                return Ok(false);
            }
            let ids: Vec<String> = pending.iter().map(|i| jobs[i].id.clone()).collect();
            let queue = match slurm.states(&ids) {
                Ok(queue) => {
                    squeue_failures = 0;
                    Some(queue)
                }
                Err(e) if squeue_failures < MAX_SQUEUE_FAILURES => {
                    squeue_failures += 1;
                    self.reporter.note(&format!("squeue failed (trying again): {e:#}"));
                    None
                }
                Err(e) => {
                    self.cancel_rest(slurm, &mut jobs, states, "");
                    return Err(e.context(format!("squeue failed {MAX_SQUEUE_FAILURES} times in a row; this run's jobs are cancelled")));
                }
            };
            let mut failed: Option<String> = None;
            for &i in &pending {
                let node = &pipeline.nodes[i];
                if let Some(dep) = node.deps().find(|&d| matches!(states[d], State::Failed { .. } | State::Skipped(_))) {
                    // Slurm drops a job whose parent failed; a parent that
                    // failed only in swift's eyes (publish) needs a cancel.
                    if !jobs[&i].adopted {
                        slurm.cancel(std::slice::from_ref(&jobs[&i].id));
                    }
                    let why = format!("upstream stage `{}` did not complete", pipeline.nodes[dep].name);
                    self.settle(i, State::Skipped(why), states, outputs);
                    continue;
                }
                let ready = node.deps().all(|d| matches!(states[d], State::Done { .. }));
                let key = ready.then(|| self.key(i, outputs));
                let job = jobs.get_mut(&i).expect("pending stages have jobs");
                let state = match key.and_then(|key| self.completed(dir, job, &key, submitted_unix_ms, journal, i)) {
                    Some(state) => state,
                    None => {
                        let Some(queue) = &queue else { continue };
                        match queue.get(&job.id) {
                            Some(state) if state.is_live() => {
                                if state.is_running() && !job.seen_running {
                                    job.seen_running = true;
                                    self.reporter.stage_started(&node.name, &node.kind);
                                }
                                continue;
                            }
                            ended => {
                                let ended = ended.map(|state| format!("{} ({})", state.state, state.reason)).or_else(|| slurm.describe(&job.id));
                                // Cancelled by the run that owned it (its stage then records
                                // `interrupted`), or gone without a word: not this stage's failure.
                                let cancelled = ended.as_deref().is_some_and(|h| h.starts_with("CANCELLED"));
                                let silent = dir.result(&job.id).is_none() && !ended.as_deref().is_some_and(|h| h.starts_with("COMPLETED"));
                                if job.adopted && (cancelled || silent) {
                                    // This run carries on alone, once no parent still waits on a
                                    // job of that run (a new job must not depend on one going away).
                                    let parent_adopted = node.deps().any(|d| matches!(states[d], State::Pending) && jobs.get(&d).is_some_and(|j| j.adopted));
                                    if parent_adopted {
                                        continue;
                                    }
                                    let taken = self.take_over(sub, i, &jobs, states);
                                    match taken {
                                        Ok(new) => {
                                            jobs.insert(i, new);
                                            continue;
                                        }
                                        Err(error) => State::Failed { key, error: format!("{error:#}"), seconds: 0.0 },
                                    }
                                } else {
                                    match self.ended_without_entry(dir, job, key, ended) {
                                        Some(state) => state,
                                        None => continue,
                                    }
                                }
                            }
                        }
                    }
                };
                self.settle(i, state, states, outputs);
                if matches!(states[i], State::Failed { .. }) {
                    failed.get_or_insert_with(|| node.name.clone());
                }
            }
            if let Some(stage) = failed {
                self.cancel_rest(slurm, &mut jobs, states, &format!("cancelled: stage `{stage}` failed"));
                return Ok(false);
            }
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = signals.next() => {
                    self.reporter.note("interrupted: cancelling this run's Slurm jobs");
                    self.cancel_rest(slurm, &mut jobs, states, "");
                    return Ok(true);
                }
            }
        }
    }

    /// A job Slurm says ended (`how`: its state, or `None` once Slurm forgot
    /// it) while its entry is not to be seen: the stage failed, unless the job
    /// says it stored the entry, which a shared filesystem may show late
    /// (then `None`: look again, for up to [`VISIBILITY_GRACE`]).
    fn ended_without_entry(&self, dir: &SlurmDir, job: &mut Job, key: Option<StageKey>, how: Option<String>) -> Option<State> {
        let result = dir.result(&job.id);
        let stored = result.as_ref().is_some_and(|r| r.status == "ran" || r.status == "cached")
            || how.as_deref().is_some_and(|h| h.starts_with("COMPLETED"));
        let ended = *job.ended.get_or_insert_with(Instant::now);
        if stored && ended.elapsed() < VISIBILITY_GRACE {
            return None;
        }
        let how = match how {
            Some(state) => format!("ended {state}"),
            None => "is gone from Slurm's memory".to_string(),
        };
        let error = match &result {
            Some(result) if result.status == "failed" => result.error.clone().unwrap_or_default(),
            Some(_) if stored => format!(
                "Slurm job {} {how} and says it stored the stage, but its entry is not in the cache {}s later (is the cache on a shared filesystem every node sees at once?)",
                job.id,
                VISIBILITY_GRACE.as_secs()
            ),
            _ => format!("Slurm job {} {how} without storing the stage", job.id),
        };
        let error = format!("{error}\n  log: {}{}", job.log.display(), log_tail(&job.log));
        Some(State::Failed { key, error, seconds: result.map_or(0.0, |r| r.seconds) })
    }

    /// The stage's state if its entry is in the cache: `ran` if its job
    /// stored it, `cached` if it was there before (the job then finds it too).
    /// A job that recorded a failure is not done, whatever entry exists; a
    /// forced stage waits for an entry its job wrote.
    fn completed(&self, dir: &SlurmDir, job: &Job, key: &StageKey, submitted_unix_ms: u64, journal: &Journal, i: usize) -> Option<State> {
        let result = dir.result(&job.id);
        if result.as_ref().is_some_and(|r| r.status == "failed") {
            return None;
        }
        let (entry, paths) = lookup(&self.store, key)?;
        let earlier = entry.provenance.started_unix_ms < submitted_unix_ms;
        if earlier && self.forced.contains(&i) {
            return None; // `--force`: wait for the entry its job writes
        }
        let cached = match &result {
            Some(result) => result.status == "cached",
            None => earlier,
        };
        let seconds = result.map_or(entry.provenance.seconds, |r| r.seconds);
        let status = if cached { StageStatus::Cached } else { StageStatus::Ran };
        if status == StageStatus::Ran {
            if let Err(e) = journal.stage_ran(&self.pipeline.nodes[i], &entry, seconds) {
                self.reporter.note(&format!("could not update the run record: {e}"));
            }
        }
        Some(State::Done { status, entry, paths, seconds })
    }

    /// Cancels the unfinished jobs this run submitted; their stages are
    /// skipped with `why` (or left pending, reported as interrupted, when empty).
    fn cancel_rest(&self, slurm: &Slurm, jobs: &mut HashMap<usize, Job>, states: &mut [State], why: &str) {
        jobs.retain(|&i, _| matches!(states[i], State::Pending));
        slurm.cancel(&own_ids(jobs));
        if !why.is_empty() {
            for (&i, job) in jobs.iter() {
                let why = if job.adopted {
                    format!("not waited for ({why}); its job {} belongs to another `swift run` and keeps running", job.id)
                } else {
                    why.to_string()
                };
                states[i] = State::Skipped(why);
                announce(&self.pipeline, &*self.reporter, i, &states[i]);
            }
        }
    }
}

/// What submitting a stage needs, shared by the first submission and a
/// take-over while waiting.
struct Submitter<'a> {
    slurm: &'a Slurm,
    dir: &'a SlurmDir,
    recipes: &'a HashMap<usize, StageKey>,
    resource_args: &'a HashMap<usize, Vec<String>>,
    plan: &'a Path,
    exe: PathBuf,
    stage_names: Vec<String>,
}

impl Submitter<'_> {
    /// The job name of stage `i`.
    fn name(&self, i: usize) -> String {
        job_name(&self.stage_names[i], &self.recipes[&i])
    }

    /// Stage `i`'s log for job `id` (`%j`: Slurm's pattern).
    fn log(&self, i: usize, id: &str) -> PathBuf {
        let pattern = self.dir.log_pattern(&self.stage_names[i], &self.recipes[&i].to_hex()[..12]);
        PathBuf::from(pattern.display().to_string().replace("%j", id))
    }
}

fn own_ids(jobs: &HashMap<usize, Job>) -> Vec<String> {
    jobs.values().filter(|j| !j.adopted).map(|j| j.id.clone()).collect()
}

/// `swift-STAGE-RECIPE12`: what `squeue` shows, and how a second run finds the job.
fn job_name(stage: &str, recipe: &StageKey) -> String {
    format!("swift-{stage}-{}", &recipe.to_hex()[..12])
}

/// How a job calls swift.
struct Invocation<'a> {
    exe: &'a Path,
    cache: &'a Path,
    offline: bool,
    plan: &'a Path,
}

/// The batch script of a stage's job: swift itself on that one stage, once
/// per task through `srun` when the job runs several processes.
fn batch_script(swift: &Invocation<'_>, stage: &str, pipeline: &str, several: bool) -> String {
    let q = |p: &Path| shell_quote(&p.display().to_string());
    let pipeline: String = pipeline.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    format!(
        "#!/bin/sh\n# swift: stage `{stage}` of pipeline `{pipeline}`\n\
         # compute with the CPUs the job was given (srun does not pass --cpus-per-task on since Slurm 22.05)\n\
         if [ -n \"$SLURM_CPUS_PER_TASK\" ]; then export RAYON_NUM_THREADS=\"$SLURM_CPUS_PER_TASK\"; fi\n\
         exec {}{} --cache {}{} exec-stage{} {} {}\n",
        if several { "srun --kill-on-bad-exit=1 --cpus-per-task=\"$SLURM_CPUS_PER_TASK\" " } else { "" },
        q(swift.exe),
        q(swift.cache),
        if swift.offline { " --offline" } else { "" },
        if several { " --data-parallel" } else { "" },
        q(swift.plan),
        shell_quote(stage)
    )
}

/// `'text'` for sh, with `'` escaped.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// The last lines of a log, indented, or nothing if it cannot be read.
fn log_tail(path: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(path) else { return String::new() };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
    tail.iter().map(|l| format!("\n    | {l}")).collect()
}

/// A manifest's last submission and what Slurm (or the jobs' own records)
/// say of each job now: `PENDING`, `RUNNING`, … while Slurm knows the job,
/// else `ran`, `cached` or `failed` from the job's record, else `ended`.
pub fn last_submission(store: &Store, manifest: &Path) -> Option<(Submission, Vec<String>)> {
    let dir = SlurmDir::of(store);
    let submission = dir.submission(manifest)?;
    let ids: Vec<String> = submission.jobs.iter().map(|j| j.job.clone()).collect();
    let queue = Slurm::find().ok().and_then(|s| s.states(&ids).ok()).unwrap_or_default();
    let states = submission
        .jobs
        .iter()
        .map(|j| match (queue.get(&j.job), dir.result(&j.job)) {
            (Some(state), _) if state.is_live() => state.state.clone(),
            (_, Some(result)) => result.status,
            (Some(state), None) => state.state.clone(),
            (None, None) => "ended".to_string(),
        })
        .collect();
    Some((submission, states))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_scripts_quote_every_path() {
        let swift = Invocation { exe: Path::new("/opt/sw ift/swift"), cache: Path::new("/shared/it's"), offline: true, plan: Path::new("/c/plan.json") };
        let script = batch_script(&swift, "fine", "law", false);
        assert!(script.starts_with("#!/bin/sh\n"));
        assert!(script.contains("exec '/opt/sw ift/swift' --cache '/shared/it'\\''s' --offline exec-stage '/c/plan.json' 'fine'\n"));
        let several = batch_script(&swift, "fine", "law", true);
        assert!(several.contains("exec srun --kill-on-bad-exit=1 --cpus-per-task=\"$SLURM_CPUS_PER_TASK\" '/opt/sw ift/swift' "), "{several}");
        assert!(several.contains(" exec-stage --data-parallel "), "{several}");
        assert!(batch_script(&swift, "fine", "la\nw", false).contains("of pipeline `la w`"));
    }

    #[test]
    fn log_tails_keep_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        std::fs::write(&log, (0..40).map(|i| format!("line {i}\n")).collect::<String>()).unwrap();
        let tail = log_tail(&log);
        assert!(tail.starts_with("\n    | line 25"), "{tail}");
        assert!(tail.ends_with("| line 39"));
        assert_eq!(log_tail(&dir.path().join("missing")), "");
    }
}
