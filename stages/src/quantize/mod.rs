//! `kind = "quantize"`: AWQ (or round-to-nearest) int4 quantization into an
//! AutoAWQ GEMM folder that transformers and vLLM load as `quant_method = "awq"`.
//!
//! - `method`: `awq` (activation-aware scale search, then clip search) or
//!   `rtn` (round-to-nearest, the baseline);
//! - `model`: a stage yielding a model, a local folder, or a finetune stage
//!   (its base with the chain merged, [`crate::model_source`]);
//! - `calibration`: a preprocess stage (its tokens) or a dataset (stage or
//!   file) whose `text_field` is tokenized; `samples` × `seq_len` tokens for
//!   the search, `held_out` more blocks for perplexity;
//! - outputs: `model` (the AWQ folder, runnable by swift's int4 kernels) and
//!   `report` (`quality.json`, `quality.md`: perplexities and per-layer errors).
//!
//! Layers are processed one at a time on the full-precision layer's outputs,
//! so activation memory stays at one layer's worth ([`search`]).

pub mod calibration;
pub mod output;
pub mod quality;
pub mod search;

use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use swift_engine::kind::{
    Cancelled, CompileCtx, OutputDecl, OutputType, OutputValue, Resource, RunCtx, StageKind, StagePlan, StageResult,
};
use swift_engine::ManifestError;

use self::calibration::{BlockCounts, Blocks};
use self::quality::Perplexities;
use self::search::{LayerReport, Options, LINEARS};
use crate::memory;
use crate::llm::adapted::{AdaptedLoader, BaseFormat};
use crate::llm::awq::AwqLoader;
use crate::llm::config::AwqSettings;
use crate::llm::{save, Compute, Decoder, ModelConfig, TextTokenizer};
use crate::model_source::ModelSource;

/// The quantize kind.
pub struct Quantize;

/// Quantization method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Method {
    Awq,
    Rtn,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Awq => "awq",
            Method::Rtn => "rtn",
        }
    }
}

fn default_method() -> Method {
    Method::Awq
}
fn default_samples() -> usize {
    128
}
fn default_seq_len() -> usize {
    512
}
fn default_held_out() -> usize {
    16
}
fn default_group_size() -> usize {
    128
}
fn yes() -> bool {
    true
}
fn default_shard_size() -> String {
    "5GB".into()
}
fn default_text_field() -> String {
    "text".into()
}

/// The manifest keys of a quantize stage.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_method")]
    method: Method,
    model: String,
    calibration: String,
    #[serde(default = "default_samples")]
    samples: usize,
    #[serde(default = "default_seq_len")]
    seq_len: usize,
    #[serde(default = "default_held_out")]
    held_out: usize,
    #[serde(default = "default_group_size")]
    group_size: usize,
    #[serde(default)]
    duo_scaling: bool,
    #[serde(default = "yes")]
    clip: bool,
    #[serde(default)]
    skip: Vec<String>,
    #[serde(default = "default_shard_size")]
    max_shard_size: String,
    #[serde(default = "default_text_field")]
    text_field: String,
    #[serde(default)]
    seed: Option<u64>,
}

/// What enters the key: every option with its default, and the seed.
#[derive(Debug, Serialize)]
struct Resolved {
    #[serde(flatten)]
    config: Config,
    seed: u64,
}

/// Where the calibration tokens come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Tokens,
    Dataset,
}

const OUTPUTS: &[OutputDecl] =
    &[OutputDecl { name: "model", ty: OutputType::Model }, OutputDecl { name: "report", ty: OutputType::Report }];

/// Calibration rows run through a layer together.
const CHUNK_ROWS: usize = 8;
/// Model types whose layers follow the Llama grouping (FORMATS.md §1).
const GROUPED_TYPES: [&str; 3] = ["qwen2", "llama", "mistral"];

