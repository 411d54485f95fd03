// SPDX-License-Identifier: Apache-2.0
// The fixed-size record every rank all-gathers while the symmetric buffer is set up: who it is,
// how it allocated, and the handle its peers import. Parsing checks every length against the
// record's bounds, so a short or corrupted blob is an error, never a read past the end.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "epcomm/config.hpp"

namespace epcomm::memory {

constexpr size_t kPeerInfoBytes = 512;   // wire size of one record
constexpr size_t kMaxHandleBytes = 64;   // cudaIpcMemHandle_t and CUmemFabricHandle are 64 bytes
constexpr size_t kMaxPeerErrorBytes = 320;

struct PeerInfo {
  int32_t rank = -1;
  MemMode mode = MemMode::kAuto;
  int32_t device = -1;
  uint64_t bytes = 0;      // symmetric bytes this rank allocated (must match on every rank)
  uint64_t host_hash = 0;  // identifies the host (hostname + boot id)
  int32_t pid = 0;
  bool ok = false;         // false: this rank failed; `error` says why
  std::string error;       // truncated to kMaxPeerErrorBytes when serialized
  std::vector<uint8_t> handle;  // opaque handle bytes (empty for posix_fd)
};

// Exactly kPeerInfoBytes bytes. Throws epcomm::InvalidArgument if handle is over kMaxHandleBytes.
std::vector<uint8_t> serializePeerInfo(const PeerInfo& info);

// Throws epcomm::Error(kInternal) naming what is wrong (size, magic, version, checksum, a length
// field beyond the record, an unknown mode, a non-zero reserved or padding byte). Accepts only
// the canonical encoding: serializePeerInfo of the result gives `data` back byte for byte.
PeerInfo deserializePeerInfo(const uint8_t* data, size_t size);

// CRC-32 (IEEE, as zlib's crc32) of the first kPeerInfoBytes - 4 bytes of a kPeerInfoBytes-byte
// record: the value its last 4 bytes carry, little-endian.
uint32_t peerInfoChecksum(const uint8_t* record, size_t size);

}  // namespace epcomm::memory
