//! `kind = "finetune"`: LoRA, DoRA and QLoRA training of a model on a
//! preprocess stage's tokens.
//!
//! - `method`: `lora` (frozen base in the compute dtype), `qlora` (frozen base
//!   as bitsandbytes NF4 with double quantization), `dora`, `qdora` (DoRA on an
//!   NF4 base).
//! - `model`: a stage yielding a model, a local model folder, or another
//!   finetune stage — then this stage trains on that stage's original base
//!   with every adapter of the chain merged into the original weights
//!   ([`crate::model_source`]).
//! - `data`: a preprocess stage (its `tokens`; the `val` split, if any, gives
//!   the validation loss).
//! - Outputs: `adapter` (a PEFT folder), `log` (JSONL, one line per step and
//!   per validation), `loss_curve` (SVG, no fonts needed), `metrics` (JSON,
//!   also in the run summary).
//! - Checkpoints go to the stage's scratch folder every `save_every` steps and
//!   on Ctrl-C; a rerun resumes from the latest one, bit-identical on CPU.

pub mod checkpoint;
pub mod collective;
pub mod curve;
pub mod data;
pub mod optim;
pub mod targets;
pub mod train;

use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use serde::{Deserialize, Serialize};
use swift_engine::kind::{
    Cancelled, CompileCtx, OutputDecl, OutputType, OutputValue, Resource, RunCtx, StageKind, StagePlan, StageResult,
};
use swift_engine::ManifestError;

use self::collective::{Parallel, JOIN_TIMEOUT};
use self::optim::{AdamWConfig, Schedule};
use self::targets::{Layers, Selection, Targets};
use self::train::{Hooks, Settings, Trainer};
use crate::llm::adapted::{AdaptedLoader, BaseFormat, NewAdapter};
use crate::llm::adapter::{self, AdapterSpec};
use crate::llm::{Decoder, ModelConfig};
use crate::memory;
use crate::model_source::ModelSource;
use crate::preprocess::shards::{self, Split};

/// The finetune kind.
pub struct Finetune;

/// What is trained, and on what base storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Method {
    Lora,
    Qlora,
    Dora,
    Qdora,
}

impl Method {
    fn nf4(self) -> bool {
        matches!(self, Method::Qlora | Method::Qdora)
    }
    fn dora(self) -> bool {
        matches!(self, Method::Dora | Method::Qdora)
    }
}

fn default_rank() -> usize {
    8
}
fn default_alpha() -> f64 {
    32.0
}
fn default_dropout() -> f64 {
    0.05
}
fn default_blocksize() -> usize {
    64
}
fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn default_lr() -> f64 {
    1e-4
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_max_grad_norm() -> f64 {
    1.0
}
fn default_save_every() -> usize {
    50
}

/// The `lora = { … }` table.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct LoraConfig {
    #[serde(default = "default_rank")]
    rank: usize,
    #[serde(default = "default_alpha")]
    alpha: f64,
    #[serde(default = "default_dropout")]
    dropout: f64,
    #[serde(default)]
    targets: Targets,
    #[serde(default)]
    layers: Layers,
    #[serde(default)]
    rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: default_rank(),
            alpha: default_alpha(),
            dropout: default_dropout(),
            targets: Targets::default(),
            layers: Layers::default(),
            rslora: false,
        }
    }
}

/// The `nf4 = { … }` table (qlora, qdora).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Nf4Config {
    #[serde(default = "default_blocksize")]
    blocksize: usize,
    #[serde(default = "yes")]
    double_quant: bool,
}

impl Default for Nf4Config {
    fn default() -> Self {
        Self { blocksize: default_blocksize(), double_quant: true }
    }
}

/// The manifest keys of a finetune stage.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Config {
    method: Method,
    model: String,
    data: String,
    #[serde(default)]
    lora: LoraConfig,
    #[serde(default)]
    nf4: Nf4Config,
    #[serde(default = "default_lr")]
    lr: f64,
    #[serde(default)]
    schedule: Schedule,
    #[serde(default)]
    warmup_steps: Option<usize>,
    #[serde(default)]
    warmup_ratio: Option<f64>,
    #[serde(default = "one")]
    epochs: usize,
    #[serde(default)]
    max_steps: Option<usize>,
    #[serde(default = "one")]
    batch_size: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    micro_batch_size: Option<usize>,
    #[serde(default = "one")]
    grad_accum: usize,
    #[serde(default)]
    weight_decay: f64,
    #[serde(default = "default_betas")]
    betas: [f64; 2],
    #[serde(default = "default_eps")]
    eps: f64,
    #[serde(default = "default_max_grad_norm")]
    max_grad_norm: f64,
    #[serde(default)]
    eval_every: usize,
    #[serde(default = "default_save_every")]
    save_every: usize,
    #[serde(default)]
    activation_checkpointing: bool,
    #[serde(default)]
    seed: Option<u64>,
}

