//! The Slurm executor against a real one-host Slurm cluster
//! (`scripts/slurm-local.sh`: Debian's slurm-wlm and munge on loopback). It
//! needs root and apt; where they are missing these tests fail, never skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::util::{Project, CHAIN};

/// `SLURM_CONF` of the one-host cluster, started once per test binary.
fn cluster() -> &'static str {
    static CONF: OnceLock<String> = OnceLock::new();
    CONF.get_or_init(|| start_cluster(&[]))
}

/// `SLURM_CONF` of a second cluster emulating two nodes (`node1`, `node2`) on
/// this host, with its own state folder and ports.
fn two_node_cluster() -> &'static str {
    static CONF: OnceLock<String> = OnceLock::new();
    CONF.get_or_init(|| {
        let root = std::env::temp_dir().join("swift-slurm-two-nodes");
        let root = root.display().to_string();
        start_cluster(&[("SLURM_LOCAL_ROOT", root.as_str()), ("SLURM_LOCAL_NODES", "2"), ("SLURMCTLD_PORT", "6827"), ("SLURMD_PORT", "6830")])
    })
}

fn start_cluster(vars: &[(&str, &str)]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm-local.sh");
    let call = |command: &str| Command::new("bash").arg(&script).arg(command).envs(vars.iter().copied()).output().expect("bash");
    let up = call("up");
    assert!(up.status.success(), "scripts/slurm-local.sh up failed (it needs root and apt):\n{}", String::from_utf8_lossy(&up.stderr));
    let env = call("env");
    let text = String::from_utf8_lossy(&env.stdout);
    text.trim().strip_prefix("export SLURM_CONF=").expect("slurm-local.sh env prints SLURM_CONF").to_string()
}

/// A project whose swift commands reach the test cluster.
fn slurm_project(manifest: &str) -> Project {
    let p = Project::new();
    p.set_env("SLURM_CONF", cluster());
    p.write("pipelines/micro.toml", manifest);
    p.write("data/input.txt", "input v1\n");
    p
}

/// The chain a → b → c plus d of the other tests, under the Slurm executor,
/// polled every 200 ms.
fn micro() -> String {
    let slurm = "name = \"micro\"\nexecutor = \"slurm\"\n\n[pipeline.slurm]\npoll = \"200ms\"\n";
    CHAIN.replacen("name = \"chain\"\n", slurm, 1)
}

/// Live swift jobs of this project's cache (their batch scripts live under it).
fn live_jobs(p: &Project) -> Vec<String> {
    let out = Command::new("squeue").env("SLURM_CONF", cluster()).args(["-h", "-o", "%i %j %o"]).output().unwrap();
    let logs = p.path(".swift/slurm").display().to_string();
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(&logs)).map(str::to_string).collect()
}

/// Waits (up to `seconds`) until no job of this project's cache is queued or running.
fn wait_for_empty_queue(p: &Project, seconds: u64) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !live_jobs(p).is_empty() {
        assert!(Instant::now() < deadline, "jobs left in the queue after {seconds}s: {:?}", live_jobs(p));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every job log of this project's cache, concatenated.
fn all_logs(p: &Project) -> String {
    std::fs::read_dir(p.path(".swift/slurm/logs")).unwrap().map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap()).collect()
}

/// How many times each stage started, from the trace.
fn starts(p: &Project) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for stage in p.started() {
        *counts.entry(stage).or_default() += 1;
    }
    counts
}

