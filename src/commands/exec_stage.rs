//! `swift exec-stage PLAN STAGE` (hidden): what a Slurm job runs. It computes
//! one stage of a run that `swift run --executor slurm` submitted, writing into
//! the shared cache with the same protocol as a local run.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use swift_engine::exec::hostname;
use swift_engine::slurm::{job, JobPlan};
use swift_engine::world::World;
use swift_engine::{LoadOptions, Manifest, Pipeline};

use super::{open_store, Exit};
use crate::reporters;

/// Arguments of `swift exec-stage`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The run's plan (`slurm/runs/RUN/plan.json` in the cache).
    plan: PathBuf,
    /// The stage to compute.
    stage: String,
    /// This is one of several tasks `srun` started: take the rank from
    /// Slurm's variables and train data-parallel.
    #[arg(long)]
    data_parallel: bool,
}

pub fn exec(cache: Option<PathBuf>, args: Args) -> anyhow::Result<Exit> {
    let text = std::fs::read(&args.plan).with_context(|| format!("cannot read the run plan {}", args.plan.display()))?;
    let plan: JobPlan = serde_json::from_slice(&text).with_context(|| format!("{} is not a swift run plan", args.plan.display()))?;
    let manifest = Manifest::load(&plan.manifest, &LoadOptions { sets: plan.sets.clone(), env: None, device: plan.device.clone() })?;
    let pipeline = Arc::new(Pipeline::compile(manifest, &swift_stages::registry())?);
    let store = open_store(cache.as_deref(), &pipeline.manifest.root)?;
    let world = if args.data_parallel { World::from_slurm(&std::env::vars().collect()) } else { Ok(World::single()) };
    let (rank, size) = world.as_ref().map_or((0, 1), |w| (w.rank, w.size));
    let place = if size > 1 { format!(", rank {rank} of {size}") } else { String::new() };
    eprintln!("swift: stage `{}` of pipeline `{}` on {}{place}", args.stage, pipeline.manifest.name, hostname());
    let result = job::run_job(pipeline, store, &plan, &args.stage, reporters::for_terminal(), world);
    if result.status == "failed" && rank != 0 {
        // Every rank may fail alike: let rank 0 record why before `srun
        // --kill-on-bad-exit` stops it.
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    job::check(&result)?;
    eprintln!("swift: stage `{}` {} in {:.1}s", args.stage, result.status, result.seconds);
    Ok(Exit::Success)
}
