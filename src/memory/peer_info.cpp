// SPDX-License-Identifier: Apache-2.0
// PeerInfo: filling, sealing and checking the fixed record (layout and rules in peer_info.hpp).
#include "memory/peer_info.hpp"

#include <cstring>
#include <string>

#include "check.hpp"

// Every parse failure is an internal error: records come from ranks running this very build.
#define EPCOMM_RECORD_CHECK(cond, msg) EPCOMM_CHECK(cond, "corrupted peer-info record: " << msg)

namespace epcomm::memory {

namespace {

constexpr size_t kChecksumOffset = offsetof(PeerInfo, checksum);
constexpr const char kTruncationMark[] = "...";

// Truncates to at most kMaxPeerErrorBytes, marking the cut and never splitting a UTF-8 sequence.
std::string truncatedError(const std::string& error) {
  if (error.size() <= kMaxPeerErrorBytes) return error;
  size_t keep = kMaxPeerErrorBytes - (sizeof(kTruncationMark) - 1);
  while (keep > 0 && (static_cast<uint8_t>(error[keep]) & 0xC0) == 0x80) --keep;
  return error.substr(0, keep) + kTruncationMark;
}

// Throws unless bytes [from, to) of the record are all zero, naming the first offset that is not.
void expectZero(const uint8_t* record, size_t from, size_t to, const char* what) {
  for (size_t i = from; i < to; ++i) {
    EPCOMM_RECORD_CHECK(record[i] == 0,
                        what << " byte at offset " << i << " is " << int{record[i]} << ", not 0");
  }
}

}  // namespace

void PeerInfo::setHandle(const void* data, size_t size) {
  EPCOMM_ARG_CHECK(size <= kMaxHandleBytes, "PeerInfo handle size", size,
                   "<= " << kMaxHandleBytes << " bytes");
  std::memset(handle, 0, sizeof(handle));
  if (size > 0) std::memcpy(handle, data, size);
  handle_length = static_cast<uint16_t>(size);
}

void PeerInfo::setError(const std::string& text) {
  const std::string kept = truncatedError(text);
  std::memset(error, 0, sizeof(error));
  if (!kept.empty()) std::memcpy(error, kept.data(), kept.size());
  error_length = static_cast<uint16_t>(kept.size());
}

void PeerInfo::seal() {
  magic = kPeerInfoMagic;
  version = kPeerInfoVersion;
  checksum = peerInfoChecksum(reinterpret_cast<const uint8_t*>(this), sizeof(*this));
}

uint32_t peerInfoChecksum(const uint8_t* record, size_t size) {
  EPCOMM_RECORD_CHECK(record != nullptr && size == kPeerInfoBytes,
                      "checksum of a " << size << "-byte record");
  // Bitwise CRC-32 (reflected polynomial 0xEDB88320): 508 bytes once per rank and buffer.
  uint32_t crc = 0xFFFFFFFFu;
  for (size_t i = 0; i < kChecksumOffset; ++i) {
    crc ^= record[i];
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}

PeerInfo parsePeerInfo(const void* data, size_t size) {
  EPCOMM_RECORD_CHECK(data != nullptr, "null data pointer");
  EPCOMM_RECORD_CHECK(size == kPeerInfoBytes,
                      size << " bytes, expected exactly " << kPeerInfoBytes);
  PeerInfo info;
  std::memcpy(&info, data, sizeof(info));
  const auto* bytes = static_cast<const uint8_t*>(data);
  // Magic and version before the checksum: a record of another version may place it elsewhere.
  EPCOMM_RECORD_CHECK(info.magic == kPeerInfoMagic, "bad magic 0x" << std::hex << info.magic
                                                                   << ", expected 0x"
                                                                   << kPeerInfoMagic);
  EPCOMM_CHECK(info.version == kPeerInfoVersion,
               "peer-info record has version " << info.version << ", this build reads version "
                                               << kPeerInfoVersion
                                               << " (mixed epcomm builds in one job?)");
  const uint32_t expected = peerInfoChecksum(bytes, size);
  EPCOMM_RECORD_CHECK(info.checksum == expected, "checksum 0x" << std::hex << info.checksum
                                                               << " does not match the contents (0x"
                                                               << expected << ")");
  EPCOMM_RECORD_CHECK(info.ok <= 1, "ok flag is " << int{info.ok} << ", not 0 or 1");
  expectZero(bytes, offsetof(PeerInfo, reserved), offsetof(PeerInfo, rank), "reserved");
  EPCOMM_RECORD_CHECK(info.handle_length <= kMaxHandleBytes,
                      "handle length " << info.handle_length << " exceeds " << kMaxHandleBytes);
  EPCOMM_RECORD_CHECK(info.error_length <= kMaxPeerErrorBytes,
                      "error length " << info.error_length << " exceeds " << kMaxPeerErrorBytes);
  const size_t handle_at = offsetof(PeerInfo, handle);
  expectZero(bytes, handle_at + info.handle_length, handle_at + kMaxHandleBytes, "unused handle");
  const size_t error_at = offsetof(PeerInfo, error);
  expectZero(bytes, error_at + info.error_length, error_at + kMaxPeerErrorBytes, "unused error");
  return info;
}

std::vector<PeerInfo> allGatherPeerInfo(Bootstrap& bootstrap, PeerInfo mine) {
  mine.seal();
  const size_t ranks = static_cast<size_t>(bootstrap.size());
  std::vector<uint8_t> gathered(sizeof(PeerInfo) * ranks);
  bootstrap.allGather(&mine, gathered.data(), sizeof(PeerInfo));
  std::vector<PeerInfo> infos;
  infos.reserve(ranks);
  for (size_t r = 0; r < ranks; ++r) {
    infos.push_back(parsePeerInfo(gathered.data() + r * sizeof(PeerInfo), sizeof(PeerInfo)));
    EPCOMM_RECORD_CHECK(infos.back().rank == static_cast<int32_t>(r),
                        "the record of rank " << r << " claims rank " << infos.back().rank);
  }
  return infos;
}

}  // namespace epcomm::memory
