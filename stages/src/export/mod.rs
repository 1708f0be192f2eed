//! `kind = "export"`: writes what people deploy from a pipeline's model.
//!
//! - `merged/`: the base with every adapter of the chain merged into its own
//!   dtype, streamed tensor by tensor ([`merged`]);
//! - `peft/<stage>/`: each adapter of the chain as a PEFT folder;
//! - `awq/`: a quantize stage's AWQ int4 folder;
//! - `gguf/`: the merged model as GGUF files for llama.cpp and ollama ([`gguf`]);
//! - `README.md` (a model card) and `swift-lineage.json` at the top and in every
//!   format's folder ([`card`]).
//!
//! `to = "exports/NAME"` keeps a copy outside the cache up to date after every
//! run, cached or not ([`publish`]).

pub mod card;
pub mod gguf;
pub mod merged;
pub mod publish;

use std::path::PathBuf;

use anyhow::Context;
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use swift_cache::Artifact;
use swift_engine::kind::{CompileCtx, OutputDecl, OutputType, OutputValue, RunCtx, StageKind, StagePlan, StageResult};
use swift_engine::ManifestError;

use self::gguf::GgufType;
use crate::llm::save;
use crate::model_source::ModelSource;

/// The export kind.
pub struct Export;

const OUTPUTS: &[OutputDecl] = &[OutputDecl { name: "export", ty: OutputType::Export }];

/// What an export can write.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The merged model as an HF folder.
    Merged,
    /// Each adapter of the chain as a PEFT folder.
    Peft,
    /// A quantize stage's AWQ folder.
    Awq,
    /// The merged model as GGUF.
    Gguf,
}

impl Format {
    /// The folder it is written to.
    pub fn folder(self) -> &'static str {
        match self {
            Format::Merged => "merged",
            Format::Peft => "peft",
            Format::Awq => "awq",
            Format::Gguf => "gguf",
        }
    }
}

fn default_gguf_types() -> Vec<GgufType> {
    vec![GgufType::F16, GgufType::Q8_0]
}
fn default_max_shard_size() -> String {
    "5GB".into()
}

/// The manifest keys of an export stage.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Config {
    model: String,
    formats: Vec<Format>,
    #[serde(default)]
    awq: Option<String>,
    #[serde(default = "default_gguf_types")]
    gguf_types: Vec<GgufType>,
    #[serde(default)]
    eval: Option<String>,
    /// Where the copy outside the cache goes: not part of the key (it does not
    /// change what is exported).
    #[serde(default, skip_serializing)]
    to: Option<String>,
    #[serde(default = "default_max_shard_size")]
    max_shard_size: String,
    #[serde(default)]
    name: Option<String>,
}

/// What enters the key: the keys above (but `to`) with the card's title resolved.
#[derive(Debug, Serialize)]
struct Resolved {
    #[serde(flatten)]
    config: Config,
    title: String,
    pipeline: String,
}

impl StageKind for Export {
    fn name(&self) -> &'static str {
        "export"
    }
    fn version(&self) -> u32 {
        1
    }
    fn outputs(&self) -> &'static [OutputDecl] {
        OUTPUTS
    }
    /// Not portable: merging an adapter into the weights multiplies in float kernels whose last bits follow the CPU.
    fn portable(&self) -> bool {
        false
    }
    fn compile(&self, ctx: &mut CompileCtx<'_>, params: &toml::Table) -> Result<Box<dyn StagePlan>, ManifestError> {
        let mut config: Config = ctx.parse(params)?;
        check_formats(ctx, &mut config)?;
        let max_shard_bytes = save::parse_size(&config.max_shard_size).map_err(|e| ctx.error(&["max_shard_size"], e))?;
        let model = ModelSource::declare(ctx, "model", &config.model)?;
        if config.formats.contains(&Format::Peft) && model.chain.is_empty() {
            return Err(ctx
                .error(&["formats"], format!("`peft` exports the adapters of a fine-tune chain, but model `{}` is not a finetune stage", config.model))
                .with_help("name the last finetune stage as `model`, or drop \"peft\" from formats"));
        }
        match (&config.awq, config.formats.contains(&Format::Awq)) {
            (Some(stage), true) => {
                if ctx.stage_kind(stage) != Some("quantize") {
                    return Err(ctx.error(&["awq"], format!("awq must name a quantize stage, and `{stage}` is not one")));
                }
                ctx.stage_input("awq", &["awq"], stage, OutputType::Model);
            }
            (None, true) => {
                return Err(ctx.error(&["formats"], "the `awq` format needs `awq = \"STAGE\"`, the quantize stage whose folder to export"))
            }
            (Some(_), false) => return Err(ctx.error(&["awq"], "awq is set but formats has no \"awq\": add it, or remove this key")),
            (None, false) => {}
        }
        if let Some(stage) = &config.eval {
            if ctx.stage_kind(stage) != Some("eval") {
                return Err(ctx.error(&["eval"], format!("eval must name an eval stage, and `{stage}` is not one")));
            }
            ctx.stage_input("eval", &["eval"], stage, OutputType::Report);
        }
        let to = match &config.to {
            Some(to) => Some(publish::target(ctx, to)?),
            None => None,
        };
        let pipeline = ctx.pipeline_name().to_string();
        if let Some(name) = &config.name {
            if name.is_empty() || name.starts_with('.') || name.contains(['/', '\\']) {
                return Err(ctx.error(&["name"], format!("name = {name:?} must be a plain file name (it names the GGUF files): no `/`, no leading `.`")));
            }
        }
        let default_title = || format!("{pipeline}-{}", model.chain.last().unwrap_or(&config.model)).replace(['/', '\\'], "-");
        let title = config.name.clone().unwrap_or_else(default_title);
        let owner = format!("{pipeline}/{}", ctx.stage_name());
        Ok(Box::new(ExportPlan { resolved: Resolved { config, title, pipeline }, model, max_shard_bytes, to, owner }))
    }
}

