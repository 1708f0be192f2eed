//! `kind = "download"`: brings a model folder or a dataset (file or folder) into
//! the cache, from a local path or from the Hugging Face Hub.
//!
//! - Inputs: `model = "PATH"` (a folder) or `dataset = "PATH"` (a file or
//!   folder), relative to the project root; or `model = "hf://ORG/NAME[@REV]"`,
//!   `dataset = "hf://datasets/ORG/NAME[@REV][/PATH]"` (see [`crate::hub`]), with
//!   `files = [globs]` choosing which repository files to fetch.
//! - Outputs: `model` or `dataset`: the ingested copy, read-only in the cache.
//! - Key: the source as written, the file globs, and either the local source's
//!   content digest (through the stat cache) or the Hub commit sha the revision
//!   resolved to (an unchanged upstream costs one metadata request).

use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use swift_cache::tree::{TreeEntry, TreeListing};
use swift_cache::{hash_path, StatCache};
use swift_engine::kind::{
    CompileCtx, OutputDecl, OutputType, OutputValue, ResolveCtx, RunCtx, StageKind, StagePlan, StageResult,
};
use swift_engine::ManifestError;

use crate::hub::{HubFetcher, HubSettings, HubSource, RepoKind};

/// The download kind.
pub struct Download;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// A model folder or `hf://ORG/NAME[@REV]`.
    model: Option<String>,
    /// A dataset file or folder, or `hf://datasets/ORG/NAME[@REV][/PATH]`.
    dataset: Option<String>,
    /// Globs of the repository files to fetch (Hub sources only).
    files: Option<Vec<String>>,
}

/// Files a model needs, at the repository root: the safetensors weights
/// (`model*.safetensors`, so Mistral's `consolidated.safetensors` duplicate is
/// left out), configs, tokenizer files and chat templates.
const MODEL_FILES: &[&str] = &["model*.safetensors", "*.json", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "*.txt"];

/// What enters the key besides the source's digest or commit.
#[derive(Debug, Serialize)]
struct Resolved {
    what: &'static str,
    path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    files: Option<Vec<String>>,
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
                    .with_help("e.g. dataset = \"data/law_qa.jsonl\" or model = \"hf://Qwen/Qwen2.5-0.5B-Instruct\""))
            }
        };
        if let Some(parsed) = HubSource::parse(&source) {
            let hub = parsed.map_err(|message| ctx.error(&[what], format!("`{source}`: {message}")))?;
            let expected = if what == "model" { RepoKind::Model } else { RepoKind::Dataset };
            if hub.kind != expected {
                return Err(ctx.error(&[what], format!("`{source}` is a {:?} repository, but this key takes a {what}", hub.kind))
                    .with_help("models are hf://ORG/NAME, datasets hf://datasets/ORG/NAME"));
            }
            let files = config.files.unwrap_or_else(|| match hub.kind {
                RepoKind::Model => MODEL_FILES.iter().map(|s| s.to_string()).collect(),
                RepoKind::Dataset => vec!["**".to_string()],
            });
            if files.is_empty() {
                return Err(ctx.error(&["files"], "`files` lists no pattern"));
            }
            let resolved = Resolved { what, path: source, files: Some(files) };
            return Ok(Box::new(DownloadPlan { resolved, hub: Some(hub), fetcher: Mutex::new(None) }));
        }
        if config.files.is_some() {
            return Err(ctx.error(&["files"], "`files` applies to hf:// sources only").with_help("remove it, or point at a subfolder"));
        }
        let path = ctx.local_input("source", &[what], &source)?;
        if what == "model" && !path.is_dir() {
            return Err(ctx.error(&[what], format!("`{source}` is a file; a model is a folder holding config.json and weights")));
        }
        Ok(Box::new(DownloadPlan { resolved: Resolved { what, path: source, files: None }, hub: None, fetcher: Mutex::new(None) }))
    }
}

struct DownloadPlan {
    resolved: Resolved,
    hub: Option<HubSource>,
    /// Kept from resolution to fetching, so the file list is asked for once.
    fetcher: Mutex<Option<HubFetcher>>,
}

