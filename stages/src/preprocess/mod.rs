//! `kind = "preprocess"`: datasets → chat-templated, label-masked, packed token
//! shards, cached on their own so a big dataset is tokenized once.
//!
//! - Inputs: `model` (a stage yielding a model: its tokenizer and chat
//!   template), `data` (stages yielding datasets, or local paths: JSONL, JSON,
//!   CSV files or folders of them), optional `val_data`.
//! - Outputs: `tokens` (a folder of shards, see [`shards`]) and `stats`
//!   (`stats.json`: samples, tokens, truncated, dropped, skipped rows by reason,
//!   padding, a length histogram).
//! - Key: every option below with its default, the pipeline seed, and the
//!   digests of the model folder and the datasets.

pub mod encode;
pub mod formats;
pub mod pack;
pub mod records;
pub mod shards;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use rand::seq::SliceRandom;
use rayon::prelude::*;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use swift_engine::kind::{CompileCtx, OutputDecl, OutputType, OutputValue, RunCtx, StageKind, StagePlan, StageResult};
use swift_engine::ManifestError;

use self::encode::{Encoder, Sample, TrainOn, CHATML};
use self::formats::Format;
use self::records::RowError;
use crate::llm::chat::{ChatTemplate, Message};
use crate::llm::{ModelConfig, TextTokenizer};

/// The preprocess kind.
pub struct Preprocess;

/// What to do when a sample is longer than `max_length`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Truncation {
    /// Keep the first `max_length` tokens (default).
    #[default]
    Truncate,
    /// Leave the sample out.
    Drop,
}

/// What to do with a row that cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// Fail the stage, naming the file, line and field (default).
    #[default]
    Fail,
    /// Skip the row, count it by reason, report the first few.
    Skip,
}

/// The row length when `max_length` is left out, unless the model's context
/// is shorter.
const DEFAULT_MAX_LENGTH: usize = 2048;

fn yes() -> bool {
    true
}

/// The manifest keys of a preprocess stage.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Config {
    model: String,
    data: Vec<String>,
    #[serde(default)]
    ratios: Option<Vec<f64>>,
    #[serde(default)]
    format: Format,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    fallback_template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_length: Option<usize>,
    #[serde(default)]
    truncation: Truncation,
    #[serde(default)]
    train_on: TrainOn,
    #[serde(default = "yes")]
    packing: bool,
    #[serde(default)]
    val_fraction: f64,
    #[serde(default)]
    val_data: Vec<String>,
    #[serde(default = "yes")]
    shuffle: bool,
    #[serde(default)]
    dedupe: bool,
    #[serde(default)]
    on_error: OnError,
}

/// What enters the key: every option with its default, and the seed.
#[derive(Debug, Serialize)]
struct Resolved {
    #[serde(flatten)]
    config: Config,
    seed: u64,
}

const OUTPUTS: &[OutputDecl] =
    &[OutputDecl { name: "tokens", ty: OutputType::Tokens }, OutputDecl { name: "stats", ty: OutputType::Report }];

impl StageKind for Preprocess {
    fn name(&self) -> &'static str {
        "preprocess"
    }
    fn version(&self) -> u32 {
        // 2: skipped rows in stats.json name the user's file, not the cache copy.
        // 3: max_length left out is the model's context when that is shorter than 2048.
        3
    }
    fn outputs(&self) -> &'static [OutputDecl] {
        OUTPUTS
    }
    fn compile(&self, ctx: &mut CompileCtx<'_>, params: &toml::Table) -> Result<Box<dyn StagePlan>, ManifestError> {
        let config: Config = ctx.parse(params)?;
        if config.data.is_empty() {
            return Err(ctx.error(&["data"], "`data` names no dataset").with_help("e.g. data = [\"law\"]"));
        }
        if let Some(ratios) = &config.ratios {
            if ratios.len() != config.data.len() {
                return Err(ctx.error(&["ratios"], format!("{} ratios for {} datasets", ratios.len(), config.data.len())));
            }
            if ratios.iter().any(|r| !r.is_finite() || *r <= 0.0) {
                return Err(ctx.error(&["ratios"], "ratios must be positive (1.0 keeps every row, 0.5 half, 2.0 each row twice)"));
            }
        }
        if !(0.0..1.0).contains(&config.val_fraction) {
            return Err(ctx.error(&["val_fraction"], "val_fraction must be at least 0 and below 1"));
        }
        if config.val_fraction > 0.0 && !config.val_data.is_empty() {
            return Err(ctx.error(&["val_fraction"], "give `val_fraction` or `val_data`, not both"));
        }
        if config.max_length.is_some_and(|n| n < 2) {
            return Err(ctx.error(&["max_length"], "max_length must be at least 2"));
        }
        if let Some(name) = &config.fallback_template {
            if name != "chatml" {
                return Err(ctx.error(&["fallback_template"], format!("unknown built-in template `{name}`")).with_help("the built-in template is \"chatml\""));
            }
        }
        ctx.stage_input("model", &["model"], &config.model, OutputType::Model);
        for (key, list) in [("data", &config.data), ("val_data", &config.val_data)] {
            for (i, data) in list.iter().enumerate() {
                let (input, index) = (format!("{key}.{i}"), i.to_string());
                // A stage's name, else a local file or folder.
                if ctx.is_stage(data) || !data.contains(['/', '.']) {
                    ctx.stage_input(&input, &[key, &index], data, OutputType::Dataset);
                } else {
                    ctx.local_input(&input, &[key, &index], data)?;
                }
            }
        }
        Ok(Box::new(PreprocessPlan { resolved: Resolved { config, seed: ctx.seed() } }))
    }
}

