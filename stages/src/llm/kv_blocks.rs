//! A block KV cache: the keys and values of many sequences in fixed-size
//! blocks drawn from one pool, as vLLM's PagedAttention keeps them.
//!
//! A block holds [`BLOCK_TOKENS`] consecutive tokens of one sequence, for
//! every layer: per layer, `[kv_heads, BLOCK_TOKENS, head_dim]` keys and as
//! many values, in f32 (each head's keys in a block are contiguous, which is
//! how attention reads them). A sequence is a table of block numbers and a
//! length; it takes a block when its length reaches a multiple of the block
//! size and gives its blocks back when it ends, so sequences join and leave
//! a running batch without moving anyone else's cache, and nothing is
//! recopied as a sequence grows.
//!
//! Blocks are reference-counted. [`BlockPool::fork`] starts a sequence on the
//! blocks of another's first tokens (a shared prompt prefix, computed once);
//! the first write into a block someone else also holds copies it first
//! (copy on write), so a fork never changes what the original sees.
//!
//! | operation | cost |
//! |---|---|
//! | append a token | one slot write per layer; a new block every `BLOCK_TOKENS` tokens |
//! | fork `n` tokens | `n / BLOCK_TOKENS` reference counts |
//! | first write into a shared block | one block copy |
//! | free a sequence | its reference counts; blocks at 0 return to the pool |

use super::ModelConfig;

/// Tokens per block.
pub const BLOCK_TOKENS: usize = 16;

/// The pool every sequence's blocks come from.
pub struct BlockPool {
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Per layer, every block's keys back to back.
    keys: Vec<Vec<f32>>,
    /// Per layer, every block's values back to back.
    values: Vec<Vec<f32>>,
    /// Holders of each block; 0 for a free one.
    refs: Vec<u32>,
    free: Vec<usize>,
}

/// One sequence's place in the pool: its blocks in order and how many tokens
/// they hold.
#[derive(Debug, Default)]
pub struct SeqBlocks {
    blocks: Vec<usize>,
    len: usize,
}

