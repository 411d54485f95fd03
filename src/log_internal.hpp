// SPDX-License-Identifier: Apache-2.0
// Internal logging macros (the public side is include/epcomm/log.hpp). The message is a stream
// expression, built only when the level is enabled:
//   EPCOMM_LOG_INFO("memory mode " << name << " selected");
#pragma once

#include <sstream>
#include <string>

#include "epcomm/export.hpp"
#include "epcomm/log.hpp"

namespace epcomm::detail {

// True when lines of `level` are written (reads EPCOMM_DEBUG on first use).
EPCOMM_API bool logEnabled(LogLevel level);
// Writes "[epcomm rank R] <level tag><message>[ (<dir/file>:<line>)]" to the callback, the
// EPCOMM_DEBUG_FILE file or stderr. Never throws on a sink failure.
EPCOMM_API void logMessage(LogLevel level, const std::string& message, const char* file = nullptr,
                           int line = 0);
// Forgets setLogLevel/setLogFile and the environment read, so the next log call reads
// EPCOMM_DEBUG and EPCOMM_DEBUG_FILE again (unit tests only; the callback stays).
void resetLogStateForTesting();

}  // namespace epcomm::detail

#define EPCOMM_LOG_AT(level, msg)                                  \
  do {                                                             \
    if (::epcomm::detail::logEnabled(level)) {                     \
      std::ostringstream epcomm_log_os_;                           \
      epcomm_log_os_ << msg;                                       \
      ::epcomm::detail::logMessage((level), epcomm_log_os_.str()); \
    }                                                              \
  } while (0)

#define EPCOMM_LOG_INFO(msg) EPCOMM_LOG_AT(::epcomm::LogLevel::kInfo, msg)
#define EPCOMM_LOG_TRACE(msg) EPCOMM_LOG_AT(::epcomm::LogLevel::kTrace, msg)
