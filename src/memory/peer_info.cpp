// SPDX-License-Identifier: Apache-2.0
// Wire format of PeerInfo (all integers little-endian, whatever the host byte order):
//
//   offset  size  field
//        0     4  magic 'EPCM' (bytes 45 50 43 4d)
//        4     2  version (2)
//        6     2  mode (MemMode value)
//        8     4  rank (int32)
//       12     4  device (int32)
//       16     8  bytes
//       24     8  host_hash
//       32     4  pid (int32)
//       36     1  ok (0 or 1)
//       37     1  reserved (must be 0)
//       38     2  handle length (<= kMaxHandleBytes)
//       40     n  handle bytes
//     40+n     2  error length (<= kMaxPeerErrorBytes)
//     42+n     m  error bytes (no terminator)
//   ..508        zero padding (must be 0)
//      508     4  CRC-32 (IEEE 802.3, as zlib's crc32) of bytes [0, 508)
//
// A bump of `version` is required for any change; every rank of a job runs the same build, so
// a mismatch means a corrupted record or mixed installations, both worth a loud error. Magic and
// version are checked before the checksum (a record of another version may place it elsewhere).
// The encoding is canonical: a record is accepted only if serializing what was parsed gives the
// same 512 bytes back (reserved and padding bytes zero, checksum right).
// Version history: 1 = no checksum; 2 = CRC-32 trailer, strict zero padding.
#include "memory/peer_info.hpp"

#include <cstring>
#include <string>
#include <type_traits>

#include "check.hpp"

// Every parse failure is an internal error: records come from ranks running this very build.
#define EPCOMM_RECORD_CHECK(cond, msg) EPCOMM_CHECK(cond, "corrupted peer-info record: " << msg)

namespace epcomm::memory {

namespace {

constexpr uint32_t kMagic = 0x4d435045u;  // "EPCM" when stored little-endian
constexpr uint16_t kVersion = 2;
constexpr size_t kFixedHeaderBytes = 40;
constexpr size_t kChecksumOffset = kPeerInfoBytes - 4;
constexpr const char kTruncationMark[] = "...";
static_assert(kFixedHeaderBytes + kMaxHandleBytes + 2 + kMaxPeerErrorBytes <= kChecksumOffset,
              "PeerInfo fields no longer fit in the fixed record size");

bool knownMode(uint16_t value) {
  switch (static_cast<MemMode>(value)) {
    case MemMode::kAuto:
    case MemMode::kFabric:
    case MemMode::kPosixFd:
    case MemMode::kCudaIpc:
      return true;
  }
  return false;
}

class Writer {
 public:
  explicit Writer(std::vector<uint8_t>* out) : out_(out) {}

  template <typename T>
  void put(T value) {
    static_assert(std::is_unsigned<T>::value, "write the unsigned bit pattern");
    for (size_t i = 0; i < sizeof(T); ++i) {
      (*out_)[pos_++] = static_cast<uint8_t>(value >> (8 * i));
    }
  }
  void putBytes(const void* data, size_t n) {
    if (n > 0) std::memcpy(out_->data() + pos_, data, n);
    pos_ += n;
  }
  void seek(size_t pos) { pos_ = pos; }

 private:
  std::vector<uint8_t>* out_;
  size_t pos_ = 0;
};

// Every read is checked against the record's size before touching memory.
class Reader {
 public:
  Reader(const uint8_t* data, size_t size) : data_(data), size_(size) {}

  template <typename T>
  T get(const char* field) {
    static_assert(std::is_unsigned<T>::value, "read the unsigned bit pattern");
    need(sizeof(T), field);
    T value = 0;
    for (size_t i = 0; i < sizeof(T); ++i) value |= static_cast<T>(data_[pos_ + i]) << (8 * i);
    pos_ += sizeof(T);
    return value;
  }
  const uint8_t* getBytes(size_t n, const char* field) {
    need(n, field);
    const uint8_t* p = data_ + pos_;
    pos_ += n;
    return p;
  }
  size_t pos() const { return pos_; }

