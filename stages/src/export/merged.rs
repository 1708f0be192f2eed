//! The `merged` export: the base checkpoint with every adapter of the chain
//! merged in, tensor by tensor, each in the checkpoint's own dtype (the merge
//! itself in f32 for that one tensor), written as transformers'
//! `save_pretrained` lays a model folder out. Memory holds one tensor at a
//! time, so a model larger than memory merges.

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};

use crate::llm::adapted::ChainMerge;
use crate::llm::save::{self, TensorPlan};
use crate::llm::weights::Weights;
use crate::llm::LlmError;
use crate::model_source::OpenedModel;
use crate::quantize::output::copy_companions;

/// A base checkpoint seen through its adapter chain, one tensor at a time.
pub struct MergedWeights<'a> {
    weights: Weights,
    chain: ChainMerge<'a>,
}

impl<'a> MergedWeights<'a> {
    /// Opens the base of `model` (memory-mapped) with its adapters.
    pub fn open(model: &'a OpenedModel) -> Result<Self, LlmError> {
        Ok(Self { weights: Weights::open(&model.folder, DType::F32, &Device::Cpu)?, chain: ChainMerge::new(&model.adapters) })
    }

    /// Every tensor of the checkpoint, as stored.
    pub fn plan(&self) -> Result<Vec<TensorPlan>, LlmError> {
        self.weights.plan()
    }

    /// One tensor with the chain merged into it, in its stored dtype.
    pub fn tensor(&self, plan: &TensorPlan) -> Result<Tensor, LlmError> {
        let tensor = self.weights.get_as(&plan.name, &plan.shape, plan.dtype)?;
        match plan.name.strip_suffix(".weight") {
            Some(module_path) if plan.shape.len() == 2 => self.chain.merge(module_path, tensor),
            _ => Ok(tensor),
        }
    }

    /// After every tensor was read: an error if an adapter holds a module the
    /// base has no weight for (it was trained on another model); else how
    /// many module merges there were.
    pub fn check_all_applied(&self) -> Result<usize, LlmError> {
        self.chain.check_all_applied()
    }
}

/// Writes the merged model folder; returns how many module merges it made.
pub fn write(folder: &Path, model: &OpenedModel, max_shard_bytes: u64) -> anyhow::Result<usize> {
    let merged = MergedWeights::open(model)?;
    let plan = merged.plan()?;
    save::write_streamed(folder, &plan, max_shard_bytes, |t| merged.tensor(t))?;
    let count = merged.check_all_applied()?;
    copy_companions(&model.folder, folder)?;
    let config = model.folder.join("config.json");
    std::fs::copy(&config, folder.join("config.json")).with_context(|| format!("copying {}", config.display()))?;
    if !folder.join("generation_config.json").exists() {
        write_generation_config(&config, folder)?;
    }
    Ok(count)
}

/// A `generation_config.json` from the model config's special tokens, as
/// transformers' `save_pretrained` derives one for a model folder without it.
fn write_generation_config(config: &Path, folder: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let config: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).with_context(|| format!("{}: not a JSON object", config.display()))?;
    let mut generation = serde_json::Map::new();
    for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        if let Some(value) = config.get(key).filter(|v| !v.is_null()) {
            generation.insert(key.into(), value.clone());
        }
    }
    let path = folder.join("generation_config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&generation)? + "\n").with_context(|| format!("writing {}", path.display()))
}
