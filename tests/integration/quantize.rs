//! `kind = "quantize"` as a user runs it: AWQ and RTN int4 on tiny Qwen2
//! fixtures, the AutoAWQ GEMM folder it writes (config, tensor names, dtypes
//! and shapes, shards), the quality report, `swift generate` on the result,
//! and clear errors for bad settings.

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::DType;

use crate::util::{copy_dir, fixtures, Project};

/// Text for calibration: sentences over a small vocabulary, deterministic.
fn corpus(lines: usize) -> String {
    let words = ["the", "court", "statute", "penalty", "river", "contract", "judge", "appeal", "fine", "years", "law", "clause"];
    let mut out = String::new();
    let mut state = 7u64;
    for _ in 0..lines {
        let mut sentence = Vec::new();
        for _ in 0..12 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            sentence.push(words[(state >> 33) as usize % words.len()]);
        }
        out.push_str(&serde_json::json!({ "text": sentence.join(" ") + "." }).to_string());
        out.push('\n');
    }
    out
}

/// Conversations for a preprocess stage.
fn chat(samples: usize) -> String {
    let mut out = String::new();
    for i in 0..samples {
        let line = serde_json::json!({"messages": [
            {"role": "user", "content": format!("What is the penalty under statute {i}?")},
            {"role": "assistant", "content": format!("Statute {i} carries a fine of {} coins.", i * 10)},
        ]});
        out.push_str(&format!("{line}\n"));
    }
    out
}

/// A project with `model` (a fixture model folder), a calibration corpus and
/// the given stages.
fn project(model: &str, stages: &str) -> Project {
    let p = Project::new();
    copy_dir(&fixtures().join("models").join(model), &p.path("models/base"));
    p.write("data/calib.jsonl", &corpus(400));
    p.write(
        "pipelines/q.toml",
        &format!("[pipeline]\nseed = 5\n\n[stages.base]\nkind = \"download\"\nmodel = \"models/base\"\n\n{stages}"),
    );
    p
}

const SMALL: &str = "calibration = \"data/calib.jsonl\"\nsamples = 8\nseq_len = 64\nheld_out = 4\n";

/// Eight calibration and eight held-out blocks, group 64.
const OUTLIER: &str = "calibration = \"data/calib.jsonl\"\nsamples = 8\nseq_len = 64\nheld_out = 8\ngroup_size = 64\n";

fn output(run: &crate::util::Run, stage: &str, name: &str) -> PathBuf {
    PathBuf::from(run.stage(stage)["outputs"][name].as_str().unwrap())
}

fn report(run: &crate::util::Run, stage: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(output(run, stage, "report").join("quality.json")).unwrap()).unwrap()
}

fn open_tensors(folder: &Path) -> MmapedSafetensors {
    let files: Vec<PathBuf> = std::fs::read_dir(folder)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    // SAFETY: test files nobody modifies while they are mapped.
    unsafe { MmapedSafetensors::multi(&files) }.unwrap()
}

