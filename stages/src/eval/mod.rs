//! `kind = "eval"`: scores one or more models on MMLU and C-Eval by k-shot
//! log-likelihood and reports them side by side.
//!
//! - `models`: model stages, local folders, fine-tune stages (base + chain,
//!   [`crate::model_source`]) or AWQ folders (run by the int4 kernels);
//! - `suites = { mmlu = "…", ceval = "…" }`: the stage (or folder) holding each
//!   suite's files, in any layout [`data`] reads;
//! - `template` (`lm-eval` | `official`, [`prompt`]), `shots` (5), `chat`,
//!   `limit` (questions per subject), `subjects` (per suite);
//! - output `report`: `scores.json`, `predictions.jsonl`, `scores.md`,
//!   `scores.svg` ([`report`]).
//!
//! Each model × suite is scored as a part cached under its own key
//! ([`swift_engine::kind::RunCtx::cached_part`]): adding or editing one model
//! rescores that model only.

pub mod data;
pub mod prompt;
pub mod report;
pub mod score;
pub mod suites;

use std::collections::BTreeMap;

use anyhow::{anyhow, Context};
use serde::{Deserialize, Serialize};
use swift_engine::kind::{CompileCtx, OutputDecl, OutputType, OutputValue, Resource, RunCtx, StageKind, StagePlan, StageResult};
use swift_engine::ManifestError;

use self::data::LETTERS;
use self::prompt::{Template, TemplateName};
use self::report::{ModelScores, QuestionResult, SubjectResult};
use self::score::{Encoded, ScoreOptions};
use self::suites::Suite;
use crate::llm::{Compute, Decoder, ModelConfig, TextTokenizer};
use crate::model_source::{ModelSource, OpenedModel, WeightsAs};

/// The eval kind.
pub struct Eval;

/// Bumped when a part's results for the same inputs change.
const PART_VERSION: u32 = 1;

const OUTPUTS: &[OutputDecl] = &[OutputDecl { name: "report", ty: OutputType::Report }];

fn default_template() -> TemplateName {
    TemplateName::LmEval
}
fn default_shots() -> usize {
    5
}

/// The manifest keys of an eval stage.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Config {
    models: Vec<String>,
    suites: BTreeMap<String, String>,
    #[serde(default = "default_template")]
    template: TemplateName,
    #[serde(default = "default_shots")]
    shots: usize,
    #[serde(default)]
    chat: bool,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    subjects: BTreeMap<String, Vec<String>>,
}

/// What enters the stage key: the options, every template string, and the
/// subject tables (names in headers, categories in the report).
#[derive(Debug, Serialize)]
struct Resolved {
    #[serde(flatten)]
    config: Config,
    prompts: BTreeMap<&'static str, Template>,
    subject_tables: BTreeMap<&'static str, String>,
    /// The dtype models score in, when not the CPU's f32 (GPUs score in bf16).
    #[serde(skip_serializing_if = "is_f32")]
    compute_dtype: &'static str,
}

/// Whether a dtype is the CPU's f32 (left out of keys, so CPU keys are those
/// of builds before GPUs).
fn is_f32(dtype: &&'static str) -> bool {
    *dtype == "f32"
}

/// What enters one model × suite part's key besides its inputs.
#[derive(Debug, Serialize)]
struct PartParams<'a> {
    suite: &'static str,
    subject_table: &'a str,
    template: &'a Template,
    shots: usize,
    chat: bool,
    limit: Option<usize>,
    subjects: &'a [String],
    #[serde(skip_serializing_if = "is_f32")]
    compute_dtype: &'static str,
}

