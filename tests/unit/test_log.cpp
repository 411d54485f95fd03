// SPDX-License-Identifier: Apache-2.0
// The logger: level parsing, the EPCOMM_DEBUG / EPCOMM_DEBUG_FILE sinks, callbacks, and that
// detail::logWarning (EPCOMM_CUDA_LOG and friends) goes through it.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "check.hpp"
#include "epcomm/error.hpp"
#include "epcomm/log.hpp"

namespace epcomm {
namespace {

// Restores the process-wide logger after each test, so tests do not leak state into each other.
class LogTest : public ::testing::Test {
 protected:
  void SetUp() override { saved_level_ = logLevel(); }
  void TearDown() override {
    clearLogCallback();
    setLogFile("");
    setLogLevel(saved_level_);
  }

 private:
  LogLevel saved_level_ = LogLevel::kWarn;
};

std::string tempPath(const char* tag) {
  return ::testing::TempDir() + "epcomm_log_" + tag + "_" + std::to_string(getpid()) + ".txt";
}

std::string readFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST(LogLevelParse, AcceptsEveryNameInAnyCase) {
  LogLevel level = LogLevel::kOff;
  EXPECT_TRUE(parseLogLevel("WARN", &level));
  EXPECT_EQ(level, LogLevel::kWarn);
  EXPECT_TRUE(parseLogLevel("warning", &level));
  EXPECT_EQ(level, LogLevel::kWarn);
  EXPECT_TRUE(parseLogLevel("Info", &level));
  EXPECT_EQ(level, LogLevel::kInfo);
  EXPECT_TRUE(parseLogLevel(" trace ", &level));
  EXPECT_EQ(level, LogLevel::kTrace);
  EXPECT_TRUE(parseLogLevel("off", &level));
  EXPECT_EQ(level, LogLevel::kOff);
  EXPECT_TRUE(parseLogLevel("NONE", &level));
  EXPECT_EQ(level, LogLevel::kOff);
}

TEST(LogLevelParse, RejectsOtherTextAndLeavesTheLevelAlone) {
  LogLevel level = LogLevel::kInfo;
  for (const char* bad : {"", "  ", "DEBUG", "2", "INFOO", "warn!"}) {
    EXPECT_FALSE(parseLogLevel(bad, &level)) << bad;
    EXPECT_EQ(level, LogLevel::kInfo) << bad;
  }
}

TEST(LogLevelParse, NamesRoundTrip) {
  for (LogLevel l : {LogLevel::kOff, LogLevel::kWarn, LogLevel::kInfo, LogLevel::kTrace}) {
    LogLevel parsed = LogLevel::kOff;
    ASSERT_TRUE(parseLogLevel(logLevelName(l), &parsed)) << logLevelName(l);
    EXPECT_EQ(parsed, l);
  }
}

TEST_F(LogTest, CallbackReceivesLinesAtOrBelowTheLevel) {
  std::vector<std::pair<LogLevel, std::string>> lines;
  setLogCallback([&](LogLevel level, const std::string& line) { lines.emplace_back(level, line); });
  setLogLevel(LogLevel::kInfo);
  EPCOMM_LOG_INFO("memory mode "
                  << "posix_fd"
                  << " selected");
  EPCOMM_LOG_TRACE("not shown at INFO");
  detail::logWarning("a warning", __FILE__, __LINE__);
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[0].first, LogLevel::kInfo);
  EXPECT_NE(lines[0].second.find("INFO: memory mode posix_fd selected"), std::string::npos)
      << lines[0].second;
  EXPECT_EQ(lines[0].second.rfind("[epcomm", 0), 0u) << lines[0].second;
  EXPECT_EQ(lines[1].first, LogLevel::kWarn);
  EXPECT_NE(lines[1].second.find("warning: a warning (unit/test_log.cpp:"), std::string::npos)
      << lines[1].second;
  EXPECT_EQ(lines[1].second.find('\n'), std::string::npos);

  lines.clear();
  setLogLevel(LogLevel::kTrace);
  EPCOMM_LOG_TRACE("trace " << 42);
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_NE(lines[0].second.find("TRACE: trace 42"), std::string::npos);

