//! PEFT adapter folders (`adapter_config.json` + `adapter_model.safetensors`,
//! `../shared/docs/FORMATS.md` §3): reading one, writing one as PEFT does, and
//! merging an adapter into a checkpoint weight.
//!
//! Keys are `base_model.model.<module path>.lora_A.weight`, `.lora_B.weight`
//! and, for DoRA, `.lora_magnitude_vector` (no `.weight` suffix).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::lora::row_norms;
use super::LlmError;

/// The file names of an adapter folder.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file of an adapter folder.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const KEY_PREFIX: &str = "base_model.model.";

/// The parts of `adapter_config.json` swift needs to apply an adapter.
#[derive(Clone, Debug, Deserialize)]
pub struct AdapterConfig {
    /// `LORA`.
    pub peft_type: String,
    /// The rank (default 8).
    #[serde(default = "default_rank")]
    pub r: usize,
    /// α (default 8).
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// `α/√r` scaling instead of `α/r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA.
    #[serde(default)]
    pub use_dora: bool,
    /// Per-module ranks (unsupported unless empty).
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, serde_json::Value>,
    /// Per-module α (unsupported unless empty).
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, serde_json::Value>,
    /// Whether weights are stored transposed (unsupported when true).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// `none` (the only value swift applies).
    #[serde(default = "default_bias")]
    pub bias: String,
    /// The base model the adapter was trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
}

fn default_rank() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_bias() -> String {
    "none".into()
}

impl AdapterConfig {
    /// The LoRA scaling `α/r`, or `α/√r` with rsLoRA.
    pub fn scaling(&self) -> f64 {
        super::lora::scaling(self.lora_alpha, self.r, self.use_rslora)
    }
}

/// One adapted module's tensors (f32).
#[derive(Clone, Debug)]
pub struct AdapterModule {
    /// `[r, in]`.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
    /// DoRA magnitude `[out]`.
    pub magnitude: Option<Tensor>,
    /// The scaling the adapter applies.
    pub scaling: f64,
}

impl AdapterModule {
    /// `s · B A`, `[out, in]`, f32.
    pub fn delta(&self) -> candle_core::Result<Tensor> {
        self.b.matmul(&self.a)? * self.scaling
    }

    /// The weight with this adapter merged, in the weight's own dtype: LoRA adds
    /// `s·BA`; DoRA rescales each row of `W + s·BA` to the magnitude. Computed
    /// in f32 for this one tensor only.
    pub fn merge_into(&self, weight: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = weight.dtype();
        let merged = (weight.to_dtype(DType::F32)? + self.delta()?.to_device(weight.device())?)?;
        let merged = match &self.magnitude {
            Some(m) => merged.broadcast_mul(&m.to_device(weight.device())?.div(&row_norms(&merged)?)?.unsqueeze(1)?)?,
            None => merged,
        };
        merged.to_dtype(dtype)
    }
}

/// A loaded adapter folder.
pub struct PeftAdapter {
    /// Its configuration.
    pub config: AdapterConfig,
    /// Adapted modules by module path (`model.layers.0.self_attn.q_proj`).
    pub modules: BTreeMap<String, AdapterModule>,
    /// The folder.
    pub folder: PathBuf,
}

