//! Custom autograd ops for training on candle:
//!
//! - [`frozen_matmul`]: `x Wᵀ` for a frozen `W` whose backward computes only
//!   the input's gradient (candle's matmul would also compute and keep a full
//!   gradient for every frozen weight, on a GPU too);
//! - [`cross_entropy`]: per-row cross-entropy of logits with a fused backward
//!   (kernels' [`swift_kernels::loss`]);
//! - [`softmax_last_dim`] and [`rms_norm`]: row-wise ops with fused
//!   backwards (kernels' [`swift_kernels::rows`]);
//! - [`masked_softmax`]: attention probabilities with the scale and mask
//!   folded into the softmax, forward and backward;
//! - [`silu_mul`]: SwiGLU's `silu(gate)·up` with a fused backward;
//! - [`rope`]: rotary embeddings for a batch of rows with per-row positions,
//!   whose backward is the opposite rotation (kernels' [`swift_kernels::rope`]).
//!
//! On a CUDA device (the `cuda` feature) the same ops run swift's CUDA
//! kernels ([`swift_kernels::cuda`]), forward and backward.

use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Storage, Tensor, D};

/// A contiguous CPU input of a custom op as a tensor (copied out of storage).
pub(crate) fn cpu_tensor(storage: &CpuStorage, layout: &Layout, op: &str) -> candle_core::Result<Tensor> {
    if !layout.is_contiguous() {
        candle_core::bail!("{op}: expected a contiguous input");
    }
    let Some(len) = cpu_len(storage) else { candle_core::bail!("{op}: unsupported dtype") };
    Tensor::from_storage(Storage::Cpu(storage.clone()), len, BackpropOp::none(), false)
        .narrow(0, layout.start_offset(), layout.shape().elem_count())?
        .reshape(layout.shape())
}

/// A contiguous f32 slice of a CPU storage at `layout`.
fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    if !layout.is_contiguous() {
        candle_core::bail!("expected a contiguous input");
    }
    let start = layout.start_offset();
    Ok(&storage.as_slice::<f32>()?[start..start + layout.shape().elem_count()])
}

/// The values of a tensor as one f32 vector (a copy).
fn f32_values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// Runs `f` on the values of a contiguous f32 CPU tensor, in place (no copy).
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { candle_core::bail!("expected a tensor on the CPU") };
    Ok(f(f32_slice(cpu, layout)?))
}

/// A tensor's CPU storage, for returning from `cpu_fwd`.
pub(crate) fn into_cpu(t: &Tensor, op: &str) -> candle_core::Result<(CpuStorage, Shape)> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { candle_core::bail!("{op}: result left the CPU") };
    if layout.start_offset() == 0 && cpu_len(cpu) == Some(layout.shape().elem_count()) {
        return Ok((cpu.clone(), layout.shape().clone()));
    }
    drop(storage);
    // A tensor over part of its storage: copied into storage of its own.
    let copy = t.force_contiguous()?;
    let (storage, layout) = copy.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { candle_core::bail!("{op}: result left the CPU") };
    Ok((cpu.clone(), layout.shape().clone()))
}

/// A contiguous CUDA input of a custom op as a tensor (copied out of storage).
#[cfg(feature = "cuda")]
pub(crate) fn cuda_tensor(storage: &candle_core::CudaStorage, layout: &Layout, op: &str) -> candle_core::Result<Tensor> {
    use candle_core::backend::BackendStorage;
    if !layout.is_contiguous() {
        candle_core::bail!("{op}: expected a contiguous input");
    }
    let copy = storage.try_clone(layout)?;
    let len = cuda_len(&copy).ok_or_else(|| candle_core::Error::Msg(format!("{op}: unsupported dtype")))?;
    Tensor::from_storage(Storage::Cuda(copy), len, BackpropOp::none(), false)
        .narrow(0, layout.start_offset(), layout.shape().elem_count())?
        .reshape(layout.shape())
}

/// A tensor's CUDA storage, for returning from `cuda_fwd`.
#[cfg(feature = "cuda")]
pub(crate) fn into_cuda(t: &Tensor, op: &str) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    let whole = |t: &Tensor| {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cuda) = &*storage else { return false };
        layout.is_contiguous() && layout.start_offset() == 0 && cuda_len(cuda) == Some(layout.shape().elem_count())
    };
    // A tensor over part of its storage (or strided) gets storage of its own.
    let t = if whole(t) { t.clone() } else { t.force_contiguous()? };
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else { candle_core::bail!("{op}: result left the GPU") };
    Ok((cuda.try_clone(layout)?, layout.shape().clone()))
}

