//! `swift bench finetune`: LoRA and QLoRA training speed and memory on CPU,
//! beside PyTorch + PEFT doing the same steps on the same model folder and the
//! same token rows (`--python`), in the same run. Two model shapes: a small
//! one (4 layers, hidden 256, batches of 8 rows × 256 tokens) for tokens/s,
//! and with `--large` a Qwen2.5-0.5B-shaped one (bf16 checkpoint, batches of
//! 4 × 256, three steps) where weight memory dominates. Each step is one
//! batch: swift's `batch_size`, and for PEFT the same number of rows as one
//! padded `[B, T]` batch with an attention mask. Weights are random: speed
//! and memory do not depend on them. `--json` prints every figure as one
//! JSON line at the end.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use candle_core::DType;
use swift_stages::llm::weights::Weights;
use swift_stages::llm::ModelConfig;

use super::bench::{cpu_model, median, num_cores, stage, timed, xorshift};
use super::Exit;

/// Arguments of `swift bench finetune`.
#[derive(Debug, clap::Args)]
pub struct FinetuneArgs {
    /// Work folder (models and data are generated once and reused).
    #[arg(long, default_value = "bench-work/finetune")]
    dir: PathBuf,
    /// Optimizer steps per measurement (the first is not timed).
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(2..))]
    steps: u32,
    /// Threads for both sides.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Also measure the Qwen2.5-0.5B-shaped model.
    #[arg(long)]
    large: bool,
    /// A Python with torch, transformers, peft and bitsandbytes (e.g.
    /// .venv/bin/python) to measure PyTorch + PEFT side by side.
    #[arg(long)]
    python: Option<PathBuf>,
    /// Rows per step, instead of each shape's own (8 small, 4 large).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    batch: Option<u32>,
    /// Also print every figure as one JSON line.
    #[arg(long)]
    json: bool,
}

/// A model shape to generate.
#[derive(Clone, Copy)]
pub(super) struct Shape {
    pub(super) name: &'static str,
    hidden: usize,
    intermediate: usize,
    pub(super) layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
    dtype: DType,
    seq: usize,
    steps: u32,
    /// Rows per step.
    batch: u32,
}

const SMALL: Shape = Shape {
    name: "small",
    hidden: 256,
    intermediate: 688,
    layers: 4,
    heads: 4,
    kv_heads: 2,
    vocab: 32000,
    dtype: DType::F32,
    seq: 256,
    steps: 0,
    batch: 8,
};
impl Shape {
    /// The same shape with `layers` decoder layers.
    pub(super) fn with_layers(self, layers: usize) -> Self {
        Self { layers, ..self }
    }
}

pub(super) const LARGE: Shape = Shape {
    name: "qwen2.5-0.5b-shape",
    hidden: 896,
    intermediate: 4864,
    layers: 24,
    heads: 14,
    kv_heads: 2,
    vocab: 151936,
    dtype: DType::BF16,
    seq: 256,
    steps: 3,
    batch: 4,
};

/// Writes config, random weights and the fixture tokenizer into `folder`, once.
pub(super) fn write_model(folder: &Path, s: &Shape) -> anyhow::Result<PathBuf> {
    let folder = folder.to_path_buf();
    if folder.join("model.safetensors").exists() {
        return Ok(folder);
    }
    std::fs::create_dir_all(&folder)?;
    let config = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": s.hidden,
        "intermediate_size": s.intermediate, "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads, "vocab_size": s.vocab, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 4096, "tie_word_embeddings": true, "use_sliding_window": false,
        "sliding_window": null, "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 2,
        "torch_dtype": if s.dtype == DType::BF16 { "bfloat16" } else { "float32" },
    });
    std::fs::write(folder.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2-tiny");
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture.join(file), folder.join(file))?;
    }
    Weights::write_random(&folder, &ModelConfig::load(&folder)?, s.dtype)?;
    Ok(folder)
}

/// Conversations long enough to pack rows of `seq` tokens.
fn write_data(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let words = ["statute", "appeal", "court", "filing", "contract", "tenant", "notice", "deadline", "evidence", "remedy"];
    let mut next = xorshift(0x2545_F491_4F6C_DD1D);
    for _ in 0..400 {
        let mut sentence = |n: usize| (0..n).map(|_| words[(next() % words.len() as u64) as usize]).collect::<Vec<_>>().join(" ");
        let row = serde_json::json!({"messages": [
            {"role": "user", "content": sentence(12)},
            {"role": "assistant", "content": sentence(40)},
        ]});
        writeln!(out, "{row}")?;
    }
    out.flush()?;
    Ok(())
}

/// swift's side of one method: (tokens/s, training peak RSS, frozen weight bytes, load peak RSS).
struct Measured {
    tokens_per_s: f64,
    peak_rss: f64,
    frozen: f64,
    load_peak: f64,
}

fn manifest(model: &Path, s: &Shape, steps: u32, batch: u32) -> String {
    let stage = |method: &str| {
        format!(
            "[stages.{method}]\nkind = \"finetune\"\nmethod = \"{method}\"\nmodel = \"model\"\ndata = \"prep\"\n\
             lora = {{ rank = 8, alpha = 16, dropout = 0.05 }}\nlr = 1e-4\nmax_steps = {steps}\nbatch_size = {batch}\n\
             save_every = 0\nschedule = \"constant\"\n\n"
        )
    };
    format!(
        "# Generated by `swift bench finetune`.\n[stages.model]\nkind = \"download\"\nmodel = \"{}\"\n\n\
         [stages.chat]\nkind = \"download\"\ndataset = \"data/chat.jsonl\"\n\n\
         [stages.prep]\nkind = \"preprocess\"\nmodel = \"model\"\ndata = [\"chat\"]\nmax_length = {}\n\n{}{}",
        model.display(),
        s.seq,
        stage("lora"),
        stage("qlora")
    )
}

