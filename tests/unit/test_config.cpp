// SPDX-License-Identifier: Apache-2.0
// resolveConfig: every invalid field is rejected naming the field (or the environment variable
// it came from) and its limit, kAuto values resolve, and the environment overrides
// (EPCOMM_MEM_MODE, EPCOMM_TIMEOUT_S, EPCOMM_FIRST_OP_TIMEOUT_S) apply only where the config
// leaves the choice to the library.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <optional>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "core/buffer_layout.hpp"
#include "core/perf_flags.hpp"
#include "epcomm/buffer.hpp"
#include "epcomm/config.hpp"
#include "epcomm/error.hpp"
#include "kernels/launch.hpp"
#include "kernels/stage_times.hpp"

namespace epcomm {
namespace {

constexpr const char* kEnvNames[] = {"EPCOMM_MEM_MODE", "EPCOMM_TIMEOUT_S",
                                     "EPCOMM_FIRST_OP_TIMEOUT_S"};

// Sets (or unsets) an environment variable for one scope and restores the previous value.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) saved_ = old;
    if (value != nullptr) {
      setenv(name, value, 1);
    } else {
      unsetenv(name);
    }
  }
  ~ScopedEnv() {
    if (saved_) {
      setenv(name_, saved_->c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::optional<std::string> saved_;
};

// Every test starts from an environment without epcomm overrides, whatever the caller exported.
class ConfigTest : public ::testing::Test {
 protected:
  ConfigTest()
      : mem_mode_(kEnvNames[0], nullptr),
        timeout_(kEnvNames[1], nullptr),
        first_op_timeout_(kEnvNames[2], nullptr) {}

 private:
  ScopedEnv mem_mode_;
  ScopedEnv timeout_;
  ScopedEnv first_op_timeout_;
};

// Expects InvalidArgument whose message contains every one of `parts`.
void expectRejected(const BufferConfig& config, int num_ranks,
                    const std::vector<std::string>& parts) {
  try {
    resolveConfig(config, num_ranks);
    ADD_FAILURE() << "accepted a config that should be rejected (expected: " << parts[0] << ")";
  } catch (const InvalidArgument& e) {
    const std::string what = e.what();
    for (const std::string& part : parts) {
      EXPECT_NE(what.find(part), std::string::npos)
          << "message \"" << what << "\" does not mention \"" << part << "\"";
    }
  }
}

std::string str(long long value) {
  return std::to_string(value);
}

BufferConfig with(const std::function<void(BufferConfig&)>& edit) {
  BufferConfig config;
  edit(config);
  return config;
}

TEST_F(ConfigTest, DefaultsResolve) {
  for (int ranks : {1, 2, 4, 8}) {
    const ResolvedConfig resolved = resolveConfig(BufferConfig{}, ranks);
    EXPECT_EQ(resolved.num_ranks, ranks);
    EXPECT_EQ(resolved.config.mem_mode, MemMode::kAuto);
    EXPECT_FALSE(resolved.mem_mode_from_env);
    EXPECT_GT(resolved.config.timeout_s, 0.0);
    EXPECT_EQ(resolved.timeout_ns, static_cast<uint64_t>(resolved.config.timeout_s * 1e9));
    EXPECT_DOUBLE_EQ(resolved.config.timeout_s, kDefaultTimeoutS);
    EXPECT_DOUBLE_EQ(resolved.config.first_op_timeout_s, kDefaultFirstOpTimeoutS);
    EXPECT_EQ(resolved.first_op_timeout_ns, 600000000000ull);
    EXPECT_FALSE(resolved.timeout_from_env);
    EXPECT_FALSE(resolved.first_op_timeout_from_env);
    EXPECT_EQ(resolved.config.hidden, 7168);
    EXPECT_EQ(resolved.config.num_experts, 256);
    EXPECT_EQ(resolved.config.num_sms, kAuto);
  }
}

TEST_F(ConfigTest, LimitsThemselvesAreAccepted) {
  const BufferConfig config = with([](BufferConfig& c) {
    c.hidden = kMaxHidden;
    c.num_experts = kMaxExperts;
    c.max_topk = kMaxTopk;
    c.max_tokens_per_rank = kMaxTokensPerRank;
    c.ll_max_tokens_per_rank = kMaxLlTokensPerRank;
    c.num_sms = 1024;
    c.ll_num_sms = 1;
    c.device = 0;
    c.timeout_s = 24.0 * 3600.0;
  });
  // kMaxExperts (1024) is not a multiple of kMaxRanks (72): each limit at a rank count it divides.
  EXPECT_NO_THROW(resolveConfig(config, 16));
  BufferConfig rack = config;
  rack.num_experts = kMaxExperts / kMaxRanks * kMaxRanks;  // 1008: 14 experts per rank
  EXPECT_NO_THROW(resolveConfig(rack, kMaxRanks));
  EXPECT_NO_THROW(resolveConfig(with([](BufferConfig& c) {
                                  c.hidden = kHiddenAlignment;
                                  c.num_experts = 1;
                                  c.max_topk = 1;
                                  c.max_tokens_per_rank = 0;
                                  c.ll_max_tokens_per_rank = 1;
                                }),
                                1));
}

// Issue 11 item 7: 1024 experts, 72 ranks in one NVLink domain, top-16.
TEST_F(ConfigTest, RackScaleLimits) {
  EXPECT_EQ(kMaxExperts, 1024);
  EXPECT_EQ(kMaxRanks, 72);
  EXPECT_EQ(kMaxTopk, 16);
  for (const auto& [experts, ranks] : std::vector<std::pair<int, int>>{
           {1024, 1}, {1024, 16}, {1024, 64}, {896, 16}, {896, 64}, {576, 72}, {1008, 72}}) {
    const BufferConfig config = with([experts = experts](BufferConfig& c) {
      c.num_experts = experts;
      c.max_topk = 16;
    });
    EXPECT_NO_THROW(resolveConfig(config, ranks)) << experts << " experts, " << ranks << " ranks";
  }
  const BufferConfig too_many_experts = with([](BufferConfig& c) { c.num_experts = 1025; });
  try {
    resolveConfig(too_many_experts, 1);
    ADD_FAILURE() << "1025 experts accepted";
  } catch (const InvalidArgument& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("BufferConfig::num_experts"), std::string::npos) << what;
    EXPECT_NE(what.find("1025"), std::string::npos) << what;
    EXPECT_NE(what.find("1024"), std::string::npos) << what;
  }
  try {
    resolveConfig(with([](BufferConfig& c) { c.num_experts = 73; }), 73);
    ADD_FAILURE() << "73 ranks accepted";
  } catch (const InvalidArgument& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("number of ranks"), std::string::npos) << what;
    EXPECT_NE(what.find("73"), std::string::npos) << what;
    EXPECT_NE(what.find("72"), std::string::npos) << what;
  }
}

// ----- bad input, table-driven: one row per rejected config --------------------------------------

struct BadConfig {
  const char* name;  // the test's name: Config/BadConfigTest.Rejected/<name>
  int num_ranks;
  std::function<void(BufferConfig&)> edit;
  std::vector<std::string> parts;  // every one must appear in the InvalidArgument message
};

std::vector<BadConfig> badConfigs() {
  const std::string ranks_range = "[1, " + str(kMaxRanks) + "]";
  auto keep = [](BufferConfig&) {};
  return {
      {"ranks_0", 0, keep, {"number of ranks", "= 0", ranks_range}},
      {"ranks_too_many",
       kMaxRanks + 1,
       keep,
       {"number of ranks", "= " + str(kMaxRanks + 1), ranks_range}},
      {"ranks_negative", -3, keep, {"number of ranks", "-3"}},
      {"hidden_0",
       2,
       [](BufferConfig& c) { c.hidden = 0; },
       {"BufferConfig::hidden", "= 0", "128"}},
      {"hidden_negative",
       2,
       [](BufferConfig& c) { c.hidden = -128; },
       {"BufferConfig::hidden", "-128"}},
      {"hidden_unaligned",
       2,
       [](BufferConfig& c) { c.hidden = 100; },
       {"BufferConfig::hidden", "100", "multiple of 128"}},
      {"hidden_too_big",
       2,
       [](BufferConfig& c) { c.hidden = kMaxHidden + kHiddenAlignment; },
       {"BufferConfig::hidden", str(kMaxHidden + kHiddenAlignment), str(kMaxHidden)}},
      {"experts_0",
       2,
       [](BufferConfig& c) { c.num_experts = 0; },
       {"BufferConfig::num_experts", "[1, " + str(kMaxExperts) + "]"}},
      {"experts_too_many",
       2,
       [](BufferConfig& c) { c.num_experts = kMaxExperts + 1; },
       {"BufferConfig::num_experts", str(kMaxExperts + 1), str(kMaxExperts)}},
      {"topk_0",
       2,
       [](BufferConfig& c) { c.max_topk = 0; },
       {"BufferConfig::max_topk", "[1, " + str(kMaxTopk) + "]"}},
      {"topk_too_big",
       2,
       [](BufferConfig& c) { c.max_topk = kMaxTopk + 1; },
       {"BufferConfig::max_topk", str(kMaxTopk + 1), str(kMaxTopk)}},
      {"tokens_negative",
       2,
       [](BufferConfig& c) { c.max_tokens_per_rank = -1; },
       {"BufferConfig::max_tokens_per_rank", "-1", str(kMaxTokensPerRank)}},
      {"tokens_too_many",
       2,
       [](BufferConfig& c) { c.max_tokens_per_rank = kMaxTokensPerRank + 1; },
       {"BufferConfig::max_tokens_per_rank", str(kMaxTokensPerRank + 1), str(kMaxTokensPerRank)}},
      {"ll_tokens_negative",
       2,
       [](BufferConfig& c) { c.ll_max_tokens_per_rank = -1; },
       {"BufferConfig::ll_max_tokens_per_rank", "-1", str(kMaxLlTokensPerRank)}},
      {"ll_tokens_too_many",
       2,
       [](BufferConfig& c) { c.ll_max_tokens_per_rank = kMaxLlTokensPerRank + 1; },
       {"BufferConfig::ll_max_tokens_per_rank", str(kMaxLlTokensPerRank + 1),
        str(kMaxLlTokensPerRank)}},
      {"num_sms_0", 2, [](BufferConfig& c) { c.num_sms = 0; }, {"BufferConfig::num_sms", "1024"}},
      {"num_sms_negative",
       2,
       [](BufferConfig& c) { c.num_sms = -2; },
       {"BufferConfig::num_sms", "-2"}},
      {"num_sms_too_many",
       2,
       [](BufferConfig& c) { c.num_sms = 1025; },
       {"BufferConfig::num_sms", "1025", "1024"}},
      {"ll_num_sms_0",
       2,
       [](BufferConfig& c) { c.ll_num_sms = 0; },
       {"BufferConfig::ll_num_sms", "1024"}},
      {"ll_num_sms_too_many",
       2,
       [](BufferConfig& c) { c.ll_num_sms = 4096; },
       {"BufferConfig::ll_num_sms", "4096"}},
      {"device_negative",
       2,
       [](BufferConfig& c) { c.device = -2; },
       {"BufferConfig::device", "-2"}},
      {"timeout_0",
       2,
       [](BufferConfig& c) { c.timeout_s = 0.0; },
       {"BufferConfig::timeout_s", "seconds"}},
      {"timeout_too_long",
       2,
       [](BufferConfig& c) { c.timeout_s = 1e9; },
       {"BufferConfig::timeout_s", "86400"}},
      {"timeout_NaN",
       2,
       [](BufferConfig& c) { c.timeout_s = std::numeric_limits<double>::quiet_NaN(); },
       {"BufferConfig::timeout_s"}},
      {"timeout_infinite",
       2,
       [](BufferConfig& c) { c.timeout_s = std::numeric_limits<double>::infinity(); },
       {"BufferConfig::timeout_s"}},
      {"experts_not_divisible_by_ranks",
       8,
       [](BufferConfig& c) { c.num_experts = 12; },
       {"BufferConfig::num_experts", "12", "divisible", "8"}},
      {"timeout_below_1ns",
       1,
       [](BufferConfig& c) { c.timeout_s = 1e-10; },
       {"BufferConfig::timeout_s", "1e-09"}},
      {"first_op_timeout_below_1ns",
       1,
       [](BufferConfig& c) { c.first_op_timeout_s = 1e-10; },
       {"BufferConfig::first_op_timeout_s", "1e-09"}},
      {"first_op_timeout_shorter_than_timeout",
       2,
       [](BufferConfig& c) {
         c.timeout_s = 60;
         c.first_op_timeout_s = 10;
       },
       {"BufferConfig::first_op_timeout_s", "10", ">= the timeout_s of 60"}},
      {"no_tokens_for_either_mode",
       2,
       [](BufferConfig& c) {
         c.max_tokens_per_rank = 0;
         c.ll_max_tokens_per_rank = 0;
       },
       {"max_tokens_per_rank", "ll_max_tokens_per_rank", "at least one"}},
  };
}

void PrintTo(const BadConfig& c, std::ostream* os) {
  *os << c.name;
}

class BadConfigTest : public ConfigTest, public ::testing::WithParamInterface<BadConfig> {};

TEST_P(BadConfigTest, Rejected) {
  expectRejected(with(GetParam().edit), GetParam().num_ranks, GetParam().parts);
}

INSTANTIATE_TEST_SUITE_P(Config, BadConfigTest, ::testing::ValuesIn(badConfigs()),
                         [](const ::testing::TestParamInfo<BadConfig>& info) {
                           return std::string(info.param.name);
                         });

// A bad environment value is rejected under the variable's name, never as a config field.
struct BadEnv {
  const char* name;
  const char* variable;
  const char* value;
  std::vector<std::string> parts;
};

std::vector<BadEnv> badEnvironments() {
  return {
      {"timeout_word", "EPCOMM_TIMEOUT_S", "abc", {"EPCOMM_TIMEOUT_S", "'abc'", "seconds"}},
      {"timeout_unit", "EPCOMM_TIMEOUT_S", "5s", {"EPCOMM_TIMEOUT_S", "5s"}},
      {"timeout_huge", "EPCOMM_TIMEOUT_S", "1e99", {"EPCOMM_TIMEOUT_S", "86400"}},
      {"timeout_negative", "EPCOMM_TIMEOUT_S", "-1", {"EPCOMM_TIMEOUT_S", "-1"}},
      {"timeout_minus5", "EPCOMM_TIMEOUT_S", "-5", {"EPCOMM_TIMEOUT_S", "-5"}},
      {"timeout_zero", "EPCOMM_TIMEOUT_S", "0", {"EPCOMM_TIMEOUT_S"}},
      {"timeout_below_1ns", "EPCOMM_TIMEOUT_S", "1e-12", {"EPCOMM_TIMEOUT_S", "1e-12"}},
      {"timeout_nan", "EPCOMM_TIMEOUT_S", "nan", {"EPCOMM_TIMEOUT_S", "nan"}},
      {"first_op_negative",
       "EPCOMM_FIRST_OP_TIMEOUT_S",
       "-5",
       {"EPCOMM_FIRST_OP_TIMEOUT_S", "-5", "seconds"}},
      {"mem_mode_unknown",
       "EPCOMM_MEM_MODE",
       "nvshmem",
       {"EPCOMM_MEM_MODE", "'nvshmem'", "posix_fd"}},
  };
}

void PrintTo(const BadEnv& c, std::ostream* os) {
  *os << c.variable << "=" << c.value;
}

class BadEnvTest : public ConfigTest, public ::testing::WithParamInterface<BadEnv> {};

TEST_P(BadEnvTest, RejectedNamingTheVariable) {
  ScopedEnv env(GetParam().variable, GetParam().value);
  expectRejected(BufferConfig{}, 2, GetParam().parts);
  try {
    resolveConfig(BufferConfig{}, 2);
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(std::string(e.what()).find("BufferConfig::"), std::string::npos) << e.what();
  }
}

INSTANTIATE_TEST_SUITE_P(Config, BadEnvTest, ::testing::ValuesIn(badEnvironments()),
                         [](const ::testing::TestParamInfo<BadEnv>& info) {
                           return std::string(info.param.name);
                         });

// ----- accepted values next to the limits
// -----------------------------------------------------------

TEST_F(ConfigTest, ExpertsSplitEvenlyOverRanksAreAccepted) {
  EXPECT_NO_THROW(resolveConfig(with([](BufferConfig& c) { c.num_experts = 12; }), 4));
}

TEST_F(ConfigTest, ExplicitTimeoutIsKept) {
  const ResolvedConfig resolved =
      resolveConfig(with([](BufferConfig& c) { c.timeout_s = 2.5; }), 1);
  EXPECT_DOUBLE_EQ(resolved.config.timeout_s, 2.5);
  EXPECT_EQ(resolved.timeout_ns, 2500000000ull);
}

TEST_F(ConfigTest, TimeoutFromEnvironment) {
  {
    ScopedEnv env("EPCOMM_TIMEOUT_S", "7.5");
    const ResolvedConfig resolved = resolveConfig(BufferConfig{}, 1);
    EXPECT_DOUBLE_EQ(resolved.config.timeout_s, 7.5);
    EXPECT_EQ(resolved.timeout_ns, 7500000000ull);
    // An explicit value wins over the environment.
    EXPECT_DOUBLE_EQ(
        resolveConfig(with([](BufferConfig& c) { c.timeout_s = 3.0; }), 1).config.timeout_s, 3.0);
  }
  {
    ScopedEnv env("EPCOMM_TIMEOUT_S", "");  // empty counts as unset
    EXPECT_DOUBLE_EQ(resolveConfig(BufferConfig{}, 1).config.timeout_s, 30.0);
  }
}

TEST_F(ConfigTest, MemModeFromEnvironment) {
  const std::pair<const char*, MemMode> modes[] = {{"fabric", MemMode::kFabric},
                                                   {"posix_fd", MemMode::kPosixFd},
                                                   {"cuda_ipc", MemMode::kCudaIpc}};
  for (const auto& [name, mode] : modes) {
    SCOPED_TRACE(name);
    ScopedEnv env("EPCOMM_MEM_MODE", name);
    const ResolvedConfig resolved = resolveConfig(BufferConfig{}, 2);
    EXPECT_EQ(resolved.config.mem_mode, mode);
    EXPECT_TRUE(resolved.mem_mode_from_env);
  }
  {
    ScopedEnv env("EPCOMM_MEM_MODE", "auto");
    const ResolvedConfig resolved = resolveConfig(BufferConfig{}, 2);
    EXPECT_EQ(resolved.config.mem_mode, MemMode::kAuto);
    EXPECT_FALSE(resolved.mem_mode_from_env);
  }
  ScopedEnv env("EPCOMM_MEM_MODE", "");
  EXPECT_FALSE(resolveConfig(BufferConfig{}, 2).mem_mode_from_env);
}

TEST_F(ConfigTest, ExplicitMemModeWinsOverEnvironment) {
  ScopedEnv env("EPCOMM_MEM_MODE", "fabric");
  const ResolvedConfig resolved =
      resolveConfig(with([](BufferConfig& c) { c.mem_mode = MemMode::kCudaIpc; }), 2);
  EXPECT_EQ(resolved.config.mem_mode, MemMode::kCudaIpc);
  EXPECT_FALSE(resolved.mem_mode_from_env);
  // Even a bad environment value is never read when the config decides.
  ScopedEnv bad("EPCOMM_MEM_MODE", "garbage");
  EXPECT_NO_THROW(resolveConfig(with([](BufferConfig& c) { c.mem_mode = MemMode::kPosixFd; }), 2));
}

TEST_F(ConfigTest, OneNanosecondIsTheShortestTimeout) {
  // One nanosecond is the shortest deadline, and it never rounds to 0.
  const ResolvedConfig resolved = resolveConfig(with([](BufferConfig& c) {
                                                  c.timeout_s = 1e-9;
                                                  c.first_op_timeout_s = 1e-9;
                                                }),
                                                1);
  EXPECT_EQ(resolved.timeout_ns, 1u);
  EXPECT_EQ(resolved.first_op_timeout_ns, 1u);
}

TEST_F(ConfigTest, FirstOpTimeout) {
  {
    ScopedEnv env("EPCOMM_FIRST_OP_TIMEOUT_S", "120");
    const ResolvedConfig resolved = resolveConfig(BufferConfig{}, 2);
    EXPECT_DOUBLE_EQ(resolved.config.first_op_timeout_s, 120.0);
    EXPECT_EQ(resolved.first_op_timeout_ns, 120000000000ull);
    EXPECT_TRUE(resolved.first_op_timeout_from_env);
    // An explicit value wins over the environment.
    EXPECT_DOUBLE_EQ(resolveConfig(with([](BufferConfig& c) { c.first_op_timeout_s = 45; }), 2)
                         .config.first_op_timeout_s,
                     45.0);
  }
  // The default never shortens a longer timeout_s.
  EXPECT_DOUBLE_EQ(
      resolveConfig(with([](BufferConfig& c) { c.timeout_s = 900; }), 2).config.first_op_timeout_s,
      900.0);
  {
    ScopedEnv env("EPCOMM_TIMEOUT_S", "700");
    EXPECT_DOUBLE_EQ(resolveConfig(BufferConfig{}, 2).config.first_op_timeout_s, 700.0);
  }
}

TEST_F(ConfigTest, BootstrapTimeoutFollowsTheFirstOpDeadline) {
  EXPECT_DOUBLE_EQ(resolveBootstrapTimeout(kAuto), kDefaultFirstOpTimeoutS);
  EXPECT_DOUBLE_EQ(resolveBootstrapTimeout(12.5), 12.5);
  {
    ScopedEnv env("EPCOMM_FIRST_OP_TIMEOUT_S", "90");
    EXPECT_DOUBLE_EQ(resolveBootstrapTimeout(kAuto), 90.0);
    EXPECT_DOUBLE_EQ(resolveBootstrapTimeout(5.0), 5.0);  // explicit wins
  }
  ScopedEnv env("EPCOMM_FIRST_OP_TIMEOUT_S", "soon");
  try {
    resolveBootstrapTimeout(kAuto);
    ADD_FAILURE() << "accepted EPCOMM_FIRST_OP_TIMEOUT_S=soon";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("EPCOMM_FIRST_OP_TIMEOUT_S"), std::string::npos)
        << e.what();
  }
}

