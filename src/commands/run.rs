//! `swift run`: run a pipeline.

use std::io::Write;
use std::path::PathBuf;

use swift_engine::report::{RunReport, StageStatus};
use swift_engine::placement::Executor;
use swift_engine::{RunError, RunOptions};

use super::{compile_or_exit, open_store, seconds, table, Exit, ManifestArgs};
use crate::reporters;

/// Arguments of `swift run`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    manifest: ManifestArgs,
    /// Run this stage even if it is cached (repeatable).
    #[arg(long, value_name = "STAGE")]
    force: Vec<String>,
    /// Run only this stage and the stages it needs (repeatable).
    #[arg(long, value_name = "STAGE")]
    only: Vec<String>,
    /// Stop after this stage: stages that depend on it are skipped.
    #[arg(long, value_name = "STAGE")]
    until: Option<String>,
    /// Say what would run, run nothing.
    #[arg(long)]
    dry_run: bool,
    /// Require local inputs and parameters to match the lock file; never write it.
    #[arg(long)]
    locked: bool,
    /// Hash every input again instead of trusting the stat cache.
    #[arg(long)]
    rehash: bool,
    /// How many CPU stages may run at once (default: the number of cores).
    #[arg(long, short = 'j', value_name = "N")]
    jobs: Option<usize>,
    /// Where missed stages run: `local` or `slurm` (default: `[pipeline] executor`).
    #[arg(long, value_name = "EXECUTOR")]
    executor: Option<Executor>,
    /// With the Slurm executor: return once every job is submitted
    /// (`swift status` shows them later).
    #[arg(long)]
    detach: bool,
    /// Print one JSON object on stdout's last line (logs go to stderr).
    #[arg(long)]
    json: bool,
}

pub fn exec(cache: Option<PathBuf>, offline: bool, args: Args) -> anyhow::Result<Exit> {
    let json = args.json;
    let result = run(cache, offline, args);
    if let (true, Err(error)) = (json, &result) {
        // Runtime errors too end in one JSON object on stdout with --json.
        outln!("{}", serde_json::json!({"ok": false, "error": {"file": "", "line": 0, "column": 0, "message": format!("{error:#}")}}));
    }
    result
}

fn run(cache: Option<PathBuf>, offline: bool, args: Args) -> anyhow::Result<Exit> {
    let pipeline = match compile_or_exit(&args.manifest, args.json) {
        Ok(pipeline) => pipeline,
        Err(exit) => return Ok(exit),
    };
    let executor = args.executor.unwrap_or(pipeline.manifest.pipeline.executor);
    if args.detach && executor != Executor::Slurm {
        eprintln!("error: --detach needs the Slurm executor (`--executor slurm` or `[pipeline] executor = \"slurm\"`)");
        return Ok(Exit::Invalid);
    }
    let store = open_store(cache.as_deref(), &pipeline.manifest.root)?;
    let options = RunOptions {
        only: args.only,
        until: args.until,
        force: args.force,
        dry_run: args.dry_run,
        locked: args.locked,
        rehash: args.rehash,
        jobs: args.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
        offline,
        executor,
        detach: args.detach,
        sets: args.manifest.sets.clone(),
    };
    let reporter = reporters::for_terminal();
    let report = match swift_engine::run(pipeline.clone(), store, &options, reporter.clone()) {
        Ok(report) => report,
        Err(RunError::Usage(message)) => {
            if args.json {
                outln!("{}", serde_json::json!({"ok": false, "error": {"file": "", "line": 0, "column": 0, "message": message}}));
            }
            eprintln!("error: {message}");
            return Ok(Exit::Invalid);
        }
        Err(RunError::Locked(problems)) => {
            if args.json {
                outln!("{}", serde_json::json!({"pipeline": pipeline.manifest.name, "ok": false, "locked_mismatch": problems}));
            }
            eprintln!("error: --locked: the run does not match {}:", pipeline.manifest.lock_path().display());
            for problem in &problems {
                eprintln!("  {problem}");
            }
            return Ok(Exit::LockMismatch);
        }
        Err(RunError::Other(error)) => return Err(error),
    };
    reporter.finish();
    let lock_path = pipeline.manifest.lock_path();
    let lock = lock_path.strip_prefix(&pipeline.manifest.root).unwrap_or(&lock_path);
    if args.json {
        summary(&mut std::io::stderr(), &report, lock, args.dry_run)?;
        outln!("{}", serde_json::to_string(&report)?);
    } else {
        summary(&mut crate::output::Stdout, &report, lock, args.dry_run)?;
    }
    Ok(if report.interrupted {
        Exit::Interrupted
    } else if report.ok {
        Exit::Success
    } else {
        Exit::Failure
    })
}

fn summary(out: &mut dyn Write, report: &RunReport, lock: &std::path::Path, dry_run: bool) -> std::io::Result<()> {
    let rows: Vec<Vec<String>> = report
        .stages
        .iter()
        .map(|s| {
            let detail = match (&s.error, s.metrics.is_empty()) {
                (Some(error), _) => error.lines().next().unwrap_or_default().to_string(),
                (None, false) => s.metrics.iter().take(4).map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" "),
                (None, true) => String::new(),
            };
            vec![
                s.name.clone(),
                s.kind.clone(),
                s.status.as_str().to_string(),
                seconds(s.seconds),
                s.key.map_or("-".to_string(), |k| k.to_hex()[..12].to_string()),
                s.job.as_ref().map_or(detail, |job| format!("job {job}")),
            ]
        })
        .collect();
    table(out, &["stage", "kind", "status", "time", "key", "detail"], &rows)?;
    let count = |status: StageStatus| report.stages.iter().filter(|s| s.status == status).count();
    let verdict = if report.interrupted {
        "interrupted"
    } else if report.ok {
        "ok"
    } else {
        "FAILED"
    };
    write!(
        out,
        "{verdict}: {} ran, {} cached, {} failed",
        count(StageStatus::Ran),
        count(StageStatus::Cached),
        count(StageStatus::Failed)
    )?;
    if dry_run {
        write!(out, ", {} would run", count(StageStatus::WouldRun))?;
    }
    let submitted = count(StageStatus::Queued) + count(StageStatus::Running);
    if submitted > 0 {
        write!(out, ", {submitted} submitted to Slurm (see `swift status`)")?;
    }
    writeln!(out, " in {}", seconds(report.seconds))?;
    if report.lock_written {
        writeln!(out, "lock file updated: {}", lock.display())?;
    }
    Ok(())
}
