//! `swift cache …`: cache maintenance.

use std::path::PathBuf;

use swift_engine::exec::human_bytes;

use super::{open_store_here, Exit};

/// `swift cache` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Rehash every object, check every entry's objects and materialized files;
    /// quarantine or drop what is broken (exit 4 if anything was).
    Verify {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn exec(cache: Option<PathBuf>, command: Command) -> anyhow::Result<Exit> {
    let Command::Verify { json } = command;
    let store = open_store_here(cache.as_deref())?;
    let report = match swift_cache::verify::verify(&store) {
        Ok(report) => report,
        Err(swift_cache::verify::VerifyError::Io(e)) => return Err(e.into()),
        Err(busy) => {
            eprintln!("error: {busy}");
            return Ok(Exit::Failure);
        }
    };
    if json {
        outln!("{}", serde_json::to_string(&report)?);
    } else {
        outln!("checked {} objects ({})", report.objects_checked, human_bytes(report.bytes_checked));
        for digest in &report.corrupt {
            outln!("corrupt: {digest} (moved to {})", store.root().join("quarantine").display());
        }
        for digest in &report.missing {
            outln!("missing: {digest}");
        }
        for dir in &report.bad_materialized {
            outln!("damaged materialized copy: {dir} (removed; rebuilt on next use)");
        }
        for file in &report.unreadable_entries {
            outln!("unreadable entry: {file} (removed)");
        }
        if !report.dropped_actions.is_empty() {
            outln!("{} stage results dropped; those stages will run again", report.dropped_actions.len());
        }
    }
    Ok(if report.is_clean() { Exit::Success } else { Exit::Corrupt })
}
