// SPDX-License-Identifier: Apache-2.0
// Configuration validation and the one place environment overrides are read.
#include "epcomm/config.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <iterator>
#include <optional>
#include <string>

#include "check.hpp"
#include "core/perf_flags.hpp"
#include "core/topology.hpp"

namespace epcomm {

namespace {

// Indexed by MemMode.
constexpr const char* kMemModeNames[] = {"auto", "fabric", "posix_fd", "cuda_ipc"};
static_assert(static_cast<int>(MemMode::kCudaIpc) == 3, "one name per MemMode, in order");

}  // namespace

const char* memModeName(MemMode mode) {
  const auto index = static_cast<size_t>(mode);
  return index < std::size(kMemModeNames) ? kMemModeNames[index] : "unknown";
}

MemMode parseMemMode(const std::string& name, const char* what) {
  std::string lower = name;
  for (char& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  for (MemMode mode : {MemMode::kAuto, MemMode::kFabric, MemMode::kPosixFd, MemMode::kCudaIpc}) {
    if (lower == memModeName(mode)) return mode;
  }
  EPCOMM_ARG_CHECK(false, what, "'" << name << "'", "one of auto, fabric, posix_fd, cuda_ipc");
  return MemMode::kAuto;
}

namespace {

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

// A deadline in [kMinTimeoutS, kMaxTimeoutS]; `what` names where the value came from (a config
// field or an environment variable), so the message points at what the user has to change.
void checkTimeout(double seconds, const char* what) {
  // Written so that NaN fails too.
  EPCOMM_ARG_CHECK(seconds >= kMinTimeoutS && seconds <= kMaxTimeoutS, what, seconds,
                   "in [" << kMinTimeoutS << ", " << kMaxTimeoutS << "] seconds");
}

// The value of an environment deadline, or `fallback` if the variable is unset or empty.
double timeoutFromEnv(const char* name, double fallback, bool* from_env) {
  const char* env = envOrNull(name);
  *from_env = env != nullptr;
  if (env == nullptr) return fallback;
  const double value = parseSeconds(env, name);
  checkTimeout(value, name);
  return value;
}

// Rounded, and never 0 (which would make every wait fail at once): checkTimeout allows 1 ns.
uint64_t toNanoseconds(double seconds) {
  return std::max<uint64_t>(1, static_cast<uint64_t>(std::llround(seconds * 1e9)));
}

}  // namespace

double resolveBootstrapTimeout(double timeout_s) {
  if (timeout_s >= 0) {
    checkTimeout(timeout_s, "bootstrap timeout_s");
    return timeout_s;
  }
  bool from_env = false;
  return timeoutFromEnv("EPCOMM_FIRST_OP_TIMEOUT_S", kDefaultFirstOpTimeoutS, &from_env);
}

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
  EPCOMM_ARG_CHECK(c.max_topk >= 1 && c.max_topk <= kMaxTopk, "BufferConfig::max_topk", c.max_topk,
                   "in [1, " << kMaxTopk << "]");
  EPCOMM_ARG_CHECK(c.max_tokens_per_rank >= 0 && c.max_tokens_per_rank <= kMaxTokensPerRank,
                   "BufferConfig::max_tokens_per_rank", c.max_tokens_per_rank,
                   "in [0, " << kMaxTokensPerRank << "]");
  EPCOMM_ARG_CHECK(c.ll_max_tokens_per_rank >= 0 && c.ll_max_tokens_per_rank <= kMaxLlTokensPerRank,
                   "BufferConfig::ll_max_tokens_per_rank", c.ll_max_tokens_per_rank,
                   "in [0, " << kMaxLlTokensPerRank << "]");
  if (c.max_tokens_per_rank > 0) {
    const int64_t rank_major_rows = int64_t{num_ranks} * c.max_tokens_per_rank;
    if (c.ht_recv_rows == kAuto) c.ht_recv_rows = rank_major_rows;
    EPCOMM_ARG_CHECK(c.ht_recv_rows >= rank_major_rows && c.ht_recv_rows <= INT32_MAX,
                     "BufferConfig::ht_recv_rows", c.ht_recv_rows,
                     "kAuto or in [num_ranks * max_tokens_per_rank = "
                         << rank_major_rows << ", 2^31 - 1] (rows of the HT receive region)");
  }
  EPCOMM_ARG_CHECK(c.num_sms == kAuto || (c.num_sms >= 1 && c.num_sms <= 1024),
                   "BufferConfig::num_sms", c.num_sms, "kAuto or in [1, 1024]");
  EPCOMM_ARG_CHECK(c.ll_num_sms == kAuto || (c.ll_num_sms >= 1 && c.ll_num_sms <= 1024),
                   "BufferConfig::ll_num_sms", c.ll_num_sms, "kAuto or in [1, 1024]");
  EPCOMM_ARG_CHECK(c.device >= kAuto, "BufferConfig::device", c.device, "kAuto or an ordinal");
  EPCOMM_ARG_CHECK(c.max_tokens_per_rank > 0 || c.ll_max_tokens_per_rank > 0,
                   "BufferConfig::max_tokens_per_rank and ll_max_tokens_per_rank", "0 and 0",
                   "> 0 for at least one of them (HT or LL); a buffer with neither can do nothing");

  // Memory mode: an explicit config value wins; kAuto defers to EPCOMM_MEM_MODE.
  if (c.mem_mode == MemMode::kAuto) {
    if (const char* env = envOrNull("EPCOMM_MEM_MODE")) {
      c.mem_mode = parseMemMode(env, "EPCOMM_MEM_MODE");
      out.mem_mode_from_env = c.mem_mode != MemMode::kAuto;
    }
  }

  // Deadlines: an explicit value (>= 0, or NaN) wins; kAuto reads the environment. Each value is
  // checked under the name of where it came from.
  if (c.timeout_s < 0) {
    c.timeout_s = timeoutFromEnv("EPCOMM_TIMEOUT_S", kDefaultTimeoutS, &out.timeout_from_env);
  } else {
    checkTimeout(c.timeout_s, "BufferConfig::timeout_s");
  }
  if (c.first_op_timeout_s < 0) {
    const double first = timeoutFromEnv("EPCOMM_FIRST_OP_TIMEOUT_S", kDefaultFirstOpTimeoutS,
                                        &out.first_op_timeout_from_env);
    c.first_op_timeout_s = std::max(first, c.timeout_s);
  } else {
    checkTimeout(c.first_op_timeout_s, "BufferConfig::first_op_timeout_s");
    EPCOMM_ARG_CHECK(c.first_op_timeout_s >= c.timeout_s, "BufferConfig::first_op_timeout_s",
                     c.first_op_timeout_s,
                     ">= the timeout_s of " << c.timeout_s << " s (it only ever lengthens it)");
  }
  out.timeout_ns = toNanoseconds(c.timeout_s);
  out.first_op_timeout_ns = toNanoseconds(c.first_op_timeout_s);
  return out;
}

namespace core {

// Declared in core/topology.hpp; here because this file is the one place the environment is read.
std::optional<std::string> hostIdOverride() {
  const char* env = envOrNull("EPCOMM_HOSTID");
  if (env == nullptr) return std::nullopt;
  const std::string value = env;
  EPCOMM_ARG_CHECK(value.size() <= kMaxNodeKeyBytes, "EPCOMM_HOSTID", "'" << value << "'",
                   "at most " << kMaxNodeKeyBytes << " bytes");
  for (char ch : value) {
    EPCOMM_ARG_CHECK(!std::iscntrl(static_cast<unsigned char>(ch)), "EPCOMM_HOSTID",
                     "'" << value << "'", "printable text (no control characters)");
  }
  return value;
}

}  // namespace core

PerfFlags perfFlagsFromEnv() {
  const char* env = envOrNull("EPCOMM_PERF");
  const std::string text = env != nullptr ? env : "";
  if (text.empty() || text == "default") return PerfFlags{};
  PerfFlags flags{false, false, false, false, false};
  if (text == "none") return flags;
  size_t begin = 0;
  while (begin <= text.size()) {
    size_t end = text.find(',', begin);
    if (end == std::string::npos) end = text.size();
    const std::string name = text.substr(begin, end - begin);
    if (name == "ll_fused_dispatch") {
      flags.ll_fused_dispatch = true;
    } else if (name == "ll_fused_combine") {
      flags.ll_fused_combine = true;
    } else if (name == "ht_counts_once") {
      flags.ht_counts_once = true;
    } else if (name == "ht_fused_layout") {
      flags.ht_fused_layout = true;
    } else if (name == "ht_push_combine") {
      flags.ht_push_combine = true;
    } else if (name == "all") {
      flags.ll_fused_dispatch = true;
      flags.ll_fused_combine = true;
      flags.ht_counts_once = true;
      flags.ht_fused_layout = true;
      flags.ht_push_combine = true;
    } else if (!name.empty()) {
      EPCOMM_ARG_CHECK(false, "EPCOMM_PERF", "'" << text << "'",
                       "default, none, all, or a comma-separated list of ll_fused_dispatch, "
                       "ll_fused_combine, ht_counts_once, ht_fused_layout, ht_push_combine");
    }
    begin = end + 1;
  }
  return flags;
}

bool stageTimesFromEnv() {
  const char* env = envOrNull("EPCOMM_STAGE_TIMES");
  if (env == nullptr) return false;
  const std::string text = env;
  EPCOMM_ARG_CHECK(text == "0" || text == "1", "EPCOMM_STAGE_TIMES", "'" << text << "'",
                   "0 or 1 (per-stage kernel timing, docs/perf-notes.md)");
  return text == "1";
}

}  // namespace epcomm
