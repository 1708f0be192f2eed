//! A [`LinearLoader`] for adapted models: each projection's checkpoint weight,
//! with a chain of earlier adapters merged into it ([`ChainMerge`]: tensor by
//! tensor, in the checkpoint's dtype), stored dense or as NF4, and optionally
//! wrapped in a fresh trainable adapter.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::sync::Arc;

use candle_core::Tensor;

use super::adapter::PeftAdapter;
use super::linear::{Dense, LinearLoader, Projection};
use super::lora::{DropoutState, LoraLinear, LoraParams, SplitMix64};
use super::nf4::Nf4Linear;
use super::weights::Weights;
use super::LlmError;

/// How the frozen base weights are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseFormat {
    /// In the compute dtype.
    Dense,
    /// NF4 with this block size, with or without double quantization
    /// (`lm_head` stays dense, as bitsandbytes leaves it).
    Nf4 {
        /// Elements per absmax block (64 in QLoRA).
        blocksize: usize,
        /// Quantize the absmax values too.
        double_quant: bool,
    },
}

/// The adapter to create on each selected projection.
#[derive(Clone, Debug)]
pub struct NewAdapter {
    /// Rank.
    pub rank: usize,
    /// `α/r` or `α/√r`.
    pub scaling: f64,
    /// DoRA.
    pub dora: bool,
    /// Dropout probability on the adapter's input.
    pub dropout: f32,
    /// Seed for A's initialisation.
    pub seed: u64,
}

/// Picks the projections (by module path) that get a new adapter.
pub type Selector<'a> = &'a dyn Fn(&str) -> bool;

/// An adapter chain merged into checkpoint weights one module at a time,
/// remembering which adapter modules found their weight.
pub struct ChainMerge<'a> {
    adapters: &'a [PeftAdapter],
    applied: RefCell<BTreeSet<(usize, String)>>,
}

impl<'a> ChainMerge<'a> {
    /// Merges `adapters`, in order.
    pub fn new(adapters: &'a [PeftAdapter]) -> Self {
        Self { adapters, applied: RefCell::default() }
    }

    /// `weight` (`[out, in]`, of module `prefix`) with every adapter of the
    /// chain that has that module merged in, in order, in the weight's dtype.
    pub fn merge(&self, prefix: &str, mut weight: Tensor) -> Result<Tensor, LlmError> {
        let (out_features, in_features) = weight.dims2()?;
        for (i, adapter) in self.adapters.iter().enumerate() {
            let Some(module) = adapter.module(prefix) else { continue };
            self.applied.borrow_mut().insert((i, prefix.to_string()));
            if module.a.dim(1)? != in_features || module.b.dim(0)? != out_features {
                return Err(LlmError::Weights {
                    path: adapter.folder.clone(),
                    message: format!(
                        "the adapter for `{prefix}` does not fit its [{out_features}, {in_features}] weight: is it an adapter for another model?"
                    ),
                });
            }
            weight = module.merge_into(&weight)?;
        }
        Ok(weight)
    }

    /// Once every weight went through [`ChainMerge::merge`]: an error naming
    /// the first adapter with modules no weight matched — an adapter for
    /// another model — and those modules; else how many module merges there were.
    pub fn check_all_applied(&self) -> Result<usize, LlmError> {
        let applied = self.applied.borrow();
        for (i, adapter) in self.adapters.iter().enumerate() {
            let unused: Vec<&str> =
                adapter.modules.keys().filter(|m| !applied.contains(&(i, m.to_string()))).map(String::as_str).collect();
            if !unused.is_empty() {
                return Err(LlmError::Weights {
                    path: adapter.folder.clone(),
                    message: format!("the adapter has modules this model does not have ({}): is it an adapter for another model?", unused.join(", ")),
                });
            }
        }
        Ok(applied.len())
    }
}

/// Builds projections: merged chain → dense or NF4 base → optional new adapter.
pub struct AdaptedLoader<'a> {
    chain: ChainMerge<'a>,
    base: BaseFormat,
    adapt: Option<(Selector<'a>, NewAdapter)>,
    state: Arc<DropoutState>,
    created: RefCell<Vec<(String, Arc<LoraParams>)>>,
    frozen_bytes: Cell<usize>,
}

impl<'a> AdaptedLoader<'a> {
    /// A loader merging `merged` (in order) into the checkpoint weights and
    /// storing the result as `base`.
    pub fn new(merged: &'a [PeftAdapter], base: BaseFormat) -> Self {
        Self { chain: ChainMerge::new(merged), base, adapt: None, state: Arc::default(), created: RefCell::default(), frozen_bytes: Cell::new(0) }
    }

    /// Also wraps every projection for which `select(module_path)` holds in a
    /// new adapter.
    pub fn with_new_adapters(mut self, select: Selector<'a>, adapter: NewAdapter) -> Self {
        self.adapt = Some((select, adapter));
        self
    }

    /// The dropout switch shared by the new adapters.
    pub fn dropout_state(&self) -> Arc<DropoutState> {
        self.state.clone()
    }

    /// The new adapters, by module path, in the order the decoder loaded them.
    pub fn take_adapters(&self) -> Vec<(String, Arc<LoraParams>)> {
        self.created.take()
    }

    /// An error naming the first merged adapter with modules no projection of
    /// the model used — an adapter for another model — and those modules.
    pub fn check_all_applied(&self) -> Result<(), LlmError> {
        self.chain.check_all_applied().map(|_| ())
    }

    /// Bytes of frozen projection weights loaded so far.
    pub fn frozen_bytes(&self) -> usize {
        self.frozen_bytes.get()
    }
}

impl LinearLoader for AdaptedLoader<'_> {
    fn load(&self, weights: &Weights, prefix: &str, in_features: usize, out_features: usize, bias: bool)
        -> Result<Box<dyn Projection>, LlmError> {
        let name = format!("{prefix}.weight");
        let stored = weights.stored_dtype(&name)?;
        let weight = self.chain.merge(prefix, weights.get_as(&name, &[out_features, in_features], stored)?)?;
        let bias = if bias { Some(weights.get(&format!("{prefix}.bias"), &[out_features])?) } else { None };
        let base: Box<dyn Projection> = match self.base {
            BaseFormat::Nf4 { blocksize, double_quant } if prefix != "lm_head" => {
                Box::new(Nf4Linear::quantize(&weight, bias, blocksize, double_quant)?)
            }
            _ => Box::new(Dense::new(weight.to_dtype(weights.dtype())?, bias)?),
        };
        drop(weight);
        self.frozen_bytes.set(self.frozen_bytes.get() + base.weight_bytes());
        let Some((select, adapter)) = &self.adapt else { return Ok(base) };
        if !select(prefix) {
            return Ok(base);
        }
        let mut rng = SplitMix64::keyed(adapter.seed, prefix, 0);
        let params = Arc::new(LoraParams::init(base.as_ref(), adapter.rank, adapter.scaling, adapter.dora, &mut rng, weights.device())?);
        self.created.borrow_mut().push((prefix.to_string(), params.clone()));
        let stream = SplitMix64::keyed(adapter.seed, prefix, 1).next_u64();
        Ok(Box::new(LoraLinear::new(base, params, adapter.dropout, self.state.clone(), stream)))
    }
}