/// Elements in a CUDA storage of the dtypes the training ops handle.
#[cfg(feature = "cuda")]
fn cuda_len(storage: &candle_core::CudaStorage) -> Option<usize> {
    use candle_core::cuda::CudaStorageSlice as S;
    match &storage.slice {
        S::F32(s) => Some(s.len()),
        S::BF16(s) => Some(s.len()),
        S::F16(s) => Some(s.len()),
        S::F64(s) => Some(s.len()),
        S::U32(s) => Some(s.len()),
        _ => None,
    }
}

/// Elements in a CPU storage of the dtypes the training ops handle.
fn cpu_len(storage: &CpuStorage) -> Option<usize> {
    match storage {
        CpuStorage::F32(v) => Some(v.len()),
        CpuStorage::BF16(v) => Some(v.len()),
        CpuStorage::F16(v) => Some(v.len()),
        CpuStorage::F64(v) => Some(v.len()),
        CpuStorage::U32(v) => Some(v.len()),
        _ => None,
    }
}

/// `x Wᵀ` with `W` `[out, in]` frozen: backward returns `dL/dx = dL/dy · W` only.
pub fn frozen_matmul(x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    let fused = x.device().is_cpu() || cfg!(feature = "cuda") && x.device().is_cuda();
    if !fused || !x.track_op() {
        return x.broadcast_matmul(&weight.t()?);
    }
    x.contiguous()?.apply_op1(FrozenMatmul { weight: weight.clone() })
}

struct FrozenMatmul {
    weight: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_tensor(storage, layout, self.name())?;
        into_cpu(&x.broadcast_matmul(&self.weight.t()?)?, self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &candle_core::CudaStorage, layout: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let x = cuda_tensor(storage, layout, self.name())?;
        into_cuda(&x.broadcast_matmul(&self.weight.t()?)?, self.name())
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (out, _) = self.weight.dims2()?;
        let rows = grad_res.elem_count() / out;
        let grad = grad_res.reshape((rows, out))?.matmul(&self.weight.to_dtype(grad_res.dtype())?)?;
        Ok(Some(grad.reshape(arg.shape())?))
    }
}

/// Per-row cross-entropy `[rows]` of f32 logits `[rows, vocab]` against
/// `targets`, differentiable with respect to the logits.
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    if rows != targets.len() || targets.iter().any(|&t| t as usize >= vocab) {
        candle_core::bail!("cross_entropy: {} targets for {rows} rows of {vocab} logits", targets.len());
    }
    logits.to_dtype(DType::F32)?.contiguous()?.apply_op1(CrossEntropy {
        targets: targets.to_vec(),
        lse: Default::default(),
        #[cfg(feature = "cuda")]
        lse_gpu: Default::default(),
    })
}

struct CrossEntropy {
    targets: Vec<u32>,
    /// Log-sum-exp per row, from the forward pass for the backward pass.
    lse: std::sync::OnceLock<Vec<f32>>,
    /// The same, from a forward pass on a GPU (stays there).
    #[cfg(feature = "cuda")]
    lse_gpu: std::sync::OnceLock<Tensor>,
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, vocab) = layout.shape().dims2()?;
        let data = f32_slice(storage, layout)?;
        let (mut loss, mut lse) = (vec![0f32; rows], vec![0f32; rows]);
        swift_kernels::loss::cross_entropy_rows(data, vocab, &self.targets, &mut loss, &mut lse);
        let _ = self.lse.set(lse);
        Ok((CpuStorage::F32(loss), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &candle_core::CudaStorage, layout: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let logits = cuda_tensor(storage, layout, self.name())?;
        let targets = Tensor::new(self.targets.as_slice(), logits.device())?;
        let (loss, lse) = swift_kernels::cuda::loss::cross_entropy(&logits, &targets)?;
        let _ = self.lse_gpu.set(lse);
        into_cuda(&loss, self.name())
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if arg.device().is_cuda() {
            let lse = self.lse_gpu.get().ok_or_else(|| candle_core::Error::Msg("cross-entropy: backward before forward".into()))?;
            let targets = Tensor::new(self.targets.as_slice(), arg.device())?;
            let grad_out = grad_res.to_dtype(DType::F32)?.contiguous()?;
            return Ok(Some(swift_kernels::cuda::loss::cross_entropy_grad(&arg.contiguous()?, &targets, lse, &grad_out)?));
        }
        let (rows, vocab) = arg.dims2()?;
        let grad_out = grad_res.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let mut grad = vec![0f32; rows * vocab];
        let lse = self.lse.get().ok_or_else(|| candle_core::Error::Msg("cross-entropy: backward before forward".into()))?;
        with_f32(&arg.contiguous()?, |data| swift_kernels::loss::cross_entropy_grad(data, vocab, &self.targets, lse, &grad_out, &mut grad))?;
        Ok(Some(Tensor::from_vec(grad, (rows, vocab), arg.device())?))
    }
}

