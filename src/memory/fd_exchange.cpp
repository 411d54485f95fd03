// fd passing between the ranks of one host (see fd_exchange.hpp for the contract).
//
// Collective steps, identical on every rank whatever happens locally, so a failure on one rank
// becomes an error on every rank instead of a hang:
//   1. all-gather {token, ok}: arguments checked, rank 0's random token distributed;
//   2. all-gather {ok}: every listener is bound (nobody connects before this);
//   3. socket phase (local ranks only), then all-gather {ok}: the exchange succeeded everywhere.
// A rank that failed rethrows its own error; the others throw Error(kRemote) naming it.
#include "memory/fd_exchange.hpp"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <utility>

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

namespace {

using Clock = std::chrono::steady_clock;

constexpr uint32_t kHelloMagic = 0x46435045u;  // "EPCF" little-endian
constexpr auto kConnectRetryInterval = std::chrono::milliseconds(1);

// The one message each rank sends to each local peer; the fd rides on its first byte.
struct Hello {
  uint32_t magic;
  int32_t sender;
  uint64_t token;
};
static_assert(sizeof(Hello) == 16, "Hello is a fixed 16-byte wire record");

struct TokenRecord {
  uint64_t token;
  uint8_t ok;
  uint8_t pad[7];
};
static_assert(sizeof(TokenRecord) == 16, "TokenRecord is a fixed 16-byte wire record");

class Deadline {
 public:
  explicit Deadline(double seconds)
      : end_(Clock::now() +
             std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds))) {}
  bool expired() const { return Clock::now() >= end_; }
  // Remaining time for poll(), rounded up so a positive remainder never becomes a busy 0 ms poll.
  int pollMs() const {
    const auto left = end_ - Clock::now();
    if (left <= Clock::duration::zero()) return 0;
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(left).count() + 1;
    return static_cast<int>(std::min<long long>(ms, INT_MAX));
  }

 private:
  Clock::time_point end_;
};

[[noreturn]] void throwTimeout(int peer, const std::string& what, double timeout_s) {
  std::ostringstream os;
  os << "exchangeFds: " << what << " (deadline " << timeout_s << " s). Is rank " << peer
     << " alive, on this host and inside exchangeFds? Ranks in different network namespaces "
        "(containers) cannot reach each other's abstract Unix sockets.";
  throw TimeoutError(peer, detail::formatMessage(os.str(), __FILE__, __LINE__));
}

// A peer that breaks the protocol (or a stranger on our socket): a socket-level failure.
[[noreturn]] void throwProtocol(const std::string& what) {
  throw SystemError(EPROTO, detail::formatMessage("exchangeFds: " + what, __FILE__, __LINE__));
}

uint64_t drawToken() {
  uint64_t token = 0;
  ssize_t n = -1;
  do {
    n = getrandom(&token, sizeof(token), 0);
  } while (n < 0 && errno == EINTR);
  if (n != static_cast<ssize_t>(sizeof(token))) {
    std::random_device device;
    token = (static_cast<uint64_t>(device()) << 32) ^ device();
  }
  return token;
}

// Abstract namespace: nothing on the file system to clean up, and the random token keeps the
// name unguessable for processes outside the job.
std::string socketName(uint64_t token, int rank) {
  char name[64];
  std::snprintf(name, sizeof(name), "epcomm-%016llx-%d", static_cast<unsigned long long>(token),
                rank);
  return name;
}

sockaddr_un socketAddress(uint64_t token, int rank, socklen_t* length) {
  const std::string name = socketName(token, rank);
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

// Waits until `fd` reports `events` (or an error/hangup, which the next call then reports).
// Returns false when the deadline passed first.
bool waitFor(int fd, short events, const Deadline& deadline) {
  for (;;) {
    pollfd entry{fd, events, 0};
    const int ready = ::poll(&entry, 1, deadline.pollMs());
    if (ready > 0) return true;
    if (ready == 0) {
      if (deadline.expired()) return false;
      continue;
    }
    if (errno == EINTR) continue;
    detail::throwSystem(errno, "poll", __FILE__, __LINE__);
  }
}

// Only processes of our own user may hand us fds or receive ours.
void checkPeerUid(int fd, const std::string& who) {
  ucred cred{};
  socklen_t length = sizeof(cred);
  EPCOMM_SYS_CHECK(::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &length));
  const uid_t me = ::getuid();
  EPCOMM_CHECK_CODE(cred.uid == me, ErrorCode::kUnsupported,
                    "exchangeFds: " << who << " belongs to uid " << cred.uid << " (pid " << cred.pid
                                    << "), not to this process's uid " << me
                                    << "; refusing to exchange fds with another user");
}

UniqueFd listenOn(uint64_t token, int rank, int backlog) {
  UniqueFd fd = makeSocket();
  socklen_t length = 0;
  const sockaddr_un address = socketAddress(token, rank, &length);
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&address), length) < 0) {
    detail::throwSystem(errno, ("bind(\"@" + socketName(token, rank) + "\")").c_str(), __FILE__,
                        __LINE__);
  }
  EPCOMM_SYS_CHECK(::listen(fd.get(), backlog));
  return fd;
}