TEST_F(ConfigTest, ABufferForOneModeOnlyIsAccepted) {
  EXPECT_NO_THROW(resolveConfig(with([](BufferConfig& c) {
                                  c.max_tokens_per_rank = 0;
                                  c.ll_max_tokens_per_rank = 8;
                                }),
                                2));
}

// BufferConfig::ht_recv_rows: kAuto is the rank-major worst case; a larger value (expert-major
// output) is kept; a smaller one, or one past int32, is rejected naming the field and the bound.
TEST_F(ConfigTest, HtRecvRows) {
  for (int ranks : {1, 2, 8}) {
    EXPECT_EQ(resolveConfig(BufferConfig{}, ranks).config.ht_recv_rows, int64_t{ranks} * 4096);
    EXPECT_EQ(resolveConfig(with([](BufferConfig& c) { c.ht_recv_rows = 100000; }), ranks)
                  .config.ht_recv_rows,
              100000);
  }
  for (int64_t bad : {int64_t{8191}, int64_t{0}, int64_t{1} << 31}) {
    try {
      resolveConfig(with([bad](BufferConfig& c) { c.ht_recv_rows = bad; }), 2);
      ADD_FAILURE() << "ht_recv_rows = " << bad << " accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("BufferConfig::ht_recv_rows"), std::string::npos)
          << e.what();
      EXPECT_NE(std::string(e.what()).find("8192"), std::string::npos) << e.what();
    }
  }
  // Without HT the field is not used.
  EXPECT_NO_THROW(resolveConfig(with([](BufferConfig& c) {
                                  c.max_tokens_per_rank = 0;
                                  c.ll_max_tokens_per_rank = 8;
                                  c.ht_recv_rows = 1;
                                }),
                                2));
}