#[test]
fn awq_beats_round_to_nearest_where_activations_have_outliers() {
    let p = project(
        "qwen2-outlier",
        &format!(
            "[stages.awq]\nkind = \"quantize\"\nmethod = \"awq\"\nmodel = \"base\"\n{OUTLIER}\n\
             [stages.rtn]\nkind = \"quantize\"\nmethod = \"rtn\"\nmodel = \"base\"\n{OUTLIER}\n\
             [stages.duo]\nkind = \"quantize\"\nmodel = \"base\"\n{OUTLIER}duo_scaling = true\nclip = false\n"
        ),
    );
    // Text the model itself generated (and that tokenizes back to the sampled
    // ids): perplexity on random text says nothing about a random-weight model.
    p.write("data/calib.jsonl", &std::fs::read_to_string(fixtures().join("awq/outlier-samples.jsonl")).unwrap());
    let run = p.run("pipelines/q.toml", &[], 0);
    let awq = report(&run, "awq");
    let rtn = report(&run, "rtn");
    let ppl = |r: &serde_json::Value, key: &str| r["perplexity"][key].as_f64().unwrap();
    // The AWQ stage measures RTN itself, on the same data: the two agree.
    assert!((ppl(&awq, "rtn") - ppl(&rtn, "rtn")).abs() < 1e-9 * ppl(&rtn, "rtn"), "{awq}\n{rtn}");
    assert!(ppl(&awq, "awq") < ppl(&awq, "rtn"), "AWQ should beat RTN on the outlier model: {}", awq["perplexity"]);
    assert!(rtn["perplexity"]["awq"].is_null());
    // On the calibration data no group does worse than round-to-nearest.
    let layers = awq["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    for layer in layers {
        let groups = layer["groups"].as_array().unwrap();
        // q/k/v, gate/up and down; v→o is skipped under GQA.
        let names: Vec<&str> = groups.iter().map(|g| g["group"].as_str().unwrap()).collect();
        assert_eq!(names, ["qkv", "gate_up", "down"]);
        for g in groups {
            assert!(g["awq_loss"].as_f64().unwrap() <= g["rtn_loss"].as_f64().unwrap(), "{g}");
        }
        assert!(layer["awq_mse"].as_f64().unwrap() < layer["rtn_mse"].as_f64().unwrap(), "{layer}");
    }
    // AutoAWQ's duo scaling, without the clip search: still never worse than RTN per group.
    for layer in report(&run, "duo")["layers"].as_array().unwrap() {
        for g in layer["groups"].as_array().unwrap() {
            assert!(g["awq_loss"].as_f64().unwrap() <= g["rtn_loss"].as_f64().unwrap(), "{g}");
        }
    }
    let md = std::fs::read_to_string(output(&run, "awq", "report").join("quality.md")).unwrap();
    assert!(md.contains("| AWQ int4 |") && md.contains("| RTN int4 |"), "{md}");
    let metrics = &run.stage("awq")["metrics"];
    assert!(metrics["ppl_awq"].as_f64().unwrap() < metrics["ppl_rtn"].as_f64().unwrap());
}

#[test]
fn the_folder_is_autoawq_gemm_with_shards_and_runs_in_generate() {
    let p = project(
        "qwen2-tiny",
        &format!(
            "[stages.int4]\nkind = \"quantize\"\nmodel = \"base\"\n{SMALL}max_shard_size = \"100KB\"\n\
             skip = [\"model.layers.1.mlp.down_proj\"]\n"
        ),
    );
    let run = p.run("pipelines/q.toml", &[], 0);
    let folder = output(&run, "int4", "model");
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(folder.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["quantization_config"],
        serde_json::json!({"quant_method": "awq", "zero_point": true, "group_size": 128, "bits": 4, "version": "gemm",
            "modules_to_not_convert": ["model.layers.1.mlp.down_proj"]})
    );
    assert_eq!(config["dtype"], "float16");
    for companion in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(folder.join(companion).is_file(), "{companion} was not copied");
    }
    // Sharded above 100 kB, with an index naming every tensor.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("model.safetensors.index.json")).unwrap()).unwrap();
    let map = index["weight_map"].as_object().unwrap();
    let mut files: Vec<&str> = map.values().map(|f| f.as_str().unwrap()).collect();
    files.sort();
    files.dedup();
    assert!(files.len() >= 2, "{files:?}");
    for (i, file) in files.iter().enumerate() {
        assert_eq!(*file, format!("model-{:05}-of-{:05}.safetensors", i + 1, files.len()));
    }
    let st = open_tensors(&folder);
    let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), map.len());
    let check = |name: &str, dtype: DType, shape: &[usize]| {
        let view = st.get(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((DType::try_from(view.dtype()).unwrap(), view.shape()), (dtype, shape), "{name}");
    };
    // qwen2-tiny: hidden 128, intermediate 256, 4 heads, 2 KV heads of 32.
    let q = "model.layers.0.self_attn.q_proj";
    check(&format!("{q}.qweight"), DType::I32, &[128, 16]);
    check(&format!("{q}.qzeros"), DType::I32, &[1, 16]);
    check(&format!("{q}.scales"), DType::F16, &[1, 128]);
    check(&format!("{q}.bias"), DType::F16, &[128]);
    check("model.layers.0.self_attn.k_proj.qweight", DType::I32, &[128, 8]);
    check("model.layers.0.mlp.down_proj.qweight", DType::I32, &[256, 16]);
    check("model.layers.0.mlp.down_proj.scales", DType::F16, &[2, 128]);
    check("model.layers.1.mlp.down_proj.weight", DType::F16, &[128, 256]);
    check("model.embed_tokens.weight", DType::F16, &[640, 128]);
    check("model.norm.weight", DType::F16, &[128]);
    assert!(!names.iter().any(|n| n == "lm_head.weight" || n == "model.layers.0.mlp.down_proj.weight"));

    let gen = p.swift(&["generate", "--model", folder.to_str().unwrap(), "--prompt", "the court", "--max-tokens", "6", "--json"]);
    assert_eq!(gen.code, 0, "{gen}");
    let last: serde_json::Value = serde_json::from_str(gen.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["new_ids"].as_array().unwrap().len(), 6);

    // A rerun is cached; a different group size reruns only the quantize stage.
    let again = p.run("pipelines/q.toml", &[], 0);
    assert_eq!(again.status("int4"), "cached");
    let text = p.read("pipelines/q.toml").replace("seq_len = 64", "seq_len = 64\ngroup_size = 64");
    p.write("pipelines/q.toml", &text);
    let changed = p.run("pipelines/q.toml", &[], 0);
    assert_eq!((changed.status("base"), changed.status("int4")), ("cached".to_string(), "ran".to_string()));
}

