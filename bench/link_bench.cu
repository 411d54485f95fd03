// SPDX-License-Identifier: Apache-2.0
// The benchmark's CUDA layer: helpers, input fills and the link-limit measurement.
//
// The link limit is what this machine's NVLink delivers to a plain copy through the same peer
// mappings the epcomm kernels use, with every rank sending to every other rank at once (the
// traffic pattern of dispatch and combine). docs/benchmarks.md explains how ep_bench uses it.
#include "link_bench.hpp"

#include <algorithm>
#include <cstdio>

#include "epcomm/config.hpp"
#include "epcomm/error.hpp"
#include "util/seed.hpp"

namespace epcomm::bench {

// --- Event timer ---------------------------------------------------------------------------------

EventTimer::EventTimer(int samples) {
  starts_.reserve(static_cast<size_t>(samples));
  stops_.reserve(static_cast<size_t>(samples));
  for (int i = 0; i < samples; ++i) {
    starts_.push_back(OwnedEvent::create(cudaEventDefault));
    stops_.push_back(OwnedEvent::create(cudaEventDefault));
  }
}

void EventTimer::start(int i, cudaStream_t stream) {
  EPCOMM_CUDA_CHECK(cudaEventRecord(starts_.at(static_cast<size_t>(i)).get(), stream));
}

void EventTimer::stop(int i, cudaStream_t stream) {
  EPCOMM_CUDA_CHECK(cudaEventRecord(stops_.at(static_cast<size_t>(i)).get(), stream));
}

std::vector<float> EventTimer::microseconds(int count) const {
  std::vector<float> us(static_cast<size_t>(count));
  for (int i = 0; i < count; ++i) {
    float ms = 0;
    EPCOMM_CUDA_CHECK(cudaEventElapsedTime(&ms, starts_.at(static_cast<size_t>(i)).get(),
                                           stops_.at(static_cast<size_t>(i)).get()));
    us[static_cast<size_t>(i)] = ms * 1000.0f;
  }
  return us;
}

// --- Kernels -------------------------------------------------------------------------------------

namespace {

constexpr int kFillThreads = 256;
constexpr int kMaxFillBlocks = 8192;

// The link kernels: one block of kCopyThreads per requested SM; each block moves 64 KiB
// segments, loading all of its 16-byte vectors before storing them so every thread keeps
// kVecsPerThread requests in flight (a load-store-load chain per thread would leave NVLink idle).
constexpr int kCopyThreads = 512;
constexpr int kVecsPerThread = 8;
constexpr int64_t kVecsPerSegment = int64_t{kCopyThreads} * kVecsPerThread;
constexpr size_t kSegmentBytes = static_cast<size_t>(kVecsPerSegment) * sizeof(uint4);

struct PeerChunks {
  uint4* ptr[kMaxRanks];  // this rank's chunk in every peer's scratch, through the peer mapping
};

using util::mix64;  // splitmix64: consecutive indices give independent-looking values

__global__ void __launch_bounds__(kFillThreads)
    fillBf16Kernel(uint16_t* dst, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    const uint64_t h = mix64(seed ^ (i * 0xD6E8FEB86659FD93ull));
    const uint32_t exponent = 124u + static_cast<uint32_t>(h % 5u);  // 2^-3 .. 2^1
    const uint32_t mantissa = static_cast<uint32_t>(h >> 8) & 0x7fu;
    const uint32_t sign = static_cast<uint32_t>(h >> 16) & 1u;
    dst[i] = static_cast<uint16_t>(sign << 15 | exponent << 7 | mantissa);
  }
}

__global__ void __launch_bounds__(kFillThreads)
    fillFp8Kernel(uint8_t* dst, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    const uint64_t h = mix64(seed ^ (i * 0xD6E8FEB86659FD93ull));
    // e4m3: bias 7; exponent field 4..11 covers 2^-3 .. 2^4, never the NaN pattern (0x7f).
    const uint32_t exponent = 4u + static_cast<uint32_t>(h % 8u);
    const uint32_t mantissa = static_cast<uint32_t>(h >> 8) & 0x7u;
    const uint32_t sign = static_cast<uint32_t>(h >> 16) & 1u;
    dst[i] = static_cast<uint8_t>(sign << 7 | exponent << 3 | mantissa);
  }
}