TEST_F(ConfigTest, MemModeInAnyCase) {
  for (const char* name : {"FABRIC", "Posix_Fd", "CUDA_IPC", "Auto"}) {
    SCOPED_TRACE(name);
    ScopedEnv env("EPCOMM_MEM_MODE", name);
    EXPECT_NO_THROW(resolveConfig(BufferConfig{}, 2));
  }
  ScopedEnv env("EPCOMM_MEM_MODE", "FABRIC");
  EXPECT_EQ(resolveConfig(BufferConfig{}, 2).config.mem_mode, MemMode::kFabric);
  EXPECT_EQ(parseMemMode("Cuda_Ipc"), MemMode::kCudaIpc);
}

TEST(MemModeNames, RoundTrip) {
  for (MemMode mode : {MemMode::kAuto, MemMode::kFabric, MemMode::kPosixFd, MemMode::kCudaIpc}) {
    EXPECT_EQ(parseMemMode(memModeName(mode)), mode) << memModeName(mode);
  }
  EXPECT_STREQ(memModeName(MemMode::kAuto), "auto");
  EXPECT_STREQ(memModeName(MemMode::kFabric), "fabric");
  EXPECT_STREQ(memModeName(MemMode::kPosixFd), "posix_fd");
  EXPECT_STREQ(memModeName(MemMode::kCudaIpc), "cuda_ipc");
}