impl StageKind for Quantize {
    fn name(&self) -> &'static str {
        "quantize"
    }
    fn version(&self) -> u32 {
        1
    }
    fn outputs(&self) -> &'static [OutputDecl] {
        OUTPUTS
    }
    /// Not portable: calibration activations (and so the scales searched) follow the CPU's or GPU's float kernels in their last bits.
    fn portable(&self) -> bool {
        false
    }
    fn uses_device(&self) -> bool {
        true
    }
    fn compile(&self, ctx: &mut CompileCtx<'_>, params: &toml::Table) -> Result<Box<dyn StagePlan>, ManifestError> {
        let config: Config = ctx.parse(params)?;
        let compute = crate::llm::check_device(ctx)?;
        check(ctx, &config)?;
        let max_shard_bytes = save::parse_size(&config.max_shard_size).map_err(|e| ctx.error(&["max_shard_size"], e))?;
        let model = ModelSource::declare(ctx, "model", &config.model)?;
        let source = if ctx.stage_kind(&config.calibration) == Some("preprocess") {
            ctx.stage_input("calibration", &["calibration"], &config.calibration, OutputType::Tokens);
            Source::Tokens
        } else if ctx.is_stage(&config.calibration) {
            ctx.stage_input("calibration", &["calibration"], &config.calibration, OutputType::Dataset);
            Source::Dataset
        } else {
            ctx.local_input("calibration", &["calibration"], &config.calibration)?;
            Source::Dataset
        };
        let seed = config.seed.unwrap_or(ctx.seed());
        Ok(Box::new(QuantizePlan { resolved: Resolved { config, seed }, model, source, max_shard_bytes, compute }))
    }
}

/// Checks what can be checked before the model is known.
fn check(ctx: &CompileCtx<'_>, c: &Config) -> Result<(), ManifestError> {
    if !swift_kernels::awq::GROUP_SIZES.contains(&c.group_size) {
        return Err(ctx.error(&["group_size"], format!("group_size must be 32, 64 or 128, not {}", c.group_size))
            .with_help("128 is AWQ's default; smaller groups are more accurate and larger on disk"));
    }
    if c.samples == 0 {
        return Err(ctx.error(&["samples"], "samples must be at least 1 (AWQ uses 128)"));
    }
    if c.seq_len < 2 {
        return Err(ctx.error(&["seq_len"], "seq_len must be at least 2 tokens (AWQ uses 512)"));
    }
    if c.held_out == 0 {
        return Err(ctx.error(&["held_out"], "held_out must be at least 1 block: the quality report measures perplexity on it"));
    }
    if let Some(empty) = c.skip.iter().position(|s| s.trim().is_empty()) {
        return Err(ctx.error(&["skip"], format!("skip[{empty}] is empty: name a module, e.g. \"model.layers.0.mlp.down_proj\"")));
    }
    Ok(())
}

/// Checks `samples` × `seq_len` against the model's context and against the
/// memory the layer-by-layer search holds, before anything is allocated:
/// every calibration block's input and output of the current layer, the
/// search's per-linear inputs, and one chunk's attention probabilities, in f32.
fn check_sizes(c: &Config, model: &ModelConfig, field: &dyn Fn(&str) -> String) -> anyhow::Result<()> {
    if c.seq_len > model.max_position_embeddings {
        bail!(
            "{}: seq_len = {} is longer than the model's context (max_position_embeddings = {}): set seq_len at most {} \
             (AWQ uses 512)",
            field("seq_len"),
            c.seq_len,
            model.max_position_embeddings,
            model.max_position_embeddings
        );
    }
    let Some(available) = memory::available_bytes() else { return Ok(()) };
    let tokens = c.samples as f64 * c.seq_len as f64;
    let activations = tokens * (4 * model.hidden_size + model.intermediate_size) as f64 * 4.0;
    let attention = (CHUNK_ROWS.min(c.samples) * model.num_heads) as f64 * (c.seq_len as f64).powi(2) * 4.0;
    let needed = activations + attention;
    if needed > available as f64 {
        bail!(
            "{}: {} samples × {} tokens need about {:.1} GiB of activations to calibrate on, and {:.1} GiB are free: \
             lower samples or seq_len (AWQ uses 128 × 512)",
            field("samples"),
            c.samples,
            c.seq_len,
            memory::gib(needed),
            memory::gib(available as f64)
        );
    }
    Ok(())
}

struct QuantizePlan {
    resolved: Resolved,
    model: ModelSource,
    source: Source,
    max_shard_bytes: u64,
    /// The device the calibration runs on. The search computes in f32 on
    /// every device (its choices are compared to the last bits), so the device
    /// is not in the key.
    compute: Compute,
}

impl StagePlan for QuantizePlan {
    fn params(&self) -> serde_json::Value {
        serde_json::to_value(&self.resolved).expect("config serializes")
    }

    fn outputs(&self) -> Vec<OutputDecl> {
        OUTPUTS.to_vec()
    }

    fn resource(&self) -> Resource {
        self.compute.resource()
    }

