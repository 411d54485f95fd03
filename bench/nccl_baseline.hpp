// SPDX-License-Identifier: Apache-2.0
// The NCCL baseline: an all-to-all-v (ncclGroupStart, then one ncclSend and one ncclRecv per
// rank, self included) that moves exactly the per-peer bytes of the epcomm op it is compared
// with. Built against NCCL when CMake finds it (EPCOMM_BENCH_HAVE_NCCL=1); otherwise every
// instance is unavailable and says "NCCL not available at build time".
#pragma once

#include <cuda_runtime_api.h>
#include <mpi.h>

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "ranks.hpp"

namespace epcomm::bench {

// One all-to-all-v, seen from this rank: bytes sent to and received from every rank
// ([num_ranks], self included).
struct Exchange {
  std::vector<size_t> send_bytes;
  std::vector<size_t> recv_bytes;
};

// All-to-all-v calls issued back to back and timed as one (e.g. dispatch then combine).
using ExchangeSequence = std::vector<Exchange>;

class NcclBaseline {
 public:
  // Collective over `comm` when `enable` is true: creates an NCCL communicator on the current
  // CUDA device (unique id from rank 0, broadcast over MPI). With `enable` false nothing is
  // created and status() returns `disabled_reason`. Never enables NVLink SHARP / multicast
  // (NCCL_NVLS_ENABLE is forced to 0 before the communicator is created).
  NcclBaseline(MPI_Comm comm, bool enable, const std::string& disabled_reason);
  ~NcclBaseline();
  NcclBaseline(const NcclBaseline&) = delete;
  NcclBaseline& operator=(const NcclBaseline&) = delete;

  bool available() const;
  // "NCCL 2.28.3" when available, else why not.
  const std::string& status() const;

  // Collective. Runs warmup + iters calls on `stream`, call i issuing calls[i % calls.size()]
  // (each call from its own buffers, so rotating inputs defeat the L2 as for epcomm), with CUDA
  // events around each timed call. Returns this rank's per-call microseconds.
  std::vector<float> time(const std::vector<ExchangeSequence>& calls, int warmup, int iters,
                          cudaStream_t stream);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace epcomm::bench
