//! The training loop: micro-batches of packed rows, each one forward and one
//! backward pass over a `[rows, len]` batch (rows padded to the longest, the
//! padding masked out), loss on labelled tokens only (token-weighted over the
//! whole optimizer step), gradient accumulation on the compute device in a
//! fixed order, global-norm clipping folded into one fused AdamW pass over
//! every adapter tensor, a warmup schedule, periodic validation,
//! checkpoints, and a JSONL log line per step.
//!
//! A step's rows are `batch_size × grad_accum` consecutive rows of the data
//! stream; each rank takes its share ([`swift_engine::world::World::shard`])
//! and runs them `micro_batch_size` at a time. Dropout masks are keyed by a
//! row's place in the stream, so a row sees the same mask whatever batch it
//! lands in.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Tensor, Var, D};
use serde_json::json;

use super::checkpoint::{self, Checkpoint};
use super::collective::Parallel;
use super::data::{Example, RowOrder};
use super::optim::{clip, split, AdamW, AdamWConfig, Schedule};
use swift_engine::kind::Cancelled;
use crate::llm::lora::{DropoutState, LoraParams, RowDropout, SplitMix64};
use crate::llm::model::{CheckpointGrads, TrainBatch};
use crate::llm::ops::{cross_entropy, linear_cross_entropy};
use crate::llm::Decoder;
use crate::preprocess::shards::Split;

/// The loop's settings, resolved from the manifest.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Peak learning rate.
    pub lr: f64,
    /// Decay after warmup.
    pub schedule: Schedule,
    /// Warmup steps.
    pub warmup: usize,
    /// Optimizer steps in all.
    pub total_steps: usize,
    /// Rows in the data stream (epochs × rows), or `None` with `max_steps`.
    pub stream_rows: Option<usize>,
    /// Rows per step and accumulation round, on all ranks together.
    pub batch_size: usize,
    /// Rows per forward/backward pass (at most `batch_size`).
    pub micro_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Clip the global gradient norm to this (0 = off).
    pub max_grad_norm: f64,
    /// AdamW.
    pub adamw: AdamWConfig,
    /// Validate every this many steps (0 = only at the end).
    pub eval_every: usize,
    /// Checkpoint every this many steps (0 = only when interrupted).
    pub save_every: usize,
    /// Seed of the data order and dropout.
    pub seed: u64,
    /// Recompute each decoder layer in backward.
    pub activation_checkpointing: bool,
}

/// What the loop calls back into (progress, Ctrl-C).
pub struct Hooks<'a> {
    /// Reports progress: step, total, message.
    pub progress: &'a dyn Fn(u64, u64, &str),
    /// Whether to stop (and checkpoint) now.
    pub cancelled: &'a dyn Fn() -> bool,
}

/// How a finished run went.
#[derive(Debug)]
pub struct Outcome {
    /// Every log line (step lines and validation lines).
    pub log: Vec<serde_json::Value>,
    /// Mean loss of the last step.
    pub final_train_loss: f64,
    /// Loss and token accuracy on the validation split at the end.
    pub final_val: Option<(f64, f64)>,
    /// Tokens processed (this attempt and any resumed from).
    pub tokens: u64,
    /// Step the run resumed from, if it did.
    pub resumed_from: Option<usize>,
}

/// Where a run stands: the optimizer, the adapters' values (flat), the log
/// so far, and the step to start from.
struct RunState {
    optimizer: AdamW,
    /// Flat, on the compute device.
    params: Tensor,
    log: Vec<serde_json::Value>,
    first_step: usize,
    resumed_from: Option<usize>,
}

/// The model, its trainable adapters and the optimizer.
pub struct Trainer {
    decoder: Arc<Decoder>,
    vars: Vec<Var>,
    names: Vec<String>,
    dropout: Arc<DropoutState>,
    checkpoint_grads: Option<Arc<CheckpointGrads>>,
    settings: Settings,
}

