//! AWQ int4 weights in AutoAWQ's "GEMM" layout (`WQLinear_GEMM`): round-to-nearest quantization
//! with zero points, the on-disk packing, dequantization, an int4 matmul and AWQ's clip search.
//!
//! A weight `W [n, k]` (nn.Linear: `n` outputs, `k` inputs) is cut, per output row, into groups of
//! `group` consecutive input channels. Each group keeps an f16 scale `s` and a zero point `z` in
//! `0..=15`; a weight becomes `q = clamp(round(w / s) + z, 0, 15)` and reads back as `(q − z)·s`.
//! This is AutoAWQ's `pseudo_quantize_tensor` (zero_point=True) computed in f32, except that the scale
//! is rounded to the nearest f16 before use, since AutoAWQ stores f16 scales.
//!
//! On disk ([`AwqMatrix`]) everything is transposed to input-major: `qweight` u32 `[k, n/8]`, `qzeros`
//! u32 `[k/group, n/8]` and `scales` f16 `[k/group, n]`. Nibble `i` (bits `4i..4i+4`) of packed word
//! `c` holds column `c·8 + AWQ_ORDER[i]`.
//!
//! [`AwqMatrix::matmul`] dequantizes one `group × 64` tile at a time and runs every row of `x`
//! against it (AVX2/FMA picked at run time). [`clip_search`] is AutoAWQ's `_compute_best_clip`; it
//! measures each candidate's error through the group's Gram matrix of the activations, in f64.

use std::fmt;

use rayon::prelude::*;

/// Bits per quantized weight.
pub const BITS: u32 = 4;
/// int4 values per packed u32.
pub const PACK: usize = 8;
/// Column (within a packed word's 8) stored in nibble `i`.
pub const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
/// Nibble holding column `p` of a packed word (the inverse of [`AWQ_ORDER`]).
pub const AWQ_REVERSE_ORDER: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];
/// Group sizes swift quantizes with; [`AwqMatrix::from_parts`] also accepts any power of two
/// from 8 to 1024 for foreign checkpoints.
pub const GROUP_SIZES: [usize; 3] = [32, 64, 128];

const MAX_Q: u8 = (1 << BITS) - 1;
/// Output columns a matmul task owns.
const BLOCK: usize = 64;
/// The matmul's register tile: rows of `x` × output columns accumulated together.
const ROWS: usize = 4;
const COLS: usize = 16;
/// Clip search grid: `max_val = absmax·(1 − i/N_GRID)` for `i < SHRINK_STEPS` (max_shrink 0.5).
const N_GRID: usize = 20;
const SHRINK_STEPS: usize = 10;

/// Why AWQ quantization or loading failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AwqError {
    /// The group size is not one accepted here.
    InvalidGroupSize(usize),
    /// The input width `k` is not a multiple of the group size.
    InputNotDivisible {
        /// Input channels.
        k: usize,
        /// Group size.
        group: usize,
    },
    /// The output width `n` is not a multiple of [`PACK`].
    OutputNotDivisible {
        /// Output channels.
        n: usize,
    },
    /// A buffer has the wrong length for the shape.
    ShapeMismatch {
        /// The length the shape calls for.
        expected: usize,
        /// The length given.
        actual: usize,
        /// Which buffer.
        what: &'static str,
    },
    /// A weight is NaN or infinite.
    NonFinite {
        /// Flat index of the first such weight.
        index: usize,
    },
    /// A calibration activation given to [`clip_search`] is NaN or infinite.
    NonFiniteActivation {
        /// Flat index of the first such activation.
        index: usize,
    },
    /// A group's scale `(max − min)/15` exceeds f16's range.
    ScaleOverflow {
        /// Index of the group in row-major `[n, k/group]`.
        index: usize,
    },
    /// [`clip_search`] was given no tokens.
    NoTokens,
}

impl fmt::Display for AwqError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AwqError::InvalidGroupSize(g) => write!(f, "invalid AWQ group size {g}"),
            AwqError::InputNotDivisible { k, group } => {
                write!(f, "input width {k} is not a multiple of the AWQ group size {group}")
            }
            AwqError::OutputNotDivisible { n } => write!(f, "output width {n} is not a multiple of {PACK}"),
            AwqError::ShapeMismatch { expected, actual, what } => {
                write!(f, "AWQ {what} has {actual} values, the shape calls for {expected}")
            }
            AwqError::NonFinite { index } => write!(f, "weight {index} is not finite"),
            AwqError::NonFiniteActivation { index } => write!(f, "calibration activation {index} is not finite"),
            AwqError::ScaleOverflow { index } => write!(f, "the scale of AWQ group {index} overflows f16"),
            AwqError::NoTokens => write!(f, "the AWQ clip search needs at least one token"),
        }
    }
}

