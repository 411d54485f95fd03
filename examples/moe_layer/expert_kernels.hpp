// SPDX-License-Identifier: Apache-2.0
// The example's "experts": one dense H x H matrix per expert (y = x W_e), forward and backward,
// written for clarity rather than speed (a real layer runs a grouped GEMM here). Rows are the
// received rows of an HT dispatch in rank-major order; row r's top-k entries name the local
// experts it goes through (-1: none on this rank), with their router weights.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moe_example {

struct ExpertRows {
  const uint16_t* x;        // [capacity, hidden] BF16, the forward's received rows
  const int64_t* topk_idx;  // [capacity, num_topk] local expert ids, -1 = none here
  const float* topk_w;      // [capacity, num_topk] router weights as received
  const int32_t* num_rows;  // device scalar: received rows
  int64_t capacity;
  int hidden;
  int num_topk;
  const float* weights;  // [num_local_experts, hidden, hidden] W_e, row-major (i, j)
};

// out[r] = sum_k w_rk * x_r W_{e_rk}, BF16 (the combine input).
void launchExpertForward(const ExpertRows& rows, uint16_t* out, cudaStream_t stream);

// Given grad[r] (dLoss/d out[r], the cached dispatch of dLoss/d layer output):
//   grad_x[r]    = sum_k w_rk * grad[r] W_{e_rk}^T            (BF16, the combine input)
//   grad_w[r][k] = <x_r W_{e_rk}, grad[r]>, 0 where idx is -1  (float32)
//   grad_weights[e] += w_rk * x_r^T grad[r]                    (float32, accumulated)
void launchExpertBackward(const ExpertRows& rows, const uint16_t* grad, uint16_t* grad_x,
                          float* grad_w, float* grad_weights, cudaStream_t stream);

}  // namespace moe_example
