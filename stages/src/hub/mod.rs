//! The Hugging Face Hub half of the `download` stage, through the hf-hub crate.
//!
//! - Sources: `hf://ORG/NAME[@REV]` (a model) and
//!   `hf://datasets/ORG/NAME[@REV][/PATH]` (a dataset, or one path inside it),
//!   the revision before the path as the Python hub filesystem writes it
//!   (`%2F` for a `/` inside a revision).
//! - A branch or tag resolves to a commit sha with one metadata request; a
//!   40-hex revision is pinned as-is with none; `--locked` uses the sha the lock
//!   file pins.
//! - Files live in the standard HF cache (`HF_HUB_CACHE`, else `$HF_HOME/hub`,
//!   else `~/.cache/huggingface/hub`): what is already there is never fetched
//!   again, and other tools share it.
//! - `HF_ENDPOINT` points at a mirror; the token comes from `HF_TOKEN` or the
//!   token file, trimmed of surrounding whitespace (one with control or
//!   non-ASCII characters inside is refused, unseen), and is only ever sent to
//!   the endpoint's origin — files come through [`file`], which follows the
//!   Hub's redirects to storage hosts without it — never logged or stored.
//! - Offline (`--offline` or `HF_HUB_OFFLINE=1`): no network at all; a file
//!   missing from the cache is an error that says how to fetch it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{anyhow, bail};
use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Repo, RepoType};

use file::FileError;

mod file;

/// Model or dataset repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RepoKind {
    /// `hf://ORG/NAME`.
    Model,
    /// `hf://datasets/ORG/NAME`.
    Dataset,
}

/// A parsed `hf://` source.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HubSource {
    /// Model or dataset.
    pub kind: RepoKind,
    /// `ORG/NAME`.
    pub repo: String,
    /// The revision asked for (default `main`).
    pub revision: String,
    /// A path inside a dataset repository.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

impl HubSource {
    /// Parses `hf://…`; `None` when `text` is not an `hf://` source.
    pub fn parse(text: &str) -> Option<Result<Self, String>> {
        let rest = text.strip_prefix("hf://")?;
        Some(Self::parse_rest(rest))
    }

    fn parse_rest(rest: &str) -> Result<Self, String> {
        let (kind, rest) = match rest.strip_prefix("datasets/") {
            Some(rest) => (RepoKind::Dataset, rest),
            None => (RepoKind::Model, rest),
        };
        let mut parts = rest.splitn(3, '/');
        let (Some(org), Some(name_rev)) = (parts.next(), parts.next()) else {
            return Err("expected hf://ORG/NAME[@REV] or hf://datasets/ORG/NAME[@REV][/PATH]".into());
        };
        let path = parts.next().filter(|p| !p.is_empty()).map(str::to_string);
        if path.is_some() && kind == RepoKind::Model {
            return Err("a model source is a whole repository: hf://ORG/NAME[@REV]".into());
        }
        let (name, revision) = match name_rev.split_once('@') {
            Some((name, rev)) if !rev.is_empty() => (name, rev.replace("%2F", "/").replace("%2f", "/")),
            Some(_) => return Err("empty revision after `@`".into()),
            None => (name_rev, "main".to_string()),
        };
        let valid = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !valid(org) || !valid(name) {
            return Err(format!("`{org}/{name}` is not a repository id (letters, digits, `-`, `_`, `.`)"));
        }
        Ok(Self { kind, repo: format!("{org}/{name}"), revision, path })
    }

    fn repo_type(&self) -> RepoType {
        match self.kind {
            RepoKind::Model => RepoType::Model,
            RepoKind::Dataset => RepoType::Dataset,
        }
    }

    /// The repository's folder in the HF cache.
    pub fn cache_folder(&self, cache: &Path) -> PathBuf {
        let prefix = match self.kind {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        };
        cache.join(format!("{prefix}--{}", self.repo.replace('/', "--")))
    }
}

/// Where the Hub is and how to reach it, from the environment.
#[derive(Clone)]
pub struct HubSettings {
    /// API endpoint (`HF_ENDPOINT`).
    pub endpoint: String,
    /// The HF cache folder.
    pub cache: PathBuf,
    /// The token, or why the one configured is unusable (it is never shown).
    token: Result<Option<String>, String>,
    /// No network.
    pub offline: bool,
}

