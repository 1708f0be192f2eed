//! Reading a manifest: TOML text → spans kept for errors → `${VAR}` and `--set`
//! applied → the `[pipeline]` section typed and each stage split into its kind and
//! its raw parameters (typed later by the kind itself, see [`crate::kind`]).
//!
//! Relative paths resolve against the project root: the nearest ancestor of the
//! manifest's folder that holds `.git`, else the manifest's folder.

mod overrides;
mod source;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::{did_you_mean, ManifestError};
use crate::placement::{DeviceSpec, Executor, Resources};
pub use source::{SourceText, SpanIndex};

/// How a manifest is read: overrides and the environment.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// `--set key.path=value` overrides, in order.
    pub sets: Vec<String>,
    /// Environment variables for `${VAR}` (the process environment when `None`).
    pub env: Option<std::collections::HashMap<String, String>>,
    /// `--device`: the device of every stage that computes on one, over the
    /// manifest's `device` keys.
    pub device: Option<String>,
}

/// The `[pipeline]` section.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSection {
    /// The pipeline's name (default: the manifest's file stem).
    #[serde(default)]
    pub name: Option<String>,
    /// Seed for every random choice (shuffles, initialisation). Default 0.
    #[serde(default)]
    pub seed: u64,
    /// Free text shown by `swift dag`.
    #[serde(default)]
    pub description: Option<String>,
    /// Where missed stages run: `local` (default) or `slurm` (`--executor` wins).
    #[serde(default)]
    pub executor: Executor,
    /// The device of every stage that computes on one: `auto` (default), `cpu`,
    /// `cuda:N` (a stage's `device` and `--device` win).
    #[serde(default)]
    pub device: Option<String>,
    /// Slurm resources every stage starts from (a stage's `resources` wins).
    #[serde(default)]
    pub resources: Resources,
    /// How the Slurm executor behaves.
    #[serde(default)]
    pub slurm: SlurmSection,
}

/// `[pipeline.slurm]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmSection {
    /// How often `swift run` looks at the cache and the queue (default `2s`).
    #[serde(default, with = "humantime_serde_opt")]
    pub poll: Option<std::time::Duration>,
    /// How long the shared-cache probe job may wait in the queue (default `10m`).
    #[serde(default, with = "humantime_serde_opt")]
    pub probe_timeout: Option<std::time::Duration>,
}

/// `"2s"`, `"10m"` as an optional duration.
mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<std::time::Duration>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| humantime::parse_duration(&t).map_err(|e| serde::de::Error::custom(format!("`{t}` is not a duration ({e}): write e.g. \"2s\" or \"10m\""))))
            .transpose()
    }
}

/// One `[stages.NAME]` table: its kind and its other keys, untyped.
#[derive(Clone, Debug)]
pub struct StageDecl {
    /// The stage's name.
    pub name: String,
    /// The `kind` key.
    pub kind: String,
    /// Every other key.
    pub params: toml::Table,
    /// Where it runs: the engine's keys `device` and `resources`,
    /// taken out of `params` before the kind sees them.
    pub placement: StagePlacement,
}

/// A stage's own `device` and `resources`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StagePlacement {
    /// One device: `auto`, `cpu`, `cuda:N`.
    #[serde(default)]
    pub device: Option<String>,
    /// Slurm resources of its job.
    #[serde(default)]
    pub resources: Resources,
}

/// The stage keys the engine reads itself (every kind accepts them).
pub const PLACEMENT_KEYS: &[&str] = &["device", "resources"];

/// A parsed manifest.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// Absolute path of the manifest file.
    pub path: PathBuf,
    /// The project root that relative paths resolve against.
    pub root: PathBuf,
    /// The pipeline's name.
    pub name: String,
    /// The `[pipeline]` section.
    pub pipeline: PipelineSection,
    /// Stages in file order.
    pub stages: IndexMap<String, StageDecl>,
    /// `--device`, if given.
    pub device_override: Option<String>,
    locator: Locator,
}

/// Turns key paths into located errors.
#[derive(Clone, Debug)]
pub struct Locator {
    file: PathBuf,
    source: SourceText,
    spans: SpanIndex,
    overridden: HashSet<Vec<String>>,
}

