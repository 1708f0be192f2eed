//! Typed blake3 digests, written as 64 lowercase hex characters.

use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Marker for digests of stored content (file bytes or a tree listing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ContentKind {}

/// Marker for stage keys (digests of what went into a stage).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyKind {}

/// A blake3 digest tagged with what it addresses, so a stage key can never be
/// used as a content address by mistake.
pub struct Digest<K> {
    bytes: [u8; 32],
    kind: PhantomData<K>,
}

/// The digest of stored content: a file's bytes or a tree listing.
pub type ContentDigest = Digest<ContentKind>;
/// A stage key: the digest of a stage's canonical description.
pub type StageKey = Digest<KeyKind>;

impl<K> Digest<K> {
    /// Wraps raw digest bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self { bytes, kind: PhantomData }
    }

    /// Digest of a byte string.
    pub fn of(data: &[u8]) -> Self {
        Self::from_bytes(*blake3::hash(data).as_bytes())
    }

    /// Wraps a finished blake3 hash.
    pub fn from_hash(hash: blake3::Hash) -> Self {
        Self::from_bytes(*hash.as_bytes())
    }

    /// The 64-character lowercase hex form.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.bytes).to_hex().to_string()
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.bytes
    }
}

/// Why a string is not a digest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestParseError {
    /// Not exactly 64 characters.
    #[error("a digest has 64 hex characters, this one has {0}")]
    Length(usize),
    /// A character outside 0-9a-f.
    #[error("a digest is lowercase hex, found {0:?}")]
    NotHex(char),
}

impl<K> FromStr for Digest<K> {
    type Err = DigestParseError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.len() != 64 {
            return Err(DigestParseError::Length(text.len()));
        }
        if let Some(bad) = text.chars().find(|c| !matches!(c, '0'..='9' | 'a'..='f')) {
            return Err(DigestParseError::NotHex(bad));
        }
        let hash = blake3::Hash::from_hex(text).map_err(|_| DigestParseError::Length(text.len()))?;
        Ok(Self::from_hash(hash))
    }
}

impl<K> Clone for Digest<K> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K> Copy for Digest<K> {}
impl<K> PartialEq for Digest<K> {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}
impl<K> Eq for Digest<K> {}
impl<K> std::hash::Hash for Digest<K> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.bytes.hash(state)
    }
}
impl<K> PartialOrd for Digest<K> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<K> Ord for Digest<K> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.bytes.cmp(&other.bytes)
    }
}
impl<K> fmt::Display for Digest<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}
impl<K> fmt::Debug for Digest<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", &self.to_hex()[..12])
    }
}
impl<K> Serialize for Digest<K> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}
impl<'de, K> Deserialize<'de> for Digest<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_is_64_lowercase_characters() {
        let digest = ContentDigest::of(b"hello");
        let hex = digest.to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(hex, "ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f");
        assert_eq!(hex.parse::<ContentDigest>().unwrap(), digest);
    }

    #[test]
    fn parse_rejects_bad_text() {
        assert_eq!("abc".parse::<StageKey>(), Err(DigestParseError::Length(3)));
        let upper = "A".repeat(64);
        assert_eq!(upper.parse::<StageKey>(), Err(DigestParseError::NotHex('A')));
    }
}
