//! The decoder shared by the Qwen2, Llama and Mistral families: token embedding,
//! `num_layers` × (RMSNorm → GQA attention with RoPE → residual, RMSNorm →
//! SwiGLU MLP → residual), final RMSNorm, `lm_head` (or the tied embedding).
//!
//! One forward pass takes a row of tokens with a position and a segment id per
//! token: tokens attend only to earlier tokens of the same segment (causal and
//! block-diagonal, so packed samples never see each other), within the sliding
//! window if the model has one, and positions restart per packed sample.
//! A [`KvCache`] carries keys and values across calls for generation.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, TensorId, Var, D};

use super::config::{Llama3RopeScaling, ModelConfig};
use super::linear::{LinearLoader, Projection};
use super::ops::{cpu_tensor, into_cpu};
use super::weights::Weights;
use super::LlmError;

struct Attention {
    q_proj: Box<dyn Projection>,
    k_proj: Box<dyn Projection>,
    v_proj: Box<dyn Projection>,
    o_proj: Box<dyn Projection>,
}

struct Mlp {
    gate_proj: Box<dyn Projection>,
    up_proj: Box<dyn Projection>,
    down_proj: Box<dyn Projection>,
}

struct Layer {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

/// Keys and values of the tokens seen so far, per layer. Cloning is cheap
/// (tensors are shared), so one cached prompt prefix can be continued many ways.
#[derive(Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    segments: Vec<u32>,
    /// The first `shared` cached tokens are visible to every later token.
    shared: usize,
}

impl KvCache {
    /// Lets every token of later calls attend to the tokens cached so far,
    /// whatever its segment: a prompt prefix shared by several continuations
    /// packed into one row. (A sliding window is measured in row indices, so
    /// packed continuations of a shared prefix are only exact without one, or
    /// within it.)
    pub fn share(&mut self) {
        self.shared = self.segments.len();
    }

    /// How many tokens the cache holds.
    pub fn len(&self) -> usize {
        self.segments.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }
}

/// A loaded decoder.
pub struct Decoder {
    config: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Box<dyn Projection>,
    inv_freq: Vec<f32>,
    device: Device,
    dtype: DType,
}

impl Decoder {
    /// Loads a model folder's weights in `dtype` on `device`, building every
    /// projection through `linear`.
    pub fn load(folder: &Path, config: ModelConfig, dtype: DType, device: &Device, linear: &dyn LinearLoader)
        -> Result<Self, LlmError> {
        Self::from_weights(&Weights::open(folder, dtype, device)?, config, linear)
    }

