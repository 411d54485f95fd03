// SPDX-License-Identifier: Apache-2.0
// Argument checks of the op front-ends, before any launch: the first failed check becomes the
// message with which the call is rejected on every rank (BufferCore::rejectInput). Internal.
#pragma once

#include <cstdint>
#include <sstream>
#include <string>

namespace epcomm {

inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

inline std::string pointerText(const void* p) {
  std::ostringstream os;
  os << p;
  return os.str();
}

// Collects the first failed check; the caller rejects the input with it.
class ArgChecker {
 public:
  template <typename V, typename L>
  void require(bool ok, const char* arg, const V& value, const L& limit) {
    if (ok || !message_.empty()) return;
    std::ostringstream os;
    os << "invalid argument " << arg << " = " << value << ": must be " << limit;
    message_ = os.str();
  }
  bool failed() const { return !message_.empty(); }
  const std::string& message() const { return message_; }

 private:
  std::string message_;
};

}  // namespace epcomm
