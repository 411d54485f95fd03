// SPDX-License-Identifier: Apache-2.0
// The GIN rail transport's pure protocol (kernels/rail_gin_protocol.hpp) and the rail transport
// choice (src/nccl/rail_transport_kind.hpp), host only: window layouts (aligned, disjoint, a
// slot holds what a sender may put), signal ids, the put clamp, the host argument check, the
// epoch rule and EPCOMM_RAIL_TRANSPORT parsing. Runs in every build (no NCCL needed).
#include <gtest/gtest.h>

#include <cstdint>
#include <set>
#include <string>

#include "kernels/rail_gin_protocol.hpp"
#include "nccl/rail_transport_kind.hpp"

namespace epcomm::rail::gin {
namespace {

TEST(RailGinProtocol, LayoutIsAlignedAndDisjoint) {
  for (int m : {1, 2, 3, 8, 64, kMaxRailNodes}) {
    for (int64_t slot : {int64_t{1}, int64_t{4096}, int64_t{4097}, int64_t{14400} * 128}) {
      const GinLayout l = ginLayout(m, slot);
      SCOPED_TRACE("nodes " + std::to_string(m) + " slot " + std::to_string(slot));
      EXPECT_EQ(l.record_bytes, int64_t{4} * (kRailRecordHeader + m));
      EXPECT_GE(l.header_bytes, l.record_bytes);
      EXPECT_EQ(l.header_bytes % 16, 0);  // rows start 16-byte aligned (vector copies)
      EXPECT_EQ(l.slot_bytes, slot);
      // A slot holds the record and a full slot of rows; slots are window-aligned.
      EXPECT_GE(l.stride, l.header_bytes + l.slot_bytes);
      EXPECT_EQ(l.stride % kWindowAlign, 0);
      EXPECT_EQ(l.slots_off % kWindowAlign, 0);
      // Receive window: the records matrix ends before the first slot; the last slot ends at the
      // end. Send window: M slots.
      EXPECT_LE(l.records_off + m * l.record_bytes, l.slots_off);
      EXPECT_EQ(l.slots_off + m * l.stride, l.recv_window_bytes);
      EXPECT_EQ(m * l.stride, l.send_window_bytes);
      EXPECT_EQ(l.recv_window_bytes % kWindowAlign, 0);
      // The largest put fits its slot.
      EXPECT_LE(ginPutBytes(l, INT32_MAX, slot, 1), l.stride);
    }
  }
}

TEST(RailGinProtocol, SignalIdsAreDistinctAndCounted) {
  for (int m : {1, 2, 5, kMaxRailNodes}) {
    std::set<uint32_t> ids;
    for (int n = 0; n < m; ++n) {
      ids.insert(arrivedSignal(n));
      ids.insert(creditSignal(m, n));
    }
    EXPECT_EQ(static_cast<int>(ids.size()), ginSignalCount(m));
    EXPECT_EQ(*ids.rbegin(), static_cast<uint32_t>(ginSignalCount(m) - 1));  // ids from 0
  }
}

TEST(RailGinProtocol, PutBytesAreClampedToTheSlot) {
  const GinLayout l = ginLayout(4, 500);
  const int64_t h = l.header_bytes;  // the record travels in every put
  EXPECT_EQ(ginPutBytes(l, 3, 5, 100), h + 300);
  EXPECT_EQ(ginPutBytes(l, 0, 5, 100), h);
  EXPECT_EQ(ginPutBytes(l, -7, 5, 100), h);             // a negative count puts no rows
  EXPECT_EQ(ginPutBytes(l, 1000000, 5, 100), h + 500);  // an over-slot count puts max_rows rows
  EXPECT_EQ(ginPutBytes(l, INT32_MAX, INT32_MAX, 311), h + int64_t{INT32_MAX} * 311);  // 64 bits
}

TEST(RailGinProtocol, HostArgumentCheck) {
  EXPECT_STREQ(ginArgsProblem(100, 5, 500), "");
  EXPECT_STREQ(ginArgsProblem(100, 5, 4096), "");
  EXPECT_NE(std::string(ginArgsProblem(100, 6, 500)), "");  // 600 bytes over a 500-byte slot
  EXPECT_NE(std::string(ginArgsProblem(0, 5, 500)), "");
  EXPECT_NE(std::string(ginArgsProblem(100, 0, 500)), "");
  EXPECT_NE(std::string(ginArgsProblem(int64_t{INT32_MAX} + 1, 1, INT64_MAX)), "");
  EXPECT_NE(std::string(ginArgsProblem(1, int64_t{INT32_MAX} + 1, INT64_MAX)), "");
}

TEST(RailGinProtocol, EpochRule) {
  EXPECT_FALSE(signalReached(0, 1));  // nothing arrived for the first call
  EXPECT_TRUE(signalReached(1, 1));
  EXPECT_TRUE(signalReached(2, 1));  // a peer already one call ahead (credit) still counts
  EXPECT_FALSE(signalReached(4, 5));
}

TEST(RailGinProtocol, PhaseNames) {
  EXPECT_STREQ(ginPhaseName(GinPhase::kNone), "none");
  for (GinPhase p : {GinPhase::kCredit, GinPhase::kArrival, GinPhase::kFlush}) {
    EXPECT_NE(std::string(ginPhaseName(p)), "unknown");
  }
  EXPECT_STREQ(ginPhaseName(static_cast<GinPhase>(42)), "unknown");
}

}  // namespace
}  // namespace epcomm::rail::gin

namespace epcomm::nccl {
namespace {

TEST(RailTransportKind, ParsesTheSwitch) {
  RailTransportKind kind = RailTransportKind::kGin;
  EXPECT_TRUE(parseRailTransport(nullptr, &kind));  // unset: the host API
  EXPECT_EQ(kind, RailTransportKind::kHostApi);
  for (const char* text : {"", "nccl", "NCCL", "host", "Host"}) {
    kind = RailTransportKind::kGin;
    EXPECT_TRUE(parseRailTransport(text, &kind)) << text;
    EXPECT_EQ(kind, RailTransportKind::kHostApi) << text;
  }
  for (const char* text : {"gin", "GIN", "Gin"}) {
    kind = RailTransportKind::kHostApi;
    EXPECT_TRUE(parseRailTransport(text, &kind)) << text;
    EXPECT_EQ(kind, RailTransportKind::kGin) << text;
  }
  // No fallback: anything else is rejected and leaves the kind alone.
  for (const char* text : {"gin ", "ib", "gdaki", "auto", "0"}) {
    kind = RailTransportKind::kGin;
    EXPECT_FALSE(parseRailTransport(text, &kind)) << text;
    EXPECT_EQ(kind, RailTransportKind::kGin) << text;
  }
  EXPECT_STREQ(railTransportName(RailTransportKind::kHostApi), "nccl");
  EXPECT_STREQ(railTransportName(RailTransportKind::kGin), "gin");
}

}  // namespace
}  // namespace epcomm::nccl
