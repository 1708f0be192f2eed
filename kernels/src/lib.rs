//! swift's numeric kernels: NF4 and AWQ int4 quantization, fused matmuls, with a
//! CPU reference implementation of each and CUDA versions behind the `cuda`
//! feature. This crate is empty until the fine-tune and AWQ stages land; it is
//! part of the workspace now so the layout is the one users and docs refer to.
#![deny(missing_docs)]
