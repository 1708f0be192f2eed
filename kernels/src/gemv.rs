//! Matrix-vector products for single-token decoding, where every weight is read
//! once per token and memory bandwidth is the limit: `y = W x` for a row-major
//! `W` of shape `[rows, cols]`, split across threads by rows, with AVX2+FMA when
//! the processor has them (checked at run time) and a portable path otherwise.
//!
//! [`gemv_rows_f32`] does the same for a few input rows at once (a batch
//! decoder's step, one token per sequence): each weight row is read from
//! memory once and dotted with every input row while it sits in L1, so a step
//! of `m` tokens costs about one token's memory traffic. Every output is the
//! same [`dot`] of a weight row and an input row as in the one-row product, so
//! a token's result does not depend on what else shares its step.
//!
//! ```
//! let w = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]; // 2 rows × 3 cols
//! let mut y = [0.0f32; 2];
//! swift_kernels::gemv::gemv_f32(&w, &[1.0, 0.0, 1.0], 3, &mut y);
//! assert_eq!(y, [4.0, 10.0]);
//! ```

use rayon::prelude::*;

/// Rows handed to a thread at a time.
const ROWS_PER_TASK: usize = 64;

/// `out = W x`, with `W` row-major `[out.len(), cols]`.
///
/// # Panics
/// If `weight.len() != out.len() * cols` or `x.len() != cols`.
pub fn gemv_f32(weight: &[f32], x: &[f32], cols: usize, out: &mut [f32]) {
    assert_eq!(weight.len(), out.len() * cols, "gemv: weight is not [rows, cols]");
    assert_eq!(x.len(), cols, "gemv: x does not have cols elements");
    let dot = dot_for_this_cpu();
    out.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(|(task, ys)| {
        let first = task * ROWS_PER_TASK;
        for (r, y) in ys.iter_mut().enumerate() {
            let row = first + r;
            *y = dot(&weight[row * cols..(row + 1) * cols], x);
        }
    });
}

/// `out = X Wᵀ` for `m` input rows `X` (row-major `[m, cols]`) and `W`
/// row-major `[rows, cols]`: `out` is `[m, rows]`, each element what
/// [`gemv_f32`] gives for that input row.
///
/// # Panics
/// If `xs.len()` is not a multiple of `cols`, or `weight.len() * m !=
/// out.len() * cols`.
pub fn gemv_rows_f32(weight: &[f32], xs: &[f32], cols: usize, out: &mut [f32]) {
    let (dot, dot4) = (dot_for_this_cpu(), dot4_for_this_cpu());
    rows_times_weight(weight, xs, cols, out, &dot, &dot4);
}

/// `out = X Wᵀ` (`xs` `[m, cols]`, `weight` `[rows, cols]` of any element
/// type, `out` `[m, rows]`) through `dot` and `dot4` (four input rows against
/// one weight row, each summed as `dot` sums it): threads split the weight
/// rows, and each weight row meets every input row while it is in cache.
///
/// # Panics
/// If the lengths do not fit those shapes.
pub(crate) fn rows_times_weight<W: Sync>(
    weight: &[W],
    xs: &[f32],
    cols: usize,
    out: &mut [f32],
    dot: &(dyn Fn(&[W], &[f32]) -> f32 + Sync),
    dot4: &(dyn Fn(&[W], [&[f32]; 4]) -> [f32; 4] + Sync),
) {
    assert_eq!(xs.len() % cols.max(1), 0, "gemv_rows: xs is not [m, cols]");
    let m = xs.len() / cols.max(1);
    let rows = weight.len() / cols.max(1);
    assert_eq!(weight.len(), rows * cols, "gemv_rows: weight is not [rows, cols]");
    assert_eq!(out.len(), m * rows, "gemv_rows: out is not [m, rows]");
    if m == 0 {
        return;
    }
    // Weight-row-major results, so each task writes one contiguous run.
    let mut by_row = vec![0f32; rows * m];
    let x = |i: usize| &xs[i * cols..(i + 1) * cols];
    by_row.par_chunks_mut(ROWS_PER_TASK * m).enumerate().for_each(|(task, ys)| {
        let first = task * ROWS_PER_TASK;
        for (r, y) in ys.chunks_mut(m).enumerate() {
            let w = &weight[(first + r) * cols..(first + r + 1) * cols];
            // Four input rows at a time share the weight's loads and keep
            // more FMA chains in flight; each row sums in dot's order.
            let quads = m - m % 4;
            for i in (0..quads).step_by(4) {
                y[i..i + 4].copy_from_slice(&dot4(w, [x(i), x(i + 1), x(i + 2), x(i + 3)]));
            }
            for i in quads..m {
                y[i] = dot(w, x(i));
            }
        }
    });
    for (r, ys) in by_row.chunks(m).enumerate() {
        for (i, &y) in ys.iter().enumerate() {
            out[i * rows + r] = y;
        }
    }
}

/// The f32 dot product [`gemv_f32`] uses on this CPU (AVX2+FMA when it has
/// them), for callers with dot products of their own to take, such as
/// attention over cached keys.
pub fn dot_f32() -> fn(&[f32], &[f32]) -> f32 {
    dot_for_this_cpu()
}