impl PeftAdapter {
    /// Reads an adapter folder, checking that every module has both matrices
    /// of matching rank.
    pub fn open(folder: &Path) -> Result<Self, LlmError> {
        let config_path = folder.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path).map_err(|e| LlmError::io(&config_path, e))?;
        let config: AdapterConfig = serde_json::from_str(&text)
            .map_err(|e| LlmError::Weights { path: config_path.clone(), message: format!("not a PEFT adapter config: {e}") })?;
        let unsupported = |what: &str| LlmError::Weights {
            path: config_path.clone(),
            message: format!("{what} is not supported by swift (adapters swift and PEFT's defaults write are)"),
        };
        if config.peft_type != "LORA" {
            return Err(unsupported(&format!("peft_type `{}`", config.peft_type)));
        }
        if !config.rank_pattern.is_empty() || !config.alpha_pattern.is_empty() {
            return Err(unsupported("rank_pattern/alpha_pattern"));
        }
        if config.fan_in_fan_out {
            return Err(unsupported("fan_in_fan_out = true"));
        }
        if config.bias != "none" {
            return Err(unsupported(&format!("bias = \"{}\"", config.bias)));
        }
        let weights_path = folder.join(WEIGHTS_FILE);
        let tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu).map_err(|e| LlmError::Weights {
            path: weights_path.clone(),
            message: format!("not a valid safetensors file: {}", e.to_string().lines().next().unwrap_or("")),
        })?;
        let bad = |message: String| LlmError::Weights { path: weights_path.clone(), message };
        // Per module: lora_A, lora_B, magnitude, as they turn up.
        type Parts = [Option<Tensor>; 3];
        let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
        for (key, tensor) in tensors {
            let tensor = tensor.to_dtype(DType::F32)?;
            let Some(rest) = key.strip_prefix(KEY_PREFIX) else {
                return Err(bad(format!("tensor `{key}` does not start with `{KEY_PREFIX}`")));
            };
            let (module, slot) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
                (m, 0)
            } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
                (m, 1)
            } else if let Some(m) = rest.strip_suffix(".lora_magnitude_vector") {
                (m, 2)
            } else {
                return Err(bad(format!("tensor `{key}` is not a LoRA tensor (lora_A, lora_B, lora_magnitude_vector)")));
            };
            parts.entry(module.to_string()).or_default()[slot] = Some(tensor);
        }
        let scaling = config.scaling();
        let mut modules = BTreeMap::new();
        for (module, [a, b, magnitude]) in parts {
            let (Some(a), Some(b)) = (a, b) else {
                return Err(bad(format!("module `{module}` lacks lora_A or lora_B")));
            };
            let (r, _) = a.dims2()?;
            let (out, rb) = b.dims2()?;
            if r != rb || r != config.r {
                return Err(bad(format!("module `{module}`: lora_A has rank {r}, lora_B {rb}, config r = {}", config.r)));
            }
            if magnitude.as_ref().is_some_and(|m| m.dims() != [out]) {
                return Err(bad(format!("module `{module}`: magnitude vector is not [{out}]")));
            }
            if config.use_dora != magnitude.is_some() {
                return Err(bad(format!("module `{module}`: use_dora = {} but the magnitude vector is {}",
                    config.use_dora, if magnitude.is_some() { "present" } else { "missing" })));
            }
            modules.insert(module, AdapterModule { a, b, magnitude, scaling });
        }
        Ok(Self { config, modules, folder: folder.to_path_buf() })
    }

    /// The adapter of one module, if it has one.
    pub fn module(&self, path: &str) -> Option<&AdapterModule> {
        self.modules.get(path)
    }
}

/// What `adapter_config.json` records about a trained adapter.
#[derive(Clone, Debug)]
pub struct AdapterSpec {
    /// Rank.
    pub rank: usize,
    /// α.
    pub alpha: f64,
    /// Dropout.
    pub dropout: f64,
    /// rsLoRA scaling.
    pub rslora: bool,
    /// DoRA.
    pub dora: bool,
    /// Module names adapted (`q_proj`, …).
    pub target_modules: Vec<String>,
    /// Layer indices adapted, or `None` for all.
    pub layers: Option<Vec<usize>>,
    /// The original base model, as users name it.
    pub base_model: String,
    /// The base model's revision, if known.
    pub revision: Option<String>,
}

/// Writes an adapter folder as PEFT's `save_pretrained` does: the config, then
/// the tensors (f32) under PEFT's key names. `modules` maps module paths to
/// (A, B, magnitude).
pub fn write(folder: &Path, spec: &AdapterSpec, modules: &[(String, Tensor, Tensor, Option<Tensor>)])
    -> Result<(), LlmError> {
    std::fs::create_dir_all(folder).map_err(|e| LlmError::io(folder, e))?;
    let config = serde_json::json!({
        "alpha_pattern": {},
        "base_model_name_or_path": spec.base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": spec.layers.as_ref().map(|_| "layers"),
        "layers_to_transform": spec.layers,
        "lora_alpha": spec.alpha,
        "lora_bias": false,
        "lora_dropout": spec.dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "peft_version": "0.21.2",
        "r": spec.rank,
        "rank_pattern": {},
        "revision": spec.revision,
        "target_modules": spec.target_modules,
        "task_type": "CAUSAL_LM",
        "use_dora": spec.dora,
        "use_rslora": spec.rslora,
    });
    let config_path = folder.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(&config).expect("JSON values serialize");
    std::fs::write(&config_path, text + "\n").map_err(|e| LlmError::io(&config_path, e))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (module, a, b, magnitude) in modules {
        tensors.insert(format!("{KEY_PREFIX}{module}.lora_A.weight"), a.to_dtype(DType::F32)?);
        tensors.insert(format!("{KEY_PREFIX}{module}.lora_B.weight"), b.to_dtype(DType::F32)?);
        if let Some(m) = magnitude {
            tensors.insert(format!("{KEY_PREFIX}{module}.lora_magnitude_vector"), m.to_dtype(DType::F32)?);
        }
    }
    let weights_path = folder.join(WEIGHTS_FILE);
    candle_core::safetensors::save(&tensors, &weights_path)?;
    Ok(())
}
