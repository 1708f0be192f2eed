//! swift's content-addressed cache. It will never hand out a half-written entry:
//! every object, listing, action entry and lock file is written to a temporary
//! name, fsynced and renamed into place.
//!
//! - [`digest`]: typed blake3 digests (content vs stage keys), 64 hex characters;
//! - [`hash`] and [`statcache`]: parallel hashing behind a stat cache;
//! - [`tree`]: Merkle listings of folders;
//! - [`store`]: objects, materialized artifacts, action entries, per-key locks;
//! - [`lockfile`]: the `NAME.lock` format;
//! - [`runs`]: run records and GC roots; [`gc`] and [`verify`] maintain the store.
//!
//! What goes into a stage key is the engine's business (`swift_engine::key`);
//! this crate only stores bytes and records.
#![deny(missing_docs)]

pub mod action;
pub mod artifact;
pub mod atomic;
pub mod digest;
pub mod gc;
pub mod hash;
pub mod lockfile;
pub mod roots;
pub mod runs;
pub mod statcache;
pub mod store;
pub mod tree;
pub mod verify;

pub use action::{ActionEntry, Provenance};
pub use artifact::Artifact;
pub use digest::{ContentDigest, Digest, StageKey};
pub use hash::{hash_path, HashStats, Hashed};
pub use lockfile::{LockFile, LockedStage};
pub use runs::{RunRecord, RunStageRecord};
pub use statcache::StatCache;
pub use store::{ActionScan, KeyLock, Store};
