//! `swift bench gpu` (the `cuda` build): the GPU figures of
//! docs/PERFORMANCE.md, on models of real shapes (Qwen2.5-0.5B and -7B) with
//! random weights made up on the card — no checkpoint to download or write.
//! `scripts/gpu/peers.py` measures PyTorch, transformers and PEFT on the same
//! shapes and settings in the same run (`scripts/gpu-check.sh` runs both).
//!
//! Parts (`--only`):
//! - `kernels`: achieved bandwidth of swift's row kernels, of candle's
//!   composed equivalents, and of a device-to-device copy;
//! - `awq`: a 7B decoder layer's seven linears at decode batch sizes, swift's
//!   W4A16 kernels against bf16 cuBLAS, weights rotated through more memory
//!   than the L2 cache holds;
//! - `finetune`: LoRA r64 on all linear layers (and QLoRA on 7B) through
//!   swift's trainer: tokens/s and the process's peak GPU memory;
//! - `eval`: 5-shot MMLU-length scoring through the eval stage's scorer.

use std::path::PathBuf;

use super::Exit;

/// Arguments of `swift bench gpu`.
#[derive(Debug, clap::Args)]
pub struct GpuArgs {
    /// The GPU.
    #[arg(long, default_value = "cuda:0")]
    device: String,
    /// Run one part: kernels, awq, finetune or eval.
    #[arg(long, value_name = "PART")]
    only: Option<String>,
    /// Append a JSON line per measurement to `DIR/bench.jsonl`.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Optimizer steps per fine-tune measurement (the first is not timed).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(2..))]
    steps: u32,
}

pub fn exec(args: GpuArgs) -> anyhow::Result<Exit> {
    #[cfg(feature = "cuda")]
    return measure::exec(args);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = args;
        anyhow::bail!("this build of swift has no CUDA: build it with `cargo build --release --features cuda` (see docs/gpu.md)")
    }
}

/// The measurements (the `cuda` build).
#[cfg(feature = "cuda")]
mod measure {
    use super::{Exit, GpuArgs};
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    use anyhow::Context;
    use candle_core::{DType, Device, Tensor};
    use swift_kernels::cuda;
    use swift_stages::eval::score::{score, Encoded, ScoreOptions};
    use swift_stages::finetune::collective::Parallel;
    use swift_stages::finetune::optim::{AdamWConfig, Schedule};
    use swift_stages::finetune::train::{Hooks, Settings, Trainer};
    use swift_stages::llm::adapted::{AdaptedLoader, BaseFormat, NewAdapter};
    use swift_stages::llm::linear::DenseLoader;
    use swift_stages::llm::weights::Weights;
    use swift_stages::llm::{Decoder, ModelConfig};
    use swift_stages::preprocess::shards::{write_split, Split};


    /// A model shape of the benchmarks.
    struct Shape {
        name: &'static str,
        config: &'static str,
    }