impl SeqBlocks {
    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl BlockPool {
    /// An empty pool for `config`'s layers and KV heads.
    pub fn new(config: &ModelConfig) -> Self {
        Self {
            layers: config.num_layers,
            kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            keys: vec![Vec::new(); config.num_layers],
            values: vec![Vec::new(); config.num_layers],
            refs: Vec::new(),
            free: Vec::new(),
        }
    }

    /// Floats of one layer's keys (or values) in one block.
    fn block_floats(&self) -> usize {
        self.kv_heads * BLOCK_TOKENS * self.head_dim
    }

    /// Blocks held by some sequence.
    pub fn blocks_in_use(&self) -> usize {
        self.refs.iter().filter(|&&r| r > 0).count()
    }

    /// Bytes the pool has allocated (free blocks included).
    pub fn bytes(&self) -> usize {
        2 * self.layers * self.refs.len() * self.block_floats() * std::mem::size_of::<f32>()
    }

    fn alloc(&mut self) -> usize {
        let block = self.free.pop().unwrap_or_else(|| {
            let floats = self.block_floats();
            for buffer in self.keys.iter_mut().chain(self.values.iter_mut()) {
                buffer.resize(buffer.len() + floats, 0.0);
            }
            self.refs.push(0);
            self.refs.len() - 1
        });
        self.refs[block] = 1;
        block
    }

    fn release(&mut self, block: usize) {
        self.refs[block] -= 1;
        if self.refs[block] == 0 {
            self.free.push(block);
        }
    }

    /// A new sequence holding the first `tokens` tokens of `seq` (at most its
    /// length), sharing its blocks.
    pub fn fork(&mut self, seq: &SeqBlocks, tokens: usize) -> SeqBlocks {
        let len = tokens.min(seq.len);
        let blocks = seq.blocks[..len.div_ceil(BLOCK_TOKENS)].to_vec();
        for &b in &blocks {
            self.refs[b] += 1;
        }
        SeqBlocks { blocks, len }
    }

    /// Gives a sequence's blocks back.
    pub fn free(&mut self, seq: SeqBlocks) {
        for b in seq.blocks {
            self.release(b);
        }
    }

    /// Makes room for one more token of `seq` and returns its block and slot:
    /// a new block at a block boundary, a private copy of a shared block.
    pub fn push_slot(&mut self, seq: &mut SeqBlocks) -> (usize, usize) {
        let slot = seq.len % BLOCK_TOKENS;
        if slot == 0 {
            let block = self.alloc();
            seq.blocks.push(block);
        } else {
            let last = seq.blocks.len() - 1;
            let shared = seq.blocks[last];
            if self.refs[shared] > 1 {
                let copy = self.alloc();
                self.copy_block(shared, copy);
                self.release(shared);
                seq.blocks[last] = copy;
            }
        }
        seq.len += 1;
        (*seq.blocks.last().expect("a block was just ensured"), slot)
    }

    fn copy_block(&mut self, from: usize, to: usize) {
        let n = self.block_floats();
        for layer in 0..self.layers {
            self.keys[layer].copy_within(from * n..(from + 1) * n, to * n);
            self.values[layer].copy_within(from * n..(from + 1) * n, to * n);
        }
    }

    /// Stores one token's keys and values (`[kv_heads, head_dim]` each) of
    /// `layer` in `slot` of `block`.
    pub fn write(&mut self, layer: usize, (block, slot): (usize, usize), keys: &[f32], values: &[f32]) {
        let (n, d) = (self.block_floats(), self.head_dim);
        for h in 0..self.kv_heads {
            let at = block * n + (h * BLOCK_TOKENS + slot) * d;
            self.keys[layer][at..at + d].copy_from_slice(&keys[h * d..(h + 1) * d]);
            self.values[layer][at..at + d].copy_from_slice(&values[h * d..(h + 1) * d]);
        }
    }

    /// The keys and values of `layer`, KV head `head`, for the cached tokens
    /// `from..to` of `seq`, as runs of contiguous tokens (one per block).
    pub fn runs<'a>(&'a self, layer: usize, head: usize, seq: &'a SeqBlocks, from: usize, to: usize)
        -> impl Iterator<Item = (&'a [f32], &'a [f32])> + 'a {
        let (n, d) = (self.block_floats(), self.head_dim);
        let (keys, values) = (&self.keys[layer], &self.values[layer]);
        (from / BLOCK_TOKENS..to.div_ceil(BLOCK_TOKENS)).map(move |i| {
            let first = (i * BLOCK_TOKENS).max(from) - i * BLOCK_TOKENS;
            let last = ((i + 1) * BLOCK_TOKENS).min(to) - i * BLOCK_TOKENS;
            let at = seq.blocks[i] * n + head * BLOCK_TOKENS * d;
            (&keys[at + first * d..at + last * d], &values[at + first * d..at + last * d])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> BlockPool {
        let text = r#"{"model_type": "qwen2", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 10}"#;
        BlockPool::new(&ModelConfig::parse(std::path::Path::new("test"), text).unwrap())
    }

    /// Appends `n` tokens whose keys are `base + position` (values the negation).
    fn append(pool: &mut BlockPool, seq: &mut SeqBlocks, n: usize, base: f32) {
        for _ in 0..n {
            let p = seq.len() as f32;
            let slot = pool.push_slot(seq);
            for layer in 0..2 {
                pool.write(layer, slot, &[base + p; 4], &[-(base + p); 4]);
            }
        }
    }

    fn keys(pool: &BlockPool, seq: &SeqBlocks) -> Vec<f32> {
        pool.runs(1, 0, seq, 0, seq.len()).flat_map(|(k, _)| k.chunks(4).map(|t| t[0]).collect::<Vec<_>>()).collect()
    }

    #[test]
    fn sequences_grow_block_by_block_and_read_back_in_order() {
        let mut pool = pool();
        let mut seq = SeqBlocks::default();
        append(&mut pool, &mut seq, 40, 0.0);
        assert_eq!(pool.blocks_in_use(), 3);
        assert_eq!(keys(&pool, &seq), (0..40).map(|p| p as f32).collect::<Vec<_>>());
        let window: Vec<f32> = pool.runs(0, 0, &seq, 13, 35).flat_map(|(_, v)| v.chunks(4).map(|t| t[0]).collect::<Vec<_>>()).collect();
        assert_eq!(window, (13..35).map(|p| -(p as f32)).collect::<Vec<_>>());
        pool.free(seq);
        assert_eq!(pool.blocks_in_use(), 0);
        let mut again = SeqBlocks::default();
        append(&mut pool, &mut again, 20, 0.0);
        assert_eq!(pool.refs.len(), 3, "freed blocks are reused");
    }

    #[test]
    fn forks_share_blocks_and_copy_on_write() {
        let mut pool = pool();
        let mut prompt = SeqBlocks::default();
        append(&mut pool, &mut prompt, 20, 0.0);
        let mut a = pool.fork(&prompt, 20);
        let mut b = pool.fork(&prompt, 18);
        assert_eq!(pool.blocks_in_use(), 2, "forks hold the same blocks");
        append(&mut pool, &mut a, 5, 100.0);
        append(&mut pool, &mut b, 3, 200.0);
        assert_eq!(pool.blocks_in_use(), 4, "each fork copied the shared partial block once");
        assert_eq!(keys(&pool, &prompt), (0..20).map(|p| p as f32).collect::<Vec<_>>(), "the original is untouched");
        let expect = |n: usize, tail: usize, base: f32| -> Vec<f32> {
            (0..n).map(|p| p as f32).chain((n..n + tail).map(|p| base + p as f32)).collect()
        };
        assert_eq!(keys(&pool, &a), expect(20, 5, 100.0));
        assert_eq!(keys(&pool, &b), expect(18, 3, 200.0));
        pool.free(prompt);
        pool.free(a);
        assert_eq!(pool.blocks_in_use(), 2, "b still holds the first block and its copy");
        pool.free(b);
        assert_eq!(pool.blocks_in_use(), 0);
    }
}
