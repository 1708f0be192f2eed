use crate::util::Project;

#[test]
fn a_dataset_file_is_ingested_read_only_under_its_name() {
    let p = Project::new();
    p.write("data/law.jsonl", "{\"q\": 1}\n");
    p.write("pipelines/d.toml", "[stages.law]\nkind = \"download\"\ndataset = \"data/law.jsonl\"\n");
    let run = p.run("pipelines/d.toml", &[], 0);
    let out = run.json()["stages"][0]["outputs"]["dataset"].as_str().unwrap().to_string();
    assert!(out.ends_with("/law.jsonl") && out.contains("/.swift/"), "{run}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "{\"q\": 1}\n");
    // Editing the source never touches the cached copy.
    p.write("data/law.jsonl", "{\"q\": 2}\n");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "{\"q\": 1}\n");
    assert_eq!(p.run("pipelines/d.toml", &[], 0).status("law"), "ran");
}

#[test]
fn a_model_folder_is_ingested_as_a_folder() {
    let p = Project::new();
    p.write("models/tiny/config.json", "{}");
    p.write("models/tiny/sub/weights.bin", "0123456789");
    p.write("pipelines/m.toml", "[stages.base]\nkind = \"download\"\nmodel = \"models/tiny\"\n");
    let run = p.run("pipelines/m.toml", &[], 0);
    let out = std::path::PathBuf::from(run.json()["stages"][0]["outputs"]["model"].as_str().unwrap());
    assert_eq!(std::fs::read_to_string(out.join("config.json")).unwrap(), "{}");
    assert_eq!(std::fs::read_to_string(out.join("sub/weights.bin")).unwrap(), "0123456789");
    assert_eq!(p.run("pipelines/m.toml", &[], 0).status("base"), "cached");
}

#[test]
fn download_rejects_bad_sources() {
    let p = Project::new();
    p.write("data/file.txt", "x");
    p.write("pipelines/a.toml", "[stages.s]\nkind = \"download\"\nmodel = \"data/file.txt\"\n");
    assert!(p.run("pipelines/a.toml", &[], 2).stderr.contains("is a file"));
    p.write("pipelines/b.toml", "[stages.s]\nkind = \"download\"\n");
    assert!(p.run("pipelines/b.toml", &[], 2).stderr.contains("needs `model"));
    p.write("pipelines/c.toml", "[stages.s]\nkind = \"download\"\nmodel = \"hf://onlyorg\"\n");
    assert!(p.run("pipelines/c.toml", &[], 2).stderr.contains("expected hf://ORG/NAME"));
    p.write("pipelines/d.toml", "[stages.s]\nkind = \"download\"\nmodel = \"hf://datasets/org/data\"\n");
    assert!(p.run("pipelines/d.toml", &[], 2).stderr.contains("is a Dataset repository"));
    p.write("pipelines/e.toml", "[stages.s]\nkind = \"download\"\ndataset = \"data/file.txt\"\nfiles = [\"*.json\"]\n");
    assert!(p.run("pipelines/e.toml", &[], 2).stderr.contains("applies to hf:// sources only"));
}
