//! NF4 ("NormalFloat4", the 4-bit weight format of QLoRA), bit-for-bit what bitsandbytes 0.50.2
//! computes on the CPU (`quantize_4bit(quant_type="nf4")` / `dequantize_4bit`), with and without
//! double quantization (`compress_statistics=True`, transformers' `bnb_4bit_use_double_quant`).
//!
//! The flattened tensor is cut into blocks of `blocksize` values (64 by default; the last block may be
//! shorter). Each block keeps its absolute maximum `absmax` as an f32 and every value becomes the 4-bit
//! index of the nearest entry of [`NF4_CODE`] to `value / absmax`. Two indices share a byte, the first
//! element in the high nibble. Dequantizing is `NF4_CODE[index] * absmax`.
//!
//! With double quantization the per-block absmax is itself compressed: `offset = mean(absmax)`, then
//! `absmax - offset` is quantized to 8 bits per value in blocks of [`NESTED_BLOCKSIZE`] with the signed
//! dynamic map ([`dynamic_map`]), keeping one f32 `nested_absmax` per nested block. A block's absmax is
//! recovered as `dynamic_map()[q] * nested_absmax[block / 256] + offset`.
//!
//! Rounding details reproduced (read from bitsandbytes' `backends/default/ops.py`, `csrc/cpu_ops.cpp`
//! and its compiled x86-64 library, and checked against its output in
//! `tests/fixtures/nf4/reference.safetensors`):
//!
//! - Full blocks scale by the reciprocal, `x * (1 / max(absmax, 1e-38))`; a partial last block divides,
//!   `x / max(absmax, 1e-38)`, and stores the clamped absmax (so an all-zero last block stores `1e-38`,
//!   an all-zero full block stores `0`). The scaled value is clamped to `[-1, 1]`.
//! - The index is the number of code midpoints `(c[i] + c[i+1]) / 2` (f32) strictly below the scaled
//!   value: a value exactly on a midpoint takes the lower index (torch `bucketize`).
//! - An odd element count is padded with `0.0`, so the last byte's low nibble is 7.
//! - `offset` is torch's CPU `mean`: an 8-lane cascade sum in f32, then `/ n`. This equals torch for
//!   up to 32768 blocks at any thread count (and always with one torch thread); past that torch's own
//!   result depends on its thread count.
//! - The 8-bit nested quantizer is bitsandbytes' CPU one, which is not a plain nearest-code search: it
//!   maps `v = clamp(x * (1 / absmax), -1, 1)` to `trunc(fma(65535, (v + 1) * 0.5, 0.5))` and looks that
//!   up in a 65536-entry table of nearest codes; an all-zero nested block gives indices 0, absmax 0.
//!
//! bf16 weights quantize exactly as their f32 upcast (bitsandbytes upcasts first); its bf16 dequantize
//! output is the f32 result rounded to nearest even. bitsandbytes' CUDA kernels choose codes by other
//! means (a comparison tree for NF4, a search over the dynamic map for the 8-bit absmax), so a GPU can
//! pick a neighbouring code for a value on or very near a midpoint; dequantization is the same product
//! everywhere.
//!
//! ```
//! use swift_kernels::nf4;
//! let w: Vec<f32> = (0..6 * 50).map(|i| ((i * 37) % 101) as f32 / 100.0 - 0.5).collect();
//! let q = nf4::quantize(&w, &[6, 50], 64, true).unwrap();
//! assert_eq!(q.packed().len(), 150);
//! let back = q.dequantize();
//! assert!(w.iter().zip(&back).all(|(a, b)| (a - b).abs() < 0.1));
//! let mut rows = vec![0.0; 2 * 50];
//! q.dequantize_rows_into(3, 2, &mut rows);
//! assert_eq!(rows, back[150..250]);
//! ```

use std::fmt;
use std::sync::OnceLock;

use rayon::prelude::*;

/// The 16 NF4 code values, sorted (index `i` decodes to `NF4_CODE[i]`), as bitsandbytes'
/// `get_4bit_type("nf4")` holds them in f32.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928,
    -0.52507305,
    -0.3949175,
    -0.28444138,
    -0.18477343,
    -0.091050036,
    0.0,
    0.0795803,
    0.1609302,
    0.2461123,
    0.33791524,
    0.44070983,
    0.562617,
    0.72295684,
    1.0,
];

/// The blocksize bitsandbytes and QLoRA use unless told otherwise.
pub const DEFAULT_BLOCKSIZE: usize = 64;

/// The blocksizes bitsandbytes accepts for 4-bit quantization.
pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// How many absmax values share one `nested_absmax` under double quantization.
pub const NESTED_BLOCKSIZE: usize = 256;

