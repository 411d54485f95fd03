// SPDX-License-Identifier: Apache-2.0
// PeerInfo wire format: round trips, and rejection of every short or corrupted record without
// reading past its end (this suite is also run under valgrind).
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
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
constexpr size_t kChecksumOffset = kPeerInfoBytes - 4;

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

// Rewrites the CRC-32 trailer after a deliberate change, so the parser's later checks are the
// ones that must catch it.
void reseal(std::vector<uint8_t>* record) {
  if (record->size() != kPeerInfoBytes) return;
  const uint32_t crc = peerInfoChecksum(record->data(), record->size());
  for (size_t i = 0; i < 4; ++i) {
    (*record)[kChecksumOffset + i] = static_cast<uint8_t>(crc >> (8 * i));
  }
}

// Parses from an exactly-sized heap copy, so any read past the end is visible to valgrind/ASan.
PeerInfo parseCopy(const std::vector<uint8_t>& record, size_t size) {
  std::unique_ptr<uint8_t[]> copy(new uint8_t[size > 0 ? size : 1]);
  if (size > 0) std::memcpy(copy.get(), record.data(), size);
  return deserializePeerInfo(copy.get(), size);
}

// Expects an internal error whose message contains `part`. The record is resealed first (unless
// `keep_checksum`), so the check under test, not the checksum, has to catch the change.
void expectCorrupt(std::vector<uint8_t> record, const std::string& part,
                   bool keep_checksum = false) {
  if (!keep_checksum) reseal(&record);
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
  EXPECT_EQ(record[kVersionOffset], 2);
  EXPECT_EQ(record[kVersionOffset + 1], 0);
  EXPECT_EQ(record[kModeOffset], static_cast<uint8_t>(MemMode::kPosixFd));
  EXPECT_EQ(record[8], 5);  // rank
  EXPECT_EQ(record[kHandleLengthOffset], 3);
  // handle (3) + error length (2) + no error text, then padding up to the checksum.
  for (size_t i = kHandleOffset + 3 + 2; i < kChecksumOffset; ++i) {
    ASSERT_EQ(record[i], 0) << "byte " << i;
  }
  const uint32_t crc = peerInfoChecksum(record.data(), record.size());
  EXPECT_EQ(record[kChecksumOffset], static_cast<uint8_t>(crc));
  EXPECT_EQ(record[kChecksumOffset + 3], static_cast<uint8_t>(crc >> 24));
}

// The checksum is zlib's CRC-32 of the first 508 bytes: pinned by a value computed with
// Python's zlib.crc32(b"123456789" + bytes(499)).
TEST(PeerInfo, ChecksumIsZlibCrc32OfTheRecordBody) {
  std::vector<uint8_t> record(kPeerInfoBytes, 0);
  std::memcpy(record.data(), "123456789", 9);
  record[kChecksumOffset] = 0xAB;  // the trailer itself is not covered
  EXPECT_EQ(peerInfoChecksum(record.data(), record.size()), 0xe027f053u);
  EXPECT_THROW(peerInfoChecksum(record.data(), kPeerInfoBytes - 1), Error);
  EXPECT_THROW(peerInfoChecksum(nullptr, kPeerInfoBytes), Error);
}

TEST(PeerInfo, RejectsEveryChangeTheChecksumCovers) {
  const std::vector<uint8_t> good = serializePeerInfo(sample(9, MemMode::kPosixFd, 20, "oops"));
  // Any single-bit change anywhere in the record (also in the checksum itself) is rejected.
  for (size_t byte = 0; byte < kPeerInfoBytes; ++byte) {
    for (int bit = 0; bit < 8; ++bit) {
      std::vector<uint8_t> bad = good;
      bad[byte] ^= static_cast<uint8_t>(1u << bit);
      try {
        parseCopy(bad, bad.size());
        ADD_FAILURE() << "accepted a record with bit " << bit << " of byte " << byte << " flipped";
        return;
      } catch (const Error& e) {
        ASSERT_EQ(e.code(), ErrorCode::kInternal) << e.what();
      }
    }
  }
  std::vector<uint8_t> bad = good;
  bad[kChecksumOffset] ^= 1;
  expectCorrupt(bad, "checksum", /*keep_checksum=*/true);
}

