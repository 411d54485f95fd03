// SPDX-License-Identifier: Apache-2.0
// The GIN rail transport's device side (kernels/rail_gin_launch.hpp, protocol in
// kernels/rail_gin_protocol.hpp): device-initiated puts and signals of NCCL's device API (ncclGin,
// nccl_device.h, NCCL >= 2.30). Compiled only when EPCOMM_NCCL_GIN; compile-tested, never run.
#include "kernels/kernel_check.hpp"
#include "kernels/rail_gin_launch.hpp"

namespace epcomm::rail::gin {
namespace {

constexpr int kExchangeThreads = 128;
constexpr int kCopyThreads = 256;
constexpr int kCopyBlocksPerNode = 8;

__device__ __forceinline__ uint64_t globalNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// The first timed-out wait wins; the host reads the record after the kernel ended.
__device__ void recordTimeout(GinStatus* status, GinPhase phase, int peer, uint64_t epoch,
                              uint64_t expected, uint64_t observed) {
  if (atomicCAS(&status->phase, 0, static_cast<int32_t>(phase)) == 0) {
    status->peer_node = peer;
    status->epoch = epoch;
    status->expected = expected;
    status->observed = observed;
  }
}

// Spins on a GIN signal of this rank until it reaches `epoch` or `deadline` passes. NCCL's own
// waitSignal with a timeout counts clock64 cycles; %globaltimer keeps the deadline in nanoseconds
// like every other epcomm wait.
__device__ bool waitSignal(const ncclGin& gin, uint32_t signal, uint64_t epoch, uint64_t deadline,
                           uint64_t* observed) {
  for (;;) {
    const uint64_t value = gin.readSignal(signal, 64, cuda::memory_order_acquire);
    if (signalReached(value, epoch)) return true;
    if (globalNs() >= deadline) {
      *observed = value;
      return false;
    }
    __nanosleep(128);
  }
}

__global__ void __launch_bounds__(kExchangeThreads) ginExchangeKernel(GinExchangeParams p) {
  __shared__ uint64_t s_epoch;
  __shared__ int s_failed;
  if (threadIdx.x == 0) {
    s_epoch = *p.epoch + 1;
    *p.epoch = s_epoch;
    s_failed = 0;
  }
  __syncthreads();
  const uint64_t epoch = s_epoch;
  const uint64_t deadline = globalNs() + p.timeout_ns;
  const int m = p.num_nodes;
  const GinLayout& l = p.layout;
  ncclGin gin(p.dev_comm, 0);
  const ncclTeam rail = ncclTeamWorld(p.dev_comm);  // the rail communicator: rank = node

  // 1. credit: this rank's slots of the previous call are consumed (its unpack ran before).
  for (int d = threadIdx.x; d < m; d += blockDim.x) {
    gin.signal(rail, d, ncclGin_WeakSignalInc{creditSignal(m, p.me)});
  }
  __syncthreads();

  // 2. send: one put per destination, [record | rows], its arrival signal bundled with it.
  for (int d = threadIdx.x; d < m; d += blockDim.x) {
    uint64_t observed = 0;
    if (!waitSignal(gin, creditSignal(m, d), epoch, deadline, &observed)) {
      recordTimeout(p.status, GinPhase::kCredit, d, epoch, epoch, observed);
      atomicExch(&s_failed, 1);
      continue;
    }
    const int64_t bytes = ginPutBytes(l, p.send_counts[d], p.max_rows, p.row_bytes);
    gin.put(rail, d, p.recv_window, static_cast<size_t>(l.slots_off + p.me * l.stride),
            p.send_window, static_cast<size_t>(d * l.stride), static_cast<size_t>(bytes),
            ncclGin_WeakSignalInc{arrivedSignal(p.me)});
  }

  // 3. receive: every source's slot of this call; its record into the records matrix.
  auto* records = reinterpret_cast<int32_t*>(p.recv_base + l.records_off);
  const int record_ints = railRecordInts(m);
  for (int s = threadIdx.x; s < m; s += blockDim.x) {
    uint64_t observed = 0;
    if (!waitSignal(gin, arrivedSignal(s), epoch, deadline, &observed)) {
      recordTimeout(p.status, GinPhase::kArrival, s, epoch, epoch, observed);
      atomicExch(&s_failed, 1);
      continue;
    }
    // Read after the acquiring signal load; volatile, so nothing is read before it.
    const auto* slot =
        reinterpret_cast<const volatile int32_t*>(p.recv_base + l.slots_off + s * l.stride);
    int32_t* mine = records + static_cast<int64_t>(s) * record_ints;
    for (int i = 0; i < record_ints; ++i) mine[i] = slot[i];
  }
  __syncthreads();

  // 4. flush: the send window may be repacked by the next call.
  const ncclResult_t flushed =
      gin.flush(ncclCoopCta(), cuda::memory_order_acquire, ncclGin_None{}, p.flush_timeout_cycles);
  if (threadIdx.x == 0 && flushed != ncclSuccess) {
    recordTimeout(p.status, GinPhase::kFlush, -1, epoch, 0, static_cast<uint64_t>(flushed));
    atomicExch(&s_failed, 1);
  }
  __syncthreads();
  // After a timeout no record of this call can be trusted: break every magic, so the judge that
  // follows reports a fault and zeroes every receive count (nothing reads a row never sent).
  if (s_failed != 0) {
    for (int s = threadIdx.x; s < m; s += blockDim.x) {
      records[static_cast<int64_t>(s) * record_ints + kRailMagic] = 0;
    }
  }
}

// Grid (kCopyBlocksPerNode, num_nodes): 16-byte copies when both slots are aligned, else bytes.
__global__ void __launch_bounds__(kCopyThreads) ginCopySlotsKernel(GinCopyParams p) {
  const int n = blockIdx.y;
  const int32_t count = p.counts[n];
  const int64_t rows = count < 0 ? 0 : (count > p.max_rows ? p.max_rows : count);
  const int64_t bytes = rows * p.row_bytes;
  const uint8_t* src = p.src + n * p.src_stride;
  uint8_t* dst = p.dst + n * p.dst_stride;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const bool vec =
      ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) & 15) == 0;
  if (p.header != nullptr && blockIdx.x == 0) {
    uint8_t* head = p.header_dst + n * p.dst_stride;
    if (head != p.header) {
      for (int64_t i = threadIdx.x; i < p.header_bytes; i += blockDim.x) head[i] = p.header[i];
    }
  }
  int64_t done = 0;
  if (vec) {
    const int64_t words = bytes / 16;
    const auto* s16 = reinterpret_cast<const uint4*>(src);
    auto* d16 = reinterpret_cast<uint4*>(dst);
    for (int64_t i = tid; i < words; i += stride) d16[i] = s16[i];
    done = words * 16;
  }
  for (int64_t i = done + tid; i < bytes; i += stride) dst[i] = src[i];
}

}  // namespace

void launchGinExchange(const GinExchangeParams& params, cudaStream_t stream) {
  ginExchangeKernel<<<1, kExchangeThreads, 0, stream>>>(params);
  EPCOMM_KERNEL_LAUNCH_CHECK(ginExchangeKernel);
}

void launchGinCopySlots(const GinCopyParams& params, cudaStream_t stream) {
  const dim3 grid(kCopyBlocksPerNode, static_cast<unsigned>(params.num_nodes));
  ginCopySlotsKernel<<<grid, kCopyThreads, 0, stream>>>(params);
  EPCOMM_KERNEL_LAUNCH_CHECK(ginCopySlotsKernel);
}

}  // namespace epcomm::rail::gin
