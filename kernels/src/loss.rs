//! Fused cross-entropy over rows of logits: the loss of each row and its
//! gradient in one parallel pass each, instead of the half-dozen full passes a
//! composed log-softmax takes over a `[tokens, vocab]` matrix (the largest
//! activation of a language model). Rows are independent, so the results do
//! not depend on the thread count.

use rayon::prelude::*;

use crate::rows::{log_sum_exp, loss_and_grad_row, scaled_softmax};

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

/// The loss and its gradient (for a unit upstream gradient per row) in one
/// pass over each row: `exp(x − max)` is written into `grad` once, summed,
/// then scaled into the softmax — one exponential per logit instead of the
/// two that [`cross_entropy_rows`] then [`cross_entropy_grad`] take. For the
/// fused linear + cross-entropy, which needs both at once.
pub fn cross_entropy_loss_and_grad(logits: &[f32], vocab: usize, targets: &[u32], loss: &mut [f32], grad: &mut [f32]) {
    assert_eq!(logits.len(), targets.len() * vocab, "logits must be [rows, vocab]");
    assert!(loss.len() == targets.len() && grad.len() == logits.len());
    grad.par_chunks_mut(vocab).zip(logits.par_chunks(vocab)).zip(loss.par_iter_mut().zip(targets.par_iter())).for_each(
        |((g, row), (l, &t))| {
            *l = loss_and_grad_row(row, t as usize, g);
        },
    );
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

    #[test]
    fn the_one_pass_form_matches_the_two_pass_one() {
        let vocab = 37;
        let logits: Vec<f32> = (0..3 * vocab).map(|i| ((i * 13) % 29) as f32 / 3.0 - 4.0).collect();
        let targets = [5u32, 0, 36];
        let (mut loss, mut lse) = ([0f32; 3], [0f32; 3]);
        cross_entropy_rows(&logits, vocab, &targets, &mut loss, &mut lse);
        let mut grad = vec![0f32; logits.len()];
        cross_entropy_grad(&logits, vocab, &targets, &lse, &[1.0; 3], &mut grad);
        let (mut fused_loss, mut fused_grad) = ([0f32; 3], vec![0f32; logits.len()]);
        cross_entropy_loss_and_grad(&logits, vocab, &targets, &mut fused_loss, &mut fused_grad);
        for (a, b) in fused_loss.iter().zip(&loss) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        for (a, b) in fused_grad.iter().zip(&grad) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
}
