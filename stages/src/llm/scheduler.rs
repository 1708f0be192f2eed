//! Generation for many prompts at once, on the [`BatchDecoder`]: what
//! `swift generate --prompt-file` runs, and what a server's requests will.
//!
//! At most `max_seqs` sequences are live; the others wait in order and join
//! as sequences end (continuous batching). Each step feeds every decoding
//! sequence its last sampled token and spends the rest of a `step_tokens`
//! budget on prompt chunks of the prefilling ones, so prefill and decode mix
//! in one pass and memory stays bounded by the budget and the context.
//!
//! Prompts that start alike share their keys and values: every full block of
//! a prompt that has been computed is registered under a chained blake3 of
//! its tokens, and a joining prompt starts on the longest registered prefix
//! (a fork of those blocks) and computes only the rest. A prompt whose prefix
//! a live sequence is still computing waits for it rather than computing it
//! twice. A sequence's output is what [`super::generate::generate`] gives for
//! it alone: the same stops, the same seeded draws.

use std::collections::{HashMap, VecDeque};

use rand::SeedableRng;

use super::batch::{BatchDecoder, SeqId};
use super::generate::{check_prompt, next_token, Finish, GenerateOptions, Generation};
use super::kv_blocks::BLOCK_TOKENS;
use super::model::Decoder;
use super::LlmError;

/// How many sequences and tokens a step may hold.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    /// Live sequences at most.
    pub max_seqs: usize,
    /// Tokens per forward pass at most (decode tokens and prompt chunks).
    pub step_tokens: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self { max_seqs: 32, step_tokens: 512 }
    }
}

/// One prompt and how to continue it.
#[derive(Clone, Debug)]
pub struct Request {
    /// Prompt ids.
    pub prompt: Vec<u32>,
    /// Its options (each request samples from its own seeded generator).
    pub options: GenerateOptions,
}

/// A live sequence.
struct Live {
    request: usize,
    id: SeqId,
    /// Prompt tokens cached so far.
    fed: usize,
    /// The sampled token to feed next (decoding).
    next: u32,
    ids: Vec<u32>,
    rng: rand::rngs::StdRng,
}

/// What a batch computed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Prompt tokens run through the model.
    pub prompt_tokens_computed: usize,
    /// Prompt tokens whose keys and values came from a shared prefix.
    pub prompt_tokens_cached: usize,
    /// Forward passes.
    pub steps: usize,
    /// Bytes the KV block pool grew to.
    pub cache_bytes: usize,
}

/// Generates for every request; `on_token(request, id)` sees each new token.
/// Results are in request order.
pub fn generate_all(
    model: &Decoder,
    requests: &[Request],
    eos_ids: &[u32],
    limits: BatchLimits,
    mut on_token: impl FnMut(usize, u32),
) -> Result<(Vec<Generation>, BatchStats), LlmError> {
    for request in requests {
        check_prompt(model, &request.prompt)?;
    }
    let max_seqs = limits.max_seqs.clamp(1, limits.step_tokens.saturating_sub(1).max(1));
    let context = model.config().max_position_embeddings;
    let mut batch = BatchDecoder::new(model);
    let mut prefixes = Prefixes::default();
    let mut results: Vec<Option<Generation>> = vec![None; requests.len()];
    let mut queue: VecDeque<usize> = VecDeque::new();
    for (r, request) in requests.iter().enumerate() {
        if request.options.max_tokens == 0 {
            results[r] = Some(Generation { ids: Vec::new(), finish: Finish::Length });
        } else {
            queue.push_back(r);
        }
    }
    let mut live: Vec<Live> = Vec::new();
    let mut stats = BatchStats::default();
    loop {
        stats.prompt_tokens_cached += admit(&mut batch, &mut prefixes, requests, &mut queue, &mut live, max_seqs);
        if live.is_empty() {
            break;
        }
        let feeds = plan_step(requests, &live, limits.step_tokens);
        stats.steps += 1;
        let views: Vec<(SeqId, &[u32])> = feeds.iter().map(|(i, tokens)| (live[*i].id, tokens.as_slice())).collect();
        let logits = batch.step(&views)?;
        stats.cache_bytes = stats.cache_bytes.max(batch.cache_bytes());
        let mut ended = Vec::new();
        for ((i, tokens), logits) in feeds.iter().zip(logits) {
            let l = &mut live[*i];
            let prompt = &requests[l.request].prompt;
            if l.fed < prompt.len() {
                let before = l.fed;
                l.fed += tokens.len();
                stats.prompt_tokens_computed += tokens.len();
                prefixes.register(&mut batch, l.id, prompt, before, l.fed);
                if l.fed < prompt.len() {
                    continue;
                }
            }
            let options = &requests[l.request].options;
            let next = next_token(&logits, options, &mut l.rng);
            l.ids.push(next);
            on_token(l.request, next);
            let finish = if eos_ids.contains(&next) {
                Some(Finish::Stop)
            } else if l.ids.len() >= options.max_tokens {
                Some(Finish::Length)
            } else if batch.len(l.id) + 1 >= context {
                Some(Finish::Context)
            } else {
                None
            };
            match finish {
                Some(finish) => ended.push((*i, finish)),
                None => l.next = next,
            }
        }
        ended.sort_by(|a, b| b.0.cmp(&a.0));
        for (i, finish) in ended {
            let l = live.swap_remove(i);
            batch.remove(l.id);
            results[l.request] = Some(Generation { ids: l.ids, finish });
        }
    }
    prefixes.release(&mut batch);
    Ok((results.into_iter().map(|r| r.expect("every request finished")).collect(), stats))
}

