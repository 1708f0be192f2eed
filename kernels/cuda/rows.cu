// Row-wise training kernels: RMSNorm, softmax and SwiGLU's silu(gate)·up,
// each with its backward. CPU references: kernels/src/rows.rs
// (`rms_norm_rows`, `rms_norm_rows_grad`, `softmax_rows`, `softmax_rows_grad`);
// silu_mul has none there (candle's `silu() * up` is the reference).
// Sums run in a different order from the CPU's eight lanes, so results agree
// to rounding, not bit for bit.
//
// Launch configurations (no dynamic shared memory anywhere):
//   rms_norm_fwd_*, rms_norm_bwd_*, softmax_fwd_f32, softmax_bwd_f32:
//       grid (rows), block (256): one block per row of n.
//   silu_mul_fwd_*, silu_mul_bwd_*:
//       grid (any, e.g. min(ceil(n / 256), 65536)), block (256): grid-stride.

#include "common.cuh"

// Σ x² and Σ x·(g·w) over the block at once (one reduction, one pass).
__device__ __forceinline__ float2 block_sum2(float a, float b) {
    __shared__ float2 partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    a = warp_sum(a);
    b = warp_sum(b);
    __syncthreads();
    if (lane == 0) partial[warp] = make_float2(a, b);
    __syncthreads();
    const float2 p = lane < (int)(blockDim.x >> 5) ? partial[lane] : make_float2(0.0f, 0.0f);
    return make_float2(warp_sum(p.x), warp_sum(p.y));
}

// 1/√(mean(x²) + ε), computed as the CPU does (a correctly rounded division
// and square root; no rsqrtf).
__device__ __forceinline__ float inv_rms(float sum_sq, int n, float eps) {
    return 1.0f / sqrtf(sum_sq / (float)n + eps);
}

// ---- RMSNorm -------------------------------------------------------------

// y = w ⊙ (x·r), before the final rounding to T. In f32: w·(x·r). In bf16
// (transformers' order): x·r is rounded to bf16 first, then multiplied by the
// weight (and rounded again when stored).
template <typename T> __device__ __forceinline__ float rms_scale(float x, float r, float w);
template <> __device__ __forceinline__ float rms_scale<float>(float x, float r, float w) { return w * (x * r); }
template <> __device__ __forceinline__ float rms_scale<__nv_bfloat16>(float x, float r, float w) {
    return w * __bfloat162float(__float2bfloat16_rn(x * r));
}

template <typename T>
__device__ void rms_norm_fwd(const T* x, const T* w, T* y, int n, float eps) {
    const size_t base = (size_t)blockIdx.x * n;
    float sum_sq = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = to_float(x[base + i]);
        sum_sq += v * v;
    }
    const float r = inv_rms(block_sum(sum_sq), n, eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        y[base + i] = from_float<T>(rms_scale<T>(to_float(x[base + i]), r, to_float(w[i])));
}

// dx = r·w·g − x·r³·⟨g⊙w, x⟩/n (the weight is frozen: no weight gradient).
template <typename T>
__device__ void rms_norm_bwd(const T* x, const T* w, const T* g, T* dx, int n, float eps) {
    const size_t base = (size_t)blockIdx.x * n;
    float sum_sq = 0.0f, sum_gwx = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float xi = to_float(x[base + i]);
        sum_sq += xi * xi;
        sum_gwx += to_float(g[base + i]) * to_float(w[i]) * xi;
    }
    const float2 sums = block_sum2(sum_sq, sum_gwx);
    const float r = inv_rms(sums.x, n, eps);
    const float coeff = sums.y * r * r * r / (float)n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float xi = to_float(x[base + i]);
        dx[base + i] = from_float<T>(r * to_float(w[i]) * to_float(g[base + i]) - coeff * xi);
    }
}

