//! AWQ checkpoints against AutoAWQ 0.2.9's own code (tests/fixtures/make_awq.py
//! wrote the fixtures): a folder AutoAWQ packed runs in swift with the logits
//! transformers computes from AutoAWQ's dequantized weights, and a folder swift
//! wrote dequantizes, through AutoAWQ's `dequantize_gemm`, to exactly the
//! weights swift computes with.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use swift_stages::llm::awq::loader_for;
use swift_stages::llm::model::packed_layout;
use swift_stages::llm::{Decoder, ModelConfig};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/awq")
}

fn load(folder: &Path) -> Decoder {
    let config = ModelConfig::load(folder).unwrap();
    let loader = loader_for(&config);
    Decoder::load(folder, config, DType::F32, &Device::Cpu, loader.as_ref()).unwrap()
}

/// The weight swift computes with for `prefix` (`model.layers.N.self_attn.k_proj`, …).
fn weight(decoder: &Decoder, prefix: &str) -> Tensor {
    let rest = prefix.strip_prefix("model.layers.").unwrap();
    let (layer, name) = rest.split_once('.').unwrap();
    let parts = decoder.layer_parts(layer.parse().unwrap());
    let projection = match name {
        "self_attn.q_proj" => parts.q_proj,
        "self_attn.k_proj" => parts.k_proj,
        "self_attn.v_proj" => parts.v_proj,
        "self_attn.o_proj" => parts.o_proj,
        "mlp.gate_proj" => parts.gate_proj,
        "mlp.up_proj" => parts.up_proj,
        "mlp.down_proj" => parts.down_proj,
        other => panic!("unknown projection {other}"),
    };
    projection.weight_f32().unwrap()
}

/// Checks every `<prefix>.weight` of a reference file bit for bit; returns how many.
fn assert_weights_equal(decoder: &Decoder, reference: &std::collections::HashMap<String, Tensor>) -> usize {
    let mut checked = 0;
    for (name, expected) in reference {
        let Some(prefix) = name.strip_suffix(".weight") else { continue };
        let ours = weight(decoder, prefix).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let theirs = expected.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(ours.len(), theirs.len(), "{prefix}");
        let differing = ours.iter().zip(&theirs).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(differing, 0, "{prefix}: {differing} of {} values differ from AutoAWQ's dequantization", ours.len());
        checked += 1;
    }
    checked
}

#[test]
fn a_folder_autoawq_packed_runs_with_the_logits_of_its_dequantized_weights() {
    let decoder = load(&fixtures().join("autoawq-qwen2-g64"));
    let reference = candle_core::safetensors::load(fixtures().join("autoawq-qwen2-g64.reference.safetensors"), &Device::Cpu).unwrap();
    assert!(assert_weights_equal(&decoder, &reference) >= 2);
    let ids: Vec<u32> = reference["input_ids"].to_vec1::<i64>().unwrap().into_iter().map(|i| i as u32).collect();
    let (positions, segments) = packed_layout(&[ids.len()]);
    let logits = decoder.forward(&ids, &positions, &segments, None, false).unwrap();
    let diff = (logits - &reference["logits"]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-4, "logits differ from transformers on AutoAWQ's dequantized weights by {diff}");
}

#[test]
fn a_folder_swift_wrote_dequantizes_in_autoawq_to_the_weights_swift_uses() {
    let decoder = load(&fixtures().join("swift-qwen2-outlier-g64"));
    let reference =
        candle_core::safetensors::load(fixtures().join("swift-qwen2-outlier-g64.autoawq.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(assert_weights_equal(&decoder, &reference), 3);
}
