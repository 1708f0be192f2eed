//! NF4 projections: a frozen weight stored as bitsandbytes NF4 (4-bit codes,
//! absmax per block, optionally double-quantized), the QLoRA base.
//!
//! The weight enters autograd through a custom op on the activation: forward
//! dequantizes the weight a panel of output rows ([`PANEL_VALUES`] values at
//! most) at a time and multiplies each panel into its columns of the output;
//! backward dequantizes the panels **again** and sums their products into the
//! activation's gradient. So no f32 copy of a large frozen matrix is ever
//! built, let alone kept between forward and backward — the memory QLoRA
//! exists to save. On a GPU the codes live in GPU memory and
//! both products run swift's fused dequant-matmul kernels, which dequantize
//! tiles in shared memory only.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use swift_kernels::nf4::Nf4Tensor;

use super::linear::Projection;
use super::ops::{cpu_tensor, into_cpu};

/// A projection whose weight is NF4.
pub struct Nf4Linear {
    weight: Arc<Nf4Tensor>,
    /// The same codes on the GPU the weight was loaded on.
    #[cfg(feature = "cuda")]
    gpu: Option<Arc<swift_kernels::cuda::nf4::Nf4Gpu>>,
    bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
}

impl Nf4Linear {
    /// Quantizes a `[out, in]` weight (any float dtype; quantized from its f32
    /// values as bitsandbytes does) with block size `blocksize`.
    pub fn quantize(weight: &Tensor, bias: Option<Tensor>, blocksize: usize, double_quant: bool)
        -> candle_core::Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        let values = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let quantized = swift_kernels::nf4::quantize(&values, &[out_features, in_features], blocksize, double_quant)
            .map_err(|e| candle_core::Error::Msg(format!("NF4 quantization: {e}")))?;
        #[cfg(feature = "cuda")]
        let gpu = match weight.device() {
            candle_core::Device::Cuda(device) => Some(Arc::new(swift_kernels::cuda::nf4::Nf4Gpu::upload(&quantized, device)?)),
            _ => None,
        };
        Ok(Self {
            weight: Arc::new(quantized),
            #[cfg(feature = "cuda")]
            gpu,
            bias,
            in_features,
            out_features,
        })
    }

}

impl Projection for Nf4Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = x.contiguous()?.apply_op1(Nf4Matmul {
            weight: self.weight.clone(),
            #[cfg(feature = "cuda")]
            gpu: self.gpu.clone(),
            in_features: self.in_features,
            out_features: self.out_features,
        })?;
        match &self.bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }
    fn in_features(&self) -> usize {
        self.in_features
    }
    fn out_features(&self) -> usize {
        self.out_features
    }
    fn weight_f32(&self) -> candle_core::Result<Tensor> {
        dequantized(&self.weight, DType::F32)
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    fn weight_bytes(&self) -> usize {
        self.weight.storage_bytes()
    }
    fn input_grad(&self, dy: &Tensor) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let (true, Some(gpu)) = (dy.device().is_cuda(), self.gpu.as_ref()) {
            return gpu.matmul_t(dy);
        }
        input_grad_panels(&self.weight, dy)
    }
}

/// `y = x Wᵀ` with `W` dequantized on the fly, in forward and in backward.
struct Nf4Matmul {
    weight: Arc<Nf4Tensor>,
    #[cfg(feature = "cuda")]
    gpu: Option<Arc<swift_kernels::cuda::nf4::Nf4Gpu>>,
    in_features: usize,
    out_features: usize,
}

#[cfg(feature = "cuda")]
impl Nf4Matmul {
    fn gpu(&self) -> candle_core::Result<&swift_kernels::cuda::nf4::Nf4Gpu> {
        self.gpu.as_deref().ok_or_else(|| candle_core::Error::Msg("nf4-matmul: a GPU input for a weight quantized on the CPU".into()))
    }
}

/// The whole `[out, in]` weight dequantized, in `dtype`, on the CPU (for
/// merging and tests, never in a training step).
fn dequantized(weight: &Nf4Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    Tensor::from_vec(weight.dequantize(), weight.shape(), &candle_core::Device::Cpu)?.to_dtype(dtype)
}

/// Weights dequantized at once on the CPU: a panel of whole output rows
/// holding at most this many values (4 MB of f32; 1170 rows of a
/// 896-wide input, a small matrix whole).
pub const PANEL_VALUES: usize = 1 << 20;

