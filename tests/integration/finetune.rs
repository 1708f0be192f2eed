//! `kind = "finetune"` as a user runs it: LoRA/QLoRA training on the tiny Qwen2
//! fixture learns a small synthetic task, resumes bit-identically after
//! kill -9, gives the same bits on 1 and 2 threads, chains QLoRA → LoRA, and
//! rejects bad settings with clear errors.

use std::path::{Path, PathBuf};

use swift_stages::preprocess::shards::Header;

use crate::util::{copy_dir, fixtures, Project};

/// A synthetic chat task with a learnable rule: the assistant always answers
/// "Sure! The word was " and then repeats the user's word.
pub(crate) fn task(samples: usize) -> String {
    let words = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "piano", "amber", "delta", "frost", "lemon"];
    let mut out = String::new();
    for i in 0..samples {
        let word = words[(i * 7 + i / 12) % words.len()];
        let line = serde_json::json!({"messages": [
            {"role": "user", "content": format!("Say the word {word}, please.")},
            {"role": "assistant", "content": format!("Sure! The word was {word}.")},
        ]});
        out.push_str(&format!("{line}\n"));
    }
    out
}

/// A project with the qwen2-tiny fixture, the task data, a preprocess stage and
/// the given finetune stages.
pub(crate) fn project(stages: &str) -> Project {
    let p = Project::new();
    copy_dir(&fixtures().join("models/qwen2-tiny"), &p.path("models/qwen"));
    p.write("data/task.jsonl", &task(96));
    p.write(
        "pipelines/tune.toml",
        &format!(
            "[pipeline]\nseed = 11\n\n[stages.base]\nkind = \"download\"\nmodel = \"models/qwen\"\n\n\
             [stages.prep]\nkind = \"preprocess\"\nmodel = \"base\"\ndata = [\"data/task.jsonl\"]\nmax_length = 128\nval_fraction = 0.2\n\n{stages}"
        ),
    );
    p
}

pub(crate) fn output_path(run: &crate::util::Run, stage: &str, output: &str) -> PathBuf {
    PathBuf::from(run.stage(stage)["outputs"][output].as_str().unwrap())
}

fn log_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

pub(crate) fn adapter_bytes(run: &crate::util::Run, stage: &str) -> Vec<u8> {
    std::fs::read(output_path(run, stage, "adapter").join("adapter_model.safetensors")).unwrap()
}

#[test]
fn qlora_learns_the_synthetic_task_and_writes_a_peft_adapter() {
    let p = project(
        "[stages.tune]\nkind = \"finetune\"\nmethod = \"qlora\"\nmodel = \"base\"\ndata = \"prep\"\n\
         lora = { rank = 8, alpha = 16 }\nlr = 3e-3\nmax_steps = 240\nwarmup_steps = 10\neval_every = 80\n",
    );
    let run = p.run("pipelines/tune.toml", &[], 0);
    let log = log_lines(&output_path(&run, "tune", "log"));
    let losses: Vec<f64> = log.iter().filter_map(|l| l["loss"].as_f64()).collect();
    assert_eq!(losses.len(), 240);
    let start = losses[..5].iter().sum::<f64>() / 5.0;
    let end = losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
    assert!(end < 0.25 * start, "training loss went from {start} to {end}");
    let val: Vec<(f64, f64)> =
        log.iter().filter_map(|l| Some((l["val_loss"].as_f64()?, l["val_accuracy"].as_f64()?))).collect();
    assert_eq!(val[0].0, log.iter().find_map(|l| l["val_loss"].as_f64()).unwrap());
    let (first, last) = (val[0], *val.last().unwrap());
    assert!(last.0 < first.0 * 0.5 && last.1 > first.1 + 0.3, "held-out loss/accuracy went from {first:?} to {last:?}");
    for line in log.iter().filter(|l| l["loss"].is_number()) {
        for key in ["step", "lr", "grad_norm", "tokens_per_s"] {
            assert!(line[key].is_number(), "log line lacks {key}: {line}");
        }
    }
    // PEFT's files, names and config.
    let adapter = output_path(&run, "tune", "adapter");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 8);
    assert_eq!(config["base_model_name_or_path"], "models/qwen");
    let tensors = candle_core::safetensors::load(adapter.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(tensors.len(), 2 * 7 * 2, "A and B for 7 modules in 2 layers");
    assert!(tensors.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    // The loss curve draws its text as paths, and the metrics reach the summary.
    let svg = std::fs::read_to_string(output_path(&run, "tune", "loss_curve")).unwrap();
    assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"), "{}", &svg[..80]);
    assert!(!svg.contains("<text") && !svg.contains("font"));
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(output_path(&run, "tune", "metrics")).unwrap()).unwrap();
    for key in ["final_train_loss", "final_val_loss", "val_accuracy", "tokens", "seconds", "peak_rss_bytes", "frozen_weight_bytes"] {
        assert!(metrics[key].is_number(), "metrics lack {key}: {metrics}");
    }
    // A rerun is a cache hit.
    let again = p.run("pipelines/tune.toml", &[], 0);
    assert_eq!(again.status("tune"), "cached", "{again}");
}

