// SPDX-License-Identifier: Apache-2.0
// Buffer creation is collective: every step is agreed by every rank (agreeOn), so a step that
// fails on one rank fails on every rank at once, with that rank's reason, never as a hang. Also
// what the ranks compare before allocating (ConfigDigest) and the GPU checks. Internal.
#pragma once

#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "check.hpp"
#include "core/buffer_layout.hpp"
#include "epcomm/bootstrap.hpp"
#include "epcomm/config.hpp"
#include "epcomm/error.hpp"

namespace epcomm::core {

constexpr size_t kVoteReasonBytes = 480;

// One rank's outcome of a creation step, all-gathered so that every rank takes the same decision.
// Fixed size and trivially copyable; a peer's reason is read only up to its buffer's end.
template <typename Payload>
struct Vote {
  int32_t ok;
  int32_t code;  // ErrorCode of the failure
  char reason[kVoteReasonBytes];
  Payload payload;
};

struct NoPayload {
  int32_t unused;
};

inline std::string reasonOf(const char* text) {
  return std::string(text, strnlen(text, kVoteReasonBytes));
}

// Runs `step` on this rank and all-gathers whether it worked. If it failed anywhere, every rank
// throws: a failing rank its own exception, the others an error naming the first failing rank
// and its reason (with that rank's code when the job's setup is wrong everywhere: InvalidArgument
// or Unsupported; ErrorCode::kRemote otherwise). A rank whose step failed still votes (even on a
// timeout: the others may be fine and waiting for its vote); if the vote itself fails (a broken
// bootstrap), it throws its own error. Returns every rank's payload.
template <typename Payload, typename Step>
std::vector<Payload> agreeOn(Bootstrap& bootstrap, const char* stage, Step&& step) {
  Vote<Payload> mine;
  std::memset(&mine, 0, sizeof(mine));  // padding too: it crosses the wire
  std::exception_ptr failure;
  try {
    mine.payload = step();
    mine.ok = 1;
  } catch (const Error& e) {
    failure = std::current_exception();
    mine.code = static_cast<int32_t>(e.code());
    std::strncpy(mine.reason, e.what(), kVoteReasonBytes - 1);
  } catch (const std::exception& e) {
    failure = std::current_exception();
    mine.code = static_cast<int32_t>(ErrorCode::kInternal);
    std::strncpy(mine.reason, e.what(), kVoteReasonBytes - 1);
  }
  std::vector<Vote<Payload>> all(static_cast<size_t>(bootstrap.size()));
  try {
    bootstrap.allGather(&mine, all.data(), sizeof(mine));
  } catch (const std::exception&) {
    if (failure) std::rethrow_exception(failure);
    throw;
  }
  for (int r = 0; r < bootstrap.size(); ++r) {
    const Vote<Payload>& vote = all[static_cast<size_t>(r)];
    if (vote.ok) continue;
    if (failure) std::rethrow_exception(failure);
    const ErrorCode code = static_cast<ErrorCode>(vote.code);
    const bool shared_cause =
        code == ErrorCode::kInvalidArgument || code == ErrorCode::kUnsupported;
    detail::throwError(shared_cause ? code : ErrorCode::kRemote,
                       "EpBuffer creation failed on rank " + std::to_string(r) + " (" + stage +
                           "), so every rank stops: " + reasonOf(vote.reason),
                       __FILE__, __LINE__);
  }
  std::vector<Payload> payloads;
  for (const Vote<Payload>& vote : all) payloads.push_back(vote.payload);
  return payloads;
}

// What every rank must agree on before allocating: a mismatch would corrupt memory or hang later.
enum DigestField : int {
  kDigestHidden,
  kDigestNumExperts,
  kDigestMaxTopk,
  kDigestMaxTokens,
  kDigestLlMaxTokens,
  kDigestScratchBytes,
  kDigestBufferBytes,
  kDigestMemMode,
  kDigestTimeout,         // in nanoseconds, compared exactly
  kDigestFirstOpTimeout,  // in nanoseconds
  kDigestNumRanks,
  kNumDigestFields
};
inline constexpr const char* kDigestFieldNames[kNumDigestFields] = {
    "hidden",        "num_experts",  "max_topk", "max_tokens_per_rank", "ll_max_tokens_per_rank",
    "scratch_bytes", "buffer bytes", "mem_mode", "timeout_s",           "first_op_timeout_s",
    "rank count"};

struct ConfigDigest {
  int64_t values[kNumDigestFields];
  uint8_t from_env[kNumDigestFields];  // where a value came from, for messages (not compared)
};

ConfigDigest digestOf(const ResolvedConfig& resolved, const BufferLayout& layout);
// Throws InvalidArgument on every rank, naming the first field that differs, unless every rank's
// digest equals rank 0's.
void requireSameConfig(const std::vector<ConfigDigest>& digests);

// This rank's GPU as its peers need to know it.
struct DeviceDigest {
  char pci_bus_id[32];  // "0000:1b:00.0"
  int32_t major, minor;
};

// Fails with kUnsupported, naming both, when the device cannot run the compiled kernels.
void checkArchitecture(int device);

}  // namespace epcomm::core