impl Trainer {
    /// A trainer over `decoder`'s new adapters.
    pub fn new(decoder: Arc<Decoder>, adapters: &[(String, Arc<LoraParams>)], dropout: Arc<DropoutState>, settings: Settings)
        -> Self {
        let mut vars = Vec::new();
        let mut names = Vec::new();
        for (path, params) in adapters {
            for (suffix, var) in ["lora_A", "lora_B", "lora_magnitude_vector"].iter().zip(params.vars()) {
                vars.push(var.clone());
                names.push(format!("{path}.{suffix}"));
            }
        }
        let checkpoint_grads = settings
            .activation_checkpointing
            .then(|| Arc::new(CheckpointGrads::new(&vars.iter().collect::<Vec<_>>())));
        Self { decoder, vars, names, dropout, checkpoint_grads, settings }
    }

    /// Trainable parameter count.
    pub fn trainable_parameters(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }

    /// Runs (or resumes) training to the last step. With several ranks, each
    /// computes its shard of every step's rows ([`swift_engine::world::World::shard`]),
    /// the summed gradients are shared before the update, and only rank 0
    /// validates and writes checkpoints (every rank resumes from them).
    pub fn run(&self, train: &Split, val: Option<&Split>, scratch: &Path, hooks: &Hooks<'_>, parallel: &mut Parallel) -> anyhow::Result<Outcome> {
        let s = &self.settings;
        let leader = parallel.world.is_leader();
        let val = val.filter(|_| leader);
        let sizes: Vec<usize> = self.vars.iter().map(|v| v.elem_count()).collect();
        let mut state = self.resume(scratch, &sizes)?;
        if let (Some(val), 0) = (val, state.first_step) {
            let Some((val_loss, accuracy)) = self.validate(val, hooks)? else {
                return Err(Cancelled.into());
            };
            state.log.push(json!({"step": 0, "val_loss": val_loss, "val_accuracy": accuracy}));
        }
        let mut order = RowOrder::new(train.rows(), s.seed);
        let rows_per_step = s.batch_size * s.grad_accum;
        let mut tokens: u64 = state.log.iter().filter_map(|l| l.get("tokens").and_then(|t| t.as_u64())).sum();
        let mut last_saved = state.resumed_from;
        for step in state.first_step..s.total_steps {
            let step_started = Instant::now();
            let first_row = step * rows_per_step;
            let last_row = s.stream_rows.map_or(first_row + rows_per_step, |n| n.min(first_row + rows_per_step));
            let examples: Vec<Example> =
                (first_row..last_row).map(|k| Example::from_row(&train.row(order.row_at(k)))).collect();
            let labelled: usize = examples.iter().map(|e| e.targets.len()).sum();
            let step_tokens: usize = examples.iter().map(|e| e.ids.len()).sum();
            let mine: Vec<usize> = parallel.world.shard(examples.len()).collect();
            let Some((mut loss_sum, mut grads)) = self.step_gradients(&examples, &mine, first_row, labelled, hooks)? else {
                // Mid-step: nothing of this step is applied yet.
                if leader {
                    self.save(scratch, step, &state.optimizer, &state.log)?;
                }
                return Err(Cancelled.into());
            };
            if parallel.world.size > 1 {
                let mut flat = grads.to_vec1::<f32>()?;
                flat.push(loss_sum as f32);
                if let Err(error) = parallel.collective.all_reduce_sum(step as u64, &mut flat) {
                    // A rank that stopped for Ctrl-C or scancel breaks the exchange:
                    // stop cleanly too, nothing of this step applied yet.
                    if (hooks.cancelled)() {
                        if leader {
                            self.save(scratch, step, &state.optimizer, &state.log)?;
                        }
                        return Err(Cancelled.into());
                    }
                    return Err(error.context(format!("sharing the gradients of step {}", step + 1)));
                }
                loss_sum = flat.pop().expect("the loss follows the gradients") as f64;
                grads = Tensor::from_vec(flat, grads.shape(), grads.device())?;
            }
            let loss = if labelled > 0 { loss_sum / labelled as f64 } else { 0.0 };
            let (grad_norm, clip_factor) = clip(&grads, s.max_grad_norm)?;
            let lr = s.lr * s.schedule.factor(step, s.total_steps, s.warmup);
            if !loss.is_finite() || !grad_norm.is_finite() {
                let kept = match last_saved {
                    Some(saved) => format!("the last good checkpoint (step {saved}) is kept in the cache"),
                    None => "no checkpoint was saved before it".to_string(),
                };
                bail!(
                    "training diverged at step {}: the loss is {loss} and the gradient norm {grad_norm} (learning rate {lr:.3e}). \
                     Stopped without applying this step; {kept}. Lower `lr`, add warmup (`warmup_steps`) or clip \
                     harder (`max_grad_norm`): changed settings train from the start.",
                    step + 1
                );
            }
            if labelled > 0 {
                state.params = state.optimizer.update(&state.params, &grads, lr, clip_factor)?;
                self.write_params(&state.params, &sizes)?;
            }
            tokens += step_tokens as u64;
            let seconds = step_started.elapsed().as_secs_f64();
            let tokens_per_s = step_tokens as f64 / seconds.max(1e-9);
            state.log.push(json!({
                "step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "tokens": step_tokens, "label_tokens": labelled, "tokens_per_s": tokens_per_s,
            }));
            let done = step + 1;
            (hooks.progress)(done as u64, s.total_steps as u64,
                &format!("loss {loss:.4} · lr {lr:.2e} · |g| {grad_norm:.3} · {tokens_per_s:.0} tok/s"));
            let last = done == s.total_steps;
            if let Some(val) = val {
                if last || (s.eval_every > 0 && done % s.eval_every == 0) {
                    let Some((val_loss, accuracy)) = self.validate(val, hooks)? else {
                        self.save(scratch, done, &state.optimizer, &state.log)?;
                        return Err(Cancelled.into());
                    };
                    state.log.push(json!({"step": done, "val_loss": val_loss, "val_accuracy": accuracy}));
                }
            }
            if leader && !last && s.save_every > 0 && done % s.save_every == 0 {
                self.save(scratch, done, &state.optimizer, &state.log)?;
                last_saved = Some(done);
            }
        }
        let log = state.log;
        let final_val = log
            .iter()
            .rev()
            .find_map(|l| Some((l.get("val_loss")?.as_f64()?, l.get("val_accuracy")?.as_f64()?)));
        let final_train_loss = log.iter().rev().find_map(|l| l.get("loss")?.as_f64()).unwrap_or(f64::NAN);
        Ok(Outcome { log, final_train_loss, final_val, tokens, resumed_from: state.resumed_from })
    }

