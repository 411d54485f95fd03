// SPDX-License-Identifier: Apache-2.0
#include <cuda_bf16.h>

#include "expert_kernels.hpp"

namespace moe_example {
namespace {

constexpr int kThreads = 256;  // one thread per column; hidden is a multiple of 128

__device__ float bf16ToFloat(uint16_t bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}
__device__ uint16_t floatToBf16(float v) {
  const __nv_bfloat16 b = __float2bfloat16_rn(v);
  return *reinterpret_cast<const uint16_t*>(&b);
}

// One block per received row; thread j owns columns j, j + kThreads, ...
__global__ void expertForward(ExpertRows p, uint16_t* out) {
  extern __shared__ float s_x[];  // [hidden]
  const int64_t r = blockIdx.x;
  if (r >= *p.num_rows) return;
  const int H = p.hidden;
  for (int i = threadIdx.x; i < H; i += kThreads) s_x[i] = bf16ToFloat(p.x[r * H + i]);
  __syncthreads();
  for (int j = threadIdx.x; j < H; j += kThreads) {
    float acc = 0.f;
    for (int k = 0; k < p.num_topk; ++k) {
      const int64_t e = p.topk_idx[r * p.num_topk + k];
      if (e < 0) continue;
      const float* W = p.weights + e * H * H;
      float y = 0.f;
      for (int i = 0; i < H; ++i) y += s_x[i] * W[i * H + j];
      acc += p.topk_w[r * p.num_topk + k] * y;
    }
    out[r * H + j] = floatToBf16(acc);
  }
}

__global__ void expertBackward(ExpertRows p, const uint16_t* grad, uint16_t* grad_x, float* grad_w,
                               float* grad_weights) {
  extern __shared__ float s_mem[];  // x [hidden], g [hidden]
  __shared__ float s_partial[kThreads];
  float* s_x = s_mem;
  float* s_g = s_mem + p.hidden;
  const int64_t r = blockIdx.x;
  if (r >= *p.num_rows) return;
  const int H = p.hidden;
  for (int i = threadIdx.x; i < H; i += kThreads) {
    s_x[i] = bf16ToFloat(p.x[r * H + i]);
    s_g[i] = bf16ToFloat(grad[r * H + i]);
  }
  __syncthreads();
  float gx[8] = {};  // H <= 8 * kThreads in this example
  for (int k = 0; k < p.num_topk; ++k) {
    const int64_t e = p.topk_idx[r * p.num_topk + k];
    if (e < 0) {
      if (threadIdx.x == 0) grad_w[r * p.num_topk + k] = 0.f;
      continue;
    }
    const float w = p.topk_w[r * p.num_topk + k];
    const float* W = p.weights + e * H * H;
    float* dW = grad_weights + e * H * H;
    float dot = 0.f;  // this thread's share of <x W_e, g>
    for (int c = 0, i = threadIdx.x; i < H; i += kThreads, ++c) {
      // column i of y = x W_e, and row i of g W_e^T
      float y = 0.f, back = 0.f;
      for (int l = 0; l < H; ++l) {
        y += s_x[l] * W[l * H + i];
        back += s_g[l] * W[i * H + l];
      }
      dot += y * s_g[i];
      gx[c] += w * back;
      for (int l = 0; l < H; ++l) atomicAdd(&dW[i * H + l], w * s_x[i] * s_g[l]);
    }
    s_partial[threadIdx.x] = dot;
    __syncthreads();
    for (int half = kThreads / 2; half > 0; half /= 2) {
      if (threadIdx.x < half) s_partial[threadIdx.x] += s_partial[threadIdx.x + half];
      __syncthreads();
    }
    if (threadIdx.x == 0) grad_w[r * p.num_topk + k] = s_partial[0];
    __syncthreads();
  }
  for (int c = 0, i = threadIdx.x; i < H; i += kThreads, ++c)
    grad_x[r * H + i] = floatToBf16(gx[c]);
}

}  // namespace

// Rows past *num_rows return at once, so the grid covers the capacity without a host read.
void launchExpertForward(const ExpertRows& rows, uint16_t* out, cudaStream_t stream) {
  expertForward<<<static_cast<unsigned>(rows.capacity), kThreads, rows.hidden * sizeof(float),
                  stream>>>(rows, out);
}

void launchExpertBackward(const ExpertRows& rows, const uint16_t* grad, uint16_t* grad_x,
                          float* grad_w, float* grad_weights, cudaStream_t stream) {
  expertBackward<<<static_cast<unsigned>(rows.capacity), kThreads, 2 * rows.hidden * sizeof(float),
                   stream>>>(rows, grad, grad_x, grad_w, grad_weights);
}

}  // namespace moe_example
