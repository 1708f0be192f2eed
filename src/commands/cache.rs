//! `swift cache …`: cache maintenance.

use std::path::PathBuf;

use swift_engine::exec::human_bytes;

use super::{open_store_here, Exit};

/// `swift cache` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Rehash every object; quarantine corrupt ones (exit 4 if any).
    Verify {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn exec(cache: Option<PathBuf>, command: Command) -> anyhow::Result<Exit> {
    let Command::Verify { json } = command;
    let store = open_store_here(cache.as_deref())?;
    let report = swift_cache::verify::verify(&store)?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("checked {} objects ({})", report.objects_checked, human_bytes(report.bytes_checked));
        for digest in &report.corrupt {
            println!("corrupt: {digest} (moved to {})", store.root().join("quarantine").display());
        }
        if !report.dropped_actions.is_empty() {
            println!("{} stage results dropped; those stages will run again", report.dropped_actions.len());
        }
    }
    Ok(if report.corrupt.is_empty() { Exit::Success } else { Exit::Corrupt })
}
