// SPDX-License-Identifier: Apache-2.0
// The GIN rail transport's protocol (src/nccl/rail_gin.hpp), written once for host and device: the
// registered windows' layout, the GIN signal ids, the epoch rule and the status a timed-out device
// wait leaves. Pure functions, no NCCL and no CUDA API, so the CPU unit tests check the same code
// the kernel runs. Compiled only into the GIN backend; the count records and their judge are the
// host-API transport's (kernels/rail_protocol.hpp), so both backends reach the same verdicts.
//
// Worst-case mode only (the exact mode stays on the host API). One call, epoch k = 1, 2, ... (a
// device counter, so CUDA graph replays advance it), on rail rank `me` of M:
//
//   1. credit:  signal credit(me) on every rail rank d: "my slots of call k-1 are consumed"
//               (the unpack of call k-1 ran before on this stream);
//   2. send:    per destination d: wait until credit(d) >= k here (d entered call k, so its
//               receive slot for me is free), then ONE put of my send slot d, [my count record |
//               min(count[d], max_rows) rows], into d's receive slot `me`, with a signal
//               increment of arrived(me) on d bundled with it. A weak signal suffices (it
//               guarantees its own put has landed), so backends without strong signals work too;
//   3. receive: per source s: wait until arrived(s) >= k, copy its record out of the slot into
//               the records matrix; then judge all M records with judgeRailRecords (the same
//               function, the same records on every rail rank: the same verdict everywhere, no
//               vote) and publish the receive counts (0 after a fault);
//   4. flush:   the puts' sources are reusable (the next call repacks the send window).
//
// Every wait has a deadline (%globaltimer); a wait that expires records GinStatus (phase, peer,
// expected and observed signal), breaks every record's magic (the judge then zeroes every count:
// nothing reads a row that was not sent) and the kernel returns: nothing hangs, and wait() on the
// host throws TimeoutError naming the peer.
//
// Windows (the same sizes on every rail rank, fixed at creation), a slot = [record, padded to 16
// bytes | slot_bytes of rows], slots `stride` apart:
//   receive   | records matrix: M x railRecordInts(M) int32, padded to 4096 | M slots |
//   send      | M slots (slot d for destination d: this rank's record, then its rows for d) |
// A sender puts at most header_bytes + max_rows * row_bytes <= stride bytes into a slot
// (max_rows * row_bytes checked on its own host against the creation-time slot_bytes, the same on
// every rank), so no argument of a peer can make it write past a slot, whatever that peer passed.
#pragma once

#include <cstdint>

#include "kernels/rail_protocol.hpp"

namespace epcomm::rail::gin {

constexpr int64_t kWindowAlign = 4096;  // NCCL_WIN_REQUIRED_ALIGNMENT

EPCOMM_RAIL_HD inline int64_t alignWindow(int64_t bytes) {
  return (bytes + kWindowAlign - 1) / kWindowAlign * kWindowAlign;
}

// Byte offsets and sizes of both windows for M nodes and `slot_bytes` of rows per slot.
struct GinLayout {
  int64_t record_bytes = 0;  // one count record
  int64_t header_bytes = 0;  // the record at the head of a slot, padded to 16 bytes
  int64_t records_off = 0;   // receive window: source s's record at records_off + s * record_bytes
  int64_t slots_off = 0;     // receive window: source s's slot at slots_off + s * stride
  int64_t slot_bytes = 0;    // rows per slot (bytes)
  int64_t stride = 0;        // header_bytes + slot_bytes, padded to kWindowAlign
  int64_t recv_window_bytes = 0;
  int64_t send_window_bytes = 0;  // send window: destination d's slot at d * stride
};

// slot_bytes > 0, 1 <= num_nodes <= kMaxRailNodes (the caller checks); window sizes and slot
// offsets are multiples of kWindowAlign.
EPCOMM_RAIL_HD inline GinLayout ginLayout(int num_nodes, int64_t slot_bytes) {
  GinLayout l;
  l.record_bytes = static_cast<int64_t>(railRecordInts(num_nodes)) * 4;
  l.header_bytes = (l.record_bytes + 15) / 16 * 16;
  l.records_off = 0;
  l.slots_off = alignWindow(l.record_bytes * num_nodes);
  l.slot_bytes = slot_bytes;
  l.stride = alignWindow(l.header_bytes + slot_bytes);
  l.recv_window_bytes = l.slots_off + l.stride * num_nodes;
  l.send_window_bytes = l.stride * num_nodes;
  return l;
}

// GIN signal ids (ncclDevCommRequirements::ginSignalCount = 2 * M, ids from 0):
// arrived(s) counts the calls whose rows and record source s delivered here; credit(d) counts the
// calls destination d has entered.
EPCOMM_RAIL_HD inline uint32_t arrivedSignal(int source_node) {
  return static_cast<uint32_t>(source_node);
}
EPCOMM_RAIL_HD inline uint32_t creditSignal(int num_nodes, int dest_node) {
  return static_cast<uint32_t>(num_nodes + dest_node);
}
EPCOMM_RAIL_HD inline int ginSignalCount(int num_nodes) {
  return 2 * num_nodes;
}

// Bytes a sender puts into destination d's slot: its record and its own count of rows clamped to
// [0, max_rows] (a bad count is still judged from the record; the clamp only bounds the write).
EPCOMM_RAIL_HD inline int64_t ginPutBytes(const GinLayout& l, int32_t count, int64_t max_rows,
                                          int64_t row_bytes) {
  const int64_t rows = count < 0 ? 0 : (count > max_rows ? max_rows : count);
  return l.header_bytes + rows * row_bytes;
}

// Host-side argument check against the creation-time slot size: empty string when fine.
// (A plain function so the unit tests cover it; the host turns a failure into InvalidArgument.)
inline const char* ginArgsProblem(int64_t row_bytes, int64_t max_rows, int64_t slot_bytes) {
  if (row_bytes < 1 || row_bytes > INT32_MAX) return "row_bytes outside [1, INT32_MAX]";
  if (max_rows < 1 || max_rows > INT32_MAX) return "max_rows outside [1, INT32_MAX]";
  if (max_rows > slot_bytes / row_bytes) return "max_rows * row_bytes over the GIN slot size";
  return "";
}

enum class GinPhase : int32_t { kNone = 0, kCredit = 1, kArrival = 2, kFlush = 3 };

EPCOMM_RAIL_HD inline const char* ginPhaseName(GinPhase phase) {
  switch (phase) {
    case GinPhase::kNone:
      return "none";
    case GinPhase::kCredit:
      return "waiting for the destination's credit (its previous call consumed)";
    case GinPhase::kArrival:
      return "waiting for the source's rows and count record";
    case GinPhase::kFlush:
      return "flushing the puts (local completion)";
  }
  return "unknown";
}

// The first timed-out wait since the last wait() on the host (sticky; cleared by wait()).
struct GinStatus {
  int32_t phase = 0;  // GinPhase; 0: no timeout
  int32_t peer_node = -1;
  uint64_t epoch = 0;     // the call (epoch) that timed out
  uint64_t expected = 0;  // the signal value waited for
  uint64_t observed = 0;  // the value seen at the deadline
};

// Signals only grow (one increment per call and peer), so a wait for call k is `value >= k`.
EPCOMM_RAIL_HD inline bool signalReached(uint64_t value, uint64_t epoch) {
  return value >= epoch;
}

}  // namespace epcomm::rail::gin
