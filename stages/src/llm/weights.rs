//! Safetensors checkpoints: `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`, memory-mapped. Every tensor is checked
//! against the shape the config implies before it is used, and every error
//! names the file and the tensor. For benchmarks, [`Weights::random`] makes
//! up every tensor on the device instead (no checkpoint of many GB to write).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::save::TensorPlan;
use super::LlmError;

/// The tensors of one model folder.
pub struct Weights {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    index: HashMap<String, usize>,
    folder: PathBuf,
    dtype: DType,
    device: Device,
    /// Made-up tensors instead of files (`lm_head.weight` absent when tied).
    random: Option<RandomWeights>,
}

/// What [`Weights::random`] makes up.
#[derive(Clone, Copy)]
struct RandomWeights {
    tied_embeddings: bool,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

impl Weights {
    /// Opens the weights of a model folder; tensors come back in `dtype` on `device`.
    pub fn open(folder: &Path, dtype: DType, device: &Device) -> Result<Self, LlmError> {
        let index_path = folder.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| LlmError::io(&index_path, e))?;
            let index: ShardIndex = serde_json::from_str(&text)
                .map_err(|e| LlmError::Weights { path: index_path.clone(), message: format!("not a shard index: {e}") })?;
            let mut shards: Vec<String> = index.weight_map.into_values().collect();
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|s| folder.join(s)).collect()
        } else {
            let single = folder.join("model.safetensors");
            if !single.exists() {
                return Err(LlmError::Weights {
                    path: folder.to_path_buf(),
                    message: "no model.safetensors or model.safetensors.index.json in this folder".into(),
                });
            }
            vec![single]
        };
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for path in paths {
            // SAFETY: the file is mapped read-only; swift's cache never changes a
            // stored object, and a user folder changing while a model loads is
            // outside what any loader can defend against (transformers included).
            let st = unsafe { MmapedSafetensors::new(&path) }.map_err(|e| LlmError::Weights {
                path: path.clone(),
                message: format!("not a valid safetensors file: {}", strip_path(&e.to_string())),
            })?;
            for (name, _) in st.tensors() {
                index.insert(name, files.len());
            }
            files.push((path, st));
        }
        Ok(Self { files, index, folder: folder.to_path_buf(), dtype, device: device.clone(), random: None })
    }

    /// Weights that make up every tensor asked for, on `device` in `dtype`:
    /// norm weights 1, everything else normal with σ = 0.02 (transformers'
    /// `initializer_range`), for benchmarks of real shapes without a
    /// checkpoint. `lm_head.weight` is absent when the embeddings are tied.
    pub fn random(dtype: DType, device: &Device, tied_embeddings: bool) -> Self {
        Self {
            files: Vec::new(),
            index: HashMap::new(),
            folder: PathBuf::from("<random weights>"),
            dtype,
            device: device.clone(),
            random: Some(RandomWeights { tied_embeddings }),
        }
    }

    /// Writes a checkpoint of `config` with these random weights to
    /// `folder/model.safetensors`, every tensor in `dtype` (through a
    /// temporary name, so a half-written file is never taken for one): real
    /// shapes for benchmarks and tests without a download.
    pub fn write_random(folder: &Path, config: &super::ModelConfig, dtype: DType) -> Result<(), LlmError> {
        let weights = Self::random(DType::F32, &Device::Cpu, config.tie_word_embeddings);
        let mut tensors = HashMap::new();
        for (name, shape) in config.checkpoint_shapes() {
            let tensor = weights.get(&name, &shape)?.to_dtype(dtype)?;
            tensors.insert(name, tensor);
        }
        let (path, partial) = (folder.join("model.safetensors"), folder.join("model.safetensors.partial"));
        candle_core::safetensors::save(&tensors, &partial)?;
        std::fs::rename(&partial, &path).map_err(|e| LlmError::io(&path, e))
    }

    /// An error about this checkpoint, naming its folder.
    pub fn error(&self, message: String) -> LlmError {
        LlmError::Weights { path: self.folder.clone(), message }
    }

    /// Every tensor's name, stored dtype and shape, in natural name order
    /// (`layers.2` before `layers.10`): the plan to rewrite the checkpoint.
    pub fn plan(&self) -> Result<Vec<TensorPlan>, LlmError> {
        let mut plan = Vec::with_capacity(self.index.len());
        for (name, &file) in &self.index {
            let (path, st) = &self.files[file];
            let bad = |e: String| LlmError::Weights { path: path.clone(), message: format!("tensor `{name}`: {e}") };
            let view = st.get(name).map_err(|e| bad(e.to_string()))?;
            let dtype = DType::try_from(view.dtype()).map_err(|e| bad(e.to_string()))?;
            plan.push(TensorPlan { name: name.clone(), dtype, shape: view.shape().to_vec() });
        }
        plan.sort_by_cached_key(|t| (natural_key(&t.name), t.name.clone()));
        Ok(plan)
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        match self.random {
            Some(random) => !(random.tied_embeddings && name == "lm_head.weight"),
            None => self.index.contains_key(name),
        }
    }

    /// The compute dtype tensors are converted to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device tensors are loaded on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype a tensor is stored in (the checkpoint's dtype).
    pub fn stored_dtype(&self, name: &str) -> Result<DType, LlmError> {
        if self.random.is_some() {
            return Ok(self.dtype);
        }
        let Some(&file) = self.index.get(name) else {
            return Err(LlmError::Weights { path: self.folder.clone(), message: format!("tensor `{name}` is missing") });
        };
        let (path, st) = &self.files[file];
        let view = st.get(name).map_err(|e| LlmError::Weights { path: path.clone(), message: format!("tensor `{name}`: {e}") })?;
        DType::try_from(view.dtype()).map_err(|e| LlmError::Weights { path: path.clone(), message: format!("tensor `{name}`: {e}") })
    }

    /// Loads a tensor after checking its shape, converted to the compute dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, LlmError> {
        self.get_as(name, shape, self.dtype)
    }

    /// Loads a tensor after checking its shape, converted to `dtype`.
    pub fn get_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor, LlmError> {
        if self.random.is_some() {
            let made = if name.ends_with("norm.weight") {
                Tensor::ones(shape, DType::F32, &self.device)?
            } else {
                Tensor::randn(0f32, 0.02, shape, &self.device)?
            };
            return Ok(made.to_dtype(dtype)?);
        }
        let Some(&file) = self.index.get(name) else {
            return Err(LlmError::Weights { path: self.folder.clone(), message: format!("tensor `{name}` is missing") });
        };
        let (path, st) = &self.files[file];
        let err = |message: String| LlmError::Weights { path: path.clone(), message };
        let view = st.get(name).map_err(|e| err(format!("tensor `{name}`: {e}")))?;
        if view.shape() != shape {
            return Err(err(format!(
                "tensor `{name}` has shape {:?}, but config.json implies {shape:?}",
                view.shape()
            )));
        }
        let tensor = st.load(name, &self.device).map_err(|e| err(format!("tensor `{name}`: {}", strip_path(&e.to_string()))))?;
        Ok(tensor.to_dtype(dtype)?)
    }
}

