// SPDX-License-Identifier: Apache-2.0
// PeerInfo record: round trips, the pinned wire layout, and rejection of every short or corrupted
// record without reading past its end (this suite is also run under valgrind).
#include <gtest/gtest.h>

#include <climits>
#include <cstddef>
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

constexpr size_t kVersionOffset = offsetof(PeerInfo, version);
constexpr size_t kOkOffset = offsetof(PeerInfo, ok);
constexpr size_t kReservedOffset = offsetof(PeerInfo, reserved);
constexpr size_t kHandleLengthOffset = offsetof(PeerInfo, handle_length);
constexpr size_t kErrorLengthOffset = offsetof(PeerInfo, error_length);
constexpr size_t kHandleOffset = offsetof(PeerInfo, handle);
constexpr size_t kErrorOffset = offsetof(PeerInfo, error);
constexpr size_t kChecksumOffset = offsetof(PeerInfo, checksum);

std::vector<uint8_t> pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> bytes(n);
  for (size_t i = 0; i < n; ++i) bytes[i] = static_cast<uint8_t>(seed + 7 * i);
  return bytes;
}

PeerInfo sample(int rank, size_t handle_bytes, const std::string& error) {
  PeerInfo info;
  info.rank = rank;
  info.device = rank % 3;
  info.bytes = (uint64_t{1} << 40) + 4096u * static_cast<uint64_t>(rank) + 7;
  info.pid = 100000 + rank;
  info.ok = error.empty() ? 1 : 0;
  info.setError(error);
  const std::vector<uint8_t> handle = pattern(handle_bytes, static_cast<uint8_t>(rank));
  info.setHandle(handle.data(), handle.size());
  return info;
}

// The sealed record as it travels.
std::vector<uint8_t> wire(PeerInfo info) {
  info.seal();
  std::vector<uint8_t> bytes(sizeof(info));
  std::memcpy(bytes.data(), &info, sizeof(info));
  return bytes;
}

std::vector<uint8_t> handleOf(const PeerInfo& info) {
  return std::vector<uint8_t>(info.handle, info.handle + info.handle_length);
}

// What the sender would produce from the parsed fields: the canonical encoding.
std::vector<uint8_t> rebuilt(const PeerInfo& parsed) {
  PeerInfo info;
  info.rank = parsed.rank;
  info.device = parsed.device;
  info.bytes = parsed.bytes;
  info.pid = parsed.pid;
  info.ok = parsed.ok;
  info.setHandle(parsed.handle, parsed.handle_length);
  info.setError(parsed.errorText());
  return wire(info);
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
  return parsePeerInfo(copy.get(), size);
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
  EXPECT_EQ(a.device, b.device);
  EXPECT_EQ(a.bytes, b.bytes);
  EXPECT_EQ(a.pid, b.pid);
  EXPECT_EQ(a.ok, b.ok);
  EXPECT_EQ(a.errorText(), b.errorText());
  EXPECT_EQ(handleOf(a), handleOf(b));
}

TEST(PeerInfo, RoundTripsEveryHandleSize) {
  int rank = 0;
  for (size_t handle_bytes : {size_t{0}, size_t{1}, size_t{17}, kMaxHandleBytes}) {
    for (const char* error : {"", "cuMemCreate failed: CUDA_ERROR_NOT_PERMITTED (800)"}) {
      SCOPED_TRACE(::testing::Message()
                   << "handle " << handle_bytes << " bytes, error '" << error << "'");
      const PeerInfo info = sample(rank++, handle_bytes, error);
      const std::vector<uint8_t> record = wire(info);
      ASSERT_EQ(record.size(), kPeerInfoBytes);
      const PeerInfo back = parseCopy(record, record.size());
      expectSame(back, info);
      EXPECT_EQ(rebuilt(back), record);
    }
  }
}

TEST(PeerInfo, RoundTripsExtremeValues) {
  PeerInfo info;
  info.rank = -1;
  info.device = INT32_MIN;
  info.bytes = UINT64_MAX;
  info.pid = INT32_MAX;
  info.ok = 1;
  const std::vector<uint8_t> handle(kMaxHandleBytes, 0xFF);
  info.setHandle(handle.data(), handle.size());
  info.setError(std::string("nul\0inside", 10));
  expectSame(parseCopy(wire(info), kPeerInfoBytes), info);
}