    /// The optimizer, parameters and log to start from: fresh, or the latest
    /// checkpoint in `scratch` (whose tensors are loaded into the adapters).
    fn resume(&self, scratch: &Path, sizes: &[usize]) -> anyhow::Result<RunState> {
        let device = self.decoder.device();
        let mut optimizer = AdamW::new(self.settings.adamw, sizes, device)?;
        let resumed = checkpoint::load_latest(scratch).with_context(|| {
            format!("resuming from the checkpoint in {}: remove that folder to train from the start", scratch.display())
        })?;
        let Some(c) = resumed else {
            let params = self.read_params()?;
            return Ok(RunState { optimizer, params, log: Vec::new(), first_step: 0, resumed_from: None });
        };
        if c.names != self.names
            || c.params.iter().map(Vec::len).ne(sizes.iter().copied())
            || !optimizer.restore(c.optimizer_step, &c.m, &c.v, device)?
        {
            bail!("the checkpoint in {} does not fit this model's adapters", scratch.display());
        }
        let flat = c.params.concat();
        let total = flat.len();
        let params = Tensor::from_vec(flat, total, device)?;
        self.write_params(&params, sizes)?;
        Ok(RunState { optimizer, params, log: c.log, first_step: c.step, resumed_from: Some(c.step) })
    }

