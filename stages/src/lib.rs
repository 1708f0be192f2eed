//! swift's stage kinds, one module each, all listed in [`registry`]:
//!
//! - fetch: [`download`] (local files and folders, and the Hugging Face Hub
//!   through [`hub`]);
//! - shared model code: [`llm`] (Qwen2/Llama/Mistral checkpoints, tokenizer,
//!   chat templates, the decoder, generation);
//! - data: [`preprocess`] (datasets → chat-templated, masked, packed shards);
//! - training: [`finetune`] (LoRA, DoRA, QLoRA; chains of fine-tunes through
//!   [`model_source`]);
//! - compression: [`quantize`] (AWQ int4 in AutoAWQ's GEMM layout);
//! - evaluation: [`eval`] (MMLU and C-Eval, k-shot log-likelihood);
//! - delivery: [`export`] (merged, PEFT, AWQ and GGUF folders with model cards);
//! - shared drawing: [`svg`] (the stroke font of the charts).
#![deny(missing_docs)]

pub mod download;
pub mod eval;
pub mod export;
pub mod finetune;
pub mod hub;
pub mod llm;
pub mod memory;
pub mod model_source;
pub mod preprocess;
pub mod quantize;
pub mod svg;

use swift_engine::kind::StageKind;
use swift_engine::Registry;

/// Every stage kind of this build, in one table.
pub fn registry() -> Registry {
    let kinds: Vec<Box<dyn StageKind>> = vec![
        Box::new(download::Download),
        Box::new(preprocess::Preprocess),
        Box::new(finetune::Finetune),
        Box::new(quantize::Quantize),
        Box::new(eval::Eval),
        Box::new(export::Export),
    ];
    Registry::new(kinds)
}