// The layout is the wire format; these literal offsets are what other builds of version 3 read.
TEST(PeerInfo, WireLayoutIsPinnedLittleEndianAndZeroPadded) {
  EXPECT_EQ(sizeof(PeerInfo), 512u);
  EXPECT_EQ(kHandleOffset, 32u);
  EXPECT_EQ(kErrorOffset, 96u);
  EXPECT_EQ(kChecksumOffset, 508u);
  const std::vector<uint8_t> record = wire(sample(5, 3, ""));
  EXPECT_EQ(std::string(record.begin(), record.begin() + 4), "EPCM");
  EXPECT_EQ(record[kVersionOffset], kPeerInfoVersion);
  EXPECT_EQ(record[kVersionOffset + 1], 0);
  EXPECT_EQ(record[kOkOffset], 1);
  EXPECT_EQ(record[kReservedOffset], 0);
  EXPECT_EQ(record[8], 5);  // rank
  EXPECT_EQ(record[9], 0);
  EXPECT_EQ(record[kHandleLengthOffset], 3);
  EXPECT_EQ(record[kErrorLengthOffset], 0);
  // Past the 3 handle bytes, everything up to the checksum is zero (no error text).
  for (size_t i = kHandleOffset + 3; i < kChecksumOffset; ++i) {
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

TEST(PeerInfo, RejectsEveryCorruptedByte) {
  const std::vector<uint8_t> good = wire(sample(9, 20, "oops"));
  // Any change of any one byte (every single-bit flip, and a few whole-byte values), also in the
  // checksum itself, is rejected.
  for (size_t byte = 0; byte < kPeerInfoBytes; ++byte) {
    std::vector<uint8_t> values;
    for (int bit = 0; bit < 8; ++bit)
      values.push_back(good[byte] ^ static_cast<uint8_t>(1u << bit));
    for (uint8_t value : {uint8_t{0x00}, uint8_t{0xFF}, static_cast<uint8_t>(good[byte] + 1)}) {
      if (value != good[byte]) values.push_back(value);
    }
    for (uint8_t value : values) {
      std::vector<uint8_t> bad = good;
      bad[byte] = value;
      try {
        parseCopy(bad, bad.size());
        ADD_FAILURE() << "accepted a record with byte " << byte << " changed to " << int{value};
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

TEST(PeerInfo, RejectsNonZeroReservedAndUnusedBytes) {
  const std::vector<uint8_t> good = wire(sample(8, 4, "ab"));
  expectCorrupt(
      [&] {
        std::vector<uint8_t> bad = good;
        bad[kReservedOffset] = 1;
        return bad;
      }(),
      "reserved byte at offset 7");
  // Past the 4 handle bytes, and past the 2 error bytes.
  for (size_t offset : {kHandleOffset + 4, kErrorOffset - 1}) {
    std::vector<uint8_t> bad = good;
    bad[offset] = 0x80;
    expectCorrupt(bad, "unused handle byte at offset " + std::to_string(offset));
  }
  for (size_t offset : {kErrorOffset + 2, size_t{300}, kChecksumOffset - 1}) {
    std::vector<uint8_t> bad = good;
    bad[offset] = 0x80;
    expectCorrupt(bad, "unused error byte at offset " + std::to_string(offset));
  }
}

TEST(PeerInfo, LongErrorIsTruncated) {
  const std::string long_error(5000, 'x');
  const PeerInfo info = sample(1, kMaxHandleBytes, long_error);
  const PeerInfo back = parseCopy(wire(info), kPeerInfoBytes);
  EXPECT_LE(back.errorText().size(), kMaxPeerErrorBytes);
  EXPECT_GT(back.errorText().size(), kMaxPeerErrorBytes / 2);
  EXPECT_EQ(back.errorText().compare(0, 10, long_error, 0, 10), 0);
  EXPECT_EQ(back.errorText().substr(back.errorText().size() - 3), "...");
  EXPECT_EQ(handleOf(back), handleOf(info));  // the error never crowds out the handle
}

TEST(PeerInfo, TruncationNeverSplitsUtf8) {
  // Two-byte characters ("é") so a byte-exact cut would land inside one.
  std::string error;
  while (error.size() < 2 * kMaxPeerErrorBytes) error += "\xC3\xA9";
  const std::string back = parseCopy(wire(sample(2, 0, error)), kPeerInfoBytes).errorText();
  ASSERT_LE(back.size(), kMaxPeerErrorBytes);
  size_t accents = 0;
  while (accents + 1 < back.size() && back.compare(accents, 2, "\xC3\xA9") == 0) accents += 2;
  // Whatever follows the last whole character is ASCII (the truncation mark), never a stray byte.
  for (size_t i = accents; i < back.size(); ++i) {
    EXPECT_LT(static_cast<uint8_t>(back[i]), 0x80) << "byte " << i;
  }
}

TEST(PeerInfo, SetHandleRejectsOversizedHandle) {
  PeerInfo info = sample(0, 3, "");
  const std::vector<uint8_t> handle(kMaxHandleBytes + 1, 1);
  try {
    info.setHandle(handle.data(), handle.size());
    ADD_FAILURE() << "accepted a 65-byte handle";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("65"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("64"), std::string::npos) << e.what();
  }
  EXPECT_EQ(info.handle_length, 3);  // unchanged
}

TEST(PeerInfo, SetHandleAndErrorClearWhatWasThere) {
  PeerInfo info = sample(0, kMaxHandleBytes, std::string(kMaxPeerErrorBytes, 'e'));
  info.setHandle(nullptr, 0);
  info.setError("");
  const PeerInfo back = parseCopy(wire(info), kPeerInfoBytes);  // unused bytes must be zero
  EXPECT_EQ(back.handle_length, 0);
  EXPECT_EQ(back.errorText(), "");
}

TEST(PeerInfo, RejectsEveryTruncatedLength) {
  const std::vector<uint8_t> record = wire(sample(3, kMaxHandleBytes, "some error"));
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
  EXPECT_THROW(parsePeerInfo(nullptr, kPeerInfoBytes), Error);
  EXPECT_THROW(parsePeerInfo(nullptr, 0), Error);
  std::vector<uint8_t> longer = wire(sample(0, 0, ""));
  longer.push_back(0);
  expectCorrupt(longer, "513 bytes");
}

TEST(PeerInfo, RejectsCorruptedHeader) {
  const std::vector<uint8_t> good = wire(sample(4, 8, "x"));
  {
    std::vector<uint8_t> bad = good;
    bad[0] ^= 0x20;  // 'E' -> 'e'
    expectCorrupt(bad, "magic");
  }
  for (uint16_t version : {uint16_t{kPeerInfoVersion - 1}, uint16_t{kPeerInfoVersion + 1},
                           uint16_t{0}, uint16_t{0xFFFF}}) {
    std::vector<uint8_t> bad = good;
    putU16(&bad, kVersionOffset, version);
    expectCorrupt(bad, "version " + std::to_string(version));
  }
  for (uint8_t ok : {uint8_t{2}, uint8_t{0x80}, uint8_t{0xFF}}) {
    std::vector<uint8_t> bad = good;
    bad[kOkOffset] = ok;
    expectCorrupt(bad, "ok flag is " + std::to_string(ok));
  }
}

TEST(PeerInfo, RejectsBadLengths) {
  const std::vector<uint8_t> good = wire(sample(6, 16, "abc"));
  for (uint16_t length :
       {uint16_t{kMaxHandleBytes + 1}, uint16_t{kPeerInfoBytes}, uint16_t{0xFFFF}}) {
    std::vector<uint8_t> bad = good;
    putU16(&bad, kHandleLengthOffset, length);
    expectCorrupt(bad, "handle length " + std::to_string(length));
  }
  for (uint16_t length :
       {uint16_t{kMaxPeerErrorBytes + 1}, uint16_t{kPeerInfoBytes}, uint16_t{0xFFFF}}) {
    std::vector<uint8_t> bad = good;
    putU16(&bad, kErrorLengthOffset, length);
    expectCorrupt(bad, "error length " + std::to_string(length));
  }
  // Shorter lengths leave non-zero bytes past them: not what any sender writes.
  {
    std::vector<uint8_t> bad = good;
    putU16(&bad, kHandleLengthOffset, 15);
    expectCorrupt(bad, "unused handle byte at offset " + std::to_string(kHandleOffset + 15));
  }
  {
    std::vector<uint8_t> bad = good;
    putU16(&bad, kErrorLengthOffset, 2);
    expectCorrupt(bad, "unused error byte at offset " + std::to_string(kErrorOffset + 2));
  }
  // A record whose every byte is 0xFF: bad magic first, nothing read beyond it.
  expectCorrupt(std::vector<uint8_t>(kPeerInfoBytes, 0xFF), "magic");
}

TEST(PeerInfo, NoLengthReadsOutOfBounds) {
  // Every handle and error length up to past the record end, plus the high values: none may
  // read out of bounds (valgrind) or be accepted beyond the limit.
  const std::vector<uint8_t> good = wire(sample(7, 0, ""));
  std::vector<uint32_t> lengths;
  for (uint32_t length = 0; length <= kPeerInfoBytes + 8; ++length) lengths.push_back(length);
  for (uint32_t length : {0x7FFFu, 0x8000u, 0xFFFEu, 0xFFFFu}) lengths.push_back(length);
  for (size_t field : {kHandleLengthOffset, kErrorLengthOffset}) {
    const size_t limit = field == kHandleLengthOffset ? kMaxHandleBytes : kMaxPeerErrorBytes;
    std::vector<uint8_t> bad = good;
    for (uint32_t length : lengths) {
      putU16(&bad, field, static_cast<uint16_t>(length));
      reseal(&bad);  // so the length check itself is exercised, not the checksum
      bool accepted = true;
      try {
        parseCopy(bad, bad.size());
      } catch (const Error& e) {
        ASSERT_EQ(e.code(), ErrorCode::kInternal) << e.what();
        accepted = false;
      }
      // All-zero contents: any length within the limit is a valid (zero-filled) record.
      ASSERT_EQ(accepted, length <= limit) << "length " << length << " at offset " << field;
    }
  }
}

TEST(PeerInfo, AllGatherChecksEachRecordsRank) {
  // One-rank bootstrap whose all-gather delivers a record claiming another rank.
  class MislabellingBootstrap : public Bootstrap {
   public:
    int rank() const override { return 0; }
    int size() const override { return 1; }
    void allGather(const void* send, void* recv, size_t bytes) override {
      PeerInfo info;
      std::memcpy(&info, send, bytes);
      info.rank = 1;
      info.seal();
      std::memcpy(recv, &info, bytes);
    }
    void barrier() override {}
  };
  MislabellingBootstrap bootstrap;
  PeerInfo mine = sample(0, 4, "");
  try {
    allGatherPeerInfo(bootstrap, mine);
    ADD_FAILURE() << "accepted rank 1's record in rank 0's slot";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInternal) << e.what();
    EXPECT_NE(std::string(e.what()).find("claims rank 1"), std::string::npos) << e.what();
  }
}

// Randomized mutation test, fixed seed (reproducible; the failure message names the iteration
// and the kind of mutation). Whatever bytes arrive, the parser never crashes or reads out of
// bounds (each input is parsed from an exactly-sized heap copy, so ASan and valgrind see any
// overread), and it either throws Error(kInternal) or returns a record that is exactly what a
// sender writes for its fields (the encoding is canonical).
TEST(PeerInfo, SurvivesRandomMutations) {
  constexpr int kIterations = 40000;
  std::mt19937_64 rng(0x9e3779b97f4a7c15ull);
  auto below = [&rng](size_t n) { return static_cast<size_t>(rng() % n); };
  std::vector<std::vector<uint8_t>> seeds;
  seeds.push_back(wire(sample(0, 0, "")));
  seeds.push_back(wire(sample(1, kMaxHandleBytes, "")));
  seeds.push_back(wire(sample(2, 0, "cuMemCreate failed")));
  seeds.push_back(wire(sample(3, 17, std::string(kMaxPeerErrorBytes, 'e'))));

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
        const size_t offset = below(2) == 0 ? kHandleLengthOffset : kErrorLengthOffset;
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
          putU16(&record, kVersionOffset, kPeerInfoVersion);
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
      ASSERT_LE(info.handle_length, kMaxHandleBytes) << "iteration " << iteration;
      ASSERT_LE(info.error_length, kMaxPeerErrorBytes) << "iteration " << iteration;
      ASSERT_EQ(rebuilt(info), record)
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