extern "C" __global__ void rms_norm_fwd_f32(const float* x, const float* w, float* y, int rows, int n, float eps) {
    if ((int)blockIdx.x < rows) rms_norm_fwd(x, w, y, n, eps);
}
extern "C" __global__ void rms_norm_fwd_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* y, int rows,
                                             int n, float eps) {
    if ((int)blockIdx.x < rows) rms_norm_fwd(x, w, y, n, eps);
}
extern "C" __global__ void rms_norm_bwd_f32(const float* x, const float* w, const float* g, float* dx, int rows, int n,
                                            float eps) {
    if ((int)blockIdx.x < rows) rms_norm_bwd(x, w, g, dx, n, eps);
}
extern "C" __global__ void rms_norm_bwd_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, const __nv_bfloat16* g,
                                             __nv_bfloat16* dx, int rows, int n, float eps) {
    if ((int)blockIdx.x < rows) rms_norm_bwd(x, w, g, dx, n, eps);
}

// ---- softmax -------------------------------------------------------------

// y = exp(x − max) / Σ exp(x − max) per row, the max and the sum found in one
// pass; −∞ entries give 0, and a row of only −∞ gives all 0 (as on the CPU).
extern "C" __global__ void softmax_fwd_f32(const float* x, float* y, int rows, int n) {
    if ((int)blockIdx.x >= rows) return;
    const size_t base = (size_t)blockIdx.x * n;
    MaxSum acc = max_sum_empty();
    for (int i = threadIdx.x; i < n; i += blockDim.x) max_sum_add(acc, x[base + i]);
    acc = block_max_sum(acc);
    if (acc.max == -INFINITY) {
        for (int i = threadIdx.x; i < n; i += blockDim.x) y[base + i] = 0.0f;
        return;
    }
    const float inv = 1.0f / acc.sum;
    for (int i = threadIdx.x; i < n; i += blockDim.x) y[base + i] = expf(x[base + i] - acc.max) * inv;
}

// dx = y ⊙ (g − ⟨g, y⟩) per row, from the forward output y.
extern "C" __global__ void softmax_bwd_f32(const float* y, const float* g, float* dx, int rows, int n) {
    if ((int)blockIdx.x >= rows) return;
    const size_t base = (size_t)blockIdx.x * n;
    float dot = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) dot += g[base + i] * y[base + i];
    dot = block_sum(dot);
    for (int i = threadIdx.x; i < n; i += blockDim.x) dx[base + i] = y[base + i] * (g[base + i] - dot);
}

// ---- silu(gate)·up -------------------------------------------------------

__device__ __forceinline__ float sigmoid(float a) { return 1.0f / (1.0f + expf(-a)); }
// silu(a) = a·σ(a), written as candle computes it: a / (1 + e^−a).
__device__ __forceinline__ float silu(float a) { return a / (1.0f + expf(-a)); }

template <typename T>
__device__ void silu_mul_fwd(const T* gate, const T* up, T* y, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float a = to_float(gate[i]);
        y[i] = from_float<T>(silu(a) * to_float(up[i]));
    }
}

// With a = gate, σ = σ(a): dgate = g·up·σ·(1 + a·(1 − σ)), dup = g·silu(a).
template <typename T>
__device__ void silu_mul_bwd(const T* gate, const T* up, const T* g, T* dgate, T* dup, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float a = to_float(gate[i]), u = to_float(up[i]), gi = to_float(g[i]);
        const float s = sigmoid(a);
        dgate[i] = from_float<T>(gi * u * s * (1.0f + a * (1.0f - s)));
        dup[i] = from_float<T>(gi * silu(a));
    }
}

extern "C" __global__ void silu_mul_fwd_f32(const float* gate, const float* up, float* y, long long n) {
    silu_mul_fwd(gate, up, y, n);
}
extern "C" __global__ void silu_mul_fwd_bf16(const __nv_bfloat16* gate, const __nv_bfloat16* up, __nv_bfloat16* y,
                                             long long n) {
    silu_mul_fwd(gate, up, y, n);
}
extern "C" __global__ void silu_mul_bwd_f32(const float* gate, const float* up, const float* g, float* dgate,
                                            float* dup, long long n) {
    silu_mul_bwd(gate, up, g, dgate, dup, n);
}
extern "C" __global__ void silu_mul_bwd_bf16(const __nv_bfloat16* gate, const __nv_bfloat16* up,
                                             const __nv_bfloat16* g, __nv_bfloat16* dgate, __nv_bfloat16* dup,
                                             long long n) {
    silu_mul_bwd(gate, up, g, dgate, dup, n);
}
