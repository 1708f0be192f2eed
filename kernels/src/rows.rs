//! Row-wise f32 kernels for training, forward and backward: softmax (attention
//! probabilities), RMSNorm, SwiGLU's `silu(gate)·up`, and the `exp` they and
//! the fused cross-entropy share. Rows run in parallel; within a row every sum has a fixed order
//! (eight explicit lanes), so results do not depend on the thread count, and
//! an AVX2/FMA path is picked at run time where the CPU has it.

use rayon::prelude::*;

const LANES: usize = 8;

/// `e^x` to about 2 ulp for `x` in f32's range, exactly 0 below −87 (so a
/// −∞ mask gives 0), written so that it vectorizes.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let clamped = x.clamp(-87.0, 88.0);
    let n = (clamped * LOG2E + 0.5).floor();
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.0 { 0.0 } else { p * scale }
}

/// Σ a·b in eight fixed lanes.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += x * y;
    }
    acc.iter().sum()
}

/// Defines `$name`, which runs `$generic` compiled for AVX2/FMA when the CPU
/// has them (so the loops vectorize 8-wide), else the portable build.
macro_rules! dispatch {
    ($name:ident, $generic:ident, ($($arg:ident: $ty:ty),*)) => {
        dispatch!($name, $generic, ($($arg: $ty),*) -> ());
    };
    ($name:ident, $generic:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        pub(crate) fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($arg: $ty),*) -> $ret {
                    $generic($($arg),*)
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `fast` is compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            $generic($($arg),*)
        }
    };
}

#[inline(always)]
fn max_of(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for l in 0..LANES {
            lanes[l] = lanes[l].max(chunk[l]);
        }
    }
    for (l, &v) in rest.iter().enumerate() {
        lanes[l] = lanes[l].max(v);
    }
    lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

#[inline(always)]
fn lane_sum(values: &[f32], acc: &mut [f32; LANES]) {
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for l in 0..LANES {
            acc[l] += chunk[l];
        }
    }
    for (l, &v) in rest.iter().enumerate() {
        acc[l] += v;
    }
}

/// Σ exp(row − shift): exponentials in blocks through a stack buffer (a plain
/// map loop, which vectorizes), then summed in eight fixed lanes.
#[inline(always)]
fn sum_exp_shifted(row: &[f32], shift: f32) -> f32 {
    const BLOCK: usize = 256;
    let mut buffer = [0f32; BLOCK];
    let mut acc = [0f32; LANES];
    for block in row.chunks(BLOCK) {
        let out = &mut buffer[..block.len()];
        for (o, &v) in out.iter_mut().zip(block) {
            *o = exp(v - shift);
        }
        lane_sum(out, &mut acc);
    }
    acc.iter().sum()
}

#[inline(always)]
fn log_sum_exp_generic(row: &[f32]) -> f32 {
    let max = max_of(row);
    if !max.is_finite() {
        return max;
    }
    max + sum_exp_shifted(row, max).ln()
}
dispatch!(log_sum_exp, log_sum_exp_generic, (row: &[f32]) -> f32);

#[inline(always)]
fn scaled_softmax_generic(row: &[f32], lse: f32, scale: f32, out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(row) {
        *o = scale * exp(x - lse);
    }
}
dispatch!(scaled_softmax, scaled_softmax_generic, (row: &[f32], lse: f32, scale: f32, out: &mut [f32]));

/// Divides exponentials by their sum (eight fixed lanes), making them a
/// softmax; returns the sum.
#[inline(always)]
fn normalize(e: &mut [f32]) -> f32 {
    let mut acc = [0f32; LANES];
    lane_sum(e, &mut acc);
    let sum = acc.iter().sum::<f32>();
    let inv = 1.0 / sum;
    e.iter_mut().for_each(|v| *v *= inv);
    sum
}

