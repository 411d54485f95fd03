// SPDX-License-Identifier: Apache-2.0
// How one rank's call ended: the one helper multi-rank tests use to ask "did it throw, with which
// code and message, and how long did it take".
#pragma once

#include <chrono>
#include <string>

#include "epcomm/error.hpp"

namespace epcomm::test {

struct CallOutcome {
  bool threw = false;
  ErrorCode code = ErrorCode::kInternal;
  std::string what;
  double seconds = 0;
};

// Runs `call`, catching epcomm::Error (anything else propagates and fails the test).
template <typename Call>
CallOutcome runTimed(Call&& call) {
  CallOutcome o;
  const auto start = std::chrono::steady_clock::now();
  try {
    call();
  } catch (const Error& e) {
    o.threw = true;
    o.code = e.code();
    o.what = e.what();
  }
  o.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return o;
}

}  // namespace epcomm::test
