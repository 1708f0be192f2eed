// NF4 (QLoRA's 4-bit NormalFloat weights, bitsandbytes' layout) on the GPU:
// dequantization, quantization, and the fused dequant-matmuls of the QLoRA
// forward (y = x·Wᵀ) and backward (dx = g·W). CPU reference: kernels/src/nf4.rs
// (`NF4_CODE`, `Absmax::scale`, `Nf4Tensor::dequantize_serial`, `quantize` /
// `quantize_block` / `nf4_index`).
//
// Layout: element i of the flattened tensor is the high nibble of packed[i/2]
// for even i and the low nibble for odd i; it belongs to quantization block
// i / blocksize. `blocksize` must be a power of two (every bitsandbytes
// blocksize is: 32 … 4096). A block's scale is, plainly, absmax[b], or under
// double quantization (absmax == nullptr)
//     code256[absmax_q[b]] · nested_absmax[b / nested_blocksize] + offset,
// and an element is NF4_CODE[nibble] · scale. Both products and the sum are
// rounded separately (__fmul_rn / __fadd_rn, never contracted to an FMA), as
// the CPU computes them, so dequantization is bit-identical to the CPU's; so
// is quantization (same scaling, same midpoint test, same absmax stored).
//
// Launch configurations (none uses dynamic shared memory):
//   nf4_dequant_*:   grid (any, e.g. ceil(ceil(numel / 2) / 256)), block (256):
//                    grid-stride, one packed byte (two elements) per thread
//                    (64 bytes of static shared memory: the codebook).
//   nf4_quantize_f32: grid (ceil(ceil(numel / blocksize) / 8)), block (256):
//                    one warp per quantization block, 8 per thread block.
//   nf4_matmul_*:    grid (ceil(n / 64), ceil(m / 64)), block (256): one 64×64
//                    tile of y per block (17 472 bytes of static shared memory).
//   nf4_matmul_t_*:  grid (ceil(k / 64), ceil(m / 64)), block (256): one 64×64
//                    tile of dx per block (same shared memory).

#include "common.cuh"

// The 16 NF4 code values (bitsandbytes' get_4bit_type("nf4") in f32), sorted.
__constant__ float NF4_CODE[16] = {
    -1.0f,        -0.6961928f,  -0.52507305f, -0.3949175f, -0.28444138f, -0.18477343f,
    -0.091050036f, 0.0f,         0.0795803f,   0.1609302f,  0.2461123f,   0.33791524f,
    0.44070983f,   0.562617f,    0.72295684f,  1.0f,
};

// The scales of an NF4 tensor, as the kernels receive them: plain
// (`absmax` set) or double-quantized (`absmax` null, the other fields set).
struct Nf4Scales {
    const float* absmax;
    const uint8_t* absmax_q;
    const float* code256;
    const float* nested_absmax;
    float offset;
    int nested_blocksize;

    // The absmax of block b (Absmax::scale).
    __device__ __forceinline__ float scale(long long b) const {
        if (absmax != nullptr) return absmax[b];
        return __fadd_rn(__fmul_rn(code256[absmax_q[b]], nested_absmax[b / nested_blocksize]), offset);
    }
};

// log2 of a power-of-two blocksize.
__device__ __forceinline__ int log2_of(int pow2) { return __ffs(pow2) - 1; }

// Nibble of element e (high nibble for even e).
__device__ __forceinline__ int nibble_of(const uint8_t* packed, long long e) {
    const uint8_t byte = packed[e >> 1];
    return (e & 1) ? (byte & 0x0f) : (byte >> 4);
}

// The codebook in shared memory: a warp's reads of 16 different entries are
// served at once from shared memory, where the constant cache would serialize
// them. Every thread of the block must call this before the first lookup.
__device__ __forceinline__ const float* shared_codebook() {
    __shared__ float code[16];
    if (threadIdx.x < 16) code[threadIdx.x] = NF4_CODE[threadIdx.x];
    __syncthreads();
    return code;
}

// ---- dequantization ------------------------------------------------------