#[inline(always)]
fn loss_and_grad_row_generic(row: &[f32], target: usize, grad: &mut [f32]) -> f32 {
    let max = max_of(row);
    if !max.is_finite() {
        grad.fill(f32::NAN);
        return f32::NAN;
    }
    for (g, &x) in grad.iter_mut().zip(row) {
        *g = exp(x - max);
    }
    let sum = normalize(grad);
    grad[target] -= 1.0;
    max + sum.ln() - row[target]
}
dispatch!(loss_and_grad_row, loss_and_grad_row_generic, (row: &[f32], target: usize, grad: &mut [f32]) -> f32);

#[inline(always)]
fn softmax_row_generic(x: &[f32], y: &mut [f32]) {
    let max = max_of(x);
    if max == f32::NEG_INFINITY {
        y.fill(0.0);
        return;
    }
    for (o, &v) in y.iter_mut().zip(x) {
        *o = exp(v - max);
    }
    normalize(y);
}
dispatch!(softmax_row, softmax_row_generic, (x: &[f32], y: &mut [f32]));

/// Softmax of each row of `n` values (`x` and `y` row-major, same length).
pub fn softmax_rows(x: &[f32], n: usize, y: &mut [f32]) {
    assert_eq!(x.len(), y.len());
    y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(yr, xr)| softmax_row(xr, yr));
}

#[inline(always)]
fn softmax_grad_row_generic(y: &[f32], g: &[f32], dx: &mut [f32]) {
    let s = dot(g, y);
    for ((d, &yi), &gi) in dx.iter_mut().zip(y).zip(g) {
        *d = yi * (gi - s);
    }
}
dispatch!(softmax_grad_row, softmax_grad_row_generic, (y: &[f32], g: &[f32], dx: &mut [f32]));

/// The gradient of softmax: `dx = y ⊙ (g − ⟨g, y⟩)` per row, from the output `y`.
pub fn softmax_rows_grad(y: &[f32], g: &[f32], n: usize, dx: &mut [f32]) {
    assert!(y.len() == g.len() && g.len() == dx.len());
    dx.par_chunks_mut(n).zip(y.par_chunks(n).zip(g.par_chunks(n))).for_each(|(d, (yr, gr))| softmax_grad_row(yr, gr, d));
}

#[inline(always)]
fn rms_row_generic(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let r = 1.0 / (dot(x, x) / x.len() as f32 + eps).sqrt();
    for ((o, &xi), &wi) in y.iter_mut().zip(x).zip(w) {
        *o = wi * (xi * r);
    }
}
dispatch!(rms_row, rms_row_generic, (x: &[f32], w: &[f32], eps: f32, y: &mut [f32]));

/// RMSNorm of each row as transformers computes it: `w ⊙ (x / √(mean(x²) + ε))`.
pub fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let n = w.len();
    assert_eq!(x.len(), y.len());
    y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(yr, xr)| rms_row(xr, w, eps, yr));
}

#[inline(always)]
fn rms_grad_row_generic(x: &[f32], w: &[f32], g: &[f32], eps: f32, dx: &mut [f32]) {
    let n = x.len() as f32;
    let r = 1.0 / (dot(x, x) / n + eps).sqrt();
    let mut acc = [0f32; LANES];
    for (i, ((&xi, &wi), &gi)) in x.iter().zip(w).zip(g).enumerate() {
        acc[i % LANES] += gi * wi * xi;
    }
    let coeff = acc.iter().sum::<f32>() * r * r * r / n;
    for (((d, &xi), &wi), &gi) in dx.iter_mut().zip(x).zip(w).zip(g) {
        *d = r * wi * gi - coeff * xi;
    }
}
dispatch!(rms_grad_row, rms_grad_row_generic, (x: &[f32], w: &[f32], g: &[f32], eps: f32, dx: &mut [f32]));