TEST(MemModeNames, RejectsUnknownNamesNamingTheSource) {
  for (const char* bad : {"", "posix-fd", "ipc", "auto ", "fabric2"}) {
    SCOPED_TRACE(bad);
    try {
      parseMemMode(bad, "--mem-mode");
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const InvalidArgument& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("--mem-mode"), std::string::npos) << what;
      EXPECT_NE(what.find(std::string("'") + bad + "'"), std::string::npos) << what;
      EXPECT_NE(what.find("cuda_ipc"), std::string::npos) << what;
    }
  }
}

// ----- EpBuffer::bytesFor (issue 11 item 5) ---------------------------------------------------

size_t alignTo(size_t v, size_t a) {
  return (v + a - 1) / a * a;
}

void expectBreakdownSums(const BufferSizes& s, const std::string& what) {
  SCOPED_TRACE(what);
  EXPECT_EQ(s.control + s.ht + s.ll + s.scratch + s.padding, s.total);
  EXPECT_EQ(s.ht_recv + s.ht_combine, s.ht);
  EXPECT_EQ(s.ll_dispatch_staging + s.ll_combine_staging + s.ll_outputs + s.ll_bookkeeping, s.ll);
  EXPECT_EQ(s.total % (size_t{2} << 20), 0u);
  EXPECT_LT(s.padding, size_t{2} << 20);
  EXPECT_GT(s.control, 0u);
  EXPECT_EQ(s.control % 4096, 0u);
}

