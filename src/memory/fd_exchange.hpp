// Passes POSIX file descriptors between the processes of one host: every local rank sends one fd
// to every other local rank with SCM_RIGHTS over an abstract-namespace Unix socket whose name
// carries a per-job random token (shared through the bootstrap). Each accepted connection's peer
// uid is checked with SO_PEERCRED, every socket call is bounded by the deadline, and received fds
// are close-on-exec.
#pragma once

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

// Collective over every rank of `bootstrap` (ranks on other hosts take part in the token and
// barrier steps only). Sends `my_fd` (not consumed) to every other rank on this host and
// returns one fd per global rank: result[r] is rank r's fd for ranks on this host other than
// this one, and empty otherwise. Throws epcomm::TimeoutError naming the peer on a missed deadline,
// epcomm::SystemError on socket failures, epcomm::Error(kUnsupported) on a uid mismatch.
std::vector<UniqueFd> exchangeFds(Bootstrap& bootstrap, int my_fd, double timeout_s);

}  // namespace epcomm::memory