/// A sort key that orders the numbers inside names by value.
fn natural_key(name: &str) -> Vec<(String, u64)> {
    name.split('.').map(|part| match part.parse::<u64>() {
        Ok(n) => (String::new(), n),
        Err(_) => (part.to_string(), 0),
    }).collect()
}

/// candle appends the path to some messages; we name it ourselves.
fn strip_path(message: &str) -> String {
    message.lines().next().unwrap_or(message).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) {
        std::fs::write(dir.join(name), bytes).unwrap();
    }

    fn valid_file() -> Vec<u8> {
        let t = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        candle_core::safetensors::save(&HashMap::from([("w", t)]), &path).unwrap();
        std::fs::read(&path).unwrap()
    }

    #[test]
    fn shape_mismatch_names_file_and_tensor() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "model.safetensors", &valid_file());
        let weights = Weights::open(dir.path(), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(weights.get("w", &[2, 3]).unwrap().dims(), &[2, 3]);
        let e = weights.get("w", &[3, 2]).unwrap_err().to_string();
        assert!(e.contains("model.safetensors") && e.contains("tensor `w` has shape [2, 3]"), "{e}");
        let e = weights.get("absent", &[1]).unwrap_err().to_string();
        assert!(e.contains("tensor `absent` is missing"), "{e}");
    }

    #[test]
    fn truncated_and_lying_headers_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let good = valid_file();
        write(dir.path(), "model.safetensors", &good[..good.len() - 4]);
        let e = Weights::open(dir.path(), DType::F32, &Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("model.safetensors: not a valid safetensors file"), "{e}");
        let mut lying = good.clone();
        lying[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        write(dir.path(), "model.safetensors", &lying);
        let e = Weights::open(dir.path(), DType::F32, &Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("not a valid safetensors file"), "{e}");
        std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
        let e = Weights::open(dir.path(), DType::F32, &Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("no model.safetensors"), "{e}");
    }

    #[test]
    fn random_weights_make_up_every_tensor_but_a_tied_head() {
        let weights = Weights::random(DType::BF16, &Device::Cpu, true);
        assert!(weights.contains("model.layers.0.mlp.up_proj.weight") && !weights.contains("lm_head.weight"));
        assert!(Weights::random(DType::F32, &Device::Cpu, false).contains("lm_head.weight"));
        assert_eq!(weights.stored_dtype("anything").unwrap(), DType::BF16);
        let norm = weights.get("model.norm.weight", &[8]).unwrap();
        assert_eq!(norm.dtype(), DType::BF16);
        assert_eq!(norm.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(), vec![1.0; 8]);
        let w = weights.get_as("model.embed_tokens.weight", &[64, 32], DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let std = (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt();
        assert!((0.015..0.025).contains(&std), "σ = {std}");
    }

}
