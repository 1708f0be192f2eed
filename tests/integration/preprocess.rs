use std::path::PathBuf;

use swift_stages::preprocess::shards::Split;

use crate::util::{copy_dir, fixtures, Project};

/// A project with both fixture models and every fixture dataset under data/.
fn project(prep: &str) -> Project {
    let p = Project::new();
    copy_dir(&fixtures().join("models/qwen2-tiny"), &p.path("models/qwen"));
    copy_dir(&fixtures().join("models/llama-tiny"), &p.path("models/llama"));
    std::fs::create_dir_all(p.path("data")).unwrap();
    for name in ["messages.jsonl", "sharegpt.json", "swift.jsonl", "alpaca.csv", "query.jsonl"] {
        std::fs::copy(fixtures().join("preprocess").join(name), p.path("data").join(name)).unwrap();
    }
    let manifest = format!(
        "[pipeline]\nseed = 7\n\n[stages.qwen]\nkind = \"download\"\nmodel = \"models/qwen\"\n\n[stages.llama]\nkind = \"download\"\nmodel = \"models/llama\"\n\n\
         [stages.chat]\nkind = \"download\"\ndataset = \"data/messages.jsonl\"\n\n[stages.prep]\nkind = \"preprocess\"\n{prep}\n"
    );
    p.write("pipelines/p.toml", &manifest);
    p
}

fn train_split(run: &crate::util::Run, stage: &str) -> (PathBuf, Split) {
    let tokens = PathBuf::from(run.stage(stage)["outputs"]["tokens"].as_str().unwrap());
    let split = Split::open(&tokens, "train").unwrap();
    (tokens, split)
}

fn reference(name: &str) -> Vec<(Vec<u32>, Vec<u8>)> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("preprocess/reference.json")).unwrap()).unwrap();
    json[name]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (serde_json::from_value(c["ids"].clone()).unwrap(), serde_json::from_value(c["labels"].clone()).unwrap()))
        .collect()
}

fn rows(split: &Split) -> Vec<(Vec<u32>, Vec<u8>)> {
    (0..split.rows()).map(|r| (split.row(r).ids(), split.row(r).labels.to_vec())).collect()
}

#[test]
fn tokens_and_masks_match_transformers_token_by_token() {
    for (model, train_on, name) in [("qwen", "all-assistant", "qwen2-tiny"), ("llama", "all-assistant", "llama-tiny"), ("qwen", "last-assistant", "qwen2-tiny-last")] {
        let p = project(&format!("model = \"{model}\"\ndata = [\"chat\"]\npacking = false\nshuffle = false\ntrain_on = \"{train_on}\"\n"));
        let run = p.run("pipelines/p.toml", &[], 0);
        let (_, split) = train_split(&run, "prep");
        assert_eq!(rows(&split), reference(name), "{name}");
    }
}

#[test]
fn every_row_format_gives_the_same_tokens_for_the_same_conversations() {
    let p = project("model = \"qwen\"\ndata = [\"chat\"]\npacking = false\nshuffle = false\n");
    let mut manifest = p.read("pipelines/p.toml");
    for name in ["sharegpt.json", "swift.jsonl"] {
        manifest = manifest.replace("data/messages.jsonl", &format!("data/{name}"));
        p.write("pipelines/p.toml", &manifest);
        let run = p.run("pipelines/p.toml", &[], 0);
        let (_, split) = train_split(&run, "prep");
        assert_eq!(rows(&split), reference("qwen2-tiny"), "{name}");
        manifest = manifest.replace(&format!("data/{name}"), "data/messages.jsonl");
    }
    // Alpaca CSV and query/response with history, together, with ratios.
    let both = manifest
        .replace("dataset = \"data/messages.jsonl\"", "dataset = \"data/alpaca.csv\"\n\n[stages.qr]\nkind = \"download\"\ndataset = \"data/query.jsonl\"")
        .replace("data = [\"chat\"]", "data = [\"chat\", \"qr\"]\nratios = [1.0, 2.0]");
    p.write("pipelines/p.toml", &both);
    let run = p.run("pipelines/p.toml", &[], 0);
    let prep = run.stage("prep");
    assert_eq!(prep["metrics"]["samples"], 4, "2 alpaca rows + the query row twice\n{run}");
}

#[test]
fn packing_fills_rows_and_keeps_sample_boundaries() {
    let p = project("model = \"qwen\"\ndata = [\"chat\"]\nratios = [4.0]\nmax_length = 200\nshuffle = false\n");
    let run = p.run("pipelines/p.toml", &[], 0);
    let (tokens, split) = train_split(&run, "prep");
    let header: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tokens.join("header.json")).unwrap()).unwrap();
    assert_eq!(header["splits"]["train"]["samples"], 8);
    let mut samples = Vec::new();
    for r in 0..split.rows() {
        let row = split.row(r);
        assert!(row.len() <= 200);
        let ids = row.ids();
        let mut bounds = row.sample_starts.clone();
        bounds.push(row.len());
        for w in bounds.windows(2) {
            samples.push((ids[w[0]..w[1]].to_vec(), row.labels[w[0]..w[1]].to_vec()));
        }
    }
    let mut expected: Vec<_> = reference("qwen2-tiny").into_iter().flat_map(|s| std::iter::repeat_n(s, 4)).collect();
    samples.sort();
    expected.sort();
    assert_eq!(samples, expected, "every sample exactly once, intact");
    let stats: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        run.stage("prep")["outputs"]["stats"].as_str().unwrap(),
    ).unwrap())
    .unwrap();
    assert!(stats["padding_pct"].as_f64().unwrap() < 50.0, "{stats}");
}

