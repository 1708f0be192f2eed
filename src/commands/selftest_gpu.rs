//! The checks `swift selftest --gpu` runs (the `cuda` build only). Every
//! check draws fresh random inputs, runs them through a CUDA kernel or a
//! model path on the GPU, and through the CPU implementation — the kernels'
//! references in `swift_kernels` (row ops, cross-entropy, NF4, AWQ) or, for
//! whole models, the CPU decoder in f32 — and compares. bf16 checks feed both
//! sides the same bf16-rounded inputs; their tolerances allow bf16's 8-bit
//! mantissa in intermediate roundings.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var};
use swift_kernels::cuda;
use swift_stages::llm::adapted::{AdaptedLoader, BaseFormat, NewAdapter};
use swift_stages::llm::awq::loader_for;
use swift_stages::llm::{model::packed_layout, ops, Compute, Decoder, ModelConfig};

use super::selftest::{difference, record, Outcome};

/// `(ours, reference)` values of one check.
type Compared = (Vec<f32>, Vec<f32>);

/// A check: its name, the largest relative error that passes, and the code.
struct Check {
    name: &'static str,
    tolerance: f64,
    run: fn(&Device) -> anyhow::Result<Compared>,
}

/// Exact results: the GPU computes the same f32 operations in the same order.
const EXACT: f64 = 0.0;
/// f32 reductions summed in another order.
const F32: f64 = 1e-5;
/// bf16 outputs (8-bit mantissa: 2⁻⁸ ≈ 3.9e-3 per rounding).
const BF16: f64 = 1.6e-2;
/// A whole bf16 model against the f32 CPU model.
const MODEL: f64 = 6e-2;