pub(crate) fn checkpoint_step(root: &Path) -> Option<usize> {
    let mut stack = vec![root.join(".swift")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).ok()?.flatten() {
            let path = entry.path();
            if path.ends_with("checkpoints/latest") {
                let name = std::fs::read_to_string(&path).ok()?;
                // `step-NNNNNNNN-<nonce>`
                return name.trim().strip_prefix("step-")?.split('-').next()?.parse().ok();
            }
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    None
}

const RESUMABLE: &str = "[stages.tune]\nkind = \"finetune\"\nmethod = \"lora\"\nmodel = \"base\"\ndata = \"prep\"\n\
    lora = { rank = 4, alpha = 8, dropout = 0.1 }\nlr = 2e-3\nmax_steps = 48\nsave_every = 5\ngrad_accum = 2\n";

#[test]
fn a_run_killed_mid_training_resumes_to_the_same_bits() {
    let reference = project(RESUMABLE);
    let uninterrupted = reference.run("pipelines/tune.toml", &[], 0);

    let p = project(RESUMABLE);
    p.run("pipelines/tune.toml", &["--until", "prep"], 0);
    let mut child = p.spawn(&["run", "pipelines/tune.toml"]);
    p.wait_for("a checkpoint at step 10", |p| checkpoint_step(p.root()).is_some_and(|s| s >= 10));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let killed_at = checkpoint_step(p.root()).unwrap();
    assert!(killed_at < 48, "the run finished before it was killed");
    let resumed = p.run("pipelines/tune.toml", &[], 0);
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(output_path(&resumed, "tune", "metrics")).unwrap()).unwrap();
    assert!(metrics["resumed_from_step"].as_u64().unwrap() >= 10, "{metrics}");
    assert_eq!(adapter_bytes(&resumed, "tune"), adapter_bytes(&uninterrupted, "tune"));
    assert_eq!(checkpoint_step(p.root()), None, "checkpoints are cleaned when the stage completes");
}

#[test]
fn one_and_two_threads_train_the_same_bits() {
    let stage = "[stages.tune]\nkind = \"finetune\"\nmethod = \"qlora\"\nmodel = \"base\"\ndata = \"prep\"\n\
        lora = { rank = 4, alpha = 8 }\nlr = 2e-3\nmax_steps = 12\nactivation_checkpointing = true\n";
    let bits: Vec<Vec<u8>> = ["1", "2"]
        .iter()
        .map(|threads| {
            let p = project(stage);
            p.set_env("RAYON_NUM_THREADS", threads);
            adapter_bytes(&p.run("pipelines/tune.toml", &[], 0), "tune")
        })
        .collect();
    assert_eq!(bits[0], bits[1]);
}

/// The adapter's values, by tensor name.
fn adapter_tensors(run: &crate::util::Run, stage: &str) -> std::collections::HashMap<String, Vec<f32>> {
    let path = output_path(run, stage, "adapter").join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    tensors.into_iter().map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect()
}

/// A batch of four rows trains the same adapter whether its rows go through
/// the model as one pass or as micro-batches of one (up to rounding: the sums
/// run in another order); the loss log agrees too.
#[test]
fn micro_batches_train_the_same_adapter_as_whole_batches() {
    let stage = |micro: &str| {
        format!(
            "[stages.tune]\nkind = \"finetune\"\nmethod = \"lora\"\nmodel = \"base\"\ndata = \"prep\"\n\
             lora = {{ rank = 4, alpha = 8 }}\nlr = 2e-3\nmax_steps = 6\nbatch_size = 4\ngrad_accum = 2\n{micro}"
        )
    };
    let runs: Vec<_> = ["", "micro_batch_size = 1\n"]
        .iter()
        .map(|micro| {
            let p = project(&stage(micro));
            let run = p.run("pipelines/tune.toml", &[], 0);
            assert_eq!(run.stage("tune")["metrics"]["rows_without_labels"], 0, "{run}");
            (adapter_tensors(&run, "tune"), log_lines(&output_path(&run, "tune", "log")))
        })
        .collect();
    let (whole, split) = (&runs[0], &runs[1]);
    assert_eq!(whole.0.len(), split.0.len());
    for (name, a) in &whole.0 {
        let b = &split.0[name];
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff < 1e-3 * scale, "{name}: micro-batches differ by {diff} (scale {scale})");
    }
    for (a, b) in whole.1.iter().zip(&split.1) {
        if let (Some(x), Some(y)) = (a["loss"].as_f64(), b["loss"].as_f64()) {
            assert!((x - y).abs() < 1e-4 * x.abs(), "step {}: loss {x} vs {y}", a["step"]);
            assert_eq!(a["tokens"], b["tokens"]);
        }
    }
    rejects("method = \"lora\"\nbatch_size = 2\nmicro_batch_size = 3\n", 2, &[
        "tune.toml:",
        "micro_batch_size must be from 1 to batch_size (2)",
    ]);
}

