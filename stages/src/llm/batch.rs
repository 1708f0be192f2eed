//! The batch decoder: many sequences advance through one forward pass.
//!
//! Each step takes, for every sequence it feeds, a run of new tokens — a
//! prompt chunk while the sequence prefills, one sampled token while it
//! decodes — and packs them into one row of `N` tokens. Everything that does
//! not mix tokens runs on that row at once: embeddings, RMSNorms, RoPE (each
//! token at its own position), the q/k/v, o and MLP projections and
//! `lm_head` are one `[N, in] × [in, out]` product each, so the weights are
//! read once per step rather than once per sequence — what makes decoding
//! many sequences cost little more than decoding one on a memory-bound CPU.
//!
//! Attention is the one part that does mix tokens, and only within a
//! sequence: each new token's keys and values go into its sequence's blocks
//! of the [`BlockPool`], then each token attends, head by head, to its own
//! sequence's cached keys up to its position (within the sliding window,
//! when the model has one), reading them block by block where they lie. A
//! query head reads the KV head of its group directly (GQA without repeating
//! K/V). Scores, softmax and the weighted sum are in f32, whatever the
//! compute dtype.
//!
//! A token's result depends only on its own sequence: batching changes which
//! tokens share the projections' products, not what any token attends to.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::kv_blocks::{BlockPool, SeqBlocks};
use super::model::Decoder;
use super::LlmError;

/// A sequence's handle in a [`BatchDecoder`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SeqId(usize);

/// Many sequences of one model, each with its blocks in one pool.
pub struct BatchDecoder<'m> {
    model: &'m Decoder,
    pool: BlockPool,
    /// Live sequences by slot; ended ones leave `None` for reuse.
    seqs: Vec<Option<SeqBlocks>>,
}

impl<'m> BatchDecoder<'m> {
    /// An empty batch on `model`.
    pub fn new(model: &'m Decoder) -> Self {
        Self { model, pool: BlockPool::new(model.config()), seqs: Vec::new() }
    }

