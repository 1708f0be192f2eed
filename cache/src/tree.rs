//! Merkle listings of folders: one sorted line per file with its mode, size,
//! digest and relative path. The listing is itself stored as an object, and its
//! digest is the folder's digest.
//!
//! ```text
//! swift-tree-v1
//! 644 1024 <64 hex> config.json
//! 755 12 <64 hex> bin/run.sh
//! ```

use crate::digest::ContentDigest;

const HEADER: &str = "swift-tree-v1";

/// One file in a folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeEntry {
    /// Path relative to the folder, `/`-separated.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Whether any execute bit is set.
    pub executable: bool,
    /// Digest of the file's bytes.
    pub digest: ContentDigest,
}

/// A folder's sorted file listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeListing {
    entries: Vec<TreeEntry>,
}

/// A listing that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("tree listing line {line}: {message}")]
pub struct TreeParseError {
    line: usize,
    message: String,
}

impl TreeListing {
    /// Builds a listing, sorting entries by path.
    pub fn new(mut entries: Vec<TreeEntry>) -> Self {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Self { entries }
    }

    /// The files, sorted by path.
    pub fn entries(&self) -> &[TreeEntry] {
        &self.entries
    }

    /// Total size of the files.
    pub fn total_size(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }

    /// The canonical text form.
    pub fn encode(&self) -> String {
        let mut text = String::from(HEADER);
        text.push('\n');
        for e in &self.entries {
            let mode = if e.executable { 755 } else { 644 };
            text.push_str(&format!("{mode} {} {} {}\n", e.size, e.digest, e.path));
        }
        text
    }

    /// The folder's digest: the digest of the canonical text.
    pub fn digest(&self) -> ContentDigest {
        ContentDigest::of(self.encode().as_bytes())
    }

    /// Parses the canonical text form.
    pub fn decode(text: &str) -> Result<Self, TreeParseError> {
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err(TreeParseError { line: 1, message: format!("expected header {HEADER:?}") });
        }
        let mut entries = Vec::new();
        for (i, line) in lines.enumerate() {
            let err = |message: &str| TreeParseError { line: i + 2, message: message.to_string() };
            let mut parts = line.splitn(4, ' ');
            let (Some(mode), Some(size), Some(digest), Some(path)) = (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(err("expected `mode size digest path`"));
            };
            entries.push(TreeEntry {
                executable: match mode {
                    "644" => false,
                    "755" => true,
                    _ => return Err(err("mode must be 644 or 755")),
                },
                size: size.parse().map_err(|_| err("bad size"))?,
                digest: digest.parse().map_err(|_| err("bad digest"))?,
                path: path.to_string(),
            });
        }
        Ok(Self { entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_pinned_and_round_trips() {
        let listing = TreeListing::new(vec![
            TreeEntry { path: "z.bin".into(), size: 3, executable: true, digest: ContentDigest::of(b"zzz") },
            TreeEntry { path: "a/config.json".into(), size: 2, executable: false, digest: ContentDigest::of(b"{}") },
        ]);
        let text = listing.encode();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "swift-tree-v1");
        assert!(lines[1].starts_with("644 2 ") && lines[1].ends_with(" a/config.json"));
        assert!(lines[2].starts_with("755 3 ") && lines[2].ends_with(" z.bin"));
        assert_eq!(TreeListing::decode(&text).unwrap(), listing);
    }
}
