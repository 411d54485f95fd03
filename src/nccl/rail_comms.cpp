// SPDX-License-Identifier: Apache-2.0
// Rail communicators (rail_comms.hpp): unique ids through the Bootstrap, non-blocking creation
// with a deadline, abort on failure, and a vote so that every rank fails together.
#include "nccl/rail_comms.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <sstream>
#include <thread>
#include <utility>

#include "check.hpp"
#include "core/agreement.hpp"

namespace epcomm::nccl {

namespace {

static_assert(sizeof(ncclUniqueId) <= core::kRailIdBytes, "an ncclUniqueId fits a rail id");

using Clock = std::chrono::steady_clock;

}  // namespace

std::string rankList(const std::vector<int>& ranks) {
  std::ostringstream os;
  for (size_t i = 0; i < ranks.size(); ++i) os << (i ? "," : "") << ranks[i];
  return os.str();
}

namespace {

std::string versionText(int code) {
  // NCCL_VERSION(X, Y, Z) = X * 10000 + Y * 100 + Z since 2.9.
  std::ostringstream os;
  os << code / 10000 << "." << (code / 100) % 100 << "." << code % 100;
  return os.str();
}

}  // namespace

void throwNccl(ncclResult_t result, ncclComm_t comm, const std::string& what, const char* file,
               int line) {
  detail::throwError(ErrorCode::kSystem, what + " failed: " + describeResult(result, comm), file,
                     line);
}

std::string describeResult(ncclResult_t result, ncclComm_t comm) {
  std::string text = std::string(ncclGetErrorString(result));
  const char* last = ncclGetLastError(comm);
  if (last != nullptr && last[0] != '\0') text += " (" + std::string(last) + ")";
  return text;
}

NcclComm::NcclComm(NcclComm&& other) noexcept : comm_(std::exchange(other.comm_, nullptr)) {}

NcclComm& NcclComm::operator=(NcclComm&& other) noexcept {
  if (this != &other) {
    reset();
    comm_ = std::exchange(other.comm_, nullptr);
  }
  return *this;
}

NcclComm::~NcclComm() {
  reset();
}

// A communicator that was not finalized may still have work in flight or peers that never came:
// ncclCommAbort stops it without waiting for anyone, where ncclCommDestroy could block.
void NcclComm::reset() noexcept {
  abort();
}

void NcclComm::abort() noexcept {
  if (comm_ == nullptr) return;
  const ncclResult_t result = ncclCommAbort(comm_);
  if (result != ncclSuccess) {
    detail::logWarning("ncclCommAbort failed: " + std::string(ncclGetErrorString(result)), __FILE__,
                       __LINE__);
  }
  comm_ = nullptr;
}

void NcclComm::finalize(double timeout_s, const std::string& what) {
  if (comm_ == nullptr) return;
  EPCOMM_NCCL_CHECK(ncclCommFinalize(comm_), comm_);
  waitReady(*this, timeout_s, -1, what + " (ncclCommFinalize)");
  ncclComm_t comm = std::exchange(comm_, nullptr);
  const ncclResult_t result = ncclCommDestroy(comm);
  if (result != ncclSuccess) throwNccl(result, nullptr, "ncclCommDestroy", __FILE__, __LINE__);
}

void waitReady(NcclComm& comm, double timeout_s, int peer, const std::string& what) {
  EPCOMM_CHECK(static_cast<bool>(comm), "waitReady on an empty communicator (" << what << ")");
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(timeout_s));
  // Short sleeps: creation takes milliseconds to seconds, and this thread has nothing else to do.
  auto pause = std::chrono::microseconds(20);
  for (;;) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t polled = ncclCommGetAsyncError(comm.get(), &state);
    if (polled != ncclSuccess) state = polled;
    if (state == ncclSuccess) return;
    if (state != ncclInProgress) {
      const std::string reason = describeResult(state, comm.get());
      comm.abort();
      detail::throwError(ErrorCode::kSystem, what + " failed: " + reason, __FILE__, __LINE__);
    }
    if (Clock::now() >= deadline) {
      comm.abort();
      std::ostringstream os;
      os << what << " did not complete within " << timeout_s << " s";
      if (peer >= 0) os << "; waiting for rank " << peer;
      os << ". The communicator was aborted (ncclCommAbort). Is every rank running, and can the "
            "nodes reach each other (NCCL_SOCKET_IFNAME, NCCL_DEBUG=INFO)?";
      throw TimeoutError(peer, detail::formatMessage(os.str(), __FILE__, __LINE__));
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(5000));
  }
}

