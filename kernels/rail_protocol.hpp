// SPDX-License-Identifier: Apache-2.0
// The rail exchange's protocol (src/nccl/rail_exchange.hpp), written once for host and device: the
// count record every rail rank publishes, the verdict every rank reaches over the same records,
// and the buffer layouts. Pure functions, no NCCL and no CUDA API: the host (exact mode), the
// judge kernel (worst-case mode) and the CPU unit tests run the same code.
//
// Count exchange: rail rank n publishes one record of kRailRecordHeader + M int32 (M = nodes):
//
//   [ magic | mode | row_bytes | capacity_rows | count[0] ... count[M-1] ]
//
// count[d] = rows n sends to node d. The records are all-gathered over the rail, so every rail
// rank holds the same M x (header + M) matrix and judges it with judgeRailRecords: every rank
// reaches the same verdict without a vote (a fault found by one rank reaches every rank in the
// same op, CONVENTIONS 20), and a count is bounded before any byte is posted for it.
//
// Layouts (rows of row_bytes bytes):
//   exact       send: node-major, compact: rows for node d at sum_{d' < d} count[d']
//               recv: source-node-major, compact: rows from node s at sum_{s' < s} count_s'[me];
//                     capacity_rows = the receive buffer's rows
//   worst-case  send: fixed slots: rows for node d at d * max_rows (only count[d] of them used)
//               recv: fixed slots: rows from node s at s * max_rows; capacity_rows = max_rows
//                     (the same on every rank: every slot moves max_rows rows)
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define EPCOMM_RAIL_HD __host__ __device__
#else
#define EPCOMM_RAIL_HD
#endif