template <typename T>
__device__ void nf4_dequant(const uint8_t* packed, Nf4Scales scales, T* out, long long numel, int blocksize) {
    const float* code = shared_codebook();
    const int shift = log2_of(blocksize);
    const long long bytes = (numel + 1) / 2;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < bytes; p += stride) {
        const long long e = 2 * p;  // both elements of a byte share a block (blocksize is even)
        const float s = scales.scale(e >> shift);
        const uint8_t byte = packed[p];
        out[e] = from_float<T>(__fmul_rn(code[byte >> 4], s));
        if (e + 1 < numel) out[e + 1] = from_float<T>(__fmul_rn(code[byte & 0x0f], s));
    }
}

extern "C" __global__ void nf4_dequant_f32(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q,
                                           const float* code256, const float* nested_absmax, float offset,
                                           int nested_blocksize, float* out, long long numel, int blocksize) {
    nf4_dequant(packed, Nf4Scales{absmax, absmax_q, code256, nested_absmax, offset, nested_blocksize}, out, numel,
                blocksize);
}
extern "C" __global__ void nf4_dequant_bf16(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q,
                                            const float* code256, const float* nested_absmax, float offset,
                                            int nested_blocksize, __nv_bfloat16* out, long long numel,
                                            int blocksize) {
    nf4_dequant(packed, Nf4Scales{absmax, absmax_q, code256, nested_absmax, offset, nested_blocksize}, out, numel,
                blocksize);
}

// ---- quantization --------------------------------------------------------

// 1e-38f (a subnormal): the smallest absmax bitsandbytes divides by.
#define NF4_MIN_SCALE __int_as_float(0x006ce3ee)
// The index of 0.0, which pads an odd element count's last byte.
#define NF4_PAD_INDEX 7

// The NF4 index of a scaled value in [−1, 1]: how many code midpoints
// (c[i] + c[i+1]) / 2 lie strictly below it, so that a value exactly on a
// midpoint takes the lower index (nf4_index, torch's bucketize).
__device__ __forceinline__ int nf4_index(const float (&bounds)[15], float v) {
    int index = 0;
#pragma unroll
    for (int i = 0; i < 15; ++i) index += v > bounds[i];
    return index;
}

// Each warp quantizes one block of `blocksize` values (the last one may be
// shorter): absmax = max |x|; a full block scales by the reciprocal,
// x · (1 / max(absmax, 1e-38)), and stores absmax; a partial last block
// divides, x / max(absmax, 1e-38), and stores the clamped absmax. The scaled
// value is clamped to [−1, 1]. Double quantization of `absmax` is the host's.
extern "C" __global__ void nf4_quantize_f32(const float* x, uint8_t* packed, float* absmax, long long numel,
                                            int blocksize) {
    const int lane = threadIdx.x & 31;
    const long long block = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const long long first = block * blocksize;
    if (first >= numel) return;  // whole warps leave together: no barrier follows
    const int len = (int)min((long long)blocksize, numel - first);
    const bool full = len == blocksize;

    // The midpoints, in f32 exactly as the CPU's NF4_BOUNDS.
    float bounds[15];
#pragma unroll
    for (int i = 0; i < 15; ++i) bounds[i] = __fdiv_rn(__fadd_rn(NF4_CODE[i], NF4_CODE[i + 1]), 2.0f);

    const float* xb = x + first;
    float m = 0.0f;
    for (int i = lane; i < len; i += 32) m = fmaxf(m, fabsf(xb[i]));
    m = warp_max(m);
    const float clamped = fmaxf(m, NF4_MIN_SCALE);
    const float recip = __fdiv_rn(1.0f, clamped);
    auto index = [&](float v) {
        const float s = full ? __fmul_rn(v, recip) : __fdiv_rn(v, clamped);
        return nf4_index(bounds, fminf(fmaxf(s, -1.0f), 1.0f));
    };

    uint8_t* out = packed + first / 2;
    for (int p = lane; 2 * p < len; p += 32) {
        const int hi = index(xb[2 * p]);
        const int lo = 2 * p + 1 < len ? index(xb[2 * p + 1]) : NF4_PAD_INDEX;
        out[p] = (uint8_t)((hi << 4) | lo);
    }
    if (lane == 0) absmax[block] = full ? m : clamped;
}