#[test]
fn calibration_from_a_preprocess_stage_and_a_finetune_chain() {
    let p = project(
        "qwen2-tiny",
        "[stages.prep]\nkind = \"preprocess\"\nmodel = \"base\"\ndata = [\"data/chat.jsonl\"]\nmax_length = 128\n\n\
         [stages.tune]\nkind = \"finetune\"\nmethod = \"lora\"\nmodel = \"base\"\ndata = \"prep\"\nmax_steps = 3\n\n\
         [stages.int4]\nkind = \"quantize\"\nmodel = \"tune\"\ncalibration = \"prep\"\nsamples = 4\nseq_len = 32\nheld_out = 2\n",
    );
    p.write("data/chat.jsonl", &chat(60));
    let run = p.run("pipelines/q.toml", &[], 0);
    let r = report(&run, "int4");
    for key in ["full_precision", "rtn", "awq"] {
        assert!(r["perplexity"][key].as_f64().unwrap().is_finite(), "{r}");
    }
    // The fine-tune's adapter is part of the quantized model: retraining requantizes.
    p.write("pipelines/q.toml", &p.read("pipelines/q.toml").replace("max_steps = 3", "max_steps = 4"));
    let rerun = p.run("pipelines/q.toml", &[], 0);
    let statuses: Vec<String> = ["prep", "tune", "int4"].iter().map(|s| rerun.status(s)).collect();
    assert_eq!(statuses, ["cached", "ran", "ran"]);
}

