//! The quality report: held-out perplexity of the full-precision, RTN and AWQ
//! models, and per-layer output errors, as JSON and as a Markdown table.

use candle_core::{DType, Tensor, D};
use serde::Serialize;

use super::search::LayerReport;
use crate::llm::Decoder;

/// Perplexity over the held-out blocks: `exp` of the mean next-token
/// negative log-likelihood, each block a sequence of its own.
pub fn perplexity(decoder: &Decoder, blocks: &[Vec<u32>]) -> anyhow::Result<f64> {
    let mut nll = 0f64;
    let mut count = 0usize;
    for block in blocks {
        let t = block.len();
        let positions: Vec<u32> = (0..t as u32).collect();
        let logits = decoder.forward(block, &positions, &vec![0; t], None, false)?;
        let log_probs = candle_nn::ops::log_softmax(&logits.narrow(0, 0, t - 1)?, D::Minus1)?;
        let targets = Tensor::new(&block[1..], logits.device())?.unsqueeze(1)?;
        let picked = log_probs.gather(&targets, 1)?.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        nll -= picked;
        count += t - 1;
    }
    Ok((nll / count.max(1) as f64).exp())
}

/// Held-out perplexities.
#[derive(Clone, Debug, Serialize)]
pub struct Perplexities {
    /// The model before quantization.
    pub full_precision: f64,
    /// Round-to-nearest int4.
    pub rtn: f64,
    /// AWQ int4 (absent for `method = "rtn"`).
    pub awq: Option<f64>,
}

/// The report's Markdown.
pub fn markdown(stage: &str, method: &str, group: usize, ppl: &Perplexities, layers: &[LayerReport]) -> String {
    let mut md = format!("# {stage}: {method} int4 quality (group size {group})\n\n");
    md.push_str("Held-out perplexity (lower is better):\n\n| model | perplexity |\n|---|---:|\n");
    md.push_str(&format!("| full precision | {:.4} |\n| RTN int4 | {:.4} |\n", ppl.full_precision, ppl.rtn));
    if let Some(awq) = ppl.awq {
        md.push_str(&format!("| AWQ int4 | {awq:.4} |\n"));
    }
    md.push_str("\nLayer output MSE against full precision on the calibration data:\n\n| layer | RTN | AWQ | α per group (loss RTN → AWQ) |\n|---:|---:|---:|---|\n");
    for l in layers {
        let awq = l.awq_mse.map_or("—".to_string(), |m| format!("{m:.3e}"));
        let groups: Vec<String> = l
            .groups
            .iter()
            .map(|g| {
                let alpha = g.alpha.map_or("none".to_string(), |a| format!("{a:.2}"));
                format!("{} α={alpha} ({:.2e} → {:.2e})", g.group, g.rtn_loss, g.awq_loss)
            })
            .collect();
        md.push_str(&format!("| {} | {:.3e} | {awq} | {} |\n", l.layer, l.rtn_mse, groups.join("; ")));
    }
    md
}
