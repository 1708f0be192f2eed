//! AWQ on one decoder layer (FORMATS.md §1; llm-awq `auto_scale`/`auto_clip`,
//! AutoAWQ `quantizer.py`):
//!
//! 1. run the full-precision layer over the calibration chunks, keeping every
//!    projection's input and the attention and MLP outputs;
//! 2. per scaling group, try `s = mean|x|^α` (or AutoAWQ's duo scaling) for
//!    α ∈ {0, 0.05, …, 0.95}, measuring the group's module output with its
//!    projections pseudo-quantized as `Q(W·diag(s))·diag(s)⁻¹`; keep the best;
//! 3. fold the scales into the previous norm or projection;
//! 4. clip search on every projection but q/k, on ~512 sampled tokens;
//! 5. round-to-nearest int4 with zero points, per group of input channels.
//!
//! Round-to-nearest of the original weights (RTN) is computed alongside as
//! the baseline, and both are measured on the layer's output.

use anyhow::{anyhow, Context};
use candle_core::{DType, Tensor, D};
use serde::Serialize;
use swift_kernels::awq::{self, QuantizedGroups};

use crate::llm::linear::{Dense, Projection};
use crate::llm::model::RowContext;
use crate::llm::Decoder;

/// Projection paths within a layer, in checkpoint order.
pub const LINEARS: [&str; 7] =
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

/// The α grid: 20 points, α = i/20.
const GRID: usize = 20;
/// Tokens the clip search samples (AutoAWQ's `n_sample_token`).
const CLIP_TOKENS: usize = 512;

/// How a layer is quantized.
#[derive(Clone, Debug)]
pub struct Options {
    /// Run the AWQ search (else round-to-nearest only).
    pub awq: bool,
    /// Input channels per scale and zero point.
    pub group: usize,
    /// AutoAWQ's duo scaling instead of llm-awq's `mean|x|^α`.
    pub duo_scaling: bool,
    /// Run the clip search.
    pub clip: bool,
    /// Module path fragments left unquantized.
    pub skip: Vec<String>,
}

impl Options {
    /// Whether the projection at `path` stays unquantized.
    pub fn skips(&self, path: &str) -> bool {
        self.skip.iter().any(|s| path.contains(s.as_str()))
    }
}

/// One projection in f32.
#[derive(Clone)]
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn of(p: &dyn Projection) -> candle_core::Result<Self> {
        Ok(Self { weight: p.weight_f32()?, bias: p.bias().map(|b| b.to_dtype(DType::F32)).transpose()? })
    }
    fn dense(&self) -> candle_core::Result<Dense> {
        Dense::new(self.weight.clone(), self.bias.clone())
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.dense()?.forward(x)
    }
}

/// A layer's norms and projections in f32, as the search changes them.
#[derive(Clone)]
struct LayerWeights {
    ln1: Tensor,
    ln2: Tensor,
    linears: Vec<Linear>,
}

impl LayerWeights {
    fn of(decoder: &Decoder, n: usize) -> candle_core::Result<Self> {
        let p = decoder.layer_parts(n);
        let linears = [p.q_proj, p.k_proj, p.v_proj, p.o_proj, p.gate_proj, p.up_proj, p.down_proj]
            .into_iter()
            .map(Linear::of)
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { ln1: p.input_layernorm.to_dtype(DType::F32)?, ln2: p.post_attention_layernorm.to_dtype(DType::F32)?, linears })
    }

    fn attention(&self, decoder: &Decoder, x: &Tensor, row: &RowContext) -> anyhow::Result<(Tensor, Tensor)> {
        let [q, k, v] = [Q, K, V].map(|i| self.linears[i].dense());
        let (q, k, v) = (q?, k?, v?);
        let values = decoder.attention_values_with([&q, &k, &v], x, row)?;
        let out = self.linears[O].forward(&values)?;
        Ok((values, out))
    }

    fn mlp(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let act = (self.linears[GATE].forward(x)?.silu()? * self.linears[UP].forward(x)?)?;
        let out = self.linears[DOWN].forward(&act)?;
        Ok((act, out))
    }

    /// The layer on one chunk, with every intermediate.
    fn run(&self, decoder: &Decoder, x: &Tensor, row: &RowContext) -> anyhow::Result<Activations> {
        let attn_in = decoder.norm(x, &self.ln1)?;
        let (values, attn_out) = self.attention(decoder, &attn_in, row)?;
        let h = (x + &attn_out)?;
        let mlp_in = decoder.norm(&h, &self.ln2)?;
        let (act, mlp_out) = self.mlp(&mlp_in)?;
        let output = (h + &mlp_out)?;
        Ok(Activations { attn_in, values, attn_out, mlp_in, act, mlp_out, output })
    }
}