const CHECKS: &[Check] = &[
    Check { name: "rows/rms_norm/f32", tolerance: F32, run: rms_norm_f32 },
    Check { name: "rows/rms_norm/bf16", tolerance: BF16, run: rms_norm_bf16 },
    Check { name: "rows/rms_norm_grad/f32", tolerance: 1e-4, run: rms_norm_grad_f32 },
    Check { name: "rows/softmax/f32", tolerance: F32, run: softmax_f32 },
    Check { name: "rows/softmax_grad/f32", tolerance: F32, run: softmax_grad_f32 },
    Check { name: "rows/silu_mul/bf16", tolerance: BF16, run: silu_mul_bf16 },
    Check { name: "rows/silu_mul_grad/f32", tolerance: F32, run: silu_mul_grad_f32 },
    Check { name: "optim/adamw/f32", tolerance: F32, run: adamw_f32 },
    Check { name: "optim/sum_squares/f32", tolerance: F32, run: sum_squares_f32 },
    Check { name: "loss/cross_entropy/f32", tolerance: F32, run: cross_entropy_f32 },
    Check { name: "loss/cross_entropy/bf16", tolerance: F32, run: cross_entropy_bf16 },
    Check { name: "loss/cross_entropy_grad/f32", tolerance: F32, run: cross_entropy_grad_f32 },
    Check { name: "loss/cross_entropy_fused/loss/f32", tolerance: F32, run: |d| cross_entropy_fused_f32(d, Part::Loss, false) },
    Check { name: "loss/cross_entropy_fused/grad/f32", tolerance: F32, run: |d| cross_entropy_fused_f32(d, Part::Grad, false) },
    Check { name: "loss/cross_entropy_fused/grad/f32/offset", tolerance: F32, run: |d| cross_entropy_fused_f32(d, Part::Grad, true) },
    Check { name: "loss/linear_cross_entropy/loss/f32", tolerance: 1e-4, run: |d| linear_cross_entropy_f32(d, Part::Loss) },
    Check { name: "loss/linear_cross_entropy/grad/f32", tolerance: 1e-4, run: |d| linear_cross_entropy_f32(d, Part::Grad) },
    Check { name: "nf4/quantize/f32", tolerance: EXACT, run: |d| nf4_quantize(d, N, K) },
    Check { name: "nf4/quantize/f32/odd", tolerance: EXACT, run: |d| nf4_quantize(d, N - 1, K + 1) },
    Check { name: "nf4/dequant/plain/f32", tolerance: EXACT, run: |d| nf4_dequant(d, false) },
    Check { name: "nf4/dequant/double/f32", tolerance: EXACT, run: |d| nf4_dequant(d, true) },
    Check { name: "nf4/matmul/f32", tolerance: F32, run: |d| nf4_matmul(d, DType::F32, false) },
    Check { name: "nf4/matmul/bf16", tolerance: BF16, run: |d| nf4_matmul(d, DType::BF16, false) },
    Check { name: "nf4/matmul_t/f32", tolerance: F32, run: |d| nf4_matmul(d, DType::F32, true) },
    Check { name: "nf4/matmul_t/bf16", tolerance: BF16, run: |d| nf4_matmul(d, DType::BF16, true) },
    Check { name: "awq/dequant/f32", tolerance: EXACT, run: |d| awq_dequant(d, SEVEN_B) },
    Check { name: "awq/dequant/f32/n=1000,g=64", tolerance: EXACT, run: |d| awq_dequant(d, EDGES) },
    Check { name: "awq/gemv/f32/m=1", tolerance: F32, run: |d| awq_product(d, SEVEN_B, 1, AwqKernel::GemvF32) },
    Check { name: "awq/gemv/f32/m=16", tolerance: F32, run: |d| awq_product(d, SEVEN_B, 16, AwqKernel::GemvF32) },
    Check { name: "awq/gemv/bf16/m=4", tolerance: BF16, run: |d| awq_product(d, SEVEN_B, 4, AwqKernel::GemvBf16) },
    Check { name: "awq/gemv/bf16/m=5,n=1000,g=64", tolerance: BF16, run: |d| awq_product(d, EDGES, 5, AwqKernel::GemvBf16) },
    Check { name: "awq/gemm_mma/bf16/m=1", tolerance: BF16, run: |d| awq_product(d, SEVEN_B, 1, AwqKernel::Mma) },
    Check { name: "awq/gemm_mma/bf16/m=16", tolerance: BF16, run: |d| awq_product(d, SEVEN_B, 16, AwqKernel::Mma) },
    Check { name: "awq/gemm_mma/bf16/m=37", tolerance: BF16, run: |d| awq_product(d, SEVEN_B, 37, AwqKernel::Mma) },
    Check { name: "awq/gemm_mma/bf16/m=17,n=1000,g=64", tolerance: BF16, run: |d| awq_product(d, EDGES, 17, AwqKernel::Mma) },
    Check { name: "awq/gemm_mma/bf16/m=5/offset", tolerance: BF16, run: |d| awq_product(d, SEVEN_B, 5, AwqKernel::MmaOffset) },
    Check { name: "model/forward/qwen2-tiny", tolerance: MODEL, run: |d| model_forward(d, "models/qwen2-tiny") },
    Check { name: "model/forward/llama-tiny", tolerance: MODEL, run: |d| model_forward(d, "models/llama-tiny") },
    Check { name: "model/forward/awq-int4", tolerance: MODEL, run: |d| model_forward(d, "awq/swift-qwen2-outlier-g64") },
    Check { name: "model/lora_grad/qwen2-tiny", tolerance: MODEL, run: |d| adapter_gradients(d, BaseFormat::Dense) },
    Check {
        name: "model/qlora_grad/qwen2-tiny",
        tolerance: MODEL,
        run: |d| adapter_gradients(d, BaseFormat::Nf4 { blocksize: 64, double_quant: true }),
    },
];

/// Runs every check (or those whose name contains `only`) on `device`.
pub fn run(device: &str, out: Option<&Path>, only: Option<&str>) -> anyhow::Result<Vec<Outcome>> {
    let gpu = open_gpu(device)?;
    let mut outcomes = Vec::new();
    for check in CHECKS.iter().filter(|c| only.is_none_or(|o| c.name.contains(o))) {
        let outcome = match (check.run)(&gpu) {
            Ok((ours, reference)) => {
                let (max_abs, scale) = difference(&ours, &reference);
                Outcome::measured(check.name, max_abs, scale, check.tolerance)
            }
            Err(e) => Outcome::failed(check.name, &e),
        };
        record(out, &outcome);
        outcomes.push(outcome);
    }
    if outcomes.is_empty() {
        anyhow::bail!("--only {}: no check has that in its name", only.unwrap_or_default());
    }
    Ok(outcomes)
}

