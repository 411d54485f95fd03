// SPDX-License-Identifier: Apache-2.0
// How epcomm ranks find each other: a small collective interface the core library uses to
// exchange memory handles. MpiBootstrap (epcomm/mpi_bootstrap.hpp) implements it over an MPI
// communicator; CallbackBootstrap lets a framework plug in its own all-gather.
#pragma once

#include <cstddef>
#include <functional>
#include <vector>

#include "epcomm/export.hpp"

namespace epcomm {

class EPCOMM_API Bootstrap {
 public:
  virtual ~Bootstrap() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;

  // Collective. Gathers `bytes` bytes from every rank into `recv` (size() * bytes, rank order).
  // Throws epcomm::TimeoutError if the other ranks do not arrive within the bootstrap deadline.
  virtual void allGather(const void* send, void* recv, size_t bytes) = 0;

  // Collective. Returns once every rank has entered it (or throws TimeoutError).
  virtual void barrier() = 0;

  // Node-local grouping, computed once by the constructor of each implementation from a host
  // identity (hostname + boot id): ranks that share this host, in global rank order.
  int localRank() const { return local_rank_; }
  int localSize() const { return static_cast<int>(local_ranks_.size()); }
  const std::vector<int>& localRanks() const { return local_ranks_; }
  int numNodes() const { return num_nodes_; }

 protected:
  // Collective: all-gathers this process's host identity and fills the node-local fields.
  // Implementations call it at the end of their constructor.
  void initLocalGroup();

 private:
  int local_rank_ = 0;
  std::vector<int> local_ranks_;
  int num_nodes_ = 1;
};

// A bootstrap over caller-supplied collectives, for frameworks that already have a process
// group. `all_gather(send, recv, bytes)` must have Bootstrap::allGather's semantics. Without a
// `barrier` function, barrier() is an all-gather of one byte. The constructor is collective.
class EPCOMM_API CallbackBootstrap : public Bootstrap {
 public:
  using AllGatherFn = std::function<void(const void* send, void* recv, size_t bytes)>;
  using BarrierFn = std::function<void()>;

  CallbackBootstrap(int rank, int size, AllGatherFn all_gather, BarrierFn barrier = {});

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void allGather(const void* send, void* recv, size_t bytes) override;
  void barrier() override;

 private:
  int rank_;
  int size_;
  AllGatherFn all_gather_;
  BarrierFn barrier_;
};

// Picks the CUDA device for this process from its node-local rank (localRank % device count),
// makes it current and returns its ordinal. Several ranks per GPU are allowed. Throws
// epcomm::CudaError when no CUDA device is visible.
EPCOMM_API int selectDevice(const Bootstrap& bootstrap);

}  // namespace epcomm