struct PreprocessPlan {
    resolved: Resolved,
}

/// A conversation with where it came from.
#[derive(Clone)]
struct Conversation {
    messages: Vec<Message>,
    origin: String,
}

/// Counts for stats.json.
#[derive(Default, Serialize)]
struct Stats {
    samples: usize,
    tokens: usize,
    label_tokens: usize,
    truncated: usize,
    dropped: usize,
    duplicates_removed: usize,
    skipped: BTreeMap<String, usize>,
    skipped_examples: Vec<String>,
    rows: usize,
    padding_pct: f64,
    length_histogram: BTreeMap<String, usize>,
}

impl Stats {
    fn skip(&mut self, error: &RowError) {
        *self.skipped.entry(error.reason.clone()).or_default() += 1;
        if self.skipped_examples.len() < 5 {
            self.skipped_examples.push(error.to_string());
        }
    }
}

impl PreprocessPlan {
    fn config(&self) -> &Config {
        &self.resolved.config
    }

    /// Reads and converts every row of the given inputs, applying ratios.
    fn conversations(&self, ctx: &RunCtx<'_>, prefix: &str, count: usize, stats: &mut Stats) -> anyhow::Result<Vec<Conversation>> {
        let config = self.config();
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.resolved.seed);
        let mut all = Vec::new();
        for i in 0..count {
            let input = ctx.input(&format!("{prefix}.{i}"))?;
            // Rows and messages name the user's file (`data/law.jsonl:41`), not the store's copy.
            let shown = |file: &Path| input.shown_path(file);
            let mut converted = Vec::new();
            let files = records::data_files(&input.path).with_context(|| format!("listing {}", shown(&input.path).display()))?;
            if files.is_empty() {
                bail!("{}: no .jsonl, .json or .csv file", shown(&input.path).display());
            }
            for file in files {
                let (mut rows, bad) = records::read_file(&file).map_err(|e| anyhow!("{e}"))?;
                for mut error in bad {
                    error.file = shown(&error.file);
                    self.row_error(&error, stats)?;
                }
                rows.iter_mut().for_each(|row| row.file = shown(&row.file));
                for row in rows {
                    match formats::conversation(&row, config.format, config.system.as_deref()) {
                        Ok(messages) => converted.push(Conversation { messages, origin: format!("{}:{}", row.file.display(), row.line) }),
                        Err(error) => self.row_error(&error, stats)?,
                    }
                }
            }
            let ratio = config.ratios.as_ref().map_or(1.0, |r| r[i]);
            all.extend(sample_by_ratio(converted, ratio, &mut rng));
        }
        Ok(all)
    }

    fn row_error(&self, error: &RowError, stats: &mut Stats) -> anyhow::Result<()> {
        match self.config().on_error {
            OnError::Fail => bail!("{error}\n  (set on_error = \"skip\" to skip such rows and count them)"),
            OnError::Skip => {
                stats.skip(error);
                Ok(())
            }
        }
    }

    fn encode_all(&self, encoder: &Encoder<'_>, conversations: Vec<Conversation>, max_length: usize, stats: &mut Stats) -> anyhow::Result<Vec<Sample>> {
        let config = self.config();
        // Rendering and tokenizing in parallel; errors and truncation are then
        // handled in order, so results do not depend on the thread count.
        // Tokenizing stops a little past max_length: one token more than fits
        // is enough to know a sample is too long.
        let encoded: Vec<Result<Sample, String>> =
            conversations.par_iter().map(|c| encoder.encode(&c.messages, max_length + 1)).collect();
        let mut samples = Vec::with_capacity(conversations.len());
        for (conversation, encoded) in conversations.into_iter().zip(encoded) {
            let mut sample = match encoded {
                Ok(sample) => sample,
                Err(message) => {
                    let (file, line) = conversation.origin.rsplit_once(':').unwrap_or((&conversation.origin, "0"));
                    let error = RowError {
                        file: file.into(),
                        line: line.parse().unwrap_or(0),
                        field: None,
                        reason: "chat template failed".into(),
                        detail: message,
                    };
                    self.row_error(&error, stats)?;
                    continue;
                }
            };
            if sample.ids.len() > max_length {
                match config.truncation {
                    Truncation::Drop => {
                        stats.dropped += 1;
                        continue;
                    }
                    Truncation::Truncate => {
                        stats.truncated += 1;
                        sample.ids.truncate(max_length);
                        sample.labels.truncate(max_length);
                    }
                }
            }
            samples.push(sample);
        }
        Ok(samples)
    }
}

