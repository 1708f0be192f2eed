//! LoRA/DoRA adapters and NF4 bases on the tiny Qwen2 fixture:
//! - PEFT's own adapters (tests/fixtures/make_peft.py) applied unmerged, merged,
//!   and chained give PEFT's logits; what swift writes has PEFT's key names;
//! - gradients of adapter parameters agree with finite differences, for dense
//!   and NF4 bases, LoRA and DoRA, with and without activation checkpointing;
//! - one batched pass over ragged packed rows gives the loss and gradients of
//!   the per-row loop, dropout masks included.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use swift_stages::llm::adapted::{AdaptedLoader, BaseFormat, NewAdapter};
use swift_stages::llm::adapter::{self, AdapterSpec, PeftAdapter};
use swift_stages::llm::lora::{DropoutState, LoraParams, RowDropout};
use swift_stages::llm::model::{packed_layout, CheckpointGrads, TrainBatch};
use swift_stages::llm::{Decoder, ModelConfig};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn model_dir() -> PathBuf {
    fixtures().join("models/qwen2-tiny")
}

fn peft_reference() -> (HashMap<String, Tensor>, serde_json::Value) {
    let dir = fixtures().join("peft");
    let tensors = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let json = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    (tensors, json)
}

fn input_ids(json: &serde_json::Value) -> Vec<u32> {
    json["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn logits(decoder: &Decoder, ids: &[u32]) -> Tensor {
    let (positions, segments) = packed_layout(&[ids.len()]);
    decoder.forward(ids, &positions, &segments, None, false).unwrap()
}

/// Loads the model with `merged` merged and, if `unmerged` is given, that
/// adapter applied unmerged (its tensors copied into fresh adapter variables).
fn load(merged: &[PeftAdapter], unmerged: Option<&PeftAdapter>, base: BaseFormat) -> Decoder {
    let config = ModelConfig::load(&model_dir()).unwrap();
    let select = |path: &str| unmerged.is_some_and(|a| a.module(path).is_some());
    let new = unmerged.map(|a| NewAdapter {
        rank: a.config.r,
        scaling: a.config.scaling(),
        dora: a.config.use_dora,
        dropout: 0.0,
        seed: 1,
    });
    let mut loader = AdaptedLoader::new(merged, base);
    if let Some(new) = new {
        loader = loader.with_new_adapters(&select, new);
    }
    let decoder = Decoder::load(&model_dir(), config, DType::F32, &Device::Cpu, &loader).unwrap();
    if let Some(adapter) = unmerged {
        let created = loader.take_adapters();
        assert_eq!(created.len(), adapter.modules.len());
        for (path, params) in created {
            let module = adapter.module(&path).unwrap();
            params.a.set(&module.a).unwrap();
            params.b.set(&module.b).unwrap();
            if let (Some(m), Some(var)) = (&module.magnitude, &params.magnitude) {
                var.set(m).unwrap();
            }
        }
    }
    decoder
}

fn open(name: &str) -> PeftAdapter {
    PeftAdapter::open(&fixtures().join("peft").join(name)).unwrap()
}

/// The adapter `name` applied unmerged and merged gives PEFT's logits.
fn check_unmerged_and_merged(name: &str, ids: &[u32], unmerged_reference: &Tensor, merged_reference: &Tensor) {
    let adapter = open(name);
    let unmerged = logits(&load(&[], Some(&adapter), BaseFormat::Dense), ids);
    let d = max_abs_diff(&unmerged, unmerged_reference);
    assert!(d < 1e-4, "{name}: unmerged differs from PEFT by {d}");
    let merged = logits(&load(std::slice::from_ref(&adapter), None, BaseFormat::Dense), ids);
    let d = max_abs_diff(&merged, merged_reference);
    assert!(d < 1e-4, "{name}: merged differs from PEFT by {d}");
}

#[test]
fn peft_adapters_give_pefts_logits_unmerged_merged_and_chained() {
    let (reference, json) = peft_reference();
    let ids = input_ids(&json);
    let base = logits(&load(&[], None, BaseFormat::Dense), &ids);
    assert!(max_abs_diff(&base, &reference["base"]) < 1e-4);
    for name in ["lora_qv", "rslora_all", "dora"] {
        check_unmerged_and_merged(name, &ids, &reference[&format!("{name}.unmerged")], &reference[&format!("{name}.merged")]);
    }
    let chain = logits(&load(&[open("rslora_all")], Some(&open("lora_qv")), BaseFormat::Dense), &ids);
    let d = max_abs_diff(&chain, &reference["chain"]);
    assert!(d < 1e-4, "chain differs from PEFT by {d}");
}

#[test]
fn merged_weights_match_pefts_merge_and_unload() {
    let (reference, _) = peft_reference();
    let weights = candle_core::safetensors::load(model_dir().join("model.safetensors"), &Device::Cpu).unwrap();
    for (name, module) in [("dora", "model.layers.0.self_attn.q_proj"), ("rslora_all", "model.layers.1.mlp.down_proj")] {
        let adapter = open(name);
        let merged = adapter.module(module).unwrap().merge_into(&weights[&format!("{module}.weight")]).unwrap();
        let d = max_abs_diff(&merged, &reference[&format!("{name}.merged_weight.{module}")]);
        assert!(d < 1e-5, "{name} {module}: merged weight differs by {d}");
    }
}

#[test]
fn written_adapters_have_pefts_names_shapes_and_config() {
    let (_, json) = peft_reference();
    let adapter = open("dora");
    let dir = tempfile::tempdir().unwrap();
    let modules: Vec<_> = adapter
        .modules
        .iter()
        .map(|(path, m)| (path.clone(), m.a.clone(), m.b.clone(), m.magnitude.clone()))
        .collect();
    let spec = AdapterSpec {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        rslora: false,
        dora: true,
        target_modules: vec!["q_proj".into(), "o_proj".into(), "gate_proj".into(), "down_proj".into()],
        layers: None,
        base_model: "tests/fixtures/models/qwen2-tiny".into(),
        revision: None,
    };
    adapter::write(dir.path(), &spec, &modules).unwrap();
    let written = candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let expected = json["adapters"]["dora"]["tensors"].as_object().unwrap();
    assert_eq!(written.len(), expected.len());
    for (key, info) in expected {
        let t = written.get(key).unwrap_or_else(|| panic!("swift did not write `{key}`"));
        let shape: Vec<usize> = info["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        assert_eq!(t.dims(), shape.as_slice(), "{key}");
        assert_eq!(t.dtype(), DType::F32);
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap()).unwrap();
    for key in ["peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora",
        "use_dora", "fan_in_fan_out", "base_model_name_or_path", "revision", "inference_mode", "modules_to_save",
        "init_lora_weights", "rank_pattern", "alpha_pattern", "layers_to_transform", "peft_version"] {
        assert!(config.get(key).is_some(), "adapter_config.json lacks `{key}`");
    }
    // And it reads back to the same logits.
    let reread = PeftAdapter::open(dir.path()).unwrap();
    let (reference, json) = peft_reference();
    let ids = input_ids(&json);
    let merged = logits(&load(&[reread], None, BaseFormat::Dense), &ids);
    assert!(max_abs_diff(&merged, &reference["dora.merged"]) < 1e-4);
}

/// The summed cross-entropy of predicting each next token of one row.
fn row_loss(decoder: &Arc<Decoder>, ids: &[u32], checkpoint: Option<&Arc<CheckpointGrads>>) -> Tensor {
    let (positions, segments) = packed_layout(&[6, ids.len() - 6]);
    let batch = TrainBatch::new(&[(ids, &positions, &segments)]).unwrap();
    let hidden = decoder.train_hidden(&batch, checkpoint).unwrap();
    let logits = decoder.lm_head().forward(&hidden.narrow(0, 0, ids.len() - 1).unwrap()).unwrap();
    let targets = Tensor::new(&ids[1..], &Device::Cpu).unwrap().unsqueeze(1).unwrap();
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    log_probs.gather(&targets, 1).unwrap().sum_all().unwrap().neg().unwrap()
}

/// A model with fresh adapters on every linear layer; B (zero at init) is
/// randomised so every parameter has a gradient.
fn trainable(base: BaseFormat, dora: bool) -> (Arc<Decoder>, Vec<(String, Arc<LoraParams>)>) {
    let (decoder, adapters, _) = trainable_with_dropout(base, dora, 0.0);
    (decoder, adapters)
}

/// [`trainable`] with adapter dropout `p`, and the switch that turns it on.
fn trainable_with_dropout(base: BaseFormat, dora: bool, p: f32)
    -> (Arc<Decoder>, Vec<(String, Arc<LoraParams>)>, Arc<DropoutState>) {
    let config = ModelConfig::load(&model_dir()).unwrap();
    let select = |path: &str| path.starts_with("model.layers.");
    let loader = AdaptedLoader::new(&[], base)
        .with_new_adapters(&select, NewAdapter { rank: 4, scaling: 2.0, dora, dropout: p, seed: 3 });
    let decoder = Arc::new(Decoder::load(&model_dir(), config, DType::F32, &Device::Cpu, &loader).unwrap());
    let adapters = loader.take_adapters();
    let state = loader.dropout_state();
    for (i, (_, p)) in adapters.iter().enumerate() {
        let b = Tensor::randn(0f32, 0.05, p.b.shape(), &Device::Cpu).unwrap();
        p.b.set(&b).unwrap();
        if let Some(m) = &p.magnitude {
            let scaled = (m.as_tensor() * (1.0 + 0.01 * i as f64)).unwrap();
            m.set(&scaled).unwrap();
        }
    }
    (decoder, adapters, state)
}

fn check_gradients(base: BaseFormat, dora: bool) {
    let (decoder, adapters) = trainable(base, dora);
    let ids: Vec<u32> = vec![5, 17, 301, 42, 599, 3, 128, 77, 460, 250, 9, 611];
    let loss = row_loss(&decoder, &ids, None);
    let grads = loss.backward().unwrap();
    let h = 1e-2f32;
    let mut checked = 0;
    for (n, (path, p)) in adapters.iter().enumerate().filter(|(n, _)| n % 3 == 0) {
        for (name, var) in ["A", "B", "m"].iter().zip(p.vars()) {
            // DoRA detaches the weight norm (as PEFT and the paper do), so A and
            // B get a deliberately partial gradient; the magnitude's is exact.
            if dora && *name != "m" {
                continue;
            }
            let grad = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let values = var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // The largest gradient entry and one more, by finite differences.
            let largest = grad.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap().0;
            for i in [largest, (n * 7919) % values.len()] {
                let at = |delta: f32| {
                    let mut v = values.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
                    row_loss(&decoder, &ids, None).to_scalar::<f32>().unwrap()
                };
                let numeric = (at(h) - at(-h)) / (2.0 * h);
                var.set(&Tensor::from_vec(values.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
                let analytic = grad[i];
                let tolerance = 2e-3 + 0.02 * analytic.abs().max(numeric.abs());
                assert!((numeric - analytic).abs() < tolerance,
                    "{path} {name}[{i}]: autograd {analytic}, finite differences {numeric} ({base:?}, dora {dora})");
                checked += 1;
            }
        }
    }
    assert!(checked >= if dora { 4 } else { 8 });
}

#[test]
fn lora_gradients_match_finite_differences_on_a_dense_base() {
    check_gradients(BaseFormat::Dense, false);
}

#[test]
fn lora_gradients_match_finite_differences_on_an_nf4_base() {
    check_gradients(BaseFormat::Nf4 { blocksize: 64, double_quant: true }, false);
}

#[test]
fn dora_gradients_match_finite_differences_on_dense_and_nf4_bases() {
    check_gradients(BaseFormat::Dense, true);
    check_gradients(BaseFormat::Nf4 { blocksize: 64, double_quant: true }, true);
}

#[test]
fn activation_checkpointing_gives_the_same_gradients() {
    let (decoder, adapters) = trainable(BaseFormat::Nf4 { blocksize: 64, double_quant: true }, false);
    let ids: Vec<u32> = vec![5, 17, 301, 42, 599, 3, 128, 77, 460, 250];
    let plain = row_loss(&decoder, &ids, None).backward().unwrap();
    let vars: Vec<_> = adapters.iter().flat_map(|(_, p)| p.vars()).collect();
    let side = Arc::new(CheckpointGrads::new(&vars));
    let loss = row_loss(&decoder, &ids, Some(&side));
    let main = loss.backward().unwrap();
    let recomputed = side.take();
    for var in vars {
        let expected = plain.get(var.as_tensor()).unwrap();
        assert!(main.get(var.as_tensor()).is_none(), "checkpointed layers keep adapters out of the main graph");
        let got = &recomputed[&var.as_tensor().id()];
        assert!(max_abs_diff(expected, got) < 1e-6);
    }
}

#[test]
fn adapters_swift_trained_load_in_peft_with_swifts_logits() {
    // tests/fixtures/check_swift_adapters.py loaded these swift-written adapters
    // with PeftModel.from_pretrained and recorded its logits.
    let (_, json) = peft_reference();
    let ids = input_ids(&json);
    let dir = fixtures().join("peft");
    let reference = candle_core::safetensors::load(dir.join("swift_reference.safetensors"), &Device::Cpu).unwrap();
    for name in ["swift_lora", "swift_qdora"] {
        check_unmerged_and_merged(name, &ids, &reference[&format!("{name}.peft")], &reference[&format!("{name}.merged")]);
    }
    // The chain swift trained (LoRA on a model with the DoRA-on-NF4 adapter
    // merged), loaded by the documented recipe.
    let chain = logits(&load(&[open("swift_qdora")], Some(&open("swift_chain")), BaseFormat::Dense), &ids);
    let d = max_abs_diff(&chain, &reference["swift_chain.peft"]);
    assert!(d < 1e-4, "swift's chain differs from PEFT's recipe by {d}");
}

/// A packed row: its tokens and the lengths of the samples packed into it.
struct Row {
    ids: Vec<u32>,
    samples: Vec<usize>,
}

/// The summed next-token cross-entropy (within each packed sample) of `rows`
/// computed as one batch, with row `r`'s dropout seeded by `seeds[r]`.
fn batched_loss(decoder: &Arc<Decoder>, state: &DropoutState, rows: &[&Row], seeds: &[u64]) -> Tensor {
    let layouts: Vec<(Vec<u32>, Vec<u32>)> = rows.iter().map(|r| packed_layout(&r.samples)).collect();
    let packed: Vec<(&[u32], &[u32], &[u32])> =
        rows.iter().zip(&layouts).map(|(r, (p, s))| (r.ids.as_slice(), p.as_slice(), s.as_slice())).collect();
    let batch = TrainBatch::new(&packed).unwrap();
    state.train(rows.iter().zip(seeds).map(|(r, &seed)| RowDropout { seed, len: r.ids.len() }).collect());
    let hidden = decoder.train_hidden(&batch, None).unwrap();
    let (mut at, mut targets) = (Vec::new(), Vec::new());
    for (r, (row, (_, segments))) in rows.iter().zip(&layouts).enumerate() {
        for i in 0..row.ids.len() - 1 {
            if segments[i] == segments[i + 1] {
                at.push((r * batch.row_len() + i) as u32);
                targets.push(row.ids[i + 1]);
            }
        }
    }
    let scored = hidden.index_select(&Tensor::new(at.as_slice(), &Device::Cpu).unwrap(), 0).unwrap();
    let logits = decoder.lm_head().forward(&scored).unwrap();
    swift_stages::llm::ops::cross_entropy(&logits, &targets).unwrap().sum_all().unwrap()
}

/// One batched pass over ragged rows against the per-row loop: the same
/// summed loss and the same gradient for every adapter tensor.
fn check_batch_matches_rows(base: BaseFormat, dora: bool, dropout: f32) {
    let (decoder, adapters, state) = trainable_with_dropout(base, dora, dropout);
    let rows = [
        Row { ids: vec![5, 17, 301, 42, 599, 3, 128, 77, 460, 250, 9, 611], samples: vec![6, 6] },
        Row { ids: vec![44, 8, 90, 311, 12, 7, 502], samples: vec![7] },
        Row { ids: vec![1, 2, 3, 600, 18], samples: vec![2, 3] },
        Row { ids: vec![70, 71, 72, 73, 74, 75, 76, 77, 78], samples: vec![4, 5] },
    ];
    let seeds = [11u64, 22, 33, 44];
    let vars: Vec<candle_core::Var> = adapters.iter().flat_map(|(_, p)| p.vars().into_iter().cloned()).collect();
    // The summed loss and gradients of the rows taken `split` at a time.
    let run = |split: usize| -> (f32, Vec<Tensor>) {
        let mut total = 0f32;
        let mut sums: Vec<Option<Tensor>> = vec![None; vars.len()];
        for (chunk, chunk_seeds) in rows.chunks(split).zip(seeds.chunks(split)) {
            let chunk: Vec<&Row> = chunk.iter().collect();
            let loss = batched_loss(&decoder, &state, &chunk, chunk_seeds);
            total += loss.to_scalar::<f32>().unwrap();
            let grads = loss.backward().unwrap();
            for (sum, var) in sums.iter_mut().zip(&vars) {
                let g = grads.get(var.as_tensor()).unwrap().clone();
                *sum = Some(match sum.take() {
                    Some(s) => (s + g).unwrap(),
                    None => g,
                });
            }
        }
        (total, sums.into_iter().map(Option::unwrap).collect())
    };
    let (loop_loss, loop_grads) = run(1);
    // The whole batch at once, and in micro-batches of two rows.
    for split in [4, 2] {
        let (batch_loss, batch_grads) = run(split);
        assert!((batch_loss - loop_loss).abs() < 1e-5 * loop_loss.abs(), "loss {batch_loss} vs the loop's {loop_loss}");
        for ((a, b), var) in batch_grads.iter().zip(&loop_grads).zip(&vars) {
            let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-3);
            let diff = max_abs_diff(a, b);
            assert!(diff < 1e-4 * scale, "micro-batches of {split}: a gradient of shape {:?} differs by {diff} (scale {scale})", var.shape());
        }
    }
    state.eval();
}

#[test]
fn a_batched_pass_matches_the_per_row_loop_with_a_dense_base() {
    check_batch_matches_rows(BaseFormat::Dense, false, 0.0);
    check_batch_matches_rows(BaseFormat::Dense, false, 0.3);
}

#[test]
fn a_batched_pass_matches_the_per_row_loop_with_an_nf4_base() {
    check_batch_matches_rows(BaseFormat::Nf4 { blocksize: 64, double_quant: true }, false, 0.1);
}

#[test]
fn a_batched_pass_matches_the_per_row_loop_with_dora() {
    check_batch_matches_rows(BaseFormat::Dense, true, 0.0);
    check_batch_matches_rows(BaseFormat::Nf4 { blocksize: 64, double_quant: true }, true, 0.2);
}
