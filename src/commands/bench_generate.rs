//! `swift bench generate`: prompt-processing and greedy-generation speed on
//! CPU for a randomly initialised Qwen2.5-0.5B-shaped model (hidden 896, 24
//! layers, 14 heads, 2 KV heads, vocabulary 151936, bf16 weights, f32 compute),
//! beside transformers doing the same work in the same run (`--python`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use swift_stages::llm::linear::DenseLoader;
use swift_stages::llm::model::{argmax, KvCache};
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
    let prompt: Vec<u32> = (0..prompt_tokens as u32).map(|i| i.wrapping_mul(2_654_435_761).wrapping_add(i) % vocab).collect();
    let model = Decoder::load(&args.dir, config, DType::F32, &Device::Cpu, &DenseLoader)?;

    let (mut prefills, mut decodes, mut new_ids) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.repeats {
        let mut cache = KvCache::default();
        let positions: Vec<u32> = (0..prompt.len() as u32).collect();
        let start = Instant::now();
        let logits = model.forward(&prompt, &positions, &vec![0; prompt.len()], Some(&mut cache), true)?;
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
    let (prefill, decode) = (median(prefills), median(decodes));

    let threads = num_cores();
    outln!("machine: {} ({threads} cores), model: Qwen2.5-0.5B shape, random bf16 weights, f32 compute", cpu_model());
    outln!("prompt {prompt_tokens} tokens, {new_tokens} new tokens, greedy; medians of {} repetitions\n", args.repeats);
    outln!("| measure | swift | transformers | ratio |");
    outln!("|---|---|---|---|");
    let swift_prefill = prompt_tokens as f64 / prefill;
    let swift_decode = (new_tokens - 1) as f64 / decode;
    match &args.python {
        Some(python) => {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_generate_transformers.py");
            let mut cmd = Command::new(python);
            cmd.arg(&script)
                .arg(&args.dir)
                .arg(serde_json::to_string(&prompt)?)
                .arg(new_tokens.to_string())
                .arg(threads.to_string())
                .arg(args.repeats.to_string());
            let (_, stdout) = timed(&mut cmd)?;
            let peer: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("{}"))?;
            let seconds = |key: &str| -> anyhow::Result<f64> {
                let values: Vec<f64> = peer[key].as_array().context("transformers' timings")?.iter().filter_map(|v| v.as_f64()).collect();
                anyhow::ensure!(!values.is_empty(), "no {key} from transformers");
                Ok(median(values))
            };
            let peer_prefill = prompt_tokens as f64 / seconds("prefill_seconds")?;
            let peer_decode = (new_tokens - 1) as f64 / seconds("decode_seconds")?;
            outln!("| prompt processing, tokens/s | {swift_prefill:.1} | {peer_prefill:.1} | {:.2}× |", swift_prefill / peer_prefill);
            outln!("| greedy generation, tokens/s | {swift_decode:.2} | {peer_decode:.2} | {:.2}× |", swift_decode / peer_decode);
            let same = peer["new_ids"].as_array().map(|ids| ids.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect::<Vec<_>>());
            outln!("\nsame greedy tokens as transformers: {}", if same.as_deref() == Some(&new_ids[..]) { "yes" } else { "no" });
        }
        None => {
            outln!("| prompt processing, tokens/s | {swift_prefill:.1} | (not measured) | |");
            outln!("| greedy generation, tokens/s | {swift_decode:.2} | (not measured) | |");
        }
    }
    Ok(Exit::Success)
}

/// Writes config.json and a random bf16 model.safetensors unless present.
fn write_checkpoint(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("config.json"), CONFIG)?;
    let weights = dir.join("model.safetensors");
    if weights.exists() {
        return Ok(());
    }
    let config = ModelConfig::load(dir)?;
    let (h, i, v) = (config.hidden_size, config.intermediate_size, config.vocab_size);
    let (q, kv) = (config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim);
    let device = Device::Cpu;
    let random = |shape: &[usize]| -> candle_core::Result<Tensor> { Tensor::randn(0f32, 0.02, shape, &device)?.to_dtype(DType::BF16) };
    let ones = |n: usize| -> candle_core::Result<Tensor> { Tensor::ones(n, DType::BF16, &device) };
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert("model.embed_tokens.weight".into(), random(&[v, h])?);
    tensors.insert("model.norm.weight".into(), ones(h)?);
    for n in 0..config.num_layers {
        let p = format!("model.layers.{n}");
        for (name, shape) in [
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
            ("self_attn.q_proj.bias", vec![q]),
            ("self_attn.k_proj.bias", vec![kv]),
            ("self_attn.v_proj.bias", vec![kv]),
        ] {
            tensors.insert(format!("{p}.{name}"), random(&shape)?);
        }
        tensors.insert(format!("{p}.input_layernorm.weight"), ones(h)?);
        tensors.insert(format!("{p}.post_attention_layernorm.weight"), ones(h)?);
    }
    let tmp = dir.join("model.safetensors.partial");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, &weights)?;
    Ok(())
}