impl std::fmt::Debug for HubSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubSettings")
            .field("endpoint", &self.endpoint)
            .field("cache", &self.cache)
            .field("token", &self.token.as_ref().map(|t| t.as_ref().map(|_| "<redacted>")))
            .field("offline", &self.offline)
            .finish()
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl HubSettings {
    /// Reads `HF_ENDPOINT`, `HF_HUB_CACHE`/`HUGGINGFACE_HUB_CACHE`/`HF_HOME`/
    /// `XDG_CACHE_HOME`, `HF_TOKEN`/`HF_TOKEN_PATH` and `HF_HUB_OFFLINE`.
    pub fn from_env(offline: bool) -> Self {
        let home = env("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"));
        let hf_home = env("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            env("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| home.join(".cache")).join("huggingface")
        });
        let cache = env("HF_HUB_CACHE").or_else(|| env("HUGGINGFACE_HUB_CACHE")).map(PathBuf::from).unwrap_or_else(|| hf_home.join("hub"));
        let token_file = env("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| hf_home.join("token"));
        let token = match (env("HF_TOKEN"), env("HUGGING_FACE_HUB_TOKEN")) {
            (Some(token), _) => checked_token(&token, "HF_TOKEN"),
            (None, Some(token)) => checked_token(&token, "HUGGING_FACE_HUB_TOKEN"),
            (None, None) => match std::fs::read_to_string(&token_file) {
                Ok(text) if !text.trim().is_empty() => checked_token(&text, &token_file.display().to_string()),
                _ => Ok(None),
            },
        };
        let env_offline = env("HF_HUB_OFFLINE").is_some_and(|v| matches!(v.to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE"));
        let endpoint = env("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".to_string()).trim_end_matches('/').to_string();
        Self { endpoint, cache, token, offline: offline || env_offline }
    }

    /// The token to send to the endpoint, or the error that the configured
    /// one is unusable.
    fn token(&self) -> anyhow::Result<Option<&str>> {
        match &self.token {
            Ok(token) => Ok(token.as_deref()),
            Err(problem) => bail!("{problem}"),
        }
    }

    fn api(&self) -> anyhow::Result<Api> {
        ApiBuilder::new()
            .with_endpoint(self.endpoint.clone())
            .with_cache_dir(self.cache.clone())
            .with_token(self.token()?.map(str::to_string))
            .with_progress(false)
            .with_retries(2)
            .build()
            .map_err(|e| anyhow!("setting up the Hub client: {e}"))
    }
}

/// A token from `source` with surrounding whitespace (a trailing CR or
/// newline from a copy or a Windows file) removed; one with control or
/// non-ASCII characters left is an error that names the source, never the token.
fn checked_token(raw: &str, source: &str) -> Result<Option<String>, String> {
    let token = raw.trim();
    if token.is_empty() {
        return Ok(None);
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "the Hugging Face token from {source} contains spaces, control or non-ASCII characters, so no HTTP header can \
             carry it: copy it again from your Hugging Face settings (it is not shown here)"
        ));
    }
    Ok(Some(token.to_string()))
}

/// Resolves and fetches one source; remembers the file list the resolution
/// request returned so fetching asks nothing more.
pub struct HubFetcher {
    source: HubSource,
    settings: HubSettings,
    listing: Mutex<Option<(String, Vec<String>)>>,
}

/// What a fetch did.
#[derive(Debug, Default)]
pub struct FetchReport {
    /// Files downloaded now.
    pub downloaded: usize,
    /// Files already in the HF cache.
    pub cached: usize,
}

impl HubFetcher {
    /// A fetcher for `source`.
    pub fn new(source: HubSource, settings: HubSettings) -> Self {
        Self { source, settings, listing: Mutex::new(None) }
    }

    /// The source.
    pub fn source(&self) -> &HubSource {
        &self.source
    }

