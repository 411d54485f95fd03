// PeerInfo wire format: round trips, and rejection of every short or corrupted record without
// reading past its end (this suite is also run under valgrind).
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "epcomm/error.hpp"
#include "memory/peer_info.hpp"

namespace epcomm::memory {
namespace {

// Offsets of the fixed header fields (see the layout comment in src/memory/peer_info.cpp).
constexpr size_t kVersionOffset = 4;
constexpr size_t kModeOffset = 6;
constexpr size_t kOkOffset = 36;
constexpr size_t kHandleLengthOffset = 38;
constexpr size_t kHandleOffset = 40;

std::vector<uint8_t> pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> bytes(n);
  for (size_t i = 0; i < n; ++i) bytes[i] = static_cast<uint8_t>(seed + 7 * i);
  return bytes;
}

PeerInfo sample(int rank, MemMode mode, size_t handle_bytes, const std::string& error) {
  PeerInfo info;
  info.rank = rank;
  info.mode = mode;
  info.device = rank % 3;
  info.bytes = (uint64_t{1} << 40) + 4096u * static_cast<uint64_t>(rank) + 7;
  info.host_hash = 0xfedcba9876543210ull ^ static_cast<uint64_t>(rank);
  info.pid = 100000 + rank;
  info.ok = error.empty();
  info.error = error;
  info.handle = pattern(handle_bytes, static_cast<uint8_t>(rank));
  return info;
}

void putU16(std::vector<uint8_t>* record, size_t offset, uint16_t value) {
  (*record)[offset] = static_cast<uint8_t>(value);
  (*record)[offset + 1] = static_cast<uint8_t>(value >> 8);
}

// Parses from an exactly-sized heap copy, so any read past the end is visible to valgrind/ASan.
PeerInfo parseCopy(const std::vector<uint8_t>& record, size_t size) {
  std::unique_ptr<uint8_t[]> copy(new uint8_t[size > 0 ? size : 1]);
  if (size > 0) std::memcpy(copy.get(), record.data(), size);
  return deserializePeerInfo(copy.get(), size);
}

// Expects an internal error whose message contains `part`.
void expectCorrupt(const std::vector<uint8_t>& record, const std::string& part) {
  try {
    parseCopy(record, record.size());
    ADD_FAILURE() << "accepted a corrupted record (expected: " << part << ")";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInternal) << e.what();
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos)
        << "message \"" << e.what() << "\" does not mention \"" << part << "\"";
  }
}

void expectSame(const PeerInfo& a, const PeerInfo& b) {
  EXPECT_EQ(a.rank, b.rank);
  EXPECT_EQ(a.mode, b.mode);
  EXPECT_EQ(a.device, b.device);
  EXPECT_EQ(a.bytes, b.bytes);
  EXPECT_EQ(a.host_hash, b.host_hash);
  EXPECT_EQ(a.pid, b.pid);
  EXPECT_EQ(a.ok, b.ok);
  EXPECT_EQ(a.error, b.error);
  EXPECT_EQ(a.handle, b.handle);
}

TEST(PeerInfo, RoundTripsEveryModeAndHandleSize) {
  int rank = 0;
  for (MemMode mode : {MemMode::kAuto, MemMode::kFabric, MemMode::kPosixFd, MemMode::kCudaIpc}) {
    for (size_t handle_bytes : {size_t{0}, size_t{1}, size_t{17}, kMaxHandleBytes}) {
      for (const char* error : {"", "cuMemCreate failed: CUDA_ERROR_NOT_PERMITTED (800)"}) {
        SCOPED_TRACE(::testing::Message() << memModeName(mode) << ", handle " << handle_bytes
                                          << " bytes, error '" << error << "'");
        const PeerInfo info = sample(rank++, mode, handle_bytes, error);
        const std::vector<uint8_t> record = serializePeerInfo(info);
        ASSERT_EQ(record.size(), kPeerInfoBytes);
        expectSame(parseCopy(record, record.size()), info);
      }
    }
  }
}

