//! Training examples from token shards: one packed row at a time, with RoPE
//! positions restarting per sample, segment ids for the block-diagonal mask,
//! and the (position, next token) pairs the loss is taken on — only labelled
//! tokens, never across a sample boundary. The row order is a fresh
//! permutation per epoch, a pure function of the seed and the epoch, so a
//! resumed run sees exactly the rows an uninterrupted one would.

use crate::llm::lora::SplitMix64;
use crate::llm::model::packed_layout;
use crate::preprocess::shards::RowView;

/// One packed row, ready for the decoder and the loss.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<u32>,
    /// RoPE positions (restarting per sample).
    pub positions: Vec<u32>,
    /// Sample index per token.
    pub segments: Vec<u32>,
    /// Positions whose hidden state predicts a labelled token.
    pub predict_at: Vec<u32>,
    /// The token each of those positions should predict.
    pub targets: Vec<u32>,
}

impl Example {
    /// Builds the example of one row.
    pub fn from_row(row: &RowView<'_>) -> Self {
        let ids = row.ids();
        let mut bounds = row.sample_starts.clone();
        bounds.push(row.len());
        let lengths: Vec<usize> = bounds.windows(2).map(|w| w[1] - w[0]).collect();
        let (positions, segments) = packed_layout(&lengths);
        let mut predict_at = Vec::new();
        let mut targets = Vec::new();
        for i in 1..ids.len() {
            if row.labels[i] == 1 && segments[i] == segments[i - 1] {
                predict_at.push(i as u32 - 1);
                targets.push(ids[i]);
            }
        }
        Self { ids, positions, segments, predict_at, targets }
    }
}

/// Which row the k-th training row of the run is.
pub struct RowOrder {
    rows: usize,
    seed: u64,
    cached: Option<(usize, Vec<usize>)>,
}

impl RowOrder {
    /// The order over `rows` rows.
    pub fn new(rows: usize, seed: u64) -> Self {
        Self { rows, seed, cached: None }
    }

    /// The row at stream position `k` (epoch `k / rows`).
    pub fn row_at(&mut self, k: usize) -> usize {
        let epoch = k / self.rows;
        if self.cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut rng = SplitMix64::keyed(self.seed, "epoch", epoch as u64);
            let mut order: Vec<usize> = (0..self.rows).collect();
            for i in (1..order.len()).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                order.swap(i, j);
            }
            self.cached = Some((epoch, order));
        }
        self.cached.as_ref().expect("just set").1[k % self.rows]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_permutations_and_reproducible() {
        let mut a = RowOrder::new(10, 7);
        let first: Vec<usize> = (0..10).map(|k| a.row_at(k)).collect();
        let mut sorted = first.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        let second: Vec<usize> = (10..20).map(|k| a.row_at(k)).collect();
        assert_ne!(first, second);
        let mut b = RowOrder::new(10, 7);
        assert_eq!(b.row_at(13), second[3]);
    }
}
