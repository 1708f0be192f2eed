//! Row-wise kernels on the GPU (`cuda/rows.cu`): RMSNorm, softmax and
//! `silu(gate)·up`, each with its gradient. CPU references: [`crate::rows`].

use candle_core::{DType, Result, Tensor};

use super::{alloc, config, device_of, float_dtype, input, int, launch, output, Float, Module};

const ROW_THREADS: u32 = 256;
const ELEMENTWISE_THREADS: u32 = 256;

/// Rows and row length of `x` (`[…, n]`).
fn rows_of(x: &Tensor) -> Result<(usize, usize)> {
    let n = x.dims().last().copied().unwrap_or(1);
    Ok((x.elem_count() / n.max(1), n))
}

/// RMSNorm of each row of `x` (`[…, n]`, f32 or bf16) with weight `w` (`[n]`,
/// same dtype), as transformers computes it (in bf16: normalised, rounded,
/// then scaled by the weight).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    match float_dtype(x, "rms_norm")? {
        DType::F32 => rms_norm_as::<f32>(x, w, eps),
        _ => rms_norm_as::<half::bf16>(x, w, eps),
    }
}

fn rms_norm_as<T: Float>(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let op = "rms_norm";
    let device = device_of(x, op)?;
    let (rows, n) = rows_of(x)?;
    check_weight(w, n, x.dtype(), op)?;
    let (xi, wi) = (input(x, op)?, input(w, op)?);
    let mut y = alloc::<T>(&device, x.elem_count())?;
    let (rows_i, n_i) = (int(rows, "rows")?, int(n, "row length")?);
    let (xiv, wiv) = (xi.view::<T>()?, wi.view::<T>()?);
    launch!(device, Module::Rows, &format!("rms_norm_fwd_{}", T::SUFFIX), config(rows as u32, ROW_THREADS, 0);
        &xiv, &wiv, &mut y, &rows_i, &n_i, &eps)?;
    Ok(output(y, &device, x.shape().clone()))
}

/// The gradient of [`rms_norm`] with respect to `x` for an upstream gradient
/// `g` (same shape and dtype as `x`); the weight is frozen.
pub fn rms_norm_grad(x: &Tensor, w: &Tensor, g: &Tensor, eps: f32) -> Result<Tensor> {
    match float_dtype(x, "rms_norm_grad")? {
        DType::F32 => rms_norm_grad_as::<f32>(x, w, g, eps),
        _ => rms_norm_grad_as::<half::bf16>(x, w, g, eps),
    }
}

fn rms_norm_grad_as<T: Float>(x: &Tensor, w: &Tensor, g: &Tensor, eps: f32) -> Result<Tensor> {
    let op = "rms_norm_grad";
    let device = device_of(x, op)?;
    let (rows, n) = rows_of(x)?;
    check_weight(w, n, x.dtype(), op)?;
    check_like(g, x, op)?;
    let (xi, wi, gi) = (input(x, op)?, input(w, op)?, input(g, op)?);
    let mut dx = alloc::<T>(&device, x.elem_count())?;
    let (rows_i, n_i) = (int(rows, "rows")?, int(n, "row length")?);
    let (xiv, wiv, giv) = (xi.view::<T>()?, wi.view::<T>()?, gi.view::<T>()?);
    launch!(device, Module::Rows, &format!("rms_norm_bwd_{}", T::SUFFIX), config(rows as u32, ROW_THREADS, 0);
        &xiv, &wiv, &giv, &mut dx, &rows_i, &n_i, &eps)?;
    Ok(output(dx, &device, x.shape().clone()))
}

/// Softmax over the last dimension of an f32 tensor (`-inf` entries get 0).
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let op = "softmax";
    expect_f32(x, op)?;
    let device = device_of(x, op)?;
    let (rows, n) = rows_of(x)?;
    let xi = input(x, op)?;
    let mut y = alloc::<f32>(&device, x.elem_count())?;
    let (rows_i, n_i) = (int(rows, "rows")?, int(n, "row length")?);
    let xiv = xi.view::<f32>()?;
    launch!(device, Module::Rows, "softmax_fwd_f32", config(rows as u32, ROW_THREADS, 0);
        &xiv, &mut y, &rows_i, &n_i)?;
    Ok(output(y, &device, x.shape().clone()))
}

