//! The model code every stage shares: Hugging Face checkpoints of the Qwen2,
//! Llama and Mistral families on candle.
//!
//! - [`config`]: `config.json` → [`ModelConfig`]; [`device`]: the device a
//!   stage computes on, and its dtype;
//! - [`weights`]: single-file and sharded safetensors, memory-mapped, checked
//!   against the config;
//! - [`linear`]: the one abstraction every projection goes through, so NF4 and
//!   AWQ weights and LoRA adapters slot in without touching the decoder;
//!   [`awq`] (AWQ int4 weights in AutoAWQ's GEMM layout), [`nf4`] (bitsandbytes NF4 weights), [`lora`] (LoRA/DoRA adapters),
//!   [`adapter`] (PEFT adapter folders) and [`adapted`] (a loader that merges
//!   an adapter chain and adds new adapters); [`stored`] (bf16/f16 weights
//!   kept as stored for f32 compute on the CPU); [`ops`] (custom autograd ops
//!   for training: frozen-weight matmul, fused cross-entropy);
//! - [`model`]: the decoder (RMSNorm, RoPE, GQA attention with causal, packed
//!   and sliding-window masks, SwiGLU, KV cache);
//! - [`tokenizer`] and [`chat`]: `tokenizer.json`, special tokens and chat
//!   templates rendered as transformers renders them;
//! - [`generate`]: greedy and sampled generation of one sequence;
//!   [`kv_blocks`] (a block KV cache shared by many sequences), [`batch`] (one
//!   forward pass over many sequences' new tokens) and [`scheduler`] (many
//!   prompts at once: continuous batching, shared prefixes);
//! - [`save`]: writing checkpoints as transformers does (sharded with an index
//!   above a size).

pub mod adapted;
pub mod awq;
pub mod batch;
pub mod adapter;
pub mod chat;
pub mod config;
pub mod device;
pub mod kv_blocks;
pub mod generate;
pub mod linear;
pub mod lora;
pub mod model;
pub mod nf4;
pub mod ops;
pub mod save;
pub mod scheduler;
pub mod stored;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

pub use config::{Family, ModelConfig};
pub use device::Compute;
pub use model::Decoder;
pub use tokenizer::TextTokenizer;

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `config.json` is unusable.
    #[error("{}: {message}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A weights file or tensor is unusable.
    #[error("{}: {message}", path.display())]
    Weights {
        /// The safetensors file (or the model folder).
        path: PathBuf,
        /// What is wrong, naming the tensor.
        message: String,
    },
    /// The tokenizer or its configuration is unusable.
    #[error("{}: {message}", path.display())]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A chat template failed to parse or render.
    #[error("chat template: {0}")]
    Template(String),
    /// An input does not fit the model's context.
    #[error("{0}")]
    TooLong(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl LlmError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), source }
    }
}

/// Resolves the device a stage computes on (`device`, `[pipeline] device`,
/// `--device`; see [`device`]); a device this build cannot use is refused
/// where it was chosen.
pub fn check_device(ctx: &swift_engine::kind::CompileCtx<'_>) -> Result<Compute, swift_engine::ManifestError> {
    Compute::resolve(&ctx.device())
        .map_err(|message| ctx.device_error(message).with_help("use `device = \"cpu\"` or `\"auto\"`"))
}
