// Bootstrap over an MPI communicator. This is the only epcomm header that includes <mpi.h>;
// link `epcomm::epcomm_mpi` to use it.
#pragma once

#include <mpi.h>

#include "epcomm/bootstrap.hpp"

namespace epcomm {

class MpiBootstrap : public Bootstrap {
 public:
  // Collective over `comm`, which is duplicated so epcomm traffic never matches user messages.
  // Every all-gather and barrier is non-blocking MPI polled against `timeout_s`.
  // MPI must be initialized; destroy the bootstrap (and every EpBuffer) before MPI_Finalize.
  explicit MpiBootstrap(MPI_Comm comm = MPI_COMM_WORLD, double timeout_s = 300.0);
  ~MpiBootstrap() override;
  MpiBootstrap(const MpiBootstrap&) = delete;
  MpiBootstrap& operator=(const MpiBootstrap&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void allGather(const void* send, void* recv, size_t bytes) override;
  void barrier() override;

  MPI_Comm comm() const { return comm_; }

 private:
  void waitRequest(MPI_Request* request, const char* what);

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
  double timeout_s_;
};

}  // namespace epcomm