/// Opens the GPU a `--device` flag names (the GPU checks and benchmarks take no CPU).
pub(super) fn open_gpu(device: &str) -> anyhow::Result<Device> {
    match Compute::parse(device).map_err(|e| anyhow::anyhow!("--device: {e}"))? {
        Compute::Cpu => anyhow::bail!("--device {device}: this needs a CUDA device, e.g. cuda:0"),
        gpu => gpu.open(),
    }
}

/// Normal random f32 values on the CPU.
fn randn(shape: &[usize], std: f32) -> anyhow::Result<Tensor> {
    Ok(Tensor::randn(0f32, std, shape, &Device::Cpu)?)
}

/// The values as bf16 would hold them (still f32, on the CPU).
fn bf16_rounded(t: &Tensor) -> anyhow::Result<Tensor> {
    Ok(t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?)
}

/// A CPU f32 tensor on the GPU in `dtype`.
fn on(gpu: &Device, t: &Tensor, dtype: DType) -> anyhow::Result<Tensor> {
    Ok(t.to_device(gpu)?.to_dtype(dtype)?)
}

/// Any tensor's values as f32 on the host.
fn host(t: &Tensor) -> anyhow::Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
}

const ROWS: usize = 64;
const HIDDEN: usize = 896;

fn rms_norm_f32(gpu: &Device) -> anyhow::Result<Compared> {
    let (x, w) = (randn(&[ROWS, HIDDEN], 2.0)?, (randn(&[HIDDEN], 0.1)? + 1.0)?);
    let mut reference = vec![0f32; ROWS * HIDDEN];
    swift_kernels::rows::rms_norm_rows(&host(&x)?, &host(&w)?, 1e-6, &mut reference);
    let ours = cuda::rows::rms_norm(&on(gpu, &x, DType::F32)?, &on(gpu, &w, DType::F32)?, 1e-6)?;
    Ok((host(&ours)?, reference))
}

fn rms_norm_bf16(gpu: &Device) -> anyhow::Result<Compared> {
    let (x, w) = (bf16_rounded(&randn(&[ROWS, HIDDEN], 2.0)?)?, bf16_rounded(&(randn(&[HIDDEN], 0.1)? + 1.0)?)?);
    // transformers: normalise in f32, round to bf16, scale by the bf16 weight.
    let mut normed = vec![0f32; ROWS * HIDDEN];
    swift_kernels::rows::rms_norm_rows(&host(&x)?, &vec![1.0; HIDDEN], 1e-6, &mut normed);
    let normed = bf16_rounded(&Tensor::from_vec(normed, (ROWS, HIDDEN), &Device::Cpu)?)?;
    let reference = bf16_rounded(&normed.broadcast_mul(&w)?)?;
    let ours = cuda::rows::rms_norm(&on(gpu, &x, DType::BF16)?, &on(gpu, &w, DType::BF16)?, 1e-6)?;
    Ok((host(&ours)?, host(&reference)?))
}

fn rms_norm_grad_f32(gpu: &Device) -> anyhow::Result<Compared> {
    let (x, w, g) = (randn(&[ROWS, HIDDEN], 2.0)?, (randn(&[HIDDEN], 0.1)? + 1.0)?, randn(&[ROWS, HIDDEN], 1.0)?);
    let mut reference = vec![0f32; ROWS * HIDDEN];
    swift_kernels::rows::rms_norm_rows_grad(&host(&x)?, &host(&w)?, &host(&g)?, 1e-6, &mut reference);
    let f = |t: &Tensor| on(gpu, t, DType::F32);
    let ours = cuda::rows::rms_norm_grad(&f(&x)?, &f(&w)?, &f(&g)?, 1e-6)?;
    Ok((host(&ours)?, reference))
}

