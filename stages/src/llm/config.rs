//! `config.json` of Qwen2, Llama and Mistral checkpoints, read into one
//! [`ModelConfig`] the decoder understands.

use std::path::Path;

use serde::Deserialize;

use super::LlmError;

/// The families one decoder implementation serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `model_type = "qwen2"`: q/k/v biases.
    Qwen2,
    /// `model_type = "llama"`: biases only with `attention_bias`.
    Llama,
    /// `model_type = "mistral"`: Llama's layout with a sliding window.
    Mistral,
}

/// RoPE frequency scaling (Llama 3.1's `rope_scaling = {rope_type = "llama3"}`).
#[derive(Clone, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    /// Overall factor (8 for Llama 3.1).
    pub factor: f64,
    /// Low-frequency factor.
    pub low_freq_factor: f64,
    /// High-frequency factor.
    pub high_freq_factor: f64,
    /// The context length the model was pretrained with.
    pub original_max_position_embeddings: f64,
}

/// What the decoder needs from `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Architecture family.
    pub family: Family,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// MLP inner size.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Per-head size (`head_dim`, else `hidden_size / num_heads`).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Llama-3 RoPE scaling, if any.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Longest position.
    pub max_position_embeddings: usize,
    /// Whether `lm_head` reuses the embedding.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections carry biases.
    pub qkv_bias: bool,
    /// Whether o_proj carries a bias (Llama's `attention_bias`).
    pub o_bias: bool,
    /// Attention window (tokens), when the model uses one on every layer.
    pub sliding_window: Option<usize>,
    /// `eos_token_id` from config.json (one or several).
    pub eos_token_ids: Vec<u32>,
    /// `bos_token_id` from config.json.
    pub bos_token_id: Option<u32>,
    /// The dtype the weights were saved in (`torch_dtype` or `dtype`).
    pub saved_dtype: Option<String>,
    /// How the checkpoint's projections are quantized, if they are.
    pub quantization: Option<AwqSettings>,
}

/// `quantization_config` of an AWQ checkpoint (AutoAWQ's GEMM layout, as
/// transformers and vLLM read it).
#[derive(Clone, Debug, PartialEq)]
pub struct AwqSettings {
    /// Input channels per scale and zero point.
    pub group_size: usize,
    /// Module path fragments left unquantized (vLLM matches them as substrings).
    pub modules_to_not_convert: Vec<String>,
}

impl AwqSettings {
    /// Whether the projection at `prefix` was left unquantized.
    pub fn skips(&self, prefix: &str) -> bool {
        self.modules_to_not_convert.iter().any(|m| prefix.contains(m.as_str()))
    }
}

/// `quantization_config` as written by AutoAWQ, transformers and swift.
#[derive(Debug, Deserialize)]
struct RawQuantization {
    quant_method: Option<String>,
    #[serde(alias = "w_bit")]
    bits: Option<u32>,
    #[serde(alias = "q_group_size")]
    group_size: Option<usize>,
    zero_point: Option<bool>,
    version: Option<String>,
    modules_to_not_convert: Option<Vec<String>>,
}

impl RawQuantization {
    fn settings(self) -> Result<AwqSettings, String> {
        let method = self.quant_method.unwrap_or_default();
        if !method.eq_ignore_ascii_case("awq") {
            return Err(format!("quantization_config.quant_method {method:?} is not supported; swift runs AWQ (GEMM) checkpoints"));
        }
        if self.bits.unwrap_or(4) != 4 {
            return Err(format!("quantization_config.bits = {} is not supported; AWQ checkpoints swift runs are 4-bit", self.bits.unwrap_or(4)));
        }
        if !self.zero_point.unwrap_or(true) {
            return Err("quantization_config.zero_point = false is not supported; swift runs AWQ with zero points".into());
        }
        let version = self.version.unwrap_or_else(|| "gemm".into());
        if !version.eq_ignore_ascii_case("gemm") {
            return Err(format!("quantization_config.version {version:?} is not supported; swift runs the \"gemm\" layout"));
        }
        let group_size = self.group_size.unwrap_or(128);
        if !group_size.is_power_of_two() || !(8..=1024).contains(&group_size) {
            return Err(format!("quantization_config.group_size = {group_size} is not a power of two from 8 to 1024"));
        }
        Ok(AwqSettings { group_size, modules_to_not_convert: self.modules_to_not_convert.unwrap_or_default() })
    }
}

/// One id or a list of ids, as configs write `eos_token_id`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// As a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_parameters: Option<serde_json::Value>,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_positions")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    hidden_act: Option<String>,
    use_sliding_window: Option<bool>,
    sliding_window: Option<usize>,
    max_window_layers: Option<usize>,
    eos_token_id: Option<TokenIds>,
    bos_token_id: Option<u32>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    quantization_config: Option<RawQuantization>,
}

fn default_eps() -> f64 {
    1e-6
}

fn default_max_positions() -> usize {
    4096
}