    /// Builds the decoder from `weights` (their dtype and device), every
    /// projection through `linear`.
    pub fn from_weights(weights: &Weights, config: ModelConfig, linear: &dyn LinearLoader) -> Result<Self, LlmError> {
        let (dtype, device) = (weights.dtype(), weights.device());
        let c = &config;
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let (q_out, kv_out) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let embed_tokens = weights.get("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let mut layers = Vec::new();
        for n in 0..c.num_layers {
            let p = format!("model.layers.{n}");
            layers.push(Layer {
                input_layernorm: weights.get(&format!("{p}.input_layernorm.weight"), &[h])?,
                self_attn: Attention {
                    q_proj: linear.load(weights, &format!("{p}.self_attn.q_proj"), h, q_out, c.qkv_bias)?,
                    k_proj: linear.load(weights, &format!("{p}.self_attn.k_proj"), h, kv_out, c.qkv_bias)?,
                    v_proj: linear.load(weights, &format!("{p}.self_attn.v_proj"), h, kv_out, c.qkv_bias)?,
                    o_proj: linear.load(weights, &format!("{p}.self_attn.o_proj"), q_out, h, c.o_bias)?,
                },
                post_attention_layernorm: weights.get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                mlp: Mlp {
                    gate_proj: linear.load(weights, &format!("{p}.mlp.gate_proj"), h, i, false)?,
                    up_proj: linear.load(weights, &format!("{p}.mlp.up_proj"), h, i, false)?,
                    down_proj: linear.load(weights, &format!("{p}.mlp.down_proj"), i, h, false)?,
                },
            });
        }
        let norm = weights.get("model.norm.weight", &[h])?;
        let lm_head: Box<dyn Projection> = if c.tie_word_embeddings && !weights.contains("lm_head.weight") {
            linear.tied_head(weights, &embed_tokens)?
        } else {
            linear.load(weights, "lm_head", h, c.vocab_size, false)?
        };
        let inv_freq = inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling.as_ref());
        Ok(Self { config, embed_tokens, layers, norm, lm_head, inv_freq, device: device.clone(), dtype })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the model computes on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Logits (f32, `[tokens, vocab]`, or `[1, vocab]` with `last_only`) for one
    /// row of tokens. `positions` and `segments` give each token's RoPE position
    /// and packed-sample id; with a cache, the row continues the cached tokens.
    pub fn forward(
        &self,
        tokens: &[u32],
        positions: &[u32],
        segments: &[u32],
        cache: Option<&mut KvCache>,
        last_only: bool,
    ) -> Result<Tensor, LlmError> {
        let t = tokens.len();
        let x = self.hidden(tokens, positions, segments, cache)?;
        let x = if last_only { x.narrow(0, t - 1, 1)? } else { x };
        let logits = self.lm_head.forward(&x.unsqueeze(0)?)?;
        Ok(logits.squeeze(0)?.to_dtype(DType::F32)?)
    }

    /// The final hidden states `[tokens, hidden]` (after the last RMSNorm) of
    /// one row, as [`Decoder::forward`] computes them before `lm_head`: for
    /// callers that need logits at a few positions only.
    pub fn hidden(
        &self,
        tokens: &[u32],
        positions: &[u32],
        segments: &[u32],
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor, LlmError> {
        self.check_row(tokens, positions, segments)?;
        let (past_segments, shared): (&[u32], usize) = cache.as_ref().map_or((&[], 0), |c| (&c.segments, c.shared));
        let mask = self.mask(past_segments, shared, segments)?;
        let (cos, sin) = self.rope_tables(positions)?;
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed_tokens.index_select(&ids, 0)?.unsqueeze(0)?;
        if let Some(cache) = cache.as_deref_mut() {
            cache.layers.resize_with(self.layers.len(), || None);
        }
        for n in 0..self.layers.len() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[n]);
            x = self.layer(n, &x, &Context { cos: &cos, sin: &sin, mask: &mask }, slot, Pass::Inference)?;
        }
        if let Some(cache) = cache {
            cache.segments.extend_from_slice(segments);
        }
        Ok(self.rms_norm(&x, &self.norm, Pass::Inference)?.squeeze(0)?)
    }

    /// The final hidden states `[rows · len, hidden]` (after the last RMSNorm)
    /// of a micro-batch of packed rows, computed in one pass so that gradients
    /// flow to trainable adapters. With `checkpoint`, each decoder layer keeps
    /// only its input: its activations are recomputed during the backward
    /// pass, and the adapters' gradients from those recomputations are
    /// collected in `checkpoint`.
    pub fn train_hidden(self: &Arc<Self>, batch: &TrainBatch, checkpoint: Option<&Arc<CheckpointGrads>>)
        -> Result<Tensor, LlmError> {
        self.check_tokens(&batch.tokens)?;
        let (b, t) = (batch.rows, batch.len);
        let mut mask = Vec::with_capacity(b * t * t);
        for row in 0..b {
            mask.extend(self.mask_values(&[], 0, &batch.segments[row * t..(row + 1) * t]));
        }
        let mask = Tensor::from_vec(mask, (b, 1, t, t), &self.device)?;
        let (cos, sin) = self.rope_tables(&batch.positions)?;
        let half = self.inv_freq.len();
        let (cos, sin) = (cos.reshape((b, t, half))?, sin.reshape((b, t, half))?);
        let ids = Tensor::new(batch.tokens.as_slice(), &self.device)?;
        let mut x = self.embed_tokens.index_select(&ids, 0)?.reshape((b, t, self.config.hidden_size))?;
        let pass = Pass::Train;
        match checkpoint {
            None => {
                for n in 0..self.layers.len() {
                    x = self.layer(n, &x, &Context { cos: &cos, sin: &sin, mask: &mask }, None, pass)?;
                }
            }
            Some(grads) => {
                // The first layer's input must be tracked so its op is replayed.
                x = Var::from_tensor(&x)?.as_tensor().clone();
                for n in 0..self.layers.len() {
                    x = x.apply_op1(LayerCheckpoint {
                        decoder: self.clone(),
                        layer: n,
                        cos: cos.clone(),
                        sin: sin.clone(),
                        mask: mask.clone(),
                        grads: grads.clone(),
                    })?;
                }
            }
        }
        let x = self.rms_norm(&x, &self.norm, pass)?;
        Ok(x.reshape((b * t, self.config.hidden_size))?)
    }