#[test]
fn a_micro_pipeline_under_slurm_matches_a_local_run_and_reruns_submit_nothing() {
    let p = slurm_project(&micro());
    let local = p.run("pipelines/micro.toml", &["--executor", "local", "--cache", ".local-cache"], 0);
    assert!(local.statuses().iter().all(|(_, s)| s == "ran"), "{local}");
    let local_lock = p.read("pipelines/micro.lock");

    let first = p.run("pipelines/micro.toml", &[], 0);
    assert!(first.statuses().iter().all(|(_, s)| s == "ran"), "{first}");
    assert_eq!(p.read("pipelines/micro.lock"), local_lock, "Slurm jobs stored other outputs than the local run");
    for stage in ["a", "b", "c", "d"] {
        assert!(first.stderr.contains(&format!("{stage}: submitted job")), "{first}");
        let log = std::fs::read_dir(p.path(".swift/slurm/logs")).unwrap().find_map(|e| {
            let path = e.unwrap().path();
            path.file_name().unwrap().to_str().unwrap().starts_with(&format!("{stage}-")).then_some(path)
        });
        let log = std::fs::read_to_string(log.expect("a log per stage")).unwrap();
        assert!(log.contains(&format!("stage `{stage}` ran")), "{log}");
    }

    let again = p.run("pipelines/micro.toml", &[], 0);
    assert!(again.statuses().iter().all(|(_, s)| s == "cached"), "{again}");
    assert!(!again.stderr.contains("submitted"), "{again}");
    // The Slurm run's entries are ordinary cache entries.
    let local_rerun = p.run("pipelines/micro.toml", &["--executor", "local"], 0);
    assert!(local_rerun.statuses().iter().all(|(_, s)| s == "cached"), "{local_rerun}");
    assert_eq!(starts(&p).values().copied().collect::<Vec<_>>(), [2, 2, 2, 2], "each stage ran once per cache");

    // `--force` waits for the forced job's own entry, not the one already stored…
    let forced = p.run("pipelines/micro.toml", &["--force", "b"], 0);
    assert_eq!(forced.statuses(), [("a", "cached"), ("b", "ran"), ("c", "cached"), ("d", "cached")].map(|(s, t)| (s.to_string(), t.to_string())));
    assert_eq!(starts(&p)["b"], 3, "{forced}");
    // …and a forced job that fails is a failure, whatever entry is stored.
    p.write("pipelines/micro.toml", &micro().replace("text = \"beta\"", "text = \"beta\"\nfail_if_exists = \"broken\""));
    p.run("pipelines/micro.toml", &[], 0);
    p.write("broken", "");
    let failed = p.run("pipelines/micro.toml", &["--force", "b"], 1);
    assert_eq!(failed.status("b"), "failed", "{failed}");
    assert!(failed.stage("b")["error"].as_str().unwrap().contains("broken exists"), "{failed}");
}

#[test]
fn a_failing_stage_cancels_what_remains_and_shows_its_log() {
    let manifest = micro().replace("text = \"beta\"", "text = \"beta\"\nfail = true").replace("text = \"delta\"", "text = \"delta\"\nsleep_ms = 60000");
    let p = slurm_project(&manifest);
    let started = Instant::now();
    let run = p.run("pipelines/micro.toml", &[], 1);
    assert!(started.elapsed() < Duration::from_secs(50), "the sleeping stage was not cancelled\n{run}");
    assert_eq!(run.status("a"), "ran", "{run}");
    assert_eq!(run.status("b"), "failed", "{run}");
    let error = run.stage("b")["error"].as_str().unwrap().to_string();
    assert!(error.contains("test-step failed because `fail = true`"), "{error}");
    assert!(error.contains("log: ") && error.contains("| "), "the error shows the log's path and tail: {error}");
    assert_eq!(run.status("c"), "skipped", "{run}");
    assert_eq!(run.status("d"), "skipped", "{run}");
    assert!(run.stage("d")["error"].as_str().unwrap().contains("cancelled: stage `b` failed"), "{run}");
    wait_for_empty_queue(&p, 20);
}

#[test]
fn kill_9_while_jobs_are_queued_then_rerun_resumes_without_duplicate_work() {
    let manifest = micro().replace("text = \"alpha\"", "text = \"alpha\"\nsleep_ms = 3000");
    let p = slurm_project(&manifest);
    let mut child = p.spawn(&["run", "pipelines/micro.toml"]);
    p.wait_for("the submission record", |p| p.path(".swift/slurm/pipelines").read_dir().is_ok_and(|mut d| d.next().is_some()));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!live_jobs(&p).is_empty(), "the jobs outlive the killed run");

    let rerun = p.run("pipelines/micro.toml", &[], 0);
    assert!(rerun.stderr.contains("waiting on job"), "the rerun adopts the queued jobs\n{rerun}");
    assert!(!rerun.stderr.contains("submitted job"), "{rerun}");
    assert_eq!(starts(&p).values().copied().collect::<Vec<_>>(), [1, 1, 1, 1], "{rerun}");
}