impl StageKind for Eval {
    fn name(&self) -> &'static str {
        "eval"
    }
    fn version(&self) -> u32 {
        1
    }
    fn outputs(&self) -> &'static [OutputDecl] {
        OUTPUTS
    }
    /// Not portable: log-likelihoods in the report follow the CPU's or GPU's float kernels in their last bits.
    fn portable(&self) -> bool {
        false
    }
    fn uses_device(&self) -> bool {
        true
    }
    fn compile(&self, ctx: &mut CompileCtx<'_>, params: &toml::Table) -> Result<Box<dyn StagePlan>, ManifestError> {
        let mut config: Config = ctx.parse(params)?;
        let compute = crate::llm::check_device(ctx)?;
        if config.models.is_empty() {
            return Err(ctx.error(&["models"], "models is empty: name at least one model stage or folder, e.g. models = [\"base\"]"));
        }
        let mut models = Vec::new();
        for (i, name) in config.models.iter().enumerate() {
            if config.models[..i].contains(name) {
                return Err(ctx.error(&["models"], format!("`{name}` is listed twice in models")));
            }
            models.push(ModelSource::declare_as(ctx, &format!("model.{i}"), "models", name)?);
        }
        if config.suites.is_empty() {
            return Err(ctx.error(&["suites"], "suites is empty: bind at least one, e.g. suites = { mmlu = \"mmlu_data\" }"));
        }
        let mut suites = Vec::new();
        for (name, source) in &config.suites {
            let suite = Suite::from_name(name)
                .ok_or_else(|| ctx.error(&["suites", name], format!("unknown suite `{name}`: swift scores `mmlu` and `ceval`")))?;
            let input = format!("suite.{name}");
            if ctx.is_stage(source) {
                ctx.stage_input(&input, &["suites", name], source, OutputType::Dataset);
            } else {
                ctx.local_input(&input, &["suites", name], source)?;
            }
            suites.push(suite);
        }
        for (name, handles) in &config.subjects {
            if !config.suites.contains_key(name) {
                return Err(ctx.error(&["subjects", name], format!("subjects names suite `{name}`, which `suites` does not bind")));
            }
            if handles.is_empty() {
                return Err(ctx.error(&["subjects", name], "an empty subject list scores nothing: list handles, or leave the suite out to score all"));
            }
            if let Some(twice) = handles.iter().enumerate().find(|(i, h)| handles[..*i].contains(h)).map(|(_, h)| h) {
                return Err(ctx.error(&["subjects", name], format!("`{twice}` is listed twice")));
            }
        }
        // The order subjects are listed in changes nothing scored: keep it out of the keys.
        for handles in config.subjects.values_mut() {
            handles.sort();
        }
        if config.limit == Some(0) {
            return Err(ctx.error(&["limit"], "limit = 0 scores nothing: leave it out to score every question"));
        }
        let prompts = suites.iter().map(|&s| (s.name(), Template::of(config.template, s))).collect();
        let subject_tables = suites.iter().map(|&s| (s.name(), s.table_digest())).collect();
        let names = config.models.clone();
        let resolved = Resolved { config, prompts, subject_tables, compute_dtype: compute.dtype().as_str() };
        Ok(Box::new(EvalPlan { resolved, models: names.into_iter().zip(models).collect(), suites, compute }))
    }
}

struct EvalPlan {
    resolved: Resolved,
    models: Vec<(String, ModelSource)>,
    suites: Vec<Suite>,
    compute: Compute,
}

impl StagePlan for EvalPlan {
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
        let c = &self.resolved.config;
        // The suites' files first: a bad row or subject shows before any model loads.
        let mut data = BTreeMap::new();
        for &suite in &self.suites {
            let input = ctx.input(&format!("suite.{}", suite.name()))?;
            let wanted = c.subjects.get(suite.name()).map(Vec::as_slice).unwrap_or_default();
            let subjects = data::load(&input.path, suite, wanted, c.limit)
                .with_context(|| format!("stages.{}.suites.{}", ctx.stage, suite.name()))?;
            data.insert(suite, (input.artifact.clone(), wanted, subjects));
        }
        let mut scores: Vec<ModelScores> = Vec::new();
        let total = (self.models.len() * self.suites.len()) as u64;
        for (m, (name, source)) in self.models.iter().enumerate() {
            let field = format!("stages.{}.models[{m}] (`{name}`)", ctx.stage);
            let mut loaded: Option<ScoringModel> = None;
            let mut by_suite = BTreeMap::new();
            for (s, &suite) in self.suites.iter().enumerate() {
                ctx.progress((m * self.suites.len() + s) as u64, total, &format!("{name} · {}", suite.label()));
                let template = &self.resolved.prompts[suite.name()];
                let (data_artifact, wanted, subjects) = &data[&suite];
                let params = PartParams {
                    suite: suite.name(),
                    subject_table: &self.resolved.subject_tables[suite.name()],
                    template,
                    shots: c.shots,
                    chat: c.chat,
                    limit: c.limit,
                    subjects: wanted,
                    compute_dtype: self.resolved.compute_dtype,
                };
                let mut inputs = source.artifacts(ctx)?;
                inputs.push(("data".to_string(), data_artifact.clone()));
                let part_dir = ctx.cached_part("eval/score", PART_VERSION, &serde_json::to_value(&params)?, &inputs, |dir| {
                    if loaded.is_none() {
                        loaded = Some(ScoringModel::load(&source.open(ctx)?, self.compute).with_context(|| field.clone())?);
                    }
                    let model = loaded.as_ref().expect("just loaded");
                    let prompts = PromptOptions { shots: c.shots, chat: c.chat };
                    let cancelled = || ctx.cancelled();
                    let results = model
                        .score_suite(suite, template, prompts, subjects, ScoreOptions::default(), &cancelled)
                        .with_context(|| field.clone())?;
                    report::write_part(dir, &results)
                })?;
                by_suite.insert(suite, report::read_part(&part_dir)?);
            }
            scores.push(ModelScores { model: name.clone(), suites: by_suite });
        }
        let dir = ctx.out_dir.join("report");
        let metrics = report::write(&dir, &self.params(), &scores)?;
        let mut result = StageResult::default();
        result.outputs.insert("report".into(), OutputValue::Path(dir));
        result.metrics = metrics;
        Ok(result)
    }
}

/// A model loaded for scoring.
pub struct ScoringModel {
    decoder: Decoder,
    tokenizer: TextTokenizer,
}