namespace epcomm::rail {

constexpr int32_t kRailRecordMagic = 0x45505243;  // "EPRC"
constexpr int kRailRecordHeader = 4;
constexpr int kRailMagic = 0, kRailMode = 1, kRailRowBytes = 2, kRailCapacity = 3;
// The number of nodes one rail exchange supports (records are M x (4 + M) int32: 1 MiB at 512).
constexpr int kMaxRailNodes = 512;

enum class RailMode : int32_t { kExact = 1, kWorstCase = 2 };

enum class RailFault : int32_t {
  kNone = 0,
  kBadRecord,         // a record without the magic (not an epcomm rail exchange)
  kModeMismatch,      // ranks of one rail called different modes
  kRowBytesMismatch,  // ... or different row sizes (or a row size <= 0)
  kSlotMismatch,      // worst-case: ranks disagree on max_rows (or it is <= 0)
  kNegativeCount,     // a count below zero
  kOverSlot,          // worst-case: count[d] > max_rows
  kOverCapacity,      // exact: the rows sent to node d exceed its receive capacity
};

EPCOMM_RAIL_HD inline const char* railFaultName(RailFault fault) {
  switch (fault) {
    case RailFault::kNone:
      return "none";
    case RailFault::kBadRecord:
      return "bad record";
    case RailFault::kModeMismatch:
      return "mode mismatch";
    case RailFault::kRowBytesMismatch:
      return "row size mismatch";
    case RailFault::kSlotMismatch:
      return "max_rows mismatch";
    case RailFault::kNegativeCount:
      return "negative count";
    case RailFault::kOverSlot:
      return "count over max_rows";
    case RailFault::kOverCapacity:
      return "count over receive capacity";
  }
  return "unknown";
}

// The first fault in a fixed order (record checks by source node, then counts by destination
// node and source node), so every rank names the same one. Trivially copyable: the judge kernel
// writes it to device memory.
struct RailVerdict {
  int32_t fault = 0;      // RailFault
  int32_t src_node = -1;  // the node whose record is at fault (the sender of a count)
  int32_t dst_node = -1;  // the receiving node of a count fault, else -1
  int32_t reserved = 0;
  int64_t value = 0;  // the offending value (count, mode, row bytes, max_rows, magic)
  int64_t total = 0;  // kOverCapacity: rows sent to dst_node by nodes 0..src_node
  int64_t limit = 0;  // what it had to be (capacity, max_rows, node 0's value)
};

EPCOMM_RAIL_HD inline int railRecordInts(int num_nodes) {
  return kRailRecordHeader + num_nodes;
}

EPCOMM_RAIL_HD inline const int32_t* railRecord(const int32_t* records, int num_nodes, int node) {
  return records + static_cast<int64_t>(node) * railRecordInts(num_nodes);
}

// `records`: M records, node order (the all-gathered matrix). Pure; the same on every rank.
EPCOMM_RAIL_HD inline RailVerdict judgeRailRecords(const int32_t* records, int num_nodes) {
  RailVerdict v;
  auto fail = [&v](RailFault fault, int src, int dst, int64_t value, int64_t limit) {
    v.fault = static_cast<int32_t>(fault);
    v.src_node = src;
    v.dst_node = dst;
    v.value = value;
    v.limit = limit;
    return v;
  };
  const int32_t* first = railRecord(records, num_nodes, 0);
  for (int s = 0; s < num_nodes; ++s) {
    const int32_t* r = railRecord(records, num_nodes, s);
    if (r[kRailMagic] != kRailRecordMagic)
      return fail(RailFault::kBadRecord, s, -1, r[kRailMagic], kRailRecordMagic);
    if (r[kRailMode] != first[kRailMode])
      return fail(RailFault::kModeMismatch, s, -1, r[kRailMode], first[kRailMode]);
    if (r[kRailRowBytes] <= 0 || r[kRailRowBytes] != first[kRailRowBytes])
      return fail(RailFault::kRowBytesMismatch, s, -1, r[kRailRowBytes], first[kRailRowBytes]);
    if (first[kRailMode] == static_cast<int32_t>(RailMode::kWorstCase) &&
        (r[kRailCapacity] <= 0 || r[kRailCapacity] != first[kRailCapacity]))
      return fail(RailFault::kSlotMismatch, s, -1, r[kRailCapacity], first[kRailCapacity]);
  }
  const bool worst = first[kRailMode] == static_cast<int32_t>(RailMode::kWorstCase);
  for (int d = 0; d < num_nodes; ++d) {
    const int64_t capacity = railRecord(records, num_nodes, d)[kRailCapacity];
    int64_t total = 0;
    for (int s = 0; s < num_nodes; ++s) {
      const int64_t count = railRecord(records, num_nodes, s)[kRailRecordHeader + d];
      if (count < 0) return fail(RailFault::kNegativeCount, s, d, count, 0);
      if (worst && count > capacity) return fail(RailFault::kOverSlot, s, d, count, capacity);
      total += count;
      if (!worst && total > capacity) {
        fail(RailFault::kOverCapacity, s, d, count, capacity);
        v.total = total;
        return v;
      }
    }
  }
  return v;
}

// Where each node's rows sit, for rank `me` after a clean verdict. Arrays of num_nodes entries.
// send_offsets: rows of this rank's send buffer; recv_counts/recv_offsets: rows of its receive
// buffer. Returns the receive rows in use (exact) or reserved (worst-case: M * max_rows).
EPCOMM_RAIL_HD inline int64_t planRailOffsets(const int32_t* records, int num_nodes, int me,
                                              int64_t* send_offsets, int32_t* recv_counts,
                                              int64_t* recv_offsets) {
  const int32_t* mine = railRecord(records, num_nodes, me);
  const bool worst = mine[kRailMode] == static_cast<int32_t>(RailMode::kWorstCase);
  const int64_t slot = mine[kRailCapacity];
  int64_t send = 0, recv = 0;
  for (int n = 0; n < num_nodes; ++n) {
    send_offsets[n] = worst ? n * slot : send;
    send += mine[kRailRecordHeader + n];
    recv_counts[n] = railRecord(records, num_nodes, n)[kRailRecordHeader + me];
    recv_offsets[n] = worst ? n * slot : recv;
    recv += recv_counts[n];
  }
  return worst ? num_nodes * slot : recv;
}

}  // namespace epcomm::rail
