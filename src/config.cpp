// Configuration validation and the one place environment overrides are read.
#include "epcomm/config.hpp"

#include <cstdlib>
#include <string>

#include "check.hpp"

namespace epcomm {

const char* memModeName(MemMode mode) {
  switch (mode) {
    case MemMode::kAuto: return "auto";
    case MemMode::kFabric: return "fabric";
    case MemMode::kPosixFd: return "posix_fd";
    case MemMode::kCudaIpc: return "cuda_ipc";
  }
  return "unknown";
}

MemMode parseMemMode(const std::string& name, const char* what) {
  for (MemMode mode : {MemMode::kAuto, MemMode::kFabric, MemMode::kPosixFd, MemMode::kCudaIpc}) {
    if (name == memModeName(mode)) return mode;
  }
  EPCOMM_ARG_CHECK(false, what, "'" << name << "'", "one of auto, fabric, posix_fd, cuda_ipc");
  return MemMode::kAuto;
}

namespace {

constexpr double kDefaultTimeoutS = 30.0;
constexpr double kMaxTimeoutS = 24.0 * 3600.0;

const char* envOrNull(const char* name) {
  const char* value = std::getenv(name);
  return (value != nullptr && value[0] != '\0') ? value : nullptr;
}

double parseSeconds(const char* text, const char* what) {
  char* end = nullptr;
  double value = std::strtod(text, &end);
  EPCOMM_ARG_CHECK(end != text && *end == '\0', what, "'" << text << "'", "a number of seconds");
  return value;
}

}  // namespace

ResolvedConfig resolveConfig(const BufferConfig& in, int num_ranks) {
  ResolvedConfig out;
  out.config = in;
  out.num_ranks = num_ranks;
  BufferConfig& c = out.config;

  EPCOMM_ARG_CHECK(num_ranks >= 1 && num_ranks <= kMaxRanks, "number of ranks", num_ranks,
                   "in [1, " << kMaxRanks << "] (one NVLink domain)");
  EPCOMM_ARG_CHECK(c.hidden > 0 && c.hidden <= kMaxHidden && c.hidden % kHiddenAlignment == 0,
                   "BufferConfig::hidden", c.hidden,
                   "a positive multiple of " << kHiddenAlignment << " <= " << kMaxHidden);
  EPCOMM_ARG_CHECK(c.num_experts > 0 && c.num_experts <= kMaxExperts, "BufferConfig::num_experts",
                   c.num_experts, "in [1, " << kMaxExperts << "]");
  EPCOMM_ARG_CHECK(c.num_experts % num_ranks == 0, "BufferConfig::num_experts", c.num_experts,
                   "divisible by the number of ranks (" << num_ranks << ")");
  EPCOMM_ARG_CHECK(c.max_topk >= 1 && c.max_topk <= kMaxTopk, "BufferConfig::max_topk",
                   c.max_topk, "in [1, " << kMaxTopk << "]");
  EPCOMM_ARG_CHECK(c.max_tokens_per_rank >= 0 && c.max_tokens_per_rank <= kMaxTokensPerRank,
                   "BufferConfig::max_tokens_per_rank", c.max_tokens_per_rank,
                   "in [0, " << kMaxTokensPerRank << "]");
  EPCOMM_ARG_CHECK(
      c.ll_max_tokens_per_rank >= 0 && c.ll_max_tokens_per_rank <= kMaxLlTokensPerRank,
      "BufferConfig::ll_max_tokens_per_rank", c.ll_max_tokens_per_rank,
      "in [0, " << kMaxLlTokensPerRank << "]");
  EPCOMM_ARG_CHECK(c.num_sms == kAuto || (c.num_sms >= 1 && c.num_sms <= 1024),
                   "BufferConfig::num_sms", c.num_sms, "kAuto or in [1, 1024]");
  EPCOMM_ARG_CHECK(c.ll_num_sms == kAuto || (c.ll_num_sms >= 1 && c.ll_num_sms <= 1024),
                   "BufferConfig::ll_num_sms", c.ll_num_sms, "kAuto or in [1, 1024]");
  EPCOMM_ARG_CHECK(c.device >= kAuto, "BufferConfig::device", c.device, "kAuto or an ordinal");

  // Memory mode: an explicit config value wins; kAuto defers to EPCOMM_MEM_MODE.
  if (c.mem_mode == MemMode::kAuto) {
    if (const char* env = envOrNull("EPCOMM_MEM_MODE")) {
      c.mem_mode = parseMemMode(env, "EPCOMM_MEM_MODE");
      out.mem_mode_from_env = c.mem_mode != MemMode::kAuto;
    }
  }

  if (c.timeout_s < 0) {
    const char* env = envOrNull("EPCOMM_TIMEOUT_S");
    c.timeout_s = env ? parseSeconds(env, "EPCOMM_TIMEOUT_S") : kDefaultTimeoutS;
  }
  EPCOMM_ARG_CHECK(c.timeout_s > 0 && c.timeout_s <= kMaxTimeoutS, "BufferConfig::timeout_s",
                   c.timeout_s, "in (0, " << kMaxTimeoutS << "] seconds");
  out.timeout_ns = static_cast<uint64_t>(c.timeout_s * 1e9);
  return out;
}

}  // namespace epcomm