#[test]
fn two_concurrent_submissions_never_compute_a_stage_twice() {
    let manifest = micro().replace("text = \"alpha\"", "text = \"alpha\"\nsleep_ms = 1500");
    let p = slurm_project(&manifest);
    let one = p.spawn(&["run", "pipelines/micro.toml", "--json"]);
    let two = p.spawn(&["run", "pipelines/micro.toml", "--json"]);
    for child in [one, two] {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(starts(&p).values().copied().collect::<Vec<_>>(), [1, 1, 1, 1]);
}

#[test]
fn detach_returns_after_submission_and_status_shows_the_jobs() {
    let manifest = micro().replace("text = \"alpha\"", "text = \"alpha\"\nsleep_ms = 2000");
    let p = slurm_project(&manifest);
    let detached = p.run("pipelines/micro.toml", &["--detach"], 0);
    for (stage, status) in detached.statuses() {
        assert!(status == "queued" || status == "running", "{stage}: {status}\n{detached}");
        assert!(detached.stage(&stage)["job"].as_str().is_some(), "{detached}");
    }
    let status = p.swift(&["status", "pipelines/micro.toml", "--json"]);
    let jobs = status.json()["slurm_jobs"].as_array().unwrap().clone();
    assert_eq!(jobs.len(), 4, "{status}");
    let text = p.swift(&["status", "pipelines/micro.toml"]);
    assert!(text.stdout.contains("Slurm jobs of the last submission"), "{text}");

    wait_for_empty_queue(&p, 60);
    let after = p.swift(&["status", "pipelines/micro.toml", "--json"]);
    let states: Vec<String> = after.json()["slurm_jobs"].as_array().unwrap().iter().map(|j| j["state"].as_str().unwrap().to_string()).collect();
    assert_eq!(states, ["ran", "ran", "ran", "ran"], "{after}");
    let rerun = p.run("pipelines/micro.toml", &[], 0);
    assert!(rerun.statuses().iter().all(|(_, s)| s == "cached"), "{rerun}");
}

#[test]
fn bad_clusters_and_resources_fail_before_anything_is_submitted() {
    let p = slurm_project(&micro());
    let empty = p.path("empty-bin");
    std::fs::create_dir_all(&empty).unwrap();
    p.set_env("PATH", &empty.display().to_string());
    let run = p.run("pipelines/micro.toml", &[], 1);
    assert!(run.stderr.contains("`sbatch`, and it is not on PATH"), "{run}");
    p.set_env("PATH", &std::env::var("PATH").unwrap());

    let partition = micro().replace("[stages.d]\n", "[stages.d]\nresources = { partition = \"nope\" }\n");
    p.write("pipelines/micro.toml", &partition);
    let run = p.run("pipelines/micro.toml", &[], 1);
    assert!(run.stderr.contains("stage `d`: Slurm would not accept its job") && run.stderr.contains("--partition=nope"), "{run}");
    assert!(run.stderr.to_lowercase().contains("invalid partition"), "{run}");

    let greedy = micro().replace("[pipeline.slurm]", "[pipeline.resources]\ncpus = 512\n\n[pipeline.slurm]");
    p.write("pipelines/micro.toml", &greedy);
    let run = p.run("pipelines/micro.toml", &[], 1);
    assert!(run.stderr.contains("Slurm would not accept its job") && run.stderr.contains("--cpus-per-task=512"), "{run}");

    let bad_mem = micro().replace("[stages.d]\n", "[stages.d]\nresources = { mem = \"16GB\" }\n");
    p.write("pipelines/micro.toml", &bad_mem);
    let run = p.run("pipelines/micro.toml", &[], 2);
    assert!(run.stderr.contains("micro.toml:") && run.stderr.contains("not Slurm's memory syntax"), "{run}");

    assert!(!p.path(".swift/slurm/pipelines").exists(), "nothing was submitted");
    assert!(starts(&p).is_empty());
}

/// Slurm tools that accept every job and run none of them: a cache that
/// compute nodes cannot see looks like this to swift.
fn fake_slurm(dir: &Path) -> PathBuf {
    let bin = dir.join("fake-slurm");
    std::fs::create_dir_all(&bin).unwrap();
    for (tool, body) in [
        ("sbatch", "echo 4242"),
        ("squeue", "exit 0"),
        ("scontrol", "echo 'JobId=4242 JobState=COMPLETED Reason=None ExitCode=0:0'"),
        ("sinfo", "echo 2"),
        ("scancel", "exit 0"),
    ] {
        let path = bin.join(tool);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin
}

#[test]
fn a_cache_the_compute_nodes_cannot_see_is_refused() {
    let p = Project::new();
    p.write("pipelines/micro.toml", &micro());
    p.write("data/input.txt", "input v1\n");
    let bin = fake_slurm(p.root());
    p.set_env("PATH", &format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()));
    let run = p.run("pipelines/micro.toml", &[], 1);
    assert!(run.stderr.contains("is not shared with the compute nodes: probe job 4242 ended"), "{run}");
    assert!(run.stderr.contains("--cache DIR"), "{run}");
    assert!(starts(&p).is_empty());
}

#[test]
fn the_ci_sized_demo_completes_under_slurm() {
    let p = crate::demo::demo_project();
    p.set_env("SLURM_CONF", cluster());
    let run = p.run("pipelines/demo-ci.toml", &["--executor", "slurm"], 0);
    assert!(run.statuses().iter().all(|(_, s)| s == "ran"), "{run}");
    assert!(p.path("exports/demo-ci/merged/model.safetensors").exists(), "{run}");
    let local = p.run("pipelines/demo-ci.toml", &["--executor", "local"], 0);
    assert!(local.statuses().iter().all(|(_, s)| s == "cached"), "{local}");
}

/// A LoRA fine-tune of the tiny Qwen2 with dropout, 4 rows per step.
const TUNE: &str = "[stages.tune]\nkind = \"finetune\"\nmethod = \"lora\"\nmodel = \"base\"\ndata = \"prep\"\n\
    lora = { rank = 4, alpha = 8, dropout = 0.1 }\nlr = 2e-3\nmax_steps = 40\nsave_every = 5\ngrad_accum = 2\nbatch_size = 2\n";

/// The largest difference between two adapters' tensors.
fn adapter_difference(a: &Path, b: &Path) -> f32 {
    let load = |dir: &Path| candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let (a, b) = (load(a), load(b));
    assert_eq!(a.keys().collect::<std::collections::BTreeSet<_>>(), b.keys().collect());
    a.iter()
        .map(|(name, t)| {
            let (x, y) = (t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b[name].flatten_all().unwrap().to_vec1::<f32>().unwrap());
            x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max)
        })
        .fold(0.0, f32::max)
}

