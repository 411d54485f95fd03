// SPDX-License-Identifier: Apache-2.0
// Launchers of the GIN rail transport's kernels (kernels/rail_gin.cu), compiled into epcomm_nccl
// only when EPCOMM_NCCL_GIN (NCCL >= 2.30 headers with the device API's GIN). The protocol they
// share with the host is kernels/rail_gin_protocol.hpp.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>
#include <nccl_device.h>

#include <cstdint>

#include "kernels/rail_gin_protocol.hpp"

namespace epcomm::rail::gin {

struct GinExchangeParams {
  ncclDevComm dev_comm;      // the rail's device communicator (ncclDevCommCreate), by value
  ncclWindow_t recv_window;  // registered: records and receive slots (GinLayout)
  ncclWindow_t send_window;  // registered: this rank's record and send slots
  uint8_t* recv_base;        // local pointer to the receive window (records matrix, slots)
  GinLayout layout;
  int32_t num_nodes;
  int32_t me;
  int64_t row_bytes;
  int64_t max_rows;
  const int32_t* send_counts;  // device [num_nodes], the caller's
  uint64_t* epoch;             // device: the call counter (advanced by the kernel: graph-safe)
  GinStatus* status;           // device: sticky timeout record
  uint64_t timeout_ns;         // every device wait's deadline (%globaltimer)
  uint64_t flush_timeout_cycles;
};

// One block: credit, puts with signals, arrival waits, flush (rail_gin_protocol.hpp, steps 1-4).
void launchGinExchange(const GinExchangeParams& params, cudaStream_t stream);

struct GinCopyParams {
  const uint8_t* src;     // rows of slot 0
  uint8_t* dst;           //
  int64_t src_stride;     // bytes between node slots
  int64_t dst_stride;     //
  const int32_t* counts;  // device [num_nodes]: rows of each slot, clamped to [0, max_rows]
  int32_t num_nodes;
  int64_t row_bytes;
  int64_t max_rows;
  // Optional (pack): `header_bytes` from `header` to header_dst + n * dst_stride for every slot n
  // (this rank's record at the head of every send slot); null: none.
  const uint8_t* header;
  uint8_t* header_dst;
  int64_t header_bytes;
};

// Copies the first min(counts[n], max_rows) rows of every slot n (pack into the send window,
// unpack out of the receive window), and the header when given.
void launchGinCopySlots(const GinCopyParams& params, cudaStream_t stream);

}  // namespace epcomm::rail::gin
