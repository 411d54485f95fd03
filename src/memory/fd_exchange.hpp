// SPDX-License-Identifier: Apache-2.0
// Passes POSIX file descriptors between the processes of one host: every local rank sends one fd
// to every other local rank with SCM_RIGHTS over abstract-namespace Unix sockets.
//
// The abstract namespace is visible to every process of the host (/proc/net/unix), so a socket
// name is public knowledge and never carries a secret. A connection is trusted only when
//   - SO_PEERCRED says it comes from our uid and from the very pid the claimed rank published
//     through the bootstrap, and
//   - it proves that rank's 32-byte secret, drawn with getrandom() and shared through the
//     bootstrap only (compared in constant time).
// Anything else is refused and closed without disturbing the exchange; each rank listens on a
// fresh random name and draws another if something squats it; every connection is served
// concurrently (poll), so a connector that stays silent cannot stall the exchange.
#pragma once

#include <sys/types.h>

#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "epcomm/bootstrap.hpp"

namespace epcomm::memory {

// Move-only owner of a file descriptor; closes it on destruction.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(other.release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept;
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const { return fd_; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

constexpr size_t kFdSecretBytes = 32;
using FdSecret = std::array<uint8_t, kFdSecretBytes>;

// What every rank published through the bootstrap for one exchange, indexed by global rank.
// `name` is empty for ranks that do not listen (no local peer, or on another host).
struct FdExchangeDirectory {
  std::vector<std::string> name;  // abstract socket name, without the leading NUL
  std::vector<pid_t> pid;
  std::vector<FdSecret> secret;
};

// The 48-byte message a rank sends to each local peer; the fd rides on its first byte.
// Host byte order: only ranks of one host (one build) ever exchange it.
struct FdHello {
  uint32_t magic;
  uint16_t version;
  uint16_t reserved;
  int32_t sender;
  int32_t receiver;
  FdSecret secret;  // the sender's secret
};
static_assert(sizeof(FdHello) == 48, "FdHello is a fixed 48-byte wire record");
constexpr uint32_t kFdHelloMagic = 0x46435045u;  // "EPCF" little-endian
constexpr uint16_t kFdHelloVersion = 2;

// What one exchange did on this rank (see FdExchangeOptions::report).
struct FdExchangeReport {
  std::string listen_name;  // the abstract name this rank listened on ("" without local peers)
  int listen_attempts = 0;  // names tried; more than 1 when a name was taken
  // One line per refused connection, e.g. "pid 123 uid 0: wrong secret for rank 1".
  std::vector<std::string> refused;
};

// Optional extras of one exchange; the library passes none. Tests use them to attack the
// protocol at precise points and to see what was refused.
struct FdExchangeOptions {
  // Name to try for listening attempt `attempt` (0, 1, ...); an empty result means "a fresh
  // random name". Lets a test squat the name a rank is about to pick.
  std::function<std::string(int attempt)> listen_name;
  // Called on every rank (also ranks without local peers) once the directory is agreed and
  // before this rank connects or accepts anything. Exceptions count as this rank's failure.
  std::function<void(const FdExchangeDirectory&)> before_exchange;
  // Called when this rank's connection to local rank `peer` is up, just before its fd goes out.
  // Lets a test hold a send until that peer has left the exchange.
  std::function<void(int peer)> before_send;
  // Filled when non-null (refusals: the first 64).
  FdExchangeReport* report = nullptr;
};

// Collective over every rank of `bootstrap` (ranks on other hosts take part in the bootstrap
// steps only). Sends `my_fd` (not consumed) to every other rank on this host and returns one fd
// per global rank: result[r] is rank r's fd for ranks on this host other than this one, and
// empty otherwise. Received fds are close-on-exec. Fails on every rank together: a rank that
// failed rethrows its own error (epcomm::TimeoutError naming the missing peer when the deadline
// passed, epcomm::SystemError on socket failures, InvalidArgument for a bad fd or timeout), the
// others throw Error(kRemote) naming it.
std::vector<UniqueFd> exchangeFds(Bootstrap& bootstrap, int my_fd, double timeout_s,
                                  const FdExchangeOptions& options = {});

// Constant-time equality of two secrets (no early exit on the first differing byte).
bool secretsEqual(const FdSecret& a, const FdSecret& b);

}  // namespace epcomm::memory