/// The gradient of [`softmax`] from its output `y` and the upstream gradient
/// `g`: `y ⊙ (g − ⟨g, y⟩)` per row.
pub fn softmax_grad(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    let op = "softmax_grad";
    expect_f32(y, op)?;
    check_like(g, y, op)?;
    let device = device_of(y, op)?;
    let (rows, n) = rows_of(y)?;
    let (yi, gi) = (input(y, op)?, input(g, op)?);
    let mut dx = alloc::<f32>(&device, y.elem_count())?;
    let (rows_i, n_i) = (int(rows, "rows")?, int(n, "row length")?);
    let (yiv, giv) = (yi.view::<f32>()?, gi.view::<f32>()?);
    launch!(device, Module::Rows, "softmax_bwd_f32", config(rows as u32, ROW_THREADS, 0);
        &yiv, &giv, &mut dx, &rows_i, &n_i)?;
    Ok(output(dx, &device, y.shape().clone()))
}

/// SwiGLU's `silu(gate) ⊙ up` (same shapes, f32 or bf16).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    match float_dtype(gate, "silu_mul")? {
        DType::F32 => silu_mul_as::<f32>(gate, up),
        _ => silu_mul_as::<half::bf16>(gate, up),
    }
}

fn silu_mul_as<T: Float>(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let op = "silu_mul";
    check_like(up, gate, op)?;
    let device = device_of(gate, op)?;
    let n = gate.elem_count() as i64;
    let (gi, ui) = (input(gate, op)?, input(up, op)?);
    let mut y = alloc::<T>(&device, gate.elem_count())?;
    let (giv, uiv) = (gi.view::<T>()?, ui.view::<T>()?);
    launch!(device, Module::Rows, &format!("silu_mul_fwd_{}", T::SUFFIX), elementwise(gate.elem_count());
        &giv, &uiv, &mut y, &n)?;
    Ok(output(y, &device, gate.shape().clone()))
}

/// The gradients of [`silu_mul`] with respect to `gate` and `up` for an
/// upstream gradient `g`.
pub fn silu_mul_grad(gate: &Tensor, up: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    match float_dtype(gate, "silu_mul_grad")? {
        DType::F32 => silu_mul_grad_as::<f32>(gate, up, g),
        _ => silu_mul_grad_as::<half::bf16>(gate, up, g),
    }
}

fn silu_mul_grad_as<T: Float>(gate: &Tensor, up: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    let op = "silu_mul_grad";
    check_like(up, gate, op)?;
    check_like(g, gate, op)?;
    let device = device_of(gate, op)?;
    let n = gate.elem_count() as i64;
    let (gati, upi, gi) = (input(gate, op)?, input(up, op)?, input(g, op)?);
    let mut dgate = alloc::<T>(&device, gate.elem_count())?;
    let mut dup = alloc::<T>(&device, gate.elem_count())?;
    let (gativ, upiv, giv) = (gati.view::<T>()?, upi.view::<T>()?, gi.view::<T>()?);
    launch!(device, Module::Rows, &format!("silu_mul_bwd_{}", T::SUFFIX), elementwise(gate.elem_count());
        &gativ, &upiv, &giv, &mut dgate, &mut dup, &n)?;
    Ok((output(dgate, &device, gate.shape().clone()), output(dup, &device, gate.shape().clone())))
}

/// A grid-stride launch over `n` elements (at most 65 536 blocks).
pub(crate) fn elementwise(n: usize) -> candle_core::cuda::cudarc::driver::LaunchConfig {
    let blocks = n.div_ceil(ELEMENTWISE_THREADS as usize).clamp(1, 65_536) as u32;
    config(blocks, ELEMENTWISE_THREADS, 0)
}

fn check_weight(w: &Tensor, n: usize, dtype: DType, op: &str) -> Result<()> {
    if w.dims() != [n] || w.dtype() != dtype {
        candle_core::bail!("{op}: the weight must be [{n}] {dtype:?}, got {:?} {:?}", w.dims(), w.dtype());
    }
    Ok(())
}

fn check_like(t: &Tensor, like: &Tensor, op: &str) -> Result<()> {
    if t.dims() != like.dims() || t.dtype() != like.dtype() {
        candle_core::bail!("{op}: expected {:?} {:?}, got {:?} {:?}", like.dims(), like.dtype(), t.dims(), t.dtype());
    }
    Ok(())
}

pub(crate) fn expect_f32(t: &Tensor, op: &str) -> Result<()> {
    if t.dtype() != DType::F32 {
        candle_core::bail!("{op}: f32 expected, got {:?}", t.dtype());
    }
    Ok(())
}
