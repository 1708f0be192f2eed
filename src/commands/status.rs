//! `swift status`: which stages are fresh, and why the others would run.

use std::path::PathBuf;

use swift_engine::status::assess;

use super::{compile_or_exit, open_store, table, Exit, ManifestArgs};

/// Arguments of `swift status`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    manifest: ManifestArgs,
    /// Hash every input again instead of trusting the stat cache.
    #[arg(long)]
    rehash: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn exec(cache: Option<PathBuf>, offline: bool, args: Args) -> anyhow::Result<Exit> {
    let pipeline = match compile_or_exit(&args.manifest, args.json) {
        Ok(pipeline) => pipeline,
        Err(exit) => return Ok(exit),
    };
    let store = open_store(cache.as_deref(), &pipeline.manifest.root)?;
    let _guard = store.read_guard()?;
    let stats = store.stat_cache();
    let assessments = assess(&pipeline, &store, &stats, args.rehash, offline)?;
    let _ = stats.save();
    let slurm = swift_engine::slurm::last_submission(&store, &pipeline.manifest.path);
    let jobs: Vec<Vec<String>> = slurm
        .iter()
        .flat_map(|(submission, states)| {
            submission.jobs.iter().zip(states).map(|(job, state)| vec![job.stage.clone(), job.job.clone(), state.clone(), job.log.display().to_string()])
        })
        .collect();
    if args.json {
        let stages: Vec<serde_json::Value> = pipeline
            .order
            .iter()
            .map(|&i| {
                let a = &assessments[i];
                serde_json::json!({
                    "name": pipeline.nodes[i].name,
                    "kind": pipeline.nodes[i].kind,
                    "key": a.key,
                    "fresh": a.fresh(),
                    "reasons": a.reasons.iter().map(|r| serde_json::json!({"kind": r.kind(), "detail": r.sentence()})).collect::<Vec<_>>(),
                })
            })
            .collect();
        let jobs: Vec<serde_json::Value> =
            jobs.iter().map(|j| serde_json::json!({"stage": j[0], "job": j[1], "state": j[2], "log": j[3]})).collect();
        outln!("{}", serde_json::json!({"pipeline": pipeline.manifest.name, "stages": stages, "slurm_jobs": jobs}));
        return Ok(Exit::Success);
    }
    let rows: Vec<Vec<String>> = pipeline
        .order
        .iter()
        .map(|&i| {
            let a = &assessments[i];
            let state = if a.fresh() { "fresh" } else { "stale" };
            let why = a.reasons.iter().map(|r| r.sentence()).collect::<Vec<_>>().join("; ");
            vec![pipeline.nodes[i].name.clone(), pipeline.nodes[i].kind.clone(), state.to_string(), why]
        })
        .collect();
    table(&mut crate::output::Stdout, &["stage", "kind", "state", "why"], &rows)?;
    if !jobs.is_empty() {
        outln!("\nSlurm jobs of the last submission:");
        table(&mut crate::output::Stdout, &["stage", "job", "state", "log"], &jobs)?;
    }
    Ok(Exit::Success)
}