// The push combine's rows land in the owners' combine inputs; what it adds to the HT combine
// regions is one flag per 32-row chunk per rank, whatever EPCOMM_PERF says (the layout is
// agreed at creation, the flag may differ between processes).
TEST_F(ConfigTest, PushCombineAddsOnlyItsChunkFlags) {
  const BufferConfig config = with([](BufferConfig& c) {
    c.hidden = 2048;
    c.num_experts = 64;
    c.max_tokens_per_rank = 500;
  });
  for (int ranks : {1, 2, 8}) {
    const BufferLayout layout = computeBufferLayout(resolveConfig(config, ranks));
    const size_t rows = size_t(ranks) * 500;
    const size_t combine_in = rows * 2048 * 2;
    const size_t weights = rows * 8 * sizeof(float);
    const size_t flags = size_t(ranks) * 16 * sizeof(uint64_t);  // ceil(500 / 32) chunks
    EXPECT_EQ(layout.ht.max_tokens, 500);
    EXPECT_EQ(layout.ht.push_chunks, 16);
    EXPECT_GE(layout.ht.combine_flags, layout.ht.combine_weights + weights);
    EXPECT_EQ(layout.sizes.ht_combine,
              alignTo(combine_in, 4096) + alignTo(weights, 4096) + alignTo(flags, 4096));
    for (const char* perf : {"none", "ht_push_combine"}) {
      ScopedEnv env("EPCOMM_PERF", perf);
      EXPECT_EQ(EpBuffer::bytesFor(config, ranks).ht_combine, layout.sizes.ht_combine) << perf;
    }
  }
}

