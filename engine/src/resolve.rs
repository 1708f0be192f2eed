//! What planning, running and `status` share: hashing local inputs (through the
//! stat cache), turning inputs into artifacts, computing keys and looking them up.

use std::collections::HashMap;
use std::path::PathBuf;

use indexmap::IndexMap;
use swift_cache::{hash_path, ActionEntry, Artifact, HashStats, Hashed, StageKey, StatCache, Store};

use crate::key::{params_digest, recipe, stage_key};
use crate::kind::InputValue;
use crate::pipeline::{InputRef, Pipeline};

/// A local input after hashing.
#[derive(Clone, Debug)]
pub struct LocalInput {
    /// As an artifact (what enters the key).
    pub artifact: Artifact,
    /// What hashing found.
    pub hashed: Hashed,
}

/// Hashed local inputs by `(stage index, input index)`.
pub type Locals = HashMap<(usize, usize), LocalInput>;

/// The artifact a hashed local path stands for.
pub fn local_artifact(path: &std::path::Path, hashed: &Hashed) -> Artifact {
    match hashed {
        Hashed::File { digest, size, executable } => Artifact::File {
            digest: *digest,
            size: *size,
            name: path.file_name().and_then(|n| n.to_str()).unwrap_or("input").to_string(),
            executable: *executable,
        },
        Hashed::Tree(listing) => {
            Artifact::Tree { digest: listing.digest(), size: listing.total_size(), files: listing.entries().len() as u64 }
        }
    }
}

/// Hashes the local inputs of the given stages. Keys are `(stage, input index)`.
pub fn hash_locals(
    pipeline: &Pipeline,
    stages: impl IntoIterator<Item = usize>,
    stats: &StatCache,
    rehash: bool,
) -> anyhow::Result<(Locals, HashStats)> {
    let mut out = HashMap::new();
    let mut total = HashStats::default();
    for i in stages {
        for (j, input) in pipeline.nodes[i].inputs.iter().enumerate() {
            if let InputRef::Local { path, shown } = &input.source {
                let (hashed, summary) = hash_path(path, stats, rehash).map_err(|e| {
                    anyhow::anyhow!("stage `{}`: cannot read input `{shown}`: {e}", pipeline.nodes[i].name)
                })?;
                total.bytes_hashed += summary.bytes_hashed;
                total.stat_hits += summary.stat_hits;
                out.insert((i, j), LocalInput { artifact: local_artifact(path, &hashed), hashed });
            }
        }
    }
    Ok((out, total))
}

/// A stage's inputs as artifacts, once every producer's outputs are known.
pub fn input_artifacts(
    pipeline: &Pipeline,
    stage: usize,
    locals: &Locals,
    outputs: &[Option<IndexMap<String, Artifact>>],
) -> Option<Vec<(String, Artifact)>> {
    pipeline.nodes[stage]
        .inputs
        .iter()
        .enumerate()
        .map(|(j, input)| {
            let artifact = match &input.source {
                InputRef::Local { .. } => locals.get(&(stage, j))?.artifact.clone(),
                InputRef::Stage { stage: producer, output } => outputs[*producer].as_ref()?.get(output)?.clone(),
            };
            Some((input.name.clone(), artifact))
        })
        .collect()
}

/// The inputs a running stage sees: paths to read and, for local ones, the hashing.
pub fn input_values(
    pipeline: &Pipeline,
    store: &Store,
    stage: usize,
    artifacts: &[(String, Artifact)],
    locals: &Locals,
) -> std::io::Result<IndexMap<String, InputValue>> {
    let mut values = IndexMap::new();
    for (j, (input, (name, artifact))) in pipeline.nodes[stage].inputs.iter().zip(artifacts).enumerate() {
        let (path, hashed, shown): (PathBuf, _, _) = match &input.source {
            InputRef::Local { path, .. } => (path.clone(), locals.get(&(stage, j)).map(|l| l.hashed.clone()), None),
            InputRef::Stage { stage: producer, .. } => {
                (store.materialize(artifact)?, None, original_of(pipeline, locals, *producer, artifact))
            }
        };
        values.insert(name.clone(), InputValue { artifact: artifact.clone(), path, hashed, shown });
    }
    Ok(values)
}

/// The local file or folder, as the manifest names it, of which `artifact`
/// (an output of `producer`) is a verbatim copy: a local input of the
/// producer (or of its producers, copy after copy) with the same digest.
/// This is how a stage's messages name `data/law.jsonl` rather than the
/// store's `.swift/m/2936…/law.jsonl` that a download stage made of it.
fn original_of(pipeline: &Pipeline, locals: &Locals, producer: usize, artifact: &Artifact) -> Option<String> {
    pipeline.nodes[producer].inputs.iter().enumerate().find_map(|(j, input)| match &input.source {
        InputRef::Local { shown, .. } => {
            (locals.get(&(producer, j))?.artifact.digest() == artifact.digest()).then(|| shown.clone())
        }
        InputRef::Stage { stage, .. } => original_of(pipeline, locals, *stage, artifact),
    })
}

