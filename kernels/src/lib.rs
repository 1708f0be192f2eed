//! swift's numeric kernels, each with a portable CPU implementation (the
//! reference the others are tested against):
//!
//! - [`adamw`]: the optimizer step in one pass over every trainable tensor
//!   (AdamW with the global-norm clip folded in).
//! - [`awq`]: AWQ int4 weights in AutoAWQ's GEMM layout: round-to-nearest
//!   quantization with zero points, packing, dequantization, the int4 matmul
//!   and the clip search.
//! - [`gemv`]: matrix-vector products for decoding (one row, or a batch's few);
//!   [`gemv_half`]: the same on bf16/f16 weights with f32 accumulation.
//! - [`nf4`]: QLoRA's NF4 4-bit weights (with double-quantized scales), bit-exact
//!   with bitsandbytes.
//! - [`loss`]: fused cross-entropy (loss and gradient) over rows of logits.
//! - [`rope`]: rotary position embeddings for batches of rows, with the gradient.
//! - [`rows`]: row-wise softmax, RMSNorm and SwiGLU with their gradients, and a
//!   vectorizable `exp`.
//!
//! - [`cuda`] (with the `cuda` feature): the same kernels on an NVIDIA GPU,
//!   as CUDA C (`cuda/*.cu`, compiled to PTX at build time) launched on
//!   candle's CUDA device; each is checked against its CPU reference here by
//!   `swift selftest --gpu`.
#![deny(missing_docs)]

pub mod adamw;
pub mod awq;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gemv;
pub mod gemv_half;
pub mod loss;
pub mod nf4;
pub mod rope;
pub mod rows;
