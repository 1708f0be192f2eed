//! Generation of one sequence — the plain reference the batch decoder
//! ([`super::scheduler`], which `swift generate` runs) is tested against:
//! greedy when the temperature is 0, else temperature and nucleus
//! (top-p) sampling from a seeded generator. Stops after `max_tokens`, at any
//! end-of-sequence id (kept in the output), or when prompt and output fill the
//! model's context (`max_position_embeddings`); a prompt that fills it alone
//! is refused with the numbers.
//!
//! Memory is bounded by the context, not the prompt: the prompt goes through
//! the model [`PREFILL_CHUNK`] tokens at a time (each chunk continues the KV
//! cache), so attention never holds more than `heads × chunk × context`
//! scores, and only the last chunk's last position is projected to logits.

use rand::{Rng, SeedableRng};

use super::model::{argmax, Decoder, KvCache};
use super::LlmError;

/// How to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Most new tokens.
    pub max_tokens: usize,
    /// 0 for greedy.
    pub temperature: f64,
    /// Nucleus mass kept (1.0 keeps all).
    pub top_p: f64,
    /// Sampling seed.
    pub seed: u64,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self { max_tokens: 256, temperature: 0.0, top_p: 1.0, seed: 0 }
    }
}

/// Prompt tokens per forward pass of the prefill.
pub const PREFILL_CHUNK: usize = 512;

/// Why generation stopped (OpenAI's `finish_reason`: `stop`, or `length` for both others).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence id.
    Stop,
    /// `max_tokens` new tokens.
    Length,
    /// Prompt and output filled the model's context.
    Context,
}

impl Finish {
    /// OpenAI's name for it.
    pub fn reason(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length | Finish::Context => "length",
        }
    }
}

/// The new ids (the stopping eos included) and why generation stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    /// New token ids.
    pub ids: Vec<u32>,
    /// Why it stopped.
    pub finish: Finish,
}

/// Generates after `prompt`.
pub fn generate(
    model: &Decoder,
    prompt: &[u32],
    eos_ids: &[u32],
    options: &GenerateOptions,
    on_token: impl FnMut(u32),
) -> Result<Generation, LlmError> {
    generate_in_chunks(model, prompt, eos_ids, options, PREFILL_CHUNK, on_token)
}

fn generate_in_chunks(
    model: &Decoder,
    prompt: &[u32],
    eos_ids: &[u32],
    options: &GenerateOptions,
    chunk: usize,
    mut on_token: impl FnMut(u32),
) -> Result<Generation, LlmError> {
    check_prompt(model, prompt)?;
    let context = model.config().max_position_embeddings;
    let mut rng = rand::rngs::StdRng::seed_from_u64(options.seed);
    let mut cache = KvCache::default();
    let (head, last) = prompt.split_at(prompt.len() - prompt.len().min(chunk.max(1)));
    for piece in head.chunks(chunk.max(1)) {
        continue_cache(model, piece, &mut cache)?;
    }
    let mut new_ids = Vec::new();
    let mut input: Vec<u32> = last.to_vec();
    loop {
        if new_ids.len() >= options.max_tokens {
            return Ok(Generation { ids: new_ids, finish: Finish::Length });
        }
        // Prompt and answer together stay within the context, as
        // transformers' `max_length` and vLLM's `max_model_len` count them.
        if cache.len() + input.len() >= context {
            return Ok(Generation { ids: new_ids, finish: Finish::Context });
        }
        let start = cache.len() as u32;
        let positions: Vec<u32> = (start..start + input.len() as u32).collect();
        let segments = vec![0; input.len()];
        let logits = model.forward(&input, &positions, &segments, Some(&mut cache), true)?;
        let next = if options.temperature <= 0.0 {
            argmax(&logits)?
        } else {
            sample(&logits.flatten_all()?.to_vec1::<f32>()?, options, &mut rng)
        };
        new_ids.push(next);
        on_token(next);
        if eos_ids.contains(&next) {
            return Ok(Generation { ids: new_ids, finish: Finish::Stop });
        }
        input = vec![next];
    }
}

/// Refuses an empty prompt, and one that leaves no room in the context.
pub fn check_prompt(model: &Decoder, prompt: &[u32]) -> Result<(), LlmError> {
    if prompt.is_empty() {
        return Err(LlmError::Template("the prompt has no tokens".into()));
    }
    let context = model.config().max_position_embeddings;
    if prompt.len() >= context {
        return Err(LlmError::TooLong(format!(
            "the prompt has {} tokens, and the model's context is {context} (max_position_embeddings in config.json): \
             shorten the prompt to at most {} tokens to leave room for an answer",
            prompt.len(),
            context - 1
        )));
    }
    Ok(())
}

