use std::process::Command;

use crate::util::Project;

const SLOW: &str = r#"
[stages.slow]
kind = "test-step"
text = "slow"
sleep_ms = 1500
trace = "trace.log"

[stages.next]
kind = "test-step"
inputs = ["slow"]
trace = "trace.log"
"#;

fn output_of(child: std::process::Child) -> (i32, String, String) {
    let out = child.wait_with_output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn kill_9_mid_stage_then_rerun_completes_with_a_consistent_cache() {
    let p = Project::new();
    p.write("pipelines/slow.toml", SLOW);
    let mut child = p.spawn(&["run", "pipelines/slow.toml"]);
    p.wait_for("the slow stage to start", |p| p.started().contains(&"slow".to_string()));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let status = p.swift(&["status", "pipelines/slow.toml", "--json"]);
    assert_eq!(status.json()["stages"][0]["fresh"], false, "a killed stage is never recorded\n{status}");
    let run = p.run("pipelines/slow.toml", &[], 0);
    assert_eq!(run.statuses(), vec![("slow".into(), "ran".into()), ("next".into(), "ran".into())]);
    let verify = p.swift(&["cache", "verify"]);
    assert_eq!(verify.code, 0, "{verify}");
    assert!(p.run("pipelines/slow.toml", &[], 0).statuses().iter().all(|(_, s)| s == "cached"));
}

#[test]
fn two_concurrent_runs_compute_each_stage_once() {
    let p = Project::new();
    p.write("pipelines/slow.toml", SLOW);
    let first = p.spawn(&["run", "pipelines/slow.toml", "--json"]);
    p.wait_for("the first run to start its stage", |p| !p.started().is_empty());
    let second = p.spawn(&["run", "pipelines/slow.toml", "--json"]);
    let (code1, out1, err1) = output_of(first);
    let (code2, out2, err2) = output_of(second);
    assert_eq!((code1, code2), (0, 0), "{err1}\n{err2}");
    assert_eq!(p.started(), vec!["slow".to_string(), "next".to_string()], "each stage computed once");
    let last = |out: &str| serde_json::from_str::<serde_json::Value>(out.lines().last().unwrap()).unwrap();
    assert_eq!(last(&out2)["stages"][0]["status"], "cached", "the second run reused the first's result");
    assert_eq!(last(&out1)["stages"][0]["key"], last(&out2)["stages"][0]["key"]);
    assert_eq!(p.swift(&["cache", "verify"]).code, 0);
}

#[test]
fn ctrl_c_stops_cleanly_with_exit_130() {
    let p = Project::new();
    p.write("pipelines/slow.toml", &SLOW.replace("1500", "20000"));
    let child = p.spawn(&["run", "pipelines/slow.toml"]);
    p.wait_for("the slow stage to start", |p| p.started().contains(&"slow".to_string()));
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let (code, _, stderr) = output_of(child);
    assert_eq!(code, 130, "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(p.read("trace.log").contains("cancelled slow"));
    let status = p.swift(&["status", "pipelines/slow.toml", "--json"]);
    assert_eq!(status.json()["stages"][0]["fresh"], false);
}

#[test]
fn one_stage_per_gpu_at_a_time_while_cpu_stages_overlap() {
    let p = Project::new();
    let mut manifest = String::new();
    for (name, gpu) in [("g1", true), ("g2", true), ("c1", false), ("c2", false)] {
        manifest.push_str(&format!("[stages.{name}]\nkind = \"test-step\"\ntext = \"{name}\"\nsleep_ms = 600\ntrace = \"trace.log\"\n"));
        if gpu {
            manifest.push_str("gpu = \"cuda:0\"\n");
        }
    }
    p.write("pipelines/slots.toml", &manifest);
    p.run("pipelines/slots.toml", &["--jobs", "2"], 0);
    let span = |stage: &str| {
        let trace = p.trace();
        let at = |event: &str| trace.iter().find(|(e, s, _)| e == event && s == stage).unwrap().2;
        (at("start"), at("end"))
    };
    let overlap = |a: (u128, u128), b: (u128, u128)| a.0 < b.1 && b.0 < a.1;
    assert!(!overlap(span("g1"), span("g2")), "GPU stages overlapped: {:?}", p.trace());
    assert!(overlap(span("c1"), span("c2")), "CPU stages did not run concurrently: {:?}", p.trace());
}

/// A reader that goes away is a normal end for every printing command: no
/// panic, no "Broken pipe" error, the command's own exit status (a run still
/// completes its stages).
#[test]
fn commands_end_quietly_when_stdout_closes() {
    let p = crate::util::chain_project();
    p.run("pipelines/chain.toml", &[], 0);
    let commands: [&[&str]; 5] = [
        &["report", "pipelines/chain.toml", "--json"],
        &["report", "pipelines/chain.toml"],
        &["dag", "pipelines/chain.toml"],
        &["status", "pipelines/chain.toml"],
        &["run", "pipelines/chain.toml", "--json", "--force", "a"],
    ];
    for args in commands {
        let mut child = p.spawn(args);
        // Closed before the child's first write.
        drop(child.stdout.take());
        let (code, _, stderr) = output_of(child);
        assert_eq!(code, 0, "swift {args:?}: {stderr}");
        assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "swift {args:?}: {stderr}");
    }
}

/// `run --json` ends in a JSON object on stdout for errors at run time too.
#[test]
fn run_json_reports_runtime_errors_as_json() {
    let p = crate::util::chain_project();
    p.write("not-a-folder", "a file where the cache should be\n");
    let run = p.run("pipelines/chain.toml", &["--cache", "not-a-folder"], 1);
    let last: serde_json::Value = serde_json::from_str(run.stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}\n{run}"));
    assert_eq!(last["ok"], false, "{run}");
    assert!(last["error"]["message"].as_str().unwrap().contains("cannot open the cache"), "{run}");
}

/// What a kill -9 leaves in the cache's `tmp/` (temporaries of a process
/// that has ended) is removed by the next run; a live process's is kept.
#[test]
fn the_next_run_removes_what_killed_runs_left_in_tmp() {
    let p = crate::util::chain_project();
    p.run("pipelines/chain.toml", &[], 0);
    let tmp = p.path(".swift/tmp");
    // 4294967 is above Linux's largest process id: no process has it.
    let orphan = tmp.join(".tmp-out-4294967-0");
    std::fs::create_dir_all(orphan.join("part")).unwrap();
    let live = tmp.join(format!(".tmp-out-{}-0", std::process::id()));
    std::fs::write(&live, b"a live process's").unwrap();
    p.run("pipelines/chain.toml", &[], 0);
    assert!(!orphan.exists(), "the orphan survived the rerun");
    assert!(live.exists(), "a live process's temporary was removed");
}

/// A second Ctrl-C leaves at once, even while a stage does not stop: exit
/// 130, the run recorded, nothing of the stage stored.
#[test]
fn a_second_ctrl_c_exits_at_once_and_records_the_run() {
    let p = Project::new();
    p.write("pipelines/slow.toml", &SLOW.replace("sleep_ms = 1500", "sleep_ms = 60000\nignore_cancel = true"));
    let started = std::time::Instant::now();
    let child = p.spawn(&["run", "pipelines/slow.toml"]);
    p.wait_for("the slow stage to start", |p| p.started().contains(&"slow".to_string()));
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let (code, _, stderr) = output_of(child);
    assert_eq!(code, 130, "{stderr}");
    assert!(stderr.contains("interrupted again: exiting now"), "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "it waited for the stage");
    let report = p.swift(&["report", "pipelines/slow.toml", "--json"]);
    assert_eq!(report.code, 0, "{report}");
    let runs: serde_json::Value = serde_json::from_str(&report.stdout).unwrap();
    assert_eq!(runs.as_array().map(Vec::len), Some(1), "the run was not recorded: {report}");
    assert_eq!(runs[0]["ok"], false, "{report}");
    let status = p.swift(&["status", "pipelines/slow.toml", "--json"]);
    assert_eq!(status.json()["stages"][0]["fresh"], false);
}

/// Reading commands work on a cache this user cannot write (another user's,
/// or a read-only mount): run as `nobody` through `setpriv` when the tests
/// run as root, as CI's do; elsewhere there is no second user to be.
#[test]
fn reading_commands_work_on_a_read_only_cache() {
    use std::os::unix::fs::PermissionsExt;
    let p = crate::util::chain_project();
    p.run("pipelines/chain.toml", &[], 0);
    let is_root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if !is_root || Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("skipped: needs root and setpriv to act as another user");
        return;
    }
    let mut dir = p.root().to_path_buf();
    loop {
        // Every folder up to the project root readable by others, nothing writable.
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755));
        if !dir.pop() || dir.as_os_str().len() <= 1 {
            break;
        }
    }
    for args in [&["status", "pipelines/chain.toml"][..], &["show", "pipelines/chain.toml", "a"], &["report", "pipelines/chain.toml"]] {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_swift")])
            .args(args)
            .current_dir(p.root())
            .env_remove("SWIFT_CACHE")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "swift {args:?} as nobody: {stderr}");
    }
}