/// Formats: at least one, each once, in a canonical order; GGUF types likewise.
fn check_formats(ctx: &CompileCtx<'_>, config: &mut Config) -> Result<(), ManifestError> {
    if config.formats.is_empty() {
        return Err(ctx.error(&["formats"], "formats is empty: list what to write, e.g. formats = [\"merged\", \"peft\", \"awq\", \"gguf\"]"));
    }
    if !sort_unique(&mut config.formats) {
        return Err(ctx.error(&["formats"], "a format is listed twice"));
    }
    if config.formats.contains(&Format::Gguf) && (config.gguf_types.is_empty() || !sort_unique(&mut config.gguf_types)) {
        return Err(ctx.error(&["gguf_types"], "gguf_types must list each type once, e.g. [\"f16\", \"q8_0\"]"));
    }
    Ok(())
}

/// Sorts `items`; false if one was listed twice.
fn sort_unique<T: Ord>(items: &mut Vec<T>) -> bool {
    let count = items.len();
    items.sort();
    items.dedup();
    items.len() == count
}

struct ExportPlan {
    resolved: Resolved,
    model: ModelSource,
    max_shard_bytes: u64,
    to: Option<PathBuf>,
    /// `pipeline/stage`, recorded in the `to` folder: another export's folder is not ours to replace.
    owner: String,
}

impl StagePlan for ExportPlan {
    fn params(&self) -> serde_json::Value {
        serde_json::to_value(&self.resolved).expect("config serializes")
    }

    fn outputs(&self) -> Vec<OutputDecl> {
        OUTPUTS.to_vec()
    }

    fn run(&self, ctx: &RunCtx<'_>) -> anyhow::Result<StageResult> {
        let c = &self.resolved.config;
        let out = ctx.out_dir.join("export");
        let opened = self.model.open(ctx)?;
        let mut written: Vec<card::Written> = Vec::new();
        let mut metrics = serde_json::Map::new();
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        for format in &c.formats {
            let folder = out.join(format.folder());
            if *format != Format::Awq {
                std::fs::create_dir(&folder).with_context(|| format!("creating {}", folder.display()))?;
            }
            match format {
                Format::Merged => {
                    ctx.progress(0, 1, "merging");
                    let merged = merged::write(&folder, &opened, self.max_shard_bytes)?;
                    metrics.insert("merged_modules".into(), merged.into());
                    written.push(card::Written::new(*format, folder));
                }
                Format::Peft => {
                    for (i, stage) in self.model.chain.iter().enumerate() {
                        let dest = folder.join(stage);
                        publish::copy_tree(&opened.adapters[i].folder, &dest)?;
                        written.push(card::Written::adapter(dest, stage, i));
                    }
                }
                Format::Awq => {
                    publish::copy_tree(&ctx.input("awq")?.path, &folder)?;
                    written.push(card::Written::new(*format, folder));
                }
                Format::Gguf => {
                    let files: Vec<String> = c.gguf_types.iter().map(|ty| format!("{}-{}.gguf", self.resolved.title, ty.name())).collect();
                    for (ty, file) in c.gguf_types.iter().zip(&files) {
                        ctx.progress(0, 1, &format!("writing GGUF {}", ty.name()));
                        gguf::write(&folder.join(file), &opened, *ty, &self.resolved.title)?;
                    }
                    written.push(card::Written::gguf(folder, files.last().cloned().unwrap_or_default()));
                }
            }
        }
        let eval = match &c.eval {
            Some(_) => Some(ctx.input("eval")?.path.clone()),
            None => None,
        };
        let lineage = card::Lineage::new(ctx, &self.resolved.title, &self.resolved.pipeline, &self.model, &c.formats, eval.as_deref())?;
        card::write_all(&out, &lineage, &written)?;
        metrics.insert("formats".into(), c.formats.iter().map(|f| f.folder()).collect::<Vec<_>>().join(",").into());
        let mut outputs = IndexMap::new();
        outputs.insert("export".to_string(), OutputValue::Path(out));
        Ok(StageResult { outputs, metrics })
    }

    fn publish(&self, outputs: &IndexMap<String, (Artifact, PathBuf)>) -> anyhow::Result<Option<String>> {
        let (Some(to), Some((artifact, path))) = (&self.to, outputs.get("export")) else { return Ok(None) };
        publish::publish(path, artifact, to, self.resolved.config.to.as_deref().unwrap_or_default(), &self.owner)
    }
}
