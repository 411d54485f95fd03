// SPDX-License-Identifier: Apache-2.0
// The fixed 512-byte record every rank all-gathers while the symmetric buffer is set up: who it
// is, whether its step worked (and why not), and the handle its peers import.
//
// The struct is the wire format: trivially copyable, every field at a pinned offset (the
// static_asserts below), no implicit padding, integers little-endian (the only byte order CUDA
// hosts have). A record is accepted only if it is exactly what this build writes: right magic,
// version and CRC-32 trailer, flags 0 or 1, lengths within bounds, and every reserved byte and
// every byte past the handle and error lengths zero.
//
// Bump kPeerInfoVersion for any layout change. Every rank of a job runs the same build, so a
// mismatch means a corrupted record or mixed installations, both worth a loud error.
// Version history: 1 = no checksum; 2 = CRC-32 trailer, strict zero padding; 3 = this struct
// (mode and host_hash dropped: nothing read them).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "epcomm/bootstrap.hpp"

namespace epcomm::memory {

constexpr size_t kPeerInfoBytes = 512;
constexpr uint32_t kPeerInfoMagic = 0x4d435045u;  // "EPCM" when stored little-endian
constexpr uint16_t kPeerInfoVersion = 3;
constexpr size_t kMaxHandleBytes = 64;  // cudaIpcMemHandle_t and CUmemFabricHandle are 64 bytes
constexpr size_t kMaxPeerErrorBytes = 412;

struct PeerInfo {
  uint32_t magic = kPeerInfoMagic;
  uint16_t version = kPeerInfoVersion;
  uint8_t ok = 0;        // 1: this rank's step worked; 0: `error` says why
  uint8_t reserved = 0;  // explicit padding, always 0
  int32_t rank = -1;
  int32_t device = -1;         // CUDA ordinal (printed in the peer map)
  uint64_t bytes = 0;          // symmetric bytes this rank allocated (must match on every rank)
  int32_t pid = 0;             // CUDA IPC cannot import a handle of its own process
  uint16_t handle_length = 0;  // <= kMaxHandleBytes
  uint16_t error_length = 0;   // <= kMaxPeerErrorBytes
  uint8_t handle[kMaxHandleBytes] = {};  // opaque handle; bytes past handle_length are 0
  char error[kMaxPeerErrorBytes] = {};   // no terminator; bytes past error_length are 0
  uint32_t checksum = 0;                 // CRC-32 of every byte before it (seal())

  // Copies `size` handle bytes. Throws epcomm::InvalidArgument if size > kMaxHandleBytes.
  void setHandle(const void* data, size_t size);
  // Stores `text`, truncated to kMaxPeerErrorBytes (marked "...", never inside a UTF-8 sequence).
  void setError(const std::string& text);
  std::string errorText() const { return std::string(error, error_length); }
  // Sets the checksum; call after the last change, before the record leaves this rank.
  void seal();
};

static_assert(std::is_trivially_copyable<PeerInfo>::value, "PeerInfo is sent as raw bytes");
static_assert(std::is_standard_layout<PeerInfo>::value, "PeerInfo has a pinned layout");
static_assert(sizeof(PeerInfo) == kPeerInfoBytes, "PeerInfo is a 512-byte record");
static_assert(offsetof(PeerInfo, version) == 4 && offsetof(PeerInfo, ok) == 6 &&
                  offsetof(PeerInfo, reserved) == 7 && offsetof(PeerInfo, rank) == 8 &&
                  offsetof(PeerInfo, device) == 12 && offsetof(PeerInfo, bytes) == 16 &&
                  offsetof(PeerInfo, pid) == 24 && offsetof(PeerInfo, handle_length) == 28 &&
                  offsetof(PeerInfo, error_length) == 30 && offsetof(PeerInfo, handle) == 32 &&
                  offsetof(PeerInfo, error) == 96 &&
                  offsetof(PeerInfo, checksum) == kPeerInfoBytes - 4,
              "PeerInfo field offsets are the wire format (bump kPeerInfoVersion to change them)");
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "PeerInfo is little-endian on the wire");

// Checks a received record and returns it. Throws epcomm::Error(kInternal) naming what is wrong
// (size, magic, version, checksum, a flag or length out of range, a non-zero reserved or unused
// byte); never reads outside [data, data + size).
PeerInfo parsePeerInfo(const void* data, size_t size);

// CRC-32 (IEEE, as zlib's crc32) of the first kPeerInfoBytes - 4 bytes of a kPeerInfoBytes-byte
// record: the value its checksum field carries.
uint32_t peerInfoChecksum(const uint8_t* record, size_t size);

// Collective: seals `mine` (whose rank must be this rank), all-gathers it and returns every rank's
// parsed record, by rank. A record in the wrong slot is corrupted.
std::vector<PeerInfo> allGatherPeerInfo(Bootstrap& bootstrap, PeerInfo mine);

}  // namespace epcomm::memory
