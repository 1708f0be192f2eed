//! Matrix-vector products for single-token decoding, where every weight is read
//! once per token and memory bandwidth is the limit: `y = W x` for a row-major
//! `W` of shape `[rows, cols]`, split across threads by rows, with AVX2+FMA when
//! the processor has them (checked at run time) and a portable path otherwise.
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

type Dot = fn(&[f32], &[f32]) -> f32;

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