/// Rows of logits computed at once by [`linear_cross_entropy`] on a GPU: a
/// `[512, vocab]` f32 block (311 MB for Qwen's 151 936 tokens) instead of the
/// whole `[rows, vocab]` matrix.
const LOGIT_ROWS: usize = 512;

/// Logits per block on the CPU: about 4 M f32 (16 MB), so that a block and
/// its gradient stay below glibc's largest mmap threshold (32 MB) and their
/// memory is reused from block to block instead of faulted in anew.
const CPU_BLOCK_LOGITS: usize = 1 << 22;

/// Rows per block of [`linear_cross_entropy`] for this device and vocabulary.
fn logit_rows(hidden: &Tensor, vocab: usize) -> usize {
    if hidden.device().is_cpu() {
        (CPU_BLOCK_LOGITS / vocab.max(1)).clamp(8, LOGIT_ROWS)
    } else {
        LOGIT_ROWS
    }
}

/// Per-row cross-entropy `[rows]` of `hidden · weightᵀ` (`hidden` `[rows, h]`,
/// `weight` `[vocab, h]` frozen) against `targets`, differentiable with respect
/// to `hidden`, without ever holding the `[rows, vocab]` logits: blocks of
/// [`LOGIT_ROWS`] rows are multiplied, turned into loss and logit gradient in
/// one pass (in place on a GPU), and folded back into `dL/dhidden` at once.
pub fn linear_cross_entropy(hidden: &Tensor, weight: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
    let (rows, _) = hidden.dims2()?;
    let (vocab, _) = weight.dims2()?;
    if rows != targets.len() || targets.iter().any(|&t| t as usize >= vocab) {
        candle_core::bail!("linear_cross_entropy: {} targets for {rows} rows of {vocab} logits", targets.len());
    }
    hidden.contiguous()?.apply_op1(LinearCrossEntropy { weight: weight.clone(), targets: targets.to_vec(), grad: Default::default() })
}

struct LinearCrossEntropy {
    weight: Tensor,
    targets: Vec<u32>,
    /// `dL/dhidden` for a unit upstream gradient per row, from the forward pass.
    grad: std::sync::OnceLock<Tensor>,
}

impl LinearCrossEntropy {
    /// The loss per row, keeping the gradient for the backward pass.
    fn run(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        let rows = hidden.dim(0)?;
        let block = logit_rows(hidden, self.weight.dim(0)?);
        let (mut losses, mut grads) = (Vec::new(), Vec::new());
        for first in (0..rows).step_by(block) {
            let n = block.min(rows - first);
            let h = hidden.narrow(0, first, n)?;
            let logits = h.matmul(&self.weight.t()?)?.to_dtype(DType::F32)?;
            let targets = &self.targets[first..first + n];
            let (loss, dlogits) = block_loss_and_grad(logits, targets)?;
            grads.push(dlogits.to_dtype(self.weight.dtype())?.matmul(&self.weight)?.to_dtype(hidden.dtype())?);
            losses.push(loss);
        }
        let _ = self.grad.set(Tensor::cat(&grads, 0)?);
        Tensor::cat(&losses, 0)
    }
}

