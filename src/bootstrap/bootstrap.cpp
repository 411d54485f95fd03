// SPDX-License-Identifier: Apache-2.0
// Node-local grouping shared by every Bootstrap, the callback bootstrap and device selection.
#include "epcomm/bootstrap.hpp"

#include <cuda_runtime_api.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstring>
#include <set>
#include <string>
#include <utility>

#include "bootstrap/host_identity.hpp"
#include "check.hpp"

namespace epcomm::detail {

// hostname + boot id. The hostname alone is not enough: containers on different machines can
// share a hostname, and the boot id (new on every boot, per kernel) tells them apart. Two
// containers on one machine with different hostnames count as different hosts, which is the
// conservative answer: fd passing over abstract sockets may not cross their network namespaces.
std::string hostIdentityText() {
  std::string id;
  char name[256] = {};
  if (gethostname(name, sizeof(name) - 1) == 0) id = name;
  if (std::FILE* file = std::fopen("/proc/sys/kernel/random/boot_id", "re")) {
    char boot[64] = {};
    if (std::fgets(boot, sizeof(boot), file) != nullptr) {
      std::string text = boot;
      while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
      id += "|" + text;
    }
    std::fclose(file);
  }
  return id;
}

}  // namespace epcomm::detail

namespace epcomm {

namespace {

// Fixed wire size of one host identity, so the all-gather needs no length exchange first.
constexpr size_t kHostIdBytes = 128;
using HostId = std::array<char, kHostIdBytes>;

HostId hostIdentity() {
  const std::string id = detail::hostIdentityText();
  HostId record{};  // zero padded: equal identities compare equal byte for byte
  std::memcpy(record.data(), id.data(), std::min(id.size(), kHostIdBytes - 1));
  return record;
}

}  // namespace

void Bootstrap::initLocalGroup() {
  const int my_rank = rank();
  const int world = size();
  detail::setProcessRank(my_rank);
  EPCOMM_CHECK(world >= 1 && my_rank >= 0 && my_rank < world,
               "bootstrap reports rank " << my_rank << " of " << world);

  const HostId mine = hostIdentity();
  std::vector<char> all(static_cast<size_t>(world) * kHostIdBytes);
  allGather(mine.data(), all.data(), kHostIdBytes);

  local_ranks_.clear();
  std::set<std::string> hosts;
  for (int r = 0; r < world; ++r) {
    const char* id = all.data() + static_cast<size_t>(r) * kHostIdBytes;
    if (std::memcmp(id, mine.data(), kHostIdBytes) == 0) local_ranks_.push_back(r);
    hosts.emplace(id, kHostIdBytes);
  }
  num_nodes_ = static_cast<int>(hosts.size());
  // Ranks were visited in ascending order, so local_ranks_ is sorted and contains my_rank.
  local_rank_ = static_cast<int>(
      std::lower_bound(local_ranks_.begin(), local_ranks_.end(), my_rank) - local_ranks_.begin());
  EPCOMM_CHECK(local_rank_ < localSize() && local_ranks_[local_rank_] == my_rank,
               "this rank's own host identity is missing from the all-gather result");
}

CallbackBootstrap::CallbackBootstrap(int rank, int size, AllGatherFn all_gather, BarrierFn barrier)
    : rank_(rank), size_(size), all_gather_(std::move(all_gather)), barrier_(std::move(barrier)) {
  EPCOMM_ARG_CHECK(size >= 1, "CallbackBootstrap size", size, ">= 1");
  EPCOMM_ARG_CHECK(rank >= 0 && rank < size, "CallbackBootstrap rank", rank,
                   "in [0, " << size << ")");
  EPCOMM_ARG_CHECK(static_cast<bool>(all_gather_), "CallbackBootstrap all_gather", "empty",
                   "a callable all-gather function");
  initLocalGroup();
}

void CallbackBootstrap::allGather(const void* send, void* recv, size_t bytes) {
  EPCOMM_ARG_CHECK(bytes == 0 || (send != nullptr && recv != nullptr), "allGather buffers",
                   (send == nullptr ? "send = nullptr" : "recv = nullptr"),
                   "non-null when bytes > 0");
  all_gather_(send, recv, bytes);
}

void CallbackBootstrap::barrier() {
  if (barrier_) {
    barrier_();
    return;
  }
  // Nobody can leave an all-gather before every rank has contributed its byte.
  const char token = 0;
  std::vector<char> sink(static_cast<size_t>(size_));
  all_gather_(&token, sink.data(), 1);
}

int selectDevice(const Bootstrap& bootstrap) {
  int count = 0;
  EPCOMM_CUDA_CHECK(cudaGetDeviceCount(&count));
  if (count <= 0) {
    throw CudaError(static_cast<int>(cudaErrorNoDevice),
                    detail::formatMessage("selectDevice: cudaGetDeviceCount reports no CUDA "
                                          "device. Is a GPU visible (nvidia-smi, "
                                          "CUDA_VISIBLE_DEVICES)?",
                                          __FILE__, __LINE__));
  }
  const int device = bootstrap.localRank() % count;
  EPCOMM_CUDA_CHECK(cudaSetDevice(device));
  return device;
}

}  // namespace epcomm