/// One chunk's activations through a layer.
struct Activations {
    attn_in: Tensor,
    values: Tensor,
    attn_out: Tensor,
    mlp_in: Tensor,
    act: Tensor,
    mlp_out: Tensor,
    output: Tensor,
}

/// What a scaling group's scales are folded into.
#[derive(Clone, Copy)]
enum Prev {
    InputNorm,
    PostAttentionNorm,
    Linear(usize),
}

/// Whose output the group's loss is measured on.
#[derive(Clone, Copy)]
enum Inspect {
    SelfAttention,
    Mlp,
    Linear(usize),
}

/// Which activation of a layer a group reads or is measured against.
#[derive(Clone, Copy)]
enum Act {
    AttentionInput,
    AttentionValues,
    AttentionOutput,
    MlpInput,
    MlpGated,
    MlpOutput,
}

impl Act {
    fn of(self, a: &Activations) -> &Tensor {
        match self {
            Act::AttentionInput => &a.attn_in,
            Act::AttentionValues => &a.values,
            Act::AttentionOutput => &a.attn_out,
            Act::MlpInput => &a.mlp_in,
            Act::MlpGated => &a.act,
            Act::MlpOutput => &a.mlp_out,
        }
    }
}

/// A scaling group (FORMATS.md §1's table): its members' shared input, the
/// module whose output the loss is measured on, and that output.
struct Group {
    name: &'static str,
    prev: Prev,
    members: &'static [usize],
    input: Act,
    inspect: Inspect,
    target: Act,
}

const GROUPS: [Group; 4] = [
    Group {
        name: "qkv",
        prev: Prev::InputNorm,
        members: &[Q, K, V],
        input: Act::AttentionInput,
        inspect: Inspect::SelfAttention,
        target: Act::AttentionOutput,
    },
    Group {
        name: "o",
        prev: Prev::Linear(V),
        members: &[O],
        input: Act::AttentionValues,
        inspect: Inspect::Linear(O),
        target: Act::AttentionOutput,
    },
    Group {
        name: "gate_up",
        prev: Prev::PostAttentionNorm,
        members: &[GATE, UP],
        input: Act::MlpInput,
        inspect: Inspect::Mlp,
        target: Act::MlpOutput,
    },
    Group { name: "down", prev: Prev::Linear(UP), members: &[DOWN], input: Act::MlpGated, inspect: Inspect::Linear(DOWN), target: Act::MlpOutput },
];

impl Group {
    fn output(&self, w: &LayerWeights, decoder: &Decoder, x: &Tensor, row: &RowContext) -> anyhow::Result<Tensor> {
        Ok(match self.inspect {
            Inspect::SelfAttention => w.attention(decoder, x, row)?.1,
            Inspect::Mlp => w.mlp(x)?.1,
            Inspect::Linear(i) => w.linears[i].forward(x)?,
        })
    }

    /// Whether the group is scaled: AutoAWQ scales v_proj → o_proj only when
    /// the two weights have the same shape (never under GQA).
    fn applies(&self, w: &LayerWeights) -> bool {
        match self.prev {
            Prev::Linear(V) => w.linears[V].weight.dims() == w.linears[O].weight.dims(),
            _ => true,
        }
    }
}

/// The search's outcome for one scaling group.
#[derive(Clone, Debug, Serialize)]
pub struct GroupReport {
    /// `qkv`, `o`, `gate_up` or `down`.
    pub group: &'static str,
    /// Output MSE with round-to-nearest (no scaling).
    pub rtn_loss: f64,
    /// Output MSE with the chosen scales.
    pub awq_loss: f64,
    /// The chosen α (`None`: no scaling beat round-to-nearest).
    pub alpha: Option<f64>,
}

/// One layer's report.
#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    /// Layer index.
    pub layer: usize,
    /// Layer output MSE against full precision, round-to-nearest.
    pub rtn_mse: f64,
    /// Layer output MSE against full precision, AWQ (absent for `rtn`).
    pub awq_mse: Option<f64>,
    /// The scaling groups searched.
    pub groups: Vec<GroupReport>,
}

