// SPDX-License-Identifier: Apache-2.0
// Bootstrap over a duplicated MPI communicator. Every collective is non-blocking and polled
// against a deadline, so a rank that never arrives becomes a TimeoutError instead of a hang.
#include "epcomm/mpi_bootstrap.hpp"

#include <chrono>
#include <climits>
#include <cstdint>
#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "check.hpp"
#include "epcomm/config.hpp"

namespace epcomm {

namespace {

// Between two MPI_Test calls: short enough to add little latency to bootstrap steps (which are
// rare), long enough not to burn a core that a co-located rank may need to make progress.
constexpr auto kPollInterval = std::chrono::microseconds(50);

std::string mpiErrorText(int status) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  if (MPI_Error_string(status, text, &length) != MPI_SUCCESS) {
    return "MPI error " + std::to_string(status);
  }
  return std::string(text, static_cast<size_t>(length)) + " (" + std::to_string(status) + ")";
}

[[noreturn]] void throwMpi(int status, const char* call, const char* file, int line) {
  throw MpiError(status, detail::formatMessage(
                             std::string(call) + " failed: " + mpiErrorText(status), file, line));
}

bool mpiUsable() {
  int initialized = 0;
  int finalized = 0;
  if (MPI_Initialized(&initialized) != MPI_SUCCESS || MPI_Finalized(&finalized) != MPI_SUCCESS) {
    return false;
  }
  return initialized != 0 && finalized == 0;
}

}  // namespace

// Local to this file: the core library never includes mpi.h, so check.hpp cannot define it.
#define EPCOMM_MPI_CHECK(call)                                 \
  do {                                                         \
    int epcomm_mpi_status_ = (call);                           \
    if (epcomm_mpi_status_ != MPI_SUCCESS)                     \
      throwMpi(epcomm_mpi_status_, #call, __FILE__, __LINE__); \
  } while (0)

MpiBootstrap::MpiBootstrap(MPI_Comm comm, double timeout_s)
    : timeout_s_(timeout_s < 0 ? resolveBootstrapTimeout(timeout_s) : timeout_s) {
  if (!mpiUsable()) {
    throw MpiError(MPI_ERR_OTHER,
                   detail::formatMessage("MpiBootstrap needs an initialized MPI (call MPI_Init "
                                         "first, and destroy the bootstrap before MPI_Finalize)",
                                         __FILE__, __LINE__));
  }
  EPCOMM_ARG_CHECK(comm != MPI_COMM_NULL, "MpiBootstrap comm", "MPI_COMM_NULL",
                   "a valid communicator");
  EPCOMM_ARG_CHECK(timeout_s_ > 0 && timeout_s_ <= 1e9, "MpiBootstrap timeout_s", timeout_s_,
                   "in (0, 1e9] seconds");
  EPCOMM_MPI_CHECK(MPI_Comm_rank(comm, &rank_));
  EPCOMM_MPI_CHECK(MPI_Comm_size(comm, &size_));
  detail::setProcessRank(rank_);
  // The duplication is itself collective, so it gets the deadline too (MPI_Comm_idup rather
  // than a blocking MPI_Comm_dup that would hang if a rank never constructs its bootstrap). On
  // a timeout MPI may still write the new handle later, so the slot is leaked, never freed.
  auto dup = std::make_unique<MPI_Comm>(MPI_COMM_NULL);
  MPI_Request request = MPI_REQUEST_NULL;
  EPCOMM_MPI_CHECK(MPI_Comm_idup(comm, dup.get(), &request));
  try {
    waitRequest(&request, "MpiBootstrap constructor (MPI_Comm_idup)");
  } catch (const TimeoutError&) {
    (void)dup.release();
    throw;
  }
  comm_ = *dup;
  try {
    // Errors on our private communicator come back as codes (and become MpiError) instead of
    // aborting the job; the user's communicator keeps its own handler.
    EPCOMM_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
    initLocalGroup();
  } catch (...) {
    // The destructor does not run for a throwing constructor.
    if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
    throw;
  }
}

MpiBootstrap::~MpiBootstrap() {
  // After MPI_Finalize any MPI call is erroneous, so a bootstrap that outlives MPI just leaks
  // its handle (the process is ending anyway).
  if (comm_ == MPI_COMM_NULL || !mpiUsable()) return;
  const int status = MPI_Comm_free(&comm_);
  if (status != MPI_SUCCESS) {
    detail::logWarning("MPI_Comm_free failed: " + mpiErrorText(status), __FILE__, __LINE__);
  }
}

void MpiBootstrap::waitRequest(MPI_Request* request, const char* what) {
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                    std::chrono::duration<double>(timeout_s_));
  for (;;) {
    int done = 0;
    EPCOMM_MPI_CHECK(MPI_Test(request, &done, MPI_STATUS_IGNORE));
    if (done) return;
    if (std::chrono::steady_clock::now() >= deadline) break;
    std::this_thread::sleep_for(kPollInterval);
  }
  // A pending non-blocking collective can be neither cancelled nor freed (MPI forbids both) and
  // may still complete later, when the missing ranks arrive; collectives issued after it would
  // then be mismatched. So the bootstrap becomes unusable (every later call fails with kBroken),
  // and the communicator is deliberately leaked rather than freed: Open MPI 4.1 crashes when it
  // progresses a pending collective of a freed communicator.
  comm_ = MPI_COMM_NULL;
  std::ostringstream os;
  os << what << " did not complete within " << timeout_s_ << " s on a communicator of " << size_
     << " ranks. Which ranks are missing is unknown (MPI does not say): look for a rank that "
        "failed, hangs elsewhere or did not call the same collective. This bootstrap is "
        "unusable now; recreate it.";
  throw TimeoutError(-1, detail::formatMessage(os.str(), __FILE__, __LINE__));
}