impl Locator {
    /// An error at a key path; `at_key` points at the key instead of its value.
    pub fn error(&self, path: &[String], at_key: bool, message: impl Into<String>) -> ManifestError {
        let mut message = message.into();
        if (1..=path.len()).any(|n| self.overridden.contains(&path[..n])) {
            message.push_str(" (value set by --set)");
        }
        let (line, column) = self.spans.find(path, at_key).map_or((1, 1), |span| self.source.location(span.start));
        ManifestError::new(&self.file, line, column, message)
    }

    /// Types a value, locating any error at the offending key.
    pub fn parse<T: DeserializeOwned>(&self, base: &[String], value: toml::Value) -> Result<T, ManifestError> {
        serde_path_to_error::deserialize(value).map_err(|err| {
            let mut path = base.to_vec();
            for segment in err.path().iter() {
                match segment {
                    serde_path_to_error::Segment::Map { key } => path.push(key.clone()),
                    serde_path_to_error::Segment::Seq { index } => path.push(index.to_string()),
                    _ => {}
                }
            }
            let inner = err.into_inner().message().to_string();
            let unknown = inner.starts_with("unknown field");
            let error = self.error(&path, unknown, clean_serde_message(&inner));
            match unknown_field_hint(&inner) {
                Some(help) => error.with_help(help),
                None => error,
            }
        })
    }
}

/// serde's messages say "invalid type: string \"x\", expected u32"; keep them
/// but drop a trailing newline and the `expected one of` list we turn into a hint.
fn clean_serde_message(message: &str) -> String {
    let message = message.trim();
    match message.split_once(", expected one of") {
        Some((head, _)) if head.starts_with("unknown field") => format!("{head}: not a key here"),
        _ => message.to_string(),
    }
}

/// "did you mean …" for serde's `unknown field `x`, expected one of `a`, `b``.
fn unknown_field_hint(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (wrong, expected) = rest.split_once('`')?;
    let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    match did_you_mean(wrong, candidates.iter().copied()) {
        Some(best) => Some(format!("did you mean `{best}`?")),
        None if !candidates.is_empty() => Some(format!("valid keys: {}", candidates.join(", "))),
        None => None,
    }
}

/// The nearest ancestor of `dir` holding `.git`, else `dir`.
pub fn project_root(dir: &Path) -> PathBuf {
    dir.ancestors().find(|d| d.join(".git").exists()).unwrap_or(dir).to_path_buf()
}

const TOP_LEVEL_KEYS: &[&str] = &["pipeline", "stages"];

