//! Freshness: which stages are in the cache, and why the others would run.
//! Reasons are typed ([`StaleReason`]) and rendered as sentences; the previous
//! state comes from the lock file and the action entry it points at.

use indexmap::IndexMap;
use serde::Serialize;
use serde_json::Value;
use swift_cache::{ActionEntry, Artifact, LockFile, StageKey, StatCache, Store};

use crate::pipeline::{InputRef, Pipeline};
use crate::resolve::{hash_locals, input_artifacts, key_of, lookup, params_of, resolve_revisions};

/// Why a stage is not fresh.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum StaleReason {
    /// No lock entry and no cache entry.
    NeverRun,
    /// A parameter's value differs from the locked run.
    ParamChanged {
        /// Dotted key path.
        param: String,
        /// Value before (JSON text, `absent` if it was not set).
        old: String,
        /// Value now.
        new: String,
    },
    /// Parameters differ and the old values are no longer in the cache.
    ParamsChanged,
    /// The stage kind changed.
    KindChanged {
        /// Before.
        old: String,
        /// Now.
        new: String,
    },
    /// The kind's version changed (a new swift computes it differently).
    KindVersionChanged {
        /// Before.
        old: u32,
        /// Now.
        new: u32,
    },
    /// An input's bytes differ from the locked run.
    InputChanged {
        /// Input name.
        input: String,
        /// The stage or path it comes from.
        from: String,
    },
    /// The upstream revision (a Hub commit) moved.
    RevisionChanged {
        /// Locked revision.
        old: String,
        /// Resolved now.
        new: String,
    },
    /// An upstream stage will run first, so this stage's inputs are not known yet.
    UpstreamStale {
        /// The upstream stage.
        stage: String,
    },
    /// Same key as the lock, but the entry is not in this cache (collected,
    /// quarantined, or another cache).
    NotInCache,
    /// Forced with `--force`.
    Forced,
}

impl StaleReason {
    /// The reason as a sentence.
    pub fn sentence(&self) -> String {
        match self {
            StaleReason::NeverRun => "never run".to_string(),
            StaleReason::ParamChanged { param, old, new } => format!("param {param} changed {old} → {new}"),
            StaleReason::ParamsChanged => "parameters changed".to_string(),
            StaleReason::KindChanged { old, new } => format!("kind changed {old} → {new}"),
            StaleReason::KindVersionChanged { old, new } => format!("kind version changed {old} → {new}"),
            StaleReason::InputChanged { input, from } => format!("input {input} changed ({from})"),
            StaleReason::RevisionChanged { old, new } => format!("upstream revision changed {old} → {new}"),
            StaleReason::UpstreamStale { stage } => format!("upstream stage {stage} will run first"),
            StaleReason::NotInCache => "not in this cache".to_string(),
            StaleReason::Forced => "forced".to_string(),
        }
    }

    /// The reason's kind, as JSON names it.
    pub fn kind(&self) -> &'static str {
        match self {
            StaleReason::NeverRun => "never-run",
            StaleReason::ParamChanged { .. } => "param-changed",
            StaleReason::ParamsChanged => "params-changed",
            StaleReason::KindChanged { .. } => "kind-changed",
            StaleReason::KindVersionChanged { .. } => "kind-version-changed",
            StaleReason::InputChanged { .. } => "input-changed",
            StaleReason::RevisionChanged { .. } => "revision-changed",
            StaleReason::UpstreamStale { .. } => "upstream-stale",
            StaleReason::NotInCache => "not-in-cache",
            StaleReason::Forced => "forced",
        }
    }
}

/// One stage's freshness.
#[derive(Clone, Debug)]
pub struct Assessment {
    /// Its key, when every input is known.
    pub key: Option<StageKey>,
    /// The cache entry and materialized outputs, when fresh.
    pub cached: Option<(ActionEntry, IndexMap<String, std::path::PathBuf>)>,
    /// Why it is stale (empty when fresh).
    pub reasons: Vec<StaleReason>,
}

impl Assessment {
    /// Whether the stage is in the cache.
    pub fn fresh(&self) -> bool {
        self.cached.is_some()
    }
}

/// Assesses every stage without running anything (upstream revisions are
/// resolved, which asks the Hub unless `offline`).
pub fn assess(pipeline: &Pipeline, store: &Store, stats: &StatCache, rehash: bool, offline: bool) -> anyhow::Result<Vec<Assessment>> {
    let lock_path = pipeline.manifest.lock_path();
    let lock = LockFile::read(&lock_path)?.unwrap_or_default();
    // The keys a lock leaves out (machine-dependent ones) as this cache last settled them.
    let machine_keys = store.machine_keys(&lock_path).unwrap_or_default();
    let revisions = resolve_revisions(pipeline, 0..pipeline.nodes.len(), Some(&lock), offline, false)?;
    let (locals, _) = hash_locals(pipeline, 0..pipeline.nodes.len(), stats, rehash)?;
    let mut outputs: Vec<Option<IndexMap<String, Artifact>>> = vec![None; pipeline.nodes.len()];
    let mut result: Vec<Option<Assessment>> = vec![None; pipeline.nodes.len()];
    for &i in &pipeline.order {
        let inputs = input_artifacts(pipeline, i, &locals, &outputs);
        let key = inputs.as_ref().map(|inputs| key_of(pipeline, i, revisions[i].as_deref(), inputs));
        let cached = key.as_ref().and_then(|k| lookup(store, k));
        if let Some((entry, _)) = &cached {
            outputs[i] = Some(entry.outputs.clone());
        }
        let reasons = if cached.is_some() {
            Vec::new()
        } else {
            let now = Now { key: key.as_ref(), revision: revisions[i].as_deref(), inputs: inputs.as_deref() };
            stale_reasons(pipeline, store, &lock, machine_keys.get(&pipeline.nodes[i].name), i, &now, &outputs)
        };
        result[i] = Some(Assessment { key, cached, reasons });
    }
    Ok(result.into_iter().map(|a| a.expect("every stage assessed")).collect())
}

