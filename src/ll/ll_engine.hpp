// SPDX-License-Identifier: Apache-2.0
// The LL engine: low-latency dispatch and combine (docs/design.md §6). Owns the LL regions of the
// buffer and the LL call sequence (dispatch and combine alternate, each optionally split in a
// send and a receive half); checks every argument and the sequence before any launch and launches
// the halves (kernels/ll_dispatch.cu, kernels/ll_combine.cu). Internal.
#pragma once

#include "core/arg_check.hpp"
#include "core/buffer_core.hpp"
#include "epcomm/buffer.hpp"
#include "kernels/launch.hpp"

namespace epcomm {

class EPCOMM_LOCAL LlEngine {
 public:
  // Registers with `core` to hear of LL calls a rank rejected (the sequence restarts then).
  explicit LlEngine(BufferCore& core);

  LlDispatchResult dispatch(const LlDispatchArgs& args, cudaStream_t stream, LlPhase phase);
  void combine(const LlCombineArgs& args, cudaStream_t stream, LlPhase phase);

  enum class Stage { kIdle, kDispatchSent, kDispatched, kCombineSent };

 private:
  // Where in the sequence an op may start: its send half from `send_from`, a receive-only call
  // from `recv_from`.
  struct SequenceRule {
    Stage send_from;
    Stage recv_from;
    const char* op;     // "lowLatencyDispatch"
    const char* order;  // why send_from, for the message
  };
  // Every call's first checks: the buffer is usable (throws if not), LL is enabled, `phase` is an
  // LlPhase and the call comes in sequence. False, with the reason in `problem`, if not.
  bool beginCall(LlPhase phase, const SequenceRule& rule, Problem& problem) const;
  kernels::LlParams baseParams() const;
  // The SM budget when neither the call nor the config sets one, for this rank's batch of
  // `num_tokens`: sized to it, at most every SM of the device.
  int defaultSms(int num_tokens) const;

  BufferCore& core_;
  bool enabled_;                   // BufferConfig::ll_max_tokens_per_rank > 0
  kernels::LlRegions regions_;     // byte offsets in every rank's buffer
  Stage stage_ = Stage::kIdle;     // reset when a rank rejected an LL call (on_call_skipped)
  bool use_fp8_ = false;           // of the current round's dispatch
  int num_tokens_ = 0;             // this rank's tokens in the current round's dispatch
  int num_topk_ = 0;               // its topk.num_topk (shape of LlCombineArgs::topk_weights)
  bool dispatch_weights_ = false;  // its dispatch passed topk_weights
};

}  // namespace epcomm