#[test]
fn qlora_then_lora_chains_two_adapters_on_the_original_base() {
    let p = project(
        "[stages.coarse]\nkind = \"finetune\"\nmethod = \"qlora\"\nmodel = \"base\"\ndata = \"prep\"\n\
         lora = { rank = 8, alpha = 16 }\nlr = 3e-3\nmax_steps = 20\n\n\
         [stages.fine]\nkind = \"finetune\"\nmethod = \"lora\"\nmodel = \"coarse\"\ndata = \"prep\"\n\
         lora = { rank = 4, alpha = 8, targets = [\"q_proj\", \"v_proj\"], layers = \"last 1\" }\nlr = 1e-3\nmax_steps = 20\n",
    );
    let run = p.run("pipelines/tune.toml", &[], 0);
    let read = |stage: &str| {
        let dir = output_path(&run, stage, "adapter");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
        let tensors = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
        let mut keys: Vec<String> = tensors.into_keys().collect();
        keys.sort();
        (config, keys)
    };
    let (coarse, coarse_keys) = read("coarse");
    let (fine, fine_keys) = read("fine");
    assert_eq!(coarse["base_model_name_or_path"], "models/qwen");
    assert_eq!(fine["base_model_name_or_path"], "models/qwen", "every adapter of a chain names the original base");
    assert_eq!(coarse_keys.len(), 28);
    assert_eq!(fine_keys, [
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight",
        "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight",
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight",
    ]);
    assert_eq!(fine["layers_to_transform"], serde_json::json!([1]));
    // Retraining the first adapter retrains the second (it is part of its key).
    let manifest = p.read("pipelines/tune.toml").replace("max_steps = 20\n\n", "max_steps = 21\n\n");
    p.write("pipelines/tune.toml", &manifest);
    let rerun = p.run("pipelines/tune.toml", &[], 0);
    assert_eq!(rerun.status("coarse"), "ran", "{rerun}");
    assert_eq!(rerun.status("fine"), "ran", "{rerun}");
}

fn rejects(stage: &str, code: i32, expected: &[&str]) {
    let p = project(&format!("[stages.tune]\nkind = \"finetune\"\nmodel = \"base\"\ndata = \"prep\"\n{stage}"));
    let run = p.run("pipelines/tune.toml", &[], code);
    for text in expected {
        assert!(run.stderr.contains(text), "expected `{text}`\n{run}");
    }
}