TEST(PeerInfo, RejectsNonZeroReservedAndPaddingBytes) {
  const std::vector<uint8_t> good = serializePeerInfo(sample(8, MemMode::kCudaIpc, 4, "ab"));
  {
    std::vector<uint8_t> bad = good;
    bad[kOkOffset + 1] = 1;
    expectCorrupt(bad, "reserved byte");
  }
  // Padding starts after handle (4) + error length (2) + error text (2).
  for (size_t offset : {kHandleOffset + 4 + 2 + 2, size_t{300}, kChecksumOffset - 1}) {
    std::vector<uint8_t> bad = good;
    bad[offset] = 0x80;
    expectCorrupt(bad, "padding byte at offset " + std::to_string(offset));
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
    putU16(&bad, kVersionOffset, 3);
    expectCorrupt(bad, "version 3");
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
    reseal(&bad);  // so the length check itself is exercised, not the checksum
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

// Randomized mutation test, fixed seed (reproducible; the failure message names the iteration
// and the kind of mutation). Whatever bytes arrive, the parser never crashes or reads out of
// bounds (each input is parsed from an exactly-sized heap copy, so ASan and valgrind see any
// overread), and it either throws Error(kInternal) or returns a valid record whose serialization
// is exactly the input (the encoding is canonical).
TEST(PeerInfo, SurvivesRandomMutations) {
  constexpr int kIterations = 40000;
  std::mt19937_64 rng(0x9e3779b97f4a7c15ull);
  auto below = [&rng](size_t n) { return static_cast<size_t>(rng() % n); };
  std::vector<std::vector<uint8_t>> seeds;
  seeds.push_back(serializePeerInfo(sample(0, MemMode::kAuto, 0, "")));
  seeds.push_back(serializePeerInfo(sample(1, MemMode::kFabric, kMaxHandleBytes, "")));
  seeds.push_back(serializePeerInfo(sample(2, MemMode::kPosixFd, 0, "cuMemCreate failed")));
  seeds.push_back(
      serializePeerInfo(sample(3, MemMode::kCudaIpc, 17, std::string(kMaxPeerErrorBytes, 'e'))));

  enum Kind { kFlip, kFlipResealed, kLengthField, kTruncate, kExtend, kRandomBlob, kKinds };
  const char* const kKindNames[] = {"flip",     "flip+reseal", "length field",
                                    "truncate", "extend",      "random blob"};
  size_t accepted = 0;
  size_t rejected = 0;
  for (int iteration = 0; iteration < kIterations; ++iteration) {
    std::vector<uint8_t> record = seeds[below(seeds.size())];
    const auto kind = static_cast<Kind>(below(kKinds));
    switch (kind) {
      case kFlip:
      case kFlipResealed: {
        const size_t flips = 1 + below(8);
        for (size_t i = 0; i < flips; ++i) {
          record[below(record.size())] ^= static_cast<uint8_t>(1 + below(255));
        }
        if (kind == kFlipResealed) reseal(&record);
        break;
      }
      case kLengthField: {
        // The handle length, or the error length behind the (original) handle.
        const size_t handle_length =
            record[kHandleLengthOffset] | (size_t{record[kHandleLengthOffset + 1]} << 8);
        const size_t offset = below(2) == 0 ? kHandleLengthOffset : kHandleOffset + handle_length;
        const uint16_t value = below(2) == 0 ? static_cast<uint16_t>(below(kPeerInfoBytes + 16))
                                             : static_cast<uint16_t>(rng());
        putU16(&record, offset, value);
        reseal(&record);
        break;
      }
      case kTruncate:
        record.resize(below(kPeerInfoBytes));
        break;
      case kExtend: {
        const size_t extra = 1 + below(64);
        for (size_t i = 0; i < extra; ++i) record.push_back(static_cast<uint8_t>(rng()));
        break;
      }
      case kRandomBlob: {
        for (uint8_t& byte : record) byte = static_cast<uint8_t>(rng());
        if (below(2) == 0) {
          // A plausible header, so the parse gets past magic and version.
          std::memcpy(record.data(), "EPCM", 4);
          putU16(&record, kVersionOffset, 2);
          putU16(&record, kModeOffset, static_cast<uint16_t>(below(4)));
          reseal(&record);
        }
        break;
      }
      case kKinds:
        break;
    }

    try {
      const PeerInfo info = parseCopy(record, record.size());
      ++accepted;
      ASSERT_LE(info.handle.size(), kMaxHandleBytes) << "iteration " << iteration;
      ASSERT_LE(info.error.size(), kMaxPeerErrorBytes) << "iteration " << iteration;
      ASSERT_EQ(serializePeerInfo(info), record)
          << "iteration " << iteration << " (" << kKindNames[kind]
          << "): accepted a record that is not the canonical encoding of what it parsed to";
    } catch (const Error& e) {
      ++rejected;
      ASSERT_EQ(e.code(), ErrorCode::kInternal)
          << "iteration " << iteration << " (" << kKindNames[kind] << "): " << e.what();
    } catch (const std::exception& e) {
      FAIL() << "iteration " << iteration << " (" << kKindNames[kind]
             << "): not an epcomm::Error: " << e.what();
    }
  }
  // Both outcomes must have been exercised, or the mutations are not reaching the parser.
  EXPECT_GT(accepted, static_cast<size_t>(kIterations / 50));
  EXPECT_GT(rejected, static_cast<size_t>(kIterations / 2));
}

}  // namespace
}  // namespace epcomm::memory