/// bitsandbytes' `create_dynamic_map(signed=True)` in f32: sorted, from -0.99296874 to 1.0, one 0.0.
#[rustfmt::skip]
const DYNAMIC_MAP: [f32; 256] = [
    -0.99296874, -0.9789063, -0.96484375, -0.9507812, -0.93671876, -0.92265624, -0.9085938, -0.89453125, -0.8804687,
    -0.86640626, -0.85234374, -0.8382813, -0.82421875, -0.8101562, -0.79609376, -0.78203124, -0.7679688, -0.75390625,
    -0.7398437, -0.72578126, -0.7117188, -0.6976563, -0.68359375, -0.6695312, -0.65546876, -0.6414063, -0.6273438,
    -0.61328125, -0.5992187, -0.58515626, -0.5710938, -0.5570313, -0.54296875, -0.5289062, -0.5148437, -0.50078124,
    -0.4867187, -0.47265625, -0.45859373, -0.44453126, -0.43046874, -0.41640624, -0.40234375, -0.38828123,
    -0.37421876, -0.36015624, -0.34609374, -0.33203125, -0.31796873, -0.30390626, -0.28984374, -0.27578127,
    -0.26171875, -0.24765624, -0.23359375, -0.21953125, -0.20546874, -0.19140625, -0.17734376, -0.16328125,
    -0.14921875, -0.13515624, -0.12109375, -0.107031256, -0.09859375, -0.09578126, -0.092968754, -0.09015625,
    -0.08734375, -0.08453125, -0.08171876, -0.07890625, -0.07609375, -0.07328125, -0.070468746, -0.067656256,
    -0.06484375, -0.06203125, -0.059218753, -0.05640625, -0.05359375, -0.05078125, -0.04796875, -0.04515625,
    -0.042343747, -0.03953125, -0.036718752, -0.03390625, -0.03109375, -0.028281251, -0.02546875, -0.02265625,
    -0.019843752, -0.01703125, -0.01421875, -0.01140625, -0.00971875, -0.009156249, -0.00859375, -0.00803125,
    -0.00746875, -0.00690625, -0.00634375, -0.00578125, -0.0052187503, -0.0046562497, -0.00409375, -0.0035312497,
    -0.00296875, -0.00240625, -0.00184375, -0.0012812499, -9.437501e-4, -8.3125e-4, -7.1875006e-4, -6.062501e-4,
    -4.9375003e-4, -3.8125002e-4, -2.6875004e-4, -1.5625001e-4, -8.875e-5, -6.625e-5, -4.375e-5, -2.1249998e-5,
    -7.75e-6, -3.2500002e-6, -5.5000004e-7, 0.0, 5.5000004e-7, 3.2500002e-6, 7.75e-6, 2.1249998e-5, 4.375e-5,
    6.625e-5, 8.875e-5, 1.5625001e-4, 2.6875004e-4, 3.8125002e-4, 4.9375003e-4, 6.062501e-4, 7.1875006e-4, 8.3125e-4,
    9.437501e-4, 0.0012812499, 0.00184375, 0.00240625, 0.00296875, 0.0035312497, 0.00409375, 0.0046562497,
    0.0052187503, 0.00578125, 0.00634375, 0.00690625, 0.00746875, 0.00803125, 0.00859375, 0.009156249, 0.00971875,
    0.01140625, 0.01421875, 0.01703125, 0.019843752, 0.02265625, 0.02546875, 0.028281251, 0.03109375, 0.03390625,
    0.036718752, 0.03953125, 0.042343747, 0.04515625, 0.04796875, 0.05078125, 0.05359375, 0.05640625, 0.059218753,
    0.06203125, 0.06484375, 0.067656256, 0.070468746, 0.07328125, 0.07609375, 0.07890625, 0.08171876, 0.08453125,
    0.08734375, 0.09015625, 0.092968754, 0.09578126, 0.09859375, 0.107031256, 0.12109375, 0.13515624, 0.14921875,
    0.16328125, 0.17734376, 0.19140625, 0.20546874, 0.21953125, 0.23359375, 0.24765624, 0.26171875, 0.27578127,
    0.28984374, 0.30390626, 0.31796873, 0.33203125, 0.34609374, 0.36015624, 0.37421876, 0.38828123, 0.40234375,
    0.41640624, 0.43046874, 0.44453126, 0.45859373, 0.47265625, 0.4867187, 0.50078124, 0.5148437, 0.5289062,
    0.54296875, 0.5570313, 0.5710938, 0.58515626, 0.5992187, 0.61328125, 0.6273438, 0.6414063, 0.65546876, 0.6695312,
    0.68359375, 0.6976563, 0.7117188, 0.72578126, 0.7398437, 0.75390625, 0.7679688, 0.78203124, 0.79609376,
    0.8101562, 0.82421875, 0.8382813, 0.85234374, 0.86640626, 0.8804687, 0.89453125, 0.9085938, 0.92265624,
    0.93671876, 0.9507812, 0.96484375, 0.9789063, 0.99296874, 1.0,
];

/// The 8-bit signed dynamic map bitsandbytes quantizes the absmax values with under double quantization
/// (`create_dynamic_map(signed=True)`, f32 exactly as bitsandbytes builds it): 256 sorted values in
/// `[-0.99296874, 1.0]`.
pub fn dynamic_map() -> [f32; 256] {
    DYNAMIC_MAP
}

/// `1e-38` as f32 (a subnormal): the smallest absmax bitsandbytes divides by.
const MIN_SCALE: f32 = f32::from_bits(0x006c_e3ee);

/// The midpoints between neighbouring NF4 codes, in f32 as bitsandbytes computes them.
const NF4_BOUNDS: [f32; 15] = {
    let mut b = [0.0f32; 15];
    let mut i = 0;
    while i < 15 {
        b[i] = (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0;
        i += 1;
    }
    b
};

/// Entries of bitsandbytes' CPU 8-bit quantization table.
const LUT_SIZE: usize = 65536;

/// Elements a thread dequantizes at a time (rounded to whole blocks).
const DEQUANT_TASK: usize = 1 << 14;

/// Blocks a thread quantizes at a time.
const QUANT_TASK_BLOCKS: usize = 64;

/// Lanes of torch's CPU float sum (its AVX2 kernel, which torch also runs on AVX-512 machines).
const SUM_LANES: usize = 8;

/// The per-block scales of an [`Nf4Tensor`].
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 absmax per block (`compress_statistics=False`).
    Plain(Vec<f32>),
    /// Double quantization (`compress_statistics=True`): block `b`'s absmax is
    /// `dynamic_map()[quantized[b]] * nested_absmax[b / nested_blocksize] + offset`.
    Double {
        /// One 8-bit index into [`dynamic_map`] per block (bitsandbytes' `absmax` uint8 tensor).
        quantized: Vec<u8>,
        /// One f32 scale per `nested_blocksize` blocks (`state2.absmax`, `<p>.weight.nested_absmax`).
        nested_absmax: Vec<f32>,
        /// The mean of the original absmax values, added back after decoding (`nested_offset`).
        offset: f32,
        /// Blocks per nested block: [`NESTED_BLOCKSIZE`] (256) for everything bitsandbytes writes.
        nested_blocksize: usize,
    },
}

