//! LoRA and DoRA adapters around any [`Projection`] (dense or NF4), as PEFT
//! computes them (PEFT's `LoraLayer`/`DoraLinearLayer`; layout in `../shared/docs/FORMATS.md` §3):
//!
//! - LoRA: `y = base(x) + s · B(A(dropout(x)))`, `s = α/r` (or `α/√r` with
//!   rsLoRA), A `[r, in]` Kaiming-uniform (U(±1/√in)), B `[out, r]` zero;
//! - DoRA: with `m` the magnitude `[out]` and `n = ‖W + s·BA‖` per output row
//!   (detached), `y = base(x) + (m/n − 1)·W·dropout(x) + (m/n)·s·B(A(dropout(x)))`.
//!
//! A LoRA projection is one fused op ([`FusedLora`]) with a hand-written
//! backward that computes what training needs and nothing else:
//!
//! | gradient | formula (`d = dropout mask`, `u = (x⊙d)·Aᵀ`, `g = dL/dy`) |
//! |---|---|
//! | `dB` | `s · gᵀ·u` |
//! | `dA` | `s · (g·B)ᵀ·(x⊙d)` |
//! | `dx` | `g·W` (the base's [`Projection::input_grad`]) `+ s·((g·B)·A)⊙d`; skipped when `x` needs none |
//! | `dW` | never: the base is frozen |
//!
//! `u` is recomputed in backward (`rows × r`, cheap) instead of kept. DoRA
//! runs the same op on the dropped-out input for `W·(x⊙d) + s·B·A·(x⊙d)`
//! and scales it by `m/n` in candle ops (the magnitude's gradient is that
//! product's column sums).
//!
//! Adapters are f32 [`Var`]s whatever dtype the base computes in. Dropout masks
//! come from a counter-based generator keyed by each row's seed and the
//! module, so a run is reproducible and resumable without saving RNG state,
//! and a row's mask is the same whether it is computed alone or in a batch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor, Var};

use super::linear::Projection;
use super::ops::{cpu_tensor, into_cpu};

/// The trainable tensors of one adapted projection.
pub struct LoraParams {
    /// `lora_A.weight`, `[r, in]`.
    pub a: Var,
    /// `lora_B.weight`, `[out, r]`.
    pub b: Var,
    /// `lora_magnitude_vector` (DoRA), `[out]`.
    pub magnitude: Option<Var>,
    /// `α/r`, or `α/√r` with rsLoRA.
    pub scaling: f64,
}

impl LoraParams {
    /// Fresh adapter tensors on `device`: A Kaiming-uniform from `rng`, B zero,
    /// and for DoRA the magnitude set to the base weight's row norms (so the
    /// adapted layer starts equal to the base).
    pub fn init(base: &dyn Projection, rank: usize, scaling: f64, dora: bool, rng: &mut SplitMix64, device: &Device)
        -> candle_core::Result<Self> {
        let (inp, out) = (base.in_features(), base.out_features());
        let bound = 1.0 / (inp as f32).sqrt();
        let a: Vec<f32> = (0..rank * inp).map(|_| (rng.next_f32() * 2.0 - 1.0) * bound).collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (rank, inp), device)?)?;
        let b = Var::zeros((out, rank), DType::F32, device)?;
        let magnitude =
            if dora { Some(Var::from_tensor(&row_norms(&base.weight_f32()?.to_device(device)?)?)?) } else { None };
        Ok(Self { a, b, magnitude, scaling })
    }

    /// The trainable variables, in a fixed order (A, B, magnitude).
    pub fn vars(&self) -> Vec<&Var> {
        let mut vars = vec![&self.a, &self.b];
        vars.extend(self.magnitude.as_ref());
        vars
    }
}

/// The LoRA scaling: `α/r`, or `α/√r` with rsLoRA.
pub fn scaling(alpha: f64, rank: usize, rslora: bool) -> f64 {
    if rslora {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    }
}

/// Row-wise L2 norms of a `[out, in]` matrix, `[out]`.
pub fn row_norms(w: &Tensor) -> candle_core::Result<Tensor> {
    w.sqr()?.sum(1)?.sqrt()
}

/// Shared by every adapter of a model: whether dropout is on (and each row's
/// dropout seed in the current micro-batch), and whether gradients are wanted.
#[derive(Default)]
pub struct DropoutState {
    training: AtomicBool,
    rows: Mutex<Arc<Vec<RowDropout>>>,
    no_grad: AtomicBool,
}

/// The dropout seed of one row of a micro-batch and its real length (the
/// tokens past it are padding, which get no mask).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowDropout {
    /// Seed of the row's masks.
    pub seed: u64,
    /// Tokens in the row before padding.
    pub len: usize,
}

impl DropoutState {
    /// Turns dropout on for a micro-batch of these rows, in batch order.
    pub fn train(&self, rows: Vec<RowDropout>) {
        *self.rows.lock().expect("dropout lock") = Arc::new(rows);
        self.training.store(true, Ordering::Relaxed);
    }