impl std::error::Error for AwqError {}

/// `x` rounded to the nearest f16 value (ties to even), as an f32; ±∞ past f16's range.
fn round_to_f16(x: f32) -> f32 {
    const MIN_NORMAL: f32 = 6.103_515_6e-5; // 2^-14
    if x.abs() < MIN_NORMAL {
        // f16 subnormals are multiples of 2^-24; both scalings are exact.
        return (x * 16_777_216.0).round_ties_even() / 16_777_216.0;
    }
    let bits = x.to_bits();
    let r = f32::from_bits((bits + 0x0FFF + ((bits >> 13) & 1)) & !0x1FFF);
    if r.abs() > 65504.0 {
        f32::INFINITY.copysign(x)
    } else {
        r
    }
}

/// The f16-rounded scale and the zero point of one group, or `None` when the scale overflows f16.
fn group_params(g: &[f32]) -> Option<(f32, u8)> {
    let (lo, hi) = g.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let s = round_to_f16((hi - lo).max(1e-5) / 15.0);
    let z = (-(lo / s).round_ties_even()).clamp(0.0, MAX_Q as f32);
    s.is_finite().then_some((s, z as u8))
}

#[inline]
fn quant(v: f32, s: f32, z: u8) -> u8 {
    ((v / s).round_ties_even() + z as f32).clamp(0.0, MAX_Q as f32) as u8
}

#[inline(always)]
fn dequant(q: u32, z: u32, s: f32) -> f32 {
    (q as i32 - z as i32) as f32 * s
}

/// Pseudo-quantizes one group in place; false (leaving it as is) when its scale overflows.
fn pseudo_group(g: &mut [f32]) -> bool {
    let Some((s, z)) = group_params(g) else { return false };
    g.iter_mut().for_each(|v| *v = dequant(quant(*v, s, z) as u32, z as u32, s));
    true
}

fn check_weights(w: &[f32], n: usize, k: usize, group: usize) -> Result<(), AwqError> {
    if !GROUP_SIZES.contains(&group) {
        return Err(AwqError::InvalidGroupSize(group));
    }
    if !k.is_multiple_of(group) {
        return Err(AwqError::InputNotDivisible { k, group });
    }
    if w.len() != n * k {
        return Err(AwqError::ShapeMismatch { expected: n * k, actual: w.len(), what: "weight" });
    }
    match w.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(AwqError::NonFinite { index }),
        None => Ok(()),
    }
}

/// A weight `[n, k]` quantized per row and group: AutoAWQ's `pseudo_quantize_tensor` with
/// zero_point=True, before packing.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedGroups {
    n: usize,
    k: usize,
    group: usize,
    q: Vec<u8>,
    scales: Vec<f32>,
    zeros: Vec<u8>,
}

/// Round-to-nearest int4 with zero points of `w [n, k]` (row-major), per group of `group`
/// consecutive input channels of each output row. `group` must be one of [`GROUP_SIZES`].
pub fn quantize(w: &[f32], n: usize, k: usize, group: usize) -> Result<QuantizedGroups, AwqError> {
    check_weights(w, n, k, group)?;
    let groups = n * (k / group);
    let (mut q, mut scales, mut zeros) = (vec![0u8; n * k], vec![0f32; groups], vec![0u8; groups]);
    q.par_chunks_mut(group).zip(scales.par_iter_mut().zip(zeros.par_iter_mut())).zip(w.par_chunks(group)).enumerate().try_for_each(
        |(index, ((qg, (s, z)), wg))| {
            (*s, *z) = group_params(wg).ok_or(AwqError::ScaleOverflow { index })?;
            qg.iter_mut().zip(wg).for_each(|(q, &v)| *q = quant(v, *s, *z));
            Ok(())
        },
    )?;
    Ok(QuantizedGroups { n, k, group, q, scales, zeros })
}

/// `w ← dequantize(quantize(w))` in place: the pseudo-quantization the scale search measures.
pub fn pseudo_quantize(w: &mut [f32], n: usize, k: usize, group: usize) -> Result<(), AwqError> {
    check_weights(w, n, k, group)?;
    w.par_chunks_mut(group).enumerate().try_for_each(|(index, g)| pseudo_group(g).then_some(()).ok_or(AwqError::ScaleOverflow { index }))
}

/// The packed word of 8 nibbles, `value(p)` being column `p`'s.
fn pack_word(value: impl Fn(usize) -> u8) -> u32 {
    AWQ_ORDER.iter().enumerate().map(|(i, &p)| (value(p) as u32) << (BITS as usize * i)).fold(0, |a, b| a | b)
}

