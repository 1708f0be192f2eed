//! Weights as stored: a bf16 or f16 checkpoint's projections stay 16-bit in
//! memory while the model computes in f32 on the CPU.
//!
//! Decoding reads every weight once per step, so its speed is the memory
//! bandwidth over the bytes of the weights: 2-byte weights take half the time
//! of f32 ones. [`StoredDense`] keeps the raw 16-bit values and multiplies
//! with `swift_kernels::gemv_half` (widening to f32 in registers, f32
//! accumulation) for the few rows of a decoding step; for more rows (a
//! prompt) it widens a panel of at most [`PANEL_FLOATS`] weights at a time into f32
//! and runs candle's GEMM on it, so no f32 copy of a whole matrix is ever
//! held. Widening is exact, so the weights are the f32 values transformers
//! computes with after upcasting the same checkpoint.
//!
//! | checkpoint | compute | projection |
//! |---|---|---|
//! | bf16 / f16 | f32 on the CPU | [`StoredDense`] (2 bytes a weight) |
//! | anything else | any | [`Dense`] in the compute dtype |

use candle_core::{DType, Storage, Tensor};
use half::slice::HalfFloatSliceExt;
use swift_kernels::gemv_half::{gemv_rows_half, widen_into, Half};

use super::linear::{Dense, DenseLoader, LinearLoader, Projection, FEW_ROWS};
use super::weights::Weights;
use super::LlmError;

/// Weights widened to f32 at a time for a many-row product (32 MiB).
const PANEL_FLOATS: usize = 8 << 20;

/// A projection whose weight stays as the checkpoint's 16-bit values.
pub struct StoredDense {
    /// `[out, in]`, bf16 or f16, on the CPU.
    weight: Tensor,
    half: Half,
    /// f32.
    bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
}

impl StoredDense {
    /// Wraps a bf16 or f16 `[out, in]` weight and an f32 bias; `None` for
    /// other dtypes or devices.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> candle_core::Result<Option<Self>> {
        let half = match weight.dtype() {
            DType::BF16 => Half::Bf16,
            DType::F16 => Half::F16,
            _ => return Ok(None),
        };
        if !weight.device().is_cpu() {
            return Ok(None);
        }
        let (out_features, in_features) = weight.dims2()?;
        Ok(Some(Self { weight: weight.contiguous()?, half, bias, in_features, out_features }))
    }

    /// The weight's raw 16-bit values, to `f` (row-major `[out, in]`).
    fn with_raw<T>(&self, f: impl FnOnce(&[u16]) -> T) -> candle_core::Result<T> {
        let (storage, layout) = self.weight.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else { candle_core::bail!("a stored weight off the CPU") };
        let start = layout.start_offset();
        let count = self.out_features * self.in_features;
        let raw: &[u16] = match self.half {
            Half::Bf16 => cpu.as_slice::<half::bf16>()?[start..start + count].reinterpret_cast(),
            Half::F16 => cpu.as_slice::<half::f16>()?[start..start + count].reinterpret_cast(),
        };
        Ok(f(raw))
    }

    /// `x` (f32, a few rows) times the weight, through the 16-bit kernel.
    fn few_rows(&self, x: &Tensor, rows_in: usize) -> candle_core::Result<Tensor> {
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; rows_in * self.out_features];
        self.with_raw(|raw| gemv_rows_half(self.half, raw, &xs, self.in_features, &mut out))?;
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("x has a feature dimension") = self.out_features;
        Tensor::from_vec(out, dims, x.device())
    }

    /// `x` (f32, many rows) times the weight, a widened panel of weight rows
    /// at a time.
    fn many_rows(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let x2 = x.reshape(((), self.in_features))?;
        let panel_rows = (PANEL_FLOATS / self.in_features.max(1)).max(1);
        let mut panels = Vec::new();
        for first in (0..self.out_features).step_by(panel_rows) {
            let rows = panel_rows.min(self.out_features - first);
            let mut widened = vec![0f32; rows * self.in_features];
            self.with_raw(|raw| {
                widen_into(self.half, &raw[first * self.in_features..(first + rows) * self.in_features], &mut widened)
            })?;
            let panel = Tensor::from_vec(widened, (rows, self.in_features), x.device())?;
            panels.push(x2.matmul(&panel.t()?)?);
        }
        *dims.last_mut().expect("x has a feature dimension") = self.out_features;
        let y = if panels.len() == 1 { panels.pop().expect("one panel") } else { Tensor::cat(&panels, 1)? };
        y.reshape(dims)
    }

    fn with_bias(&self, y: Tensor) -> candle_core::Result<Tensor> {
        match &self.bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }

    fn apply(&self, x: &Tensor, few: usize) -> candle_core::Result<Tensor> {
        if x.dtype() != DType::F32 {
            candle_core::bail!("a stored 16-bit projection computes in f32, not {:?}", x.dtype());
        }
        let rows_in = x.elem_count() / self.in_features.max(1);
        let y = if rows_in <= few { self.few_rows(x, rows_in)? } else { self.many_rows(x)? };
        self.with_bias(y)
    }
}