/// Loss `[n]` and its gradient with respect to f32 logits `[n, vocab]`.
fn block_loss_and_grad(logits: Tensor, targets: &[u32]) -> candle_core::Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        let t = Tensor::new(targets, logits.device())?;
        return swift_kernels::cuda::loss::cross_entropy_fused(logits, &t, 1.0);
    }
    let (n, vocab) = logits.dims2()?;
    let logits = logits.contiguous()?;
    let mut loss = vec![0f32; n];
    let mut grad = vec![0f32; n * vocab];
    with_f32(&logits, |values| swift_kernels::loss::cross_entropy_loss_and_grad(values, vocab, targets, &mut loss, &mut grad))?;
    Ok((Tensor::from_vec(loss, n, logits.device())?, Tensor::from_vec(grad, (n, vocab), logits.device())?))
}

impl CustomOp1 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let hidden = cpu_tensor(storage, layout, self.name())?;
        into_cpu(&self.run(&hidden)?, self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &candle_core::CudaStorage, layout: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let hidden = cuda_tensor(storage, layout, self.name())?;
        into_cuda(&self.run(&hidden)?, self.name())
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = self.grad.get().ok_or_else(|| candle_core::Error::Msg("linear-cross-entropy: backward before forward".into()))?;
        let scale = grad_res.to_dtype(grad.dtype())?.unsqueeze(1)?;
        Ok(Some(grad.broadcast_mul(&scale)?.reshape(arg.shape())?))
    }
}

/// Softmax over the last dimension of an f32 tensor, with a fused backward.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.dtype() != DType::F32 || !(x.device().is_cpu() || cfg!(feature = "cuda") && x.device().is_cuda()) {
        return candle_nn::ops::softmax(x, candle_core::D::Minus1);
    }
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

/// The CPU backward of a softmax over the last dimension whose input was
/// scaled by `scale` (and shifted by a constant mask), from its output `res`.
fn softmax_backward(res: &Tensor, grad_res: &Tensor, scale: f32) -> candle_core::Result<Tensor> {
    let n = *res.dims().last().unwrap_or(&1);
    let (y, g) = (f32_values(res)?, f32_values(grad_res)?);
    let mut dx = vec![0f32; y.len()];
    swift_kernels::rows::masked_softmax_rows_grad(&y, &g, n, scale, &mut dx);
    Tensor::from_vec(dx, res.shape(), res.device())
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = *layout.dims().last().unwrap_or(&1);
        let x = f32_slice(storage, layout)?;
        let mut y = vec![0f32; x.len()];
        swift_kernels::rows::softmax_rows(x, n, &mut y);
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &candle_core::CudaStorage, layout: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let x = cuda_tensor(storage, layout, self.name())?;
        into_cuda(&swift_kernels::cuda::rows::softmax(&x)?, self.name())
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if res.device().is_cuda() {
            let g = grad_res.to_dtype(DType::F32)?.contiguous()?;
            return Ok(Some(swift_kernels::cuda::rows::softmax_grad(&res.contiguous()?, &g)?));
        }
        softmax_backward(res, grad_res, 1.0).map(Some)
    }
}

/// RMSNorm (`w ⊙ x/√(mean(x²)+ε)`) of rows with a frozen weight, with a
/// fused backward for `x`: f32 rows on the CPU; f32 or bf16 rows on a GPU
/// (bf16 as transformers computes it: normalised, rounded, then scaled).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() {
        if x.dtype() != DType::F32 {
            candle_core::bail!("ops::rms_norm runs on f32 tensors on the CPU");
        }
        let weight = weight.to_dtype(DType::F32)?;
        return x.contiguous()?.apply_op1(RmsNorm { weight, eps });
    }
    if !cfg!(feature = "cuda") {
        candle_core::bail!("ops::rms_norm: no kernel for {:?}", x.device().location());
    }
    x.contiguous()?.apply_op1(RmsNorm { weight: weight.to_dtype(x.dtype())?.contiguous()?, eps })
}