/// A quantized layer.
pub struct LayerResult {
    /// The tensors to write, by checkpoint name (the method's).
    pub tensors: Vec<(String, Tensor)>,
    /// Round-to-nearest tensors (only for `awq`, as its baseline).
    pub baseline: Option<Vec<(String, Tensor)>>,
    /// The full-precision layer's output per chunk: the next layer's input.
    pub outputs: Vec<Tensor>,
    /// Measurements.
    pub report: LayerReport,
}

/// Quantizes layer `n` on `inputs` (chunks `[c, t, hidden]` of calibration rows).
pub fn quantize_layer(decoder: &Decoder, n: usize, inputs: &[Tensor], row: &RowContext, opts: &Options) -> anyhow::Result<LayerResult> {
    let fp = LayerWeights::of(decoder, n)?;
    let acts = inputs.iter().map(|x| fp.run(decoder, x, row)).collect::<anyhow::Result<Vec<_>>>()?;
    let prefix = format!("model.layers.{n}");
    let skipped: Vec<bool> = LINEARS.iter().map(|l| opts.skips(&format!("{prefix}.{l}"))).collect();

    let rtn = quantize_all(&fp, &skipped, opts.group, &prefix)?;
    let rtn_weights = with_dequantized(&fp, &rtn)?;
    let rtn_mse = output_mse(&rtn_weights, decoder, inputs, &acts, row).with_context(|| format!("{prefix}: RTN output error"))?;
    let rtn_tensors = || tensors(&prefix, &fp, &rtn);
    if !opts.awq {
        let report = LayerReport { layer: n, rtn_mse, awq_mse: None, groups: Vec::new() };
        return Ok(LayerResult { tensors: rtn_tensors()?, baseline: None, outputs: outputs(acts), report });
    }

    let mut scaled = fp.clone();
    let mut groups = Vec::new();
    let mut clip_inputs: Vec<Option<Tensor>> = vec![None; LINEARS.len()];
    for group in &GROUPS {
        let chunks: Vec<&Tensor> = acts.iter().map(|a| group.input.of(a)).collect();
        let scales = if group.applies(&fp) && !group.members.iter().all(|&m| skipped[m]) {
            let (scales, report) = search_group(group, &fp, &skipped, decoder, &acts, &channel_mean(&chunks)?, row, opts)
                .with_context(|| format!("{prefix}: scale search of the {} group", group.name))?;
            groups.push(report);
            scales
        } else {
            None
        };
        let mut sample = sample_tokens(&chunks, CLIP_TOKENS)?;
        if let Some(s) = &scales {
            fold(&mut scaled, group, s)?;
            sample = sample.broadcast_div(s)?;
        }
        for &m in group.members {
            clip_inputs[m] = Some(sample.clone());
        }
    }
    if opts.clip {
        for (i, input) in clip_inputs.iter().enumerate() {
            if let (Some(x), false, false) = (input, skipped[i], i == Q || i == K) {
                clip(&mut scaled.linears[i], x, opts.group).with_context(|| format!("{prefix}.{}", LINEARS[i]))?;
            }
        }
    }
    let chosen = quantize_all(&scaled, &skipped, opts.group, &prefix)?;
    let awq_weights = with_dequantized(&scaled, &chosen)?;
    let awq_mse = output_mse(&awq_weights, decoder, inputs, &acts, row).with_context(|| format!("{prefix}: AWQ output error"))?;
    let report = LayerReport { layer: n, rtn_mse, awq_mse: Some(awq_mse), groups };
    Ok(LayerResult { tensors: tensors(&prefix, &scaled, &chosen)?, baseline: Some(rtn_tensors()?), outputs: outputs(acts), report })
}

fn outputs(acts: Vec<Activations>) -> Vec<Tensor> {
    acts.into_iter().map(|a| a.output).collect()
}

/// Per input channel, `mean|x|` over every token of the chunks.
fn channel_mean(chunks: &[&Tensor]) -> candle_core::Result<Tensor> {
    let mut sum: Option<Tensor> = None;
    let mut count = 0usize;
    for chunk in chunks {
        let flat = chunk.flatten_to(1)?;
        count += flat.dim(0)?;
        let part = flat.abs()?.sum(0)?;
        sum = Some(match sum {
            Some(s) => (s + part)?,
            None => part,
        });
    }
    sum.expect("at least one chunk") / count as f64
}

