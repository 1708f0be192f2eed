//! LoRA and DoRA adapters around any [`Projection`] (dense or NF4), as PEFT
//! computes them (`../shared/docs/FORMATS.md` §3):
//!
//! - LoRA: `y = base(x) + s · B(A(dropout(x)))`, `s = α/r` (or `α/√r` with
//!   rsLoRA), A `[r, in]` Kaiming-uniform (U(±1/√in)), B `[out, r]` zero;
//! - DoRA: with `m` the magnitude `[out]` and `n = ‖W + s·BA‖` per output row
//!   (detached), `y = base(x) + (m/n − 1)·W·dropout(x) + (m/n)·s·B(A(dropout(x)))`.
//!
//! Adapters are f32 [`Var`]s whatever dtype the base computes in. Dropout masks
//! come from a counter-based generator keyed by the micro-batch seed and the
//! module, so a run is reproducible and resumable without saving RNG state.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};

use super::linear::Projection;

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

/// Shared by every adapter of a model: whether dropout is on (and the current
/// micro-batch's dropout seed), and whether gradients are wanted.
#[derive(Default)]
pub struct DropoutState {
    training: AtomicBool,
    seed: AtomicU64,
    no_grad: AtomicBool,
}

impl DropoutState {
    /// Turns dropout on for the micro-batch with this seed.
    pub fn train(&self, seed: u64) {
        self.seed.store(seed, Ordering::Relaxed);
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
}

/// A projection with an adapter.
pub struct LoraLinear {
    base: Box<dyn Projection>,
    params: Arc<LoraParams>,
    dropout: f32,
    state: Arc<DropoutState>,
    stream: u64,
}

impl LoraLinear {
    /// Wraps `base`; `stream` tells this module's dropout masks apart from the others'.
    pub fn new(base: Box<dyn Projection>, params: Arc<LoraParams>, dropout: f32, state: Arc<DropoutState>, stream: u64)
        -> Self {
        Self { base, params, dropout, state, stream }
    }

    fn dropout(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if self.dropout <= 0.0 || !self.state.training.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let seed = self.state.seed.load(Ordering::Relaxed);
        let mut rng = SplitMix64::new(seed ^ self.stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let keep = 1.0 / (1.0 - self.dropout);
        let mask: Vec<f32> =
            (0..x.elem_count()).map(|_| if rng.next_f32() < self.dropout { 0.0 } else { keep }).collect();
        Ok(Some((x * Tensor::from_vec(mask, x.shape(), x.device())?)?))
    }
}

impl Projection for LoraLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let base_out = self.base.forward(x)?;
        let dims = x.dims();
        let rows = x.elem_count() / self.in_features();
        let x32 = x.to_dtype(DType::F32)?.reshape((rows, self.in_features()))?;
        let dropped = self.dropout(&x32)?;
        let lora_in = dropped.as_ref().unwrap_or(&x32);
        let p = &*self.params;
        let no_grad = self.state.no_grad.load(Ordering::Relaxed);
        let tracked = |v: &Var| if no_grad { v.as_tensor().detach() } else { v.as_tensor().clone() };
        let (a, b) = (tracked(&p.a), tracked(&p.b));
        let lora = (lora_in.matmul(&a.t()?)?.matmul(&b.t()?)? * p.scaling)?;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("x has a feature dimension") = self.out_features();
        let Some(magnitude) = p.magnitude.as_ref().map(tracked) else {
            let dtype = base_out.dtype();
            return base_out + lora.reshape(out_dims)?.to_dtype(dtype)?;
        };
        let delta = (b.detach().matmul(&a.detach())? * p.scaling)?;
        let norm = row_norms(&(self.base.weight_f32()?.to_device(delta.device())? + delta)?)?.detach();
        let scale = magnitude.div(&norm)?;
        // W·x without the bias, on the same (dropped-out) input the adapter saw.
        let base_plain = match &dropped {
            Some(d) => self.base.forward(&d.reshape(dims)?.to_dtype(x.dtype())?)?,
            None => base_out.clone(),
        };
        let base_plain = match self.base.bias() {
            Some(bias) => base_plain.broadcast_sub(bias)?,
            None => base_plain,
        }
        .to_dtype(DType::F32)?
        .reshape((rows, self.out_features()))?;
        let dora = (base_plain.broadcast_mul(&(&scale - 1.0)?)? + lora.broadcast_mul(&scale)?)?;
        let dtype = base_out.dtype();
        base_out + dora.reshape(out_dims)?.to_dtype(dtype)?
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