/// Column `p` (0..8) of a packed word.
#[inline(always)]
fn nibble(word: u32, p: usize) -> u32 {
    (word >> (BITS as usize * AWQ_REVERSE_ORDER[p])) & MAX_Q as u32
}

impl QuantizedGroups {
    /// Output channels.
    pub fn n(&self) -> usize {
        self.n
    }
    /// Input channels.
    pub fn k(&self) -> usize {
        self.k
    }
    /// Input channels per group.
    pub fn group(&self) -> usize {
        self.group
    }
    /// The int4 values `[n, k]`, row-major, each in `0..=15`.
    pub fn q(&self) -> &[u8] {
        &self.q
    }
    /// The scales `[n, k/group]`, each exactly an f16 value.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }
    /// The zero points `[n, k/group]`, each in `0..=15`.
    pub fn zeros(&self) -> &[u8] {
        &self.zeros
    }

    /// `W [n, k] = (q − z)·s` in f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let groups = self.q.chunks(self.group).zip(self.zeros.iter().zip(&self.scales));
        groups.flat_map(|(qg, (&z, &s))| qg.iter().map(move |&q| dequant(q as u32, z as u32, s))).collect()
    }

    /// Packs into AutoAWQ's GEMM layout; `n` must be a multiple of [`PACK`].
    pub fn pack(&self) -> Result<AwqMatrix, AwqError> {
        let (n, k, group) = (self.n, self.k, self.group);
        if !n.is_multiple_of(PACK) {
            return Err(AwqError::OutputNotDivisible { n });
        }
        let (words, groups) = (n / PACK, k / group);
        let qweight = (0..k * words).map(|i| pack_word(|p| self.q[((i % words) * PACK + p) * k + i / words])).collect();
        let qzeros = (0..groups * words).map(|i| pack_word(|p| self.zeros[((i % words) * PACK + p) * groups + i / words])).collect();
        let scales = (0..groups * n).map(|i| self.scales[(i % n) * groups + i / n]).collect();
        Ok(AwqMatrix { k, n, group, qweight, qzeros, scales })
    }
}

/// A packed AWQ GEMM weight: `qweight` u32 `[k, n/8]`, `qzeros` u32 `[k/group, n/8]`, `scales` f32
/// `[k/group, n]` (f16 values).
#[derive(Debug, Clone, PartialEq)]
pub struct AwqMatrix {
    k: usize,
    n: usize,
    group: usize,
    qweight: Vec<u32>,
    qzeros: Vec<u32>,
    scales: Vec<f32>,
}

fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<(), AwqError> {
    if expected == actual {
        Ok(())
    } else {
        Err(AwqError::ShapeMismatch { expected, actual, what })
    }
}

/// For each column of a block, the shift of its nibble in its packed word.
const BLOCK_SHIFTS: [u32; BLOCK] = {
    let mut shifts = [0; BLOCK];
    let mut i = 0;
    while i < BLOCK {
        shifts[i] = BITS * AWQ_REVERSE_ORDER[i % PACK] as u32;
        i += 1;
    }
    shifts
};

/// `(q − z)·s` for the [`BLOCK`] columns of one tile row (`PACK` packed words), written as one
/// element-wise loop (each word repeated 8 times, shifted per lane) so that it vectorizes.
#[inline(always)]
fn decode_block(words: &[u32; PACK], zeros: &[u32; BLOCK], scales: &[f32; BLOCK], out: &mut [f32; BLOCK]) {
    let wide: [u32; BLOCK] = std::array::from_fn(|i| words[i / PACK]);
    for i in 0..BLOCK {
        out[i] = dequant((wide[i] >> BLOCK_SHIFTS[i]) & MAX_Q as u32, zeros[i], scales[i]);
    }
}

/// Words `w0..w0+len` of a packed row, zero-padded to a block's [`PACK`].
fn block_words(row: &[u32], w0: usize, len: usize) -> [u32; PACK] {
    let mut words = [0; PACK];
    words[..len].copy_from_slice(&row[w0..w0 + len]);
    words
}

#[inline(always)]
fn madd32<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

#[inline(always)]
fn madd64<const FMA: bool>(a: f64, b: f64, c: f64) -> f64 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// Defines `$name`, which runs `$generic::<true>` compiled for AVX2/FMA when the CPU has them (so
/// loops vectorize 8-wide and fuse), else the portable `$generic::<false>` without `mul_add`.
macro_rules! dispatch {
    ($name:ident, $generic:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($arg: $ty),*) -> $ret {
                    $generic::<true>($($arg),*)
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `fast` is compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            $generic::<false>($($arg),*)
        }
    };
}