/// The store paths of a stage's inputs that are copies of the user's files,
/// each with the name the manifest gives the original (see [`original_of`]).
pub fn user_names(
    pipeline: &Pipeline,
    store: &Store,
    stage: usize,
    artifacts: &[(String, Artifact)],
    locals: &Locals,
) -> Vec<(PathBuf, String)> {
    pipeline.nodes[stage]
        .inputs
        .iter()
        .zip(artifacts)
        .filter_map(|(input, (_, artifact))| match &input.source {
            InputRef::Stage { stage: producer, .. } => {
                Some((store.materialized_path(artifact), original_of(pipeline, locals, *producer, artifact)?))
            }
            InputRef::Local { .. } => None,
        })
        .collect()
}

/// `message` with every store path in `names` (and paths inside it) given as
/// the user's original.
pub fn with_user_names(message: &str, names: &[(PathBuf, String)]) -> String {
    names.iter().fold(message.to_string(), |text, (path, shown)| text.replace(&path.display().to_string(), shown))
}

/// The stage's key given its resolved revision and input artifacts.
pub fn key_of(pipeline: &Pipeline, stage: usize, revision: Option<&str>, inputs: &[(String, Artifact)]) -> StageKey {
    let node = &pipeline.nodes[stage];
    stage_key(&node.kind, node.kind_version, &node.plan.params(), revision, inputs)
}

/// The recipes of `stages` (see [`crate::key::recipe`]) by index; a stage's
/// producers must be among `stages`.
pub fn recipes(
    pipeline: &Pipeline,
    stages: &std::collections::BTreeSet<usize>,
    revisions: &[Option<String>],
    locals: &Locals,
) -> HashMap<usize, StageKey> {
    let mut out: HashMap<usize, StageKey> = HashMap::new();
    for &i in pipeline.order.iter().filter(|i| stages.contains(i)) {
        let node = &pipeline.nodes[i];
        let inputs: Vec<(String, serde_json::Value)> = node
            .inputs
            .iter()
            .enumerate()
            .map(|(j, input)| {
                let value = match &input.source {
                    InputRef::Local { .. } => serde_json::to_value(&locals[&(i, j)].artifact).expect("artifacts serialize"),
                    InputRef::Stage { stage, output } => serde_json::json!({"recipe": out[stage].to_hex(), "output": output}),
                };
                (input.name.clone(), value)
            })
            .collect();
        out.insert(i, recipe(&node.kind, node.kind_version, &node.plan.params(), revisions[i].as_deref(), &inputs));
    }
    out
}

/// Resolves the upstream revisions of the given stages (index → revision);
/// with `locked`, each stage gets the revision its lock entry pins.
pub fn resolve_revisions(
    pipeline: &Pipeline,
    stages: impl IntoIterator<Item = usize>,
    lock: Option<&swift_cache::LockFile>,
    offline: bool,
    locked: bool,
) -> anyhow::Result<Vec<Option<String>>> {
    let mut revisions = vec![None; pipeline.nodes.len()];
    for i in stages {
        let node = &pipeline.nodes[i];
        let pinned = if locked { lock.and_then(|l| l.stages.get(&node.name)).and_then(|s| s.revision.clone()) } else { None };
        let ctx = crate::kind::ResolveCtx { offline, locked: pinned };
        revisions[i] = node.plan.resolve(&ctx).map_err(|e| anyhow::anyhow!("stage `{}`: {e:#}", node.name))?;
    }
    Ok(revisions)
}

/// The stage's parameter digest (what `--locked` compares).
pub fn params_of(pipeline: &Pipeline, stage: usize) -> StageKey {
    let node = &pipeline.nodes[stage];
    params_digest(&node.kind, node.kind_version, &node.plan.params())
}

/// The cached entry for a key, with its outputs materialized; `None` on a miss
/// or when the entry's objects are gone (then the stage simply runs again).
pub fn lookup(store: &Store, key: &StageKey) -> Option<(ActionEntry, IndexMap<String, PathBuf>)> {
    let entry = store.read_action(key).ok()??;
    let mut paths = IndexMap::new();
    for (name, artifact) in &entry.outputs {
        paths.insert(name.clone(), store.materialize(artifact).ok()?);
    }
    Some((entry, paths))
}
