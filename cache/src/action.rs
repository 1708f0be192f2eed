//! Action cache entries: what a stage key produced, and how.

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use crate::artifact::Artifact;
use crate::digest::StageKey;

/// The record that makes a stage count as done. Written last, atomically, after
/// every output is in the store.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ActionEntry {
    /// The stage key.
    pub key: StageKey,
    /// Stage kind.
    pub kind: String,
    /// The kind's version number when it ran.
    pub kind_version: u32,
    /// Fully resolved parameters (what entered the key), for `swift status` diffs.
    pub params: serde_json::Value,
    /// The upstream revision that entered the key (a Hub commit sha), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Input artifacts by input name (what entered the key).
    pub inputs: IndexMap<String, Artifact>,
    /// Output artifacts by output name.
    pub outputs: IndexMap<String, Artifact>,
    /// Numbers the stage reported (losses, accuracies, counts).
    #[serde(default)]
    pub metrics: serde_json::Map<String, serde_json::Value>,
    /// Keys of the pieces the stage cached under their own keys while it ran
    /// (an eval stage's model × suite scores): kept by `gc` as long as this
    /// entry is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<StageKey>,
    /// Where and when it ran: never part of the key.
    pub provenance: Provenance,
}

/// Where and when an entry was computed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Provenance {
    /// Host name.
    pub host: String,
    /// Device the stage ran on (`cpu`, `cuda:0`).
    pub device: String,
    /// Start time, milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    /// Wall time of the stage.
    pub seconds: f64,
    /// swift version that ran it.
    pub swift_version: String,
    /// The manifest it ran from.
    pub manifest: String,
}
