//! `kind = "eval"` as a user runs it: the base model, its int4 version and a
//! second model scored on the MMLU and C-Eval fixtures (CSV and Parquet
//! layouts) in one stage, the report folder, the run summary and history,
//! per-model caching of scores, and clear errors for bad data and settings.

use std::path::PathBuf;

use crate::util::{copy_dir, fixtures, Project, Run};

/// A project with the fixture models and suites, and an eval pipeline.
fn project(eval: &str) -> Project {
    let p = Project::new();
    copy_dir(&fixtures().join("models/qwen2-tiny"), &p.path("models/base"));
    copy_dir(&fixtures().join("models/llama-tiny"), &p.path("models/llama"));
    copy_dir(&fixtures().join("eval/mmlu"), &p.path("data/mmlu"));
    copy_dir(&fixtures().join("eval/ceval-parquet"), &p.path("data/ceval"));
    p.write("data/calib.jsonl", &calibration());
    write_manifest(&p, eval);
    p
}

fn write_manifest(p: &Project, eval: &str) {
    p.write(
        "pipelines/e.toml",
        &format!(
            "[stages.base]\nkind = \"download\"\nmodel = \"models/base\"\n\n\
             [stages.int4]\nkind = \"quantize\"\nmethod = \"rtn\"\nmodel = \"base\"\ncalibration = \"data/calib.jsonl\"\n\
             samples = 2\nseq_len = 32\nheld_out = 1\n\n\
             [stages.mmlu_data]\nkind = \"download\"\ndataset = \"data/mmlu\"\n\n\
             [stages.scores]\nkind = \"eval\"\n{eval}"
        ),
    );
}

fn calibration() -> String {
    (0..40).map(|i| format!("{{\"text\": \"The court heard appeal {i} on the statute and fined the river company.\"}}\n")).collect()
}

const SUITES: &str = "suites = { mmlu = \"mmlu_data\", ceval = \"data/ceval\" }\n";

fn report_dir(run: &Run) -> PathBuf {
    PathBuf::from(run.stage("scores")["outputs"]["report"].as_str().unwrap())
}