TEST(PeerInfo, RoundTripsExtremeValues) {
  PeerInfo info;
  info.rank = -1;
  info.device = INT32_MIN;
  info.bytes = UINT64_MAX;
  info.host_hash = 0;
  info.pid = INT32_MAX;
  info.ok = true;
  info.handle.assign(kMaxHandleBytes, 0xFF);
  info.error = std::string("nul\0inside", 10);
  const std::vector<uint8_t> record = serializePeerInfo(info);
  expectSame(parseCopy(record, record.size()), info);
}

TEST(PeerInfo, WireHeaderIsLittleEndianAndZeroPadded) {
  const std::vector<uint8_t> record = serializePeerInfo(sample(5, MemMode::kPosixFd, 3, ""));
  EXPECT_EQ(std::string(record.begin(), record.begin() + 4), "EPCM");
  EXPECT_EQ(record[kVersionOffset], 1);
  EXPECT_EQ(record[kVersionOffset + 1], 0);
  EXPECT_EQ(record[kModeOffset], static_cast<uint8_t>(MemMode::kPosixFd));
  EXPECT_EQ(record[8], 5);  // rank
  EXPECT_EQ(record[kHandleLengthOffset], 3);
  // handle (3) + error length (2) + no error text, then padding.
  for (size_t i = kHandleOffset + 3 + 2; i < kPeerInfoBytes; ++i) {
    ASSERT_EQ(record[i], 0) << "byte " << i;
  }
}

TEST(PeerInfo, LongErrorIsTruncated) {
  const std::string long_error(5000, 'x');
  const PeerInfo info = sample(1, MemMode::kCudaIpc, kMaxHandleBytes, long_error);
  const PeerInfo back = parseCopy(serializePeerInfo(info), kPeerInfoBytes);
  EXPECT_LE(back.error.size(), kMaxPeerErrorBytes);
  EXPECT_GT(back.error.size(), kMaxPeerErrorBytes / 2);
  EXPECT_EQ(back.error.compare(0, 10, long_error, 0, 10), 0);
  EXPECT_EQ(back.handle, info.handle);  // the error never crowds out the handle
}

TEST(PeerInfo, TruncationNeverSplitsUtf8) {
  // Two-byte characters ("é") so a byte-exact cut would land inside one.
  std::string error;
  while (error.size() < 2 * kMaxPeerErrorBytes) error += "\xC3\xA9";
  const PeerInfo back =
      parseCopy(serializePeerInfo(sample(2, MemMode::kFabric, 0, error)), kPeerInfoBytes);
  ASSERT_LE(back.error.size(), kMaxPeerErrorBytes);
  size_t accents = 0;
  while (accents + 1 < back.error.size() && back.error.compare(accents, 2, "\xC3\xA9") == 0) {
    accents += 2;
  }
  // Whatever follows the last whole character is ASCII (the truncation mark), never a stray byte.
  for (size_t i = accents; i < back.error.size(); ++i) {
    EXPECT_LT(static_cast<uint8_t>(back.error[i]), 0x80) << "byte " << i;
  }
}

TEST(PeerInfo, SerializeRejectsOversizedHandle) {
  PeerInfo info = sample(0, MemMode::kFabric, kMaxHandleBytes + 1, "");
  try {
    serializePeerInfo(info);
    ADD_FAILURE() << "accepted a 65-byte handle";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("65"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("64"), std::string::npos) << e.what();
  }
  info.handle.clear();
  info.mode = static_cast<MemMode>(42);
  EXPECT_THROW(serializePeerInfo(info), InvalidArgument);
}

TEST(PeerInfo, RejectsEveryTruncatedLength) {
  const std::vector<uint8_t> record =
      serializePeerInfo(sample(3, MemMode::kCudaIpc, kMaxHandleBytes, "some error"));
  for (size_t size = 0; size < kPeerInfoBytes; ++size) {
    try {
      parseCopy(record, size);
      ADD_FAILURE() << "accepted a " << size << "-byte record";
    } catch (const Error& e) {
      ASSERT_EQ(e.code(), ErrorCode::kInternal) << e.what();
    }
  }
}