    /// The output projection (tied to the embedding or `lm_head`).
    pub fn lm_head(&self) -> &dyn Projection {
        self.lm_head.as_ref()
    }

    /// The RoPE tables and mask one row of tokens shares across layers
    /// (positions and segments as for [`Decoder::forward`]).
    pub fn row_context(&self, positions: &[u32], segments: &[u32]) -> Result<RowContext, LlmError> {
        let (cos, sin) = self.rope_tables(positions)?;
        Ok(RowContext { cos, sin, mask: self.mask(&[], 0, segments)? })
    }

    /// Token embeddings `[1, t, hidden]`: the first layer's input.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor, LlmError> {
        self.check_tokens(tokens)?;
        let ids = Tensor::new(tokens, &self.device)?;
        Ok(self.embed_tokens.index_select(&ids, 0)?.unsqueeze(0)?)
    }

    /// Layer `n`'s norms and projections.
    pub fn layer_parts(&self, n: usize) -> LayerParts<'_> {
        let l = &self.layers[n];
        LayerParts {
            input_layernorm: &l.input_layernorm,
            post_attention_layernorm: &l.post_attention_layernorm,
            q_proj: l.self_attn.q_proj.as_ref(),
            k_proj: l.self_attn.k_proj.as_ref(),
            v_proj: l.self_attn.v_proj.as_ref(),
            o_proj: l.self_attn.o_proj.as_ref(),
            gate_proj: l.mlp.gate_proj.as_ref(),
            up_proj: l.mlp.up_proj.as_ref(),
            down_proj: l.mlp.down_proj.as_ref(),
        }
    }

    /// RMSNorm with the model's epsilon (inference).
    pub fn norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor, LlmError> {
        Ok(self.rms_norm(x, weight, Pass::Inference)?)
    }

    /// The last RMSNorm, before `lm_head` (inference).
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor, LlmError> {
        Ok(self.rms_norm(x, &self.norm, Pass::Inference)?)
    }

    /// RoPE cos and sin tables `[t, head_dim / 2]` for these positions, in
    /// the compute dtype.
    pub fn rope(&self, positions: &[u32]) -> Result<(Tensor, Tensor), LlmError> {
        self.rope_tables(positions)
    }

    /// Self-attention up to o_proj's input, on an already normalised `x`
    /// `[rows, t, hidden]` (rows of the same length, each its own sequence),
    /// with the given q, k and v projections.
    pub fn attention_values_with(&self, qkv: [&dyn Projection; 3], x: &Tensor, row: &RowContext) -> Result<Tensor, LlmError> {
        let ctx = Context { cos: &row.cos, sin: &row.sin, mask: &row.mask };
        self.attention_values(qkv, x, &ctx, None, Pass::Inference)
    }

    fn check_row(&self, tokens: &[u32], positions: &[u32], segments: &[u32]) -> Result<(), LlmError> {
        let t = tokens.len();
        if t == 0 || positions.len() != t || segments.len() != t {
            return Err(LlmError::Candle(candle_core::Error::Msg(format!(
                "forward needs one position and segment per token ({t} tokens, {} positions, {} segments)",
                positions.len(),
                segments.len()
            ))));
        }
        self.check_tokens(tokens)
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<(), LlmError> {
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= self.config.vocab_size) {
            return Err(LlmError::Candle(candle_core::Error::Msg(format!(
                "token id {bad} is outside the vocabulary ({} tokens)",
                self.config.vocab_size
            ))));
        }
        Ok(())
    }

    /// One decoder layer: attention and MLP blocks with their residuals.
    fn layer(
        &self,
        n: usize,
        x: &Tensor,
        ctx: &Context<'_>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        pass: Pass,
    ) -> Result<Tensor, LlmError> {
        let layer = &self.layers[n];
        let normed = self.rms_norm(x, &layer.input_layernorm, pass)?;
        let attended = self.attention(&layer.self_attn, &normed, ctx, cache, pass)?;
        let x = (x + attended)?;
        let normed = self.rms_norm(&x, &layer.post_attention_layernorm, pass)?;
        let mlp = &layer.mlp;
        let (gate, up) = (mlp.gate_proj.forward(&normed)?, mlp.up_proj.forward(&normed)?);
        let gated = match pass {
            Pass::Inference => (gate.silu()? * up)?,
            Pass::Train => super::ops::silu_mul(&gate, &up)?,
        };
        Ok((x + mlp.down_proj.forward(&gated)?)?)
    }

    fn attention(
        &self,
        attn: &Attention,
        x: &Tensor,
        ctx: &Context<'_>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        pass: Pass,
    ) -> Result<Tensor, LlmError> {
        let projections = [attn.q_proj.as_ref(), attn.k_proj.as_ref(), attn.v_proj.as_ref()];
        let values = self.attention_values(projections, x, ctx, cache, pass)?;
        Ok(attn.o_proj.forward(&values)?)
    }

    /// The attention block up to o_proj's input `[b, t, heads · head_dim]`,
    /// with the given q, k and v projections.
    fn attention_values(
        &self,
        [q_proj, k_proj, v_proj]: [&dyn Projection; 3],
        x: &Tensor,
        ctx: &Context<'_>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        pass: Pass,
    ) -> Result<Tensor, LlmError> {
        let c = &self.config;
        // Inference tables are `[t, d/2]`, shared by the rows; training
        // tables are `[b, t, d/2]`, each row with its own positions.
        let rope = |x: &Tensor| match pass {
            Pass::Inference => candle_nn::rotary_emb::rope(x, ctx.cos, ctx.sin),
            Pass::Train => super::ops::rope(x, ctx.cos, ctx.sin),
        };
        let (b, t, _) = x.dims3()?;
        let heads = |p: &dyn Projection, n: usize| -> candle_core::Result<Tensor> {
            p.forward(x)?.reshape((b, t, n, c.head_dim))?.transpose(1, 2)?.contiguous()
        };
        let q = rope(&heads(q_proj, c.num_heads)?)?;
        let k = rope(&heads(k_proj, c.num_kv_heads)?)?;
        let v = heads(v_proj, c.num_kv_heads)?;
        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        let repeat = c.num_heads / c.num_kv_heads;
        let k = repeat_kv(&k, repeat)?;
        let v = repeat_kv(&v, repeat)?;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let probs = match pass {
            Pass::Inference => {
                let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.to_dtype(DType::F32)?;
                candle_nn::ops::softmax_last_dim(&scores.broadcast_add(ctx.mask)?)?
            }
            Pass::Train => {
                let scores = q.matmul(&k.t()?.contiguous()?)?.to_dtype(DType::F32)?;
                super::ops::masked_softmax(&scores, ctx.mask, scale)?
            }
        }
        .to_dtype(self.dtype)?;
        let out = probs.matmul(&v.contiguous()?)?;
        Ok(out.transpose(1, 2)?.reshape((b, t, c.num_heads * c.head_dim))?)
    }

    /// RMSNorm as transformers computes it: normalise in f32, cast back to the
    /// compute dtype, then scale by the weight.
    fn rms_norm(&self, x: &Tensor, weight: &Tensor, pass: Pass) -> candle_core::Result<Tensor> {
        let eps = self.config.rms_norm_eps;
        if self.device.is_cuda() && matches!(self.dtype, DType::F32 | DType::BF16) {
            // swift's fused kernel, forward and backward, in f32 or bf16.
            return super::ops::rms_norm(x, weight, eps as f32);
        }
        if self.dtype == DType::F32 {
            return match pass {
                Pass::Inference => candle_nn::ops::rms_norm(x, weight, eps as f32),
                Pass::Train => super::ops::rms_norm(x, weight, eps as f32),
            };
        }
        let x32 = x.to_dtype(DType::F32)?;
        let mean_square = x32.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x32.broadcast_div(&(mean_square + eps)?.sqrt()?)?.to_dtype(self.dtype)?;
        normed.broadcast_mul(weight)
    }

    /// Additive mask `[t, past + t]`: 0 where a query may attend a key, -inf
    /// elsewhere. Every query may attend the first `shared` past keys.
    fn mask(&self, past_segments: &[u32], shared: usize, segments: &[u32]) -> Result<Tensor, LlmError> {
        let shape = (segments.len(), past_segments.len() + segments.len());
        Ok(Tensor::from_vec(self.mask_values(past_segments, shared, segments), shape, &self.device)?)
    }

    /// The values of [`Decoder::mask`], row-major.
    fn mask_values(&self, past_segments: &[u32], shared: usize, segments: &[u32]) -> Vec<f32> {
        let past = past_segments.len();
        let t = segments.len();
        let window = self.config.sliding_window.unwrap_or(usize::MAX);
        let mut data = vec![f32::NEG_INFINITY; t * (past + t)];
        for (i, &segment) in segments.iter().enumerate() {
            let query = past + i;
            for key in 0..=query {
                let visible = if key < past { key < shared || past_segments[key] == segment } else { segments[key - past] == segment };
                if visible && query - key < window {
                    data[i * (past + t) + key] = 0.0;
                }
            }
        }
        data
    }

    /// cos and sin `[t, head_dim / 2]` for the given positions.
    fn rope_tables(&self, positions: &[u32]) -> Result<(Tensor, Tensor), LlmError> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let shape = (positions.len(), half);
        let cos = Tensor::from_vec(cos, shape, &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, shape, &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }
}

