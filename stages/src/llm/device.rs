//! Which device a stage computes on, and in which dtype.
//!
//! A stage's device is chosen as written (`device`, `[pipeline] device`,
//! `--device`; see [`swift_engine::placement::DeviceSpec`]) and resolved when
//! the manifest compiles, so that the compute dtype — f32 on the CPU, bf16 on
//! a GPU — enters the stage's key:
//!
//! | written | default build | `--features cuda` build |
//! |---|---|---|
//! | `auto` | CPU | `cuda:0` if a GPU can be opened, else CPU |
//! | `cpu` | CPU | CPU |
//! | `cuda:N` | refused where written | GPU `N` (opened when the stage runs) |
//!
//! Several devices (`cuda:0-3`) are refused here: one stage computes on one
//! device.

use candle_core::{DType, Device};
use swift_engine::placement::DeviceSpec;

/// A resolved compute device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compute {
    /// The CPU, f32.
    Cpu,
    /// CUDA device `N`, bf16.
    Cuda(usize),
}

impl Compute {
    /// Parses and resolves a device as a command-line flag gives it
    /// (`auto`, `cpu`, `cuda:N`); the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::resolve(&text.parse::<DeviceSpec>()?)
    }

    /// Resolves a written device for this build; the error says why it cannot
    /// be used and is located by the caller where the device was chosen.
    pub fn resolve(spec: &DeviceSpec) -> Result<Self, String> {
        match spec {
            DeviceSpec::Cpu => Ok(Compute::Cpu),
            DeviceSpec::Auto => Ok(if cfg!(feature = "cuda") && first_gpu_opens() { Compute::Cuda(0) } else { Compute::Cpu }),
            DeviceSpec::Cuda(_) if !cfg!(feature = "cuda") => {
                Err(format!("device `{spec}`: this build of swift computes on the CPU only (build with `--features cuda` for GPUs)"))
            }
            DeviceSpec::Cuda(ids) => match ids.as_slice() {
                [id] => Ok(Compute::Cuda(*id as usize)),
                _ => Err(format!("device `{spec}`: a stage computes on one device; write one, e.g. `cuda:{}`", ids[0])),
            },
        }
    }

    /// Opens the device.
    pub fn open(self) -> anyhow::Result<Device> {
        match self {
            Compute::Cpu => Ok(Device::Cpu),
            Compute::Cuda(id) => Device::new_cuda(id).map_err(|e| {
                // candle appends a backtrace when RUST_BACKTRACE is set: the cause is its first line.
                let cause = e.to_string().lines().next().unwrap_or_default().to_string();
                anyhow::anyhow!(
                    "device `cuda:{id}` could not be opened: {cause}. swift's CUDA build needs an NVIDIA driver for CUDA 13.0 \
                     (libcuda.so.1) and the CUDA 13 runtime libraries (libcudart, libcublas, libcublasLt, libcurand, libnvrtc) \
                     on the library path; `nvidia-smi` lists the GPUs this machine has. Use `--device cpu` to run on the CPU"
                )
            }),
        }
    }

    /// The dtype the model computes in on this device: f32 on the CPU, bf16
    /// on a GPU.
    pub fn dtype(self) -> DType {
        match self {
            Compute::Cpu => DType::F32,
            Compute::Cuda(_) => DType::BF16,
        }
    }

    /// The engine resource a stage on this device occupies: a GPU runs one
    /// stage at a time.
    pub fn resource(self) -> swift_engine::kind::Resource {
        match self {
            Compute::Cpu => swift_engine::kind::Resource::Cpu,
            Compute::Cuda(id) => swift_engine::kind::Resource::Gpu(format!("cuda:{id}")),
        }
    }
}

impl std::fmt::Display for Compute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compute::Cpu => f.write_str("cpu"),
            Compute::Cuda(id) => write!(f, "cuda:{id}"),
        }
    }
}

/// Whether CUDA device 0 can be opened (probed once per process).
fn first_gpu_opens() -> bool {
    static PROBED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PROBED.get_or_init(|| Device::new_cuda(0).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_resolves_everywhere_and_computes_in_f32() {
        assert_eq!(Compute::resolve(&DeviceSpec::Cpu), Ok(Compute::Cpu));
        assert_eq!(Compute::parse("cpu"), Ok(Compute::Cpu));
        assert!(Compute::parse("gpu").unwrap_err().contains("is not a device"));
        assert_eq!(Compute::Cpu.dtype(), DType::F32);
        assert_eq!(Compute::Cuda(1).dtype(), DType::BF16);
        assert_eq!(Compute::Cuda(1).to_string(), "cuda:1");
        assert_eq!(Compute::Cuda(0).resource(), swift_engine::kind::Resource::Gpu("cuda:0".into()));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn the_cpu_build_refuses_cuda_and_resolves_auto_to_the_cpu() {
        assert_eq!(Compute::resolve(&DeviceSpec::Auto), Ok(Compute::Cpu));
        let e = Compute::resolve(&DeviceSpec::Cuda(vec![0])).unwrap_err();
        assert!(e.contains("CPU only") && e.contains("--features cuda"), "{e}");
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn the_cuda_build_takes_one_device() {
        assert_eq!(Compute::resolve(&DeviceSpec::Cuda(vec![2])), Ok(Compute::Cuda(2)));
        let e = Compute::resolve(&DeviceSpec::Cuda(vec![0, 1])).unwrap_err();
        assert!(e.contains("one device"), "{e}");
    }
}
