use crate::util::chain_project;

#[test]
fn status_explains_why_stages_are_stale() {
    let p = chain_project();
    let never = p.swift(&["status", "pipelines/chain.toml", "--json"]);
    assert_eq!(never.json()["stages"][0]["reasons"][0]["kind"], "never-run", "{never}");
    p.run("pipelines/chain.toml", &[], 0);
    p.write("pipelines/chain.toml", &crate::util::CHAIN.replace("\"beta\"", "\"beta 2\""));
    p.write("data/input.txt", "input v2 with more bytes\n");
    let status = p.swift(&["status", "pipelines/chain.toml", "--json"]);
    let stages = status.json()["stages"].as_array().unwrap().clone();
    let reasons = |i: usize| stages[i]["reasons"].as_array().unwrap().iter().map(|r| r["detail"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(reasons(0), vec!["input file0 changed (data/input.txt)"]);
    assert_eq!(reasons(1), vec!["param text changed \"beta\" → \"beta 2\"", "upstream stage a will run first"]);
    assert_eq!(reasons(2), vec!["upstream stage b will run first"]);
    assert_eq!(stages[3]["fresh"], true);
    let human = p.swift(&["status", "pipelines/chain.toml"]);
    assert!(human.stdout.contains("param text changed"), "{human}");
}

#[test]
fn show_lists_materialized_outputs_and_provenance() {
    let p = chain_project();
    p.run("pipelines/chain.toml", &[], 0);
    let show = p.swift(&["show", "pipelines/chain.toml", "b", "--json"]);
    let json = show.json();
    let out = json["outputs"]["out"].as_str().unwrap();
    assert!(out.ends_with("out.txt"), "{show}");
    let content = std::fs::read_to_string(out).unwrap();
    assert!(content.starts_with("beta\n[in0]\nalpha"), "{content}");
    assert!(std::fs::metadata(out).unwrap().permissions().readonly());
    assert_eq!(json["provenance"]["device"], "cpu");
    assert_eq!(json["key"].as_str().unwrap().len(), 64);
}

#[test]
fn dag_prints_text_and_dot() {
    let p = chain_project();
    let text = p.swift(&["dag", "pipelines/chain.toml"]);
    assert!(text.stdout.contains("b (test-step) ← [a.out]"), "{text}");
    let dot = p.swift(&["dag", "pipelines/chain.toml", "--dot"]);
    assert!(dot.stdout.starts_with("digraph") && dot.stdout.contains("\"a\" -> \"b\""), "{dot}");
}

#[test]
fn report_prints_metric_history() {
    let p = chain_project();
    p.run("pipelines/chain.toml", &[], 0);
    p.run("pipelines/chain.toml", &["--set", "stages.d.text=longer text"], 0);
    let report = p.swift(&["report", "pipelines/chain.toml", "--json"]);
    let runs = report.json();
    assert_eq!(runs.as_array().unwrap().len(), 2, "{report}");
    assert_eq!(runs[0]["stages"][3]["metrics"]["bytes"], 5);
    assert_eq!(runs[1]["stages"][3]["metrics"]["bytes"], 11);
    let table = p.swift(&["report", "pipelines/chain.toml"]);
    assert!(table.stdout.contains("d.bytes"), "{table}");
}

#[test]
fn gc_keeps_what_the_lock_file_needs() {
    let p = chain_project();
    p.run("pipelines/chain.toml", &[], 0);
    p.run("pipelines/chain.toml", &["--set", "stages.d.text=v2"], 0);
    p.run("pipelines/chain.toml", &[], 0); // lock points at d's original text again
    let gc = p.swift(&["gc", "--keep-runs", "0", "--json"]);
    assert_eq!(gc.code, 0, "{gc}");
    assert_eq!(gc.json()["removed_actions"], 1, "d with text v2 is no longer referenced\n{gc}");
    assert!(p.run("pipelines/chain.toml", &[], 0).statuses().iter().all(|(_, s)| s == "cached"));
}

#[test]
fn gc_drops_slurm_bookkeeping_idle_for_a_week() {
    let p = chain_project();
    p.run("pipelines/chain.toml", &[], 0);
    let week_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(8 * 24 * 3600);
    for (path, old) in [("runs/1-1/plan.json", true), ("logs/a-1.log", true), ("results/1.json", true), ("logs/b-2.log", false)] {
        p.write(&format!(".swift/slurm/{path}"), "x");
        if old {
            std::fs::File::options().write(true).open(p.path(&format!(".swift/slurm/{path}"))).unwrap().set_modified(week_ago).unwrap();
        }
    }
    std::fs::File::open(p.path(".swift/slurm/runs/1-1")).unwrap().set_modified(week_ago).unwrap();
    assert_eq!(p.swift(&["gc"]).code, 0);
    assert!(!p.path(".swift/slurm/runs/1-1").exists() && !p.path(".swift/slurm/logs/a-1.log").exists());
    assert!(!p.path(".swift/slurm/results/1.json").exists());
    assert!(p.path(".swift/slurm/logs/b-2.log").exists(), "a recent log stays");
}

#[test]
fn cache_verify_quarantines_corrupt_objects_and_the_stage_reruns() {
    let p = chain_project();
    p.run("pipelines/chain.toml", &[], 0);
    let show = p.swift(&["show", "pipelines/chain.toml", "c", "--json"]);
    let out = std::path::PathBuf::from(show.json()["outputs"]["out"].as_str().unwrap());
    let mut perms = std::fs::metadata(&out).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&out, perms).unwrap();
    std::fs::write(&out, "tampered").unwrap();
    let verify = p.swift(&["cache", "verify", "--json"]);
    assert_eq!(verify.code, 4, "{verify}");
    assert_eq!(verify.json()["corrupt"].as_array().unwrap().len(), 1);
    let run = p.run("pipelines/chain.toml", &[], 0);
    assert_eq!(run.status("c"), "ran", "{run}");
    assert_eq!(p.swift(&["cache", "verify"]).code, 0);
}

#[test]
fn cache_flag_and_env_share_one_cache_across_checkouts() {
    let shared = tempfile::tempdir().unwrap();
    let cache = shared.path().to_str().unwrap();
    let one = chain_project();
    one.run("pipelines/chain.toml", &["--cache", cache], 0);
    let two = chain_project();
    let out = two.command(&["run", "pipelines/chain.toml", "--json"]).env("SWIFT_CACHE", cache).output().unwrap();
    let json: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert!(json["stages"].as_array().unwrap().iter().all(|s| s["status"] == "cached"), "{json}");
    assert!(!two.path(".swift").exists());
}
