//! AWQ int4 projections: AutoAWQ's GEMM layout (`qweight`, `qzeros`,
//! `scales`, FORMATS.md §1) behind the decoder's [`Projection`] trait, so an
//! AWQ folder — swift's own quantize output or AutoAWQ's — runs in
//! `swift generate`, the eval stage and the quantize stage's quality report.

use candle_core::{DType, Tensor};
use swift_kernels::awq::AwqMatrix;

use super::config::{AwqSettings, ModelConfig};
use super::linear::{DenseLoader, LinearLoader, Projection};
use super::weights::Weights;
use super::LlmError;

/// A projection whose weight is packed int4 with per-group scales and zero
/// points; the matmul dequantizes tile by tile (swift_kernels::awq). On a GPU
/// the packed weight lives in GPU memory: decoding batches (up to
/// [`swift_kernels::cuda::awq::DECODE_ROWS`] rows) run the W4A16 kernel,
/// larger ones dequantize the matrix once and use cuBLAS.
pub struct AwqLinear {
    matrix: AwqMatrix,
    #[cfg(feature = "cuda")]
    gpu: Option<swift_kernels::cuda::awq::AwqGpu>,
    bias: Option<Tensor>,
}

impl AwqLinear {
    /// Wraps a packed matrix and an optional `[out]` bias, for computing on `device`.
    pub fn new(matrix: AwqMatrix, bias: Option<Tensor>, device: &candle_core::Device) -> candle_core::Result<Self> {
        #[cfg(feature = "cuda")]
        let gpu = match device {
            candle_core::Device::Cuda(device) => Some(swift_kernels::cuda::awq::AwqGpu::upload(&matrix, device)?),
            _ => None,
        };
        #[cfg(not(feature = "cuda"))]
        let _ = device;
        Ok(Self {
            matrix,
            #[cfg(feature = "cuda")]
            gpu,
            bias,
        })
    }

    /// `x Wᵀ` on the GPU the weight was uploaded to.
    #[cfg(feature = "cuda")]
    fn forward_gpu(gpu: &swift_kernels::cuda::awq::AwqGpu, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.dtype() == DType::F16 {
            // The kernels compute in f32 or bf16.
            return Self::forward_gpu(gpu, &x.to_dtype(DType::BF16)?)?.to_dtype(DType::F16);
        }
        let rows = x.elem_count() / gpu.k().max(1);
        if rows <= swift_kernels::cuda::awq::DECODE_ROWS {
            return gpu.gemv(x);
        }
        x.broadcast_matmul(&gpu.dequantize_t(x.dtype())?)
    }
}

impl Projection for AwqLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let (Some(gpu), true) = (&self.gpu, x.device().is_cuda()) {
            let y = Self::forward_gpu(gpu, x)?;
            return match &self.bias {
                Some(bias) => y.broadcast_add(bias),
                None => Ok(y),
            };
        }
        let (k, n) = (self.matrix.k(), self.matrix.n());
        let dtype = x.dtype();
        let rows = x.elem_count() / k.max(1);
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; rows * n];
        self.matrix.matmul(&xs, rows, &mut out);
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("x has a feature dimension") = n;
        let y = Tensor::from_vec(out, dims, x.device())?.to_dtype(dtype)?;
        match &self.bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }
    fn in_features(&self) -> usize {
        self.matrix.k()
    }
    fn out_features(&self) -> usize {
        self.matrix.n()
    }
    fn weight_f32(&self) -> candle_core::Result<Tensor> {
        let (k, n) = (self.matrix.k(), self.matrix.n());
        Tensor::from_vec(self.matrix.dequantize_t(), (k, n), &candle_core::Device::Cpu)?.t()?.contiguous()
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    fn weight_bytes(&self) -> usize {
        self.matrix.storage_bytes() + self.bias.as_ref().map_or(0, |b| b.elem_count() * b.dtype().size_in_bytes())
    }
}

/// Loads `qweight`/`qzeros`/`scales` projections as [`AwqLinear`], and the
/// ones the checkpoint keeps unquantized (`lm_head`, `modules_to_not_convert`,
/// or any projection stored as a plain `.weight`) as dense weights.
pub struct AwqLoader {
    settings: AwqSettings,
}

impl AwqLoader {
    /// A loader for a checkpoint with these settings.
    pub fn new(settings: AwqSettings) -> Self {
        Self { settings }
    }
}

impl LinearLoader for AwqLoader {
    fn load(&self, weights: &Weights, prefix: &str, in_features: usize, out_features: usize, bias: bool)
        -> Result<Box<dyn Projection>, LlmError> {
        let packed = weights.contains(&format!("{prefix}.qweight"));
        if !packed {
            if self.settings.skips(prefix) || prefix == "lm_head" || weights.contains(&format!("{prefix}.weight")) {
                return DenseLoader.load(weights, prefix, in_features, out_features, bias);
            }
            return Err(weights.error(format!("tensor `{prefix}.qweight` is missing (an AWQ checkpoint quantizes every projection not in modules_to_not_convert)")));
        }
        let (k, n, g) = (in_features, out_features, self.settings.group_size);
        if !k.is_multiple_of(g) || !n.is_multiple_of(swift_kernels::awq::PACK) {
            return Err(weights.error(format!(
                "`{prefix}` is [{n}, {k}]: AWQ needs the input size to be a multiple of the group size {g} and the output size a multiple of 8"
            )));
        }
        let words = |name: &str, shape: &[usize]| -> Result<Vec<u32>, LlmError> {
            let t = weights.get_as(&format!("{prefix}.{name}"), shape, DType::I32)?;
            Ok(t.flatten_all()?.to_vec1::<i32>()?.into_iter().map(|v| v as u32).collect())
        };
        let qweight = words("qweight", &[k, n / 8])?;
        let qzeros = words("qzeros", &[k / g, n / 8])?;
        let scales = weights.get_as(&format!("{prefix}.scales"), &[k / g, n], DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let matrix = AwqMatrix::from_parts(k, n, g, qweight, qzeros, scales)
            .map_err(|e| weights.error(format!("`{prefix}`: {e}")))?;
        let bias = if bias { Some(weights.get(&format!("{prefix}.bias"), &[n])?) } else { None };
        Ok(Box::new(AwqLinear::new(matrix, bias, weights.device())?))
    }
}

/// The loader a model folder's projections need: AWQ int4 for an AWQ
/// checkpoint, dense otherwise.
pub fn loader_for(config: &ModelConfig) -> Box<dyn LinearLoader> {
    match &config.quantization {
        Some(settings) => Box::new(AwqLoader::new(settings.clone())),
        None => Box::new(DenseLoader),
    }
}
