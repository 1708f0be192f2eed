//! NF4 weights on the GPU (`cuda/nf4.cu`): an [`Nf4Tensor`] uploaded once,
//! dequantized or multiplied without ever holding a full-precision copy in
//! global memory. CPU reference: [`crate::nf4`].

use candle_core::cuda::cudarc::driver::CudaSlice;
use candle_core::{CudaDevice, DType, Result, Tensor};

use super::{alloc, config, device_of, input, int, launch, output, Float, Module};
use crate::nf4::{Absmax, Nf4Tensor};

const THREADS: u32 = 256;
/// The fused matmuls' output tile (rows and columns per thread block).
const TILE: usize = 64;

/// The per-block scales, as the kernels read them.
enum GpuAbsmax {
    Plain(CudaSlice<f32>),
    Double { quantized: CudaSlice<u8>, code: CudaSlice<f32>, nested: CudaSlice<f32>, offset: f32, nested_blocksize: i32 },
}

/// An NF4 tensor in GPU memory.
pub struct Nf4Gpu {
    device: CudaDevice,
    shape: Vec<usize>,
    numel: usize,
    blocksize: i32,
    packed: CudaSlice<u8>,
    absmax: GpuAbsmax,
}

impl Nf4Gpu {
    /// Copies `weight`'s codes and scales to `device`.
    pub fn upload(weight: &Nf4Tensor, device: &CudaDevice) -> Result<Self> {
        let stream = device.cuda_stream();
        let copy_err = |e| candle_core::Error::Msg(format!("uploading an NF4 weight: {e}"));
        let packed = stream.clone_htod(weight.packed()).map_err(copy_err)?;
        let absmax = match weight.absmax() {
            Absmax::Plain(values) => GpuAbsmax::Plain(stream.clone_htod(values).map_err(copy_err)?),
            Absmax::Double { quantized, nested_absmax, offset, nested_blocksize } => GpuAbsmax::Double {
                quantized: stream.clone_htod(quantized).map_err(copy_err)?,
                code: stream.clone_htod(&crate::nf4::dynamic_map()).map_err(copy_err)?,
                nested: stream.clone_htod(nested_absmax).map_err(copy_err)?,
                offset: *offset,
                nested_blocksize: int(*nested_blocksize, "nested blocksize")?,
            },
        };
        Ok(Self {
            device: device.clone(),
            shape: weight.shape().to_vec(),
            numel: weight.numel(),
            blocksize: int(weight.blocksize(), "blocksize")?,
            packed,
            absmax,
        })
    }

    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Bytes of GPU memory held.
    pub fn storage_bytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                GpuAbsmax::Plain(v) => 4 * v.len(),
                GpuAbsmax::Double { quantized, code, nested, .. } => quantized.len() + 4 * (code.len() + nested.len()),
            }
    }

    /// The whole tensor in `dtype` (f32 or bf16), bit-identical to
    /// [`Nf4Tensor::dequantize`] in f32.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        match dtype {
            DType::F32 => self.dequantize_as::<f32>(),
            DType::BF16 => self.dequantize_as::<half::bf16>(),
            other => candle_core::bail!("nf4 dequantize: f32 or bf16, not {other:?}"),
        }
    }

    fn dequantize_as<T: Float>(&self) -> Result<Tensor> {
        let mut out = alloc::<T>(&self.device, self.numel)?;
        let numel = self.numel as i64;
        let blocks = self.numel.div_ceil(2).div_ceil(THREADS as usize).clamp(1, 65_536) as u32;
        let null = 0u64;
        let name = format!("nf4_dequant_{}", T::SUFFIX);
        match &self.absmax {
            GpuAbsmax::Plain(absmax) => launch!(self.device, Module::Nf4, &name, config(blocks, THREADS, 0);
                &self.packed, absmax, &null, &null, &null, &0f32, &0i32, &mut out, &numel, &self.blocksize)?,
            GpuAbsmax::Double { quantized, code, nested, offset, nested_blocksize } => launch!(self.device, Module::Nf4, &name, config(blocks, THREADS, 0);
                &self.packed, &null, quantized, code, nested, offset, nested_blocksize, &mut out, &numel, &self.blocksize)?,
        }
        Ok(output(out, &self.device, self.shape.clone()))
    }

    /// `y = x Wᵀ` for this `[n, k]` weight and `x` `[…, k]` (f32 or bf16),
    /// dequantizing tiles in shared memory.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        self.fused(x, false)
    }

    /// `dx = g W` for this `[n, k]` weight and `g` `[…, n]`: the input
    /// gradient of [`Nf4Gpu::matmul`].
    pub fn matmul_t(&self, g: &Tensor) -> Result<Tensor> {
        self.fused(g, true)
    }

    fn fused(&self, x: &Tensor, transposed: bool) -> Result<Tensor> {
        match x.dtype() {
            DType::F32 => self.fused_as::<f32>(x, transposed),
            DType::BF16 => self.fused_as::<half::bf16>(x, transposed),
            other => candle_core::bail!("nf4 matmul: f32 or bf16 input, not {other:?}"),
        }
    }

    fn fused_as<T: Float>(&self, x: &Tensor, transposed: bool) -> Result<Tensor> {
        let op = if transposed { "nf4_matmul_t" } else { "nf4_matmul" };
        let [n, k] = self.shape[..] else { candle_core::bail!("{op}: the weight is not a matrix ({:?})", self.shape) };
        let (inner, outer) = if transposed { (n, k) } else { (k, n) };
        let dims = x.dims();
        if dims.last() != Some(&inner) {
            candle_core::bail!("{op}: expected a [.., {inner}] input, got {dims:?}");
        }
        if device_of(x, op)?.id() != self.device.id() {
            candle_core::bail!("{op}: the input is on another GPU than the weight");
        }
        let m = x.elem_count() / inner;
        let x = x.contiguous()?;
        let xi = input(&x, op)?;
        let xv = xi.view::<T>()?;
        let mut y = alloc::<T>(&self.device, m * outer)?;
        let (m_i, inner_i, outer_i) = (int(m, "rows")?, int(inner, "inner size")?, int(outer, "outer size")?);
        let grid = (outer.div_ceil(TILE) as u32, m.div_ceil(TILE) as u32, 1);
        let cfg = candle_core::cuda::cudarc::driver::LaunchConfig { grid_dim: grid, block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let name = format!("{op}_{}", T::SUFFIX);
        let null = 0u64;
        // Both kernels take (input, packed, scales…, output, m, then the
        // input's and the output's row lengths, blocksize).
        match &self.absmax {
            GpuAbsmax::Plain(absmax) => launch!(self.device, Module::Nf4, &name, cfg;
                &xv, &self.packed, absmax, &null, &null, &null, &0f32, &0i32, &mut y, &m_i, &inner_i, &outer_i, &self.blocksize)?,
            GpuAbsmax::Double { quantized, code, nested, offset, nested_blocksize } => launch!(self.device, Module::Nf4, &name, cfg;
                &xv, &self.packed, &null, quantized, code, nested, offset, nested_blocksize, &mut y, &m_i, &inner_i, &outer_i, &self.blocksize)?,
        }
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("x has a feature dimension") = outer;
        Ok(output(y, &self.device, out_dims))
    }
}

