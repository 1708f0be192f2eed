//! Calibration blocks: a token stream cut into `seq_len`-token blocks, the
//! first `samples` for the search and the next `held_out` for perplexity.
//!
//! The stream is a preprocess stage's `train` rows, or a dataset's `text`
//! field tokenized as transformers' `tokenizer(text)` does (AutoAWQ's pileval
//! recipe), in an order shuffled by the seed, then concatenated and cut, as
//! AutoAWQ's `get_calib_dataset` concatenates and cuts its samples.

use std::path::Path;

use anyhow::{bail, Context};

use crate::finetune::data::RowOrder;
use crate::llm::TextTokenizer;
use crate::preprocess::records;
use crate::preprocess::shards::Split;

/// The blocks the quantize stage works on.
pub struct Blocks {
    /// Calibration blocks, `seq_len` tokens each.
    pub calibration: Vec<Vec<u32>>,
    /// Held-out blocks for perplexity.
    pub held_out: Vec<Vec<u32>>,
}

/// How many blocks of what length.
#[derive(Clone, Copy, Debug)]
pub struct BlockCounts {
    /// Calibration blocks.
    pub samples: usize,
    /// Held-out blocks.
    pub held_out: usize,
    /// Tokens per block.
    pub seq_len: usize,
}

/// The token stream of a preprocess stage's train split, rows in seeded order.
pub fn stream_from_tokens(dir: &Path, seed: u64) -> anyhow::Result<Vec<u32>> {
    let train = Split::open(dir, "train").with_context(|| format!("{}: reading the train split", dir.display()))?;
    let mut order = RowOrder::new(train.rows().max(1), seed);
    let mut stream = Vec::new();
    for k in 0..train.rows() {
        stream.extend(train.row(order.row_at(k)).ids());
    }
    Ok(stream)
}

/// The token stream of a dataset's `field` values, records in seeded order.
pub fn stream_from_dataset(path: &Path, field: &str, tokenizer: &TextTokenizer, seed: u64) -> anyhow::Result<Vec<u32>> {
    let mut texts = Vec::new();
    for file in records::data_files(path).with_context(|| format!("reading {}", path.display()))? {
        let (rows, errors) = records::read_file(&file).map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some(e) = errors.first() {
            bail!("{e}");
        }
        for row in rows {
            match row.fields.get(field) {
                Some(serde_json::Value::String(text)) => texts.push(text.trim().to_string()),
                _ => bail!("{}:{}: the row has no text field `{field}` (set `text_field` to the field holding the text)",
                    row.file.display(), row.line),
            }
        }
    }
    let mut order = RowOrder::new(texts.len().max(1), seed);
    let mut stream = Vec::new();
    for k in 0..texts.len() {
        let text = &texts[order.row_at(k)];
        if !text.is_empty() {
            stream.extend(tokenizer.encode(text)?);
        }
    }
    Ok(stream)
}

/// Cuts the stream into blocks, or says how many tokens are missing.
pub fn cut(stream: &[u32], counts: BlockCounts) -> Result<Blocks, String> {
    let needed = (counts.samples + counts.held_out) * counts.seq_len;
    if stream.len() < needed {
        return Err(format!(
            "too few calibration tokens: {} samples and {} held-out blocks of {} tokens need {needed}, the data has {}; \
             lower `samples`, `held_out` or `seq_len`, or give more data",
            counts.samples,
            counts.held_out,
            counts.seq_len,
            stream.len()
        ));
    }
    let mut blocks = stream.chunks_exact(counts.seq_len).map(<[u32]>::to_vec);
    let calibration = blocks.by_ref().take(counts.samples).collect();
    let held_out = blocks.take(counts.held_out).collect();
    Ok(Blocks { calibration, held_out })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_disjoint_and_shortfalls_name_the_numbers() {
        let stream: Vec<u32> = (0..100).collect();
        let blocks = cut(&stream, BlockCounts { samples: 3, held_out: 2, seq_len: 10 }).unwrap();
        assert_eq!(blocks.calibration.len(), 3);
        assert_eq!(blocks.calibration[2], (20..30).collect::<Vec<u32>>());
        assert_eq!(blocks.held_out[0], (30..40).collect::<Vec<u32>>());
        let e = cut(&stream, BlockCounts { samples: 8, held_out: 4, seq_len: 10 }).err().unwrap();
        assert!(e.contains("need 120, the data has 100"), "{e}");
    }
}