/// Moves waiting requests into the batch while there is room, each starting
/// on the longest computed prefix of its prompt; returns the prompt tokens
/// that prefixes spared.
fn admit(
    batch: &mut BatchDecoder<'_>,
    prefixes: &mut Prefixes,
    requests: &[Request],
    queue: &mut VecDeque<usize>,
    live: &mut Vec<Live>,
    max_seqs: usize,
) -> usize {
    let mut cached = 0;
    while live.len() < max_seqs {
        let Some(&r) = queue.front() else { break };
        let prompt = &requests[r].prompt;
        // At least the prompt's last token is computed: its logits start the answer.
        let shareable = (prompt.len() - 1) / BLOCK_TOKENS;
        let found = prefixes.longest(prompt, shareable);
        let coming = live
            .iter()
            .filter(|l| l.fed < requests[l.request].prompt.len())
            .map(|l| common_blocks(prompt, &requests[l.request].prompt).min(shareable))
            .max()
            .unwrap_or(0);
        if coming > found.map_or(0, |(blocks, _)| blocks) {
            break; // a live sequence is computing more of this prompt: wait for it
        }
        queue.pop_front();
        let (id, fed) = match found {
            Some((blocks, holder)) => (batch.fork(holder, blocks * BLOCK_TOKENS), blocks * BLOCK_TOKENS),
            None => (batch.add(), 0),
        };
        let rng = rand::rngs::StdRng::seed_from_u64(requests[r].options.seed);
        live.push(Live { request: r, id, fed, next: 0, ids: Vec::new(), rng });
        cached += fed;
    }
    cached
}

/// This step's feeds, as (index into `live`, tokens): every decoding
/// sequence's next token, then prompt chunks within what is left of the budget.
fn plan_step(requests: &[Request], live: &[Live], step_tokens: usize) -> Vec<(usize, Vec<u32>)> {
    let mut feeds = Vec::new();
    let mut budget = step_tokens;
    for (i, l) in live.iter().enumerate() {
        if l.fed == requests[l.request].prompt.len() {
            feeds.push((i, vec![l.next]));
            budget = budget.saturating_sub(1);
        }
    }
    for (i, l) in live.iter().enumerate() {
        let prompt = &requests[l.request].prompt;
        if l.fed < prompt.len() && budget > 0 {
            let take = (prompt.len() - l.fed).min(budget);
            feeds.push((i, prompt[l.fed..l.fed + take].to_vec()));
            budget -= take;
        }
    }
    feeds
}

/// Leading full blocks two prompts have in common.
fn common_blocks(a: &[u32], b: &[u32]) -> usize {
    a.chunks_exact(BLOCK_TOKENS).zip(b.chunks_exact(BLOCK_TOKENS)).take_while(|(x, y)| x == y).count()
}

/// Computed prompt prefixes, by a chained blake3 of their full blocks: each
/// held by a sequence of the batch that shares their blocks and is never fed.
#[derive(Default)]
struct Prefixes {
    held: HashMap<[u8; 32], SeqId>,
}

