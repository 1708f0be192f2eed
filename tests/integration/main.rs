//! Whole-binary tests: each runs the real `swift` in a fresh project folder, as a
//! user would. The `test-step` stage kind (engine feature `test-kinds`, on for
//! `cargo test`) stands in for heavy stages.

mod util;

/// Reruns, invalidation, dry runs and partial runs.
mod incremental;
/// Bad manifests and command lines: exit 2 with file:line:column.
mod invalid;
/// Lock files and `--locked`.
mod locking;
/// kill -9, Ctrl-C, concurrent runs, GPU slots.
mod robustness;
/// `status`, `show`, `dag`, `report`, `gc`, `cache verify`.
mod inspect;
/// The `download` stage on local files and folders.
mod download;
/// The shipped pipelines: the CI-sized demo end to end, the full demo against its lock file,
/// pipelines/law_qa.toml from a pre-populated HF cache.
mod demo;
/// The download stage against a loopback Hub and a pre-populated HF cache.
mod hub;
/// `swift generate` on the fixture models.
mod generate;
/// The GPU-facing commands and `--device` in the CPU-only build.
mod gpu;
/// The preprocess stage: formats, templates and masks, packing, shards.
mod preprocess;
/// The finetune stage: LoRA/QLoRA learning, resume, threads, chains, bad settings.
mod finetune;
/// The quantize stage: AWQ vs RTN, the AutoAWQ folder, generate on it, bad settings.
mod quantize;
/// The eval stage: models side by side on MMLU/C-Eval, reports, cached parts, bad data.
mod eval;
/// The export stage: every format against the Python tools, model cards, `to`, bad settings.
mod export;
/// The Slurm executor on a real one-host cluster: same outputs as local runs,
/// failures, kill -9, concurrent submissions, `--detach`, bad clusters, the CI demo.
mod slurm;
