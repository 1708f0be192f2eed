//! swift's engine: from a TOML manifest to a run.
//!
//! A good place to start is [`exec::run`]. The flow:
//! - [`manifest`]: read the TOML, keep spans, apply `${VAR}` and `--set`;
//! - [`pipeline`]: type each stage through its [`kind::StageKind`], resolve
//!   references, reject cycles, order topologically;
//! - [`key`]: what enters a stage key (a table in its module doc);
//! - [`status`]: which stages are fresh and why the others are not;
//! - [`exec`]: run what is missing, concurrently, crash-safely;
//! - [`slurm`]: or submit each missing stage as a Slurm job and wait;
//! - [`report`]: the events and summaries the binary renders.
//!
//! Stage kinds themselves live in `swift-stages`; the cache in `swift-cache`.
#![deny(missing_docs)]

pub mod error;
pub mod exec;
mod full_disk;
pub mod key;
pub mod kind;
pub mod manifest;
pub mod pipeline;
pub mod placement;
pub mod report;
pub mod resolve;
pub mod slurm;
pub mod status;
pub mod world;
#[cfg(feature = "test-kinds")]
pub mod testkinds;

pub use error::ManifestError;
pub use exec::{run, RunError, RunOptions};
pub use kind::Registry;
pub use manifest::{LoadOptions, Manifest};
pub use pipeline::Pipeline;