#[test]
fn a_finetune_trains_data_parallel_over_two_slurm_tasks_and_resumes_at_another_world_size() {
    use crate::finetune::{checkpoint_step, output_path, project};
    let single = project(TUNE);
    let reference = single.run("pipelines/tune.toml", &[], 0);
    let reference = output_path(&reference, "tune", "adapter");

    // Two processes (one Slurm job, two srun tasks) train the same adapter.
    let dp = TUNE.to_string() + "resources = { tasks_per_node = 2, cpus = 1 }\n";
    let p = project(&dp);
    p.set_env("SLURM_CONF", cluster());
    let run = p.run("pipelines/tune.toml", &["--executor", "slurm"], 0);
    assert_eq!(run.status("tune"), "ran", "{run}");
    let difference = adapter_difference(&reference, &output_path(&run, "tune", "adapter"));
    assert!(difference < 1e-4, "two ranks trained another adapter: max difference {difference}");
    let logs = all_logs(&p);
    assert!(logs.contains("rank 1 of 2") && logs.contains("rank 0 of 2"), "{logs}");
    // Forced, both ranks train again (the entry already stored does not stop rank 1).
    let started = Instant::now();
    let forced = p.run("pipelines/tune.toml", &["--executor", "slurm", "--force", "tune"], 0);
    assert_eq!(forced.status("tune"), "ran", "{forced}");
    assert!(started.elapsed() < Duration::from_secs(120), "{forced}");

    // Interrupted with two ranks, resumed with one.
    let p = project(&dp);
    p.set_env("SLURM_CONF", cluster());
    p.run("pipelines/tune.toml", &["--until", "prep"], 0);
    let child = p.spawn(&["run", "pipelines/tune.toml", "--executor", "slurm"]);
    p.wait_for("a checkpoint at step 10", |p| checkpoint_step(p.root()).is_some_and(|s| s >= 10));
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let interrupted = child.wait_with_output().unwrap();
    assert_eq!(interrupted.status.code(), Some(130), "{}", String::from_utf8_lossy(&interrupted.stderr));
    wait_for_empty_queue(&p, 30);
    let saved = checkpoint_step(p.root()).expect("rank 0 saved a checkpoint");
    assert!(saved < 40, "the run finished before it was interrupted");
    let resumed = p.run("pipelines/tune.toml", &["--executor", "local"], 0);
    let metrics: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(output_path(&resumed, "tune", "metrics")).unwrap()).unwrap();
    assert_eq!(metrics["resumed_from_step"].as_u64(), Some(saved as u64), "{metrics}");
    let difference = adapter_difference(&reference, &output_path(&resumed, "tune", "adapter"));
    assert!(difference < 1e-4, "resuming at another world size changed the adapter: max difference {difference}");
}