impl Prefixes {
    /// The chained digests of `prompt`'s first `blocks` full blocks.
    fn digests(prompt: &[u32], blocks: usize) -> impl Iterator<Item = [u8; 32]> + '_ {
        prompt.chunks_exact(BLOCK_TOKENS).take(blocks).scan([0u8; 32], |chain, block| {
            let mut hasher = blake3::Hasher::new();
            hasher.update(chain);
            block.iter().for_each(|t| {
                hasher.update(&t.to_le_bytes());
            });
            *chain = *hasher.finalize().as_bytes();
            Some(*chain)
        })
    }

    /// The longest registered prefix of at most `blocks` blocks: its block
    /// count and holder.
    fn longest(&self, prompt: &[u32], blocks: usize) -> Option<(usize, SeqId)> {
        Self::digests(prompt, blocks).enumerate().filter_map(|(i, d)| self.held.get(&d).map(|&id| (i + 1, id))).last()
    }

    /// Registers the full blocks of `prompt` that sequence `id` completed
    /// while its cached prompt tokens went from `before` to `after`.
    fn register(&mut self, batch: &mut BatchDecoder<'_>, id: SeqId, prompt: &[u32], before: usize, after: usize) {
        let (from, to) = (before / BLOCK_TOKENS, after / BLOCK_TOKENS);
        for (i, digest) in Self::digests(prompt, to).enumerate().skip(from) {
            if !self.held.contains_key(&digest) {
                let holder = batch.fork(id, (i + 1) * BLOCK_TOKENS);
                self.held.insert(digest, holder);
            }
        }
    }

    /// Gives every held prefix's blocks back.
    fn release(self, batch: &mut BatchDecoder<'_>) {
        for holder in self.held.into_values() {
            batch.remove(holder);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::generate::generate;
    use crate::llm::linear::DenseLoader;
    use crate::llm::weights::Weights;
    use crate::llm::ModelConfig;
    use candle_core::{DType, Device};

    /// A random model with a context of 200 positions; `extra` adds config keys.
    fn model(extra: &str) -> Decoder {
        let text = format!(
            r#"{{"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50, "max_position_embeddings": 200{extra}}}"#
        );
        let config = ModelConfig::parse(std::path::Path::new("test"), &text).unwrap();
        let weights = Weights::random(DType::F32, &Device::Cpu, config.tie_word_embeddings);
        Decoder::from_weights(&weights, config, &DenseLoader).unwrap()
    }

    fn prompt(seed: u32, len: usize) -> Vec<u32> {
        (0..len as u32).map(|i| (i * 7 + seed * 13) % 50).collect()
    }

    fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Request {
        Request { prompt, options: GenerateOptions { max_tokens, ..Default::default() } }
    }

    /// Every request as `generate` decodes it alone.
    fn alone(model: &Decoder, requests: &[Request], eos: &[u32]) -> Vec<Generation> {
        requests.iter().map(|r| generate(model, &r.prompt, eos, &r.options, |_| {}).unwrap()).collect()
    }

    #[test]
    fn a_batch_of_mixed_lengths_decodes_as_each_alone() {
        let model = model("");
        let requests: Vec<Request> = [1, 5, 16, 17, 40, 70].iter().enumerate().map(|(i, &n)| greedy(prompt(i as u32, n), 10 + i)).collect();
        let (out, stats) = generate_all(&model, &requests, &[], BatchLimits::default(), |_, _| {}).unwrap();
        assert_eq!(out, alone(&model, &requests, &[]));
        assert_eq!(stats.prompt_tokens_computed, 149);
        assert_eq!(stats.prompt_tokens_cached, 0, "nothing in common");
    }

    #[test]
    fn sequences_join_and_leave_mid_run_with_chunked_prompts() {
        let model = model("");
        let mut requests: Vec<Request> = (0..7).map(|i| greedy(prompt(i, 3 + 11 * i as usize), 2 + 3 * (i as usize % 3))).collect();
        requests[2].options.max_tokens = 0;
        // An eos that ends some answers early; sampled requests draw as they would alone.
        requests[4].options = GenerateOptions { max_tokens: 9, temperature: 0.8, top_p: 0.9, seed: 3 };
        let eos = [7];
        let limits = BatchLimits { max_seqs: 3, step_tokens: 24 };
        let (out, stats) = generate_all(&model, &requests, &eos, limits, |_, _| {}).unwrap();
        assert_eq!(out, alone(&model, &requests, &eos));
        assert!(stats.steps > 7, "prompts went in chunks: {stats:?}");
    }

    #[test]
    fn shared_prefixes_are_computed_once() {
        let model = model("");
        let system = prompt(9, 40); // two full blocks and a part
        let requests: Vec<Request> = (0..4).map(|i| greedy([system.clone(), prompt(i, 5 + i as usize)].concat(), 6)).collect();
        let (out, stats) = generate_all(&model, &requests, &[], BatchLimits::default(), |_, _| {}).unwrap();
        assert_eq!(out, alone(&model, &requests, &[]));
        assert_eq!(stats.prompt_tokens_cached, 3 * 32, "each later prompt starts on the first's two blocks");
        assert_eq!(stats.prompt_tokens_computed, 4 * 40 + (5 + 6 + 7 + 8) - 3 * 32);
    }

    #[test]
    fn a_sliding_window_model_decodes_as_alone() {
        let model = model(r#", "use_sliding_window": true, "sliding_window": 12, "max_window_layers": 0"#);
        assert_eq!(model.config().sliding_window, Some(12));
        let requests: Vec<Request> = [3, 20, 45].iter().enumerate().map(|(i, &n)| greedy(prompt(i as u32, n), 25)).collect();
        let (out, _) = generate_all(&model, &requests, &[], BatchLimits { max_seqs: 8, step_tokens: 16 }, |_, _| {}).unwrap();
        assert_eq!(out, alone(&model, &requests, &[]));
    }

    #[test]
    fn answers_stop_at_the_context_and_long_prompts_are_refused() {
        let model = model("");
        let requests = vec![greedy(prompt(1, 190), 50), greedy(prompt(2, 4), 3)];
        let (out, _) = generate_all(&model, &requests, &[], BatchLimits::default(), |_, _| {}).unwrap();
        assert_eq!((out[0].ids.len(), out[0].finish), (10, Finish::Context));
        assert_eq!(out, alone(&model, &requests, &[]));
        let error = generate_all(&model, &[greedy(prompt(1, 200), 1)], &[], BatchLimits::default(), |_, _| {}).unwrap_err();
        assert!(error.to_string().contains("the prompt has 200 tokens"), "{error}");
    }
}
