//! swift's stage kinds, one module each, all listed in [`registry`]:
//!
//! - fetch: [`download`] (local files and folders, and the Hugging Face Hub
//!   through [`hub`]);
//! - shared model code: [`llm`] (Qwen2/Llama/Mistral checkpoints, tokenizer,
//!   chat templates, the decoder, generation);
//! - data: [`preprocess`] (datasets → chat-templated, masked, packed shards);
//! - still to come ([`planned`]): `finetune` (train), `quantize`, `eval`, `export`.
#![deny(missing_docs)]

pub mod download;
pub mod hub;
pub mod llm;
pub mod planned;
pub mod preprocess;

use swift_engine::kind::StageKind;
use swift_engine::Registry;

/// Every stage kind of this build, in one table.
pub fn registry() -> Registry {
    let mut kinds: Vec<Box<dyn StageKind>> = vec![Box::new(download::Download), Box::new(preprocess::Preprocess)];
    kinds.extend(planned::kinds().into_iter().map(|k| Box::new(k) as Box<dyn StageKind>));
    Registry::new(kinds)
}