/// The next token from one position's logits: the first highest (greedy,
/// as [`argmax`] picks it) or a draw.
pub(crate) fn next_token(logits: &[f32], options: &GenerateOptions, rng: &mut rand::rngs::StdRng) -> u32 {
    if options.temperature > 0.0 {
        return sample(logits, options, rng);
    }
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Runs `tokens` through the model after the cached ones, keeping only
/// their keys and values.
fn continue_cache(model: &Decoder, tokens: &[u32], cache: &mut KvCache) -> Result<(), LlmError> {
    let start = cache.len() as u32;
    let positions: Vec<u32> = (start..start + tokens.len() as u32).collect();
    model.hidden(tokens, &positions, &vec![0; tokens.len()], Some(cache))?;
    Ok(())
}

fn sample(logits: &[f32], options: &GenerateOptions, rng: &mut rand::rngs::StdRng) -> u32 {
    let scaled: Vec<f64> = logits.iter().map(|&l| l as f64 / options.temperature).collect();
    let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut probs: Vec<(usize, f64)> = scaled.iter().map(|l| (l - max).exp()).enumerate().collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (i, p) in probs.iter().enumerate() {
        kept += p.1;
        if kept >= options.top_p {
            cut = i + 1;
            break;
        }
    }
    let nucleus = &probs[..cut];
    let mass: f64 = nucleus.iter().map(|p| p.1).sum();
    let mut draw = rng.random::<f64>() * mass;
    for &(id, p) in nucleus {
        if draw < p {
            return id as u32;
        }
        draw -= p;
    }
    nucleus.last().map_or(0, |p| p.0 as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::linear::DenseLoader;
    use crate::llm::weights::Weights;
    use crate::llm::ModelConfig;
    use candle_core::{DType, Device};

    /// A random model with a context of 24 positions.
    fn short_context_model() -> Decoder {
        let text = r#"{"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50, "max_position_embeddings": 24}"#;
        let config = ModelConfig::parse(std::path::Path::new("bench"), text).unwrap();
        let weights = Weights::random(DType::F32, &Device::Cpu, config.tie_word_embeddings);
        Decoder::from_weights(&weights, config, &DenseLoader).unwrap()
    }

    #[test]
    fn generation_stops_at_the_context_and_long_prompts_are_refused() {
        let model = short_context_model();
        let options = GenerateOptions { max_tokens: 100, ..Default::default() };
        let prompt: Vec<u32> = (1..=20).collect();
        let out = generate(&model, &prompt, &[], &options, |_| {}).unwrap();
        assert_eq!((out.ids.len(), out.finish, out.finish.reason()), (4, Finish::Context, "length"));
        let short = generate(&model, &prompt, &[], &GenerateOptions { max_tokens: 2, ..Default::default() }, |_| {}).unwrap();
        assert_eq!((short.ids.len(), short.finish), (2, Finish::Length));
        let error = generate(&model, &(0..24).collect::<Vec<u32>>(), &[], &options, |_| {}).unwrap_err().to_string();
        assert!(error.contains("the prompt has 24 tokens, and the model's context is 24"), "{error}");
    }

    #[test]
    fn a_chunked_prefill_continues_as_one_pass_does() {
        let model = short_context_model();
        let options = GenerateOptions { max_tokens: 5, ..Default::default() };
        let prompt: Vec<u32> = (3..20).collect();
        let whole = generate_in_chunks(&model, &prompt, &[], &options, 64, |_| {}).unwrap();
        for chunk in [1, 4, 5] {
            assert_eq!(generate_in_chunks(&model, &prompt, &[], &options, chunk, |_| {}).unwrap(), whole, "chunks of {chunk}");
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus_and_seeds_repeat() {
        let logits = [10.0f32, 9.0, -20.0, -20.0];
        let options = GenerateOptions { temperature: 1.0, top_p: 0.5, ..Default::default() };
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert!((0..50).all(|_| sample(&logits, &options, &mut rng) == 0));
        let wide = GenerateOptions { temperature: 1.0, top_p: 1.0, ..Default::default() };
        let draws = |seed| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            (0..20).map(|_| sample(&logits, &wide, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        assert!(draws(7).iter().all(|&id| id < 2));
    }
}
