//! Writing a model's tensors as transformers' `save_pretrained` does:
//! `model.safetensors`, or — above `max_shard_size` — shards named
//! `model-00001-of-00003.safetensors` with `model.safetensors.index.json`
//! (`metadata.total_size` and a sorted `weight_map`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors as st;

use super::LlmError;

/// The single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The shard index name.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One tensor of a checkpoint, known before its data is: name, dtype, shape.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorPlan {
    /// Its name in the checkpoint.
    pub name: String,
    /// Its dtype on disk.
    pub dtype: DType,
    /// Its shape.
    pub shape: Vec<usize>,
}

impl TensorPlan {
    /// The plan of an existing tensor.
    pub fn of(name: &str, tensor: &Tensor) -> Self {
        Self { name: name.to_string(), dtype: tensor.dtype(), shape: tensor.dims().to_vec() }
    }

    fn bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()) as u64
    }
}

/// Writes `tensors` into `folder`, in order, starting a new shard whenever the
/// next tensor would take the current one over `max_shard_bytes` (a tensor
/// larger than that gets a shard of its own). Returns the files written.
pub fn write_checkpoint(folder: &Path, tensors: &[(String, Tensor)], max_shard_bytes: u64) -> Result<Vec<PathBuf>, LlmError> {
    let plan: Vec<TensorPlan> = tensors.iter().map(|(name, t)| TensorPlan::of(name, t)).collect();
    let by_name: std::collections::HashMap<&str, &Tensor> = tensors.iter().map(|(name, t)| (name.as_str(), t)).collect();
    write_streamed(folder, &plan, max_shard_bytes, |t| Ok(by_name[t.name.as_str()].clone()))
}

/// Like [`write_checkpoint`], with each tensor made by `produce` only when its
/// turn comes and dropped once written: memory holds one tensor at a time, so
/// a checkpoint larger than memory can be rewritten (a merge of a 7B model).
/// `produce` is called once per plan entry, in order, and must return a tensor
/// of the planned dtype and shape; the order it is called in is the file's
/// (see [`write_file`]), not the plan's.
pub fn write_streamed(
    folder: &Path,
    plan: &[TensorPlan],
    max_shard_bytes: u64,
    mut produce: impl FnMut(&TensorPlan) -> Result<Tensor, LlmError>,
) -> Result<Vec<PathBuf>, LlmError> {
    let shards = shard(plan, max_shard_bytes);
    if shards.len() == 1 {
        let path = folder.join(SINGLE_FILE);
        write_file(&path, shards[0], &mut produce)?;
        return Ok(vec![path]);
    }
    let count = shards.len();
    let mut written = Vec::new();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        let path = folder.join(&name);
        write_file(&path, shard, &mut produce)?;
        for tensor in shard.iter() {
            weight_map.insert(tensor.name.clone(), name.clone());
        }
        written.push(path);
    }
    let total_size: u64 = plan.iter().map(TensorPlan::bytes).sum();
    let index = serde_json::json!({ "metadata": { "total_size": total_size }, "weight_map": weight_map });
    let path = folder.join(INDEX_FILE);
    let text = serde_json::to_string_pretty(&index).expect("index serializes") + "\n";
    std::fs::write(&path, text).map_err(|e| LlmError::io(&path, e))?;
    written.push(path);
    Ok(written)
}

/// Splits the plan into shards of at most `max_shard_bytes` (but at least one tensor).
fn shard(plan: &[TensorPlan], max_shard_bytes: u64) -> Vec<&[TensorPlan]> {
    let mut shards = Vec::new();
    let (mut start, mut current) = (0, 0u64);
    for (i, tensor) in plan.iter().enumerate() {
        if i > start && current + tensor.bytes() > max_shard_bytes {
            shards.push(&plan[start..i]);
            (start, current) = (i, 0);
        }
        current += tensor.bytes();
    }
    shards.push(&plan[start..]);
    shards
}

/// Writes one safetensors file exactly as the `safetensors` crate serializes
/// (tensors ordered by descending dtype, then name; its own header), with
/// each tensor's bytes made by `produce` only when its turn comes.
fn write_file(
    path: &Path,
    plan: &[TensorPlan],
    produce: &mut impl FnMut(&TensorPlan) -> Result<Tensor, LlmError>,
) -> Result<(), LlmError> {
    let io = |e: std::io::Error| LlmError::io(path, e);
    let bad = |message: String| LlmError::Weights { path: path.to_path_buf(), message };
    let mut order: Vec<&TensorPlan> = plan.iter().collect();
    order.sort_by(|a, b| st::Dtype::from(b.dtype).cmp(&st::Dtype::from(a.dtype)).then(a.name.cmp(&b.name)));
    let mut infos = Vec::with_capacity(order.len());
    let mut offset = 0;
    for tensor in &order {
        let bytes = tensor.bytes() as usize;
        infos.push((tensor.name.clone(), TensorInfo { dtype: tensor.dtype.into(), shape: tensor.shape.clone(), data_offsets: (offset, offset + bytes) }));
        offset += bytes;
    }
    let header = Metadata::new(None, infos).map_err(|e| bad(format!("safetensors header: {e}")))?;
    let mut header = serde_json::to_string(&header).map_err(|e| bad(format!("safetensors header: {e}")))?.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    out.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    out.write_all(&header).map_err(io)?;
    for tensor in order {
        let data = produce(tensor)?;
        if data.dtype() != tensor.dtype || data.dims() != tensor.shape.as_slice() {
            return Err(bad(format!(
                "tensor `{}` came out {:?} {:?}, planned {:?} {:?}",
                tensor.name,
                data.dtype(),
                data.dims(),
                tensor.dtype,
                tensor.shape
            )));
        }
        out.write_all(&st::View::data(&data.contiguous()?)).map_err(io)?;
    }
    out.into_inner().map_err(|e| io(e.into_error()))?.sync_all().map_err(io)
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
    use candle_core::Device;

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