    fn run(&self, ctx: &RunCtx<'_>) -> anyhow::Result<StageResult> {
        memory::reset_peak();
        let started = Instant::now();
        let c = &self.resolved.config;
        let field = |key: &str| format!("stages.{}.{key}", ctx.stage);
        let opened = self.model.open(ctx)?;
        let config = model_config(&opened.folder).with_context(|| field("model"))?;
        let opts = Options {
            awq: c.method == Method::Awq,
            group: c.group_size,
            duo_scaling: c.duo_scaling,
            clip: c.clip,
            skip: c.skip.clone(),
        };
        check_skip(&config, &opts).map_err(|e| anyhow!("{}: {e}", field("skip")))?;
        check_shapes(&config, &opts).map_err(|e| anyhow!("{}: {e}", field("group_size")))?;
        check_sizes(c, &config, &field)?;
        let blocks = self.blocks(ctx, &opened.folder, &config).with_context(|| field("calibration"))?;

        let device = self.compute.open()?;
        let loader = AdaptedLoader::new(&opened.adapters, BaseFormat::Dense);
        let decoder = Decoder::load(&opened.folder, config.clone(), DType::F32, &device, &loader)?;
        loader.check_all_applied().with_context(|| field("model"))?;
        let (layer_tensors, baseline, layers) = self.quantize_layers(ctx, &decoder, &blocks.calibration, &opts)?;

        let quantization = output::quantization_config(c.group_size, &c.skip);
        let model_dir = ctx.out_dir.join("model");
        output::write_folder(&model_dir, &opened.folder, &config, layer_tensors, quantization.clone(), self.max_shard_bytes)?;

        ctx.progress(config.num_layers as u64, config.num_layers as u64, "perplexity");
        let full_precision = quality::perplexity(&decoder, &blocks.held_out)?;
        drop(decoder);
        let written = perplexity_of(&model_dir, &blocks.held_out, &device)?;
        let ppl = match baseline {
            Some(rtn_tensors) => {
                let rtn_dir = ctx.scratch_dir.join("rtn");
                output::write_folder(&rtn_dir, &opened.folder, &config, rtn_tensors, quantization, self.max_shard_bytes)?;
                let rtn = perplexity_of(&rtn_dir, &blocks.held_out, &device)?;
                std::fs::remove_dir_all(&rtn_dir).with_context(|| format!("removing {}", rtn_dir.display()))?;
                Perplexities { full_precision, rtn, awq: Some(written) }
            }
            None => Perplexities { full_precision, rtn: written, awq: None },
        };

        let report_dir = ctx.out_dir.join("report");
        std::fs::create_dir_all(&report_dir).with_context(|| format!("creating {}", report_dir.display()))?;
        let seconds = started.elapsed().as_secs_f64();
        let method = c.method.name();
        let report = serde_json::json!({
            "method": method,
            "group_size": c.group_size,
            "samples": c.samples,
            "seq_len": c.seq_len,
            "held_out": c.held_out,
            "perplexity": ppl,
            "layers": layers,
            "seconds": seconds,
            "peak_rss_bytes": memory::peak_rss_bytes(),
        });
        let json_path = report_dir.join("quality.json");
        std::fs::write(&json_path, serde_json::to_string_pretty(&report)? + "\n").with_context(|| format!("writing {}", json_path.display()))?;
        let md_path = report_dir.join("quality.md");
        let md = quality::markdown(ctx.stage, method, c.group_size, &ppl, &layers);
        std::fs::write(&md_path, md).with_context(|| format!("writing {}", md_path.display()))?;

        let mut result = StageResult::default();
        result.outputs.insert("model".into(), OutputValue::Path(model_dir));
        result.outputs.insert("report".into(), OutputValue::Path(report_dir));
        let mut put = |k: &str, v: serde_json::Value| {
            result.metrics.insert(k.to_string(), v);
        };
        put("method", method.into());
        put("ppl_full_precision", ppl.full_precision.into());
        put("ppl_rtn", ppl.rtn.into());
        if let Some(awq) = ppl.awq {
            put("ppl_awq", awq.into());
        }
        put("seconds", seconds.into());
        Ok(result)
    }
}

/// Tensors of the method, RTN tensors (for `awq`), and the layer reports.
type Quantized = (Vec<(String, Tensor)>, Option<Vec<(String, Tensor)>>, Vec<LayerReport>);

