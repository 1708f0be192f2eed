// Cross-entropy over rows of logits: the loss with its log-sum-exp, the
// gradient, and the fused loss-and-gradient of linear + cross-entropy that
// overwrites the logits with their gradient. CPU references:
// kernels/src/loss.rs (`cross_entropy_rows`, `cross_entropy_grad`); the sum of
// exponentials runs in another order than the CPU's, so results agree to
// rounding, not bit for bit.
//
// Targets: a target id ≥ vocab marks an ignored row (0xFFFFFFFF is the one
// swift writes): loss 0 and gradient 0, its lse still computed by the forward.
// Any such id is treated alike so that a bad id never reads outside its row.
//
// Launch configuration of every kernel: grid (rows), block (256), no dynamic
// shared memory: one block per row of `vocab` logits.

#include "common.cuh"

__device__ __forceinline__ bool is_scored(uint32_t target, int vocab) { return target < (uint32_t)vocab; }

// log Σ exp(row), in one pass over the row (running max and rescaled sum);
// the max itself when it is not finite (a row of only −∞ gives −∞).
template <typename T>
__device__ float row_log_sum_exp(const T* row, int vocab) {
    MaxSum acc = max_sum_empty();
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) max_sum_add(acc, to_float(row[j]));
    acc = block_max_sum(acc);
    return isfinite(acc.max) ? acc.max + logf(acc.sum) : acc.max;
}

// loss[r] = lse[r] − logits[r][target[r]] and lse[r] = log Σ exp(logits[r]).
template <typename T>
__device__ void cross_entropy_fwd(const T* logits, const uint32_t* targets, float* loss, float* lse, int vocab) {
    const int r = blockIdx.x;
    const T* row = logits + (size_t)r * vocab;
    const float s = row_log_sum_exp(row, vocab);
    if (threadIdx.x == 0) {
        const uint32_t t = targets[r];
        lse[r] = s;
        loss[r] = is_scored(t, vocab) ? s - to_float(row[t]) : 0.0f;
    }
}

// grad[r][j] = grad_out[r]·(exp(logit − lse[r]) − [j = target[r]]).
template <typename T>
__device__ void cross_entropy_bwd(const T* logits, const uint32_t* targets, const float* lse, const float* grad_out,
                                  T* grad, int vocab) {
    const int r = blockIdx.x;
    const size_t base = (size_t)r * vocab;
    const uint32_t t = targets[r];
    if (!is_scored(t, vocab)) {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) grad[base + j] = from_float<T>(0.0f);
        return;
    }
    const float s = lse[r], scale = grad_out[r];
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float v = scale * expf(to_float(logits[base + j]) - s);
        if (j == (int)t) v -= scale;
        grad[base + j] = from_float<T>(v);
    }
}

// The forward's loss, then the row overwritten in place with
// grad_scale·(softmax − onehot): two passes over the row, the first for lse.
template <typename T>
__device__ void cross_entropy_fused(T* logits, const uint32_t* targets, float* loss, int vocab, float grad_scale) {
    const int r = blockIdx.x;
    T* row = logits + (size_t)r * vocab;
    const uint32_t t = targets[r];
    if (!is_scored(t, vocab)) {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) row[j] = from_float<T>(0.0f);
        if (threadIdx.x == 0) loss[r] = 0.0f;
        return;
    }
    // Read before the reduction's barriers, so before any thread overwrites it.
    const float target_logit = threadIdx.x == 0 ? to_float(row[t]) : 0.0f;
    const float s = row_log_sum_exp(row, vocab);
    if (threadIdx.x == 0) loss[r] = s - target_logit;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float v = grad_scale * expf(to_float(row[j]) - s);
        if (j == (int)t) v -= grad_scale;
        row[j] = from_float<T>(v);
    }
}

extern "C" __global__ void cross_entropy_fwd_f32(const float* logits, const uint32_t* targets, float* loss, float* lse,
                                                 int rows, int vocab) {
    if ((int)blockIdx.x < rows) cross_entropy_fwd(logits, targets, loss, lse, vocab);
}
extern "C" __global__ void cross_entropy_fwd_bf16(const __nv_bfloat16* logits, const uint32_t* targets, float* loss,
                                                  float* lse, int rows, int vocab) {
    if ((int)blockIdx.x < rows) cross_entropy_fwd(logits, targets, loss, lse, vocab);
}
extern "C" __global__ void cross_entropy_bwd_f32(const float* logits, const uint32_t* targets, const float* lse,
                                                 const float* grad_out, float* grad, int rows, int vocab) {
    if ((int)blockIdx.x < rows) cross_entropy_bwd(logits, targets, lse, grad_out, grad, vocab);
}
extern "C" __global__ void cross_entropy_bwd_bf16(const __nv_bfloat16* logits, const uint32_t* targets,
                                                  const float* lse, const float* grad_out, __nv_bfloat16* grad,
                                                  int rows, int vocab) {
    if ((int)blockIdx.x < rows) cross_entropy_bwd(logits, targets, lse, grad_out, grad, vocab);
}
extern "C" __global__ void cross_entropy_fused_f32(float* logits_inout, const uint32_t* targets, float* loss, int rows,
                                                   int vocab, float grad_scale) {
    if ((int)blockIdx.x < rows) cross_entropy_fused(logits_inout, targets, loss, vocab, grad_scale);
}
extern "C" __global__ void cross_entropy_fused_bf16(__nv_bfloat16* logits_inout, const uint32_t* targets, float* loss,
                                                    int rows, int vocab, float grad_scale) {
    if ((int)blockIdx.x < rows) cross_entropy_fused(logits_inout, targets, loss, vocab, grad_scale);
}
