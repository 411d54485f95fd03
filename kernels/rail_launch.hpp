// SPDX-License-Identifier: Apache-2.0
// Launchers of the rail exchange's two small kernels (kernels/rail_counts.cu), compiled into
// epcomm_nccl only. Host code; the protocol they share with the host is kernels/rail_protocol.hpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/rail_protocol.hpp"

namespace epcomm::rail {

struct PackRecordParams {
  const int32_t* send_counts;  // device [num_nodes]: rows this rank sends to each node
  int32_t* record;             // device [railRecordInts(num_nodes)]: out
  int32_t num_nodes;
  int32_t mode;           // RailMode
  int32_t row_bytes;      //
  int32_t capacity_rows;  // exact: receive buffer rows; worst-case: max_rows
  // Test hook (nccl::testing::corruptNextRailCount): count[corrupt_node] = corrupt_value.
  int32_t corrupt_node;  // -1: none
  int32_t corrupt_value;
};

// One block: writes this rank's record (header + counts).
void launchPackRailRecord(const PackRecordParams& params, cudaStream_t stream);

struct JudgeParams {
  const int32_t* records;  // device [num_nodes * railRecordInts(num_nodes)]: all-gathered
  int32_t num_nodes;
  int32_t me;             // this rank's node (rail rank)
  RailVerdict* verdict;   // device: in/out; written only while it holds no fault
  int32_t* recv_counts;   // device [num_nodes]: out; all zero after a fault
  int64_t* recv_offsets;  // device [num_nodes]: out (rows)
};

// One thread judges the records (judgeRailRecords) and writes the verdict and this rank's receive
// plan; a fault zeroes every count of this call, so no consumer reads a row that was not sent.
void launchJudgeRailRecords(const JudgeParams& params, cudaStream_t stream);

}  // namespace epcomm::rail