struct RmsNorm {
    /// `[n]`, f32 on the CPU, the input's dtype on a GPU.
    weight: Tensor,
    eps: f32,
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let count = layout.shape().elem_count();
        let weight = self.weight.to_vec1::<f32>()?;
        if layout.dims().last() != Some(&weight.len()) {
            candle_core::bail!("rms-norm: rows of {:?} do not match a weight of {}", layout.dims(), weight.len());
        }
        let x = f32_slice(storage, layout)?;
        let mut y = vec![0f32; count];
        swift_kernels::rows::rms_norm_rows(x, &weight, self.eps, &mut y);
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &candle_core::CudaStorage, layout: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let x = cuda_tensor(storage, layout, self.name())?;
        into_cuda(&swift_kernels::cuda::rows::rms_norm(&x, &self.weight, self.eps)?, self.name())
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if arg.device().is_cuda() {
            let g = grad_res.to_dtype(arg.dtype())?.contiguous()?;
            return Ok(Some(swift_kernels::cuda::rows::rms_norm_grad(&arg.contiguous()?, &self.weight, &g, self.eps)?));
        }
        let weight = self.weight.to_vec1::<f32>()?;
        let x = arg.flatten_all()?.to_vec1::<f32>()?;
        let g = grad_res.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0f32; x.len()];
        swift_kernels::rows::rms_norm_rows_grad(&x, &weight, &g, self.eps, &mut dx);
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Attention probabilities for training, `softmax(scores·scale + mask)`
/// over the last dimension, from f32 `scores` `[b, heads, t, n]` and an
/// additive f32 `mask` `[b, 1, t, n]`: one fused kernel each way on the
/// CPU; elsewhere candle's scale and broadcast add, then [`softmax_last_dim`].
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let (b, heads, t, n) = scores.dims4()?;
    if !(scores.device().is_cpu() && scores.dtype() == DType::F32) || mask.dims() != [b, 1, t, n] {
        return softmax_last_dim(&(scores * scale)?.broadcast_add(mask)?);
    }
    let mask = mask.to_dtype(DType::F32)?.contiguous()?;
    scores.contiguous()?.apply_op1(MaskedSoftmax { mask, heads, t, scale: scale as f32 })
}

struct MaskedSoftmax {
    /// `[b, 1, t, n]`, contiguous f32 on the CPU (shared by every layer's op).
    mask: Tensor,
    heads: usize,
    t: usize,
    scale: f32,
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout)?;
        let n = *layout.dims().last().unwrap_or(&1);
        let mut y = vec![0f32; x.len()];
        with_f32(&self.mask, |mask| swift_kernels::rows::masked_softmax_rows(x, mask, self.heads, self.t, n, self.scale, &mut y))?;
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        softmax_backward(res, grad_res, self.scale).map(Some)
    }
}

/// SwiGLU's `silu(gate) ⊙ up` for training: one fused kernel forward and one
/// backward for both inputs (f32 on the CPU; f32 or bf16 on a GPU), instead
/// of candle's four ops and their saved intermediates.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    let fused = gate.device().is_cpu() && gate.dtype() == DType::F32
        || cfg!(feature = "cuda") && gate.device().is_cuda() && matches!(gate.dtype(), DType::F32 | DType::BF16);
    if !fused || gate.dims() != up.dims() || gate.dtype() != up.dtype() {
        return gate.silu()? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (gate, up) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        let mut y = vec![0f32; gate.len()];
        swift_kernels::rows::silu_mul(gate, up, &mut y);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout)
        -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (gate, up) = (cuda_tensor(s1, l1, self.name())?, cuda_tensor(s2, l2, self.name())?);
        into_cuda(&swift_kernels::cuda::rows::silu_mul(&gate, &up)?, self.name())
    }

    fn bwd(&self, gate: &Tensor, up: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if gate.device().is_cuda() {
            let g = grad_res.to_dtype(gate.dtype())?.contiguous()?;
            let (dgate, dup) = swift_kernels::cuda::rows::silu_mul_grad(&gate.contiguous()?, &up.contiguous()?, &g)?;
            return Ok((Some(dgate), Some(dup)));
        }
        let (g, u, dy) = (f32_values(gate)?, f32_values(up)?, f32_values(grad_res)?);
        let (mut dgate, mut dup) = (vec![0f32; g.len()], vec![0f32; g.len()]);
        swift_kernels::rows::silu_mul_grad(&g, &u, &dy, &mut dgate, &mut dup);
        let device = gate.device();
        Ok((Some(Tensor::from_vec(dgate, gate.shape(), device)?), Some(Tensor::from_vec(dup, up.shape(), device)?)))
    }
}