/// A cache on a full disk: the stage fails naming the disk and the room it
/// had, its partial files are freed, and the run still prints its summary and
/// records itself. Mounts a 1 MiB tmpfs as the cache, which needs root (as
/// CI's tests run); elsewhere there is nothing to mount.
#[test]
fn a_full_disk_fails_the_stage_frees_its_partial_files_and_keeps_the_summary() {
    let p = Project::new();
    crate::util::copy_dir(&crate::util::fixtures().join("models/qwen2-tiny"), &p.path("models/base"));
    p.write("pipelines/d.toml", "[stages.base]\nkind = \"download\"\nmodel = \"models/base\"\n");
    let cache = p.path("small-disk");
    std::fs::create_dir_all(&cache).unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"]).arg(&cache).output();
    if !mounted.is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: needs root to mount a small tmpfs");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(cache.clone());
    p.set_env("SWIFT_CACHE", cache.to_str().unwrap());
    let run = p.run("pipelines/d.toml", &[], 1);
    assert_eq!(run.status("base"), "failed", "{run}");
    assert!(run.stderr.contains("is full. It had") && run.stderr.contains("SWIFT_CACHE"), "{run}");
    assert!(run.stderr.contains("FAILED: 0 ran, 0 cached, 1 failed"), "the summary is printed: {run}");
    let leftovers: Vec<_> = ["tmp", "scratch"].iter().flat_map(|d| std::fs::read_dir(cache.join(d)).unwrap()).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let record = std::fs::read_dir(cache.join("runs")).unwrap().flatten().find(|e| e.path().extension().is_some_and(|x| x == "json"));
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(record.unwrap().path()).unwrap()).unwrap();
    assert!(record["seconds"].as_f64().unwrap() > 0.0 && record["ok"] == false, "{record}");
}
