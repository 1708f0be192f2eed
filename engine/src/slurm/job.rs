//! Inside a stage's Slurm job (`swift exec-stage PLAN STAGE`): rebuild the
//! submitting run from its plan, check that nothing the stage depends on
//! changed since submission, find every upstream stage in the cache, compute
//! the stage with the same protocol as a local run (key lock, scratch folder,
//! outputs stored before the entry), and record how the job ended.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail};
use swift_cache::{Artifact, Store};

use super::files::{write_json, JobPlan, JobResult, SlurmDir};
use crate::exec::{upstream, Outcome, Signals, StageTask, State};
use crate::pipeline::Pipeline;
use crate::report::{Reporter, StageStatus};
use crate::resolve::{hash_locals, input_artifacts, key_of, lookup, recipes};
use crate::world::World;

/// Runs `stage` of the run `plan` describes and returns how it ended; inside a
/// Slurm job (`SLURM_JOB_ID` set) the result is also written where `swift run`
/// looks for it.
/// `world` is this process's place among the job's tasks (see
/// [`World::from_slurm`]; a world of one for a single-process job): rank 0
/// stores the outputs and records the result; the other ranks compute
/// alongside it (status `follower`) and record nothing.
pub fn run_job(pipeline: Arc<Pipeline>, store: Store, plan: &JobPlan, stage: &str, reporter: Arc<dyn Reporter>, world: Result<World, String>) -> JobResult {
    let started = Instant::now();
    let leader = world.as_ref().map_or(true, World::is_leader);
    let outcome = world.map_err(|e| (None, anyhow!("cannot place this task among the job's processes: {e}")))
        .and_then(|world| compute(&pipeline, &store, plan, stage, reporter, world));
    let (status, key, error) = match outcome {
        Ok((status, key)) => (status, Some(key), None),
        Err((key, error)) => ("failed", key, Some(format!("{error:#}"))),
    };
    let result = JobResult { stage: stage.to_string(), status: status.to_string(), key, error, seconds: started.elapsed().as_secs_f64() };
    if let (true, Ok(job)) = (leader, std::env::var("SLURM_JOB_ID")) {
        if let Err(e) = write_json(&SlurmDir::of(&store).result_path(&job), &result) {
            eprintln!("warning: cannot record the job's result: {e}");
        }
    }
    result
}

type Failure = (Option<String>, anyhow::Error);

fn compute(
    pipeline: &Arc<Pipeline>,
    store: &Store,
    plan: &JobPlan,
    stage: &str,
    reporter: Arc<dyn Reporter>,
    world: World,
) -> Result<(&'static str, String), Failure> {
    let fail = |e: anyhow::Error| (None, e);
    let _guard = store.run_guard().map_err(|e| fail(e.into()))?;
    let index = pipeline.require(stage).map_err(|e| fail(anyhow!(e)))?;
    let needed = pipeline.with_ancestors(index);
    let n = pipeline.nodes.len();
    let mut revisions = vec![None; n];
    for &i in &needed {
        revisions[i] = plan.revisions.get(&pipeline.nodes[i].name).cloned().flatten();
    }
    let stats = store.stat_cache();
    let (locals, _) = hash_locals(pipeline, needed.iter().copied(), &stats, false).map_err(fail)?;
    let _ = stats.save();
    let recipes = recipes(pipeline, &needed, &revisions, &locals);
    if plan.recipes.get(stage) != Some(&recipes[&index].to_hex()) {
        return Err(fail(anyhow!(
            "stage `{stage}` changed after `swift run` submitted this job (the manifest, a local input or an upstream revision differs); \
             nothing was computed: run `swift run` again"
        )));
    }

    let mut states: Vec<State> = (0..n).map(|_| State::Pending).collect();
    let mut outputs: Vec<Option<indexmap::IndexMap<String, Artifact>>> = vec![None; n];
    for &i in pipeline.order.iter().filter(|&&i| i != index && needed.contains(&i)) {
        let inputs = input_artifacts(pipeline, i, &locals, &outputs).expect("ancestors come first");
        let key = key_of(pipeline, i, revisions[i].as_deref(), &inputs);
        let Some((entry, paths)) = lookup(store, &key) else {
            return Err(fail(anyhow!(
                "stage `{stage}` needs stage `{}`, which is not in the cache (its job did not store it; see its log under {})",
                pipeline.nodes[i].name,
                store.root().join("slurm/logs").display()
            )));
        };
        outputs[i] = Some(entry.outputs.clone());
        states[i] = State::Done { status: StageStatus::Cached, entry, paths, seconds: 0.0 };
    }
    let inputs = input_artifacts(pipeline, index, &locals, &outputs).expect("ancestors are done");
    let key = key_of(pipeline, index, revisions[index].as_deref(), &inputs);

    let cancel = Arc::new(AtomicBool::new(false));
    watch_signals(cancel.clone()).map_err(|e| fail(e.into()))?;
    let task = StageTask {
        pipeline: pipeline.clone(),
        store: store.clone(),
        reporter,
        locals: Arc::new(locals),
        revision: revisions[index].clone(),
        offline: plan.offline,
        index,
        key,
        inputs,
        force: plan.forced.iter().any(|s| s == stage),
        device: pipeline.nodes[index].plan.resource().device().to_string(),
        upstream: upstream(pipeline, index, &states),
        world: world.clone(),
        cancel,
    };
    if !world.is_leader() {
        if !task.force && lookup(store, &key).is_some() {
            return Ok(("cached", key.to_hex()));
        }
        task.follow().map_err(|e| (Some(key.to_hex()), e))?;
        return Ok(("follower", key.to_hex()));
    }
    match task.execute() {
        Outcome::Done { reused, .. } => Ok((if reused { "cached" } else { "ran" }, key.to_hex())),
        Outcome::Failed { error, .. } => Err((Some(key.to_hex()), anyhow!(error))),
    }
}

/// Sets `cancel` on SIGTERM or SIGINT (what `scancel` and a time limit send),
/// so the stage stops at its next check and nothing half-done is stored.
fn watch_signals(cancel: Arc<AtomicBool>) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut signals = {
        let _context = runtime.enter();
        Signals::new()?
    };
    std::thread::spawn(move || {
        runtime.block_on(async move {
            signals.next().await;
            eprintln!("swift: stopping the stage (signal received)");
            cancel.store(true, Ordering::Relaxed);
        })
    });
    Ok(())
}

/// Fails unless `result` says the stage is in the cache (or, for a rank
/// other than 0, that it computed its share).
pub fn check(result: &JobResult) -> anyhow::Result<()> {
    match result.status.as_str() {
        "ran" | "cached" | "follower" => Ok(()),
        _ => bail!("{}", result.error.as_deref().unwrap_or("the stage failed")),
    }
}
