//! Cross-entropy over rows of logits on the GPU (`cuda/loss.cu`). CPU
//! reference: [`crate::loss`].
//!
//! Targets are `u32` token ids on the device; [`IGNORED`] marks a row that
//! contributes neither loss nor gradient.

use candle_core::{DType, Result, Tensor};

use super::{alloc, config, device_of, float_dtype, input, int, launch, output, Float, Module};

/// The target id of a row that is not scored.
pub const IGNORED: u32 = u32::MAX;

const ROW_THREADS: u32 = 256;

/// `(loss, lse)`, both f32 `[rows]`: per row of `logits` (`[rows, vocab]`,
/// f32 or bf16) `lse = logsumexp(row)` and `loss = lse − row[target]`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    match float_dtype(logits, "cross_entropy")? {
        DType::F32 => cross_entropy_as::<f32>(logits, targets),
        _ => cross_entropy_as::<half::bf16>(logits, targets),
    }
}

fn cross_entropy_as<T: Float>(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let op = "cross_entropy";
    let (rows, vocab) = shape(logits, targets, op)?;
    let device = device_of(logits, op)?;
    let (li, ti) = (input(logits, op)?, input(targets, op)?);
    let (lv, tv) = (li.view::<T>()?, ti.view::<u32>()?);
    let mut loss = alloc::<f32>(&device, rows)?;
    let mut lse = alloc::<f32>(&device, rows)?;
    let (rows_i, vocab_i) = (int(rows, "rows")?, int(vocab, "vocabulary")?);
    launch!(device, Module::Loss, &format!("cross_entropy_fwd_{}", T::SUFFIX), config(rows as u32, ROW_THREADS, 0);
        &lv, &tv, &mut loss, &mut lse, &rows_i, &vocab_i)?;
    Ok((output(loss, &device, rows), output(lse, &device, rows)))
}

/// The gradient of `Σ_r grad_out[r] · loss[r]` with respect to the logits,
/// in the logits' dtype, from the forward pass's `lse`.
pub fn cross_entropy_grad(logits: &Tensor, targets: &Tensor, lse: &Tensor, grad_out: &Tensor) -> Result<Tensor> {
    match float_dtype(logits, "cross_entropy_grad")? {
        DType::F32 => cross_entropy_grad_as::<f32>(logits, targets, lse, grad_out),
        _ => cross_entropy_grad_as::<half::bf16>(logits, targets, lse, grad_out),
    }
}

fn cross_entropy_grad_as<T: Float>(logits: &Tensor, targets: &Tensor, lse: &Tensor, grad_out: &Tensor) -> Result<Tensor> {
    let op = "cross_entropy_grad";
    let (rows, vocab) = shape(logits, targets, op)?;
    for (name, t) in [("lse", lse), ("grad_out", grad_out)] {
        if t.dims() != [rows] || t.dtype() != DType::F32 {
            candle_core::bail!("{op}: {name} must be f32 [{rows}], got {:?} {:?}", t.dtype(), t.dims());
        }
    }
    let device = device_of(logits, op)?;
    let (li, ti, si, gi) = (input(logits, op)?, input(targets, op)?, input(lse, op)?, input(grad_out, op)?);
    let (lv, tv, sv, gv) = (li.view::<T>()?, ti.view::<u32>()?, si.view::<f32>()?, gi.view::<f32>()?);
    let mut grad = alloc::<T>(&device, rows * vocab)?;
    let (rows_i, vocab_i) = (int(rows, "rows")?, int(vocab, "vocabulary")?);
    launch!(device, Module::Loss, &format!("cross_entropy_bwd_{}", T::SUFFIX), config(rows as u32, ROW_THREADS, 0);
        &lv, &tv, &sv, &gv, &mut grad, &rows_i, &vocab_i)?;
    Ok(output(grad, &device, (rows, vocab)))
}

/// Loss and gradient at once, for fused linear + cross-entropy: returns the
/// f32 loss per row and `logits` turned into `grad_scale · (softmax − onehot)`
/// in place (the logits are consumed: the gradient reuses their memory).
pub fn cross_entropy_fused(logits: Tensor, targets: &Tensor, grad_scale: f32) -> Result<(Tensor, Tensor)> {
    match float_dtype(&logits, "cross_entropy_fused")? {
        DType::F32 => cross_entropy_fused_as::<f32>(logits, targets, grad_scale),
        _ => cross_entropy_fused_as::<half::bf16>(logits, targets, grad_scale),
    }
}

fn cross_entropy_fused_as<T: Float>(logits: Tensor, targets: &Tensor, grad_scale: f32) -> Result<(Tensor, Tensor)> {
    let op = "cross_entropy_fused";
    let (rows, vocab) = shape(&logits, targets, op)?;
    let device = device_of(&logits, op)?;
    // Overwritten in place: a private contiguous copy unless the logits are one.
    let logits = if logits.is_contiguous() && logits.layout().start_offset() == 0 { logits } else { logits.force_contiguous()? };
    let fused = FusedInPlace::<T> { targets: targets.clone(), rows, vocab, grad_scale, loss: Default::default(), dtype: Default::default() };
    logits.inplace_op1(&fused)?;
    let loss = fused.loss.lock().expect("loss lock").take().expect("the in-place op ran");
    Ok((output(loss, &device, rows), logits))
}

/// The in-place launch of `cross_entropy_fused_*`, keeping the loss it writes.
struct FusedInPlace<T> {
    targets: Tensor,
    rows: usize,
    vocab: usize,
    grad_scale: f32,
    loss: std::sync::Mutex<Option<candle_core::cuda::cudarc::driver::CudaSlice<f32>>>,
    dtype: std::marker::PhantomData<T>,
}

impl<T: Float> candle_core::InplaceOp1 for FusedInPlace<T> {
    fn name(&self) -> &'static str {
        "cross_entropy_fused"
    }

    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &candle_core::Layout) -> Result<()> {
        candle_core::bail!("cross_entropy_fused: the CUDA kernel got CPU logits")
    }

    fn cuda_fwd(&self, storage: &mut candle_core::CudaStorage, layout: &candle_core::Layout) -> Result<()> {
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("cross_entropy_fused: needs contiguous logits at the start of their storage");
        }
        let device = storage.device.clone();
        let (rows_i, vocab_i) = (int(self.rows, "rows")?, int(self.vocab, "vocabulary")?);
        let ti = input(&self.targets, self.name())?;
        let tv = ti.view::<u32>()?;
        let mut loss = alloc::<f32>(&device, self.rows)?;
        let logits = storage.as_cuda_slice_mut::<T>()?;
        launch!(device, Module::Loss, &format!("cross_entropy_fused_{}", T::SUFFIX), config(self.rows as u32, ROW_THREADS, 0);
            logits, &tv, &mut loss, &rows_i, &vocab_i, &self.grad_scale)?;
        *self.loss.lock().expect("loss lock") = Some(loss);
        Ok(())
    }
}

/// `(rows, vocab)` after checking the logits and targets agree.
fn shape(logits: &Tensor, targets: &Tensor, op: &str) -> Result<(usize, usize)> {
    let (rows, vocab) = logits.dims2()?;
    if targets.dims() != [rows] || targets.dtype() != DType::U32 {
        candle_core::bail!("{op}: targets must be u32 [{rows}], got {:?} {:?}", targets.dtype(), targets.dims());
    }
    Ok((rows, vocab))
}
