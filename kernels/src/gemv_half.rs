//! Matrix-vector products on 16-bit weights — bf16 or f16, as checkpoints
//! store them — with f32 inputs and f32 accumulation: `out = X Wᵀ` for a few
//! input rows `X` (`[m, cols]`) and `W` row-major `[rows, cols]` of raw 16-bit
//! values. Decoding reads every weight once per step and is bound by memory
//! bandwidth, so keeping the weights at 2 bytes halves the time a step takes
//! next to f32 weights; widening a 16-bit value to f32 is exact (bf16 is the
//! top half of an f32; f16 widens without rounding), so the products are
//! those of the f32 weights transformers computes with, up to summation order.
//!
//! Each weight row is widened once and dotted with up to four input rows
//! while it sits in registers. Every dot product sums sixteen lanes in the
//! same order whatever the number of rows beside it (one, or four), so a
//! token's result does not depend on its batch. The AVX-512 path (sixty-four
//! lanes) or the AVX2+FMA(+F16C) one (sixteen) is chosen at run time;
//! [`dot_portable`] is the reference both are tested against.
//!
//! ```
//! use swift_kernels::gemv_half::{gemv_rows_half, Half};
//! let w: Vec<u16> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0].iter().map(|v| (v.to_bits() >> 16) as u16).collect();
//! let mut out = [0.0f32; 2];
//! gemv_rows_half(Half::Bf16, &w, &[1.0, 0.0, 1.0], 3, &mut out);
//! assert_eq!(out, [4.0, 10.0]);
//! ```

use rayon::prelude::*;

/// Accumulator lanes of every dot product.
const LANES: usize = 16;

/// Which 16-bit float the weights are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Half {
    /// bfloat16: sign, 8 exponent bits, 7 mantissa bits.
    Bf16,
    /// IEEE half: sign, 5 exponent bits, 10 mantissa bits.
    F16,
}

impl Half {
    /// The exact f32 value of a 16-bit pattern.
    pub fn widen(self, bits: u16) -> f32 {
        match self {
            Half::Bf16 => f32::from_bits((bits as u32) << 16),
            Half::F16 => f16_to_f32(bits),
        }
    }
}

/// IEEE half to f32, exactly (subnormals, infinities and NaN included).
fn f16_to_f32(bits: u16) -> f32 {
    let sign = ((bits as u32) & 0x8000) << 16;
    let exponent = ((bits >> 10) & 0x1f) as u32;
    let mantissa = (bits & 0x3ff) as u32;
    let magnitude = match (exponent, mantissa) {
        (0, 0) => 0,
        (0, m) => {
            // Subnormal: value m · 2^-24, normalised for f32.
            let shift = m.leading_zeros() - 21;
            ((127 - 15 - shift + 1) << 23) | ((m << shift) & 0x3ff) << 13
        }
        (0x1f, m) => 0x7f80_0000 | (m << 13),
        (e, m) => ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(sign | magnitude)
}

/// `out = X Wᵀ`: `xs` is `[m, cols]`, `weight` `[rows, cols]` 16-bit values of
/// kind `half`, `out` `[m, rows]`.
///
/// # Panics
/// If the lengths do not fit those shapes.
pub fn gemv_rows_half(half: Half, weight: &[u16], xs: &[f32], cols: usize, out: &mut [f32]) {
    let (dot, dot4) = kernels(half);
    crate::gemv::rows_times_weight(weight, xs, cols, out, dot.as_ref(), dot4.as_ref());
}

/// Widens 16-bit values into f32 (`dst.len() == src.len()`), on every core:
/// how a many-row product gets an f32 panel of a 16-bit weight.
///
/// # Panics
/// If the lengths differ.
pub fn widen_into(half: Half, src: &[u16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "widen_into: lengths differ");
    const CHUNK: usize = 1 << 16;
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| match half {
        // A shift: the compiler vectorizes it.
        Half::Bf16 => d.iter_mut().zip(s).for_each(|(d, &s)| *d = f32::from_bits((s as u32) << 16)),
        Half::F16 => widen_f16(s, d),
    });
}

fn widen_f16(src: &[u16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("f16c") && is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has F16C and AVX2, checked above.
            return unsafe { avx2::widen_f16(src, dst) };
        }
    }
    dst.iter_mut().zip(src).for_each(|(d, &s)| *d = f16_to_f32(s));
}

type Dot = Box<dyn Fn(&[u16], &[f32]) -> f32 + Sync>;
type Dot4 = Box<dyn Fn(&[u16], [&[f32]; 4]) -> [f32; 4] + Sync>;

