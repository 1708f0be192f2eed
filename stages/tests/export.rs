//! Exports of the adapter chain swift trained (tests/fixtures/peft/swift_qdora,
//! then swift_chain on top) on the tiny Qwen2 fixture:
//! - the merged folder, loaded as a plain checkpoint, gives the logits of the
//!   in-memory model (base + chain merged while loading) within 1e-5, and its
//!   tensors keep the checkpoint's dtypes; sharding writes an index;
//! - the GGUF files, read back by candle's own GGUF reader, hold llama.cpp's
//!   tensor names and each tensor dequantizes to the merged one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use swift_stages::export::gguf::{self, GgufType};
use swift_stages::export::merged;
use swift_stages::llm::adapted::{AdaptedLoader, BaseFormat};
use swift_stages::llm::adapter::PeftAdapter;
use swift_stages::llm::model::packed_layout;
use swift_stages::llm::{Decoder, ModelConfig};
use swift_stages::model_source::OpenedModel;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn chain() -> OpenedModel {
    let adapters = ["swift_qdora", "swift_chain"].map(|name| PeftAdapter::open(&fixtures().join("peft").join(name)).unwrap());
    OpenedModel { folder: fixtures().join("models/qwen2-tiny"), adapters: adapters.into() }
}

fn logits(decoder: &Decoder) -> Tensor {
    let ids: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 640).collect();
    let (positions, segments) = packed_layout(&[ids.len()]);
    decoder.forward(&ids, &positions, &segments, None, false).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn in_memory(model: &OpenedModel) -> Decoder {
    let config = ModelConfig::load(&model.folder).unwrap();
    let loader = AdaptedLoader::new(&model.adapters, BaseFormat::Dense);
    Decoder::load(&model.folder, config, DType::F32, &Device::Cpu, &loader).unwrap()
}

fn plain(folder: &Path) -> Decoder {
    let config = ModelConfig::load(folder).unwrap();
    let loader = AdaptedLoader::new(&[], BaseFormat::Dense);
    Decoder::load(folder, config, DType::F32, &Device::Cpu, &loader).unwrap()
}

#[test]
fn the_merged_folder_has_the_logits_of_the_in_memory_chain() {
    let model = chain();
    let dir = tempfile::tempdir().unwrap();
    let merges = merged::write(dir.path(), &model, 5_000_000_000).unwrap();
    assert_eq!(merges, model.adapters.iter().map(|a| a.modules.len()).sum::<usize>());
    let d = max_abs_diff(&logits(&in_memory(&model)), &logits(&plain(dir.path())));
    assert!(d < 1e-5, "merged export differs from the in-memory model by {d}");
    for file in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"] {
        assert!(dir.path().join(file).is_file(), "{file} missing");
    }
    // The base is f32, so is every merged tensor.
    let tensors = candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(tensors.values().all(|t| t.dtype() == DType::F32));
    assert!(!tensors.contains_key("lm_head.weight"), "tied embeddings stay tied");
}

#[test]
fn a_sharded_merge_writes_an_index_and_loads_the_same() {
    let model = chain();
    let dir = tempfile::tempdir().unwrap();
    merged::write(dir.path(), &model, 400_000).unwrap();
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("model.safetensors.index.json")).unwrap()).unwrap();
    let shards: std::collections::BTreeSet<&str> = index["weight_map"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
    assert!(shards.len() > 1, "{shards:?}");
    let d = max_abs_diff(&logits(&in_memory(&model)), &logits(&plain(dir.path())));
    assert!(d < 1e-5, "sharded merge differs by {d}");
}

#[test]
fn an_adapter_for_another_base_is_refused() {
    // llama-tiny's projections have other shapes than qwen2-tiny's.
    let mut model = chain();
    model.folder = fixtures().join("models/llama-tiny");
    let dir = tempfile::tempdir().unwrap();
    let err = merged::write(dir.path(), &model, 5_000_000_000).unwrap_err();
    assert!(format!("{err:#}").contains("an adapter for another model"), "{err:#}");
}

/// The merged checkpoint's tensors, by name.
fn merged_tensors(model: &OpenedModel) -> HashMap<String, Tensor> {
    let dir = tempfile::tempdir().unwrap();
    merged::write(dir.path(), model, 5_000_000_000).unwrap();
    candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap()
}

#[test]
fn gguf_files_read_back_to_the_merged_tensors() {
    let model = chain();
    let reference = merged_tensors(&model);
    let dir = tempfile::tempdir().unwrap();
    for (ty, tolerance) in [(GgufType::F16, 1e-3f32), (GgufType::Q8_0, 1.2e-2)] {
        let path = dir.path().join(format!("m-{}.gguf", ty.name()));
        gguf::write(&path, &model, ty, "m").unwrap();
        let mut file = std::fs::File::open(&path).unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        let meta = |key: &str| content.metadata.get(key).unwrap_or_else(|| panic!("{key} missing"));
        assert_eq!(meta("general.architecture").to_string().unwrap(), "qwen2");
        assert_eq!(meta("qwen2.block_count").to_u32().unwrap(), 2);
        assert_eq!(meta("qwen2.attention.head_count_kv").to_u32().unwrap(), 2);
        assert_eq!(meta("tokenizer.ggml.model").to_string().unwrap(), "gpt2");
        assert_eq!(meta("tokenizer.ggml.tokens").to_vec().unwrap().len(), 640);
        assert!(meta("tokenizer.chat_template").to_string().unwrap().contains("<|im_start|>"));
        // Every merged tensor is there under llama.cpp's name (embeddings tied: no output.weight).
        assert_eq!(content.tensor_infos.len(), reference.len());
        assert!(!content.tensor_infos.contains_key("output.weight"));
        for (hf, gguf) in [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("model.layers.1.self_attn.q_proj.weight", "blk.1.attn_q.weight"),
            ("model.layers.1.self_attn.q_proj.bias", "blk.1.attn_q.bias"),
            ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight"),
            ("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight"),
        ] {
            let ours = content.tensor(&mut file, gguf, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
            let expected = &reference[hf];
            assert_eq!(ours.dims(), expected.dims(), "{gguf}");
            let scale = expected.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            let d = max_abs_diff(&ours, expected);
            assert!(d <= tolerance * scale.max(1e-6), "{gguf} ({}) differs by {d} (max |w| {scale})", ty.name());
        }
    }
}