/// Attention-like scores `[ROWS, 1024]` with a causal `-inf` mask.
fn masked_scores() -> anyhow::Result<Tensor> {
    let n = 1024;
    let x = host(&randn(&[ROWS, n], 3.0)?)?;
    let masked: Vec<f32> = x.iter().enumerate().map(|(i, &v)| if i % n > (i / n) * 16 { f32::NEG_INFINITY } else { v }).collect();
    Ok(Tensor::from_vec(masked, (ROWS, n), &Device::Cpu)?)
}

fn softmax_f32(gpu: &Device) -> anyhow::Result<Compared> {
    let x = masked_scores()?;
    let mut reference = vec![0f32; x.elem_count()];
    swift_kernels::rows::softmax_rows(&host(&x)?, 1024, &mut reference);
    let ours = cuda::rows::softmax(&x.to_device(gpu)?)?;
    Ok((host(&ours)?, reference))
}

fn softmax_grad_f32(gpu: &Device) -> anyhow::Result<Compared> {
    let x = masked_scores()?;
    let mut y = vec![0f32; x.elem_count()];
    swift_kernels::rows::softmax_rows(&host(&x)?, 1024, &mut y);
    let g = randn(&[ROWS, 1024], 1.0)?;
    let mut reference = vec![0f32; y.len()];
    swift_kernels::rows::softmax_rows_grad(&y, &host(&g)?, 1024, &mut reference);
    let y = Tensor::from_vec(y, (ROWS, 1024), &Device::Cpu)?;
    let ours = cuda::rows::softmax_grad(&y.to_device(gpu)?, &g.to_device(gpu)?)?;
    Ok((host(&ours)?, reference))
}

fn silu_mul_bf16(gpu: &Device) -> anyhow::Result<Compared> {
    let (gate, up) = (bf16_rounded(&randn(&[ROWS, 4864], 2.0)?)?, bf16_rounded(&randn(&[ROWS, 4864], 1.0)?)?);
    let reference = bf16_rounded(&(gate.silu()? * &up)?)?;
    let ours = cuda::rows::silu_mul(&on(gpu, &gate, DType::BF16)?, &on(gpu, &up, DType::BF16)?)?;
    Ok((host(&ours)?, host(&reference)?))
}

fn silu_mul_grad_f32(gpu: &Device) -> anyhow::Result<Compared> {
    let (gate, up, g) = (randn(&[ROWS, 4864], 2.0)?, randn(&[ROWS, 4864], 1.0)?, randn(&[ROWS, 4864], 1.0)?);
    // Autograd through candle's composed silu(gate)·up on the CPU.
    let (gv, uv) = (Var::from_tensor(&gate)?, Var::from_tensor(&up)?);
    let grads = (gv.as_tensor().silu()? * uv.as_tensor())?.mul(&g)?.sum_all()?.backward()?;
    let mut reference = host(grads.get(gv.as_tensor()).context("no gate gradient")?)?;
    reference.extend(host(grads.get(uv.as_tensor()).context("no up gradient")?)?);
    let (dgate, dup) = cuda::rows::silu_mul_grad(&gate.to_device(gpu)?, &up.to_device(gpu)?, &g.to_device(gpu)?)?;
    let mut ours = host(&dgate)?;
    ours.extend(host(&dup)?);
    Ok((ours, reference))
}

/// Adapter values in the optimizer's flat buffer: a partial last block.
const OPTIM_LEN: usize = 3 * (1 << 16) + 123;

/// Three AdamW steps (clip factor, weight decay) on the GPU and the CPU; the
/// parameters and both moments are compared.
fn adamw_f32(gpu: &Device) -> anyhow::Result<Compared> {
    use swift_kernels::adamw::{adamw_update, AdamWStep};
    let mut p = host(&randn(&[OPTIM_LEN], 0.05)?)?;
    let (mut m, mut v) = (vec![0f32; OPTIM_LEN], vec![0f32; OPTIM_LEN]);
    let on_gpu = |x: &[f32]| Tensor::from_slice(x, OPTIM_LEN, gpu);
    let (mut pg, mut mg, mut vg) = (on_gpu(&p)?, on_gpu(&m)?, on_gpu(&v)?);
    for t in 1..=3u64 {
        let g = host(&randn(&[OPTIM_LEN], 0.01)?)?;
        let step = AdamWStep::new(t, 2e-4, (0.9, 0.999), 1e-8, 0.01, 0.7);
        adamw_update(&mut p, &g, &mut m, &mut v, &step);
        (pg, mg, vg) = cuda::optim::adamw(&pg, &on_gpu(&g)?, &mg, &vg, &step)?;
    }
    let (mut ours, mut reference) = (host(&pg)?, p);
    ours.extend(host(&mg)?.into_iter().chain(host(&vg)?));
    reference.extend(m.into_iter().chain(v));
    Ok((ours, reference))
}

