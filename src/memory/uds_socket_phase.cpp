// SPDX-License-Identifier: Apache-2.0
// The socket phase of exchangeFds (see fd_exchange.cpp for the protocol around it): one poll()
// loop serves the listener, every accepted connection and every outgoing connection at once, so
// no single connection can hold up the others.
#include <errno.h>
#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <sstream>
#include <string>
#include <utility>

#include "check.hpp"
#include "memory/uds.hpp"

namespace epcomm::memory::uds {
namespace {

using Clock = std::chrono::steady_clock;

constexpr auto kConnectRetryInterval = std::chrono::milliseconds(1);
constexpr size_t kMaxRefusalsKept = 64;

class Deadline {
 public:
  explicit Deadline(double seconds)
      : end_(Clock::now() +
             std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds))) {}
  Clock::time_point end() const { return end_; }

 private:
  Clock::time_point end_;
};

// Milliseconds until `until` for poll(), rounded up so a positive remainder never becomes a busy
// 0 ms poll.
int pollMs(Clock::time_point until) {
  const auto left = until - Clock::now();
  if (left <= Clock::duration::zero()) return 0;
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(left).count() + 1;
  return static_cast<int>(std::min<long long>(ms, INT_MAX));
}

// The socket phase of one rank: sends `my_fd` to every local peer and receives one fd from
// each, all connections served by one poll() loop.
class SocketPhase {
 public:
  SocketPhase(int rank, const std::vector<int>& local, const FdExchangeDirectory& directory,
              int listener, int my_fd, double timeout_s, std::vector<std::string>* refusals,
              const std::function<void(int)>& before_send)
      : rank_(rank),
        directory_(directory),
        listener_(listener),
        my_fd_(my_fd),
        timeout_s_(timeout_s),
        deadline_(timeout_s),
        uid_(::getuid()),
        refusals_(refusals),
        before_send_(before_send) {
    for (int peer : local) {
      if (peer == rank) continue;
      peers_.push_back(peer);
      outgoing_.emplace_back();
      outgoing_.back().peer = peer;
    }
    received_.assign(directory.pid.size(), false);
    gone_.assign(directory.pid.size(), false);
    // Only processes of our own job ever occupy a slot (others are refused at accept), so a
    // generous bound suffices; beyond it the oldest pending connection gives way.
    max_pending_ = 4 * peers_.size() + 16;
  }

  void run(std::vector<UniqueFd>* result) {
    std::vector<pollfd> fds;
    for (;;) {
      for (Outgoing& out : outgoing_) {
        if (!out.done && out.socket.get() < 0 && Clock::now() >= out.retry_at) startConnect(&out);
      }
      // A peer that closed its socket has left the exchange: nothing more comes from it, but the
      // others still get this rank's fd before it fails, so every rank names the one that left
      // (failing at once would make this rank look absent to the ranks it had not served yet).
      const bool all_received = std::all_of(peers_.begin(), peers_.end(), [&](int p) {
        return received_[static_cast<size_t>(p)] || gone_[static_cast<size_t>(p)];
      });
      const bool all_sent =
          std::all_of(outgoing_.begin(), outgoing_.end(), [](const Outgoing& o) { return o.done; });
      if (all_received && all_sent) {
        if (first_gone_error_ != 0) throwPeerGone();
        return;
      }
      if (Clock::now() >= deadline_.end()) throwTimeout();

      // Listener, then accepted connections, then outgoing ones in progress.
      fds.clear();
      fds.push_back(pollfd{listener_, POLLIN, 0});
      for (const Incoming& in : incoming_) fds.push_back(pollfd{in.socket.get(), POLLIN, 0});
      Clock::time_point wake = deadline_.end();
      for (const Outgoing& out : outgoing_) {
        if (out.done) continue;
        if (out.socket.get() >= 0) {
          fds.push_back(pollfd{out.socket.get(), POLLOUT, 0});
        } else {
          wake = std::min(wake, out.retry_at);
        }
      }
      const int ready = ::poll(fds.data(), fds.size(), pollMs(wake));
      if (ready < 0) {
        if (errno == EINTR) continue;
        detail::throwSystem(errno, "poll", __FILE__, __LINE__);
      }
      if (ready == 0) continue;

      // Outgoing first (their pollfd indices follow the incoming ones, which may be erased).
      size_t index = 1 + incoming_.size();
      for (Outgoing& out : outgoing_) {
        if (out.done || out.socket.get() < 0) continue;
        const short events = fds[index++].revents;
        if (events != 0) progressOutgoing(&out);
      }
      // Accepted connections, newest last; refused ones are erased.
      std::deque<Incoming> kept;
      for (size_t i = 0; i < incoming_.size(); ++i) {
        Incoming& in = incoming_[i];
        if (fds[1 + i].revents == 0 || readIncoming(&in, result)) kept.push_back(std::move(in));
      }
      incoming_.swap(kept);
      if ((fds[0].revents & POLLIN) != 0) acceptAll();
    }
  }

