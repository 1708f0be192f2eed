//! AdamW (PyTorch's formulation, decoupled weight decay), learning-rate
//! schedules with linear warmup (as transformers' `get_*_schedule_with_warmup`),
//! and global gradient-norm clipping. The update runs over one flat `f32`
//! buffer of every trainable tensor in one pass, with sums in a fixed order,
//! so results do not depend on the thread count.

use serde::{Deserialize, Serialize};
use candle_core::{Device, Tensor};
use swift_kernels::adamw::AdamWStep;

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
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// β₁, β₂.
    pub betas: (f64, f64),
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// AdamW's moments for every trainable tensor, in one flat buffer in the
/// trainer's tensor order, kept on the device the adapters live on, and the
/// step count. Each update is one fused pass over all tensors, clip factor
/// included: [`swift_kernels::adamw`] on the CPU, its CUDA version
/// (`swift_kernels::cuda::optim`) on a GPU.
#[derive(Clone, Debug)]
pub struct AdamW {
    config: AdamWConfig,
    sizes: Vec<usize>,
    /// Optimizer steps taken.
    pub step: u64,
    moments: Moments,
}

/// First and second moments, where the parameters are.
#[derive(Clone, Debug)]
enum Moments {
    Host { m: Vec<f32>, v: Vec<f32> },
    #[cfg(feature = "cuda")]
    Gpu { m: Tensor, v: Tensor },
}

impl Moments {
    fn zeros(total: usize, device: &Device) -> candle_core::Result<Self> {
        Self::from_values(vec![0.0; total], vec![0.0; total], device)
    }

    fn from_values(m: Vec<f32>, v: Vec<f32>, device: &Device) -> candle_core::Result<Self> {
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => {
                let (mn, vn) = (m.len(), v.len());
                Ok(Moments::Gpu { m: Tensor::from_vec(m, mn, device)?, v: Tensor::from_vec(v, vn, device)? })
            }
            _ => Ok(Moments::Host { m, v }),
        }
    }
}

impl AdamW {
    /// Zero moments for parameters of these sizes on `device`.
    pub fn new(config: AdamWConfig, sizes: &[usize], device: &Device) -> candle_core::Result<Self> {
        let moments = Moments::zeros(sizes.iter().sum(), device)?;
        Ok(Self { config, sizes: sizes.to_vec(), step: 0, moments })
    }

    /// The first and second moments, one host buffer per tensor (for checkpoints).
    pub fn moments(&self) -> candle_core::Result<(Vec<Vec<f32>>, Vec<Vec<f32>>)> {
        let (m, v) = match &self.moments {
            Moments::Host { m, v } => (m.clone(), v.clone()),
            #[cfg(feature = "cuda")]
            Moments::Gpu { m, v } => (m.to_vec1::<f32>()?, v.to_vec1::<f32>()?),
        };
        Ok((split(&m, &self.sizes), split(&v, &self.sizes)))
    }

    /// Restores the step count and moments saved by [`AdamW::moments`] onto
    /// `device`; false if they do not fit these parameters.
    pub fn restore(&mut self, step: u64, m: &[Vec<f32>], v: &[Vec<f32>], device: &Device) -> candle_core::Result<bool> {
        let fits = |b: &[Vec<f32>]| b.iter().map(Vec::len).eq(self.sizes.iter().copied());
        if !fits(m) || !fits(v) {
            return Ok(false);
        }
        self.step = step;
        self.moments = Moments::from_values(m.concat(), v.concat(), device)?;
        Ok(true)
    }

    /// One update of every parameter (`params`, flat f32 in the tensors'
    /// order) with its gradient (`grads`, the same layout) times
    /// `grad_scale` (the clip factor) at learning rate `lr`: `p ← p·(1 − lr·wd)`,
    /// then the bias-corrected Adam step (torch.optim.AdamW). Returns the new
    /// parameters, on the same device.
    pub fn update(&mut self, params: &Tensor, grads: &Tensor, lr: f64, grad_scale: f32) -> candle_core::Result<Tensor> {
        self.step += 1;
        let c = &self.config;
        let step = AdamWStep::new(self.step, lr, c.betas, c.eps, c.weight_decay, grad_scale);
        match &mut self.moments {
            Moments::Host { m, v } => {
                let mut values = params.to_vec1::<f32>()?;
                let grads = grads.to_vec1::<f32>()?;
                swift_kernels::adamw::adamw_update(&mut values, &grads, m, v, &step);
                Tensor::from_vec(values, params.shape(), params.device())
            }
            #[cfg(feature = "cuda")]
            Moments::Gpu { m, v } => {
                let (p, new_m, new_v) = swift_kernels::cuda::optim::adamw(params, grads, m, v, &step)?;
                (*m, *v) = (new_m, new_v);
                Ok(p)
            }
        }
    }
}

/// A flat buffer cut into consecutive pieces of these sizes.
pub fn split(flat: &[f32], sizes: &[usize]) -> Vec<Vec<f32>> {
    let mut rest = flat;
    sizes
        .iter()
        .map(|&n| {
            let (head, tail) = rest.split_at(n);
            rest = tail;
            head.to_vec()
        })
        .collect()
}

/// The global L2 norm of all gradients (one flat f32 tensor; f64 partial
/// sums in a fixed order), computed where the gradients are.
pub fn global_norm(grads: &Tensor) -> candle_core::Result<f64> {
    #[cfg(feature = "cuda")]
    if grads.device().is_cuda() {
        return Ok(swift_kernels::cuda::optim::sum_squares(grads)?.sqrt());
    }
    crate::llm::ops::with_f32(&grads.contiguous()?, |values| swift_kernels::adamw::sum_squares(values).sqrt())
}

/// The norm of `grads` and the factor that clips it to `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`; 0 = off), applied inside [`AdamW::update`].
pub fn clip(grads: &Tensor, max_norm: f64) -> candle_core::Result<(f64, f32)> {
    let norm = global_norm(grads)?;
    Ok((norm, swift_kernels::adamw::clip_factor(norm, max_norm)))
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
        let config = AdamWConfig { betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.0 };
        let cpu = Device::Cpu;
        let mut opt = AdamW::new(config, &[1, 1], &cpu).unwrap();
        let params = Tensor::new(&[1.0f32, -1.0], &cpu).unwrap();
        let params = opt.update(&params, &Tensor::new(&[0.5f32, -3.0], &cpu).unwrap(), 0.1, 1.0).unwrap();
        let params = params.to_vec1::<f32>().unwrap();
        assert!((params[0] - 0.9).abs() < 1e-6 && (params[1] + 0.9).abs() < 1e-6, "{params:?}");
        let (m, v) = opt.moments().unwrap();
        assert_eq!((m.len(), v[1].len()), (2, 1));
        let mut resumed = AdamW::new(config, &[1, 1], &cpu).unwrap();
        assert!(resumed.restore(opt.step, &m, &v, &cpu).unwrap());
        assert_eq!((resumed.step, resumed.moments().unwrap()), (opt.step, (m, v.clone())));
        assert!(!resumed.restore(1, &[vec![0.0; 2]], &v, &cpu).unwrap());
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let grads = Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap();
        let (norm, factor) = clip(&grads, 1.0).unwrap();
        assert_eq!(norm, 5.0);
        assert!((global_norm(&(grads.clone() * factor as f64).unwrap()).unwrap() - 1.0).abs() < 1e-5);
        assert_eq!(clip(&grads, 0.0).unwrap().1, 1.0);
    }
}