impl Manifest {
    /// Reads and validates the shape of a manifest (not yet its stages' kinds).
    pub fn load(path: &Path, options: &LoadOptions) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ManifestError::new(path, 1, 1, format!("cannot read the manifest: {e}")))?;
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let path = abs.canonicalize().unwrap_or(abs);
        Self::parse(&path, text, options)
    }

    /// Parses manifest text that lives at `path`.
    pub fn parse(path: &Path, text: String, options: &LoadOptions) -> Result<Self, ManifestError> {
        let source = SourceText::new(text.clone());
        let doc = toml_edit::Document::parse(text).map_err(|e| {
            let (line, column) = e.span().map_or((1, 1), |s| source.location(s.start));
            ManifestError::new(path, line, column, format!("invalid TOML: {}", e.message().trim()))
        })?;
        let mut locator = Locator { file: path.to_path_buf(), source, spans: SpanIndex::of(&doc), overridden: HashSet::new() };
        let mut doc = doc.into_mut();

        let lookup = |name: &str| match &options.env {
            Some(map) => map.get(name).cloned(),
            None => std::env::var(name).ok(),
        };
        overrides::map_strings(doc.as_table_mut(), &mut Vec::new(), &mut |_, s| {
            if s.contains('$') {
                overrides::interpolate(s, &lookup).map(Some)
            } else {
                Ok(None)
            }
        })
        .map_err(|(path, var)| {
            let message = if var.starts_with("unclosed") {
                var
            } else {
                format!("environment variable `{var}` is not set")
            };
            locator.error(&path, false, message).with_help("set it, give a default with `${VAR:-default}`, or write `$$` for a literal `$`")
        })?;

        let stage_names: Vec<String> =
            doc.get("stages").and_then(|s| s.as_table_like()).map(|t| t.iter().map(|(k, _)| k.to_string()).collect()).unwrap_or_default();
        for set in &options.sets {
            apply_set(&mut doc, set, &stage_names)?;
            let key = set.split_once('=').map_or(set.as_str(), |(k, _)| k);
            locator.overridden.insert(key.split('.').map(|s| s.trim().to_string()).collect());
        }

        let table: toml::Table = toml::from_str(&doc.to_string()).map_err(|e| {
            ManifestError::new(path, 1, 1, format!("internal error re-reading the manifest after overrides: {e}"))
        })?;
        let mut manifest = Self::from_table(path, table, locator)?;
        if let Some(device) = &options.device {
            device.parse::<DeviceSpec>().map_err(|e| ManifestError::new("--device", 1, 1, e))?;
            manifest.device_override = Some(device.clone());
        }
        Ok(manifest)
    }

    fn from_table(path: &Path, mut table: toml::Table, locator: Locator) -> Result<Self, ManifestError> {
        for key in table.keys() {
            if !TOP_LEVEL_KEYS.contains(&key.as_str()) {
                let mut error = locator.error(std::slice::from_ref(key), true, format!("unknown top-level key `{key}`"));
                error = match did_you_mean(key, TOP_LEVEL_KEYS.iter().copied()) {
                    Some(best) => error.with_help(format!("did you mean `{best}`?")),
                    None => error.with_help("a manifest has a `[pipeline]` table and `[stages.NAME]` tables"),
                };
                return Err(error);
            }
        }
        let pipeline: PipelineSection = match table.remove("pipeline") {
            Some(value) => locator.parse(&["pipeline".to_string()], value)?,
            None => PipelineSection::default(),
        };
        let stages_value = table.remove("stages").unwrap_or(toml::Value::Table(Default::default()));
        let toml::Value::Table(stage_tables) = stages_value else {
            return Err(locator.error(&["stages".to_string()], false, "`stages` must be a table of `[stages.NAME]` tables"));
        };
        if stage_tables.is_empty() {
            return Err(locator.error(&[], false, "the manifest declares no stages").with_help("add a `[stages.NAME]` table with a `kind`"));
        }
        let mut stages = IndexMap::new();
        // toml::Table is sorted; keep the file's order for display by sorting on position.
        let mut ordered: Vec<(String, toml::Value)> = stage_tables.into_iter().collect();
        ordered.sort_by_key(|(name, _)| {
            locator.spans.find(&["stages".to_string(), name.clone()], true).map_or(usize::MAX, |s| s.start)
        });
        for (name, value) in ordered {
            let at = vec!["stages".to_string(), name.clone()];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return Err(locator.error(&at, true, format!("stage name `{name}` may only use letters, digits, `_` and `-`")));
            }
            let toml::Value::Table(mut params) = value else {
                return Err(locator.error(&at, false, format!("stage `{name}` must be a table")));
            };
            let kind = match params.remove("kind") {
                Some(toml::Value::String(kind)) => kind,
                Some(_) => return Err(locator.error(&[at.clone(), vec!["kind".into()]].concat(), false, "`kind` must be a string")),
                None => {
                    return Err(locator
                        .error(&at, true, format!("stage `{name}` has no `kind`"))
                        .with_help("add e.g. `kind = \"download\"`"))
                }
            };
            let mut placement_table = toml::Table::new();
            for key in PLACEMENT_KEYS {
                if let Some(value) = params.remove(*key) {
                    placement_table.insert(key.to_string(), value);
                }
            }
            let placement: StagePlacement = locator.parse(&at, toml::Value::Table(placement_table))?;
            check_placement(&locator, &at, &placement)?;
            stages.insert(name.clone(), StageDecl { name, kind, params, placement });
        }
        let pipeline_at = vec!["pipeline".to_string()];
        if let Some(device) = &pipeline.device {
            device.parse::<DeviceSpec>().map_err(|e| locator.error(&[pipeline_at.clone(), vec!["device".into()]].concat(), false, e))?;
        }
        if let Err((field, message)) = pipeline.resources.validate() {
            return Err(locator.error(&[pipeline_at, vec!["resources".into(), field.into()]].concat(), false, message));
        }
        let name = pipeline
            .name
            .clone()
            .unwrap_or_else(|| path.file_stem().and_then(|s| s.to_str()).unwrap_or("pipeline").to_string());
        let root = project_root(path.parent().unwrap_or(Path::new(".")));
        Ok(Self { path: path.to_path_buf(), root, name, pipeline, stages, device_override: None, locator })
    }

    /// The locator for errors in this manifest.
    pub fn locator(&self) -> &Locator {
        &self.locator
    }

    /// The device a stage computes on, and where that choice was made:
    /// `--device`, else the stage's `device`, else `[pipeline] device`, else
    /// `auto`. The returned key path is empty for `--device` and `auto`.
    pub fn device_of(&self, stage: &str) -> (DeviceSpec, Vec<String>) {
        let stage_key = || vec!["stages".to_string(), stage.to_string(), "device".to_string()];
        let (text, at) = match (&self.device_override, self.stages.get(stage).and_then(|s| s.placement.device.as_ref()), &self.pipeline.device) {
            (Some(cli), _, _) => (cli.as_str(), Vec::new()),
            (None, Some(own), _) => (own.as_str(), stage_key()),
            (None, None, Some(pipeline)) => (pipeline.as_str(), vec!["pipeline".to_string(), "device".to_string()]),
            (None, None, None) => ("auto", Vec::new()),
        };
        (text.parse().expect("devices are checked when the manifest loads"), at)
    }

    /// The lock file beside the manifest (`NAME.lock` for `NAME.toml`).
    pub fn lock_path(&self) -> PathBuf {
        self.path.with_extension("lock")
    }

    /// The manifest's path relative to the project root, for messages.
    pub fn display_path(&self) -> String {
        self.path.strip_prefix(&self.root).unwrap_or(&self.path).display().to_string()
    }
}