/// What enters the key: every option with its default, the seed, and the
/// compute dtype the base runs in.
#[derive(Debug, Serialize)]
struct Resolved {
    #[serde(flatten)]
    config: Config,
    seed: u64,
    compute_dtype: String,
}

const OUTPUTS: &[OutputDecl] = &[
    OutputDecl { name: "adapter", ty: OutputType::Adapter },
    OutputDecl { name: "log", ty: OutputType::Report },
    OutputDecl { name: "loss_curve", ty: OutputType::Report },
    OutputDecl { name: "metrics", ty: OutputType::Report },
];

impl StageKind for Finetune {
    fn name(&self) -> &'static str {
        "finetune"
    }
    fn version(&self) -> u32 {
        // 2: a micro-batch is one batched forward/backward pass and AdamW one
        // fused pass (sums in another order, so outputs differ in their last bits).
        2
    }
    fn outputs(&self) -> &'static [OutputDecl] {
        OUTPUTS
    }
    /// Not portable: training sums gradients in vectorized, threaded kernels: the adapter's last bits follow the CPU or GPU.
    fn portable(&self) -> bool {
        false
    }
    fn uses_device(&self) -> bool {
        true
    }
    fn data_parallel(&self) -> bool {
        true
    }
    fn compile(&self, ctx: &mut CompileCtx<'_>, params: &toml::Table) -> Result<Box<dyn StagePlan>, ManifestError> {
        let config: Config = ctx.parse(params)?;
        let compute = crate::llm::check_device(ctx)?;
        check(ctx, &config)?;
        let source = ModelSource::declare(ctx, "model", &config.model)?;
        ctx.stage_input("data", &["data"], &config.data, OutputType::Tokens);
        let seed = config.seed.unwrap_or(ctx.seed());
        let compute_dtype = compute.dtype().as_str().to_string();
        Ok(Box::new(FinetunePlan { resolved: Resolved { config, seed, compute_dtype }, source, compute }))
    }
}

/// The most rows one optimizer step may take (`batch_size × grad_accum`).
const MAX_STEP_ROWS: usize = 1 << 24;

/// Checks what can be checked before the model is known.
fn check(ctx: &CompileCtx<'_>, c: &Config) -> Result<(), ManifestError> {
    let l = &c.lora;
    if l.rank == 0 {
        return Err(ctx.error(&["lora", "rank"], "rank must be at least 1").with_help("typical ranks are 8 to 64"));
    }
    if !(l.alpha.is_finite() && l.alpha > 0.0) {
        return Err(ctx.error(&["lora", "alpha"], "alpha must be positive"));
    }
    if !(0.0..1.0).contains(&l.dropout) {
        return Err(ctx.error(&["lora", "dropout"], "dropout must be at least 0 and below 1"));
    }
    l.targets.modules().map_err(|e| ctx.error(&["lora", "targets"], e))?;
    l.layers.check().map_err(|e| ctx.error(&["lora", "layers"], e))?;
    if !c.nf4.blocksize.is_power_of_two() || !(32..=4096).contains(&c.nf4.blocksize) {
        return Err(ctx.error(&["nf4", "blocksize"], "blocksize must be a power of two from 32 to 4096 (QLoRA uses 64)"));
    }
    if !(c.lr.is_finite() && c.lr > 0.0) {
        return Err(ctx.error(&["lr"], "lr must be positive"));
    }
    if c.warmup_steps.is_some() && c.warmup_ratio.is_some() {
        return Err(ctx.error(&["warmup_ratio"], "give `warmup_steps` or `warmup_ratio`, not both"));
    }
    if c.warmup_ratio.is_some_and(|r| !(0.0..1.0).contains(&r)) {
        return Err(ctx.error(&["warmup_ratio"], "warmup_ratio must be at least 0 and below 1"));
    }
    for (field, value) in [("epochs", c.epochs), ("batch_size", c.batch_size), ("grad_accum", c.grad_accum)] {
        if value == 0 {
            return Err(ctx.error(&[field], format!("{field} must be at least 1")));
        }
    }
    if c.batch_size.checked_mul(c.grad_accum).is_none_or(|rows| rows > MAX_STEP_ROWS) {
        let field = if c.batch_size > MAX_STEP_ROWS { "batch_size" } else { "grad_accum" };
        return Err(ctx.error(&[field], format!("batch_size × grad_accum must be at most {MAX_STEP_ROWS} rows per step"))
            .with_help("a step of that many rows could never be held in memory; typical global batches are 8 to 1024 rows"));
    }
    if let Some(micro) = c.micro_batch_size {
        if micro == 0 || micro > c.batch_size {
            return Err(ctx.error(&["micro_batch_size"], format!("micro_batch_size must be from 1 to batch_size ({})", c.batch_size))
                .with_help("it splits each batch into passes of that many rows, to save memory; leave it out to run the whole batch at once"));
        }
    }
    if c.max_steps == Some(0) {
        return Err(ctx.error(&["max_steps"], "max_steps must be at least 1 (or left out to train for `epochs`)"));
    }
    if c.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
        return Err(ctx.error(&["betas"], "betas must be in [0, 1), e.g. [0.9, 0.999]"));
    }
    for (field, value, positive) in
        [("weight_decay", c.weight_decay, false), ("max_grad_norm", c.max_grad_norm, false), ("eps", c.eps, true)]
    {
        if !value.is_finite() || value < 0.0 || (positive && value == 0.0) {
            let bound = if positive { "a positive number" } else { "a number ≥ 0" };
            return Err(ctx.error(&[field], format!("{field} must be {bound}")));
        }
    }
    Ok(())
}

