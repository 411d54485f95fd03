// SPDX-License-Identifier: Apache-2.0
// Seed hashing shared by the tests, ep_bench and their fill kernels: every random input derives
// from one user seed through these, so every rank (and the host and the device) agrees.
#pragma once

#include <cstdint>
#include <initializer_list>

#ifdef __CUDACC__
#define EPCOMM_UTIL_HOST_DEVICE __host__ __device__
#else
#define EPCOMM_UTIL_HOST_DEVICE
#endif

namespace epcomm::util {

// The splitmix64 finalizer: a bijective 64-bit mix with good avalanche; consecutive inputs give
// independent-looking outputs.
EPCOMM_UTIL_HOST_DEVICE constexpr uint64_t mix64(uint64_t value) {
  value += 0x9e3779b97f4a7c15ull;
  value = (value ^ (value >> 30)) * 0xbf58476d1ce4e5b9ull;
  value = (value ^ (value >> 27)) * 0x94d049bb133111ebull;
  return value ^ (value >> 31);
}

// Order-sensitive combination of a running hash with one more value.
EPCOMM_UTIL_HOST_DEVICE constexpr uint64_t hashCombine(uint64_t hash, uint64_t value) {
  return mix64(hash ^ (mix64(value) + 0x9e3779b97f4a7c15ull + (hash << 6) + (hash >> 2)));
}

// A seed for one purpose (rank, case, set, tensor, ...), derived from `base`: each part is mixed
// in turn. ep_bench derives every input from --seed this way.
inline uint64_t seedFor(uint64_t base, std::initializer_list<uint64_t> parts) {
  uint64_t s = mix64(base);
  for (uint64_t p : parts) s = mix64(s ^ p);
  return s;
}

}  // namespace epcomm::util
