//! `swift report`: the metrics of every past run of a pipeline.

use std::path::PathBuf;

use super::{compile_or_exit, open_store, seconds, table, Exit, ManifestArgs};

/// Arguments of `swift report`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    manifest: ManifestArgs,
    /// Print JSON (one object per run).
    #[arg(long)]
    json: bool,
}

pub fn exec(cache: Option<PathBuf>, args: Args) -> anyhow::Result<Exit> {
    let pipeline = match compile_or_exit(&args.manifest, args.json) {
        Ok(pipeline) => pipeline,
        Err(exit) => return Ok(exit),
    };
    let store = open_store(cache.as_deref(), &pipeline.manifest.root)?;
    let runs: Vec<_> = store.runs()?.into_iter().filter(|r| r.manifest == pipeline.manifest.path).collect();
    if args.json {
        outln!("{}", serde_json::to_string(&runs)?);
        return Ok(Exit::Success);
    }
    if runs.is_empty() {
        outln!("no runs of {} recorded in {}", pipeline.manifest.display_path(), store.root().display());
        return Ok(Exit::Success);
    }
    let mut columns: Vec<String> = Vec::new();
    for run in &runs {
        for stage in &run.stages {
            for metric in stage.metrics.keys() {
                let column = format!("{}.{metric}", stage.name);
                if !columns.contains(&column) {
                    columns.push(column);
                }
            }
        }
    }
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|run| {
            let when = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(run.started_unix_ms));
            let ran = run.stages.iter().filter(|s| s.status == "ran").count();
            let mut row = vec![when.to_string(), if run.ok { "ok" } else { "FAILED" }.to_string(), seconds(run.seconds), ran.to_string()];
            for column in &columns {
                let (stage, metric) = column.split_once('.').expect("column is stage.metric");
                let value = run.stages.iter().find(|s| s.name == stage).and_then(|s| s.metrics.get(metric));
                row.push(value.map_or(String::new(), |v| v.to_string()));
            }
            row
        })
        .collect();
    let mut header = vec!["started", "result", "time", "ran"];
    header.extend(columns.iter().map(String::as_str));
    table(&mut crate::output::Stdout, &header, &rows)?;
    Ok(Exit::Success)
}
