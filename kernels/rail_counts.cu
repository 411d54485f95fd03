// SPDX-License-Identifier: Apache-2.0
// The rail exchange's device side (kernels/rail_launch.hpp): pack this rank's count record, and
// judge the all-gathered records without a host sync (worst-case mode, graph-capturable).
#include "kernels/kernel_check.hpp"
#include "kernels/rail_launch.hpp"

namespace epcomm::rail {
namespace {

constexpr int kPackThreads = 128;

__global__ void __launch_bounds__(kPackThreads) packRailRecordKernel(PackRecordParams p) {
  if (threadIdx.x == 0) {
    p.record[kRailMagic] = kRailRecordMagic;
    p.record[kRailMode] = p.mode;
    p.record[kRailRowBytes] = p.row_bytes;
    p.record[kRailCapacity] = p.capacity_rows;
  }
  for (int n = threadIdx.x; n < p.num_nodes; n += blockDim.x) {
    p.record[kRailRecordHeader + n] = n == p.corrupt_node ? p.corrupt_value : p.send_counts[n];
  }
}

// A few kilobytes of records at most (kMaxRailNodes): one thread, no reduction to get wrong.
__global__ void __launch_bounds__(1) judgeRailRecordsKernel(JudgeParams p) {
  const RailVerdict verdict = judgeRailRecords(p.records, p.num_nodes);
  // Sticky: the first fault since the host last read (and cleared) it.
  if (p.verdict->fault == 0) *p.verdict = verdict;
  const int32_t* mine = railRecord(p.records, p.num_nodes, p.me);
  const int64_t slot = mine[kRailCapacity];
  for (int n = 0; n < p.num_nodes; ++n) {
    const int32_t count = railRecord(p.records, p.num_nodes, n)[kRailRecordHeader + p.me];
    p.recv_counts[n] = verdict.fault == 0 ? count : 0;
    p.recv_offsets[n] = n * slot;
  }
}

}  // namespace

void launchPackRailRecord(const PackRecordParams& params, cudaStream_t stream) {
  packRailRecordKernel<<<1, kPackThreads, 0, stream>>>(params);
  EPCOMM_KERNEL_LAUNCH_CHECK(packRailRecordKernel);
}

void launchJudgeRailRecords(const JudgeParams& params, cudaStream_t stream) {
  judgeRailRecordsKernel<<<1, 1, 0, stream>>>(params);
  EPCOMM_KERNEL_LAUNCH_CHECK(judgeRailRecordsKernel);
}

}  // namespace epcomm::rail