 private:
  void need(size_t n, const char* field) {
    EPCOMM_RECORD_CHECK(n <= size_ - pos_, field << " (" << n << " bytes at offset " << pos_
                                                 << ") runs past the end of the " << size_
                                                 << "-byte record");
  }

  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

// Truncates to at most kMaxPeerErrorBytes, marking the cut and never splitting a UTF-8 sequence.
std::string truncatedError(const std::string& error) {
  if (error.size() <= kMaxPeerErrorBytes) return error;
  size_t keep = kMaxPeerErrorBytes - (sizeof(kTruncationMark) - 1);
  while (keep > 0 && (static_cast<uint8_t>(error[keep]) & 0xC0) == 0x80) --keep;
  return error.substr(0, keep) + kTruncationMark;
}

}  // namespace

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

std::vector<uint8_t> serializePeerInfo(const PeerInfo& info) {
  EPCOMM_ARG_CHECK(info.handle.size() <= kMaxHandleBytes, "PeerInfo::handle size",
                   info.handle.size(), "<= " << kMaxHandleBytes << " bytes");
  const auto mode = static_cast<uint16_t>(info.mode);
  EPCOMM_ARG_CHECK(knownMode(mode), "PeerInfo::mode", mode, "a MemMode value");
  const std::string error = truncatedError(info.error);

  std::vector<uint8_t> out(kPeerInfoBytes, 0);
  Writer w(&out);
  w.put<uint32_t>(kMagic);
  w.put<uint16_t>(kVersion);
  w.put<uint16_t>(mode);
  w.put<uint32_t>(static_cast<uint32_t>(info.rank));
  w.put<uint32_t>(static_cast<uint32_t>(info.device));
  w.put<uint64_t>(info.bytes);
  w.put<uint64_t>(info.host_hash);
  w.put<uint32_t>(static_cast<uint32_t>(info.pid));
  w.put<uint8_t>(info.ok ? 1 : 0);
  w.put<uint8_t>(0);
  w.put<uint16_t>(static_cast<uint16_t>(info.handle.size()));
  w.putBytes(info.handle.data(), info.handle.size());
  w.put<uint16_t>(static_cast<uint16_t>(error.size()));
  w.putBytes(error.data(), error.size());
  w.seek(kChecksumOffset);
  w.put<uint32_t>(peerInfoChecksum(out.data(), out.size()));
  return out;
}

PeerInfo deserializePeerInfo(const uint8_t* data, size_t size) {
  EPCOMM_RECORD_CHECK(data != nullptr, "null data pointer");
  EPCOMM_RECORD_CHECK(size == kPeerInfoBytes,
                      size << " bytes, expected exactly " << kPeerInfoBytes);
  Reader r(data, size);
  const uint32_t magic = r.get<uint32_t>("magic");
  EPCOMM_RECORD_CHECK(magic == kMagic,
                      "bad magic 0x" << std::hex << magic << ", expected 0x" << kMagic);
  const uint16_t version = r.get<uint16_t>("version");
  EPCOMM_CHECK(version == kVersion, "peer-info record has version "
                                        << version << ", this build reads version " << kVersion
                                        << " (mixed epcomm builds in one job?)");
  {
    const uint32_t expected = peerInfoChecksum(data, size);
    Reader trailer(data + kChecksumOffset, size - kChecksumOffset);
    const uint32_t stored = trailer.get<uint32_t>("checksum");
    EPCOMM_RECORD_CHECK(stored == expected, "checksum 0x" << std::hex << stored
                                                          << " does not match the contents (0x"
                                                          << expected << ")");
  }
  const uint16_t mode = r.get<uint16_t>("mode");
  EPCOMM_RECORD_CHECK(knownMode(mode), "unknown memory mode " << mode);

  PeerInfo info;
  info.mode = static_cast<MemMode>(mode);
  info.rank = static_cast<int32_t>(r.get<uint32_t>("rank"));
  info.device = static_cast<int32_t>(r.get<uint32_t>("device"));
  info.bytes = r.get<uint64_t>("bytes");
  info.host_hash = r.get<uint64_t>("host_hash");
  info.pid = static_cast<int32_t>(r.get<uint32_t>("pid"));
  const uint8_t ok = r.get<uint8_t>("ok");
  EPCOMM_RECORD_CHECK(ok <= 1, "ok flag is " << int{ok} << ", not 0 or 1");
  info.ok = ok == 1;
  const uint8_t reserved = r.get<uint8_t>("reserved");
  EPCOMM_RECORD_CHECK(reserved == 0, "reserved byte is " << int{reserved} << ", not 0");

  const uint16_t handle_len = r.get<uint16_t>("handle length");
  EPCOMM_RECORD_CHECK(handle_len <= kMaxHandleBytes,
                      "handle length " << handle_len << " exceeds " << kMaxHandleBytes);
  const uint8_t* handle = r.getBytes(handle_len, "handle");
  info.handle.assign(handle, handle + handle_len);

  const uint16_t error_len = r.get<uint16_t>("error length");
  EPCOMM_RECORD_CHECK(error_len <= kMaxPeerErrorBytes,
                      "error length " << error_len << " exceeds " << kMaxPeerErrorBytes);
  const uint8_t* error = r.getBytes(error_len, "error text");
  info.error.assign(reinterpret_cast<const char*>(error), error_len);

  const size_t padding = kChecksumOffset - r.pos();
  const uint8_t* pad = r.getBytes(padding, "padding");
  for (size_t i = 0; i < padding; ++i) {
    EPCOMM_RECORD_CHECK(
        pad[i] == 0, "padding byte at offset " << (kChecksumOffset - padding + i) << " is not 0");
  }
  return info;
}

}  // namespace epcomm::memory