    /// The model.
    pub fn model(&self) -> &'m Decoder {
        self.model
    }

    /// Starts a sequence with nothing cached.
    pub fn add(&mut self) -> SeqId {
        self.insert(SeqBlocks::default())
    }

    /// Starts a sequence on the first `tokens` cached tokens of `from`
    /// (shared blocks, copied only where the new sequence writes).
    pub fn fork(&mut self, from: SeqId, tokens: usize) -> SeqId {
        let from = self.seqs[from.0].as_ref().expect("a live sequence");
        let blocks = self.pool.fork(from, tokens);
        self.insert(blocks)
    }

    fn insert(&mut self, blocks: SeqBlocks) -> SeqId {
        match self.seqs.iter().position(Option::is_none) {
            Some(slot) => {
                self.seqs[slot] = Some(blocks);
                SeqId(slot)
            }
            None => {
                self.seqs.push(Some(blocks));
                SeqId(self.seqs.len() - 1)
            }
        }
    }

    /// Ends a sequence; its blocks go back to the pool.
    pub fn remove(&mut self, id: SeqId) {
        if let Some(blocks) = self.seqs.get_mut(id.0).and_then(Option::take) {
            self.pool.free(blocks);
        }
    }

    /// Tokens cached for a sequence.
    pub fn len(&self, id: SeqId) -> usize {
        self.blocks(id).len()
    }

    /// Bytes of the KV pool.
    pub fn cache_bytes(&self) -> usize {
        self.pool.bytes()
    }

    fn blocks(&self, id: SeqId) -> &SeqBlocks {
        self.seqs[id.0].as_ref().expect("a live sequence")
    }

    /// One forward pass over every feed's new tokens (each continues its
    /// sequence); returns each feed's logits (f32, `[vocab]`) after its last
    /// token. A sequence appears at most once; every feed has a token.
    pub fn step(&mut self, feeds: &[(SeqId, &[u32])]) -> Result<Vec<Vec<f32>>, LlmError> {
        let model = self.model;
        let mut tokens = Vec::new();
        let (mut positions, mut slots, mut seqs) = (Vec::new(), Vec::new(), Vec::new());
        let mut last = Vec::new();
        for &(id, new) in feeds {
            if new.is_empty() {
                return Err(LlmError::Candle(candle_core::Error::Msg("a batch feed without tokens".into())));
            }
            let seq = self.seqs[id.0].as_mut().expect("a live sequence");
            for &token in new {
                positions.push(seq.len() as u32);
                slots.push(self.pool.push_slot(seq));
                tokens.push(token);
                seqs.push(id);
            }
            last.push(tokens.len() - 1);
        }
        let (cos, sin) = model.rope(&positions)?;
        let row = Row { cos, sin, positions, slots, seqs };
        let mut x = model.embed(&tokens)?;
        for layer in 0..model.config().num_layers {
            x = self.layer(layer, &x, &row)?;
        }
        let last = Tensor::new(last.iter().map(|&i| i as u32).collect::<Vec<_>>(), model.device())?;
        let hidden = model.final_norm(&x)?.squeeze(0)?.index_select(&last, 0)?;
        let logits = model.lm_head().forward_batch(&hidden.unsqueeze(0)?)?.squeeze(0)?.to_dtype(DType::F32)?;
        Ok(logits.to_vec2::<f32>()?)
    }

    /// One decoder layer over the packed row `x` `[1, N, hidden]`.
    fn layer(&mut self, layer: usize, x: &Tensor, row: &Row) -> Result<Tensor, LlmError> {
        let model = self.model;
        let c = model.config();
        let parts = model.layer_parts(layer);
        let n = row.positions.len();
        let normed = model.norm(x, parts.input_layernorm)?;
        // [1, N, heads · d] → [1, heads, N, d] for RoPE → back to [N, heads · d] in f32.
        let project = |p: &dyn super::linear::Projection, heads: usize, rotate: bool| -> candle_core::Result<Vec<f32>> {
            let y = p.forward_batch(&normed)?.reshape((1, n, heads, c.head_dim))?.transpose(1, 2)?.contiguous()?;
            let y = if rotate { candle_nn::rotary_emb::rope(&y, &row.cos, &row.sin)? } else { y };
            y.transpose(1, 2)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
        };
        let q = project(parts.q_proj, c.num_heads, true)?;
        let k = project(parts.k_proj, c.num_kv_heads, true)?;
        let v = project(parts.v_proj, c.num_kv_heads, false)?;
        let kv = c.num_kv_heads * c.head_dim;
        for (t, &slot) in row.slots.iter().enumerate() {
            self.pool.write(layer, slot, &k[t * kv..(t + 1) * kv], &v[t * kv..(t + 1) * kv]);
        }
        let width = c.num_heads * c.head_dim;
        let mut out = vec![0f32; n * width];
        let shape = Shape { heads: c.num_heads, group: c.num_heads / c.num_kv_heads, dim: c.head_dim, window: c.sliding_window };
        let (pool, seqs) = (&self.pool, &self.seqs);
        out.par_chunks_mut(width).enumerate().for_each(|(t, out_row)| {
            let seq = seqs[row_seq(row, t)].as_ref().expect("a live sequence");
            attend(pool, layer, seq, &q[t * width..(t + 1) * width], row.positions[t] as usize, &shape, out_row);
        });
        let values = Tensor::from_vec(out, (1, n, width), model.device())?.to_dtype(model.dtype())?;
        let x = (x + parts.o_proj.forward_batch(&values)?)?;
        let normed = model.norm(&x, parts.post_attention_layernorm)?;
        let gated = (parts.gate_proj.forward_batch(&normed)?.silu()? * parts.up_proj.forward_batch(&normed)?)?;
        Ok((x + parts.down_proj.forward_batch(&gated)?)?)
    }
}

/// What every layer of one step shares: each token's RoPE tables, position,
/// KV slot and sequence.
struct Row {
    cos: Tensor,
    sin: Tensor,
    positions: Vec<u32>,
    slots: Vec<(usize, usize)>,
    seqs: Vec<SeqId>,
}

/// The sequence slot of the row's token `t`.
fn row_seq(row: &Row, t: usize) -> usize {
    row.seqs[t].0
}

/// The attention heads' layout.
struct Shape {
    heads: usize,
    /// Query heads per KV head.
    group: usize,
    dim: usize,
    window: Option<usize>,
}

/// One token's attention output `[heads · d]` into `out`: each query head
/// over its KV head's cached keys at positions `from..=position` of `seq`.
fn attend(pool: &BlockPool, layer: usize, seq: &SeqBlocks, q: &[f32], position: usize, shape: &Shape, out: &mut [f32]) {
    let d = shape.dim;
    let dot = swift_kernels::gemv::dot_f32();
    let scale = 1.0 / (d as f32).sqrt();
    let from = shape.window.map_or(0, |w| (position + 1).saturating_sub(w));
    let mut scores = Vec::with_capacity(position + 1 - from);
    for h in 0..shape.heads {
        let q = &q[h * d..(h + 1) * d];
        scores.clear();
        for (keys, _) in pool.runs(layer, h / shape.group, seq, from, position + 1) {
            scores.extend(keys.chunks_exact(d).map(|k| dot(q, k) * scale));
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            total += *s;
        }
        let o = &mut out[h * d..(h + 1) * d];
        let mut i = 0;
        for (_, values) in pool.runs(layer, h / shape.group, seq, from, position + 1) {
            for v in values.chunks_exact(d) {
                let p = scores[i] / total;
                o.iter_mut().zip(v).for_each(|(o, v)| *o += p * v);
                i += 1;
            }
        }
    }
}

