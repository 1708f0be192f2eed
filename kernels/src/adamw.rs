//! The optimizer step in one pass: AdamW (PyTorch's `torch.optim.AdamW`,
//! decoupled weight decay) over one flat buffer holding every trainable
//! tensor, with the global-norm clip folded into the same pass.
//!
//! | pass | reads | writes |
//! |---|---|---|
//! | [`sum_squares`] | gradients | one f64 |
//! | [`adamw_update`] | parameters, gradients, moments | parameters, moments |
//!
//! Clipping (`torch.nn.utils.clip_grad_norm_`) needs the global norm before
//! any parameter moves, so it costs one read of the gradients; the scaling it
//! implies is applied inside the update (`g · clip`) rather than by a pass of
//! its own. Both passes split the buffer into fixed chunks of [`CHUNK`]
//! elements: the norm's partial sums are added in chunk order and the update
//! is elementwise, so results do not depend on the thread count. The CUDA
//! version (`cuda/optim.cu`) computes the same step on the GPU's copy.

use rayon::prelude::*;

/// Elements per parallel task (fixed, so that sums have a fixed order).
pub const CHUNK: usize = 1 << 14;

/// Σ g² over `grads`, in f64: per-chunk sums (eight lanes each) added in chunk order.
pub fn sum_squares(grads: &[f32]) -> f64 {
    let partial: Vec<f64> = grads.par_chunks(CHUNK).map(chunk_sum_squares).collect();
    partial.iter().sum()
}

fn chunk_sum_squares(chunk: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let pieces = chunk.chunks_exact(8);
    let rest = pieces.remainder();
    for piece in pieces {
        for l in 0..8 {
            lanes[l] += piece[l] as f64 * piece[l] as f64;
        }
    }
    for (l, &g) in rest.iter().enumerate() {
        lanes[l] += g as f64 * g as f64;
    }
    lanes.iter().sum()
}

/// The scalars of one AdamW step, derived once per step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    /// `lr / (1 − β₁ᵗ)`.
    pub step_size: f32,
    /// `√(1 − β₂ᵗ)`.
    pub bias2_sqrt: f32,
    /// `1 − lr · weight_decay`.
    pub decay: f32,
    /// β₁.
    pub beta1: f32,
    /// β₂.
    pub beta2: f32,
    /// ε.
    pub eps: f32,
    /// The clip factor every gradient is multiplied by first (1 = no clip).
    pub grad_scale: f32,
}

impl AdamWStep {
    /// The scalars of step `t` (1-based) at learning rate `lr`.
    pub fn new(t: u64, lr: f64, betas: (f64, f64), eps: f64, weight_decay: f64, grad_scale: f32) -> Self {
        let (b1, b2) = betas;
        let t = t.min(i32::MAX as u64) as i32;
        Self {
            step_size: (lr / (1.0 - b1.powi(t))) as f32,
            bias2_sqrt: (1.0 - b2.powi(t)).sqrt() as f32,
            decay: (1.0 - lr * weight_decay) as f32,
            beta1: b1 as f32,
            beta2: b2 as f32,
            eps: eps as f32,
            grad_scale,
        }
    }
}

/// The factor `clip_grad_norm_` scales gradients by for a global `norm`
/// (1 when `max_norm` is 0, i.e. off, or the norm is within it).
pub fn clip_factor(norm: f64, max_norm: f64) -> f32 {
    if max_norm > 0.0 {
        (max_norm / (norm + 1e-6)).min(1.0) as f32
    } else {
        1.0
    }
}

/// One AdamW update of every element: `p ← p·decay`, then the bias-corrected
/// Adam step on `g · grad_scale`. All four slices have the same length.
pub fn adamw_update(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWStep) {
    let n = params.len();
    assert!(grads.len() == n && m.len() == n && v.len() == n, "adamw: buffers of different lengths");
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| update_chunk(p, g, m, v, s));
}

#[inline(always)]
fn update_chunk_generic(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWStep) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = g * s.grad_scale;
        *p *= s.decay;
        *m += (g - *m) * (1.0 - s.beta1);
        *v = *v * s.beta2 + (1.0 - s.beta2) * g * g;
        let denom = v.sqrt() / s.bias2_sqrt + s.eps;
        *p -= s.step_size * *m / denom;
    }
}

fn update_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWStep) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn fast(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWStep) {
            update_chunk_generic(p, g, m, v, s)
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features `fast` is compiled for.
            return unsafe { fast(p, g, m, v, s) };
        }
    }
    update_chunk_generic(p, g, m, v, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torch.optim.AdamW's update, written out element by element in f64.
    fn reference(p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64], t: i32, lr: f64, wd: f64) {
        let (b1, b2, eps) = (0.9, 0.999, 1e-8);
        for i in 0..p.len() {
            p[i] *= 1.0 - lr * wd;
            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
            let denom = (v[i] / (1.0 - b2.powi(t))).sqrt() + eps;
            p[i] -= lr / (1.0 - b1.powi(t)) * m[i] / denom;
        }
    }

    #[test]
    fn three_steps_match_torchs_formula() {
        let n = CHUNK + 37; // two chunks, the second partial
        let mut p: Vec<f32> = (0..n).map(|i| ((i * 13) % 17) as f32 / 17.0 - 0.5).collect();
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let mut p64: Vec<f64> = p.iter().map(|&x| x as f64).collect();
        let (mut m64, mut v64) = (vec![0f64; n], vec![0f64; n]);
        for t in 1..=3 {
            let g: Vec<f32> = (0..n).map(|i| (((i + t) * 7) % 11) as f32 / 11.0 - 0.4).collect();
            let g64: Vec<f64> = g.iter().map(|&x| x as f64).collect();
            adamw_update(&mut p, &g, &mut m, &mut v, &AdamWStep::new(t as u64, 1e-2, (0.9, 0.999), 1e-8, 0.1, 1.0));
            reference(&mut p64, &g64, &mut m64, &mut v64, t as i32, 1e-2, 0.1);
        }
        let worst = p.iter().zip(&p64).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-6, "parameters differ from torch's formula by {worst}");
    }

    #[test]
    fn the_clip_factor_scales_gradients_inside_the_update() {
        let g = vec![3.0f32, 4.0];
        let norm = sum_squares(&g).sqrt();
        assert_eq!(norm, 5.0);
        let factor = clip_factor(norm, 1.0);
        let (mut a, mut b) = (vec![1.0f32, 1.0], vec![1.0f32, 1.0]);
        let (mut ma, mut va, mut mb, mut vb) = (vec![0.0; 2], vec![0.0; 2], vec![0.0; 2], vec![0.0; 2]);
        adamw_update(&mut a, &g, &mut ma, &mut va, &AdamWStep::new(1, 0.1, (0.9, 0.999), 1e-8, 0.0, factor));
        let scaled: Vec<f32> = g.iter().map(|x| x * factor).collect();
        adamw_update(&mut b, &scaled, &mut mb, &mut vb, &AdamWStep::new(1, 0.1, (0.9, 0.999), 1e-8, 0.0, 1.0));
        assert_eq!((a, ma, va), (b, mb, vb));
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        assert_eq!(clip_factor(50.0, 0.0), 1.0);
    }

    #[test]
    fn the_norm_does_not_depend_on_the_thread_count() {
        let g: Vec<f32> = (0..3 * CHUNK + 5).map(|i| ((i * 31) % 97) as f32 / 97.0 - 0.5).collect();
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(|| sum_squares(&g));
        let four = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap().install(|| sum_squares(&g));
        assert_eq!(one.to_bits(), four.to_bits());
    }
}
