//! The GPU-facing commands in the default (CPU-only) build: each refuses with
//! a message that names the `cuda` build, and `--device cpu` works where a
//! device is taken. (The GPU checks themselves are `swift selftest --gpu`,
//! run by scripts/gpu-check.sh on a GPU machine.)

use std::path::Path;

use crate::util::Project;

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(name).to_str().unwrap().to_string()
}

#[test]
fn selftest_and_bench_gpu_name_the_cuda_build() {
    let p = Project::new();
    let run = p.swift(&["selftest"]);
    assert_eq!(run.code, 2, "{run}");
    assert!(run.stderr.contains("pass --gpu"), "{run}");
    let run = p.swift(&["selftest", "--gpu", "--out", "results"]);
    assert_eq!(run.code, 1, "{run}");
    assert!(run.stderr.contains("no CUDA") && run.stderr.contains("--features cuda"), "{run}");
    let run = p.swift(&["bench", "gpu"]);
    assert_eq!(run.code, 1, "{run}");
    assert!(run.stderr.contains("no CUDA") && run.stderr.contains("--features cuda"), "{run}");
}

#[test]
fn generate_takes_a_device() {
    let p = Project::new();
    let model = fixture("qwen2-tiny");
    let run = p.swift(&["generate", "--model", &model, "--prompt", "Statute", "--max-tokens", "2", "--device", "cuda:0"]);
    assert_eq!(run.code, 2, "{run}");
    assert!(run.stderr.contains("--device cuda:0") && run.stderr.contains("CPU only"), "{run}");
    let run = p.swift(&["generate", "--model", &model, "--prompt", "Statute", "--max-tokens", "2", "--device", "gpu"]);
    assert_eq!(run.code, 2, "{run}");
    assert!(run.stderr.contains("is not a device"), "{run}");
    let cpu = p.swift(&["generate", "--model", &model, "--prompt", "Statute", "--max-tokens", "2", "--device", "cpu", "--json"]);
    assert_eq!(cpu.code, 0, "{cpu}");
    let auto = p.swift(&["generate", "--model", &model, "--prompt", "Statute", "--max-tokens", "2", "--json"]);
    assert_eq!(cpu.json(), auto.json(), "auto is the CPU in this build");
}