// A byte range of the buffer layout.
struct LayoutRegion {
  uint64_t offset;
  uint64_t bytes;
};

// Every region inside [start, start + size) and disjoint from every other; `where` names the case.
void expectDisjointWithin(const std::vector<LayoutRegion>& regions, uint64_t start, uint64_t size,
                          const std::string& where) {
  for (size_t i = 0; i < regions.size(); ++i) {
    EXPECT_GE(regions[i].offset, start) << where << ", region " << i;
    EXPECT_LE(regions[i].offset + regions[i].bytes, start + size) << where << ", region " << i;
    for (size_t j = 0; j < i; ++j) {
      const bool apart = regions[i].offset >= regions[j].offset + regions[j].bytes ||
                         regions[j].offset >= regions[i].offset + regions[i].bytes;
      EXPECT_TRUE(apart) << where << ", regions " << j << " and " << i;
    }
  }
}

// The LL dispatch staging: for each parity the rows, their metadata, the row tags and the entry
// tags (one per top-k entry of every slot), each region disjoint from the others and all of them
// within ll_dispatch_staging.
TEST_F(ConfigTest, LlDispatchStagingHoldsRowsMetadataAndTags) {
  const BufferConfig config = with([](BufferConfig& c) {
    c.hidden = 2048;
    c.num_experts = 64;
    c.max_topk = 8;
    c.ll_max_tokens_per_rank = 96;
  });
  for (int ranks : {1, 2, 8}) {
    const BufferLayout layout = computeBufferLayout(resolveConfig(config, ranks));
    const kernels::LlRegions& ll = layout.ll;
    const uint64_t slots = uint64_t(ranks) * 96;
    EXPECT_EQ(ll.entry_tags_per_slot, 8);
    std::vector<LayoutRegion> regions;
    for (int parity = 0; parity < 2; ++parity) {
      regions.push_back({ll.rows[parity], slots * uint64_t(ll.row_bytes)});
      regions.push_back({ll.meta[parity], slots * uint64_t(ll.meta_bytes)});
      regions.push_back({ll.row_tags[parity], slots * sizeof(uint64_t)});
      regions.push_back({ll.entry_tags[parity], slots * 8 * sizeof(uint64_t)});
    }
    expectDisjointWithin(regions, ll.rows[0], layout.sizes.ll_dispatch_staging,
                         str(ranks) + " ranks");
  }
}

// The LL combine staging: for each parity the BF16 partials with their segment tags, the pushed
// weights with their tags, and the partial lines of min(kLlLineTokens, max_tokens) tokens per
// rank (hidden * 4 bytes each, whole segments), disjoint and within ll_combine_staging.
TEST_F(ConfigTest, LlCombineStagingHoldsPartialsLinesAndTags) {
  for (const int max_tokens : {4, 96}) {
    const BufferConfig config = with([&](BufferConfig& c) {
      c.hidden = 2560;  // not a whole number of 1024-column segments
      c.num_experts = 64;
      c.max_topk = 8;
      c.ll_max_tokens_per_rank = max_tokens;
    });
    for (int ranks : {1, 2, 8}) {
      const BufferLayout layout = computeBufferLayout(resolveConfig(config, ranks));
      const kernels::LlRegions& ll = layout.ll;
      const uint64_t slots = uint64_t(ranks) * uint64_t(max_tokens);
      const uint64_t segments = 3;
      EXPECT_EQ(ll.combine_tag_segments, int(segments));
      EXPECT_EQ(ll.line_tokens, std::min(max_tokens, kernels::kLlLineTokens));
      std::vector<LayoutRegion> regions;
      for (int parity = 0; parity < 2; ++parity) {
        regions.push_back({ll.combine_rows[parity], slots * 2560 * 2});
        regions.push_back({ll.combine_tags[parity], slots * segments * sizeof(uint64_t)});
        regions.push_back({ll.combine_weights[parity], slots * 8 * sizeof(float)});
        regions.push_back({ll.weights_tags[parity], slots * sizeof(uint64_t)});
        regions.push_back({ll.combine_lines[parity],
                           uint64_t(ranks) * uint64_t(ll.line_tokens) * segments * 1024 * 4});
      }
      expectDisjointWithin(regions, ll.combine_rows[0], layout.sizes.ll_combine_staging,
                           str(ranks) + " ranks, " + str(max_tokens) + " tokens");
    }
  }
}

