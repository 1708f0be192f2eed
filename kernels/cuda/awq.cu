// AWQ int4 weights (AutoAWQ's GEMM layout) on the GPU: dequantization, a
// CUDA-core W4A16 matrix-vector kernel for decoding, and a tensor-core
// (mma.sync, sm_80+) matmul for longer inputs. CPU reference:
// kernels/src/awq.rs (`nibble`, `dequant`, `AwqMatrix::dequantize_t`,
// `AwqMatrix::matmul`); layout in /work/shared/docs/FORMATS.md §1.
//
// Layout, for a weight W [n, k] (n outputs, k inputs): qweight u32 [k, n/8],
// qzeros u32 [k/group, n/8], scales f16 [k/group, n]. Column col of packed
// word w·8 … w·8+7 is nibble (word >> 4·AWQ_REVERSE_ORDER[col % 8]) & 0xF,
// AWQ_REVERSE_ORDER = {0, 4, 1, 5, 2, 6, 3, 7}, and
//     Wᵀ[kk][col] = (q − z) · s,  q from qweight[kk][col/8],
//                  z from qzeros[kk/group][col/8], s = scales[kk/group][col],
// computed exactly in f32 (so awq_dequant_f32 is bit-identical to
// `dequantize_t`; the matmuls sum in another order than the CPU).
// Every kernel needs n % 8 == 0, k % group == 0 and group a multiple of 32
// (swift's groups are 32, 64 and 128).
//
// Launch configurations (none uses dynamic shared memory):
//   awq_dequant_*:     grid (any, e.g. ceil(k·n/8 / 256)), block (256):
//                      grid-stride, one packed word (8 outputs) per thread.
//   awq_gemv_*:        grid (ceil(n / 32)), block (256): 32 output columns per
//                      block, all m rows (best for m ≤ 16; see awq_gemv).
//   awq_gemm_mma_bf16: grid (ceil(n / 128), ceil(m / 64)), block (128): one
//                      64×128 tile of y per block. x must be 16-byte aligned
//                      and y 4-byte aligned.

#include "common.cuh"

// Shift of column p's nibble (p = col % 8) in its packed word:
// 4·AWQ_REVERSE_ORDER[p], where AWQ_REVERSE_ORDER[p] = p/2 + 4·(p % 2).
__device__ __forceinline__ int awq_shift(int p) { return 4 * ((p >> 1) + 4 * (p & 1)); }

__device__ __forceinline__ uint32_t awq_nibble(uint32_t word, int p) { return (word >> awq_shift(p)) & 0xFu; }

// 2²³ + v as an f32, exactly, for a nibble v: v in the mantissa of 2²³. The
// difference of two such values is the integer q − z, exactly, without an
// int-to-float conversion.
__device__ __forceinline__ float magic(uint32_t v) { return __uint_as_float(0x4B000000u | v); }

// (q − z)·s given z as magic(z): exact in f32 (a 5-bit integer times an
// 11-bit f16 significand), hence equal to the CPU's (q − z) as f32 · s.
__device__ __forceinline__ float awq_value(uint32_t q, float z_magic, float s) { return (magic(q) - z_magic) * s; }

// ---- dequantization ------------------------------------------------------

// out [k, n] = Wᵀ.
template <typename T>
__device__ void awq_dequant(const uint32_t* qweight, const uint32_t* qzeros, const __half* scales, T* out, int k,
                            int n, int group) {
    const int words = n / 8;
    const long long total = (long long)k * words;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int kk = (int)(i / words), w = (int)(i % words), gi = kk / group;
        const uint32_t q = qweight[i], z = qzeros[(size_t)gi * words + w];
        const __half* s = scales + (size_t)gi * n + w * 8;
        T* o = out + (size_t)kk * n + w * 8;
#pragma unroll
        for (int p = 0; p < 8; ++p)
            o[p] = from_float<T>(awq_value(awq_nibble(q, p), magic(awq_nibble(z, p)), to_float(s[p])));
    }
}

extern "C" __global__ void awq_dequant_f32(const uint32_t* qweight, const uint32_t* qzeros, const __half* scales,
                                           float* out, int k, int n, int group) {
    awq_dequant(qweight, qzeros, scales, out, k, n, group);
}
extern "C" __global__ void awq_dequant_bf16(const uint32_t* qweight, const uint32_t* qzeros, const __half* scales,
                                            __nv_bfloat16* out, int k, int n, int group) {
    awq_dequant(qweight, qzeros, scales, out, k, n, group);
}