/// The sum of squares of a flat gradient buffer (f64 on both sides).
fn sum_squares_f32(gpu: &Device) -> anyhow::Result<Compared> {
    let g = randn(&[OPTIM_LEN], 1.0)?;
    let reference = swift_kernels::adamw::sum_squares(&host(&g)?);
    let ours = cuda::optim::sum_squares(&g.to_device(gpu)?)?;
    Ok((vec![ours as f32], vec![reference as f32]))
}

const VOCAB: usize = 151_936;
const LOSS_ROWS: usize = 24;

/// Logits `[LOSS_ROWS, VOCAB]` and targets, the last row ignored.
fn logits_and_targets() -> anyhow::Result<(Tensor, Vec<u32>)> {
    let logits = randn(&[LOSS_ROWS, VOCAB], 3.0)?;
    let mut targets: Vec<u32> = (0..LOSS_ROWS).map(|r| ((r * 7919 + 13) % VOCAB) as u32).collect();
    targets[LOSS_ROWS - 1] = cuda::loss::IGNORED;
    Ok((logits, targets))
}

/// The CPU reference's loss and lse (ignored rows: loss 0).
fn reference_loss(logits: &[f32], targets: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let scored: Vec<u32> = targets.iter().map(|&t| if t == cuda::loss::IGNORED { 0 } else { t }).collect();
    let (mut loss, mut lse) = (vec![0f32; targets.len()], vec![0f32; targets.len()]);
    swift_kernels::loss::cross_entropy_rows(logits, VOCAB, &scored, &mut loss, &mut lse);
    for (l, &t) in loss.iter_mut().zip(targets) {
        if t == cuda::loss::IGNORED {
            *l = 0.0;
        }
    }
    (loss, lse)
}

fn cross_entropy_with(gpu: &Device, logits: Tensor, dtype: DType) -> anyhow::Result<Compared> {
    let (_, targets) = logits_and_targets()?;
    let (reference, _) = reference_loss(&host(&logits)?, &targets);
    let t = Tensor::new(targets.as_slice(), gpu)?;
    let (loss, _) = cuda::loss::cross_entropy(&on(gpu, &logits, dtype)?, &t)?;
    Ok((host(&loss)?, reference))
}

fn cross_entropy_f32(gpu: &Device) -> anyhow::Result<Compared> {
    cross_entropy_with(gpu, logits_and_targets()?.0, DType::F32)
}

fn cross_entropy_bf16(gpu: &Device) -> anyhow::Result<Compared> {
    cross_entropy_with(gpu, bf16_rounded(&logits_and_targets()?.0)?, DType::BF16)
}

/// The CPU reference gradient (ignored rows: 0) for upstream `grad_out`.
fn reference_grad(logits: &[f32], targets: &[u32], grad_out: &[f32]) -> Vec<f32> {
    let (_, lse) = reference_loss(logits, targets);
    let scored: Vec<u32> = targets.iter().map(|&t| if t == cuda::loss::IGNORED { 0 } else { t }).collect();
    let mut grad = vec![0f32; logits.len()];
    swift_kernels::loss::cross_entropy_grad(logits, VOCAB, &scored, &lse, grad_out, &mut grad);
    for (row, &t) in grad.chunks_mut(VOCAB).zip(targets) {
        if t == cuda::loss::IGNORED {
            row.fill(0.0);
        }
    }
    grad
}