    /// The commit sha the source's revision names now.
    pub fn resolve(&self, locked: Option<&str>) -> anyhow::Result<String> {
        if let Some(sha) = locked {
            return Ok(sha.to_string());
        }
        let revision = &self.source.revision;
        if is_commit(revision) {
            return Ok(revision.to_ascii_lowercase());
        }
        if self.settings.offline {
            let reference = self.source.cache_folder(&self.settings.cache).join("refs").join(revision);
            return std::fs::read_to_string(&reference).map(|s| s.trim().to_string()).map_err(|_| {
                anyhow!(
                    "offline, and {}@{revision} is not in the Hugging Face cache at {} (no {}); run once without --offline \
                     (and without HF_HUB_OFFLINE) to fetch it, or `huggingface-cli download {}`",
                    self.source.repo,
                    self.settings.cache.display(),
                    reference.display(),
                    self.source.repo
                )
            });
        }
        let info = self.info(revision)?;
        let sha = info.0.clone();
        *self.listing.lock().expect("listing lock") = Some(info);
        // Record the branch or tag in the HF cache as huggingface_hub does, so
        // that a later offline run resolves it without the network.
        let reference = self.source.cache_folder(&self.settings.cache).join("refs").join(revision);
        if std::fs::read_to_string(&reference).ok().as_deref().map(str::trim) != Some(sha.as_str()) {
            if let Some(parent) = reference.parent() {
                std::fs::create_dir_all(parent)?;
            }
            swift_cache::atomic::write_atomic(&reference, sha.as_bytes())?;
        }
        Ok(sha)
    }

    fn info(&self, revision: &str) -> anyhow::Result<(String, Vec<String>)> {
        let repo = Repo::with_revision(self.source.repo.clone(), self.source.repo_type(), revision.to_string());
        let info = self.settings.api()?.repo(repo).info().map_err(|e| self.explain(e, revision))?;
        Ok((info.sha, info.siblings.into_iter().map(|s| s.rfilename).collect()))
    }

    /// Makes sure every wanted file of commit `sha` is in the HF cache. Returns
    /// the snapshot folder (or the dataset path inside it) and the wanted files,
    /// relative to that folder (empty path: the folder is the one wanted file).
    pub fn fetch(&self, sha: &str, patterns: &[String]) -> anyhow::Result<(PathBuf, Vec<String>, FetchReport)> {
        let snapshot = self.source.cache_folder(&self.settings.cache).join("snapshots").join(sha);
        let all_files: Vec<String> = if self.settings.offline {
            if !snapshot.is_dir() {
                bail!(
                    "offline, and commit {sha} of {} is not in the Hugging Face cache at {}; run without --offline to fetch it",
                    self.source.repo,
                    self.settings.cache.display()
                );
            }
            let mut files = Vec::new();
            list_files(&snapshot, &snapshot, &mut files)?;
            files
        } else {
            let known = self.listing.lock().expect("listing lock").clone().filter(|(known_sha, _)| known_sha == sha);
            match known {
                Some((_, files)) => files,
                None => self.info(sha)?.1,
            }
        };
        let scope = self.source.path.as_deref().map(|p| p.trim_end_matches('/'));
        // Patterns apply to paths relative to the scope (the dataset path, if any).
        let wanted: Vec<(&String, String)> = all_files
            .iter()
            .filter_map(|f| match scope {
                Some(path) if f.as_str() == path => Some((f, String::new())),
                Some(path) => f.strip_prefix(&format!("{path}/")).map(|rel| (f, rel.to_string())),
                None => Some((f, f.clone())),
            })
            .filter(|(f, rel)| {
                let name = if rel.is_empty() { f.rsplit('/').next().unwrap_or(f) } else { rel.as_str() };
                patterns.iter().any(|p| glob_match(p, name))
            })
            .collect();
        if wanted.is_empty() {
            bail!(
                "no file of {}@{sha}{} matches {patterns:?}",
                self.source.repo,
                scope.map(|p| format!(" under `{p}`")).unwrap_or_default()
            );
        }
        let mut report = FetchReport::default();
        let api = if self.settings.offline { None } else { Some(self.settings.api()?) };
        for (file, _) in &wanted {
            let file = file.as_str();
            if snapshot.join(file).exists() {
                report.cached += 1;
                continue;
            }
            let Some(api) = &api else {
                bail!("offline, and `{file}` of {}@{sha} is not in the Hugging Face cache; run without --offline to fetch it", self.source.repo);
            };
            let repo = Repo::with_revision(self.source.repo.clone(), self.source.repo_type(), sha.to_string());
            let url = api.repo(repo).url(file);
            let folder = self.source.cache_folder(&self.settings.cache);
            file::download(&url, &self.settings.endpoint, self.settings.token()?, &folder, sha, file)
                .map_err(|e| self.explain_file(e, sha, file))?;
            report.downloaded += 1;
        }
        let folder = scope.map_or(snapshot.clone(), |p| snapshot.join(p));
        Ok((folder, wanted.into_iter().map(|(_, rel)| rel).collect(), report))
    }