__global__ void __launch_bounds__(kFillThreads)
    fillScalesKernel(float* dst, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    const uint64_t h = mix64(seed ^ (i * 0xD6E8FEB86659FD93ull));
    dst[i] = 0.5f + 1.5f * static_cast<float>(h >> 40) / static_cast<float>(1ull << 24);
  }
}

// kToPeers: local -> peers (SM store over NVLink); else peers -> local (SM load over NVLink).
// Work units are (peer, segment) pairs with the peer varying fastest, so at every moment the
// blocks spread over all peers, as in dispatch and combine.
template <bool kToPeers>
__global__ void __launch_bounds__(kCopyThreads)
    peerCopyKernel(PeerChunks remote, uint4* local, int num_peers, int64_t segments_per_peer) {
  const int64_t units = segments_per_peer * num_peers;
  for (int64_t unit = blockIdx.x; unit < units; unit += gridDim.x) {
    const int peer = static_cast<int>(unit % num_peers);
    const int64_t first = (unit / num_peers) * kVecsPerSegment + threadIdx.x;
    uint4* remote_vecs = remote.ptr[peer] + first;
    uint4* local_vecs = local + peer * segments_per_peer * kVecsPerSegment + first;
    const uint4* src = kToPeers ? local_vecs : remote_vecs;
    uint4* dst = kToPeers ? remote_vecs : local_vecs;
    uint4 v[kVecsPerThread];
#pragma unroll
    for (int k = 0; k < kVecsPerThread; ++k) v[k] = __ldcg(src + k * kCopyThreads);
#pragma unroll
    for (int k = 0; k < kVecsPerThread; ++k) __stcg(dst + k * kCopyThreads, v[k]);
  }
}

// --- TMA bulk copies (sm_90+) --------------------------------------------------------------------
//
// One 32-thread block per requested SM; thread 0 drives a pipeline of kBulkStages shared-memory
// buffers of `chunk_bytes` each (the other threads exit at once: TMA needs one issuing thread).
// For every work unit (peer, chunk), with the peer varying fastest as in peerCopyKernel:
//   1. cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes: source -> stage, its
//      completion counted in bytes on the stage's mbarrier (armed by arrive.expect_tx);
//   2. mbarrier.try_wait.parity on that stage (bounded by kBulkWaitNs);
//   3. cp.async.bulk.global.shared::cta.bulk_group: stage -> destination, one commit_group each;
//   4. before a stage is refilled, cp.async.bulk.wait_group.read 1: the store that read it (the
//      previous unit's) has finished reading shared memory; the store just issued may still be
//      in flight. So kBulkStages - 1 loads run ahead of the store being issued, and the stores
//      themselves are only waited for (cp.async.bulk.wait_group 0) once, at the end.
// Store rows: source = local memory, destination = the peer's scratch (the bulk store crosses
// NVLink). Load rows: source = the peer's scratch (the bulk load crosses NVLink), destination =
// local memory.
constexpr int kBulkThreads = 32;
// A bulk load that has not landed after this long ends the block and makes the row "timeout".
constexpr uint64_t kBulkWaitNs = 2'000'000'000ull;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ uint32_t sharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ uint64_t globalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Arms the stage's mbarrier for `bytes` of transaction and starts the bulk load into the stage.
__device__ __forceinline__ void bulkLoad(uint32_t stage, const void* src, uint32_t bytes,
                                         uint32_t bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(stage),
      "l"(static_cast<uint64_t>(__cvta_generic_to_global(src))), "r"(bytes), "r"(bar)
      : "memory");
}

// Waits (bounded) for phase `parity` of the mbarrier to complete; false on timeout.
__device__ __forceinline__ bool waitPhase(uint32_t bar, uint32_t parity) {
  uint64_t deadline = 0;
  while (true) {
    uint32_t done = 0;
    asm volatile(
        "{\n"
        "  .reg .pred p;\n"
        "  mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "  selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
    if (done != 0) return true;
    const uint64_t now = globalTimerNs();
    if (deadline == 0) deadline = now + kBulkWaitNs;
    if (now > deadline) return false;
  }
}

__device__ __forceinline__ void bulkStore(void* dst, uint32_t stage, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(
                   static_cast<uint64_t>(__cvta_generic_to_global(dst))),
               "r"(stage), "r"(bytes)
               : "memory");
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}
#endif  // __CUDA_ARCH__ >= 900

