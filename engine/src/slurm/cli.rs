//! Slurm's command-line tools (`sbatch`, `squeue`, `scontrol`, `scancel`,
//! `sinfo`), called as a user would, with their errors kept whole.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// A job's state as `squeue` reports it (`PENDING`, `RUNNING`, `COMPLETED`, …)
/// and the reason Slurm gives for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobState {
    /// Slurm's state word.
    pub state: String,
    /// Slurm's reason (`None`, `Dependency`, `Resources`, …).
    pub reason: String,
}

impl JobState {
    /// Whether the job may still run.
    pub fn is_live(&self) -> bool {
        matches!(
            self.state.as_str(),
            "PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING" | "SUSPENDED" | "REQUEUED" | "REQUEUE_HOLD" | "RESIZING" | "SIGNALING" | "STAGE_OUT"
        )
    }

    /// Whether another run may wait on it: queued or running, not on its way
    /// out, and not waiting on a parent that failed (Slurm is about to drop it).
    pub fn is_adoptable(&self) -> bool {
        matches!(self.state.as_str(), "PENDING" | "RUNNING" | "CONFIGURING" | "SUSPENDED" | "REQUEUED")
            && self.reason != "DependencyNeverSatisfied"
    }

    /// Whether it is running now.
    pub fn is_running(&self) -> bool {
        matches!(self.state.as_str(), "RUNNING" | "COMPLETING")
    }
}

/// The Slurm client tools found on `PATH`.
#[derive(Clone, Debug)]
pub struct Slurm {
    sbatch: PathBuf,
}

impl Slurm {
    /// Finds `sbatch` on `PATH`, or says what to do.
    pub fn find() -> anyhow::Result<Self> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let sbatch = std::env::split_paths(&path).map(|dir| dir.join("sbatch")).find(|p| p.is_file()).ok_or_else(|| {
            anyhow::anyhow!(
                "the Slurm executor needs `sbatch`, and it is not on PATH; load your cluster's Slurm module, \
                 or run with `--executor local`"
            )
        })?;
        Ok(Self { sbatch })
    }

    /// A tool beside `sbatch` (Slurm installs them together).
    fn tool(&self, name: &str) -> PathBuf {
        self.sbatch.with_file_name(name)
    }

    /// Runs a tool; a failure carries its stderr.
    fn call(&self, name: &str, args: &[String]) -> anyhow::Result<String> {
        let program = if name == "sbatch" { self.sbatch.clone() } else { self.tool(name) };
        let output = Command::new(&program).args(args).output().with_context(|| format!("cannot run {}", program.display()))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let message = stderr.lines().map(|l| l.trim_start_matches("sbatch: ").trim()).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
            bail!("`{name} {}` failed ({}): {message}", args.join(" "), output.status);
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Submits a batch script; returns the job id (`sbatch --parsable` prints
    /// `ID` or `ID;CLUSTER`).
    pub fn submit(&self, args: &[String], script: &Path) -> anyhow::Result<String> {
        self.submit_parsable(args, script.display().to_string())
    }

    /// Submits a one-line shell command as a job.
    pub fn submit_wrap(&self, args: &[String], command: &str) -> anyhow::Result<String> {
        self.submit_parsable(args, format!("--wrap={command}"))
    }

    /// `sbatch --parsable ARGS WHAT`, and the job id it prints.
    fn submit_parsable(&self, args: &[String], what: String) -> anyhow::Result<String> {
        let mut all = vec!["--parsable".to_string()];
        all.extend_from_slice(args);
        all.push(what);
        let out = self.call("sbatch", &all)?;
        parse_job_id(&out).with_context(|| format!("sbatch printed `{}`, not a job id", out.trim()))
    }

    /// Asks the controller whether a job with these options could run
    /// (`sbatch --test-only`), without submitting anything.
    pub fn test_only(&self, args: &[String]) -> anyhow::Result<()> {
        let mut all = vec!["--test-only".to_string()];
        all.extend_from_slice(args);
        all.push("--wrap=true".to_string());
        self.call("sbatch", &all).map(|_| ())
    }

    /// The states of these jobs, by id; jobs Slurm no longer knows are absent.
    pub fn states(&self, ids: &[String]) -> anyhow::Result<HashMap<String, JobState>> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let args = ["-h".to_string(), "--states=all".to_string(), "-o".to_string(), "%i|%T|%r".to_string(), "-j".to_string(), ids.join(",")];
        match self.call("squeue", &args) {
            Ok(out) => Ok(parse_states(&out).into_iter().collect()),
            // every id purged from the controller's memory
            Err(e) if format!("{e}").contains("Invalid job id") => Ok(HashMap::new()),
            Err(e) => Err(e),
        }
    }

    /// Queued or running jobs whose names start with `prefix` and whose batch scripts lie
    /// under `scripts` (so jobs of another cache never match): name → id.
    pub fn live_jobs(&self, prefix: &str, scripts: &Path) -> anyhow::Result<HashMap<String, String>> {
        let out = self.call("squeue", &["-h".to_string(), "-o".to_string(), "%i|%j|%T|%r|%o".to_string()])?;
        let mut jobs = HashMap::new();
        for line in out.lines() {
            let fields: Vec<&str> = line.trim().splitn(5, '|').collect();
            if let [id, name, state, reason, command] = fields[..] {
                let state = JobState { state: state.to_string(), reason: reason.to_string() };
                if name.starts_with(prefix) && state.is_adoptable() && Path::new(command).starts_with(scripts) {
                    jobs.insert(name.to_string(), id.to_string());
                }
            }
        }
        Ok(jobs)
    }

    /// What `scontrol show job` still knows of a finished job: its state,
    /// reason and exit code (`None` once the controller has purged it).
    pub fn describe(&self, id: &str) -> Option<String> {
        let out = self.call("scontrol", &["show".to_string(), "job".to_string(), "-o".to_string(), id.to_string()]).ok()?;
        let fields: HashMap<&str, &str> = out.split_whitespace().filter_map(|f| f.split_once('=')).collect();
        Some(format!(
            "{} (reason {}, exit code {})",
            fields.get("JobState").unwrap_or(&"UNKNOWN"),
            fields.get("Reason").unwrap_or(&"None"),
            fields.get("ExitCode").unwrap_or(&"?")
        ))
    }

    /// Cancels jobs (errors for jobs that already ended are ignored).
    pub fn cancel(&self, ids: &[String]) {
        if !ids.is_empty() {
            let _ = self.call("scancel", ids);
        }
    }

    /// The fewest CPUs a node of the partition (default: the cluster's
    /// default partition) has; `None` if unknown.
    pub fn node_cpus(&self, partition: Option<&str>) -> Option<u32> {
        let out = self.call("sinfo", &["-h".to_string(), "-o".to_string(), "%P|%c".to_string()]).ok()?;
        fewest_cpus(&out, partition)
    }
}

