//! Log-likelihood scoring, as lm-evaluation-harness computes it, with a
//! subject's shared k-shot prefix computed once.
//!
//! A continuation's tokens are `tokenize(context + continuation)` past the
//! context's own tokens (lm-eval's `_encode_pair`, trailing whitespace of the
//! context moved into the continuation first); its score is the sum of their
//! log-probabilities given everything before them. Where the four
//! continuations differ only in their last token (single tokens, or a shared
//! space token and the letter), one pass scores them all; otherwise each
//! choice is its own sequence.
//!
//! The sequences of a subject share a prefix (header and shots): it runs once
//! into a [`KvCache`] that every later token may attend to. The rest of each
//! sequence is packed with others into rows of about [`ROW_TOKENS`] tokens,
//! each its own segment (so packed questions never see each other) with
//! positions continuing after the prefix, and only the positions whose
//! next-token distribution is needed go through `lm_head`.

use candle_core::{DType, Tensor};

use crate::llm::model::KvCache;
use crate::llm::{Decoder, TextTokenizer};

/// Tokens packed into one forward pass (after the shared prefix).
pub const ROW_TOKENS: usize = 384;

/// One question's tokens: its context and the four continuations.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    /// The context's tokens.
    pub context: Vec<u32>,
    /// Each continuation's tokens, A–D.
    pub continuations: [Vec<u32>; 4],
}

impl Encoded {
    /// Tokenizes a context and its continuations as lm-eval does. `rendered`
    /// text (a chat template's output) holds its special tokens already.
    pub fn new(tokenizer: &TextTokenizer, context: &str, continuations: &[String; 4], rendered: bool) -> anyhow::Result<Encoded> {
        let encode = |text: &str| if rendered { tokenizer.encode_rendered(text) } else { tokenizer.encode(text) };
        let trimmed = context.trim_end();
        let moved = &context[trimmed.len()..];
        let context_tokens = encode(trimmed)?;
        let mut out: [Vec<u32>; 4] = Default::default();
        for (slot, continuation) in out.iter_mut().zip(continuations) {
            let whole = encode(&format!("{trimmed}{moved}{continuation}"))?;
            *slot = whole.get(context_tokens.len()..).unwrap_or_default().to_vec();
            if slot.is_empty() {
                anyhow::bail!(
                    "the continuation {continuation:?} adds no tokens after the context (the tokenizer merged it into the context's end); \
                     try the other `template`, whose continuations are delimited differently"
                );
            }
        }
        Ok(Encoded { context: context_tokens, continuations: out })
    }

    /// Tokens the longest sequence of this question needs.
    pub fn max_len(&self) -> usize {
        self.context.len() + self.continuations.iter().map(Vec::len).max().unwrap_or(0)
    }

    /// Whether the tokens fed (context and continuation but its last token)
    /// fit `positions` positions.
    pub fn fits(&self, positions: usize) -> bool {
        self.max_len() <= positions + 1
    }

    /// Cuts context tokens from the front until the tokens fed fit `positions`
    /// (lm-eval keeps the last `max_length + 1` of context + continuation).
    pub fn truncate_left(&mut self, positions: usize) {
        let excess = self.max_len().saturating_sub(positions + 1);
        self.context.drain(..excess.min(self.context.len().saturating_sub(1)));
    }

    /// The sequences to run: one where the continuations differ only in their
    /// last token (single tokens, or `Ġ` + letter in byte-level BPEs that split
    /// off the space), else one per choice.
    fn sequences(&self, question: usize) -> Vec<Sequence> {
        let last = self.context.len() - 1;
        let first = &self.continuations[0];
        let shared = &first[..first.len() - 1];
        if self.continuations.iter().all(|c| c.len() == first.len() && c.starts_with(shared)) {
            let mut tokens = self.context.clone();
            tokens.extend_from_slice(shared);
            let targets = (0..4).map(|choice| Target { choice, first: last, tokens: self.continuations[choice].clone() }).collect();
            return vec![Sequence { question, tokens, targets }];
        }
        (0..4)
            .map(|choice| {
                let continuation = &self.continuations[choice];
                let mut tokens = self.context.clone();
                tokens.extend_from_slice(&continuation[..continuation.len() - 1]);
                Sequence { question, tokens, targets: vec![Target { choice, first: last, tokens: continuation.clone() }] }
            })
            .collect()
    }
}