#[test]
fn bad_settings_are_clear_errors() {
    let p = project("qwen2-tiny", &format!("[stages.int4]\nkind = \"quantize\"\nmodel = \"base\"\n{SMALL}group_size = 96\n"));
    let run = p.run("pipelines/q.toml", &[], 2);
    assert!(run.stderr.contains("q.toml") && run.stderr.contains("group_size must be 32, 64 or 128"), "{run}");

    let p = project("qwen2-tiny", "[stages.int4]\nkind = \"quantize\"\nmodel = \"base\"\ncalibration = \"data/calib.jsonl\"\nsamples = 900\n");
    let run = p.run("pipelines/q.toml", &[], 1);
    assert!(run.stderr.contains("stages.int4.calibration") && run.stderr.contains("too few calibration tokens"), "{run}");

    // Sizes past the model's context or the machine's memory are refused before any allocation.
    let sized = |keys: &str| project("qwen2-tiny", &format!("[stages.int4]\nkind = \"quantize\"\nmodel = \"base\"\ncalibration = \"data/calib.jsonl\"\n{keys}"));
    let run = sized("seq_len = 100000\n").run("pipelines/q.toml", &[], 1);
    assert!(run.stderr.contains("stages.int4.seq_len") && run.stderr.contains("max_position_embeddings = 512"), "{run}");
    let run = sized("samples = 1000000000000\nseq_len = 512\n").run("pipelines/q.toml", &[], 1);
    assert!(run.stderr.contains("stages.int4.samples") && run.stderr.contains("GiB are free"), "{run}");
    let run = sized("samples = 9223372036854775807\nheld_out = 9223372036854775807\n").run("pipelines/q.toml", &[], 1);
    assert!(run.code == 1 && run.stderr.contains("stages.int4."), "{run}");

    let p = project("qwen2-tiny", &format!("[stages.int4]\nkind = \"quantize\"\nmodel = \"base\"\n{SMALL}"));
    let config = p.read("models/base/config.json").replace("\"qwen2\"", "\"gpt_neox\"");
    p.write("models/base/config.json", &config);
    let run = p.run("pipelines/q.toml", &[], 1);
    assert!(run.stderr.contains("no known AWQ layer grouping"), "{run}");
}

#[test]
fn a_broken_checkpoint_is_named_as_the_user_gave_it() {
    let p = project("qwen2-tiny", &format!("[stages.int4]\nkind = \"quantize\"\nmodel = \"base\"\n{SMALL}"));
    let weights = std::fs::read(p.path("models/base/model.safetensors")).unwrap();
    std::fs::write(p.path("models/base/model.safetensors"), &weights[..weights.len() / 2]).unwrap();
    let run = p.run("pipelines/q.toml", &[], 1);
    // The download stage's copy in the store is named by the folder the manifest gives.
    assert!(run.stderr.contains("models/base/model.safetensors"), "{run}");
    assert!(!run.stderr.contains("/m/"), "{run}");
}

#[test]
fn an_awq_model_is_not_fine_tuned() {
    let p = project(
        "qwen2-tiny",
        &format!(
            "[stages.int4]\nkind = \"quantize\"\nmethod = \"rtn\"\nmodel = \"base\"\n{SMALL}\n\
             [stages.prep]\nkind = \"preprocess\"\nmodel = \"base\"\ndata = [\"data/chat.jsonl\"]\nmax_length = 128\n\n\
             [stages.tune]\nkind = \"finetune\"\nmethod = \"lora\"\nmodel = \"int4\"\ndata = \"prep\"\nmax_steps = 1\n"
        ),
    );
    p.write("data/chat.jsonl", &chat(20));
    let run = p.run("pipelines/q.toml", &[], 1);
    assert_eq!(run.status("int4"), "ran");
    assert!(run.stderr.contains("stages.tune.model") && run.stderr.contains("does not train"), "{run}");
}

#[test]
fn swift_still_writes_the_folder_autoawq_was_checked_against() {
    // The settings of tests/fixtures/make_swift_awq.sh, whose output AutoAWQ's
    // own dequantize_gemm read (stages/tests/awq.rs checks that side).
    let p = project(
        "qwen2-outlier",
        "[stages.int4]\nkind = \"quantize\"\nmethod = \"rtn\"\nmodel = \"base\"\ncalibration = \"data/calib.jsonl\"\n\
         samples = 8\nseq_len = 64\nheld_out = 2\ngroup_size = 64\n",
    );
    p.write("data/calib.jsonl", &std::fs::read_to_string(fixtures().join("awq/outlier-samples.jsonl")).unwrap());
    let run = p.run("pipelines/q.toml", &[], 0);
    let folder = output(&run, "int4", "model");
    let fixture = fixtures().join("awq/swift-qwen2-outlier-g64");
    for file in ["model.safetensors", "config.json"] {
        let (written, committed) = (std::fs::read(folder.join(file)).unwrap(), std::fs::read(fixture.join(file)).unwrap());
        assert!(written == committed, "{file} differs from the fixture AutoAWQ checked; if the change is intended, rerun tests/fixtures/make_swift_awq.sh");
    }
}