#[test]
fn same_seed_same_shards_and_max_length_reruns_only_preprocess() {
    let p = project("model = \"qwen\"\ndata = [\"chat\"]\nratios = [3.0]\nval_fraction = 0.3\n");
    let first = p.run("pipelines/p.toml", &[], 0);
    let (tokens, _) = train_split(&first, "prep");
    let again = p.run("pipelines/p.toml", &["--force", "prep"], 0);
    assert_eq!(again.status("prep"), "ran");
    assert_eq!(train_split(&again, "prep").0, tokens, "identical shard digests");
    assert!(tokens.join("val.ids").exists(), "val_fraction makes a validation split");
    let longer = p.run("pipelines/p.toml", &["--set", "stages.prep.max_length=256"], 0);
    assert_eq!(longer.status("prep"), "ran");
    for stage in ["qwen", "llama", "chat"] {
        assert_eq!(longer.status(stage), "cached");
    }
}

#[test]
fn bad_rows_fail_with_file_line_and_field_or_are_skipped_and_counted() {
    let p = project("model = \"qwen\"\ndata = [\"chat\"]\n");
    let good = std::fs::read_to_string(p.path("data/messages.jsonl")).unwrap();
    p.write("data/messages.jsonl", &format!("{good}{{not json\n{{\"messages\": [{{\"role\": \"wizard\", \"content\": \"x\"}}]}}\n"));
    let run = p.run("pipelines/p.toml", &[], 1);
    // The user's file, not the cache copy the stage reads.
    assert!(run.stderr.contains("FAILED: data/messages.jsonl:3: malformed JSON"), "{run}");
    assert!(run.stderr.contains("on_error = \"skip\""), "{run}");
    let manifest = p.read("pipelines/p.toml").replace("data = [\"chat\"]", "data = [\"chat\"]\non_error = \"skip\"");
    p.write("pipelines/p.toml", &manifest);
    let run = p.run("pipelines/p.toml", &[], 0);
    let prep = run.stage("prep");
    assert_eq!(prep["metrics"]["skipped"], 2, "{run}");
    let stats: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(prep["outputs"]["stats"].as_str().unwrap()).unwrap()).unwrap();
    assert_eq!(stats["skipped"]["malformed JSON"], 1);
    assert_eq!(stats["skipped"]["unknown role"], 1);
    assert!(stats["skipped_examples"][1].as_str().unwrap().starts_with("data/messages.jsonl:4: field `messages[0].role`"), "{stats}");
}

#[test]
fn rows_are_bounded_by_the_model_context_and_huge_lines_by_max_length() {
    // Left out, max_length is the model's context when that is under 2048 (the fixture has 512).
    let p = project("model = \"qwen\"\ndata = [\"chat\"]\n");
    let run = p.run("pipelines/p.toml", &[], 0);
    let (tokens, _) = train_split(&run, "prep");
    let header = swift_stages::preprocess::shards::Header::read(&tokens).unwrap();
    assert_eq!(header.max_length, 512);
    let run = p.run("pipelines/p.toml", &["--set", "stages.prep.max_length=8192"], 1);
    assert!(
        run.stderr.contains("stages.prep.max_length: max_length = 8192 is longer than the model's context (max_position_embeddings = 512)"),
        "{run}"
    );

    // One 4 MB line is tokenized only as far as a row holds.
    let long = "the tenant shall repair the premises ".repeat(110_000);
    let row = serde_json::json!({"messages": [{"role": "user", "content": "Summarise."}, {"role": "assistant", "content": long}]});
    p.write("data/huge.jsonl", &format!("{row}\n"));
    let p2 = p.read("pipelines/p.toml").replace("data = [\"chat\"]", "data = [\"data/huge.jsonl\"]\nmax_length = 64");
    p.write("pipelines/p.toml", &p2);
    let run = p.run("pipelines/p.toml", &[], 0);
    assert_eq!(run.stage("prep")["metrics"]["truncated"], 1, "{run}");
    let (_, split) = train_split(&run, "prep");
    assert_eq!(split.row(0).len(), 64);
}

#[test]
fn local_paths_work_as_data_and_validation_sets() {
    let p = project("model = \"qwen\"\ndata = [\"data/messages.jsonl\"]\nval_data = [\"data/swift.jsonl\"]\npacking = false\nshuffle = false\n");
    let run = p.run("pipelines/p.toml", &[], 0);
    let (tokens, split) = train_split(&run, "prep");
    assert_eq!(rows(&split), reference("qwen2-tiny"));
    let val = Split::open(&tokens, "val").unwrap();
    assert_eq!(rows(&val), reference("qwen2-tiny"), "the same conversations in ms-swift's layout");
    p.write("data/messages.jsonl", "{\"query\": \"q\", \"response\": \"r\"}\n");
    assert_eq!(p.run("pipelines/p.toml", &[], 0).status("prep"), "ran", "a local input's edit reruns the stage");
}

#[test]
fn a_model_without_a_template_needs_the_chatml_fallback() {
    let p = project("model = \"qwen\"\ndata = [\"chat\"]\n");
    let config = p.read("models/qwen/tokenizer_config.json");
    let mut json: serde_json::Value = serde_json::from_str(&config).unwrap();
    json.as_object_mut().unwrap().remove("chat_template");
    p.write("models/qwen/tokenizer_config.json", &json.to_string());
    let run = p.run("pipelines/p.toml", &[], 1);
    assert!(run.stderr.contains("fallback_template = \"chatml\""), "{run}");
    let manifest = p.read("pipelines/p.toml").replace("data = [\"chat\"]", "data = [\"chat\"]\nfallback_template = \"chatml\"");
    p.write("pipelines/p.toml", &manifest);
    assert_eq!(p.run("pipelines/p.toml", &[], 0).status("prep"), "ran");
}