/// How a forward pass computes: inference uses candle's fused kernels, which
/// have no backward pass; training uses differentiable compositions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    Inference,
    Train,
}

/// RoPE tables and mask of one row, for running layers one at a time
/// ([`Decoder::row_context`]).
pub struct RowContext {
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
}

/// Segment id of padding tokens in a [`TrainBatch`]: they attend only to
/// each other, and no real token attends to them.
const PAD_SEGMENT: u32 = u32::MAX;

/// A micro-batch of packed rows for [`Decoder::train_hidden`], padded to its
/// longest row: token `i` of row `r` is at `r · len + i`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrainBatch {
    tokens: Vec<u32>,
    positions: Vec<u32>,
    segments: Vec<u32>,
    rows: usize,
    len: usize,
}

impl TrainBatch {
    /// Packs rows given as (tokens, positions, segments), one position and
    /// segment per token; padding is token 0 at position 0 in a segment of its own.
    pub fn new(rows: &[(&[u32], &[u32], &[u32])]) -> Result<Self, LlmError> {
        let len = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        if len == 0 || rows.iter().any(|(t, p, s)| t.is_empty() || p.len() != t.len() || s.len() != t.len()) {
            return Err(LlmError::Candle(candle_core::Error::Msg(
                "a training batch needs non-empty rows with one position and segment per token".into(),
            )));
        }
        let mut batch = Self { tokens: Vec::new(), positions: Vec::new(), segments: Vec::new(), rows: rows.len(), len };
        for (tokens, positions, segments) in rows {
            let pad = len - tokens.len();
            batch.tokens.extend(tokens.iter().copied().chain(std::iter::repeat_n(0, pad)));
            batch.positions.extend(positions.iter().copied().chain(std::iter::repeat_n(0, pad)));
            batch.segments.extend(segments.iter().copied().chain(std::iter::repeat_n(PAD_SEGMENT, pad)));
        }
        Ok(batch)
    }