TEST_F(ConfigTest, BytesForBreakdownSumsAndScales) {
  const BufferConfig both = with([](BufferConfig& c) {
    c.hidden = 2048;
    c.num_experts = 64;
    c.max_tokens_per_rank = 512;
    c.ll_max_tokens_per_rank = 64;
    c.scratch_bytes = 12345;
  });
  for (int ranks : {1, 2, 4, 8}) {
    const BufferSizes s = EpBuffer::bytesFor(both, ranks);
    expectBreakdownSums(s, "both, " + str(ranks) + " ranks");
    // The HT combine regions: one BF16 row and one float32 top-k weight row (max_topk 8 by
    // default) per (rank, token), and the push combine's flag per (rank, 32 tokens); scratch is
    // the caller's bytes.
    EXPECT_EQ(s.ht_combine, alignTo(size_t(ranks) * 512 * 2048 * 2, 4096) +
                                alignTo(size_t(ranks) * 512 * 8 * 4, 4096) +
                                alignTo(size_t(ranks) * 16 * 8, 4096));
    EXPECT_EQ(s.scratch, alignTo(12345, 4096));
    // The control region does not depend on the shape.
    EXPECT_EQ(s.control, EpBuffer::bytesFor(BufferConfig{}, ranks).control);
    // HT grows linearly with the token capacity, LL staging with the rank count; LL outputs
    // hold num_experts * max_tokens rows whatever the rank count (alignment aside).
    BufferConfig twice = both;
    twice.max_tokens_per_rank *= 2;
    const BufferSizes s2 = EpBuffer::bytesFor(twice, ranks);
    EXPECT_NEAR(double(s2.ht), 2.0 * double(s.ht), 8.0 * 4096);
    EXPECT_EQ(s2.ll, s.ll);
    const BufferSizes one = EpBuffer::bytesFor(both, 1);
    EXPECT_NEAR(double(s.ll_dispatch_staging), ranks * double(one.ll_dispatch_staging),
                4.0 * 4096 * ranks);
    EXPECT_NEAR(double(s.ll_outputs), double(one.ll_outputs), 4.0 * 4096);
    EXPECT_GE(s.ll_outputs, size_t(64) * 64 * 2048 * 2);  // the expert-major BF16 rows
  }
  BufferConfig ht_only = both;
  ht_only.ll_max_tokens_per_rank = 0;
  const BufferSizes h = EpBuffer::bytesFor(ht_only, 4);
  expectBreakdownSums(h, "HT only");
  EXPECT_EQ(h.ll, 0u);
  EXPECT_EQ(h.ht, EpBuffer::bytesFor(both, 4).ht);
  BufferConfig ll_only = both;
  ll_only.max_tokens_per_rank = 0;
  const BufferSizes l = EpBuffer::bytesFor(ll_only, 4);
  expectBreakdownSums(l, "LL only");
  EXPECT_EQ(l.ht, 0u);
  EXPECT_EQ(l.ll, EpBuffer::bytesFor(both, 4).ll);
  EXPECT_LT(l.total, EpBuffer::bytesFor(both, 4).total);
}

// The LL routing kept for combine: slot of every staged row, the top-k copy and the token masks,
// which take one 32-bit word per 32 ranks per token (a single word would drop ranks 32..71).
TEST_F(ConfigTest, BytesForLlBookkeepingHoldsEveryRankMaskWord) {
  for (int ranks : {1, 8, 32, 33, 64, 65, 72}) {
    const BufferConfig config = with([ranks](BufferConfig& c) {
      c.hidden = 1024;
      c.num_experts = ranks * 8;
      c.max_topk = 8;
      c.max_tokens_per_rank = 0;
      c.ll_max_tokens_per_rank = 1024;
    });
    const size_t words = (size_t(ranks) + 31) / 32;
    const BufferSizes s = EpBuffer::bytesFor(config, ranks);
    expectBreakdownSums(s, str(ranks) + " ranks");
    EXPECT_EQ(s.ll_bookkeeping, alignTo(size_t(ranks) * 1024 * 8 * 4, 4096) +  // slot_of_row
                                    alignTo(1024 * 8 * 4, 4096) +              // topk_copy
                                    alignTo(1024 * 4 * words, 4096))           // token masks
        << ranks << " ranks";
  }
}

TEST_F(ConfigTest, BytesForRejectsWhatTheConstructorRejects) {
  EXPECT_THROW(EpBuffer::bytesFor(with([](BufferConfig& c) { c.hidden = 100; }), 2),
               InvalidArgument);
  EXPECT_THROW(EpBuffer::bytesFor(BufferConfig{}, 3), InvalidArgument);  // 256 experts, 3 ranks
  EXPECT_THROW(EpBuffer::bytesFor(BufferConfig{}, 0), InvalidArgument);
}