impl DownloadPlan {
    fn run_hub(&self, hub: &HubSource, ctx: &RunCtx<'_>) -> anyhow::Result<StageResult> {
        let sha = ctx.revision.as_deref().context("internal error: the Hub revision was not resolved")?;
        let mut slot = self.fetcher.lock().expect("fetcher lock");
        let fetcher = slot.get_or_insert_with(|| HubFetcher::new(hub.clone(), HubSettings::from_env(ctx.offline)));
        let patterns = self.resolved.files.clone().unwrap_or_default();
        ctx.progress(0, 0, "fetching from the Hub");
        let (folder, files, report) = fetcher.fetch(sha, &patterns)?;
        ctx.progress(0, 0, "ingesting");
        // Only the wanted files: the snapshot folder may hold others that other
        // tools fetched, which must not change this stage's output.
        let hashed = hash_files(&folder, &files)?;
        let name = folder.file_name().and_then(|n| n.to_str()).unwrap_or("data");
        let artifact = ingest(ctx, &folder, &hashed, name)?;
        let mut result = StageResult::default();
        result.metrics.insert("bytes".to_string(), artifact.size().into());
        result.metrics.insert("files_downloaded".to_string(), report.downloaded.into());
        result.metrics.insert("files_cached".to_string(), report.cached.into());
        result.outputs.insert(self.resolved.what.to_string(), OutputValue::Stored(artifact));
        Ok(result)
    }

    fn run_local(&self, ctx: &RunCtx<'_>) -> anyhow::Result<StageResult> {
        let source = ctx.input("source")?;
        let hashed = source.hashed.as_ref().context("internal error: local input not hashed")?;
        let name = source.path.file_name().and_then(|n| n.to_str()).unwrap_or("data");
        ctx.progress(0, source.artifact.size(), "ingesting");
        let artifact = ingest(ctx, &source.path, hashed, name)?;
        ctx.progress(source.artifact.size(), source.artifact.size(), "ingested");
        let mut result = StageResult::default();
        result.metrics.insert("bytes".to_string(), artifact.size().into());
        result.outputs.insert(self.resolved.what.to_string(), OutputValue::Stored(artifact));
        Ok(result)
    }
}

/// Hashes the chosen files under `folder` into a listing (or the folder itself
/// when it is the one file, `files == [""]`).
fn hash_files(folder: &Path, files: &[String]) -> anyhow::Result<swift_cache::Hashed> {
    if files == [String::new()] {
        let (hashed, _) = hash_path(folder, &StatCache::in_memory(), true).with_context(|| format!("reading {}", folder.display()))?;
        return Ok(hashed);
    }
    let mut entries = Vec::with_capacity(files.len());
    for file in files {
        let path = folder.join(file);
        let (hashed, _) = hash_path(&path, &StatCache::in_memory(), true).with_context(|| format!("reading {}", path.display()))?;
        let swift_cache::Hashed::File { digest, size, executable } = hashed else {
            anyhow::bail!("{} is a folder, expected a file", path.display());
        };
        entries.push(TreeEntry { path: file.clone(), size, executable, digest });
    }
    Ok(swift_cache::Hashed::Tree(TreeListing::new(entries)))
}

fn ingest(ctx: &RunCtx<'_>, path: &Path, hashed: &swift_cache::Hashed, name: &str) -> anyhow::Result<swift_cache::Artifact> {
    ctx.store.ingest_local(path, hashed, name).with_context(|| format!("ingesting {}", path.display()))
}

impl StagePlan for DownloadPlan {
    fn params(&self) -> serde_json::Value {
        serde_json::to_value(&self.resolved).expect("params serialize")
    }

    fn outputs(&self) -> Vec<OutputDecl> {
        OUTPUTS.iter().filter(|o| o.name == self.resolved.what).copied().collect()
    }

    fn resolve(&self, ctx: &ResolveCtx) -> anyhow::Result<Option<String>> {
        let Some(hub) = &self.hub else { return Ok(None) };
        let fetcher = HubFetcher::new(hub.clone(), HubSettings::from_env(ctx.offline));
        let sha = fetcher.resolve(ctx.locked.as_deref())?;
        *self.fetcher.lock().expect("fetcher lock") = Some(fetcher);
        Ok(Some(sha))
    }

    fn run(&self, ctx: &RunCtx<'_>) -> anyhow::Result<StageResult> {
        match &self.hub {
            Some(hub) => self.run_hub(hub, ctx),
            None => self.run_local(ctx),
        }
    }
}