    fn explain(&self, error: ApiError, revision: &str) -> anyhow::Error {
        let error = match error {
            ApiError::TooManyRetries(inner) => *inner,
            other => other,
        };
        if let ApiError::RequestError(inner) = &error {
            return match inner.as_ref() {
                ureq::Error::Status(code, _) => self.explain_status(*code, revision),
                ureq::Error::Transport(transport) => self.unreachable(&transport.to_string()),
            };
        }
        anyhow!("fetching {}@{revision} on {}: {error}", self.source.repo, self.settings.endpoint)
    }

    fn explain_file(&self, error: FileError, revision: &str, file: &str) -> anyhow::Error {
        match error {
            FileError::Status(code) => self.explain_status(code, revision),
            FileError::Transport(cause) => self.unreachable(&cause),
            FileError::Other(error) => error.context(format!("fetching `{file}` of {}@{revision}", self.source.repo)),
        }
    }

    fn explain_status(&self, code: u16, revision: &str) -> anyhow::Error {
        let what = format!("{}@{revision} on {}", self.source.repo, self.settings.endpoint);
        match code {
            401 | 403 => anyhow!(
                "the Hub refused access to {what} (HTTP {code}): set HF_TOKEN to a token with access (or log in with `huggingface-cli login`)"
            ),
            404 => anyhow!("{what} was not found (HTTP 404): check the name and revision; a private repository also needs HF_TOKEN"),
            _ => anyhow!("the Hub answered HTTP {code} for {what}"),
        }
    }

    fn unreachable(&self, cause: &str) -> anyhow::Error {
        anyhow!("cannot reach {}: {cause}; use --offline to work from the Hugging Face cache", self.settings.endpoint)
    }
}

/// Whether a revision is a full commit sha.
pub fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

fn list_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            list_files(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
    out.sort();
    Ok(())
}

/// Glob matching on `/`-separated paths: `*` matches within one path segment,
/// `**` across segments, `?` one character other than `/`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    fn go(p: &[char], t: &[char]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some(('*', rest)) if rest.first() == Some(&'*') => {
                let rest = &rest[1..];
                (0..=t.len()).any(|i| go(rest, &t[i..]))
            }
            Some(('*', rest)) => {
                let segment = t.iter().position(|&c| c == '/').unwrap_or(t.len());
                (0..=segment).any(|i| go(rest, &t[i..]))
            }
            Some(('?', rest)) => t.first().is_some_and(|&c| c != '/') && go(rest, &t[1..]),
            Some((c, rest)) => t.first() == Some(c) && go(rest, &t[1..]),
        }
    }
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    go(&p, &t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_as_the_hub_filesystem_writes_them() {
        let m = HubSource::parse("hf://Qwen/Qwen2.5-0.5B-Instruct").unwrap().unwrap();
        assert_eq!((m.kind, m.repo.as_str(), m.revision.as_str(), m.path), (RepoKind::Model, "Qwen/Qwen2.5-0.5B-Instruct", "main", None));
        let d = HubSource::parse("hf://datasets/cais/mmlu@refs%2Fconvert%2Fparquet/all/test").unwrap().unwrap();
        assert_eq!((d.kind, d.repo.as_str(), d.revision.as_str()), (RepoKind::Dataset, "cais/mmlu", "refs/convert/parquet"));
        assert_eq!(d.path.as_deref(), Some("all/test"));
        assert!(HubSource::parse("data/x.jsonl").is_none());
        assert!(HubSource::parse("hf://onlyorg").unwrap().is_err());
        assert!(HubSource::parse("hf://org/model/extra").unwrap().is_err());
        assert_eq!(d.cache_folder(Path::new("/c")), PathBuf::from("/c/datasets--cais--mmlu"));
    }

    #[test]
    fn globs_keep_single_stars_within_a_segment() {
        assert!(glob_match("model*.safetensors", "model-00001-of-00002.safetensors"));
        assert!(!glob_match("model*.safetensors", "consolidated.safetensors"));
        assert!(glob_match("tokenizer*", "tokenizer_config.json"));
        assert!(!glob_match("*.json", "onnx/config.json"));
        assert!(glob_match("**.json", "onnx/config.json") && glob_match("**", "a/b/c"));
        assert!(!glob_match("*.json", "model.safetensors"));
        assert!(glob_match("a?c", "abc") && !glob_match("a?c", "ac") && !glob_match("a?c", "a/c"));
    }
}
