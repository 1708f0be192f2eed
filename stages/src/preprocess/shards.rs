//! Token shards: what the preprocess stage writes and the training and
//! calibration stages read, memory-mapped, without copying.
//!
//! A `tokens/` folder holds `header.json` and, per split (`train`, `val`):
//! `{split}.ids` (u32 little-endian token ids, all rows back to back),
//! `{split}.labels` (one byte per token: 1 = trained on), `{split}.rows` and
//! `{split}.samples` (u64 little-endian start offsets of each row and of each
//! packed sample, plus the end). A packed row's samples must not attend to each
//! other: their boundaries are the sample offsets inside the row.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// `header.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// `swift-tokens-v1`.
    pub format: String,
    /// blake3 of the tokenizer.json the ids come from.
    pub tokenizer_digest: String,
    /// blake3 of the chat template text.
    pub template_digest: String,
    /// Row capacity in tokens.
    pub max_length: usize,
    /// Whether samples were packed.
    pub packing: bool,
    /// Counts per split.
    pub splits: std::collections::BTreeMap<String, SplitCounts>,
}

/// Counts of one split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SplitCounts {
    /// Rows.
    pub rows: usize,
    /// Samples (conversations).
    pub samples: usize,
    /// Tokens.
    pub tokens: usize,
    /// Tokens trained on.
    pub label_tokens: usize,
}

/// The format name in headers.
pub const FORMAT: &str = "swift-tokens-v1";

/// The header's file name in a tokens folder.
pub const HEADER_FILE: &str = "header.json";

impl Header {
    /// Reads a tokens folder's header.
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let path = dir.join(HEADER_FILE);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("{}: not a token shard header", path.display()))
    }
}

/// Writes one split: rows of samples, each sample (ids, labels).
pub fn write_split(dir: &Path, split: &str, rows: &[Vec<(&[u32], &[u8])>]) -> std::io::Result<SplitCounts> {
    let mut ids = std::io::BufWriter::new(std::fs::File::create(dir.join(format!("{split}.ids")))?);
    let mut labels = std::io::BufWriter::new(std::fs::File::create(dir.join(format!("{split}.labels")))?);
    let mut row_starts: Vec<u64> = vec![0];
    let mut sample_starts: Vec<u64> = vec![0];
    let mut offset = 0u64;
    let mut label_tokens = 0;
    for row in rows {
        for (sample_ids, sample_labels) in row {
            for id in *sample_ids {
                ids.write_all(&id.to_le_bytes())?;
            }
            labels.write_all(sample_labels)?;
            label_tokens += sample_labels.iter().filter(|&&l| l == 1).count();
            offset += sample_ids.len() as u64;
            sample_starts.push(offset);
        }
        row_starts.push(offset);
    }
    ids.flush()?;
    labels.flush()?;
    let write_offsets = |name: &str, values: &[u64]| -> std::io::Result<()> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(dir.join(format!("{split}.{name}")), bytes)
    };
    write_offsets("rows", &row_starts)?;
    write_offsets("samples", &sample_starts)?;
    Ok(SplitCounts { rows: rows.len(), samples: sample_starts.len() - 1, tokens: offset as usize, label_tokens })
}

/// A split of a tokens folder, memory-mapped.
pub struct Split {
    ids: memmap2::Mmap,
    labels: memmap2::Mmap,
    rows: Vec<u64>,
    samples: Vec<u64>,
}

/// One row: its tokens, labels and where its samples start (relative to the row).
#[derive(Debug, PartialEq, Eq)]
pub struct RowView<'a> {
    ids: &'a [u8],
    /// 1 = trained on, per token.
    pub labels: &'a [u8],
    /// Start of each sample within the row.
    pub sample_starts: Vec<usize>,
}

impl RowView<'_> {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the row is empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Token id at `i`.
    pub fn id(&self, i: usize) -> u32 {
        u32::from_le_bytes(self.ids[4 * i..4 * i + 4].try_into().expect("4 bytes"))
    }

    /// All token ids (copied).
    pub fn ids(&self) -> Vec<u32> {
        (0..self.len()).map(|i| self.id(i)).collect()
    }
}

fn map(path: &Path) -> std::io::Result<memmap2::Mmap> {
    let file = std::fs::File::open(path)?;
    // SAFETY: shards live read-only in swift's cache and are never rewritten.
    unsafe { memmap2::Mmap::map(&file) }
}

fn offsets(path: &Path) -> std::io::Result<Vec<u64>> {
    let bytes = std::fs::read(path)?;
    Ok(bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
}

impl Split {
    /// Opens `{split}.*` in a tokens folder.
    pub fn open(dir: &Path, split: &str) -> std::io::Result<Self> {
        let split = Self {
            ids: map(&dir.join(format!("{split}.ids")))?,
            labels: map(&dir.join(format!("{split}.labels")))?,
            rows: offsets(&dir.join(format!("{split}.rows")))?,
            samples: offsets(&dir.join(format!("{split}.samples")))?,
        };
        let tokens = split.labels.len();
        let consistent = split.ids.len() == 4 * tokens
            && split.rows.last().copied() == Some(tokens as u64)
            && split.samples.last().copied() == Some(tokens as u64);
        if !consistent {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: token shards are inconsistent", dir.display())));
        }
        Ok(split)
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows.len() - 1
    }

    /// Row `r`.
    pub fn row(&self, r: usize) -> RowView<'_> {
        let (start, end) = (self.rows[r] as usize, self.rows[r + 1] as usize);
        let first = self.samples.partition_point(|&s| (s as usize) < start);
        let sample_starts = self.samples[first..].iter().map(|&s| s as usize).take_while(|&s| s < end).map(|s| s - start).collect();
        RowView { ids: &self.ids[4 * start..4 * end], labels: &self.labels[start..end], sample_starts }
    }
}

/// Checks that a tokens folder was made with the tokenizer of the model
/// folder `model` (its `tokenizer.json`, by digest).
pub fn check_tokenizer(tokens_dir: &Path, model: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let header = Header::read(tokens_dir)?;
    let tokenizer = std::fs::read(model.join("tokenizer.json")).with_context(|| format!("{}: no tokenizer.json", model.display()))?;
    if blake3::hash(&tokenizer).to_hex().as_str() != header.tokenizer_digest {
        anyhow::bail!("the tokens were made with a different tokenizer than this model's ({}): give the preprocess stage \
            the same `model` (or its base)", model.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_rows_read_back_with_their_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (vec![1u32, 2, 3], vec![4u32, 5], vec![6u32]);
        let (la, lb, lc) = (vec![0u8, 1, 1], vec![0u8, 1], vec![1u8]);
        let rows = vec![vec![(&a[..], &la[..]), (&b[..], &lb[..])], vec![(&c[..], &lc[..])]];
        let counts = write_split(dir.path(), "train", &rows).unwrap();
        assert_eq!((counts.rows, counts.samples, counts.tokens, counts.label_tokens), (2, 3, 6, 4));
        let split = Split::open(dir.path(), "train").unwrap();
        assert_eq!(split.rows(), 2);
        let first = split.row(0);
        assert_eq!((first.ids(), first.sample_starts.clone()), (vec![1, 2, 3, 4, 5], vec![0, 3]));
        assert_eq!(first.labels, &[0, 1, 1, 0, 1]);
        assert_eq!(split.row(1).ids(), vec![6]);
    }
}
