use crate::util::chain_project;

#[test]
fn lock_file_round_trips_and_locked_runs_pass() {
    let p = chain_project();
    p.run("pipelines/chain.toml", &[], 0);
    let lock = p.read("pipelines/chain.lock");
    for stage in ["a", "b", "c", "d"] {
        assert!(lock.contains(&format!("[stages.{stage}]")), "{lock}");
    }
    let locked = p.run("pipelines/chain.toml", &["--locked"], 0);
    assert!(locked.statuses().iter().all(|(_, s)| s == "cached"), "{locked}");
    assert_eq!(p.read("pipelines/chain.lock"), lock);
}

#[test]
fn locked_fails_with_exit_3_naming_the_changed_input() {
    let p = chain_project();
    p.run("pipelines/chain.toml", &[], 0);
    let lock = p.read("pipelines/chain.lock");
    p.write("data/input.txt", "input v2, longer\n");
    let run = p.run("pipelines/chain.toml", &["--locked"], 3);
    assert!(run.stderr.contains("input `file0` (data/input.txt)"), "{run}");
    assert_eq!(p.read("pipelines/chain.lock"), lock, "--locked never writes the lock file");
    assert!(p.started().len() == 4, "nothing ran");
}

#[test]
fn locked_fails_on_changed_parameters_and_missing_lock() {
    let p = chain_project();
    let run = p.run("pipelines/chain.toml", &["--locked"], 3);
    assert!(run.stderr.contains("no lock file"), "{run}");
    p.run("pipelines/chain.toml", &[], 0);
    let run = p.run("pipelines/chain.toml", &["--locked", "--set", "stages.d.text=new"], 3);
    assert!(run.stderr.contains("stage `d`: its parameters differ"), "{run}");
}

/// A pipeline with a machine-dependent stage (`tune`, standing for a
/// fine-tune) between portable ones, as another CPU would run it.
const FLOAT: &str = r#"
[stages.prep]
kind = "test-step"
files = ["data/input.txt"]

[stages.tune]
kind = "test-float"
inputs = ["prep"]

[stages.ship]
kind = "test-step"
inputs = ["tune"]
"#;

#[test]
fn a_run_on_another_machine_leaves_the_lock_unchanged() {
    let p = chain_project();
    p.write("pipelines/float.toml", FLOAT);
    p.set_env("SWIFT_TEST_MACHINE", "cpu-a");
    p.run("pipelines/float.toml", &[], 0);
    let lock = p.read("pipelines/float.lock");
    // A stage's own table: from its header to the next blank line.
    let table = |name: &str| {
        let start = lock.find(&format!("[stages.{name}]\n")).unwrap();
        lock[start..].split("\n\n").next().unwrap().to_string()
    };
    assert!(table("prep").contains("\nkey = ") && lock.contains("[stages.prep.outputs]"), "{lock}");
    for name in ["tune", "ship"] {
        assert!(!table(name).contains("\nkey = ") && !lock.contains(&format!("[stages.{name}.outputs]")), "{name}: {lock}");
        assert!(table(name).contains("\nparams = "), "{lock}");
    }
    assert!(lock.contains("[stages.tune.inputs]"), "tune's input comes from a portable stage: {lock}");
    assert!(!lock.contains("[stages.ship.inputs]"), "ship's input is tune's output: {lock}");

    // A fresh clone on another CPU: the machine-dependent outputs differ, the lock does not.
    std::process::Command::new("chmod").args(["-R", "u+w"]).arg(p.path(".swift")).status().unwrap();
    std::fs::remove_dir_all(p.path(".swift")).unwrap();
    p.set_env("SWIFT_TEST_MACHINE", "cpu-b");
    let other = p.run("pipelines/float.toml", &["--locked"], 0);
    assert!(other.statuses().iter().all(|(_, s)| s == "ran"), "{other}");
    let first = p.run("pipelines/float.toml", &[], 0);
    assert!(first.statuses().iter().all(|(_, s)| s == "cached"), "{first}");
    assert_eq!(p.read("pipelines/float.lock"), lock, "no churn from another machine");

    // This machine's keys are still pinned: gc keeps them, status compares against them.
    let gc = p.swift(&["gc", "--keep-runs", "0"]);
    assert_eq!(gc.code, 0, "{gc}");
    let again = p.run("pipelines/float.toml", &[], 0);
    assert!(again.statuses().iter().all(|(_, s)| s == "cached"), "gc kept the machine-dependent entries: {again}");
    p.write("pipelines/float.toml", &FLOAT.replace("inputs = [\"tune\"]", "inputs = [\"tune\"]\ntext = \"v2\""));
    let status = p.swift(&["status", "pipelines/float.toml"]);
    assert!(status.stdout.contains("param text changed"), "the previous run's parameters are found without a locked key: {status}");
}
