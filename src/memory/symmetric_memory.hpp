// SPDX-License-Identifier: Apache-2.0
// One symmetric GPU allocation per rank, mapped into every other rank of the group.
//
// Mode selection (docs/design.md §3): fabric VMM if a real create/export/import probe passes on
// every rank, else POSIX-fd VMM, else cudaMalloc + CUDA IPC. A forced mode that cannot work fails
// on every rank with the failing rank's reason. Sizes that differ across ranks, and ranks spread
// over several hosts without fabric, fail on every rank. What differs between the modes lives in
// one SharingMode per mode (sharing_mode.hpp); this class runs the collective protocol.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "epcomm/bootstrap.hpp"
#include "epcomm/config.hpp"

namespace epcomm::memory {

struct Mapping;
class SharingMode;

class SymmetricMemory {
 public:
  // Collective. `bytes` is rounded up to the allocation granularity. A `requested` mode other
  // than kAuto is forced; `forced_by` names where that came from for error messages.
  static std::unique_ptr<SymmetricMemory> create(Bootstrap& bootstrap, int device, size_t bytes,
                                                 MemMode requested, const std::string& forced_by,
                                                 double timeout_s);
  // Unmaps the peers, then frees this rank's memory (after a bootstrap barrier in cuda_ipc mode,
  // where freeing before the importers closed is undefined). The caller must already have made
  // sure no kernel touches any of it. Never throws.
  ~SymmetricMemory();
  SymmetricMemory(const SymmetricMemory&) = delete;
  SymmetricMemory& operator=(const SymmetricMemory&) = delete;

  MemMode mode() const { return mode_; }
  size_t bytes() const { return bytes_; }
  void* local() const { return peers_[rank_]; }
  void* peer(int rank) const { return peers_[rank]; }
  const std::vector<void*>& peers() const { return peers_; }

 private:
  SymmetricMemory(Bootstrap& bootstrap, int device);
  // Allocates, exchanges and maps in `mode` (consumed: its transient state, such as received fds,
  // ends with the imports). Collective; returns false (on every rank, with the reason) if any
  // rank failed, leaving nothing allocated.
  bool tryMode(std::unique_ptr<SharingMode> mode, size_t bytes, double timeout_s, std::string* why);
  void releaseAll() noexcept;

  Bootstrap& bootstrap_;
  int device_;
  int rank_;
  MemMode mode_ = MemMode::kAuto;
  bool free_waits_for_peers_ = false;  // of mode_: a barrier between closing imports and freeing
  size_t bytes_ = 0;
  std::vector<void*> peers_;
  std::unique_ptr<Mapping> own_;
  std::vector<std::unique_ptr<Mapping>> imported_;  // one per peer rank (null for this rank)
};

}  // namespace epcomm::memory
