//! The model code against what transformers computes on the tiny fixture
//! checkpoints (tests/fixtures/make_models.py wrote them and the references).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use swift_stages::llm::chat::ChatTemplate;
use swift_stages::llm::generate::{generate, GenerateOptions};
use swift_stages::llm::linear::DenseLoader;
use swift_stages::llm::model::packed_layout;
use swift_stages::llm::{Decoder, ModelConfig, TextTokenizer};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn load(name: &str) -> (Decoder, TextTokenizer) {
    let folder = fixtures().join("models").join(name);
    let config = ModelConfig::load(&folder).unwrap();
    let tokenizer = TextTokenizer::load(&folder, &config).unwrap();
    let model = Decoder::load(&folder, config, DType::F32, &Device::Cpu, &DenseLoader).unwrap();
    (model, tokenizer)
}

fn references() -> (HashMap<String, Tensor>, serde_json::Value) {
    let dir = fixtures().join("models");
    let tensors = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let json = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    (tensors, json)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

const MODELS: [&str; 2] = ["qwen2-tiny", "llama-tiny"];

#[test]
fn tokenizer_and_logits_match_transformers() {
    let (tensors, json) = references();
    for name in MODELS {
        let (model, tokenizer) = load(name);
        for (i, case) in json[name].as_array().unwrap().iter().enumerate() {
            let ids = tokenizer.encode(case["prompt"].as_str().unwrap()).unwrap();
            let expected_ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            assert_eq!(ids, expected_ids, "{name} prompt {i}: token ids");
            let (positions, segments) = packed_layout(&[ids.len()]);
            let logits = model.forward(&ids, &positions, &segments, None, false).unwrap();
            let reference = &tensors[&format!("{name}.{i}.logits")];
            let diff = max_abs_diff(&logits, reference);
            assert!(diff < 1e-4, "{name} prompt {i}: logits differ by {diff}");
        }
    }
}

#[test]
fn packed_sequences_match_each_sequence_alone() {
    let (tensors, json) = references();
    for name in MODELS {
        let (model, _) = load(name);
        let cases = json[name].as_array().unwrap();
        let a: Vec<u32> = serde_json::from_value(cases[0]["ids"].clone()).unwrap();
        let b: Vec<u32> = serde_json::from_value(cases[1]["ids"].clone()).unwrap();
        let row: Vec<u32> = a.iter().chain(&b).copied().collect();
        let (positions, segments) = packed_layout(&[a.len(), b.len()]);
        let logits = model.forward(&row, &positions, &segments, None, false).unwrap();
        let first = logits.narrow(0, 0, a.len()).unwrap();
        let second = logits.narrow(0, a.len(), b.len()).unwrap();
        assert!(max_abs_diff(&first, &tensors[&format!("{name}.0.logits")]) < 1e-4, "{name}: first sample");
        assert!(max_abs_diff(&second, &tensors[&format!("{name}.1.logits")]) < 1e-4, "{name}: second sample");
    }
}

#[test]
fn greedy_continuations_match_token_for_token() {
    let (_, json) = references();
    for name in MODELS {
        let (model, _) = load(name);
        for case in json[name].as_array().unwrap() {
            let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            let expected: Vec<u32> = serde_json::from_value(case["greedy"].clone()).unwrap();
            let options = GenerateOptions { max_tokens: expected.len(), ..Default::default() };
            let got = generate(&model, &ids, &[], &options, |_| {}).unwrap().ids;
            assert_eq!(got, expected, "{name}: {}", case["prompt"]);
        }
    }
}

#[test]
fn chat_templates_render_byte_identical() {
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("models/chat_templates.json")).unwrap()).unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let file = case["template"].as_str().unwrap();
        let source = std::fs::read_to_string(fixtures().join("templates").join(file)).unwrap();
        let template =
            ChatTemplate::new(&source, case["bos_token"].as_str().unwrap(), case["eos_token"].as_str().unwrap()).unwrap();
        let tools = case["tools"].as_array();
        let rendered =
            template.render(&case["messages"], tools, case["add_generation_prompt"].as_bool().unwrap()).unwrap();
        assert_eq!(rendered, case["rendered"].as_str().unwrap(), "{file} with {}", case["messages"]);
    }
}

#[test]
fn special_tokens_and_templates_come_from_the_model_folder() {
    let (_, qwen) = load("qwen2-tiny");
    assert_eq!(qwen.eos_ids(), &[2, 0], "generation_config.json's list wins");
    assert!(qwen.chat_template_source().unwrap().contains("You are Qwen"), "from tokenizer_config.json");
    let (_, llama) = load("llama-tiny");
    assert_eq!(llama.eos_ids(), &[7], "a single eos id");
    assert!(llama.chat_template_source().unwrap().contains("<|start_header_id|>"), "from chat_template.jinja");
    let text = llama
        .chat_template()
        .unwrap()
        .unwrap()
        .render(&serde_json::json!([{"role": "user", "content": "Hi"}]), None::<&()>, true)
        .unwrap();
    assert_eq!(text, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
}
