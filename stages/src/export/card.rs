//! Model cards: a `README.md` in Hugging Face's model-card form (YAML front
//! matter, then Markdown) and a machine-readable `swift-lineage.json`, at the
//! top of an export and in each format's folder.
//!
//! The lineage is what the run that produced the export settled for every
//! stage upstream of it ([`swift_engine::kind::Upstream`]): the source model and
//! its revision, the data's digests, every stage key, the training and
//! quantization settings and the eval scores. Nothing in it depends on the
//! clock. The export's key covers the bytes of its inputs, not the upstream
//! keys: an upstream change that leaves every input byte-identical (a new kind
//! version, a renamed stage) keeps the cached export and its card.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{json, Value};
use swift_engine::kind::{OutputType, RunCtx, Upstream};

use super::Format;
use crate::model_source::ModelSource;

/// A folder the export wrote, for its card.
pub struct Written {
    format: Format,
    folder: PathBuf,
    /// For a PEFT folder: the fine-tune stage and its place in the chain.
    adapter: Option<(String, usize)>,
    /// For the GGUF folder: the file its card's recipe runs.
    gguf_file: Option<String>,
}

impl Written {
    /// A format's folder.
    pub fn new(format: Format, folder: PathBuf) -> Self {
        Self { format, folder, adapter: None, gguf_file: None }
    }

    /// The GGUF folder, whose card runs `file`.
    pub fn gguf(folder: PathBuf, file: String) -> Self {
        Self { format: Format::Gguf, folder, adapter: None, gguf_file: Some(file) }
    }

    /// The PEFT folder of the chain's adapter number `index`, trained by `stage`.
    pub fn adapter(folder: PathBuf, stage: &str, index: usize) -> Self {
        Self { format: Format::Peft, folder, adapter: Some((stage.to_string(), index)), gguf_file: None }
    }
}

/// Everything a card says, gathered once.
pub struct Lineage {
    title: String,
    pipeline: String,
    stage: String,
    base_name: String,
    base_revision: Option<String>,
    chain: Vec<String>,
    upstream: Vec<Upstream>,
    formats: Vec<Format>,
    /// The eval stage's `scores.md`, if the export names one.
    eval_table: Option<String>,
    /// The eval stage's `scores.json`.
    eval_scores: Option<Value>,
}