void MpiBootstrap::allGather(const void* send, void* recv, size_t bytes) {
  EPCOMM_CHECK_CODE(comm_ != MPI_COMM_NULL, ErrorCode::kBroken,
                    "MpiBootstrap::allGather on a bootstrap that timed out earlier; recreate it");
  EPCOMM_ARG_CHECK(
      bytes == 0 || (send != nullptr && recv != nullptr), "MpiBootstrap::allGather buffers",
      (send == nullptr ? "send = nullptr" : "recv = nullptr"), "non-null when bytes > 0");
  // Agree on the size first. An all-gather whose counts differ across ranks is erroneous MPI:
  // Open MPI reports MPI_ERR_TRUNCATE on some ranks (through MPI_COMM_WORLD's handler, which
  // aborts the job) and hands others partial data. With the sizes known everywhere, every rank
  // takes the same decision.
  const uint64_t my_bytes = bytes;
  std::vector<uint64_t> sizes(static_cast<size_t>(size_));
  gather(&my_bytes, sizes.data(), sizeof(my_bytes),
         "MpiBootstrap::allGather (MPI_Iallgather of every rank's size, before " +
             std::to_string(bytes) + " bytes per rank)");
  for (int r = 0; r < size_; ++r) {
    if (sizes[static_cast<size_t>(r)] == sizes[0]) continue;
    std::ostringstream os;
    os << "MpiBootstrap::allGather: the ranks passed different sizes (bytes per rank:";
    for (int q = 0; q < size_ && q < 16; ++q) {
      os << " rank " << q << " = " << sizes[static_cast<size_t>(q)] << ";";
    }
    if (size_ > 16) os << " ...";
    os << " this rank passed " << bytes
       << "). Every rank must gather the same number of bytes; nothing was exchanged.";
    throw MpiError(MPI_ERR_COUNT, detail::formatMessage(os.str(), __FILE__, __LINE__));
  }
  // The same on every rank now, so every rank takes this branch together.
  EPCOMM_ARG_CHECK(bytes <= static_cast<size_t>(INT_MAX), "MpiBootstrap::allGather bytes", bytes,
                   "<= " << INT_MAX << " (an MPI count)");
  gather(
      send, recv, bytes,
      "MpiBootstrap::allGather (MPI_Iallgather of " + std::to_string(bytes) + " bytes per rank)");
}

void MpiBootstrap::gather(const void* send, void* recv, size_t bytes, const std::string& what) {
  // MPI writes into our own staging buffers, not the caller's: if the deadline passes, the
  // request stays pending inside MPI and may complete later, and it must not write into memory
  // the caller has freed by then. The copies cost nothing next to a bootstrap round trip.
  const size_t total = bytes * static_cast<size_t>(size_);
  auto staged_send = std::make_unique<std::vector<unsigned char>>(bytes);
  auto staged_recv = std::make_unique<std::vector<unsigned char>>(total);
  if (bytes > 0) std::memcpy(staged_send->data(), send, bytes);

  const int count = static_cast<int>(bytes);
  MPI_Request request = MPI_REQUEST_NULL;
  EPCOMM_MPI_CHECK(MPI_Iallgather(staged_send->data(), count, MPI_BYTE, staged_recv->data(), count,
                                  MPI_BYTE, comm_, &request));
  try {
    waitRequest(&request, what.c_str());
  } catch (const TimeoutError&) {
    // Deliberate leak: MPI may still write into these after we give up on the request.
    (void)staged_send.release();
    (void)staged_recv.release();
    throw;
  }
  if (total > 0) std::memcpy(recv, staged_recv->data(), total);
}

void MpiBootstrap::barrier() {
  EPCOMM_CHECK_CODE(comm_ != MPI_COMM_NULL, ErrorCode::kBroken,
                    "MpiBootstrap::barrier on a bootstrap that timed out earlier; recreate it");
  MPI_Request request = MPI_REQUEST_NULL;
  EPCOMM_MPI_CHECK(MPI_Ibarrier(comm_, &request));
  waitRequest(&request, "MpiBootstrap::barrier (MPI_Ibarrier)");
}

}  // namespace epcomm