/// From `sinfo -o "%P|%c"` lines: the fewest CPUs per node in `partition`, or
/// in the default partition (marked `*`) when none is named.
fn fewest_cpus(sinfo: &str, partition: Option<&str>) -> Option<u32> {
    sinfo
        .lines()
        .filter_map(|l| l.trim().split_once('|'))
        .filter(|(name, _)| match partition {
            Some(p) => name.trim_end_matches('*') == p,
            None => name.ends_with('*'),
        })
        .filter_map(|(_, cpus)| cpus.trim_end_matches('+').parse::<u32>().ok())
        .min()
}

/// The id in `sbatch --parsable`'s output (`ID` or `ID;CLUSTER`).
pub fn parse_job_id(out: &str) -> Option<String> {
    let id = out.trim().split(';').next()?.trim();
    (!id.is_empty() && id.chars().all(|c| c.is_ascii_digit() || c == '_')).then(|| id.to_string())
}

/// `squeue -o "%i|%T|%r"` lines as (id, state).
fn parse_states(out: &str) -> Vec<(String, JobState)> {
    out.lines()
        .filter_map(|line| {
            let mut fields = line.trim().splitn(3, '|');
            let id = fields.next()?.to_string();
            let state = fields.next()?.to_string();
            let reason = fields.next().unwrap_or("").to_string();
            Some((id, JobState { state, reason }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_are_read_up_to_the_cluster_name() {
        assert_eq!(parse_job_id("1234\n").as_deref(), Some("1234"));
        assert_eq!(parse_job_id("1234;gpucluster\n").as_deref(), Some("1234"));
        assert_eq!(parse_job_id("Submitted batch job 12"), None);
        assert_eq!(parse_job_id(""), None);
    }

    #[test]
    fn cpus_come_from_the_named_or_default_partition() {
        let sinfo = "gpu|64\nbatch*|8\nbatch*|16+\ndebug|2\n";
        assert_eq!(fewest_cpus(sinfo, None), Some(8));
        assert_eq!(fewest_cpus(sinfo, Some("gpu")), Some(64));
        assert_eq!(fewest_cpus(sinfo, Some("nope")), None);
    }

    #[test]
    fn squeue_lines_parse() {
        let states = parse_states("12|RUNNING|None\n13|PENDING|Dependency\n");
        assert_eq!(states[0].0, "12");
        assert!(states[0].1.is_running());
        assert_eq!(states[1].1.reason, "Dependency");
        assert!(states[1].1.is_live() && !states[1].1.is_running());
        assert!(!JobState { state: "COMPLETED".into(), reason: "None".into() }.is_live());
        assert!(states[1].1.is_adoptable());
        assert!(!JobState { state: "PENDING".into(), reason: "DependencyNeverSatisfied".into() }.is_adoptable());
        assert!(!JobState { state: "COMPLETING".into(), reason: "None".into() }.is_adoptable());
    }
}