/// `out[r] += x_g[r] · tile` for `R` rows, in column chunks of `W`: `R·W/8` vector accumulators.
#[inline(always)]
fn accumulate<const FMA: bool, const R: usize, const W: usize>(xg: [&[f32]; R], tile: &[[f32; BLOCK]], out: [&mut [f32]; R]) {
    for c in (0..BLOCK).step_by(W) {
        let mut acc = [[0f32; W]; R];
        for (j, row) in tile.iter().enumerate() {
            let t = &row[c..c + W];
            for r in 0..R {
                let xv = xg[r][j];
                (0..W).for_each(|l| acc[r][l] = madd32::<FMA>(xv, t[l], acc[r][l]));
            }
        }
        for r in 0..R {
            out[r][c..c + W].iter_mut().zip(&acc[r]).for_each(|(o, a)| *o += a);
        }
    }
}

/// `out [m, BLOCK] += x[:, k0..k0+g] · tile`: `R` rows at a time against column chunks of `W`, then
/// the remaining rows one at a time against the whole block.
#[inline(always)]
fn accumulate_rows<const FMA: bool, const R: usize, const W: usize>(x: &[f32], k: usize, k0: usize, tile: &[[f32; BLOCK]], out: &mut [f32]) {
    let xg = |r: usize| &x[r * k + k0..][..tile.len()];
    let first = out.len() / BLOCK / R * R;
    let mut chunks = out.chunks_exact_mut(R * BLOCK);
    for (i, chunk) in chunks.by_ref().enumerate() {
        let mut rows = chunk.chunks_exact_mut(BLOCK);
        accumulate::<FMA, R, W>(std::array::from_fn(|r| xg(R * i + r)), tile, std::array::from_fn(|_| rows.next().unwrap()));
    }
    for (r, row) in chunks.into_remainder().chunks_exact_mut(BLOCK).enumerate() {
        accumulate::<FMA, 1, BLOCK>([xg(first + r)], tile, [row]);
    }
}

/// `x [m, k] · Wᵀ[:, c0..c0+BLOCK]` as `[m, BLOCK]`, one dequantized group×BLOCK tile at a time;
/// columns past `n` come out 0.
#[inline(always)]
fn block_product_generic<const FMA: bool>(a: &AwqMatrix, x: &[f32], m: usize, c0: usize) -> Vec<f32> {
    let (k, g, words) = (a.k, a.group, a.n / PACK);
    let (w0, cols) = (c0 / PACK, BLOCK.min(a.n - c0));
    let (mut out, mut tile) = (vec![0f32; m * BLOCK], vec![[0f32; BLOCK]; g]);
    let (mut zeros, mut scales) = ([0u32; BLOCK], [0f32; BLOCK]);
    for gi in 0..k / g {
        let qz = block_words(&a.qzeros[gi * words..][..words], w0, cols / PACK);
        (0..BLOCK).for_each(|i| zeros[i] = nibble(qz[i / PACK], i % PACK));
        scales[..cols].copy_from_slice(&a.scales[gi * a.n + c0..][..cols]);
        for (j, t) in tile.iter_mut().enumerate() {
            decode_block(&block_words(&a.qweight[(gi * g + j) * words..][..words], w0, cols / PACK), &zeros, &scales, t);
        }
        accumulate_rows::<FMA, ROWS, COLS>(x, k, gi * g, &tile, &mut out);
    }
    out
}
dispatch!(block_product, block_product_generic, (a: &AwqMatrix, x: &[f32], m: usize, c0: usize) -> Vec<f32>);