/// About `wanted` tokens `[tokens, features]` taken evenly from the chunks
/// (every `tokens / wanted`-th, as AutoAWQ's clip search samples).
fn sample_tokens(chunks: &[&Tensor], wanted: usize) -> candle_core::Result<Tensor> {
    let flat = chunks.iter().map(|t| t.flatten_to(1)).collect::<candle_core::Result<Vec<_>>>()?;
    let total: usize = flat.iter().map(|t| t.dim(0)).sum::<candle_core::Result<usize>>()?;
    let step = (total / wanted).max(1);
    let mut picked = Vec::new();
    let mut offset = 0;
    for t in &flat {
        let rows = t.dim(0)?;
        let first = (step - offset % step) % step;
        let ids: Vec<u32> = (first..rows).step_by(step).map(|i| i as u32).collect();
        if !ids.is_empty() {
            picked.push(t.index_select(&Tensor::new(ids.as_slice(), t.device())?, 0)?);
        }
        offset += rows;
    }
    Tensor::cat(&picked, 0)
}

/// The best scales of one group (`None`: none beat round-to-nearest) and its report.
#[allow(clippy::too_many_arguments)]
fn search_group(
    group: &Group,
    fp: &LayerWeights,
    skipped: &[bool],
    decoder: &Decoder,
    acts: &[Activations],
    x_mean: &Tensor,
    row: &RowContext,
    opts: &Options,
) -> anyhow::Result<(Option<Tensor>, GroupReport)> {
    let w_mean = if opts.duo_scaling { Some(weight_mean(fp, group.members, opts.group)?) } else { None };
    let loss_of = |scales: Option<&Tensor>| -> anyhow::Result<f64> {
        let mut trial = fp.clone();
        for &m in group.members.iter().filter(|&&m| !skipped[m]) {
            let w = &fp.linears[m].weight;
            trial.linears[m].weight = match scales {
                Some(s) => match pseudo_quantize(&w.broadcast_mul(s)?, opts.group) {
                    Ok(q) => q.broadcast_div(s)?,
                    // Scales whose weights fp16 cannot hold lose, as an
                    // infinite loss loses in AutoAWQ; the search goes on.
                    Err(_) => return Ok(f64::INFINITY),
                },
                None => pseudo_quantize(w, opts.group)?,
            };
        }
        mse(acts.iter().map(|a| Ok((group.output(&trial, decoder, group.input.of(a), row)?, group.target.of(a).clone()))))
    };
    let rtn_loss = loss_of(None)?;
    let mut best: (f64, Option<(f64, Tensor)>) = (rtn_loss, None);
    for i in 0..GRID {
        let alpha = i as f64 / GRID as f64;
        if i == 0 && w_mean.is_none() {
            continue; // mean|x|^0 is the identity: round-to-nearest, measured above.
        }
        let s = scales(x_mean, w_mean.as_ref(), alpha)?;
        let loss = loss_of(Some(&s))?;
        if loss < best.0 {
            best = (loss, Some((alpha, s)));
        }
    }
    let (awq_loss, chosen) = best;
    let report = GroupReport { group: group.name, rtn_loss, awq_loss, alpha: chosen.as_ref().map(|(a, _)| *a) };
    Ok((chosen.map(|(_, s)| s), report))
}

/// `mean|x|^α` (or `mean|x|^α / (w_mean^(1−α) + 1e-4)`), clamped at 1e-4 and
/// normalised by `sqrt(max · min)`.
fn scales(x_mean: &Tensor, w_mean: Option<&Tensor>, alpha: f64) -> candle_core::Result<Tensor> {
    let s = x_mean.powf(alpha)?;
    let s = match w_mean {
        Some(w) => (s / (w.powf(1.0 - alpha)? + 1e-4)?)?,
        None => s,
    };
    let s = s.clamp(1e-4, f64::INFINITY)?;
    let max = s.max(0)?.to_scalar::<f32>()? as f64;
    let min = s.min(0)?.to_scalar::<f32>()? as f64;
    s / (max * min).sqrt()
}