// EPCOMM_PERF (core/perf_flags.hpp): unset/""/"default" give the measured defaults (the LL fast
// paths and the push combine on, ht_counts_once and ht_fused_layout off), "none" turns every
// fast path off, a list names exactly the ones on; a typo is an error.
TEST(PerfFlags, DefaultsNoneAndNames) {
  for (const char* value : {static_cast<const char*>(nullptr), "", "default"}) {
    ScopedEnv env("EPCOMM_PERF", value);
    const PerfFlags f = perfFlagsFromEnv();
    EXPECT_TRUE(f.ll_fused_dispatch && f.ll_fused_combine) << (value != nullptr ? value : "unset");
    EXPECT_FALSE(f.ht_counts_once);
    EXPECT_FALSE(f.ht_fused_layout);
    EXPECT_TRUE(f.ht_push_combine);
  }
  {
    ScopedEnv env("EPCOMM_PERF", "ht_push_combine");
    const PerfFlags f = perfFlagsFromEnv();
    EXPECT_TRUE(f.ht_push_combine);
    EXPECT_FALSE(f.ll_fused_dispatch || f.ll_fused_combine || f.ht_counts_once ||
                 f.ht_fused_layout);
  }
  {
    ScopedEnv env("EPCOMM_PERF", "ht_fused_layout");
    const PerfFlags f = perfFlagsFromEnv();
    EXPECT_TRUE(f.ht_fused_layout);
    EXPECT_FALSE(f.ll_fused_dispatch || f.ll_fused_combine || f.ht_counts_once);
  }
  {
    ScopedEnv env("EPCOMM_PERF", "none");
    const PerfFlags f = perfFlagsFromEnv();
    EXPECT_FALSE(f.ll_fused_dispatch || f.ll_fused_combine || f.ht_counts_once ||
                 f.ht_fused_layout || f.ht_push_combine);
  }
  {
    ScopedEnv env("EPCOMM_PERF", "ll_fused_dispatch");
    const PerfFlags f = perfFlagsFromEnv();
    EXPECT_TRUE(f.ll_fused_dispatch);
    EXPECT_FALSE(f.ll_fused_combine);
  }
  {
    ScopedEnv env("EPCOMM_PERF", "ht_counts_once");
    const PerfFlags f = perfFlagsFromEnv();
    EXPECT_TRUE(f.ht_counts_once);
    EXPECT_FALSE(f.ll_fused_dispatch || f.ll_fused_combine);
  }
  {
    ScopedEnv env("EPCOMM_PERF", "ll_fused_combine,,ll_fused_dispatch");
    const PerfFlags f = perfFlagsFromEnv();
    EXPECT_TRUE(f.ll_fused_dispatch);
    EXPECT_TRUE(f.ll_fused_combine);
    EXPECT_FALSE(f.ht_counts_once);
  }
  {
    ScopedEnv env("EPCOMM_PERF", "all");
    const PerfFlags f = perfFlagsFromEnv();
    EXPECT_TRUE(f.ll_fused_dispatch && f.ll_fused_combine && f.ht_counts_once &&
                f.ht_fused_layout && f.ht_push_combine);
  }
  for (const char* bad : {"ll_fused", "LL_FUSED_DISPATCH", "all,x", " ll_fused_dispatch",
                          "ll_parallel_posts", "none,all", "default,ht_counts_once"}) {
    ScopedEnv env("EPCOMM_PERF", bad);
    try {
      (void)perfFlagsFromEnv();
      ADD_FAILURE() << "EPCOMM_PERF='" << bad << "' was accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("EPCOMM_PERF"), std::string::npos) << e.what();
    }
  }
}

// EPCOMM_STAGE_TIMES (core/perf_flags.hpp): unset, "" and "0" are off, "1" on; anything else is
// an error naming the variable, so a typo never runs without the stamps by accident.
TEST(StageTimes, OffByDefaultOnWithOneTypoRejected) {
  for (const char* value : {static_cast<const char*>(nullptr), "", "0"}) {
    ScopedEnv env("EPCOMM_STAGE_TIMES", value);
    EXPECT_FALSE(stageTimesFromEnv()) << (value != nullptr ? value : "unset");
  }
  {
    ScopedEnv env("EPCOMM_STAGE_TIMES", "1");
    EXPECT_TRUE(stageTimesFromEnv());
  }
  for (const char* bad : {"2", "on", "yes", "true", " 1", "1 ", "01"}) {
    ScopedEnv env("EPCOMM_STAGE_TIMES", bad);
    try {
      (void)stageTimesFromEnv();
      ADD_FAILURE() << "EPCOMM_STAGE_TIMES='" << bad << "' was accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("EPCOMM_STAGE_TIMES"), std::string::npos) << e.what();
    }
  }
}

// The stage tables the kernels and ep_bench share (kernels/stage_times.hpp): every kernel has its
// name and one name per stage, and the slots of different kernels never overlap.
TEST(StageTimes, EveryStageNamedAndSlotsDisjoint) {
  std::vector<int> seen(kernels::kStageSlots, 0);
  for (int k = 0; k < kernels::kNumStageKernels; ++k) {
    const kernels::StageKernelInfo& info = kernels::kStageKernelInfo[k];
    ASSERT_NE(info.name, nullptr);
    EXPECT_GE(info.num_stages, 3) << info.name;
    EXPECT_LE(info.num_stages, kernels::kMaxStages) << info.name;
    EXPECT_STREQ(info.stages[kernels::kStageStart], "start") << info.name;
    for (int s = 0; s < info.num_stages; ++s) {
      ASSERT_NE(info.stages[s], nullptr) << info.name << " stage " << s;
      EXPECT_GT(std::string(info.stages[s]).size(), 0u) << info.name << " stage " << s;
      ++seen[kernels::stageSlot(static_cast<kernels::StageKernel>(k), s)];
    }
  }
  for (int slot = 0; slot < kernels::kStageSlots; ++slot) EXPECT_LE(seen[slot], 1) << slot;
}

// The LL ops' default grid (ll_num_sms = kAuto): a block per two (token, top-k entry) items of
// every source, at least kLlMinBlocks; the engine then caps it at the device's SMs.
TEST(LlDefaultGrid, SizedToTheBatch) {
  static_assert(kernels::kLlItemsPerBlock == 2 && kernels::kLlMinBlocks == 32, "the cases below");
  EXPECT_EQ(kernels::llBlocksForBatch(0, 8, 1), 32);
  EXPECT_EQ(kernels::llBlocksForBatch(1, 8, 1), 32);
  EXPECT_EQ(kernels::llBlocksForBatch(1, 8, 8), 32);   // 4 per source
  EXPECT_EQ(kernels::llBlocksForBatch(8, 8, 1), 32);   // 64 items
  EXPECT_EQ(kernels::llBlocksForBatch(8, 8, 2), 64);   // 32 per source
  EXPECT_EQ(kernels::llBlocksForBatch(9, 7, 4), 128);  // 63 items: 32 blocks per source
  EXPECT_EQ(kernels::llBlocksForBatch(128, 8, 1), 512);
  // The largest LL batch at the largest rank count does not overflow.
  EXPECT_GT(kernels::llBlocksForBatch(1 << 20, kMaxTopk, kMaxRanks), 0);
}

}  // namespace
}  // namespace epcomm