impl Absmax {
    /// The absmax of block `b`.
    #[inline]
    fn scale(&self, b: usize) -> f32 {
        match self {
            Absmax::Plain(v) => v[b],
            Absmax::Double { quantized, nested_absmax, offset, nested_blocksize } => {
                DYNAMIC_MAP[quantized[b] as usize] * nested_absmax[b / nested_blocksize] + offset
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len(),
            Absmax::Double { quantized, .. } => quantized.len(),
        }
    }
}

/// Why a tensor could not be quantized or assembled.
#[derive(Debug, Clone, PartialEq)]
pub enum Nf4Error {
    /// The blocksize is not one bitsandbytes accepts (see [`BLOCKSIZES`]).
    InvalidBlocksize(usize),
    /// The shape's element count differs from the number of values given (or overflows).
    ShapeMismatch {
        /// The shape given.
        shape: Vec<usize>,
        /// The number of values given.
        len: usize,
    },
    /// The tensor has no elements.
    Empty,
    /// A value is NaN or infinite; bitsandbytes would quietly produce garbage for its block.
    NonFinite {
        /// Flat index of the first such value.
        index: usize,
    },
    /// Double quantization: the mean of the absmax values overflows f32.
    OffsetOverflow,
    /// A part given to [`Nf4Tensor::from_parts`] has the wrong length for the shape and blocksize.
    PartLength {
        /// Which part: `packed`, `absmax`, `quantized absmax` or `nested_absmax`.
        part: &'static str,
        /// The length the shape and blocksize call for.
        expected: usize,
        /// The length given.
        actual: usize,
    },
    /// A nested blocksize of zero was given to [`Nf4Tensor::from_parts`].
    InvalidNestedBlocksize(usize),
}

impl fmt::Display for Nf4Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Nf4Error::InvalidBlocksize(b) => {
                write!(f, "invalid NF4 blocksize {b}: bitsandbytes accepts 32, 64, 128, 256, 512, 1024, 2048, 4096")
            }
            Nf4Error::ShapeMismatch { shape, len } => {
                write!(f, "shape {shape:?} does not hold the {len} values given")
            }
            Nf4Error::Empty => write!(f, "cannot NF4-quantize an empty tensor"),
            Nf4Error::NonFinite { index } => write!(f, "value at flat index {index} is NaN or infinite"),
            Nf4Error::OffsetOverflow => write!(f, "double quantization: the mean of the block absmax overflows f32"),
            Nf4Error::PartLength { part, expected, actual } => {
                write!(f, "NF4 {part} has {actual} entries, the shape and blocksize call for {expected}")
            }
            Nf4Error::InvalidNestedBlocksize(b) => write!(f, "invalid nested blocksize {b}"),
        }
    }
}

impl std::error::Error for Nf4Error {}

/// An NF4-quantized tensor: bitsandbytes' packed weight plus its quantization state.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    shape: Vec<usize>,
    blocksize: usize,
    packed: Vec<u8>,
    absmax: Absmax,
}

fn check_blocksize(blocksize: usize) -> Result<(), Nf4Error> {
    if BLOCKSIZES.contains(&blocksize) {
        Ok(())
    } else {
        Err(Nf4Error::InvalidBlocksize(blocksize))
    }
}

fn numel_of(shape: &[usize], len: usize) -> Result<usize, Nf4Error> {
    let numel = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    match numel {
        Some(n) if n == len => Ok(n),
        _ => Err(Nf4Error::ShapeMismatch { shape: shape.to_vec(), len }),
    }
}

/// The NF4 index of an already scaled value: how many code midpoints lie strictly below it.
#[inline]
fn nf4_index(scaled: f32) -> u8 {
    NF4_BOUNDS.iter().map(|&b| (scaled > b) as u8).sum()
}

/// Quantizes one block into `bytes` (`ceil(block.len() / 2)` of them) and returns the absmax stored for it.
/// `full` selects bitsandbytes' full-block arithmetic (reciprocal) over its partial-last-block one (division).
fn quantize_block(block: &[f32], bytes: &mut [u8], full: bool) -> f32 {
    let absmax = block.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
    let clamped = absmax.max(MIN_SCALE);
    let recip = 1.0 / clamped;
    let index = |x: f32| {
        let s = if full { x * recip } else { x / clamped };
        nf4_index(s.clamp(-1.0, 1.0))
    };
    let mut pairs = block.chunks_exact(2);
    for (byte, pair) in bytes.iter_mut().zip(&mut pairs) {
        *byte = (index(pair[0]) << 4) | index(pair[1]);
    }
    if let [last] = pairs.remainder() {
        // bitsandbytes pads the scaled values with 0.0, whose index is 7
        *bytes.last_mut().expect("a byte for the odd element") = (index(*last) << 4) | nf4_index(0.0);
    }
    if full {
        absmax
    } else {
        clamped
    }
}

/// bitsandbytes' CPU table from a 16-bit bucket of `[-1, 1]` to the nearest entry of the dynamic map
/// (`build_quantize_lut` in csrc/cpu_ops.cpp).
fn dynamic_lut() -> &'static [u8] {
    static LUT: OnceLock<Vec<u8>> = OnceLock::new();
    LUT.get_or_init(|| {
        let mut mids = [0.0f32; 255];
        for (i, m) in mids.iter_mut().enumerate() {
            *m = 0.5 * (DYNAMIC_MAP[i] + DYNAMIC_MAP[i + 1]);
        }
        let mut lut = vec![0u8; LUT_SIZE];
        let mut code = 0usize;
        for (i, entry) in lut.iter_mut().enumerate() {
            let i = i as f32;
            let val = (i + i) / (LUT_SIZE - 1) as f32 - 1.0;
            while code < 255 && mids[code] < val {
                code += 1;
            }
            *entry = code as u8;
        }
        lut
    })
}

/// bitsandbytes' CPU 8-bit blockwise quantization of `values` with the dynamic map (blocks of
/// `blocksize`): the indices and one absmax per block.
fn quantize_dynamic(values: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let lut = dynamic_lut();
    let mut q = vec![0u8; values.len()];
    let mut absmax = vec![0.0f32; values.len().div_ceil(blocksize)];
    q.par_chunks_mut(blocksize).zip(values.par_chunks(blocksize)).zip(absmax.par_iter_mut()).for_each(
        |((q, block), am)| {
            let m = block.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
            *am = m;
            if m == 0.0 {
                q.fill(0);
                return;
            }
            let inv = 1.0 / m;
            for (q, &x) in q.iter_mut().zip(block) {
                let v = (x * inv).clamp(-1.0, 1.0);
                let bucket = 65535.0f32.mul_add((v + 1.0) * 0.5, 0.5) as usize;
                *q = lut[bucket.min(LUT_SIZE - 1)];
            }
        },
    );
    (q, absmax)
}

