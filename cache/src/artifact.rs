//! Artifacts: what a stage consumes and produces, as the store records them.

use serde::{Deserialize, Serialize};

use crate::digest::ContentDigest;

/// A stored file or folder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Artifact {
    /// One file; its name is kept so that tools relying on extensions work.
    File {
        /// Digest of the bytes.
        digest: ContentDigest,
        /// Size in bytes.
        size: u64,
        /// The file name (no directories).
        name: String,
        /// Whether the execute bit is set.
        #[serde(default)]
        executable: bool,
    },
    /// A folder, addressed by its Merkle listing.
    Tree {
        /// Digest of the listing.
        digest: ContentDigest,
        /// Total size of the files.
        size: u64,
        /// Number of files.
        files: u64,
    },
}

impl Artifact {
    /// The digest that addresses the artifact's content (the file's bytes or the
    /// folder's listing): what lock files record.
    pub fn digest(&self) -> ContentDigest {
        match self {
            Artifact::File { digest, .. } | Artifact::Tree { digest, .. } => *digest,
        }
    }

    /// Total bytes.
    pub fn size(&self) -> u64 {
        match self {
            Artifact::File { size, .. } | Artifact::Tree { size, .. } => *size,
        }
    }
}
