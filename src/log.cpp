// SPDX-License-Identifier: Apache-2.0
// The logger behind epcomm/log.hpp and the internal EPCOMM_LOG_* macros (log_internal.hpp).
// One process-wide state behind one mutex; the level is also kept in an atomic so a disabled
// level costs one relaxed load and no lock.
#include "epcomm/log.hpp"

#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "check.hpp"

namespace epcomm {

namespace {

struct LogState {
  std::mutex mutex;
  bool env_read = false;   // EPCOMM_DEBUG / EPCOMM_DEBUG_FILE consulted (or overridden)
  bool level_set = false;  // setLogLevel ran: EPCOMM_DEBUG is ignored
  bool file_set = false;   // setLogFile ran: EPCOMM_DEBUG_FILE is ignored
  FILE* file = nullptr;    // nullptr: stderr
  LogCallback callback;
};

LogState& state() {
  static LogState* s = new LogState();  // never destroyed: logging works during static teardown
  return *s;
}

// kWarn until EPCOMM_DEBUG has been read; -1 = not read yet.
std::atomic<int> g_level{-1};

const char* envOrNull(const char* name) {
  const char* value = std::getenv(name);
  return (value != nullptr && value[0] != '\0') ? value : nullptr;
}

std::string expandPath(const std::string& pattern) {
  std::string out;
  for (size_t i = 0; i < pattern.size(); ++i) {
    if (pattern[i] == '%' && i + 1 < pattern.size()) {
      const char next = pattern[i + 1];
      if (next == 'h') {
        char host[HOST_NAME_MAX + 1] = {};
        if (gethostname(host, sizeof(host) - 1) != 0) std::snprintf(host, sizeof(host), "host");
        out += host;
        ++i;
        continue;
      }
      if (next == 'p') {
        out += std::to_string(static_cast<long>(getpid()));
        ++i;
        continue;
      }
      if (next == '%') {
        out += '%';
        ++i;
        continue;
      }
    }
    out += pattern[i];
  }
  return out;
}

// Opens `pattern` for appending; on failure returns nullptr and the errno in *err.
FILE* openLogFile(const std::string& pattern, std::string* path, int* err) {
  *path = expandPath(pattern);
  FILE* f = std::fopen(path->c_str(), "a");
  if (f == nullptr) {
    *err = errno;
    return nullptr;
  }
  std::setvbuf(f, nullptr, _IOLBF, 0);  // whole lines reach the file even if the process dies
  return f;
}

void closeFile(LogState& s) {
  if (s.file != nullptr) std::fclose(s.file);
  s.file = nullptr;
}

// Reads the environment once. Called with the mutex held.
void readEnvLocked(LogState& s) {
  if (s.env_read) return;
  s.env_read = true;
  std::string problem;
  if (!s.level_set) {
    LogLevel level = LogLevel::kWarn;
    if (const char* env = envOrNull("EPCOMM_DEBUG")) {
      if (!parseLogLevel(env, &level)) {
        problem = std::string("EPCOMM_DEBUG='") + env +
                  "' is not one of OFF, WARN, INFO, TRACE; using WARN";
        level = LogLevel::kWarn;
      }
    }
    g_level.store(static_cast<int>(level), std::memory_order_relaxed);
  }
  if (!s.file_set) {
    if (const char* env = envOrNull("EPCOMM_DEBUG_FILE")) {
      std::string path;
      int err = 0;
      s.file = openLogFile(env, &path, &err);
      if (s.file == nullptr) {
        if (!problem.empty()) problem += "; ";
        problem += "cannot open EPCOMM_DEBUG_FILE '" + path + "': " + std::strerror(err) +
                   "; logging to stderr";
      }
    }
  }
  if (!problem.empty()) {
    std::fprintf(stderr, "[epcomm] warning: %s\n", problem.c_str());
  }
}

const char* levelTag(LogLevel level) {
  switch (level) {
    case LogLevel::kWarn:
      return "warning: ";
    case LogLevel::kInfo:
      return "INFO: ";
    case LogLevel::kTrace:
      return "TRACE: ";
    case LogLevel::kOff:
      break;
  }
  return "";
}

}  // namespace

const char* logLevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kOff:
      return "OFF";
    case LogLevel::kWarn:
      return "WARN";
    case LogLevel::kInfo:
      return "INFO";
    case LogLevel::kTrace:
      return "TRACE";
  }
  return "UNKNOWN";
}