/// RoPE (rotate-half layout) for training on `x` `[b, heads, t, d]` with
/// per-row tables `cos`, `sin` `[b, t, d/2]`: swift's kernel forward and
/// backward for f32 on the CPU, candle's composition elsewhere.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (b, heads, t, d) = x.dims4()?;
    if cos.dims() != [b, t, d / 2] || sin.dims() != cos.dims() {
        candle_core::bail!("rope: tables {:?} for x {:?}", cos.dims(), x.dims());
    }
    if !(x.device().is_cpu() && x.dtype() == DType::F32) {
        let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
        let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
        let half = d / 2;
        let rotated = Tensor::cat(&[&x.narrow(D::Minus1, half, half)?.neg()?, &x.narrow(D::Minus1, 0, half)?], D::Minus1)?;
        return x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?;
    }
    let shape = swift_kernels::rope::RopeShape { batch: b, heads, tokens: t, head_dim: d };
    let (cos, sin) = (cos.to_dtype(DType::F32)?.contiguous()?, sin.to_dtype(DType::F32)?.contiguous()?);
    x.contiguous()?.apply_op1(Rope { cos, sin, shape })
}

struct Rope {
    /// `[b, t, d/2]`, contiguous f32 on the CPU (shared by every layer's op).
    cos: Tensor,
    sin: Tensor,
    shape: swift_kernels::rope::RopeShape,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout)?;
        let mut y = vec![0f32; x.len()];
        with_f32(&self.cos, |cos| with_f32(&self.sin, |sin| swift_kernels::rope::rope(x, cos, sin, self.shape, &mut y)))??;
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = f32_values(grad_res)?;
        let mut dx = vec![0f32; g.len()];
        with_f32(&self.cos, |cos| with_f32(&self.sin, |sin| swift_kernels::rope::rope_grad(&g, cos, sin, self.shape, &mut dx)))??;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    #[test]
    fn fused_ops_match_candles_composed_ones() {
        let device = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 7), &device).unwrap();
        let x = Var::new(Tensor::randn(0f32, 1.0, (3, 7), &device).unwrap().to_vec2::<f32>().unwrap(), &device).unwrap();
        let targets = [4u32, 0, 2];
        let ours = cross_entropy(&frozen_matmul(x.as_tensor(), &w).unwrap(), &targets).unwrap().sum_all().unwrap();
        let logits = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        let t = Tensor::new(&targets, &device).unwrap().unsqueeze(1).unwrap();
        let reference = log_probs.gather(&t, 1).unwrap().sum_all().unwrap().neg().unwrap();
        let (a, b) = (ours.to_scalar::<f32>().unwrap(), reference.to_scalar::<f32>().unwrap());
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        let ga = ours.backward().unwrap().get(x.as_tensor()).unwrap().clone();
        let gb = reference.backward().unwrap().get(x.as_tensor()).unwrap().clone();
        let diff = (ga - gb).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "gradients differ by {diff}");
    }

    #[test]
    fn linear_cross_entropy_matches_the_unfused_loss_and_gradient() {
        let device = Device::Cpu;
        // More rows than one logit block, so the blocks are stitched together.
        let rows = LOGIT_ROWS + 37;
        let w = Tensor::randn(0f32, 0.5, (11, 6), &device).unwrap();
        let h = Var::new(Tensor::randn(0f32, 1.0, (rows, 6), &device).unwrap().to_vec2::<f32>().unwrap(), &device).unwrap();
        let targets: Vec<u32> = (0..rows as u32).map(|r| r * 7 % 11).collect();
        let weights = Tensor::randn(0f32, 1.0, rows, &device).unwrap();
        let fused = (linear_cross_entropy(h.as_tensor(), &w, &targets).unwrap() * &weights).unwrap().sum_all().unwrap();
        let unfused = (cross_entropy(&frozen_matmul(h.as_tensor(), &w).unwrap(), &targets).unwrap() * &weights)
            .unwrap()
            .sum_all()
            .unwrap();
        let (a, b) = (fused.to_scalar::<f32>().unwrap(), unfused.to_scalar::<f32>().unwrap());
        assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        let ga = fused.backward().unwrap().get(h.as_tensor()).unwrap().clone();
        let gb = unfused.backward().unwrap().get(h.as_tensor()).unwrap().clone();
        let diff = (ga - gb).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "gradients differ by {diff}");
    }

    #[test]
    fn fused_softmax_and_rms_norm_match_candles_composed_ones() {
        let device = Device::Cpu;
        let x = Var::new(Tensor::randn(0f32, 2.0, (2, 3, 9), &device).unwrap().to_vec3::<f32>().unwrap(), &device).unwrap();
        let w = Tensor::randn(1f32, 0.1, 9, &device).unwrap();
        let r = Tensor::randn(0f32, 1.0, (2, 3, 9), &device).unwrap();
        let check = |ours: Tensor, reference: Tensor| {
            let d = (&ours - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "forward differs by {d}");
            let ga = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap().clone();
            let gb = (reference * &r).unwrap().sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap().clone();
            let d = (ga - gb).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "gradient differs by {d}");
        };
        check(softmax_last_dim(x.as_tensor()).unwrap(), candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap());
        let t = x.as_tensor();
        let composed = t.broadcast_div(&(t.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-6).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&w)
            .unwrap();
        check(rms_norm(t, &w, 1e-6).unwrap(), composed);
    }

    #[test]
    fn fused_rope_and_silu_mul_match_candles_composed_ones() {
        let device = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &device).unwrap()).unwrap();
        let angles = Tensor::randn(0f32, 2.0, (2, 5, 4), &device).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let r = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &device).unwrap();
        let fused = rope(x.as_tensor(), &cos, &sin).unwrap();
        // candle's own per-row RoPE (inference only) is the forward reference.
        let reference = candle_nn::rotary_emb::rope(x.as_tensor(), &cos, &sin).unwrap();
        let d = (&fused - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-6, "rope differs by {d}");
        // The composed path (used off the CPU) gives the same values and gradient.
        let composed = {
            let cos = Tensor::cat(&[&cos, &cos], D::Minus1).unwrap().unsqueeze(1).unwrap();
            let sin = Tensor::cat(&[&sin, &sin], D::Minus1).unwrap().unsqueeze(1).unwrap();
            let t = x.as_tensor();
            let rotated = Tensor::cat(&[&t.narrow(D::Minus1, 4, 4).unwrap().neg().unwrap(), &t.narrow(D::Minus1, 0, 4).unwrap()], D::Minus1).unwrap();
            (t.broadcast_mul(&cos).unwrap() + rotated.broadcast_mul(&sin).unwrap()).unwrap()
        };
        let ga = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap().clone();
        let gb = (composed * &r).unwrap().sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap().clone();
        let d = (ga - gb).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "rope gradient differs by {d}");

        let scores = Var::from_tensor(&Tensor::randn(0f32, 2.0, (2, 3, 4, 4), &device).unwrap()).unwrap();
        let mask: Vec<f32> = (0..32).map(|i| if i % 4 > (i / 4) % 4 { f32::NEG_INFINITY } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (2, 1, 4, 4), &device).unwrap();
        let r = Tensor::randn(0f32, 1.0, (2, 3, 4, 4), &device).unwrap();
        let fused = masked_softmax(scores.as_tensor(), &mask, 0.3).unwrap();
        let composed = candle_nn::ops::softmax((scores.as_tensor() * 0.3).unwrap().broadcast_add(&mask).unwrap().as_ref(), D::Minus1).unwrap();
        let d = (&fused - &composed).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-6, "masked softmax differs by {d}");
        let ga = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap().get(scores.as_tensor()).unwrap().clone();
        let gb = (composed * &r).unwrap().sum_all().unwrap().backward().unwrap().get(scores.as_tensor()).unwrap().clone();
        let d = (ga - gb).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "masked softmax gradient differs by {d}");

        let gate = Var::from_tensor(&Tensor::randn(0f32, 2.0, (3, 7), &device).unwrap()).unwrap();
        let up = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 7), &device).unwrap()).unwrap();
        let r = Tensor::randn(0f32, 1.0, (3, 7), &device).unwrap();
        let fused = (silu_mul(gate.as_tensor(), up.as_tensor()).unwrap() * &r).unwrap().sum_all().unwrap();
        let composed = ((gate.as_tensor().silu().unwrap() * up.as_tensor()).unwrap() * &r).unwrap().sum_all().unwrap();
        let (a, b) = (fused.to_scalar::<f32>().unwrap(), composed.to_scalar::<f32>().unwrap());
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        let (gf, gc) = (fused.backward().unwrap(), composed.backward().unwrap());
        for v in [&gate, &up] {
            let d = (gf.get(v.as_tensor()).unwrap() - gc.get(v.as_tensor()).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
        }
    }
}