fn cross_entropy_grad_f32(gpu: &Device) -> anyhow::Result<Compared> {
    let (logits, targets) = logits_and_targets()?;
    let grad_out = host(&randn(&[LOSS_ROWS], 1.0)?)?;
    let reference = reference_grad(&host(&logits)?, &targets, &grad_out);
    let (l, t) = (logits.to_device(gpu)?, Tensor::new(targets.as_slice(), gpu)?);
    let (_, lse) = cuda::loss::cross_entropy(&l, &t)?;
    let ours = cuda::loss::cross_entropy_grad(&l, &t, &lse, &Tensor::new(grad_out.as_slice(), gpu)?)?;
    Ok((host(&ours)?, reference))
}

/// Which output of a loss check is compared (apart, so that neither's
/// magnitude hides the other's errors).
#[derive(Clone, Copy)]
enum Part {
    Loss,
    Grad,
}

/// With `offset`, the logits are rows of a larger tensor (not at the start
/// of their storage), as a narrowed block would be.
fn cross_entropy_fused_f32(gpu: &Device, part: Part, offset: bool) -> anyhow::Result<Compared> {
    let (logits, targets) = logits_and_targets()?;
    let scale = 0.25f32;
    let host_logits = host(&logits)?;
    let reference = match part {
        Part::Loss => reference_loss(&host_logits, &targets).0,
        Part::Grad => reference_grad(&host_logits, &targets, &[scale; LOSS_ROWS]),
    };
    let on_gpu = if offset {
        let padded = Tensor::cat(&[&randn(&[3, VOCAB], 1.0)?, &logits], 0)?.to_device(gpu)?;
        padded.narrow(0, 3, LOSS_ROWS)?
    } else {
        logits.to_device(gpu)?
    };
    let (loss, grad) = cuda::loss::cross_entropy_fused(on_gpu, &Tensor::new(targets.as_slice(), gpu)?, scale)?;
    Ok((host(match part { Part::Loss => &loss, Part::Grad => &grad })?, reference))
}

/// The fused linear + cross-entropy of training on the GPU (loss, then the
/// hidden states' gradient) against the unfused op on the CPU.
fn linear_cross_entropy_f32(gpu: &Device, part: Part) -> anyhow::Result<Compared> {
    let (rows, h) = (600, 256);
    let w = randn(&[VOCAB, h], 0.05)?;
    let hidden = randn(&[rows, h], 1.0)?;
    let targets: Vec<u32> = (0..rows).map(|r| ((r * 7919 + 3) % VOCAB) as u32).collect();
    let run = |device: &Device, fused: bool| -> anyhow::Result<Vec<f32>> {
        let x = Var::from_tensor(&hidden.to_device(device)?)?;
        let w = w.to_device(device)?;
        let loss = if fused {
            ops::linear_cross_entropy(x.as_tensor(), &w, &targets)?
        } else {
            ops::cross_entropy(&ops::frozen_matmul(x.as_tensor(), &w)?, &targets)?
        };
        let grads = loss.sum_all()?.backward()?;
        match part {
            Part::Loss => host(&loss),
            Part::Grad => host(grads.get(x.as_tensor()).context("no gradient for the hidden states")?),
        }
    };
    Ok((run(gpu, true)?, run(&Device::Cpu, false)?))
}

/// A weight of Qwen2.5-0.5B's MLP shape with rows not a multiple of the tile.
const N: usize = 4864 + 40;
const K: usize = 896;

fn nf4_weight(double_quant: bool) -> anyhow::Result<swift_kernels::nf4::Nf4Tensor> {
    let w = host(&randn(&[N, K], 0.02)?)?;
    swift_kernels::nf4::quantize(&w, &[N, K], 64, double_quant).map_err(|e| anyhow::anyhow!("{e}"))
}

/// `rows × cols` values; an odd count ends in a partial block and a half byte.
fn nf4_quantize(gpu: &Device, rows: usize, cols: usize) -> anyhow::Result<Compared> {
    let w = randn(&[rows, cols], 0.02)?;
    let reference = swift_kernels::nf4::quantize(&host(&w)?, &[rows, cols], 64, false).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (packed, absmax) = cuda::nf4::quantize(&w.to_device(gpu)?, 64)?;
    let swift_kernels::nf4::Absmax::Plain(reference_absmax) = reference.absmax() else { unreachable!("no double quantization") };
    let mut ours: Vec<f32> = packed.iter().map(|&b| b as f32).collect();
    ours.extend(absmax);
    let mut expected: Vec<f32> = reference.packed().iter().map(|&b| b as f32).collect();
    expected.extend(reference_absmax);
    Ok((ours, expected))
}