fn swift_run(dir: &Path, args: &[&str], threads: usize) -> anyhow::Result<serde_json::Value> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["run", "pipelines/bench.toml", "--json", "--cache", ".swift-bench"]).args(args).current_dir(dir);
    cmd.env("RAYON_NUM_THREADS", threads.to_string());
    let (_, stdout) = timed(&mut cmd)?;
    Ok(serde_json::from_str(stdout.lines().last().unwrap_or("{}"))?)
}

fn measure_swift(dir: &Path, method: &str, threads: usize) -> anyhow::Result<Measured> {
    let run = swift_run(dir, &["--only", method, "--force", method], threads)?;
    let entry = stage(&run, method)?;
    let log = std::fs::read_to_string(entry["outputs"]["log"].as_str().context("log")?)?;
    let rates: Vec<f64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["tokens_per_s"].as_f64())
        .skip(1)
        .collect();
    let m = &entry["metrics"];
    Ok(Measured {
        tokens_per_s: median(rates),
        peak_rss: m["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN),
        frozen: m["frozen_weight_bytes"].as_f64().unwrap_or(f64::NAN),
        load_peak: m["load_peak_rss_bytes"].as_f64().unwrap_or(f64::NAN),
    })
}

fn measure_peft(python: &Path, model: &Path, tokens: &Path, method: &str, steps: u32, batch: u32, threads: usize)
    -> anyhow::Result<(f64, f64)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_finetune_peft.py");
    let mut cmd = Command::new(python);
    cmd.arg(script).arg("--model").arg(model).arg("--tokens").arg(tokens);
    cmd.args(["--method", method, "--steps", &steps.to_string(), "--threads", &threads.to_string(), "--rank", "8", "--alpha", "16"]);
    cmd.args(["--batch", &batch.to_string()]);
    let (_, stdout) = timed(&mut cmd)?;
    let out: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("{}"))?;
    Ok((out["tokens_per_s"].as_f64().unwrap_or(f64::NAN), out["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN)))
}

pub fn exec(args: FinetuneArgs) -> anyhow::Result<Exit> {
    std::fs::create_dir_all(args.dir.join("data"))?;
    std::fs::create_dir_all(args.dir.join(".git"))?;
    let root = args.dir.canonicalize()?;
    write_data(&root.join("data/chat.jsonl"))?;
    let mib = |b: f64| b / (1024.0 * 1024.0);
    outln!("machine: {} ({} cores); {} threads on both sides; LoRA r=8 α=16 on all linear layers\n", cpu_model(), num_cores(), args.threads);
    outln!("| model | method | rows × tokens per step | swift tokens/s | PEFT tokens/s | swift/PEFT | swift peak RSS (training) | PEFT peak RSS | swift frozen weights | swift load peak |");
    outln!("|---|---|---|---|---|---|---|---|---|---|");
    let mut figures = Vec::new();
    let shapes: Vec<&Shape> = if args.large { vec![&SMALL, &LARGE] } else { vec![&SMALL] };
    for s in shapes {
        let steps = if s.steps > 0 { s.steps } else { args.steps };
        let work = root.join(s.name);
        std::fs::create_dir_all(work.join("pipelines"))?;
        std::fs::create_dir_all(work.join(".git"))?;
        let data = work.join("data");
        std::fs::create_dir_all(&data)?;
        std::fs::copy(root.join("data/chat.jsonl"), data.join("chat.jsonl"))?;
        let model = write_model(&root.join("models").join(s.name), s)?;
        let batch = args.batch.unwrap_or(s.batch);
        std::fs::write(work.join("pipelines/bench.toml"), manifest(&model, s, steps, batch))?;
        let prep = swift_run(&work, &["--until", "prep"], args.threads)?;
        let tokens = PathBuf::from(stage(&prep, "prep")?["outputs"]["tokens"].as_str().context("tokens")?);
        for method in ["lora", "qlora"] {
            let m = measure_swift(&work, method, args.threads)?;
            let (peer_tps, peer_rss) = match &args.python {
                Some(python) => measure_peft(python, &model, &tokens, method, steps, batch, args.threads)?,
                None => (f64::NAN, f64::NAN),
            };
            let finite = |v: f64| if v.is_finite() { serde_json::json!(v) } else { serde_json::Value::Null };
            figures.push(serde_json::json!({
                "model": s.name, "method": method, "batch": batch, "seq": s.seq, "steps": steps,
                "swift_tokens_per_s": finite(m.tokens_per_s), "peft_tokens_per_s": finite(peer_tps),
                "ratio": finite(m.tokens_per_s / peer_tps), "swift_peak_rss_bytes": finite(m.peak_rss),
                "peft_peak_rss_bytes": finite(peer_rss), "swift_frozen_weight_bytes": finite(m.frozen),
                "swift_load_peak_rss_bytes": finite(m.load_peak),
            }));
            outln!(
                "| {} | {method} | {batch} × {} | {:.0} | {:.0} | {:.2}× | {:.0} MiB | {:.0} MiB | {:.0} MiB | {:.0} MiB |",
                s.name,
                s.seq,
                m.tokens_per_s,
                peer_tps,
                m.tokens_per_s / peer_tps,
                mib(m.peak_rss),
                mib(peer_rss),
                mib(m.frozen),
                mib(m.load_peak)
            );
        }
    }
    if args.json {
        outln!("{}", serde_json::json!({"bench": "finetune", "machine": cpu_model(), "threads": args.threads, "results": figures}));
    }
    Ok(Exit::Success)
}