// ---- W4A16 matrix-vector product on CUDA cores ---------------------------
// y [m, n] = x [m, k] · Wᵀ for decoding (m = 1 … 16). A block owns 4 packed
// words (32 output columns) and reads their weights once for up to 16 rows
// of x. Within a warp, lane & 3 picks the word and lane >> 2 one of 8 k-splits.
// The 8 warps are split between row tiles of 4 rows of x (as few as cover m:
// 1, 2 or 4) and further k-splits (8, 4 or 2), so a thread keeps 4 × 8 f32
// accumulators whatever m is. A k-split takes chunks of 32 consecutive k rows
// (inside one group, so one zero word and 8 scales per chunk), round robin;
// per row it dequantizes its word in registers and accumulates all its rows.
// Splits are summed by warp shuffles, then across warps in shared memory, in
// a fixed order. Past 16 rows the block repeats this for each 16 rows, reading
// the weights again: use awq_gemm_mma_bf16 there.

#define GEMV_WORDS 4    // packed words (8 columns each) per block
#define GEMV_ROWS 4     // rows of x per row tile
#define GEMV_CHUNK 32   // k rows a split takes at a time
#define GEMV_BATCH 16   // rows of x per pass over the weights
#define GEMV_WARPS 8    // blockDim.x / 32

template <typename T>
__device__ void awq_gemv(const T* x, const uint32_t* qweight, const uint32_t* qzeros, const __half* scales, T* y,
                         int m, int k, int n, int group) {
    __shared__ float partial[GEMV_WARPS][GEMV_ROWS][GEMV_WORDS * 8];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int words = n / 8;
    const int w = blockIdx.x * GEMV_WORDS + (lane & 3);
    const int chunks = k / GEMV_CHUNK;

    for (int batch = 0; batch < m; batch += GEMV_BATCH) {
        const int rows = min(GEMV_BATCH, m - batch);
        const int tiles = (rows + GEMV_ROWS - 1) / GEMV_ROWS;       // 1 … 4
        const int tile_warps = tiles == 1 ? 1 : tiles == 2 ? 2 : 4;  // warps per k-split group
        const int tile = warp % tile_warps;
        const int splits = 8 * (GEMV_WARPS / tile_warps);
        const int split = (warp / tile_warps) * 8 + (lane >> 2);
        const int row0 = batch + tile * GEMV_ROWS;  // this warp's first row of x

        float acc[GEMV_ROWS][8] = {};
        if (w < words && row0 < m) {
            for (int c = split; c < chunks; c += splits) {
                const int k0 = c * GEMV_CHUNK, gi = k0 / group;
                const uint32_t zw = qzeros[(size_t)gi * words + w];
                const __half* sp = scales + (size_t)gi * n + w * 8;
                float zm[8], s[8];
#pragma unroll
                for (int p = 0; p < 8; ++p) {
                    zm[p] = magic(awq_nibble(zw, p));
                    s[p] = to_float(sp[p]);
                }
#pragma unroll 8
                for (int kk = k0; kk < k0 + GEMV_CHUNK; ++kk) {
                    const uint32_t q = qweight[(size_t)kk * words + w];
                    float wv[8];
#pragma unroll
                    for (int p = 0; p < 8; ++p) wv[p] = awq_value(awq_nibble(q, p), zm[p], s[p]);
#pragma unroll
                    for (int r = 0; r < GEMV_ROWS; ++r) {
                        if (row0 + r >= m) break;
                        const float xv = to_float(x[(size_t)(row0 + r) * k + kk]);
#pragma unroll
                        for (int p = 0; p < 8; ++p) acc[r][p] = fmaf(xv, wv[p], acc[r][p]);
                    }
                }
            }
        }

        // Sum the warp's 8 k-splits: lanes with the same word differ in bits 2 … 4.
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; ++r)
#pragma unroll
            for (int p = 0; p < 8; ++p)
#pragma unroll
                for (int offset = 4; offset < 32; offset <<= 1)
                    acc[r][p] += __shfl_xor_sync(0xffffffffu, acc[r][p], offset);
        if (batch > 0) __syncthreads();  // the previous batch has read `partial`
        if (lane < 4) {
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; ++r)
#pragma unroll
                for (int p = 0; p < 8; ++p) partial[warp][r][lane * 8 + p] = acc[r][p];
        }
        __syncthreads();

        // Sum the warps of each row tile (warps tile, tile + tile_warps, …).
        for (int i = threadIdx.x; i < rows * GEMV_WORDS * 8; i += blockDim.x) {
            const int row = i / (GEMV_WORDS * 8), col = i % (GEMV_WORDS * 8);
            const int out_col = blockIdx.x * GEMV_WORDS * 8 + col;
            if (out_col >= n) continue;
            float sum = 0.0f;
            for (int wp = row / GEMV_ROWS; wp < GEMV_WARPS; wp += tile_warps) sum += partial[wp][row % GEMV_ROWS][col];
            y[(size_t)(batch + row) * n + out_col] = from_float<T>(sum);
        }
    }
}

