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
