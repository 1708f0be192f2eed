use std::path::Path;

use crate::util::{copy_dir, files_under, populate_hf_cache, Project};


/// A project holding the demo's files from the repository, as a fresh clone has them.
pub(crate) fn demo_project() -> Project {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let p = Project::new();
    for file in ["pipelines/demo.toml", "pipelines/demo.lock", "pipelines/demo-ci.toml", "data/demo/law_qa.jsonl"] {
        p.write(file, &std::fs::read_to_string(repo.join(file)).unwrap());
    }
    for folder in ["data/demo/model", "data/demo/mmlu", "data/demo/ceval"] {
        copy_dir(&repo.join(folder), &p.path(folder));
    }
    p
}

/// The full demo's committed lock file matches the manifest and the shipped
/// data (the README's main job runs `--locked`-clean from a fresh clone).
#[test]
fn the_full_demo_matches_its_lock_file() {
    let p = demo_project();
    let dry = p.run("pipelines/demo.toml", &["--locked", "--dry-run"], 0);
    assert_eq!(dry.statuses().len(), 10, "{dry}");
}

/// The CI-sized demo: every stage kind runs, the fine-tuned and int4 models
/// beat the base by 10 points or more on both test sets (and chance, 25 %,
/// by 15), and the card's eval
/// table lists every model; a rerun is all cached; an eval option reruns only eval and
/// export; one line of data reruns its download and everything from
/// preprocess on, but not the model's download.
#[test]
fn the_ci_sized_demo_runs_end_to_end_and_reruns_only_what_changed() {
    let p = demo_project();
    let first = p.run("pipelines/demo-ci.toml", &[], 0);
    assert!(first.statuses().iter().all(|(_, s)| s == "ran"), "{first}");
    let kinds: std::collections::BTreeSet<String> = first.json()["stages"].as_array().unwrap().iter().map(|s| s["kind"].as_str().unwrap().to_string()).collect();
    assert_eq!(kinds.into_iter().collect::<Vec<_>>(), ["download", "eval", "export", "finetune", "preprocess", "quantize"]);
    let accuracy = |metric: &str| first.stage("eval")["metrics"][metric].as_f64().unwrap_or_else(|| panic!("no {metric}\n{first}"));
    for suite in ["mmlu", "ceval"] {
        let base = accuracy(&format!("{suite}.base"));
        for model in ["fine", "int4"] {
            let tuned = accuracy(&format!("{suite}.{model}"));
            assert!(tuned >= base + 0.10 && tuned >= 0.40, "{suite}: {model} {tuned} against base {base}\n{first}");
        }
    }
    base_scores_match_transformers(Path::new(first.stage("eval")["outputs"]["report"].as_str().unwrap()));
    let table = p.read("exports/demo-ci/README.md");
    assert!(table.contains("## Evaluation") && table.contains("`fine`") && table.contains("`int4`"), "{table}");

    let again = p.run("pipelines/demo-ci.toml", &[], 0);
    assert!(again.statuses().iter().all(|(_, s)| s == "cached"), "{again}");

    let manifest = p.read("pipelines/demo-ci.toml");
    let limited = manifest.replace("[stages.eval]\n", "[stages.eval]\nlimit = 60\n");
    assert_ne!(limited, manifest);
    p.write("pipelines/demo-ci.toml", &limited);
    let eval_edit = p.run("pipelines/demo-ci.toml", &[], 0);
    let ran: Vec<String> = eval_edit.statuses().into_iter().filter(|(_, s)| s == "ran").map(|(n, _)| n).collect();
    assert_eq!(ran, ["eval", "export"], "{eval_edit}");

    let data = p.read("data/demo/law_qa.jsonl");
    let first_line = data.lines().next().unwrap();
    p.write("data/demo/law_qa.jsonl", &data.replacen(first_line, &first_line.replace("Statute", "Statute no."), 1));
    let data_edit = p.run("pipelines/demo-ci.toml", &[], 0);
    let status: std::collections::BTreeMap<String, String> = data_edit.statuses().into_iter().collect();
    for stage in ["base", "mmlu", "ceval"] {
        assert_eq!(status[stage], "cached", "{stage}\n{data_edit}");
    }
    for stage in ["law", "prep", "coarse", "fine", "int4", "eval", "export"] {
        assert_eq!(status[stage], "ran", "{stage}\n{data_edit}");
    }
}

