//! `swift gc`: drop what no registered lock file or recent run refers to.

use std::path::PathBuf;

use swift_cache::gc::{collect, GcError};
use swift_engine::exec::human_bytes;

use super::{open_store_here, Exit};

/// Arguments of `swift gc`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Also keep everything the N most recent runs used.
    #[arg(long, default_value_t = 5, value_name = "N")]
    keep_runs: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn exec(cache: Option<PathBuf>, args: Args) -> anyhow::Result<Exit> {
    let store = open_store_here(cache.as_deref())?;
    match collect(&store, args.keep_runs) {
        Ok(report) if args.json => outln!("{}", serde_json::to_string(&report)?),
        Ok(report) => outln!(
            "kept {} stage results, removed {} and {} objects ({} freed){}",
            report.kept_actions,
            report.removed_actions,
            report.removed_objects,
            human_bytes(report.freed_bytes),
            if report.dropped_roots > 0 { format!("; forgot {} deleted lock files", report.dropped_roots) } else { String::new() }
        ),
        Err(GcError::Io(e)) => return Err(e.into()),
        Err(other) => {
            eprintln!("error: {other}");
            return Ok(Exit::Failure);
        }
    }
    Ok(Exit::Success)
}