fn kernels(half: Half) -> (Dot, Dot4) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY (both): the CPU has AVX-512F, checked above.
            return match half {
                Half::Bf16 => (
                    Box::new(|w, x| unsafe { avx512::dot::<true, 1>(w, [x])[0] }),
                    Box::new(|w, xs| unsafe { avx512::dot::<true, 4>(w, xs) }),
                ),
                Half::F16 => (
                    Box::new(|w, x| unsafe { avx512::dot::<false, 1>(w, [x])[0] }),
                    Box::new(|w, xs| unsafe { avx512::dot::<false, 4>(w, xs) }),
                ),
            };
        }
        let f16c = half == Half::Bf16 || is_x86_feature_detected!("f16c");
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && f16c {
            // SAFETY (both): the CPU has AVX2, FMA and (for f16) F16C, checked above.
            return match half {
                Half::Bf16 => (
                    Box::new(|w, x| unsafe { avx2::dot::<true, 1>(w, [x])[0] }),
                    Box::new(|w, xs| unsafe { avx2::dot::<true, 4>(w, xs) }),
                ),
                Half::F16 => (
                    Box::new(|w, x| unsafe { avx2::dot::<false, 1>(w, [x])[0] }),
                    Box::new(|w, xs| unsafe { avx2::dot::<false, 4>(w, xs) }),
                ),
            };
        }
    }
    (Box::new(move |w, x| dot_portable(half, w, x)), Box::new(move |w, xs| xs.map(|x| dot_portable(half, w, x))))
}

/// The reference: sixteen lanes of running sums over 16-wide chunks, summed
/// in lane order, then the tail.
pub fn dot_portable(half: Half, w: &[u16], x: &[f32]) -> f32 {
    let split = w.len() - w.len() % LANES;
    let mut acc = [0f32; LANES];
    for (cw, cx) in w[..split].chunks_exact(LANES).zip(x[..split].chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += half.widen(cw[i]) * cx[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (&a, &b) in w[split..].iter().zip(&x[split..]) {
        sum += half.widen(a) * b;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::LANES;

    /// Eight weights widened to f32.
    #[inline(always)]
    unsafe fn widen8<const BF16: bool>(p: *const u16) -> __m256 {
        let raw = _mm_loadu_si128(p as *const __m128i);
        if BF16 {
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
        } else {
            _mm256_cvtph_ps(raw)
        }
    }

    /// f16 to f32 with F16C, eight at a time.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn widen_f16(src: &[u16], dst: &mut [f32]) {
        let split = src.len() - src.len() % 8;
        let mut i = 0;
        while i < split {
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), widen8::<false>(src.as_ptr().add(i)));
            i += 8;
        }
        for j in split..src.len() {
            dst[j] = super::f16_to_f32(src[j]);
        }
    }

    /// `R` dot products of the weight row `w` with the rows `xs`, each summed
    /// as [`super::dot_portable`] sums (with fused multiply-adds).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot<const BF16: bool, const R: usize>(w: &[u16], xs: [&[f32]; R]) -> [f32; R] {
        assert!(xs.iter().all(|x| x.len() == w.len()), "gemv_half: rows of different lengths");
        let split = w.len() - w.len() % LANES;
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let mut c = 0;
        while c < split {
            let w0 = widen8::<BF16>(w.as_ptr().add(c));
            let w1 = widen8::<BF16>(w.as_ptr().add(c + 8));
            for r in 0..R {
                let x = xs[r].as_ptr().add(c);
                acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x), acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.add(8)), acc[r][1]);
            }
            c += LANES;
        }
        let widen = |bits: u16| if BF16 { super::Half::Bf16.widen(bits) } else { super::Half::F16.widen(bits) };
        let mut out = [0f32; R];
        for r in 0..R {
            let mut lanes = [0f32; LANES];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][0]);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[r][1]);
            let mut sum: f32 = lanes.iter().sum();
            for (&a, &b) in w[split..].iter().zip(&xs[r][split..]) {
                sum = widen(a).mul_add(b, sum);
            }
            out[r] = sum;
        }
        out
    }
}