// ---- fused dequant-matmuls -----------------------------------------------
// Both products are tiled the same way: a block computes a 64×64 output tile,
// stepping over the reduction dimension 32 at a time. Per step it stages the
// activation tile (64 rows × 32) and the weight tile (32 × 64, dequantized to
// f32 straight into shared memory), both reduction-major, so that a thread
// reads 4 consecutive rows and 4 consecutive columns as two float4s. Each of
// the 256 threads accumulates a 4×4 sub-tile in f32. Out-of-range rows and
// columns are staged as 0 and never stored.

#define TILE 64        // output tile edge
#define TILE_K 32      // reduction step
#define TILE_PAD 4     // keeps rows 16-byte aligned; see the loaders for banks

struct Tiles {
    float a[TILE_K][TILE + TILE_PAD];  // a[kk][r]: activation row r, reduction index kk
    float b[TILE_K][TILE + TILE_PAD];  // b[kk][c]: weight for output column c, reduction index kk
};

// Loads 8 consecutive elements of row `row` of a row-major [rows, cols]
// matrix, from column `col` (out-of-range ones are 0).
template <typename T>
__device__ __forceinline__ void load_row8(const T* src, int rows, int cols, int row, int col, float (&v)[8]) {
    const T* p = src + (size_t)row * cols;
#pragma unroll
    for (int q = 0; q < 8; ++q) v[q] = (row < rows && col + q < cols) ? to_float(p[col + q]) : 0.0f;
}

// Dequantizes W[row][col .. col+8) of the NF4 weight W [rows, cols] (0 out of
// range). Eight consecutive elements span at most two quantization blocks, so
// the scale is looked up at most twice.
__device__ __forceinline__ void dequant_row8(const uint8_t* packed, const Nf4Scales& scales, const float* code,
                                             int shift, int rows, int cols, int row, int col, float (&v)[8]) {
    long long cached = -1;
    float s = 0.0f;
#pragma unroll
    for (int q = 0; q < 8; ++q) {
        v[q] = 0.0f;
        if (row < rows && col + q < cols) {
            const long long e = (long long)row * cols + col + q;
            if ((e >> shift) != cached) {
                cached = e >> shift;
                s = scales.scale(cached);
            }
            v[q] = __fmul_rn(code[nibble_of(packed, e)], s);
        }
    }
}

// The 64×4 loader mapping for a tile stored transposed (t[kk][r]): each
// thread takes 8 consecutive reduction indices (segment) of one row, a warp
// 32 consecutive rows of one segment, so the transposed stores of a warp hit
// 32 consecutive words (no bank conflicts).
__device__ __forceinline__ int loader_row() { return (threadIdx.x & 31) + 32 * (threadIdx.x >> 7); }
__device__ __forceinline__ int loader_seg() { return (threadIdx.x >> 5) & 3; }

__device__ __forceinline__ void store_transposed(float (&t)[TILE_K][TILE + TILE_PAD], int row, int seg,
                                                 const float (&v)[8]) {
#pragma unroll
    for (int q = 0; q < 8; ++q) t[seg * 8 + q][row] = v[q];
}

// acc[i][j] += a[kk][ty·4 + i] · b[kk][tx·4 + j] over the step.
__device__ __forceinline__ void multiply_tiles(const Tiles& s, float (&acc)[4][4]) {
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
    for (int kk = 0; kk < TILE_K; ++kk) {
        const float4 a = *reinterpret_cast<const float4*>(&s.a[kk][ty * 4]);
        const float4 b = *reinterpret_cast<const float4*>(&s.b[kk][tx * 4]);
        const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
}

// Stores the thread's 4×4 sub-tile of out [rows, cols] at tile (row0, col0).
template <typename T>
__device__ __forceinline__ void store_tile(T* out, int rows, int cols, int row0, int col0, const float (&acc)[4][4]) {
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = row0 + ty * 4 + i;
        if (r >= rows) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int c = col0 + tx * 4 + j;
            if (c < cols) out[(size_t)r * cols + c] = from_float<T>(acc[i][j]);
        }
    }
}

