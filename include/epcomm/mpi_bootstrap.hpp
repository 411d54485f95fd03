// SPDX-License-Identifier: Apache-2.0
// Bootstrap over an MPI communicator. This is the only epcomm header that includes <mpi.h>;
// link `epcomm::epcomm_mpi` to use it.
#pragma once

#include <mpi.h>

#include <string>

#include "epcomm/bootstrap.hpp"
#include "epcomm/export.hpp"

namespace epcomm {

class EPCOMM_API MpiBootstrap : public Bootstrap {
 public:
  // Collective over `comm`, which is duplicated so epcomm traffic never matches user messages.
  // Every all-gather and barrier is non-blocking MPI polled against `timeout_s`.
  // MPI must be initialized; destroy the bootstrap (and every EpBuffer) before MPI_Finalize.
  // A negative `timeout_s` (the default) means EPCOMM_FIRST_OP_TIMEOUT_S, else 600 s: the
  // deadlines of epcomm/config.hpp, where ranks may reach their first collective minutes apart.
  explicit MpiBootstrap(MPI_Comm comm = MPI_COMM_WORLD, double timeout_s = -1.0);
  ~MpiBootstrap() override;
  MpiBootstrap(const MpiBootstrap&) = delete;
  MpiBootstrap& operator=(const MpiBootstrap&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  // Collective. Every rank must pass the same `bytes`: the sizes are all-gathered first, and a
  // mismatch throws epcomm::MpiError (MPI_ERR_COUNT) on every rank, naming the ranks and sizes;
  // nothing is written to `recv` then. The bootstrap stays usable after that error.
  void allGather(const void* send, void* recv, size_t bytes) override;
  void barrier() override;

  MPI_Comm comm() const { return comm_; }

 private:
  void waitRequest(MPI_Request* request, const char* what);
  // One MPI_Iallgather of `bytes` per rank through staging buffers, bounded by the deadline.
  void gather(const void* send, void* recv, size_t bytes, const std::string& what);

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
  double timeout_s_;
};

}  // namespace epcomm
