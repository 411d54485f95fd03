// SPDX-License-Identifier: Apache-2.0
// epcomm's log: where its warnings and diagnostics go, and how much of them.
//
// Levels, each including the ones before it:
//   kWarn   something went wrong but the library carries on (a failed cleanup step, a peer that
//           could not be told about an error). The default.
//   kInfo   one-time setup facts: the memory mode chosen and why the others were not, symmetric
//           bytes per rank, the peer map (device, process and address of every peer's buffer).
//   kTrace  everything above plus per-step detail of buffer creation and teardown.
// kOff silences the library completely.
//
// Environment (read once, at the first log line, unless setLogLevel/setLogFile ran before):
//   EPCOMM_DEBUG=OFF|WARN|INFO|TRACE (case-insensitive)   the level
//   EPCOMM_DEBUG_FILE=<path>   write lines there instead of stderr; "%h" becomes the host name
//                              and "%p" the process id, so ranks can write separate files.
//
// Every line looks like "[epcomm rank 3] INFO: <message>" ("rank" is absent until a bootstrap
// knows it). A callback installed with setLogCallback receives each line (without the trailing
// newline) instead of the file/stderr sink, so a framework can route epcomm's lines into its own
// logger. All functions are thread-safe; callbacks are called with an internal lock held and must
// not call back into epcomm's logging.
#pragma once

#include <functional>
#include <string>

#include "epcomm/export.hpp"

namespace epcomm {

enum class LogLevel {
  kOff = 0,
  kWarn = 1,
  kInfo = 2,
  kTrace = 3,
};

// "OFF", "WARN", "INFO", "TRACE".
EPCOMM_API const char* logLevelName(LogLevel level);

// Parses a level name as EPCOMM_DEBUG accepts it: OFF, WARN (or WARNING), INFO, TRACE, any case,
// surrounding spaces ignored. Returns false (and leaves *level alone) for anything else.
EPCOMM_API bool parseLogLevel(const std::string& text, LogLevel* level);

// Sets the level, overriding EPCOMM_DEBUG.
EPCOMM_API void setLogLevel(LogLevel level);
// The level in force (reads EPCOMM_DEBUG on first use).
EPCOMM_API LogLevel logLevel();

// Sends lines to `path` (appended; "%h"/"%p" expanded), overriding EPCOMM_DEBUG_FILE. An empty
// path means stderr. Throws epcomm::SystemError if the file cannot be opened.
EPCOMM_API void setLogFile(const std::string& path);

// Receives every line at or below the current level instead of the file/stderr sink.
using LogCallback = std::function<void(LogLevel level, const std::string& line)>;
EPCOMM_API void setLogCallback(LogCallback callback);
// The same for C-style callers: `fn(level, line, user_data)`, `line` valid during the call only.
using LogFunction = void (*)(LogLevel level, const char* line, void* user_data);
EPCOMM_API void setLogCallback(LogFunction fn, void* user_data);
// Back to the file/stderr sink.
EPCOMM_API void clearLogCallback();

}  // namespace epcomm