// y [m, n] = x [m, k] · Wᵀ, W [n, k] in NF4 (W[j][c] is element j·k + c).
template <typename T>
__device__ void nf4_matmul(const T* x, const uint8_t* packed, Nf4Scales scales, T* y, int m, int k, int n,
                           int blocksize) {
    __shared__ __align__(16) Tiles s;
    const float* code = shared_codebook();
    const int shift = log2_of(blocksize);
    const int m0 = blockIdx.y * TILE, n0 = blockIdx.x * TILE;
    const int row = loader_row(), seg = loader_seg();
    float acc[4][4] = {};
    for (int k0 = 0; k0 < k; k0 += TILE_K) {
        float v[8];
        load_row8(x, m, k, m0 + row, k0 + seg * 8, v);
        store_transposed(s.a, row, seg, v);
        dequant_row8(packed, scales, code, shift, n, k, n0 + row, k0 + seg * 8, v);
        store_transposed(s.b, row, seg, v);
        __syncthreads();
        multiply_tiles(s, acc);
        __syncthreads();
    }
    store_tile(y, m, n, m0, n0, acc);
}

// dx [m, k] = g [m, n] · W, W [n, k] in NF4: the input gradient of nf4_matmul.
template <typename T>
__device__ void nf4_matmul_t(const T* g, const uint8_t* packed, Nf4Scales scales, T* dx, int m, int n, int k,
                             int blocksize) {
    __shared__ __align__(16) Tiles s;
    const float* code = shared_codebook();
    const int shift = log2_of(blocksize);
    const int m0 = blockIdx.y * TILE, c0 = blockIdx.x * TILE;
    const int row = loader_row(), seg = loader_seg();
    // The weight tile is 32 rows of W × 64 columns, already reduction-major:
    // thread t dequantizes 8 consecutive columns of row t / 8 and stores them
    // as they are.
    const int w_row = threadIdx.x >> 3, w_col = (threadIdx.x & 7) * 8;
    float acc[4][4] = {};
    for (int n0 = 0; n0 < n; n0 += TILE_K) {
        float v[8];
        load_row8(g, m, n, m0 + row, n0 + seg * 8, v);
        store_transposed(s.a, row, seg, v);
        dequant_row8(packed, scales, code, shift, n, k, n0 + w_row, c0 + w_col, v);
        *reinterpret_cast<float4*>(&s.b[w_row][w_col]) = make_float4(v[0], v[1], v[2], v[3]);
        *reinterpret_cast<float4*>(&s.b[w_row][w_col + 4]) = make_float4(v[4], v[5], v[6], v[7]);
        __syncthreads();
        multiply_tiles(s, acc);
        __syncthreads();
    }
    store_tile(dx, m, k, m0, c0, acc);
}

extern "C" __global__ void nf4_matmul_f32(const float* x, const uint8_t* packed, const float* absmax,
                                          const uint8_t* absmax_q, const float* code256, const float* nested_absmax,
                                          float offset, int nested_blocksize, float* y, int m, int k, int n,
                                          int blocksize) {
    nf4_matmul(x, packed, Nf4Scales{absmax, absmax_q, code256, nested_absmax, offset, nested_blocksize}, y, m, k, n,
               blocksize);
}
extern "C" __global__ void nf4_matmul_bf16(const __nv_bfloat16* x, const uint8_t* packed, const float* absmax,
                                           const uint8_t* absmax_q, const float* code256, const float* nested_absmax,
                                           float offset, int nested_blocksize, __nv_bfloat16* y, int m, int k, int n,
                                           int blocksize) {
    nf4_matmul(x, packed, Nf4Scales{absmax, absmax_q, code256, nested_absmax, offset, nested_blocksize}, y, m, k, n,
               blocksize);
}
extern "C" __global__ void nf4_matmul_t_f32(const float* g, const uint8_t* packed, const float* absmax,
                                            const uint8_t* absmax_q, const float* code256, const float* nested_absmax,
                                            float offset, int nested_blocksize, float* dx, int m, int n, int k,
                                            int blocksize) {
    nf4_matmul_t(g, packed, Nf4Scales{absmax, absmax_q, code256, nested_absmax, offset, nested_blocksize}, dx, m, n, k,
                 blocksize);
}
extern "C" __global__ void nf4_matmul_t_bf16(const __nv_bfloat16* g, const uint8_t* packed, const float* absmax,
                                             const uint8_t* absmax_q, const float* code256,
                                             const float* nested_absmax, float offset, int nested_blocksize,
                                             __nv_bfloat16* dx, int m, int n, int k, int blocksize) {
    nf4_matmul_t(g, packed, Nf4Scales{absmax, absmax_q, code256, nested_absmax, offset, nested_blocksize}, dx, m, n, k,
                 blocksize);
}