impl Lineage {
    /// Gathers the lineage of the running export stage.
    pub fn new(ctx: &RunCtx<'_>, title: &str, pipeline: &str, model: &ModelSource, formats: &[Format], eval: Option<&Path>)
        -> anyhow::Result<Self> {
        let read = |path: PathBuf| std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()));
        let (eval_table, eval_scores) = match eval {
            Some(folder) => {
                let scores: Value = serde_json::from_str(&read(folder.join("scores.json"))?).context("the eval stage's scores.json")?;
                (Some(read(folder.join("scores.md"))?), Some(scores))
            }
            None => (None, None),
        };
        let model_digest = ctx.input("model")?.artifact.digest().to_hex();
        // The commit the base's download stage resolved, when it came from the Hub.
        let resolved = ctx.upstream.iter().find(|u| u.outputs.get("model") == Some(&model_digest)).and_then(|u| u.revision.clone());
        Ok(Self {
            title: title.to_string(),
            pipeline: pipeline.to_string(),
            stage: ctx.stage.to_string(),
            base_name: model.base_name.clone(),
            base_revision: resolved.or_else(|| model.base_revision.clone()),
            chain: model.chain.clone(),
            upstream: ctx.upstream.clone(),
            formats: formats.to_vec(),
            eval_table,
            eval_scores,
        })
    }

    /// `swift-lineage.json`.
    pub fn json(&self) -> Value {
        let stages: Vec<Value> = self
            .upstream
            .iter()
            .map(|u| json!({
                "name": u.name, "kind": u.kind, "key": u.key, "params": u.params,
                "revision": u.revision, "outputs": results(u), "metrics": reproducible(&u.metrics),
            }))
            .collect();
        let data: Vec<Value> = self
            .datasets()
            .map(|u| json!({ "stage": u.name, "source": u.params.get("path"), "revision": u.revision, "digest": u.outputs.get("dataset") }))
            .collect();
        json!({
            "swift_version": env!("CARGO_PKG_VERSION"),
            "title": self.title,
            "pipeline": self.pipeline,
            "export_stage": self.stage,
            "formats": self.formats.iter().map(|f| f.folder()).collect::<Vec<_>>(),
            "base_model": { "name": self.base_name, "revision": self.base_revision },
            "adapters": self.chain,
            "data": data,
            "stages": stages,
            "eval": self.eval_scores,
        })
    }

    fn datasets(&self) -> impl Iterator<Item = &Upstream> {
        self.upstream.iter().filter(|u| u.kind == "download" && u.outputs.contains_key("dataset"))
    }

    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Upstream> {
        self.upstream.iter().filter(move |u| u.kind == kind)
    }

    /// The card for one folder (`None`: the export's top folder).
    pub fn readme(&self, folder: Option<&Written>) -> String {
        let library = match folder.map(|w| w.format) {
            Some(Format::Peft) => "peft",
            Some(Format::Gguf) => "gguf",
            _ => "transformers",
        };
        let mut tags = vec!["swift", "fine-tuned"];
        for (kind, tag) in [("finetune", "lora"), ("quantize", "awq")] {
            if self.of_kind(kind).next().is_some() {
                tags.push(tag);
            }
        }
        if self.of_kind("finetune").any(|u| u.params["method"].as_str().is_some_and(|m| m.starts_with('q'))) {
            tags.push("qlora");
        }
        if folder.is_some_and(|w| w.format == Format::Gguf) {
            tags.push("gguf");
        }
        let mut md = String::new();
        let _ = writeln!(md, "---\nbase_model: {}\nlibrary_name: {library}\ntags:", yaml_string(&self.base_name));
        for tag in tags {
            let _ = writeln!(md, "- {tag}");
        }
        let _ = writeln!(md, "---\n\n# {}\n", self.title);
        let chain = if self.chain.is_empty() { String::from("no fine-tuning") } else { self.chain.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(" → ") };
        let _ = writeln!(
            md,
            "`{}` fine-tuned by the swift pipeline `{}` (adapters: {chain}), exported by its stage `{}`.\n",
            self.base_name, self.pipeline, self.stage
        );
        md.push_str(&self.usage(folder));
        md.push_str(&self.lineage_section());
        if let Some(table) = &self.eval_table {
            md.push_str("\n## Evaluation\n\n");
            for line in table.lines().skip_while(|l| l.starts_with("# ") || l.is_empty()) {
                let line = if line.starts_with('#') { format!("##{line}") } else { line.to_string() };
                md.push_str(&line);
                md.push('\n');
            }
        }
        md.push_str("\n## Reproduce\n\nRun the pipeline's manifest with its lock file: `swift run --locked MANIFEST`. Each stage key above names a cached result; `swift show MANIFEST STAGE` prints what entered it.\n");
        md
    }

    /// "This folder": what it holds and how to load it.
    fn usage(&self, folder: Option<&Written>) -> String {
        let Some(written) = folder else {
            let mut md = String::from("## Contents\n\n");
            for format in &self.formats {
                let line = match format {
                    Format::Merged => "`merged/`: the base with every adapter merged in, a transformers model folder (also for vLLM)",
                    Format::Peft => "`peft/<stage>/`: each adapter of the chain as a PEFT folder",
                    Format::Awq => "`awq/`: the AWQ int4 model (GEMM layout) for transformers, vLLM and AutoAWQ",
                    Format::Gguf => "`gguf/`: the merged model as GGUF for llama.cpp and ollama",
                };
                let _ = writeln!(md, "- {line}");
            }
            md.push_str("- `swift-lineage.json`: this card's facts, machine-readable\n\n");
            return md;
        };
        let name = written.folder.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let mut md = String::from("## Use\n\n");
        match (written.format, &written.adapter) {
            (Format::Merged, _) | (Format::Awq, _) => {
                let _ = writeln!(md, "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\nmodel = AutoModelForCausalLM.from_pretrained(\"{name}\")\ntokenizer = AutoTokenizer.from_pretrained(\"{name}\")\n```\n");
                let _ = writeln!(md, "or serve it: `vllm serve {name}`{}.\n", if written.format == Format::Awq { " (AWQ is detected from `config.json`)" } else { "" });
            }
            (Format::Peft, Some((stage, index))) => {
                md.push_str("```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n");
                let _ = writeln!(md, "model = AutoModelForCausalLM.from_pretrained({:?})", self.base_name);
                for earlier in &self.chain[..*index] {
                    let _ = writeln!(md, "model = PeftModel.from_pretrained(model, \"peft/{earlier}\").merge_and_unload()");
                }
                let _ = writeln!(md, "model = PeftModel.from_pretrained(model, \"peft/{stage}\")\n```\n");
                if *index > 0 {
                    md.push_str("This adapter was trained on the base with the earlier adapters of the chain merged in, so merge those first, in order.\n\n");
                }
            }
            (Format::Peft, None) => {}
            (Format::Gguf, _) => {
                let file = written.gguf_file.as_deref().unwrap_or_default();
                let _ = writeln!(md, "```sh\nllama-cli -m {file} -cnv\n```\n\nor with ollama: a `Modelfile` holding `FROM ./{file}`, then `ollama create {} -f Modelfile`.\n", self.title);
            }
        }
        md
    }

    fn lineage_section(&self) -> String {
        let mut md = String::from("## Lineage\n\n");
        let revision = self.base_revision.as_deref().map(|r| format!(" at revision `{r}`")).unwrap_or_default();
        let _ = writeln!(md, "- Base model: `{}`{revision}", self.base_name);
        for u in self.datasets() {
            let source = u.params.get("path").and_then(|v| v.as_str()).unwrap_or("?");
            let revision = u.revision.as_deref().map(|r| format!(" at `{r}`")).unwrap_or_default();
            let _ = writeln!(md, "- Data `{}`: `{source}`{revision}, digest `{}`", u.name, u.outputs.get("dataset").map(String::as_str).unwrap_or("?"));
        }
        let finetunes: Vec<&Upstream> = self.of_kind("finetune").collect();
        if !finetunes.is_empty() {
            md.push_str("\n### Training\n\n| stage | method | rank | alpha | targets | layers | lr | schedule | epochs | max steps | batch × accum | final train loss |\n|---|---|---:|---:|---|---|---:|---|---:|---:|---|---:|\n");
            for u in finetunes {
                let p = &u.params;
                let lora = &p["lora"];
                let _ = writeln!(
                    md,
                    "| `{}` | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} × {} | {} |",
                    u.name, cell(&p["method"]), cell(&lora["rank"]), cell(&lora["alpha"]), cell(&lora["targets"]), cell(&lora["layers"]),
                    cell(&p["lr"]), cell(&p["schedule"]), cell(&p["epochs"]), cell(&p["max_steps"]), cell(&p["batch_size"]), cell(&p["grad_accum"]),
                    u.metrics.get("final_train_loss").and_then(|v| v.as_f64()).map(|l| format!("{l:.4}")).unwrap_or_else(|| "—".into()),
                );
            }
        }
        let quantizers: Vec<&Upstream> = self.of_kind("quantize").collect();
        if !quantizers.is_empty() {
            md.push_str("\n### Quantization\n\n| stage | method | group size | samples × seq_len | clip |\n|---|---|---:|---|---|\n");
            for u in quantizers {
                let p = &u.params;
                let _ = writeln!(md, "| `{}` | {} | {} | {} × {} | {} |", u.name, cell(&p["method"]), cell(&p["group_size"]), cell(&p["samples"]), cell(&p["seq_len"]), cell(&p["clip"]));
            }
        }
        md.push_str("\n### Stage keys\n\n| stage | kind | key |\n|---|---|---|\n");
        for u in &self.upstream {
            let _ = writeln!(md, "| `{}` | {} | `{}` |", u.name, u.kind, u.key);
        }
        md
    }
}

