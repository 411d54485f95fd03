// SPDX-License-Identifier: Apache-2.0
// One strategy per memory sharing mode behind one interface:
//   fabric VMM          fabric_mode.cpp    (VMM parts shared with POSIX fd: vmm_common.*)
//   POSIX-fd VMM        posix_fd_mode.cpp  (fds pass through fd_exchange.hpp)
//   cudaMalloc + IPC    cuda_ipc_mode.cpp
// SymmetricMemory owns the collective protocol (probe agreement, the PeerInfo all-gather, failure
// agreement, teardown order) and calls a SharingMode for what differs between the modes: how to
// probe, allocate, describe, pass on, import and map one allocation.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "epcomm/bootstrap.hpp"
#include "epcomm/config.hpp"
#include "memory/peer_info.hpp"

namespace epcomm::memory {

// RAII owner of one mapped allocation: this rank's own, or one imported from a peer. The
// destructor unmaps and frees in the mode's order and never throws.
struct Mapping {
  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  virtual ~Mapping() = default;

  void* ptr = nullptr;  // where this process reaches the allocation
};

// One attempt to share memory in one mode, on one rank. The caller runs the steps in this order,
// on every rank: probe (then agrees on the result), granularity + allocate (then all-gathers the
// PeerInfo records and agrees), exchange, import of every peer. Only exchange() is collective.
// Every step may throw; the caller turns that into this rank's failure and agrees on it.
class SharingMode {
 public:
  virtual ~SharingMode() = default;

  virtual MemMode mode() const = 0;
  // Local check that this process can use the mode; false with the reason in `why`. Never throws.
  virtual bool probe(std::string* why) = 0;
  // Whether the mode reaches ranks on other hosts (only fabric handles do).
  virtual bool spansHosts() const { return false; }
  // Whether this rank's memory may be freed only after every peer closed its import (CUDA IPC:
  // the opposite order is undefined). The owner then puts a bootstrap barrier in between.
  virtual bool freeWaitsForPeers() const { return false; }

  // The allocation granularity: the symmetric size is rounded up to a multiple of it.
  virtual size_t granularity() = 0;
  // Allocates and maps `bytes` (a multiple of granularity()) on this rank's device, and puts in
  // `mine` whatever peers need to import it.
  virtual std::unique_ptr<Mapping> allocate(size_t bytes, PeerInfo* mine) = 0;
  // Collective, after every rank allocated: passes what PeerInfo cannot carry (POSIX fds).
  virtual void exchange(Bootstrap& /*bootstrap*/, double /*timeout_s*/) {}
  // Imports and maps the allocation of peer rank `peer_rank`, described by `peer`.
  virtual std::unique_ptr<Mapping> import(int peer_rank, const PeerInfo& peer) = 0;
};

// `device` is the CUDA ordinal every VMM allocation is bound to; CUDA IPC allocates on the current
// device (the caller's DeviceGuard). `rank` is this rank, named in errors.
std::unique_ptr<SharingMode> makeFabricMode(int device);
std::unique_ptr<SharingMode> makePosixFdMode(int device);
std::unique_ptr<SharingMode> makeCudaIpcMode(int rank);

}  // namespace epcomm::memory