extern "C" __global__ void awq_gemv_bf16(const __nv_bfloat16* x, const uint32_t* qweight, const uint32_t* qzeros,
                                         const __half* scales, __nv_bfloat16* y, int m, int k, int n, int group) {
    awq_gemv(x, qweight, qzeros, scales, y, m, k, n, group);
}
extern "C" __global__ void awq_gemv_f32(const float* x, const uint32_t* qweight, const uint32_t* qzeros,
                                        const __half* scales, float* y, int m, int k, int n, int group) {
    awq_gemv(x, qweight, qzeros, scales, y, m, k, n, group);
}

// ---- tensor-core matmul --------------------------------------------------
// y [m, n] = x [m, k] · Wᵀ in bf16 with f32 accumulation, through
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32.
//
// A block (4 warps) computes a 64×128 tile of y; warp w owns its columns
// 32w … 32w+31 (4 n-fragments of 8 = 4 packed words) for all 64 rows (4
// m-fragments of 16). Per step of 32 k rows the block stages in shared memory
// the x tile (64 × 32 bf16; rows ≥ m are 0) and the tile's packed qweight
// words (32 rows × 16 words, unpacked only in registers). The next step's
// tiles are fetched into registers while the current one is multiplied, into
// the other of two shared buffers. Each thread dequantizes its B fragments
// from the staged words straight into bf16 registers: (q − z)·s exactly in
// f32, then rounded to bf16 (the only rounding of W).
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating
// point type"), with g = lane / 4 and t = lane % 4; each .b32 register holds
// two bf16, the lower-indexed element in the low 16 bits:
//   A (16×16, row-major, rows × k):  a[0] = A[g][2t, 2t+1]     a[1] = A[g+8][2t, 2t+1]
//                                    a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   B (16×8, k × n, "col"):          b[0] = B[2t, 2t+1][g]     b[1] = B[2t+8, 2t+9][g]
//   C (16×8 f32):                    c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
// A comes from ldmatrix.x4: lane l gives the address of row l % 16, column
// 8·(l / 16) of the 16×16 tile, so matrices 0 … 3 are the quadrants
// (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15,
// k 8-15), which land in a[0] … a[3] as above. For B, column g of an
// n-fragment is nibble g of one packed word (the fragment's 8 columns are one
// word), and the thread needs that word for k rows 2t, 2t+1, 2t+8, 2t+9: the
// staged words are stored permuted so that those four are adjacent (one
// 16-byte shared load).

#define MMA_THREADS 128
#define MMA_BM 64           // rows of y per block
#define MMA_BN 128          // columns of y per block (16 packed words)
#define MMA_BK 32           // k rows per step
#define MMA_WORDS (MMA_BN / 8)
#define MMA_A_STRIDE 40     // bf16 per staged x row: 80 bytes, ldmatrix rows hit distinct banks
#define MMA_B_STRIDE 36     // words per staged column word: 16-byte aligned, stores spread over banks

struct MmaStage {
    __nv_bfloat16 a[MMA_BM][MMA_A_STRIDE];  // a[r][c] = x[m0 + r][k0 + c]
    uint32_t b[MMA_WORDS][MMA_B_STRIDE];    // b[w][slot(rr)] = qweight[k0 + rr][w0 + w]
};

// Where k row rr (0 … 31) of a step goes among a column word's 32 slots:
// half h = rr / 16 holds 16 slots, 4 per t, ordered rows 2t, 2t+1, 2t+8, 2t+9.
__device__ __forceinline__ int mma_slot(int rr) {
    const int r = rr & 15;
    return (rr >> 4) * 16 + ((r & 7) >> 1) * 4 + (r & 1) + ((r >> 3) << 1);
}

// One step's global data, held in registers between fetch and stage.
struct MmaFetch {
    uint4 a[2];      // 8 bf16 of x each
    uint32_t b[4];   // packed words
};

__device__ __forceinline__ MmaFetch mma_fetch(const __nv_bfloat16* x, const uint32_t* qweight, int m, int k, int words,
                                              int m0, int w0, int k0) {
    MmaFetch f;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int idx = threadIdx.x + MMA_THREADS * i, r = idx >> 2, c = (idx & 3) * 8;
        f.a[i] = m0 + r < m ? *reinterpret_cast<const uint4*>(x + (size_t)(m0 + r) * k + k0 + c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int idx = threadIdx.x + MMA_THREADS * i, rr = idx / MMA_WORDS, w = idx % MMA_WORDS;
        f.b[i] = w0 + w < words ? qweight[(size_t)(k0 + rr) * words + w0 + w] : 0u;
    }
    return f;
}

