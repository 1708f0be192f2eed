//! `kind = "export"` as a user runs it: every format from a QLoRA → LoRA chain
//! and an int4 model, checked against what transformers, PEFT and
//! transformers' GGUF reader computed from the same pipeline's export
//! (tests/fixtures/export/check_export.py); the model cards; `to` kept up to
//! date and never written over a folder swift did not write; the AWQ folder
//! AutoAWQ's own dequantization checked; bad settings.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use swift_stages::llm::adapted::{AdaptedLoader, BaseFormat};
use swift_stages::llm::adapter::PeftAdapter;
use swift_stages::llm::model::packed_layout;
use swift_stages::llm::{Decoder, ModelConfig};

use crate::util::{copy_dir, files_under, fixtures, Project, Run};

/// A project holding the pipeline of tests/fixtures/export/pipeline.toml, with
/// `extra` appended to its export stage.
fn project(extra: &str) -> Project {
    let p = Project::new();
    copy_dir(&fixtures().join("models/qwen2-tiny"), &p.path("models/qwen"));
    p.write("data/chat.jsonl", &std::fs::read_to_string(fixtures().join("export/chat.jsonl")).unwrap());
    let manifest = std::fs::read_to_string(fixtures().join("export/pipeline.toml")).unwrap();
    p.write("pipelines/x.toml", &format!("{manifest}{extra}"));
    p
}

fn export_dir(run: &Run) -> PathBuf {
    PathBuf::from(run.stage("export")["outputs"]["export"].as_str().unwrap())
}

/// Every file under `root`, relative to it, sorted.
fn files(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = files_under(root, "").into_iter().map(|(name, _)| name).collect();
    names.sort();
    names
}

fn logits(decoder: &Decoder, ids: &[u32]) -> Tensor {
    let (positions, segments) = packed_layout(&[ids.len()]);
    decoder.forward(ids, &positions, &segments, None, false).unwrap()
}