fn nf4_dequant(gpu: &Device, double_quant: bool) -> anyhow::Result<Compared> {
    let weight = nf4_weight(double_quant)?;
    let on_gpu = cuda::nf4::Nf4Gpu::upload(&weight, gpu.as_cuda_device()?)?;
    Ok((host(&on_gpu.dequantize(DType::F32)?)?, weight.dequantize()))
}

fn nf4_matmul(gpu: &Device, dtype: DType, transposed: bool) -> anyhow::Result<Compared> {
    let weight = nf4_weight(true)?;
    let dense = Tensor::from_vec(weight.dequantize(), (N, K), &Device::Cpu)?;
    let rows = 77;
    let inner = if transposed { N } else { K };
    // The kernel multiplies by the exact f32 dequantized weight, in bf16 too.
    let x = randn(&[rows, inner], 1.0)?;
    let x = if dtype == DType::BF16 { bf16_rounded(&x)? } else { x };
    let reference = if transposed { x.matmul(&dense)? } else { x.matmul(&dense.t()?)? };
    let on_gpu = cuda::nf4::Nf4Gpu::upload(&weight, gpu.as_cuda_device()?)?;
    let xg = on(gpu, &x, dtype)?;
    let ours = if transposed { on_gpu.matmul_t(&xg)? } else { on_gpu.matmul(&xg)? };
    Ok((host(&ours)?, host(&reference)?))
}

/// An AWQ matrix shape: `(n, k, group)`.
type AwqShape = (usize, usize, usize);
/// A 7B attention projection's shape, group 128.
const SEVEN_B: AwqShape = (1024, 3584, 128);
/// Columns that fill no tile evenly, and a smaller group.
const EDGES: AwqShape = (1000, 896, 64);

/// An AWQ matrix of `shape` from random weights.
fn awq_matrix((n, k, group): AwqShape) -> anyhow::Result<swift_kernels::awq::AwqMatrix> {
    let w = host(&randn(&[n, k], 0.02)?)?;
    let groups = swift_kernels::awq::quantize(&w, n, k, group).map_err(|e| anyhow::anyhow!("{e}"))?;
    groups.pack().map_err(|e| anyhow::anyhow!("{e}"))
}

fn awq_dequant(gpu: &Device, shape: AwqShape) -> anyhow::Result<Compared> {
    let matrix = awq_matrix(shape)?;
    let on_gpu = cuda::awq::AwqGpu::upload(&matrix, gpu.as_cuda_device()?)?;
    Ok((host(&on_gpu.dequantize_t(DType::F32)?)?, matrix.dequantize_t()))
}

#[derive(Clone, Copy)]
enum AwqKernel {
    GemvF32,
    GemvBf16,
    Mma,
    /// Tensor cores on an input starting at an odd element of its storage.
    MmaOffset,
}

fn awq_product(gpu: &Device, shape: AwqShape, m: usize, kernel: AwqKernel) -> anyhow::Result<Compared> {
    let matrix = awq_matrix(shape)?;
    let x = randn(&[m, matrix.k()], 1.0)?;
    let x = if matches!(kernel, AwqKernel::GemvF32) { x } else { bf16_rounded(&x)? };
    let mut reference = vec![0f32; m * matrix.n()];
    matrix.matmul(&host(&x)?, m, &mut reference);
    let on_gpu = cuda::awq::AwqGpu::upload(&matrix, gpu.as_cuda_device()?)?;
    let ours = match kernel {
        AwqKernel::GemvF32 => on_gpu.gemv(&on(gpu, &x, DType::F32)?)?,
        AwqKernel::GemvBf16 => on_gpu.gemv(&on(gpu, &x, DType::BF16)?)?,
        AwqKernel::Mma => on_gpu.gemm_mma(&on(gpu, &x, DType::BF16)?)?,
        AwqKernel::MmaOffset => {
            let flat = Tensor::cat(&[&Tensor::zeros(1, DType::F32, &Device::Cpu)?, &x.flatten_all()?], 0)?;
            let shifted = on(gpu, &flat, DType::BF16)?.narrow(0, 1, x.elem_count())?.reshape(x.shape())?;
            on_gpu.gemm_mma(&shifted)?
        }
    };
    Ok((host(&ours)?, reference))
}

