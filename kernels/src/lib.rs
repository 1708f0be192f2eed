//! swift's numeric kernels, each with a portable CPU implementation (the
//! reference the others are tested against):
//!
//! - [`gemv`]: matrix-vector products for single-token decoding.
//! - [`nf4`]: QLoRA's NF4 4-bit weights (with double-quantized scales), bit-exact
//!   with bitsandbytes.
//! - [`loss`]: fused cross-entropy (loss and gradient) over rows of logits.
//! - [`rows`]: row-wise softmax and RMSNorm with their gradients, and a
//!   vectorizable `exp`.
//!
//! AWQ int4, and CUDA versions of the kernels behind a `cuda` feature, join as
//! the quantize stage and the GPU work land.
#![deny(missing_docs)]

pub mod gemv;
pub mod loss;
pub mod nf4;
pub mod rows;
