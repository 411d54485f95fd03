// SPDX-License-Identifier: Apache-2.0
// The NCCL baseline (see nccl_baseline.hpp). Without NCCL at build time only the stub below the
// #else is compiled.
#include "nccl_baseline.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>

#include "epcomm/error.hpp"
#include "link_bench.hpp"

#if EPCOMM_BENCH_HAVE_NCCL
#include <nccl.h>
#endif

namespace epcomm::bench {

#if EPCOMM_BENCH_HAVE_NCCL

namespace {

// Buffers of the baseline are capped so a large sweep cannot take the GPU memory epcomm needs;
// beyond the cap, calls share buffer slots.
constexpr size_t kMaxBaselineBytes = size_t{1} << 30;
constexpr size_t kAlignment = 256;

size_t alignUp(size_t bytes) {
  return (bytes + kAlignment - 1) / kAlignment * kAlignment;
}

std::string ncclMessage(ncclResult_t result, const char* call, const char* file, int line) {
  std::ostringstream os;
  os << call << " failed with NCCL error " << static_cast<int>(result) << " ("
     << ncclGetErrorString(result) << ") at " << file << ":" << line;
  return os.str();
}

#define EPCOMM_BENCH_NCCL_CHECK(call)                                                              \
  do {                                                                                             \
    const ncclResult_t epcomm_bench_nccl_result_ = (call);                                         \
    if (epcomm_bench_nccl_result_ != ncclSuccess) {                                                \
      throw std::runtime_error(ncclMessage(epcomm_bench_nccl_result_, #call, __FILE__, __LINE__)); \
    }                                                                                              \
  } while (0)

// Bytes one call moves through the baseline's buffers (each exchange gets its own region).
size_t callBytes(const ExchangeSequence& call, bool send) {
  size_t total = 0;
  for (const Exchange& e : call) {
    for (size_t b : send ? e.send_bytes : e.recv_bytes) total += alignUp(b);
  }
  return total;
}

}  // namespace

struct NcclBaseline::Impl {
  MPI_Comm comm = MPI_COMM_NULL;
  int rank = 0;
  int size = 1;
  bool available = false;
  std::string status;
  ncclComm_t nccl = nullptr;
  DeviceMemory send;
  DeviceMemory recv;

  ~Impl() {
    if (nccl != nullptr) {
      const ncclResult_t result = ncclCommDestroy(nccl);
      if (result != ncclSuccess) {
        std::fprintf(stderr, "ep_bench: warning: ncclCommDestroy failed: %s\n",
                     ncclGetErrorString(result));
      }
    }
  }
};

NcclBaseline::NcclBaseline(MPI_Comm comm, bool enable, const std::string& disabled_reason)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.comm = comm;
  EPCOMM_BENCH_MPI_CHECK(MPI_Comm_rank(comm, &m.rank));
  EPCOMM_BENCH_MPI_CHECK(MPI_Comm_size(comm, &m.size));
  if (!enable) {
    m.status = disabled_reason;
    return;
  }
  // NVLink SHARP (multicast) stays off: the reference node forbids it, and epcomm does not use
  // it either, so the comparison is between the same links.
  setenv("NCCL_NVLS_ENABLE", "0", 1);

  ncclUniqueId id{};
  if (m.rank == 0) EPCOMM_BENCH_NCCL_CHECK(ncclGetUniqueId(&id));
  EPCOMM_BENCH_MPI_CHECK(MPI_Bcast(&id, static_cast<int>(sizeof(id)), MPI_BYTE, 0, comm));
  const ncclResult_t init = ncclCommInitRank(&m.nccl, m.size, id, m.rank);
  std::string local_error;
  if (init != ncclSuccess) {
    local_error = std::string("ncclCommInitRank failed: ") + ncclGetErrorString(init);
    m.nccl = nullptr;
  }
  // Every rank must agree, or a later exchange would hang on the ranks that kept NCCL.
  int ok = local_error.empty() ? 1 : 0;
  int all_ok = 0;
  EPCOMM_BENCH_MPI_CHECK(MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, comm));
  if (all_ok == 0) {
    if (m.nccl != nullptr) {
      ncclCommAbort(m.nccl);
      m.nccl = nullptr;
    }
    m.status = local_error.empty() ? "NCCL initialization failed on another rank" : local_error;
    return;
  }
  int version = 0;
  EPCOMM_BENCH_NCCL_CHECK(ncclGetVersion(&version));
  std::ostringstream os;
  os << "NCCL " << version / 10000 << "." << (version % 10000) / 100 << "." << version % 100;
  m.status = os.str();
  m.available = true;
}

NcclBaseline::~NcclBaseline() = default;

bool NcclBaseline::available() const {
  return impl_->available;
}
const std::string& NcclBaseline::status() const {
  return impl_->status;
}

std::vector<float> NcclBaseline::time(const std::vector<ExchangeSequence>& calls, int warmup,
                                      int iters, cudaStream_t stream) {
  Impl& m = *impl_;
  if (!m.available) throw std::logic_error("NcclBaseline::time called without NCCL");
  if (calls.empty() || iters < 1) throw std::invalid_argument("NcclBaseline::time: no calls");
  size_t send_per_call = 0;
  size_t recv_per_call = 0;
  for (const ExchangeSequence& call : calls) {
    send_per_call = std::max(send_per_call, callBytes(call, true));
    recv_per_call = std::max(recv_per_call, callBytes(call, false));
  }
  send_per_call = std::max(send_per_call, kAlignment);
  recv_per_call = std::max(recv_per_call, kAlignment);
  const size_t slots = std::max<size_t>(
      1, std::min(calls.size(), kMaxBaselineBytes / std::max(send_per_call, recv_per_call)));
  if (m.send.bytes() < slots * send_per_call) {
    m.send = DeviceMemory();  // free first: the old and new buffers need not fit together
    m.send = DeviceMemory(slots * send_per_call);
    EPCOMM_CUDA_CHECK(cudaMemsetAsync(m.send.get(), 0x3c, m.send.bytes(), stream));
  }
  if (m.recv.bytes() < slots * recv_per_call) {
    m.recv = DeviceMemory();
    m.recv = DeviceMemory(slots * recv_per_call);
  }

  EventTimer timer(iters);
  for (int i = 0; i < warmup + iters; ++i) {
    const size_t which = static_cast<size_t>(i) % calls.size();
    const size_t slot = which % slots;
    char* send = m.send.as<char>() + slot * send_per_call;
    char* recv = m.recv.as<char>() + slot * recv_per_call;
    if (i >= warmup) timer.start(i - warmup, stream);
    for (const Exchange& e : calls[which]) {
      EPCOMM_BENCH_NCCL_CHECK(ncclGroupStart());
      for (int peer = 0; peer < m.size; ++peer) {
        const size_t s = e.send_bytes.at(static_cast<size_t>(peer));
        const size_t r = e.recv_bytes.at(static_cast<size_t>(peer));
        // Zero-byte pairs are skipped on both sides: my send to p is p's receive from me.
        if (s > 0) EPCOMM_BENCH_NCCL_CHECK(ncclSend(send, s, ncclInt8, peer, m.nccl, stream));
        if (r > 0) EPCOMM_BENCH_NCCL_CHECK(ncclRecv(recv, r, ncclInt8, peer, m.nccl, stream));
        send += alignUp(s);
        recv += alignUp(r);
      }
      EPCOMM_BENCH_NCCL_CHECK(ncclGroupEnd());
    }
    if (i >= warmup) timer.stop(i - warmup, stream);
  }
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(stream));
  ncclResult_t async_error = ncclSuccess;
  EPCOMM_BENCH_NCCL_CHECK(ncclCommGetAsyncError(m.nccl, &async_error));
  EPCOMM_BENCH_NCCL_CHECK(async_error);
  return timer.microseconds(iters);
}

#else  // !EPCOMM_BENCH_HAVE_NCCL

struct NcclBaseline::Impl {
  std::string status = "NCCL not available at build time";
};

NcclBaseline::NcclBaseline(MPI_Comm, bool, const std::string&) : impl_(std::make_unique<Impl>()) {}
NcclBaseline::~NcclBaseline() = default;
bool NcclBaseline::available() const {
  return false;
}
const std::string& NcclBaseline::status() const {
  return impl_->status;
}
std::vector<float> NcclBaseline::time(const std::vector<ExchangeSequence>&, int, int,
                                      cudaStream_t) {
  throw std::logic_error("NcclBaseline::time: NCCL not available at build time");
}

#endif  // EPCOMM_BENCH_HAVE_NCCL

}  // namespace epcomm::bench
