//! Generation: greedy when the temperature is 0, else temperature and nucleus
//! (top-p) sampling from a seeded generator. Stops after `max_tokens` or at any
//! end-of-sequence id, which is kept in the output.

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

/// Generates after `prompt`; returns the new ids (the stopping eos included).
pub fn generate(
    model: &Decoder,
    prompt: &[u32],
    eos_ids: &[u32],
    options: &GenerateOptions,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>, LlmError> {
    if prompt.is_empty() {
        return Err(LlmError::Template("the prompt has no tokens".into()));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(options.seed);
    let mut cache = KvCache::default();
    let mut new_ids = Vec::new();
    let mut input: Vec<u32> = prompt.to_vec();
    while new_ids.len() < options.max_tokens {
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
            break;
        }
        input = vec![next];
    }
    Ok(new_ids)
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