/// Tokens fed to the model and the log-likelihoods read from them.
struct Sequence {
    question: usize,
    tokens: Vec<u32>,
    targets: Vec<Target>,
}

/// A continuation whose `j`-th token is predicted at position `first + j`.
struct Target {
    choice: usize,
    first: usize,
    tokens: Vec<u32>,
}

/// How to score.
#[derive(Clone, Copy, Debug)]
pub struct ScoreOptions {
    /// Compute the shared prefix once (off: every sequence from its start).
    pub reuse_prefix: bool,
    /// Tokens per packed row.
    pub row_tokens: usize,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        Self { reuse_prefix: true, row_tokens: ROW_TOKENS }
    }
}

/// Summed log-likelihoods of A–D for each question of one subject.
/// `cancelled` is polled between rows.
pub fn score(decoder: &Decoder, questions: &[Encoded], options: ScoreOptions, cancelled: &dyn Fn() -> bool)
    -> anyhow::Result<Vec<[f64; 4]>> {
    let sequences: Vec<Sequence> = questions.iter().enumerate().flat_map(|(i, q)| q.sequences(i)).collect();
    let mut results = vec![[0.0f64; 4]; questions.len()];
    if sequences.is_empty() {
        return Ok(results);
    }
    // A sliding window counts row indices, not positions: a shared prefix is
    // exact only while every sequence fits the window.
    let window_ok = decoder.config().sliding_window.is_none_or(|w| sequences.iter().all(|s| s.tokens.len() <= w));
    let prefix = if options.reuse_prefix && window_ok { shared_prefix(&sequences) } else { 0 };
    let cache = match prefix {
        0 => None,
        p => {
            let tokens = &sequences[0].tokens[..p];
            let positions: Vec<u32> = (0..p as u32).collect();
            let mut cache = KvCache::default();
            decoder.hidden(tokens, &positions, &vec![0; p], Some(&mut cache))?;
            cache.share();
            Some(cache)
        }
    };
    let mut start = 0;
    while start < sequences.len() {
        if cancelled() {
            return Err(swift_engine::kind::Cancelled.into());
        }
        let mut end = start + 1;
        let mut len = sequences[start].tokens.len() - prefix;
        while end < sequences.len() && len + sequences[end].tokens.len() - prefix <= options.row_tokens {
            len += sequences[end].tokens.len() - prefix;
            end += 1;
        }
        score_row(decoder, &sequences[start..end], prefix, cache.clone(), &mut results)?;
        start = end;
    }
    Ok(results)
}

/// The longest prefix every sequence shares, short of every scored position.
fn shared_prefix(sequences: &[Sequence]) -> usize {
    let first = &sequences[0].tokens;
    let mut len = sequences.iter().flat_map(|s| s.targets.iter().map(|t| t.first)).min().unwrap_or(0);
    for s in &sequences[1..] {
        len = len.min(first.iter().zip(&s.tokens).take_while(|(a, b)| a == b).count());
    }
    len
}

/// Runs one packed row after the prefix and adds its log-likelihoods.
fn score_row(decoder: &Decoder, row: &[Sequence], prefix: usize, mut cache: Option<KvCache>, results: &mut [[f64; 4]])
    -> anyhow::Result<()> {
    let (mut tokens, mut positions, mut segments) = (Vec::new(), Vec::new(), Vec::new());
    let mut wanted: Vec<u32> = Vec::new();
    let mut reads: Vec<(usize, usize, u32)> = Vec::new(); // (question, choice, token) per wanted row
    for (n, s) in row.iter().enumerate() {
        let offset = tokens.len();
        tokens.extend_from_slice(&s.tokens[prefix..]);
        positions.extend((prefix..s.tokens.len()).map(|p| p as u32));
        segments.extend(std::iter::repeat_n(n as u32 + 1, s.tokens.len() - prefix));
        for t in &s.targets {
            for (j, &token) in t.tokens.iter().enumerate() {
                wanted.push((offset + t.first + j - prefix) as u32);
                reads.push((s.question, t.choice, token));
            }
        }
    }
    let hidden = decoder.hidden(&tokens, &positions, &segments, cache.as_mut())?;
    // The four choices of a question read the same positions: run lm_head once per position.
    let mut unique = wanted.clone();
    unique.sort_unstable();
    unique.dedup();
    let index = Tensor::new(unique.as_slice(), hidden.device())?;
    let logits = decoder.lm_head().forward(&hidden.index_select(&index, 0)?.unsqueeze(0)?)?.squeeze(0)?.to_dtype(DType::F32)?;
    let logits: Vec<Vec<f32>> = logits.to_vec2()?;
    let log_norms: Vec<f64> = logits.iter().map(|row| log_sum_exp(row)).collect();
    for (&position, &(question, choice, token)) in wanted.iter().zip(&reads) {
        let u = unique.binary_search(&position).expect("every wanted position is in unique");
        results[question][choice] += f64::from(logits[u][token as usize]) - log_norms[u];
    }
    Ok(())
}

fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&x| f64::from(x - max).exp()).sum();
    f64::from(max) + sum.ln()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use candle_core::Device;

    use super::*;
    use crate::llm::linear::DenseLoader;
    use crate::llm::ModelConfig;

    fn tiny() -> Decoder {
        let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/qwen2-tiny");
        let config = ModelConfig::load(&folder).unwrap();
        Decoder::load(&folder, config, DType::F32, &Device::Cpu, &DenseLoader).unwrap()
    }

    /// Log-likelihoods from full forward passes, one per continuation.
    fn naive(decoder: &Decoder, q: &Encoded) -> [f64; 4] {
        let mut out = [0.0; 4];
        for (choice, continuation) in q.continuations.iter().enumerate() {
            let mut tokens = q.context.clone();
            tokens.extend_from_slice(continuation);
            let fed = &tokens[..tokens.len() - 1];
            let positions: Vec<u32> = (0..fed.len() as u32).collect();
            let logits: Vec<Vec<f32>> = decoder.forward(fed, &positions, &vec![0; fed.len()], None, false).unwrap().to_vec2().unwrap();
            for (j, &token) in continuation.iter().enumerate() {
                let row = &logits[q.context.len() - 1 + j];
                out[choice] += f64::from(row[token as usize]) - log_sum_exp(row);
            }
        }
        out
    }

    fn question(prefix: &[u32], own: &[u32], continuations: [&[u32]; 4]) -> Encoded {
        let mut context = prefix.to_vec();
        context.extend_from_slice(own);
        Encoded { context, continuations: continuations.map(<[u32]>::to_vec) }
    }

    #[test]
    fn packed_rows_after_a_shared_prefix_match_full_passes() {
        let decoder = tiny();
        let prefix: Vec<u32> = (0..40).map(|i| 50 + i * 7 % 300).collect();
        let questions = vec![
            // Single-token letters: one sequence, four reads at its end.
            question(&prefix, &[11, 12, 13], [&[300], &[301], &[302], &[303]]),
            // Letters of several tokens: a sequence per choice.
            question(&prefix, &[21, 22], [&[300, 5], &[301], &[302, 6, 7], &[303, 8]]),
            // A shared first token and the letter: one sequence.
            question(&prefix, &[41], [&[9, 300], &[9, 301], &[9, 302], &[9, 303]]),
            question(&prefix, &[31, 32, 33, 34, 35], [&[300], &[301], &[302], &[303]]),
        ];
        for options in [ScoreOptions::default(), ScoreOptions { reuse_prefix: true, row_tokens: 4 }, ScoreOptions { reuse_prefix: false, row_tokens: 1 }] {
            let got = score(&decoder, &questions, options, &|| false).unwrap();
            for (q, g) in questions.iter().zip(&got) {
                let want = naive(&decoder, q);
                for (a, b) in g.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-4, "{options:?}: {g:?} vs {want:?}");
                }
            }
        }
    }

    #[test]
    fn the_shared_prefix_stops_before_every_scored_position() {
        let decoder = tiny();
        // One question alone: the prefix may not swallow its last context token.
        let questions = vec![question(&[1, 2, 3, 4], &[], [&[300], &[301], &[302], &[303]])];
        let got = score(&decoder, &questions, ScoreOptions::default(), &|| false).unwrap();
        let want = naive(&decoder, &questions[0]);
        for (a, b) in got[0].iter().zip(&want) {
            assert!((a - b).abs() < 1e-4);
        }
    }

    #[test]
    fn left_truncation_keeps_the_end_of_the_context() {
        let mut q = question(&[1, 2, 3, 4, 5, 6], &[], [&[7], &[8, 9], &[7], &[7]]);
        assert!(!q.fits(5));
        q.truncate_left(5);
        // Five tokens fed: 3, 4, 5, 6 and the 8 of `8 9`.
        assert_eq!(q.context, vec![3, 4, 5, 6]);
        assert!(q.fits(5));
    }
}