    /// Turns dropout off (validation, inference).
    pub fn eval(&self) {
        self.training.store(false, Ordering::Relaxed);
    }

    /// With `true`, adapters compute with detached tensors, so a forward pass
    /// builds no autograd graph (validation); `false` restores gradients.
    pub fn set_no_grad(&self, no_grad: bool) {
        self.no_grad.store(no_grad, Ordering::Relaxed);
    }

    /// The mask `[b·t, in]` (0 or `1/(1−p)`) for an input of `b` rows of `t`
    /// tokens, or `None` when dropout is off. Row `i` draws its `len·in`
    /// values from its own stream, so its mask does not depend on the batch.
    fn mask(&self, p: f32, stream: u64, b: usize, t: usize, features: usize, device: &Device)
        -> candle_core::Result<Option<Tensor>> {
        if p <= 0.0 || !self.training.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let rows = self.rows.lock().expect("dropout lock").clone();
        if rows.len() != b {
            candle_core::bail!("dropout: {} row seeds for a batch of {b} rows", rows.len());
        }
        let keep = 1.0 / (1.0 - p);
        let mut mask = vec![0f32; b * t * features];
        for (row, out) in rows.iter().zip(mask.chunks_mut(t * features)) {
            let mut rng = SplitMix64::new(row.seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for m in &mut out[..row.len.min(t) * features] {
                *m = if rng.next_f32() < p { 0.0 } else { keep };
            }
        }
        Ok(Some(Tensor::from_vec(mask, (b * t, features), device)?))
    }
}

/// A projection with an adapter.
pub struct LoraLinear {
    base: Arc<dyn Projection>,
    params: Arc<LoraParams>,
    dropout: f32,
    state: Arc<DropoutState>,
    stream: u64,
}

impl LoraLinear {
    /// Wraps `base`; `stream` tells this module's dropout masks apart from the others'.
    pub fn new(base: Box<dyn Projection>, params: Arc<LoraParams>, dropout: f32, state: Arc<DropoutState>, stream: u64)
        -> Self {
        Self { base: Arc::from(base), params, dropout, state, stream }
    }

    /// The dropout mask `[rows, in]` for `x` `[…, t, in]`, if dropout is on.
    fn mask(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dims = x.dims();
        let features = self.in_features();
        let t = if dims.len() >= 2 { dims[dims.len() - 2] } else { 1 };
        let b = x.elem_count() / (t * features).max(1);
        self.state.mask(self.dropout, self.stream, b, t, features, x.device())
    }

    fn tracked(&self, v: &Var) -> Tensor {
        if self.state.no_grad.load(Ordering::Relaxed) {
            v.as_tensor().detach()
        } else {
            v.as_tensor().clone()
        }
    }

    /// DoRA as `y = base(x⊙(1−d)) + (m/n) ⊙ z`, with `z = (x⊙d)·Wᵀ +
    /// s·((x⊙d)·Aᵀ)·Bᵀ` one [`FusedLora`] op (the base product on the
    /// dropped-out input, no bias) and `n` the detached row norms of the
    /// merged weight. Without dropout `d = 1` and the first term is the bias.
    fn dora_forward(&self, x: &Tensor, magnitude: &Var) -> candle_core::Result<Tensor> {
        let p = &*self.params;
        let (a, b, magnitude) = (self.tracked(&p.a), self.tracked(&p.b), self.tracked(magnitude));
        let mask = self.mask(x)?;
        let op = FusedLora { base: self.base.clone(), scaling: p.scaling, mask: mask.clone(), base_on_dropped: true };
        let z = x.contiguous()?.apply_op3(&a, &b, op)?;
        let delta = (b.detach().matmul(&a.detach())? * p.scaling)?;
        let norm = row_norms(&(self.base.weight_f32()?.to_device(delta.device())? + delta)?)?.detach();
        let scaled = z.to_dtype(DType::F32)?.broadcast_mul(&magnitude.div(&norm)?)?.to_dtype(x.dtype())?;
        let rest = match &mask {
            // x − x⊙d: the part of the input the adapter's dropout removed.
            Some(mask) => {
                let kept = mask.affine(-1.0, 1.0)?.reshape(x.shape())?.to_dtype(x.dtype())?;
                Some(self.base.forward(&x.mul(&kept)?)?)
            }
            None => self.base.bias().cloned(),
        };
        match rest {
            Some(rest) => scaled.broadcast_add(&rest),
            None => Ok(scaled),
        }
    }
}

impl Projection for LoraLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(magnitude) = &self.params.magnitude {
            return self.dora_forward(x, magnitude);
        }
        let p = &*self.params;
        let op = FusedLora { base: self.base.clone(), scaling: p.scaling, mask: self.mask(x)?, base_on_dropped: false };
        x.contiguous()?.apply_op3(&self.tracked(&p.a), &self.tracked(&p.b), op)
    }
    fn in_features(&self) -> usize {
        self.base.in_features()
    }
    fn out_features(&self) -> usize {
        self.base.out_features()
    }
    fn weight_f32(&self) -> candle_core::Result<Tensor> {
        let p = &*self.params;
        let delta = (p.b.as_tensor().matmul(p.a.as_tensor())? * p.scaling)?;
        let merged = (self.base.weight_f32()?.to_device(delta.device())? + delta)?;
        match &p.magnitude {
            Some(m) => merged.broadcast_mul(&m.as_tensor().div(&row_norms(&merged)?)?.unsqueeze(1)?),
            None => Ok(merged),
        }
    }
    fn bias(&self) -> Option<&Tensor> {
        self.base.bias()
    }
    fn weight_bytes(&self) -> usize {
        self.base.weight_bytes()
    }
}

