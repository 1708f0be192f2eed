//! Rotary position embedding (the rotate-half layout of Llama, Qwen2 and
//! Mistral) with its gradient, for a batch of rows whose positions differ
//! per row.
//!
//! `x` is `[b, heads, t, d]`; the tables `cos`, `sin` are `[b, t, d/2]`
//! (one angle per row, token and frequency). With `x = [x₁ | x₂]` split in
//! halves along `d`:
//!
//! ```text
//! forward   y₁ = x₁·cos − x₂·sin        y₂ = x₂·cos + x₁·sin
//! backward  dx₁ = g₁·cos + g₂·sin       dx₂ = g₂·cos − g₁·sin
//! ```
//!
//! The backward is the rotation by −θ, so no activation is kept for it.
//! Each `(row, head)` plane runs as one parallel task; every element is
//! computed on its own, so the result does not depend on the thread count.

use rayon::prelude::*;

/// The shape of one RoPE application.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeShape {
    /// Rows in the batch.
    pub batch: usize,
    /// Heads per row.
    pub heads: usize,
    /// Tokens per row.
    pub tokens: usize,
    /// Head dimension (even).
    pub head_dim: usize,
}

impl RopeShape {
    fn check(&self, x: usize, table: usize) {
        assert!(self.head_dim % 2 == 0, "rope: odd head dimension {}", self.head_dim);
        assert_eq!(x, self.batch * self.heads * self.tokens * self.head_dim, "rope: x does not match the shape");
        assert_eq!(table, self.batch * self.tokens * self.head_dim / 2, "rope: tables do not match the shape");
    }
}

/// Rotates `x` into `y` (`sign` = 1) or by the opposite angle (`sign` = −1,
/// the gradient).
fn rotate(x: &[f32], cos: &[f32], sin: &[f32], s: RopeShape, sign: f32, y: &mut [f32]) {
    s.check(x.len(), cos.len());
    assert!(sin.len() == cos.len() && y.len() == x.len());
    let (d, half) = (s.head_dim, s.head_dim / 2);
    let plane = s.tokens * d;
    y.par_chunks_mut(plane).zip(x.par_chunks(plane)).enumerate().for_each(|(index, (yp, xp))| {
        let row = index / s.heads;
        let tables = row * s.tokens * half;
        for t in 0..s.tokens {
            let (c, sn) = (&cos[tables + t * half..][..half], &sin[tables + t * half..][..half]);
            let (xt, yt) = (&xp[t * d..][..d], &mut yp[t * d..][..d]);
            let (x1, x2) = xt.split_at(half);
            let (y1, y2) = yt.split_at_mut(half);
            for i in 0..half {
                let sin = sign * sn[i];
                y1[i] = x1[i] * c[i] - x2[i] * sin;
                y2[i] = x2[i] * c[i] + x1[i] * sin;
            }
        }
    });
}

/// `y = rope(x)` (see the module doc).
pub fn rope(x: &[f32], cos: &[f32], sin: &[f32], shape: RopeShape, y: &mut [f32]) {
    rotate(x, cos, sin, shape, 1.0, y);
}

/// The gradient of [`rope`] with respect to `x` for an upstream gradient `g`.
pub fn rope_grad(g: &[f32], cos: &[f32], sin: &[f32], shape: RopeShape, dx: &mut [f32]) {
    rotate(g, cos, sin, shape, -1.0, dx);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_matches_the_rotate_half_formula_and_its_gradient_is_the_transpose() {
        let s = RopeShape { batch: 2, heads: 3, tokens: 4, head_dim: 6 };
        let n = 2 * 3 * 4 * 6;
        let x: Vec<f32> = (0..n).map(|i| ((i * 7) % 13) as f32 / 13.0 - 0.5).collect();
        let g: Vec<f32> = (0..n).map(|i| ((i * 5) % 11) as f32 / 11.0 - 0.5).collect();
        // Different positions in the two rows.
        let angles: Vec<f32> = (0..2 * 4 * 3).map(|i| (i / 3) as f32 * 0.3 + (i % 3) as f32 * 0.1 + (i / 12) as f32).collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let mut y = vec![0f32; n];
        rope(&x, &cos, &sin, s, &mut y);
        // Row 1, head 2, token 3, i = 1: angle index (1·4 + 3)·3 + 1.
        let (base, a) = (((1 * 3 + 2) * 4 + 3) * 6, (1 * 4 + 3) * 3 + 1);
        let expected = x[base + 1] * cos[a] - x[base + 4] * sin[a];
        assert!((y[base + 1] - expected).abs() < 1e-6);
        // ⟨rope(x), g⟩ = ⟨x, rope_grad(g)⟩: the gradient is the adjoint.
        let mut dx = vec![0f32; n];
        rope_grad(&g, &cos, &sin, s, &mut dx);
        let lhs: f32 = y.iter().zip(&g).map(|(a, b)| a * b).sum();
        let rhs: f32 = x.iter().zip(&dx).map(|(a, b)| a * b).sum();
        assert!((lhs - rhs).abs() < 1e-5, "{lhs} vs {rhs}");
    }
}