/// NF4 codes and per-block absmax of an f32 tensor on the GPU, as
/// [`crate::nf4::quantize`] computes them without double quantization:
/// `(packed, absmax)` copied back to the host.
pub fn quantize(x: &Tensor, blocksize: usize) -> Result<(Vec<u8>, Vec<f32>)> {
    let op = "nf4_quantize";
    super::rows::expect_f32(x, op)?;
    if !crate::nf4::BLOCKSIZES.contains(&blocksize) {
        candle_core::bail!("{op}: blocksize {blocksize} is not one of {:?}", crate::nf4::BLOCKSIZES);
    }
    let device = device_of(x, op)?;
    let numel = x.elem_count();
    let blocks = numel.div_ceil(blocksize);
    let xi = input(x, op)?;
    let xv = xi.view::<f32>()?;
    let mut packed = alloc::<u8>(&device, numel.div_ceil(2))?;
    let mut absmax = alloc::<f32>(&device, blocks)?;
    let (numel_i, blocksize_i) = (numel as i64, int(blocksize, "blocksize")?);
    // One warp per quantization block, eight to a thread block.
    launch!(device, Module::Nf4, "nf4_quantize_f32", config(blocks.div_ceil(8) as u32, THREADS, 0);
        &xv, &mut packed, &mut absmax, &numel_i, &blocksize_i)?;
    let stream = device.cuda_stream();
    let back = |e| candle_core::Error::Msg(format!("{op}: copying back: {e}"));
    Ok((stream.clone_dtoh(&packed).map_err(back)?, stream.clone_dtoh(&absmax).map_err(back)?))
}
