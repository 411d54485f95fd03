// SPDX-License-Identifier: Apache-2.0
// The rail exchange's pure protocol (kernels/rail_protocol.hpp), host only: the verdict every rail
// rank reaches over the all-gathered count records, and the send/receive layouts of both modes.
#include <gtest/gtest.h>

#include <climits>
#include <cstdint>
#include <vector>

#include "kernels/rail_protocol.hpp"

namespace epcomm::rail {
namespace {

// counts[s][d]: rows node s sends to node d; capacity[d]: receive rows (exact) or max_rows.
std::vector<int32_t> recordsOf(RailMode mode, int32_t row_bytes,
                               const std::vector<int32_t>& capacity,
                               const std::vector<std::vector<int32_t>>& counts) {
  const int m = static_cast<int>(counts.size());
  std::vector<int32_t> out;
  for (int s = 0; s < m; ++s) {
    out.push_back(kRailRecordMagic);
    out.push_back(static_cast<int32_t>(mode));
    out.push_back(row_bytes);
    out.push_back(capacity[s]);
    for (int d = 0; d < m; ++d) out.push_back(counts[s][d]);
  }
  return out;
}

RailVerdict judge(const std::vector<int32_t>& records, int m) {
  EXPECT_EQ(records.size(), static_cast<size_t>(m * railRecordInts(m)));
  return judgeRailRecords(records.data(), m);
}

TEST(RailProtocol, ExactCleanPlan) {
  // 3 nodes; node 1 receives 2 + 0 + 5 = 7 rows into a capacity of exactly 7.
  const auto records =
      recordsOf(RailMode::kExact, 64, {10, 7, 0}, {{1, 2, 0}, {3, 0, 0}, {4, 5, 0}});
  const RailVerdict v = judge(records, 3);
  EXPECT_EQ(v.fault, 0) << railFaultName(static_cast<RailFault>(v.fault));
  int64_t send_offsets[3];
  int32_t recv_counts[3];
  int64_t recv_offsets[3];
  EXPECT_EQ(planRailOffsets(records.data(), 3, 1, send_offsets, recv_counts, recv_offsets), 7);
  EXPECT_EQ(send_offsets[0], 0);  // node 1 sends 3, 0, 0
  EXPECT_EQ(send_offsets[1], 3);
  EXPECT_EQ(send_offsets[2], 3);
  EXPECT_EQ(recv_counts[0], 2);
  EXPECT_EQ(recv_counts[1], 0);
  EXPECT_EQ(recv_counts[2], 5);
  EXPECT_EQ(recv_offsets[0], 0);
  EXPECT_EQ(recv_offsets[1], 2);
  EXPECT_EQ(recv_offsets[2], 2);
  // Node 2 receives nothing: a zero capacity is fine.
  EXPECT_EQ(planRailOffsets(records.data(), 3, 2, send_offsets, recv_counts, recv_offsets), 0);
  EXPECT_EQ(send_offsets[2], 9);
}

TEST(RailProtocol, WorstCasePlanUsesFixedSlots) {
  const auto records = recordsOf(RailMode::kWorstCase, 16, {4, 4}, {{4, 0}, {1, 3}});
  EXPECT_EQ(judge(records, 2).fault, 0);
  int64_t send_offsets[2];
  int32_t recv_counts[2];
  int64_t recv_offsets[2];
  EXPECT_EQ(planRailOffsets(records.data(), 2, 0, send_offsets, recv_counts, recv_offsets), 8);
  EXPECT_EQ(send_offsets[1], 4);
  EXPECT_EQ(recv_counts[0], 4);
  EXPECT_EQ(recv_counts[1], 1);
  EXPECT_EQ(recv_offsets[1], 4);
}

TEST(RailProtocol, OverCapacityNamesTheSenderThatCrossesIt) {
  // Node 0 may receive 5 rows: nodes 0, 1, 2 send 2, 3, 1 -> node 2 crosses it (6 > 5).
  const auto records =
      recordsOf(RailMode::kExact, 8, {5, 100, 100}, {{2, 0, 0}, {3, 0, 0}, {1, 0, 0}});
  const RailVerdict v = judge(records, 3);
  EXPECT_EQ(v.fault, static_cast<int32_t>(RailFault::kOverCapacity));
  EXPECT_EQ(v.src_node, 2);
  EXPECT_EQ(v.dst_node, 0);
  EXPECT_EQ(v.value, 1);
  EXPECT_EQ(v.total, 6);
  EXPECT_EQ(v.limit, 5);
}

TEST(RailProtocol, SumsDoNotOverflow) {
  // Two counts of INT32_MAX into a capacity of INT32_MAX: the total is taken in 64 bits.
  const auto records =
      recordsOf(RailMode::kExact, 1, {INT32_MAX, INT32_MAX}, {{INT32_MAX, 0}, {INT32_MAX, 0}});
  const RailVerdict v = judge(records, 2);
  EXPECT_EQ(v.fault, static_cast<int32_t>(RailFault::kOverCapacity));
  EXPECT_EQ(v.src_node, 1);
  EXPECT_EQ(v.total, 2LL * INT32_MAX);
}

TEST(RailProtocol, NegativeAndOverSlotCounts) {
  auto records = recordsOf(RailMode::kWorstCase, 8, {4, 4}, {{0, 5}, {0, 0}});
  RailVerdict v = judge(records, 2);
  EXPECT_EQ(v.fault, static_cast<int32_t>(RailFault::kOverSlot));
  EXPECT_EQ(v.src_node, 0);
  EXPECT_EQ(v.dst_node, 1);
  EXPECT_EQ(v.value, 5);
  EXPECT_EQ(v.limit, 4);

  records = recordsOf(RailMode::kExact, 8, {4, 4}, {{0, 0}, {-1, 0}});
  v = judge(records, 2);
  EXPECT_EQ(v.fault, static_cast<int32_t>(RailFault::kNegativeCount));
  EXPECT_EQ(v.src_node, 1);
  EXPECT_EQ(v.dst_node, 0);
  EXPECT_EQ(v.value, -1);
}

TEST(RailProtocol, FirstFaultInAFixedOrder) {
  // Two faults: destination node 0 is judged before node 1, whatever the source order.
  const auto records = recordsOf(RailMode::kWorstCase, 8, {2, 2}, {{0, 9}, {3, 0}});
  const RailVerdict v = judge(records, 2);
  EXPECT_EQ(v.src_node, 1);
  EXPECT_EQ(v.dst_node, 0);
}

TEST(RailProtocol, RecordMismatches) {
  auto records = recordsOf(RailMode::kExact, 8, {4, 4}, {{0, 0}, {0, 0}});
  records[railRecordInts(2) + kRailMagic] = 7;
  RailVerdict v = judge(records, 2);
  EXPECT_EQ(v.fault, static_cast<int32_t>(RailFault::kBadRecord));
  EXPECT_EQ(v.src_node, 1);

  records = recordsOf(RailMode::kExact, 8, {4, 4}, {{0, 0}, {0, 0}});
  records[railRecordInts(2) + kRailMode] = static_cast<int32_t>(RailMode::kWorstCase);
  EXPECT_EQ(judge(records, 2).fault, static_cast<int32_t>(RailFault::kModeMismatch));

  records = recordsOf(RailMode::kExact, 8, {4, 4}, {{0, 0}, {0, 0}});
  records[railRecordInts(2) + kRailRowBytes] = 16;
  v = judge(records, 2);
  EXPECT_EQ(v.fault, static_cast<int32_t>(RailFault::kRowBytesMismatch));
  EXPECT_EQ(v.value, 16);
  EXPECT_EQ(v.limit, 8);

  // Exact capacities may differ per node; worst-case slots may not.
  EXPECT_EQ(judge(recordsOf(RailMode::kExact, 8, {4, 9}, {{0, 0}, {0, 0}}), 2).fault, 0);
  v = judge(recordsOf(RailMode::kWorstCase, 8, {4, 9}, {{0, 0}, {0, 0}}), 2);
  EXPECT_EQ(v.fault, static_cast<int32_t>(RailFault::kSlotMismatch));
  EXPECT_EQ(v.src_node, 1);
  EXPECT_EQ(judge(recordsOf(RailMode::kWorstCase, 8, {0, 0}, {{0, 0}, {0, 0}}), 2).fault,
            static_cast<int32_t>(RailFault::kSlotMismatch));
  EXPECT_EQ(judge(recordsOf(RailMode::kExact, 0, {4, 4}, {{0, 0}, {0, 0}}), 2).fault,
            static_cast<int32_t>(RailFault::kRowBytesMismatch));
}

TEST(RailProtocol, OneNode) {
  const auto records = recordsOf(RailMode::kExact, 4, {3}, {{3}});
  EXPECT_EQ(judge(records, 1).fault, 0);
  EXPECT_EQ(judge(recordsOf(RailMode::kExact, 4, {2}, {{3}}), 1).fault,
            static_cast<int32_t>(RailFault::kOverCapacity));
}

}  // namespace
}  // namespace epcomm::rail
