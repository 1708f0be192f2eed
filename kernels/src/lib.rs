//! swift's numeric kernels, each with a portable CPU implementation (the
//! reference the others are tested against):
//!
//! - [`gemv`]: matrix-vector products for single-token decoding.
//!
//! NF4 and AWQ int4 (with their CUDA versions behind a `cuda` feature) join as
//! the fine-tune and quantize stages land.
#![deny(missing_docs)]

pub mod gemv;
