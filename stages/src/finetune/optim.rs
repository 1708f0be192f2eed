//! AdamW (PyTorch's formulation, decoupled weight decay), learning-rate
//! schedules with linear warmup (as transformers' `get_*_schedule_with_warmup`),
//! and global gradient-norm clipping. All on plain `f32` buffers in a fixed
//! order, so results do not depend on the thread count.

use serde::{Deserialize, Serialize};

/// How the learning rate evolves after warmup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// Constant.
    Constant,
    /// Linear decay to zero at the last step.
    Linear,
    /// Half-cosine decay to zero at the last step (default).
    #[default]
    Cosine,
}

impl Schedule {
    /// The multiplier of the peak learning rate at optimizer step `step`
    /// (0-based) of `total`, after `warmup` linear warmup steps.
    pub fn factor(self, step: usize, total: usize, warmup: usize) -> f64 {
        if step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        let remaining = total.saturating_sub(warmup).max(1) as f64;
        let progress = (step - warmup) as f64 / remaining;
        match self {
            Schedule::Constant => 1.0,
            Schedule::Linear => (1.0 - progress).max(0.0),
            Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

/// AdamW hyperparameters.
#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    /// β₁, β₂.
    pub betas: (f64, f64),
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// AdamW's moments for every parameter tensor, and the step count.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    config_betas: (f64, f64),
    eps: f64,
    weight_decay: f64,
    /// Optimizer steps taken.
    pub step: u64,
    /// First moments, one buffer per parameter tensor.
    pub m: Vec<Vec<f32>>,
    /// Second moments.
    pub v: Vec<Vec<f32>>,
}

impl AdamW {
    /// Zero moments for parameters of these sizes.
    pub fn new(config: AdamWConfig, sizes: &[usize]) -> Self {
        Self {
            config_betas: config.betas,
            eps: config.eps,
            weight_decay: config.weight_decay,
            step: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// One update of every parameter with its gradient at learning rate `lr`:
    /// `p ← p·(1 − lr·wd)`, then the bias-corrected Adam step (torch.optim.AdamW).
    pub fn update(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], lr: f64) {
        self.step += 1;
        let (b1, b2) = self.config_betas;
        let bias1 = 1.0 - b1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - b2.powi(self.step as i32)).sqrt();
        let step_size = (lr / bias1) as f32;
        let decay = (1.0 - lr * self.weight_decay) as f32;
        let (b1, b2, eps, bias2_sqrt) = (b1 as f32, b2 as f32, self.eps as f32, bias2_sqrt as f32);
        for (((p, g), m), v) in params.iter_mut().zip(grads).zip(&mut self.m).zip(&mut self.v) {
            for i in 0..p.len() {
                p[i] *= decay;
                m[i] += (g[i] - m[i]) * (1.0 - b1);
                v[i] = v[i] * b2 + (1.0 - b2) * g[i] * g[i];
                let denom = v[i].sqrt() / bias2_sqrt + eps;
                p[i] -= step_size * m[i] / denom;
            }
        }
    }
}

/// The global L2 norm of all gradients (accumulated in f64, in order).
pub fn global_norm(grads: &[Vec<f32>]) -> f64 {
    grads.iter().flatten().map(|&g| g as f64 * g as f64).sum::<f64>().sqrt()
}

/// Scales gradients so their global norm is at most `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
pub fn clip(grads: &mut [Vec<f32>], max_norm: f64) -> f64 {
    let norm = global_norm(grads);
    if max_norm > 0.0 {
        let factor = (max_norm / (norm + 1e-6)).min(1.0) as f32;
        if factor < 1.0 {
            grads.iter_mut().flatten().for_each(|g| *g *= factor);
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_warm_up_then_decay() {
        assert_eq!(Schedule::Cosine.factor(0, 100, 10), 0.0);
        assert_eq!(Schedule::Cosine.factor(5, 100, 10), 0.5);
        assert_eq!(Schedule::Cosine.factor(10, 100, 10), 1.0);
        assert!((Schedule::Cosine.factor(55, 100, 10) - 0.5).abs() < 1e-12);
        assert!((Schedule::Linear.factor(55, 100, 10) - 0.5).abs() < 1e-12);
        assert_eq!(Schedule::Constant.factor(99, 100, 0), 1.0);
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_lr() {
        let mut opt = AdamW::new(AdamWConfig { betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.0 }, &[2]);
        let mut params = vec![vec![1.0f32, -1.0]];
        opt.update(&mut params, &[vec![0.5, -3.0]], 0.1);
        assert!((params[0][0] - 0.9).abs() < 1e-6 && (params[0][1] + 0.9).abs() < 1e-6, "{params:?}");
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let mut grads = vec![vec![3.0f32], vec![4.0]];
        assert_eq!(clip(&mut grads, 1.0), 5.0);
        assert!((global_norm(&grads) - 1.0).abs() < 1e-5);
    }
}