/// What a stage's key is made of now, as far as it is known.
struct Now<'a> {
    key: Option<&'a StageKey>,
    revision: Option<&'a str>,
    inputs: Option<&'a [(String, Artifact)]>,
}

fn stale_reasons(
    pipeline: &Pipeline,
    store: &Store,
    lock: &LockFile,
    machine_key: Option<&StageKey>,
    stage: usize,
    now: &Now<'_>,
    outputs: &[Option<IndexMap<String, Artifact>>],
) -> Vec<StaleReason> {
    let Now { key, revision, inputs } = *now;
    let node = &pipeline.nodes[stage];
    let Some(locked) = lock.stages.get(&node.name) else { return vec![StaleReason::NeverRun] };
    let locked_key = locked.key.as_ref().or(machine_key);
    if locked_key.is_some() && locked_key == key {
        return vec![StaleReason::NotInCache];
    }
    let previous = locked_key.and_then(|k| store.read_action(k).ok().flatten());
    let mut reasons = Vec::new();
    if locked.kind != node.kind {
        reasons.push(StaleReason::KindChanged { old: locked.kind.clone(), new: node.kind.clone() });
    } else if locked.params != params_of(pipeline, stage) {
        match &previous {
            Some(prev) if prev.kind_version != node.kind_version => {
                reasons.push(StaleReason::KindVersionChanged { old: prev.kind_version, new: node.kind_version })
            }
            Some(prev) => {
                let mut changes = Vec::new();
                diff_params(&prev.params, &node.plan.params(), &mut String::new(), &mut changes);
                if changes.is_empty() {
                    changes.push(StaleReason::ParamsChanged);
                }
                reasons.extend(changes);
            }
            None => reasons.push(StaleReason::ParamsChanged),
        }
    }
    if let (Some(old), Some(new)) = (&locked.revision, revision) {
        if old != new {
            reasons.push(StaleReason::RevisionChanged { old: old.clone(), new: new.to_string() });
        }
    }
    for (j, input) in node.inputs.iter().enumerate() {
        match &input.source {
            InputRef::Stage { stage: producer, .. } if outputs[*producer].is_none() => {
                reasons.push(StaleReason::UpstreamStale { stage: pipeline.nodes[*producer].name.clone() })
            }
            source => {
                let now = inputs.map(|all| all[j].1.digest());
                // Digests the lock leaves out are compared with the previous run's.
                let before = locked
                    .inputs
                    .get(&input.name)
                    .copied()
                    .or_else(|| previous.as_ref().and_then(|p| p.inputs.get(&input.name)).map(|a| a.digest()));
                if now.is_some() && before != now {
                    let from = match source {
                        InputRef::Local { shown, .. } => shown.clone(),
                        InputRef::Stage { stage, output } => format!("{}.{output}", pipeline.nodes[*stage].name),
                    };
                    reasons.push(StaleReason::InputChanged { input: input.name.clone(), from });
                }
            }
        }
    }
    reasons.dedup();
    if reasons.is_empty() {
        reasons.push(StaleReason::NotInCache);
    }
    reasons
}

/// Lists the leaves that differ between two parameter trees.
fn diff_params(old: &Value, new: &Value, path: &mut String, out: &mut Vec<StaleReason>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => diff_params(x, y, path, out),
                    (x, y) => out.push(StaleReason::ParamChanged { param: path.clone(), old: show(x), new: show(y) }),
                }
                path.truncate(len);
            }
        }
        (a, b) if a != b => out.push(StaleReason::ParamChanged { param: path.clone(), old: show(Some(a)), new: show(Some(b)) }),
        _ => {}
    }
}

fn show(value: Option<&Value>) -> String {
    value.map_or_else(|| "absent".to_string(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn param_diffs_name_the_leaf() {
        let mut out = Vec::new();
        diff_params(&json!({"lora": {"rank": 64, "alpha": 16}}), &json!({"lora": {"rank": 32, "alpha": 16}, "x": 1}), &mut String::new(), &mut out);
        let sentences: Vec<String> = out.iter().map(StaleReason::sentence).collect();
        assert_eq!(sentences, vec!["param lora.rank changed 64 → 32", "param x changed absent → 1"]);
    }
}