/// The gradient of [`rms_norm_rows`] with respect to `x` (the weight is frozen):
/// `dx = r·(w⊙g) − x·r³·⟨g⊙w, x⟩/n`, `r = 1/√(mean(x²) + ε)`.
pub fn rms_norm_rows_grad(x: &[f32], w: &[f32], g: &[f32], eps: f32, dx: &mut [f32]) {
    let n = w.len();
    assert!(x.len() == g.len() && g.len() == dx.len());
    dx.par_chunks_mut(n)
        .zip(x.par_chunks(n).zip(g.par_chunks(n)))
        .for_each(|(d, (xr, gr))| rms_grad_row(xr, w, gr, eps, d));
}

#[inline(always)]
fn silu_mul_generic(gate: &[f32], up: &[f32], y: &mut [f32]) {
    for ((o, &g), &u) in y.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}
dispatch!(silu_mul_chunk, silu_mul_generic, (gate: &[f32], up: &[f32], y: &mut [f32]));

/// SwiGLU's `y = silu(gate) ⊙ up`, `silu(g) = g·σ(g)`, elementwise.
pub fn silu_mul(gate: &[f32], up: &[f32], y: &mut [f32]) {
    assert!(gate.len() == up.len() && up.len() == y.len(), "silu_mul: slices of different lengths");
    y.par_chunks_mut(ELEMENT_TASK)
        .zip(gate.par_chunks(ELEMENT_TASK).zip(up.par_chunks(ELEMENT_TASK)))
        .for_each(|(o, (g, u))| silu_mul_chunk(g, u, o));
}

#[inline(always)]
fn silu_mul_grad_generic(gate: &[f32], up: &[f32], dy: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    for ((((dg, du), &g), &u), &d) in dgate.iter_mut().zip(dup.iter_mut()).zip(gate).zip(up).zip(dy) {
        let sigma = 1.0 / (1.0 + exp(-g));
        let silu = g * sigma;
        *du = d * silu;
        *dg = d * u * (sigma + silu * (1.0 - sigma));
    }
}
dispatch!(silu_mul_grad_chunk, silu_mul_grad_generic, (gate: &[f32], up: &[f32], dy: &[f32], dgate: &mut [f32], dup: &mut [f32]));

/// The gradients of [`silu_mul`]: `d_up = dy·silu(g)` and
/// `d_gate = dy·u·σ(g)·(1 + g·(1 − σ(g)))`.
pub fn silu_mul_grad(gate: &[f32], up: &[f32], dy: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    let n = gate.len();
    assert!(up.len() == n && dy.len() == n && dgate.len() == n && dup.len() == n, "silu_mul_grad: slices of different lengths");
    dgate
        .par_chunks_mut(ELEMENT_TASK)
        .zip(dup.par_chunks_mut(ELEMENT_TASK))
        .zip(gate.par_chunks(ELEMENT_TASK).zip(up.par_chunks(ELEMENT_TASK)).zip(dy.par_chunks(ELEMENT_TASK)))
        .for_each(|((dg, du), ((g, u), d))| silu_mul_grad_chunk(g, u, d, dg, du));
}

#[inline(always)]
fn masked_softmax_row_generic(x: &[f32], mask: &[f32], scale: f32, y: &mut [f32]) {
    for ((o, &v), &m) in y.iter_mut().zip(x).zip(mask) {
        *o = v * scale + m;
    }
    let max = max_of(y);
    if max == f32::NEG_INFINITY {
        y.fill(0.0);
        return;
    }
    for o in y.iter_mut() {
        *o = exp(*o - max);
    }
    normalize(y);
}
dispatch!(masked_softmax_row, masked_softmax_row_generic, (x: &[f32], mask: &[f32], scale: f32, y: &mut [f32]));