    /// Tokens per row, padding included.
    pub fn row_len(&self) -> usize {
        self.len
    }
}

/// One decoder layer's norm weights and projections.
pub struct LayerParts<'a> {
    /// RMSNorm weight before attention.
    pub input_layernorm: &'a Tensor,
    /// RMSNorm weight before the MLP.
    pub post_attention_layernorm: &'a Tensor,
    /// Query projection.
    pub q_proj: &'a dyn Projection,
    /// Key projection.
    pub k_proj: &'a dyn Projection,
    /// Value projection.
    pub v_proj: &'a dyn Projection,
    /// Attention output projection.
    pub o_proj: &'a dyn Projection,
    /// MLP gate projection.
    pub gate_proj: &'a dyn Projection,
    /// MLP up projection.
    pub up_proj: &'a dyn Projection,
    /// MLP down projection.
    pub down_proj: &'a dyn Projection,
}

/// What every layer of one forward pass shares.
struct Context<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
    mask: &'a Tensor,
}

/// Gradients of trainable variables found while replaying checkpointed layers
/// in the backward pass (the main graph never sees those variables).
pub struct CheckpointGrads {
    vars: HashSet<TensorId>,
    grads: Mutex<HashMap<TensorId, Tensor>>,
}

impl CheckpointGrads {
    /// Collects gradients for these variables.
    pub fn new(vars: &[&Var]) -> Self {
        Self { vars: vars.iter().map(|v| v.as_tensor().id()).collect(), grads: Mutex::default() }
    }