fn add_lanes<const L: usize>(acc: &mut [f32; L], x: &[f32; L]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a += *b;
    }
}

fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
}

/// torch's `multi_row_sum` (aten/src/ATen/native/cpu/SumKernel.cpp) over 4 rows of `L`-lane values:
/// `load(i, k)` is row `k` of step `i`.
fn multi_row_sum<const L: usize>(load: impl Fn(usize, usize) -> [f32; L], size: usize) -> [[f32; L]; 4] {
    const LEVELS: usize = 4;
    let level_power = 4.max(ceil_log2(size) / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0.0f32; L]; 4]; LEVELS];
    let mut i = 0;
    while i + level_step <= size {
        for _ in 0..level_step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                add_lanes(a, &load(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (below, above) = acc.split_at_mut(j);
            for (lower, upper) in below[j - 1].iter_mut().zip(above[0].iter_mut()) {
                add_lanes(upper, lower);
                *lower = [0.0; L];
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for (k, a) in acc[0].iter_mut().enumerate() {
            add_lanes(a, &load(i, k));
        }
        i += 1;
    }
    let (first, rest) = acc.split_at_mut(1);
    for level in rest.iter() {
        for (total, upper) in first[0].iter_mut().zip(level) {
            add_lanes(total, upper);
        }
    }
    acc[0]
}

/// torch's `row_sum`: `size` values of `L` lanes, summed 4-way interleaved.
fn row_sum<const L: usize>(load: impl Fn(usize) -> [f32; L], size: usize) -> [f32; L] {
    let size_ilp = size / 4;
    let mut partial = multi_row_sum(|i, k| load(4 * i + k), size_ilp);
    for i in size_ilp * 4..size {
        add_lanes(&mut partial[0], &load(i));
    }
    for k in 1..4 {
        let p = partial[k];
        add_lanes(&mut partial[0], &p);
    }
    partial[0]
}

/// `torch.sum` of a contiguous f32 vector on the CPU, in torch's order (one thread, or any thread count
/// up to 32768 values).
fn torch_cpu_sum(x: &[f32]) -> f32 {
    let total = if x.len() >= SUM_LANES {
        let vecs = x.len() / SUM_LANES;
        let lanes = row_sum(
            |i| {
                let mut v = [0.0f32; SUM_LANES];
                v.copy_from_slice(&x[i * SUM_LANES..(i + 1) * SUM_LANES]);
                v
            },
            vecs,
        );
        let mut acc = 0.0f32;
        for &t in &x[vecs * SUM_LANES..] {
            acc += t;
        }
        for l in lanes {
            acc += l;
        }
        acc
    } else {
        row_sum(|i| [x[i]], x.len())[0]
    };
    // the reduction accumulates into a zero-filled output
    0.0 + total
}

/// `torch.mean` of a contiguous f32 vector on the CPU: the sum, then a division by the count.
fn torch_cpu_mean(x: &[f32]) -> f32 {
    torch_cpu_sum(x) / x.len() as f32
}

/// bitsandbytes' double quantization of the per-block absmax values.
fn double_quantize(absmax: &[f32]) -> Result<Absmax, Nf4Error> {
    let offset = torch_cpu_mean(absmax);
    if !offset.is_finite() {
        return Err(Nf4Error::OffsetOverflow);
    }
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let (quantized, nested_absmax) = quantize_dynamic(&centered, NESTED_BLOCKSIZE);
    Ok(Absmax::Double { quantized, nested_absmax, offset, nested_blocksize: NESTED_BLOCKSIZE })
}

/// Quantizes `values` (a row-major tensor of `shape`) to NF4 as bitsandbytes' `quantize_4bit(A,
/// blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)` does on the CPU, bit for bit.
/// Blocks run in parallel; the result does not depend on the thread count.
///
/// # Errors
/// [`Nf4Error::InvalidBlocksize`] unless `blocksize` is in [`BLOCKSIZES`], [`Nf4Error::ShapeMismatch`] if
/// `shape` does not hold `values.len()` elements, [`Nf4Error::Empty`] for no elements,
/// [`Nf4Error::NonFinite`] for a NaN or infinite value, and [`Nf4Error::OffsetOverflow`] if double
/// quantization's mean of the absmax values overflows.
pub fn quantize(values: &[f32], shape: &[usize], blocksize: usize, double_quant: bool) -> Result<Nf4Tensor, Nf4Error> {
    check_blocksize(blocksize)?;
    let n = numel_of(shape, values.len())?;
    if n == 0 {
        return Err(Nf4Error::Empty);
    }
    if let Some(index) = values.par_iter().position_first(|v| !v.is_finite()) {
        return Err(Nf4Error::NonFinite { index });
    }
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0.0f32; n.div_ceil(blocksize)];
    packed
        .par_chunks_mut(blocksize / 2)
        .zip(values.par_chunks(blocksize))
        .zip(absmax.par_iter_mut())
        .with_min_len(QUANT_TASK_BLOCKS)
        .for_each(|((bytes, block), am)| *am = quantize_block(block, bytes, block.len() == blocksize));
    let absmax = if double_quant { double_quantize(&absmax)? } else { Absmax::Plain(absmax) };
    Ok(Nf4Tensor { shape: shape.to_vec(), blocksize, packed, absmax })
}

impl Nf4Tensor {
    /// Assembles a tensor from serialized parts (bitsandbytes' `<p>.weight`, `absmax`, and with double
    /// quantization `nested_absmax` and `nested_offset`), checking that every length fits the shape and
    /// blocksize. `packed` holds `ceil(numel / 2)` bytes, first element in the high nibble.
    ///
    /// # Errors
    /// [`Nf4Error::InvalidBlocksize`], [`Nf4Error::Empty`] for a shape with no elements,
    /// [`Nf4Error::ShapeMismatch`] if its element count overflows, [`Nf4Error::InvalidNestedBlocksize`]
    /// for a nested blocksize of 0, and [`Nf4Error::PartLength`] for a part of the wrong length.
    pub fn from_parts(shape: Vec<usize>, blocksize: usize, packed: Vec<u8>, absmax: Absmax) -> Result<Self, Nf4Error> {
        check_blocksize(blocksize)?;
        let numel = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let n = numel.ok_or_else(|| Nf4Error::ShapeMismatch { shape: shape.clone(), len: usize::MAX })?;
        if n == 0 {
            return Err(Nf4Error::Empty);
        }
        let length = |part, expected, actual| {
            if expected == actual {
                Ok(())
            } else {
                Err(Nf4Error::PartLength { part, expected, actual })
            }
        };
        length("packed", n.div_ceil(2), packed.len())?;
        let blocks = n.div_ceil(blocksize);
        match &absmax {
            Absmax::Plain(v) => length("absmax", blocks, v.len())?,
            Absmax::Double { quantized, nested_absmax, nested_blocksize, .. } => {
                if *nested_blocksize == 0 {
                    return Err(Nf4Error::InvalidNestedBlocksize(0));
                }
                length("quantized absmax", blocks, quantized.len())?;
                length("nested_absmax", blocks.div_ceil(*nested_blocksize), nested_absmax.len())?;
            }
        }
        Ok(Nf4Tensor { shape, blocksize, packed, absmax })
    }

    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Elements per quantization block.
    pub fn blocksize(&self) -> usize {
        self.blocksize
    }

    /// The packed 4-bit indices: `ceil(numel / 2)` bytes, element `2i` in the high nibble of byte `i`,
    /// element `2i + 1` in the low one (for an odd count the last low nibble is padding, index 7).
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// The per-block scales, as stored.
    pub fn absmax(&self) -> &Absmax {
        &self.absmax
    }

    /// The per-block absmax values dequantization multiplies by (decoded from the double-quantized
    /// form if need be, bit-identical to bitsandbytes).
    pub fn absmax_values(&self) -> Vec<f32> {
        (0..self.absmax.len()).map(|b| self.absmax.scale(b)).collect()
    }

    /// Bytes of quantized data held: the packed indices plus the block statistics (4 per f32 absmax; 1
    /// per 8-bit absmax, 4 per nested absmax and 4 for the offset under double quantization).
    pub fn storage_bytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                Absmax::Plain(v) => 4 * v.len(),
                Absmax::Double { quantized, nested_absmax, .. } => quantized.len() + 4 * nested_absmax.len() + 4,
            }
    }

    /// The f32 tensor (row-major, [`shape`](Self::shape)), bit-identical to bitsandbytes' reference
    /// `dequantize_4bit` (`NF4_CODE[index] * absmax`, blocks over the flattened tensor; also what its CUDA
    /// kernel computes). Runs in parallel. (bitsandbytes 0.50.2's native AVX-512 CPU kernel picks the
    /// wrong absmax when the last dimension is not a multiple of the blocksize; this does not copy that.)
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.numel()];
        self.dequantize_span(0, &mut out);
        out
    }

    /// Dequantizes rows `first_row .. first_row + rows` into `out`, a row being the last dimension (so
    /// for an `[out_features, in_features]` weight, `out` receives `rows * in_features` values). The same
    /// values as the matching slice of [`dequantize`](Self::dequantize), for any rows, aligned to blocks
    /// or not, without building the whole f32 tensor. Runs in parallel.
    ///
    /// # Panics
    /// If the rows run past the tensor or `out.len()` is not `rows` times the row length.
    pub fn dequantize_rows_into(&self, first_row: usize, rows: usize, out: &mut [f32]) {
        let cols = self.shape.last().copied().unwrap_or(1);
        let total_rows = self.numel() / cols;
        assert!(
            first_row.checked_add(rows).is_some_and(|end| end <= total_rows),
            "nf4: rows {first_row}..{} out of range for {total_rows} rows",
            first_row.saturating_add(rows)
        );
        assert_eq!(out.len(), rows * cols, "nf4: out must hold {rows} rows of {cols}");
        self.dequantize_span(first_row * cols, out);
    }

    /// Dequantizes elements `start .. start + out.len()` into `out`, split across threads at multiples of
    /// a whole number of blocks.
    fn dequantize_span(&self, start: usize, out: &mut [f32]) {
        let task = (DEQUANT_TASK / self.blocksize).max(1) * self.blocksize;
        let mut pieces = Vec::with_capacity(out.len() / task + 2);
        let mut rest = out;
        let mut pos = start;
        while !rest.is_empty() {
            let take = ((pos / task + 1) * task - pos).min(rest.len());
            let (piece, tail) = std::mem::take(&mut rest).split_at_mut(take);
            pieces.push((pos, piece));
            pos += take;
            rest = tail;
        }
        pieces.into_par_iter().for_each(|(pos, piece)| self.dequantize_serial(pos, piece));
    }

    /// Dequantizes elements `start .. start + out.len()` on this thread: per block a 16-entry table of
    /// `code * absmax`, then two table reads per byte.
    fn dequantize_serial(&self, start: usize, out: &mut [f32]) {
        let bs = self.blocksize;
        let end = start + out.len();
        let mut p = start;
        let mut o = 0;
        while p < end {
            let block = p / bs;
            let block_end = ((block + 1) * bs).min(end);
            let scale = self.absmax.scale(block);
            let table = NF4_CODE.map(|c| c * scale);
            if p % 2 == 1 {
                out[o] = table[(self.packed[p / 2] & 0x0f) as usize];
                p += 1;
                o += 1;
            }
            let pairs = (block_end - p) / 2;
            let bytes = &self.packed[p / 2..p / 2 + pairs];
            for (pair, &byte) in out[o..o + 2 * pairs].chunks_exact_mut(2).zip(bytes) {
                pair[0] = table[(byte >> 4) as usize];
                pair[1] = table[(byte & 0x0f) as usize];
            }
            p += 2 * pairs;
            o += 2 * pairs;
            if p < block_end {
                out[o] = table[(self.packed[p / 2] >> 4) as usize];
                p += 1;
                o += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::{Dtype, SafeTensors};

    /// Deterministic standard normals (xorshift64* and Box-Muller).
    fn normals(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut uniform = move || {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            ((s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let (u, v) = (uniform(), uniform());
                ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
            })
            .collect()
    }

    fn assert_bits_eq(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        if let Some(i) = got.iter().zip(want).position(|(a, b)| a.to_bits() != b.to_bits()) {
            panic!("{what}: first difference at {i}: {:e} vs bitsandbytes {:e}", got[i], want[i]);
        }
    }

    /// Half the widest gap between neighbouring codes: the worst scaled rounding error.
    fn max_half_gap() -> f32 {
        NF4_CODE.windows(2).map(|w| (w[1] - w[0]) / 2.0).fold(0.0, f32::max)
    }

    #[test]
    fn code_tables_are_sorted_and_bounded() {
        assert!(NF4_CODE.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((NF4_CODE[0], NF4_CODE[7], NF4_CODE[15]), (-1.0, 0.0, 1.0));
        let d = dynamic_map();
        assert!(d.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((d[0], d[127], d[255]), (-0.99296874, 0.0, 1.0));
        assert_eq!(MIN_SCALE, 1e-38f32);
        assert_eq!(nf4_index(0.0), 7);
        assert_eq!(nf4_index(NF4_BOUNDS[7]), 7, "a midpoint takes the lower index");
        assert_eq!(nf4_index(f32::from_bits(NF4_BOUNDS[7].to_bits() + 1)), 8);
    }

    #[test]
    fn round_trip_error_is_within_half_a_code_gap() {
        let x: Vec<f32> = normals(64 * 40 + 17, 1).iter().map(|v| v * 0.02).collect();
        for double in [false, true] {
            let q = quantize(&x, &[x.len()], 64, double).unwrap();
            let back = q.dequantize();
            let absmax = q.absmax_values();
            for (i, (a, b)) in x.iter().zip(&back).enumerate() {
                let bound = absmax[i / 64] * (max_half_gap() + 1e-6);
                assert!((a - b).abs() <= bound, "{i}: {a} -> {b} (bound {bound})");
            }
        }
    }

    #[test]
    fn code_values_times_absmax_come_back_exactly() {
        let mut x: Vec<f32> = NF4_CODE.iter().map(|c| c * 0.5).collect();
        x.extend(NF4_CODE.iter().rev().map(|c| c * 0.5));
        let q = quantize(&x, &[32], 32, false).unwrap();
        assert_eq!(q.absmax(), &Absmax::Plain(vec![0.5]));
        assert_eq!(q.dequantize(), x);
        assert_eq!(q.packed()[0], 0x01);
        assert_eq!(q.packed()[15], 0x10);
    }

    #[test]
    fn odd_lengths_and_partial_blocks() {
        let x = normals(1001, 2);
        let q = quantize(&x, &[1001], 64, false).unwrap();
        assert_eq!((q.packed().len(), q.absmax_values().len(), q.numel()), (501, 16, 1001));
        assert_eq!(q.packed()[500] & 0x0f, 7, "padding nibble");
        let tail_max = x[960..].iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert_eq!(q.absmax_values()[15], tail_max);
        assert_eq!(q.dequantize().len(), 1001);
        // an all-zero partial last block keeps the 1e-38 clamp; an all-zero full block keeps 0
        let mut z = vec![0.0f32; 64 + 10];
        z[3] = 1.0;
        let q = quantize(&z, &[74], 64, false).unwrap();
        assert_eq!(q.absmax_values(), vec![1.0, MIN_SCALE]);
        let q = quantize(&[0.0; 128], &[2, 64], 64, false).unwrap();
        assert_eq!(q.absmax_values(), vec![0.0, 0.0]);
        assert!(q.packed().iter().all(|&b| b == 0x77));
        assert!(q.dequantize().iter().all(|&v| v == 0.0));
        // a single element
        let q = quantize(&[-3.0], &[1], 64, true).unwrap();
        assert_eq!(q.packed(), &[0x07]);
        assert_eq!(q.dequantize(), vec![-3.0]);
    }

    #[test]
    fn double_quant_stays_close_to_the_plain_absmax() {
        let x: Vec<f32> = normals(64 * 600, 3).iter().enumerate().map(|(i, v)| v * (1.0 + (i / 640) as f32)).collect();
        let plain = quantize(&x, &[600, 64], 64, false).unwrap();
        let double = quantize(&x, &[600, 64], 64, true).unwrap();
        assert_eq!(plain.packed(), double.packed());
        let Absmax::Double { quantized, nested_absmax, nested_blocksize, .. } = double.absmax() else {
            panic!("double quant state expected");
        };
        assert_eq!((quantized.len(), nested_absmax.len(), *nested_blocksize), (600, 3, 256));
        // the error is at most half a gap of the dynamic map (plus the 16-bit bucket of bitsandbytes'
        // table) times the nested block's absmax
        let half_gap = DYNAMIC_MAP.windows(2).map(|w| (w[1] - w[0]) / 2.0).fold(0.0, f32::max);
        for (b, (a, d)) in plain.absmax_values().iter().zip(double.absmax_values()).enumerate() {
            let bound = nested_absmax[b / 256] * (half_gap + 2.0 / 65535.0);
            assert!((a - d).abs() <= bound, "block {b}: {a} vs {d} (bound {bound})");
        }
        assert_eq!(double.storage_bytes(), 64 * 600 / 2 + 600 + 3 * 4 + 4);
        assert_eq!(plain.storage_bytes(), 64 * 600 / 2 + 600 * 4);
        // one block: absmax - mean(absmax) is 0, decoded as dynamic_map()[0] * 0 + offset
        let one = quantize(&x[..64], &[64], 64, true).unwrap();
        assert_eq!(
            one.absmax(),
            &Absmax::Double {
                quantized: vec![0],
                nested_absmax: vec![0.0],
                offset: plain.absmax_values()[0],
                nested_blocksize: 256
            }
        );
        assert_eq!(one.absmax_values(), vec![plain.absmax_values()[0]]);
    }

    #[test]
    fn rows_match_the_full_dequantization() {
        for (rows, cols, bs) in [(7, 33, 32), (9, 80, 64), (5, 300, 128), (3, 1, 32), (1, 65, 64)] {
            let x = normals(rows * cols, (rows * cols) as u64);
            for double in [false, true] {
                let q = quantize(&x, &[rows, cols], bs, double).unwrap();
                let full = q.dequantize();
                for first in 0..rows {
                    for count in 0..=rows - first {
                        let mut out = vec![f32::NAN; count * cols];
                        q.dequantize_rows_into(first, count, &mut out);
                        assert_bits_eq("rows", &out, &full[first * cols..(first + count) * cols]);
                    }
                }
            }
        }
        // spans longer than one thread task
        let x = normals(3 * 40_000 + 1, 9);
        let q = quantize(&x, &[3 * 40_000 + 1], 64, true).unwrap();
        let full = q.dequantize();
        let mut out = vec![0.0; full.len()];
        q.dequantize_rows_into(0, 1, &mut out);
        assert_bits_eq("long", &out, &full);
        let q = quantize(&x[1..], &[120_000, 1], 64, false).unwrap();
        let full = q.dequantize();
        let mut out = vec![0.0; 100_001];
        q.dequantize_rows_into(7_777, 100_001, &mut out);
        assert_bits_eq("long rows", &out, &full[7_777..107_778]);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn rows_past_the_end_panic() {
        let q = quantize(&[1.0; 64], &[4, 16], 64, false).unwrap();
        q.dequantize_rows_into(3, 2, &mut [0.0; 32]);
    }

    #[test]
    fn result_does_not_depend_on_the_thread_count() {
        let x = normals(64 * 1000 + 31, 4);
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let q = quantize(&x, &[x.len()], 64, true).unwrap();
                let d = q.dequantize();
                (q, d.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
            })
        };
        assert_eq!(run(1), run(4));
    }

    #[test]
    fn rejects_what_bitsandbytes_rejects_and_bad_input() {
        let x = [0.5f32; 64];
        for bs in [0, 1, 16, 48, 96, 8192] {
            assert_eq!(quantize(&x, &[64], bs, false).unwrap_err(), Nf4Error::InvalidBlocksize(bs));
        }
        for bs in BLOCKSIZES {
            assert!(quantize(&x, &[64], bs, false).is_ok());
        }
        assert_eq!(
            quantize(&x, &[8, 7], 64, false).unwrap_err(),
            Nf4Error::ShapeMismatch { shape: vec![8, 7], len: 64 }
        );
        assert_eq!(quantize(&[], &[0], 64, false).unwrap_err(), Nf4Error::Empty);
        let mut bad = x;
        bad[9] = f32::NAN;
        assert_eq!(quantize(&bad, &[64], 64, false).unwrap_err(), Nf4Error::NonFinite { index: 9 });
        bad[9] = f32::INFINITY;
        assert_eq!(quantize(&bad, &[64], 64, false).unwrap_err(), Nf4Error::NonFinite { index: 9 });
        let huge = [f32::MAX; 128];
        assert_eq!(quantize(&huge, &[128], 64, true).unwrap_err(), Nf4Error::OffsetOverflow);
        assert!(quantize(&huge, &[128], 64, false).is_ok());
        assert!(Nf4Error::InvalidBlocksize(48).to_string().contains("48"));
    }

    #[test]
    fn from_parts_checks_lengths() {
        let x = normals(300, 5);
        let q = quantize(&x, &[3, 100], 64, true).unwrap();
        let again = Nf4Tensor::from_parts(vec![3, 100], 64, q.packed().to_vec(), q.absmax().clone()).unwrap();
        assert_eq!(again, q);
        let err = Nf4Tensor::from_parts(vec![3, 100], 64, vec![0; 149], q.absmax().clone()).unwrap_err();
        assert_eq!(err, Nf4Error::PartLength { part: "packed", expected: 150, actual: 149 });
        let err = Nf4Tensor::from_parts(vec![3, 100], 64, vec![0; 150], Absmax::Plain(vec![1.0; 4])).unwrap_err();
        assert_eq!(err, Nf4Error::PartLength { part: "absmax", expected: 5, actual: 4 });
        let double = |q: usize, n: usize, nb: usize| Absmax::Double {
            quantized: vec![0; q],
            nested_absmax: vec![1.0; n],
            offset: 0.0,
            nested_blocksize: nb,
        };
        assert!(Nf4Tensor::from_parts(vec![300], 64, vec![0; 150], double(5, 1, 256)).is_ok());
        assert!(Nf4Tensor::from_parts(vec![300], 64, vec![0; 150], double(5, 3, 2)).is_ok());
        let err = Nf4Tensor::from_parts(vec![300], 64, vec![0; 150], double(5, 2, 256)).unwrap_err();
        assert_eq!(err, Nf4Error::PartLength { part: "nested_absmax", expected: 1, actual: 2 });
        let err = Nf4Tensor::from_parts(vec![300], 64, vec![0; 150], double(4, 1, 256)).unwrap_err();
        assert_eq!(err, Nf4Error::PartLength { part: "quantized absmax", expected: 5, actual: 4 });
        let err = Nf4Tensor::from_parts(vec![300], 64, vec![0; 150], double(5, 1, 0)).unwrap_err();
        assert_eq!(err, Nf4Error::InvalidNestedBlocksize(0));
        let err = Nf4Tensor::from_parts(vec![300], 50, vec![0; 150], double(5, 1, 256)).unwrap_err();
        assert_eq!(err, Nf4Error::InvalidBlocksize(50));
        let err = Nf4Tensor::from_parts(vec![0, 3], 64, vec![], Absmax::Plain(vec![])).unwrap_err();
        assert_eq!(err, Nf4Error::Empty);
    }

    #[test]
    fn torch_sum_order_on_small_inputs() {
        assert_eq!(torch_cpu_sum(&[]), 0.0);
        assert_eq!(torch_cpu_sum(&[1.0, 2.0, 3.0]), 6.0);
        // 2^24 + 1 is not an f32: the sum shows which ones meet each other before meeting 2^24.
        // 17 values: lanes 0..8 hold x[0..8] and x[8..16]; x[16] is the scalar tail, added first.
        let mut x = vec![1.0f32; 17];
        x[0] = 16_777_216.0;
        // lane 0: 2^24 + 1 = 2^24; lanes 1..8: 2 each; then 0 + 1 (tail) + 2^24 (= 2^24) + 2 * 7
        assert_eq!(torch_cpu_sum(&x), 16_777_216.0 + 14.0);
        // a plain left-to-right sum would lose every 1
        assert_eq!(x.iter().fold(0.0f32, |a, b| a + b), 16_777_216.0);
        assert_eq!(ceil_log2(1), 1);
        assert_eq!(ceil_log2(17), 5);
        assert_eq!(ceil_log2(16), 4);
    }

    fn fixture() -> Vec<u8> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/nf4/reference.safetensors");
        std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e} (run tests/fixtures/make_nf4.py)"))
    }

    fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        match t.dtype() {
            Dtype::F32 => t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::BF16 => t
                .data()
                .chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                .collect(),
            other => panic!("{name}: unexpected dtype {other:?}"),
        }
    }

    fn bytes(st: &SafeTensors, name: &str) -> Vec<u8> {
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), Dtype::U8, "{name}");
        t.data().to_vec()
    }

    #[test]
    fn dynamic_quantizer_matches_bitsandbytes() {
        let data = fixture();
        let st = SafeTensors::deserialize(&data).unwrap();
        let (q, absmax) = quantize_dynamic(&f32s(&st, "blockwise_check.input"), NESTED_BLOCKSIZE);
        assert!(q == bytes(&st, "blockwise_check.q"), "8-bit indices differ from quantize_blockwise");
        assert_bits_eq("blockwise_check.absmax", &absmax, &f32s(&st, "blockwise_check.absmax"));
    }

    #[test]
    fn matches_bitsandbytes_fixture() {
        let data = fixture();
        let st = SafeTensors::deserialize(&data).unwrap();
        assert_bits_eq("nf4_code", &NF4_CODE, &f32s(&st, "nf4_code"));
        assert_bits_eq("dynamic_code", &dynamic_map(), &f32s(&st, "dynamic_code"));
        let mean = f32s(&st, "mean_check.mean")[0];
        assert_eq!(torch_cpu_mean(&f32s(&st, "mean_check.input")).to_bits(), mean.to_bits(), "torch mean");

        let names = st.names();
        let mut cases: Vec<&str> = names.iter().filter_map(|n| n.strip_suffix(".input")).collect();
        cases.retain(|c| !c.ends_with("_check"));
        cases.sort();
        assert_eq!(cases, ["many", "odd1001", "one_block", "outliers", "ties", "w48x80", "zero_tail"]);
        let mut checked = 0;
        for case in cases {
            let input_name = format!("{case}.input");
            let shape = st.tensor(&input_name).unwrap().shape().to_vec();
            let x = f32s(&st, &input_name);
            let prefix = format!("{case}.bs");
            let mut blocksizes: Vec<usize> =
                names.iter().filter_map(|n| n.strip_prefix(&prefix)?.strip_suffix(".packed")?.parse().ok()).collect();
            blocksizes.sort();
            assert!(!blocksizes.is_empty(), "{case}");
            for bs in blocksizes {
                let p = format!("{case}.bs{bs}.");
                let what = |s: &str| format!("{p}{s}");
                let packed = bytes(&st, &what("packed"));

                let plain = quantize(&x, &shape, bs, false).unwrap();
                assert!(plain.packed() == packed.as_slice(), "{p}packed differs");
                assert_bits_eq(&what("absmax"), &plain.absmax_values(), &f32s(&st, &what("absmax")));
                if names.contains(&what("dequant").as_str()) {
                    let want = f32s(&st, &what("dequant"));
                    assert_bits_eq(&what("dequant"), &plain.dequantize(), &want);
                    let cols = *shape.last().unwrap();
                    let rows = x.len() / cols;
                    let (first, count) = (rows / 3, rows - rows / 3 - rows / 4);
                    let mut out = vec![0.0; count * cols];
                    plain.dequantize_rows_into(first, count, &mut out);
                    assert_bits_eq(&what("rows"), &out, &want[first * cols..(first + count) * cols]);
                }

                let double = quantize(&x, &shape, bs, true).unwrap();
                assert!(double.packed() == packed.as_slice(), "{p}packed differs (double quant)");
                let Absmax::Double { quantized, nested_absmax, offset, nested_blocksize } = double.absmax() else {
                    panic!("double quant state expected");
                };
                assert_eq!(*nested_blocksize, 256);
                assert_eq!(offset.to_bits(), f32s(&st, &what("dq.offset"))[0].to_bits(), "{p}dq.offset");
                assert!(*quantized == bytes(&st, &what("dq.absmax_q")), "{p}dq.absmax_q differs");
                assert_bits_eq(&what("dq.nested_absmax"), nested_absmax, &f32s(&st, &what("dq.nested_absmax")));
                assert_bits_eq(
                    &what("dq.absmax_dequant"),
                    &double.absmax_values(),
                    &f32s(&st, &what("dq.absmax_dequant")),
                );
                let want = f32s(&st, &what("dq.dequant"));
                assert_bits_eq(&what("dq.dequant"), &double.dequantize(), &want);

                // loading bitsandbytes' own parts gives the same tensor
                let absmax = Absmax::Double {
                    quantized: bytes(&st, &what("dq.absmax_q")),
                    nested_absmax: f32s(&st, &what("dq.nested_absmax")),
                    offset: f32s(&st, &what("dq.offset"))[0],
                    nested_blocksize: 256,
                };
                let loaded = Nf4Tensor::from_parts(shape.clone(), bs, packed, absmax).unwrap();
                assert_bits_eq(&what("loaded dq.dequant"), &loaded.dequantize(), &want);
                checked += 1;
            }
        }
        assert_eq!(checked, 8);
    }
}