/// A stage's metrics without those that measure the run rather than the
/// result (times, speeds, memory), so the lineage of an export is the same
/// whenever its inputs are.
fn reproducible(metrics: &serde_json::Map<String, Value>) -> serde_json::Map<String, Value> {
    const MEASURES: [&str; 4] = ["seconds", "per_s", "rss", "peak"];
    metrics.iter().filter(|(name, _)| !MEASURES.iter().any(|m| name.contains(m))).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// A stage's outputs without its reports (training logs, metrics, quality
/// and eval reports), whose files hold timings: what the lineage digests is
/// then the same whenever the results are. The reports' figures that are
/// results reach the lineage through the metrics and the eval scores.
fn results(upstream: &Upstream) -> serde_json::Map<String, Value> {
    let registry = crate::registry();
    let reports: Vec<&str> = registry
        .get(&upstream.kind)
        .map(|kind| kind.outputs().iter().filter(|o| o.ty == OutputType::Report).map(|o| o.name).collect())
        .unwrap_or_default();
    upstream
        .outputs
        .iter()
        .filter(|(name, _)| !reports.contains(&name.as_str()))
        .map(|(name, digest)| (name.clone(), Value::String(digest.clone())))
        .collect()
}

/// A parameter as a table cell.
fn cell(value: &Value) -> String {
    match value {
        Value::Null => "—".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

/// A YAML scalar, quoted when it could be read as something else.
fn yaml_string(s: &str) -> String {
    if s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c)) && !s.is_empty() {
        s.to_string()
    } else {
        serde_json::to_string(s).expect("a string serializes")
    }
}

/// Writes the top card and one in every written folder.
pub fn write_all(out: &Path, lineage: &Lineage, written: &[Written]) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(&lineage.json())? + "\n";
    let write = |folder: &Path, readme: String| -> anyhow::Result<()> {
        for (name, text) in [("README.md", readme.as_str()), ("swift-lineage.json", json.as_str())] {
            let path = folder.join(name);
            // A base folder's own README.md came along read-only from the store: replace it.
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).with_context(|| format!("replacing {}", path.display())),
                _ => {}
            }
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    };
    write(out, lineage.readme(None))?;
    for w in written {
        write(&w.folder, lineage.readme(Some(w)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lineage_digests_results_and_no_timings() {
        let outputs = [("adapter", "aa"), ("log", "bb"), ("loss_curve", "cc"), ("metrics", "dd")];
        let upstream = Upstream {
            name: "fine".into(),
            kind: "finetune".into(),
            key: "k".into(),
            params: json!({}),
            revision: None,
            outputs: outputs.iter().map(|(n, d)| (n.to_string(), d.to_string())).collect(),
            metrics: json!({"final_train_loss": 1.5, "seconds": 3.0, "tokens_per_s": 9.0, "peak_rss_bytes": 7})
                .as_object()
                .unwrap()
                .clone(),
        };
        assert_eq!(Value::Object(results(&upstream)), json!({"adapter": "aa"}));
        assert_eq!(Value::Object(reproducible(&upstream.metrics)), json!({"final_train_loss": 1.5}));
    }
}