impl AwqMatrix {
    /// Wraps the parts of a checkpoint's layer after checking their lengths: `k % group == 0`,
    /// `n % 8 == 0`, and `group` a power of two from 8 to 1024.
    pub fn from_parts(k: usize, n: usize, group: usize, qweight: Vec<u32>, qzeros: Vec<u32>, scales: Vec<f32>) -> Result<Self, AwqError> {
        if !group.is_power_of_two() || !(8..=1024).contains(&group) {
            return Err(AwqError::InvalidGroupSize(group));
        }
        if !k.is_multiple_of(group) {
            return Err(AwqError::InputNotDivisible { k, group });
        }
        if !n.is_multiple_of(PACK) {
            return Err(AwqError::OutputNotDivisible { n });
        }
        check_len("qweight", k * n / PACK, qweight.len())?;
        check_len("qzeros", k / group * n / PACK, qzeros.len())?;
        check_len("scales", k / group * n, scales.len())?;
        Ok(AwqMatrix { k, n, group, qweight, qzeros, scales })
    }
    /// Input channels.
    pub fn k(&self) -> usize {
        self.k
    }
    /// Output channels.
    pub fn n(&self) -> usize {
        self.n
    }
    /// Input channels per group.
    pub fn group(&self) -> usize {
        self.group
    }
    /// Packed int4 weights `[k, n/8]`.
    pub fn qweight(&self) -> &[u32] {
        &self.qweight
    }
    /// Packed zero points `[k/group, n/8]`.
    pub fn qzeros(&self) -> &[u32] {
        &self.qzeros
    }
    /// Scales `[k/group, n]`, f16 values.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// Back to per-row groups (the inverse of [`QuantizedGroups::pack`]).
    pub fn unpack(&self) -> QuantizedGroups {
        let (n, k, group, words) = (self.n, self.k, self.group, self.n / PACK);
        let groups = k / group;
        let q = (0..n * k).map(|i| nibble(self.qweight[(i % k) * words + i / k / PACK], i / k % PACK) as u8).collect();
        let zeros = (0..n * groups).map(|i| nibble(self.qzeros[(i % groups) * words + i / groups / PACK], i / groups % PACK) as u8).collect();
        let scales = (0..n * groups).map(|i| self.scales[(i % groups) * n + i / groups]).collect();
        QuantizedGroups { n, k, group, q, scales, zeros }
    }

    /// `Wᵀ [k, n] = (q − z)·s`, exactly in f32 (AutoAWQ's `dequantize_gemm`).
    pub fn dequantize_t(&self) -> Vec<f32> {
        let (n, words) = (self.n, self.n / PACK);
        let value = |i: usize| {
            let (kk, col, gi) = (i / n, i % n, i / n / self.group);
            let (q, z) = (self.qweight[kk * words + col / PACK], self.qzeros[gi * words + col / PACK]);
            dequant(nibble(q, col % PACK), nibble(z, col % PACK), self.scales[gi * n + col])
        };
        (0..self.k * n).into_par_iter().map(value).collect()
    }

    /// `y [m, n] = x [m, k] · Wᵀ`, overwriting `y`. Threads take blocks of 64 output columns; per
    /// group a block's `group × 64` tile is dequantized once (exactly as [`Self::dequantize_t`]) and
    /// every row of `x` accumulates against it, four rows at a time in 8 vector accumulators.
    ///
    /// # Panics
    /// If `x.len() != m·k` or `y.len() != m·n`.
    pub fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) {
        assert_eq!(x.len(), m * self.k, "awq matmul: x is not [m, k]");
        assert_eq!(y.len(), m * self.n, "awq matmul: y is not [m, n]");
        let n = self.n;
        let blocks: Vec<Vec<f32>> = (0..n.div_ceil(BLOCK)).into_par_iter().map(|b| block_product(self, x, m, b * BLOCK)).collect();
        for (b, out) in blocks.iter().enumerate() {
            let (c0, cols) = (b * BLOCK, BLOCK.min(n - b * BLOCK));
            for (yr, or) in y.chunks_exact_mut(n).zip(out.chunks_exact(BLOCK)) {
                yr[c0..c0 + cols].copy_from_slice(&or[..cols]);
            }
        }
    }

    /// Bytes on disk: `qweight` and `qzeros` at 4 bytes a value, `scales` at 2 (f16).
    pub fn storage_bytes(&self) -> usize {
        4 * (self.qweight.len() + self.qzeros.len()) + 2 * self.scales.len()
    }
}

/// `X_gᵀ X_g` `[g, g]` in f64 for the input channels `c0..c0+g` of `x [t, k]`.
fn gram(x: &[f32], k: usize, c0: usize, g: usize) -> Vec<f64> {
    let mut out = vec![0f64; g * g];
    for xt in x.chunks_exact(k) {
        let xg: Vec<f64> = xt[c0..c0 + g].iter().map(|&v| v as f64).collect();
        for (row, &a) in out.chunks_exact_mut(g).zip(&xg) {
            row.iter_mut().zip(&xg).for_each(|(o, &b)| *o += a * b);
        }
    }
    out
}

/// `dᵀ G d` in eight f64 lanes per row (`d.len()`, a group size, is a multiple of 8).
#[inline(always)]
fn quad_form<const FMA: bool>(gram: &[f64], d: &[f64]) -> f64 {
    let mut total = 0.0;
    for (row, &da) in gram.chunks_exact(d.len()).zip(d) {
        let mut acc = [0f64; 8];
        for (gc, dc) in row.chunks_exact(8).zip(d.chunks_exact(8)) {
            (0..8).for_each(|l| acc[l] = madd64::<FMA>(gc[l], dc[l], acc[l]));
        }
        total += da * acc.iter().sum::<f64>();
    }
    total
}