    /// The gradients collected since the last call, summed per variable.
    pub fn take(&self) -> HashMap<TensorId, Tensor> {
        std::mem::take(&mut *self.grads.lock().expect("checkpoint gradients lock"))
    }
}

/// A decoder layer whose activations are recomputed in backward: forward runs
/// the layer and keeps only the output; backward replays it with gradients on.
struct LayerCheckpoint {
    decoder: Arc<Decoder>,
    layer: usize,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    grads: Arc<CheckpointGrads>,
}

impl LayerCheckpoint {
    fn run(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let ctx = Context { cos: &self.cos, sin: &self.sin, mask: &self.mask };
        self.decoder.layer(self.layer, x, &ctx, None, Pass::Train).map_err(|e| match e {
            LlmError::Candle(e) => e,
            other => candle_core::Error::Msg(other.to_string()),
        })
    }
}

impl CustomOp1 for LayerCheckpoint {
    fn name(&self) -> &'static str {
        "decoder-layer-checkpoint"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_tensor(storage, layout, self.name())?;
        // The graph built while running is dropped with the output as soon as
        // its data is copied out: only the output is kept.
        into_cpu(&self.run(&x)?, self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &candle_core::CudaStorage, layout: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let x = super::ops::cuda_tensor(storage, layout, self.name())?;
        super::ops::into_cuda(&self.run(&x)?, self.name())
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let x = Var::from_tensor(&arg.detach())?;
        let y = self.run(x.as_tensor())?;
        let grads = (y * grad_res.detach())?.sum_all()?.backward()?;
        let mut collected = self.grads.grads.lock().expect("checkpoint gradients lock");
        for id in grads.get_ids() {
            if self.grads.vars.contains(id) {
                let grad = grads.get_id(*id).expect("listed id").clone();
                let sum = match collected.remove(id) {
                    Some(previous) => (previous + grad)?,
                    None => grad,
                };
                collected.insert(*id, sum);
            }
        }
        Ok(grads.get(x.as_tensor()).cloned())
    }
}

/// `[b, kv, t, d]` → `[b, kv·n, t, d]`, each key/value head serving `n` query heads.
fn repeat_kv(x: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?.expand((b, kv, n, t, d))?.reshape((b, kv * n, t, d))
}

/// RoPE inverse frequencies (f32, as transformers computes them), with Llama-3
/// frequency scaling when configured.
fn inverse_frequencies(head_dim: usize, theta: f64, scaling: Option<&Llama3RopeScaling>) -> Vec<f32> {
    let base = theta as f32;
    let freqs = (0..head_dim).step_by(2).map(|i| 1.0 / base.powf(i as f32 / head_dim as f32));
    let Some(s) = scaling else { return freqs.collect() };
    let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
    let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
    freqs
        .map(|f| {
            let f = f as f64;
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let scaled = if wavelen > low_wavelen {
                f / s.factor
            } else if wavelen < high_wavelen {
                f
            } else {
                let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / s.factor + smooth * f
            };
            scaled as f32
        })
        .collect()
}

/// Positions and segments for sequences packed into one row: positions restart
/// at 0 for each sequence, segment ids count sequences.
pub fn packed_layout(lengths: &[usize]) -> (Vec<u32>, Vec<u32>) {
    let mut positions = Vec::new();
    let mut segments = Vec::new();
    for (segment, &len) in lengths.iter().enumerate() {
        positions.extend(0..len as u32);
        segments.extend(std::iter::repeat_n(segment as u32, len));
    }
    (positions, segments)
}

/// Reduces logits to the last dimension's argmax.
pub fn argmax(logits: &Tensor) -> Result<u32, LlmError> {
    Ok(logits.flatten_all()?.argmax(D::Minus1)?.to_scalar::<u32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::linear::DenseLoader;

    #[test]
    fn a_decoder_builds_from_random_weights_of_any_shape() {
        let text = r#"{"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50, "tie_word_embeddings": false}"#;
        let config = ModelConfig::parse(Path::new("bench"), text).unwrap();
        let weights = Weights::random(DType::F32, &Device::Cpu, config.tie_word_embeddings);
        let decoder = Decoder::from_weights(&weights, config, &DenseLoader).unwrap();
        let (positions, segments) = packed_layout(&[3, 2]);
        let logits = decoder.forward(&[1, 2, 3, 4, 5], &positions, &segments, None, false).unwrap();
        assert_eq!(logits.dims(), [5, 50]);
        assert!(logits.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite()));
    }
}