fn json(path: PathBuf) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// The action entries of the parts the eval stage cached: (key file, started ms).
fn parts(p: &Project) -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    for shard in std::fs::read_dir(p.path(".swift/actions")).unwrap() {
        for file in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            let entry = json(file.unwrap().path());
            if entry["kind"] == "eval/score" {
                out.push((entry["key"].as_str().unwrap().to_string(), entry));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn models_are_scored_side_by_side_with_a_report_and_history() {
    let p = project(&format!("models = [\"base\", \"int4\", \"models/llama\"]\n{SUITES}"));
    let run = p.run("pipelines/e.toml", &[], 0);
    let dir = report_dir(&run);
    let scores = json(dir.join("scores.json"));
    assert_eq!(scores["models"], serde_json::json!(["base", "int4", "models/llama"]));
    for model in ["base", "int4", "models/llama"] {
        for (suite, questions, subjects) in [("mmlu", 24, 4), ("ceval", 18, 3)] {
            let s = &scores["scores"][model][suite];
            assert_eq!(s["questions"], questions, "{model} {suite}: {s}");
            assert_eq!(s["subjects"].as_object().unwrap().len(), subjects);
            let micro = s["micro"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&micro));
            // Micro is the question-weighted mean of the subjects (equal sizes here: = macro).
            assert!((micro - s["macro"].as_f64().unwrap()).abs() < 1e-9, "{s}");
        }
    }
    assert_eq!(scores["scores"]["base"]["ceval"]["categories"].as_object().unwrap().keys().collect::<Vec<_>>(), ["STEM", "Unlisted"]);
    assert_eq!(scores["settings"]["template"], "lm-eval");
    assert!(scores["settings"]["prompts"]["mmlu"]["header"].as_str().unwrap().starts_with("The following are"));
    let first = scores["prompts"]["ceval"]["first_prompt"].as_str().unwrap();
    assert!(first.starts_with("以下是中国关于计算机网络的单项选择题"), "{first}");

    // One prediction per model × question, ordered by model, suite, subject, index.
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(dir.join("predictions.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3 * (24 + 18));
    let order: Vec<(String, String, String, u64)> = lines
        .iter()
        .map(|l| {
            let model_rank = ["base", "int4", "models/llama"].iter().position(|m| *m == l["model"]).unwrap().to_string();
            let suite_rank = if l["suite"] == "mmlu" { "0" } else { "1" };
            (model_rank, suite_rank.to_string(), l["subject"].as_str().unwrap().to_string(), l["index"].as_u64().unwrap())
        })
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted);
    let line = &lines[0];
    assert_eq!(line["loglikelihoods"].as_array().unwrap().len(), 4);
    assert!(["A", "B", "C", "D"].contains(&line["choice"].as_str().unwrap()));

    let md = std::fs::read_to_string(dir.join("scores.md")).unwrap();
    assert!(md.contains("| | `base` | `int4` | `models/llama` |"), "{md}");
    assert!(md.contains("**MMLU** (micro, 24 questions)") && md.contains("C-Eval · Unlisted"), "{md}");
    assert!(md.contains(" (+") || md.contains(" (−") || md.contains(" (±"), "{md}");
    let svg = std::fs::read_to_string(dir.join("scores.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.matches("<rect").count() == 1 + 3 * 2 + 3, "{svg}"); // background, bars, legend

    // Headline numbers in the run summary and in `swift report`.
    let metrics = &run.stage("scores")["metrics"];
    assert_eq!(metrics["mmlu.base"].as_f64().unwrap(), (scores["scores"]["base"]["mmlu"]["micro"].as_f64().unwrap() * 1e4).round() / 1e4);
    let history = p.swift(&["report", "pipelines/e.toml"]);
    assert!(history.stdout.contains("mmlu.int4"), "{history}");
}

#[test]
fn adding_a_model_scores_only_that_model_and_gc_keeps_the_parts() {
    let p = project(&format!("models = [\"base\"]\n{SUITES}limit = 2\n"));
    p.run("pipelines/e.toml", &[], 0);
    let before = parts(&p);
    assert_eq!(before.len(), 2, "one part per suite");

    write_manifest(&p, &format!("models = [\"base\", \"models/llama\"]\n{SUITES}limit = 2\n"));
    let run = p.run("pipelines/e.toml", &[], 0);
    assert_eq!(run.status("scores"), "ran");
    let after = parts(&p);
    assert_eq!(after.len(), 4);
    for (key, entry) in &before {
        let again = &after.iter().find(|(k, _)| k == key).expect("base's parts are still there").1;
        assert_eq!(again["provenance"]["started_unix_ms"], entry["provenance"]["started_unix_ms"], "base was rescored");
    }
    let predictions = std::fs::read_to_string(report_dir(&run).join("predictions.jsonl")).unwrap();
    assert_eq!(predictions.lines().count(), 2 * (4 + 3) * 2);

    // gc keeps the parts of the stage it keeps, however old (parts no entry
    // lists survive a week, for a failed run's rerun: age them past that).
    for shard in std::fs::read_dir(p.path(".swift/actions")).unwrap() {
        for file in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            let path = file.unwrap().path();
            let mut entry = json(path.clone());
            if entry["kind"] == "eval/score" {
                entry["provenance"]["started_unix_ms"] = 1.into();
                std::fs::write(&path, serde_json::to_vec(&entry).unwrap()).unwrap();
            }
        }
    }
    let after = parts(&p);
    assert_eq!(p.swift(&["gc"]).code, 0);
    assert_eq!(parts(&p).len(), 4);

    // `--force` rescoring means it: the parts are recomputed too.
    p.run("pipelines/e.toml", &["--force", "scores"], 0);
    for (key, entry) in parts(&p) {
        let old = &after.iter().find(|(k, _)| *k == key).unwrap().1;
        assert_ne!(entry["provenance"]["started_unix_ms"], old["provenance"]["started_unix_ms"], "{key} was not recomputed");
    }
}

#[test]
fn quick_runs_pick_subjects_and_chat_wraps_prompts() {
    let p = project(
        "models = [\"base\"]\nsuites = { mmlu = \"mmlu_data\" }\nsubjects = { mmlu = [\"world_religions\"] }\nlimit = 3\nshots = 2\nchat = true\n",
    );
    let run = p.run("pipelines/e.toml", &[], 0);
    let scores = json(report_dir(&run).join("scores.json"));
    let s = &scores["scores"]["base"]["mmlu"];
    assert_eq!(s["questions"], 3);
    assert_eq!(s["subjects"].as_object().unwrap().keys().collect::<Vec<_>>(), ["world_religions"]);
    assert_eq!(scores["prompts"]["mmlu"]["shots"]["world_religions"], 2);
}

#[test]
fn bad_data_and_settings_get_clear_errors() {
    // An answer outside A–D: the file and line.
    let p = project(&format!("models = [\"base\"]\n{SUITES}"));
    let path = p.path("data/mmlu/data/test/econometrics_test.csv");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}\"Broken row\",1,2,3,4,E\n")).unwrap();
    let run = p.run("pipelines/e.toml", &[], 1);
    assert!(run.stderr.contains("econometrics_test.csv:") && run.stderr.contains("answer `E` is not one of A, B, C, D"), "{run}");

    for (eval, field, message) in [
        ("models = [\"base\"]\nsuites = { mmlu = \"mmlu_data\", gsm8k = \"mmlu_data\" }\n", "gsm8k", "unknown suite `gsm8k`"),
        ("models = []\nsuites = { mmlu = \"mmlu_data\" }\n", "models", "models is empty"),
        ("models = [\"base\"]\nsuites = { mmlu = \"mmlu_data\" }\nsubjects = { ceval = [\"x\"] }\n", "ceval", "which `suites` does not bind"),
        ("models = [\"base\"]\nsuites = { mmlu = \"mmlu_data\" }\ntemplate = \"helm\"\n", "e.toml:", "unknown variant `helm`, expected `lm-eval` or `official`"),
        ("models = [\"base\", \"base\"]\nsuites = { mmlu = \"mmlu_data\" }\n", "models", "listed twice"),
    ] {
        write_manifest(&p, eval);
        let run = p.run("pipelines/e.toml", &[], 2);
        assert!(run.stderr.contains(message) && run.stderr.contains(field), "{eval}\n{run}");
    }

    // A subject named in `subjects` that the data does not hold.
    write_manifest(&p, "models = [\"base\"]\nsuites = { mmlu = \"mmlu_data\" }\nsubjects = { mmlu = [\"astronomy\"] }\n");
    let run = p.run("pipelines/e.toml", &[], 1);
    assert!(run.stderr.contains("subject `astronomy` is not in") && run.stderr.contains("stages.scores.suites.mmlu"), "{run}");
}
