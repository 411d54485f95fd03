// SPDX-License-Identifier: Apache-2.0
// sync_cost_probe: what one synchronization primitive costs on this GPU (docs/perf-notes.md,
// "Where the LL fixed cost is not"). Each kernel body below runs 2000 times back to back (eager:
// paced by the host's launch cost) and as a 20-kernel CUDA graph (the device cost alone); it
// prints microseconds per kernel. Uses GPU 0, and GPU 1 as the peer when there is one. No MPI.
// Then the host's floor for one op's enqueue (issue 13's "host enqueue" row): the median host
// time of a bare launch, of a launch with an op-sized parameter block, and of what every op adds
// around its launch (the capture query and event record of trackWork, the DeviceGuard).
// A failing CUDA call ends it with the error (EPCOMM_CUDA_CHECK).
//
//   build/bench/sync_cost_probe
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <exception>
#include <vector>

#include "util/check.hpp"

namespace {

constexpr int kThreads = 512;
constexpr int kMaxBlocks = 132;

enum class Body {
  kEmpty,
  kFenceSys,         // thread 0: `reps` x fence.acq_rel.sys
  kStoresFenceSys,   // every thread stores 16 B, then thread 0: `reps` x fence.acq_rel.sys
  kStoresFenceGpu,   // the same with fence.acq_rel.gpu
  kReleaseSerial,    // thread 0: `reps` x st.release.sys to distinct words
  kReleaseParallel,  // threads < reps: one st.release.sys each
  kAcquireSerial,    // thread 0: `reps` x ld.acquire.sys
  kHostLoad,         // thread 0: `reps` x volatile load of host-mapped memory
  kArriveLastSys,    // every block: stores, fence.sys + atomicAdd; the last: fence + release
  kArriveLastGpu,    // the same with gpu-scope fences and one system release at the end
  kPeerStoresFence,  // every thread stores 16 B to the peer GPU, thread 0: `reps` x fence.sys
  kPeerRelease,      // thread 0: `reps` x st.release.sys to the peer GPU
};

struct ProbeParams {
  Body body;
  int reps;
  int4* local;
  int4* peer;
  unsigned long long* words;
  unsigned long long* peer_words;
  const volatile unsigned* host;
  unsigned* arrivals;
};

__device__ __forceinline__ void fenceSys() {
  asm volatile("fence.acq_rel.sys;" ::: "memory");
}
__device__ __forceinline__ void fenceGpu() {
  asm volatile("fence.acq_rel.gpu;" ::: "memory");
}
__device__ __forceinline__ void releaseSys(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ unsigned long long acquireSys(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ void arriveLast(const ProbeParams& p, bool system_fences) {
  p.local[blockIdx.x * kThreads + threadIdx.x] = make_int4(threadIdx.x, 1, 2, 3);
  __syncthreads();
  if (threadIdx.x != 0) return;
  system_fences ? fenceSys() : fenceGpu();
  if (atomicAdd(p.arrivals, 1u) == gridDim.x - 1) {
    system_fences ? fenceSys() : fenceGpu();
    *p.arrivals = 0;
    releaseSys(p.words, 1);
  }
}

__global__ void __launch_bounds__(kThreads) probeKernel(ProbeParams p) {
  const int tid = threadIdx.x;
  unsigned long long sink = 0;
  switch (p.body) {
    case Body::kEmpty:
      break;
    case Body::kFenceSys:
      if (tid == 0)
        for (int i = 0; i < p.reps; ++i) fenceSys();
      break;
    case Body::kStoresFenceSys:
    case Body::kStoresFenceGpu:
      p.local[blockIdx.x * kThreads + tid] = make_int4(tid, 1, 2, 3);
      __syncthreads();
      if (tid == 0)
        for (int i = 0; i < p.reps; ++i) p.body == Body::kStoresFenceSys ? fenceSys() : fenceGpu();
      break;
    case Body::kReleaseSerial:
      if (tid == 0)
        for (int i = 0; i < p.reps; ++i) releaseSys(p.words + i, i);
      break;
    case Body::kReleaseParallel:
      if (tid < p.reps) releaseSys(p.words + tid, tid);
      break;
    case Body::kAcquireSerial:
      if (tid == 0)
        for (int i = 0; i < p.reps; ++i) sink += acquireSys(p.words + i);
      break;
    case Body::kHostLoad:
      if (tid == 0)
        for (int i = 0; i < p.reps; ++i) sink += p.host[0];
      break;
    case Body::kArriveLastSys:
      arriveLast(p, true);
      break;
    case Body::kArriveLastGpu:
      arriveLast(p, false);
      break;
    case Body::kPeerStoresFence:
      p.peer[blockIdx.x * kThreads + tid] = make_int4(tid, 1, 2, 3);
      __syncthreads();
      if (tid == 0)
        for (int i = 0; i < p.reps; ++i) fenceSys();
      break;
    case Body::kPeerRelease:
      if (tid == 0)
        for (int i = 0; i < p.reps; ++i) releaseSys(p.peer_words + i, i);
      break;
  }
  if (sink == 12345) p.local[0].x = 1;  // keeps the loads
}

// An empty kernel with a parameter block the size of the LL kernels' (LlParams: 368 bytes).
struct OpSizedParams {
  unsigned char bytes[368];
};
__global__ void opSizedKernel(OpSizedParams p) {
  if (p.bytes[0] == 255 && threadIdx.x == 1023) asm volatile("trap;");
}

// Median host microseconds of `call`, over 2000 calls after 100 warm-up calls; the stream is
// drained every 200 calls (outside the timed calls), so the launch queue never fills.
template <typename Call>
double hostMedianUs(cudaStream_t stream, Call call) {
  using Clock = std::chrono::steady_clock;
  for (int i = 0; i < 100; ++i) call();
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<double> us;
  for (int i = 0; i < 2000; ++i) {
    if (i % 200 == 0) EPCOMM_CUDA_CHECK(cudaStreamSynchronize(stream));
    const auto t0 = Clock::now();
    call();
    us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::nth_element(us.begin(), us.begin() + us.size() / 2, us.end());
  return us[us.size() / 2];
}

void measureHost(const ProbeParams& base, cudaStream_t stream) {
  ProbeParams p = base;
  p.body = Body::kEmpty;
  OpSizedParams big{};
  cudaEvent_t done;
  EPCOMM_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  auto track = [&] {  // BufferCore::trackWork
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    EPCOMM_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    EPCOMM_CUDA_CHECK(cudaEventRecord(done, stream));
  };
  auto guard = [] {  // DeviceGuard on the current device
    int device = -1;
    EPCOMM_CUDA_CHECK(cudaGetDevice(&device));
    int again = -1;
    EPCOMM_CUDA_CHECK(cudaGetDevice(&again));
  };
  struct Row {
    const char* name;
    double us;
  };
  const Row rows[] = {
      {"launch, 64 B params, 132 blocks",
       hostMedianUs(stream, [&] { probeKernel<<<kMaxBlocks, kThreads, 0, stream>>>(p); })},
      {"launch, 368 B params, 132 blocks",
       hostMedianUs(stream, [&] { opSizedKernel<<<kMaxBlocks, kThreads, 0, stream>>>(big); })},
      {"capture query + event record", hostMedianUs(stream, track)},
      {"launch 368 B + capture query + event record",
       hostMedianUs(stream,
                    [&] {
                      opSizedKernel<<<kMaxBlocks, kThreads, 0, stream>>>(big);
                      track();
                    })},
      {"cudaGetDevice x2 (DeviceGuard)", hostMedianUs(stream, guard)},
  };
  EPCOMM_CUDA_CHECK(cudaGetLastError());
  std::printf("\n%-44s %8s\n", "host call", "median us");
  for (const Row& r : rows) std::printf("%-44s %8.2f\n", r.name, r.us);
  EPCOMM_CUDA_CHECK(cudaEventDestroy(done));
}

struct Variant {
  const char* name;
  Body body;
  int reps;
  int blocks;
};

// Microseconds per kernel: eager back-to-back launches, then replays of a 20-kernel graph.
void measure(const Variant& v, const ProbeParams& base, cudaStream_t stream) {
  ProbeParams p = base;
  p.body = v.body;
  p.reps = v.reps;
  cudaEvent_t begin, end;
  EPCOMM_CUDA_CHECK(cudaEventCreate(&begin));
  EPCOMM_CUDA_CHECK(cudaEventCreate(&end));
  constexpr int kEager = 2000, kPerGraph = 20, kReplays = 100;
  for (int i = 0; i < 50; ++i) probeKernel<<<v.blocks, kThreads, 0, stream>>>(p);
  EPCOMM_CUDA_CHECK(cudaEventRecord(begin, stream));
  for (int i = 0; i < kEager; ++i) probeKernel<<<v.blocks, kThreads, 0, stream>>>(p);
  EPCOMM_CUDA_CHECK(cudaEventRecord(end, stream));
  EPCOMM_CUDA_CHECK(cudaEventSynchronize(end));
  float eager_ms = 0;
  EPCOMM_CUDA_CHECK(cudaEventElapsedTime(&eager_ms, begin, end));

  cudaGraph_t graph;
  cudaGraphExec_t exec;
  EPCOMM_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  for (int i = 0; i < kPerGraph; ++i) probeKernel<<<v.blocks, kThreads, 0, stream>>>(p);
  EPCOMM_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  EPCOMM_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  EPCOMM_CUDA_CHECK(cudaGraphLaunch(exec, stream));
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(stream));
  EPCOMM_CUDA_CHECK(cudaEventRecord(begin, stream));
  for (int i = 0; i < kReplays; ++i) EPCOMM_CUDA_CHECK(cudaGraphLaunch(exec, stream));
  EPCOMM_CUDA_CHECK(cudaEventRecord(end, stream));
  EPCOMM_CUDA_CHECK(cudaEventSynchronize(end));
  float graph_ms = 0;
  EPCOMM_CUDA_CHECK(cudaEventElapsedTime(&graph_ms, begin, end));
  EPCOMM_CUDA_CHECK(cudaGetLastError());
  std::printf("%-44s %8.2f %8.2f\n", v.name, eager_ms * 1000 / kEager,
              graph_ms * 1000 / (kReplays * kPerGraph));
  EPCOMM_CUDA_CHECK(cudaGraphExecDestroy(exec));
  EPCOMM_CUDA_CHECK(cudaGraphDestroy(graph));
  EPCOMM_CUDA_CHECK(cudaEventDestroy(begin));
  EPCOMM_CUDA_CHECK(cudaEventDestroy(end));
}

}  // namespace

static int runProbe() {
  int devices = 0;
  EPCOMM_CUDA_CHECK(cudaGetDeviceCount(&devices));
  EPCOMM_CUDA_CHECK(cudaSetDevice(0));
  ProbeParams p{};
  EPCOMM_CUDA_CHECK(cudaMalloc(&p.local, size_t{kMaxBlocks} * kThreads * sizeof(int4)));
  EPCOMM_CUDA_CHECK(cudaMalloc(&p.words, 4096));
  EPCOMM_CUDA_CHECK(cudaMemset(p.words, 0, 4096));
  EPCOMM_CUDA_CHECK(cudaMalloc(&p.arrivals, sizeof(unsigned)));
  EPCOMM_CUDA_CHECK(cudaMemset(p.arrivals, 0, sizeof(unsigned)));
  unsigned* host = nullptr;
  EPCOMM_CUDA_CHECK(cudaHostAlloc(&host, 4096, cudaHostAllocMapped));
  host[0] = 0;
  unsigned* host_on_device = nullptr;
  EPCOMM_CUDA_CHECK(cudaHostGetDevicePointer(&host_on_device, host, 0));
  p.host = host_on_device;
  int peer_ok = 0;
  if (devices >= 2) EPCOMM_CUDA_CHECK(cudaDeviceCanAccessPeer(&peer_ok, 0, 1));
  if (peer_ok) {
    EPCOMM_CUDA_CHECK(cudaDeviceEnablePeerAccess(1, 0));
    EPCOMM_CUDA_CHECK(cudaSetDevice(1));
    EPCOMM_CUDA_CHECK(cudaMalloc(&p.peer, size_t{kMaxBlocks} * kThreads * sizeof(int4)));
    EPCOMM_CUDA_CHECK(cudaMalloc(&p.peer_words, 4096));
    EPCOMM_CUDA_CHECK(cudaSetDevice(0));
  }
  cudaStream_t stream;
  EPCOMM_CUDA_CHECK(cudaStreamCreate(&stream));

  const Variant variants[] = {
      {"empty, 1 block", Body::kEmpty, 0, 1},
      {"empty, 132 blocks", Body::kEmpty, 0, kMaxBlocks},
      {"fence.acq_rel.sys x1", Body::kFenceSys, 1, 1},
      {"fence.acq_rel.sys x4", Body::kFenceSys, 4, 1},
      {"fence.acq_rel.sys x16", Body::kFenceSys, 16, 1},
      {"512 stores + fence.acq_rel.sys x1", Body::kStoresFenceSys, 1, 1},
      {"512 stores + fence.acq_rel.sys x4", Body::kStoresFenceSys, 4, 1},
      {"512 stores + fence.acq_rel.gpu x1", Body::kStoresFenceGpu, 1, 1},
      {"512 stores + fence.acq_rel.gpu x4", Body::kStoresFenceGpu, 4, 1},
      {"st.release.sys x1 serial", Body::kReleaseSerial, 1, 1},
      {"st.release.sys x8 serial", Body::kReleaseSerial, 8, 1},
      {"st.release.sys x72 serial", Body::kReleaseSerial, 72, 1},
      {"st.release.sys x8 from 8 threads", Body::kReleaseParallel, 8, 1},
      {"st.release.sys x72 from 72 threads", Body::kReleaseParallel, 72, 1},
      {"ld.acquire.sys x8 serial", Body::kAcquireSerial, 8, 1},
      {"host-mapped load x1", Body::kHostLoad, 1, 1},
      {"host-mapped load x8", Body::kHostLoad, 8, 1},
      {"arrive-last (sys fences), 1 block", Body::kArriveLastSys, 0, 1},
      {"arrive-last (sys fences), 24 blocks", Body::kArriveLastSys, 0, 24},
      {"arrive-last (sys fences), 132 blocks", Body::kArriveLastSys, 0, kMaxBlocks},
      {"arrive-last (gpu fences), 132 blocks", Body::kArriveLastGpu, 0, kMaxBlocks},
      {"peer stores + fence.acq_rel.sys x1", Body::kPeerStoresFence, 1, 1},
      {"peer stores + fence.acq_rel.sys x4", Body::kPeerStoresFence, 4, 1},
      {"peer st.release.sys x1", Body::kPeerRelease, 1, 1},
      {"peer st.release.sys x8 serial", Body::kPeerRelease, 8, 1},
  };
  std::printf("%-44s %8s %8s   (us per kernel)\n", "kernel body", "eager", "graph");
  for (const Variant& v : variants) {
    const bool needs_peer = v.body == Body::kPeerStoresFence || v.body == Body::kPeerRelease;
    if (needs_peer && !peer_ok) continue;
    measure(v, p, stream);
  }
  measureHost(p, stream);
  EPCOMM_CUDA_CHECK(cudaDeviceSynchronize());
  return 0;
}

int main() {
  try {
    return runProbe();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sync_cost_probe: %s\n", e.what());
    return 1;
  }
}