impl QuantizePlan {
    /// The calibration and held-out blocks.
    fn blocks(&self, ctx: &RunCtx<'_>, model: &std::path::Path, config: &ModelConfig) -> anyhow::Result<Blocks> {
        let c = &self.resolved.config;
        let input = &ctx.input("calibration")?.path;
        let stream = match self.source {
            Source::Tokens => {
                crate::preprocess::shards::check_tokenizer(input, model)?;
                calibration::stream_from_tokens(input, self.resolved.seed)?
            }
            Source::Dataset => {
                let tokenizer = TextTokenizer::load(model, config)?;
                calibration::stream_from_dataset(input, &c.text_field, &tokenizer, config.vocab_size, self.resolved.seed)?
            }
        };
        let counts = BlockCounts { samples: c.samples, held_out: c.held_out, seq_len: c.seq_len };
        calibration::cut(&stream, counts).map_err(|e| anyhow!(e))
    }

    /// Every layer in turn, each on the previous full-precision layer's outputs.
    fn quantize_layers(&self, ctx: &RunCtx<'_>, decoder: &Decoder, calibration: &[Vec<u32>], opts: &Options) -> anyhow::Result<Quantized> {
        let seq_len = self.resolved.config.seq_len;
        let positions: Vec<u32> = (0..seq_len as u32).collect();
        let row = decoder.row_context(&positions, &vec![0; seq_len])?;
        let mut inputs = calibration
            .chunks(CHUNK_ROWS)
            .map(|rows| {
                let embedded = rows.iter().map(|r| decoder.embed(r)).collect::<Result<Vec<_>, _>>()?;
                Ok(Tensor::cat(&embedded, 0)?)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let layers = decoder.config().num_layers;
        let (mut tensors, mut baseline, mut reports) = (Vec::new(), opts.awq.then(Vec::new), Vec::new());
        for n in 0..layers {
            if ctx.cancelled() {
                return Err(Cancelled.into());
            }
            ctx.progress(n as u64, layers as u64, &format!("layer {n}"));
            let result = search::quantize_layer(decoder, n, &inputs, &row, opts)?;
            tensors.extend(result.tensors);
            if let (Some(all), Some(layer)) = (baseline.as_mut(), result.baseline) {
                all.extend(layer);
            }
            reports.push(result.report);
            inputs = result.outputs;
        }
        Ok((tensors, baseline, reports))
    }
}

/// The model's config, refusing what AWQ cannot group or has already quantized.
fn model_config(folder: &std::path::Path) -> anyhow::Result<ModelConfig> {
    let path = folder.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let raw: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let model_type = raw.get("model_type").and_then(|t| t.as_str()).unwrap_or("");
    if !GROUPED_TYPES.contains(&model_type) {
        bail!("{}: model_type {model_type:?} has no known AWQ layer grouping; swift quantizes {} models",
            path.display(), GROUPED_TYPES.join(", "));
    }
    if let Some(method) = raw.get("quantization_config").map(|q| q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("unknown")) {
        bail!("{}: the model is already quantized ({method}); give the full-precision model", path.display());
    }
    Ok(ModelConfig::parse(&path, &text)?)
}

/// The projection paths of every layer, with their `[in, out]` sizes.
fn projections(config: &ModelConfig) -> Vec<(String, usize, usize)> {
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let (q, kv) = (config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim);
    let shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)];
    (0..config.num_layers)
        .flat_map(|n| LINEARS.iter().zip(shapes).map(move |(name, (k, out))| (format!("model.layers.{n}.{name}"), k, out)))
        .collect()
}

/// Every projection to quantize must have an input size divisible by the
/// group size and an output size divisible by 8; all offenders are named.
fn check_shapes(config: &ModelConfig, opts: &Options) -> Result<(), String> {
    let mut bad = Vec::new();
    let mut modules = std::collections::BTreeSet::new();
    for (path, k, out) in projections(config) {
        if opts.skips(&path) {
            continue;
        }
        let why = if !k.is_multiple_of(opts.group) {
            format!("input size {k} is not a multiple of the group size {}", opts.group)
        } else if !out.is_multiple_of(swift_kernels::awq::PACK) {
            format!("output size {out} is not a multiple of 8")
        } else {
            continue;
        };
        modules.insert(path.split('.').skip(3).collect::<Vec<_>>().join("."));
        bad.push(format!("`{path}` ({why})"));
    }
    if bad.is_empty() {
        return Ok(());
    }
    let skip: Vec<String> = modules.iter().map(|m| format!("\"{m}\"")).collect();
    Err(format!(
        "{} cannot be AWQ-quantized: {}; choose a group size that divides the input sizes, or leave them \
         unquantized with skip = [{}]",
        if bad.len() == 1 { "this layer" } else { "these layers" },
        bad.join(", "),
        skip.join(", ")
    ))
}