/// Attention probabilities in one pass: `softmax(x·scale + mask)` of each
/// row of `x` `[b, heads, t, n]`, with the additive mask `[b, t, n]` shared
/// by a row's heads (the scale and mask that would otherwise be two more
/// passes over the scores, and two more buffers).
pub fn masked_softmax_rows(x: &[f32], mask: &[f32], heads: usize, t: usize, n: usize, scale: f32, y: &mut [f32]) {
    assert_eq!(x.len(), y.len());
    assert_eq!(x.len() / heads.max(1), mask.len(), "masked_softmax: the mask does not match the scores");
    y.par_chunks_mut(n).zip(x.par_chunks(n)).enumerate().for_each(|(r, (yr, xr))| {
        let mask_row = (r / (heads * t)) * t + r % t;
        masked_softmax_row(xr, &mask[mask_row * n..(mask_row + 1) * n], scale, yr);
    });
}

/// The gradient of [`masked_softmax_rows`] with respect to `x` from its
/// output `y`: `scale · y ⊙ (g − ⟨g, y⟩)` per row (the mask is constant).
pub fn masked_softmax_rows_grad(y: &[f32], g: &[f32], n: usize, scale: f32, dx: &mut [f32]) {
    softmax_rows_grad(y, g, n, dx);
    if scale != 1.0 {
        dx.par_chunks_mut(ELEMENT_TASK).for_each(|d| d.iter_mut().for_each(|v| *v *= scale));
    }
}

