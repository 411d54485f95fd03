// SPDX-License-Identifier: Apache-2.0
// testing::setPoisonNewBuffersForTesting for one scope: a buffer created inside it has every byte
// of its memory set to 0xFF before it is initialized, as reused memory could be.
#pragma once

#include "test_hooks.hpp"

namespace epcomm::test {

class PoisonNewBuffers {
 public:
  explicit PoisonNewBuffers(bool on = true) : on_(on) {
    if (on_) testing::setPoisonNewBuffersForTesting(true);
  }
  ~PoisonNewBuffers() {
    if (on_) testing::setPoisonNewBuffersForTesting(false);
  }
  PoisonNewBuffers(const PoisonNewBuffers&) = delete;
  PoisonNewBuffers& operator=(const PoisonNewBuffers&) = delete;

 private:
  bool on_;
};

}  // namespace epcomm::test
