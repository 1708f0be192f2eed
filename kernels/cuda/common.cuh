// Helpers shared by swift's CUDA kernels (included by every `*.cu` here):
// conversions between the storage types and f32, warp and block reductions,
// and the running (max, Σ exp) pair of single-pass softmax / log-sum-exp.
//
// The kernels must be compiled without fast math (no `-use_fast_math`,
// `-ftz=true`, `-prec-div=false` or `-prec-sqrt=false`): several of them are
// bit-exact with their CPU references, which keep subnormals and round every
// division and square root correctly.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// ---- storage types <-> f32 ----------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// f32 to the storage type `T`, rounding to nearest (ties to even).
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// ---- reductions ----------------------------------------------------------
// Block reductions require blockDim.x to be a multiple of 32 (at most 1024)
// and every thread of the block to call them; each returns the result to
// every thread. They may be called repeatedly: each waits for the previous
// call's readers before reusing its shared scratch.

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // the previous call's readers are done with `partial`
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    // Every warp reduces the per-warp partials, so every thread gets the sum.
    return warp_sum(lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.0f);
}

// The running state of a single-pass softmax: the largest value seen and
// Σ exp(x − max) over the values seen. Empty (or all −∞) is {−∞, 0}.
struct MaxSum {
    float max;
    float sum;
};

__device__ __forceinline__ MaxSum max_sum_empty() { return {-INFINITY, 0.0f}; }

// Adds one value. A −∞ value changes nothing (its exponential is 0).
__device__ __forceinline__ void max_sum_add(MaxSum& acc, float x) {
    if (x > acc.max) {
        acc.sum = acc.sum * expf(acc.max - x) + 1.0f;  // expf(−∞) = 0 for the first value
        acc.max = x;
    } else if (x != -INFINITY) {
        acc.sum += expf(x - acc.max);
    }
}

__device__ __forceinline__ MaxSum max_sum_merge(MaxSum a, MaxSum b) {
    const float m = fmaxf(a.max, b.max);
    if (m == -INFINITY) return max_sum_empty();
    return {m, a.sum * expf(a.max - m) + b.sum * expf(b.max - m)};
}

__device__ __forceinline__ MaxSum warp_max_sum(MaxSum v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const MaxSum other = {__shfl_xor_sync(0xffffffffu, v.max, offset), __shfl_xor_sync(0xffffffffu, v.sum, offset)};
        v = max_sum_merge(v, other);
    }
    return v;
}

__device__ __forceinline__ MaxSum block_max_sum(MaxSum v) {
    __shared__ MaxSum partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max_sum(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    return warp_max_sum(lane < (int)(blockDim.x >> 5) ? partial[lane] : max_sum_empty());
}
