// SPDX-License-Identifier: Apache-2.0
// fd passing between the ranks of one host (see fd_exchange.hpp for the contract and the threat
// model).
//
// Collective steps, identical on every rank whatever happens locally, so a failure on one rank
// becomes an error on every rank instead of a hang:
//   1. local: check the arguments, draw this rank's secret, bind a listener on a random name
//      (another one if the name is taken); all-gather the directory record {ok, pid, uid, name,
//      secret}. Every listener exists before anyone connects.
//   2. check the directory (every local peer listens, same uid); all-gather {ok}.
//   3. socket phase (local ranks only), then all-gather {ok}: the exchange succeeded everywhere.
// A rank that failed rethrows its own error; the others throw Error(kRemote) naming it.
//
// Socket phase (uds_socket_phase.cpp; sockets, names and secrets: uds.cpp): one poll() loop
// serves the listener, every accepted connection and every outgoing connection at once, so no
// single connection can hold up the others. An accepted connection is refused (closed, with any
// fds it brought) unless SO_PEERCRED shows our uid and the pid of a local peer, and its hello
// names this rank as receiver, claims the rank whose published pid it has, carries that rank's
// secret and exactly one fd. An outgoing connection checks that the listener is the published
// pid before the secret goes out.
#include "memory/fd_exchange.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>

#include "check.hpp"
#include "memory/uds.hpp"