/// Refuses sizes that cannot fit before the model is loaded or anything is
/// allocated for them: the rows one step holds (`batch_size × grad_accum`,
/// capped by the data stream in `epochs` mode) and the activations of one
/// pass (`micro_batch_size` rows of the longest row), against the memory
/// the machine has free.
fn check_sizes(c: &Config, model: &ModelConfig, train: &Split, field: &dyn Fn(&str) -> String) -> anyhow::Result<()> {
    let Some(available) = memory::available_bytes() else { return Ok(()) };
    let longest = (0..train.rows()).map(|r| train.row(r).len()).max().unwrap_or(0).max(1);
    let gib = memory::gib;
    let per_step = c.batch_size.saturating_mul(c.grad_accum);
    let stream = c.epochs.saturating_mul(train.rows());
    let step_rows = if c.max_steps.is_some() { per_step } else { per_step.min(stream) };
    // ids, positions, segments, targets and predicted positions: 20 bytes a token.
    let examples = (step_rows as f64) * (longest as f64) * 20.0;
    if examples > available as f64 / 2.0 {
        bail!(
            "{}: a step of batch_size × grad_accum = {} × {} rows of up to {longest} tokens needs {:.1} GiB just to hold \
             its rows, and {:.1} GiB are free: lower batch_size or grad_accum",
            field("batch_size"),
            c.batch_size,
            c.grad_accum,
            gib(examples),
            gib(available as f64)
        );
    }
    let micro = c.micro_batch_size.unwrap_or(c.batch_size).min(step_rows.max(1));
    let activations = micro as f64
        * longest as f64
        * memory::activation_bytes_per_token(model, longest, c.activation_checkpointing) as f64;
    if activations > available as f64 {
        let key = if c.micro_batch_size.is_some() { "micro_batch_size" } else { "batch_size" };
        bail!(
            "{}: a pass of {micro} rows × {longest} tokens needs about {:.1} GiB of activations, and {:.1} GiB are free: \
             set micro_batch_size lower (it splits each batch into passes, the same update){}",
            field(key),
            gib(activations),
            gib(available as f64),
            if c.activation_checkpointing { "" } else { ", or activation_checkpointing = true" }
        );
    }
    Ok(())
}

struct FinetunePlan {
    resolved: Resolved,
    source: ModelSource,
    /// The device; its dtype is in the key (`compute_dtype`), its index is not.
    compute: crate::llm::Compute,
}

