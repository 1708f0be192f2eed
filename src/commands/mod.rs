//! The command line: one module per subcommand, each with its arguments and an
//! `exec` that calls one engine operation; this file holds the dispatch table,
//! the exit codes and what every command shares (loading a manifest, opening
//! the cache, printing errors).

mod bench;
mod bench_eval;
mod bench_finetune;
mod bench_quantize;
mod bench_generate;
mod bench_gpu;
mod bench_preprocess;
mod cache;
mod dag;
mod exec_stage;
mod gc;
mod generate;
mod generate_file;
mod report;
mod run;
mod selftest;
#[cfg(feature = "cuda")]
mod selftest_gpu;
mod show;
mod status;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Parser, Subcommand};
use swift_cache::Store;
use swift_engine::{LoadOptions, Manifest, ManifestError, Pipeline};

/// swift: reproducible LLM fine-tuning pipelines from a TOML manifest.
#[derive(Debug, Parser)]
#[command(name = "swift", version, about, propagate_version = true)]
pub struct Cli {
    /// Cache folder (default: `.swift/` at the project root).
    #[arg(long, global = true, env = "SWIFT_CACHE", value_name = "DIR")]
    cache: Option<PathBuf>,
    /// No network: Hub revisions and files come from the Hugging Face cache
    /// (also HF_HUB_OFFLINE=1).
    #[arg(long, global = true)]
    offline: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a pipeline: compute what is missing, reuse what is cached.
    Run(run::Args),
    /// Show which stages are fresh and why the others would run.
    Status(status::Args),
    /// Print the stage graph (text, or Graphviz with --dot).
    Dag(dag::Args),
    /// Show one stage's outputs, metrics and provenance.
    Show(show::Args),
    /// Print the metrics of past runs of a pipeline.
    Report(report::Args),
    /// Remove cache entries no lock file or recent run refers to.
    Gc(gc::Args),
    /// Generate text with a model folder or a stage's model.
    Generate(generate::Args),
    /// Cache maintenance.
    #[command(subcommand)]
    Cache(cache::Command),
    /// Benchmarks whose figures go into docs/PERFORMANCE.md.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Compute one stage of a submitted run (what a Slurm job runs).
    #[command(hide = true)]
    ExecStage(exec_stage::Args),
    /// Check every CUDA kernel and the GPU model paths against the CPU (`--gpu`).
    #[command(hide = true)]
    Selftest(selftest::Args),
}

/// swift's exit codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Everything succeeded.
    Success = 0,
    /// A stage failed (or another runtime error).
    Failure = 1,
    /// Invalid manifest or usage.
    Invalid = 2,
    /// `--locked` found a mismatch.
    LockMismatch = 3,
    /// `cache verify` found corruption.
    Corrupt = 4,
    /// Interrupted by Ctrl-C.
    Interrupted = 130,
}

/// Runs the parsed command.
pub fn dispatch(cli: Cli) -> Exit {
    let cache = cli.cache;
    let offline = cli.offline;
    let result = match cli.command {
        Command::Run(args) => run::exec(cache, offline, args),
        Command::Status(args) => status::exec(cache, offline, args),
        Command::Dag(args) => dag::exec(args),
        Command::Show(args) => show::exec(cache, offline, args),
        Command::Report(args) => report::exec(cache, args),
        Command::Gc(args) => gc::exec(cache, args),
        Command::Generate(args) => generate::exec(cache, offline, args),
        Command::Cache(command) => cache::exec(cache, command),
        Command::Bench(command) => bench::exec(command),
        Command::ExecStage(args) => exec_stage::exec(cache, args),
        Command::Selftest(args) => selftest::exec(args),
    };
    match result {
        Ok(exit) => exit,
        Err(error) => {
            eprintln!("error: {error:#}");
            Exit::Failure
        }
    }
}

/// Manifest-reading arguments shared by commands.
#[derive(Debug, clap::Args)]
pub struct ManifestArgs {
    /// The pipeline manifest (TOML).
    pub manifest: PathBuf,
    /// Override a manifest key, e.g. `--set stages.coarse.lora.rank=32`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// The device of every stage that computes on one: `auto`, `cpu`, `cuda:N`
    /// (over the manifest's `device` keys).
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<String>,
}

impl ManifestArgs {
    /// Loads and compiles the manifest.
    pub fn compile(&self) -> Result<Pipeline, ManifestError> {
        let options = LoadOptions { sets: self.sets.clone(), env: None, device: self.device.clone() };
        let manifest = Manifest::load(&self.manifest, &options)?;
        Pipeline::compile(manifest, &swift_stages::registry())
    }
}

/// Prints a manifest error (as JSON on stdout when asked) and gives exit 2.
pub fn invalid(error: &ManifestError, json: bool) -> Exit {
    if json {
        let value = serde_json::json!({
            "ok": false,
            "error": {
                "file": error.file.display().to_string(),
                "line": error.line,
                "column": error.column,
                "message": error.full_message(),
            }
        });
        outln!("{value}");
    }
    eprintln!("error: {error}");
    Exit::Invalid
}

/// Compiles a manifest or reports why not; `Err` carries the exit code.
pub fn compile_or_exit(args: &ManifestArgs, json: bool) -> Result<Arc<Pipeline>, Exit> {
    args.compile().map(Arc::new).map_err(|e| invalid(&e, json))
}

/// The cache folder: `--cache`/`SWIFT_CACHE`, else `.swift/` at the project root.
pub fn open_store(cache: Option<&Path>, project_root: &Path) -> anyhow::Result<Store> {
    let dir = cache.map_or_else(|| project_root.join(".swift"), Path::to_path_buf);
    let store = Store::open(&dir).map_err(|e| anyhow::anyhow!("cannot open the cache at {}: {e}", dir.display()))?;
    let ignore = store.root().join(".gitignore");
    if !ignore.exists() {
        // Keeps the cache out of git without touching the user's .gitignore.
        swift_cache::atomic::write_atomic(&ignore, b"# Written by swift: this folder is a cache.\n*\n")?;
    }
    Ok(store)
}

/// The store for commands without a manifest: the project around the current folder.
pub fn open_store_here(cache: Option<&Path>) -> anyhow::Result<Store> {
    let cwd = std::env::current_dir()?;
    open_store(cache, &swift_engine::manifest::project_root(&cwd))
}

/// Seconds as `0.04s`, `12.3s`, `3m 05s`.
pub fn seconds(secs: f64) -> String {
    if secs < 60.0 {
        format!("{secs:.2}s")
    } else {
        let whole = secs.round() as u64;
        format!("{}m {:02}s", whole / 60, whole % 60)
    }
}

/// Prints rows as an aligned table.
pub fn table(out: &mut dyn std::io::Write, header: &[&str], rows: &[Vec<String>]) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let text: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        text.join("  ").trim_end().to_string()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}