#[test]
fn bad_settings_are_clear_errors() {
    rejects("method = \"lora\"\nlora = { targets = [\"q_prj\"] }\n", 2, &[
        "tune.toml:",
        "unknown target module `q_prj` (did you mean `q_proj`?)",
    ]);
    rejects("method = \"lora\"\nlora = { rank = 0 }\n", 2, &["rank must be at least 1"]);
    rejects("method = \"lora\"\nlora = { layers = \"middle\" }\n", 2, &["use \"all\", \"last 8\""]);
    rejects("method = \"lorax\"\n", 2, &["unknown variant `lorax`, expected one of `lora`, `qlora`, `dora`, `qdora`"]);
    rejects("method = \"lora\"\nlora = { layers = [0, 5] }\nmax_steps = 1\n", 1, &[
        "stages.tune.lora.layers: layer 5 is out of range: the model has 2 layers (0 to 1)",
    ]);
    // Sizes that could never fit: refused before anything is allocated.
    rejects("method = \"lora\"\nbatch_size = 1000000000\n", 2, &["tune.toml:", "batch_size × grad_accum must be at most 16777216 rows per step"]);
    rejects("method = \"lora\"\ngrad_accum = 1000000000000\n", 2, &["tune.toml:", "batch_size × grad_accum must be at most"]);
    rejects("method = \"lora\"\nlora = { layers = \"last 99999999999\" }\nmax_steps = 1\n", 1, &[
        "stages.tune.lora.layers: `last 99999999999`: the model has 2 layers",
    ]);
    rejects("method = \"lora\"\nbatch_size = 16000000\nmax_steps = 1\n", 1, &[
        "stages.tune.batch_size: a step of batch_size × grad_accum = 16000000 × 1 rows",
        "lower batch_size or grad_accum",
    ]);
    rejects("method = \"lora\"\nbatch_size = 200000\nmax_steps = 1\n", 1, &[
        "stages.tune.batch_size: a pass of 200000 rows",
        "set micro_batch_size lower",
    ]);
    rejects("method = \"lora\"\nlora = { rank = 100 }\nmax_steps = 1\n", 1, &[
        "stages.tune.lora.rank: rank 100 is larger than `k_proj` ([64, 128]) allows: at most 64",
    ]);
    // Step 1 has lr 0 (warmup), step 2 a huge one: step 3 diverges.
    rejects("method = \"lora\"\nlr = 1e38\nwarmup_steps = 1000\nmax_grad_norm = 0.0\nmax_steps = 30\nsave_every = 1\n", 1, &[
        "training diverged at step 3: the loss is NaN",
        "the last good checkpoint (step 2) is kept",
    ]);
}

#[test]
fn an_empty_dataset_is_a_clear_error() {
    let p = project("[stages.tune]\nkind = \"finetune\"\nmethod = \"lora\"\nmodel = \"base\"\ndata = \"prep\"\n");
    p.write("data/task.jsonl", "");
    let run = p.run("pipelines/tune.toml", &[], 1);
    assert!(run.stderr.contains("no usable training sample"), "{run}");
}

/// Whether a stage has started running (its scratch folder has an `out/`).
fn stage_running(root: &Path) -> bool {
    std::fs::read_dir(root.join(".swift/scratch")).is_ok_and(|entries| entries.flatten().any(|e| e.path().join("out").is_dir()))
}

#[test]
fn ctrl_c_saves_a_checkpoint_that_the_rerun_resumes_from_to_the_same_bits() {
    // No periodic checkpoints: whatever the rerun resumes from, Ctrl-C saved.
    let stage = RESUMABLE.replace("save_every = 5", "save_every = 0");
    let reference = project(&stage);
    let uninterrupted = reference.run("pipelines/tune.toml", &[], 0);

    let p = project(&stage);
    p.run("pipelines/tune.toml", &["--until", "prep"], 0);
    let child = p.spawn(&["run", "pipelines/tune.toml"]);
    p.wait_for("the finetune stage to start", |p| stage_running(p.root()));
    std::thread::sleep(std::time::Duration::from_millis(800));
    std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130), "{}", String::from_utf8_lossy(&output.stderr));
    let saved = checkpoint_step(p.root()).expect("Ctrl-C saves a checkpoint");
    assert!(saved < 48, "Ctrl-C left the checkpoint of step {saved}");
    let resumed = p.run("pipelines/tune.toml", &[], 0);
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(output_path(&resumed, "tune", "metrics")).unwrap()).unwrap();
    assert_eq!(metrics["resumed_from_step"].as_u64(), Some(saved as u64), "{metrics}");
    assert_eq!(adapter_bytes(&resumed, "tune"), adapter_bytes(&uninterrupted, "tune"));
}

#[test]
fn epochs_cover_every_row_with_a_partial_last_step() {
    let p = project(
        "[stages.tune]\nkind = \"finetune\"\nmethod = \"lora\"\nmodel = \"base\"\ndata = \"prep\"\n\
         lora = { rank = 2, alpha = 4 }\nepochs = 2\ngrad_accum = 3\nsave_every = 0\n",
    );
    let run = p.run("pipelines/tune.toml", &[], 0);
    let header = Header::read(&output_path(&run, "prep", "tokens")).unwrap();
    let train = &header.splits["train"];
    let rows = train.rows;
    let log = log_lines(&output_path(&run, "tune", "log"));
    let steps: Vec<&serde_json::Value> = log.iter().filter(|l| l["loss"].is_number()).collect();
    assert_eq!(steps.len(), (2 * rows).div_ceil(3), "2 epochs of {rows} rows, 3 rows a step");
    let tokens: u64 = steps.iter().map(|l| l["tokens"].as_u64().unwrap()).sum();
    assert_eq!(tokens, 2 * train.tokens as u64, "every row twice, none more");
}
