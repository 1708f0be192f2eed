//! With the `cuda` feature, compiles every `cuda/*.cu` to PTX in `OUT_DIR`
//! (`src/cuda/mod.rs` embeds them). nvcc is `$NVCC`, else `$CUDA_HOME/bin/nvcc`,
//! else `nvcc` on PATH; the target is `compute_$CUDA_COMPUTE_CAP` (default 90,
//! Hopper), as PTX so that a newer driver JIT-compiles it for its own card.
//! Without the feature this does nothing: the default build needs no CUDA.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_CUDA");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["NVCC", "CUDA_HOME", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = nvcc();
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap = cap.trim().trim_start_matches("sm_").replace('.', "");
    if cap.is_empty() || !cap.chars().all(|c| c.is_ascii_digit()) {
        panic!("CUDA_COMPUTE_CAP must be a compute capability such as 90 or 80, not `{cap}`");
    }
    println!("cargo:rerun-if-changed=cuda");
    for name in ["rows", "loss", "nf4", "awq", "optim"] {
        let source = Path::new("cuda").join(format!("{name}.cu"));
        println!("cargo:rerun-if-changed={}", source.display());
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}"), "-o"])
            .arg(&ptx)
            .arg(&source)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "the `cuda` feature needs nvcc, and running `{}` failed: {e}. Install CUDA 13.0 \
                     (`bash scripts/cuda-toolchain.sh`, then `eval \"$(bash scripts/cuda-toolchain.sh --exports-only)\"`) \
                     or set NVCC / CUDA_HOME",
                    nvcc.display()
                )
            });
        if !status.success() {
            panic!("nvcc failed to compile {} for compute_{cap} ({status})", source.display());
        }
    }
}

/// The nvcc to run.
fn nvcc() -> PathBuf {
    if let Some(nvcc) = std::env::var_os("NVCC") {
        return nvcc.into();
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        let candidate = Path::new(&home).join("bin").join("nvcc");
        if candidate.exists() {
            return candidate;
        }
    }
    "nvcc".into()
}