__global__ void __launch_bounds__(kBulkThreads)
    bulkCopyKernel(PeerChunks remote, uint8_t* local, bool to_peers, int num_peers,
                   int64_t chunks_per_peer, uint32_t chunk_bytes, unsigned int* timeouts) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) uint8_t stage_bytes[];  // kBulkStages x chunk_bytes
  __shared__ __align__(8) uint64_t full[kBulkStages];      // one mbarrier per stage
  if (threadIdx.x != 0) return;
  // After one timeout in a row, its later repetitions end at once instead of waiting again.
  if (*static_cast<volatile unsigned int*>(timeouts) != 0) return;

  const uint32_t stage0 = sharedAddress(stage_bytes);
  const uint32_t bar0 = sharedAddress(full);
  for (int s = 0; s < kBulkStages; ++s) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar0 + 8u * s) : "memory");
  }
  // Make the initialized barriers visible to the async proxy (the TMA unit that completes them).
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");

  const int64_t units = chunks_per_peer * num_peers;
  const int64_t first = blockIdx.x;
  const int64_t n = first < units ? (units - first + gridDim.x - 1) / gridDim.x : 0;
  auto source = [&](int64_t i, uint8_t** dst) -> const uint8_t* {
    const int64_t unit = first + i * gridDim.x;
    const int peer = static_cast<int>(unit % num_peers);
    const int64_t offset = (unit / num_peers) * chunk_bytes;
    uint8_t* far = reinterpret_cast<uint8_t*>(remote.ptr[peer]) + offset;
    uint8_t* near = local + peer * chunks_per_peer * chunk_bytes + offset;
    *dst = to_peers ? far : near;
    return to_peers ? near : far;
  };
  auto stageOf = [&](int64_t i) { return static_cast<uint32_t>(i % kBulkStages); };

  uint8_t* dst = nullptr;
  for (int64_t i = 0; i < n && i < kBulkStages - 1; ++i) {
    bulkLoad(stage0 + stageOf(i) * chunk_bytes, source(i, &dst), chunk_bytes,
             bar0 + 8u * stageOf(i));
  }
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t s = stageOf(i);
    if (!waitPhase(bar0 + 8u * s, static_cast<uint32_t>((i / kBulkStages) & 1))) {
      atomicAdd(timeouts, 1u);
      break;
    }
    // The stage was written by the async proxy and is read by it; the fence orders it against
    // any generic-proxy view of the stage, which costs little and leaves nothing to argue about.
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    source(i, &dst);
    bulkStore(dst, stage0 + s * chunk_bytes, chunk_bytes);
    const int64_t next = i + kBulkStages - 1;  // goes to the stage unit i - 1 used
    if (next < n) {
      asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
      bulkLoad(stage0 + stageOf(next) * chunk_bytes, source(next, &dst), chunk_bytes,
               bar0 + 8u * stageOf(next));
    }
  }
  // Every store complete (not only read out of shared memory) before the block ends, so the
  // next kernel on the stream (the check) sees the data.
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
#else
  // Built without sm_90 code: the host reports the rows as n/a before launching this.
  (void)remote, (void)local, (void)to_peers, (void)num_peers, (void)chunks_per_peer;
  (void)chunk_bytes, (void)timeouts;
#endif
}

__global__ void __launch_bounds__(kFillThreads) zeroKernel(uint4* dst, size_t n) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    dst[i] = make_uint4(0, 0, 0, 0);
  }
}

// Counts the 16-byte vectors where a and b differ.
__global__ void __launch_bounds__(kFillThreads)
    countMismatchKernel(const uint4* a, const uint4* b, size_t n, unsigned long long* mismatches) {
  unsigned long long mine = 0;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    const uint4 x = __ldcg(a + i);
    const uint4 y = __ldcg(b + i);
    mine += (x.x != y.x || x.y != y.y || x.z != y.z || x.w != y.w) ? 1 : 0;
  }
  if (mine != 0) atomicAdd(mismatches, mine);
}

unsigned fillBlocks(size_t n) {
  const size_t blocks = (n + kFillThreads - 1) / kFillThreads;
  return static_cast<unsigned>(std::max<size_t>(1, std::min<size_t>(blocks, kMaxFillBlocks)));
}

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n == 0 ? 0.0f : (n % 2 == 1 ? v[n / 2] : 0.5f * (v[n / 2 - 1] + v[n / 2]));
}

