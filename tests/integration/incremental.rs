use crate::util::{chain_project, Project};

#[test]
fn noop_rerun_does_nothing_and_keeps_the_lock_file() {
    let p = chain_project();
    let first = p.run("pipelines/chain.toml", &[], 0);
    assert!(first.statuses().iter().all(|(_, s)| s == "ran"), "{first}");
    assert_eq!(p.started().len(), 4);
    let lock = p.path("pipelines/chain.lock");
    let modified = std::fs::metadata(&lock).unwrap().modified().unwrap();
    let second = p.run("pipelines/chain.toml", &[], 0);
    assert!(second.statuses().iter().all(|(_, s)| s == "cached"), "{second}");
    assert_eq!(p.started().len(), 4, "nothing ran again");
    assert_eq!(std::fs::metadata(&lock).unwrap().modified().unwrap(), modified, "lock file untouched");
}

#[test]
fn changing_one_parameter_reruns_that_stage_and_its_descendants_only() {
    let p = chain_project();
    p.run("pipelines/chain.toml", &[], 0);
    p.write("pipelines/chain.toml", &crate::util::CHAIN.replace("\"beta\"", "\"beta 2\""));
    let run = p.run("pipelines/chain.toml", &[], 0);
    let statuses: Vec<(String, String)> = run.statuses();
    let expect = |s: &str, n: &str| (s.to_string(), n.to_string());
    assert_eq!(statuses, vec![expect("a", "cached"), expect("b", "ran"), expect("c", "ran"), expect("d", "cached")]);
}

#[test]
fn set_override_and_env_values_enter_keys() {
    let p = chain_project();
    p.run("pipelines/chain.toml", &[], 0);
    let run = p.run("pipelines/chain.toml", &["--set", "stages.c.text=changed"], 0);
    assert_eq!(run.status("c"), "ran");
    assert_eq!(run.status("b"), "cached");

    p.write("pipelines/env.toml", "[stages.e]\nkind = \"test-step\"\ntext = \"${SWIFT_TEST_VALUE}\"\n");
    let with = |value: &str| {
        let out = p.command(&["run", "pipelines/env.toml", "--json"]).env("SWIFT_TEST_VALUE", value).output().unwrap();
        let last = String::from_utf8_lossy(&out.stdout).lines().last().unwrap().to_string();
        serde_json::from_str::<serde_json::Value>(&last).unwrap()["stages"][0]["status"].as_str().unwrap().to_string()
    };
    assert_eq!(with("one"), "ran");
    assert_eq!(with("one"), "cached");
    assert_eq!(with("two"), "ran", "the variable's value, not its name, enters the key");
}

#[test]
fn identical_upstream_output_keeps_downstream_cached() {
    let p = chain_project();
    p.run("pipelines/chain.toml", &[], 0);
    // Forcing `a` reruns it, but its output bytes are the same: b and c stay cached.
    let run = p.run("pipelines/chain.toml", &["--force", "a"], 0);
    assert_eq!(run.status("a"), "ran");
    assert_eq!(run.status("b"), "cached");
    assert_eq!(run.status("c"), "cached");
}

#[test]
fn input_edit_with_same_size_and_mtime_is_found_by_rehash() {
    let p = chain_project();
    p.run("pipelines/chain.toml", &[], 0);
    let input = p.path("data/input.txt");
    let mtime = std::fs::metadata(&input).unwrap().modified().unwrap();
    std::fs::write(&input, "input v2\n").unwrap(); // same size
    std::fs::File::options().write(true).open(&input).unwrap().set_modified(mtime).unwrap();
    let run = p.run("pipelines/chain.toml", &["--rehash"], 0);
    assert_eq!(run.status("a"), "ran", "{run}");
    assert_eq!(run.status("b"), "ran");
    assert_eq!(run.status("d"), "cached");
}

#[test]
fn dry_run_reports_without_running() {
    let p = chain_project();
    let run = p.run("pipelines/chain.toml", &["--dry-run"], 0);
    let json = run.json();
    assert!(json["stages"].as_array().unwrap().iter().all(|s| s["status"] == "would-run"), "{run}");
    assert!(json["stages"][0]["key"].is_string(), "a's inputs are local: its key is known");
    assert!(json["stages"][1]["key"].is_null(), "b's key needs a's output");
    assert!(p.started().is_empty());
    assert!(!p.path("pipelines/chain.lock").exists(), "a dry run writes no lock file");
}

#[test]
fn only_and_until_run_part_of_the_pipeline() {
    let p = chain_project();
    let run = p.run("pipelines/chain.toml", &["--only", "b"], 0);
    assert_eq!(run.statuses().iter().map(|(_, s)| s.as_str()).collect::<Vec<_>>(), vec!["ran", "ran", "skipped", "skipped"]);
    let p = chain_project();
    let run = p.run("pipelines/chain.toml", &["--until", "b"], 0);
    assert_eq!(run.statuses().iter().map(|(_, s)| s.as_str()).collect::<Vec<_>>(), vec!["ran", "ran", "skipped", "ran"]);
}

#[test]
fn a_failed_stage_skips_its_descendants_and_exits_1() {
    let p = Project::new();
    p.write(
        "pipelines/f.toml",
        "[stages.bad]\nkind = \"test-step\"\nfail = true\n[stages.after]\nkind = \"test-step\"\ninputs = [\"bad\"]\n[stages.other]\nkind = \"test-step\"\n",
    );
    let run = p.run("pipelines/f.toml", &[], 1);
    assert_eq!(run.status("bad"), "failed");
    assert_eq!(run.status("after"), "skipped");
    assert_eq!(run.status("other"), "ran");
    assert!(run.stderr.contains("fail = true"), "{run}");
}
