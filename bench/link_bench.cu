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
    samples.push_back(LinkSample{method, sms, bytes, median(timer.microseconds(config.reps))});
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
  return samples;
}

}  // namespace epcomm::bench
