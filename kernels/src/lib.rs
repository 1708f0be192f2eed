//! swift's numeric kernels, each with a portable CPU implementation (the
//! reference the others are tested against):
//!
//! - [`gemv`]: matrix-vector products for single-token decoding.
//! - [`nf4`]: QLoRA's NF4 4-bit weights (with double-quantized scales), bit-exact
//!   with bitsandbytes.
//!
//! AWQ int4, and CUDA versions of the kernels behind a `cuda` feature, join as
//! the fine-tune and quantize stages land.
#![deny(missing_docs)]

pub mod gemv;
pub mod nf4;
