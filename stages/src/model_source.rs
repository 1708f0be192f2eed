//! What a stage's `model = "…"` key names: a stage yielding a model, a local
//! model folder, or a fine-tune stage — which stands for its base model with
//! every adapter of its chain merged in, in order (ARCHITECTURE.md: "used as
//! model: its base + every adapter of the chain, merged in memory").
//!
//! While compiling, [`ModelSource::declare`] follows `model` keys through
//! fine-tune stages to the original base and declares it as input `model` and
//! each adapter as `adapter.0`, `adapter.1`, … (base-most first), so the key
//! covers the whole chain. While running, [`ModelSource::open`] gives the base
//! folder and the adapters to merge.

use std::path::PathBuf;

use swift_cache::Artifact;
use swift_engine::kind::{CompileCtx, OutputType, RunCtx};
use swift_engine::ManifestError;

use crate::llm::adapted::{AdaptedLoader, BaseFormat};
use crate::llm::adapter::PeftAdapter;
use crate::llm::stored::StoredLoader;
use crate::llm::{awq, Decoder, ModelConfig};

/// The kind whose stages stand for "base + adapter chain".
const FINETUNE: &str = "finetune";

/// A declared model reference.
#[derive(Clone, Debug)]
pub struct ModelSource {
    /// The fine-tune stages of the chain, base-most first.
    pub chain: Vec<String>,
    /// How users name the original base model (a Hub repo id or a path), for
    /// `base_model_name_or_path`.
    pub base_name: String,
    /// The Hub revision the manifest pins the base to (`hf://ORG/NAME@REV`),
    /// for the adapter's `revision`.
    pub base_revision: Option<String>,
    /// The name of the base's input; adapters are `{input}.adapter.{i}`, or
    /// `adapter.{i}` for the stage's single `model`.
    input: String,
}

/// A model reference resolved for a running stage.
pub struct OpenedModel {
    /// The original base model folder.
    pub folder: PathBuf,
    /// The adapters to merge into it, in order.
    pub adapters: Vec<PeftAdapter>,
}

/// How a model's plain (dense) weights are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightsAs {
    /// Converted to the compute dtype (what stages score and train with).
    Compute,
    /// A bf16/f16 checkpoint's weights kept 16-bit for f32 compute on the
    /// CPU ([`crate::llm::stored`]): half the bytes a decoding step reads.
    Stored,
}

impl OpenedModel {
    /// Loads the model in `dtype` on `device`: the base with its adapters
    /// merged in memory, or an AWQ int4 model through the int4 kernels; a
    /// base without adapters holds its weights as `weights` says.
    pub fn load(&self, dtype: candle_core::DType, device: &candle_core::Device, weights: WeightsAs) -> anyhow::Result<Decoder> {
        let config = ModelConfig::load(&self.folder)?;
        if config.quantization.is_some() {
            if !self.adapters.is_empty() {
                anyhow::bail!("an AWQ int4 model cannot carry adapters: use the fine-tune before quantizing, or quantize the fine-tune");
            }
            let loader = awq::loader_for(&config);
            return Ok(Decoder::load(&self.folder, config, dtype, device, loader.as_ref())?);
        }
        if self.adapters.is_empty() && weights == WeightsAs::Stored {
            return Ok(Decoder::load(&self.folder, config, dtype, device, &StoredLoader)?);
        }
        let loader = AdaptedLoader::new(&self.adapters, BaseFormat::Dense);
        let decoder = Decoder::load(&self.folder, config, dtype, device, &loader)?;
        loader.check_all_applied()?;
        Ok(decoder)
    }
}

impl ModelSource {
    /// Declares the inputs a `model` value at `field` needs, as inputs `model`
    /// and `adapter.{i}`.
    pub fn declare(ctx: &mut CompileCtx<'_>, field: &str, value: &str) -> Result<Self, ManifestError> {
        Self::declare_as(ctx, "model", field, value)
    }

    /// Like [`ModelSource::declare`] for one of several models of a stage: the
    /// base is input `input`, its adapters `{input}.adapter.{i}`.
    pub fn declare_as(ctx: &mut CompileCtx<'_>, input: &str, field: &str, value: &str) -> Result<Self, ManifestError> {
        let mut chain: Vec<String> = Vec::new();
        let mut current = value.to_string();
        while ctx.stage_kind(&current) == Some(FINETUNE) {
            if chain.contains(&current) {
                chain.push(current);
                return Err(ctx.error(&[field], format!("the fine-tune chain loops: {}", chain.join(" → "))));
            }
            let next = ctx.stage_params(&current).and_then(|p| p.get("model")).and_then(|m| m.as_str()).map(str::to_string);
            chain.push(current.clone());
            match next {
                Some(next) => current = next,
                // That stage's own compile names the missing key.
                None => return Err(ctx.error(&[field], format!("stage `{current}` has no `model`"))),
            }
        }
        chain.reverse();
        let (base_name, base_revision) = if ctx.is_stage(&current) || !current.contains(['/', '.']) {
            ctx.stage_input(input, &[field], &current, OutputType::Model);
            Self::download_name(ctx, &current).unwrap_or_else(|| (current.clone(), None))
        } else {
            ctx.local_input(input, &[field], &current)?;
            (current.clone(), None)
        };
        let source = Self { chain, base_name, base_revision, input: input.to_string() };
        for (i, stage) in source.chain.iter().enumerate() {
            ctx.stage_input(&source.adapter_input(i), &[field], stage, OutputType::Adapter);
        }
        Ok(source)
    }

    /// The artifacts of the base and its adapters, named `model` and
    /// `adapter.{i}` whatever inputs they were declared as: what a result
    /// computed from this model alone depends on.
    pub fn artifacts(&self, ctx: &RunCtx<'_>) -> anyhow::Result<Vec<(String, Artifact)>> {
        let mut artifacts = vec![("model".to_string(), ctx.input(&self.input)?.artifact.clone())];
        for i in 0..self.chain.len() {
            artifacts.push((format!("adapter.{i}"), ctx.input(&self.adapter_input(i))?.artifact.clone()));
        }
        Ok(artifacts)
    }

    fn adapter_input(&self, i: usize) -> String {
        if self.input == "model" {
            format!("adapter.{i}")
        } else {
            format!("{}.adapter.{i}", self.input)
        }
    }

    /// For a download stage, the name users know its model by — the Hub repo
    /// id, or the local folder as the manifest gives it — and the Hub revision
    /// it names, if any.
    fn download_name(ctx: &CompileCtx<'_>, stage: &str) -> Option<(String, Option<String>)> {
        let source = ctx.stage_params(stage)?.get("model")?.as_str()?;
        Some(match source.strip_prefix("hf://") {
            Some(repo) => {
                let (name, revision) = match repo.split_once('@') {
                    Some((name, revision)) => (name, Some(revision.trim_end_matches('/').to_string())),
                    None => (repo, None),
                };
                (name.trim_end_matches('/').to_string(), revision)
            }
            None => (source.to_string(), None),
        })
    }

    /// The base folder and the chain's adapters, read from the stage's inputs.
    pub fn open(&self, ctx: &RunCtx<'_>) -> anyhow::Result<OpenedModel> {
        let folder = ctx.input(&self.input)?.path.clone();
        let adapters = (0..self.chain.len())
            .map(|i| Ok(PeftAdapter::open(&ctx.input(&self.adapter_input(i))?.path)?))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(OpenedModel { folder, adapters })
    }
}
