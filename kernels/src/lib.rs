//! swift's numeric kernels, each with a portable CPU implementation (the
//! reference the others are tested against):
//!
//! - [`awq`]: AWQ int4 weights in AutoAWQ's GEMM layout: round-to-nearest
//!   quantization with zero points, packing, dequantization, the int4 matmul
//!   and the clip search.
//! - [`gemv`]: matrix-vector products for single-token decoding.
//! - [`nf4`]: QLoRA's NF4 4-bit weights (with double-quantized scales), bit-exact
//!   with bitsandbytes.
//! - [`loss`]: fused cross-entropy (loss and gradient) over rows of logits.
//! - [`rows`]: row-wise softmax and RMSNorm with their gradients, and a
//!   vectorizable `exp`.
//!
//! - [`cuda`] (with the `cuda` feature): the same kernels on an NVIDIA GPU,
//!   as CUDA C (`cuda/*.cu`, compiled to PTX at build time) launched on
//!   candle's CUDA device; each is checked against its CPU reference here by
//!   `swift selftest --gpu`.
#![deny(missing_docs)]

pub mod awq;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gemv;
pub mod loss;
pub mod nf4;
pub mod rows;