/// Duo scaling's weight statistic: per input channel, the mean over the
/// group's concatenated rows of `|w| / max|w|` within each quantization group.
fn weight_mean(fp: &LayerWeights, members: &[usize], group: usize) -> candle_core::Result<Tensor> {
    let w = Tensor::cat(&members.iter().map(|&m| fp.linears[m].weight.clone()).collect::<Vec<_>>(), 0)?;
    let shape = w.dims().to_vec();
    let grouped = w.abs()?.reshape(((), group))?;
    let normed = grouped.broadcast_div(&(grouped.max_keepdim(D::Minus1)? + 1e-6)?)?;
    normed.reshape(shape)?.mean(0)
}

fn pseudo_quantize(w: &Tensor, group: usize) -> anyhow::Result<Tensor> {
    let (n, k) = w.dims2()?;
    let mut values = w.flatten_all()?.to_vec1::<f32>()?;
    awq::pseudo_quantize(&mut values, n, k, group).map_err(|e| anyhow!("{e}"))?;
    Ok(Tensor::from_vec(values, (n, k), w.device())?)
}

/// Folds a group's scales into its previous op and its members.
fn fold(w: &mut LayerWeights, group: &Group, s: &Tensor) -> candle_core::Result<()> {
    match group.prev {
        Prev::InputNorm => w.ln1 = w.ln1.broadcast_div(s)?,
        Prev::PostAttentionNorm => w.ln2 = w.ln2.broadcast_div(s)?,
        Prev::Linear(p) => {
            let column = s.unsqueeze(1)?;
            let prev = &mut w.linears[p];
            prev.weight = prev.weight.broadcast_div(&column)?;
            prev.bias = prev.bias.as_ref().map(|b| b.broadcast_div(s)).transpose()?;
        }
    }
    for &m in group.members {
        w.linears[m].weight = w.linears[m].weight.broadcast_mul(s)?;
    }
    Ok(())
}

/// The clip search and its clamp, on the sampled tokens `x` `[tokens, in]`.
fn clip(linear: &mut Linear, x: &Tensor, group: usize) -> anyhow::Result<()> {
    let (n, k) = linear.weight.dims2()?;
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let mut w = linear.weight.flatten_all()?.to_vec1::<f32>()?;
    let max_val = awq::clip_search(&w, n, k, group, &xs, x.dim(0)?).map_err(|e| anyhow!("{e}"))?;
    awq::apply_clip(&mut w, n, k, group, &max_val);
    linear.weight = Tensor::from_vec(w, (n, k), x.device())?;
    Ok(())
}

/// Round-to-nearest of every projection not skipped.
fn quantize_all(w: &LayerWeights, skipped: &[bool], group: usize, prefix: &str) -> anyhow::Result<Vec<Option<QuantizedGroups>>> {
    w.linears
        .iter()
        .zip(skipped)
        .zip(LINEARS)
        .map(|((linear, &skip), name)| {
            if skip {
                return Ok(None);
            }
            let (n, k) = linear.weight.dims2()?;
            let values = linear.weight.flatten_all()?.to_vec1::<f32>()?;
            let q = awq::quantize(&values, n, k, group).map_err(|e| anyhow!("{prefix}.{name}: {e}"))?;
            Ok(Some(q))
        })
        .collect()
}

/// The weights with every quantized projection replaced by its dequantization.
fn with_dequantized(w: &LayerWeights, quantized: &[Option<QuantizedGroups>]) -> candle_core::Result<LayerWeights> {
    let mut out = w.clone();
    for (linear, q) in out.linears.iter_mut().zip(quantized) {
        if let Some(q) = q {
            linear.weight = Tensor::from_vec(q.dequantize(), (q.n(), q.k()), linear.weight.device())?;
        }
    }
    Ok(out)
}

/// Mean squared error of the layer's output against the full-precision one.
fn output_mse(w: &LayerWeights, decoder: &Decoder, inputs: &[Tensor], acts: &[Activations], row: &RowContext) -> anyhow::Result<f64> {
    mse(inputs.iter().zip(acts).map(|(x, a)| Ok((w.run(decoder, x, row)?.output, a.output.clone()))))
}

/// The mean of `(output − target)²` over every element of every pair.
fn mse(pairs: impl Iterator<Item = anyhow::Result<(Tensor, Tensor)>>) -> anyhow::Result<f64> {
    let mut sum = 0f64;
    let mut count = 0usize;
    for pair in pairs {
        let (output, target) = pair?;
        let diff = (output - target)?;
        sum += diff.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        count += diff.elem_count();
    }
    Ok(sum / count.max(1) as f64)
}