/// The clip search for one group: the best `max_val` on AutoAWQ's grid (ties keep the larger).
#[inline(always)]
fn best_clip_generic<const FMA: bool>(wg: &[f32], gram: &[f64], t: usize) -> f32 {
    let absmax = wg.iter().fold(0f32, |a, v| a.max(v.abs()));
    let (mut best, mut min_err) = (absmax, 1e9f64);
    let (mut quantized, mut d) = (vec![0f32; wg.len()], vec![0f64; wg.len()]);
    for i in 0..SHRINK_STEPS {
        let max_val = absmax * (1.0 - i as f64 / N_GRID as f64) as f32;
        quantized.iter_mut().zip(wg).for_each(|(c, v)| *c = v.clamp(-max_val, max_val));
        if !pseudo_group(&mut quantized) {
            continue;
        }
        d.iter_mut().zip(quantized.iter().zip(wg)).for_each(|(d, (&q, &v))| *d = q as f64 - v as f64);
        let err = quad_form::<FMA>(gram, &d) / t as f64;
        if err < min_err {
            (min_err, best) = (err, max_val);
        }
    }
    best
}
dispatch!(best_clip, best_clip_generic, (wg: &[f32], gram: &[f64], t: usize) -> f32);

/// AutoAWQ's clip search (`_compute_best_clip`, n_grid 20, max_shrink 0.5) on `w [n, k]` with the
/// layer's calibration inputs `x [t, k]` (already sampled): for each output row and group, the
/// `max_val = absmax·(1 − i/20)`, `i < 10`, whose clamped and pseudo-quantized weights give the
/// smallest mean over tokens of `(x·(Q(clamp(w)) − w))²` on that group's channels (ties keep the
/// larger). Returns `max_val [n, k/group]`. The error is `dᵀ (X_gᵀ X_g / t) d`, accumulated in f64.
pub fn clip_search(w: &[f32], n: usize, k: usize, group: usize, x: &[f32], t: usize) -> Result<Vec<f32>, AwqError> {
    check_weights(w, n, k, group)?;
    check_len("activations", t * k, x.len())?;
    if t == 0 {
        return Err(AwqError::NoTokens);
    }
    if let Some(index) = x.iter().position(|v| !v.is_finite()) {
        return Err(AwqError::NonFiniteActivation { index });
    }
    let groups = k / group;
    let grams: Vec<Vec<f64>> = (0..groups).into_par_iter().map(|gi| gram(x, k, gi * group, group)).collect();
    Ok(w.par_chunks(group).enumerate().map(|(i, wg)| best_clip(wg, &grams[i % groups], t)).collect())
}

