//! Fused cross-entropy over rows of logits: the loss of each row and its
//! gradient in one parallel pass each, instead of the half-dozen full passes a
//! composed log-softmax takes over a `[tokens, vocab]` matrix (the largest
//! activation of a language model). Rows are independent, so the results do
//! not depend on the thread count.

use rayon::prelude::*;

use crate::rows::{log_sum_exp, scaled_softmax};

/// `loss[r] = logsumexp(logits[r]) − logits[r][targets[r]]` for every row of a
/// row-major `[rows, vocab]` matrix; `lse[r]` keeps the log-sum-exp for the
/// backward pass.
pub fn cross_entropy_rows(logits: &[f32], vocab: usize, targets: &[u32], loss: &mut [f32], lse: &mut [f32]) {
    assert_eq!(logits.len(), targets.len() * vocab, "logits must be [rows, vocab]");
    assert!(loss.len() == targets.len() && lse.len() == targets.len());
    loss.par_iter_mut().zip(lse.par_iter_mut()).zip(logits.par_chunks(vocab)).zip(targets.par_iter()).for_each(
        |(((l, s), row), &t)| {
            *s = log_sum_exp(row);
            *l = *s - row[t as usize];
        },
    );
}

/// The gradient of `Σ_r grad_out[r] · loss[r]` with respect to the logits:
/// `grad_out[r] · (softmax(logits[r]) − onehot(targets[r]))`, given the
/// forward pass's log-sum-exp per row.
pub fn cross_entropy_grad(logits: &[f32], vocab: usize, targets: &[u32], lse: &[f32], grad_out: &[f32], grad: &mut [f32]) {
    assert_eq!(logits.len(), targets.len() * vocab, "logits must be [rows, vocab]");
    assert_eq!(grad.len(), logits.len());
    grad.par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .zip(targets.par_iter().zip(lse.par_iter().zip(grad_out.par_iter())))
        .for_each(|((g, row), (&t, (&lse, &scale)))| {
            scaled_softmax(row, lse, scale, g);
            g[t as usize] -= scale;
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_and_gradient_match_the_definition() {
        let logits = [1.0f32, 2.0, 3.0, -1.0, 0.0, 1.0];
        let targets = [2u32, 0];
        let (mut loss, mut lse) = ([0.0; 2], [0.0; 2]);
        cross_entropy_rows(&logits, 3, &targets, &mut loss, &mut lse);
        let lse0 = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((loss[0] as f64 - (lse0 - 3.0)).abs() < 1e-6);
        let mut grad = [0.0; 6];
        cross_entropy_grad(&logits, 3, &targets, &lse, &[1.0, 0.5], &mut grad);
        assert!((grad[2] as f64 - ((3.0 - lse0).exp() - 1.0)).abs() < 1e-6);
        assert!(grad[..3].iter().sum::<f32>().abs() < 1e-6);
        assert!((grad[3..].iter().sum::<f32>()).abs() < 1e-6);
        // finite differences on one logit
        let h = 1e-3f32;
        let at = |d: f32| {
            let mut l = logits;
            l[4] += d;
            let (mut out, mut lse) = ([0.0; 2], [0.0; 2]);
            cross_entropy_rows(&l, 3, &targets, &mut out, &mut lse);
            out[1] * 0.5
        };
        assert!(((at(h) - at(-h)) / (2.0 * h) - grad[4]).abs() < 1e-3);
    }
}