TEST(PeerInfo, RejectsNullAndOversizedInput) {
  EXPECT_THROW(deserializePeerInfo(nullptr, kPeerInfoBytes), Error);
  EXPECT_THROW(deserializePeerInfo(nullptr, 0), Error);
  std::vector<uint8_t> longer = serializePeerInfo(sample(0, MemMode::kAuto, 0, ""));
  longer.push_back(0);
  expectCorrupt(longer, "513 bytes");
}

TEST(PeerInfo, RejectsCorruptedHeader) {
  const std::vector<uint8_t> good = serializePeerInfo(sample(4, MemMode::kPosixFd, 8, "x"));
  {
    std::vector<uint8_t> bad = good;
    bad[0] ^= 0x20;  // 'E' -> 'e'
    expectCorrupt(bad, "magic");
  }
  {
    std::vector<uint8_t> bad = good;
    putU16(&bad, kVersionOffset, 2);
    expectCorrupt(bad, "version 2");
  }
  {
    std::vector<uint8_t> bad = good;
    putU16(&bad, kVersionOffset, 0);
    expectCorrupt(bad, "version 0");
  }
  for (uint16_t mode : {uint16_t{4}, uint16_t{0x100}, uint16_t{0xFFFF}}) {
    std::vector<uint8_t> bad = good;
    putU16(&bad, kModeOffset, mode);
    expectCorrupt(bad, "unknown memory mode " + std::to_string(mode));
  }
  {
    std::vector<uint8_t> bad = good;
    bad[kOkOffset] = 2;
    expectCorrupt(bad, "ok flag");
  }
}

TEST(PeerInfo, RejectsBadLengths) {
  const std::vector<uint8_t> good = serializePeerInfo(sample(6, MemMode::kFabric, 16, "abc"));
  for (uint16_t length :
       {uint16_t{kMaxHandleBytes + 1}, uint16_t{kPeerInfoBytes}, uint16_t{0xFFFF}}) {
    std::vector<uint8_t> bad = good;
    putU16(&bad, kHandleLengthOffset, length);
    expectCorrupt(bad, "handle length " + std::to_string(length));
  }
  // The error length sits right after the handle bytes.
  const size_t error_length_offset = kHandleOffset + 16;
  for (uint16_t length :
       {uint16_t{kMaxPeerErrorBytes + 1}, uint16_t{kPeerInfoBytes}, uint16_t{0xFFFF}}) {
    std::vector<uint8_t> bad = good;
    putU16(&bad, error_length_offset, length);
    expectCorrupt(bad, "error length " + std::to_string(length));
  }
  // A record whose every byte is 0xFF: bad magic first, nothing read beyond it.
  expectCorrupt(std::vector<uint8_t>(kPeerInfoBytes, 0xFF), "magic");
}

TEST(PeerInfo, NoHandleLengthReadsOutOfBounds) {
  // Every handle length up to past the record end, plus the high values: none may read out of
  // bounds (valgrind) or be accepted beyond the limit.
  const std::vector<uint8_t> good = serializePeerInfo(sample(7, MemMode::kCudaIpc, 0, ""));
  std::vector<uint32_t> lengths;
  for (uint32_t length = 0; length <= kPeerInfoBytes + 8; ++length) lengths.push_back(length);
  for (uint32_t length : {0x7FFFu, 0x8000u, 0xFFFEu, 0xFFFFu}) lengths.push_back(length);
  std::vector<uint8_t> bad = good;
  for (uint32_t length : lengths) {
    putU16(&bad, kHandleLengthOffset, static_cast<uint16_t>(length));
    bool accepted = true;
    try {
      parseCopy(bad, bad.size());
    } catch (const Error& e) {
      ASSERT_EQ(e.code(), ErrorCode::kInternal) << e.what();
      accepted = false;
    }
    if (length > kMaxHandleBytes) {
      ASSERT_FALSE(accepted) << "handle length " << length;
    }
  }
}

}  // namespace
}  // namespace epcomm::memory
