// SPDX-License-Identifier: Apache-2.0
// Argument checks of the op front-ends, before any launch: the first failed check becomes the
// message with which the call is rejected on every rank (BufferCore::rejectInput). Internal.
#pragma once

#include <cstdint>
#include <ostream>
#include <sstream>
#include <string>

namespace epcomm {

inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// A pointer argument as the message shows it; formatted only when a check fails (building the
// text eagerly cost every call an ostringstream per pointer checked: issue 13, host enqueue).
struct PointerText {
  const void* pointer;
};
inline std::ostream& operator<<(std::ostream& os, const PointerText& p) {
  return os << p.pointer;
}
inline PointerText pointerText(const void* p) {
  return PointerText{p};
}

// Collects the first failed check; the caller rejects the input with it. The limit may come in
// parts (`"in [0, ", max, "]"`), streamed only when the check fails, so a call whose arguments
// are fine builds no string.
class ArgChecker {
 public:
  template <typename V, typename... Limit>
  void require(bool ok, const char* arg, const V& value, const Limit&... limit) {
    if (ok || !message_.empty()) return;
    std::ostringstream os;
    os << "invalid argument " << arg << " = " << value << ": must be ";
    (os << ... << limit);
    message_ = os.str();
  }
  bool failed() const { return !message_.empty(); }
  const std::string& message() const { return message_; }

 private:
  std::string message_;
};

// The reason a call is rejected, formatted only when there is one (the LL ops built an
// ostringstream on every call, also when nothing was wrong).
class Problem {
 public:
  template <typename... Parts>
  void set(const Parts&... parts) {
    std::ostringstream os;
    (os << ... << parts);
    text_ = os.str();
  }
  bool empty() const { return text_.empty(); }
  const std::string& text() const { return text_; }

 private:
  std::string text_;
};

}  // namespace epcomm