impl ModelConfig {
    /// Every tensor a checkpoint of this model holds, with its shape, as
    /// transformers saves a Qwen2, Llama or Mistral model: q/k/v (and o)
    /// biases where the family has them, `lm_head` unless it is tied.
    pub fn checkpoint_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (q, kv) = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim);
        let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![v, h]), ("model.norm.weight".to_string(), vec![h])];
        if !self.tie_word_embeddings {
            shapes.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        for n in 0..self.num_layers {
            let layer = [
                ("input_layernorm.weight", vec![h], true),
                ("post_attention_layernorm.weight", vec![h], true),
                ("self_attn.q_proj.weight", vec![q, h], true),
                ("self_attn.k_proj.weight", vec![kv, h], true),
                ("self_attn.v_proj.weight", vec![kv, h], true),
                ("self_attn.o_proj.weight", vec![h, q], true),
                ("self_attn.q_proj.bias", vec![q], self.qkv_bias),
                ("self_attn.k_proj.bias", vec![kv], self.qkv_bias),
                ("self_attn.v_proj.bias", vec![kv], self.qkv_bias),
                ("self_attn.o_proj.bias", vec![h], self.o_bias),
                ("mlp.gate_proj.weight", vec![i, h], true),
                ("mlp.up_proj.weight", vec![i, h], true),
                ("mlp.down_proj.weight", vec![h, i], true),
            ];
            shapes.extend(layer.into_iter().filter(|(_, _, present)| *present).map(|(name, shape, _)| (format!("model.layers.{n}.{name}"), shape)));
        }
        shapes
    }

    /// Reads `config.json` in a model folder.
    pub fn load(folder: &Path) -> Result<Self, LlmError> {
        let path = folder.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| LlmError::io(&path, e))?;
        Self::parse(&path, &text)
    }

    /// Parses config.json text (`path` is for messages).
    pub fn parse(path: &Path, text: &str) -> Result<Self, LlmError> {
        let bad = |message: String| LlmError::Config { path: path.to_path_buf(), message };
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let model_type = raw.model_type.clone().unwrap_or_default();
        let family = match model_type.as_str() {
            "qwen2" => Family::Qwen2,
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            other => {
                return Err(bad(format!(
                    "model_type {other:?} is not supported; swift runs qwen2, llama and mistral checkpoints"
                )))
            }
        };
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(bad(format!("hidden_act {act:?} is not supported (only silu)")));
            }
        }
        if [raw.num_attention_heads, raw.num_hidden_layers, raw.hidden_size, raw.intermediate_size, raw.vocab_size].contains(&0) {
            return Err(bad("sizes, head and layer counts must be positive".into()));
        }
        if raw.mlp_bias {
            return Err(bad("mlp_bias = true is not supported (MLP projections without biases only)".into()));
        }
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if num_kv_heads == 0 || !raw.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({num_kv_heads})",
                raw.num_attention_heads
            )));
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if raw.hidden_size.is_multiple_of(raw.num_attention_heads) => raw.hidden_size / raw.num_attention_heads,
            None => return Err(bad("hidden_size is not a multiple of num_attention_heads and head_dim is absent".into())),
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(bad(format!("head_dim {head_dim} must be even and positive for RoPE")));
        }
        if raw.num_attention_heads.checked_mul(head_dim).is_none() || raw.vocab_size.checked_mul(raw.hidden_size).is_none() {
            return Err(bad("sizes overflow".into()));
        }
        let nested = raw.rope_parameters.as_ref();
        let rope_theta = raw
            .rope_theta
            .or_else(|| nested.and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64()))
            .unwrap_or(10000.0);
        let scaling = raw.rope_scaling.as_ref().filter(|v| !v.is_null()).or(nested.filter(|p| p.get("rope_type").is_some()));
        let rope_scaling = match scaling {
            None => None,
            Some(spec) => {
                let kind = spec.get("rope_type").or_else(|| spec.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
                match kind {
                    "default" => None,
                    "llama3" => {
                        let num = |key: &str| {
                            spec.get(key).and_then(|v| v.as_f64()).ok_or_else(|| bad(format!("rope_scaling.{key} is missing")))
                        };
                        Some(Llama3RopeScaling {
                            factor: num("factor")?,
                            low_freq_factor: num("low_freq_factor")?,
                            high_freq_factor: num("high_freq_factor")?,
                            original_max_position_embeddings: num("original_max_position_embeddings")?,
                        })
                    }
                    other => {
                        return Err(bad(format!("rope_scaling type {other:?} is not supported (default and llama3 are)")))
                    }
                }
            }
        };
        // transformers' Qwen2 windows the layers from `max_window_layers` (default
        // 28) on, when `use_sliding_window` is set.
        let sliding_window = match family {
            Family::Qwen2 => {
                let first_windowed = raw.max_window_layers.unwrap_or(28);
                match (raw.use_sliding_window.unwrap_or(false), raw.sliding_window) {
                    (false, _) | (true, None) => None,
                    (true, Some(_)) if first_windowed >= raw.num_hidden_layers => None,
                    (true, Some(window)) if first_windowed == 0 => Some(window),
                    (true, Some(_)) => {
                        return Err(bad(format!(
                            "use_sliding_window on layers {first_windowed} and up only (max_window_layers) is not supported"
                        )))
                    }
                }
            }
            Family::Mistral => raw.sliding_window,
            Family::Llama => None,
        };
        if sliding_window == Some(0) {
            return Err(bad("sliding_window must be positive".into()));
        }
        Ok(Self {
            family,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings,
            qkv_bias: family == Family::Qwen2 || raw.attention_bias,
            o_bias: family != Family::Qwen2 && raw.attention_bias,
            sliding_window,
            eos_token_ids: raw.eos_token_id.map(|ids| ids.to_vec()).unwrap_or_default(),
            bos_token_id: raw.bos_token_id,
            saved_dtype: raw.torch_dtype.or(raw.dtype),
            quantization: raw.quantization_config.map(RawQuantization::settings).transpose().map_err(bad)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig, LlmError> {
        ModelConfig::parse(Path::new("config.json"), text)
    }

    const BASE: &str = r#""vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2"#;

    #[test]
    fn awq_quantization_configs_are_read_with_autoawq_aliases() {
        let with = |q: &str| parse(&format!(r#"{{"model_type": "qwen2", {BASE}, "quantization_config": {q}}}"#));
        let c = with(r#"{"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": true, "version": "gemm", "modules_to_not_convert": null}"#).unwrap();
        assert_eq!(c.quantization, Some(AwqSettings { group_size: 64, modules_to_not_convert: vec![] }));
        let c = with(r#"{"quant_method": "awq", "w_bit": 4, "q_group_size": 32, "modules_to_not_convert": ["down_proj"]}"#).unwrap();
        let settings = c.quantization.unwrap();
        assert_eq!(settings.group_size, 32);
        assert!(settings.skips("model.layers.3.mlp.down_proj") && !settings.skips("model.layers.3.mlp.up_proj"));
        for (q, message) in [
            (r#"{"quant_method": "gptq", "bits": 4}"#, "quant_method \"gptq\" is not supported"),
            (r#"{"quant_method": "awq", "bits": 8}"#, "bits = 8 is not supported"),
            (r#"{"quant_method": "awq", "zero_point": false}"#, "zero_point = false"),
            (r#"{"quant_method": "awq", "version": "gemv"}"#, "version \"gemv\" is not supported"),
            (r#"{"quant_method": "awq", "group_size": 96}"#, "group_size = 96"),
        ] {
            let e = with(q).unwrap_err().to_string();
            assert!(e.contains("config.json") && e.contains(message), "{e}");
        }
        assert_eq!(parse(&format!(r#"{{"model_type": "qwen2", {BASE}}}"#)).unwrap().quantization, None);
    }

    #[test]
    fn qwen2_has_qkv_bias_and_derives_head_dim() {
        let c = parse(&format!(r#"{{"model_type": "qwen2", {BASE}, "rope_theta": 1000000.0}}"#)).unwrap();
        assert_eq!((c.head_dim, c.qkv_bias, c.o_bias, c.rope_theta), (16, true, false, 1e6));
    }

    #[test]
    fn nested_rope_parameters_and_llama3_scaling_are_read() {
        let c = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "head_dim": 32, "rope_parameters": {{"rope_theta": 500000.0}},
            "rope_scaling": {{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}}}}"#
        ))
        .unwrap();
        assert_eq!((c.head_dim, c.rope_theta, c.qkv_bias), (32, 500000.0, false));
        assert_eq!(c.rope_scaling.unwrap().factor, 8.0);
    }

    #[test]
    fn unknown_types_and_partial_windows_are_rejected() {
        let e = parse(&format!(r#"{{"model_type": "gpt2", {BASE}}}"#)).unwrap_err();
        assert!(e.to_string().contains("\"gpt2\" is not supported"), "{e}");
        let e = parse(&format!(
            r#"{{"model_type": "qwen2", {BASE}, "use_sliding_window": true, "sliding_window": 8, "max_window_layers": 1}}"#
        ))
        .unwrap_err();
        assert!(e.to_string().contains("max_window_layers"), "{e}");
        let all = parse(&format!(r#"{{"model_type": "qwen2", {BASE}, "use_sliding_window": true, "sliding_window": 8, "max_window_layers": 0}}"#)).unwrap();
        assert_eq!(all.sliding_window, Some(8));
        let none = parse(&format!(r#"{{"model_type": "qwen2", {BASE}, "use_sliding_window": true, "sliding_window": 8}}"#)).unwrap();
        assert_eq!(none.sliding_window, None, "max_window_layers defaults to 28, beyond these 2 layers");
        let e = parse(&format!(r#"{{"model_type": "llama", {BASE}, "mlp_bias": true}}"#)).unwrap_err();
        assert!(e.to_string().contains("mlp_bias"), "{e}");
        let m = parse(&format!(r#"{{"model_type": "mistral", {BASE}, "sliding_window": 4096}}"#)).unwrap();
        assert_eq!(m.sliding_window, Some(4096));
    }
}