 private:
  struct Outgoing {
    int peer = -1;
    UniqueFd socket;
    bool connected = false;
    bool done = false;
    size_t sent = 0;
    Clock::time_point retry_at{};
    std::string last_error = "not tried yet";
  };

  struct Incoming {
    UniqueFd socket;
    ucred cred{};
    FdHello hello{};
    size_t got = 0;
    std::vector<UniqueFd> fds;
  };

  void retryLater(Outgoing* out, int err) {
    out->socket.reset();
    out->connected = false;
    out->last_error = std::strerror(err);
    out->retry_at = Clock::now() + kConnectRetryInterval;
  }

  void startConnect(Outgoing* out) {
    const std::string& name = directory_.name[static_cast<size_t>(out->peer)];
    socklen_t length = 0;
    const sockaddr_un address = abstractAddress(name, &length);
    out->socket = makeSocket();
    if (::connect(out->socket.get(), reinterpret_cast<const sockaddr*>(&address), length) == 0) {
      onConnected(out);
      sendHello(out);
      return;
    }
    const int err = errno;
    if (err == EINPROGRESS || err == EINTR) return;  // completes asynchronously: poll POLLOUT
    // A full backlog (EAGAIN) is the common case; the listener exists since step 1.
    if (err == EAGAIN || err == ECONNREFUSED || err == ENOENT) {
      retryLater(out, err);
      return;
    }
    detail::throwSystem(err,
                        ("connect(\"@" + name + "\") to rank " + std::to_string(out->peer)).c_str(),
                        __FILE__, __LINE__);
  }

  void progressOutgoing(Outgoing* out) {
    if (!out->connected) {
      int err = 0;
      socklen_t err_length = sizeof(err);
      EPCOMM_SYS_CHECK(::getsockopt(out->socket.get(), SOL_SOCKET, SO_ERROR, &err, &err_length));
      if (err != 0) {
        retryLater(out, err);
        return;
      }
      onConnected(out);
    }
    sendHello(out);
  }

  void onConnected(Outgoing* out) {
    out->connected = true;
    verifyListener(*out);
    if (before_send_) before_send_(out->peer);
  }

  // The secret goes out only to the process that published the name: our uid and its pid.
  void verifyListener(const Outgoing& out) const {
    const size_t peer = static_cast<size_t>(out.peer);
    ucred cred{};
    if (!peerCredentials(out.socket.get(), &cred)) {
      detail::throwSystem(errno, "getsockopt(SO_PEERCRED)", __FILE__, __LINE__);
    }
    EPCOMM_CHECK_CODE(
        cred.uid == uid_ && cred.pid == directory_.pid[peer], ErrorCode::kUnsupported,
        "exchangeFds: the listener of rank "
            << out.peer << " (\"@" << directory_.name[peer] << "\") is pid " << cred.pid << " uid "
            << cred.uid << ", but rank " << out.peer << " published pid " << directory_.pid[peer]
            << " uid " << uid_
            << ". Ranks in different PID namespaces (containers) see different pids; posix_fd "
               "mode needs every rank of a host in one PID namespace (use another mem_mode)");
  }