/// The demo's base model loads unchanged in transformers: its log-likelihoods
/// for the first questions of each test set (tests/fixtures/demo/reference.json,
/// from make_demo_reference.py there) equal the eval's within 1e-4.
fn base_scores_match_transformers(report: &Path) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo.join("tests/fixtures/demo/reference.json")).unwrap()).unwrap();
    let predictions: Vec<serde_json::Value> = std::fs::read_to_string(report.join("predictions.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .filter(|p: &serde_json::Value| p["model"] == "base")
        .collect();
    let mut compared = 0;
    for (suite, questions) in reference.as_object().unwrap() {
        for (index, expected) in questions.as_array().unwrap().iter().enumerate() {
            let ours = predictions.iter().find(|p| p["suite"] == *suite && p["index"] == index).unwrap_or_else(|| panic!("{suite} {index}"));
            assert_eq!(ours["answer"], expected["answer"], "{suite} {index}");
            for (a, b) in ours["loglikelihoods"].as_array().unwrap().iter().zip(expected["loglikelihoods"].as_array().unwrap()) {
                let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
                assert!((a - b).abs() < 1e-4, "{suite} {index}: swift {a}, transformers {b}");
            }
            compared += 1;
        }
    }
    assert_eq!(compared, 40);
}

/// pipelines/law_qa.toml as shipped — Qwen2.5-0.5B-Instruct, MMLU and C-Eval
/// from the Hub — checked by `status` and `--dry-run`, then run end to end
/// offline against an HF cache holding fixtures under the real repository
/// names (the tiny Qwen2 as the model, fixture Parquet subjects as the law
/// subjects).
#[test]
fn law_qa_pipeline_runs_from_a_prepopulated_hf_cache() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let p = Project::new();
    p.write("pipelines/law_qa.toml", &std::fs::read_to_string(repo.join("pipelines/law_qa.toml")).unwrap());
    // The shipped sample's first 80 conversations: enough for every stage
    // (AWQ's calibration blocks included), quick on the tiny model.
    let sample = std::fs::read_to_string(repo.join("data/law_qa.jsonl")).unwrap();
    p.write("data/law_qa.jsonl", &sample.lines().take(80).map(|l| format!("{l}\n")).collect::<String>());
    let cache = p.path("hf-cache");
    p.set_env("HF_HUB_CACHE", cache.to_str().unwrap());
    p.set_env("HF_HUB_OFFLINE", "1");
    p.set_env("HF_ENDPOINT", "http://127.0.0.1:9");

    // Nothing cached yet: status names the fix instead of failing obscurely.
    let status = p.swift(&["status", "pipelines/law_qa.toml"]);
    assert!(status.stderr.contains("not in the Hugging Face cache"), "{status}");

    let fixtures = repo.join("tests/fixtures");
    let model = files_under(&fixtures.join("models/qwen2-tiny"), "");
    populate_hf_cache(&cache, "models/Qwen/Qwen2.5-0.5B-Instruct", &"a".repeat(40), &model);
    let mut mmlu = Vec::new();
    for (subject, fixture) in [("international_law", "abstract_algebra"), ("jurisprudence", "econometrics"), ("professional_law", "world_religions"), ("astronomy", "miscellaneous")] {
        mmlu.extend(files_under(&fixtures.join("eval/mmlu-parquet").join(fixture), &format!("{subject}/")));
    }
    populate_hf_cache(&cache, "datasets/cais/mmlu", &"b".repeat(40), &mmlu);
    let mut ceval = Vec::new();
    for (subject, fixture) in [("law", "local_law"), ("legal_professional", "computer_network"), ("physician", "high_school_physics")] {
        ceval.extend(files_under(&fixtures.join("eval/ceval-parquet").join(fixture), &format!("{subject}/")));
    }
    populate_hf_cache(&cache, "datasets/ceval/ceval-exam", &"c".repeat(40), &ceval);

    let status = p.swift(&["status", "pipelines/law_qa.toml"]);
    assert_eq!(status.code, 0, "{status}");
    let dry = p.run("pipelines/law_qa.toml", &["--dry-run"], 0);
    assert_eq!(dry.statuses().len(), 10, "{dry}");
    assert!(dry.statuses().iter().all(|(_, s)| s == "would-run"), "{dry}");

    let run = p.run("pipelines/law_qa.toml", &[], 0);
    assert!(run.statuses().iter().all(|(_, s)| s == "ran"), "{run}");
    let lock = p.read("pipelines/law_qa.lock");
    for sha in ["a", "b", "c"] {
        assert!(lock.contains(&sha.repeat(40)), "the lock pins every Hub revision\n{lock}");
    }
    // Only the subjects named were fetched and scored.
    let scores: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        Path::new(run.stage("eval")["outputs"]["report"].as_str().unwrap()).join("scores.json"),
    ).unwrap()).unwrap();
    let text = scores.to_string();
    assert!(text.contains("professional_law") && text.contains("legal_professional") && !text.contains("astronomy") && !text.contains("physician"), "{text}");
    let card = p.read("exports/law_qa/README.md");
    assert!(card.starts_with("---\nbase_model: Qwen/Qwen2.5-0.5B-Instruct\n"), "{card}");
    assert!(card.contains(&format!("at revision `{}`", "a".repeat(40))) && card.contains("## Evaluation"), "{card}");
    assert!(p.path("exports/law_qa/gguf/qwen2.5-0.5b-law-qa-q8_0.gguf").is_file());
    let again = p.run("pipelines/law_qa.toml", &["--locked"], 0);
    assert!(again.statuses().iter().all(|(_, s)| s == "cached"), "{again}");
}
