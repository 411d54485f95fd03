// Buffer configuration, library limits and the environment overrides epcomm reads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace epcomm {

// "Let the library choose" for integer settings.
constexpr int kAuto = -1;

// Compile-time limits. Inputs beyond them are rejected with epcomm::InvalidArgument.
constexpr int kMaxRanks = 8;           // ranks in one EP group (one NVLink domain, one node)
constexpr int kMaxExperts = 512;       // experts in total
constexpr int kMaxTopk = 16;           // experts per token
constexpr int kMaxHidden = 16384;      // elements per token row
constexpr int kHiddenAlignment = 128;  // hidden must be a multiple (FP8 scales cover 128 columns)
constexpr int kFp8BlockSize = 128;     // columns per FP8 scale
constexpr int kMaxTokensPerRank = 65536;
constexpr int kMaxLlTokensPerRank = 4096;  // LL is for decode batches

// How the symmetric buffer is shared between processes (DESIGN.md §3).
enum class MemMode {
  kAuto,     // fabric if every rank can really use it, else posix_fd, else cuda_ipc
  kFabric,   // cuMemCreate + CU_MEM_HANDLE_TYPE_FABRIC (needs an IMEX channel)
  kPosixFd,  // cuMemCreate + POSIX fds passed over a Unix socket (one host)
  kCudaIpc,  // cudaMalloc + cudaIpcGetMemHandle (one host)
};

const char* memModeName(MemMode mode);  // "auto", "fabric", "posix_fd", "cuda_ipc"
// Parses a name produced by memModeName; throws InvalidArgument naming `what` otherwise.
MemMode parseMemMode(const std::string& name, const char* what = "mem_mode");

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

  // Memory sharing mode. kAuto honours EPCOMM_MEM_MODE; any other value wins over it.
  MemMode mem_mode = MemMode::kAuto;

  // Deadline of every wait, on the device and on the host, in seconds. kAuto (< 0) means
  // EPCOMM_TIMEOUT_S or 30 s.
  double timeout_s = kAuto;

  // Default SM budget of HT ops (kAuto: the library's tuned default) and of LL ops
  // (kAuto: every SM). Each call may override it.
  int num_sms = kAuto;
  int ll_num_sms = kAuto;

  // Extra symmetric bytes at the same offset on every rank, for callers (EpBuffer::scratch()).
  size_t scratch_bytes = 0;
};

// The configuration with every kAuto resolved, environment overrides applied and each field
// checked. Throws InvalidArgument naming the field, its value and the limit. Host-only: the
// device and rank count are supplied by the caller.
struct ResolvedConfig {
  BufferConfig config;
  int num_ranks = 1;
  uint64_t timeout_ns = 0;
  bool mem_mode_from_env = false;
};
ResolvedConfig resolveConfig(const BufferConfig& config, int num_ranks);

}  // namespace epcomm