/// Each panel of at most [`PANEL_VALUES`] values (whole rows) of `weight`,
/// dequantized to f32, with its first row.
fn panels(weight: &Nf4Tensor) -> impl Iterator<Item = candle_core::Result<(usize, Tensor)>> + '_ {
    let (out, inp) = (weight.shape()[0], weight.shape()[1]);
    let panel_rows = (PANEL_VALUES / inp.max(1)).max(1);
    (0..out).step_by(panel_rows).map(move |first| {
        let rows = panel_rows.min(out - first);
        let mut values = vec![0f32; rows * inp];
        weight.dequantize_rows_into(first, rows, &mut values);
        Ok((first, Tensor::from_vec(values, (rows, inp), &candle_core::Device::Cpu)?))
    })
}

/// `x Wᵀ` for `x` `[rows, in]` on the CPU, panel by panel.
fn matmul_panels(weight: &Nf4Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
    let x32 = x.to_dtype(DType::F32)?;
    let mut columns = panels(weight).map(|panel| x32.matmul(&panel?.1.t()?)).collect::<candle_core::Result<Vec<_>>>()?;
    let y = if columns.len() == 1 { columns.pop().expect("one panel") } else { Tensor::cat(&columns, 1)? };
    y.to_dtype(x.dtype())
}

/// `dy W` for `dy` `[rows, out]` on the CPU: the panels' products summed.
fn input_grad_panels(weight: &Nf4Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
    let dy32 = dy.to_dtype(DType::F32)?;
    let mut sum: Option<Tensor> = None;
    for panel in panels(weight) {
        let (first, w) = panel?;
        let rows = w.dim(0)?;
        let part = if rows == dy32.dim(1)? { dy32.matmul(&w)? } else { dy32.narrow(1, first, rows)?.contiguous()?.matmul(&w)? };
        sum = Some(match sum {
            Some(s) => (s + part)?,
            None => part,
        });
    }
    sum.expect("a weight has rows").to_dtype(dy.dtype())
}

impl CustomOp1 for Nf4Matmul {
    fn name(&self) -> &'static str {
        "nf4-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = layout.dims();
        if dims.last() != Some(&self.in_features) {
            candle_core::bail!("nf4-matmul: expected a [.., {}] input, got {dims:?}", self.in_features);
        }
        let x = cpu_tensor(storage, layout, self.name())?;
        let rows = x.elem_count() / self.in_features;
        let y = matmul_panels(&self.weight, &x.reshape((rows, self.in_features))?)?;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("checked above") = self.out_features;
        into_cpu(&y.reshape(out_dims)?, self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &candle_core::CudaStorage, layout: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let x = super::ops::cuda_tensor(storage, layout, self.name())?;
        super::ops::into_cuda(&self.gpu()?.matmul(&x)?, self.name())
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if grad_res.device().is_cuda() {
            return Ok(Some(self.gpu()?.matmul_t(&grad_res.to_dtype(arg.dtype())?)?.reshape(arg.shape())?));
        }
        // dL/dx = dL/dy · W, with W dequantized again, panel by panel.
        let rows = grad_res.elem_count() / self.out_features;
        let grad = input_grad_panels(&self.weight, &grad_res.reshape((rows, self.out_features))?)?;
        Ok(Some(grad.reshape(arg.shape())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn forward_and_input_gradient_match_the_dequantized_dense_weight() {
        let device = Device::Cpu;
        let w = Tensor::randn(0f32, 0.05, (24, 128), &device).unwrap();
        let bias = Tensor::randn(0f32, 0.1, 24, &device).unwrap();
        let nf4 = Nf4Linear::quantize(&w, Some(bias.clone()), 64, true).unwrap();
        let dense_w = nf4.weight_f32().unwrap();
        let x = Var::new(Tensor::randn(0f32, 1.0, (2, 3, 128), &device).unwrap().to_vec3::<f32>().unwrap(), &device)
            .unwrap();
        let y = nf4.forward(x.as_tensor()).unwrap();
        let reference = x.as_tensor().broadcast_matmul(&dense_w.t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
        let diff = (&y - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "forward differs by {diff}");
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let reference_grads = reference.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap();
        let r = reference_grads.get(x.as_tensor()).unwrap();
        let diff = (g - r).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "input gradient differs by {diff}");
    }
}
