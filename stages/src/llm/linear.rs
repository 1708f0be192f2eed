//! The one abstraction every projection of the decoder goes through.
//!
//! The decoder asks a [`LinearLoader`] for each of its projections by checkpoint
//! prefix (`model.layers.3.self_attn.q_proj`) and gets back a [`Projection`]:
//! dense weights here; NF4 and AWQ int4 weights, and LoRA adapters wrapped around
//! any of them, are further implementations of the same two traits.

use candle_core::{DType, Module, Storage, Tensor};

use super::weights::Weights;
use super::LlmError;

/// `y = x Wᵀ (+ b)` for `x` of shape `[…, in_features]`, however `W` is stored.
pub trait Projection: Send + Sync {
    /// Applies the projection.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor>;
    /// Applies the projection to one step of the batch decoder (a row per
    /// decoding sequence, or prompt chunks): the same result as `forward`
    /// up to the last bits, and for a few rows each row's result equals
    /// `forward` on that row alone. Formats with a kernel for that case
    /// override it.
    fn forward_batch(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward(x)
    }
    /// Input size.
    fn in_features(&self) -> usize;
    /// Output size.
    fn out_features(&self) -> usize;
    /// The weight as a dense f32 `[out, in]` matrix (dequantized if stored
    /// quantized), for DoRA's weight norm and for tests.
    fn weight_f32(&self) -> candle_core::Result<Tensor>;
    /// The bias, if any.
    fn bias(&self) -> Option<&Tensor>;
    /// Bytes the stored weight (and bias) occupy.
    fn weight_bytes(&self) -> usize;
    /// The weight `[out, in]` when the projection is a plain frozen matrix
    /// without a bias (so a caller may fuse the product into what follows
    /// it, as the fused linear + cross-entropy does with `lm_head`).
    fn plain_weight(&self) -> Option<&Tensor> {
        None
    }
    /// `dL/dx = dL/dy · W` for an upstream gradient `dy` `[rows, out]` (the
    /// weight is frozen: no weight gradient), in `dy`'s dtype: the backward
    /// of the base product inside fused adapter ops. The default multiplies
    /// by [`Projection::weight_f32`]; stored formats override it.
    fn input_grad(&self, dy: &Tensor) -> candle_core::Result<Tensor> {
        dy.matmul(&self.weight_f32()?.to_device(dy.device())?.to_dtype(dy.dtype())?)
    }
}

/// Builds the decoder's projections from a checkpoint.
pub trait LinearLoader {
    /// Loads `{prefix}.weight` (`[out, in]`) and, if `bias`, `{prefix}.bias`.
    fn load(&self, weights: &Weights, prefix: &str, in_features: usize, out_features: usize, bias: bool)
        -> Result<Box<dyn Projection>, LlmError>;
    /// `lm_head` for a model that ties it to the input embeddings (already
    /// loaded, in the compute dtype): by default that very matrix.
    fn tied_head(&self, _weights: &Weights, embed_tokens: &Tensor) -> Result<Box<dyn Projection>, LlmError> {
        Ok(Box::new(Dense::new(embed_tokens.clone(), None)?))
    }
}

/// Rows at most that [`Dense::forward_batch`] (and the 16-bit
/// `StoredDense`'s) multiplies by matrix-vector products rather than candle's GEMM, which packs the whole weight on every
/// call and so reads it several times over for a handful of rows.
pub(crate) const FEW_ROWS: usize = 32;

/// A plain weight matrix in the compute dtype.
pub struct Dense {
    inner: candle_nn::Linear,
    in_features: usize,
    out_features: usize,
}

impl Dense {
    /// Wraps a `[out, in]` weight and an optional `[out]` bias.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> candle_core::Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        Ok(Self { inner: candle_nn::Linear::new(weight, bias), in_features, out_features })
    }

    /// The weight matrix.
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }
}

impl Dense {
    /// Up to `most` f32 rows on the CPU (decoding: one token, or one per
    /// sequence of a batch): matrix-vector products that read the weight
    /// once, bandwidth-bound, through swift's own kernel; `None` for anything
    /// else (prompts go through candle's GEMM).
    fn forward_few_rows(&self, x: &Tensor, most: usize) -> candle_core::Result<Option<Tensor>> {
        let weight = self.inner.weight();
        let rows_in = x.elem_count() / self.in_features.max(1);
        if rows_in > most || !x.device().is_cpu() || x.dtype() != DType::F32 || weight.dtype() != DType::F32 || !weight.is_contiguous() {
            return Ok(None);
        }
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; rows_in * self.out_features];
        {
            let (storage, layout) = weight.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else { return Ok(None) };
            let start = layout.start_offset();
            let w = &cpu.as_slice::<f32>()?[start..start + self.out_features * self.in_features];
            swift_kernels::gemv::gemv_rows_f32(w, &xs, self.in_features, &mut out);
        }
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("x has a feature dimension") = self.out_features;
        let y = Tensor::from_vec(out, dims, x.device())?;
        match self.inner.bias() {
            Some(bias) => Ok(Some(y.broadcast_add(bias)?)),
            None => Ok(Some(y)),
        }
    }
}

impl Projection for Dense {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.track_op() {
            // Training: the weight is frozen, so backward needs only dL/dx.
            let y = super::ops::frozen_matmul(x, self.inner.weight())?;
            return match self.inner.bias() {
                Some(bias) => y.broadcast_add(bias),
                None => Ok(y),
            };
        }
        match self.forward_few_rows(x, 1)? {
            Some(y) => Ok(y),
            None => self.inner.forward(x),
        }
    }
    fn forward_batch(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.forward_few_rows(x, FEW_ROWS)? {
            Some(y) => Ok(y),
            None => self.forward(x),
        }
    }
    fn in_features(&self) -> usize {
        self.in_features
    }
    fn out_features(&self) -> usize {
        self.out_features
    }
    fn weight_f32(&self) -> candle_core::Result<Tensor> {
        self.inner.weight().to_dtype(DType::F32)
    }
    fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }
    fn weight_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        bytes(self.inner.weight()) + self.inner.bias().map_or(0, bytes)
    }
    fn plain_weight(&self) -> Option<&Tensor> {
        self.inner.bias().is_none().then(|| self.inner.weight())
    }
    fn input_grad(&self, dy: &Tensor) -> candle_core::Result<Tensor> {
        dy.matmul(&self.inner.weight().to_dtype(dy.dtype())?)
    }
}

/// Loads every projection as [`Dense`].
pub struct DenseLoader;

impl LinearLoader for DenseLoader {
    fn load(&self, weights: &Weights, prefix: &str, in_features: usize, out_features: usize, bias: bool)
        -> Result<Box<dyn Projection>, LlmError> {
        let weight = weights.get(&format!("{prefix}.weight"), &[out_features, in_features])?;
        let bias = if bias { Some(weights.get(&format!("{prefix}.bias"), &[out_features])?) } else { None };
        Ok(Box::new(Dense::new(weight, bias)?))
    }
}