/// The row length: `max_length` as set, which must fit the model's context
/// (`max_position_embeddings`: longer rows would train positions the model
/// never learned, on attention memory that grows with the square), or when
/// left out 2048 or the model's context, whichever is shorter.
fn row_capacity(max_length: Option<usize>, model: &ModelConfig) -> Result<usize, String> {
    let context = model.max_position_embeddings;
    match max_length {
        None => Ok(DEFAULT_MAX_LENGTH.min(context)),
        Some(n) if n <= context => Ok(n),
        Some(n) => Err(format!(
            "max_length = {n} is longer than the model's context (max_position_embeddings = {context}): \
             set max_length at most {context}, or leave it out to use {}",
            DEFAULT_MAX_LENGTH.min(context)
        )),
    }
}

/// Keeps `ratio` of the rows: whole copies for the integer part, a seeded
/// random subset for the fraction, in the original order.
fn sample_by_ratio<T>(rows: Vec<T>, ratio: f64, rng: &mut rand::rngs::StdRng) -> Vec<T>
where
    T: Clone,
{
    if ratio == 1.0 {
        return rows;
    }
    let copies = ratio.floor() as usize;
    let extra = ((ratio - ratio.floor()) * rows.len() as f64).round() as usize;
    let mut picked: Vec<usize> = (0..rows.len()).collect();
    picked.shuffle(rng);
    let mut extra_set: Vec<usize> = picked.into_iter().take(extra).collect();
    extra_set.sort();
    let mut out = Vec::with_capacity(copies * rows.len() + extra);
    for _ in 0..copies {
        out.extend(rows.iter().cloned());
    }
    out.extend(extra_set.into_iter().map(|i| rows[i].clone()));
    out
}

fn histogram(lengths: impl Iterator<Item = usize>, max_length: usize) -> BTreeMap<String, usize> {
    let bucket = max_length.div_ceil(8).max(1);
    let mut counts = BTreeMap::new();
    for len in lengths {
        let low = (len.saturating_sub(1) / bucket) * bucket;
        *counts.entry(format!("{:>6}-{}", low + 1, low + bucket)).or_insert(0) += 1;
    }
    counts
}

fn write_rows(dir: &Path, split: &str, samples: &[Sample], max_length: usize, packing: bool) -> anyhow::Result<shards::SplitCounts> {
    let rows: Vec<Vec<usize>> = if packing {
        pack::best_fit(&samples.iter().map(|s| s.ids.len()).collect::<Vec<_>>(), max_length)
    } else {
        (0..samples.len()).map(|i| vec![i]).collect()
    };
    let rows: Vec<Vec<(&[u32], &[u8])>> =
        rows.iter().map(|row| row.iter().map(|&i| (&samples[i].ids[..], &samples[i].labels[..])).collect()).collect();
    Ok(shards::write_split(dir, split, &rows)?)
}

impl StagePlan for PreprocessPlan {
    fn params(&self) -> serde_json::Value {
        serde_json::to_value(&self.resolved).expect("params serialize")
    }

    fn outputs(&self) -> Vec<OutputDecl> {
        OUTPUTS.to_vec()
    }

