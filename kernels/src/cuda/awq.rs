//! AWQ int4 weights on the GPU (`cuda/awq.cu`): an [`AwqMatrix`] uploaded
//! once (int4 codes and zero points packed as AutoAWQ packs them, f16
//! scales), dequantized, or multiplied by activations with the weights
//! dequantized in registers. CPU reference: [`crate::awq`].

use candle_core::cuda::cudarc::driver::CudaSlice;
use candle_core::{CudaDevice, DType, Result, Tensor};

use super::{alloc, config, device_of, input, int, launch, output, Float, Module};
use crate::awq::AwqMatrix;

const THREADS: u32 = 256;

/// Rows up to which the decode kernels are meant to be used (larger batches
/// dequantize once and use cuBLAS).
pub const DECODE_ROWS: usize = 16;

/// A packed AWQ weight in GPU memory.
pub struct AwqGpu {
    device: CudaDevice,
    k: usize,
    n: usize,
    group: usize,
    qweight: CudaSlice<u32>,
    qzeros: CudaSlice<u32>,
    scales: CudaSlice<half::f16>,
}

impl AwqGpu {
    /// Copies `matrix` to `device` (its scales as the f16 values they are).
    pub fn upload(matrix: &AwqMatrix, device: &CudaDevice) -> Result<Self> {
        if !matrix.group().is_multiple_of(32) {
            candle_core::bail!("AWQ on the GPU needs a group size that is a multiple of 32, not {}", matrix.group());
        }
        let stream = device.cuda_stream();
        let copy_err = |e| candle_core::Error::Msg(format!("uploading an AWQ weight: {e}"));
        let scales: Vec<half::f16> = matrix.scales().iter().map(|&s| half::f16::from_f32(s)).collect();
        Ok(Self {
            device: device.clone(),
            k: matrix.k(),
            n: matrix.n(),
            group: matrix.group(),
            qweight: stream.clone_htod(matrix.qweight()).map_err(copy_err)?,
            qzeros: stream.clone_htod(matrix.qzeros()).map_err(copy_err)?,
            scales: stream.clone_htod(&scales).map_err(copy_err)?,
        })
    }

    /// Input size.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Output size.
    pub fn n(&self) -> usize {
        self.n
    }

    /// `Wᵀ` `[k, n]` in `dtype` (f32 or bf16), exactly
    /// [`AwqMatrix::dequantize_t`] in f32.
    pub fn dequantize_t(&self, dtype: DType) -> Result<Tensor> {
        match dtype {
            DType::F32 => self.dequantize_t_as::<f32>(),
            DType::BF16 => self.dequantize_t_as::<half::bf16>(),
            other => candle_core::bail!("awq dequantize: f32 or bf16, not {other:?}"),
        }
    }

    fn dequantize_t_as<T: Float>(&self) -> Result<Tensor> {
        let mut out = alloc::<T>(&self.device, self.k * self.n)?;
        let (k, n, g) = self.dims()?;
        let blocks = (self.k * self.n / 8).div_ceil(THREADS as usize).clamp(1, 65_536) as u32;
        launch!(self.device, Module::Awq, &format!("awq_dequant_{}", T::SUFFIX), config(blocks, THREADS, 0);
            &self.qweight, &self.qzeros, &self.scales, &mut out, &k, &n, &g)?;
        Ok(output(out, &self.device, (self.k, self.n)))
    }

    /// `y = x Wᵀ` for `x` `[…, k]` (f32 or bf16), W4A16 on CUDA cores: the
    /// weights are read once per thread block for every row and dequantized
    /// in registers. Meant for decoding (up to [`DECODE_ROWS`] rows).
    pub fn gemv(&self, x: &Tensor) -> Result<Tensor> {
        match x.dtype() {
            DType::F32 => self.gemv_as::<f32>(x),
            DType::BF16 => self.gemv_as::<half::bf16>(x),
            other => candle_core::bail!("awq gemv: f32 or bf16 input, not {other:?}"),
        }
    }

    fn gemv_as<T: Float>(&self, x: &Tensor) -> Result<Tensor> {
        let (x, m) = self.rows_of(x, "awq_gemv")?;
        let xi = input(&x, "awq_gemv")?;
        let xv = xi.view::<T>()?;
        let mut y = alloc::<T>(&self.device, m * self.n)?;
        let (k, n, g) = self.dims()?;
        let m_i = int(m, "rows")?;
        launch!(self.device, Module::Awq, &format!("awq_gemv_{}", T::SUFFIX), config(self.n.div_ceil(GEMV_COLUMNS) as u32, THREADS, 0);
            &xv, &self.qweight, &self.qzeros, &self.scales, &mut y, &m_i, &k, &n, &g)?;
        Ok(output(y, &self.device, self.out_dims(&x)))
    }

    /// `y = x Wᵀ` for bf16 `x` `[…, k]` on tensor cores (`mma.sync`
    /// m16n8k16), the weights dequantized to bf16 in registers.
    pub fn gemm_mma(&self, x: &Tensor) -> Result<Tensor> {
        if x.dtype() != DType::BF16 {
            candle_core::bail!("awq gemm (tensor cores): bf16 input, not {:?}", x.dtype());
        }
        let (x, m) = self.rows_of(x, "awq_gemm_mma")?;
        // The kernel loads x 16 bytes at a time: its start must be aligned.
        let x = if x.layout().start_offset().is_multiple_of(8) { x } else { x.force_contiguous()? };
        let xi = input(&x, "awq_gemm_mma")?;
        let xv = xi.view::<half::bf16>()?;
        let mut y = alloc::<half::bf16>(&self.device, m * self.n)?;
        let (k, n, g) = self.dims()?;
        let m_i = int(m, "rows")?;
        let grid = (self.n.div_ceil(MMA_COLUMNS) as u32, m.div_ceil(MMA_ROWS) as u32, 1);
        let cfg = candle_core::cuda::cudarc::driver::LaunchConfig { grid_dim: grid, block_dim: (MMA_THREADS, 1, 1), shared_mem_bytes: 0 };
        launch!(self.device, Module::Awq, "awq_gemm_mma_bf16", cfg;
            &xv, &self.qweight, &self.qzeros, &self.scales, &mut y, &m_i, &k, &n, &g)?;
        Ok(output(y, &self.device, self.out_dims(&x)))
    }

    fn dims(&self) -> Result<(i32, i32, i32)> {
        Ok((int(self.k, "k")?, int(self.n, "n")?, int(self.group, "group size")?))
    }

    /// `x` contiguous, and its row count, after checking its row length and device.
    fn rows_of(&self, x: &Tensor, op: &str) -> Result<(Tensor, usize)> {
        if x.dims().last() != Some(&self.k) {
            candle_core::bail!("{op}: expected a [.., {}] input, got {:?}", self.k, x.dims());
        }
        if device_of(x, op)?.id() != self.device.id() {
            candle_core::bail!("{op}: the input is on another GPU than the weight");
        }
        Ok((x.contiguous()?, x.elem_count() / self.k))
    }

    /// `x`'s dimensions with the last one (`k`, checked) replaced by `n`.
    fn out_dims(&self, x: &Tensor) -> Vec<usize> {
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("checked to end in k") = self.n;
        dims
    }
}

/// Output columns per thread block of `awq_gemv_*`.
const GEMV_COLUMNS: usize = 32;
/// Output columns and rows per thread block of `awq_gemm_mma_bf16`.
const MMA_COLUMNS: usize = 128;
const MMA_ROWS: usize = 64;
/// Threads per block of `awq_gemm_mma_bf16`.
const MMA_THREADS: u32 = 128;