impl StagePlan for FinetunePlan {
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
        let rows_per_step = c.batch_size.saturating_mul(c.grad_accum);
        if !rows_per_step.is_multiple_of(ctx.world.size) {
            bail!(
                "{}: the global batch (batch_size × grad_accum = {rows_per_step} rows) does not divide among the job's {} processes: \
                 pick a process count that divides it, or change batch_size/grad_accum (which changes the result)",
                field("resources"),
                ctx.world.size
            );
        }
        let opened = self.source.open(ctx)?;
        let model_config = ModelConfig::load(&opened.folder)?;
        if model_config.quantization.is_some() {
            bail!("{}: {} is an AWQ int4 model, which swift runs but does not train: fine-tune the full-precision model \
                (QLoRA quantizes it to NF4 itself) and quantize afterwards", field("model"), opened.folder.display());
        }
        let selection = Selection {
            modules: c.lora.targets.modules().map_err(|e| anyhow!("{}: {e}", field("lora.targets")))?,
            layers: c.lora.layers.resolve(model_config.num_layers).map_err(|e| anyhow!("{}: {e}", field("lora.layers")))?,
        };
        check_rank(&model_config, &selection, c.lora.rank).map_err(|e| anyhow!("{}: {e}", field("lora.rank")))?;

        let tokens_dir = &ctx.input("data")?.path;
        shards::check_tokenizer(tokens_dir, &opened.folder).with_context(|| field("data"))?;
        let train = Split::open(tokens_dir, "train").with_context(|| format!("{}: reading the train split", field("data")))?;
        let labels_per_row: Vec<usize> = (0..train.rows()).map(|r| train.row(r).labels.iter().filter(|&&l| l == 1).count()).collect();
        let label_tokens: usize = labels_per_row.iter().sum();
        // Rows with nothing to learn (every assistant turn cut off) are skipped, and counted.
        let rows_without_labels = labels_per_row.iter().filter(|&&n| n == 0).count();
        if train.rows() == 0 || label_tokens == 0 {
            let hint = if train.rows() > 0 { " (did the preprocess `max_length` cut every assistant turn off?)" } else { "" };
            bail!("{}: the dataset is empty: the train split has {} rows and {label_tokens} tokens to train on{hint}",
                field("data"), train.rows());
        }
        let val = Split::open(tokens_dir, "val").ok().filter(|v| v.rows() > 0);
        check_sizes(c, &model_config, &train, &field)?;

        let device = self.compute.open()?;
        let dtype = self.compute.dtype();
        let base = if c.method.nf4() {
            BaseFormat::Nf4 { blocksize: c.nf4.blocksize, double_quant: c.nf4.double_quant }
        } else {
            BaseFormat::Dense
        };
        let scaling = crate::llm::lora::scaling(c.lora.alpha, c.lora.rank, c.lora.rslora);
        let select = |path: &str| selection.selects(path);
        let loader = AdaptedLoader::new(&opened.adapters, base).with_new_adapters(&select, NewAdapter {
            rank: c.lora.rank,
            scaling,
            dora: c.method.dora(),
            dropout: c.lora.dropout as f32,
            seed: self.resolved.seed,
        });
        let decoder = Arc::new(Decoder::load(&opened.folder, model_config, dtype, &device, &loader)?);
        loader.check_all_applied().with_context(|| field("model"))?;
        if ctx.cancelled() {
            return Err(Cancelled.into());
        }
        let adapters = loader.take_adapters();
        let frozen_bytes = loader.frozen_bytes();
        // Loading maps the checkpoint; training's own peak is measured apart.
        let load_peak = memory::peak_rss_bytes();
        memory::reset_peak();

        let (total_steps, stream_rows) = match c.max_steps {
            Some(steps) => (steps, None),
            None => {
                let stream = c.epochs.saturating_mul(train.rows());
                (stream.div_ceil(rows_per_step), Some(stream))
            }
        };
        let warmup = match (c.warmup_steps, c.warmup_ratio) {
            (Some(steps), _) => steps,
            (None, Some(ratio)) => (ratio * total_steps as f64).ceil() as usize,
            (None, None) => 0,
        };
        let settings = Settings {
            lr: c.lr,
            schedule: c.schedule,
            warmup,
            total_steps,
            stream_rows,
            batch_size: c.batch_size,
            micro_batch_size: c.micro_batch_size.unwrap_or(c.batch_size),
            grad_accum: c.grad_accum,
            max_grad_norm: c.max_grad_norm,
            adamw: AdamWConfig { betas: (c.betas[0], c.betas[1]), eps: c.eps, weight_decay: c.weight_decay },
            eval_every: c.eval_every,
            save_every: c.save_every,
            seed: self.resolved.seed,
            activation_checkpointing: c.activation_checkpointing,
        };
        let mut parallel = Parallel::join(&ctx.world, JOIN_TIMEOUT, &|| ctx.cancelled())?;
        let trainer = Trainer::new(decoder, &adapters, loader.dropout_state(), settings);
        let progress = |done: u64, total: u64, message: &str| ctx.progress(done, total, message);
        let cancelled = || ctx.cancelled();
        let hooks = Hooks { progress: &progress, cancelled: &cancelled };
        let outcome = trainer.run(&train, val.as_ref(), &ctx.scratch_dir, &hooks, &mut parallel)?;

