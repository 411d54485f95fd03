// SPDX-License-Identifier: Apache-2.0
// A rank's dispatch inputs (RankInputs) on the device, and the DispatchArgs that point at them:
// shared by the rank-major and expert-major HT tests, whose cases derive from HtInputForm, and
// the soak test (HT and LL inputs, reused every round).
#pragma once

#include <algorithm>
#include <vector>

#include "common/gpu_helpers.hpp"
#include "common/test_data.hpp"
#include "epcomm/epcomm.hpp"

namespace epcomm::test {

// How a test case passes its inputs to dispatch.
struct HtInputForm {
  DType dtype = DType::kBF16;
  IndexType idx_type = IndexType::kInt64;
  int topk = 8;
  int alignment = 1;
  bool null_topk_when_empty = false;  // a rank with 0 tokens passes topk.idx = nullptr
  bool column_major_scales = false;   // FP8 scales [blocks][tokens] (uploaded transposed)
  bool expert_major = false;          // DispatchArgs::expert_major
};

struct HtDeviceInputs {
  DeviceArray<uint16_t> x_bf16;
  DeviceArray<uint8_t> x_fp8;
  DeviceArray<float> scales;
  DeviceArray<int64_t> idx64;
  DeviceArray<int32_t> idx32;
  DeviceArray<float> weights;

  HtDeviceInputs(const RankInputs& in, const HtInputForm& form)
      : x_bf16(std::max<size_t>(in.x_bf16.size(), 8)),
        x_fp8(std::max<size_t>(in.x_fp8.size(), 16)),
        scales(std::max<size_t>(in.x_scales.size(), 1)),
        idx64(std::max<size_t>(in.topk_idx.size(), 1)),
        idx32(std::max<size_t>(in.topk_idx32.size(), 1)),
        weights(std::max<size_t>(in.topk_weights.size(), 1)) {
    upload(in, form);
  }

  // Sized for max_tokens tokens of hidden columns and max_topk entries, for inputs uploaded
  // again every round (the soak test).
  HtDeviceInputs(int max_tokens, int hidden, int max_topk)
      : x_bf16(std::max<size_t>(size_t(max_tokens) * hidden, 8)),
        x_fp8(std::max<size_t>(size_t(max_tokens) * hidden, 16)),
        scales(std::max<size_t>(size_t(max_tokens) * (hidden / kFp8BlockSize), 4)),
        idx64(std::max<size_t>(size_t(max_tokens) * max_topk, 1)),
        idx32(std::max<size_t>(size_t(max_tokens) * max_topk, 1)),
        weights(std::max<size_t>(size_t(max_tokens) * max_topk, 1)) {}

  void upload(const RankInputs& in, const HtInputForm& form) {
    upload(in, form.column_major_scales);
  }
  void upload(const RankInputs& in, bool column_major_scales) {
    x_bf16.upload(in.x_bf16);
    x_fp8.upload(in.x_fp8);
    if (column_major_scales) {
      scales.upload(columnMajorScales(in));
    } else {
      scales.upload(in.x_scales);
    }
    idx64.upload(in.topk_idx);
    idx32.upload(in.topk_idx32);
    weights.upload(in.topk_weights);
  }

  const void* idx(IndexType type) const {
    return type == IndexType::kInt64 ? static_cast<const void*>(idx64.get())
                                     : static_cast<const void*>(idx32.get());
  }

  DispatchArgs args(const RankInputs& in, const HtInputForm& form, bool with_topk) const {
    DispatchArgs a;
    a.dtype = form.dtype;
    a.num_tokens = in.num_tokens;
    if (form.dtype == DType::kBF16) {
      a.x = x_bf16.get();
    } else {
      a.x = x_fp8.get();
      a.x_scales = scales.get();
      if (form.column_major_scales) {
        a.scales_token_stride = 1;
        a.scales_col_stride = std::max(in.num_tokens, 1);
      }
    }
    if (with_topk) {
      a.topk.idx = idx(form.idx_type);
      a.topk.idx_type = form.idx_type;
      a.topk.num_tokens = in.num_tokens;
      a.topk.num_topk = form.topk;
      a.topk_weights = weights.get();
      if (form.null_topk_when_empty && in.num_tokens == 0) {
        a.topk.idx = nullptr;
        a.topk_weights = nullptr;
      }
    }
    a.expert_alignment = form.alignment;
    a.expert_major = form.expert_major;
    return a;
  }
};

}  // namespace epcomm::test