type Dot = fn(&[f32], &[f32]) -> f32;
type Dot4 = fn(&[f32], [&[f32]; 4]) -> [f32; 4];

fn dot4_for_this_cpu() -> Dot4 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return dot4_avx2;
        }
    }
    |w, xs| xs.map(|x| dot_portable(w, x))
}

#[cfg(target_arch = "x86_64")]
fn dot4_avx2(a: &[f32], xs: [&[f32]; 4]) -> [f32; 4] {
    // SAFETY: chosen only after checking that the CPU has AVX2 and FMA; every
    // load is within `a` or an `xs` row, each as long as `a` (asserted).
    unsafe { dot4_avx2_inner(a, xs) }
}

/// [`dot_body`] for four vectors against one, with the weight's loads
/// shared: lane `i` of each row's sixteen accumulators takes the same fused
/// multiply-adds in the same order as `dot_body`'s, and the lanes and the
/// tail are summed as it sums them, so each result equals `dot_body(a, x)`
/// bit for bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4_avx2_inner(a: &[f32], xs: [&[f32]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    const LANES: usize = 16;
    assert!(xs.iter().all(|x| x.len() == a.len()), "dot4: rows of different lengths");
    let split = a.len() - a.len() % LANES;
    let mut acc = [[_mm256_setzero_ps(); 2]; 4];
    let mut c = 0;
    while c < split {
        let w0 = _mm256_loadu_ps(a.as_ptr().add(c));
        let w1 = _mm256_loadu_ps(a.as_ptr().add(c + 8));
        for r in 0..4 {
            let x = xs[r].as_ptr().add(c);
            acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x), acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.add(8)), acc[r][1]);
        }
        c += LANES;
    }
    let mut out = [0f32; 4];
    for r in 0..4 {
        let mut lanes = [0f32; LANES];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][0]);
        _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[r][1]);
        let mut sum: f32 = lanes.iter().sum();
        for (p, q) in a[split..].iter().zip(&xs[r][split..]) {
            sum = p.mul_add(*q, sum);
        }
        out[r] = sum;
    }
    out
}

fn dot_for_this_cpu() -> Dot {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return dot_avx2;
        }
    }
    dot_portable
}

/// Sixteen independent accumulators, so the loop vectorises and the adds
/// pipeline; the order is fixed, so results do not depend on the thread count.
#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let split = a.len() - a.len() % LANES;
    for (ca, cb) in a[..split].chunks_exact(LANES).zip(b[..split].chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] = ca[i].mul_add(cb[i], acc[i]);
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in a[split..].iter().zip(&b[split..]) {
        sum = x.mul_add(*y, sum);
    }
    sum
}

/// The same sum without `mul_add`, which is a slow library call on processors
/// without FMA.
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let split = a.len() - a.len() % 16;
    for (ca, cb) in a[..split].chunks_exact(16).zip(b[..split].chunks_exact(16)) {
        for i in 0..16 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in a[split..].iter().zip(&b[split..]) {
        sum += x * y;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    #[target_feature(enable = "avx2,fma")]
    unsafe fn inner(a: &[f32], b: &[f32]) -> f32 {
        dot_body(a, b)
    }
    // SAFETY: chosen only after checking that the CPU has AVX2 and FMA.
    unsafe { inner(a, b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_rows_give_each_row_s_gemv_bit_for_bit() {
        let (rows, cols) = (130, 97);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
        for m in [1, 2, 5, 16] {
            let xs: Vec<f32> = (0..m * cols).map(|i| ((i * 104_729) % 997) as f32 / 498.0 - 1.0).collect();
            let mut out = vec![0f32; m * rows];
            gemv_rows_f32(&w, &xs, cols, &mut out);
            for i in 0..m {
                let mut one = vec![0f32; rows];
                gemv_f32(&w, &xs[i * cols..(i + 1) * cols], cols, &mut one);
                assert_eq!(&out[i * rows..(i + 1) * rows], &one[..], "row {i} of {m}");
            }
        }
    }

    fn reference(w: &[f32], x: &[f32], cols: usize) -> Vec<f64> {
        w.chunks(cols).map(|row| row.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum()).collect()
    }

    #[test]
    fn matches_a_double_precision_reference_on_odd_shapes() {
        for (rows, cols) in [(1, 1), (3, 17), (130, 896), (65, 33)] {
            let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
            let x: Vec<f32> = (0..cols).map(|i| ((i * 104_729) % 997) as f32 / 498.0 - 1.0).collect();
            let mut y = vec![0f32; rows];
            gemv_f32(&w, &x, cols, &mut y);
            for (got, want) in y.iter().zip(reference(&w, &x, cols)) {
                assert!((*got as f64 - want).abs() < 1e-3 * (1.0 + want.abs()), "{rows}x{cols}: {got} vs {want}");
            }
            let mut portable = vec![0f32; rows];
            for (r, p) in portable.iter_mut().enumerate() {
                *p = dot_portable(&w[r * cols..(r + 1) * cols], &x);
            }
            for (a, b) in y.iter().zip(&portable) {
                assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()));
            }
        }
    }
}