  lines.clear();
  setLogLevel(LogLevel::kOff);
  detail::logWarning("silenced", __FILE__, __LINE__);
  EPCOMM_LOG_INFO("silenced");
  EXPECT_TRUE(lines.empty());
}

TEST_F(LogTest, MessageIsNotBuiltWhenTheLevelIsOff) {
  setLogLevel(LogLevel::kWarn);
  int evaluated = 0;
  auto count = [&] { return ++evaluated; };
  EPCOMM_LOG_INFO("value " << count());
  EXPECT_EQ(evaluated, 0);
  setLogLevel(LogLevel::kInfo);
  setLogCallback([](LogLevel, const std::string&) {});
  EPCOMM_LOG_INFO("value " << count());
  EXPECT_EQ(evaluated, 1);
}

TEST_F(LogTest, PlainFunctionCallbackGetsUserData) {
  struct Sink {
    int calls = 0;
    std::string last;
  } sink;
  setLogLevel(LogLevel::kInfo);
  setLogCallback(
      [](LogLevel level, const char* line, void* user) {
        auto* s = static_cast<Sink*>(user);
        ++s->calls;
        s->last = line;
        (void)level;
      },
      &sink);
  EPCOMM_LOG_INFO("hello " << 7);
  EXPECT_EQ(sink.calls, 1);
  EXPECT_NE(sink.last.find("INFO: hello 7"), std::string::npos) << sink.last;
  setLogCallback(static_cast<LogFunction>(nullptr), nullptr);  // clears
  ::testing::internal::CaptureStderr();
  EPCOMM_LOG_INFO("to stderr");
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(sink.calls, 1);
  EXPECT_NE(err.find("INFO: to stderr"), std::string::npos) << err;
}

TEST_F(LogTest, ThrowingCallbackDoesNotEscape) {
  setLogCallback([](LogLevel, const std::string&) { throw std::runtime_error("boom"); });
  EXPECT_NO_THROW(detail::logWarning("still fine", __FILE__, __LINE__));
}

TEST_F(LogTest, FileSinkAppendsLinesAndExpandsThePid) {
  const std::string pattern = ::testing::TempDir() + "epcomm_log_file_%p.txt";
  const std::string path =
      ::testing::TempDir() + "epcomm_log_file_" + std::to_string(getpid()) + ".txt";
  std::remove(path.c_str());
  setLogLevel(LogLevel::kInfo);
  setLogFile(pattern);
  EPCOMM_LOG_INFO("first line");
  detail::logWarning("second line", __FILE__, __LINE__);
  setLogFile("");  // closes the file
  const std::string text = readFile(path);
  EXPECT_NE(text.find("INFO: first line\n"), std::string::npos) << text;
  EXPECT_NE(text.find("warning: second line ("), std::string::npos) << text;
  std::remove(path.c_str());
}

TEST_F(LogTest, UnopenableFileThrowsSystemError) {
  EXPECT_THROW(setLogFile("/nonexistent-epcomm-dir/x/log.txt"), SystemError);
}

TEST_F(LogTest, CudaLogWarningGoesThroughTheLogger) {
  std::vector<std::string> lines;
  setLogCallback([&](LogLevel, const std::string& line) { lines.push_back(line); });
  setLogLevel(LogLevel::kWarn);
  EPCOMM_CUDA_LOG(cudaSetDevice(-1));
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_NE(lines[0].find("warning: cudaSetDevice(-1) failed"), std::string::npos) << lines[0];
}

// EPCOMM_DEBUG and EPCOMM_DEBUG_FILE are read once per process; the test resets that.
class LogEnvironment : public LogTest {
 protected:
  void TearDown() override {
    unsetenv("EPCOMM_DEBUG");
    unsetenv("EPCOMM_DEBUG_FILE");
    detail::resetLogStateForTesting();
    LogTest::TearDown();
  }
};

TEST_F(LogEnvironment, DebugAndDebugFileAreHonoured) {
  const std::string path = tempPath("env");
  std::remove(path.c_str());
  setenv("EPCOMM_DEBUG", "trace", 1);
  setenv("EPCOMM_DEBUG_FILE", path.c_str(), 1);
  detail::resetLogStateForTesting();
  EXPECT_EQ(logLevel(), LogLevel::kTrace);
  EPCOMM_LOG_TRACE("from the environment");
  setLogFile("");  // closes the file
  const std::string text = readFile(path);
  EXPECT_NE(text.find("TRACE: from the environment"), std::string::npos) << text;
  std::remove(path.c_str());
}

TEST_F(LogEnvironment, BadLevelWarnsAndKeepsWarn) {
  setenv("EPCOMM_DEBUG", "verbose", 1);
  detail::resetLogStateForTesting();
  ::testing::internal::CaptureStderr();
  const LogLevel level = logLevel();
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(level, LogLevel::kWarn);
  EXPECT_NE(err.find("EPCOMM_DEBUG='verbose'"), std::string::npos) << err;
}

TEST_F(LogEnvironment, SetLogLevelWinsOverTheEnvironment) {
  setenv("EPCOMM_DEBUG", "TRACE", 1);
  detail::resetLogStateForTesting();
  setLogLevel(LogLevel::kOff);
  EXPECT_EQ(logLevel(), LogLevel::kOff);
}

}  // namespace
}  // namespace epcomm