#[test]
fn a_finetune_trains_data_parallel_across_two_nodes() {
    use crate::finetune::{output_path, project};
    let reference = project(TUNE);
    let reference = reference.run("pipelines/tune.toml", &[], 0);
    let p = project(&(TUNE.to_string() + "resources = { nodes = 2, cpus = 1 }\n"));
    p.set_env("SLURM_CONF", two_node_cluster());
    let run = p.run("pipelines/tune.toml", &["--executor", "slurm"], 0);
    let difference = adapter_difference(&output_path(&reference, "tune", "adapter"), &output_path(&run, "tune", "adapter"));
    assert!(difference < 1e-4, "two nodes trained another adapter: max difference {difference}");
    let logs = all_logs(&p);
    assert!(logs.contains("rank 0 of 2") && logs.contains("rank 1 of 2"), "{logs}");
}

#[test]
fn jobs_adopted_from_a_run_that_is_then_interrupted_are_submitted_again() {
    let manifest = micro().replace("text = \"alpha\"", "text = \"alpha\"\nsleep_ms = 2000").replace("text = \"beta\"", "text = \"beta\"\nsleep_ms = 4000");
    let p = slurm_project(&manifest);
    let record = |p: &Project| {
        let dir = p.path(".swift/slurm/pipelines");
        std::fs::read_dir(dir).ok().and_then(|mut d| d.next()).map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default()).unwrap_or_default()
    };
    let owner = p.spawn(&["run", "pipelines/micro.toml"]);
    p.wait_for("the owner's submission", |p| record(p).contains("\"adopted\": false"));
    let adopter = p.spawn(&["run", "pipelines/micro.toml", "--json"]);
    p.wait_for("the second run to adopt the jobs", |p| record(p).contains("\"adopted\": true"));
    // Interrupted once `a` is done and `b` runs: `b` and what waits on it are taken over.
    p.wait_for("stage a to finish", |p| p.read("trace.log").contains("end a "));
    Command::new("kill").args(["-INT", &owner.id().to_string()]).status().unwrap();
    let owner = owner.wait_with_output().unwrap();
    assert_eq!(owner.status.code(), Some(130), "{}", String::from_utf8_lossy(&owner.stderr));
    let adopter = adopter.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&adopter.stderr);
    assert!(adopter.status.success(), "{stderr}");
    assert!(stderr.contains("submitting it again"), "{stderr}");
    let rerun = p.run("pipelines/micro.toml", &[], 0);
    assert!(rerun.statuses().iter().all(|(_, s)| s == "cached"), "{rerun}");
}