/// Clamps each group of `w [n, k]` to `±max_val` (`[n, k/group]`, as [`clip_search`] returns).
///
/// # Panics
/// If the lengths disagree with the shape, or a `max_val` is negative or NaN.
pub fn apply_clip(w: &mut [f32], n: usize, k: usize, group: usize, max_val: &[f32]) {
    assert!(group > 0 && k.is_multiple_of(group) && w.len() == n * k, "apply_clip: w is not [n, k] in groups");
    assert_eq!(max_val.len(), n * (k / group), "apply_clip: max_val is not [n, k/group]");
    w.par_chunks_mut(group).zip(max_val.par_iter()).for_each(|(g, &mv)| g.iter_mut().for_each(|v| *v = v.clamp(-mv, mv)));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn transpose(w: &[f32], n: usize, k: usize) -> Vec<f32> {
        (0..k * n).map(|i| w[(i % n) * k + i / n]).collect()
    }

    #[test]
    fn f16_rounding_matches_hand_values() {
        assert_eq!(round_to_f16(1.0 / 3.0), 0.333_251_95);
        assert_eq!(round_to_f16(1.0 + 2f32.powi(-11)), 1.0);
        assert_eq!(round_to_f16(1.0 + 3.0 * 2f32.powi(-11)), 1.0 + 2f32.powi(-9));
        assert_eq!(round_to_f16(1e-5 / 15.0), 11.0 * 2f32.powi(-24));
        assert_eq!(round_to_f16(65519.0), 65504.0);
        assert_eq!(round_to_f16(65520.0), f32::INFINITY);
    }

    #[test]
    fn quantize_hand_example() {
        let s16 = 0.199_951_17f32; // 0.2 rounded to f16
        let mut w = vec![0.0f32; 32];
        w[0] = -1.0;
        w[1] = 2.0;
        w[2] = 2.5 * s16; // exactly on a midpoint: rounds to even 2
        w[3] = 3.5 * s16; // rounds to even 4
        let q = quantize(&w, 1, 32, 32).unwrap();
        assert_eq!(q.scales(), [s16]);
        assert_eq!(q.zeros(), [5]);
        assert_eq!(&q.q()[..5], [0, 15, 7, 9, 5]);
        assert_eq!(q.dequantize()[2], 2.0 * s16);
    }

    #[test]
    fn constant_groups_use_the_scale_floor() {
        let q = quantize(&[vec![0.0f32; 32], vec![0.7; 32]].concat(), 1, 64, 32).unwrap();
        assert_eq!(q.scales(), [round_to_f16(1e-5 / 15.0); 2]);
        assert_eq!(q.zeros(), [0, 0]);
        assert!(q.q()[..32].iter().all(|&v| v == 0) && q.q()[32..].iter().all(|&v| v == 15));
        assert!(q.dequantize()[..32].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn packing_matches_a_hand_computed_word() {
        let (n, k) = (8, 32);
        let mut w = vec![0.0f32; n * k];
        // Every row has min −16 and max 14 (s = 2, z = 8); input 0 of row c quantizes to c.
        for c in 0..n {
            w[c * k] = 2.0 * c as f32 - 16.0;
            w[c * k + 1] = -16.0;
            w[c * k + 2] = 14.0;
        }
        let q = quantize(&w, n, k, 32).unwrap();
        assert!((0..n).all(|c| q.q()[c * k] == c as u8 && q.scales()[c] == 2.0));
        let packed = q.pack().unwrap();
        assert_eq!(packed.qweight()[0], 0x7531_6420);
        assert_eq!(packed.qzeros(), [0x8888_8888]);
        assert_eq!(packed.storage_bytes(), 4 * (32 + 1) + 2 * 8);
    }

    #[test]
    fn pack_unpack_round_trips() {
        for (i, &group) in GROUP_SIZES.iter().enumerate() {
            let (n, k) = (24, 256);
            let q = quantize(&random(n * k, i as u64), n, k, group).unwrap();
            let packed = q.pack().unwrap();
            assert_eq!(packed.unpack(), q);
            let again = AwqMatrix::from_parts(k, n, group, packed.qweight().to_vec(), packed.qzeros().to_vec(), packed.scales().to_vec());
            assert_eq!(again.unwrap(), packed);
            assert_eq!(packed.dequantize_t(), transpose(&q.dequantize(), n, k));
        }
    }

    #[test]
    fn matmul_matches_a_double_precision_reference() {
        for (k, n, group) in [(256, 72, 128), (128, 8, 32), (128, 120, 64)] {
            let a = quantize(&random(n * k, 7), n, k, group).unwrap().pack().unwrap();
            let wt = a.dequantize_t();
            for m in [1, 3, 6, 64] {
                let x = random(m * k, m as u64);
                let mut y = vec![f32::NAN; m * n];
                a.matmul(&x, m, &mut y);
                for (r, c) in (0..m).flat_map(|r| (0..n).map(move |c| (r, c))) {
                    let terms = (0..k).map(|j| x[r * k + j] as f64 * wt[j * n + c] as f64);
                    let (exact, size) = terms.fold((0.0, 0.0), |(s, a), v| (s + v, a + v.abs()));
                    assert!((y[r * n + c] as f64 - exact).abs() <= 1e-4 * size + 1e-12, "m={m} r={r} c={c}");
                }
            }
        }
    }

    #[test]
    fn portable_path_agrees_and_pads_with_zeros() {
        let (k, n, m) = (256, 72, 6);
        let a = quantize(&random(n * k, 8), n, k, 64).unwrap().pack().unwrap();
        let x = random(m * k, 9);
        let (fast, portable) = (block_product(&a, &x, m, 64), block_product_generic::<false>(&a, &x, m, 64));
        assert!(fast.iter().zip(&portable).all(|(f, p)| (f - p).abs() <= 1e-4 * (1.0 + f.abs())));
        assert!(portable.chunks(BLOCK).all(|row| row[8..].iter().all(|&v| v == 0.0) && row[..8].iter().any(|&v| v != 0.0)));
    }

    #[test]
    fn pseudo_quantize_error_is_at_most_half_a_step() {
        let (n, k, group) = (16, 128, 64);
        let w = random(n * k, 3);
        let q = quantize(&w, n, k, group).unwrap();
        let mut p = w.clone();
        pseudo_quantize(&mut p, n, k, group).unwrap();
        assert_eq!(p, q.dequantize());
        for (i, (a, b)) in w.iter().zip(&p).enumerate() {
            assert!((a - b).abs() <= 0.5 * q.scales()[i / group] * (1.0 + 1e-2), "{i}");
        }
    }

    /// The clip search written out with an explicit token loop.
    fn brute_force_clip(w: &[f32], k: usize, group: usize, x: &[f32], t: usize) -> Vec<f32> {
        let mut out = Vec::new();
        for (gi, wg) in w.chunks(group).enumerate() {
            let c0 = (gi % (k / group)) * group;
            let absmax = wg.iter().fold(0f32, |a, v| a.max(v.abs()));
            let (mut best, mut min_err) = (absmax, 1e9);
            for i in 0..10 {
                let mv = absmax * (1.0 - i as f64 / 20.0) as f32;
                let mut qw: Vec<f32> = wg.iter().map(|v| v.clamp(-mv, mv)).collect();
                assert!(pseudo_group(&mut qw));
                let err = (0..t)
                    .map(|tok| {
                        let xs = &x[tok * k + c0..][..group];
                        let (a, b) = xs.iter().zip(qw.iter().zip(wg)).fold((0f64, 0f64), |(a, b), (&xv, (&q, &v))| (a + xv as f64 * q as f64, b + xv as f64 * v as f64));
                        (a - b).powi(2)
                    })
                    .sum::<f64>()
                    / t as f64;
                if err < min_err {
                    (min_err, best) = (err, mv);
                }
            }
            out.push(best);
        }
        out
    }

    #[test]
    fn clip_search_matches_brute_force() {
        let (n, k, group, t) = (8, 64, 32, 16);
        let mut w = random(n * k, 11);
        w.iter_mut().step_by(29).for_each(|v| *v *= 4.0); // outliers worth clipping
        let mut x = random(t * k, 12);
        x.chunks_mut(k).for_each(|xt| xt[group..].fill(0.0)); // every error ties at 0 in the second group
        let best = clip_search(&w, n, k, group, &x, t).unwrap();
        assert_eq!(best, brute_force_clip(&w, k, group, &x, t));
        let absmax: Vec<f32> = w.chunks(group).map(|g| g.iter().fold(0f32, |a, v| a.max(v.abs()))).collect();
        assert!(best.iter().zip(&absmax).skip(1).step_by(2).all(|(b, a)| b == a));
        assert!(best.iter().zip(&absmax).all(|(b, a)| b <= a));
        assert!(best.iter().zip(&absmax).any(|(b, a)| b < a));
        let mut clipped = w.clone();
        apply_clip(&mut clipped, n, k, group, &best);
        assert!(clipped.chunks(group).zip(&best).all(|(g, &mv)| g.iter().all(|v| v.abs() <= mv)));
    }

    #[test]
    fn errors() {
        assert_eq!(quantize(&[0.0; 96], 1, 96, 64), Err(AwqError::InputNotDivisible { k: 96, group: 64 }));
        assert_eq!(quantize(&[0.0; 16], 1, 16, 16), Err(AwqError::InvalidGroupSize(16)));
        assert_eq!(quantize(&[0.0; 64], 2, 64, 32), Err(AwqError::ShapeMismatch { expected: 128, actual: 64, what: "weight" }));
        let mut w = vec![0.0; 128];
        w[70] = f32::NAN;
        assert_eq!(quantize(&w, 2, 64, 32), Err(AwqError::NonFinite { index: 70 }));
        assert_eq!(pseudo_quantize(&mut w, 2, 64, 32), Err(AwqError::NonFinite { index: 70 }));
        w[0] = 1e7;
        w[1] = -1e7;
        w[70] = 0.0;
        assert_eq!(quantize(&w, 2, 64, 32), Err(AwqError::ScaleOverflow { index: 0 }));
        assert_eq!(quantize(&[0.0; 128], 4, 32, 32).unwrap().pack(), Err(AwqError::OutputNotDivisible { n: 4 }));
        assert_eq!(AwqMatrix::from_parts(64, 12, 32, vec![], vec![], vec![]), Err(AwqError::OutputNotDivisible { n: 12 }));
        assert_eq!(AwqMatrix::from_parts(64, 8, 48, vec![], vec![], vec![]), Err(AwqError::InvalidGroupSize(48)));
        let short = AwqMatrix::from_parts(256, 8, 256, vec![0; 256], vec![0; 2], vec![0.0; 8]);
        assert_eq!(short, Err(AwqError::ShapeMismatch { expected: 1, actual: 2, what: "qzeros" }));
        assert_eq!(clip_search(&[0.0; 32], 1, 32, 32, &[], 0), Err(AwqError::NoTokens));
        assert_eq!(clip_search(&[0.0; 32], 1, 32, 32, &[f32::INFINITY; 32], 1), Err(AwqError::NonFiniteActivation { index: 0 }));
        assert_eq!(AwqError::OutputNotDivisible { n: 12 }.to_string(), "output width 12 is not a multiple of 8");
    }
}
