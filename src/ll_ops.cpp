// LL front-end: argument and call-sequence checks (before any launch) and the launches of the
// send and receive halves.
#include <algorithm>
#include <cstdint>
#include <sstream>

#include "buffer_impl.hpp"
#include "check.hpp"

namespace epcomm {

namespace {

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

const char* stageName(EpBuffer::Impl::LlStage stage) {
  switch (stage) {
    case EpBuffer::Impl::LlStage::kIdle: return "idle (next: lowLatencyDispatch)";
    case EpBuffer::Impl::LlStage::kDispatchSent:
      return "dispatch sent (next: lowLatencyDispatch with LlPhase::kRecv)";
    case EpBuffer::Impl::LlStage::kDispatched: return "dispatched (next: lowLatencyCombine)";
    case EpBuffer::Impl::LlStage::kCombineSent:
      return "combine sent (next: lowLatencyCombine with LlPhase::kRecv)";
  }
  return "?";
}

kernels::LlParams baseParams(const EpBuffer::Impl& b) {
  kernels::LlParams p{};
  const BufferConfig& c = b.resolved.config;
  p.peers = b.peers;
  p.regions = b.layout.ll;
  p.hidden = c.hidden;
  p.num_experts = c.num_experts;
  p.num_local_experts = b.num_local_experts;
  p.max_topk = c.max_topk;
  return p;
}

}  // namespace

LlDispatchResult EpBuffer::lowLatencyDispatch(const LlDispatchArgs& args, cudaStream_t stream,
                                              LlPhase phase) {
  Impl& b = *impl_;
  b.checkUsable();
  const BufferConfig& c = b.resolved.config;
  const bool send = phase == LlPhase::kSend || phase == LlPhase::kBoth;
  const bool recv = phase == LlPhase::kRecv || phase == LlPhase::kBoth;
  std::ostringstream problem;
  if (!b.layout.has_ll) {
    problem << "invalid argument BufferConfig::ll_max_tokens_per_rank = 0: must be > 0 for LL ops";
  } else if (phase != LlPhase::kSend && phase != LlPhase::kRecv && phase != LlPhase::kBoth) {
    problem << "invalid argument phase = " << static_cast<int>(phase) << ": must be an LlPhase";
  } else if (send && b.ll_stage != Impl::LlStage::kIdle) {
    problem << "lowLatencyDispatch called in LL stage '" << stageName(b.ll_stage)
            << "': dispatch and combine must alternate";
  } else if (!send && b.ll_stage != Impl::LlStage::kDispatchSent) {
    problem << "lowLatencyDispatch(kRecv) called in LL stage '" << stageName(b.ll_stage) << "'";
  } else if (send) {
    if (args.num_tokens < 0 || args.num_tokens > c.ll_max_tokens_per_rank) {
      problem << "invalid argument LlDispatchArgs::num_tokens = " << args.num_tokens
              << ": must be in [0, " << c.ll_max_tokens_per_rank << "] (ll_max_tokens_per_rank)";
    } else if (args.topk.num_tokens != args.num_tokens) {
      problem << "invalid argument topk.num_tokens = " << args.topk.num_tokens
              << ": must equal LlDispatchArgs::num_tokens (" << args.num_tokens << ")";
    } else if (args.topk.num_topk < 1 || args.topk.num_topk > c.max_topk) {
      problem << "invalid argument topk.num_topk = " << args.topk.num_topk << ": must be in [1, "
              << c.max_topk << "] (BufferConfig::max_topk)";
    } else if (args.num_tokens > 0 &&
               (args.x == nullptr || args.topk.idx == nullptr || args.topk_weights == nullptr)) {
      problem << "invalid argument LlDispatchArgs: x = " << args.x << ", topk.idx = "
              << args.topk.idx << ", topk_weights = " << args.topk_weights
              << ": all must be non-null when num_tokens > 0";
    } else if (!aligned16(args.x)) {
      problem << "invalid argument LlDispatchArgs::x = " << args.x << ": must be 16-byte aligned";
    }
  }
  if (!problem.str().empty()) {
    b.rejectInput(stream, recv && !send ? kernels::OpId::kLlDispatchRecv : kernels::OpId::kLlDispatchSend,
                  problem.str());
  }
  const int sms = b.resolveSms(stream, kernels::OpId::kLlDispatchSend, args.num_sms, c.ll_num_sms,
                               b.device_sms, "LlDispatchArgs::num_sms");

  DeviceGuard guard(b.device);
  kernels::LlParams p = baseParams(b);
  if (send) {
    p.x = static_cast<const uint16_t*>(args.x);
    p.num_tokens = args.num_tokens;
    p.topk_idx = args.topk.idx;
    p.idx_is_64 = args.topk.idx_type == IndexType::kInt64;
    p.num_topk = args.topk.num_topk;
    p.topk_weights = args.topk_weights;
    p.use_fp8 = args.use_fp8;
    p.signature = kernels::llSignature(c.hidden, args.use_fp8);
    // One block per token at most: idle blocks would only add arrivals to the last-block count.
    kernels::launchLlDispatchSend(p, std::max(1, std::min(sms, args.num_tokens)), stream);
    b.ll_use_fp8 = args.use_fp8;
    b.ll_num_tokens = args.num_tokens;
    b.ll_stage = Impl::LlStage::kDispatchSent;
  }
  if (recv) {
    p.use_fp8 = b.ll_use_fp8;
    p.signature = kernels::llSignature(c.hidden, b.ll_use_fp8);
    kernels::launchLlDispatchRecv(p, sms, stream);
    b.ll_stage = Impl::LlStage::kDispatched;
  }

  b.trackWork(stream);
  const kernels::LlRegions& ll = b.layout.ll;
  uint8_t* base = b.localBase();
  LlDispatchResult result;
  result.recv_x = base + ll.out_x;
  result.recv_x_scales = b.ll_use_fp8 ? reinterpret_cast<const float*>(base + ll.out_scales)
                                      : nullptr;
  result.num_recv_tokens_per_expert = reinterpret_cast<const int32_t*>(base + ll.expert_count);
  result.recv_src_info = reinterpret_cast<const int32_t*>(base + ll.src_info);
  result.rows_per_expert = ll.rows_per_expert;
  return result;
}

void EpBuffer::lowLatencyCombine(const LlCombineArgs& args, cudaStream_t stream, LlPhase phase) {
  Impl& b = *impl_;
  b.checkUsable();
  const BufferConfig& c = b.resolved.config;
  const bool send = phase == LlPhase::kSend || phase == LlPhase::kBoth;
  const bool recv = phase == LlPhase::kRecv || phase == LlPhase::kBoth;
  std::ostringstream problem;
  if (!b.layout.has_ll) {
    problem << "invalid argument BufferConfig::ll_max_tokens_per_rank = 0: must be > 0 for LL ops";
  } else if (phase != LlPhase::kSend && phase != LlPhase::kRecv && phase != LlPhase::kBoth) {
    problem << "invalid argument phase = " << static_cast<int>(phase) << ": must be an LlPhase";
  } else if (send && b.ll_stage != Impl::LlStage::kDispatched) {
    problem << "lowLatencyCombine called in LL stage '" << stageName(b.ll_stage)
            << "': it must follow a completed lowLatencyDispatch";
  } else if (!send && b.ll_stage != Impl::LlStage::kCombineSent) {
    problem << "lowLatencyCombine(kRecv) called in LL stage '" << stageName(b.ll_stage) << "'";
  } else if (send && (args.x == nullptr || !aligned16(args.x))) {
    problem << "invalid argument LlCombineArgs::x = " << args.x
            << ": must be non-null and 16-byte aligned";
  } else if (recv && b.ll_num_tokens > 0 && (args.out == nullptr || !aligned16(args.out))) {
    problem << "invalid argument LlCombineArgs::out = " << args.out
            << ": must be non-null and 16-byte aligned when the dispatch had tokens";
  }
  if (!problem.str().empty()) {
    b.rejectInput(stream, recv && !send ? kernels::OpId::kLlCombineRecv : kernels::OpId::kLlCombineSend,
                  problem.str());
  }
  const int sms = b.resolveSms(stream, kernels::OpId::kLlCombineSend, args.num_sms, c.ll_num_sms,
                               b.device_sms, "LlCombineArgs::num_sms");

  DeviceGuard guard(b.device);
  kernels::LlParams p = baseParams(b);
  p.expert_out = static_cast<const uint16_t*>(args.x);
  p.out = static_cast<uint16_t*>(args.out);
  if (send) {
    kernels::launchLlCombineSend(p, sms, stream);
    b.ll_stage = Impl::LlStage::kCombineSent;
  }
  if (recv) {
    // The receive half reduces num_tokens x hidden/1024 segments, one warp each (16 per block).
    const int segments = (c.hidden + 1023) / 1024;
    const int blocks = static_cast<int>((int64_t{b.ll_num_tokens} * segments + 15) / 16);
    kernels::launchLlCombineRecv(p, std::max(1, std::min(sms, blocks)), stream);
    b.ll_stage = Impl::LlStage::kIdle;
  }
  b.trackWork(stream);
}

}  // namespace epcomm
