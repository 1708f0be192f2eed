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

/// A record's calibration content: text to tokenize, or token ids already.
enum Record {
    Text(String),
    Ids(Vec<u32>),
}

/// The token stream of a dataset's `field` values — text, tokenized as
/// `tokenizer(text)` does, or lists of token ids (pre-tokenized data, as
/// AutoAWQ also accepts) — records in seeded order.
pub fn stream_from_dataset(path: &Path, field: &str, tokenizer: &TextTokenizer, vocab: usize, seed: u64) -> anyhow::Result<Vec<u32>> {
    let mut records = Vec::new();
    for file in records::data_files(path).with_context(|| format!("reading {}", path.display()))? {
        let (rows, errors) = records::read_file(&file).map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some(e) = errors.first() {
            bail!("{e}");
        }
        for row in rows {
            let bad = |what: &str| anyhow::anyhow!("{}:{}: field `{field}` {what} (set `text_field` to the field holding the text)",
                row.file.display(), row.line);
            records.push(match row.fields.get(field) {
                Some(serde_json::Value::String(text)) => Record::Text(text.trim().to_string()),
                Some(serde_json::Value::Array(values)) => Record::Ids(
                    values
                        .iter()
                        .map(|v| v.as_u64().and_then(|id| u32::try_from(id).ok()).filter(|&id| (id as usize) < vocab))
                        .collect::<Option<Vec<u32>>>()
                        .ok_or_else(|| bad(&format!("is a list, but not of token ids below the vocabulary size {vocab}")))?,
                ),
                Some(_) => return Err(bad("is neither text nor a list of token ids")),
                None => return Err(bad("is missing")),
            });
        }
    }
    let mut order = RowOrder::new(records.len().max(1), seed);
    let mut stream = Vec::new();
    for k in 0..records.len() {
        match &records[order.row_at(k)] {
            Record::Text(text) if !text.is_empty() => stream.extend(tokenizer.encode(text)?),
            Record::Text(_) => {}
            Record::Ids(ids) => stream.extend_from_slice(ids),
        }
    }
    Ok(stream)
}

/// Cuts the stream into blocks, or says how many tokens are missing.
pub fn cut(stream: &[u32], counts: BlockCounts) -> Result<Blocks, String> {
    let needed = counts.samples.saturating_add(counts.held_out).saturating_mul(counts.seq_len);
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
    use crate::llm::ModelConfig;

    fn tokenizer() -> TextTokenizer {
        let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/qwen2-tiny");
        TextTokenizer::load(&folder, &ModelConfig::load(&folder).unwrap()).unwrap()
    }

    #[test]
    fn datasets_give_text_or_token_ids_and_bad_values_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calib.jsonl");
        std::fs::write(&path, "{\"text\": \"  the court  \"}\n{\"text\": [5, 6, 7]}\n").unwrap();
        let tok = tokenizer();
        let stream = stream_from_dataset(&path, "text", &tok, 640, 1).unwrap();
        let text = tok.encode("the court").unwrap();
        let ids = [5u32, 6, 7];
        let expected_one = [ids.as_slice(), &text].concat();
        let expected_two = [text.as_slice(), &ids].concat();
        assert!(stream == expected_one || stream == expected_two, "{stream:?}");
        assert_eq!(stream, stream_from_dataset(&path, "text", &tok, 640, 1).unwrap(), "deterministic from the seed");
        std::fs::write(&path, "{\"text\": \"ok\"}\n{\"text\": 5}\n").unwrap();
        let e = stream_from_dataset(&path, "text", &tok, 640, 1).unwrap_err().to_string();
        assert!(e.contains("calib.jsonl:2: field `text` is neither text nor a list of token ids"), "{e}");
        let e = stream_from_dataset(&path, "body", &tok, 640, 1).unwrap_err().to_string();
        assert!(e.contains("calib.jsonl:1: field `body` is missing"), "{e}");
        std::fs::write(&path, "{\"text\": [1, 640]}\n").unwrap();
        let e = stream_from_dataset(&path, "text", &tok, 640, 1).unwrap_err().to_string();
        assert!(e.contains("calib.jsonl:1: field `text` is a list, but not of token ids below the vocabulary size 640"), "{e}");
    }

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