    const QWEN_05B: Shape = Shape {
        name: "qwen2.5-0.5b",
        config: r#"{"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
            "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": true,
            "use_sliding_window": false, "hidden_act": "silu"}"#,
    };

    const QWEN_7B: Shape = Shape {
        name: "qwen2.5-7b",
        config: r#"{"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": false,
            "use_sliding_window": false, "hidden_act": "silu"}"#,
    };

    impl Shape {
        fn config(&self) -> anyhow::Result<ModelConfig> {
            Ok(ModelConfig::parse(Path::new(self.name), self.config)?)
        }
    }

    pub(super) fn exec(args: GpuArgs) -> anyhow::Result<Exit> {
        let gpu = super::super::selftest_gpu::open_gpu(&args.device)?;
        if let Some(dir) = &args.out {
            std::fs::create_dir_all(dir)?;
        }
        let out = Recorder { dir: args.out.clone() };
        let wanted = |part: &str| args.only.as_deref().is_none_or(|o| o == part);
        if let Some(only) = &args.only {
            anyhow::ensure!(["kernels", "awq", "finetune", "eval"].contains(&only.as_str()), "--only {only}: kernels, awq, finetune or eval");
        }
        if wanted("kernels") {
            kernels(&gpu, &out)?;
        }
        if wanted("awq") {
            awq(&gpu, &out)?;
        }
        if wanted("finetune") {
            for (shape, batch, base) in [
                (&QWEN_05B, 8, BaseFormat::Dense),
                (&QWEN_7B, 4, BaseFormat::Dense),
                (&QWEN_7B, 4, BaseFormat::Nf4 { blocksize: 64, double_quant: true }),
            ] {
                let measured = finetune(&gpu, shape, batch, base, args.steps);
                out.result("finetune", measured.map(|m| m.json(shape, batch, base)))?;
            }
        }
        if wanted("eval") {
            for shape in [&QWEN_05B, &QWEN_7B] {
                out.result("eval", eval(&gpu, shape))?;
            }
        }
        Ok(Exit::Success)
    }

    /// Prints each measurement and appends it to `bench.jsonl`.
    struct Recorder {
        dir: Option<PathBuf>,
    }

    impl Recorder {
        /// Records a measurement, or the error that stopped it (the other parts still run).
        fn result(&self, part: &str, value: anyhow::Result<serde_json::Value>) -> anyhow::Result<()> {
            let mut line = match value {
                Ok(value) => value,
                Err(e) => serde_json::json!({"error": format!("{e:#}")}),
            };
            line["part"] = part.into();
            outln!("{line}");
            if let Some(dir) = &self.dir {
                let mut f = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("bench.jsonl"))?;
                writeln!(f, "{line}")?;
            }
            Ok(())
        }
    }

    /// Seconds per call of `f`, after a warm-up call, over `reps` calls.
    fn time_per_call<T>(gpu: &Device, reps: usize, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<f64> {
        drop(f()?);
        gpu.synchronize()?;
        let started = Instant::now();
        for _ in 0..reps {
            drop(f()?);
        }
        gpu.synchronize()?;
        Ok(started.elapsed().as_secs_f64() / reps as f64)
    }

    fn kernels(gpu: &Device, out: &Recorder) -> anyhow::Result<()> {
        let bf16 = |shape: &[usize]| -> anyhow::Result<Tensor> { Ok(Tensor::randn(0f32, 1.0, shape, gpu)?.to_dtype(DType::BF16)?) };
        let reps = 20;
        let bandwidth = |bytes: usize, seconds: f64| bytes as f64 / seconds / 1e12;
        let copy_src = bf16(&[1 << 28])?;
        let copy = time_per_call(gpu, reps, || Ok(copy_src.copy()?))?;
        let copy_tbs = bandwidth(2 * 2 * copy_src.elem_count(), copy);
        out.result("kernels", Ok(serde_json::json!({"kernel": "device copy (candle)", "tb_per_s": copy_tbs})))?;
        drop(copy_src);
        let report = |kernel: &str, bytes: usize, seconds: anyhow::Result<f64>| -> anyhow::Result<()> {
            out.result("kernels", seconds.map(|s| {
                let tbs = bandwidth(bytes, s);
                serde_json::json!({"kernel": kernel, "tb_per_s": tbs, "of_copy": tbs / copy_tbs})
            }))
        };
        let (rows, hidden) = (8192, 3584);
        let x = bf16(&[rows, hidden])?;
        let w = bf16(&[hidden])?;
        let io = 2 * 2 * rows * hidden;
        report("rms_norm bf16 8192×3584 (swift)", io, time_per_call(gpu, reps, || Ok(cuda::rows::rms_norm(&x, &w, 1e-6)?)))?;
        report("rms_norm bf16 8192×3584 (candle_nn)", io, time_per_call(gpu, reps, || Ok(candle_nn::ops::rms_norm(&x, &w, 1e-6)?)))?;
        let (gate, up) = (bf16(&[rows, 18944])?, bf16(&[rows, 18944])?);
        let io = 3 * 2 * gate.elem_count();
        report("silu·up bf16 8192×18944 (swift)", io, time_per_call(gpu, reps, || Ok(cuda::rows::silu_mul(&gate, &up)?)))?;
        report("silu·up bf16 8192×18944 (candle)", io, time_per_call(gpu, reps, || Ok((gate.silu()? * &up)?)))?;
        drop((gate, up));
        let logits = bf16(&[4096, 151_936])?;
        let targets = Tensor::new((0..4096u32).map(|i| i * 37 % 151_936).collect::<Vec<_>>().as_slice(), gpu)?;
        let io = 2 * logits.elem_count();
        report("cross-entropy bf16 4096×151936 (swift, loss)", io, time_per_call(gpu, reps, || Ok(cuda::loss::cross_entropy(&logits, &targets)?)))?;
        report("cross-entropy bf16 4096×151936 (candle_nn log_softmax)", io, time_per_call(gpu, reps, || {
            Ok(candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?)
        }))?;
        // The fused kernel overwrites its input: time it on a fresh copy, less the copy.
        let logits_copy = time_per_call(gpu, reps, || Ok(logits.copy()?))?;
        let fused = time_per_call(gpu, reps, || Ok(cuda::loss::cross_entropy_fused(logits.copy()?, &targets, 1.0)?));
        report("cross-entropy bf16 4096×151936 (swift, fused loss + gradient in place)", 2 * io, fused.map(|s| s - logits_copy))?;
        Ok(())
    }

    /// A 7B decoder layer's linears: (name, in, out).
    const LAYER_7B: [(&str, usize, usize); 7] = [
        ("q_proj", 3584, 3584),
        ("k_proj", 3584, 512),
        ("v_proj", 3584, 512),
        ("o_proj", 3584, 3584),
        ("gate_proj", 3584, 18944),
        ("up_proj", 3584, 18944),
        ("down_proj", 18944, 3584),
    ];

    fn awq(gpu: &Device, out: &Recorder) -> anyhow::Result<()> {
        let device = gpu.as_cuda_device()?;
        // Four copies of the layer: 4 × 0.23 GB of int4, 4 × 0.47 GB of bf16,
        // far beyond the 50 MB L2, visited in turn.
        let copies = 4;
        let mut int4 = Vec::new();
        let mut dense = Vec::new();
        for _ in 0..copies {
            let mut layer_int4 = Vec::new();
            let mut layer_dense = Vec::new();
            for &(_, k, n) in &LAYER_7B {
                let w = Tensor::randn(0f32, 0.02, (n, k), &Device::Cpu)?;
                let values = w.flatten_all()?.to_vec1::<f32>()?;
                let packed = swift_kernels::awq::quantize(&values, n, k, 128).and_then(|q| q.pack()).map_err(|e| anyhow::anyhow!("{e}"))?;
                layer_int4.push(cuda::awq::AwqGpu::upload(&packed, device)?);
                layer_dense.push(w.to_device(gpu)?.to_dtype(DType::BF16)?.t()?.contiguous()?);
            }
            int4.push(layer_int4);
            dense.push(layer_dense);
        }
        for m in [1usize, 4, 8, 16] {
            let inputs: Vec<Tensor> = LAYER_7B
                .iter()
                .map(|&(_, k, _)| Ok(Tensor::randn(0f32, 1.0, (m, k), gpu)?.to_dtype(DType::BF16)?))
                .collect::<anyhow::Result<_>>()?;
            let reps = 50;
            let mut turn = 0;
            let cublas = time_per_call(gpu, reps, || {
                turn = (turn + 1) % copies;
                for (x, w) in inputs.iter().zip(&dense[turn]) {
                    drop(x.matmul(w)?);
                }
                Ok(())
            })?;
            let measure = |kernel: &str, f: &dyn Fn(&cuda::awq::AwqGpu, &Tensor) -> candle_core::Result<Tensor>| -> anyhow::Result<()> {
                let mut turn = 0;
                let seconds = time_per_call(gpu, reps, || {
                    turn = (turn + 1) % copies;
                    for (x, w) in inputs.iter().zip(&int4[turn]) {
                        drop(f(w, x)?);
                    }
                    Ok(())
                });
                out.result("awq", seconds.map(|s| serde_json::json!({
                    "kernel": kernel, "batch": m, "layer_us": s * 1e6, "cublas_bf16_layer_us": cublas * 1e6, "speedup": cublas / s,
                })))
            };
            measure("awq_gemv_bf16 (CUDA cores)", &|w, x| w.gemv(x))?;
            measure("awq_gemm_mma_bf16 (tensor cores)", &|w, x| w.gemm_mma(x))?;
        }
        Ok(())
    }

    /// What a fine-tune measurement found.
    struct Finetuned {
        tokens_per_s: f64,
        peak_bytes: usize,
        trainable: usize,
    }

    impl Finetuned {
        fn json(&self, shape: &Shape, batch: usize, base: BaseFormat) -> serde_json::Value {
            let method = if matches!(base, BaseFormat::Nf4 { .. }) { "qlora" } else { "lora" };
            serde_json::json!({
                "model": shape.name, "method": method, "batch": format!("{batch} × {SEQ}"), "rank": 64,
                "tokens_per_s": self.tokens_per_s, "peak_gib": self.peak_bytes as f64 / (1u64 << 30) as f64,
                "trainable_parameters": self.trainable,
            })
        }
    }

    /// Tokens per training row.
    const SEQ: usize = 1024;

    /// LoRA r64 α16 on every linear layer (QLoRA with an NF4 `base`), bf16 base,
    /// f32 adapters, AdamW, loss on every token, no activation checkpointing:
    /// PEFT's settings in scripts/gpu/peers.py.
    fn finetune(gpu: &Device, shape: &Shape, batch: usize, base: BaseFormat, steps: u32) -> anyhow::Result<Finetuned> {
        let config = shape.config()?;
        let data = tempfile::tempdir()?;
        let mut next = super::super::bench::xorshift(0x5EED);
        let rows: Vec<(Vec<u32>, Vec<u8>)> = (0..batch * steps as usize)
            .map(|_| ((0..SEQ).map(|_| (next() % config.vocab_size as u64) as u32).collect(), vec![1u8; SEQ]))
            .collect();
        let packed: Vec<Vec<(&[u32], &[u8])>> = rows.iter().map(|(i, l)| vec![(i.as_slice(), l.as_slice())]).collect();
        write_split(data.path(), "train", &packed)?;
        let train = Split::open(data.path(), "train")?;
        let peak = PeakMemory::start(gpu)?;
        let weights = Weights::random(DType::BF16, gpu, config.tie_word_embeddings);
        let all_linear = |path: &str| path != "lm_head";
        let loader = AdaptedLoader::new(&[], base)
            .with_new_adapters(&all_linear, NewAdapter { rank: 64, scaling: 16.0 / 64.0, dora: false, dropout: 0.0, seed: 1 });
        let decoder = Arc::new(Decoder::from_weights(&weights, config, &loader)?);
        let settings = Settings {
            lr: 1e-4,
            schedule: Schedule::Constant,
            warmup: 0,
            total_steps: steps as usize,
            stream_rows: None,
            batch_size: batch,
            micro_batch_size: batch,
            grad_accum: 1,
            max_grad_norm: 1.0,
            adamw: AdamWConfig { betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.0 },
            eval_every: 0,
            save_every: 0,
            seed: 1,
            activation_checkpointing: false,
        };
        let trainer = Trainer::new(decoder, &loader.take_adapters(), loader.dropout_state(), settings);
        let trainable = trainer.trainable_parameters();
        let scratch = tempfile::tempdir()?;
        let hooks = Hooks { progress: &|_, _, _| {}, cancelled: &|| false };
        let outcome = trainer.run(&train, None, scratch.path(), &hooks, &mut Parallel::single())?;
        let rates: Vec<f64> = outcome.log.iter().filter_map(|l| l.get("tokens_per_s")?.as_f64()).skip(1).collect();
        anyhow::ensure!(!rates.is_empty(), "no timed step");
        Ok(Finetuned { tokens_per_s: super::super::bench::median(rates), peak_bytes: peak.stop(), trainable })
    }

    /// Samples the GPU's used memory every few milliseconds from a thread:
    /// the process's peak, allocator pool included (as `nvidia-smi` would show).
    struct PeakMemory {
        stop: Arc<AtomicBool>,
        peak: Arc<AtomicUsize>,
        baseline: usize,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl PeakMemory {
        fn start(gpu: &Device) -> anyhow::Result<Self> {
            let context = gpu.as_cuda_device()?.cuda_stream().context().clone();
            let used = move || -> Option<usize> { context.mem_get_info().ok().map(|(free, total)| total - free) };
            let baseline = used().context("reading the GPU's memory use")?;
            let (stop, peak) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(baseline)));
            let (stop_t, peak_t) = (stop.clone(), peak.clone());
            let thread = std::thread::spawn(move || {
                while !stop_t.load(Ordering::Relaxed) {
                    if let Some(u) = used() {
                        peak_t.fetch_max(u, Ordering::Relaxed);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            });
            Ok(Self { stop, peak, baseline, thread: Some(thread) })
        }

        /// Peak bytes above what was in use when sampling started.
        fn stop(mut self) -> usize {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
            self.peak.load(Ordering::Relaxed) - self.baseline
        }
    }

    /// Questions of one subject: a 5-shot prefix of ~550 tokens shared by all,
    /// then ~60 tokens of question, and single-token continuations A–D.
    fn questions(vocab: usize, count: usize) -> Vec<Encoded> {
        let mut next = super::super::bench::xorshift(0xE7A1);
        let mut tokens = |n: usize| -> Vec<u32> { (0..n).map(|_| (next() % vocab as u64) as u32).collect() };
        let prefix = tokens(550);
        (0..count)
            .map(|_| {
                let mut context = prefix.clone();
                context.extend(tokens(60));
                Encoded { context, continuations: [vec![32], vec![33], vec![34], vec![35]] }
            })
            .collect()
    }

    fn eval(gpu: &Device, shape: &Shape) -> anyhow::Result<serde_json::Value> {
        let config = shape.config()?;
        let vocab = config.vocab_size;
        let weights = Weights::random(DType::BF16, gpu, config.tie_word_embeddings);
        let decoder = Decoder::from_weights(&weights, config, &DenseLoader)?;
        let questions = questions(vocab, 128);
        let cancelled = || false;
        score(&decoder, &questions[..8], ScoreOptions::default(), &cancelled)?;
        gpu.synchronize()?;
        let started = Instant::now();
        score(&decoder, &questions, ScoreOptions::default(), &cancelled)?;
        let seconds = started.elapsed().as_secs_f64();
        Ok(serde_json::json!({"model": shape.name, "questions": questions.len(), "prompt_tokens": 611, "questions_per_s": questions.len() as f64 / seconds}))
    }
}
