// SPDX-License-Identifier: Apache-2.0
// Sockets, names and secrets for the fd exchange (uds.hpp).
#include "memory/uds.hpp"

#include <errno.h>
#include <fcntl.h>
#include <sys/random.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "check.hpp"

namespace epcomm::memory {

UniqueFd& UniqueFd::operator=(UniqueFd&& other) noexcept {
  if (this != &other) reset(other.release());
  return *this;
}

void UniqueFd::reset(int fd) {
  // close() is not retried on EINTR: Linux releases the descriptor even then, and a retry could
  // close a descriptor another thread has just been given.
  if (fd_ >= 0 && fd_ != fd) ::close(fd_);
  fd_ = fd;
}

bool secretsEqual(const FdSecret& a, const FdSecret& b) {
  // Accumulate every difference; the volatile sink keeps the compiler from adding an early exit.
  volatile uint8_t diff = 0;
  for (size_t i = 0; i < kFdSecretBytes; ++i) diff = static_cast<uint8_t>(diff | (a[i] ^ b[i]));
  return diff == 0;
}

namespace uds {
namespace {

constexpr int kMaxListenAttempts = 16;

std::string randomName() {
  uint8_t bytes[16];
  fillRandom(bytes, sizeof(bytes));
  std::string name = "epcomm-";
  static const char kHex[] = "0123456789abcdef";
  for (uint8_t b : bytes) {
    name += kHex[b >> 4];
    name += kHex[b & 15];
  }
  return name;
}

}  // namespace

void fillRandom(void* out, size_t n) {
  auto* bytes = static_cast<uint8_t*>(out);
  size_t got = 0;
  while (got < n) {
    const ssize_t r = ::getrandom(bytes + got, n - got, 0);
    if (r > 0) {
      got += static_cast<size_t>(r);
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == ENOSYS || errno == EPERM)) break;
    detail::throwSystem(errno, "getrandom", __FILE__, __LINE__);
  }
  if (got == n) return;
  UniqueFd urandom(::open("/dev/urandom", O_RDONLY | O_CLOEXEC));
  if (urandom.get() < 0) detail::throwSystem(errno, "open(/dev/urandom)", __FILE__, __LINE__);
  while (got < n) {
    const ssize_t r = ::read(urandom.get(), bytes + got, n - got);
    if (r > 0) {
      got += static_cast<size_t>(r);
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    detail::throwSystem(r < 0 ? errno : EIO, "read(/dev/urandom)", __FILE__, __LINE__);
  }
}

sockaddr_un abstractAddress(const std::string& name, socklen_t* length) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  // sun_path[0] stays '\0' (abstract); the name is not NUL-terminated, its length is in `length`.
  std::memcpy(address.sun_path + 1, name.data(), name.size());
  *length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
  return address;
}

UniqueFd makeSocket() {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  EPCOMM_SYS_CHECK(fd);
  return UniqueFd(fd);
}

UniqueFd listenOnFreshName(const FdExchangeOptions& options, int backlog, std::string* name,
                           int* attempts) {
  for (int attempt = 0; attempt < kMaxListenAttempts; ++attempt) {
    *attempts = attempt + 1;
    std::string candidate = options.listen_name ? options.listen_name(attempt) : std::string();
    if (candidate.empty()) candidate = randomName();
    EPCOMM_CHECK(candidate.size() <= kMaxNameBytes, "socket name too long: " << candidate);
    UniqueFd fd = makeSocket();
    socklen_t length = 0;
    const sockaddr_un address = abstractAddress(candidate, &length);
    if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&address), length) < 0) {
      if (errno == EADDRINUSE) continue;
      detail::throwSystem(errno, ("bind(\"@" + candidate + "\")").c_str(), __FILE__, __LINE__);
    }
    EPCOMM_SYS_CHECK(::listen(fd.get(), backlog));
    *name = candidate;
    return fd;
  }
  throw SystemError(EADDRINUSE,
                    detail::formatMessage("exchangeFds: " + std::to_string(kMaxListenAttempts) +
                                              " random abstract socket names were all in use; "
                                              "is something squatting every name?",
                                          __FILE__, __LINE__));
}

bool peerCredentials(int fd, ucred* cred) {
  socklen_t length = sizeof(*cred);
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, cred, &length) != 0) return false;
  if (length == sizeof(*cred)) return true;
  errno = EPROTO;
  return false;
}

}  // namespace uds
}  // namespace epcomm::memory