/// Checks a stage's `device` and `resources` values.
fn check_placement(locator: &Locator, at: &[String], placement: &StagePlacement) -> Result<(), ManifestError> {
    let field = |key: &[&str]| -> Vec<String> { at.iter().cloned().chain(key.iter().map(|k| k.to_string())).collect() };
    if let Some(device) = &placement.device {
        let spec: DeviceSpec = device.parse().map_err(|e| locator.error(&field(&["device"]), false, e))?;
        if spec.count() > 1 {
            return Err(locator.error(&field(&["device"]), false, format!("`device` names one device; `{device}` names {}", spec.count())));
        }
    }
    if let Err((key, message)) = placement.resources.validate() {
        return Err(locator.error(&field(&["resources", key]), false, message));
    }
    Ok(())
}

fn apply_set(doc: &mut toml_edit::DocumentMut, set: &str, stage_names: &[String]) -> Result<(), ManifestError> {
    let col = |offset: usize| offset + 1;
    let err = |column: usize, message: String| ManifestError::new("--set", 1, column, message);
    let Some((key, raw)) = set.split_once('=') else {
        return Err(err(1, format!("`{set}` is not KEY=VALUE")).with_help("write e.g. --set stages.coarse.lora.rank=32"));
    };
    let path: Vec<String> = key.split('.').map(|s| s.trim().to_string()).collect();
    if path.iter().any(String::is_empty) {
        return Err(err(1, format!("`{key}` has an empty segment")));
    }
    match path[0].as_str() {
        "pipeline" if path.len() >= 2 => {}
        "stages" if path.len() >= 3 => {
            if !stage_names.contains(&path[1]) {
                let mut e = err(col("stages.".len()), format!("there is no stage `{}`", path[1]));
                if let Some(best) = did_you_mean(&path[1], stage_names.iter().map(String::as_str)) {
                    e = e.with_help(format!("did you mean `{best}`?"));
                }
                return Err(e);
            }
        }
        _ => {
            return Err(err(1, format!("`{key}` must start with `pipeline.` or `stages.NAME.`"))
                .with_help("write e.g. --set stages.coarse.lora.rank=32"))
        }
    }
    overrides::set_path(doc, &path, raw).map_err(|message| err(1, format!("cannot set `{key}`: {message}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, sets: &[&str]) -> Result<Manifest, ManifestError> {
        let options = LoadOptions {
            sets: sets.iter().map(|s| s.to_string()).collect(),
            env: Some([("DATA".to_string(), "law.jsonl".to_string())].into()),
            device: None,
        };
        Manifest::parse(Path::new("/p/pipelines/x.toml"), text.to_string(), &options)
    }

    #[test]
    fn stages_keep_file_order_and_env_values() {
        let m = load("[stages.zeta]\nkind = \"download\"\ndataset = \"data/${DATA}\"\n[stages.alpha]\nkind = \"download\"\n", &[])
            .unwrap();
        assert_eq!(m.stages.keys().collect::<Vec<_>>(), vec!["zeta", "alpha"]);
        assert_eq!(m.stages["zeta"].params["dataset"].as_str(), Some("data/law.jsonl"));
        assert_eq!(m.name, "x");
    }

    #[test]
    fn errors_point_at_line_and_column() {
        let e = load("[pipeline]\nsede = 3\n[stages.a]\nkind = \"download\"\n", &[]).unwrap_err();
        assert_eq!((e.line, e.column), (2, 1));
        assert_eq!(e.help.as_deref(), Some("did you mean `seed`?"));
        let e = load("[stages.a]\nkind = \"download\"\ndataset = \"${MISSING}\"\n", &[]).unwrap_err();
        assert_eq!((e.line, e.column), (3, 11));
        let e = load("[stages.a]\nkind = \"x\"\n[stagez.b]\n", &[]).unwrap_err();
        assert_eq!(e.line, 3);
        assert_eq!(e.help.as_deref(), Some("did you mean `stages`?"));
        let e = load("[stages.a]\nkind = \n", &[]).unwrap_err();
        assert_eq!(e.line, 2);
    }

    #[test]
    fn devices_follow_command_line_then_stage_then_pipeline() {
        let text = "[pipeline]\ndevice = \"cpu\"\n[stages.a]\nkind = \"finetune\"\ndevice = \"cuda:1\"\n[stages.b]\nkind = \"eval\"\n";
        let m = load(text, &[]).unwrap();
        assert_eq!(m.device_of("a"), (DeviceSpec::Cuda(vec![1]), vec!["stages".into(), "a".into(), "device".into()]));
        assert_eq!(m.device_of("b"), (DeviceSpec::Cpu, vec!["pipeline".into(), "device".into()]));
        let options = LoadOptions { device: Some("auto".into()), ..LoadOptions::default() };
        let m = Manifest::parse(Path::new("/p/x.toml"), text.to_string(), &options).unwrap();
        assert_eq!(m.device_of("a"), (DeviceSpec::Auto, vec![]));
        let bare = load("[stages.a]\nkind = \"eval\"\n", &[]).unwrap();
        assert_eq!(bare.device_of("a"), (DeviceSpec::Auto, vec![]));
    }

    #[test]
    fn placement_keys_are_checked_where_they_are_written() {
        let e = load("[stages.a]\nkind = \"eval\"\ndevice = \"gpu0\"\n", &[]).unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.message.contains("is not a device"), "{e}");
        let e = load("[stages.a]\nkind = \"eval\"\ndevice = \"cuda:0-1\"\n", &[]).unwrap_err();
        assert!(e.message.contains("names one device"), "{e}");
        let e = load("[stages.a]\nkind = \"eval\"\nresources = { cpus = 2, memory = \"4G\" }\n", &[]).unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.message.contains("memory"), "{e}");
        let e = load("[pipeline.resources]\ntime = \"2 hours\"\n[stages.a]\nkind = \"eval\"\n", &[]).unwrap_err();
        assert_eq!(e.line, 2);
        let e = load("[pipeline]\nexecutor = \"k8s\"\n[stages.a]\nkind = \"eval\"\n", &[]).unwrap_err();
        assert_eq!(e.line, 2);
        let e = load("[pipeline.slurm]\npoll = \"fast\"\n[stages.a]\nkind = \"eval\"\n", &[]).unwrap_err();
        assert!(e.message.contains("not a duration"), "{e}");
    }

    #[test]
    fn set_overrides_and_checks_stage_names() {
        let m = load("[stages.a]\nkind = \"download\"\n", &["stages.a.lora.rank=32"]).unwrap();
        assert_eq!(m.stages["a"].params["lora"]["rank"].as_integer(), Some(32));
        let e = load("[stages.alpha]\nkind = \"download\"\n", &["stages.alpah.x=1"]).unwrap_err();
        assert_eq!(e.file, PathBuf::from("--set"));
        assert_eq!(e.help.as_deref(), Some("did you mean `alpha`?"));
    }
}