/// How questions become prompts (besides the template).
#[derive(Clone, Copy, Debug)]
pub struct PromptOptions {
    /// Dev rows used as shots (fewer where the subject has fewer, or where the
    /// prompt would not fit the model's context).
    pub shots: usize,
    /// Wrap each prompt in the model's chat template as lm-eval's
    /// `apply_chat_template` does ([`ScoringModel::prompt`]).
    pub chat: bool,
}

impl ScoringModel {
    /// Loads a model on `compute` (merging its adapter chain, or through the
    /// int4 kernels).
    pub fn load(opened: &OpenedModel, compute: Compute) -> anyhow::Result<ScoringModel> {
        let config = ModelConfig::load(&opened.folder)?;
        let tokenizer = TextTokenizer::load(&opened.folder, &config)?;
        let decoder = opened.load(compute.dtype(), &compute.open()?, WeightsAs::Compute)?;
        Ok(ScoringModel { decoder, tokenizer })
    }

    /// The text scored for `q` with the first `shots` dev rows: the template's
    /// prompt, or with `chat` what lm-eval's `apply_chat_template` scores — the
    /// header as the system message (dropped if the template rejects one), the
    /// shots and question as one user message, then the generation prompt.
    pub fn prompt(&self, suite: Suite, template: &Template, chat: bool, subject: &data::Subject, shots: usize, q: &data::Question)
        -> anyhow::Result<String> {
        if !chat {
            return Ok(template.context(suite, &subject.handle, &subject.dev, shots, q));
        }
        let chat = self.tokenizer.chat_template()?.ok_or_else(|| {
            anyhow!("chat = true, but the model has no chat template: set `chat = false`, or give the model a `chat_template`")
        })?;
        let user = serde_json::json!({"role": "user", "content": template.body(&subject.dev, shots, q)});
        let system = serde_json::json!({"role": "system", "content": template.header(suite, &subject.handle)});
        match chat.render(&[system, user.clone()], None::<&()>, true) {
            Ok(text) => Ok(text),
            Err(_) => Ok(chat.render(&[user], None::<&()>, true)?),
        }
    }

    /// Tokenizes every question of a subject with as many shots as fit the
    /// model's context; also returns the shots each question got and how many
    /// prompts were cut from the left.
    fn encode_subject(&self, suite: Suite, template: &Template, prompts: PromptOptions, subject: &data::Subject)
        -> anyhow::Result<(Vec<Encoded>, Vec<usize>, usize)> {
        let max_len = self.decoder.config().max_position_embeddings;
        let continuations = template.continuations(prompts.chat);
        let (mut encoded, mut shots, mut truncated) = (Vec::new(), Vec::new(), 0);
        for q in &subject.scored {
            let mut k = prompts.shots.min(subject.dev.len());
            let mut e = loop {
                let text = self.prompt(suite, template, prompts.chat, subject, k, q)?;
                let e = Encoded::new(&self.tokenizer, &text, &continuations, prompts.chat)
                    .with_context(|| format!("{} subject `{}` row {}", suite.label(), subject.handle, q.row))?;
                if e.fits(max_len) || k == 0 {
                    break e;
                }
                k -= 1;
            };
            if !e.fits(max_len) {
                e.truncate_left(max_len);
                truncated += 1;
            }
            shots.push(k);
            encoded.push(e);
        }
        Ok((encoded, shots, truncated))
    }

    /// Each scored question's prompt length in tokens.
    pub fn prompt_tokens(&self, suite: Suite, template: &Template, prompts: PromptOptions, subject: &data::Subject)
        -> anyhow::Result<Vec<usize>> {
        Ok(self.encode_subject(suite, template, prompts, subject)?.0.iter().map(|e| e.context.len()).collect())
    }

    /// Scores every subject of one suite. `cancelled` is polled between rows.
    pub fn score_suite(
        &self,
        suite: Suite,
        template: &Template,
        prompts: PromptOptions,
        subjects: &[data::Subject],
        options: ScoreOptions,
        cancelled: &dyn Fn() -> bool,
    ) -> anyhow::Result<Vec<SubjectResult>> {
        let mut out = Vec::new();
        for subject in subjects {
            let (encoded, shots, truncated) = self.encode_subject(suite, template, prompts, subject)?;
            let fewest = shots.iter().copied().min().unwrap_or(0);
            let lls = score::score(&self.decoder, &encoded, options, cancelled)?;
            let questions = subject
                .scored
                .iter()
                .zip(&lls)
                .map(|(q, ll)| QuestionResult {
                    index: q.row,
                    answer: LETTERS[q.answer].to_string(),
                    choice: LETTERS[argmax(ll)].to_string(),
                    loglikelihoods: ll.to_vec(),
                })
                .collect();
            let first_prompt = self.prompt(suite, template, prompts.chat, subject, shots[0], &subject.scored[0])?;
            let dev_rows = subject.dev.len();
            out.push(SubjectResult { handle: subject.handle.clone(), shots: fewest, dev_rows, truncated, first_prompt, questions });
        }
        Ok(out)
    }
}

/// The first index of the largest value (lm-eval's `np.argmax`).
fn argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}
