//! The training loop: micro-batches of packed rows, loss on labelled tokens
//! only (token-weighted over the whole optimizer step), gradient accumulation
//! in a fixed order, global-norm clipping, AdamW with a warmup schedule,
//! periodic validation, checkpoints, and a JSONL log line per step.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Tensor, Var, D};
use serde_json::json;

use super::checkpoint::{self, Checkpoint};
use super::collective::Parallel;
use super::data::{Example, RowOrder};
use super::optim::{clip, AdamW, AdamWConfig, Schedule};
use swift_engine::kind::Cancelled;
use crate::llm::lora::{DropoutState, LoraParams, SplitMix64};
use crate::llm::model::CheckpointGrads;
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
    /// Rows per micro-batch.
    pub batch_size: usize,
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
        let mut optimizer = AdamW::new(s.adamw, &sizes);
        let mut log: Vec<serde_json::Value> = Vec::new();
        let mut first_step = 0;
        let resumed = checkpoint::load_latest(scratch).with_context(|| {
            format!("resuming from the checkpoint in {}: remove that folder to train from the start", scratch.display())
        })?;
        let resumed_from = resumed.as_ref().map(|c| c.step);
        if let Some(c) = resumed {
            if c.names != self.names || c.params.iter().map(Vec::len).ne(sizes.iter().copied()) {
                bail!("the checkpoint in {} does not fit this model's adapters", scratch.display());
            }
            for (var, values) in self.vars.iter().zip(&c.params) {
                var.set(&Tensor::from_slice(values, var.shape(), var.device())?)?;
            }
            optimizer.step = c.optimizer_step;
            optimizer.m = c.m;
            optimizer.v = c.v;
            log = c.log;
            first_step = c.step;
        }
        if let (Some(val), 0) = (val, first_step) {
            let Some((val_loss, accuracy)) = self.validate(val, hooks)? else {
                return Err(Cancelled.into());
            };
            log.push(json!({"step": 0, "val_loss": val_loss, "val_accuracy": accuracy}));
        }
        let mut order = RowOrder::new(train.rows(), s.seed);
        let rows_per_step = s.batch_size * s.grad_accum;
        let mut tokens: u64 = log.iter().filter_map(|l| l.get("tokens").and_then(|t| t.as_u64())).sum();
        let mut last_saved = resumed_from;
        for step in first_step..s.total_steps {
            let step_started = Instant::now();
            let first_row = step * rows_per_step;
            let last_row = s.stream_rows.map_or(first_row + rows_per_step, |n| n.min(first_row + rows_per_step));
            let examples: Vec<Example> =
                (first_row..last_row).map(|k| Example::from_row(&train.row(order.row_at(k)))).collect();
            let labelled: usize = examples.iter().map(|e| e.targets.len()).sum();
            let step_tokens: usize = examples.iter().map(|e| e.ids.len()).sum();
            let mut grads: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
            let mut loss_sum = 0.0;
            for micro in parallel.world.shard(examples.len()) {
                let example = &examples[micro];
                if (hooks.cancelled)() {
                    // Before any row, or mid-step: nothing of this step is applied yet.
                    self.dropout.eval();
                    if leader {
                        self.save(scratch, step, &optimizer, &log)?;
                    }
                    return Err(Cancelled.into());
                }
                if example.targets.is_empty() {
                    continue;
                }
                self.dropout.train(SplitMix64::keyed(s.seed, "dropout", (step * rows_per_step + micro) as u64).next_u64());
                let (row_loss, _) = self.row_loss(example, true)?;
                loss_sum += row_loss.to_scalar::<f32>()? as f64;
                let store = (row_loss / labelled as f64)?.backward()?;
                let side = self.checkpoint_grads.as_ref().map(|c| c.take()).unwrap_or_default();
                for (i, var) in self.vars.iter().enumerate() {
                    for grad in [store.get(var.as_tensor()), side.get(&var.as_tensor().id())].into_iter().flatten() {
                        let grad = grad.flatten_all()?.to_vec1::<f32>()?;
                        grads[i].iter_mut().zip(&grad).for_each(|(g, d)| *g += d);
                    }
                }
            }
            self.dropout.eval();
            if parallel.world.size > 1 {
                let mut flat: Vec<f32> = grads.iter().flatten().copied().chain([loss_sum as f32]).collect();
                if let Err(error) = parallel.collective.all_reduce_sum(step as u64, &mut flat) {
                    // A rank that stopped for Ctrl-C or scancel breaks the exchange:
                    // stop cleanly too, nothing of this step applied yet.
                    if (hooks.cancelled)() {
                        if leader {
                            self.save(scratch, step, &optimizer, &log)?;
                        }
                        return Err(Cancelled.into());
                    }
                    return Err(error.context(format!("sharing the gradients of step {}", step + 1)));
                }
                let mut values = flat.iter();
                for grad in &mut grads {
                    grad.iter_mut().for_each(|g| *g = *values.next().expect("as many values as sent"));
                }
                loss_sum = *values.next().expect("the loss follows the gradients") as f64;
            }
            let loss = if labelled > 0 { loss_sum / labelled as f64 } else { 0.0 };
            let grad_norm = clip(&mut grads, s.max_grad_norm);
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
                let mut params: Vec<Vec<f32>> =
                    self.vars.iter().map(|v| v.flatten_all()?.to_vec1::<f32>()).collect::<candle_core::Result<_>>()?;
                optimizer.update(&mut params, &grads, lr);
                for (var, values) in self.vars.iter().zip(params) {
                    var.set(&Tensor::from_vec(values, var.shape(), var.device())?)?;
                }
            }
            tokens += step_tokens as u64;
            let seconds = step_started.elapsed().as_secs_f64();
            let tokens_per_s = step_tokens as f64 / seconds.max(1e-9);
            log.push(json!({
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
                        self.save(scratch, done, &optimizer, &log)?;
                        return Err(Cancelled.into());
                    };
                    log.push(json!({"step": done, "val_loss": val_loss, "val_accuracy": accuracy}));
                }
            }
            if leader && !last && s.save_every > 0 && done % s.save_every == 0 {
                self.save(scratch, done, &optimizer, &log)?;
                last_saved = Some(done);
            }
        }
        let final_val = log
            .iter()
            .rev()
            .find_map(|l| Some((l.get("val_loss")?.as_f64()?, l.get("val_accuracy")?.as_f64()?)));
        let final_train_loss = log.iter().rev().find_map(|l| l.get("loss")?.as_f64()).unwrap_or(f64::NAN);
        Ok(Outcome { log, final_train_loss, final_val, tokens, resumed_from })
    }

    /// The summed cross-entropy of one row's labelled tokens and (when not
    /// training) how many of them the model's argmax gets right.
    fn row_loss(&self, example: &Example, train: bool) -> anyhow::Result<(Tensor, usize)> {
        let device = self.decoder.device();
        let checkpoint = if train { self.checkpoint_grads.as_ref() } else { None };
        let hidden = self.decoder.train_hidden(&example.ids, &example.positions, &example.segments, checkpoint)?;
        let at = Tensor::new(example.predict_at.as_slice(), device)?;
        let scored = hidden.index_select(&at, 0)?;
        if let (true, true, Some(weight)) = (train, device.is_cuda(), self.decoder.lm_head().plain_weight()) {
            // On a GPU the [tokens, vocab] logits are never materialized.
            return Ok((linear_cross_entropy(&scored, weight, &example.targets)?.sum_all()?, 0));
        }
        let logits = self.decoder.lm_head().forward(&scored)?.to_dtype(DType::F32)?;
        let loss = cross_entropy(&logits, &example.targets)?.sum_all()?;
        let correct = if train {
            0
        } else {
            let predicted = logits.detach().argmax(D::Minus1)?.to_vec1::<u32>()?;
            predicted.iter().zip(&example.targets).filter(|(p, t)| p == t).count()
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
        for r in 0..val.rows() {
            if (hooks.cancelled)() {
                return Ok(None);
            }
            let example = Example::from_row(&val.row(r));
            if example.targets.is_empty() {
                continue;
            }
            let (row_loss, row_correct) = self.row_loss(&example, false)?;
            loss += row_loss.to_scalar::<f32>()? as f64;
            correct += row_correct;
            count += example.targets.len();
        }
        if count == 0 {
            return Ok(Some((f64::NAN, f64::NAN)));
        }
        Ok(Some((loss / count as f64, correct as f64 / count as f64)))
    }

    fn save(&self, scratch: &Path, step: usize, optimizer: &AdamW, log: &[serde_json::Value]) -> anyhow::Result<()> {
        let params =
            self.vars.iter().map(|v| v.flatten_all()?.to_vec1::<f32>()).collect::<candle_core::Result<Vec<_>>>()?;
        checkpoint::save(scratch, &Checkpoint {
            step,
            params,
            optimizer_step: optimizer.step,
            m: optimizer.m.clone(),
            v: optimizer.v.clone(),
            log: log.to_vec(),
            names: self.names.clone(),
        })
        .context("saving a training checkpoint")
    }
}
