//! `kind = "download"`: brings a model folder or a dataset (file or folder) into
//! the cache.
//!
//! - Inputs: `model = "PATH"` (a folder) or `dataset = "PATH"` (a file or folder),
//!   relative to the project root. (`hf://` sources arrive with the Hub client.)
//! - Outputs: `model` or `dataset`: the ingested copy, read-only in the cache.
//! - Key: the path as written and the source's content digest (through the stat
//!   cache, so an unchanged multi-GB folder is not rehashed).

use serde::{Deserialize, Serialize};
use swift_engine::kind::{CompileCtx, OutputDecl, OutputType, OutputValue, RunCtx, StageKind, StagePlan, StageResult};
use swift_engine::ManifestError;

/// The download kind.
pub struct Download;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// A model folder.
    model: Option<String>,
    /// A dataset file or folder.
    dataset: Option<String>,
}

/// What enters the key besides the source's digest.
#[derive(Debug, Serialize)]
struct Resolved {
    what: &'static str,
    path: String,
}

const OUTPUTS: &[OutputDecl] =
    &[OutputDecl { name: "model", ty: OutputType::Model }, OutputDecl { name: "dataset", ty: OutputType::Dataset }];

impl StageKind for Download {
    fn name(&self) -> &'static str {
        "download"
    }
    fn version(&self) -> u32 {
        1
    }
    fn outputs(&self) -> &'static [OutputDecl] {
        OUTPUTS
    }
    fn compile(&self, ctx: &mut CompileCtx<'_>, params: &toml::Table) -> Result<Box<dyn StagePlan>, ManifestError> {
        let config: Config = ctx.parse(params)?;
        let (what, source) = match (config.model, config.dataset) {
            (Some(model), None) => ("model", model),
            (None, Some(dataset)) => ("dataset", dataset),
            (Some(_), Some(_)) => {
                return Err(ctx.error(&["dataset"], "a download stage takes `model` or `dataset`, not both")
                    .with_help("split it into two download stages"))
            }
            (None, None) => {
                return Err(ctx.error(&[], "a download stage needs `model = \"…\"` or `dataset = \"…\"`")
                    .with_help("e.g. dataset = \"data/law_qa.jsonl\""))
            }
        };
        if source.starts_with("hf://") {
            return Err(ctx
                .error(&[what], format!("`{source}`: Hugging Face Hub sources are not supported by this build of swift yet"))
                .with_help("download the files yourself and point at the local folder"));
        }
        let path = ctx.local_input("source", &[what], &source)?;
        if what == "model" && !path.is_dir() {
            return Err(ctx.error(&[what], format!("`{source}` is a file; a model is a folder holding config.json and weights")));
        }
        Ok(Box::new(DownloadPlan { resolved: Resolved { what, path: source } }))
    }
}

struct DownloadPlan {
    resolved: Resolved,
}

impl StagePlan for DownloadPlan {
    fn params(&self) -> serde_json::Value {
        serde_json::to_value(&self.resolved).expect("params serialize")
    }

    fn outputs(&self) -> Vec<OutputDecl> {
        OUTPUTS.iter().filter(|o| o.name == self.resolved.what).copied().collect()
    }

    fn run(&self, ctx: &RunCtx<'_>) -> anyhow::Result<StageResult> {
        let source = ctx.input("source")?;
        let hashed = source.hashed.as_ref().ok_or_else(|| anyhow::anyhow!("internal error: local input not hashed"))?;
        let name = source.path.file_name().and_then(|n| n.to_str()).unwrap_or("data");
        ctx.progress(0, source.artifact.size(), "ingesting");
        let artifact = ctx
            .store
            .ingest_local(&source.path, hashed, name)
            .map_err(|e| anyhow::anyhow!("ingesting {}: {e}", source.path.display()))?;
        ctx.progress(source.artifact.size(), source.artifact.size(), "ingested");
        let mut result = StageResult::default();
        result.metrics.insert("bytes".to_string(), artifact.size().into());
        result.outputs.insert(self.resolved.what.to_string(), OutputValue::Stored(artifact));
        Ok(result)
    }
}