UniqueFd connectTo(uint64_t token, int peer, const Deadline& deadline, double timeout_s) {
  socklen_t length = 0;
  const sockaddr_un address = socketAddress(token, peer, &length);
  for (;;) {
    UniqueFd fd = makeSocket();
    int err = 0;
    if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&address), length) == 0) return fd;
    err = errno;
    if (err == EINPROGRESS || err == EINTR) {
      // The connection continues asynchronously; its outcome is in SO_ERROR once writable.
      if (!waitFor(fd.get(), POLLOUT, deadline)) {
        throwTimeout(peer, "connection to rank " + std::to_string(peer) + " did not complete",
                     timeout_s);
      }
      socklen_t err_length = sizeof(err);
      EPCOMM_SYS_CHECK(::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &err_length));
      if (err == 0) return fd;
    }
    // Refused or a full backlog: the listener is not (yet) there; try again until the deadline.
    if (err == ECONNREFUSED || err == ENOENT || err == EAGAIN) {
      if (deadline.expired()) {
        throwTimeout(peer,
                     "rank " + std::to_string(peer) + " never accepted a connection on \"@" +
                         socketName(token, peer) + "\" (last error: " + std::strerror(err) + ")",
                     timeout_s);
      }
      std::this_thread::sleep_for(kConnectRetryInterval);
      continue;
    }
    detail::throwSystem(err, ("connect(\"@" + socketName(token, peer) + "\")").c_str(), __FILE__,
                        __LINE__);
  }
}

void sendHello(int fd, const Hello& hello, int my_fd, int peer, const Deadline& deadline,
               double timeout_s) {
  union {
    cmsghdr align;
    char buffer[CMSG_SPACE(sizeof(int))];
  } control;
  std::memset(&control, 0, sizeof(control));

  msghdr message{};
  iovec chunk{};
  message.msg_iov = &chunk;
  message.msg_iovlen = 1;
  message.msg_control = control.buffer;
  message.msg_controllen = sizeof(control.buffer);
  cmsghdr* header = CMSG_FIRSTHDR(&message);
  header->cmsg_level = SOL_SOCKET;
  header->cmsg_type = SCM_RIGHTS;
  header->cmsg_len = CMSG_LEN(sizeof(int));
  std::memcpy(CMSG_DATA(header), &my_fd, sizeof(int));

  const auto* bytes = reinterpret_cast<const char*>(&hello);
  size_t sent = 0;
  while (sent < sizeof(hello)) {
    chunk.iov_base = const_cast<char*>(bytes + sent);
    chunk.iov_len = sizeof(hello) - sent;
    const ssize_t n = ::sendmsg(fd, &message, MSG_NOSIGNAL);
    if (n >= 0) {
      sent += static_cast<size_t>(n);
      // The fd went with the first byte; a partial write must not attach it again.
      message.msg_control = nullptr;
      message.msg_controllen = 0;
      continue;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      if (!waitFor(fd, POLLOUT, deadline)) {
        throwTimeout(peer, "rank " + std::to_string(peer) + " did not drain its socket", timeout_s);
      }
      continue;
    }
    detail::throwSystem(errno, "sendmsg(SCM_RIGHTS)", __FILE__, __LINE__);
  }
}

// Reads one Hello and every fd that came with it (all owned, so an error leaks none).
Hello receiveHello(int fd, std::vector<UniqueFd>* fds, int missing_peer, const Deadline& deadline,
                   double timeout_s) {
  Hello hello{};
  auto* bytes = reinterpret_cast<char*>(&hello);
  size_t got = 0;
  while (got < sizeof(hello)) {
    // Room for several fds, so a peer that attaches too many is caught (and all of them closed)
    // rather than silently truncated by the kernel.
    union {
      cmsghdr align;
      char buffer[CMSG_SPACE(4 * sizeof(int))];
    } control;
    std::memset(&control, 0, sizeof(control));
    iovec chunk{bytes + got, sizeof(hello) - got};
    msghdr message{};
    message.msg_iov = &chunk;
    message.msg_iovlen = 1;
    message.msg_control = control.buffer;
    message.msg_controllen = sizeof(control.buffer);

    const ssize_t n = ::recvmsg(fd, &message, MSG_CMSG_CLOEXEC);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        if (!waitFor(fd, POLLIN, deadline)) {
          throwTimeout(missing_peer,
                       "a local rank connected but sent no fd (still missing rank " +
                           std::to_string(missing_peer) + ")",
                       timeout_s);
        }
        continue;
      }
      detail::throwSystem(errno, "recvmsg", __FILE__, __LINE__);
    }
    for (cmsghdr* c = CMSG_FIRSTHDR(&message); c != nullptr; c = CMSG_NXTHDR(&message, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int received = -1;
        std::memcpy(&received, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        fds->emplace_back(received);
      }
    }
    if ((message.msg_flags & MSG_CTRUNC) != 0) {
      throwProtocol("control data truncated: a peer attached more fds than the protocol allows");
    }
    if (n == 0) {
      throwProtocol("a peer closed its connection after " + std::to_string(got) + " of " +
                    std::to_string(sizeof(hello)) + " header bytes");
    }
    got += static_cast<size_t>(n);
  }
  return hello;
}

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