impl Projection for StoredDense {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x, 1)
    }
    fn forward_batch(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x, FEW_ROWS)
    }
    fn in_features(&self) -> usize {
        self.in_features
    }
    fn out_features(&self) -> usize {
        self.out_features
    }
    fn weight_f32(&self) -> candle_core::Result<Tensor> {
        self.weight.to_dtype(DType::F32)
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    fn weight_bytes(&self) -> usize {
        self.weight.elem_count() * 2 + self.bias.as_ref().map_or(0, |b| b.elem_count() * 4)
    }
}

/// Loads projections as the checkpoint stores them when it stores them in
/// 16 bits and the model computes in f32 on the CPU; as [`Dense`] otherwise.
pub struct StoredLoader;

impl StoredLoader {
    fn stored(weights: &Weights, name: &str, shape: &[usize], bias: Option<Tensor>) -> Result<Option<Box<dyn Projection>>, LlmError> {
        if weights.dtype() != DType::F32 || !weights.device().is_cpu() {
            return Ok(None);
        }
        let stored = weights.stored_dtype(name)?;
        if !matches!(stored, DType::BF16 | DType::F16) {
            return Ok(None);
        }
        let weight = weights.get_as(name, shape, stored)?;
        Ok(StoredDense::new(weight, bias)?.map(|p| Box::new(p) as Box<dyn Projection>))
    }
}

impl LinearLoader for StoredLoader {
    fn load(&self, weights: &Weights, prefix: &str, in_features: usize, out_features: usize, bias: bool)
        -> Result<Box<dyn Projection>, LlmError> {
        let bias_tensor = if bias { Some(weights.get(&format!("{prefix}.bias"), &[out_features])?) } else { None };
        match Self::stored(weights, &format!("{prefix}.weight"), &[out_features, in_features], bias_tensor)? {
            Some(projection) => Ok(projection),
            None => DenseLoader.load(weights, prefix, in_features, out_features, bias),
        }
    }

    fn tied_head(&self, weights: &Weights, embed_tokens: &Tensor) -> Result<Box<dyn Projection>, LlmError> {
        let (vocab, hidden) = embed_tokens.dims2()?;
        match Self::stored(weights, "model.embed_tokens.weight", &[vocab, hidden], None)? {
            Some(projection) => Ok(projection),
            None => Ok(Box::new(Dense::new(embed_tokens.clone(), None)?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::llm::batch::BatchDecoder;
    use crate::llm::{Decoder, ModelConfig};

    const CONFIG: &str = r#"{"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 128,
        "tie_word_embeddings": true}"#;

    /// A random checkpoint stored in `dtype`.
    fn checkpoint(dir: &std::path::Path, dtype: DType) {
        std::fs::write(dir.join("config.json"), CONFIG).unwrap();
        Weights::write_random(dir, &ModelConfig::load(dir).unwrap(), dtype).unwrap();
    }

    fn load(dir: &std::path::Path, loader: &dyn LinearLoader) -> Decoder {
        Decoder::load(dir, ModelConfig::load(dir).unwrap(), DType::F32, &Device::Cpu, loader).unwrap()
    }

    #[test]
    fn a_bf16_checkpoint_computes_as_its_f32_upcast_with_half_the_bytes() {
        for dtype in [DType::BF16, DType::F16] {
            let dir = tempfile::tempdir().unwrap();
            checkpoint(dir.path(), dtype);
            let (stored, upcast) = (load(dir.path(), &StoredLoader), load(dir.path(), &DenseLoader));
            assert_eq!(stored.lm_head().weight_bytes() * 2, upcast.lm_head().weight_bytes(), "{dtype:?}: the tied head stays 16-bit");
            // Many rows (the panel GEMM) and one row (the 16-bit GEMV).
            let ids: Vec<u32> = (0..40).map(|i| (i * 37 % 300) as u32).collect();
            let positions: Vec<u32> = (0..40).collect();
            let a = stored.forward(&ids, &positions, &[0; 40], None, false).unwrap();
            let b = upcast.forward(&ids, &positions, &[0; 40], None, false).unwrap();
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "{dtype:?}: {diff}");
            let mut batch = BatchDecoder::new(&stored);
            let seq = batch.add();
            let last = batch.step(&[(seq, &ids)]).unwrap().remove(0);
            let one = upcast.forward(&ids, &positions, &[0; 40], None, true).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(last.iter().zip(&one).all(|(x, y)| (x - y).abs() < 1e-4), "{dtype:?}: the batch decoder on stored weights");
        }
    }
}
