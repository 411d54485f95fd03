// SPDX-License-Identifier: Apache-2.0
// Internal hooks for tests only; not part of the public API.
#pragma once

#include <cstdint>

#include "epcomm/bootstrap.hpp"
#include "epcomm/buffer.hpp"

namespace epcomm::testing {

// Collective over `bootstrap` (every rank of `buffer`, nothing in flight): every op family of
// `buffer` continues as if `calls` calls of it had completed, so a test can run calls across the
// 2^32 boundary of the 32-bit epoch part of the tagged signal words. Each rank rewrites only its
// own control region, between two host barriers. For a buffer that ran no LL call yet: the LL
// row tags (outside the region) match their call's epoch exactly, and a tag of an early call
// could match again once the counter has gone around.
void setCallCounterForTesting(EpBuffer& buffer, Bootstrap& bootstrap, uint64_t calls);

// While on, every buffer this process creates starts with every byte of its symmetric memory set
// to 0xFF before its signals are zeroed: what reused memory may hold, so a test can show that no
// op reads a word the creation did not initialize.
void setPoisonNewBuffersForTesting(bool on);

}  // namespace epcomm::testing