        let adapter_dir = ctx.out_dir.join("adapter");
        let spec = AdapterSpec {
            rank: c.lora.rank,
            alpha: c.lora.alpha,
            dropout: c.lora.dropout,
            rslora: c.lora.rslora,
            dora: c.method.dora(),
            target_modules: selection.modules.clone(),
            layers: selection.layers.clone(),
            base_model: self.source.base_name.clone(),
            revision: self.source.base_revision.clone(),
        };
        let tensors: Vec<_> = adapters
            .iter()
            .map(|(path, p)| {
                (path.clone(), p.a.as_tensor().clone(), p.b.as_tensor().clone(), p.magnitude.as_ref().map(|m| m.as_tensor().clone()))
            })
            .collect();
        adapter::write(&adapter_dir, &spec, &tensors)?;
        let log_path = ctx.out_dir.join("train_log.jsonl");
        let lines: String = outcome.log.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&log_path, lines).with_context(|| format!("writing {}", log_path.display()))?;
        let curve_path = ctx.out_dir.join("loss_curve.svg");
        std::fs::write(&curve_path, loss_curve(ctx.stage, &outcome.log))
            .with_context(|| format!("writing {}", curve_path.display()))?;

        let seconds = started.elapsed().as_secs_f64();
        let mut metrics = serde_json::Map::new();
        let mut put = |k: &str, v: serde_json::Value| {
            metrics.insert(k.to_string(), v);
        };
        put("method", serde_json::json!(c.method));
        put("steps", total_steps.into());
        put("final_train_loss", outcome.final_train_loss.into());
        if let Some((loss, accuracy)) = outcome.final_val {
            put("final_val_loss", loss.into());
            put("val_accuracy", accuracy.into());
        }
        put("tokens", outcome.tokens.into());
        put("rows_without_labels", rows_without_labels.into());
        put("seconds", seconds.into());
        put("trainable_parameters", trainer.trainable_parameters().into());
        put("adapted_modules", adapters.len().into());
        put("frozen_weight_bytes", frozen_bytes.into());
        if let Some(peak) = load_peak {
            put("load_peak_rss_bytes", peak.into());
        }
        if let Some(peak) = memory::peak_rss_bytes() {
            put("peak_rss_bytes", peak.into());
        }
        if let Some(step) = outcome.resumed_from {
            put("resumed_from_step", step.into());
        }
        let metrics_path = ctx.out_dir.join("metrics.json");
        std::fs::write(&metrics_path, serde_json::to_string_pretty(&metrics)? + "\n")?;

        let mut result = StageResult::default();
        result.outputs.insert("adapter".into(), OutputValue::Path(adapter_dir));
        result.outputs.insert("log".into(), OutputValue::Path(log_path));
        result.outputs.insert("loss_curve".into(), OutputValue::Path(curve_path));
        result.outputs.insert("metrics".into(), OutputValue::Path(metrics_path));
        result.metrics = metrics;
        Ok(result)
    }
}

/// The rank must fit every adapted projection: `r ≤ min(in, out)`.
fn check_rank(config: &ModelConfig, selection: &Selection, rank: usize) -> Result<(), String> {
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let (q, kv) = (config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim);
    for module in &selection.modules {
        let (inp, out) = match module.as_str() {
            "q_proj" => (h, q),
            "k_proj" | "v_proj" => (h, kv),
            "o_proj" => (q, h),
            "gate_proj" | "up_proj" => (h, i),
            _ => (i, h),
        };
        if rank > inp.min(out) {
            return Err(format!(
                "rank {rank} is larger than `{module}` ([{out}, {inp}]) allows: at most {}",
                inp.min(out)
            ));
        }
    }
    Ok(())
}

/// The loss curve: training loss per step and validation loss.
fn loss_curve(stage: &str, log: &[serde_json::Value]) -> String {
    let points = |key: &str| -> Vec<(f64, f64)> {
        log.iter().filter_map(|l| Some((l.get("step")?.as_f64()?, l.get(key)?.as_f64()?))).collect()
    };
    let (train, val) = (points("loss"), points("val_loss"));
    let series = [
        curve::Series { label: "train", points: &train, color: "#1f77b4" },
        curve::Series { label: "validation", points: &val, color: "#ff7f0e" },
    ];
    curve::render_svg(&format!("{stage}: loss"), "loss", &series, 800, 480)
}
