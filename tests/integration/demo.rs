use crate::util::{copy_dir, Project};

/// The shipped demo pipeline runs offline from a fresh clone, and its committed
/// lock file matches (so `--locked` passes).
#[test]
fn demo_pipeline_runs_locked_then_cached() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let p = Project::new();
    for file in ["pipelines/demo.toml", "pipelines/demo.lock", "data/demo/law_qa.jsonl"] {
        p.write(file, &std::fs::read_to_string(repo.join(file)).unwrap());
    }
    let model = "tests/fixtures/models/qwen2-tiny";
    copy_dir(&repo.join(model), &p.path(model));
    let first = p.run("pipelines/demo.toml", &["--locked"], 0);
    assert!(first.statuses().iter().all(|(_, s)| s == "ran"), "{first}");
    let second = p.run("pipelines/demo.toml", &[], 0);
    assert!(second.statuses().iter().all(|(_, s)| s == "cached"), "{second}");
    assert_eq!(p.read("pipelines/demo.lock"), std::fs::read_to_string(repo.join("pipelines/demo.lock")).unwrap());
}
