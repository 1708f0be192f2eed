//! `swift bench generate`: prompt-processing and greedy-generation speed on
//! CPU for a randomly initialised Qwen2.5-0.5B-shaped model (hidden 896, 24
//! layers, 14 heads, 2 KV heads, vocabulary 151936, bf16 weights, f32 compute),
//! beside transformers doing the same work in the same run (`--python`); and
//! with `--concurrency`, the aggregate decode rate of N sequences on swift's
//! batch decoder beside transformers' batched `generate` (left padding).
//!
//! A batch's decode rate is N × (new tokens − 1) over the time a run takes
//! beyond the same run stopped after its first token (the prefill), on both
//! sides. Sequence `s` has its own prompt, so no prefix is shared.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device};
use swift_stages::llm::generate::GenerateOptions;
use swift_stages::llm::linear::DenseLoader;
use swift_stages::llm::scheduler::{generate_all, BatchLimits, Request};
use swift_stages::llm::stored::StoredLoader;
use swift_stages::llm::model::{argmax, KvCache};
use swift_stages::llm::weights::Weights;
use swift_stages::llm::{Decoder, ModelConfig};

use super::bench::{cpu_model, median, num_cores, timed};
use super::Exit;

/// Arguments of `swift bench generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Where the random checkpoint is written (once) and reused.
    #[arg(long, default_value = "bench-work/qwen2.5-0.5b-random")]
    dir: PathBuf,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u16).range(1..))]
    prompt_tokens: u16,
    /// Tokens to generate (at least 2: one from the prefill, then decoding steps).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(2..))]
    new_tokens: u16,
    /// A Python with transformers (e.g. .venv/bin/python) to measure beside swift.
    #[arg(long)]
    python: Option<PathBuf>,
    /// Repetitions of prefill + generation; medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    repeats: u16,
    /// Also measure batches of these many sequences (e.g. 1,4,8,16).
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
}

/// Sequence `s`'s prompt: the same pseudo-random ids the Python side makes.
fn prompt_of(s: u32, tokens: usize, vocab: u32) -> Vec<u32> {
    (0..tokens as u32).map(|i| i.wrapping_mul(2_654_435_761).wrapping_add(i).wrapping_add(s.wrapping_mul(7919)) % vocab).collect()
}

const CONFIG: &str = r#"{
  "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
  "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
  "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
  "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
  "tie_word_embeddings": true, "use_sliding_window": false, "torch_dtype": "bfloat16",
  "bos_token_id": 151643, "eos_token_id": 151645
}
"#;

pub fn exec(args: GenerateArgs) -> anyhow::Result<Exit> {
    write_checkpoint(&args.dir)?;
    let config = ModelConfig::load(&args.dir)?;
    let vocab = config.vocab_size as u32;
    // A fixed pseudo-random prompt, the same for both tools.
    let (prompt_tokens, new_tokens) = (usize::from(args.prompt_tokens), usize::from(args.new_tokens));
    let prompt = prompt_of(0, prompt_tokens, vocab);
    let upcast = Decoder::load(&args.dir, config.clone(), DType::F32, &Device::Cpu, &DenseLoader)?;
    let stored = Decoder::load(&args.dir, config, DType::F32, &Device::Cpu, &StoredLoader)?;
    let (f32_prefill, f32_decode, f32_ids) = single_stream(&upcast, &prompt, new_tokens, args.repeats)?;
    drop(upcast);
    // The peak printed at the end is then the stored model's and its batches'.
    swift_stages::memory::reset_peak();
    let (bf16_prefill, bf16_decode, bf16_ids) = single_stream(&stored, &prompt, new_tokens, args.repeats)?;

    let threads = num_cores();
    outln!("machine: {} ({threads} cores), model: Qwen2.5-0.5B shape, random bf16 weights, f32 compute", cpu_model());
    outln!("prompt {prompt_tokens} tokens, {new_tokens} new tokens, greedy; medians of {} repetitions\n", args.repeats);
    outln!("| tool, weights in memory | prompt processing, tokens/s | greedy generation, tokens/s |");
    outln!("|---|---|---|");
    let rate = |prefill: f64, decode: f64| (prompt_tokens as f64 / prefill, (new_tokens - 1) as f64 / decode);
    let (sp, sd) = rate(bf16_prefill, bf16_decode);
    let (fp, fd) = rate(f32_prefill, f32_decode);
    outln!("| swift, bf16 as stored (f32 compute) | {sp:.1} | {sd:.2} |");
    outln!("| swift, upcast to f32 | {fp:.1} | {fd:.2} |");
    if let Some(python) = &args.python {
        for torch_dtype in ["float32", "bfloat16"] {
            let peer = transformers_single(python, &args.dir, &prompt, new_tokens, threads, args.repeats, torch_dtype)?;
            let (pp, pd) = rate(peer.0, peer.1);
            let same = if peer.2 == bf16_ids { "same tokens as swift" } else { "other tokens than swift" };
            outln!("| transformers, {torch_dtype} ({same}) | {pp:.1} ({:.2}× swift's) | {pd:.2} ({:.2}× swift's) |", pp / sp, pd / sd);
        }
    }
    outln!("\nswift's two loadings give the same greedy tokens: {}", if f32_ids == bf16_ids { "yes" } else { "no" });
    let model = stored;
    if !args.concurrency.is_empty() {
        concurrency(&args, &model, vocab)?;
    }
    if let Some(peak) = swift_stages::memory::peak_rss_bytes() {
        outln!("\nswift peak RSS (bf16 weights as stored, batches included): {:.0} MiB", peak as f64 / (1u64 << 20) as f64);
    }
    Ok(Exit::Success)
}

