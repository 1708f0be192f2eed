//! `swift show`: one stage's outputs, metrics and provenance.

use std::path::PathBuf;

use swift_engine::status::assess;

use super::{compile_or_exit, open_store, Exit, ManifestArgs};

/// Arguments of `swift show`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    manifest: ManifestArgs,
    /// The stage to show.
    stage: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn exec(cache: Option<PathBuf>, offline: bool, args: Args) -> anyhow::Result<Exit> {
    let pipeline = match compile_or_exit(&args.manifest, args.json) {
        Ok(pipeline) => pipeline,
        Err(exit) => return Ok(exit),
    };
    let index = match pipeline.require(&args.stage) {
        Ok(index) => index,
        Err(message) => {
            eprintln!("error: {message}");
            return Ok(Exit::Invalid);
        }
    };
    let store = open_store(cache.as_deref(), &pipeline.manifest.root)?;
    let _guard = store.read_guard()?;
    let stats = store.stat_cache();
    let assessment = assess(&pipeline, &store, &stats, false, offline)?.swap_remove(index);
    let node = &pipeline.nodes[index];
    let (outputs, metrics, provenance) = match &assessment.cached {
        Some((entry, paths)) => (
            serde_json::to_value(paths)?,
            serde_json::Value::Object(entry.metrics.clone()),
            serde_json::to_value(&entry.provenance)?,
        ),
        None => (serde_json::json!({}), serde_json::json!({}), serde_json::Value::Null),
    };
    let value = serde_json::json!({
        "name": node.name,
        "kind": node.kind,
        "key": assessment.key,
        "fresh": assessment.fresh(),
        "params": node.plan.params(),
        "outputs": outputs,
        "metrics": metrics,
        "provenance": provenance,
    });
    if args.json {
        outln!("{value}");
    } else {
        outln!("{}", serde_json::to_string_pretty(&value)?);
        if !assessment.fresh() {
            let why: Vec<String> = assessment.reasons.iter().map(|r| r.sentence()).collect();
            eprintln!("stage `{}` is not in the cache: {}", node.name, why.join("; "));
        }
    }
    Ok(Exit::Success)
}
