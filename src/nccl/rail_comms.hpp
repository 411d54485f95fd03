// SPDX-License-Identifier: Apache-2.0
// NCCL communicators for epcomm across nodes: one per rail (local index), spanning the nodes.
// Internal to epcomm_nccl; the only translation units that include nccl.h are in src/nccl/.
//
// Rail l links rank (node n, local l) of every node n: its NCCL rank is the node index and its
// size the node count (docs/scale-out.md). The unique id is made by the rail's rank on node 0
// and travels through the epcomm Bootstrap (one all-gather for all rails), so MPI and framework
// bootstraps both work and NCCL's own bootstrap is only used inside each rail.
//
// Deadlines (CONVENTIONS 7): communicators are created non-blocking (ncclConfig_t::blocking = 0)
// and polled with ncclCommGetAsyncError; past the deadline the communicator is aborted
// (ncclCommAbort, local, never waits for peers) and the error names the rail and its ranks.
// Creation is voted (core::agreeOn): it fails on every rank together or on none.
#pragma once

#include <nccl.h>

#include <string>
#include <vector>

#include "core/topology.hpp"
#include "epcomm/bootstrap.hpp"

namespace epcomm::nccl {

// "ncclSystemError: <ncclGetErrorString> (<ncclGetLastError>)" for messages.
std::string describeResult(ncclResult_t result, ncclComm_t comm);

// Throws Error(kSystem): "<what> failed: <describeResult>".
[[noreturn]] void throwNccl(ncclResult_t result, ncclComm_t comm, const std::string& what,
                            const char* file, int line);

// Checks an NCCL call; ncclInProgress (a non-blocking communicator) is not an error here: the
// caller polls it to completion with waitReady.
#define EPCOMM_NCCL_CHECK(call, comm)                                                    \
  do {                                                                                   \
    ncclResult_t epcomm_nccl_result_ = (call);                                           \
    if (epcomm_nccl_result_ != ncclSuccess && epcomm_nccl_result_ != ncclInProgress)     \
      ::epcomm::nccl::throwNccl(epcomm_nccl_result_, (comm), #call, __FILE__, __LINE__); \
  } while (0)

// "0,2,4".
std::string rankList(const std::vector<int>& ranks);

// Owner of one ncclComm_t. Move-only. The destructor never throws and never waits for peers:
// a communicator that was finalized is destroyed, any other is aborted.
class NcclComm {
 public:
  NcclComm() = default;
  explicit NcclComm(ncclComm_t comm) : comm_(comm) {}
  NcclComm(NcclComm&& other) noexcept;
  NcclComm& operator=(NcclComm&& other) noexcept;
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;
  ~NcclComm();

  ncclComm_t get() const { return comm_; }
  explicit operator bool() const { return comm_ != nullptr; }

  // Local: aborts the communicator now (any NCCL op on it ends with an error) and releases it.
  void abort() noexcept;
  // Collective over the communicator: flushes its work (ncclCommFinalize) within `timeout_s`,
  // then destroys it. On timeout it aborts and throws TimeoutError naming `what`.
  void finalize(double timeout_s, const std::string& what);

 private:
  void reset() noexcept;
  ncclComm_t comm_ = nullptr;
};

// Polls a non-blocking communicator until its pending call (init, finalize, a grouped launch)
// completes, for at most `timeout_s`. On an error, or past the deadline, aborts `comm` and throws
// (TimeoutError with `peer` for a deadline; Error(kSystem) naming the NCCL result otherwise).
// `what` names the phase and the ranks involved, for the message.
void waitReady(NcclComm& comm, double timeout_s, int peer, const std::string& what);

// This rank's rail communicator.
struct RailComm {
  int rail = 0;                 // == topology.local
  int rail_rank = 0;            // == topology.node
  int rail_size = 1;            // == topology.num_nodes
  std::vector<int> rail_ranks;  // global rank of each rail rank (node order)
  NcclComm comm;
};

// Collective over `bootstrap` (every rank of the job): checks that every rank runs the same NCCL
// version, exchanges the rail unique ids and creates this rank's rail communicator on the current
// CUDA device (call selectDevice first), within `timeout_s`. Fails on every rank together: the
// failing rank with its own error, the others with kRemote naming it.
RailComm createRailComm(Bootstrap& bootstrap, const core::Topology& topology, double timeout_s);

// A fresh ncclUniqueId as a rail id (ncclGetUniqueId: opens NCCL's bootstrap listening socket;
// needs no GPU). createRailComm calls it on each rail's root.
core::RailId newRailUniqueId();

// The NCCL version of the loaded library, as "2.28.9" (ncclGetVersion), and the one compiled.
std::string runtimeVersion();
const char* buildVersion();

}  // namespace epcomm::nccl
