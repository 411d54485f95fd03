// SPDX-License-Identifier: Apache-2.0
// Surfacing what the kernels recorded: the device error record (kernels/protocol.hpp) decoded
// into an epcomm::Error naming the op, the wait phase, the peer and what to do; the broken flag;
// and the once-per-call kRemote of a call a peer's rejection stopped.
#include <sstream>
#include <string>

#include "check.hpp"
#include "core/buffer_core.hpp"

namespace epcomm {

namespace {

using kernels::opName;

const char* phaseName(int phase) {
  return kernels::waitPhaseName(phase);
}

// Names every field in which two per-call signatures (kernels/protocol.hpp) differ, with both
// values.
std::string describeSignatureDiff(int op, int peer, uint64_t mine, uint64_t theirs) {
  const kernels::SignatureFields decoded =
      kernels::signatureFieldsOf(static_cast<kernels::OpId>(op));
  std::ostringstream os;
  const char* sep = "";
  for (size_t i = 0; i < decoded.count; ++i) {
    const kernels::SignatureField& field = decoded.fields[i];
    const int64_t a = kernels::signatureValue(field, mine);
    const int64_t b = kernels::signatureValue(field, theirs);
    if (a == b) continue;
    os << sep << field.name << ": rank " << peer << " passed " << b << ", this rank " << a;
    sep = "; ";
  }
  if (*sep == '\0') os << "signature words differ (" << std::hex << theirs << " vs " << mine << ")";
  return os.str();
}

const char* failKindName(int kind) {
  switch (static_cast<kernels::FailKind>(kind)) {
    case kernels::FailKind::kBadExpertId:
      return "an expert id out of range in topk_idx";
    case kernels::FailKind::kOverCapacity:
      return "more rows than the buffer holds";
    case kernels::FailKind::kBadPeerData:
      return "an out-of-range value received from a peer";
    case kernels::FailKind::kSignatureMismatch:
      return "different per-call parameters";
    case kernels::FailKind::kLayoutRankCount:
    case kernels::FailKind::kLayoutExpertCount:
    case kernels::FailKind::kLayoutExpertVsTopk:
    case kernels::FailKind::kLayoutTokenVsTopk:
      return "an inconsistent DispatchArgs::layout";
    case kernels::FailKind::kOverWorstTokens:
      return "more received rows than its DispatchArgs::num_worst_tokens";
    default:
      return "a device-side error";
  }
}

}  // namespace

void BufferCore::checkDeviceError() const {
  const volatile kernels::DeviceErrorRecord* record = &hostState()->error;
  const int kind = record->kind;
  if (kind != 0) {
    kernels::DeviceErrorRecord copy;
    copy.kind = kind;
    copy.op = record->op;
    copy.phase = record->phase;
    copy.rank = record->rank;
    copy.peer = record->peer;
    copy.index = record->index;
    copy.expected = record->expected;
    copy.observed = record->observed;
    const std::string message =
        detail::formatMessage(describeDeviceError(copy), __FILE__, __LINE__);
    if (!broken) {
      broken = true;
      broken_reason = message;
    }
    switch (static_cast<kernels::FailKind>(kind)) {
      case kernels::FailKind::kTimeout:
        throw TimeoutError(copy.peer, message);
      case kernels::FailKind::kBadExpertId:
      case kernels::FailKind::kSignatureMismatch:
      case kernels::FailKind::kLayoutRankCount:
      case kernels::FailKind::kLayoutExpertCount:
      case kernels::FailKind::kLayoutExpertVsTopk:
      case kernels::FailKind::kLayoutTokenVsTopk:
      case kernels::FailKind::kOverWorstTokens:
        throw InvalidArgument(message);
      case kernels::FailKind::kPeerFaulted:
        throw Error(ErrorCode::kRemote, message);
      default:
        throw Error(ErrorCode::kBroken, message);
    }
  }
  if (broken) {
    throw Error(ErrorCode::kBroken,
                detail::formatMessage("this EpBuffer is unusable after an earlier error (" +
                                          broken_reason + "); destroy and recreate it",
                                      __FILE__, __LINE__));
  }
}

std::string BufferCore::describeDeviceError(const kernels::DeviceErrorRecord& r) const {
  std::ostringstream os;
  const char* op = opName(r.op);
  switch (static_cast<kernels::FailKind>(r.kind)) {
    case kernels::FailKind::kTimeout: {
      // The first call of a family (epoch 1) waits up to first_op_timeout_s.
      os << op << " timed out after "
         << (r.expected <= 1 ? resolved.config.first_op_timeout_s : resolved.config.timeout_s)
         << " s (" << (r.expected <= 1 ? "first_op_timeout_s" : "timeout_s")
         << ") waiting for rank " << r.peer << " (" << phaseName(r.phase) << ": ";
      const auto phase = static_cast<kernels::WaitPhase>(r.phase);
      if (phase == kernels::WaitPhase::kHtRowsShares ||
          phase == kernels::WaitPhase::kHtPullShares) {
        // An arrival-share word (kernels::arrivalShare): what part of the peer's grid signalled.
        os << "call " << r.expected << ", "
           << 100.0 * static_cast<double>(r.observed) / static_cast<double>(kernels::kArrivalShares)
           << " % of rank " << r.peer << "'s blocks had signalled). Rank " << r.peer
           << " never finished: did it crash, hang, or issue a different sequence of ops?";
      } else {
        os << "expected call " << r.expected << ", rank " << r.peer << " was at call " << r.observed
           << "). Rank " << r.peer
           << " never got there: did it crash, hang, or issue a different sequence of ops?";
      }
      break;
    }
    case kernels::FailKind::kAborted:
      os << op << " was aborted by EpBuffer::abort()";
      break;
    case kernels::FailKind::kBadExpertId:
      os << "invalid argument topk_idx: token " << r.index << " has expert id "
         << static_cast<int64_t>(r.observed) << ", must be -1 or in [0, " << r.expected
         << ") (found on the device in " << op << "; the op was stopped on every rank)";
      break;
    case kernels::FailKind::kLayoutRankCount:
      os << "invalid argument DispatchArgs::layout.num_tokens_per_rank[" << r.index
         << "] = " << static_cast<int64_t>(r.observed) << ": must equal the number of tokens "
         << "layout.is_token_in_rank sends to rank " << r.index << " (" << r.expected
         << ") (found on the device in " << op << "; the op was stopped on every rank)";
      break;
    case kernels::FailKind::kLayoutExpertCount:
      os << "invalid argument DispatchArgs::layout.num_tokens_per_expert[" << r.index
         << "] = " << static_cast<int64_t>(r.observed)
         << ": must be in [0, num_tokens_per_rank of the expert's rank = " << r.expected
         << "] (found on the device in " << op << "; the op was stopped on every rank)";
      break;
    case kernels::FailKind::kLayoutExpertVsTopk:
      os << "invalid argument DispatchArgs::layout.num_tokens_per_expert[" << r.index
         << "] = " << static_cast<int64_t>(r.observed) << ": topk.idx names expert " << r.index
         << " in " << r.expected << " tokens (a repeated id counts once; found on the device in "
         << op << "; the op was stopped on every rank)";
      break;
    case kernels::FailKind::kLayoutTokenVsTopk:
      os << "invalid argument DispatchArgs::layout.is_token_in_rank: token " << r.index
         << " has an expert on rank " << r.expected << " in topk.idx but is_token_in_rank["
         << r.index << "][" << r.expected << "] is false (found on the device in " << op
         << "; the op was stopped on every rank)";
      break;
    case kernels::FailKind::kOverWorstTokens:
      os << "invalid argument DispatchArgs::num_worst_tokens = " << r.expected << ": " << op
         << " received " << r.observed << " rows on this rank, more than num_worst_tokens (the "
         << "op was stopped on every rank)";
      break;
    case kernels::FailKind::kOverCapacity:
      if (static_cast<kernels::OpId>(r.op) == kernels::OpId::kLlDispatchRecv) {
        os << op << ": rank " << r.peer << " sent row " << r.index << " to a local expert that "
           << "already holds its capacity of " << r.expected << " rows (a token may reach an "
           << "expert at most once); the row was dropped";
      } else {
        os << op << " would receive " << r.observed << " rows"
           << (r.peer >= 0 ? " on rank " + std::to_string(r.peer) : std::string())
           << ", more than the buffer's capacity of " << r.expected
           << " (BufferConfig::ht_recv_rows; an expert-major dispatch needs one row per (token, "
              "local expert) pair plus each group's padding to expert_alignment)";
      }
      break;
    case kernels::FailKind::kBadPeerData:
      os << op << " (" << phaseName(r.phase) << "): a value received from "
         << (r.peer >= 0 ? "rank " + std::to_string(r.peer) : std::string("a peer")) << " is "
         << r.observed << ", outside its limit of " << r.expected
         << "; it was not used. The peers' buffer state is inconsistent (memory corruption, or "
            "ranks issuing different op sequences)";
      break;
    case kernels::FailKind::kSignatureMismatch:
      os << "ranks called " << op << " with different per-call parameters ("
         << describeSignatureDiff(r.op, r.peer, r.expected, r.observed)
         << "); every rank must pass the same values (include/epcomm/ops.hpp lists them)";
      break;
    case kernels::FailKind::kPeerFaulted: {
      const int kind = kernels::faultKindOf(r.observed);
      const int where = kernels::faultOpOf(r.observed);
      os << op << " stopped because rank " << r.peer << " found " << failKindName(kind) << " in "
         << opName(where) << " (rank " << r.peer << " reports the details)";
      break;
    }
    case kernels::FailKind::kNone:
      break;
  }
  os << ". This EpBuffer is now unusable; destroy and recreate it.";
  return os.str();
}

void BufferCore::checkUsable() const {
  checkDeviceError();
  // A call of this rank that a peer's rejection stopped (see "Rejected calls" in protocol.hpp):
  // raised once, and the buffer stays usable.
  const uint64_t report = *reinterpret_cast<const volatile uint64_t*>(&hostState()->rejection);
  if (report == 0) return;
  const uint64_t epoch = kernels::rejectionEpoch(report);
  const kernels::OpId op = kernels::rejectionOp(report);
  const int peer = kernels::rejectionRank(report);
  const kernels::EpochSlot family = kernels::epochSlotOf(op);
  const uint64_t key = epoch << 8 | static_cast<uint64_t>(family);
  if (key == surfaced_rejection) return;
  surfaced_rejection = key;
  if (on_call_skipped) on_call_skipped(family);  // the call is over on every rank
  throw Error(
      ErrorCode::kRemote,
      detail::formatMessage(
          "rank " + std::to_string(peer) + " rejected its input for call " + std::to_string(epoch) +
              " of " + opName(static_cast<int>(op)) + " (rank " + std::to_string(peer) +
              " reports why), so this rank's call "
              "was stopped and skipped on every rank. This EpBuffer is still usable: "
              "every rank goes on with its next call",
          __FILE__, __LINE__));
}

}  // namespace epcomm
