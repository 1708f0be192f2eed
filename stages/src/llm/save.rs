//! Writing a model's tensors as transformers' `save_pretrained` does:
//! `model.safetensors`, or — above `max_shard_size` — shards named
//! `model-00001-of-00003.safetensors` with `model.safetensors.index.json`
//! (`metadata.total_size` and a sorted `weight_map`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use super::LlmError;

/// The single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The shard index name.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Writes `tensors` into `folder`, in order, starting a new shard whenever the
/// next tensor would take the current one over `max_shard_bytes` (a tensor
/// larger than that gets a shard of its own). Returns the files written.
pub fn write_checkpoint(folder: &Path, tensors: &[(String, Tensor)], max_shard_bytes: u64) -> Result<Vec<PathBuf>, LlmError> {
    let bytes = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
    let mut shards: Vec<Vec<&(String, Tensor)>> = vec![Vec::new()];
    let mut current = 0u64;
    for entry in tensors {
        let size = bytes(&entry.1);
        let last = shards.last_mut().expect("one shard at least");
        if !last.is_empty() && current + size > max_shard_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        shards.last_mut().expect("one shard at least").push(entry);
        current += size;
    }
    if shards.len() == 1 {
        let path = folder.join(SINGLE_FILE);
        save(&path, &shards[0])?;
        return Ok(vec![path]);
    }
    let count = shards.len();
    let mut written = Vec::new();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        let path = folder.join(&name);
        save(&path, shard)?;
        for (tensor, _) in shard.iter().map(|e| (&e.0, &e.1)) {
            weight_map.insert(tensor.clone(), name.clone());
        }
        written.push(path);
    }
    let total_size: u64 = tensors.iter().map(|(_, t)| bytes(t)).sum();
    let index = serde_json::json!({ "metadata": { "total_size": total_size }, "weight_map": weight_map });
    let path = folder.join(INDEX_FILE);
    let text = serde_json::to_string_pretty(&index).expect("index serializes") + "\n";
    std::fs::write(&path, text).map_err(|e| LlmError::io(&path, e))?;
    written.push(path);
    Ok(written)
}

fn save(path: &Path, tensors: &[&(String, Tensor)]) -> Result<(), LlmError> {
    let map: HashMap<&str, Tensor> = tensors.iter().map(|(name, t)| (name.as_str(), t.clone())).collect();
    candle_core::safetensors::save(&map, path).map_err(|e| LlmError::Weights { path: path.to_path_buf(), message: format!("writing: {e}") })
}

/// Parses a size as transformers' `max_shard_size` takes it: a number of bytes,
/// or a number with `KB`/`MB`/`GB` (powers of 1000) or `KiB`/`MiB`/`GiB`
/// (powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let unit_bytes: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KIB" => 1 << 10,
        "MIB" => 1 << 20,
        "GIB" => 1 << 30,
        _ => return Err(format!("{text:?} is not a size: write bytes, or a number with KB, MB, GB, KiB, MiB or GiB (\"5GB\")")),
    };
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a size: it should start with a number (\"5GB\")"))?;
    let bytes = value * unit_bytes as f64;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("{text:?} is not a usable shard size: it must be at least one byte"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn sizes_parse_like_transformers() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("1.5 MB").unwrap(), 1_500_000);
        assert_eq!(parse_size("2KiB").unwrap(), 2048);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert!(parse_size("5 parsecs").unwrap_err().contains("KB, MB, GB"));
        assert!(parse_size("GB").unwrap_err().contains("start with a number"));
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn shards_split_at_the_limit_and_the_index_maps_every_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let t = |n: usize| Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();
        let tensors = vec![("a".to_string(), t(10)), ("b".to_string(), t(10)), ("c".to_string(), t(30)), ("d".to_string(), t(1))];
        // 40, 40, 120, 4 bytes with an 80-byte limit: [a, b], [c], [d].
        let files = write_checkpoint(dir.path(), &tensors, 80).unwrap();
        assert_eq!(files.len(), 4);
        let index: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join(INDEX_FILE)).unwrap()).unwrap();
        assert_eq!(index["metadata"]["total_size"], 204);
        assert_eq!(index["weight_map"]["b"], "model-00001-of-00003.safetensors");
        assert_eq!(index["weight_map"]["c"], "model-00002-of-00003.safetensors");
        assert_eq!(index["weight_map"]["d"], "model-00003-of-00003.safetensors");
        let single = tempfile::tempdir().unwrap();
        assert_eq!(write_checkpoint(single.path(), &tensors, 1 << 20).unwrap(), vec![single.path().join(SINGLE_FILE)]);
    }
}
