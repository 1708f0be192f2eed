//! Training checkpoints in the stage's scratch folder: the adapter tensors,
//! AdamW's moments and step, and the step reached with its log so far. The
//! data order and dropout masks are functions of the seed and the step, so
//! this is all a resumed run needs to end bit-identical to an uninterrupted one.
//!
//! Layout: `checkpoints/step-NNNNNNNN-<nonce>/{tensors.safetensors,state.json}`,
//! a fresh folder each time, made complete and fsynced before
//! `checkpoints/latest` (written atomically) names it; older folders are
//! removed after. A crash at any point leaves `latest` naming a complete
//! checkpoint. (The engine removes the whole scratch folder once the stage's
//! outputs are stored.)

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// The format tag in `state.json`.
const FORMAT: &str = "swift-finetune-checkpoint-v1";

/// Everything a resumed run restores.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// Optimizer steps completed.
    pub step: usize,
    /// Adapter tensors, flattened, in the trainer's order.
    pub params: Vec<Vec<f32>>,
    /// AdamW's state.
    pub optimizer_step: u64,
    /// AdamW first moments.
    pub m: Vec<Vec<f32>>,
    /// AdamW second moments.
    pub v: Vec<Vec<f32>>,
    /// Log lines written so far (JSON objects).
    pub log: Vec<serde_json::Value>,
    /// Names of the parameter tensors, to check a checkpoint fits.
    pub names: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct State {
    format: String,
    step: usize,
    optimizer_step: u64,
    names: Vec<String>,
    log: Vec<serde_json::Value>,
}

fn dir(scratch: &Path) -> PathBuf {
    scratch.join("checkpoints")
}

/// Saves a checkpoint and makes it the latest.
pub fn save(scratch: &Path, checkpoint: &Checkpoint) -> anyhow::Result<()> {
    let root = dir(scratch);
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let name = format!("step-{:08}-{nonce:x}", checkpoint.step);
    let folder = root.join(&name);
    std::fs::create_dir_all(&folder).with_context(|| format!("creating {}", folder.display()))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (kind, buffers) in [("param", &checkpoint.params), ("m", &checkpoint.m), ("v", &checkpoint.v)] {
        for (i, values) in buffers.iter().enumerate() {
            tensors.insert(format!("{kind}.{i}"), Tensor::from_slice(values, values.len(), &Device::Cpu)?);
        }
    }
    let tensors_path = folder.join("tensors.safetensors");
    candle_core::safetensors::save(&tensors, &tensors_path)?;
    std::fs::File::open(&tensors_path)?.sync_all()?;
    let state = State {
        format: FORMAT.into(),
        step: checkpoint.step,
        optimizer_step: checkpoint.optimizer_step,
        names: checkpoint.names.clone(),
        log: checkpoint.log.clone(),
    };
    swift_cache::atomic::write_atomic(&folder.join("state.json"), &serde_json::to_vec(&state)?)?;
    swift_cache::atomic::sync_dir(&folder)?;
    swift_cache::atomic::write_atomic(&root.join("latest"), name.as_bytes())?;
    for entry in std::fs::read_dir(&root)? {
        let entry = entry?;
        let other = entry.file_name();
        if other != *name && other.to_string_lossy().starts_with("step-") {
            std::fs::remove_dir_all(entry.path()).ok();
        }
    }
    Ok(())
}

/// The latest checkpoint, if a previous attempt left one.
pub fn load_latest(scratch: &Path) -> anyhow::Result<Option<Checkpoint>> {
    let root = dir(scratch);
    let latest = match std::fs::read_to_string(root.join("latest")) {
        Ok(name) => name,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context("reading the latest checkpoint's name"),
    };
    let folder = root.join(latest.trim());
    let state_path = folder.join("state.json");
    let bytes = std::fs::read(&state_path).with_context(|| format!("reading {}", state_path.display()))?;
    let state: State = serde_json::from_slice(&bytes)
        .with_context(|| format!("{}: unreadable checkpoint state", folder.display()))?;
    if state.format != FORMAT {
        bail!("{}: unknown checkpoint format `{}`", folder.display(), state.format);
    }
    let tensors_path = folder.join("tensors.safetensors");
    let tensors = candle_core::safetensors::load(&tensors_path, &Device::Cpu)
        .with_context(|| format!("reading {}", tensors_path.display()))?;
    let take = |kind: &str| -> anyhow::Result<Vec<Vec<f32>>> {
        (0..state.names.len())
            .map(|i| {
                let t = tensors.get(&format!("{kind}.{i}")).with_context(|| format!("checkpoint lacks {kind}.{i}"))?;
                Ok(t.to_vec1::<f32>()?)
            })
            .collect()
    };
    Ok(Some(Checkpoint {
        step: state.step,
        params: take("param")?,
        optimizer_step: state.optimizer_step,
        m: take("m")?,
        v: take("v")?,
        log: state.log,
        names: state.names,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_checkpoint_loads_back_bit_identical_and_replaces_older_ones() {
        let scratch = tempfile::tempdir().unwrap();
        assert!(load_latest(scratch.path()).unwrap().is_none());
        let mut c = Checkpoint {
            step: 3,
            params: vec![vec![1.5, f32::MIN_POSITIVE], vec![-0.0]],
            optimizer_step: 3,
            m: vec![vec![0.1, 0.2], vec![0.3]],
            v: vec![vec![1e-30, 2.0], vec![4.0]],
            log: vec![serde_json::json!({"step": 1, "loss": 2.5})],
            names: vec!["a".into(), "b".into()],
        };
        save(scratch.path(), &c).unwrap();
        c.step = 4;
        save(scratch.path(), &c).unwrap();
        // Saving the same step again (Ctrl-C right after a periodic save) never
        // removes the checkpoint `latest` names before the new one is complete.
        save(scratch.path(), &c).unwrap();
        assert_eq!(load_latest(scratch.path()).unwrap().unwrap(), c);
        let entries: Vec<_> = std::fs::read_dir(dir(scratch.path())).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(entries.len(), 2, "{entries:?}"); // latest + one step folder
    }
}