    /// Every adapter tensor's values, flat f32, in the trainer's order, on the device.
    fn read_params(&self) -> anyhow::Result<Tensor> {
        let flat: Vec<Tensor> = self.vars.iter().map(|v| v.flatten_all()).collect::<candle_core::Result<_>>()?;
        Ok(Tensor::cat(&flat, 0)?.to_dtype(DType::F32)?)
    }

    /// Sets the adapter tensors from a flat tensor in the trainer's order
    /// (device-side copies of its slices).
    fn write_params(&self, params: &Tensor, sizes: &[usize]) -> anyhow::Result<()> {
        let mut offset = 0;
        for (var, &n) in self.vars.iter().zip(sizes) {
            var.set(&params.narrow(0, offset, n)?.reshape(var.shape())?)?;
            offset += n;
        }
        Ok(())
    }

    /// The summed loss and the summed gradients (flat, in the trainer's
    /// order, on the device) of this rank's rows `mine` of one step, each
    /// gradient already divided by the step's `labelled` tokens; `None` if
    /// cancelled. Rows run `micro_batch_size` at a time; gradients
    /// accumulate on the device.
    fn step_gradients(&self, examples: &[Example], mine: &[usize], first_row: usize, labelled: usize, hooks: &Hooks<'_>)
        -> anyhow::Result<Option<(f64, Tensor)>> {
        let s = &self.settings;
        let mut sums: Vec<Option<Tensor>> = vec![None; self.vars.len()];
        let mut loss_sum = 0.0;
        let rows: Vec<usize> = mine.iter().copied().filter(|&k| !examples[k].targets.is_empty()).collect();
        for micro in rows.chunks(s.micro_batch_size.max(1)) {
            if (hooks.cancelled)() {
                self.dropout.eval();
                return Ok(None);
            }
            let batch: Vec<&Example> = micro.iter().map(|&k| &examples[k]).collect();
            self.dropout.train(
                micro
                    .iter()
                    .map(|&k| RowDropout {
                        seed: SplitMix64::keyed(s.seed, "dropout", (first_row + k) as u64).next_u64(),
                        len: examples[k].ids.len(),
                    })
                    .collect(),
            );
            let (batch_loss, _) = self.batch_loss(&batch, true)?;
            loss_sum += batch_loss.to_scalar::<f32>()? as f64;
            let store = (batch_loss / labelled as f64)?.backward()?;
            let side = self.checkpoint_grads.as_ref().map(|c| c.take()).unwrap_or_default();
            for (sum, var) in sums.iter_mut().zip(&self.vars) {
                for grad in [store.get(var.as_tensor()), side.get(&var.as_tensor().id())].into_iter().flatten() {
                    *sum = Some(match sum.take() {
                        Some(total) => (total + grad)?,
                        None => grad.clone(),
                    });
                }
            }
        }
        self.dropout.eval();
        let flat: Vec<Tensor> = sums
            .into_iter()
            .zip(&self.vars)
            .map(|(sum, var)| match sum {
                Some(g) => g.flatten_all(),
                None => Tensor::zeros(var.elem_count(), DType::F32, var.device()),
            })
            .collect::<candle_core::Result<_>>()?;
        if flat.is_empty() {
            return Ok(Some((loss_sum, Tensor::zeros(0, DType::F32, self.decoder.device())?)));
        }
        Ok(Some((loss_sum, Tensor::cat(&flat, 0)?.to_dtype(DType::F32)?)))
    }

    /// The summed cross-entropy of a micro-batch's labelled tokens and (when
    /// not training) how many of them the model's argmax gets right.
    fn batch_loss(&self, examples: &[&Example], train: bool) -> anyhow::Result<(Tensor, usize)> {
        let device = self.decoder.device();
        let checkpoint = if train { self.checkpoint_grads.as_ref() } else { None };
        let rows: Vec<(&[u32], &[u32], &[u32])> =
            examples.iter().map(|e| (e.ids.as_slice(), e.positions.as_slice(), e.segments.as_slice())).collect();
        let batch = TrainBatch::new(&rows)?;
        let hidden = self.decoder.train_hidden(&batch, checkpoint)?;
        let len = batch.row_len() as u32;
        let at: Vec<u32> =
            examples.iter().enumerate().flat_map(|(r, e)| e.predict_at.iter().map(move |&i| r as u32 * len + i)).collect();
        let targets: Vec<u32> = examples.iter().flat_map(|e| e.targets.iter().copied()).collect();
        let scored = hidden.index_select(&Tensor::new(at.as_slice(), device)?, 0)?;
        if let (true, Some(weight)) = (train, self.decoder.lm_head().plain_weight()) {
            // The [tokens, vocab] logits are never materialized: blocks of
            // rows go through lm_head, the loss and its gradient at once.
            return Ok((linear_cross_entropy(&scored, weight, &targets)?.sum_all()?, 0));
        }
        let logits = self.decoder.lm_head().forward(&scored)?.to_dtype(DType::F32)?;
        let loss = cross_entropy(&logits, &targets)?.sum_all()?;
        let correct = if train {
            0
        } else {
            let predicted = logits.detach().argmax(D::Minus1)?.to_vec1::<u32>()?;
            predicted.iter().zip(&targets).filter(|(p, t)| p == t).count()
        };
        Ok((loss, correct))
    }

    /// Mean loss and token accuracy over the validation split (no dropout, no
    /// autograd graph); `None` if interrupted.
    pub fn validate(&self, val: &Split, hooks: &Hooks<'_>) -> anyhow::Result<Option<(f64, f64)>> {
        self.dropout.eval();
        self.dropout.set_no_grad(true);
        let result = self.validate_rows(val, hooks);
        self.dropout.set_no_grad(false);
        result
    }

    fn validate_rows(&self, val: &Split, hooks: &Hooks<'_>) -> anyhow::Result<Option<(f64, f64)>> {
        let (mut loss, mut correct, mut count) = (0.0, 0usize, 0usize);
        let examples: Vec<Example> =
            (0..val.rows()).map(|r| Example::from_row(&val.row(r))).filter(|e| !e.targets.is_empty()).collect();
        for micro in examples.chunks(self.settings.micro_batch_size.max(1)) {
            if (hooks.cancelled)() {
                return Ok(None);
            }
            let batch: Vec<&Example> = micro.iter().collect();
            let (batch_loss, batch_correct) = self.batch_loss(&batch, false)?;
            loss += batch_loss.to_scalar::<f32>()? as f64;
            correct += batch_correct;
            count += micro.iter().map(|e| e.targets.len()).sum::<usize>();
        }
        if count == 0 {
            return Ok(Some((f64::NAN, f64::NAN)));
        }
        Ok(Some((loss / count as f64, correct as f64 / count as f64)))
    }

    fn save(&self, scratch: &Path, step: usize, optimizer: &AdamW, log: &[serde_json::Value]) -> anyhow::Result<()> {
        let sizes: Vec<usize> = self.vars.iter().map(|v| v.elem_count()).collect();
        let params = split(&self.read_params()?.to_vec1::<f32>()?, &sizes);
        let (m, v) = optimizer.moments()?;
        checkpoint::save(scratch, &Checkpoint {
            step,
            params,
            optimizer_step: optimizer.step,
            m,
            v,
            log: log.to_vec(),
            names: self.names.clone(),
        })
        .context("saving a training checkpoint")
    }
}