  void sendHello(Outgoing* out) {
    FdHello hello{};
    hello.magic = kFdHelloMagic;
    hello.version = kFdHelloVersion;
    hello.sender = rank_;
    hello.receiver = out->peer;
    hello.secret = directory_.secret[static_cast<size_t>(rank_)];

    union {
      cmsghdr align;
      char buffer[CMSG_SPACE(sizeof(int))];
    } control;
    std::memset(&control, 0, sizeof(control));
    while (out->sent < sizeof(hello)) {
      iovec chunk{reinterpret_cast<char*>(&hello) + out->sent, sizeof(hello) - out->sent};
      msghdr message{};
      message.msg_iov = &chunk;
      message.msg_iovlen = 1;
      if (out->sent == 0) {
        // The fd rides on the first byte; a partial write must not attach it again.
        message.msg_control = control.buffer;
        message.msg_controllen = sizeof(control.buffer);
        cmsghdr* header = CMSG_FIRSTHDR(&message);
        header->cmsg_level = SOL_SOCKET;
        header->cmsg_type = SCM_RIGHTS;
        header->cmsg_len = CMSG_LEN(sizeof(int));
        std::memcpy(CMSG_DATA(header), &my_fd_, sizeof(int));
      }
      const ssize_t n = ::sendmsg(out->socket.get(), &message, MSG_NOSIGNAL);
      if (n >= 0) {
        out->sent += static_cast<size_t>(n);
        continue;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;  // poll POLLOUT, then go on
      if (errno == EPIPE || errno == ECONNRESET) {
        markGone(out, errno);
        return;
      }
      detail::throwSystem(errno,
                          ("sendmsg(SCM_RIGHTS) to rank " + std::to_string(out->peer)).c_str(),
                          __FILE__, __LINE__);
    }
    // Queued data (and the fd) stay readable by the peer after we close our end.
    out->socket.reset();
    out->done = true;
  }

  // The peer closed its socket before taking our fd: it failed or left the exchange.
  void markGone(Outgoing* out, int err) {
    out->socket.reset();
    out->done = true;
    gone_[static_cast<size_t>(out->peer)] = true;
    if (first_gone_error_ == 0) {
      first_gone_error_ = err;
      first_gone_peer_ = out->peer;
    }
  }

  [[noreturn]] void throwPeerGone() const {
    const std::string peer = std::to_string(first_gone_peer_);
    detail::throwSystem(first_gone_error_,
                        ("sendmsg(SCM_RIGHTS) to rank " + peer + " (rank " + peer +
                         " closed its socket before taking the fd: it failed or left the "
                         "exchange; its own error says why)")
                            .c_str(),
                        __FILE__, __LINE__);
  }

  void refuse(const ucred& cred, const std::string& why) {
    std::ostringstream os;
    os << "pid " << cred.pid << " uid " << cred.uid << ": " << why;
    ++refused_count_;
    if (refusals_ != nullptr && refusals_->size() < kMaxRefusalsKept)
      refusals_->push_back(os.str());
    if (first_refusals_.size() < 3) first_refusals_.push_back(os.str());
  }

  void acceptAll() {
    for (;;) {
      UniqueFd socket(::accept4(listener_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
      if (socket.get() < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        if (errno == EINTR || errno == ECONNABORTED) continue;
        detail::throwSystem(errno, "accept4", __FILE__, __LINE__);
      }
      ucred cred{-1, static_cast<uid_t>(-1), static_cast<gid_t>(-1)};
      if (!peerCredentials(socket.get(), &cred)) {
        refuse(cred, std::string("SO_PEERCRED failed: ") + std::strerror(errno));
        continue;
      }
      if (cred.uid != uid_) {
        refuse(cred, "another user (this job runs as uid " + std::to_string(uid_) + ")");
        continue;
      }
      const bool member = std::any_of(peers_.begin(), peers_.end(), [&](int p) {
        return directory_.pid[static_cast<size_t>(p)] == cred.pid;
      });
      if (!member) {
        refuse(cred, "not the process of any local rank of this job");
        continue;
      }
      if (incoming_.size() >= max_pending_) {
        refuse(incoming_.front().cred, "too many pending connections; the oldest gives way");
        incoming_.pop_front();
      }
      Incoming in;
      in.socket = std::move(socket);
      in.cred = cred;
      incoming_.push_back(std::move(in));
    }
  }

  // Reads what is available. Returns true while the connection stays pending; false once it is
  // done with (its fd taken, or refused and closed).
  bool readIncoming(Incoming* in, std::vector<UniqueFd>* result) {
    auto* bytes = reinterpret_cast<char*>(&in->hello);
    while (in->got < sizeof(FdHello)) {
      // Room for several fds, so a peer that attaches too many is caught (and all of them
      // closed) rather than silently truncated by the kernel.
      union {
        cmsghdr align;
        char buffer[CMSG_SPACE(4 * sizeof(int))];
      } control;
      std::memset(&control, 0, sizeof(control));
      iovec chunk{bytes + in->got, sizeof(FdHello) - in->got};
      msghdr message{};
      message.msg_iov = &chunk;
      message.msg_iovlen = 1;
      message.msg_control = control.buffer;
      message.msg_controllen = sizeof(control.buffer);
      const ssize_t n = ::recvmsg(in->socket.get(), &message, MSG_CMSG_CLOEXEC);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return true;
        refuse(in->cred, std::string("recvmsg failed: ") + std::strerror(errno));
        return false;
      }
      for (cmsghdr* c = CMSG_FIRSTHDR(&message); c != nullptr; c = CMSG_NXTHDR(&message, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; ++i) {
          int received = -1;
          std::memcpy(&received, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
          in->fds.emplace_back(received);
        }
      }
      if ((message.msg_flags & MSG_CTRUNC) != 0) {
        refuse(in->cred, "attached more fds than the protocol allows");
        return false;
      }
      if (n == 0) {
        refuse(in->cred, "closed after " + std::to_string(in->got) + " of " +
                             std::to_string(sizeof(FdHello)) + " hello bytes");
        return false;
      }
      in->got += static_cast<size_t>(n);
    }
    const FdHello& hello = in->hello;
    if (hello.magic != kFdHelloMagic || hello.version != kFdHelloVersion) {
      refuse(in->cred, "not an epcomm fd hello (bad magic or version)");
      return false;
    }
    if (hello.receiver != rank_) {
      refuse(in->cred, "hello addressed to rank " + std::to_string(hello.receiver));
      return false;
    }
    const int sender = hello.sender;
    if (std::find(peers_.begin(), peers_.end(), sender) == peers_.end()) {
      refuse(in->cred, "claims rank " + std::to_string(sender) + ", not a local peer");
      return false;
    }
    const size_t s = static_cast<size_t>(sender);
    if (directory_.pid[s] != in->cred.pid) {
      refuse(in->cred, "claims rank " + std::to_string(sender) + ", whose pid is " +
                           std::to_string(directory_.pid[s]));
      return false;
    }
    if (!secretsEqual(hello.secret, directory_.secret[s])) {
      refuse(in->cred, "wrong secret for rank " + std::to_string(sender));
      return false;
    }
    if (received_[s]) {
      refuse(in->cred, "rank " + std::to_string(sender) + " delivered a second time");
      return false;
    }
    if (in->fds.size() != 1) {
      refuse(in->cred, "rank " + std::to_string(sender) + " attached " +
                           std::to_string(in->fds.size()) + " fds instead of 1");
      return false;
    }
    (*result)[s] = std::move(in->fds[0]);
    received_[s] = true;
    return false;
  }

  [[noreturn]] void throwTimeout() const {
    std::ostringstream os;
    int peer = -1;
    for (int p : peers_) {
      if (!received_[static_cast<size_t>(p)]) {
        peer = p;
        break;
      }
    }
    if (peer >= 0) {
      const auto missing = std::count_if(peers_.begin(), peers_.end(),
                                         [&](int p) { return !received_[static_cast<size_t>(p)]; });
      os << "exchangeFds: rank " << peer << " never delivered its fd (" << missing
         << " local rank(s) missing)";
    } else {
      for (const Outgoing& out : outgoing_) {
        if (out.done) continue;
        peer = out.peer;
        os << "exchangeFds: could not hand this rank's fd to rank " << peer << " on \"@"
           << directory_.name[static_cast<size_t>(peer)] << "\" (last error: " << out.last_error
           << ")";
        break;
      }
    }
    os << " (deadline " << timeout_s_ << " s). Is rank " << peer
       << " alive, on this host and inside exchangeFds? Ranks in different network namespaces "
          "(containers) cannot reach each other's abstract Unix sockets.";
    if (refused_count_ > 0) {
      os << " " << refused_count_ << " connection(s) were refused, e.g.";
      for (const std::string& line : first_refusals_) os << " [" << line << "]";
    }
    throw TimeoutError(peer, detail::formatMessage(os.str(), __FILE__, __LINE__));
  }

  const int rank_;
  const FdExchangeDirectory& directory_;
  const int listener_;
  const int my_fd_;
  const double timeout_s_;
  const Deadline deadline_;
  const uid_t uid_;
  std::vector<std::string>* refusals_;
  const std::function<void(int)>& before_send_;
  std::vector<int> peers_;
  std::vector<Outgoing> outgoing_;
  std::deque<Incoming> incoming_;
  std::vector<bool> received_;
  std::vector<bool> gone_;
  int first_gone_error_ = 0;
  int first_gone_peer_ = -1;
  size_t max_pending_ = 0;
  size_t refused_count_ = 0;
  std::vector<std::string> first_refusals_;
};

}  // namespace

void runSocketPhase(int rank, const std::vector<int>& local, const FdExchangeDirectory& directory,
                    int listener, int my_fd, double timeout_s, std::vector<std::string>* refusals,
                    const std::function<void(int)>& before_send, std::vector<UniqueFd>* result) {
  SocketPhase phase(rank, local, directory, listener, my_fd, timeout_s, refusals, before_send);
  phase.run(result);
}

}  // namespace epcomm::memory::uds