namespace epcomm::memory {

namespace {

using uds::kMaxNameBytes;

// One rank's entry of the directory all-gather (step 1). Native layout: compared only between
// ranks of one build; fields of ranks on other hosts are ignored except `ok`.
struct DirectoryRecord {
  uint8_t ok;
  uint8_t name_length;
  uint8_t pad[2];
  int32_t pid;
  uint32_t uid;
  uint32_t pad2;
  char name[kMaxNameBytes];
  FdSecret secret;
};
static_assert(sizeof(DirectoryRecord) == 112, "DirectoryRecord is a fixed 112-byte record");

// "1, 3": the ranks whose status is 0.
std::string failedRanks(const std::vector<uint8_t>& ok) {
  std::string failed;
  for (size_t r = 0; r < ok.size(); ++r) {
    if (ok[r] == 0) failed += (failed.empty() ? "" : ", ") + std::to_string(r);
  }
  return failed;
}

// Step of the collective protocol: all-gathers this rank's status and throws on every rank if
// any rank failed. A failing rank rethrows its own error, even if the all-gather itself fails.
void agree(Bootstrap& bootstrap, const std::exception_ptr& local_error, const char* phase) {
  const uint8_t mine = local_error ? 0 : 1;
  std::vector<uint8_t> all(static_cast<size_t>(bootstrap.size()));
  try {
    bootstrap.allGather(&mine, all.data(), 1);
  } catch (...) {
    if (local_error) std::rethrow_exception(local_error);
    throw;
  }
  if (local_error) std::rethrow_exception(local_error);
  const std::string failed = failedRanks(all);
  EPCOMM_CHECK_CODE(failed.empty(), ErrorCode::kRemote,
                    "exchangeFds stopped: rank(s) " << failed << " failed while " << phase
                                                    << " (see their error messages)");
}

}  // namespace

std::vector<UniqueFd> exchangeFds(Bootstrap& bootstrap, int my_fd, double timeout_s,
                                  const FdExchangeOptions& options) {
  const int rank = bootstrap.rank();
  const int size = bootstrap.size();
  const std::vector<int>& local = bootstrap.localRanks();
  const bool has_peers = local.size() > 1;
  std::vector<UniqueFd> result(static_cast<size_t>(size));
  FdExchangeReport scratch_report;
  FdExchangeReport& report = options.report ? *options.report : scratch_report;
  report = FdExchangeReport{};

  // Step 1: arguments, this rank's secret and listener, then the directory.
  std::exception_ptr error;
  DirectoryRecord mine{};
  UniqueFd listener;
  try {
    EPCOMM_ARG_CHECK(std::isfinite(timeout_s) && timeout_s > 0, "exchangeFds timeout_s", timeout_s,
                     "a positive number of seconds");
    EPCOMM_ARG_CHECK(!has_peers || ::fcntl(my_fd, F_GETFD) >= 0, "exchangeFds my_fd", my_fd,
                     "an open file descriptor");
    mine.pid = static_cast<int32_t>(::getpid());
    mine.uid = static_cast<uint32_t>(::getuid());
    if (has_peers) {
      uds::fillRandom(mine.secret.data(), mine.secret.size());
      listener = uds::listenOnFreshName(options, static_cast<int>(local.size()) + 16,
                                        &report.listen_name, &report.listen_attempts);
      mine.name_length = static_cast<uint8_t>(report.listen_name.size());
      std::memcpy(mine.name, report.listen_name.data(), report.listen_name.size());
    }
  } catch (...) {
    error = std::current_exception();
  }
  mine.ok = error ? 0 : 1;
  std::vector<DirectoryRecord> records(static_cast<size_t>(size));
  try {
    bootstrap.allGather(&mine, records.data(), sizeof(DirectoryRecord));
  } catch (...) {
    if (error) std::rethrow_exception(error);
    throw;
  }
  if (error) std::rethrow_exception(error);
  {
    std::vector<uint8_t> oks;
    for (const DirectoryRecord& record : records) oks.push_back(record.ok);
    const std::string failed = failedRanks(oks);
    EPCOMM_CHECK_CODE(failed.empty(), ErrorCode::kRemote,
                      "exchangeFds stopped: rank(s) "
                          << failed
                          << " rejected their arguments or could not listen (see their error "
                             "messages)");
  }

  // Step 2: every local peer listens, as our uid. A rank that disagrees about who shares this
  // host (or runs as another user) fails here, on every rank, instead of at the deadline.
  FdExchangeDirectory directory;
  directory.name.resize(static_cast<size_t>(size));
  directory.pid.assign(static_cast<size_t>(size), 0);
  directory.secret.assign(static_cast<size_t>(size), FdSecret{});
  try {
    for (int peer : local) {
      const DirectoryRecord& record = records[static_cast<size_t>(peer)];
      const size_t p = static_cast<size_t>(peer);
      EPCOMM_CHECK(record.name_length <= kMaxNameBytes, "rank " << peer << " published a "
                                                                << int{record.name_length}
                                                                << "-byte socket name");
      directory.name[p].assign(record.name, record.name_length);
      directory.pid[p] = static_cast<pid_t>(record.pid);
      directory.secret[p] = record.secret;
      if (peer == rank || !has_peers) continue;
      EPCOMM_CHECK(!directory.name[p].empty() && record.pid > 0,
                   "exchangeFds: rank " << peer << " is on this host as this rank sees it, but "
                                        << "it does not listen for fds: the ranks disagree about "
                                           "which ranks share this host (host identity = "
                                           "hostname + boot id)");
      EPCOMM_CHECK_CODE(record.uid == mine.uid, ErrorCode::kUnsupported,
                        "exchangeFds: rank " << peer << " runs as uid " << record.uid
                                             << ", this rank as uid " << mine.uid
                                             << "; fds are exchanged only within one user");
    }
  } catch (...) {
    error = std::current_exception();
  }
  agree(bootstrap, error, "checking the published socket directory");

  // Step 3: the socket phase.
  try {
    if (options.before_exchange) options.before_exchange(directory);
    if (has_peers) {
      uds::runSocketPhase(rank, local, directory, listener.get(), my_fd, timeout_s, &report.refused,
                          options.before_send, &result);
    }
  } catch (...) {
    error = std::current_exception();
  }
  // Refuse late or stray connections from here on; queued, unaccepted ones (and their fds) are
  // released by the kernel with the listener.
  listener.reset();
  agree(bootstrap, error, "exchanging fds");
  return result;
}

}  // namespace epcomm::memory
