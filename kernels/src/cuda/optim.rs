//! The optimizer step on the GPU (`cuda/optim.cu`): AdamW over one flat f32
//! buffer with the clip factor folded in, and the gradients' sum of squares
//! for the global-norm clip. CPU reference: [`crate::adamw`].

use candle_core::{DType, Result, Tensor};

use super::{alloc, config, device_of, input, launch, output, Module};
use crate::adamw::AdamWStep;

const THREADS: u32 = 256;
/// Blocks of [`sum_squares`]: a fixed count, so its partial sums (added on
/// the host in block order) do not depend on anything but the data.
const SUM_BLOCKS: u32 = 256;

fn check_flat(t: &Tensor, n: usize, what: &str) -> Result<()> {
    if t.dtype() != DType::F32 || t.dims() != [n] {
        candle_core::bail!("adamw: {what} must be f32 [{n}], got {:?} {:?}", t.dtype(), t.dims());
    }
    Ok(())
}

/// One AdamW step: the new `(params, m, v)` from flat f32 `params`,
/// `grads`, `m`, `v` (all `[n]` on one GPU), as [`crate::adamw::adamw_update`].
pub fn adamw(params: &Tensor, grads: &Tensor, m: &Tensor, v: &Tensor, s: &AdamWStep) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "adamw";
    let n = params.elem_count();
    for (what, t) in [("params", params), ("grads", grads), ("m", m), ("v", v)] {
        check_flat(t, n, what)?;
    }
    let device = device_of(params, op)?;
    let (pi, gi, mi, vi) = (input(params, op)?, input(grads, op)?, input(m, op)?, input(v, op)?);
    let (pv, gv, mv, vv) = (pi.view::<f32>()?, gi.view::<f32>()?, mi.view::<f32>()?, vi.view::<f32>()?);
    let (mut p_out, mut m_out, mut v_out) = (alloc::<f32>(&device, n)?, alloc::<f32>(&device, n)?, alloc::<f32>(&device, n)?);
    let blocks = (n.div_ceil(THREADS as usize)).clamp(1, 65536) as u32;
    let n_i = n as i64;
    launch!(device, Module::Optim, "adamw_f32", config(blocks, THREADS, 0);
        &pv, &gv, &mv, &vv, &mut p_out, &mut m_out, &mut v_out, &n_i,
        &s.step_size, &s.bias2_sqrt, &s.decay, &s.beta1, &s.beta2, &s.eps, &s.grad_scale)?;
    Ok((output(p_out, &device, n), output(m_out, &device, n), output(v_out, &device, n)))
}

/// Σ g² over a flat f32 tensor on a GPU, in f64.
pub fn sum_squares(grads: &Tensor) -> Result<f64> {
    let op = "sum_squares";
    let n = grads.elem_count();
    check_flat(grads, n, "grads")?;
    let device = device_of(grads, op)?;
    let gi = input(grads, op)?;
    let gv = gi.view::<f32>()?;
    let mut partial = alloc::<f64>(&device, SUM_BLOCKS as usize)?;
    let n_i = n as i64;
    launch!(device, Module::Optim, "sum_squares_f32", config(SUM_BLOCKS, THREADS, 0); &gv, &mut partial, &n_i)?;
    let partial = output(partial, &device, SUM_BLOCKS as usize).to_vec1::<f64>()?;
    Ok(partial.iter().sum())
}