/// Elements per parallel task of the elementwise kernels.
const ELEMENT_TASK: usize = 1 << 14;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_and_zero_under_the_mask() {
        for i in -8700..8800 {
            let x = i as f32 / 100.0;
            let (ours, libm) = (exp(x), x.exp());
            assert!(((ours - libm) / libm).abs() < 4e-7, "exp({x}) = {ours}, libm {libm}");
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn softmax_and_its_gradient() {
        let x = [1.0f32, 2.0, f32::NEG_INFINITY, 0.5, -1.0, 3.0, 0.0, 0.0, 1.0, 2.0];
        let mut y = [0.0; 10];
        softmax_rows(&x, 10, &mut y);
        let z: f32 = [1.0f32, 2.0, 0.5, -1.0, 3.0, 0.0, 0.0, 1.0, 2.0].iter().map(|v| v.exp()).sum();
        assert!((y[1] - 2f32.exp() / z).abs() < 1e-6 && y[2] == 0.0);
        let g = [0.3f32, -1.0, 0.0, 2.0, 0.1, 0.0, 1.0, -0.5, 0.2, 0.7];
        let mut dx = [0.0; 10];
        softmax_rows_grad(&y, &g, 10, &mut dx);
        let h = 1e-2;
        let mut xp = x;
        xp[3] += h;
        let mut xm = x;
        xm[3] -= h;
        let (mut yp, mut ym) = ([0.0; 10], [0.0; 10]);
        softmax_rows(&xp, 10, &mut yp);
        softmax_rows(&xm, 10, &mut ym);
        let numeric: f32 = (0..10).map(|i| g[i] * (yp[i] - ym[i]) / (2.0 * h)).sum();
        assert!((numeric - dx[3]).abs() < 1e-3, "{numeric} vs {}", dx[3]);
    }

    #[test]
    fn rms_norm_and_its_gradient() {
        let x: Vec<f32> = (0..24).map(|i| ((i * 7) % 11) as f32 / 5.0 - 1.0).collect();
        let w: Vec<f32> = (0..12).map(|i| 0.5 + i as f32 / 10.0).collect();
        let g: Vec<f32> = (0..24).map(|i| ((i * 5) % 7) as f32 / 3.0 - 1.0).collect();
        let loss = |x: &[f32]| -> f32 {
            let mut y = vec![0.0; 24];
            rms_norm_rows(x, &w, 1e-6, &mut y);
            y.iter().zip(&g).map(|(a, b)| a * b).sum()
        };
        let mut dx = vec![0.0; 24];
        rms_norm_rows_grad(&x, &w, &g, 1e-6, &mut dx);
        for i in [0, 5, 13, 23] {
            let h = 1e-2;
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += h;
            xm[i] -= h;
            let numeric = (loss(&xp) - loss(&xm)) / (2.0 * h);
            assert!((numeric - dx[i]).abs() < 2e-3, "x[{i}]: {numeric} vs {}", dx[i]);
        }
    }

    #[test]
    fn masked_softmax_is_softmax_of_the_scaled_masked_scores() {
        let (heads, t, n) = (2, 3, 5);
        let x: Vec<f32> = (0..2 * heads * t * n).map(|i| ((i * 7) % 13) as f32 / 4.0 - 1.5).collect();
        let mask: Vec<f32> =
            (0..2 * t * n).map(|i| if (i % n) > (i / n) % t + (i / (t * n)) { f32::NEG_INFINITY } else { 0.0 }).collect();
        let mut y = vec![0f32; x.len()];
        masked_softmax_rows(&x, &mask, heads, t, n, 0.5, &mut y);
        for r in 0..2 * heads * t {
            let m = &mask[((r / (heads * t)) * t + r % t) * n..][..n];
            let scaled: Vec<f32> = x[r * n..][..n].iter().zip(m).map(|(v, m)| v * 0.5 + m).collect();
            let mut expected = vec![0f32; n];
            softmax_rows(&scaled, n, &mut expected);
            for (a, b) in y[r * n..][..n].iter().zip(&expected) {
                assert!((a - b).abs() < 1e-6, "row {r}: {a} vs {b}");
            }
        }
        let g: Vec<f32> = (0..x.len()).map(|i| ((i * 3) % 5) as f32 - 2.0).collect();
        let (mut dx, mut plain) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        masked_softmax_rows_grad(&y, &g, n, 0.5, &mut dx);
        softmax_rows_grad(&y, &g, n, &mut plain);
        assert!(dx.iter().zip(&plain).all(|(a, b)| (a - 0.5 * b).abs() < 1e-6));
    }

    #[test]
    fn silu_mul_and_its_gradients() {
        let gate: Vec<f32> = (0..40).map(|i| i as f32 / 5.0 - 4.0).collect();
        let up: Vec<f32> = (0..40).map(|i| ((i * 3) % 7) as f32 / 3.0 - 1.0).collect();
        let dy: Vec<f32> = (0..40).map(|i| ((i * 5) % 9) as f32 / 4.0 - 1.0).collect();
        let mut y = vec![0f32; 40];
        silu_mul(&gate, &up, &mut y);
        for i in 0..40 {
            let expected = gate[i] / (1.0 + (-gate[i]).exp()) * up[i];
            assert!((y[i] - expected).abs() < 1e-6, "y[{i}] = {} vs {expected}", y[i]);
        }
        let (mut dg, mut du) = (vec![0f32; 40], vec![0f32; 40]);
        silu_mul_grad(&gate, &up, &dy, &mut dg, &mut du);
        let loss = |g: &[f32], u: &[f32]| -> f32 {
            let mut y = vec![0f32; 40];
            silu_mul(g, u, &mut y);
            y.iter().zip(&dy).map(|(a, b)| a * b).sum()
        };
        for i in [0, 17, 39] {
            let h = 1e-2;
            let (mut gp, mut gm) = (gate.clone(), gate.clone());
            gp[i] += h;
            gm[i] -= h;
            let numeric = (loss(&gp, &up) - loss(&gm, &up)) / (2.0 * h);
            assert!((numeric - dg[i]).abs() < 2e-3, "gate[{i}]: {numeric} vs {}", dg[i]);
            let (mut up_p, mut up_m) = (up.clone(), up.clone());
            up_p[i] += h;
            up_m[i] -= h;
            let numeric = (loss(&gate, &up_p) - loss(&gate, &up_m)) / (2.0 * h);
            assert!((numeric - du[i]).abs() < 2e-3, "up[{i}]: {numeric} vs {}", du[i]);
        }
    }
}