/// The fixtures the model checks load, from the repository root.
fn fixture(path: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = Path::new("tests/fixtures").join(path);
    anyhow::ensure!(dir.join("config.json").exists(), "{} is missing: run the GPU checks from the repository root", dir.display());
    Ok(dir)
}

/// Two packed sequences of fixture tokens.
fn packed_row(vocab: usize) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let tokens: Vec<u32> = (0..48u32).map(|i| (i * 37 + 5) % vocab as u32).collect();
    let (positions, segments) = packed_layout(&[30, 18]);
    (tokens, positions, segments)
}

fn model_forward(gpu: &Device, path: &str) -> anyhow::Result<Compared> {
    let folder = fixture(path)?;
    let logits = |device: &Device, dtype: DType| -> anyhow::Result<Vec<f32>> {
        let config = ModelConfig::load(&folder)?;
        let (tokens, positions, segments) = packed_row(config.vocab_size);
        let loader = loader_for(&config);
        let model = Decoder::load(&folder, config, dtype, device, loader.as_ref())?;
        host(&model.forward(&tokens, &positions, &segments, None, false)?)
    };
    Ok((logits(gpu, DType::BF16)?, logits(&Device::Cpu, DType::F32)?))
}

/// Gradients of every adapter tensor after one packed row's loss, with the
/// same (non-zero) adapter values on both devices.
fn adapter_gradients(gpu: &Device, base: BaseFormat) -> anyhow::Result<Compared> {
    let folder = fixture("models/qwen2-tiny")?;
    let config = ModelConfig::load(&folder)?;
    let (tokens, positions, segments) = packed_row(config.vocab_size);
    let predict_at: Vec<u32> = (0..tokens.len() as u32 - 1).filter(|&i| i != 29).collect();
    let targets: Vec<u32> = predict_at.iter().map(|&i| tokens[i as usize + 1]).collect();
    let adapter_values: std::cell::RefCell<Vec<Vec<f32>>> = Default::default();
    let gradients = |device: &Device, dtype: DType| -> anyhow::Result<Vec<f32>> {
        let select = |_: &str| true;
        let new = NewAdapter { rank: 8, scaling: 2.0, dora: false, dropout: 0.0, seed: 7 };
        let loader = AdaptedLoader::new(&[], base).with_new_adapters(&select, new);
        let decoder = Arc::new(Decoder::load(&folder, config.clone(), dtype, device, &loader)?);
        let vars: Vec<Var> = loader.take_adapters().iter().flat_map(|(_, p)| p.vars().into_iter().cloned()).collect();
        // B starts at zero, which would leave A without a gradient: give every
        // tensor the same random values on both devices.
        let mut stored = adapter_values.borrow_mut();
        if stored.is_empty() {
            *stored = vars.iter().map(|v| host(&randn(v.dims(), 0.05)?)).collect::<anyhow::Result<_>>()?;
        }
        for (var, v) in vars.iter().zip(stored.iter()) {
            var.set(&Tensor::from_slice(v, var.shape(), device)?)?;
        }
        let batch = swift_stages::llm::model::TrainBatch::new(&[(&tokens, &positions, &segments)])?;
        let hidden = decoder.train_hidden(&batch, None)?;
        let at = Tensor::new(predict_at.as_slice(), device)?;
        let logits = decoder.lm_head().forward(&hidden.index_select(&at, 0)?)?;
        let grads = ops::cross_entropy(&logits, &targets)?.sum_all()?.backward()?;
        let mut all = Vec::new();
        for var in &vars {
            all.extend(host(grads.get(var.as_tensor()).context("an adapter got no gradient")?)?);
        }
        Ok(all)
    };
    let reference = gradients(&Device::Cpu, DType::F32)?;
    Ok((gradients(gpu, DType::BF16)?, reference))
}
