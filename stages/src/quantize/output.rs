//! The AWQ model folder: the base folder's tokenizer and configs, `config.json`
//! with the `quantization_config` block transformers and vLLM read, and the
//! tensors — fp16 embeddings, norms and `lm_head`, AWQ GEMM projections —
//! sharded with an index above the size limit.

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Tensor};

use crate::llm::save;
use crate::llm::weights::Weights;
use crate::llm::ModelConfig;

/// Weight files a folder copy leaves behind (the tensors are rewritten).
const WEIGHT_EXTENSIONS: &[&str] = &["safetensors", "bin", "pt", "pth", "gguf", "h5", "msgpack", "ckpt"];

/// The `quantization_config` block (AutoAWQ's `to_transformers_dict`).
pub fn quantization_config(group_size: usize, not_converted: &[String]) -> serde_json::Value {
    let skip = if not_converted.is_empty() { serde_json::Value::Null } else { serde_json::json!(not_converted) };
    serde_json::json!({
        "quant_method": "awq",
        "zero_point": true,
        "group_size": group_size,
        "bits": 4,
        "version": "gemm",
        "modules_to_not_convert": skip,
    })
}

/// Writes the folder at `dest` from the base folder and the layers' tensors.
pub fn write_folder(
    dest: &Path,
    base: &Path,
    config: &ModelConfig,
    layer_tensors: Vec<(String, Tensor)>,
    quantization: serde_json::Value,
    max_shard_bytes: u64,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    copy_companions(base, dest)?;
    write_config(base, dest, quantization)?;
    let weights = Weights::open(base, DType::F16, &candle_core::Device::Cpu)?;
    let (v, h) = (config.vocab_size, config.hidden_size);
    let mut tensors = vec![("model.embed_tokens.weight".to_string(), weights.get("model.embed_tokens.weight", &[v, h])?)];
    tensors.extend(layer_tensors);
    tensors.push(("model.norm.weight".to_string(), weights.get("model.norm.weight", &[h])?));
    if weights.contains("lm_head.weight") {
        tensors.push(("lm_head.weight".to_string(), weights.get("lm_head.weight", &[v, h])?));
    }
    save::write_checkpoint(dest, &tensors, max_shard_bytes)?;
    Ok(())
}

/// Copies the base folder's other files (tokenizer, generation config, chat
/// template, …), leaving weights and `config.json` to be rewritten.
pub(crate) fn copy_companions(base: &Path, dest: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(base).with_context(|| format!("reading {}", base.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let is_weights = path.extension().and_then(|e| e.to_str()).is_some_and(|e| WEIGHT_EXTENSIONS.contains(&e))
            || name.ends_with(".index.json");
        if !path.is_file() || is_weights || name == "config.json" || name.starts_with('.') {
            continue;
        }
        std::fs::copy(&path, dest.join(&name)).with_context(|| format!("copying {}", path.display()))?;
    }
    Ok(())
}

/// The base's `config.json` with the quantization block and fp16 as its dtype.
fn write_config(base: &Path, dest: &Path, quantization: serde_json::Value) -> anyhow::Result<()> {
    let path = base.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut config: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).with_context(|| format!("{}: not a JSON object", path.display()))?;
    for key in ["torch_dtype", "dtype"] {
        if config.contains_key(key) {
            config.insert(key.into(), "float16".into());
        }
    }
    if !config.contains_key("torch_dtype") && !config.contains_key("dtype") {
        config.insert("torch_dtype".into(), "float16".into());
    }
    config.insert("quantization_config".into(), quantization);
    let out = dest.join("config.json");
    std::fs::write(&out, serde_json::to_string_pretty(&config)? + "\n").with_context(|| format!("writing {}", out.display()))
}