__device__ __forceinline__ void mma_stage(MmaStage& st, const MmaFetch& f) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int idx = threadIdx.x + MMA_THREADS * i, r = idx >> 2, c = (idx & 3) * 8;
        *reinterpret_cast<uint4*>(&st.a[r][c]) = f.a[i];
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int idx = threadIdx.x + MMA_THREADS * i, rr = idx / MMA_WORDS, w = idx % MMA_WORDS;
        st.b[w][mma_slot(rr)] = f.b[i];
    }
}

// The zero point (as magic(z)) and scale of this thread's column g in each of
// its warp's 4 n-fragments, for group gi; 0 and 0 past n.
struct MmaGroup {
    float z[4];
    float s[4];
};

__device__ __forceinline__ MmaGroup mma_group(const uint32_t* qzeros, const __half* scales, int n, int words, int w0,
                                              int gi) {
    const int g = (threadIdx.x & 31) >> 2, warp = threadIdx.x >> 5;
    MmaGroup p;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int w = w0 + warp * 4 + j;
        const bool in = w < words;
        p.z[j] = magic(in ? awq_nibble(qzeros[(size_t)gi * words + w], g) : 0u);
        p.s[j] = in ? to_float(scales[(size_t)gi * n + w * 8 + g]) : 0.0f;
    }
    return p;
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* shared) {
    const uint32_t address = (uint32_t)__cvta_generic_to_shared(shared);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

// c += a · b for one m16n8k16 fragment triple.
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two f32 as bf16 (round to nearest), `lo` in the low 16 bits.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return (uint32_t)__bfloat16_as_ushort(v.x) | ((uint32_t)__bfloat16_as_ushort(v.y) << 16);
}

// One staged step: 2 k16 halves × 4 m-fragments × 4 n-fragments.
__device__ __forceinline__ void mma_multiply(const MmaStage& st, const MmaGroup& grp, float (&acc)[4][4][4]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        uint32_t a[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i) ldmatrix_x4(a[i], &st.a[16 * i + (lane & 15)][h * 16 + (lane >> 4) * 8]);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const uint4 q = *reinterpret_cast<const uint4*>(&st.b[warp * 4 + j][h * 16 + t * 4]);
            const float z = grp.z[j], s = grp.s[j];
            const uint32_t b0 = pack_bf16(awq_value(awq_nibble(q.x, g), z, s), awq_value(awq_nibble(q.y, g), z, s));
            const uint32_t b1 = pack_bf16(awq_value(awq_nibble(q.z, g), z, s), awq_value(awq_nibble(q.w, g), z, s));
#pragma unroll
            for (int i = 0; i < 4; ++i) mma_16816(acc[i][j], a[i], b0, b1);
        }
    }
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS)
    awq_gemm_mma_bf16(const __nv_bfloat16* x, const uint32_t* qweight, const uint32_t* qzeros, const __half* scales,
                      __nv_bfloat16* y, int m, int k, int n, int group) {
    __shared__ __align__(16) MmaStage stage[2];
    const int words = n / 8;
    const int m0 = blockIdx.y * MMA_BM, w0 = blockIdx.x * MMA_WORDS;
    const int steps = k / MMA_BK;

    float acc[4][4][4] = {};
    MmaGroup grp = mma_group(qzeros, scales, n, words, w0, 0);
    mma_stage(stage[0], mma_fetch(x, qweight, m, k, words, m0, w0, 0));
    __syncthreads();
    for (int step = 0; step < steps; ++step) {
        const int k_next = (step + 1) * MMA_BK;
        const bool more = step + 1 < steps;
        const bool new_group = more && k_next % group == 0;
        MmaFetch next;
        MmaGroup next_grp;
        if (more) next = mma_fetch(x, qweight, m, k, words, m0, w0, k_next);
        if (new_group) next_grp = mma_group(qzeros, scales, n, words, w0, k_next / group);
        mma_multiply(stage[step & 1], grp, acc);
        if (more) mma_stage(stage[(step + 1) & 1], next);
        if (new_group) grp = next_grp;
        __syncthreads();
    }

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int w = w0 + warp * 4 + j;
        if (w >= words) continue;
        const int col = w * 8 + 2 * t;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int r = m0 + 16 * i + g + 8 * half;
                if (r < m)
                    *reinterpret_cast<__nv_bfloat162*>(y + (size_t)r * n + col) =
                        __floats2bfloat162_rn(acc[i][j][2 * half], acc[i][j][2 * half + 1]);
            }
        }
    }
}