bool parseLogLevel(const std::string& text, LogLevel* level) {
  size_t begin = 0;
  size_t end = text.size();
  while (begin < end && std::isspace(static_cast<unsigned char>(text[begin]))) ++begin;
  while (end > begin && std::isspace(static_cast<unsigned char>(text[end - 1]))) --end;
  std::string upper;
  for (size_t i = begin; i < end; ++i) {
    upper += static_cast<char>(std::toupper(static_cast<unsigned char>(text[i])));
  }
  LogLevel parsed;
  if (upper == "OFF" || upper == "NONE") {
    parsed = LogLevel::kOff;
  } else if (upper == "WARN" || upper == "WARNING") {
    parsed = LogLevel::kWarn;
  } else if (upper == "INFO") {
    parsed = LogLevel::kInfo;
  } else if (upper == "TRACE") {
    parsed = LogLevel::kTrace;
  } else {
    return false;
  }
  if (level != nullptr) *level = parsed;
  return true;
}

void setLogLevel(LogLevel level) {
  LogState& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.level_set = true;
  g_level.store(static_cast<int>(level), std::memory_order_relaxed);
}

LogLevel logLevel() {
  int level = g_level.load(std::memory_order_relaxed);
  if (level < 0) {
    LogState& s = state();
    std::lock_guard<std::mutex> lock(s.mutex);
    readEnvLocked(s);
    level = g_level.load(std::memory_order_relaxed);
  }
  return static_cast<LogLevel>(level);
}

void setLogFile(const std::string& path) {
  LogState& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  FILE* file = nullptr;
  if (!path.empty()) {
    std::string expanded;
    int err = 0;
    file = openLogFile(path, &expanded, &err);
    if (file == nullptr) {
      throw SystemError(err, detail::formatMessage(
                                 "cannot open log file '" + expanded + "': " + std::strerror(err),
                                 __FILE__, __LINE__));
    }
  }
  closeFile(s);
  s.file = file;
  s.file_set = true;
}

void setLogCallback(LogCallback callback) {
  LogState& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.callback = std::move(callback);
}

void setLogCallback(LogFunction fn, void* user_data) {
  if (fn == nullptr) {
    clearLogCallback();
    return;
  }
  setLogCallback([fn, user_data](LogLevel level, const std::string& line) {
    fn(level, line.c_str(), user_data);
  });
}

void clearLogCallback() {
  setLogCallback(LogCallback());
}

namespace detail {

bool logEnabled(LogLevel level) {
  return level != LogLevel::kOff && static_cast<int>(level) <= static_cast<int>(logLevel());
}

void logMessage(LogLevel level, const std::string& message, const char* file, int line_number) {
  if (!logEnabled(level)) return;
  std::string line = "[epcomm";
  const int rank = processRank();
  if (rank >= 0) line += " rank " + std::to_string(rank);
  line += "] ";
  line += levelTag(level);
  line += message;
  if (file != nullptr) {
    // Keep the last folder so "src/buffer.cpp" and "kernels/intranode.cu" stay distinguishable.
    std::string where = file;
    const size_t last = where.rfind('/');
    if (last != std::string::npos && last > 0) {
      const size_t prev = where.rfind('/', last - 1);
      if (prev != std::string::npos) where = where.substr(prev + 1);
    }
    line += " (" + where + ":" + std::to_string(line_number) + ")";
  }
  LogState& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  readEnvLocked(s);
  if (s.callback) {
    try {
      s.callback(level, line);
    } catch (...) {
      // A throwing callback must not turn a log line into a failure (destructors log).
    }
    return;
  }
  FILE* out = s.file != nullptr ? s.file : stderr;
  std::fprintf(out, "%s\n", line.c_str());
  std::fflush(out);
}

void resetLogStateForTesting() {
  LogState& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  closeFile(s);
  s.env_read = false;
  s.level_set = false;
  s.file_set = false;
  g_level.store(-1, std::memory_order_relaxed);
}

}  // namespace detail
}  // namespace epcomm