/// `y = base(x) + s·((x⊙d)·Aᵀ)·Bᵀ` as one autograd op on `(x, A, B)`, with
/// the backward of the module doc's table; with `base_on_dropped` (DoRA's
/// inner product) `y = (x⊙d)·Wᵀ + s·((x⊙d)·Aᵀ)·Bᵀ`, no bias. The base
/// computes outside autograd (its weight is frozen); the adapter path runs
/// in f32.
struct FusedLora {
    base: Arc<dyn Projection>,
    scaling: f64,
    /// The dropout mask `[rows, in]`, kept for backward.
    mask: Option<Tensor>,
    base_on_dropped: bool,
}

impl FusedLora {
    /// `x` `[…, in]` as f32 rows `[rows, in]`, with the dropout mask applied.
    fn dropped_rows(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let features = self.base.in_features();
        let rows = x.to_dtype(DType::F32)?.reshape((x.elem_count() / features, features))?;
        match &self.mask {
            Some(mask) => rows.mul(mask),
            None => Ok(rows),
        }
    }

    fn run(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        let dropped = self.dropped_rows(x)?;
        let y = if self.base_on_dropped && self.mask.is_some() {
            self.base.forward(&dropped.reshape(x.shape())?.to_dtype(x.dtype())?)?
        } else {
            self.base.forward(x)?
        };
        let y = match (self.base_on_dropped, self.base.bias()) {
            (true, Some(bias)) => y.broadcast_sub(bias)?,
            _ => y,
        };
        let lora = (dropped.matmul(&a.t()?)?.matmul(&b.t()?)? * self.scaling)?.reshape(y.shape())?.to_dtype(y.dtype())?;
        y + lora
    }
}

impl CustomOp3 for FusedLora {
    fn name(&self) -> &'static str {
        "fused-lora"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout)
        -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (x, a, b) = (cpu_tensor(s1, l1, name)?, cpu_tensor(s2, l2, name)?, cpu_tensor(s3, l3, name)?);
        into_cpu(&self.run(&x, &a, &b)?, name)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::ops::{cuda_tensor, into_cuda};
        let name = self.name();
        let (x, a, b) = (cuda_tensor(s1, l1, name)?, cuda_tensor(s2, l2, name)?, cuda_tensor(s3, l3, name)?);
        into_cuda(&self.run(&x, &a, &b)?, name)
    }

    fn bwd(&self, x: &Tensor, a: &Tensor, b: &Tensor, _res: &Tensor, grad_res: &Tensor)
        -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (a, b) = (a.detach(), b.detach());
        let out = self.base.out_features();
        let rows = grad_res.elem_count() / out;
        let g = grad_res.reshape((rows, out))?;
        let g32 = g.to_dtype(DType::F32)?;
        let dropped = self.dropped_rows(&x.detach())?;
        let u = dropped.matmul(&a.t()?)?;
        let d_b = (g32.t()?.matmul(&u)? * self.scaling)?;
        let d_u = (g32.matmul(&b)? * self.scaling)?;
        let d_a = d_u.t()?.matmul(&dropped)?;
        let d_x = if x.track_op() {
            let through_adapter = d_u.matmul(&a)?;
            let base = self.base.input_grad(&g.to_dtype(x.dtype())?)?;
            let d_x = match (&self.mask, self.base_on_dropped) {
                // Both paths saw x⊙d.
                (Some(mask), true) => (base.to_dtype(DType::F32)? + through_adapter)?.mul(mask)?.to_dtype(x.dtype())?,
                (Some(mask), false) => (base + through_adapter.mul(mask)?.to_dtype(x.dtype())?)?,
                (None, _) => (base + through_adapter.to_dtype(x.dtype())?)?,
            };
            Some(d_x.reshape(x.shape())?)
        } else {
            None
        };
        Ok((d_x, Some(d_a), Some(d_b)))
    }
}

/// A small counter-based generator (SplitMix64): fast, seedable, and the same
/// on every platform and thread count.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A generator for one named stream of a seed (`seed`, `"lora_A"`, index).
    pub fn keyed(seed: u64, label: &str, index: u64) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(&seed.to_le_bytes()).update(label.as_bytes()).update(&index.to_le_bytes());
        let bytes = h.finalize();
        Self(u64::from_le_bytes(bytes.as_bytes()[..8].try_into().expect("8 bytes")))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}