/// Median prefill and decode seconds of one sequence, and its greedy tokens.
fn single_stream(model: &Decoder, prompt: &[u32], new_tokens: usize, repeats: u16) -> anyhow::Result<(f64, f64, Vec<u32>)> {
    let (mut prefills, mut decodes, mut new_ids) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..repeats {
        let mut cache = KvCache::default();
        let positions: Vec<u32> = (0..prompt.len() as u32).collect();
        let start = Instant::now();
        let logits = model.forward(prompt, &positions, &vec![0; prompt.len()], Some(&mut cache), true)?;
        prefills.push(start.elapsed().as_secs_f64());
        let mut token = argmax(&logits)?;
        new_ids = vec![token];
        let start = Instant::now();
        for step in 1..new_tokens {
            let position = (prompt.len() + step - 1) as u32;
            let logits = model.forward(&[token], &[position], &[0], Some(&mut cache), true)?;
            token = argmax(&logits)?;
            new_ids.push(token);
        }
        decodes.push(start.elapsed().as_secs_f64());
    }
    Ok((median(prefills), median(decodes), new_ids))
}

/// transformers' median prefill and decode seconds and greedy tokens, with
/// the weights in `torch_dtype`.
fn transformers_single(python: &Path, dir: &Path, prompt: &[u32], new_tokens: usize, threads: usize, repeats: u16, torch_dtype: &str)
    -> anyhow::Result<(f64, f64, Vec<u32>)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_generate_transformers.py");
    let mut cmd = Command::new(python);
    cmd.arg(&script).arg(dir).arg(serde_json::to_string(prompt)?).arg(new_tokens.to_string());
    cmd.arg(threads.to_string()).arg(repeats.to_string()).arg(torch_dtype);
    let (_, stdout) = timed(&mut cmd)?;
    let peer: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("{}"))?;
    let seconds = |key: &str| -> anyhow::Result<f64> {
        let values: Vec<f64> = peer[key].as_array().context("transformers' timings")?.iter().filter_map(|v| v.as_f64()).collect();
        anyhow::ensure!(!values.is_empty(), "no {key} from transformers");
        Ok(median(values))
    };
    let ids = peer["new_ids"].as_array().map(|ids| ids.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect()).unwrap_or_default();
    Ok((seconds("prefill_seconds")?, seconds("decode_seconds")?, ids))
}

/// The aggregate decode rates of batches, swift's and transformers'.
fn concurrency(args: &GenerateArgs, model: &Decoder, vocab: u32) -> anyhow::Result<()> {
    let (prompt_tokens, new_tokens) = (usize::from(args.prompt_tokens), usize::from(args.new_tokens));
    let peer = match &args.python {
        Some(python) => {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_generate_transformers.py");
            let mut cmd = Command::new(python);
            cmd.arg(&script).arg(&args.dir).arg("batch").arg(prompt_tokens.to_string()).arg(new_tokens.to_string());
            cmd.arg(num_cores().to_string()).arg(serde_json::to_string(&args.concurrency)?);
            let (_, stdout) = timed(&mut cmd)?;
            Some(serde_json::from_str::<serde_json::Value>(stdout.lines().last().unwrap_or("{}"))?)
        }
        None => None,
    };
    outln!("\nbatches: prompts of {prompt_tokens} tokens, {new_tokens} new tokens each, greedy\n");
    outln!("| sequences | swift decode tokens/s | swift vs its 1 | transformers decode tokens/s | ratio | swift KV pool |");
    outln!("|---|---|---|---|---|---|");
    let mut single = None;
    for &n in &args.concurrency {
        let requests: Vec<Request> = (0..n as u32)
            .map(|s| Request { prompt: prompt_of(s, prompt_tokens, vocab), options: GenerateOptions { max_tokens: new_tokens, ..Default::default() } })
            .collect();
        let first_only: Vec<Request> =
            requests.iter().map(|r| Request { options: GenerateOptions { max_tokens: 1, ..r.options.clone() }, ..r.clone() }).collect();
        let limits = BatchLimits { max_seqs: n.max(1), ..BatchLimits::default() };
        let start = Instant::now();
        generate_all(model, &first_only, &[], limits, |_, _| {})?;
        let prefill = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let (_, stats) = generate_all(model, &requests, &[], limits, |_, _| {})?;
        let total = start.elapsed().as_secs_f64();
        let rate = (n * (new_tokens - 1)) as f64 / (total - prefill).max(1e-9);
        let vs_single = single.map_or("1.00×".to_string(), |s: f64| format!("{:.2}×", rate / s));
        single.get_or_insert(rate);
        let pool_mib = stats.cache_bytes as f64 / (1u64 << 20) as f64;
        let peer_rate = peer.as_ref().and_then(|p| p["decode_tokens_per_s"][n.to_string()].as_f64());
        match peer_rate {
            Some(p) => outln!("| {n} | {rate:.1} | {vs_single} | {p:.1} | {:.2}× | {pool_mib:.0} MiB |", rate / p),
            None => outln!("| {n} | {rate:.1} | {vs_single} | (not measured) | | {pool_mib:.0} MiB |"),
        }
    }
    if let Some(rss) = peer.as_ref().and_then(|p| p["peak_rss_mib"].as_f64()) {
        outln!("\ntransformers peak RSS (batches): {rss:.0} MiB");
    }
    Ok(())
}

/// Writes config.json and a random bf16 model.safetensors unless present.
fn write_checkpoint(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("config.json"), CONFIG)?;
    let weights = dir.join("model.safetensors");
    if weights.exists() {
        return Ok(());
    }
    Weights::write_random(dir, &ModelConfig::load(dir)?, DType::BF16)?;
    Ok(())
}
