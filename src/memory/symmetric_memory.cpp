// SPDX-License-Identifier: Apache-2.0
// The collective protocol around one SharingMode: probe agreement, allocation, the PeerInfo
// all-gather, imports, failure agreement and teardown order (the modes: sharing_mode.hpp).
#include "memory/symmetric_memory.hpp"

#include <unistd.h>

#include <sstream>

#include "check.hpp"
#include "cuda_resources.hpp"
#include "memory/peer_info.hpp"
#include "memory/sharing_mode.hpp"

namespace epcomm::memory {

namespace {

size_t roundUp(size_t v, size_t to) {
  return (v + to - 1) / to * to;
}

std::unique_ptr<SharingMode> makeSharingMode(MemMode mode, int rank, int device) {
  switch (mode) {
    case MemMode::kFabric:
      return makeFabricMode(device);
    case MemMode::kPosixFd:
      return makePosixFdMode(device);
    case MemMode::kCudaIpc:
      return makeCudaIpcMode(rank);
    case MemMode::kAuto:
      break;
  }
  EPCOMM_CHECK(false, "no sharing mode for memory mode " << static_cast<int>(mode));
  return nullptr;
}

// All-gathers (ok, reason) and returns the first failing rank's reason, or "" if all are ok.
std::string agreeOnFailure(Bootstrap& bootstrap, bool ok, const std::string& why) {
  PeerInfo mine;
  mine.rank = bootstrap.rank();
  mine.ok = ok ? 1 : 0;
  mine.setError(why);
  const std::vector<PeerInfo> all = allGatherPeerInfo(bootstrap, mine);
  for (int r = 0; r < bootstrap.size(); ++r) {
    if (!all[r].ok) return "rank " + std::to_string(r) + ": " + all[r].errorText();
  }
  return "";
}

}  // namespace

// --- SymmetricMemory ---------------------------------------------------------------------------

SymmetricMemory::SymmetricMemory(Bootstrap& bootstrap, int device)
    : bootstrap_(bootstrap), device_(device), rank_(bootstrap.rank()) {}

std::unique_ptr<SymmetricMemory> SymmetricMemory::create(Bootstrap& bootstrap, int device,
                                                         size_t bytes, MemMode requested,
                                                         const std::string& forced_by,
                                                         double timeout_s) {
  DeviceGuard guard(device);
  std::unique_ptr<SymmetricMemory> memory(new SymmetricMemory(bootstrap, device));
  const bool forced = requested != MemMode::kAuto;
  std::vector<MemMode> candidates;
  if (forced) {
    candidates = {requested};
  } else {
    candidates = {MemMode::kFabric, MemMode::kPosixFd, MemMode::kCudaIpc};
  }

  std::ostringstream log;
  for (MemMode mode : candidates) {
    std::unique_ptr<SharingMode> sharing = makeSharingMode(mode, memory->rank_, device);
    // Every rank must take the same path: AND the local probes over all ranks.
    std::string why;
    bool ok = sharing->probe(&why);
    if (ok && !sharing->spansHosts() && bootstrap.numNodes() > 1) {
      ok = false;
      why = "the ranks span " + std::to_string(bootstrap.numNodes()) +
            " hosts; only fabric handles cross hosts";
    }
    std::string failure = agreeOnFailure(bootstrap, ok, why);
    EPCOMM_LOG_TRACE("memory mode " << memModeName(mode) << " probe: "
                                    << (failure.empty() ? "usable on every rank" : failure));
    if (failure.empty() && memory->tryMode(std::move(sharing), bytes, timeout_s, &failure)) {
      log << memModeName(mode) << ": selected";
      EPCOMM_LOG_INFO("memory mode " << memModeName(mode)
                                     << (forced ? " (forced by " + forced_by + ")" : "") << ": "
                                     << log.str() << "; " << memory->bytes()
                                     << " symmetric bytes per rank on device " << device);
      return memory;
    }
    log << memModeName(mode) << ": unusable (" << failure << "); ";
    if (forced) {
      EPCOMM_CHECK_CODE(false, ErrorCode::kUnsupported,
                        "memory mode '" << memModeName(mode) << "' was forced by " << forced_by
                                        << " but cannot be used: " << failure
                                        << ". Use mem_mode auto, or fix the cause above.");
    }
  }
  EPCOMM_CHECK_CODE(false, ErrorCode::kUnsupported,
                    "no memory sharing mode works on this machine: " << log.str());
  return nullptr;
}

bool SymmetricMemory::tryMode(std::unique_ptr<SharingMode> sharing, size_t bytes, double timeout_s,
                              std::string* why) {
  const int num_ranks = bootstrap_.size();
  peers_.assign(num_ranks, nullptr);
  imported_.clear();
  imported_.resize(num_ranks);
  mode_ = sharing->mode();
  free_waits_for_peers_ = sharing->freeWaitsForPeers();

  // 1. allocate locally and describe the allocation
  PeerInfo mine;
  mine.rank = rank_;
  mine.device = device_;
  mine.pid = static_cast<int32_t>(getpid());
  mine.ok = 1;
  try {
    bytes_ = roundUp(bytes, sharing->granularity());
    own_ = sharing->allocate(bytes_, &mine);
    peers_[rank_] = own_->ptr;
  } catch (const std::exception& e) {
    mine.ok = 0;
    mine.setError(e.what());
  }
  mine.bytes = bytes_;

  // 2. exchange descriptions; any failure or size mismatch stops every rank
  const std::vector<PeerInfo> infos = allGatherPeerInfo(bootstrap_, mine);
  for (const PeerInfo& info : infos) {
    if (!info.ok) {
      *why = "rank " + std::to_string(info.rank) + " could not allocate " + std::to_string(bytes) +
             " bytes: " + info.errorText();
      releaseAll();
      return false;
    }
  }
  for (const PeerInfo& info : infos) {
    if (info.bytes != infos[0].bytes) {
      releaseAll();
      EPCOMM_CHECK_CODE(false, ErrorCode::kInvalidArgument,
                        "the symmetric buffer size differs across ranks: rank 0 needs "
                            << infos[0].bytes << " bytes, rank " << info.rank << " needs "
                            << info.bytes
                            << "; every rank must create its EpBuffer with the same BufferConfig");
    }
  }

  // 3. pass on what the records cannot carry, then import and map every peer
  bool ok = true;
  std::string local_why;
  try {
    sharing->exchange(bootstrap_, timeout_s);
    for (int r = 0; r < num_ranks; ++r) {
      if (r == rank_) continue;
      imported_[r] = sharing->import(r, infos[r]);
      peers_[r] = imported_[r]->ptr;
    }
  } catch (const std::exception& e) {
    ok = false;
    local_why = e.what();
  }
  sharing.reset();  // e.g. closes fds received but not imported
  std::string failure = agreeOnFailure(bootstrap_, ok, local_why);
  if (!failure.empty()) {
    *why = "mapping the peers failed on " + failure;
    releaseAll();
    // Everyone has closed its imports before anyone frees (CUDA IPC requires that order).
    bootstrap_.barrier();
    return false;
  }
  if (detail::logEnabled(LogLevel::kInfo)) {
    std::ostringstream map;
    for (const PeerInfo& info : infos) {
      map << " rank " << info.rank << ": device " << info.device << ", pid " << info.pid << ", "
          << peers_[info.rank] << (info.rank == rank_ ? " (own);" : ";");
    }
    EPCOMM_LOG_INFO("peer map (" << memModeName(mode_) << "):" << map.str());
  }
  return true;
}

void SymmetricMemory::releaseAll() noexcept {
  imported_.clear();
  own_.reset();
  peers_.assign(peers_.size(), nullptr);
}

SymmetricMemory::~SymmetricMemory() {
  try {
    DeviceGuard guard(device_);
    imported_.clear();
    if (free_waits_for_peers_) {
      // Freeing memory a peer still has open is undefined for CUDA IPC.
      try {
        bootstrap_.barrier();
      } catch (const std::exception& e) {
        detail::logWarning(std::string("teardown barrier failed: ") + e.what(), __FILE__, __LINE__);
      }
    }
    own_.reset();
  } catch (const std::exception& e) {
    detail::logWarning(std::string("symmetric memory teardown: ") + e.what(), __FILE__, __LINE__);
  }
}

}  // namespace epcomm::memory