/// The layer's checkpoint tensors: fp16 norms, and per projection either the
/// AWQ GEMM tensors or (skipped) the fp16 weight; fp16 biases.
fn tensors(prefix: &str, w: &LayerWeights, quantized: &[Option<QuantizedGroups>]) -> anyhow::Result<Vec<(String, Tensor)>> {
    // Written from the host, whatever device the calibration ran on.
    let half = |t: &Tensor| t.to_dtype(DType::F16)?.to_device(&candle_core::Device::Cpu);
    let mut out = vec![
        (format!("{prefix}.input_layernorm.weight"), half(&w.ln1)?),
        (format!("{prefix}.post_attention_layernorm.weight"), half(&w.ln2)?),
    ];
    for ((linear, q), name) in w.linears.iter().zip(quantized).zip(LINEARS) {
        let path = format!("{prefix}.{name}");
        match q {
            None => out.push((format!("{path}.weight"), half(&linear.weight)?)),
            Some(q) => {
                let packed = q.pack().map_err(|e| anyhow!("{path}: {e}"))?;
                let (k, n, g) = (packed.k(), packed.n(), packed.group());
                let words = |v: &[u32], rows: usize| Tensor::from_vec(v.iter().map(|&x| x as i32).collect::<Vec<i32>>(), (rows, n / 8), &candle_core::Device::Cpu);
                out.push((format!("{path}.qweight"), words(packed.qweight(), k)?));
                out.push((format!("{path}.qzeros"), words(packed.qzeros(), k / g)?));
                out.push((format!("{path}.scales"), half(&Tensor::from_vec(packed.scales().to_vec(), (k / g, n), &candle_core::Device::Cpu)?)?));
            }
        }
        if let Some(b) = &linear.bias {
            out.push((format!("{path}.bias"), half(b)?));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let values: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 + 0.25
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// A multi-head (not grouped) layer: v_proj and o_proj have the same shape.
    fn layer(h: usize, i: usize, kv: usize) -> LayerWeights {
        let linear = |n: usize, k: usize, bias: bool, seed: u64| Linear {
            weight: random(&[n, k], seed),
            bias: bias.then(|| random(&[n], seed + 100)),
        };
        LayerWeights {
            ln1: random(&[h], 1),
            ln2: random(&[h], 2),
            linears: vec![
                linear(h, h, true, 3),
                linear(kv, h, true, 4),
                linear(kv, h, true, 5),
                linear(h, h, false, 6),
                linear(i, h, false, 7),
                linear(i, h, false, 8),
                linear(h, i, false, 9),
            ],
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn folded_scales_leave_every_group_computing_the_same() {
        let (h, i) = (16, 32);
        let w = layer(h, i, h);
        let x = random(&[5, h], 10);
        // What each group computes from its previous op onwards.
        let computed = |w: &LayerWeights, g: usize| -> Tensor {
            let f = |l: usize, x: &Tensor| w.linears[l].forward(x).unwrap();
            match g {
                0 => Tensor::cat(&[Q, K, V].map(|l| f(l, &x.broadcast_mul(&w.ln1).unwrap())), 1).unwrap(),
                1 => f(O, &f(V, &x)),
                2 => Tensor::cat(&[GATE, UP].map(|l| f(l, &x.broadcast_mul(&w.ln2).unwrap())), 1).unwrap(),
                _ => f(DOWN, &f(UP, &x)),
            }
        };
        for (g, group) in GROUPS.iter().enumerate() {
            assert!(group.applies(&w), "{}", group.name);
            let k = w.linears[group.members[0]].weight.dim(1).unwrap();
            let s = random(&[k], 20 + g as u64);
            let mut folded = w.clone();
            fold(&mut folded, group, &s).unwrap();
            let (before, after) = (computed(&w, g), computed(&folded, g));
            assert!(max_diff(&before, &after) < 1e-4, "{}: folding changed the output by {}", group.name, max_diff(&before, &after));
            assert!(max_diff(&w.linears[group.members[0]].weight, &folded.linears[group.members[0]].weight) > 1e-3);
        }
        // Grouped-query attention: v_proj [kv, h] and o_proj [h, h] differ, so no v → o scaling.
        assert!(!GROUPS[1].applies(&layer(h, i, h / 2)));
    }
}