std::string runtimeVersion() {
  int code = 0;
  const ncclResult_t result = ncclGetVersion(&code);
  if (result != ncclSuccess) throwNccl(result, nullptr, "ncclGetVersion", __FILE__, __LINE__);
  return versionText(code);
}

const char* buildVersion() {
  return EPCOMM_NCCL_BUILD_VERSION;
}

core::RailId newRailUniqueId() {
  ncclUniqueId unique;
  EPCOMM_NCCL_CHECK(ncclGetUniqueId(&unique), nullptr);
  core::RailId out{};
  std::memcpy(out.bytes, &unique, sizeof(unique));
  return out;
}

RailComm createRailComm(Bootstrap& bootstrap, const core::Topology& topology, double timeout_s) {
  EPCOMM_CHECK(topology.size == bootstrap.size() && topology.rank == bootstrap.rank(),
               "topology of rank " << topology.rank << " of " << topology.size
                                   << " used with bootstrap rank " << bootstrap.rank() << " of "
                                   << bootstrap.size());
  // 1. The same NCCL everywhere: two versions on one rail is undefined behaviour in NCCL.
  struct VersionPayload {
    int32_t code;
  };
  const std::vector<VersionPayload> versions =
      core::agreeOn<VersionPayload>(bootstrap, "NCCL version", [] {
        int code = 0;
        EPCOMM_NCCL_CHECK(ncclGetVersion(&code), nullptr);
        return VersionPayload{code};
      });
  for (int r = 0; r < topology.size; ++r) {
    EPCOMM_CHECK_CODE(versions[r].code == versions[0].code, ErrorCode::kUnsupported,
                      "rank " << r << " runs NCCL " << versionText(versions[r].code)
                              << " and rank 0 NCCL " << versionText(versions[0].code)
                              << ": every rank must load the same NCCL (LD_LIBRARY_PATH, the "
                                 "nvidia-nccl wheel)");
  }

  // 2. One unique id per rail, made by the rail's rank on node 0.
  const core::RailId id = core::exchangeRailId(bootstrap, topology, newRailUniqueId);

  // 3. Non-blocking creation with a deadline, voted: a rank whose rail failed makes every rank
  //    fail (its rail peers could otherwise wait for it until their own deadline, and the other
  //    rails would carry on with a job that cannot run).
  RailComm rail;
  rail.rail = topology.local;
  rail.rail_rank = topology.node;
  rail.rail_size = topology.num_nodes;
  rail.rail_ranks = topology.railRanks(topology.local);
  std::ostringstream what_os;
  what_os << "creating the NCCL communicator of rail " << rail.rail << " (ranks "
          << rankList(rail.rail_ranks) << "; this rank is its rank " << rail.rail_rank << ")";
  const std::string what = what_os.str();

  core::agreeOn<core::NoPayload>(bootstrap, "NCCL rail communicator", [&] {
    ncclUniqueId unique;
    std::memcpy(&unique, id.bytes, sizeof(unique));
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclComm_t raw = nullptr;
    const ncclResult_t result =
        ncclCommInitRankConfig(&raw, rail.rail_size, unique, rail.rail_rank, &config);
    rail.comm = NcclComm(raw);  // owned even if the call failed half-way: aborting frees it
    if (result != ncclSuccess && result != ncclInProgress) {
      const std::string reason = describeResult(result, raw);
      rail.comm.abort();
      detail::throwError(ErrorCode::kSystem, what + " failed: " + reason, __FILE__, __LINE__);
    }
    // The rail's root is the one peer every member needs; name it in a timeout.
    waitReady(rail.comm, timeout_s, rail.rail_ranks[0] == topology.rank ? -1 : rail.rail_ranks[0],
              what);
    return core::NoPayload{0};
  });
  return rail;
}

}  // namespace epcomm::nccl