fn load(folder: &Path, adapters: &[PeftAdapter]) -> Decoder {
    let config = ModelConfig::load(folder).unwrap();
    let loader = AdaptedLoader::new(adapters, BaseFormat::Dense);
    Decoder::load(folder, config, DType::F32, &Device::Cpu, &loader).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn every_format_loads_with_the_logits_the_python_tools_computed() {
    let p = project("to = \"exports/law\"\n");
    let run = p.run("pipelines/x.toml", &[], 0);
    let out = export_dir(&run);
    let written = files(&out);
    for file in [
        "README.md",
        "swift-lineage.json",
        "merged/model.safetensors",
        "merged/config.json",
        "merged/generation_config.json",
        "merged/tokenizer.json",
        "merged/README.md",
        "peft/coarse/adapter_model.safetensors",
        "peft/fine/adapter_config.json",
        "peft/fine/README.md",
        "awq/model.safetensors",
        "awq/config.json",
        "gguf/export-check-fine-f16.gguf",
        "gguf/export-check-fine-q8_0.gguf",
        "gguf/README.md",
    ] {
        assert!(written.iter().any(|f| f == file), "{file} missing from {written:?}");
    }

    // Logits: swift on the merged folder, swift's in-memory chain from the PEFT
    // folders, and what transformers/PEFT/GGUF computed from this pipeline.
    let reference = candle_core::safetensors::load(fixtures().join("export/reference.safetensors"), &Device::Cpu).unwrap();
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("export/reference.json")).unwrap()).unwrap();
    let ids: Vec<u32> = json["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let merged = logits(&load(&out.join("merged"), &[]), &ids);
    let chain: Vec<PeftAdapter> = ["coarse", "fine"].iter().map(|s| PeftAdapter::open(&out.join("peft").join(s)).unwrap()).collect();
    let in_memory = logits(&load(&p.path("models/qwen"), &chain), &ids);
    let d = max_abs_diff(&merged, &in_memory);
    assert!(d < 1e-5, "merged export vs swift's in-memory chain: {d}");
    for (name, tolerance) in [("merged", 1e-4), ("peft", 1e-4), ("gguf_f16", 2e-2), ("gguf_q8_0", 3e-1)] {
        let d = max_abs_diff(&merged, &reference[name]);
        assert!(d < tolerance, "swift's merged logits vs {name} (Python): {d}");
    }

    // `swift generate` on every model the pipeline made: the fine-tune (its
    // base and chain, merged in memory) answers as its merged export does.
    let answer = |model: &str| {
        let run = p.swift(&["generate", "--model", model, "--prompt", "The tenant shall", "--max-tokens", "8", "--json"]);
        assert_eq!(run.code, 0, "{run}");
        let line = run.stdout.lines().last().unwrap().to_string();
        serde_json::from_str::<serde_json::Value>(&line).unwrap()["new_ids"].clone()
    };
    let fine = answer("pipelines/x.toml:fine");
    assert_eq!(fine, answer("pipelines/x.toml:export"), "export gives its merged folder");
    assert_eq!(fine, answer(out.join("merged").to_str().unwrap()));
    assert_ne!(fine, answer("pipelines/x.toml:base"), "the adapters change the answer");
    assert_eq!(answer("pipelines/x.toml:int4").as_array().unwrap().len(), 8);

    // A prompt file decodes every prompt in one batch, each as it decodes
    // alone: the adapter chain and the AWQ model alike.
    let prompts = ["The tenant shall", "A contract is void when", "The court", "Damages"];
    p.write("prompts.txt", &(prompts.join("\n\n") + "\n"));
    for model in ["pipelines/x.toml:fine", "pipelines/x.toml:int4"] {
        let run = p.swift(&["generate", "--model", model, "--prompt-file", "prompts.txt", "--max-tokens", "8", "--batch-size", "3"]);
        assert_eq!(run.code, 0, "{run}");
        let lines: Vec<serde_json::Value> = run.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), prompts.len());
        for (i, (line, prompt)) in lines.iter().zip(prompts).enumerate() {
            assert_eq!(line["line"], 2 * i + 1, "{line}");
            let alone = p.swift(&["generate", "--model", model, "--prompt", prompt, "--max-tokens", "8", "--json"]);
            let alone: serde_json::Value = serde_json::from_str(alone.stdout.lines().last().unwrap()).unwrap();
            for field in ["prompt_ids", "new_ids", "text", "finish_reason"] {
                assert_eq!(line[field], alone[field], "{model}, {prompt:?}: {field}");
            }
        }
    }

    // The card names every stage key; the lineage says what went in.
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    for stage in ["base", "prep", "coarse", "fine", "int4"] {
        let key = run.stage(stage)["key"].as_str().unwrap().to_string();
        assert!(card.contains(&key), "card lacks {stage}'s key {key}\n{card}");
    }
    assert!(card.starts_with("---\nbase_model: models/qwen\n"), "{card}");
    let peft_card = std::fs::read_to_string(out.join("peft/fine/README.md")).unwrap();
    assert!(peft_card.contains("library_name: peft") && peft_card.contains("PeftModel.from_pretrained(model, \"peft/coarse\").merge_and_unload()"), "{peft_card}");
    let lineage: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("swift-lineage.json")).unwrap()).unwrap();
    assert_eq!(lineage["adapters"], serde_json::json!(["coarse", "fine"]));
    assert_eq!(lineage["base_model"]["name"], "models/qwen");
    assert_eq!(lineage["stages"].as_array().unwrap().len(), 5);

    // `to`: the same files, writable, marked as swift's.
    let to = p.path("exports/law");
    let mut published = files(&to);
    published.retain(|f| f != ".swift-export");
    assert_eq!(published, written);
    assert!(!std::fs::metadata(to.join("merged/model.safetensors")).unwrap().permissions().readonly());
    assert_eq!(std::fs::read(to.join("gguf/export-check-fine-q8_0.gguf")).unwrap(), std::fs::read(out.join("gguf/export-check-fine-q8_0.gguf")).unwrap());
}

#[test]
fn to_is_kept_up_to_date_and_foreign_folders_are_never_overwritten() {
    let p = project("formats = [\"merged\"]\nto = \"exports/law\"\n".replace("formats", "# formats").as_str());
    // Only `merged` here: a lighter export.
    let manifest = p.read("pipelines/x.toml").replace("formats = [\"merged\", \"peft\", \"awq\", \"gguf\"]\nawq = \"int4\"\n# formats", "formats");
    p.write("pipelines/x.toml", &manifest);
    let first = p.run("pipelines/x.toml", &["--only", "export"], 0);
    assert!(first.stderr.contains("exported to exports/law"), "{first}");
    let marker = p.read("exports/law/.swift-export");

    // A rerun finds the folder current and leaves it alone.
    let again = p.run("pipelines/x.toml", &["--only", "export"], 0);
    assert_eq!(again.status("export"), "cached");
    assert!(!again.stderr.contains("exported to"), "{again}");

    // Deleted by hand: the cached export is published again.
    std::fs::remove_dir_all(p.path("exports/law")).unwrap();
    let restored = p.run("pipelines/x.toml", &["--only", "export"], 0);
    assert_eq!(restored.status("export"), "cached");
    assert_eq!(p.read("exports/law/.swift-export"), marker);

    // A changed export replaces the folder; a file a user added stops it (named).
    p.write("exports/law/notes.txt", "mine");
    p.write("pipelines/x.toml", &manifest.replace("to = \"exports/law\"", "to = \"exports/law\"\nname = \"law-v2\""));
    let blocked = p.run("pipelines/x.toml", &["--only", "export"], 1);
    assert!(blocked.stderr.contains("files the export did not write (notes.txt)"), "{blocked}");
    assert_eq!(p.read("exports/law/notes.txt"), "mine");
    std::fs::remove_file(p.path("exports/law/notes.txt")).unwrap();
    let changed = p.run("pipelines/x.toml", &["--only", "export"], 0);
    assert_eq!(changed.status("export"), "cached", "the export itself was done by the blocked run");
    assert_ne!(p.read("exports/law/.swift-export"), marker);
    assert!(p.read("exports/law/README.md").contains("# law-v2"));

    // Another pipeline's export stage does not take the folder over.
    p.write("pipelines/y.toml", &p.read("pipelines/x.toml").replace("name = \"export-check\"", "name = \"other\""));
    let other = p.run("pipelines/y.toml", &["--only", "export"], 1);
    assert!(other.stderr.contains("holds the export of `export-check/export`"), "{other}");

    // A folder swift did not write is refused, and left as it was.
    p.write("exports/other/keep.txt", "precious");
    p.write("pipelines/x.toml", &manifest.replace("exports/law", "exports/other"));
    let refused = p.run("pipelines/x.toml", &["--only", "export"], 1);
    assert!(refused.stderr.contains("swift did not write it"), "{refused}");
    assert_eq!(p.read("exports/other/keep.txt"), "precious");
}

