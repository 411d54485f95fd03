// SPDX-License-Identifier: Apache-2.0
// LL engine: argument and call-sequence checks (before any launch) and the launches of the send
// and receive halves.
#include "ll/ll_engine.hpp"

#include <algorithm>
#include <cstdint>
#include <sstream>

#include "check.hpp"
#include "core/arg_check.hpp"

namespace epcomm {

namespace {

const char* stageName(LlEngine::Stage stage) {
  switch (stage) {
    case LlEngine::Stage::kIdle:
      return "idle (next: lowLatencyDispatch)";
    case LlEngine::Stage::kDispatchSent:
      return "dispatch sent (next: lowLatencyDispatch with LlPhase::kRecv)";
    case LlEngine::Stage::kDispatched:
      return "dispatched (next: lowLatencyCombine)";
    case LlEngine::Stage::kCombineSent:
      return "combine sent (next: lowLatencyCombine with LlPhase::kRecv)";
  }
  return "?";
}

}  // namespace

LlEngine::LlEngine(BufferCore& core)
    : core_(core), enabled_(core.layout.has_ll), regions_(core.layout.ll) {
  core_.on_call_skipped = [this](kernels::EpochSlot family) {
    if (family == kernels::kEpochLl) stage_ = Stage::kIdle;  // the LL round is over everywhere
  };
}

bool LlEngine::beginCall(LlPhase phase, const SequenceRule& rule, Problem& problem) const {
  core_.checkUsable();
  const bool send = phase == LlPhase::kSend || phase == LlPhase::kBoth;
  if (!enabled_) {
    problem.set(
        "invalid argument BufferConfig::ll_max_tokens_per_rank = 0: must be > 0 for LL ops");
  } else if (phase != LlPhase::kSend && phase != LlPhase::kRecv && phase != LlPhase::kBoth) {
    problem.set("invalid argument phase = ", static_cast<int>(phase), ": must be an LlPhase");
  } else if (send && stage_ != rule.send_from) {
    problem.set(rule.op, " called in LL stage '", stageName(stage_), "': ", rule.order);
  } else if (!send && stage_ != rule.recv_from) {
    problem.set(rule.op, "(kRecv) called in LL stage '", stageName(stage_), "'");
  }
  return problem.empty();
}

// Sized to the batch (kernels::llBlocksForBatch), at most every SM: on 2x H200 at 128 tokens
// (ep_bench, docs/design.md §6) an LL op took half the time with all 132 SMs that it took with 24
// (dispatch 34.9 vs 70.4 us, combine 35.5 vs 82.9 us), while a 1-token op took ~0.5 us less with
// 16 to 32 blocks than with 132 (one H200, 1 rank).
int LlEngine::defaultSms(int num_tokens) const {
  const int blocks =
      kernels::llBlocksForBatch(num_tokens, core_.resolved.config.max_topk, core_.num_ranks);
  return std::min(core_.device_sms, blocks);
}

kernels::LlParams LlEngine::baseParams() const {
  kernels::LlParams p{};
  const BufferConfig& c = core_.resolved.config;
  p.peers = core_.peers;
  p.regions = regions_;
  p.hidden = c.hidden;
  p.num_experts = c.num_experts;
  p.num_local_experts = core_.num_local_experts;
  p.max_topk = c.max_topk;
  return p;
}

LlDispatchResult LlEngine::dispatch(const LlDispatchArgs& args, cudaStream_t stream,
                                    LlPhase phase) {
  BufferCore& b = core_;
  const BufferConfig& c = b.resolved.config;
  const bool send = phase == LlPhase::kSend || phase == LlPhase::kBoth;
  const bool recv = phase == LlPhase::kRecv || phase == LlPhase::kBoth;
  Problem problem;
  const SequenceRule rule{Stage::kIdle, Stage::kDispatchSent, "lowLatencyDispatch",
                          "dispatch and combine must alternate"};
  if (beginCall(phase, rule, problem) && send) {
    if (args.num_tokens < 0 || args.num_tokens > c.ll_max_tokens_per_rank) {
      problem.set("invalid argument LlDispatchArgs::num_tokens = ", args.num_tokens,
                  ": must be in [0, ", c.ll_max_tokens_per_rank, "] (ll_max_tokens_per_rank)");
    } else if (args.topk.num_tokens != args.num_tokens) {
      problem.set("invalid argument topk.num_tokens = ", args.topk.num_tokens,
                  ": must equal LlDispatchArgs::num_tokens (", args.num_tokens, ")");
    } else if (args.topk.num_topk < 1 || args.topk.num_topk > c.max_topk) {
      problem.set("invalid argument topk.num_topk = ", args.topk.num_topk, ": must be in [1, ",
                  c.max_topk, "] (BufferConfig::max_topk)");
    } else if (args.num_tokens > 0 && (args.x == nullptr || args.topk.idx == nullptr)) {
      problem.set("invalid argument LlDispatchArgs: x = ", args.x, ", topk.idx = ", args.topk.idx,
                  ": both must be non-null when num_tokens > 0");
    } else if (!aligned16(args.x)) {
      problem.set("invalid argument LlDispatchArgs::x = ", args.x, ": must be 16-byte aligned");
    }
  }
  if (!problem.empty()) {
    b.rejectInput(stream,
                  recv && !send ? kernels::OpId::kLlDispatchRecv : kernels::OpId::kLlDispatchSend,
                  problem.text());
  }
  if (problem.empty() && recv && args.cumulative_recv_counts != nullptr &&
      reinterpret_cast<uintptr_t>(args.cumulative_recv_counts) % alignof(int32_t) != 0) {
    problem.set("invalid argument LlDispatchArgs::cumulative_recv_counts = ",
                args.cumulative_recv_counts, ": must be 4-byte aligned");
    b.rejectInput(stream,
                  recv && !send ? kernels::OpId::kLlDispatchRecv : kernels::OpId::kLlDispatchSend,
                  problem.text());
  }
  const int sms =
      b.resolveSms(stream, kernels::OpId::kLlDispatchSend, args.num_sms, c.ll_num_sms,
                   defaultSms(send ? args.num_tokens : num_tokens_), "LlDispatchArgs::num_sms");

  DeviceGuard guard(b.device);
  kernels::LlParams p = baseParams();
  const bool fused = send && recv && b.perf.ll_fused_dispatch;
  if (send) {
    p.x = static_cast<const uint16_t*>(args.x);
    p.num_tokens = args.num_tokens;
    p.topk_idx = args.topk.idx;
    p.idx_is_64 = args.topk.idx_type == IndexType::kInt64;
    p.num_topk = args.topk.num_topk;
    p.topk_weights = args.topk_weights;
    p.use_fp8 = args.use_fp8;
    p.signature = kernels::llSignature(c.hidden, args.use_fp8);
    if (fused) {
      p.cumulative_recv_counts = args.cumulative_recv_counts;
      kernels::launchLlDispatchFused(p, sms, stream);
    } else {
      kernels::launchLlDispatchSend(p, sms, stream);
    }
    use_fp8_ = args.use_fp8;
    num_tokens_ = args.num_tokens;
    num_topk_ = args.topk.num_topk;
    dispatch_weights_ = args.topk_weights != nullptr;
    stage_ = Stage::kDispatchSent;
  }
  if (recv) {
    if (!fused) {
      // This rank's token count from the send phase: the receive kernel's item shape is chosen
      // from it (llDispatchFineItems; a receive called alone had 0 and took the small-batch
      // shape at every batch).
      p.num_tokens = num_tokens_;
      p.cumulative_recv_counts = args.cumulative_recv_counts;
      p.use_fp8 = use_fp8_;
      p.signature = kernels::llSignature(c.hidden, use_fp8_);
      kernels::launchLlDispatchRecv(p, sms, stream);
    }
    stage_ = Stage::kDispatched;
  }

  b.trackWork(stream);
  const kernels::LlRegions& ll = regions_;
  uint8_t* base = b.localBase();
  LlDispatchResult result;
  result.recv_x = base + ll.out_x;
  result.recv_x_scales = use_fp8_ ? reinterpret_cast<const float*>(base + ll.out_scales) : nullptr;
  result.num_recv_tokens_per_expert = reinterpret_cast<const int32_t*>(base + ll.expert_count);
  result.recv_src_info = reinterpret_cast<const int32_t*>(base + ll.src_info);
  result.rows_per_expert = ll.rows_per_expert;
  return result;
}

void LlEngine::combine(const LlCombineArgs& args, cudaStream_t stream, LlPhase phase) {
  BufferCore& b = core_;
  const BufferConfig& c = b.resolved.config;
  const bool send = phase == LlPhase::kSend || phase == LlPhase::kBoth;
  const bool recv = phase == LlPhase::kRecv || phase == LlPhase::kBoth;
  Problem problem;
  const SequenceRule rule{Stage::kDispatched, Stage::kCombineSent, "lowLatencyCombine",
                          "it must follow a completed lowLatencyDispatch"};
  if (!beginCall(phase, rule, problem)) {
    // reported as is
  } else if (send && (args.x == nullptr || !aligned16(args.x))) {
    problem.set("invalid argument LlCombineArgs::x = ", args.x,
                ": must be non-null and 16-byte aligned");
  } else if (send && reinterpret_cast<uintptr_t>(args.topk_weights) % alignof(float) != 0) {
    problem.set("invalid argument LlCombineArgs::topk_weights = ", args.topk_weights,
                ": must be 4-byte aligned");
  } else if (send && num_tokens_ > 0 && args.topk_weights == nullptr && !dispatch_weights_) {
    // DeepEP's low_latency_combine always takes the weights; a silent unweighted sum would hide
    // a forgotten argument, so it is an error (ops.hpp, LlCombineArgs::topk_weights).
    problem.set(
        "invalid argument LlCombineArgs::topk_weights = nullptr: required when the "
        "matching lowLatencyDispatch had no topk_weights (this rank dispatched ",
        num_tokens_, " tokens)");
  } else if (recv && num_tokens_ > 0 && (args.out == nullptr || !aligned16(args.out))) {
    problem.set("invalid argument LlCombineArgs::out = ", args.out,
                ": must be non-null and 16-byte aligned when the dispatch had tokens");
  }
  if (!problem.empty()) {
    b.rejectInput(stream,
                  recv && !send ? kernels::OpId::kLlCombineRecv : kernels::OpId::kLlCombineSend,
                  problem.text());
  }
  const int sms = b.resolveSms(stream, kernels::OpId::kLlCombineSend, args.num_sms, c.ll_num_sms,
                               defaultSms(num_tokens_), "LlCombineArgs::num_sms");

  DeviceGuard guard(b.device);
  kernels::LlParams p = baseParams();
  p.expert_out = static_cast<const uint16_t*>(args.x);
  p.out = static_cast<uint16_t*>(args.out);
  if (send) {
    p.num_tokens = num_tokens_;
    p.num_topk = num_topk_;
    p.combine_weights = args.topk_weights;
    // A rank without tokens has no weights to give: it takes each source's as that source says.
    p.weights_mode = num_tokens_ == 0               ? kernels::kLlWeightsNoTokens
                     : args.topk_weights != nullptr ? kernels::kLlWeightsPushed
                                                    : kernels::kLlWeightsNone;
    const bool fused = recv && b.perf.ll_fused_combine;
    // The fused kernel pushes the combine-time weights itself.
    if (p.weights_mode == kernels::kLlWeightsPushed && !fused) {
      kernels::launchLlCombineWeights(p, sms, stream);
    }
    if (fused) {
      kernels::launchLlCombineFused(p, sms, stream);
    } else {
      kernels::launchLlCombineSend(p, sms, stream);
    }
    stage_ = Stage::kCombineSent;
  }
  if (recv) {
    if (!(send && b.perf.ll_fused_combine)) {
      kernels::launchLlCombineRecv(p, num_tokens_, sms, stream);
    }
    stage_ = Stage::kIdle;
  }
  b.trackWork(stream);
}

}  // namespace epcomm