/// AVX-512: sixty-four lanes (four registers) a row, so even one row keeps
/// four FMA chains in flight; one row and four rows still sum alike.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    const WIDE: usize = 64;

    /// Sixteen weights widened to f32.
    #[inline(always)]
    unsafe fn widen16<const BF16: bool>(p: *const u16) -> __m512 {
        let raw = _mm256_loadu_si256(p as *const __m256i);
        if BF16 {
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))
        } else {
            _mm512_cvtph_ps(raw)
        }
    }

    /// `R` dot products of the weight row `w` with the rows `xs`: sixty-four
    /// running sums each, summed in lane order, then the tail.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot<const BF16: bool, const R: usize>(w: &[u16], xs: [&[f32]; R]) -> [f32; R] {
        assert!(xs.iter().all(|x| x.len() == w.len()), "gemv_half: rows of different lengths");
        let split = w.len() - w.len() % WIDE;
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        let mut c = 0;
        while c < split {
            let ws = [0, 1, 2, 3].map(|k| widen16::<BF16>(w.as_ptr().add(c + 16 * k)));
            for r in 0..R {
                let x = xs[r].as_ptr().add(c);
                for k in 0..4 {
                    acc[r][k] = _mm512_fmadd_ps(ws[k], _mm512_loadu_ps(x.add(16 * k)), acc[r][k]);
                }
            }
            c += WIDE;
        }
        let widen = |bits: u16| if BF16 { super::Half::Bf16.widen(bits) } else { super::Half::F16.widen(bits) };
        let mut out = [0f32; R];
        for r in 0..R {
            let mut lanes = [0f32; WIDE];
            for k in 0..4 {
                _mm512_storeu_ps(lanes.as_mut_ptr().add(16 * k), acc[r][k]);
            }
            let mut sum: f32 = lanes.iter().sum();
            for (&a, &b) in w[split..].iter().zip(&xs[r][split..]) {
                sum = widen(a).mul_add(b, sum);
            }
            out[r] = sum;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_a_slice_matches_widening_each_value() {
        let src: Vec<u16> = (0..100_003u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 16) as u16 & 0x7bff).collect();
        for half in [Half::Bf16, Half::F16] {
            let mut dst = vec![0f32; src.len()];
            widen_into(half, &src, &mut dst);
            assert!(dst.iter().zip(&src).all(|(d, &s)| d.to_bits() == half.widen(s).to_bits()), "{half:?}");
        }
    }

    #[test]
    fn f16_widens_exactly() {
        for (bits, value) in [(0x3c00u16, 1.0f32), (0xc000, -2.0), (0x0001, 5.960_464_5e-8), (0x03ff, 6.097_555e-5), (0x7bff, 65504.0)] {
            assert_eq!(f16_to_f32(bits), value, "{bits:#06x}");
        }
        assert!(f16_to_f32(0x7c00).is_infinite() && f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
    }

    fn bits(half: Half, v: f32) -> u16 {
        match half {
            Half::Bf16 => (v.to_bits() >> 16) as u16,
            Half::F16 => {
                // Exact for the small multiples of 1/512 the test uses.
                let f = (0u16..=0x7bff).chain(0x8000..=0xfbff).find(|&b| f16_to_f32(b) == v).expect("representable");
                f
            }
        }
    }

    #[test]
    fn matches_the_reference_and_one_row_equals_four_bit_for_bit() {
        for half in [Half::Bf16, Half::F16] {
            let (rows, cols) = (70, 83);
            let values: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 512) as f32 / 256.0 - 1.0).collect();
            let w: Vec<u16> = values.iter().map(|&v| bits(half, v)).collect();
            for m in [1, 4, 6] {
                let xs: Vec<f32> = (0..m * cols).map(|i| ((i * 104_729) % 997) as f32 / 498.0 - 1.0).collect();
                let mut out = vec![0f32; m * rows];
                gemv_rows_half(half, &w, &xs, cols, &mut out);
                for i in 0..m {
                    let x = &xs[i * cols..(i + 1) * cols];
                    let mut one = vec![0f32; rows];
                    gemv_rows_half(half, &w, x, cols, &mut one);
                    assert_eq!(&out[i * rows..(i + 1) * rows], &one[..], "{half:?}: row {i} of {m}");
                    for r in 0..rows {
                        let exact: f64 = values[r * cols..(r + 1) * cols].iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let reference = dot_portable(half, &w[r * cols..(r + 1) * cols], x);
                        assert!((one[r] as f64 - exact).abs() < 1e-4 * (1.0 + exact.abs()), "{half:?} {r}: {} vs {exact}", one[r]);
                        assert!((one[r] - reference).abs() < 1e-4 * (1.0 + reference.abs()));
                    }
                }
            }
        }
    }
}
