// SPDX-License-Identifier: Apache-2.0
// Buffer configuration, library limits and the environment overrides epcomm reads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "epcomm/export.hpp"

namespace epcomm {

// "Let the library choose" for integer settings.
constexpr int kAuto = -1;

// Compile-time limits. Inputs beyond them are rejected with epcomm::InvalidArgument.
// kMaxRanks: ranks in one EP group, all in one NVLink domain (one node, or a rack-scale NVLink
// domain such as GB200 NVL72 through the fabric memory mode). Kernels keep a token's destination
// ranks in ceil(R / 32) 32-bit words, so up to 32 ranks cost what 8 did.
// kMaxExperts: 1024 covers the 896-expert models; the HT call signature holds 11 bits of it.
constexpr int kMaxRanks = 72;
constexpr int kMaxExperts = 1024;      // experts in total
constexpr int kMaxTopk = 16;           // experts per token
constexpr int kMaxHidden = 16384;      // elements per token row
constexpr int kHiddenAlignment = 128;  // hidden must be a multiple (FP8 scales cover 128 columns)
constexpr int kFp8BlockSize = 128;     // columns per FP8 scale
constexpr int kMaxTokensPerRank = 65536;
constexpr int kMaxLlTokensPerRank = 4096;  // LL is for decode batches

// How the symmetric buffer is shared between processes (docs/design.md §3).
enum class MemMode {
  kAuto,     // fabric if every rank can really use it, else posix_fd, else cuda_ipc
  kFabric,   // cuMemCreate + CU_MEM_HANDLE_TYPE_FABRIC (needs an IMEX channel)
  kPosixFd,  // cuMemCreate + POSIX fds passed over a Unix socket (one host)
  kCudaIpc,  // cudaMalloc + cudaIpcGetMemHandle (one host)
};

EPCOMM_API const char* memModeName(MemMode mode);  // "auto", "fabric", "posix_fd", "cuda_ipc"
// Parses a name produced by memModeName, in any case ("FABRIC" is fabric); throws
// InvalidArgument naming `what` otherwise.
EPCOMM_API MemMode parseMemMode(const std::string& name, const char* what = "mem_mode");

// Deadlines (one story for the whole library):
//  - timeout_s (EPCOMM_TIMEOUT_S, default 30 s): every device-side wait of an op and the host
//    waits behind it (sync(), exact_count dispatch, teardown), once every rank is running.
//  - first_op_timeout_s (EPCOMM_FIRST_OP_TIMEOUT_S, default 600 s, never below timeout_s): the
//    device waits of the first op of each family (barrier, HT dispatch, HT combine, LL) on a new
//    buffer, and the bootstrap's collectives (MpiBootstrap's default deadline). Ranks reach their
//    first op at different times (one may JIT-compile its first layer for minutes); after that
//    they run in step and a stall is a real fault.
constexpr double kDefaultTimeoutS = 30.0;
constexpr double kDefaultFirstOpTimeoutS = 600.0;
constexpr double kMaxTimeoutS = 24.0 * 3600.0;
constexpr double kMinTimeoutS = 1e-9;  // below one nanosecond a deadline would read as zero

// The bootstrap deadline: `timeout_s` if >= 0, else EPCOMM_FIRST_OP_TIMEOUT_S, else
// kDefaultFirstOpTimeoutS. Throws InvalidArgument naming the source of a bad value.
EPCOMM_API double resolveBootstrapTimeout(double timeout_s);

struct BufferConfig {
  // CUDA device this rank uses; kAuto = the device current when the EpBuffer is created.
  int device = kAuto;

  // Model shape the buffer is sized for. Every op checks its inputs against these.
  int hidden = 7168;      // multiple of 128, <= kMaxHidden
  int num_experts = 256;  // divisible by the number of ranks, <= kMaxExperts
  int max_topk = 8;       // <= kMaxTopk

  // High-throughput (HT) capacity: tokens one rank may dispatch per call. 0 disables HT.
  int max_tokens_per_rank = 4096;
  // Low-latency (LL) capacity: tokens one rank may dispatch per LL call. 0 disables LL.
  int ll_max_tokens_per_rank = 0;
  // Rows of the HT receive region (recv_x, its metadata and combine_input) of every rank;
  // DispatchResult::capacity. kAuto = num_ranks * max_tokens_per_rank, the most a rank-major
  // dispatch can receive. An expert-major dispatch (DispatchArgs::expert_major) receives one row
  // per (token, local expert) pair plus each group's padding to expert_alignment, which can be up
  // to num_ranks * max_tokens_per_rank * min(max_topk, local experts) + local experts *
  // (expert_alignment - 1): size this for the traffic you expect (the worst case is rarely
  // affordable: alignment may be 65536). A call that needs more rows than this fails on every
  // rank (ErrorCode::kBroken naming the rows needed and ht_recv_rows, or kRemote on a rank that
  // heard of it from a peer first; the buffer is then unusable). When set: >= num_ranks *
  // max_tokens_per_rank and < 2^31. Same on every rank (it sizes the buffer).
  int64_t ht_recv_rows = kAuto;

  // Memory sharing mode. kAuto honours EPCOMM_MEM_MODE; any other value wins over it.
  MemMode mem_mode = MemMode::kAuto;

  // Deadline of every wait, on the device and on the host, in seconds (see "Deadlines" above).
  // kAuto (< 0) means EPCOMM_TIMEOUT_S or 30 s. Must be in [1e-9, 86400].
  double timeout_s = kAuto;
  // Deadline of the waits of the first op of each family. kAuto (< 0) means
  // EPCOMM_FIRST_OP_TIMEOUT_S or 600 s, raised to timeout_s if that is longer. An explicit value
  // must be >= timeout_s.
  double first_op_timeout_s = kAuto;

  // Default SM budget of HT ops (kAuto: the library's tuned default) and of LL ops (kAuto: sized
  // to the call's batch, LlDispatchArgs::num_sms; docs/design.md §6). Each call may override it.
  // When several ranks of the buffer share one GPU (MPS), the kAuto budgets are divided among
  // them (at most SMs / ranks-on-that-GPU each): their kernels wait for each other and must all
  // be resident at once. An explicit budget is taken as given.
  int num_sms = kAuto;
  int ll_num_sms = kAuto;

  // Extra symmetric bytes at the same offset on every rank, for callers
  // (EpBuffer::scratchOffset() / scratchBytes()).
  size_t scratch_bytes = 0;
};
// At least one of max_tokens_per_rank and ll_max_tokens_per_rank must be > 0.
//
// Every rank must pass the same shape (hidden, num_experts, max_topk, both capacities,
// scratch_bytes), the same memory mode and the same deadlines after resolution; EpBuffer's
// constructor checks this on every rank and names the rank and the field that differ.

// The configuration with every kAuto resolved, environment overrides applied and each field
// checked. Throws InvalidArgument naming the field, its value and the limit. Host-only (no CUDA
// call): the rank count is supplied by the caller; a kAuto device is resolved by EpBuffer.
struct ResolvedConfig {
  BufferConfig config;
  int num_ranks = 1;
  uint64_t timeout_ns = 0;
  uint64_t first_op_timeout_ns = 0;
  bool mem_mode_from_env = false;          // mem_mode came from EPCOMM_MEM_MODE
  bool timeout_from_env = false;           // timeout_s came from EPCOMM_TIMEOUT_S
  bool first_op_timeout_from_env = false;  // first_op_timeout_s from EPCOMM_FIRST_OP_TIMEOUT_S
};
EPCOMM_API ResolvedConfig resolveConfig(const BufferConfig& config, int num_ranks);

}  // namespace epcomm