    fn run(&self, ctx: &RunCtx<'_>) -> anyhow::Result<StageResult> {
        let config = self.config();
        let model = &ctx.input("model")?.path;
        let model_config = ModelConfig::load(model)?;
        let max_length = row_capacity(config.max_length, &model_config).map_err(|e| anyhow!("stages.{}.max_length: {e}", ctx.stage))?;
        let tokenizer = TextTokenizer::load(model, &model_config)?;
        let fallback;
        let template = match (tokenizer.chat_template()?, config.fallback_template.as_deref()) {
            (Some(template), _) => template,
            (None, Some(_)) => {
                fallback = ChatTemplate::new(CHATML, tokenizer.bos_token().unwrap_or(""), tokenizer.eos_token().unwrap_or(""))?;
                &fallback
            }
            (None, None) => bail!(
                "the model at {} has no chat template (tokenizer_config.json or chat_template.jinja); \
                 set fallback_template = \"chatml\" to use ChatML",
                model.display()
            ),
        };
        let template_text = tokenizer.chat_template_source().unwrap_or(CHATML);
        let encoder = Encoder::new(&tokenizer, template, config.train_on);
        let mut stats = Stats::default();

        ctx.progress(0, 0, "reading datasets");
        let mut train = self.conversations(ctx, "data", config.data.len(), &mut stats)?;
        let mut val = self.conversations(ctx, "val_data", config.val_data.len(), &mut stats)?;
        if config.dedupe {
            let mut seen = HashSet::new();
            let before = train.len();
            train.retain(|c| seen.insert(serde_json::to_string(&c.messages).unwrap_or_default()));
            stats.duplicates_removed = before - train.len();
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.resolved.seed);
        if config.shuffle {
            train.shuffle(&mut rng);
        }
        if config.val_fraction > 0.0 {
            let take = ((train.len() as f64) * config.val_fraction).round() as usize;
            val = train.split_off(train.len() - take);
        }
        if train.is_empty() {
            bail!("no usable training sample (empty datasets, or every row skipped: {:?})", stats.skipped);
        }

        ctx.progress(0, train.len() as u64, "tokenizing");
        let train = self.encode_all(&encoder, train, max_length, &mut stats)?;
        let val = self.encode_all(&encoder, val, max_length, &mut stats)?;
        if train.is_empty() {
            bail!("every training sample was dropped as longer than max_length = {max_length}");
        }

        let tokens_dir = ctx.out_dir.join("tokens");
        std::fs::create_dir_all(&tokens_dir)?;
        let mut splits = BTreeMap::new();
        let train_counts = write_rows(&tokens_dir, "train", &train, max_length, config.packing)?;
        if !val.is_empty() {
            splits.insert("val".to_string(), write_rows(&tokens_dir, "val", &val, max_length, config.packing)?);
        }
        stats.samples = train_counts.samples;
        stats.tokens = train_counts.tokens;
        stats.label_tokens = train_counts.label_tokens;
        stats.rows = train_counts.rows;
        stats.padding_pct = if config.packing {
            100.0 * (1.0 - train_counts.tokens as f64 / (train_counts.rows * max_length) as f64)
        } else {
            0.0
        };
        stats.length_histogram = histogram(train.iter().map(|s| s.ids.len()), max_length);
        splits.insert("train".to_string(), train_counts);
        let tokenizer_bytes = std::fs::read(model.join("tokenizer.json"))?;
        let header = shards::Header {
            format: shards::FORMAT.to_string(),
            tokenizer_digest: blake3::hash(&tokenizer_bytes).to_hex().to_string(),
            template_digest: blake3::hash(template_text.as_bytes()).to_hex().to_string(),
            max_length,
            packing: config.packing,
            splits,
        };
        std::fs::write(tokens_dir.join(shards::HEADER_FILE), serde_json::to_vec_pretty(&header)?)?;
        let stats_path = ctx.out_dir.join("stats.json");
        std::fs::write(&stats_path, serde_json::to_vec_pretty(&stats)?)?;

        let mut result = StageResult::default();
        result.metrics.insert("samples".into(), stats.samples.into());
        result.metrics.insert("tokens".into(), stats.tokens.into());
        result.metrics.insert("truncated".into(), stats.truncated.into());
        result.metrics.insert("dropped".into(), stats.dropped.into());
        result.metrics.insert("skipped".into(), stats.skipped.values().sum::<usize>().into());
        result.metrics.insert("padding_pct".into(), ((stats.padding_pct * 100.0).round() / 100.0).into());
        result.outputs.insert("tokens".into(), OutputValue::Path(tokens_dir));
        result.outputs.insert("stats".into(), OutputValue::Path(stats_path));
        Ok(result)
    }
}
