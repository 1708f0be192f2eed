//! `swift selftest --gpu` (hidden): the GPU tests, shipped in the binary that
//! runs on the GPU machine (which has no Rust toolchain). Each check runs one
//! of swift's CUDA kernels — or a whole model path on the GPU — on fresh
//! random inputs and compares it with the CPU implementation, the reference
//! every kernel is written against. A line of JSON per check goes to
//! `--out DIR/selftest.jsonl` as soon as it finishes; a table comes last, and
//! the exit code is 1 if any check failed.

use std::io::Write;
use std::path::PathBuf;

use super::Exit;

/// Arguments of `swift selftest`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Run the GPU checks (the only checks there are: the CPU ones are `cargo test`).
    #[arg(long)]
    gpu: bool,
    /// The GPU to test.
    #[arg(long, default_value = "cuda:0")]
    device: String,
    /// Write `selftest.jsonl` here, a line per check as it finishes.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Run only the checks whose name contains this.
    #[arg(long, value_name = "NAME")]
    only: Option<String>,
}

/// What one check measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Outcome {
    /// The check's name (`kernel/what/dtype`).
    pub name: String,
    /// Largest absolute difference from the CPU reference.
    pub max_abs: f64,
    /// `max_abs` over the reference's largest magnitude.
    pub rel: f64,
    /// The largest `rel` that passes.
    pub tolerance: f64,
    /// Whether it passed (an error is a failure too).
    pub passed: bool,
    /// The error, if the check could not run.
    pub error: Option<String>,
}

// The checks that build outcomes exist only in the `cuda` build.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl Outcome {
    /// A measured difference against a tolerance on `rel`.
    pub fn measured(name: &str, max_abs: f64, scale: f64, tolerance: f64) -> Self {
        let rel = if scale > 0.0 { max_abs / scale } else { max_abs };
        Self { name: name.into(), max_abs, rel, tolerance, passed: rel <= tolerance && rel.is_finite(), error: None }
    }

    /// A check that failed to run.
    pub fn failed(name: &str, error: &anyhow::Error) -> Self {
        Self { name: name.into(), max_abs: f64::NAN, rel: f64::NAN, tolerance: 0.0, passed: false, error: Some(format!("{error:#}")) }
    }
}

/// The largest absolute difference between two equally long value lists and
/// the largest magnitude of the reference: `(max_abs, scale)`. A NaN anywhere
/// counts as an infinite difference.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn difference(ours: &[f32], reference: &[f32]) -> (f64, f64) {
    if ours.len() != reference.len() {
        return (f64::INFINITY, 0.0);
    }
    let mut max_abs = 0f64;
    let mut scale = 0f64;
    for (&a, &b) in ours.iter().zip(reference) {
        let d = (a as f64 - b as f64).abs();
        max_abs = if d.is_nan() { f64::INFINITY } else { max_abs.max(d) };
        scale = scale.max((b as f64).abs());
    }
    (max_abs, scale)
}

pub fn exec(args: Args) -> anyhow::Result<Exit> {
    if !args.gpu {
        eprintln!("error: `swift selftest` runs the GPU checks: pass --gpu (the CPU tests are `cargo test`)");
        return Ok(Exit::Invalid);
    }
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)?;
    }
    let outcomes = run_checks(&args)?;
    let rows: Vec<Vec<String>> = outcomes
        .iter()
        .map(|o| {
            vec![
                o.name.clone(),
                if o.passed { "ok".into() } else { "FAILED".into() },
                format!("{:.2e}", o.rel),
                format!("{:.1e}", o.tolerance),
                o.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let mut out = crate::output::Stdout;
    super::table(&mut out, &["check", "result", "rel. error", "tolerance", "error"], &rows)?;
    let failed = outcomes.iter().filter(|o| !o.passed).count();
    writeln!(out, "{} passed, {failed} failed", outcomes.len() - failed)?;
    Ok(if failed == 0 { Exit::Success } else { Exit::Failure })
}

/// Appends one outcome to `DIR/selftest.jsonl` (best effort: results are
/// printed at the end in any case).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn record(out: Option<&std::path::Path>, outcome: &Outcome) {
    let status = if outcome.passed { "ok" } else { "FAILED" };
    eprintln!("{status:>6}  {}  (rel. error {:.2e})", outcome.name, outcome.rel);
    let Some(dir) = out else { return };
    let line = serde_json::to_string(outcome).expect("an outcome serializes");
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("selftest.jsonl"))
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = appended {
        eprintln!("warning: could not write to {}: {e}", dir.display());
    }
}

#[cfg(feature = "cuda")]
fn run_checks(args: &Args) -> anyhow::Result<Vec<Outcome>> {
    super::selftest_gpu::run(&args.device, args.out.as_deref(), args.only.as_deref())
}

#[cfg(not(feature = "cuda"))]
fn run_checks(_: &Args) -> anyhow::Result<Vec<Outcome>> {
    anyhow::bail!("this build of swift has no CUDA: build it with `cargo build --release --features cuda` (see docs/gpu.md)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_are_relative_to_the_reference_and_nan_fails() {
        let (abs, scale) = difference(&[1.0, 2.5, -4.0], &[1.0, 2.0, -4.0]);
        assert_eq!((abs, scale), (0.5, 4.0));
        let o = Outcome::measured("x", abs, scale, 0.2);
        assert!(o.passed && (o.rel - 0.125).abs() < 1e-12);
        assert!(!Outcome::measured("x", abs, scale, 0.1).passed);
        let (abs, _) = difference(&[f32::NAN], &[1.0]);
        assert!(!Outcome::measured("x", abs, 1.0, 1.0).passed);
        assert_eq!(difference(&[1.0], &[1.0, 2.0]).0, f64::INFINITY);
    }
}
