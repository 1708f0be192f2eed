// The optimizer step on the GPU: AdamW over one flat f32 buffer of every
// trainable tensor, with the clip factor folded in, and the sum of squares
// the global-norm clip needs. CPU reference: kernels/src/adamw.rs
// (`adamw_update`, `sum_squares`); the update is elementwise and computes
// in the same order as the CPU's, so results agree to rounding of fused
// multiply-adds.
//
// Launch configurations (no dynamic shared memory):
//   adamw_f32:       grid (any, e.g. min(ceil(n / 256), 65536)), block (256): grid-stride.
//   sum_squares_f32: grid (SUM_BLOCKS = 256), block (256): grid-stride; writes
//                    one f64 partial per block, summed in block order on the host.

#include "common.cuh"

extern "C" __global__ void adamw_f32(const float* __restrict__ p, const float* __restrict__ g,
                                     const float* __restrict__ m, const float* __restrict__ v,
                                     float* __restrict__ p_out, float* __restrict__ m_out,
                                     float* __restrict__ v_out, long long n, float step_size,
                                     float bias2_sqrt, float decay, float beta1, float beta2, float eps,
                                     float grad_scale) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float gi = g[i] * grad_scale;
        float pi = p[i] * decay;
        const float mi = m[i] + (gi - m[i]) * (1.0f - beta1);
        const float vi = v[i] * beta2 + (1.0f - beta2) * gi * gi;
        const float denom = sqrtf(vi) / bias2_sqrt + eps;
        pi -= step_size * mi / denom;
        p_out[i] = pi;
        m_out[i] = mi;
        v_out[i] = vi;
    }
}

extern "C" __global__ void sum_squares_f32(const float* __restrict__ g, double* __restrict__ partial,
                                           long long n) {
    __shared__ double scratch[256];
    double acc = 0.0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const double x = (double)g[i];
        acc += x * x;
    }
    scratch[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) scratch[threadIdx.x] += scratch[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = scratch[0];
}