/// Every `skip` entry must match a projection, and vLLM's fused projections
/// (q/k/v as `qkv_proj`, gate/up as `gate_up_proj`) must be skipped whole.
fn check_skip(config: &ModelConfig, opts: &Options) -> Result<(), String> {
    let paths = projections(config);
    for (i, entry) in opts.skip.iter().enumerate() {
        if !paths.iter().any(|(p, _, _)| p.contains(entry.as_str())) {
            return Err(format!(
                "skip[{i}] = {entry:?} matches no projection; name one like \"model.layers.0.mlp.down_proj\" or a part of it (\"down_proj\")"
            ));
        }
    }
    for n in 0..config.num_layers {
        for fused in [&["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"][..], &["mlp.gate_proj", "mlp.up_proj"]] {
            let skipped: Vec<bool> = fused.iter().map(|m| opts.skips(&format!("model.layers.{n}.{m}"))).collect();
            if skipped.iter().any(|&s| s) && !skipped.iter().all(|&s| s) {
                let names: Vec<String> = fused.iter().map(|m| format!("model.layers.{n}.{m}")).collect();
                return Err(format!(
                    "{} are one fused projection in vLLM, which can load them only all quantized or all not: skip all of them or none",
                    names.join(", ")
                ));
            }
        }
    }
    Ok(())
}

/// Held-out perplexity of an AWQ folder, run through the int4 kernels.
fn perplexity_of(folder: &std::path::Path, blocks: &[Vec<u32>], device: &Device) -> anyhow::Result<f64> {
    let config = ModelConfig::load(folder)?;
    let settings: AwqSettings = config.quantization.clone().ok_or_else(|| anyhow!("{}: no quantization_config", folder.display()))?;
    let decoder = Decoder::load(folder, config, DType::F32, device, &AwqLoader::new(settings))?;
    quality::perplexity(&decoder, blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(intermediate: usize) -> ModelConfig {
        let text = format!(
            r#"{{"model_type": "qwen2", "vocab_size": 64, "hidden_size": 128, "intermediate_size": {intermediate},
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}}"#
        );
        ModelConfig::parse(std::path::Path::new("config.json"), &text).unwrap()
    }

    fn options(group: usize, skip: &[&str]) -> Options {
        Options { awq: true, group, duo_scaling: false, clip: true, skip: skip.iter().map(|s| s.to_string()).collect() }
    }

    #[test]
    fn a_layer_the_group_size_does_not_divide_is_named_with_the_fix() {
        assert!(check_shapes(&config(256), &options(128, &[])).is_ok());
        // down_proj's input is the intermediate size: 96 is not a multiple of 64.
        let e = check_shapes(&config(96), &options(64, &[])).unwrap_err();
        assert!(e.contains("`model.layers.0.mlp.down_proj` (input size 96") && e.contains("`model.layers.1.mlp.down_proj`"), "{e}");
        assert!(e.contains("skip = [\"mlp.down_proj\"]"), "{e}");
        assert!(check_shapes(&config(96), &options(32, &[])).is_ok());
        // Leaving every down_proj unquantized makes the same settings valid.
        assert!(check_shapes(&config(96), &options(64, &["down_proj"])).is_ok());
    }

    #[test]
    fn skip_entries_must_match_and_keep_fused_projections_whole() {
        let c = config(256);
        assert!(check_skip(&c, &options(128, &["model.layers.1.mlp.down_proj", "self_attn"])).is_ok());
        let e = check_skip(&c, &options(128, &["down_prj"])).unwrap_err();
        assert!(e.contains("skip[0] = \"down_prj\" matches no projection"), "{e}");
        let e = check_skip(&c, &options(128, &["model.layers.0.self_attn.q_proj"])).unwrap_err();
        assert!(e.contains("model.layers.0.self_attn.k_proj") && e.contains("skip all of them or none"), "{e}");
        assert!(check_skip(&c, &options(128, &["up_proj"])).unwrap_err().contains("mlp.gate_proj"));
    }
}
