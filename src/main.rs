//! The main entry point into swift: parses the command line and hands each
//! subcommand to its module in `commands/`, which calls into the engine.

#[macro_use]
mod output;
mod commands;
mod reporters;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = commands::Cli::parse();
    let status = commands::dispatch(cli);
    ExitCode::from(status as u8)
}