std::vector<UniqueFd> exchangeFds(Bootstrap& bootstrap, int my_fd, double timeout_s) {
  const int rank = bootstrap.rank();
  const int size = bootstrap.size();
  const std::vector<int>& local = bootstrap.localRanks();
  const bool has_peers = local.size() > 1;
  std::vector<UniqueFd> result(static_cast<size_t>(size));

  // Step 1: arguments and the job-wide token.
  std::exception_ptr error;
  TokenRecord mine{};
  try {
    EPCOMM_ARG_CHECK(std::isfinite(timeout_s) && timeout_s > 0, "exchangeFds timeout_s", timeout_s,
                     "a positive number of seconds");
    EPCOMM_ARG_CHECK(!has_peers || ::fcntl(my_fd, F_GETFD) >= 0, "exchangeFds my_fd", my_fd,
                     "an open file descriptor");
    if (rank == 0) mine.token = drawToken();
  } catch (...) {
    error = std::current_exception();
  }
  mine.ok = error ? 0 : 1;
  std::vector<TokenRecord> records(static_cast<size_t>(size));
  try {
    bootstrap.allGather(&mine, records.data(), sizeof(TokenRecord));
  } catch (...) {
    if (error) std::rethrow_exception(error);
    throw;
  }
  if (error) std::rethrow_exception(error);
  std::vector<uint8_t> oks;
  for (const TokenRecord& record : records) oks.push_back(record.ok);
  const std::string failed = failedRanks(oks);
  EPCOMM_CHECK_CODE(failed.empty(), ErrorCode::kRemote,
                    "exchangeFds stopped: rank(s) " << failed
                                                    << " rejected their arguments (see their "
                                                       "error messages)");
  const uint64_t token = records[0].token;

  // Step 2: every listener exists before anyone connects.
  UniqueFd listener;
  try {
    if (has_peers) listener = listenOn(token, rank, static_cast<int>(local.size()) + 1);
  } catch (...) {
    error = std::current_exception();
  }
  agree(bootstrap, error, "creating their listening socket");

  // Step 3: send to every local peer, then receive from every local peer. Connecting needs no
  // accept (the listener's backlog holds every local peer), so the order cannot deadlock.
  try {
    if (has_peers) {
      const Deadline deadline(timeout_s);
      const Hello hello{kHelloMagic, rank, token};
      for (int peer : local) {
        if (peer == rank) continue;
        UniqueFd connection = connectTo(token, peer, deadline, timeout_s);
        checkPeerUid(connection.get(), "the listener of rank " + std::to_string(peer));
        sendHello(connection.get(), hello, my_fd, peer, deadline, timeout_s);
      }

      std::vector<bool> received(static_cast<size_t>(size), false);
      size_t pending = local.size() - 1;
      while (pending > 0) {
        int missing = -1;
        for (int peer : local) {
          if (peer != rank && !received[peer]) {
            missing = peer;
            break;
          }
        }
        if (!waitFor(listener.get(), POLLIN, deadline)) {
          throwTimeout(missing,
                       "rank " + std::to_string(missing) + " never connected to send its fd (" +
                           std::to_string(pending) + " local rank(s) missing)",
                       timeout_s);
        }
        UniqueFd connection(
            ::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
        if (connection.get() < 0) {
          if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ECONNABORTED) {
            continue;
          }
          detail::throwSystem(errno, "accept4", __FILE__, __LINE__);
        }
        checkPeerUid(connection.get(), "a connecting process");
        std::vector<UniqueFd> fds;
        const Hello got = receiveHello(connection.get(), &fds, missing, deadline, timeout_s);
        if (got.magic != kHelloMagic || got.token != token) {
          throwProtocol(
              "a connection carried a bad header (magic or job token): not from this "
              "job's exchange");
        }
        const int sender = got.sender;
        const bool is_local_peer =
            sender != rank && std::binary_search(local.begin(), local.end(), sender);
        if (!is_local_peer || received[sender]) {
          throwProtocol("unexpected sender rank " + std::to_string(sender) +
                        (is_local_peer ? " (sent twice)" : " (not a local peer)"));
        }
        if (fds.size() != 1) {
          throwProtocol("rank " + std::to_string(sender) + " attached " +
                        std::to_string(fds.size()) + " fds instead of 1");
        }
        result[sender] = std::move(fds[0]);
        received[sender] = true;
        --pending;
      }
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