// This rank's chunk in the scratch of every peer, in rank order. Rank s writes into slot s of
// every peer's scratch, so concurrent writers never overlap.
PeerChunks peerChunks(EpBuffer& buffer, size_t chunk) {
  PeerChunks remote{};
  int k = 0;
  for (int r = 0; r < buffer.numRanks(); ++r) {
    if (r == buffer.rank()) continue;
    uint8_t* base = static_cast<uint8_t*>(buffer.peerBase(r)) + buffer.scratchOffset() +
                    static_cast<size_t>(buffer.rank()) * chunk;
    remote.ptr[k++] = reinterpret_cast<uint4*>(base);
  }
  return remote;
}

// Whether the bulk kernel was built with sm_90+ code for this device and the device is sm_90+.
bool bulkCopySupported() {
  int device = 0;
  EPCOMM_CUDA_CHECK(cudaGetDevice(&device));
  int major = 0;
  EPCOMM_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  cudaFuncAttributes attr{};
  EPCOMM_CUDA_CHECK(cudaFuncGetAttributes(&attr, bulkCopyKernel));
  return major >= 9 && attr.ptxVersion >= 90 && attr.binaryVersion >= 90;
}

void zeroVectors(void* dst, size_t bytes, cudaStream_t stream) {
  const size_t n = bytes / sizeof(uint4);
  zeroKernel<<<fillBlocks(n), kFillThreads, 0, stream>>>(static_cast<uint4*>(dst), n);
  EPCOMM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void fillRandomBf16(void* dst, size_t elements, uint64_t seed, cudaStream_t stream) {
  if (elements == 0) return;
  fillBf16Kernel<<<fillBlocks(elements), kFillThreads, 0, stream>>>(static_cast<uint16_t*>(dst),
                                                                    elements, seed);
  EPCOMM_CUDA_CHECK(cudaGetLastError());
}

void fillRandomFp8(void* dst, size_t elements, uint64_t seed, cudaStream_t stream) {
  if (elements == 0) return;
  fillFp8Kernel<<<fillBlocks(elements), kFillThreads, 0, stream>>>(static_cast<uint8_t*>(dst),
                                                                   elements, seed);
  EPCOMM_CUDA_CHECK(cudaGetLastError());
}

void fillRandomScales(float* dst, size_t elements, uint64_t seed, cudaStream_t stream) {
  if (elements == 0) return;
  fillScalesKernel<<<fillBlocks(elements), kFillThreads, 0, stream>>>(dst, elements, seed);
  EPCOMM_CUDA_CHECK(cudaGetLastError());
}

// --- Link limit ----------------------------------------------------------------------------------

const char* linkCheckName(LinkCheck check) {
  switch (check) {
    case LinkCheck::kUnchecked:
      return "";
    case LinkCheck::kOk:
      return "ok";
    case LinkCheck::kUnsupported:
      return "n/a";
    case LinkCheck::kMismatch:
      return "bad";
    case LinkCheck::kTimeout:
      return "timeout";
  }
  return "?";
}

namespace {

// The bulk-copy rows: both directions, every SM count and every chunk size, each checked after
// its timed repetitions. `measure` is runLinkBench's timing loop; it appends one sample.
template <typename Measure>
void runBulkRows(EpBuffer& buffer, const LinkBenchConfig& config, const PeerChunks& remote,
                 const DeviceMemory& local, size_t chunk, cudaStream_t stream, Measure&& measure,
                 std::vector<LinkSample>& samples) {
  const int num_peers = buffer.numRanks() - 1;
  const size_t bytes = chunk * static_cast<size_t>(num_peers);
  std::string unsupported;
  if (!bulkCopySupported()) {
    unsupported =
        "TMA bulk copies need an sm_90+ GPU and a build with sm_90+ code "
        "(CMAKE_CUDA_ARCHITECTURES)";
  }
  bool aligned = reinterpret_cast<uintptr_t>(local.get()) % 16 == 0;
  for (int k = 0; k < num_peers; ++k) {
    aligned = aligned && reinterpret_cast<uintptr_t>(remote.ptr[k]) % 16 == 0;
  }
  if (unsupported.empty() && !aligned) {
    unsupported = "a peer chunk is not 16-byte aligned";
  }
  int max_chunk_bytes = 0;
  for (int c : kBulkChunkBytes) {
    max_chunk_bytes = std::max(max_chunk_bytes, c);
    if (unsupported.empty() && chunk % static_cast<size_t>(c) != 0) {
      unsupported = "the link chunk is not a multiple of " + std::to_string(c) + " bytes";
    }
  }
  if (unsupported.empty()) {
    EPCOMM_CUDA_CHECK(cudaFuncSetAttribute(bulkCopyKernel,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           kBulkStages * max_chunk_bytes));
  }
  // [0]: mismatching vectors of the check (u64); [1]: blocks that timed out (u32).
  DeviceMemory counters(2 * sizeof(unsigned long long));
  auto* mismatches = counters.as<unsigned long long>();
  auto* timeouts = counters.as<unsigned int>(sizeof(unsigned long long));
  uint64_t row = 0;
  for (const bool to_peers : {true, false}) {
    const char* method = to_peers ? "SM bulk store" : "SM bulk load";
    for (const int sms : config.sm_counts) {
      for (const int chunk_bytes : kBulkChunkBytes) {
        if (!unsupported.empty()) {
          LinkSample sample;
          sample.method = method;
          sample.sms = sms;
          sample.bytes = bytes;
          sample.chunk_bytes = chunk_bytes;
          sample.stages = kBulkStages;
          sample.check = LinkCheck::kUnsupported;
          sample.detail = unsupported;
          samples.push_back(sample);
          continue;
        }
        // A new pattern in the source and zeros in the destination before every row: a copy
        // that does not happen cannot pass on what an earlier row left in the destination.
        ++row;
        for (int k = 0; k < num_peers; ++k) {
          void* near = local.as<uint8_t>() + static_cast<size_t>(k) * chunk;
          void* far = remote.ptr[k];
          const uint64_t seed = mix64(0xb01cc0deull ^ (static_cast<uint64_t>(buffer.rank()) << 40) ^
                                      (row << 16) ^ static_cast<uint64_t>(k));
          fillRandomBf16(to_peers ? near : far, chunk / 2, seed, stream);
          zeroVectors(to_peers ? far : near, chunk, stream);
        }
        EPCOMM_CUDA_CHECK(cudaMemsetAsync(counters.get(), 0, counters.bytes(), stream));
        measure(method, sms, [&] {
          bulkCopyKernel<<<static_cast<unsigned>(sms), kBulkThreads,
                           static_cast<size_t>(kBulkStages) * static_cast<size_t>(chunk_bytes),
                           stream>>>(remote, local.as<uint8_t>(), to_peers, num_peers,
                                     static_cast<int64_t>(chunk / static_cast<size_t>(chunk_bytes)),
                                     static_cast<uint32_t>(chunk_bytes), timeouts);
          EPCOMM_CUDA_CHECK(cudaGetLastError());
        });
        // The check: every 16-byte vector of every peer's chunk, destination against source
        // (one side read over NVLink), after the last timed repetition. The barrier first: the
        // check's NVLink reads must not overlap a peer's last timed repetition.
        buffer.barrier(stream);
        const size_t vectors = chunk / sizeof(uint4);
        for (int k = 0; k < num_peers; ++k) {
          countMismatchKernel<<<fillBlocks(vectors), kFillThreads, 0, stream>>>(
              local.as<uint4>(static_cast<size_t>(k) * chunk), remote.ptr[k], vectors, mismatches);
          EPCOMM_CUDA_CHECK(cudaGetLastError());
        }
        unsigned long long host_mismatches = 0;
        unsigned int host_timeouts = 0;
        EPCOMM_CUDA_CHECK(cudaMemcpyAsync(&host_mismatches, mismatches, sizeof(host_mismatches),
                                          cudaMemcpyDeviceToHost, stream));
        EPCOMM_CUDA_CHECK(cudaMemcpyAsync(&host_timeouts, timeouts, sizeof(host_timeouts),
                                          cudaMemcpyDeviceToHost, stream));
        EPCOMM_CUDA_CHECK(cudaStreamSynchronize(stream));
        LinkSample& sample = samples.back();
        sample.chunk_bytes = chunk_bytes;
        sample.stages = kBulkStages;
        const std::string what = std::string(method) + " " + std::to_string(chunk_bytes / 1024) +
                                 " KiB x " + std::to_string(kBulkStages) + " stages, " +
                                 std::to_string(sms) + " SMs: ";
        if (host_timeouts != 0) {
          sample.check = LinkCheck::kTimeout;
          sample.detail = what + std::to_string(host_timeouts) + " block(s) waited more than " +
                          std::to_string(kBulkWaitNs / 1000000000ull) +
                          " s for a bulk load (mbarrier)";
        } else if (host_mismatches != 0) {
          sample.check = LinkCheck::kMismatch;
          sample.detail = what + std::to_string(host_mismatches) + " of " +
                          std::to_string(vectors * static_cast<size_t>(num_peers)) +
                          " 16-byte vectors differ from the source after the timed copies";
        } else {
          sample.check = LinkCheck::kOk;
        }
      }
    }
  }
}

}  // namespace

std::vector<LinkSample> runLinkBench(EpBuffer& buffer, const LinkBenchConfig& config,
                                     cudaStream_t stream) {
  const int num_ranks = buffer.numRanks();
  const int me = buffer.rank();
  std::vector<LinkSample> samples;
  if (num_ranks < 2) return samples;
  const int num_peers = num_ranks - 1;

  size_t chunk = std::min(buffer.scratchBytes() / static_cast<size_t>(num_ranks),
                          config.bytes_per_rank / static_cast<size_t>(num_peers));
  chunk = chunk / kSegmentBytes * kSegmentBytes;
  if (chunk == 0) {
    throw Error(ErrorCode::kInvalidArgument,
                "link benchmark: the EpBuffer scratch (" + std::to_string(buffer.scratchBytes()) +
                    " bytes) is too small for one 64 KiB segment per rank");
  }
  const int64_t segments = static_cast<int64_t>(chunk / kSegmentBytes);
  const PeerChunks remote = peerChunks(buffer, chunk);
  DeviceMemory local(chunk * static_cast<size_t>(num_peers));
  fillRandomBf16(local.get(), local.bytes() / 2, 0x5eedull + static_cast<uint64_t>(me), stream);
  const size_t bytes = chunk * static_cast<size_t>(num_peers);

  std::vector<OwnedStream> side;
  for (int k = 0; k < num_peers; ++k) side.push_back(OwnedStream::create());
  OwnedEvent fork = OwnedEvent::create(cudaEventDisableTiming);
  std::vector<OwnedEvent> joins;
  for (int k = 0; k < num_peers; ++k) joins.push_back(OwnedEvent::create(cudaEventDisableTiming));

  EventTimer timer(config.reps);
  auto measure = [&](const char* method, int sms, auto&& launch) {
    for (int i = 0; i < config.warmup + config.reps; ++i) {
      // The device barrier releases every rank's stream within about a microsecond; the
      // transfer is already queued behind it, so all ranks move data at the same time.
      buffer.barrier(stream);
      if (i >= config.warmup) timer.start(i - config.warmup, stream);
      launch();
      if (i >= config.warmup) timer.stop(i - config.warmup, stream);
    }
    buffer.sync(stream);
    LinkSample sample;
    sample.method = method;
    sample.sms = sms;
    sample.bytes = bytes;
    sample.median_us = median(timer.microseconds(config.reps));
    samples.push_back(sample);
  };

  for (int sms : config.sm_counts) {
    measure("SM store", sms, [&] {
      peerCopyKernel<true><<<static_cast<unsigned>(sms), kCopyThreads, 0, stream>>>(
          remote, local.as<uint4>(), num_peers, segments);
      EPCOMM_CUDA_CHECK(cudaGetLastError());
    });
  }
  for (int sms : config.sm_counts) {
    measure("SM load", sms, [&] {
      peerCopyKernel<false><<<static_cast<unsigned>(sms), kCopyThreads, 0, stream>>>(
          remote, local.as<uint4>(), num_peers, segments);
      EPCOMM_CUDA_CHECK(cudaGetLastError());
    });
  }
  measure("copy engine", 0, [&] {
    // One stream per peer so the copy engines serve all peers at once.
    EPCOMM_CUDA_CHECK(cudaEventRecord(fork.get(), stream));
    for (int k = 0; k < num_peers; ++k) {
      cudaStream_t s = side[static_cast<size_t>(k)].get();
      EPCOMM_CUDA_CHECK(cudaStreamWaitEvent(s, fork.get(), 0));
      EPCOMM_CUDA_CHECK(cudaMemcpyAsync(remote.ptr[k],
                                        local.as<uint8_t>() + static_cast<size_t>(k) * chunk, chunk,
                                        cudaMemcpyDefault, s));
      EPCOMM_CUDA_CHECK(cudaEventRecord(joins[static_cast<size_t>(k)].get(), s));
      EPCOMM_CUDA_CHECK(cudaStreamWaitEvent(stream, joins[static_cast<size_t>(k)].get(), 0));
    }
  });
  if (config.bulk) runBulkRows(buffer, config, remote, local, chunk, stream, measure, samples);
  return samples;
}

}  // namespace epcomm::bench
