// SPDX-License-Identifier: Apache-2.0
// The Unix-socket machinery under exchangeFds (fd_exchange.hpp): random names and secrets from the
// kernel's CSPRNG, abstract-namespace listeners, peer credentials, and the socket phase that
// moves the fds. Internal to src/memory.
#pragma once

#include <sys/socket.h>
#include <sys/un.h>

#include <cstddef>
#include <string>
#include <vector>

#include "memory/fd_exchange.hpp"

namespace epcomm::memory::uds {

constexpr size_t kMaxNameBytes = 64;  // abstract socket names, without the leading NUL

// Fills `out` from the kernel's CSPRNG: getrandom(), or /dev/urandom where the syscall is not
// available (old kernel, seccomp). Never a weaker generator: a guessable secret is no secret.
void fillRandom(void* out, size_t n);

// The address of abstract socket `name`; `*length` is the address length to pass on.
sockaddr_un abstractAddress(const std::string& name, socklen_t* length);

// A non-blocking, close-on-exec stream socket.
UniqueFd makeSocket();

// Binds a listener on a fresh random abstract name. A name already bound (squatted by another
// process, or a rare collision) is skipped for the next one: names are published through the
// bootstrap, so nobody needs to predict them.
UniqueFd listenOnFreshName(const FdExchangeOptions& options, int backlog, std::string* name,
                           int* attempts);

// false if SO_PEERCRED is unavailable for this socket.
bool peerCredentials(int fd, ucred* cred);

// The socket phase of one rank (step 3 of exchangeFds): sends `my_fd` to every other rank of
// `local` and receives one fd from each into (*result)[rank], all connections served by one
// poll() loop until `timeout_s` passes. Refused connections are listed in `refusals` (the
// first 64) when it is non-null. `before_send` (may be empty) is FdExchangeOptions::before_send.
void runSocketPhase(int rank, const std::vector<int>& local, const FdExchangeDirectory& directory,
                    int listener, int my_fd, double timeout_s, std::vector<std::string>* refusals,
                    const std::function<void(int peer)>& before_send,
                    std::vector<UniqueFd>* result);

}  // namespace epcomm::memory::uds
