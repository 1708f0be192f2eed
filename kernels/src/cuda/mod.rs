//! swift's CUDA kernels, launched on candle's CUDA device. The sources are
//! `kernels/cuda/*.cu`, compiled to PTX by `build.rs` and loaded once per
//! device; every function here takes and returns candle tensors (contiguous,
//! on one CUDA device) and has a CPU reference in this crate that
//! `swift selftest --gpu` compares it against:
//!
//! - [`rows`]: RMSNorm, softmax and SwiGLU's `silu(gate)·up`, each with its
//!   gradient (CPU: [`crate::rows`]);
//! - [`loss`]: cross-entropy over rows of logits, and its fused
//!   loss-and-gradient form for linear + cross-entropy (CPU: [`crate::loss`]);
//! - [`nf4`]: NF4 weights on the GPU: quantize, dequantize, and the fused
//!   dequant-matmul of the QLoRA forward and backward (CPU: [`crate::nf4`]);
//! - [`optim`]: the optimizer step: AdamW over one flat buffer with the clip
//!   factor folded in, and the gradients' sum of squares (CPU: [`crate::adamw`]);
//! - [`awq`]: AWQ int4 weights on the GPU: dequantize, and the W4A16 matmul
//!   for decoding (CUDA cores, and tensor cores through `mma.sync`) (CPU:
//!   [`crate::awq`]).

pub mod awq;
pub mod loss;
pub mod nf4;
pub mod optim;
pub mod rows;

use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Result, Shape, Storage, Tensor};

/// One compiled `.cu` file.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Module {
    Rows,
    Loss,
    Nf4,
    Awq,
    Optim,
}

impl Module {
    pub(crate) fn name_and_ptx(self) -> (&'static str, &'static str) {
        match self {
            Module::Rows => ("swift-rows", include_str!(concat!(env!("OUT_DIR"), "/rows.ptx"))),
            Module::Loss => ("swift-loss", include_str!(concat!(env!("OUT_DIR"), "/loss.ptx"))),
            Module::Nf4 => ("swift-nf4", include_str!(concat!(env!("OUT_DIR"), "/nf4.ptx"))),
            Module::Awq => ("swift-awq", include_str!(concat!(env!("OUT_DIR"), "/awq.ptx"))),
            Module::Optim => ("swift-optim", include_str!(concat!(env!("OUT_DIR"), "/optim.ptx"))),
        }
    }
}

/// Launches kernel `$name` (a `&str`) of `$module` on `$device` with launch
/// configuration `$cfg` and the given arguments (references to device
/// memory or to scalars, in the kernel's parameter order). The module is
/// loaded on the device on first use.
macro_rules! launch {
    ($device:expr, $module:expr, $name:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
        use candle_core::cuda::cudarc::driver::PushKernelArg as _;
        let name: &str = $name;
        let (module_name, ptx) = $module.name_and_ptx();
        let func = $device.get_or_load_custom_func(name, module_name, ptx)?;
        let mut builder = func.builder();
        $( builder.arg($arg); )*
        // SAFETY: the arguments match the kernel's parameters (each caller
        // follows the signature in its `.cu` file) and the launch
        // configuration is the one that file documents.
        $crate::cuda::launched(unsafe { builder.launch($cfg) }, name)
    }};
}
pub(crate) use launch;

/// The element types the kernels compute in, and the suffix of their
/// kernels' names.
pub(crate) trait Float: CudaDType + DeviceRepr + ValidAsZeroBits + Copy + 'static {
    const SUFFIX: &'static str;
}

impl Float for f32 {
    const SUFFIX: &'static str = "f32";
}

impl Float for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}

/// A contiguous tensor's device memory, held for the duration of a launch.
pub(crate) struct Input<'a> {
    guard: candle_core::StorageRef<'a>,
    start: usize,
    len: usize,
}

impl Input<'_> {
    /// The elements, as `T` (which must be the tensor's dtype).
    pub(crate) fn view<T: CudaDType>(&self) -> Result<CudaView<'_, T>> {
        match &*self.guard {
            Storage::Cuda(storage) => Ok(storage.as_cuda_slice::<T>()?.slice(self.start..self.start + self.len)),
            _ => candle_core::bail!("expected a tensor on a CUDA device"),
        }
    }
}

/// `t`'s memory for kernel `op`: it must be contiguous and on a CUDA device.
pub(crate) fn input<'a>(t: &'a Tensor, op: &str) -> Result<Input<'a>> {
    let (guard, layout) = t.storage_and_layout();
    if !layout.is_contiguous() {
        candle_core::bail!("{op}: expected a contiguous input, got strides {:?}", layout.stride());
    }
    if !matches!(&*guard, Storage::Cuda(_)) {
        candle_core::bail!("{op}: expected a tensor on a CUDA device, got one on {:?}", t.device().location());
    }
    Ok(Input { start: layout.start_offset(), len: layout.shape().elem_count(), guard })
}

/// The CUDA device `t` lives on.
pub(crate) fn device_of(t: &Tensor, op: &str) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(device) => Ok(device.clone()),
        other => candle_core::bail!("{op}: expected a tensor on a CUDA device, got one on {:?}", other.location()),
    }
}

/// A tensor over freshly written device memory.
pub(crate) fn output<T: CudaDType>(slice: CudaSlice<T>, device: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    let storage = CudaStorage::wrap_cuda_slice(slice, device.clone());
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

/// Uninitialised device memory for `len` elements, to be fully written by a kernel.
pub(crate) fn alloc<T: DeviceRepr>(device: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every caller launches a kernel that writes all `len` elements
    // before the memory is read.
    unsafe { device.alloc::<T>(len.max(1)) }
}

/// Checks that `t` has a dtype the kernels compute in.
pub(crate) fn float_dtype(t: &Tensor, op: &str) -> Result<DType> {
    match t.dtype() {
        dtype @ (DType::F32 | DType::BF16) => Ok(dtype),
        other => candle_core::bail!("{op}: f32 or bf16 expected, got {other:?}"),
    }
}

/// A dimension as the `int` the kernels take.
pub(crate) fn int(value: usize, what: &str) -> Result<i32> {
    i32::try_from(value).map_err(|_| candle_core::Error::Msg(format!("{what} = {value} does not fit the kernels' 32-bit sizes")))
}

/// `(grid, block, shared bytes)` as cudarc's launch configuration.
pub(crate) fn config(grid: u32, block: u32, shared: u32) -> candle_core::cuda::cudarc::driver::LaunchConfig {
    candle_core::cuda::cudarc::driver::LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: shared }
}

/// Maps a cudarc launch error into candle's.
pub(crate) fn launched<T>(result: std::result::Result<T, candle_core::cuda::cudarc::driver::DriverError>, op: &str) -> Result<()> {
    result.map(|_| ()).map_err(|e| candle_core::Error::Msg(format!("{op}: kernel launch failed: {e}")))
}