#[test]
fn the_awq_export_is_the_folder_autoawq_checked() {
    // The settings of tests/fixtures/make_swift_awq.sh, whose folder AutoAWQ's
    // own dequantize_gemm read (stages/tests/awq.rs).
    let p = Project::new();
    copy_dir(&fixtures().join("models/qwen2-outlier"), &p.path("models/base"));
    p.write("data/calib.jsonl", &std::fs::read_to_string(fixtures().join("awq/outlier-samples.jsonl")).unwrap());
    p.write(
        "pipelines/q.toml",
        "[pipeline]\nseed = 5\n\n[stages.base]\nkind = \"download\"\nmodel = \"models/base\"\n\n\
         [stages.int4]\nkind = \"quantize\"\nmethod = \"rtn\"\nmodel = \"base\"\ncalibration = \"data/calib.jsonl\"\n\
         samples = 8\nseq_len = 64\nheld_out = 2\ngroup_size = 64\n\n\
         [stages.ship]\nkind = \"export\"\nmodel = \"base\"\nformats = [\"awq\"]\nawq = \"int4\"\n",
    );
    let run = p.run("pipelines/q.toml", &[], 0);
    let folder = PathBuf::from(run.stage("ship")["outputs"]["export"].as_str().unwrap()).join("awq");
    let fixture = fixtures().join("awq/swift-qwen2-outlier-g64");
    for file in ["model.safetensors", "config.json"] {
        let (exported, checked) = (std::fs::read(folder.join(file)).unwrap(), std::fs::read(fixture.join(file)).unwrap());
        assert!(exported == checked, "awq/{file} differs from the folder AutoAWQ's dequantization checked");
    }
}

#[test]
fn bad_export_settings_name_the_key_and_the_fix() {
    for (settings, needle) in [
        ("formats = []\n", "formats is empty"),
        ("formats = [\"awq\"]\n", "needs `awq = \"STAGE\"`"),
        ("formats = [\"merged\"]\nawq = \"int4\"\n", "formats has no \"awq\""),
        ("formats = [\"merged\", \"merged\"]\n", "listed twice"),
        ("formats = [\"awq\"]\nawq = \"prep\"\n", "must name a quantize stage"),
        ("formats = [\"merged\"]\neval = \"fine\"\n", "must name an eval stage"),
        ("formats = [\"merged\"]\nto = \"../outside\"\n", "outside the project"),
        ("formats = [\"tarball\"]\n", "unknown variant `tarball`"),
        ("formats = [\"gguf\"]\nname = \"../../x\"\n", "must be a plain file name"),
    ] {
        let p = project("");
        let manifest = p.read("pipelines/x.toml").replace("formats = [\"merged\", \"peft\", \"awq\", \"gguf\"]\nawq = \"int4\"\n", settings);
        p.write("pipelines/x.toml", &manifest);
        let run = p.run("pipelines/x.toml", &[], 2);
        assert!(run.stderr.contains(needle), "{settings}: expected {needle:?}\n{run}");
        assert!(run.stderr.contains("x.toml:5"), "the error points into the export stage\n{run}");
    }
    // `peft` needs a fine-tune chain.
    let p = project("");
    let manifest = p.read("pipelines/x.toml").replace("model = \"fine\"\nformats = [\"merged\", \"peft\", \"awq\", \"gguf\"]", "model = \"base\"\nformats = [\"peft\"]").replace("awq = \"int4\"\n", "");
    p.write("pipelines/x.toml", &manifest);
    let run = p.run("pipelines/x.toml", &[], 2);
    assert!(run.stderr.contains("is not a finetune stage"), "{run}");
}
